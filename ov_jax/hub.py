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
    path = directory.joinpath(*parts)
    roots = _allowed_roots(pathlib.Path(os.path.realpath(directory)))
    target = pathlib.Path(os.path.realpath(path))
    if not any(target == root or root in target.parents for root in roots):
        raise CheckpointError(f"checkpoint file {path} is a link to {target}, outside the checkpoint directory; "
                              "it is not read")
    return path


def _looks_like_local_path(path_or_id: str) -> bool:
    """Paths the user clearly meant as local (absolute, relative with ./ or ../, ~, or 3+ components)."""
    return (
        os.path.isabs(path_or_id)
        or path_or_id.startswith((".", "~"))
        or path_or_id.count("/") >= 2
        or os.sep != "/" and os.sep in path_or_id
    )


def resolve_checkpoint(path_or_id: str | os.PathLike, allow_patterns: Sequence[str] | None = None) -> pathlib.Path:
    """Local directory holding the checkpoint files of ``path_or_id``.

    A local directory is returned as is. Anything else is treated as a Hub repo id and fetched with
    ``huggingface_hub.snapshot_download`` (only the files matching ``allow_patterns`` when given), reusing the
    standard Hugging Face cache.
    """
    path = pathlib.Path(os.fspath(path_or_id)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"checkpoint path {str(path)!r} is a file; pass the directory that contains it")
    text = os.fspath(path_or_id)
    if _looks_like_local_path(text):
        raise FileNotFoundError(f"checkpoint directory {text!r} does not exist")

    import huggingface_hub
    from huggingface_hub import errors as hub_errors
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except hub_errors.HFValidationError as err:
        raise FileNotFoundError(
            f"{text!r} is neither an existing local directory nor a valid Hugging Face Hub repo id ({err})"
        ) from None

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        snapshot = huggingface_hub.snapshot_download(
            text, allow_patterns=list(allow_patterns) if allow_patterns else None, local_files_only=offline
        )
    except hub_errors.RepositoryNotFoundError:
        raise FileNotFoundError(
            f"Hugging Face Hub repo {text!r} was not found (or is private/gated without a token), "
            "and no local directory of that name exists"
        ) from None
    except OSError as err:  # LocalEntryNotFoundError (not cached, offline or unreachable), HTTP and I/O errors
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise FileNotFoundError(
            f"cannot fetch {text!r}: {why} and it is not in the local Hugging Face cache. "
            "Download the checkpoint elsewhere and pass its local directory instead "
            f"(every ov_jax from_pretrained accepts '/path/to/checkpoint'). [{type(err).__name__}]"
        ) from None
    return pathlib.Path(snapshot)
