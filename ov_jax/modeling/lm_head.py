"""Vocabulary logits and the causal-LM loss from the decoder's hidden states.

:func:`causal_lm_loss` never holds a float32 ``[B, T, V]`` logits tensor: it scans over chunks of positions,
computing each chunk's logits, log-sum-exp and target logit, and the chunk is rematerialised in the backward
pass, so the gradient too only ever holds one chunk's ``[B, chunk, V]`` logits.
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
    ``chunk_size`` positions at a time (an lm_head LoRA dropout key is folded with the chunk's index).
    """
    b, t, h = hidden.shape
    targets = shift_labels(labels.astype(jnp.int32), ignore_index)
    chunk = min(chunk_size, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=ignore_index)
    hidden_chunks = hidden.reshape(b, n, chunk, h).swapaxes(0, 1)
    target_chunks = targets.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_loss(params, hidden_chunk, target_chunk, index):
        logits = lm_logits(_chunk_dropout(params, index), hidden_chunk)  # [B, chunk, V] float32
        valid = target_chunk != ignore_index
        picked = jnp.take_along_axis(logits, jnp.where(valid, target_chunk, 0)[..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - picked
        return jnp.sum(jnp.where(valid, nll, 0.0))

    def body(total, xs):
        return total + chunk_loss(params, *xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden_chunks, target_chunks, jnp.arange(n)))
    return total, jnp.sum(targets != ignore_index).astype(jnp.int32)


def _chunk_dropout(params: dict, index: jax.Array) -> dict:
    """``params`` with the lm_head's LoRA dropout key (training, `ov_jax.train.lora.with_dropout`) folded with the
    loss chunk's ``index``, so each chunk of positions draws its own mask."""
    head = params.get("lm_head")
    if not isinstance(head, dict) or "lora_dropout_key" not in head:
        return params
    return params | {"lm_head": head | {"lora_dropout_key": jax.random.fold_in(head["lora_dropout_key"], index)}}


def mean_loss(total: jax.Array, count: jax.Array) -> jax.Array:
    """``total / count`` of :func:`causal_lm_loss` (0 when no token is predicted)."""
    return total / jnp.maximum(count, 1).astype(total.dtype)
