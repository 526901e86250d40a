"""Flax NNX modules holding the params tree as ``nnx.Param`` leaves.

Each module's attributes mirror one subtree of the params layout (`ov_jax.params`), every Param
carries its logical axes as metadata, and ``__call__`` runs the same pure functions the engine jits.
``nnx.split`` of a module gives exactly the plain params dict (``state.to_pure_dict()``), so the NNX
view and the functional core never drift apart.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ov_jax.config import OneVisionConfig
from ov_jax.modeling import llava, qwen2, siglip
from ov_jax.params import is_spec, param_specs


def _to_nnx(tree: Any, specs: Any) -> Any:
    if isinstance(tree, dict):
        return nnx.Dict({k: _to_nnx(v, specs[k]) for k, v in tree.items()})
    return nnx.Param(jnp.asarray(tree), logical_axes=specs.axes)


def _pure(module: nnx.Module, name: str) -> dict:
    return nnx.to_pure_dict(nnx.state(getattr(module, name), nnx.Param))


class _ParamsModule(nnx.Module):
    """Holds a params subtree; ``params`` returns it as a plain dict."""

    def __init__(self, params: dict, specs: dict):
        self.tree = _to_nnx(params, specs)

    @property
    def params(self) -> dict:
        return _pure(self, "tree")


class SiglipVisionTower(_ParamsModule):
    def __init__(self, params: dict, config: OneVisionConfig):
        super().__init__(params, param_specs(config)["vision"])
        self.config = config

    def __call__(self, pixels: jax.Array, dtype=jnp.float32) -> jax.Array:
        """``[N, 3, 384, 384]`` → selected hidden states ``[N, 729, Dv·k]`` (no post-layernorm)."""
        return siglip.vision_features(self.params, pixels, self.config, dtype)


class Projector(_ParamsModule):
    def __init__(self, params: dict, config: OneVisionConfig):
        super().__init__(params, param_specs(config)["projector"])

    def __call__(self, features: jax.Array) -> jax.Array:
        return llava.project(self.params, features)


class Qwen2Model(_ParamsModule):
    def __init__(self, params: dict, config: OneVisionConfig):
        super().__init__(params, param_specs(config)["text"])
        self.config = config.text

    def __call__(self, embeds: jax.Array, positions: jax.Array, key_valid: jax.Array) -> jax.Array:
        """Embeddings ``[B, T, H]`` → logits ``[B, T, V]`` (float32)."""
        params = self.params
        hidden, _ = qwen2.decoder(params, embeds, positions, key_valid, self.config)
        return qwen2.lm_logits(params, hidden)


class LlavaOnevisionModule(nnx.Module):
    """The whole model as NNX submodules: ``vision_tower``, ``projector``, ``image_newline``, ``language_model``."""

    def __init__(self, params: dict, config: OneVisionConfig):
        self.config = config
        self.vision_tower = SiglipVisionTower(params["vision"], config)
        self.projector = Projector(params["projector"], config)
        self.image_newline = nnx.Param(jnp.asarray(params["image_newline"]), logical_axes=("embed",))
        self.language_model = Qwen2Model(params["text"], config)

    @property
    def params(self) -> dict:
        """The plain params tree (same layout as `ov_jax.params`)."""
        return {
            "vision": self.vision_tower.params,
            "projector": self.projector.params,
            "image_newline": self.image_newline[...],
            "text": self.language_model.params,
        }


def check_tree(params: dict, config: OneVisionConfig) -> None:
    """Raise if ``params`` does not have exactly the declared leaves and shapes."""
    specs = param_specs(config)
    want = {jax.tree_util.keystr(p): s.shape for p, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec)}
    have = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"missing {k}" for k in want.keys() - have.keys()]
    problems += [f"unexpected {k}" for k in have.keys() - want.keys()]
    problems += [f"{k}: shape {have[k]} != {want[k]}" for k in want.keys() & have.keys() if have[k] != want[k]]
    if problems:
        raise ValueError("params do not match the config: " + "; ".join(sorted(problems)))
