"""Test helpers for checkpoint loading/conversion: tiny transformers checkpoints, re-keyed layouts, shardings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ov_jax.params import is_spec, param_specs

TEXT = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24)  # head_dim ≠ hidden/heads: q/o projections are not square
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=384,
              patch_size=14)


def build_hf_checkpoint(out: Path, *, tied: bool, torch_dtype=None, seed: int = 0) -> dict[str, np.ndarray]:
    """Save a tiny random LlavaOnevision with transformers; return its in-memory state dict as float32 numpy.

    Every tensor (biases and norms included) is drawn from N(0, 1), so a dropped or misplaced one shows.
    The SigLIP pooling head is kept (``vision_use_head`` default) to check that loaders skip it.
    """
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", tie_word_embeddings=tied, **TEXT),
        vision_config=dict(model_type="siglip_vision_model", **VISION), tie_word_embeddings=tied)
    model = LlavaOnevisionForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    model.save_pretrained(out, safe_serialization=True)
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


def read_file(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


HUB = (("vision_tower.", "vision_tower.vision_model."),)
IN_MEMORY = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
             ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
             ("image_newline", "model.image_newline"))
LMMS_LAB = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
            ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
            ("multi_modal_projector.linear_2.", "model.mm_projector.2."), ("image_newline", "model.image_newline"))


def rekey(src: Path, dst: Path, renames) -> Path:
    """Copy a save_pretrained checkpoint with its keys renamed by the first matching prefix."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    renamed = {}
    for key, value in read_file(src / "model.safetensors").items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def lmms_lab_config(hf_config: dict, *, with_vision_config: bool) -> dict:
    """The original LLaVA-NeXT config.json form: Qwen2 fields at the top level plus ``mm_*`` keys."""
    text, vision = hf_config["text_config"], hf_config["vision_config"]
    config = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                   "tie_word_embeddings", "max_position_embeddings")}
    config.update(architectures=["LlavaQwenForCausalLM"], model_type="llava", hidden_act="silu",
                  rope_theta=text["rope_parameters"]["rope_theta"], torch_dtype="float32", use_sliding_window=False,
                  mm_projector_type="mlp2x_gelu", mm_hidden_size=vision["hidden_size"],
                  mm_vision_tower="google/siglip-so400m-patch14-384", mm_vision_select_layer=-2,
                  mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres_max_9",
                  image_grid_pinpoints="(1x1),...,(6x6)")
    if with_vision_config:
        config["vision_config"] = {k: vision[k] for k in VISION}
    return config


def to_lmms_lab(src: Path, dst: Path, *, with_vision_config: bool = True) -> Path:
    rekey(src, dst, LMMS_LAB)
    hf_config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(lmms_lab_config(hf_config, with_vision_config=with_vision_config)))
    return dst


def split_into_shards(src: Path, dst: Path, shards: int = 3) -> Path:
    """Copy a single-file checkpoint as ``shards`` files plus ``model.safetensors.index.json`` (round robin)."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = read_file(src / "model.safetensors")
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {key: names[i % shards] for i, key in enumerate(sorted(tensors))}
    for name in names:
        save_file({k: v for k, v in tensors.items() if weight_map[k] == name}, str(dst / name),
                  metadata={"format": "pt"})
    total = sum(v.nbytes for v in tensors.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return dst


# Logical axis → mesh axis for the tests (the real rules table belongs to ov_jax.sharding).
TEST_RULES = {"embed": "fsdp", "vision_embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
              "vocab": "tensor", "vision_heads": "tensor", "vision_mlp": "tensor"}


def mesh_shardings(config, mesh):
    """NamedSharding per leaf; an axis is sharded only where its mesh axis divides it."""
    def sharding(spec):
        axes = [TEST_RULES.get(a) for a in spec.axes]
        axes = [a if a in mesh.shape and n % mesh.shape[a] == 0 else None for a, n in zip(axes, spec.shape)]
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))

    return jax.tree.map(sharding, param_specs(config), is_leaf=is_spec)


def assert_trees_equal(a, b):
    """Same structure, and every leaf bit-identical (values and dtype)."""
    flat_a = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(a)}
    flat_b = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(b)}
    assert flat_a.keys() == flat_b.keys(), set(flat_a) ^ set(flat_b)
    for key in flat_a:
        x, y = np.asarray(flat_a[key]), np.asarray(flat_b[key])
        assert x.dtype == y.dtype and x.shape == y.shape, (key, x.dtype, y.dtype, x.shape, y.shape)
        assert np.array_equal(x, y), key
