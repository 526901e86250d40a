"""LoRA adapters on the params tree: add them, tell them apart, fold them into the base weights.

Adapters are declared keys of the weight dicts they modify (`ov_jax.params.LoraSpec`); `ov_jax.nn.linear`
applies them in every product, so the forward, the engine and the loss need no LoRA-specific code.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ov_jax.config import OneVisionConfig
from ov_jax.nn.linear import merge_leaf
from ov_jax.params import LoraSpec, Params, check_tree, lora_targets, param_specs

# Every linear of the language model's decoder layers (the usual LoRA target set).
LM_LINEARS = r"text\.layers\.(q|k|v|o|gate|up|down)"


def add_lora(params: Params, config: OneVisionConfig, rank: int, alpha: float, targets: str = LM_LINEARS,
             seed: int = 0) -> tuple[Params, LoraSpec]:
    """A copy of ``params`` with LoRA adapters on every weight dict whose dotted path fully matches the regular
    expression ``targets``, and the :class:`~ov_jax.params.LoraSpec` that declares them.

    ``lora_a`` is drawn as PEFT does (uniform in ``±1/sqrt(fan_in)``), ``lora_b`` is zero, so the forward is
    unchanged until training moves ``lora_b``; ``lora_scale`` = ``alpha / rank``. Adapters take their kernel's
    dtype and sharding (`ov_jax.sharding` resolves their declared axes). Raises ``ValueError`` for a bad rank,
    alpha or pattern, for a pattern that matches no weight, or for params that already hold adapters.
    """
    spec = LoraSpec(rank, float(alpha), targets)
    check_tree(params, config)
    specs = param_specs(config, spec)
    rng = np.random.default_rng(seed)
    out = jax.tree.map(lambda x: x, params)
    for path in lora_targets(param_specs(config), spec):
        node, declared = out, specs
        for key in path.split("."):
            node, declared = node[key], declared[key]
        kernel = node.get("kernel_scale", node["kernel"])  # adapters of a quantized kernel take its scale's dtype
        a_spec = declared["lora_a"]
        fan_in = math.prod(a_spec.shape[len(a_spec.shape) - 1 - a_spec.n_in:-1])
        bound = 1.0 / math.sqrt(fan_in)
        node["lora_a"] = _like(kernel, rng.uniform(-bound, bound, a_spec.shape).astype(np.float32))
        node["lora_b"] = _like(kernel, np.zeros(declared["lora_b"].shape, np.float32))
        node["lora_scale"] = _like(kernel, np.full(declared["lora_scale"].shape, spec.scale, np.float32),
                                   dtype=jnp.float32)
    return out, spec


def _like(kernel: Any, value: np.ndarray, dtype=None) -> Any:
    dtype = kernel.dtype if dtype is None else dtype
    if isinstance(kernel, np.ndarray):
        return value.astype(dtype)
    return jnp.asarray(value, dtype)


def merge_lora(params: Params) -> Params:
    """``params`` with every adapter folded into its kernel (``kernel + lora_scale · lora_a · lora_b``) and the
    adapter keys removed: the plain layout, for export and serving. Params without adapters come back as-is."""
    if isinstance(params, dict):
        if "lora_a" in params:
            return merge_leaf(params)
        return {k: merge_lora(v) for k, v in params.items()}
    return params


def is_adapter(path: str) -> bool:
    """True for the dotted path of a trainable adapter leaf (``lora_a`` / ``lora_b``; ``lora_scale`` is a
    constant and is not trainable)."""
    return re.search(r"(^|\.)lora_[ab]$", path) is not None


def adapter_count(params: Params) -> int:
    """Number of trainable adapter values in ``params``."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(int(np.prod(x.shape)) for p, x in leaves
               if is_adapter(".".join(str(getattr(k, "key", k)) for k in p)))

