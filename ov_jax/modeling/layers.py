"""Building blocks shared by the vision tower and the language model.

Pure functions of plain arrays. Every weight product goes through `ov_jax.nn.linear`. Norm statistics and
softmax run in float32 whatever the activation dtype, as in the reference.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = float(jnp.finfo(jnp.float32).min)


def layer_norm(x: jax.Array, p: dict, eps: float) -> jax.Array:
    """Affine LayerNorm with biased variance; statistics in float32, output in the input dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(x: jax.Array, p: dict, eps: float, axis: int = -1) -> jax.Array:
    """Qwen2 RMSNorm over ``axis`` (the features; 0 for feature-major ``[H, B]``): normalise in float32,
    cast back, then multiply by the weight."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis, keepdims=True) + eps)
    scale_shape = [1] * x.ndim
    scale_shape[axis] = -1
    return p["scale"].astype(x.dtype).reshape(scale_shape) * y.astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """Half-split (NeoX) RoPE cos/sin ``[B, T, head_dim]``: float32 angles, cast to the activation dtype.

    The inverse frequencies are a host constant computed as torch does (float32 power): XLA's fused
    in-graph power is a few ulp off, which position ~6k turns into 1e-4 logit errors.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x [B, T, heads, hd]`` rotated with ``rotate_half`` (not interleaved pairs)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Grouped-query attention.

    ``q [B, T, nh, hd]``, ``k``/``v`` ``[B, S, nkv, hd]``; query head ``h`` reads kv head
    ``h // (nh // nkv)``. ``mask [B, T, S]`` (True = may attend) or None. Scores and softmax in
    float32, the result cast back to the query dtype. Returns ``[B, T, nh, hd]``.
    """
    b, t, nh, hd = q.shape
    nkv = k.shape[2]
    qg = q.reshape(b, t, nkv, nh // nkv, hd)
    scores = jnp.einsum("btngd,bsnd->bngts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd))
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bngts,bsnd->btngd", probs, v)
    return out.reshape(b, t, nh, hd)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_layer(body: Callable, policy: str | None) -> Callable:
    """``body`` of a layer scan under ``jax.checkpoint`` with a named policy (:data:`REMAT_POLICIES`):
    ``"none"`` / None keeps every activation for the backward pass, ``"full"`` keeps only each layer's input
    and recomputes the rest, ``"dots_saveable"`` keeps the matmul outputs. Forward values are identical."""
    if policy is None or policy == "none":
        return body
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} is not one of {sorted(REMAT_POLICIES)}")
    return jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=False)
