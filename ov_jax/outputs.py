"""Output directories: the one gate every command that writes a directory goes through.

Rule: a destination is written only if it does not exist, is an empty directory, or is a previous output of
the same kind (it carries the marker file :data:`MARKER` recording that kind and the entries written) and
holds nothing else; replacing a previous output needs ``overwrite``. A destination that is, or contains, a
source of the command or the current directory is always refused, and so is one that cannot be followed (a
symlink loop, a broken symlink). Everything else is an
:class:`OutputPathError` in one line.

Two ways to write:

* :func:`atomic_output_dir` (complete outputs: converted checkpoints, tiny checkpoints, exports) builds
  everything in a hidden temporary sibling and renames it over the destination at the end; an interrupted or
  failed run leaves no destination and no temporary, and a replaced output leaves no stale file.
* :func:`prepare_output_dir` (outputs that grow while a job runs, e.g. fine-tuning runs) checks the
  destination, replaces a previous output of the same kind when ``overwrite``, creates it and writes the
  marker; :func:`output_kind` tells whether an existing directory is such an output (to resume it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from ov_jax.paths import path_problem

MARKER = ".ov_jax-output.json"
_TMP_MARK = ".ov_jax-tmp-"
_OLD_MARK = ".ov_jax-old-"


class OutputPathError(OSError):
    """An output destination that must not be written (or replaced); the message says why and what to do."""


def output_kind(path: str | os.PathLike) -> str | None:
    """The ``kind`` recorded in ``path``'s marker, or None when ``path`` is not an ov_jax output directory."""
    return _read_marker(Path(path)).get("kind")


def _read_marker(path: Path) -> dict:
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else {}


def _write_marker(directory: Path, kind: str, entries: list[str] | None) -> None:
    marker = {"kind": kind, "entries": entries}
    (directory / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_output_dir(dst: str | os.PathLike, *, kind: str, overwrite: bool = False,
                     sources: Iterable[str | os.PathLike] = ()) -> Path:
    """The resolved destination if an output of ``kind`` may be written there, else :class:`OutputPathError`.

    ``kind`` names the command (e.g. ``"convert"``); ``sources`` are the paths the command reads (never
    replaced, nor any directory holding them). Returns the absolute path with symlinks resolved.
    """
    problem = path_problem(dst) if os.path.islink(dst) else None
    if problem is not None:  # a symlink loop or a broken symlink: nothing to write into
        raise OutputPathError(f"refusing to write {kind} output to {os.fspath(dst)}: it {problem}")
    dst = Path(os.path.realpath(os.fspath(dst)))
    if not os.path.lexists(dst):
        return dst
    for source in sources:
        source = Path(os.path.realpath(os.fspath(source)))
        if _inside(source, dst):
            what = "is" if source == dst else "contains"
            raise OutputPathError(f"refusing to write {kind} output to {dst}: it {what} the source {source}")
    if _inside(Path.cwd().resolve(), dst):
        raise OutputPathError(f"refusing to write {kind} output to {dst}: it contains the current directory")
    if not dst.is_dir():
        raise OutputPathError(f"refusing to write {kind} output to {dst}: it is an existing file")
    present = sorted(p.name for p in dst.iterdir())
    if not present:
        return dst
    marker = _read_marker(dst)
    if not marker:
        raise OutputPathError(f"refusing to write {kind} output to {dst}: it is a directory holding other files "
                              f"({', '.join(present[:3])}{', ...' if len(present) > 3 else ''}); choose a new or "
                              "empty directory")
    if marker["kind"] != kind:
        raise OutputPathError(f"refusing to write {kind} output to {dst}: it is the output of {marker['kind']!r}, "
                              "not of this command; choose another directory")
    entries = marker.get("entries")
    if isinstance(entries, list):
        foreign = sorted(set(present) - set(entries) - {MARKER})
        if foreign:
            raise OutputPathError(f"refusing to replace {dst}: besides an earlier {kind} output it holds "
                                  f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}; move them first")
    if not overwrite:
        raise FileExistsError(f"{dst} already exists (an earlier {kind} output); pass overwrite=True "
                              "(--overwrite) to replace it")
    return dst


def _make_parent(dst: Path) -> None:
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputPathError(f"cannot create {dst}: a parent path is an existing file") from None
    except OSError as err:
        raise OutputPathError(f"cannot create {dst}: {err.strerror or err}") from None


def _remove_stale_temporaries(dst: Path) -> None:
    """Delete temporaries of earlier writes into ``dst`` whose process is gone (e.g. killed)."""
    for mark in (_TMP_MARK, _OLD_MARK):
        prefix = f".{dst.name}{mark}"
        for stale in dst.parent.glob(f"{prefix}*"):
            try:
                os.kill(int(stale.name[len(prefix):].split("-")[0]), 0)
            except ProcessLookupError:
                shutil.rmtree(stale, ignore_errors=True)
            except (ValueError, PermissionError):
                pass


def _rmtree_dir(path: Path) -> None:
    """Remove a directory tree without following a symlink at ``path`` itself."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike, *, kind: str, overwrite: bool = False,
                      sources: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``dst`` (with the marker) only if the block completes.

    The destination is checked first (:func:`check_output_dir`); an earlier output of the same kind is
    replaced whole, so none of its files survive. Any failure leaves neither ``dst`` (if it did not exist)
    nor the temporary; writing errors (disk full, read-only) surface as they were raised.
    """
    dst = check_output_dir(dst, kind=kind, overwrite=overwrite, sources=sources)
    _make_parent(dst)
    _remove_stale_temporaries(dst)
    tmp = dst.parent / f".{dst.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as err:
        raise OutputPathError(f"cannot write to {dst.parent}: {err.strerror or err}") from None
    try:
        yield tmp
        _write_marker(tmp, kind, sorted(p.name for p in tmp.iterdir()))
        if os.path.lexists(dst):
            old = dst.parent / f".{dst.name}{_OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            _rmtree_dir(old)
        else:
            os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def prepare_output_dir(dst: str | os.PathLike, *, kind: str, overwrite: bool = False,
                       sources: Iterable[str | os.PathLike] = (), entries: Iterable[str] | None = None) -> Path:
    """Check ``dst`` (:func:`check_output_dir`), replace an earlier output of ``kind`` when ``overwrite``,
    create the directory with its marker and return its resolved path. For outputs written over time;
    complete outputs use :func:`atomic_output_dir`. ``entries``: the names the output will hold, recorded in
    the marker so that a later ``overwrite`` refuses to delete anything else put there meanwhile."""
    dst = check_output_dir(dst, kind=kind, overwrite=overwrite, sources=sources)
    _make_parent(dst)
    if os.path.lexists(dst) and any(dst.iterdir()):
        _rmtree_dir(dst)
    try:
        dst.mkdir(exist_ok=True)
        _write_marker(dst, kind, None if entries is None else sorted(entries))
    except OSError as err:
        raise OutputPathError(f"cannot create {dst}: {err.strerror or err}") from None
    return dst

