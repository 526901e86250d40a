"""The one place a weight is used: plain kernels and kernels with LoRA adapters.

A *weight leaf* is either a plain array (the embedding table ``text.embed``) or a dict:

* ``kernel [*in, *out]`` — the base weight (stacked weights carry a leading ``[L]`` that ``lax.scan``
  slices off before it reaches these helpers);
* ``bias [*out]`` — optional;
* ``lora_a [*in, r]``, ``lora_b [r, *out]``, ``lora_scale []`` — optional LoRA adapters
  (``y += lora_scale · (x · lora_a) · lora_b``; ``lora_scale`` = alpha / r is a constant: its gradient is
  stopped here, and it is excluded from training by `ov_jax.nn.lora.is_adapter`);
* ``lora_dropout_key [2]``, ``lora_dropout_rate []`` — training only (`ov_jax.train.lora.with_dropout`):
  the adapter's input is dropped with that rate (inverted dropout), as PEFT's ``lora_dropout``.

Every product with a weight goes through :func:`linear` (or :func:`linear_transposed` / :func:`embed_rows`
for a ``[V, H]`` table), and every read of a base kernel through :func:`kernel_of`, so a new leaf form
(e.g. quantized values + scales) is handled here without touching call sites. The ``dtype`` argument is
the compute dtype: weights are cast to it inside the product, so float32 master weights can run a
bfloat16 forward.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

LORA_KEYS = ("lora_a", "lora_b", "lora_scale")

Weight = Any  # jax.Array | dict[str, jax.Array]


def kernel_of(p: Weight, dtype=None) -> jax.Array:
    """The base kernel of a weight leaf (LoRA adapters not included), cast to ``dtype`` when given."""
    kernel = p["kernel"] if isinstance(p, dict) else p
    return kernel if dtype is None else kernel.astype(dtype)


def has_lora(p: Weight) -> bool:
    return isinstance(p, dict) and "lora_a" in p


def _lora_scale(p: dict, dtype) -> jax.Array:
    return jax.lax.stop_gradient(p["lora_scale"]).astype(dtype)


def linear(x: jax.Array, p: Weight, *, n_in: int = 1, dtype=None, preferred_element_type=None) -> jax.Array:
    """``x [..., *in] · kernel [*in, *out] (+ bias) (+ LoRA)`` → ``[..., *out]``.

    ``n_in``: how many trailing axes of ``x`` (and leading axes of the kernel) are contracted.
    ``dtype``: compute dtype (default ``x.dtype``); ``x``, the kernel, the bias and the adapters are cast to it.
    ``preferred_element_type``: accumulation / output dtype of the base product (e.g. float32 logits).
    """
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    x_axes = list(range(x.ndim - n_in, x.ndim))
    k_axes = list(range(n_in))
    y = jax.lax.dot_general(x, kernel_of(p, dtype), ((x_axes, k_axes), ((), ())),
                            preferred_element_type=preferred_element_type)
    if isinstance(p, dict):
        if "bias" in p:
            y = y + p["bias"].astype(y.dtype)
        if "lora_a" in p:
            a, b = p["lora_a"].astype(dtype), p["lora_b"].astype(dtype)
            x_lora = x
            if "lora_dropout_key" in p:
                keep = 1.0 - p["lora_dropout_rate"]
                kept = jax.random.bernoulli(p["lora_dropout_key"], keep, x.shape)
                x_lora = jnp.where(kept, x / keep.astype(dtype), 0).astype(dtype)
            low = jax.lax.dot_general(x_lora, a, ((x_axes, k_axes), ((), ())))
            delta = jnp.tensordot(low, b, axes=[[low.ndim - 1], [0]]) * _lora_scale(p, dtype)
            y = y + delta.astype(y.dtype)
    return y


def linear_transposed(x: jax.Array, p: Weight, *, dtype=None, preferred_element_type=None) -> jax.Array:
    """``x [..., H]`` against a ``[V, H]`` table used as an output projection (the tied lm_head) → ``[..., V]``."""
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    y = jax.lax.dot_general(x, kernel_of(p, dtype), (([x.ndim - 1], [1]), ((), ())),
                            preferred_element_type=preferred_element_type)
    if has_lora(p):  # table = kernel + s · a [V, r] · b [r, H]
        a, b = p["lora_a"].astype(dtype), p["lora_b"].astype(dtype)
        low = jax.lax.dot_general(x, b, (([x.ndim - 1], [1]), ((), ())))
        y = y + (jnp.tensordot(low, a, axes=[[low.ndim - 1], [1]]) * _lora_scale(p, dtype)).astype(y.dtype)
    return y


def embed_rows(p: Weight, ids: jax.Array, dtype) -> jax.Array:
    """Rows ``ids`` of a ``[V, H]`` table (the token embedding) → ``[*ids.shape, H]`` in ``dtype``."""
    rows = jnp.take(kernel_of(p), ids, axis=0).astype(dtype)
    if has_lora(p):
        low = jnp.take(p["lora_a"], ids, axis=0).astype(dtype)
        rows = rows + jnp.tensordot(low, p["lora_b"].astype(dtype), axes=[[low.ndim - 1], [0]]) * _lora_scale(p, dtype)
    return rows


def merged_kernel(p: Weight) -> jax.Array:
    """The kernel with its LoRA delta folded in (``kernel + lora_scale · a · b``), in the kernel's dtype.

    Works on stacked leaves (a leading layer axis on every array, ``lora_scale [L]``)."""
    kernel = kernel_of(p)
    if not has_lora(p):
        return kernel
    a, b = p["lora_a"].astype(jnp.float32), p["lora_b"].astype(jnp.float32)
    stacked = p["lora_scale"].ndim == 1
    if stacked:
        delta = jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]),
                           b.reshape(b.shape[0], b.shape[1], -1))
        scale = p["lora_scale"].astype(jnp.float32).reshape((-1,) + (1,) * (delta.ndim - 1))
    else:
        delta = a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)
        scale = p["lora_scale"].astype(jnp.float32)
    delta = (delta * scale).reshape(kernel.shape)
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def merge_leaf(p: Weight) -> Weight:
    """A weight leaf without adapters: the LoRA delta folded into the kernel (other leaves unchanged)."""
    if not has_lora(p):
        return p
    merged = {k: v for k, v in p.items() if k not in LORA_KEYS}
    merged["kernel"] = merged_kernel(p)
    return merged
