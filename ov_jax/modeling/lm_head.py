"""Vocabulary logits and the causal-LM loss from the decoder's hidden states.

:func:`causal_lm_loss` never holds a float32 ``[B, T, V]`` logits tensor: it scans over chunks of the
flattened ``B · T`` tokens, computing each chunk's logits, log-sum-exp and target logit, so the peak does not
grow with the batch or the sequence. Differentiated, it is a fused linear cross-entropy: the same scan also
takes each chunk's ``softmax − one-hot`` back through the head, accumulating the head's gradient and keeping
the hidden states' (``[B, T, H]``), so the backward pass only scales them: the ``[chunk, V]`` logits are
computed once per chunk, not again in the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ov_jax.nn.linear import linear, linear_transposed

IGNORE_INDEX = -100
LOSS_CHUNK = 512


def lm_logits(params: dict, hidden: jax.Array) -> jax.Array:
    """``hidden [..., H]`` (the text params' final-normed states) → float32 logits ``[..., V]``; a tied
    checkpoint reuses the embedding table. The product runs in ``hidden``'s dtype, accumulated in float32."""
    tied = "lm_head" not in params
    return _head_logits(params["embed"] if tied else params["lm_head"], hidden, tied)


def _head_logits(head, hidden: jax.Array, tied: bool) -> jax.Array:
    if tied:
        return linear_transposed(hidden, head, preferred_element_type=jnp.float32)
    return linear(hidden, head, preferred_element_type=jnp.float32)


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
    ``chunk_size`` tokens (of the flattened ``B · T``) at a time; an lm_head LoRA dropout key (training,
    `ov_jax.train.lora.with_dropout`) is folded with the chunk's index, so each chunk draws its own mask.
    """
    b, t, h = hidden.shape
    targets = shift_labels(labels.astype(jnp.int32), ignore_index).reshape(b * t)
    chunk = min(chunk_size, b * t)
    n = -(-(b * t) // chunk)
    pad = n * chunk - b * t
    hidden_chunks = jnp.pad(hidden.reshape(b * t, h), ((0, pad), (0, 0))).reshape(n, chunk, h)
    target_chunks = jnp.pad(targets, (0, pad), constant_values=ignore_index).reshape(n, chunk)
    tied = "lm_head" not in params
    leaves, treedef = jax.tree.flatten(params["embed"] if tied else params["lm_head"])
    is_float = tuple(bool(jnp.issubdtype(x.dtype, jnp.floating)) for x in leaves)
    floats = [x for x, f in zip(leaves, is_float) if f]
    others = [x for x, f in zip(leaves, is_float) if not f]  # quantized values, dropout keys: no gradient
    head = _HeadLayout(treedef, is_float, tied, ignore_index)
    total = _fused_nll(head, floats, others, hidden_chunks, target_chunks)
    return total, jnp.sum(targets != ignore_index).astype(jnp.int32)


class _HeadLayout(tuple):
    """Static description of the head leaf for :func:`_fused_nll`: ``(treedef, is_float, tied, ignore_index)``."""

    def __new__(cls, treedef, is_float, tied, ignore_index):
        return super().__new__(cls, (treedef, is_float, tied, ignore_index))

    def logits(self, floats, others, hidden_chunk, index):
        treedef, is_float, tied, _ = self
        fl, ot = iter(floats), iter(others)
        head = jax.tree.unflatten(treedef, [next(fl) if f else next(ot) for f in is_float])
        if isinstance(head, dict) and "lora_dropout_key" in head:  # chunk ``index`` draws its own dropout mask
            head = head | {"lora_dropout_key": jax.random.fold_in(head["lora_dropout_key"], index)}
        return _head_logits(head, hidden_chunk, tied)


def _chunk_terms(layout: _HeadLayout, logits: jax.Array, target_chunk: jax.Array):
    """Per chunk: the summed NLL, the valid mask, the safe target ids and the log-sum-exp ``[chunk]``."""
    valid = target_chunk != layout[3]
    safe = jnp.where(valid, target_chunk, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(valid, lse - picked, 0.0)), valid, safe, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_nll(layout, floats, others, hidden_chunks, target_chunks):
    def body(total, xs):
        logits = layout.logits(floats, others, xs[0], xs[2])  # [chunk, V] float32
        return total + _chunk_terms(layout, logits, xs[1])[0], None

    chunks = (hidden_chunks, target_chunks, jnp.arange(hidden_chunks.shape[0]))
    return jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)[0]


def _fused_nll_fwd(layout, floats, others, hidden_chunks, target_chunks):
    def body(carry, xs):
        total, g_floats = carry
        hidden_chunk, target_chunk, index = xs
        logits, pullback = jax.vjp(lambda w, x: layout.logits(w, others, x, index), floats, hidden_chunk)
        nll, valid, safe, lse = _chunk_terms(layout, logits, target_chunk)
        vocab = jnp.arange(logits.shape[-1], dtype=safe.dtype)
        d_logits = jnp.where(valid[:, None], jnp.exp(logits - lse[:, None]) - (vocab == safe[:, None]), 0.0)
        d_floats, d_hidden = pullback(d_logits)
        return (total + nll, jax.tree.map(jnp.add, g_floats, d_floats)), d_hidden

    zeros = jax.tree.map(jnp.zeros_like, floats)
    chunks = (hidden_chunks, target_chunks, jnp.arange(hidden_chunks.shape[0]))
    (total, g_floats), g_hidden = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), chunks)
    return total, (g_floats, g_hidden, others, target_chunks)


def _fused_nll_bwd(layout, residuals, d_total):
    g_floats, g_hidden, others, target_chunks = residuals
    int_zero = lambda x: jnp.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    return (jax.tree.map(lambda g: (g * d_total).astype(g.dtype), g_floats), [int_zero(x) for x in others],
            (g_hidden * d_total).astype(g_hidden.dtype), int_zero(target_chunks))


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd)


def mean_loss(total: jax.Array, count: jax.Array) -> jax.Array:
    """``total / count`` of :func:`causal_lm_loss` (0 when no token is predicted)."""
    return total / jnp.maximum(count, 1).astype(total.dtype)
