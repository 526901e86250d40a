"""Device functions of the engine: media encoding, prefill, decode. Pure functions of a params dict.

Shapes depend only on buckets. Two KV-cache layouts:

* ``"scanned"``: one ``qwen2.KVCache`` ``[L, B, S, nkv, hd]``; decode is ``qwen2.decoder`` (``lax.scan``
  over the stacked layer weights). Right for accelerators, where the scan's per-layer weight slice is free.
* ``"unrolled"``: per-layer caches ``[B, nkv, S, hd]`` and a Python loop over per-layer serving weights
  (:func:`serving_layers`: 2-D ``[out, in]`` copies, q/k/v and gate/up fused). On CPU a scan copies every
  layer's weights out of the stack on each step (measured 5x slower decode), the ``[B, S, nkv, hd]`` cache
  layout turns decode attention into slow batched matvecs, and XLA:CPU's matmuls stream ``[out, in]``
  weights fastest; the copies cost one more set of decoder weights in memory.

Prefill runs the reference path (``qwen2.decoder`` with a prompt-length cache), in one call or chunk by chunk
into that cache (:func:`prefill_chunk`); decode reuses the same building blocks. Every attention goes through
`ov_jax.nn.attention.attention` with the engine's backend (``attention``, a name resolved by
`ov_jax.nn.backends.resolve_attention`); the unrolled layout's heads-major cache is read with
``kv_layout="BNSH"``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ov_jax.config import OneVisionConfig
from ov_jax.media_plan import NEWLINE_ROW
from ov_jax.modeling import llava, qwen2
from ov_jax.modeling.layers import apply_rope, rms_norm, rope_tables
from ov_jax.nn.attention import AttentionMeta
from ov_jax.nn.attention import attention as attend
from ov_jax.nn.linear import concat_matrices, has_lora, matmul, serving_matrix, serving_table

LAYOUTS = ("unrolled", "scanned")


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
    return jax.jit(serving_table)(text["embed"]) if has_lora(text["embed"]) else text["embed"]


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

def prompt_embeds(text: dict, input_ids: jax.Array, media_rows: jax.Array, is_media: jax.Array, dtype) -> jax.Array:
    """Token embeddings ``[B, T, H]`` with the media rows in the media slots."""
    embeds = qwen2.embed_tokens(text, input_ids, dtype)
    return jnp.where(is_media[..., None], media_rows.astype(dtype), embeds)


def prompt_positions(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions ``[B, T]`` int32 of a left-padded prompt: ``cumsum(mask) - 1`` (pads 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def prefill(params: dict, input_ids: jax.Array, attention_mask: jax.Array, media_rows: jax.Array,
            is_media: jax.Array, config: OneVisionConfig, dtype, attention: str = "xla"
            ) -> tuple[jax.Array, qwen2.KVCache]:
    """Prompt → float32 logits of the last slot ``[B, V]`` and the prompt's KV ``[L, B, T, nkv, hd]``.

    Left padding puts every row's last token in the last slot.
    """
    text = params["text"]
    embeds = prompt_embeds(text, input_ids, media_rows, is_media, dtype)
    b, t = input_ids.shape
    cache = qwen2.init_cache(config.text, b, t, dtype)
    hidden, cache = qwen2.decoder(text, embeds, prompt_positions(attention_mask), attention_mask, config.text, cache,
                                  0, attention)
    return qwen2.lm_logits(text, hidden[:, -1:])[:, 0], cache


def prefill_chunk(params: dict, kv: qwen2.KVCache, input_ids: jax.Array, attention_mask: jax.Array,
                  media_rows: jax.Array, is_media: jax.Array, start: jax.Array, chunk: int, config: OneVisionConfig,
                  dtype, attention: str = "xla") -> tuple[jax.Array, qwen2.KVCache]:
    """Prompt slots ``start … start + chunk - 1`` into the prompt's KV ``kv [L, B, T, nkv, hd]`` (the slots
    before ``start`` already written): float32 logits of the chunk's last slot ``[B, V]`` and the KV.

    ``input_ids``, ``attention_mask``, ``media_rows``, ``is_media`` are the whole ``T``-slot prompt (as for
    :func:`prefill`); ``start`` is an int32 scalar with ``start + chunk <= T``. The chunk's queries attend
    causally to the valid slots of ``kv`` (a cached attention at write position ``start``), so running the
    chunks in order equals :func:`prefill`; the last chunk's logits are its last-slot logits.
    """
    text = params["text"]

    def part(x):
        return jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)

    embeds = prompt_embeds(text, part(input_ids), part(media_rows), part(is_media), dtype)
    positions = part(prompt_positions(attention_mask))
    hidden, kv = qwen2.decoder(text, embeds, positions, attention_mask, config.text, kv, start, attention)
    return qwen2.lm_logits(text, hidden[:, -1:])[:, 0], kv


# --- decode ------------------------------------------------------------------------------------------------




def _decode_unrolled(layers: list[dict], cache: qwen2.KVCache, x: jax.Array, cos, sin, key_valid: jax.Array,
                     write_index: jax.Array, config, backend: str) -> tuple[jax.Array, qwen2.KVCache]:
    """All decoder layers for one token per row on :func:`serving_layers` weights; row ``i`` writes its
    key/value at cache slot ``write_index[i]``.

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
        rows = jnp.arange(b)
        ck = ck.at[rows, :, write_index].set(k[:, 0].astype(ck.dtype))
        cv = cv.at[rows, :, write_index].set(v.astype(cv.dtype))
        attended = attend(q, ck.astype(q.dtype), cv.astype(q.dtype), meta, backend)
        x = x + matmul(lp["o"]["weight"], attended.reshape(b, nh * hd).T)
        h = rms_norm(x, lp["post_norm"], eps, axis=0)
        gate, up = jnp.split(matmul(lp["gate_up"]["weight"], h), 2, axis=0)
        x = x + matmul(lp["down"]["weight"], jax.nn.silu(gate) * up)
        new_k.append(ck)
        new_v.append(cv)
    return x, qwen2.KVCache(tuple(new_k), tuple(new_v))
