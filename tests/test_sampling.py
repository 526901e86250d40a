"""Sampling filters against transformers' logits warpers on hand-made logits (exact, -inf positions included)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ov_jax.engine.sampling import (SamplingMode, choose_tokens, process_logits, top_k_filter, top_p_filter,
                                    top_p_threshold)

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


@pytest.mark.parametrize("k", [1, 2, 3, 5, 6, 50])
def test_top_k_matches_transformers(k):
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = hand_made_logits()
    np.testing.assert_array_equal(np.asarray(top_k_filter(jnp.asarray(logits), k)), hf(TopKLogitsWarper(k), logits))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.5, 0.7, 0.75, 0.8, 0.9, 0.95, 0.999, 1.0])
def test_top_p_matches_transformers(p):
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = hand_made_logits()
    ours = np.asarray(top_p_filter(jnp.asarray(logits), top_p_threshold(p)))
    np.testing.assert_array_equal(ours, hf(TopPLogitsWarper(p), logits))


def test_top_p_keeps_the_boundary_token():
    """probs .5/.25/.2/.05 with p=0.75: the minimal set reaching 0.75 is {.5, .25}; p=0.76 adds the .2 token."""
    logits = jnp.log(jnp.array([[0.2, 0.5, 0.05, 0.25]], jnp.float32))
    kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, top_p_threshold(p))))[0]
    assert kept(0.74).tolist() == [False, True, False, True]
    assert kept(0.76).tolist() == [True, True, False, True]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 3, 0.8), (1.3, 0, 0.6), (2.0, 4, 1.0), (0.5, 2, 0.5)])
def test_temperature_then_top_k_then_top_p_matches_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    logits = hand_made_logits()
    expected = LogitsProcessorList(warpers)(None, torch.tensor(logits)).numpy()
    mode = SamplingMode.from_args(True, top_k, top_p)
    ours = process_logits(jnp.asarray(logits), mode, jnp.float32(temperature), top_p_threshold(top_p))
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.isinf(np.asarray(ours)), np.isinf(expected))


def test_sampling_draws_only_kept_tokens_and_is_reproducible():
    logits = jnp.asarray(np.tile(hand_made_logits(), (50, 1)))
    mode = SamplingMode(do_sample=True, top_k=3, top_p=True)
    args = (mode, jnp.float32(1.0), top_p_threshold(0.9))
    kept = np.isfinite(np.asarray(process_logits(logits, *args)))
    draws = [np.asarray(choose_tokens(logits, *args, jnp.uint32(seed), jnp.int32(step)))
             for seed in range(3) for step in range(4)]
    rows = np.arange(logits.shape[0])
    assert all(kept[rows, d].all() for d in draws)
    np.testing.assert_array_equal(draws[0], np.asarray(choose_tokens(logits, *args, jnp.uint32(0), jnp.int32(0))))
    assert len({d.tobytes() for d in draws}) == len(draws)  # seeds and steps give different streams


def test_greedy_is_first_argmax():
    logits = jnp.asarray(hand_made_logits())
    tokens = choose_tokens(logits, SamplingMode(), jnp.float32(1.0), top_p_threshold(1.0), jnp.uint32(0), jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(tokens), torch.tensor(hand_made_logits()).argmax(-1).numpy())


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.9)])
def test_a_tiny_temperature_samples_the_argmax_not_nan(top_k, top_p):
    """logits / 1e-30 overflows float32 for every logit above ~3.4e8 * 1e-30; the limit of sampling is greedy."""
    logits = jnp.asarray(np.tile(hand_made_logits(), (4, 1)))
    mode = SamplingMode.from_args(True, top_k, top_p)
    tokens = choose_tokens(logits, mode, jnp.float32(1e-38), top_p_threshold(top_p), jnp.uint32(0), jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), axis=-1))
