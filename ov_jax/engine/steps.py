"""Device functions of the engine: media encoding, prefill, decode. Pure functions of a params dict.

Shapes depend only on buckets. Two KV-cache layouts:

* ``"scanned"``: one ``qwen2.KVCache`` ``[L, B, S, nkv, hd]``; decode is ``qwen2.decoder`` (``lax.scan``
  over the stacked layer weights). Right for accelerators, where the scan's per-layer weight slice is free.
* ``"unrolled"``: per-layer caches ``[B, nkv, S, hd]`` and a Python loop over per-layer serving weights
  (:func:`serving_layers`: 2-D ``[out, in]`` copies, q/k/v and gate/up fused). On CPU a scan copies every
  layer's weights out of the stack on each step (measured 5x slower decode), the ``[B, S, nkv, hd]`` cache
  layout turns decode attention into slow batched matvecs, and XLA:CPU's matmuls stream ``[out, in]``
  weights fastest; the copies cost one more set of decoder weights in memory.

Prefill runs the reference path (``qwen2.decoder`` with a prompt-length cache); decode reuses the same building
blocks. Every attention goes through `ov_jax.nn.attention.attention` with the engine's backend (``attention``,
a name resolved by `ov_jax.nn.backends.resolve_attention`); the unrolled layout's heads-major cache is read
with ``kv_layout="BNSH"``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ov_jax.config import OneVisionConfig
from ov_jax.engine.sampling import SamplingMode, choose_tokens
from ov_jax.media_plan import NEWLINE_ROW
from ov_jax.modeling import llava, qwen2
from ov_jax.modeling.layers import apply_rope, rms_norm, rope_tables
from ov_jax.nn.attention import AttentionMeta
from ov_jax.nn.attention import attention as attend
from ov_jax.nn.linear import concat_matrices, has_lora, matmul, merge_leaf, serving_matrix

LAYOUTS = ("unrolled", "scanned")


class DecodeState(NamedTuple):
    """Per-batch decode state; every leaf has a bucket shape."""

    tokens: jax.Array  # [B] int32: the last emitted token (pad for finished rows)
    positions: jax.Array  # [B] int32: RoPE position of ``tokens`` when fed back
    key_valid: jax.Array  # [B, S] bool: cache slots a query may attend to
    done: jax.Array  # [B] bool: row has emitted a stop token (or is batch padding)
    write_index: jax.Array  # [] int32: cache slot of the next fed token
    step: jax.Array  # [] int32: index of ``tokens`` among the new tokens


class TokenRules(NamedTuple):
    """Traced generation settings (changing them never recompiles)."""

    stop_ids: jax.Array  # [MAX_STOP_IDS] int32, -1 = unused
    pad_id: jax.Array  # [] int32
    temperature: jax.Array  # [] float32
    top_p_threshold: jax.Array  # [] float32: 1 - top_p as torch rounds it
    seed: jax.Array  # [] uint32


MAX_STOP_IDS = 16


# --- params in serving layout ------------------------------------------------------------------------------


def serving_layer(lp: dict) -> dict:
    """One decoder layer's weights as 2-D ``[out, in]`` matrices, q/k/v and gate/up fused.

    XLA:CPU streams a weight fastest when it contracts over its contiguous axis, and at batch > 1 when it is
    the left operand (measured on the 0.5B shapes, 2 AVX2 cores: GEMV 1.3x, batch-8 GEMM 1.6-1.8x faster
    than the ``[in, out]`` kernels); fusing halves the number of weight streams per layer. Quantized weights
    stay quantized (`ov_jax.nn.linear.serving_matrix`); LoRA adapters are folded in.
    """
    qkv = concat_matrices([serving_matrix(lp[n]) for n in ("q", "k", "v")])
    qkv_bias = jnp.concatenate([lp[n]["bias"].reshape(-1) for n in ("q", "k", "v")])
    return {
        "input_norm": lp["input_norm"], "post_norm": lp["post_norm"],
        "qkv": {"weight": qkv, "bias": qkv_bias},
        "o": {"weight": serving_matrix(lp["o"], n_in=2)},
        "gate_up": {"weight": concat_matrices([serving_matrix(lp["gate"]), serving_matrix(lp["up"])])},
        "down": {"weight": serving_matrix(lp["down"])},
    }


def serving_layers(stacked: dict) -> list[dict]:
    """Per-layer :func:`serving_layer` copies of the stacked ``[L, ...]`` decoder weights, built one layer at a
    time (peak extra memory: one layer). Shardings follow the inputs' (XLA propagates them)."""
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    build = jax.jit(lambda tree, i: serving_layer(jax.tree.map(lambda a: a[i], tree)))
    return [build(stacked, np.int32(i)) for i in range(num_layers)]


def serving_lm_head(text: dict) -> Any:
    """The ``[V, H]`` output matrix for decode (a `ov_jax.nn.linear.serving_matrix`): the embedding when tied,
    else the lm_head kernel transposed; quantized weights stay quantized."""
    if "lm_head" in text:
        return jax.jit(serving_matrix)(text["lm_head"])
    return jax.jit(merge_leaf)(text["embed"]) if has_lora(text["embed"]) else text["embed"]


# --- media -------------------------------------------------------------------------------------------------


def media_start(params: dict, tap_index: jax.Array, tap_weight: jax.Array) -> jax.Array:
    """Float32 media rows ``[B, T, H]`` holding only the newline taps; tiles are added chunk by chunk."""
    weight = jnp.where(tap_index == NEWLINE_ROW, tap_weight, 0.0).sum(-1)
    return weight[..., None] * params["image_newline"].astype(jnp.float32)


def encode_tiles(params: dict, tiles: jax.Array, config: OneVisionConfig, dtype, attention: str = "xla"
                 ) -> jax.Array:
    """Projected tower features of a chunk of tiles/frames, flattened to rows ``[C·729, H]``."""
    feats = llava.media_features(params, tiles, config, dtype, attention)
    return feats.reshape(-1, feats.shape[-1])


def media_add(rows: jax.Array, features: jax.Array, tap_index: jax.Array, tap_weight: jax.Array,
              first_tile: jax.Array, tokens_per_tile: int) -> jax.Array:
    """Add the taps that read this chunk's feature rows (tiles ``first_tile …``) into ``rows``."""
    local = tap_index - 1 - first_tile * tokens_per_tile
    inside = (tap_index != NEWLINE_ROW) & (local >= 0) & (local < features.shape[0])
    gathered = jnp.take(features, jnp.clip(local, 0, features.shape[0] - 1), axis=0).astype(jnp.float32)
    weight = jnp.where(inside, tap_weight, 0.0)
    return rows + jnp.einsum("btkh,btk->bth", gathered, weight)


# --- prefill -----------------------------------------------------------------------------------------------

def prefill(params: dict, input_ids: jax.Array, attention_mask: jax.Array, media_rows: jax.Array,
            is_media: jax.Array, config: OneVisionConfig, dtype, attention: str = "xla"
            ) -> tuple[jax.Array, qwen2.KVCache]:
    """Prompt → float32 logits of the last slot ``[B, V]`` and the prompt's KV ``[L, B, T, nkv, hd]``.

    Left padding puts every row's last token in the last slot. Positions are ``cumsum(mask) - 1`` (pads 0).
    """
    text = params["text"]
    embeds = qwen2.embed_tokens(text, input_ids, dtype)
    embeds = jnp.where(is_media[..., None], media_rows.astype(dtype), embeds)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
    b, t = input_ids.shape
    cache = qwen2.init_cache(config.text, b, t, dtype)
    hidden, cache = qwen2.decoder(text, embeds, positions, attention_mask, config.text, cache, 0, attention)
    return qwen2.lm_logits(text, hidden[:, -1:])[:, 0], cache


def start_decode(prompt_kv: qwen2.KVCache, logits: jax.Array, attention_mask: jax.Array, rules: TokenRules,
                 mode: SamplingMode, cache_length: int, layout: str) -> tuple[Any, DecodeState]:
    """Choose the first token and move the prompt's KV into a ``cache_length`` cache of ``layout``."""
    b, t = attention_mask.shape
    pad = cache_length - t
    if layout == "scanned":
        widths = ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))
        cache = qwen2.KVCache(jnp.pad(prompt_kv.k, widths), jnp.pad(prompt_kv.v, widths))
    else:
        def per_layer(x):  # [L, B, T, nkv, hd] -> L x [B, nkv, S, hd]
            x = jnp.pad(x.transpose(0, 1, 3, 2, 4), ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
            return tuple(x[i] for i in range(x.shape[0]))

        cache = qwen2.KVCache(per_layer(prompt_kv.k), per_layer(prompt_kv.v))
    row_valid = attention_mask.any(axis=-1)
    state = DecodeState(
        tokens=jnp.zeros((b,), jnp.int32),
        positions=attention_mask.sum(axis=-1).astype(jnp.int32),
        key_valid=jnp.pad(attention_mask, ((0, 0), (0, pad))),
        done=~row_valid,
        write_index=jnp.int32(t),
        step=jnp.int32(0),
    )
    return cache, _emit(state, logits, rules, mode)


def _emit(state: DecodeState, logits: jax.Array, rules: TokenRules, mode: SamplingMode) -> DecodeState:
    """Choose this step's tokens; finished rows emit pad; a stop token finishes its row (and is kept)."""
    chosen = choose_tokens(logits, mode, rules.temperature, rules.top_p_threshold, rules.seed, state.step)
    tokens = jnp.where(state.done, rules.pad_id, chosen)
    stopped = (chosen[:, None] == rules.stop_ids[None, :]).any(axis=-1)
    return state._replace(tokens=tokens, done=state.done | stopped)


# --- decode ------------------------------------------------------------------------------------------------




def _decode_unrolled(layers: list[dict], cache: qwen2.KVCache, x: jax.Array, cos, sin, key_valid: jax.Array,
                     write_index: jax.Array, config, backend: str) -> tuple[jax.Array, qwen2.KVCache]:
    """All decoder layers for one token per row on :func:`serving_layers` weights.

    Activations are feature-major, ``x [H, B]``, so every weight product is ``W @ x`` with no transpose of
    its output (layout assignment would fold one back into the product and undo the faster form)."""
    eps, b = config.rms_norm_eps, x.shape[1]
    nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    meta = AttentionMeta(causal=True, key_valid=key_valid, write_index=write_index, kv_layout="BNSH")
    new_k, new_v = [], []
    for lp, ck, cv in zip(layers, cache.k, cache.v):
        h = rms_norm(x, lp["input_norm"], eps, axis=0)
        qkv = matmul(lp["qkv"]["weight"], h) + lp["qkv"]["bias"].astype(h.dtype)[:, None]
        q, k, v = (part.reshape(-1, hd, b).transpose(2, 0, 1)  # [B, heads, hd]
                   for part in jnp.split(qkv, [nh * hd, (nh + nkv) * hd], axis=0))
        q = apply_rope(q[:, None], cos, sin)
        k = apply_rope(k[:, None], cos, sin)
        slot = (0, 0, write_index, 0)
        ck = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3).astype(ck.dtype), slot)
        cv = jax.lax.dynamic_update_slice(cv, v[:, :, None].astype(cv.dtype), slot)
        attended = attend(q, ck.astype(q.dtype), cv.astype(q.dtype), meta, backend)
        x = x + matmul(lp["o"]["weight"], attended.reshape(b, nh * hd).T)
        h = rms_norm(x, lp["post_norm"], eps, axis=0)
        gate, up = jnp.split(matmul(lp["gate_up"]["weight"], h), 2, axis=0)
        x = x + matmul(lp["down"]["weight"], jax.nn.silu(gate) * up)
        new_k.append(ck)
        new_v.append(cv)
    return x, qwen2.KVCache(tuple(new_k), tuple(new_v))


def decode_logits(params: dict, layers: list[dict] | None, cache: Any, state: DecodeState, config: OneVisionConfig,
                  dtype, attention: str = "xla") -> tuple[Any, jax.Array, DecodeState]:
    """Feed ``state.tokens`` (one per row) and write their KV at ``write_index``: the cache, float32 logits
    ``[B, V]`` of the next token, and the state advanced by one slot (its ``tokens`` not yet chosen)."""
    text = params["text"]
    w = state.write_index
    key_valid = jax.lax.dynamic_update_slice(state.key_valid, jnp.ones((state.tokens.shape[0], 1), bool), (0, w))
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
    state = state._replace(key_valid=key_valid, positions=state.positions + 1, write_index=w + 1,
                           step=state.step + 1)
    return cache, logits, state


def decode_step(params: dict, layers: list[dict] | None, cache: Any, state: DecodeState, rules: TokenRules,
                mode: SamplingMode, config: OneVisionConfig, dtype, attention: str = "xla") -> tuple[Any, DecodeState]:
    """Feed ``state.tokens`` (one per row), write their KV at ``write_index``, emit the next tokens."""
    cache, logits, state = decode_logits(params, layers, cache, state, config, dtype, attention)
    return cache, _emit(state, logits, rules, mode)


def decode_loop(params: dict, layers: list[dict] | None, cache: Any, state: DecodeState, rules: TokenRules,
                max_new_tokens: jax.Array, mode: SamplingMode, config: OneVisionConfig, dtype, attention: str = "xla"
                ) -> tuple[Any, DecodeState, jax.Array]:
    """Decode on device (``lax.while_loop``) until every row is done or ``max_new_tokens`` tokens exist.

    Returns the cache, the final state and the new tokens ``[B, S]`` (columns past the last step = pad).
    """
    b, s = state.key_valid.shape
    out = jnp.full((b, s), rules.pad_id, jnp.int32).at[:, 0].set(state.tokens)

    def cond(carry):
        _, st, _ = carry
        return (st.step + 1 < max_new_tokens) & ~jnp.all(st.done)

    def body(carry):
        cache, st, out = carry
        cache, st = decode_step(params, layers, cache, st, rules, mode, config, dtype, attention)
        out = jax.lax.dynamic_update_slice(out, st.tokens[:, None], (0, st.step))
        return cache, st, out

    return jax.lax.while_loop(cond, body, (cache, state, out))
