"""Attention backends (`ov_jax.nn.backends`) against transformers and each other on the tiny model, float32.

Every backend that runs on CPU (``xla``, ``cpu``, ``splash`` in Pallas interpret mode) must give transformers'
float32 logits within 1e-5 on left-padded batches, for prefill (with an image, so the vision tower runs
through the backend too) and for every decode step in both cache layouts; packed rows (segment ids) must
equal separate rows. The cuDNN backend's padding plumbing is checked through jax's own implementation of the
same ``dot_product_attention`` call; cuDNN itself needs a GPU.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ov_jax.engine import engine_for, steps  # noqa: E402
from ov_jax.engine.sampling import GREEDY  # noqa: E402
from ov_jax.geometry import video_token_count  # noqa: E402
from ov_jax.model import LlavaOnevision  # noqa: E402
from ov_jax.modeling import llava  # noqa: E402
from ov_jax.nn import backends  # noqa: E402
from ov_jax.nn.attention import AttentionMeta, attention  # noqa: E402
from ov_jax.nn.backends import AttentionBackendError, cudnn, resolve_attention  # noqa: E402

CPU_BACKENDS = ["xla", "cpu", "splash"]
TOL = 1e-5
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def pair(tiny_ckpt):
    """transformers in float32 and float64, and ours."""
    load = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained
    return ((load(tiny_ckpt, dtype=torch.float32).eval(), load(tiny_ckpt, dtype=torch.float64).eval()),
            LlavaOnevision.from_pretrained(tiny_ckpt))


def _text_batch(rng, vocab=200):
    """Two rows, the second left-padded by 5."""
    ids = rng.integers(3, vocab, (2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    ids[1, :5] = 0
    return ids, mask


def _reference(refs, ids, mask, **media):
    """transformers' float64 logits and the tolerance against them: 1e-5, or twice transformers' own float32
    error where that is larger (as the parity suite: this deliberately sharp tiny model turns float32 rounding
    into ~1e-5 on logits of magnitude ~10)."""
    out = []
    with torch.no_grad():
        for ref, dtype in zip(refs, (torch.float32, torch.float64)):
            out.append(ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                           **{k: torch.from_numpy(v).to(dtype) for k, v in media.items()}).logits.double().numpy())
    valid = mask.astype(bool)
    return out[1], max(TOL, 2 * float(np.abs(out[0][valid] - out[1][valid]).max()))


@pytest.fixture(scope="module")
def video_batch(pair):
    """A one-frame video per row (the tower runs through the backend), the second row left-padded, and
    transformers' logits with the tolerance (:func:`_reference`)."""
    refs, model = pair
    n = video_token_count(1)
    vid = model.config.video_token_id
    ids = np.array([[11, 12] + [vid] * n + [13, 14], [0, 0, 12] + [vid] * n + [13]], np.int64)
    mask = (ids != 0).astype(np.int64)
    media = dict(pixel_values_videos=np.random.default_rng(0).standard_normal((2, 1, 3, 384, 384)).astype(np.float32))
    return (ids, mask, media) + _reference(refs, ids, mask, **media)


def _logits_with(model, backend, ids, mask, media):
    model.attention = backend
    try:
        return np.asarray(model(ids, mask, position_ids=np.maximum(np.cumsum(mask, 1) - 1, 0), **media).logits)
    finally:
        model.attention = "auto"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_prefill_logits_equal_transformers_on_a_left_padded_video_batch(pair, video_batch, backend):
    ids, mask, media, expected, tolerance = video_batch
    ours = _logits_with(pair[1], backend, ids, mask, media)
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - expected[valid]).max() <= tolerance


def _decode_with_logits(model, backend, layout, ids, mask):
    """Greedy prefill + decode through the engine's step functions, returning the tokens and the logits of
    every step (prefill's last slot, then each decode step)."""
    params, cfg, dtype = model.params, model.config, jnp.float32
    b, t = ids.shape
    logits, prompt_kv = jax.jit(lambda p, i, m: steps.prefill(p, i, m, jnp.zeros((b, t, cfg.text.hidden_size)),
                                                              jnp.zeros((b, t), bool), cfg, dtype, backend))(
        {"text": params["text"]}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))
    rules = steps.TokenRules(jnp.full((steps.MAX_STOP_IDS,), -1, jnp.int32), jnp.int32(0), jnp.float32(1.0),
                             jnp.float32(0.0), jnp.uint32(0))
    cache, state = steps.start_decode(prompt_kv, logits, jnp.asarray(mask, bool), rules, GREEDY,
                                      t + NEW_TOKENS, layout)
    if layout == "unrolled":
        text = params["text"]
        step_params = {"text": {"embed": text["embed"], "norm": text["norm"],
                                "lm_head_t": steps.serving_lm_head(text)}}
        layers = steps.serving_layers(text["layers"])
    else:
        step_params, layers = {"text": params["text"]}, None
    step = jax.jit(lambda p, l, c, s: steps.decode_logits(p, l, c, s, cfg, dtype, backend))
    all_logits, tokens = [np.asarray(logits)], [np.asarray(state.tokens)]
    for _ in range(NEW_TOKENS - 1):
        cache, logits, state = step(step_params, layers, cache, state)
        state = state._replace(tokens=jnp.argmax(logits, -1).astype(jnp.int32))
        all_logits.append(np.asarray(logits))
        tokens.append(np.asarray(state.tokens))
    return np.stack(tokens, 1), np.stack(all_logits, 1)


@pytest.mark.parametrize("layout", steps.LAYOUTS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_logits_and_greedy_tokens_equal_transformers(pair, backend, layout):
    """Each step's logits against transformers' forward over prompt + the tokens so far (left padding in the
    cache), and ``generate`` through the engine with the backend emits the same greedy tokens."""
    refs, model = pair
    ids, mask = _text_batch(np.random.default_rng(1))
    tokens, logits = _decode_with_logits(model, backend, layout, ids, mask)
    full_ids = np.concatenate([ids, tokens], 1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], 1)
    expected, tolerance = _reference(refs, full_ids, full_mask)
    expected = expected[:, ids.shape[1] - 1:-1]
    assert np.abs(logits - expected).max() <= tolerance
    np.testing.assert_array_equal(tokens, expected.argmax(-1))
    if layout == "unrolled":  # the engine's layout on CPU
        model.attention = backend
        try:
            generated = model.generate(ids, mask, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
            assert engine_for(model).attention == backend
        finally:
            model.attention = "auto"
        np.testing.assert_array_equal(generated, tokens)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_rows_equal_separate_rows(pair, backend):
    """Two prompts packed into one row (segment ids, positions restarting) give each prompt's hidden states of
    its own left-padded row."""
    _, model = pair
    rng = np.random.default_rng(2)
    a, b = rng.integers(3, 200, 7), rng.integers(3, 200, 10)
    no_media = dict(tower_inputs=jnp.zeros((0, 3, 384, 384)), tap_index=jnp.zeros((1, 17, 4), jnp.int32),
                    tap_weight=jnp.zeros((1, 17, 4)), is_media=jnp.zeros((1, 17), bool))

    def hidden(ids, mask, positions, segments=None, rows=1):
        media = {k: jnp.broadcast_to(v, (rows,) + v.shape[1:]) if k != "tower_inputs" else v
                 for k, v in no_media.items()}
        return np.asarray(llava.hidden_states(model.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions),
                                              **media, config=model.config, dtype=jnp.float32,
                                              segment_ids=None if segments is None else jnp.asarray(segments),
                                              attention=backend))

    packed = hidden(np.concatenate([a, b])[None], np.ones((1, 17), bool),
                    np.concatenate([np.arange(7), np.arange(10)])[None], np.array([[1] * 7 + [2] * 10]))
    ids = np.zeros((2, 17), np.int64)
    ids[0, 10:], ids[1, 7:] = a, b
    mask = ids != 0
    separate = hidden(ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0), rows=2)
    assert np.abs(packed[0, :7] - separate[0, 10:]).max() <= TOL
    assert np.abs(packed[0, 7:] - separate[1, 7:]).max() <= TOL


def _qkv(rng, b=2, t=40, s=None):
    s = s or t
    return (jnp.asarray(rng.standard_normal(shape), jnp.float32)
            for shape in ((b, t, 4, 16), (b, s, 2, 16), (b, s, 2, 16)))


def _metas(t):
    valid = jnp.asarray(np.arange(t)[None] >= np.array([[0], [13]]))
    segments = jnp.asarray(np.where(np.arange(t)[None] < 20, 1, 2) * np.asarray(valid))
    return valid, {"bidirectional": AttentionMeta(), "bidirectional-padded": AttentionMeta(key_valid=valid),
                   "causal-left-padded": AttentionMeta(causal=True, key_valid=valid),
                   "causal-packed": AttentionMeta(causal=True, segment_ids=segments)}


@pytest.mark.parametrize("case", ["bidirectional", "bidirectional-padded", "causal-left-padded", "causal-packed"])
def test_cudnn_plumbing_equals_the_reference(case):
    """The cuDNN backend's call (valid tokens permuted to the front and passed as lengths; segments as a mask)
    run by jax's xla implementation of ``dot_product_attention`` equals the reference at every valid query."""
    q, k, v = _qkv(np.random.default_rng(3))
    valid, metas = _metas(40)
    meta = metas[case]
    ours = cudnn.self_attention(q, k, v, meta, implementation="xla")
    expected = attention(q, k, v, meta, "xla")
    rows = np.asarray(valid) if meta.key_valid is not None or meta.segment_ids is not None else np.ones((2, 40), bool)
    assert np.abs(np.asarray(ours)[rows] - np.asarray(expected)[rows]).max() <= 1e-6
    assert np.isfinite(np.asarray(ours)).all()


@pytest.mark.parametrize("layout", ["BSNH", "BNSH"])
@pytest.mark.parametrize("backend", ["cpu", "cudnn", "splash"])
def test_cached_attention_with_per_row_write_positions(backend, layout):
    """Decode against a cache: every backend's cached form (cuDNN and splash use the reference's) equals the
    reference, with a scalar or a per-row write position and unwritten slots beyond it."""
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, t=1, s=24)
    if layout == "BNSH":
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    for write_index in (jnp.int32(17), jnp.array([17, 9], jnp.int32)):
        valid = jnp.asarray(np.arange(24)[None] >= np.array([[2], [0]]))
        meta = AttentionMeta(causal=True, key_valid=valid, write_index=write_index, kv_layout=layout)
        ours = backends.get_backend(backend).cached_attention(q, k, v, meta)
        expected = attention(q, k, v, meta, "xla")
        assert np.abs(np.asarray(ours) - np.asarray(expected)).max() <= 1e-6


def test_auto_picks_per_platform_and_dtype():
    assert resolve_attention("auto", "cpu", jnp.float32) == "cpu"
    assert resolve_attention("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert resolve_attention("auto", "gpu", jnp.float16) == "cudnn"
    assert resolve_attention("auto", "gpu", jnp.float32) == "xla"
    assert resolve_attention("auto", "tpu", jnp.bfloat16) == "splash"
    assert resolve_attention("splash", "cpu", jnp.float32) == "splash"  # Pallas interpret mode


@pytest.mark.parametrize("name,platform,dtype,message", [
    ("flash", "cpu", "float32", r"attention must be one of \['auto', 'xla', 'cpu', 'cudnn', 'splash'\], got 'flash'"),
    (None, "cpu", "float32", "attention must be one of"),
    ("cudnn", "cpu", "bfloat16", "attention='cudnn' needs an NVIDIA GPU"),
    ("cudnn", "gpu", "float32", "attention='cudnn' runs bfloat16 / float16 only, the compute dtype is float32"),
    ("splash", "gpu", "bfloat16", "attention='splash' is a TPU kernel"),
])
def test_unknown_or_unavailable_backend_is_a_clear_error(name, platform, dtype, message):
    with pytest.raises(AttentionBackendError, match=message):
        resolve_attention(name, platform, dtype)


def test_model_and_engine_refuse_an_unavailable_backend(tiny_ckpt, pair, monkeypatch):
    _, model = pair
    with pytest.raises(ValueError, match="attention='cudnn' needs an NVIDIA GPU"):
        LlavaOnevision.from_pretrained(tiny_ckpt, attention="cudnn")
    with pytest.raises(ValueError, match="got 'fast'"):
        model.attention = "fast"
    assert model.attention == "cpu"  # the failed assignment changed nothing
    with pytest.raises(AttentionBackendError, match="'auto'"):
        backends.get_backend("auto")
    from ov_jax.engine import Engine

    with pytest.raises(ValueError, match="attention='cudnn' runs bfloat16 / float16 only"):
        monkeypatch.setattr("ov_jax.engine.generate.platform_of", lambda params: "gpu")
        Engine(model.config, model.params, jnp.float32, attention="cudnn")
