"""Top-1 agreement between two versions of a random-weight model, with a fitted lm_head.

A random checkpoint's logits are near-Gaussian: over a vocabulary of V tokens the top-1 / top-2 gap is a
small fraction of the logits' spread (on the 0.5B architecture's 151,936 tokens a median 0.19 standard
deviations), so any rounding flips a few % of the top-1 tokens and top-1 agreement mostly measures that gap.
A trained model's predictions have wide margins. :func:`fitted_head` gives the random model a head of that
kind in closed form: the least-squares (ridge) linear head that maps each counted position's final hidden
state to its target, as a trained head separates its contexts along the directions in which they differ.
With one distinct target per position (:func:`distinct_targets`) every position is its own class.

Why least squares and not the cosine to each class's mean hidden state: after a media block, random
attention averages the ~1,500 placeholders almost uniformly, so the text positions' hidden states share one
dominant component (pairwise cosine 0.993 on the 0.5B architecture after a 384x384 image, against 0.63 on a
text-only prompt). A cosine head's margins are then ~0.6% of its logits, below int8's rounding of the head
itself; a least-squares head ignores the shared component and keeps margins of several logit deviations.
"""

from __future__ import annotations

import numpy as np

# The targets' mean logit: wide enough that the untouched random rows (logits of std ~0.6 on the 0.5B, max ~3)
# never compete.
FITTED_GAIN = 16.0
# Ridge strength relative to the hidden states' mean squared norm: enough to keep the solve well conditioned
# on near-duplicate states without washing out the directions that separate them.
RIDGE = 0.1


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


def fitted_head(hidden: np.ndarray, targets: np.ndarray, base: np.ndarray, gain: float = FITTED_GAIN,
                ridge: float = RIDGE) -> np.ndarray:
    """An lm_head kernel ``[H, V]``: ``base`` (float ``[H, V]``, e.g. the random head) with the columns of the
    tokens in ``targets [N]`` replaced by the ridge least-squares head ``W = (XᵀX + λI)⁻¹ XᵀY`` of ``hidden
    [N, H]`` (``X``) onto the one-hot targets (``Y``), ``λ = ridge`` times the mean squared row norm of ``X``,
    each column scaled so that its positions' mean logit for it is ``gain`` (a class whose states are
    near-duplicates of others' would otherwise sit far below the random rows)."""
    hidden = np.asarray(hidden, np.float64)
    tokens, index = np.unique(targets, return_inverse=True)
    onehot = np.zeros((len(hidden), len(tokens)))
    onehot[np.arange(len(hidden)), index] = 1.0
    gram = hidden.T @ hidden
    lam = ridge * np.trace(gram) / len(hidden)
    rows = np.linalg.solve(gram + lam * np.eye(len(gram)), hidden.T @ onehot)  # [H, C]
    own = np.zeros(len(tokens))
    np.add.at(own, index, (hidden @ rows)[np.arange(len(hidden)), index])
    rows *= gain * np.bincount(index) / own
    kernel = np.array(base, np.float32)
    kernel[:, tokens] = rows
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
