"""Qwen2 decoder: RMSNorm, half-split RoPE, GQA with q/k/v bias, SiLU-gated MLP, optional KV cache.

One function serves a full forward (no cache), prefill (write the cache from slot 0) and decode
(write one slot). The cache is ``{"k", "v"}`` of shape ``[L, B, S, nkv, hd]``; callers donate it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ov_jax.config import TextConfig
from ov_jax.modeling.layers import apply_rope, attention, dense, merge_heads, project_heads, rms_norm, rope_tables


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, S, nkv, hd]
    v: jax.Array


def init_cache(config: TextConfig, batch: int, length: int, dtype) -> KVCache:
    shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def embed_tokens(params: dict, input_ids: jax.Array, dtype) -> jax.Array:
    return jnp.take(params["embed"], input_ids, axis=0).astype(dtype)


def attention_mask(key_valid: jax.Array, query_slots: jax.Array, key_slots: jax.Array) -> jax.Array:
    """``[B, T, S]``: causal over slots, and only keys marked valid (not left padding)."""
    causal = key_slots[None, None, :] <= query_slots[:, :, None]
    return causal & key_valid[:, None, :]


def write_kv(cache: jax.Array, new: jax.Array, write_index: jax.Array | int) -> jax.Array:
    """``new [B, T, nkv, hd]`` into ``cache [B, S, nkv, hd]`` at slots ``write_index …`` (a scalar, or ``[B]``
    per row)."""
    new = new.astype(cache.dtype)
    if jnp.ndim(write_index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, write_index, axis=1)
    slots = write_index[:, None] + jnp.arange(new.shape[1])
    return cache.at[jnp.arange(cache.shape[0])[:, None], slots].set(new)


def decoder_layer(x, lp, cos, sin, mask, config: TextConfig, cache_kv=None, write_index=None,
                  attend: Callable = attention):
    h = rms_norm(x, lp["input_norm"], config.rms_norm_eps)
    q = apply_rope(project_heads(h, lp["q"]), cos, sin)
    k = apply_rope(project_heads(h, lp["k"]), cos, sin)
    v = project_heads(h, lp["v"])
    if cache_kv is not None:
        ck, cv = cache_kv
        ck, cv = write_kv(ck, k, write_index), write_kv(cv, v, write_index)
        k, v, cache_kv = ck.astype(q.dtype), cv.astype(q.dtype), (ck, cv)
    x = x + merge_heads(attend(q, k, v, mask), lp["o"])
    h = rms_norm(x, lp["post_norm"], config.rms_norm_eps)
    x = x + dense(jax.nn.silu(dense(h, lp["gate"])) * dense(h, lp["up"]), lp["down"])
    return x, cache_kv


def decoder(
    params: dict,
    x: jax.Array,
    positions: jax.Array,
    key_valid: jax.Array,
    config: TextConfig,
    cache: KVCache | None = None,
    write_index: jax.Array | int = 0,
    attend: Callable = attention,
) -> tuple[jax.Array, KVCache | None]:
    """Run all layers and the final norm.

    ``x [B, T, H]`` embeddings, ``positions [B, T]`` RoPE positions. Without a cache ``key_valid``
    is ``[B, T]``; with a cache it is ``[B, S]`` over cache slots (already marking the T new slots),
    and the new keys/values are written at slots ``write_index … write_index + T - 1`` (``write_index``: a
    scalar, or ``[B]`` for a write slot per row).
    ``attend`` replaces ``layers.attention`` (same signature), e.g. a blocked causal variant for long prompts.
    Returns the normalised hidden states and the updated cache.
    """
    t = x.shape[1]
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta, x.dtype)
    query_slots = jnp.asarray(write_index)[..., None] + jnp.arange(t)
    key_slots = jnp.arange(key_valid.shape[1])
    mask = attention_mask(key_valid, jnp.broadcast_to(query_slots, (x.shape[0], t)), key_slots)

    if cache is None:
        def body(h, lp):
            h, _ = decoder_layer(h, lp, cos, sin, mask, config, attend=attend)
            return h, None

        x, _ = jax.lax.scan(body, x, params["layers"])
        new_cache = None
    else:
        def body(h, xs):
            lp, ck, cv = xs
            h, (ck, cv) = decoder_layer(h, lp, cos, sin, mask, config, (ck, cv), write_index, attend)
            return h, (ck, cv)

        x, (ks, vs) = jax.lax.scan(body, x, (params["layers"], cache.k, cache.v))
        new_cache = KVCache(ks, vs)
    return rms_norm(x, params["norm"], config.rms_norm_eps), new_cache


def lm_logits(params: dict, hidden: jax.Array) -> jax.Array:
    """Vocabulary logits in float32; a tied checkpoint reuses the embedding matrix."""
    if "lm_head" in params:
        kernel = params["lm_head"]["kernel"].astype(hidden.dtype)
        return jnp.einsum("bth,hv->btv", hidden, kernel, preferred_element_type=jnp.float32)
    embed = params["embed"].astype(hidden.dtype)
    return jnp.einsum("bth,vh->btv", hidden, embed, preferred_element_type=jnp.float32)
