"""Resolve a checkpoint argument (local directory or Hugging Face Hub id) to a local directory, and name the
files inside it.

The processor and the model loader both call :func:`resolve_checkpoint`, so a hub id is downloaded (or found
in the Hugging Face cache) the same way everywhere. Offline use (``HF_HUB_OFFLINE=1`` or no network) works
from the cache; when the files are not cached the error tells the user to pass a local directory instead.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

from ov_jax.paths import MISSING, path_problem


class CheckpointError(ValueError):
    """A checkpoint directory cannot be read into the params tree (every problem is listed)."""


def _allowed_roots(directory: pathlib.Path) -> tuple[pathlib.Path, ...]:
    """Where the files of ``directory`` (resolved) may live: itself, and for a Hugging Face cache snapshot
    (``.../snapshots/<revision>``, whose files link to ``../../blobs/<hash>``) that repository's blobs."""
    if directory.parent.name == "snapshots":
        return directory, directory.parent.parent / "blobs"
    return (directory,)


def checkpoint_file(directory: str | os.PathLike, name: str) -> pathlib.Path:
    """``directory / name``, refusing a name or a symlink that leads outside the checkpoint directory.

    ``name`` must be relative without ``..`` parts; the file (which need not exist) must resolve inside
    ``directory`` (or, for a Hugging Face cache snapshot, inside that repository's ``blobs``). Raises
    :class:`CheckpointError` naming the file otherwise, so a checkpoint can only make us read its own files.
    """
    directory = pathlib.Path(directory)
    parts = pathlib.PurePosixPath(name.replace("\\", "/")).parts
    if not parts or os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts:
        raise CheckpointError(f"checkpoint {directory} names the file {name!r}, which is outside the checkpoint "
                              "directory (only plain relative names are read)")
    if "\0" in name:
        raise CheckpointError(f"checkpoint {directory} names the file {name!r}, which is not a file name (it holds "
                              "a NUL character)")
    path = directory.joinpath(*parts)
    roots = _allowed_roots(pathlib.Path(os.path.realpath(directory)))
    target = pathlib.Path(os.path.realpath(path))
    if not any(target == root or root in target.parents for root in roots):
        raise CheckpointError(f"checkpoint file {path} is a link to {target}, outside the checkpoint directory; "
                              "it is not read")
    if os.path.exists(target) and not (target.is_file() or target.is_dir()):  # a FIFO would block the read
        raise CheckpointError(f"checkpoint file {path} is not a regular file (a pipe, socket or device); it is "
                              "not read")
    return path


def _looks_like_local_path(path_or_id: str) -> bool:
    """Paths the user clearly meant as local: absolute, relative with ./ or ../, ~, 3+ components, a Windows
    separator, or a first component that exists here (``tiny/sub`` next to a local ``tiny/``)."""
    return (
        os.path.isabs(path_or_id)
        or path_or_id.startswith((".", "~"))
        or path_or_id.count("/") >= 2
        or os.sep != "/" and os.sep in path_or_id
        or "/" in path_or_id and os.path.lexists(path_or_id.split("/")[0])
    )


def resolve_checkpoint(path_or_id: str | os.PathLike, allow_patterns: Sequence[str] | None = None) -> pathlib.Path:
    """Local directory holding the checkpoint files of ``path_or_id``.

    A local directory is returned as is; a missing path that is clearly local (see
    :func:`_looks_like_local_path`), a symlink loop or a broken symlink is a ``FileNotFoundError`` saying which.
    Anything else is treated as a Hub repo id and fetched with ``huggingface_hub.snapshot_download`` (only the
    files matching ``allow_patterns`` when given), reusing the standard Hugging Face cache.
    """
    path = pathlib.Path(os.fspath(path_or_id)).expanduser()
    text = os.fspath(path_or_id)
    problem = path_problem(path)
    if problem is None:
        if not path.is_dir():
            raise NotADirectoryError(f"checkpoint path {text!r} is a file; pass the directory that contains it")
        return path
    if problem != MISSING or _looks_like_local_path(text):  # a loop or a broken link is local too
        raise FileNotFoundError(f"checkpoint directory {text!r} {problem}")

    import huggingface_hub
    from huggingface_hub import errors as hub_errors
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except hub_errors.HFValidationError as err:
        raise FileNotFoundError(
            f"checkpoint {text!r} is neither an existing local directory nor a valid Hugging Face Hub repo id ({err})"
        ) from None

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        snapshot = huggingface_hub.snapshot_download(
            text, allow_patterns=list(allow_patterns) if allow_patterns else None, local_files_only=offline
        )
    except hub_errors.RepositoryNotFoundError:
        raise FileNotFoundError(
            f"no local directory {text!r} exists, and Hugging Face Hub repo {text!r} was not found (or is "
            "private/gated without a token)"
        ) from None
    except OSError as err:  # LocalEntryNotFoundError (not cached, offline or unreachable), HTTP and I/O errors
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise FileNotFoundError(
            f"no local directory {text!r} exists, and as a Hugging Face Hub id it cannot be fetched: {why} "
            "and it is not in the local Hugging Face cache. "
            "Download the checkpoint elsewhere and pass its local directory instead "
            f"(every ov_jax from_pretrained accepts '/path/to/checkpoint'). [{type(err).__name__}]"
        ) from None
    return pathlib.Path(snapshot)
