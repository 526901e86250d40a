"""Per-row sampling filters against transformers' logits warpers on hand-made logits (exact, -inf positions included)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ov_jax.engine.sampling import choose_tokens_rows, filter_logits_rows, row_keys, top_p_threshold

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def hand_made_logits():
    """Rows with ties at the k-th value, a top-p boundary that falls exactly on a cumulative sum, a peaked row,
    a flat row and negative logits."""
    probs_boundary = np.log(np.array([0.2, 0.5, 0.05, 0.25, 0.0], np.float64) + 1e-12)
    return np.array([
        [1.0, 3.0, 3.0, 2.0, 3.0, -1.0],
        [*probs_boundary, -30.0],
        [10.0, 0.0, -1.0, 0.5, 0.25, 9.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [-5.0, -2.0, -3.5, -2.0, -8.0, -2.5],
        [0.1, 0.7, 0.3, 0.2, 0.6, 0.5],
    ], np.float32)


def hf(warper, logits):
    return warper(None, torch.tensor(logits)).numpy()


def per_row(value, dtype, rows=6):
    return jnp.full((rows,), value, dtype)


def ours(logits, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """``filter_logits_rows`` with the same settings on every row."""
    n = logits.shape[0]
    return np.asarray(filter_logits_rows(jnp.asarray(logits), per_row(temperature, jnp.float32, n),
                                         per_row(top_k, jnp.int32, n), per_row(top_p_threshold(top_p), jnp.float32, n)))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 6, 50])
def test_top_k_matches_transformers(k):
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = hand_made_logits()
    np.testing.assert_array_equal(ours(logits, top_k=k), hf(TopKLogitsWarper(k), logits))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.5, 0.7, 0.75, 0.8, 0.9, 0.95, 0.999, 1.0])
def test_top_p_matches_transformers(p):
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = hand_made_logits()
    np.testing.assert_array_equal(ours(logits, top_p=p), hf(TopPLogitsWarper(p), logits))


def test_top_p_keeps_the_boundary_token():
    """probs .5/.25/.2/.05 with p=0.75: the minimal set reaching 0.75 is {.5, .25}; p=0.76 adds the .2 token."""
    logits = np.log(np.array([[0.2, 0.5, 0.05, 0.25]], np.float32))
    kept = lambda p: np.isfinite(ours(logits, top_p=p))[0]
    assert kept(0.74).tolist() == [False, True, False, True]
    assert kept(0.76).tolist() == [True, True, False, True]


def hf_warped(logits, temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    return LogitsProcessorList(warpers)(None, torch.tensor(logits)).numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 3, 0.8), (1.3, 0, 0.6), (2.0, 4, 1.0), (0.5, 2, 0.5)])
def test_temperature_then_top_k_then_top_p_matches_transformers(temperature, top_k, top_p):
    logits = hand_made_logits()
    expected = hf_warped(logits, temperature, top_k, top_p)
    got = ours(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))


def test_each_row_follows_its_own_settings():
    """One call with different settings per row equals each row's warpers (rows 0-3 of the hand-made logits)."""
    settings = [(0.7, 3, 0.8), (1.3, 0, 0.6), (2.0, 4, 1.0), (0.5, 2, 0.5)]
    logits = hand_made_logits()[:4]
    got = np.asarray(filter_logits_rows(jnp.asarray(logits), jnp.array([s[0] for s in settings], jnp.float32),
                                        jnp.array([s[1] for s in settings], jnp.int32),
                                        jnp.array([top_p_threshold(s[2]) for s in settings], jnp.float32)))
    for i, (t, k, p) in enumerate(settings):
        expected = hf_warped(logits[i:i + 1], t, k, p)[0]
        np.testing.assert_allclose(got[i], expected, rtol=1e-6)
        np.testing.assert_array_equal(np.isinf(got[i]), np.isinf(expected))


def choose(logits, do_sample, seed, step, temperature=1.0, top_k=3, top_p=0.9):
    n = logits.shape[0]
    keys = row_keys(jnp.full((n,), seed, jnp.uint32), jnp.arange(n, dtype=jnp.int32))
    return np.asarray(choose_tokens_rows(logits, jnp.asarray(do_sample), per_row(temperature, jnp.float32, n),
                                         per_row(top_k, jnp.int32, n), per_row(top_p_threshold(top_p), jnp.float32, n),
                                         keys, jnp.full((n,), step, jnp.int32)))


def test_sampling_draws_only_kept_tokens_and_is_reproducible():
    logits = jnp.asarray(np.tile(hand_made_logits(), (50, 1)))
    sample = np.ones(logits.shape[0], bool)
    kept = np.isfinite(ours(np.asarray(logits), 1.0, 3, 0.9))
    draws = [choose(logits, sample, seed, step) for seed in range(3) for step in range(4)]
    rows = np.arange(logits.shape[0])
    assert all(kept[rows, d].all() for d in draws)
    np.testing.assert_array_equal(draws[0], choose(logits, sample, 0, 0))
    assert len({d.tobytes() for d in draws}) == len(draws)  # seeds and steps give different streams


def test_greedy_is_first_argmax_and_rows_mix_greedy_and_sampling():
    logits = jnp.asarray(hand_made_logits())
    want = torch.tensor(hand_made_logits()).argmax(-1).numpy()
    np.testing.assert_array_equal(choose(logits, np.zeros(6, bool), 0, 0), want)
    mixed = np.array([True, False] * 3)
    sampled = choose(logits, mixed, 0, 0, top_k=0, top_p=1.0, temperature=50.0)
    np.testing.assert_array_equal(sampled[~mixed], want[~mixed])


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.9)])
def test_a_tiny_temperature_samples_the_argmax_not_nan(top_k, top_p):
    """logits / 1e-30 overflows float32 for every logit above ~3.4e8 * 1e-30; the limit of sampling is greedy."""
    logits = jnp.asarray(np.tile(hand_made_logits(), (4, 1)))
    tokens = choose(logits, np.ones(24, bool), 0, 0, temperature=1e-38, top_k=top_k, top_p=top_p)
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), axis=-1))
