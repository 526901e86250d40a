"""Qwen2 decoder: RMSNorm, half-split RoPE, GQA with q/k/v bias, SiLU-gated MLP, optional KV cache.

One function serves a full forward (no cache), prefill (write the cache from slot 0) and decode
(write one slot). The cache is ``{"k", "v"}`` of shape ``[L, B, S, nkv, hd]``; callers donate it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ov_jax.config import TextConfig
from ov_jax.modeling.layers import apply_rope, remat_layer, rms_norm, rope_tables
from ov_jax.modeling.lm_head import lm_logits  # noqa: F401  (the engine reads the head through qwen2)
from ov_jax.nn.attention import AttentionMeta, attention
from ov_jax.nn.linear import embed_rows, linear
from ov_jax.sharding import active_mesh, constrain


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, S, nkv, hd]
    v: jax.Array


def init_cache(config: TextConfig, batch: int, length: int, dtype) -> KVCache:
    shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def embed_tokens(params: dict, input_ids: jax.Array, dtype) -> jax.Array:
    """Token embeddings ``[*input_ids.shape, H]`` in ``dtype``."""
    return embed_rows(params["embed"], input_ids, dtype)


def decoder_meta(key_valid: jax.Array, t: int, write_index: jax.Array | int | None = None,
                 segment_ids: jax.Array | None = None) -> AttentionMeta:
    """Causal attention metadata of the decoder: self-attention over ``t`` slots (no cache, or a prompt-length
    cache written from slot 0: ``write_index`` None or the int 0 with ``key_valid [B, t]``), else ``t`` queries
    at ``write_index …`` against the cache slots ``key_valid [B, S]`` marks. The prompt-length cache is marked
    ``prefill`` (the ``xla`` / ``cpu`` backends run it by query blocks, the forward without a cache by flash)."""
    if write_index is None:
        return AttentionMeta(causal=True, key_valid=key_valid, segment_ids=segment_ids)
    if isinstance(write_index, int) and write_index == 0 and key_valid.shape[1] == t:
        return AttentionMeta(causal=True, key_valid=key_valid, segment_ids=segment_ids, prefill=True)
    return AttentionMeta(causal=True, key_valid=key_valid, write_index=write_index)


def write_kv(cache: jax.Array, new: jax.Array, write_index: jax.Array | int) -> jax.Array:
    """``new [B, T, nkv, hd]`` into ``cache [B, S, nkv, hd]`` at slots ``write_index …`` (a scalar, or ``[B]``
    per row)."""
    new = new.astype(cache.dtype)
    if jnp.ndim(write_index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, write_index, axis=1)
    slots = write_index[:, None] + jnp.arange(new.shape[1])
    return cache.at[jnp.arange(cache.shape[0])[:, None], slots].set(new)


def decoder_layer(x, lp, cos, sin, meta: AttentionMeta, config: TextConfig, cache_kv=None, write_index=None,
                  backend: str = "xla"):
    h = rms_norm(x, lp["input_norm"], config.rms_norm_eps)
    q = apply_rope(linear(h, lp["q"]), cos, sin)
    k = apply_rope(linear(h, lp["k"]), cos, sin)
    v = linear(h, lp["v"])
    if cache_kv is not None:
        ck, cv = cache_kv
        ck, cv = write_kv(ck, k, write_index), write_kv(cv, v, write_index)
        k, v, cache_kv = ck.astype(q.dtype), cv.astype(q.dtype), (ck, cv)
    x = x + linear(attention(q, k, v, meta, backend), lp["o"], n_in=2)
    h = rms_norm(x, lp["post_norm"], config.rms_norm_eps)
    x = x + linear(jax.nn.silu(linear(h, lp["gate"])) * linear(h, lp["up"]), lp["down"])
    return x, cache_kv


def decoder(
    params: dict,
    x: jax.Array,
    positions: jax.Array,
    key_valid: jax.Array,
    config: TextConfig,
    cache: KVCache | None = None,
    write_index: jax.Array | int = 0,
    attention: str = "xla",
    *,
    segment_ids: jax.Array | None = None,
    remat: str | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Run all layers and the final norm.

    ``x [B, T, H]`` embeddings, ``positions [B, T]`` RoPE positions. Without a cache ``key_valid``
    is ``[B, T]``; with a cache it is ``[B, S]`` over cache slots (already marking the T new slots),
    and the new keys/values are written at slots ``write_index … write_index + T - 1`` (``write_index``: a
    scalar, or ``[B]`` for a write slot per row).
    ``attention``: a resolved backend name (`ov_jax.nn.backends`); prefill (a ``T``-slot cache written from the
    int slot 0) is self-attention, which the flash kernels take. Without a cache the ``xla`` and ``cpu``
    backends run `ov_jax.nn.flash` (online softmax by blocks: no ``T × T`` scores or mask, forward or backward).
    ``segment_ids [B, T]`` (no cache; int, 0 = padding): packed rows, attention only within a segment.
    ``remat``: a `layers.REMAT_POLICIES` name for the layer scan (no cache). The hidden states are constrained
    to the rules table's ``hidden`` sharding when a mesh is active (``jax.set_mesh``).
    Returns the normalised hidden states and the updated cache.
    """
    t = x.shape[1]
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta, x.dtype)
    mesh = active_mesh()

    if cache is None:
        meta = decoder_meta(key_valid, t, segment_ids=segment_ids)

        def body(h, lp):
            h, _ = decoder_layer(h, lp, cos, sin, meta, config, backend=attention)
            return constrain(h, mesh, "hidden"), None

        x, _ = jax.lax.scan(remat_layer(body, remat), constrain(x, mesh, "hidden"), params["layers"])
        new_cache = None
    else:
        meta = decoder_meta(key_valid, t, write_index)

        def body(h, xs):
            lp, ck, cv = xs
            h, (ck, cv) = decoder_layer(h, lp, cos, sin, meta, config, (ck, cv), write_index, attention)
            return h, (ck, cv)

        x, (ks, vs) = jax.lax.scan(body, x, (params["layers"], cache.k, cache.v))
        new_cache = KVCache(ks, vs)
    return rms_norm(x, params["norm"], config.rms_norm_eps), new_cache
