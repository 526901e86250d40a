"""Converted checkpoints: the params as an orbax checkpoint, our config, and the tokenizer/processor files.

Layout of a converted directory (a complete model directory, loadable by ``LlavaOnevision.from_pretrained``)::

    config.json        the source config.json plus {"ov_jax": OneVisionConfig.to_dict()}
    params/            orbax checkpoint of the params tree (uncompressed, one array per leaf)
    checksums.json     sha256 and size of every file under params/, and sha256 of every array's bytes
    tokenizer.json, chat_template.jinja, preprocessor_config.json, ...   copied from the source
    .ov_jax-output.json   the output marker (`ov_jax.outputs`): only such a directory is ever overwritten

Writing streams leaf by leaf (orbax partial saves, finalized at the end), so peak host memory is about the
largest params leaf plus orbax's write buffer for it. Output is atomic (`ov_jax.outputs.atomic_output_dir`):
everything is written to a hidden temporary directory beside ``dst`` and renamed at the end; an interrupted
or failed run (disk full, read-only) leaves no ``dst`` and no temporary.

Loading verifies the checkpoint unless ``verify=False``: every file under params/ against its size and
sha256 (whatever the sharding), and, when the params are loaded unsharded in the stored dtype or a wider one,
every array's bytes against the sha256 taken when it was written. Damage is a :class:`CorruptCheckpointError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from ov_jax.config import OneVisionConfig, QuantConfig, load_config
from ov_jax.hub import checkpoint_file, resolve_checkpoint
from ov_jax.loading import (LOAD_DTYPES, CheckpointError, flat_shardings, plan_checkpoint, read_leaf,
                            resolve_load_dtype, set_path)
from ov_jax.outputs import MARKER, atomic_output_dir
from ov_jax.params import Params, is_spec, param_specs

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
CHECKSUMS_FILE = "checksums.json"
OUTPUT_KIND = "convert"  # the outputs marker kind of every converted directory (convert and save_orbax)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt", ".gguf")
_NOT_COPIED = {CONFIG_FILE, CHECKSUMS_FILE, MARKER, "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_CHUNK = 1 << 24
_HASH_THREADS = min(8, os.cpu_count() or 1)


class CorruptCheckpointError(CheckpointError):
    """A converted checkpoint whose files or arrays do not match the checksums written with them, or that
    orbax cannot read: the message names the checkpoint and the damaged file or array."""


class CheckpointWriteError(OSError):
    """Writing a converted checkpoint failed (disk full, read-only destination...); nothing was left behind."""


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert` wrote and what it cost (RSS from ``resource.getrusage``)."""

    destination: Path
    seconds: float
    leaves: int
    bytes_written: int
    largest_leaf_bytes: int
    largest_file_tensor_bytes: int
    rss_before_bytes: int
    peak_rss_bytes: int

    def __str__(self) -> str:
        mb = 1 << 20
        return (f"wrote {self.destination} ({self.leaves} leaves, {self.bytes_written / mb:.1f} MiB) in "
                f"{self.seconds:.1f} s; peak RSS {self.peak_rss_bytes / mb:.0f} MiB "
                f"(+{(self.peak_rss_bytes - self.rss_before_bytes) / mb:.0f} MiB over the start; largest leaf "
                f"{self.largest_leaf_bytes / mb:.1f} MiB, largest file tensor "
                f"{self.largest_file_tensor_bytes / mb:.1f} MiB)")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory written by :func:`convert` / :func:`save_orbax`."""
    path = Path(path)
    try:
        config = json.loads(checkpoint_file(path, CONFIG_FILE).read_text())
        return (path / PARAMS_DIR).is_dir() and isinstance(config, dict) and "ov_jax" in config
    except (OSError, ValueError):
        return False


def _orbax_context() -> ocp.v1.Context:
    """Uncompressed arrays: compression saves little on weights and costs a buffer and time both ways."""
    context = ocp.v1.Context()
    context.array.saving.use_compression = False
    return context


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Hold back absl's log records (orbax logs each failed background write with its traceback) while
    orbax runs: a failure is raised as one exception that says everything."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _short_reason(err: BaseException) -> str:
    """One short line for an orbax / TensorStore / OS error (their messages run to thousands of characters)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = " ".join(str(err).split())
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        return os.strerror(int(code.group(1)))
    text = re.sub(r"^[A-Z_]+: ", "", text)
    return text[:200] + ("..." if len(text) > 200 else "") or type(err).__name__


@contextlib.contextmanager
def _writing(dst: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write (disk full, read-only, orbax error) into one :class:`CheckpointWriteError`."""
    try:
        with _quiet_orbax():
            yield
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError) as err:  # orbax reports TensorStore write failures as ValueError
        raise CheckpointWriteError(f"cannot write {Path(dst).absolute()}: {_short_reason(err)}; nothing was "
                                   "written") from err


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _array_record(array: Any) -> dict[str, Any] | None:
    """dtype, shape and sha256 of an array's bytes (C order); None when this process cannot see all of it."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return None
    host = np.ascontiguousarray(np.asarray(array))
    digest = hashlib.sha256(host.reshape(-1).view(np.uint8)).hexdigest()
    return {"dtype": host.dtype.name, "shape": list(host.shape), "sha256": digest}


def _write_checksums(directory: Path, arrays: dict[str, Any]) -> None:
    params = directory / PARAMS_DIR
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256_file(p)}
             for p in sorted(params.rglob("*")) if p.is_file()}
    (directory / CHECKSUMS_FILE).write_text(json.dumps(
        {"algorithm": "sha256", "files": files, "arrays": arrays}, indent=1, sort_keys=True) + "\n")


def _write_params(directory: Path, leaves: Iterable[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    """Save (path, array) pairs one at a time into one orbax checkpoint at ``directory``; returns each
    array's checksum record keyed by its dotted path."""
    arrays = {}
    with _orbax_context():
        for path, array in leaves:
            arrays[".".join(path)] = _array_record(array)
            tree: dict = {}
            set_path(tree, path, array)
            ocp.v1.partial.save(directory, tree)
            del tree, array
        ocp.v1.partial.finalize(directory)
    return arrays


def copy_model_files(source: Path, directory: Path) -> None:
    """Copy the files directly in ``source`` that are not weights, weight indexes, checksums or config.json
    (tokenizer, processor, chat template, generation config...) into ``directory``; subdirectories are not
    entered, and a link leading outside the checkpoint is a ``CheckpointError`` (`ov_jax.hub.checkpoint_file`)."""
    for file in sorted(source.iterdir()):
        if file.is_file() and file.name not in _NOT_COPIED and not file.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy(checkpoint_file(source, file.name), directory / file.name)  # follows hub-cache links


def _write_model_files(directory: Path, config: OneVisionConfig, source: Path | None) -> None:
    """config.json (source config + ours) and every non-weight file of ``source`` (tokenizer, processor...)."""
    raw: dict[str, Any] = {}
    if source is not None:
        try:
            raw = json.loads(checkpoint_file(source, CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            raw = {}
        copy_model_files(source, directory)
    raw["ov_jax"] = config.to_dict()
    (directory / CONFIG_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = None, *, overwrite: bool = False,
            progress: bool = True, quantization: QuantConfig | None = None) -> ConversionReport:
    """Convert a safetensors checkpoint (directory or hub id) into a converted orbax directory ``dst``.

    ``dtype`` (float32 / bfloat16 / float16) casts the weights; default: keep each tensor's file dtype, so
    loading ``dst`` gives exactly what loading ``src`` gives. ``quantization`` (`ov_jax.config.QuantConfig`)
    stores the weights it selects quantized (each leaf is quantized as it is read, `ov_jax.nn.quant`); the
    directory then loads straight into the quantized form. Refuses an existing ``dst`` unless ``overwrite``;
    ``ValueError`` for an int4 group size that does not divide a weight's input size.
    """
    rss_before, start = peak_rss_bytes(), time.perf_counter()
    source = resolve_checkpoint(src)
    plan = plan_checkpoint(source)
    if quantization is not None:
        from ov_jax.nn.quant import quantize_leaf

        param_specs(plan.config.replace(quantization=quantization))  # a bad group size fails before writing
        specs = _flat_specs(plan.config)
    store = None if dtype is None else resolve_load_dtype(dtype)
    sizes = {p: math.prod(leaf.shape) * (store or leaf.file_dtype).itemsize for p, leaf in plan.leaves.items()}
    stored = store or np.result_type(*(leaf.file_dtype for leaf in plan.leaves.values()))
    written: dict[tuple[str, ...], int] = {}
    with atomic_output_dir(dst, kind=OUTPUT_KIND, overwrite=overwrite, sources=[source]) as tmp, _writing(dst):
        with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"converting {source.name}", disable=not progress, leave=False) as bar:
            def leaves():
                for path, leaf in plan.leaves.items():
                    bar.set_postfix_str(".".join(path), refresh=False)
                    array = read_leaf(leaf, None, store)
                    parts = {path: array}
                    if quantization is not None:
                        new = quantize_leaf(".".join(path), array, specs[path], quantization)
                        if isinstance(new, dict):  # a table becomes a dict; a kernel's keys replace "kernel"
                            base = path if path[-1] != "kernel" else path[:-1]
                            parts = {base + (key,): np.asarray(value) for key, value in new.items()}
                    for part_path, part in parts.items():
                        written[part_path] = part.nbytes
                        yield part_path, part
                    bar.update(sizes[path])

            arrays = _write_params(tmp / PARAMS_DIR, leaves())
        config = plan.config.replace(dtype=np.dtype(stored).name, quantization=quantization)
        _write_model_files(tmp, config, source)
        _write_checksums(tmp, arrays)
    return ConversionReport(Path(dst).absolute(), time.perf_counter() - start, len(written), sum(written.values()),
                            max(written.values()), plan.largest_tensor_bytes, rss_before, peak_rss_bytes())


def _flat_specs(config: OneVisionConfig) -> dict[tuple[str, ...], Any]:
    return {tuple(k.key for k in path): spec
            for path, spec in jax.tree_util.tree_leaves_with_path(param_specs(config), is_leaf=is_spec)}


def _params_leaves(params: Params) -> Iterator[tuple[tuple[str, ...], Any]]:
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        yield tuple(getattr(k, "key", k) for k in path), x


def save_orbax(params: Params, config: OneVisionConfig, dst: str | os.PathLike, *, overwrite: bool = False,
               files_from: str | os.PathLike | None = None) -> Path:
    """Save an in-memory params tree (e.g. after fine-tuning) as a converted directory, atomically.

    ``files_from``: a checkpoint directory whose config.json and tokenizer/processor files go alongside.
    """
    have = {tuple(getattr(k, "key", k) for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {path: spec.shape for path, spec in _flat_specs(config).items()}
    if have != want:
        wrong = sorted(set(have.items()) ^ set(want.items()))
        raise ValueError(f"params do not match the config's tree (leaf, shape): {wrong}")
    sources = [] if files_from is None else [files_from]
    with atomic_output_dir(dst, kind=OUTPUT_KIND, overwrite=overwrite, sources=sources) as tmp, _writing(dst):
        arrays = _write_params(tmp / PARAMS_DIR, _params_leaves(params))
        _write_model_files(tmp, config, None if files_from is None else Path(files_from))
        _write_checksums(tmp, arrays)
    return Path(dst).absolute()


def _damaged(path: Path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"converted checkpoint {path} is damaged: {what}; convert it again "
                                  "(ov-jax convert)")


def _check_links(path: Path) -> None:
    """No file under params/ may lead outside the checkpoint directory (orbax follows links)."""
    for file in sorted((path / PARAMS_DIR).rglob("*")):
        if file.is_symlink():
            checkpoint_file(path, str(file.relative_to(path)))


def _read_checksums(path: Path) -> dict[str, Any]:
    file = checkpoint_file(path, CHECKSUMS_FILE)
    try:
        checksums = json.loads(file.read_text())
        if not (isinstance(checksums.get("files"), dict) and isinstance(checksums.get("arrays"), dict)):
            raise ValueError("no 'files' / 'arrays' tables")
        bad = [name for name, record in checksums["files"].items() if not isinstance(record, dict)]
        bad += [name for name, record in checksums["arrays"].items() if not isinstance(record, (dict, type(None)))]
        if bad:
            raise ValueError(f"the entry of {bad[0]} is not an object")
    except FileNotFoundError:
        raise CorruptCheckpointError(f"converted checkpoint {path} has no {CHECKSUMS_FILE}, so it cannot be "
                                     "verified; convert it again, or load it with verify=False") from None
    except (OSError, ValueError, AttributeError) as err:
        raise _damaged(path, f"{CHECKSUMS_FILE} is unreadable ({err})") from None
    return checksums


def verify_files(path: str | os.PathLike) -> dict[str, Any]:
    """Check every file listed in ``checksums.json`` (size, sha256); returns the checksums table.

    Raises :class:`CorruptCheckpointError` naming the first missing, truncated, changed or unlisted file.
    """
    path = Path(path).absolute()
    checksums = _read_checksums(path)
    unlisted = sorted(str(p.relative_to(path)) for p in (path / PARAMS_DIR).rglob("*")
                      if p.is_file() and str(p.relative_to(path)) not in checksums["files"])
    if unlisted:
        raise _damaged(path, f"{unlisted[0]} has no entry in {CHECKSUMS_FILE}")
    files = {}
    for name, want in sorted(checksums["files"].items()):
        file = checkpoint_file(path, name)
        if not file.is_file():
            raise _damaged(path, f"{name} is missing")
        size = file.stat().st_size
        if size != want.get("size"):
            raise _damaged(path, f"{name} has {size} bytes, {want.get('size')} were written")
        files[name] = file
    with ThreadPoolExecutor(_HASH_THREADS) as pool:  # hashlib releases the GIL: one file per core
        digests = dict(zip(files, pool.map(_sha256_file, files.values())))
    for name, digest in digests.items():
        if digest != checksums["files"][name].get("sha256"):
            raise _damaged(path, f"{name} does not match its sha256 checksum")
    return checksums


def _lossless(stored: str, loaded: np.dtype) -> bool:
    """The loaded dtype holds every stored value exactly, so casting back reproduces the stored bytes."""
    if stored == loaded.name:  # also quantized integer values, which load in their stored dtype
        return True
    stored_dtype = LOAD_DTYPES.get(stored)
    return stored_dtype is not None and (stored_dtype == loaded or loaded == LOAD_DTYPES["float32"])


def _verify_arrays(path: Path, params: Params, checksums: dict[str, Any]) -> None:
    """One leaf at a time (a host copy of at most one leaf exists at once)."""
    for leaf_path, array in _params_leaves(params):
        name = ".".join(leaf_path)
        if name not in checksums["arrays"]:
            raise _damaged(path, f"array {name} has no entry in {CHECKSUMS_FILE}")
        want = checksums["arrays"][name]  # None: written by a process that could not see all of the array
        if want is None or not _lossless(want.get("dtype"), np.dtype(array.dtype)):
            continue
        if _array_record(np.asarray(array).astype(LOAD_DTYPES.get(want["dtype"], array.dtype), copy=False)) != want:
            raise _damaged(path, f"array {name} does not match its sha256 checksum")


def load_orbax(path: str | os.PathLike, dtype: Any = None, shardings: Any = None, *, verify: bool = True
               ) -> tuple[OneVisionConfig, Params]:
    """Load a converted directory into ``(config, params)``; ``dtype`` default float32 (quantized values keep
    their integer dtype, their scales take ``dtype``).

    ``shardings`` (a pytree of ``jax.sharding.Sharding`` matching the params) restores every array
    straight into its target sharding: each device reads only its own slice.

    ``verify`` (default True) checks every file under params/ against ``checksums.json`` before reading
    (sharded or not), and every loaded array against its own checksum when unsharded and loaded in the
    stored dtype or float32. Damage, a missing checksums file, or anything orbax cannot read is a
    :class:`CorruptCheckpointError` naming the checkpoint; ``verify=False`` skips the checksums (faster).
    """
    path = Path(path).absolute()  # orbax needs absolute paths
    if not is_orbax_checkpoint(path):
        raise CheckpointError(f"{path} is not a converted ov_jax checkpoint (needs {CONFIG_FILE} with an "
                              f"'ov_jax' entry and a {PARAMS_DIR}/ directory)")
    config = load_config(path)
    dtype = resolve_load_dtype(dtype)
    specs = _flat_specs(config)
    _check_links(path)
    checksums = verify_files(path) if verify else None
    try:
        with _quiet_orbax():
            metadata = ocp.v1.metadata(path / PARAMS_DIR).metadata
    except Exception as err:
        raise _damaged(path, f"orbax cannot read its metadata ({_short_reason(err)})") from None
    stored = {tuple(getattr(k, "key", k) for k in p): tuple(m.shape) for p, m in
              jax.tree_util.tree_leaves_with_path(metadata)}
    want = {p: spec.shape for p, spec in specs.items()}
    if stored != want:
        differ = sorted(set(stored) ^ set(want) | {p for p in set(stored) & set(want) if stored[p] != want[p]})
        shown = ", ".join(".".join(p) for p in differ[:3]) + (", ..." if len(differ) > 3 else "")
        raise _damaged(path, f"{PARAMS_DIR}/ does not match its config ({len(differ)} leaves differ in name or "
                             f"shape: {shown})")
    placement = flat_shardings(shardings, list(specs))
    abstract: Params = {}
    for leaf_path, spec in specs.items():
        set_path(abstract, leaf_path, jax.ShapeDtypeStruct(spec.shape, spec.dtype or dtype,
                                                           sharding=placement[leaf_path]))
    try:
        with _orbax_context(), _quiet_orbax():
            params = ocp.v1.load(path / PARAMS_DIR, abstract)
    except Exception as err:
        raise _damaged(path, f"orbax cannot read its arrays ({_short_reason(err)})") from None
    if checksums is not None and shardings is None:
        _verify_arrays(path, params, checksums)
    return config, params
