"""Checkpoint loading: safetensors files of any LLaVA-OneVision layout → the params tree of `ov_jax.params`.

Three steps, each usable on its own:

1. ``LAYOUTS`` rewrites every key layout that transformers (or the original lmms-lab code) reads to one
   canonical name: ``text.*``, ``lm_head.*``, ``vision.*``, ``projector.linear_{1,2}.*``, ``image_newline``.
2. ``KEY_TABLE`` maps each canonical name to a params path and ONE :class:`Transform`; ``{i}`` is a layer
   index and selects row ``i`` of the stacked ``[L, ...]`` leaf.
3. :func:`plan_checkpoint` reads only the file headers and gives, per params leaf, its :class:`Source` rows
   (file, key, transform; one per layer for stacked leaves). :func:`read_leaf` reads any rectangular slice of
   a leaf, touching only the bytes of the checkpoint tensors it needs (``safe_open(...).get_slice``), which is
   what :func:`load_params` uses per device shard with ``jax.make_array_from_callback``.

Files are read with the safetensors numpy API (no pickle, no torch); bfloat16 goes through ``ml_dtypes``.
Each leaf is allocated once, filled layer by layer, handed to jax and dropped, so the host never holds a
second copy of the model. Loaded params are float32 unless ``dtype`` asks otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from ov_jax.config import ConfigError, OneVisionConfig, load_config
from ov_jax.hub import CheckpointError, checkpoint_file
from ov_jax.params import Params, ParamSpec, is_spec, param_specs

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
LOAD_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "float16": np.dtype(np.float16)}
FILE_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
               "F64": np.dtype(np.float64)}


@dataclasses.dataclass(frozen=True)
class Transform:
    """``leaf = source.reshape(view).transpose(perm)``, where ``view`` splits source axis ``a`` into
    ``splits[a]`` axes. ``perm=None`` is the identity and ``splits=None`` splits nothing."""

    name: str
    perm: tuple[int, ...] | None = None
    splits: tuple[int, ...] | None = None

    def view_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        if self.perm is None:
            return tuple(target)
        view = [0] * len(target)
        for leaf_axis, view_axis in enumerate(self.perm):
            view[view_axis] = target[leaf_axis]
        return tuple(view)

    def _groups(self, rank: int) -> tuple[int, ...]:
        return self.splits or (1,) * rank

    def source_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        """Shape the checkpoint tensor must have to fill a per-layer leaf of shape ``target``."""
        view, out, a = self.view_shape(target), [], 0
        for n in self._groups(len(target)):
            out.append(math.prod(view[a:a + n]))
            a += n
        return tuple(out)

    def read(self, tensor: Any, target: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
        """``leaf[index]`` for a per-layer leaf of shape ``target``, reading only the source rows it needs.

        ``tensor`` is a safetensors slice (or any array) indexed with a tuple of slices. A split source axis
        is read over whole outer blocks (e.g. whole heads) and sub-sliced after the reshape.
        """
        view = self.view_shape(target)
        perm = self.perm or tuple(range(len(target)))
        view_index: list[slice] = [slice(None)] * len(view)
        for leaf_axis, view_axis in enumerate(perm):
            view_index[view_axis] = index[leaf_axis]
        source_index, block_shape, inner_index, a = [], [], [], 0
        for n in self._groups(len(target)):
            outer, inner_sizes = view_index[a], view[a + 1:a + n]
            inner = math.prod(inner_sizes)
            source_index.append(slice(outer.start * inner, outer.stop * inner))
            block_shape += [outer.stop - outer.start, *inner_sizes]
            inner_index += [slice(None), *view_index[a + 1:a + n]]
            a += n
        block = _read_slice(tensor, tuple(source_index)).reshape(block_shape)[tuple(inner_index)]
        return block if self.perm is None else block.transpose(self.perm)

    def write(self, leaf: Any) -> np.ndarray:
        """The checkpoint tensor that :meth:`read` turns into the whole per-layer ``leaf``: its exact inverse.

        ``leaf``: a numpy or jax array of the per-layer leaf shape; returns numpy of :meth:`source_shape`,
        same dtype (a view where no transpose is needed).
        """
        leaf = np.asarray(leaf)
        view = leaf if self.perm is None else leaf.transpose(np.argsort(self.perm))
        return view.reshape(self.source_shape(leaf.shape))


COPY = Transform("copy")
LINEAR = Transform("linear [out,in] -> [in,out]", perm=(1, 0))
CONV_HWIO = Transform("conv [out,in,kh,kw] -> [kh,kw,in,out]", perm=(2, 3, 1, 0))
HEADS_IN = Transform("q/k/v [n*hd,in] -> [in,n,hd]", perm=(2, 0, 1), splits=(2, 1))
HEADS_OUT = Transform("o_proj [out,n*hd] -> [n,hd,out]", perm=(1, 2, 0), splits=(1, 2))
HEADS_BIAS = Transform("q/k/v bias [n*hd] -> [n,hd]", splits=(2,))

# Key layouts, first matching prefix wins: checkpoint key prefix → canonical prefix.
LAYOUTS: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_tower.vision_model.", "vision."),  # lmms-lab
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),                            # transformers in-memory
    ("model.language_model.", "text."),                            # transformers in-memory
    ("model.multi_modal_projector.", "projector."),                # transformers in-memory
    ("model.mm_projector.0.", "projector.linear_1."),              # lmms-lab
    ("model.mm_projector.2.", "projector.linear_2."),              # lmms-lab
    ("model.image_newline", "image_newline"),                      # in-memory, lmms-lab
    ("model.", "text."),                                           # lmms-lab: model.{embed_tokens,layers,norm}
    ("language_model.model.", "text."),                            # hub, save_pretrained
    ("language_model.lm_head.", "lm_head."),                       # hub, save_pretrained
    ("vision_tower.vision_model.", "vision."),                     # hub
    ("vision_tower.", "vision."),                                  # transformers 5.x save_pretrained
    ("multi_modal_projector.", "projector."),
    ("image_newline", "image_newline"),
    ("lm_head.", "lm_head."),
)

# The layout transformers 5.24 ``save_pretrained`` writes (REFERENCE_NOTES §11.2), a subset of ``LAYOUTS``:
# what export writes, so canonical_key(saved_key(name)) == name.
SAVE_PRETRAINED_LAYOUT: tuple[tuple[str, str], ...] = (
    ("vision_tower.", "vision."),
    ("multi_modal_projector.", "projector."),
    ("language_model.model.", "text."),
    ("language_model.lm_head.", "lm_head."),
    ("image_newline", "image_newline"),
)

# Canonical checkpoint name → (params path, transform). One row per tensor.
KEY_TABLE: tuple[tuple[str, str, Transform], ...] = (
    ("image_newline", "image_newline", COPY),
    ("projector.linear_1.weight", "projector.linear_1.kernel", LINEAR),
    ("projector.linear_1.bias", "projector.linear_1.bias", COPY),
    ("projector.linear_2.weight", "projector.linear_2.kernel", LINEAR),
    ("projector.linear_2.bias", "projector.linear_2.bias", COPY),
    ("vision.embeddings.patch_embedding.weight", "vision.patch_embed.kernel", CONV_HWIO),
    ("vision.embeddings.patch_embedding.bias", "vision.patch_embed.bias", COPY),
    ("vision.embeddings.position_embedding.weight", "vision.pos_embed", COPY),
    ("vision.encoder.layers.{i}.layer_norm1.weight", "vision.layers.ln1.scale", COPY),
    ("vision.encoder.layers.{i}.layer_norm1.bias", "vision.layers.ln1.bias", COPY),
    ("vision.encoder.layers.{i}.self_attn.q_proj.weight", "vision.layers.q.kernel", HEADS_IN),
    ("vision.encoder.layers.{i}.self_attn.q_proj.bias", "vision.layers.q.bias", HEADS_BIAS),
    ("vision.encoder.layers.{i}.self_attn.k_proj.weight", "vision.layers.k.kernel", HEADS_IN),
    ("vision.encoder.layers.{i}.self_attn.k_proj.bias", "vision.layers.k.bias", HEADS_BIAS),
    ("vision.encoder.layers.{i}.self_attn.v_proj.weight", "vision.layers.v.kernel", HEADS_IN),
    ("vision.encoder.layers.{i}.self_attn.v_proj.bias", "vision.layers.v.bias", HEADS_BIAS),
    ("vision.encoder.layers.{i}.self_attn.out_proj.weight", "vision.layers.o.kernel", HEADS_OUT),
    ("vision.encoder.layers.{i}.self_attn.out_proj.bias", "vision.layers.o.bias", COPY),
    ("vision.encoder.layers.{i}.layer_norm2.weight", "vision.layers.ln2.scale", COPY),
    ("vision.encoder.layers.{i}.layer_norm2.bias", "vision.layers.ln2.bias", COPY),
    ("vision.encoder.layers.{i}.mlp.fc1.weight", "vision.layers.fc1.kernel", LINEAR),
    ("vision.encoder.layers.{i}.mlp.fc1.bias", "vision.layers.fc1.bias", COPY),
    ("vision.encoder.layers.{i}.mlp.fc2.weight", "vision.layers.fc2.kernel", LINEAR),
    ("vision.encoder.layers.{i}.mlp.fc2.bias", "vision.layers.fc2.bias", COPY),
    ("vision.post_layernorm.weight", "vision.post_ln.scale", COPY),
    ("vision.post_layernorm.bias", "vision.post_ln.bias", COPY),
    ("text.embed_tokens.weight", "text.embed", COPY),
    ("text.layers.{i}.input_layernorm.weight", "text.layers.input_norm.scale", COPY),
    ("text.layers.{i}.self_attn.q_proj.weight", "text.layers.q.kernel", HEADS_IN),
    ("text.layers.{i}.self_attn.q_proj.bias", "text.layers.q.bias", HEADS_BIAS),
    ("text.layers.{i}.self_attn.k_proj.weight", "text.layers.k.kernel", HEADS_IN),
    ("text.layers.{i}.self_attn.k_proj.bias", "text.layers.k.bias", HEADS_BIAS),
    ("text.layers.{i}.self_attn.v_proj.weight", "text.layers.v.kernel", HEADS_IN),
    ("text.layers.{i}.self_attn.v_proj.bias", "text.layers.v.bias", HEADS_BIAS),
    ("text.layers.{i}.self_attn.o_proj.weight", "text.layers.o.kernel", HEADS_OUT),
    ("text.layers.{i}.post_attention_layernorm.weight", "text.layers.post_norm.scale", COPY),
    ("text.layers.{i}.mlp.gate_proj.weight", "text.layers.gate.kernel", LINEAR),
    ("text.layers.{i}.mlp.up_proj.weight", "text.layers.up.kernel", LINEAR),
    ("text.layers.{i}.mlp.down_proj.weight", "text.layers.down.kernel", LINEAR),
    ("text.norm.weight", "text.norm.scale", COPY),
    ("lm_head.weight", "text.lm_head.kernel", LINEAR),
)
_ROWS = {name: (tuple(path.split(".")), transform) for name, path, transform in KEY_TABLE}
# Tensors some checkpoints carry that LLaVA-OneVision never uses: SigLIP's pooling head, RoPE buffers.
_IGNORED = re.compile(r"^vision\.head\.|\.rotary_emb\.inv_freq$")
_LAYER_NUMBER = re.compile(r"\.(\d+)\.")


def canonical_key(key: str) -> tuple[str, tuple[str, str] | None]:
    """The layout-independent name of a checkpoint key and the ``LAYOUTS`` row that produced it (if any)."""
    for prefix, canonical in LAYOUTS:
        if key.startswith(prefix):
            return canonical + key[len(prefix):], (prefix, canonical)
    return key, None


def saved_key(canonical_name: str) -> str:
    """The key transformers' ``save_pretrained`` writes for a canonical name (inverse of :func:`canonical_key`)."""
    for prefix, canonical in SAVE_PRETRAINED_LAYOUT:
        if canonical_name.startswith(canonical):
            return prefix + canonical_name[len(canonical):]
    raise KeyError(f"{canonical_name!r} is not a canonical checkpoint name")


@dataclasses.dataclass(frozen=True)
class Source:
    """One checkpoint tensor feeding (one layer of) a params leaf."""

    file: str
    key: str
    transform: Transform


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """Where a params leaf comes from: one source, or one per layer (row ``i`` of axis 0) when stacked."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    stacked: bool
    sources: tuple[Source, ...]
    file_dtype: np.dtype

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape


@dataclasses.dataclass(frozen=True)
class CheckpointPlan:
    """A checkpoint directory, the config fitted to its tensors, and the plan of every params leaf."""

    directory: Path
    config: OneVisionConfig
    leaves: dict[tuple[str, ...], LeafPlan]
    largest_tensor_bytes: int


def weight_files(directory: str | os.PathLike) -> dict[str, str]:
    """Checkpoint key → safetensors file, from ``model.safetensors.index.json`` or ``model.safetensors``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    index_file = checkpoint_file(directory, SAFETENSORS_INDEX)
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"corrupt {index_file}: {type(err).__name__}: {err}") from None
        bad = sorted({repr(f) for f in weight_map.values() if not isinstance(f, str)})
        if bad:
            raise CheckpointError(f"corrupt {index_file}: shard names must be strings, got {bad}")
        shards = {f: checkpoint_file(directory, f) for f in set(weight_map.values())}
        missing = sorted(f for f, path in shards.items() if not path.is_file())
        if missing:
            raise CheckpointError(f"{index_file} names shard files that do not exist: {missing}")
        return {key: str(shards[f]) for key, f in weight_map.items()}
    if checkpoint_file(directory, SAFETENSORS_FILE).is_file():
        file = str(directory / SAFETENSORS_FILE)
        try:
            with safe_open(file, "numpy") as f:
                return dict.fromkeys(f.keys(), file)
        except Exception as err:  # safetensors raises its own error types for truncated/garbled files
            raise CheckpointError(f"cannot read safetensors file {file}: {err}") from None
    present = sorted(p.name for p in directory.iterdir())
    hint = ""
    if any(name.endswith((".bin", ".pt", ".pth")) for name in present):
        hint = " (pickle weights are never read: re-save with save_pretrained(..., safe_serialization=True))"
    elif "params" in present:
        hint = " (this looks like a converted orbax checkpoint: use ov_jax.checkpoint.load_orbax)"
    raise CheckpointError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {directory}{hint}; found {present}")


def _tensor_headers(files: dict[str, str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key → (shape, safetensors dtype string), reading only the file headers."""
    by_file: dict[str, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    headers, not_in_file = {}, []
    for file, keys in by_file.items():
        try:
            with safe_open(file, "numpy") as f:
                present = set(f.keys())
                for key in keys:
                    if key not in present:
                        not_in_file.append(f"{key} (in {os.path.basename(file)})")
                        continue
                    tensor = f.get_slice(key)
                    headers[key] = (tuple(tensor.get_shape()), tensor.get_dtype())
        except Exception as err:  # safetensors raises its own error types for truncated/garbled files
            raise CheckpointError(f"cannot read safetensors file {file}: {err}") from None
    if not_in_file:
        raise CheckpointError(f"corrupt {SAFETENSORS_INDEX}: keys missing from their shard: {not_in_file}")
    return headers


def _untie_if_file_has_lm_head(config: OneVisionConfig, canonical: dict[str, str]) -> OneVisionConfig:
    """transformers uses a checkpoint's own lm_head even when the config says tied (REFERENCE_NOTES §11.4)."""
    if "lm_head.weight" in canonical and config.lm_head_tied:
        return config.replace(tie_word_embeddings=False,
                              text=dataclasses.replace(config.text, tie_word_embeddings=False))
    return config


def _infer_lmms_lab_vision(config: OneVisionConfig, shapes: dict[str, tuple[int, ...]]) -> OneVisionConfig:
    """lmms-lab configs name the tower (``mm_vision_tower``) but give no sizes: read them from the tensors.

    The head count cannot be seen in the shapes; the SigLIP default (16) is kept when it divides the width.
    """
    patch = shapes.get("vision.embeddings.patch_embedding.weight")
    if patch is None or len(patch) != 4:
        return config
    v = config.vision
    hidden, channels, patch_size = patch[0], patch[1], patch[2]
    side = math.isqrt(shapes.get("vision.embeddings.position_embedding.weight", (v.num_patches,))[0])
    image_size = v.image_size if v.image_size // patch_size == side else side * patch_size
    layers = [int(m.group(1)) for k in shapes if (m := re.match(r"vision\.encoder\.layers\.(\d+)\.", k))]
    fc1 = shapes.get("vision.encoder.layers.0.mlp.fc1.weight", (v.intermediate_size,))
    if hidden % v.num_attention_heads:
        raise CheckpointError(f"cannot infer the vision head count for width {hidden}: add a 'vision_config' "
                              "with num_attention_heads to config.json")
    vision = dataclasses.replace(v, hidden_size=hidden, num_channels=channels, patch_size=patch_size,
                                 image_size=image_size, intermediate_size=fc1[0],
                                 num_hidden_layers=max(layers) + 1 if layers else v.num_hidden_layers)
    return config.replace(vision=vision).validate()


def _read_config(directory: Path, shapes: dict[str, tuple[int, ...]]) -> OneVisionConfig:
    try:
        config = load_config(directory)
    except ConfigError as err:
        raise CheckpointError(f"{err} (a checkpoint directory needs its config.json)") from None
    raw = json.loads(checkpoint_file(directory, "config.json").read_text())
    is_lmms_lab = "ov_jax" not in raw and "text_config" not in raw
    if is_lmms_lab and "vision_config" not in raw:
        config = _infer_lmms_lab_vision(config, shapes)
    return config


def checkpoint_keys(config: OneVisionConfig) -> dict[str, tuple[tuple[str, ...], Transform, int | None, tuple]]:
    """Every canonical checkpoint name ``config`` needs → (params path, transform, layer or None, source shape)."""
    flat = {tuple(k.key for k in path): spec
            for path, spec in jax.tree_util.tree_leaves_with_path(param_specs(config), is_leaf=is_spec)}
    out = {}
    for name, (path, transform) in _ROWS.items():
        spec: ParamSpec | None = flat.get(path)
        if spec is None:
            continue
        if "{i}" in name:
            for i in range(spec.shape[0]):
                out[name.replace("{i}", str(i))] = (path, transform, i, transform.source_shape(spec.shape[1:]))
        else:
            out[name] = (path, transform, None, transform.source_shape(spec.shape))
    return out


def _in_file_layout(canonical_name: str, seen_prefixes: dict[str, str]) -> str:
    """Spell a canonical name the way this checkpoint spells its other keys (for error messages)."""
    for canonical_prefix, file_prefix in seen_prefixes.items():
        if canonical_name.startswith(canonical_prefix):
            return file_prefix + canonical_name[len(canonical_prefix):]
    return canonical_name


_LISTED = 40  # problems of one kind shown in a mismatch error


def plan_checkpoint(path: str | os.PathLike, config: OneVisionConfig | None = None) -> CheckpointPlan:
    """Read the headers of a checkpoint directory and plan every params leaf; all problems in one error."""
    directory = Path(path)
    files = weight_files(directory)
    headers = _tensor_headers(files)
    canonical: dict[str, str] = {}
    unknown, duplicates = [], []
    prefix_votes: Counter = Counter()
    for key in sorted(headers):
        name, layout = canonical_key(key)
        if _IGNORED.search(name):
            continue
        if name in canonical:
            duplicates.append(f"{key} and {canonical[name]} are the same tensor")
        canonical[name] = key
        prefix_votes[layout] += 1
    seen_prefixes: dict[str, str] = {}  # canonical prefix → this file's most used spelling of it
    for layout, _ in prefix_votes.most_common():
        if layout is not None:
            seen_prefixes.setdefault(layout[1], layout[0])
    shapes = {name: headers[key][0] for name, key in canonical.items()}
    config = _untie_if_file_has_lm_head(config or _read_config(directory, shapes), canonical)
    layers = config.text.num_hidden_layers + config.vision.num_hidden_layers
    if layers > len(canonical):  # every layer has tensors: cannot match, and listing its keys would not end
        raise CheckpointError(f"checkpoint {directory}: its config has {config.text.num_hidden_layers} text and "
                              f"{config.vision.num_hidden_layers} vision layers, more than the {len(canonical)} "
                              "tensors in its weights files can hold")
    expected = checkpoint_keys(config)

    misshaped, unsupported, largest = [], [], 0
    sources: dict[tuple[str, ...], dict[int | None, Source]] = {}
    file_dtypes: dict[tuple[str, ...], list[np.dtype]] = {}
    for name, key in canonical.items():
        if name not in expected:
            unknown.append(key)
            continue
        leaf_path, transform, layer, want = expected[name]
        shape, dtype = headers[key]
        if shape != want:
            misshaped.append(f"{key}: file {shape}, expected {want} for params {'.'.join(leaf_path)}")
        if dtype not in FILE_DTYPES:
            unsupported.append(f"{key}: {dtype}")
            continue
        sources.setdefault(leaf_path, {})[layer] = Source(files[key], key, transform)
        file_dtypes.setdefault(leaf_path, []).append(FILE_DTYPES[dtype])
        largest = max(largest, math.prod(shape) * FILE_DTYPES[dtype].itemsize)
    missing = [_in_file_layout(name, seen_prefixes) for name in expected if name not in canonical]
    if "lm_head.weight" in expected and "lm_head.weight" not in canonical:
        missing = [m + " (config.json does not tie word embeddings)" if m.endswith("lm_head.weight") else m
                   for m in missing]

    problems = [(f"{len(items)} {what}:\n    " + "\n    ".join(items[:_LISTED])
                 + (f"\n    ... and {len(items) - _LISTED} more" if len(items) > _LISTED else ""))
                for what, items in (("unknown keys", unknown), ("missing keys", missing),
                                    ("wrong shapes", misshaped), ("duplicate tensors", duplicates),
                                    ("unsupported dtypes (float32/float16/bfloat16 only)", unsupported))
                if items]
    if problems:
        v, t = config.vision, config.text
        raise CheckpointError(
            f"checkpoint {directory} does not match the LLaVA-OneVision params for its config (text "
            f"{t.num_hidden_layers} layers, hidden {t.hidden_size}; vision {v.num_hidden_layers} layers, "
            f"hidden {v.hidden_size}; lm_head {'tied' if config.lm_head_tied else 'separate'}):\n  "
            + "\n  ".join(problems))

    leaves = {}
    for spec_path, spec in jax.tree_util.tree_leaves_with_path(param_specs(config), is_leaf=is_spec):
        leaf_path = tuple(k.key for k in spec_path)
        rows = sources[leaf_path]
        stacked = None not in rows
        ordered = tuple(rows[i] for i in range(len(rows))) if stacked else (rows[None],)
        leaves[leaf_path] = LeafPlan(leaf_path, spec.shape, stacked, ordered,
                                     np.result_type(*file_dtypes[leaf_path]))
    return CheckpointPlan(directory, config, leaves, largest)


def checkpoint_config(path: str | os.PathLike) -> OneVisionConfig:
    """The config the params of ``path`` will have (fitted to the file: lm_head, lmms-lab vision sizes).

    Reads only headers; use it to build shardings before :func:`load_params`.
    """
    return plan_checkpoint(path).config


def _read_slice(tensor: Any, index: tuple[slice, ...]) -> np.ndarray:
    """The one place that reads tensor bytes (tests count bytes here)."""
    return np.asarray(tensor[index])


def _normalize_index(index: tuple | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided leaf slices are not supported: {s}")
        out.append(slice(start, stop))
    return tuple(out)


def read_leaf(leaf: LeafPlan, index: tuple | None = None, dtype: Any = None) -> np.ndarray:
    """``params_leaf[index]`` as a numpy array of ``dtype`` (default: the file's), reading only that slice."""
    index = _normalize_index(index, leaf.shape)
    out = np.empty(tuple(s.stop - s.start for s in index), np.dtype(dtype or leaf.file_dtype))
    handles: dict[str, Any] = {}
    try:
        def tensor(source: Source):
            if source.file not in handles:
                handles[source.file] = safe_open(source.file, "numpy").__enter__()
            return handles[source.file].get_slice(source.key)

        if leaf.stacked:
            for row, layer in enumerate(range(index[0].start, index[0].stop)):
                source = leaf.sources[layer]
                out[row] = source.transform.read(tensor(source), leaf.layer_shape, index[1:])
        else:
            source = leaf.sources[0]
            out[...] = source.transform.read(tensor(source), leaf.layer_shape, index)
    finally:
        for handle in handles.values():  # close the mmaps so read pages leave this process's RSS
            handle.__exit__(None, None, None)
    return out


def resolve_load_dtype(dtype: Any) -> np.dtype:
    """None → float32 (parity default); otherwise float32 / bfloat16 / float16 by name or dtype object."""
    if dtype is None:
        return LOAD_DTYPES["float32"]
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in LOAD_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(LOAD_DTYPES)}")
    return LOAD_DTYPES[name]


def flat_shardings(shardings: Any, paths: list[tuple[str, ...]]) -> dict[tuple[str, ...], jax.sharding.Sharding]:
    """Params path → sharding, from a pytree matching the params (``None``: everything on one device)."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return {p: device for p in paths}
    given = {tuple(getattr(k, "key", k) for k in path): s for path, s in
             jax.tree_util.tree_leaves_with_path(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))}
    missing, extra = sorted(set(paths) - set(given)), sorted(set(given) - set(paths))
    if missing or extra:
        raise ValueError(f"shardings do not match the params tree: missing {['.'.join(p) for p in missing]}, "
                         f"unexpected {['.'.join(p) for p in extra]}")
    return given


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_params(path: str | os.PathLike, config: OneVisionConfig | None = None, *, dtype: Any = None,
                shardings: Any = None) -> tuple[OneVisionConfig, Params]:
    """Load a safetensors checkpoint directory into ``(config, params)`` of jax arrays.

    ``config`` defaults to the directory's ``config.json``; it is fitted to the file (a file lm_head unties
    it). ``dtype`` (default float32) is applied while reading. ``shardings`` is an optional pytree of
    ``jax.sharding.Sharding`` matching the params (build it from ``checkpoint_config(path)``): each device
    shard is then read on its own, touching only that slice of the file.
    """
    plan = plan_checkpoint(path, config)
    dtype = resolve_load_dtype(dtype)
    placement = flat_shardings(shardings, list(plan.leaves))
    params: Params = {}
    for leaf_path, leaf in plan.leaves.items():
        shard_cache: dict[tuple, np.ndarray] = {}  # replicas of one shard are read once

        def shard(index, leaf=leaf, cache=shard_cache):
            index = _normalize_index(index, leaf.shape)
            key = tuple((s.start, s.stop) for s in index)
            if key not in cache:
                cache[key] = read_leaf(leaf, index, dtype)
            return cache[key]

        set_path(params, leaf_path, jax.make_array_from_callback(leaf.shape, placement[leaf_path], shard))
    return plan.config, params
