"""LLaVA-OneVision device math: tower → projector → planned gather → merge → Qwen2 → hidden states.

All functions are pure in a params dict; shapes depend only on the (padded) inputs, so they jit
once per bucket. The host plan (`ov_jax.media_plan`) decides everything size-dependent. ``dtype`` is the
compute dtype: params may be stored in another (float32 master weights with a bfloat16 forward).
Logits and the loss come from the hidden states (`ov_jax.modeling.lm_head`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ov_jax.config import OneVisionConfig
from ov_jax.modeling import lm_head, qwen2, siglip
from ov_jax.modeling.layers import gelu_exact
from ov_jax.nn.linear import linear


def project(params: dict, features: jax.Array) -> jax.Array:
    """Projector: linear → exact GELU → linear."""
    return linear(gelu_exact(linear(features, params["linear_1"])), params["linear_2"])


def media_features(params: dict, tower_inputs: jax.Array, config: OneVisionConfig, dtype,
                   attention: str = "xla", remat: str | None = None) -> jax.Array:
    """Projected features of every tile and frame, ``[N, 729, H]``; ``attention``: a resolved backend name."""
    feats = siglip.vision_features(params["vision"], tower_inputs, config, dtype, attention, remat=remat)
    return project(params["projector"], feats)


def gather_media(params: dict, projected: jax.Array, tap_index: jax.Array, tap_weight: jax.Array) -> jax.Array:
    """Weighted 4-tap gather from ``[newline; projected tokens]`` → ``[B, T, H]`` (at least float32 accumulation)."""
    hidden = projected.shape[-1]
    acc = jnp.promote_types(projected.dtype, jnp.float32)
    table = jnp.concatenate([params["image_newline"].astype(projected.dtype)[None], projected.reshape(-1, hidden)])
    rows = jnp.take(table, tap_index, axis=0).astype(acc)  # [B, T, 4, H]
    return jnp.einsum("btkh,btk->bth", rows, tap_weight.astype(acc))


def merged_embeddings(params, input_ids, tower_inputs, tap_index, tap_weight, is_media, config: OneVisionConfig,
                      dtype, remat: str | None = None, attention: str = "xla"):
    """Text embeddings with every media position replaced by its packed feature row."""
    embeds = qwen2.embed_tokens(params["text"], input_ids, dtype)
    if tower_inputs.shape[0] == 0:
        return embeds
    projected = media_features(params, tower_inputs, config, dtype, attention, remat=remat)
    media = gather_media(params, projected, tap_index, tap_weight).astype(dtype)
    return jnp.where(is_media[..., None], media, embeds)


def hidden_states(params, input_ids, attention_mask, position_ids, tower_inputs, tap_index, tap_weight, is_media, *,
                  config: OneVisionConfig, dtype, segment_ids=None, remat: str | None = None,
                  attention: str = "xla") -> jax.Array:
    """Final-normed decoder hidden states ``[B, T, H]`` in ``dtype``, no cache.

    ``input_ids``, ``attention_mask`` (True/1 = real token; left or right padding), ``position_ids``: ``[B, T]``;
    ``tower_inputs [N, 3, 384, 384]``, ``tap_index`` / ``tap_weight [B, T, 4]``, ``is_media [B, T]``: the host
    media plan (`ov_jax.media_plan.build_media_plan`). ``segment_ids [B, T]`` int (optional): packed rows,
    attention causal and only within a segment, 0 = padding (positions restart per segment: the caller's
    ``position_ids``). ``remat``: a `layers.REMAT_POLICIES` name, applied to both layer scans. ``attention``: a
    resolved backend name (`ov_jax.nn.backends`) for the tower and the decoder; the ``xla`` and ``cpu`` backends
    compute causal attention by the blockwise online softmax of `ov_jax.nn.flash`: no ``T × T`` scores or mask,
    forward or backward.
    """
    embeds = merged_embeddings(params, input_ids, tower_inputs, tap_index, tap_weight, is_media, config, dtype,
                               remat=remat, attention=attention)
    hidden, _ = qwen2.decoder(params["text"], embeds, position_ids, attention_mask.astype(bool), config.text,
                              attention=attention, segment_ids=segment_ids, remat=remat)
    return hidden


def forward(params, input_ids, attention_mask, position_ids, tower_inputs, tap_index, tap_weight, is_media, *,
            config: OneVisionConfig, dtype, logits_to_keep: int | jax.Array = 0, segment_ids=None,
            remat: str | None = None, attention: str = "xla") -> jax.Array:
    """Float32 logits ``[B, K, V]`` of the positions ``logits_to_keep`` selects (`lm_head.keep_positions`;
    default all ``T``). Arguments as :func:`hidden_states`."""
    hidden = hidden_states(params, input_ids, attention_mask, position_ids, tower_inputs, tap_index, tap_weight,
                           is_media, config=config, dtype=dtype, segment_ids=segment_ids, remat=remat,
                           attention=attention)
    return lm_head.lm_logits(params["text"], lm_head.keep_positions(hidden, logits_to_keep))


def loss(params, input_ids, attention_mask, position_ids, tower_inputs, tap_index, tap_weight, is_media, labels, *,
         config: OneVisionConfig, dtype, segment_ids=None, remat: str | None = None,
         chunk_size: int = lm_head.LOSS_CHUNK, attention: str = "xla") -> tuple[jax.Array, jax.Array]:
    """``(summed next-token cross-entropy, predicted-token count)`` for ``labels [B, T]`` (-100 = no loss),
    by the chunked `lm_head.causal_lm_loss`; the mean loss is ``sum / count``. Arguments as :func:`hidden_states`."""
    hidden = hidden_states(params, input_ids, attention_mask, position_ids, tower_inputs, tap_index, tap_weight,
                           is_media, config=config, dtype=dtype, segment_ids=segment_ids, remat=remat,
                           attention=attention)
    return lm_head.causal_lm_loss(params["text"], hidden, labels, chunk_size=chunk_size)
