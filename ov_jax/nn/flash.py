"""Flash (online-softmax) causal self-attention in plain JAX, with packing and padding as per-token segment ids.

The sequence is cut into blocks of ``block`` slots. Each query block walks the key blocks up to its own (the
ones above the diagonal are never visited) keeping a running row maximum, a running softmax denominator and a
running output in float32; a key block that no query of the block may see (padding, another packed segment)
is skipped. The visibility of a block pair is computed from the slots and segment ids of that pair only, so
neither ``T × T`` scores nor a ``T × T`` mask exist, forward or backward. The backward (a custom VJP)
recomputes the scores block by block from the saved log-sum-exp, as FlashAttention-2 does; the residuals are
``q``, ``k``, ``v``, the output and the log-sum-exp, all ``O(T)``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

BLOCK = 512
NEG = float(jnp.finfo(jnp.float32).min)


def token_segments(key_valid: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Per-token segment ids ``[B, T]`` int32 for :func:`flash_attention`: ``segment_ids`` (1 when None) where
    ``key_valid [B, T]`` is true, 0 (sees and is seen by nothing) at padding."""
    seg = jnp.ones(key_valid.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    return jnp.where(key_valid.astype(bool), seg, 0)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None = None,
                    block: int = BLOCK) -> jax.Array:
    """Causal grouped-query self-attention ``[B, T, nh, hd]`` in the query dtype.

    ``q [B, T, nh, hd]``, ``k``/``v`` ``[B, T, nkv, hd]`` (the queries' own slots); query head ``h`` reads kv
    head ``h // (nh // nkv)``; scale ``1/sqrt(hd)``. Query ``i`` sees key ``j`` iff ``j <= i`` and
    ``segments[:, j] == segments[:, i] != 0`` (``segments [B, T]`` int, e.g. :func:`token_segments`; None = one
    segment, every key valid). A query that sees no key (padding) gets 0. Scores, softmax statistics and
    accumulators are float32; the probabilities meet ``v`` in its dtype. Scratch memory is ``O(block² · heads)``
    per step, forward and backward. ``T`` need not be a multiple of ``block`` (the tail is padded).
    """
    b, t, nh, hd = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != hd or nh % k.shape[2]:
        raise ValueError(f"flash_attention needs k and v [B, T, nkv, hd] matching q {q.shape} with nh divisible by "
                         f"nkv; got k {k.shape}, v {v.shape}")
    if block < 1:
        raise ValueError(f"block must be a positive number of slots, got {block}")
    seg = jnp.ones((b, t), jnp.int32) if segments is None else segments.astype(jnp.int32)
    size = min(block, t)
    pad = -t % size
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths)
        seg = jnp.pad(seg, ((0, 0), (0, pad)))
    return _flash(q, k, v, seg, size)[:, :t]


def _blocks(x: jax.Array, size: int) -> jax.Array:
    """``[B, T, ...]`` → ``[T // size, B, size, ...]``."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // size, size, *x.shape[2:]), 1, 0)


def _unblock(x: jax.Array) -> jax.Array:
    """Inverse of :func:`_blocks`."""
    n, b, size = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * size, *x.shape[3:])


def _visible(i, j, seg_q: jax.Array, seg_k: jax.Array, size: int) -> jax.Array:
    """``[B, size, size]`` bool: which keys of block ``j`` the queries of block ``i`` see."""
    slots = jnp.arange(size)
    causal = (j * size + slots)[None, :] <= (i * size + slots)[:, None]
    return causal[None] & (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k != 0)[:, None, :]


def _scores(qi: jax.Array, kj: jax.Array) -> jax.Array:
    """``qi [B, bq, nkv, g, hd]``, ``kj [B, bk, nkv, hd]`` → float32 scaled scores ``[B, nkv, g, bq, bk]``."""
    s = jnp.einsum("bqngd,bknd->bngqk", qi, kj, preferred_element_type=jnp.float32)
    return s * (1.0 / math.sqrt(qi.shape[-1]))


def _forward(q, k, v, seg, size):
    b, t, nh, hd = q.shape
    nkv = k.shape[2]
    g = nh // nkv
    qb = _blocks(q.reshape(b, t, nkv, g, hd), size)
    kb, vb, sb = _blocks(k, size), _blocks(v, size), _blocks(seg, size)

    def query_block(_, xs):
        i, qi, si = xs

        def key_block(j, carry):
            mask = _visible(i, j, si, sb[j], size)[:, None, None]

            def visit(carry):
                m, l, acc = carry
                s = jnp.where(mask, _scores(qi, kb[j]), NEG)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum("bngqk,bknd->bngqd", p.astype(v.dtype), vb[j], preferred_element_type=jnp.float32)
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            return jax.lax.cond(mask.any(), visit, lambda c: c, carry)

        init = (jnp.full((b, nkv, g, size), NEG, jnp.float32), jnp.zeros((b, nkv, g, size), jnp.float32),
                jnp.zeros((b, nkv, g, size, hd), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
        empty = l == 0.0
        out = jnp.where(empty[..., None], 0.0, acc / jnp.where(empty, 1.0, l)[..., None])
        lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))
        return None, (jnp.moveaxis(out, 3, 1).astype(q.dtype), lse)

    _, (ob, lse) = jax.lax.scan(query_block, None, (jnp.arange(t // size), qb, sb))
    return _unblock(ob).reshape(b, t, nh, hd), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, size):
    return _forward(q, k, v, seg, size)[0]


def _flash_fwd(q, k, v, seg, size):
    out, lse = _forward(q, k, v, seg, size)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(size, residuals, d_out):
    q, k, v, seg, out, lse = residuals
    b, t, nh, hd = q.shape
    nkv = k.shape[2]
    g = nh // nkv
    n = t // size
    scale = 1.0 / math.sqrt(hd)
    qb = _blocks(q.reshape(b, t, nkv, g, hd), size)
    dob = _blocks(d_out.reshape(b, t, nkv, g, hd), size)
    # D_i = sum_d dO_id O_id, the softmax backward's row term, [n, B, nkv, g, size].
    delta = jnp.einsum("nbqhgd,nbqhgd->nbhgq", dob.astype(jnp.float32),
                       _blocks(out.reshape(b, t, nkv, g, hd), size).astype(jnp.float32))
    kb, vb, sb = _blocks(k, size), _blocks(v, size), _blocks(seg, size)

    def key_block(dq, xs):
        j, kj, vj, sj = xs

        def query_block(i, carry):
            mask = _visible(i, j, sb[i], sj, size)[:, None, None]

            def visit(carry):
                dk, dv, dq = carry
                qi, doi = qb[i], dob[i]
                p = jnp.where(mask, jnp.exp(_scores(qi, kj) - lse[i][..., None]), 0.0)
                dv = dv + jnp.einsum("bngqk,bqngd->bknd", p.astype(doi.dtype), doi,
                                     preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqngd,bknd->bngqk", doi, vj, preferred_element_type=jnp.float32)
                ds = p * (dp - delta[i][..., None]) * scale
                dk = dk + jnp.einsum("bngqk,bqngd->bknd", ds.astype(qi.dtype), qi,
                                     preferred_element_type=jnp.float32)
                dqi = jnp.einsum("bngqk,bknd->bqngd", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
                return dk, dv, dq.at[i].add(dqi)

            return jax.lax.cond(mask.any(), visit, lambda c: c, carry)

        zeros = jnp.zeros((b, size, nkv, hd), jnp.float32)
        dk, dv, dq = jax.lax.fori_loop(j, n, query_block, (zeros, zeros, dq))
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq0 = jnp.zeros((n, b, size, nkv, g, hd), jnp.float32)
    dq, (dkb, dvb) = jax.lax.scan(key_block, dq0, (jnp.arange(n), kb, vb, sb))
    return _unblock(dq).reshape(b, t, nh, hd).astype(q.dtype), _unblock(dkb), _unblock(dvb), None


_flash.defvjp(_flash_fwd, _flash_bwd)
