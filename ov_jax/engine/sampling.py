"""Next-token choice with transformers' sampling semantics, as jit-friendly pure functions.

Order and rules follow ``GenerationMixin._get_logits_processor`` for ``do_sample=True``: temperature
(``logits / t``), then top-k (``TopKLogitsWarper``: drop every logit strictly below the k-th largest, so
ties with it are kept), then top-p (``TopPLogitsWarper``: sort ascending, drop the tokens whose
cumulative probability is ``<= 1 - p``, always keep the most likely one; the kept set is the minimal
one reaching ``p``, boundary token included). Filtered logits are ``-inf``. Greedy is ``argmax`` (first
index on ties, as torch).

What changes the compiled program (greedy or not, top-k value, top-p on or off) is a static
:class:`SamplingMode`; temperature and the top-p value are traced scalars, so changing them never
recompiles.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """Static part of the sampling configuration (part of the compile key)."""

    do_sample: bool = False
    top_k: int = 0  # 0 = off
    top_p: bool = False  # whether a top-p filter runs (its value is traced)

    @classmethod
    def from_args(cls, do_sample: bool, top_k: int, top_p: float) -> "SamplingMode":
        if not do_sample:
            return cls()
        return cls(True, int(top_k), float(top_p) < 1.0)

    @property
    def name(self) -> str:
        if not self.do_sample:
            return "greedy"
        parts = ["sample"] + ([f"top_k={self.top_k}"] if self.top_k else []) + (["top_p"] if self.top_p else [])
        return "+".join(parts)


GREEDY = SamplingMode()


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep logits ``>=`` the k-th largest per row (``TopKLogitsWarper``), the rest ``-inf``."""
    k = min(int(k), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_threshold(top_p: float) -> np.float32:
    """``1 - p`` as torch compares it: computed in float64 on the host, then rounded to float32."""
    return np.float32(1.0 - float(top_p))


def top_p_filter(logits: jax.Array, threshold: jax.Array) -> jax.Array:
    """Nucleus filter exactly as ``TopPLogitsWarper``: ascending sort, tokens with ``cumsum <= threshold``
    removed (``threshold`` from :func:`top_p_threshold`), the most likely token always kept."""
    order = jnp.argsort(logits, axis=-1)  # ascending, stable
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= threshold
    remove_sorted = remove_sorted.at[..., -1].set(False)  # min_tokens_to_keep = 1
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


def process_logits(logits: jax.Array, mode: SamplingMode, temperature: jax.Array, top_p_threshold: jax.Array
                   ) -> jax.Array:
    """Temperature → top-k → top-p on float32 logits ``[B, V]`` (identity for greedy)."""
    logits = logits.astype(jnp.float32)
    if not mode.do_sample:
        return logits
    logits = logits / temperature
    if mode.top_k:
        logits = top_k_filter(logits, mode.top_k)
    if mode.top_p:
        logits = top_p_filter(logits, top_p_threshold)
    return logits


def choose_tokens(logits: jax.Array, mode: SamplingMode, temperature: jax.Array, top_p_threshold: jax.Array,
                  seed: jax.Array, step: jax.Array) -> jax.Array:
    """Next token per row ``[B]`` (int32). The random key is ``fold_in(key(seed), step)``: reproducible."""
    if not mode.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    key = jax.random.fold_in(jax.random.key(seed), step)
    # Shifted so each row's top logit is 0 (sampling is shift-invariant): a temperature so small that
    # logits / temperature overflows then gives 0 and -inf (the argmax) instead of inf - inf = nan.
    logits = logits.astype(jnp.float32)
    filtered = process_logits(logits - jnp.max(logits, axis=-1, keepdims=True), mode, temperature, top_p_threshold)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
