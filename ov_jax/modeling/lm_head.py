"""Vocabulary logits and the causal-LM loss from the decoder's hidden states.

:func:`causal_lm_loss` never holds a float32 ``[B, T, V]`` logits tensor: it scans over chunks of positions,
computing each chunk's logits, log-sum-exp and target logit, and the chunk is rematerialised in the backward
pass, so the gradient too only ever holds one chunk's ``[chunk, V]`` logits. Chunks are taken over the
flattened ``B · T`` tokens, so the peak does not grow with the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ov_jax.nn.linear import linear, linear_transposed

IGNORE_INDEX = -100
LOSS_CHUNK = 512


def lm_logits(params: dict, hidden: jax.Array) -> jax.Array:
    """``hidden [..., H]`` (the text params' final-normed states) → float32 logits ``[..., V]``; a tied
    checkpoint reuses the embedding table. The product runs in ``hidden``'s dtype, accumulated in float32."""
    if "lm_head" in params:
        return linear(hidden, params["lm_head"], preferred_element_type=jnp.float32)
    return linear_transposed(hidden, params["embed"], preferred_element_type=jnp.float32)


def keep_positions(hidden: jax.Array, logits_to_keep: int | jax.Array = 0) -> jax.Array:
    """transformers' ``logits_to_keep`` on ``hidden [B, T, H]``: an int keeps the last that many positions
    (0 = all), an integer index array ``[K]`` keeps those positions."""
    if isinstance(logits_to_keep, int):
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
        return hidden[:, -logits_to_keep:] if logits_to_keep else hidden
    return jnp.take(hidden, logits_to_keep, axis=1)


def shift_labels(labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """``labels [B, T]`` → the target of every position ``[B, T]``: the next label, ``ignore_index`` last
    (transformers' ``ForCausalLMLoss`` shift)."""
    return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], ignore_index)], axis=1)


def causal_lm_loss(params: dict, hidden: jax.Array, labels: jax.Array, *, ignore_index: int = IGNORE_INDEX,
                   chunk_size: int = LOSS_CHUNK) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of predicted tokens, ``(sum float32 [], count int32 [])``.

    ``params``: the text params (``embed`` / ``lm_head``); ``hidden [B, T, H]``: final-normed hidden states;
    ``labels [B, T]`` int, ``ignore_index`` where no loss is taken. Position ``t`` predicts ``labels[t + 1]``,
    as transformers' ``ForCausalLMLoss``; its mean loss is ``sum / count``. Logits are float32, computed
    ``chunk_size`` tokens (of the flattened ``B · T``) at a time.
    """
    b, t, h = hidden.shape
    targets = shift_labels(labels.astype(jnp.int32), ignore_index).reshape(b * t)
    hidden = hidden.reshape(b * t, h)
    chunk = min(chunk_size, b * t)
    n = -(-(b * t) // chunk)
    pad = n * chunk - b * t
    hidden_chunks = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(n, chunk, h)
    target_chunks = jnp.pad(targets, (0, pad), constant_values=ignore_index).reshape(n, chunk)

    @jax.checkpoint
    def chunk_loss(params, hidden_chunk, target_chunk):
        logits = lm_logits(params, hidden_chunk)  # [chunk, V] float32
        valid = target_chunk != ignore_index
        picked = jnp.take_along_axis(logits, jnp.where(valid, target_chunk, 0)[:, None], axis=-1)[:, 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - picked
        return jnp.sum(jnp.where(valid, nll, 0.0))

    def body(total, xs):
        return total + chunk_loss(params, *xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden_chunks, target_chunks))
    return total, jnp.sum(targets != ignore_index).astype(jnp.int32)


def mean_loss(total: jax.Array, count: jax.Array) -> jax.Array:
    """``total / count`` of :func:`causal_lm_loss` (0 when no token is predicted)."""
    return total / jnp.maximum(count, 1).astype(total.dtype)
