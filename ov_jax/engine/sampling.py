"""Next-token choice with transformers' sampling semantics, as jit-friendly pure functions of per-row settings.

Order and rules follow ``GenerationMixin._get_logits_processor`` for ``do_sample=True``: temperature
(``logits / t``), then top-k (``TopKLogitsWarper``: drop every logit strictly below the k-th largest, so
ties with it are kept), then top-p (``TopPLogitsWarper``: sort ascending, drop the tokens whose
cumulative probability is ``<= 1 - p``, always keep the most likely one; the kept set is the minimal
one reaching ``p``, boundary token included). Filtered logits are ``-inf``. Greedy is ``argmax`` (first
index on ties, as torch).

Every setting (greedy or sampling, temperature, top-k, top-p, random key) is a ``[B]`` array, one value per
row of the decode batch, so rows with different settings share one compiled program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def top_p_threshold(top_p: float) -> np.float32:
    """``1 - p`` as torch compares it: computed in float64 on the host, then rounded to float32."""
    return np.float32(1.0 - float(top_p))


# --- per-row settings (the engine's decode state) -----------------------------------------------------------


def filter_logits_rows(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p_threshold: jax.Array
                       ) -> jax.Array:
    """:func:`process_logits` of a sampling row with settings per row, in one executable.

    ``logits [B, V]`` float32; ``temperature [B]`` float32 (> 0); ``top_k [B]`` int32 (0 = off);
    ``top_p_threshold [B]`` float32 from :func:`top_p_threshold` (0 = top-p off). One ascending stable sort
    serves both filters: top-k keeps values ``>=`` the k-th largest (ties kept), then top-p removes the sorted
    prefix whose cumulative probability is ``<= threshold`` (most likely token kept) — the same values and the
    same summation order as the warpers, so the result equals :func:`process_logits` bit for bit.
    """
    logits = logits.astype(jnp.float32) / temperature[:, None]
    vocab = logits.shape[-1]
    order = jnp.argsort(logits, axis=-1)  # ascending, stable
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ascending, (vocab - k)[:, None], axis=-1)
    ascending = jnp.where(ascending < kth, -jnp.inf, ascending)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = (cumulative <= top_p_threshold[:, None]) & (top_p_threshold > 0)[:, None]
    remove = remove.at[:, -1].set(False)  # min_tokens_to_keep = 1
    ascending = jnp.where(remove, -jnp.inf, ascending)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros_like(logits).at[rows, order].set(ascending)


def row_keys(seed: jax.Array, row: jax.Array) -> jax.Array:
    """Raw key data ``[B, 2]`` uint32 of ``fold_in(key(seed), row)``: each request row its own stream."""
    return jax.vmap(lambda s, r: jax.random.key_data(jax.random.fold_in(jax.random.key(s), r)))(seed, row)


def choose_tokens_rows(logits: jax.Array, do_sample: jax.Array, temperature: jax.Array, top_k: jax.Array,
                       top_p_threshold: jax.Array, keys: jax.Array, step: jax.Array) -> jax.Array:
    """Next token per row ``[B]`` int32 with per-row settings (see :func:`filter_logits_rows`).

    Greedy rows take the first argmax; sampling rows draw with ``fold_in(keys[row], step[row])`` (``keys``
    from :func:`row_keys`), so a row's tokens depend only on its own seed, row index and step — never on which
    slot or batch it runs in. The sort runs only when some row samples.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        # Shifted so each row's top logit is 0 (sampling is shift-invariant): a temperature so small that
        # logits / temperature overflows then gives 0 and -inf (the argmax) instead of inf - inf = nan.
        shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
        filtered = filter_logits_rows(shifted, jnp.where(do_sample, temperature, 1.0), top_k, top_p_threshold)
        draw = jax.vmap(lambda kd, s, row: jax.random.categorical(
            jax.random.fold_in(jax.random.wrap_key_data(kd), s), row))
        return draw(keys, step, filtered).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(do_sample), sampled, lambda: greedy)
    return jnp.where(do_sample, drawn, greedy)
