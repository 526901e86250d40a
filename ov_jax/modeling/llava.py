"""LLaVA-OneVision device math: tower → projector → planned gather → merge → Qwen2.

All functions are pure in a params dict; shapes depend only on the (padded) inputs, so they jit
once per bucket. The host plan (`ov_jax.media_plan`) decides everything size-dependent.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ov_jax.config import OneVisionConfig
from ov_jax.modeling import qwen2, siglip
from ov_jax.modeling.layers import attention, dense, gelu_exact


def project(params: dict, features: jax.Array) -> jax.Array:
    """Projector: linear → exact GELU → linear."""
    return dense(gelu_exact(dense(features, params["linear_1"])), params["linear_2"])


def media_features(params: dict, tower_inputs: jax.Array, config: OneVisionConfig, dtype,
                   attend: Callable = attention) -> jax.Array:
    """Projected features of every tile and frame, ``[N, 729, H]``."""
    feats = siglip.vision_features(params["vision"], tower_inputs, config, dtype, attend)
    return project(params["projector"], feats)


def gather_media(params: dict, projected: jax.Array, tap_index: jax.Array, tap_weight: jax.Array) -> jax.Array:
    """Weighted 4-tap gather from ``[newline; projected tokens]`` → ``[B, T, H]`` (at least float32 accumulation)."""
    hidden = projected.shape[-1]
    acc = jnp.promote_types(projected.dtype, jnp.float32)
    table = jnp.concatenate([params["image_newline"].astype(projected.dtype)[None], projected.reshape(-1, hidden)])
    rows = jnp.take(table, tap_index, axis=0).astype(acc)  # [B, T, 4, H]
    return jnp.einsum("btkh,btk->bth", rows, tap_weight.astype(acc))


def merged_embeddings(params, input_ids, tower_inputs, tap_index, tap_weight, is_media, config: OneVisionConfig, dtype):
    """Text embeddings with every media position replaced by its packed feature row."""
    embeds = qwen2.embed_tokens(params["text"], input_ids, dtype)
    if tower_inputs.shape[0] == 0:
        return embeds
    projected = media_features(params, tower_inputs, config, dtype)
    media = gather_media(params, projected, tap_index, tap_weight).astype(dtype)
    return jnp.where(is_media[..., None], media, embeds)


def forward(params, input_ids, attention_mask, position_ids, tower_inputs, tap_index, tap_weight, is_media,
            config: OneVisionConfig, dtype):
    """Full-sequence logits ``[B, T, V]`` (float32), no cache."""
    embeds = merged_embeddings(params, input_ids, tower_inputs, tap_index, tap_weight, is_media, config, dtype)
    hidden, _ = qwen2.decoder(params["text"], embeds, position_ids, attention_mask.astype(bool), config.text)
    return qwen2.lm_logits(params["text"], hidden)


def causal_lm_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = -100) -> jax.Array:
    """Mean next-token cross-entropy over labels != ignore_index (transformers' shift convention)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != ignore_index
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(valid.sum(), 1)
