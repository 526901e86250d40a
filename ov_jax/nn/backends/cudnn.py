"""The cuDNN backend: ``jax.nn.dot_product_attention(implementation="cudnn")`` (fused flash attention) for
bfloat16 / float16 self-attention on NVIDIA GPUs; decode (one query per row against the cache, bound by
reading the cache) stays on the reference backend.

cuDNN takes padding as per-row lengths of a right-padded sequence. A causal row with any padding (left padding
included) is made right-padded by a stable permutation that moves its valid tokens to the front in their
order: causal order among the valid tokens is unchanged, so the kernel sees lengths, and the output is
permuted back (zeros at padded queries). Packed segment ids are passed as a dense mask (a ``[B, 1, T, T]``
bias inside cuDNN). Under an active multi-device mesh the call runs per shard
(:func:`~ov_jax.nn.attention.per_shard_self_attention`): jax's partitioning rules for the cuDNN call need
``q``, ``k`` and ``v`` sharded alike, which grouped-query heads are not when the KV heads are replicated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ov_jax.nn.attention import AttentionMeta, per_shard_self_attention
from ov_jax.nn.backends import xla


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: AttentionMeta,
                   implementation: str = "cudnn") -> jax.Array:
    """Self-attention through ``jax.nn.dot_product_attention`` (per shard under an active mesh);
    ``implementation="xla"`` runs jax's own reference of the same call (used to test this plumbing off GPU)."""
    return per_shard_self_attention(functools.partial(_fused, implementation=implementation), q, k, v, meta)


def _fused(q: jax.Array, k: jax.Array, v: jax.Array, meta: AttentionMeta, implementation: str) -> jax.Array:
    def call(q, k, v, **options):
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **options)

    b, t = q.shape[:2]
    if meta.segment_ids is not None or (meta.key_valid is not None and not meta.causal):
        return call(q, k, v, mask=jnp.broadcast_to(meta.mask(t, t), (b, t, t))[:, None], is_causal=False)
    if meta.key_valid is None:
        return call(q, k, v, is_causal=meta.causal)
    valid = meta.key_valid.astype(bool)
    order = jnp.argsort(~valid, axis=1, stable=True)  # valid slots first, in their order: [B, T]
    lengths = valid.sum(axis=1).astype(jnp.int32)

    def gather(x):
        return jnp.take_along_axis(x, order[:, :, None, None], axis=1)

    out = call(gather(q), gather(k), gather(v), is_causal=True, query_seq_lengths=lengths,
               key_value_seq_lengths=lengths)
    out = jnp.take_along_axis(out, jnp.argsort(order, axis=1)[:, :, None, None], axis=1)
    return jnp.where(valid[:, :, None, None], out, 0)  # padded queries: no keys, zeros (never NaN)


cached_attention = xla.cached_attention
