"""The one place a weight is used: plain kernels, quantized kernels and kernels with LoRA adapters.

A *weight leaf* is either a plain array (the embedding table ``text.embed``) or a dict:

* ``kernel [*in, *out]`` — the base weight (stacked weights carry a leading ``[L]`` that ``lax.scan``
  slices off before it reaches these helpers);
* ``kernel_scale [G, *out]`` — present when the kernel is quantized (`ov_jax.nn.quant`): ``kernel`` then
  holds int8 values, or uint8 bytes packing two int4 values along the last input axis, and the weight is
  ``(values - zero) · scale`` with one scale per output channel and group of ``N / G`` consecutive features
  of the flattened input (``N``); ``kernel_zero [G, *out]`` (int4; float holding integers) is the zero
  point, 0 when absent (int8). A quantized ``[V, H]`` table (the embedding) holds ``kernel [V, H or H/2]``,
  ``kernel_scale [V, G]`` and ``kernel_zero [V, G]`` (groups along H). Weights are dequantized inside each
  product, never stored as float; int8 (``G = 1``) applies its scale to the product's output instead;
* ``bias [*out]`` — optional;
* ``lora_a [*in, r]``, ``lora_b [r, *out]``, ``lora_scale []`` — optional LoRA adapters
  (``y += lora_scale · (x · lora_a) · lora_b``; ``lora_scale`` = alpha / r is a constant: its gradient is
  stopped here, and it is excluded from training by `ov_jax.nn.lora.is_adapter`);
* ``lora_dropout_key [2]``, ``lora_dropout_rate []`` — training only (`ov_jax.train.lora.with_dropout`):
  the adapter's input is dropped with that rate (inverted dropout), as PEFT's ``lora_dropout``; only
  :func:`linear` reads them (an embedding table's adapters take no dropout, as PEFT's LoRA ``Embedding``).

Every product with a weight goes through :func:`linear` (or :func:`linear_transposed` / :func:`embed_rows`
for a ``[V, H]`` table; :func:`matmul` for a 2-D ``[out, in]`` serving matrix, :func:`serving_matrix`),
and every read of a base kernel through :func:`kernel_of` / :func:`table_of`, so a leaf form is handled here
without touching call sites. The ``dtype`` argument is
the compute dtype: weights are cast to it inside the product, so float32 master weights can run a
bfloat16 forward.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

LORA_KEYS = ("lora_a", "lora_b", "lora_scale")

Weight = Any  # jax.Array | dict[str, jax.Array]


def is_quantized(p: Weight) -> bool:
    return isinstance(p, dict) and "kernel_scale" in p


def unpack_int4(packed: jax.Array, axis: int) -> jax.Array:
    """uint8 bytes holding two int4 values (low nibble first) along ``axis`` → int8 values, ``axis`` doubled."""
    signed = jax.lax.bitcast_convert_type(packed, jnp.int8)
    low = jax.lax.shift_right_arithmetic(jax.lax.shift_left(signed, jnp.int8(4)), jnp.int8(4))
    high = jax.lax.shift_right_arithmetic(signed, jnp.int8(4))
    axis = axis % packed.ndim
    pairs = jnp.stack([low, high], axis=axis + 1)
    return pairs.reshape(packed.shape[:axis] + (2 * packed.shape[axis],) + packed.shape[axis + 1:])


def _values(p: dict, axis: int) -> jax.Array:
    """The int8 values of a quantized leaf (int4 bytes unpacked along ``axis``)."""
    values = p["kernel"]
    return unpack_int4(values, axis) if values.dtype == jnp.uint8 else values


def _dequantize_rows(values: jax.Array, scale: jax.Array, zero: jax.Array | None, dtype) -> jax.Array:
    """``values [..., N]`` int8 with ``scale [..., G]`` and ``zero [..., G]`` or None (groups of ``N / G`` along
    the last axis) → ``dtype``."""
    groups = scale.shape[-1]
    grouped = values.reshape(values.shape[:-1] + (groups, -1)).astype(dtype)
    if zero is not None:
        grouped = grouped - zero.astype(dtype)[..., None]
    return (grouped * scale.astype(dtype)[..., None]).reshape(values.shape)


def kernel_of(p: Weight, dtype=None) -> jax.Array:
    """The base kernel ``[*in, *out]`` of an unstacked weight leaf (LoRA adapters not included), cast to
    ``dtype`` when given; a quantized kernel is dequantized (to ``dtype``, default float32)."""
    if is_quantized(p):
        dtype = dtype or jnp.float32
        scale = p["kernel_scale"]
        n_out = scale.ndim - 1
        n_in = p["kernel"].ndim - n_out
        values = _values(p, n_in - 1)
        shape = values.shape
        grouped = values.reshape((scale.shape[0], -1) + shape[n_in:]).astype(dtype)
        if "kernel_zero" in p:
            grouped = grouped - p["kernel_zero"].astype(dtype)[:, None]
        return (grouped * scale.astype(dtype)[:, None]).reshape(shape)
    kernel = p["kernel"] if isinstance(p, dict) else p
    return kernel if dtype is None else kernel.astype(dtype)


def table_of(p: Weight, dtype=None) -> jax.Array:
    """A ``[rows, N]`` table (the embedding, a serving matrix) without adapters, dequantized when quantized
    (to ``dtype``, default float32), else cast to ``dtype`` when given."""
    if is_quantized(p):
        return _dequantize_rows(_values(p, -1), p["kernel_scale"], p.get("kernel_zero"), dtype or jnp.float32)
    return kernel_of(p, dtype)


def _per_channel(p: Weight, group_axis: int) -> bool:
    """An int8 leaf with one scale per output channel (one group along ``group_axis`` of its scale, 0 for
    kernels, -1 for tables): the scale can be applied to the product's output."""
    return is_quantized(p) and p["kernel"].dtype == jnp.int8 and p["kernel_scale"].shape[group_axis] == 1


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
    if _per_channel(p, 0):
        y = jax.lax.dot_general(x, p["kernel"].astype(dtype), ((x_axes, k_axes), ((), ())),
                                preferred_element_type=preferred_element_type)
        y = y * p["kernel_scale"][0].astype(y.dtype)
    else:
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
    y = matmul_rows(x, p, dtype=dtype, preferred_element_type=preferred_element_type)
    if has_lora(p):  # table = kernel + s · a [V, r] · b [r, H]
        a, b = p["lora_a"].astype(dtype), p["lora_b"].astype(dtype)
        low = jax.lax.dot_general(x, b, (([x.ndim - 1], [1]), ((), ())))
        y = y + (jnp.tensordot(low, a, axes=[[low.ndim - 1], [1]]) * _lora_scale(p, dtype)).astype(y.dtype)
    return y


def embed_rows(p: Weight, ids: jax.Array, dtype) -> jax.Array:
    """Rows ``ids`` of a ``[V, H]`` table (the token embedding) → ``[*ids.shape, H]`` in ``dtype``."""
    if is_quantized(p):
        zero = jnp.take(p["kernel_zero"], ids, axis=0) if "kernel_zero" in p else None
        rows = _dequantize_rows(_values({"kernel": jnp.take(p["kernel"], ids, axis=0)}, -1),
                                jnp.take(p["kernel_scale"], ids, axis=0), zero, dtype)
    else:
        rows = jnp.take(kernel_of(p), ids, axis=0).astype(dtype)
    if has_lora(p):
        low = jnp.take(p["lora_a"], ids, axis=0).astype(dtype)
        rows = rows + jnp.tensordot(low, p["lora_b"].astype(dtype), axes=[[low.ndim - 1], [0]]) * _lora_scale(p, dtype)
    return rows


def _lora_delta(p: dict, shape: tuple[int, ...]) -> jax.Array:
    """``lora_scale · lora_a · lora_b`` in float32, shaped as the kernel (stacked leaves too)."""
    a, b = p["lora_a"].astype(jnp.float32), p["lora_b"].astype(jnp.float32)
    if p["lora_scale"].ndim == 1:  # stacked: a leading layer axis on every array
        delta = jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]),
                           b.reshape(b.shape[0], b.shape[1], -1))
        scale = p["lora_scale"].astype(jnp.float32).reshape((-1,) + (1,) * (delta.ndim - 1))
    else:
        delta = a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)
        scale = p["lora_scale"].astype(jnp.float32)
    return (delta * scale).reshape(shape)


def merged_kernel(p: Weight) -> jax.Array:
    """The kernel with its LoRA delta folded in (``kernel + lora_scale · a · b``), in the kernel's dtype.

    Works on stacked leaves (a leading layer axis on every array, ``lora_scale [L]``). Raises ``ValueError``
    for a quantized kernel with adapters (the sum is not representable in the quantized form)."""
    if not has_lora(p):
        return kernel_of(p)
    if is_quantized(p):
        raise ValueError("LoRA adapters cannot be folded into a quantized kernel; keep them separate "
                         "(nn.linear applies them) or quantize after merging")
    kernel = kernel_of(p)
    return (kernel.astype(jnp.float32) + _lora_delta(p, kernel.shape)).astype(kernel.dtype)


def merge_leaf(p: Weight) -> Weight:
    """A weight leaf without adapters: the LoRA delta folded into the kernel (other leaves unchanged)."""
    if not has_lora(p):
        return p
    merged = {k: v for k, v in p.items() if k not in LORA_KEYS}
    merged["kernel"] = merged_kernel(p)
    return merged


def matmul_rows(x: jax.Array, table: Weight, *, dtype=None, preferred_element_type=None) -> jax.Array:
    """``x [..., N]`` against the rows of a ``[M, N]`` table or serving matrix (no adapters) → ``[..., M]``."""
    dtype = dtype or x.dtype
    dims = (([x.ndim - 1], [1]), ((), ()))
    if _per_channel(table, -1):
        y = jax.lax.dot_general(x.astype(dtype), table["kernel"].astype(dtype), dims,
                                preferred_element_type=preferred_element_type)
        return y * table["kernel_scale"][:, 0].astype(y.dtype)
    return jax.lax.dot_general(x.astype(dtype), table_of(table, dtype), dims,
                               preferred_element_type=preferred_element_type)


def matmul(matrix: Weight | tuple[Weight, ...], x: jax.Array, out_dtype=None) -> jax.Array:
    """``matrix [M, N] @ x [N, B]`` → ``[M, B]`` in ``x``'s dtype (accumulated in ``out_dtype`` when given) for
    a :func:`serving_matrix`, or a tuple of them stacked along the output rows (:func:`concat_matrices`); the
    matrix is the left operand (XLA:CPU streams ``[out, in]`` weights fastest that way)."""
    if isinstance(matrix, tuple):
        return jnp.concatenate([matmul(part, x, out_dtype) for part in matrix], axis=0)
    if _per_channel(matrix, -1):
        y = jnp.dot(matrix["kernel"].astype(x.dtype), x, preferred_element_type=out_dtype)
        return y * matrix["kernel_scale"].astype(y.dtype)
    return jnp.dot(table_of(matrix, x.dtype), x, preferred_element_type=out_dtype)


def serving_matrix(p: Weight, n_in: int = 1) -> Weight:
    """An unstacked weight leaf (``n_in`` input axes) as a 2-D ``[out, in]`` matrix for :func:`matmul`: a float
    array with the LoRA delta folded in, or for a quantized kernel without adapters its quantized form in
    table layout (values ``[out, in or in/2]``, ``kernel_scale`` / ``kernel_zero [out, G]``), never a float
    copy. A quantized kernel with adapters becomes a float32 matrix (dequantized, delta added)."""
    if is_quantized(p) and not has_lora(p):
        groups = p["kernel_scale"].shape[0]
        out = math.prod(p["kernel_scale"].shape[1:])
        matrix = {"kernel": p["kernel"].reshape(-1, out).T}
        for key in ("kernel_scale", "kernel_zero"):
            if key in p:
                matrix[key] = p[key].reshape(groups, out).T
        return matrix
    if is_quantized(p):
        kernel = kernel_of(p, jnp.float32)
        kernel = kernel + _lora_delta(p, kernel.shape)
    else:
        kernel = merged_kernel(p)
    return kernel.reshape(math.prod(kernel.shape[:n_in]), -1).T


def serving_table(p: Weight) -> Weight:
    """A ``[V, H]`` table (the tied embedding as the output matrix) for :func:`matmul`: itself, or with adapters
    a float32 matrix with the LoRA delta folded in (dequantized first when quantized)."""
    if not has_lora(p):
        return p
    table = table_of(p, jnp.float32)
    return table + _lora_delta(p, table.shape)


def _form(matrix: Weight) -> Any:
    """What decides whether serving matrices can be stacked: their keys, dtypes and group counts."""
    if not isinstance(matrix, dict):
        return matrix.dtype, matrix.shape[1:]
    return tuple((k, v.dtype, v.shape[1:]) for k, v in sorted(matrix.items()))


def concat_matrices(matrices: list[Weight]) -> Weight | tuple[Weight, ...]:
    """Serving matrices stacked along their output rows (fused q/k/v, gate/up) for :func:`matmul`: one matrix
    when all share a form, else a tuple of runs of consecutive matrices that do (e.g. int4 q/k with the int8
    v of `ov_jax.config.QuantConfig.int8_weights`)."""
    runs: list[list[Weight]] = []
    for matrix in matrices:
        if runs and _form(runs[-1][-1]) == _form(matrix):
            runs[-1].append(matrix)
        else:
            runs.append([matrix])
    stacked = [jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=0), *run) for run in runs]
    return stacked[0] if len(stacked) == 1 else tuple(stacked)
