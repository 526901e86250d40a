"""Causal self-attention for long sequences, and its mask from padding and packing metadata.

:func:`causal_block_attention` runs `ov_jax.modeling.layers.attention` by query blocks that only see keys up
to the block's end, so score memory is ``block × T`` instead of ``T × T``. The engine's prefill and the
training / full-sequence forward both use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ov_jax.modeling.layers import attention

QUERY_BLOCK = 512


def causal_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                           block: int = QUERY_BLOCK, attend=attention) -> jax.Array:
    """``layers.attention`` for a causal mask, by query blocks that only see keys up to the block's end.

    ``q [B, T, nh, hd]``, ``k``/``v`` ``[B, T, nkv, hd]`` (same slots as the queries), ``mask [B, T, T]`` causal
    (True = may attend). Exact for every query with at least one visible key (the skipped keys are masked for
    it anyway): about half the score FLOPs of the full square, and float32 score memory bounded by
    ``block × T``. ``attend`` is the per-block kernel (same signature as ``layers.attention``).
    """
    t = q.shape[1]
    if t <= block:
        return attend(q, k, v, mask)
    parts = [attend(q[:, i:i + block], k[:, :i + block], v[:, :i + block], mask[:, i:i + block, :i + block])
             for i in range(0, t, block)]
    return jnp.concatenate(parts, axis=1)


def causal_mask(key_valid: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """``[B, T, T]`` bool: query ``i`` may attend key ``j`` iff ``j <= i``, key ``j`` is valid and, with
    ``segment_ids [B, T]`` (int, 0 = padding), both lie in the same segment."""
    t = key_valid.shape[1]
    slots = jnp.arange(t)
    valid = key_valid.astype(bool)
    if segment_ids is not None:
        valid = valid & (segment_ids != 0)
    mask = (slots[None, None, :] <= slots[None, :, None]) & valid[:, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask
