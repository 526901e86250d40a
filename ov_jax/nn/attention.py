"""One attention interface: ``attention(q, k, v, meta, backend)``.

:class:`AttentionMeta` says which keys each query may see — causal or not, valid keys (left padding), packed
segment ids, and for a cache the slot of the first query (the decode write position) — instead of a dense
``[B, T, S]`` mask, so kernels that take lengths or segment ids (cuDNN, Pallas splash) can run it. The dense
mask (:meth:`AttentionMeta.mask`) is the one definition the reference backend and the tests use.

Backends (`ov_jax.nn.backends`, picked by :func:`ov_jax.nn.backends.resolve_attention`) implement two cases:
self-attention (vision tower, full-sequence forward, engine prefill: the keys are the queries' own slots) and
cached attention (decode: queries at ``write_index …`` against a cache of ``S`` slots).

:func:`causal_block_attention` runs a kernel by query blocks that only see keys up to the block's end, so
score memory is ``block × T`` instead of ``T × T`` (the ``xla`` / ``cpu`` prefill); the other causal
self-attention of those backends is the flash form (`ov_jax.nn.flash`).

:func:`per_shard_self_attention` runs a fused kernel (splash, cuDNN) under an active multi-device mesh by
``jax.shard_map``: XLA cannot partition a Pallas (Mosaic) kernel itself, and cuDNN's partitioning rules need
``q``, ``k`` and ``v`` sharded alike, which grouped-query heads are not when the KV heads are replicated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ov_jax.nn.flash import token_segments
from ov_jax.sharding import active_mesh, resolve_spec

QUERY_BLOCK = 512
KV_LAYOUTS = ("BSNH", "BNSH")


@dataclasses.dataclass(frozen=True)
class AttentionMeta:
    """What a query may attend to. Built inside traced code (the arrays are tracers there).

    ``causal``: query ``i`` sees keys at slots ``<= `` its own slot. ``key_valid [B, S]`` bool (None = all):
    keys that may be attended (False for left padding and unwritten cache slots). ``segment_ids [B, T]`` int
    (self-attention only; 0 = padding): packed rows, a query only sees keys of its own segment.
    ``write_index`` (int, ``[]`` or ``[B]`` int32): the cache slot of query 0, i.e. the decode write position;
    None = self-attention (``T == S``, query ``i`` at slot ``i``). ``prefill``: a self-attention that writes a
    cache (inference only); the ``xla`` / ``cpu`` backends run it by causal query blocks, which XLA:CPU runs
    faster than the flash form they use for every other causal self-attention (full-sequence forward,
    training: no ``T × T`` scores or mask, forward or backward). ``kv_layout``: ``"BSNH"`` (``k``/``v``
    ``[B, S, nkv, hd]``) or ``"BNSH"`` (heads-major ``[B, nkv, S, hd]``, the CPU decode cache).
    """

    causal: bool = False
    key_valid: jax.Array | None = None
    segment_ids: jax.Array | None = None
    write_index: jax.Array | int | None = None
    prefill: bool = False
    kv_layout: str = "BSNH"

    def __post_init__(self):
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        if self.segment_ids is not None and self.write_index is not None:
            raise ValueError("segment_ids are for self-attention; a cached attention (write_index) takes key_valid")
        if self.prefill and self.write_index is not None:
            raise ValueError("prefill marks a self-attention (write_index None) that fills a cache")

    @property
    def self_attention(self) -> bool:
        return self.write_index is None

    def mask(self, t: int, s: int) -> jax.Array | None:
        """Dense ``[B or 1, T, S]`` bool (True = may attend), or None when every key is visible."""
        mask = None
        if self.causal:
            start = 0 if self.write_index is None else jnp.reshape(jnp.asarray(self.write_index), (-1, 1))
            query_slots = start + jnp.arange(t)[None, :]  # [B or 1, T]
            mask = jnp.arange(s)[None, None, :] <= query_slots[:, :, None]
        if self.key_valid is not None:
            valid = self.key_valid.astype(bool)[:, None, :]
            mask = valid if mask is None else mask & valid
        if self.segment_ids is not None:
            seg = self.segment_ids
            same = (seg[:, :, None] == seg[:, None, :]) & (seg != 0)[:, None, :]
            mask = same if mask is None else mask & same
        return None if mask is None else jnp.broadcast_to(mask, (mask.shape[0], t, s))

    def segments(self) -> jax.Array | None:
        """Self-attention as segment ids ``[B, T]`` int32 with every invalid key in segment 0, or None when all
        keys are valid and unsegmented. Same visibility as :meth:`mask` for every query of a nonzero segment."""
        if self.key_valid is None:
            return None if self.segment_ids is None else self.segment_ids.astype(jnp.int32)
        return token_segments(self.key_valid, self.segment_ids)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: AttentionMeta, backend: str = "xla") -> jax.Array:
    """Grouped-query attention ``[B, T, nh, hd]`` (query dtype) by the named backend (`ov_jax.nn.backends`).

    ``q [B, T, nh, hd]``; ``k``/``v`` ``[B, S, nkv, hd]`` (or ``[B, nkv, S, hd]`` with ``meta.kv_layout``
    ``"BNSH"``); query head ``h`` reads kv head ``h // (nh // nkv)``; scale ``1/sqrt(hd)``. ``backend`` is a
    resolved name (:func:`ov_jax.nn.backends.resolve_attention`); an unknown one raises ``ValueError``.
    """
    from ov_jax.nn.backends import get_backend

    impl = get_backend(backend)
    return impl.self_attention(q, k, v, meta) if meta.self_attention else impl.cached_attention(q, k, v, meta)


def to_bsnh(x: jax.Array, meta: AttentionMeta) -> jax.Array:
    """A key / value array in ``[B, S, nkv, hd]`` whatever ``meta.kv_layout``."""
    return x if meta.kv_layout == "BSNH" else x.transpose(0, 2, 1, 3)


def causal_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, attend: Callable,
                           block: int = QUERY_BLOCK) -> jax.Array:
    """``attend(q, k, v, mask)`` for a causal self-attention mask, by query blocks that only see keys up to the
    block's end.

    ``q [B, T, nh, hd]``, ``k``/``v`` ``[B, T, nkv, hd]`` (same slots as the queries), ``mask [B, T, T]`` causal
    (True = may attend). Exact for every query with at least one visible key (the skipped keys are masked for
    it anyway): about half the score FLOPs of the full square, and float32 score memory bounded by
    ``block × T``. ``attend`` is the per-block kernel (``ov_jax.modeling.layers.attention``'s signature).
    """
    t = q.shape[1]
    if t <= block:
        return attend(q, k, v, mask)
    parts = [attend(q[:, i:i + block], k[:, :i + block], v[:, :i + block], mask[:, i:i + block, :i + block])
             for i in range(0, t, block)]
    return jnp.concatenate(parts, axis=1)


def per_shard_self_attention(kernel: Callable, q: jax.Array, k: jax.Array, v: jax.Array, meta: AttentionMeta
                             ) -> jax.Array:
    """``kernel(q, k, v, meta)`` (a self-attention, ``k``/``v`` ``[B, T, nkv, hd]``) run per device by
    ``jax.shard_map`` when a mesh of more than one device is active (``jax.set_mesh``); a plain call otherwise.

    The shards follow the rules table (`ov_jax.sharding.LOGICAL_RULES`): rows over the ``batch`` axes, query
    heads over the ``heads`` axes and KV heads over the ``kv_heads`` axes, each only where the mesh axes divide
    it (as `ov_jax.sharding.resolve_spec`). ``meta.key_valid`` / ``meta.segment_ids`` are split with the rows.
    When the query heads are sharded and the KV heads are replicated (fewer KV heads than the ``tensor`` axis),
    each shard takes the one KV head its query heads read, which needs the axis size to be a multiple of
    ``nkv``; otherwise the heads are computed whole on every shard of those axes. Returns ``[B, T, nh, hd]``.
    """
    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, meta)
    nkv = k.shape[2]
    q_spec, _ = resolve_spec(("batch", "length", "heads", "head_dim"), q.shape, mesh)
    kv_spec, _ = resolve_spec(("batch", "length", "kv_heads", "head_dim"), k.shape, mesh)
    q_spec, kv_spec = (tuple(s) + (None,) * (4 - len(s)) for s in (q_spec, kv_spec))
    rows = q_spec[0]
    head_axes = q_spec[2]
    select_kv = head_axes is not None and kv_spec[2] is None  # query heads split, KV heads replicated
    if select_kv:
        names = head_axes if isinstance(head_axes, tuple) else (head_axes,)
        shards = math.prod(mesh.shape[a] for a in names)
        if shards % nkv:
            head_axes, select_kv = None, False
    q_spec = PartitionSpec(rows, None, head_axes, None)
    kv_spec = PartitionSpec(rows, None, None if select_kv else head_axes, None)
    row_spec = PartitionSpec(rows, None)
    arrays = {name: getattr(meta, name) for name in ("key_valid", "segment_ids") if getattr(meta, name) is not None}

    def local(q, k, v, arrays):
        if select_kv:  # this shard's query heads all read KV head shard // (shards / nkv)
            head = jax.lax.axis_index(names) // (shards // nkv)
            k, v = (jax.lax.dynamic_slice_in_dim(x, head, 1, axis=2) for x in (k, v))
        return kernel(q, k, v, dataclasses.replace(meta, **arrays))

    # check_vma off: Pallas kernels declare outputs without per-axis variance.
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, {n: row_spec for n in arrays}),
                         out_specs=q_spec, check_vma=False)(q, k, v, arrays)
