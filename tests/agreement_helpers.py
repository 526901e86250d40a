"""Top-1 agreement between two versions of a random-weight model, with a fitted lm_head.

A random checkpoint's logits are near-Gaussian: over a vocabulary of V tokens the top-1 / top-2 gap is a
small fraction of the logits' spread (on the 0.5B architecture's 151,936 tokens a median 0.19 standard
deviations), so any rounding flips a few % of the top-1 tokens and top-1 agreement mostly measures that gap.
A trained model's predictions have wide margins. :func:`fitted_head` gives the random model a head of that
kind in closed form: the row of each target token is the (unit) mean of the normalised final hidden states
of the positions that predict it, so a position's target wins by how much closer its hidden state is to
its own class mean than to the others — margins set by the model's own hidden states, not chosen. With one
distinct target per position (:func:`distinct_targets`) each row is that position's own direction.
"""

from __future__ import annotations

import numpy as np

# Logit of a target whose row points exactly along a hidden state of root-mean-square 1: wide enough that
# the untouched random rows (logits of std ~0.6 on the 0.5B, max ~3) never compete.
FITTED_GAIN = 16.0


def text_positions(ids: np.ndarray, mask: np.ndarray, config) -> np.ndarray:
    """``[B, T]`` bool: the valid positions that are not image / video placeholders."""
    media = (ids == config.image_token_id) | (ids == config.video_token_id)
    return mask.astype(bool) & ~media


def distinct_targets(n: int, config) -> np.ndarray:
    """``[n]`` distinct target tokens, one per position (ids 1 … n): in a trained model the contexts that
    predict one token share a direction, which random contexts with shared random labels would not."""
    if n >= config.text.vocab_size:
        raise ValueError(f"{n} positions need more distinct targets than the vocabulary's {config.text.vocab_size}")
    return np.arange(1, n + 1)


def fitted_head(hidden: np.ndarray, targets: np.ndarray, base: np.ndarray, gain: float = FITTED_GAIN
                ) -> np.ndarray:
    """An lm_head kernel ``[H, V]``: ``base`` (float ``[H, V]``, e.g. the random head) with the column of
    every token in ``targets [N]`` replaced by ``gain / sqrt(H)`` times the unit mean of the unit rows of
    ``hidden [N, H]`` (the normalised final hidden states of the positions whose target it is)."""
    hidden = np.asarray(hidden, np.float64)
    units = hidden / np.linalg.norm(hidden, axis=-1, keepdims=True)
    tokens, index = np.unique(targets, return_inverse=True)
    sums = np.zeros((len(tokens), hidden.shape[-1]))
    np.add.at(sums, index, units)
    rows = sums / np.linalg.norm(sums, axis=-1, keepdims=True) * gain / np.sqrt(hidden.shape[-1])
    kernel = np.array(base, np.float32)
    kernel[:, tokens] = rows.T
    return kernel


def agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement of logits ``[N, V]`` with ``reference``'s, and the relative (Frobenius) error."""
    reference, other = np.asarray(reference, np.float32), np.asarray(other, np.float32)
    top1 = float((reference.argmax(-1) == other.argmax(-1)).mean())
    return top1, float(np.linalg.norm(other - reference) / np.linalg.norm(reference))


def top1_margin(logits: np.ndarray) -> float:
    """Median gap between the two largest logits, in units of each position's logit standard deviation."""
    logits = np.asarray(logits, np.float32)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return float(np.median((top2[:, 1] - top2[:, 0]) / logits.std(-1)))


def trained_head(hidden, targets, kernel, steps: int = 200):
    """The iterative counterpart of :func:`fitted_head`, for labels a closed form separates poorly (the random
    head's own top-1 tokens, shared by many positions): ``kernel [H, V]`` trained (cross-entropy, adam, full
    batch, ``steps`` steps) to predict ``targets [N]`` from ``hidden [N, H]``. Every step computes all ``N × V``
    logits, so it suits the tiny model only."""
    import jax
    import jax.numpy as jnp
    import optax

    hidden, targets = jnp.asarray(hidden, jnp.float32), jnp.asarray(targets)
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(kernel, state):
        loss = lambda k: optax.softmax_cross_entropy_with_integer_labels(hidden @ k, targets).mean()
        updates, state = optimizer.update(jax.grad(loss)(kernel), state)
        return optax.apply_updates(kernel, updates), state

    kernel = jnp.asarray(kernel, jnp.float32)
    state = optimizer.init(kernel)
    for _ in range(steps):
        kernel, state = step(kernel, state)
    return kernel
