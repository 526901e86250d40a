"""LoRA for fine-tuning: target presets per tower, adapters via `ov_jax.nn.lora`, and LoRA dropout.

:func:`add_lora` takes target presets (``language_model``: every decoder linear; ``projector``; ``vision_tower``:
every encoder linear) or regexes over weight paths and returns the params with adapters plus their
`ov_jax.params.LoraSpec`; pass that spec to `ov_jax.train.make_train_step` (``lora=``) and only the adapters
train. `ov_jax.nn.lora.merge_lora` folds them into the base weights for export or serving.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp

from ov_jax.config import OneVisionConfig
from ov_jax.nn import lora as nn_lora
from ov_jax.params import LoraSpec, Params

TARGET_PRESETS: dict[str, str] = {
    "language_model": nn_lora.LM_LINEARS,
    "projector": r"projector\.linear_[12]",
    "vision_tower": r"vision\.layers\.(q|k|v|o|fc1|fc2)",
}


# Weights whose adapters take no dropout: the token embedding (its lookup, and the tied lm_head's product with
# the same table). PEFT's LoRA ``Embedding`` has no dropout; dropping a one-hot lookup's input is not defined.
NO_DROPOUT = ("text.embed",)


def targets_regex(targets: str | Iterable[str]) -> str:
    """Presets (:data:`TARGET_PRESETS`) and regexes, a comma-separated string or an iterable → one regex that
    `ov_jax.params.LoraSpec` matches against whole weight paths (``text.layers.q``)."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    parts = [TARGET_PRESETS.get(t, t) for t in targets]
    if not parts:
        raise ValueError("LoRA targets are empty; give presets "
                         f"({', '.join(TARGET_PRESETS)}) or regexes over weight paths")
    return parts[0] if len(parts) == 1 else "|".join(f"(?:{p})" for p in parts)


def add_lora(params: Params, config: OneVisionConfig, rank: int, alpha: float,
             targets: str | Iterable[str] = "language_model", seed: int = 0) -> tuple[Params, LoraSpec]:
    """``params`` with adapters of ``rank`` / ``alpha`` on ``targets`` (presets or regexes), and their spec.
    Errors (``ValueError``): a bad rank or alpha, a regex that does not compile or matches no weight."""
    return nn_lora.add_lora(params, config, rank, alpha, targets_regex(targets), seed=seed)


def with_dropout(params: Params, rate: float, key: jax.Array) -> Params:
    """``params`` with a LoRA dropout key and ``rate`` in every adapted linear's weight dict (inside the jitted
    loss only; `ov_jax.nn.linear.linear` then drops adapter inputs with probability ``rate``). Stacked weights get
    one key per layer, so the layer scan slices them like the weights; the untied lm_head's key is folded with
    each loss chunk's index (`ov_jax.modeling.lm_head.causal_lm_loss`). Adapters on the token embedding take no
    dropout (:data:`NO_DROPOUT`), as PEFT's LoRA ``Embedding`` layer, which applies none to its lookups."""
    counter = iter(range(1 << 30))

    def rebuild(node, path=""):
        if not isinstance(node, dict):
            return node
        new = {k: rebuild(v, f"{path}.{k}" if path else k) for k, v in node.items()}
        if "lora_a" in node and path not in NO_DROPOUT:
            lead = node["lora_scale"].shape
            own = jax.random.fold_in(key, next(counter))
            new["lora_dropout_key"] = jax.random.split(own, lead[0]) if lead else own
            new["lora_dropout_rate"] = jnp.full(lead, rate, jnp.float32)
        return new

    return rebuild(params)
