"""The Pallas splash-attention backend (``jax.experimental.pallas.ops.tpu.splash_attention``): a block-sparse
flash kernel for TPUs, used for self-attention (vision tower, full-sequence forward, prefill); decode stays on
the reference backend. Off TPU the same kernel runs in Pallas interpret mode (exact, slow: for tests).

Padding and packing become splash segment ids (invalid keys in segment 0, so a valid query never sees them);
the sequence is padded to a multiple of :data:`BLOCK` with segment-0 slots. Queries are pre-scaled by
``1/sqrt(hd)`` (the kernel does not scale). Grouped-query heads map onto the kernel's multi-head form
(``num_q_heads`` a multiple of ``num_kv_heads``); rows run under ``vmap``. Under an active multi-device mesh
the kernel runs per shard (:func:`~ov_jax.nn.attention.per_shard_self_attention`): rows over the batch axes,
heads over ``tensor``. The backward blocks are given too, so the kernel is differentiable (training).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ov_jax.nn.attention import AttentionMeta, per_shard_self_attention
from ov_jax.nn.backends import xla

BLOCK = 128  # query / key block; the kernel's key compute block must be a multiple of 128 lanes


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: AttentionMeta) -> jax.Array:
    """Splash self-attention ``[B, T, nh, hd]`` (per shard under an active mesh)."""
    return per_shard_self_attention(_splash, q, k, v, meta)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, meta: AttentionMeta) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, nh, hd = q.shape
    padded = -(-t // BLOCK) * BLOCK
    segments = meta.segments()
    if segments is None and padded != t:
        segments = jnp.ones((b, t), jnp.int32)

    def heads_major(x):  # [B, T, n, hd] -> [B, n, padded, hd]
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - t), (0, 0)))

    shape = (padded, padded)
    mask = sa.MultiHeadMask([sa.CausalMask(shape) if meta.causal else sa.FullMask(shape) for _ in range(nh)])
    kernel = sa.make_splash_mha_single_device(
        mask, block_sizes=sa.BlockSizes(block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK, block_q_dkv=BLOCK,
                                        block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK, block_q_dq=BLOCK,
                                        block_kv_dq=BLOCK),
        interpret=jax.default_backend() != "tpu")
    qh = heads_major(q * jnp.asarray(1.0 / math.sqrt(hd), q.dtype))
    kh, vh = heads_major(k), heads_major(v)
    if segments is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        segments = jnp.pad(segments, ((0, 0), (0, padded - t)))
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, sa.SegmentIds(s, s)))(qh, kh, vh, segments)
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)


cached_attention = xla.cached_attention
