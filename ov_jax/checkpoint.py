"""Converted checkpoints: the params as an orbax checkpoint, our config, and the tokenizer/processor files.

Layout of a converted directory (a complete model directory, loadable by ``LlavaOnevision.from_pretrained``)::

    config.json        the source config.json plus {"ov_jax": OneVisionConfig.to_dict()}
    params/            orbax checkpoint of the params tree (uncompressed, one array per leaf)
    tokenizer.json, chat_template.jinja, preprocessor_config.json, ...   copied from the source

Writing streams leaf by leaf (orbax partial saves, finalized at the end), so peak host memory is about the
largest params leaf plus orbax's write buffer for it. Output is atomic: everything is written to a hidden
temporary directory beside ``dst`` and renamed at the end; an interrupted run leaves no ``dst``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from ov_jax.config import OneVisionConfig, QuantConfig, load_config
from ov_jax.hub import resolve_checkpoint
from ov_jax.loading import (CheckpointError, flat_shardings, plan_checkpoint, read_leaf, resolve_load_dtype,
                            set_path)
from ov_jax.params import Params, is_spec, param_specs

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt", ".gguf")
_NOT_COPIED = {CONFIG_FILE, "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_TMP_MARK = ".ov_jax-tmp-"


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
        return (path / PARAMS_DIR).is_dir() and "ov_jax" in json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _orbax_context() -> ocp.v1.Context:
    """Uncompressed arrays: compression saves little on weights and costs a buffer and time both ways."""
    context = ocp.v1.Context()
    context.array.saving.use_compression = False
    return context


def _remove_stale_temporaries(dst: Path) -> None:
    """Delete temporaries of earlier conversions into ``dst`` whose process is gone (e.g. killed)."""
    for stale in dst.parent.glob(f".{dst.name}{_TMP_MARK}*"):
        pid = stale.name[len(f".{dst.name}{_TMP_MARK}"):].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


@contextlib.contextmanager
def _atomic_directory(dst: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``dst`` only if the block completes."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(dst)
    tmp = dst.parent / f".{dst.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.ov_jax-old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_params(directory: Path, leaves: Iterable[tuple[tuple[str, ...], Any]]) -> None:
    """Save (path, array) pairs one at a time into one orbax checkpoint at ``directory``."""
    with _orbax_context():
        for path, array in leaves:
            tree: dict = {}
            set_path(tree, path, array)
            ocp.v1.partial.save(directory, tree)
            del tree, array
        ocp.v1.partial.finalize(directory)


def _write_model_files(directory: Path, config: OneVisionConfig, source: Path | None) -> None:
    """config.json (source config + ours) and every non-weight file of ``source`` (tokenizer, processor...)."""
    raw: dict[str, Any] = {}
    if source is not None:
        try:
            raw = json.loads((source / CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            raw = {}
        for file in sorted(source.iterdir()):
            if file.is_file() and file.name not in _NOT_COPIED and not file.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy(file, directory / file.name)  # follows hub-cache symlinks
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
    with _atomic_directory(dst, overwrite) as tmp:
        with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"converting {source.name}", disable=not progress) as bar:
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

            _write_params(tmp / PARAMS_DIR, leaves())
        config = plan.config.replace(dtype=np.dtype(stored).name, quantization=quantization)
        _write_model_files(tmp, config, source)
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
    with _atomic_directory(dst, overwrite) as tmp:
        _write_params(tmp / PARAMS_DIR, _params_leaves(params))
        _write_model_files(tmp, config, None if files_from is None else Path(files_from))
    return Path(dst).absolute()


def load_orbax(path: str | os.PathLike, dtype: Any = None, shardings: Any = None
               ) -> tuple[OneVisionConfig, Params]:
    """Load a converted directory into ``(config, params)``; ``dtype`` default float32 (quantized values keep
    their integer dtype, their scales take ``dtype``).

    ``shardings`` (a pytree of ``jax.sharding.Sharding`` matching the params) restores every array
    straight into its target sharding: each device reads only its own slice.
    """
    path = Path(path).absolute()  # orbax needs absolute paths
    if not is_orbax_checkpoint(path):
        raise CheckpointError(f"{path} is not a converted ov_jax checkpoint (needs {CONFIG_FILE} with an "
                              f"'ov_jax' entry and a {PARAMS_DIR}/ directory)")
    config = load_config(path)
    dtype = resolve_load_dtype(dtype)
    specs = _flat_specs(config)
    stored = {tuple(getattr(k, "key", k) for k in p): tuple(m.shape) for p, m in
              jax.tree_util.tree_leaves_with_path(ocp.v1.metadata(path / PARAMS_DIR).metadata)}
    want = {p: spec.shape for p, spec in specs.items()}
    if stored != want:
        raise CheckpointError(f"{path / PARAMS_DIR} does not match its config: "
                              f"{sorted(set(stored.items()) ^ set(want.items()))}")
    placement = flat_shardings(shardings, list(specs))
    abstract: Params = {}
    for leaf_path, spec in specs.items():
        set_path(abstract, leaf_path, jax.ShapeDtypeStruct(spec.shape, spec.dtype or dtype,
                                                           sharding=placement[leaf_path]))
    with _orbax_context():
        params = ocp.v1.load(path / PARAMS_DIR, abstract)
    return config, params
