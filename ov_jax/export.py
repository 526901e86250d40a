"""Export: a params tree → a transformers (llava-hf layout) checkpoint directory.

The loading key table serves both directions. :func:`ov_jax.loading.checkpoint_keys` gives, per checkpoint
tensor, its params path, layer (row of a stacked ``[L, ...]`` leaf) and :class:`~ov_jax.loading.Transform`;
export applies ``Transform.write`` (the exact inverse of ``read``) row by row and names each tensor as
transformers 5.24 ``save_pretrained`` does (:func:`ov_jax.loading.saved_key`). A tied lm_head has no params
leaf and so is not written, as transformers does.

:func:`save_pretrained` writes ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` shards plus
``model.safetensors.index.json`` above ``max_shard_size``, split as transformers splits), ``config.json``,
``generation_config.json`` and the tokenizer / processor / chat template files of the source checkpoint;
LoRA adapters are merged into the weights they adapt.
Tensors are produced one layer at a time and written one shard at a time, so the host holds at most one
shard beside the params. The directory appears only when complete.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
from safetensors.numpy import save_file

from ov_jax.checkpoint import copy_model_files
from ov_jax.config import OneVisionConfig
from ov_jax.loading import SAFETENSORS_INDEX, checkpoint_keys, resolve_load_dtype, saved_key
from ov_jax.nn.lora import merge_lora
from ov_jax.outputs import atomic_output_dir
from ov_jax.params import Params, check_tree
from ov_jax.presets import to_hf_dict

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SHARD_PATTERN = "model{suffix}.safetensors"  # transformers' SAFE_WEIGHTS_NAME with the shard suffix slot
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5.24 save_pretrained's default
EXPORT_KIND = "export"  # the output kind recorded in the directory's marker (ov_jax.outputs)


def _flat(tree: Params) -> dict[tuple[str, ...], Any]:
    return {tuple(getattr(k, "key", k) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def iter_hf_tensors(config: OneVisionConfig, tree: Params, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(transformers key, numpy array in torch layout)`` for every checkpoint tensor of ``config``.

    ``tree``: any params-shaped tree (weights or gradients; numpy or jax leaves, any sharding) with exactly
    the leaves and shapes of ``param_specs(config)``, else ``ValueError``. Each array keeps its leaf's dtype
    unless ``dtype`` (float32 / bfloat16 / float16) is given. Stacked leaves are sliced one layer at a time.
    Order: :func:`ov_jax.loading.checkpoint_keys`'s.
    """
    check_tree(tree, config)
    cast = None if dtype is None else resolve_load_dtype(dtype)
    leaves = _flat(tree)
    for name, (path, transform, layer, _) in checkpoint_keys(config).items():
        leaf = leaves[path] if layer is None else leaves[path][layer]
        array = transform.write(leaf)
        yield saved_key(name), array if cast is None else array.astype(cast)


def hf_state_dict(config: OneVisionConfig, tree: Params) -> dict[str, np.ndarray]:
    """``tree`` under the names transformers' ``save_pretrained`` writes, each tensor in torch layout.

    E.g. ``text.layers.q.kernel [L, H, nh, hd]`` → ``language_model.model.layers.{i}.self_attn.q_proj.weight
    [nh*hd, H]`` per layer. Arrays keep the leaves' dtypes; for numpy leaves they may share memory with them.
    Raises ``ValueError`` if ``tree`` does not have the params' leaves and shapes for ``config``.
    """
    return dict(iter_hf_tensors(config, tree))


def _generation_config(config: OneVisionConfig) -> dict[str, Any]:
    """What transformers derives from the model config when a checkpoint has no generation_config.json."""
    t = config.text
    ids = {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id}
    return {"_from_model_config": True, **{k: list(v) if isinstance(v, tuple) else v
                                            for k, v in ids.items() if v is not None}}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_pretrained(config: OneVisionConfig, params: Params, directory: str | os.PathLike, *,
                    source: str | os.PathLike | None = None, dtype: Any = None,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Write ``params`` as a checkpoint that transformers' ``LlavaOnevisionForConditionalGeneration`` and
    ``AutoProcessor.from_pretrained`` load; returns the absolute output directory.

    ``params``: the params tree; LoRA adapters in it (`ov_jax.nn.lora`) are folded into their kernels first
    (:func:`ov_jax.nn.lora.merge_lora`), so the checkpoint holds the merged weights.
    ``source``: the checkpoint directory the params came from; its non-weight files (tokenizer, processor,
    chat template, generation config) are copied. Without it (or when it has no generation_config.json),
    generation_config.json is derived from ``config``. ``dtype``: float32 / bfloat16 / float16 to cast to
    (default: the params' own). ``max_shard_size``: bytes or a size string ("5GB"); a larger model is
    split into shards with an index, as transformers splits it.

    ``directory`` goes through :func:`ov_jax.outputs.atomic_output_dir` (kind ``"export"``): it must be new,
    empty, or (with ``overwrite``) an earlier export holding nothing else, and never ``source`` or a directory
    holding it (:class:`~ov_jax.outputs.OutputPathError` / ``FileExistsError`` otherwise); nothing is visible
    there until every file is written. Raises ``ValueError`` for params that do not match ``config`` and for
    quantized params.
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    source = None if source is None else Path(source)
    if config.quantization is not None:
        raise ValueError(f"the weights are quantized ({config.quantization}); transformers' layout holds float "
                         "weights: export the float model (load it without quantization)")
    params = merge_lora(params)
    check_tree(params, config)
    cast = None if dtype is None else resolve_load_dtype(dtype)
    leaves = _flat(params)
    file_dtypes = {path: cast or np.dtype(leaf.dtype) for path, leaf in leaves.items()}
    keys = checkpoint_keys(config)
    sizes = {saved_key(name): math.prod(shape) * file_dtypes[path].itemsize
             for name, (path, _, _, shape) in keys.items()}
    split = split_state_dict_into_shards_factory(sizes, get_storage_size=lambda size: size,
                                                 filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size)
    written = np.result_type(*file_dtypes.values())
    tensors = iter_hf_tensors(config, params, cast)  # same order as `sizes`, so shards take consecutive runs
    with atomic_output_dir(directory, kind=EXPORT_KIND, overwrite=overwrite,
                           sources=[source] if source else []) as tmp:
        for file, names in split.filename_to_tensors.items():
            shard = {name: np.ascontiguousarray(array) for name, array in itertools.islice(tensors, len(names))}
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            del shard
        if split.is_sharded:
            total = sum(math.prod(shape) for _, _, _, shape in keys.values())
            _write_json(tmp / SAFETENSORS_INDEX, {"metadata": {"total_parameters": total, **split.metadata},
                                                  "weight_map": split.tensor_to_filename})
        if source is not None:
            copy_model_files(source, tmp)
        _write_json(tmp / CONFIG_FILE, to_hf_dict(config.replace(dtype=np.dtype(written).name)))
        if not (tmp / GENERATION_CONFIG_FILE).exists():
            _write_json(tmp / GENERATION_CONFIG_FILE, _generation_config(config))
    return Path(os.path.realpath(directory))
