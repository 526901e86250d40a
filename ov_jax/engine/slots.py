"""Per-row decode state of a running batch, and the device functions that change it.

A running batch has ``B`` slots (rows) and a KV cache of ``S`` slots per row. Every row carries its own
position, write slot, step, stop ids, sampling settings and random key, so rows join (:func:`insert`) and
leave (:func:`evict`) a running cache between decode chunks (:func:`decode_chunk`) without touching the
others. Shapes depend only on ``(B, S)`` and, for :func:`insert`, the prompt bucket ``T``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ov_jax.config import OneVisionConfig
from ov_jax.engine.sampling import choose_tokens_rows, row_keys
from ov_jax.engine.steps import _decode_unrolled
from ov_jax.modeling import qwen2
from ov_jax.modeling.layers import rms_norm, rope_tables
from ov_jax.nn.linear import matmul

MAX_STOP_IDS = 16


class RowSettings(NamedTuple):
    """What a request row asks for; leaves are ``[B]`` (``stop_ids``: ``[B, MAX_STOP_IDS]``, -1 = unused)."""

    stop_ids: jax.Array  # int32
    pad_id: jax.Array  # int32: emitted after the row's stop token
    max_new_tokens: jax.Array  # int32: the row is done once it has emitted this many tokens
    do_sample: jax.Array  # bool
    temperature: jax.Array  # float32
    top_k: jax.Array  # int32, 0 = off
    top_p_threshold: jax.Array  # float32: 1 - top_p as torch rounds it, 0 = off
    keys: jax.Array  # [B, 2] uint32: random key data (`sampling.row_keys`)


class DecodeState(NamedTuple):
    """The running batch; every leaf has a shape fixed by ``(B, S)``."""

    tokens: jax.Array  # [B] int32: the last emitted token (pad once the row is done)
    positions: jax.Array  # [B] int32: RoPE position of ``tokens`` when fed back
    write_index: jax.Array  # [B] int32: cache slot of the next fed token
    step: jax.Array  # [B] int32: index of ``tokens`` among the row's new tokens
    key_valid: jax.Array  # [B, S] bool: cache slots a query may attend to
    done: jax.Array  # [B] bool: finished, evicted or free
    settings: RowSettings


def empty_state(batch: int, cache_length: int) -> DecodeState:
    """Every slot free (done, nothing valid), as host arrays."""
    zeros = np.zeros((batch,), np.int32)
    settings = RowSettings(np.full((batch, MAX_STOP_IDS), -1, np.int32), zeros, zeros, np.zeros((batch,), bool),
                           np.ones((batch,), np.float32), zeros, np.zeros((batch,), np.float32),
                           np.zeros((batch, 2), np.uint32))
    return DecodeState(zeros, zeros, zeros, zeros, np.zeros((batch, cache_length), bool), np.ones((batch,), bool),
                       settings)


def cache_shape(config: OneVisionConfig, batch: int, cache_length: int, layout: str) -> tuple[int, ...]:
    """Shape of one key or value array of a ``layout`` KV cache (see `ov_jax.engine.steps`): the stacked
    ``[L, B, S, nkv, hd]`` of ``"scanned"``, or one layer's heads-major ``[B, nkv, S, hd]`` otherwise."""
    tc = config.text
    if layout == "scanned":
        return (tc.num_hidden_layers, batch, cache_length, tc.num_key_value_heads, tc.head_dim)
    return (batch, tc.num_key_value_heads, cache_length, tc.head_dim)


def empty_cache(config: OneVisionConfig, batch: int, cache_length: int, dtype, layout: str) -> qwen2.KVCache:
    """A zero KV cache of ``layout`` (:func:`cache_shape`), as host arrays."""
    shape = cache_shape(config, batch, cache_length, layout)
    if layout == "scanned":
        return qwen2.KVCache(np.zeros(shape, dtype), np.zeros(shape, dtype))
    layers = config.text.num_hidden_layers
    return qwen2.KVCache(*(tuple(np.zeros(shape, dtype) for _ in range(layers)) for _ in range(2)))


def _emit(state: DecodeState, logits: jax.Array) -> DecodeState:
    """Choose this step's tokens; done rows emit pad; a stop token or the row's length limit finishes it."""
    st = state.settings
    chosen = choose_tokens_rows(logits, st.do_sample, st.temperature, st.top_k, st.top_p_threshold, st.keys,
                                state.step)
    tokens = jnp.where(state.done, st.pad_id, chosen)
    stopped = (chosen[:, None] == st.stop_ids).any(axis=-1) | (state.step + 1 >= st.max_new_tokens)
    return state._replace(tokens=tokens, done=state.done | stopped)


def insert(cache: Any, state: DecodeState, prompt_kv: qwen2.KVCache, logits: jax.Array, attention_mask: jax.Array,
           slot: jax.Array, row: RowSettings, seed: jax.Array, row_index: jax.Array, layout: str
           ) -> tuple[Any, DecodeState, jax.Array]:
    """Put one prefilled row (``prompt_kv [L, 1, T, nkv, hd]``, last ``logits [1, V]``, left-padded
    ``attention_mask [1, T]``) into ``slot`` and choose its first token; ``row`` holds ``[1]`` settings whose
    ``keys`` are replaced by ``fold_in(key(seed), row_index)``. Returns the cache, the state and the first
    token ``[]`` int32."""
    t = attention_mask.shape[1]
    s = state.key_valid.shape[1]
    if layout == "scanned":
        cache = qwen2.KVCache(*(jax.lax.dynamic_update_slice(c, kv.astype(c.dtype), (0, slot, 0, 0, 0))
                                for c, kv in ((cache.k, prompt_kv.k), (cache.v, prompt_kv.v))))
    else:
        def per_layer(layers, kv):  # [L, 1, T, nkv, hd] -> each layer's [1, nkv, T, hd] at the slot's row
            kv = kv.transpose(0, 1, 3, 2, 4)
            return tuple(jax.lax.dynamic_update_slice(c, kv[i].astype(c.dtype), (slot, 0, 0, 0))
                         for i, c in enumerate(layers))

        cache = qwen2.KVCache(per_layer(cache.k, prompt_kv.k), per_layer(cache.v, prompt_kv.v))
    row = row._replace(keys=row_keys(seed[None], row_index[None]))
    one = DecodeState(tokens=jnp.zeros((1,), jnp.int32), positions=attention_mask.sum(axis=-1).astype(jnp.int32),
                      write_index=jnp.full((1,), t, jnp.int32), step=jnp.zeros((1,), jnp.int32),
                      key_valid=jnp.pad(attention_mask, ((0, 0), (0, s - t))), done=jnp.zeros((1,), bool),
                      settings=row)
    one = _emit(one, logits)

    def put(full, part):
        return jax.lax.dynamic_update_slice(full, part.astype(full.dtype), (slot,) + (0,) * (full.ndim - 1))

    return cache, jax.tree.map(put, state, one), one.tokens[0]


def evict(state: DecodeState, slot: jax.Array) -> DecodeState:
    """Free ``slot``: the row is done and attends to nothing (a later :func:`insert` overwrites it)."""
    return state._replace(done=state.done.at[slot].set(True), key_valid=state.key_valid.at[slot].set(False))


def decode_logits(params: dict, layers: list[dict] | None, cache: Any, state: DecodeState, config: OneVisionConfig,
                  dtype, attention: str = "xla") -> tuple[Any, jax.Array, DecodeState]:
    """Feed ``state.tokens`` (one per row) at each row's write slot: the cache, float32 logits ``[B, V]`` of the
    next token, and the state advanced by one slot for live rows (its ``tokens`` not yet chosen). Done rows
    write into their (invalid) next slot and do not advance."""
    text = params["text"]
    live = ~state.done
    w = state.write_index
    b = state.tokens.shape[0]
    key_valid = state.key_valid.at[jnp.arange(b), w].max(live, mode="drop")
    x = qwen2.embed_tokens(text, state.tokens[:, None], dtype)
    if layers is None:
        hidden, cache = qwen2.decoder(text, x, state.positions[:, None], key_valid, config.text, cache, w, attention)
        logits = qwen2.lm_logits(text, hidden)[:, 0]
    else:
        cos, sin = rope_tables(state.positions[:, None], config.text.head_dim, config.text.rope_theta, dtype)
        hidden, cache = _decode_unrolled(layers, cache, x[:, 0].T, cos, sin, key_valid, w, config.text, attention)
        hidden = rms_norm(hidden, text["norm"], config.text.rms_norm_eps, axis=0)
        # the barrier keeps the [V, B] product in its fast form; the transpose after it is a small copy
        logits = jax.lax.optimization_barrier(matmul(text["lm_head_t"], hidden, jnp.float32)).T
    advance = live.astype(jnp.int32)
    state = state._replace(key_valid=key_valid, positions=state.positions + advance,
                           write_index=jnp.minimum(w + advance, key_valid.shape[1] - 1), step=state.step + advance)
    return cache, logits, state


def decode_step(params: dict, layers: list[dict] | None, cache: Any, state: DecodeState, config: OneVisionConfig,
                dtype, attention: str = "xla") -> tuple[Any, DecodeState]:
    """:func:`decode_logits`, then each row's next token (:func:`_emit`)."""
    cache, logits, state = decode_logits(params, layers, cache, state, config, dtype, attention)
    return cache, _emit(state, logits)


def decode_chunk(params: dict, layers: list[dict] | None, cache: Any, state: DecodeState, steps: int,
                 config: OneVisionConfig, dtype, attention: str = "xla"
                 ) -> tuple[Any, DecodeState, jax.Array, jax.Array]:
    """Up to ``steps`` decode steps on device (``lax.while_loop``; stops early once every row is done).

    Returns the cache, the state, the tokens ``[B, steps]`` int32 and ``emitted [B, steps]`` bool (which of
    them are new tokens of a live row).
    """
    b = state.tokens.shape[0]
    tokens = jnp.zeros((b, steps), jnp.int32)
    emitted = jnp.zeros((b, steps), bool)

    def cond(carry):
        i, _, st, _, _ = carry
        return (i < steps) & ~jnp.all(st.done)

    def body(carry):
        i, cache, st, tokens, emitted = carry
        live = ~st.done
        cache, st = decode_step(params, layers, cache, st, config, dtype, attention)
        tokens = jax.lax.dynamic_update_slice(tokens, st.tokens[:, None], (0, i))
        emitted = jax.lax.dynamic_update_slice(emitted, live[:, None], (0, i))
        return i + 1, cache, st, tokens, emitted

    _, cache, state, tokens, emitted = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, state, tokens, emitted))
    return cache, state, tokens, emitted
