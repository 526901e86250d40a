"""The reference backend: `ov_jax.modeling.layers.attention` (float32 scores and softmax) on a dense mask; causal
self-attention by the flash form (`ov_jax.nn.flash`: float32 online softmax, no ``T × T`` scores or mask,
forward or backward), a prefill by causal query blocks. Runs on every platform; the float32 parity path."""

from __future__ import annotations

import jax

from ov_jax.modeling.layers import attention as dense_attention
from ov_jax.nn.attention import AttentionMeta, causal_block_attention, to_bsnh
from ov_jax.nn.flash import flash_attention


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: AttentionMeta, kernel=dense_attention
                   ) -> jax.Array:
    """Vision tower (``kernel`` on :meth:`AttentionMeta.mask`), causal full-sequence forward and training
    (:func:`~ov_jax.nn.flash.flash_attention` on :meth:`AttentionMeta.segments`) and prefill (``kernel`` by
    causal query blocks, ``meta.prefill``)."""
    if meta.causal and not meta.prefill:
        return flash_attention(q, k, v, meta.segments())
    t = q.shape[1]
    mask = meta.mask(t, t)
    if meta.causal:
        return causal_block_attention(q, k, v, mask, kernel)
    return kernel(q, k, v, mask)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: AttentionMeta) -> jax.Array:
    """Queries at ``meta.write_index …`` against a cache (either layout) on the dense mask."""
    k, v = to_bsnh(k, meta), to_bsnh(v, meta)
    return dense_attention(q, k, v, meta.mask(q.shape[1], k.shape[1]))
