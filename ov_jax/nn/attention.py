"""Causal self-attention by query blocks for long prompts.

:func:`causal_block_attention` runs `ov_jax.modeling.layers.attention` by query blocks that only see keys up
to the block's end, so score memory is ``block × T`` instead of ``T × T``. The engine's prefill uses it;
the training / full-sequence forward uses the flash form (`ov_jax.nn.flash`).
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
