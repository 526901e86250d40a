"""Engine generation against transformers' ``generate`` on a tiny random checkpoint (greedy, token for token)."""

import threading

import numpy as np
import pytest

from ov_jax.engine import Buckets, Engine, TokenStreamer, engine_for
from ov_jax.geometry import image_tile_count, image_token_count, video_token_count

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BUCKETS = Buckets(batch=(1, 4), prompt=(64, 1536, 2560), cache=(96, 1568, 2592))
NEW = 24


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    from ov_jax.model import LlavaOnevision

    m = LlavaOnevision.from_pretrained(tiny_ckpt)
    engine_for(m, BUCKETS)
    return m


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ckpt).eval()


def hf_generate(reference, ids, mask, new_tokens, stop_ids, pad_id, **media):
    """transformers' greedy ``generate``, new tokens padded to ``new_tokens`` columns (it stops when all are done)."""
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new_tokens,
            do_sample=False, eos_token_id=list(stop_ids), pad_token_id=pad_id,
            **{k: torch.tensor(v) for k, v in media.items()})
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, new_tokens - new.shape[1])), constant_values=pad_id)


def text_ids(rng, n, config):
    return rng.integers(3, config.text.pad_token_id, n)


def image_prompt(rng, config, sizes, multi=False):
    """ids with one placeholder run per image (anyres, or multi-image when ``multi``), and its pixel values."""
    parts, tiles = [text_ids(rng, 3, config)], []
    for h, w in sizes:
        parts += [[config.image_token_id] * image_token_count(h, w, config.image_grid_pinpoints, multi_image=multi),
                  text_ids(rng, 2, config)]
        tiles.append(1 if multi else image_tile_count(h, w, config.image_grid_pinpoints))
    pixels = rng.standard_normal((len(sizes), max(tiles), 3, 384, 384)).astype(np.float32)
    return np.concatenate(parts), pixels


def video_prompt(rng, config, frames):
    ids = np.concatenate([text_ids(rng, 4, config), [config.video_token_id] * video_token_count(frames),
                          text_ids(rng, 3, config)])
    return ids, rng.standard_normal((1, frames, 3, 384, 384)).astype(np.float32)


def stops(model):
    return (model.config.text.eos_token_id,), model.config.text.pad_token_id


@pytest.mark.parametrize("size", [(300, 500), (1000, 200), (7, 500), (100, 10000),
                                  pytest.param((500, 300), marks=pytest.mark.slow),
                                  pytest.param((384, 384), marks=pytest.mark.slow)])
def test_greedy_single_image_matches_transformers(model, reference, size):
    rng = np.random.default_rng(sum(size))
    ids, pixels = image_prompt(rng, model.config, [size])
    ids, mask = ids[None], np.ones((1, len(ids)), np.int64)
    media = dict(pixel_values=pixels, image_sizes=np.array([size]))
    ours = model.generate(ids, mask, max_new_tokens=NEW, **media)
    np.testing.assert_array_equal(ours, hf_generate(reference, ids, mask, NEW, *stops(model), **media))


def test_greedy_multi_image_matches_transformers(model, reference):
    rng = np.random.default_rng(1)
    ids, pixels = image_prompt(rng, model.config, [(200, 300), (400, 250), (50, 50)], multi=True)
    ids, mask = ids[None], np.ones((1, len(ids)), np.int64)
    media = dict(pixel_values=pixels, image_sizes=np.array([(200, 300), (400, 250), (50, 50)]),
                 batch_num_images=np.array([3]))
    ours = model.generate(ids, mask, max_new_tokens=NEW, **media)
    np.testing.assert_array_equal(ours, hf_generate(reference, ids, mask, NEW, *stops(model), **media))


def test_greedy_video_matches_transformers(model, reference):
    rng = np.random.default_rng(2)
    ids, frames = video_prompt(rng, model.config, 3)
    ids, mask = ids[None], np.ones((1, len(ids)), np.int64)
    ours = model.generate(ids, mask, pixel_values_videos=frames, max_new_tokens=NEW)
    np.testing.assert_array_equal(ours, hf_generate(reference, ids, mask, NEW, *stops(model),
                                                    pixel_values_videos=frames))


def test_greedy_text_only_matches_transformers(model, reference):
    rng = np.random.default_rng(3)
    ids = text_ids(rng, 17, model.config)[None]
    mask = np.ones_like(ids)
    ours = model.generate(ids, mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(ours, hf_generate(reference, ids, mask, NEW, *stops(model)))


def mixed_batch(model, rng):
    """Left-padded batch: anyres image / two multi-images / video / text, as the processor would pad it."""
    config = model.config
    image_ids, image_pixels = image_prompt(rng, config, [(200, 380)])
    multi_ids, multi_pixels = image_prompt(rng, config, [(200, 300), (400, 250)], multi=True)
    video_ids, frames = video_prompt(rng, config, 2)
    rows = [image_ids, multi_ids, video_ids, text_ids(rng, 9, config)]
    length = max(map(len, rows))
    pad = config.text.pad_token_id
    ids = np.stack([np.concatenate([np.full(length - len(r), pad), r]) for r in rows])
    mask = np.stack([np.r_[np.zeros(length - len(r), np.int64), np.ones(len(r), np.int64)] for r in rows])
    pixels = np.zeros((3,) + image_pixels.shape[1:], np.float32)
    pixels[0] = image_pixels[0]
    pixels[1:, :1] = multi_pixels
    media = dict(pixel_values=pixels, image_sizes=np.array([(200, 380), (200, 300), (400, 250)]),
                 batch_num_images=np.array([1, 2, 0, 0]), pixel_values_videos=frames)
    return ids, mask, media


def text_batch(model, rng, lengths=(5, 17, 9, 30)):
    pad = model.config.text.pad_token_id
    width = max(lengths)
    ids = np.stack([np.r_[np.full(width - n, pad), text_ids(rng, n, model.config)] for n in lengths])
    return ids, (np.arange(width) >= width - np.array(lengths)[:, None]).astype(np.int64)


def test_greedy_left_padded_mixed_batch_matches_transformers(model, reference):
    ids, mask, media = mixed_batch(model, np.random.default_rng(4))
    ours = model.generate(ids, mask, max_new_tokens=NEW, **media)
    np.testing.assert_array_equal(ours, hf_generate(reference, ids, mask, NEW, *stops(model), **media))


def test_rows_stop_independently_and_pad_after_their_stop_token(model, reference):
    """Pick stop ids from the free-running output so rows stop at different steps; compare with transformers."""
    ids, mask = text_batch(model, np.random.default_rng(4))
    free = model.generate(ids, mask, max_new_tokens=NEW, stop_token_ids=[])
    stop_ids = (int(free[0, 3]), int(free[2, 10]))
    pad = model.config.text.pad_token_id
    ours = model.generate(ids, mask, max_new_tokens=NEW, stop_token_ids=stop_ids)
    np.testing.assert_array_equal(ours, hf_generate(reference, ids, mask, NEW, stop_ids, pad))
    for row in range(len(ours)):
        hits = np.flatnonzero(np.isin(free[row], stop_ids))
        if hits.size:
            end = hits[0] + 1
            np.testing.assert_array_equal(ours[row, :end], free[row, :end])
            assert (ours[row, end:] == pad).all()
        else:
            np.testing.assert_array_equal(ours[row], free[row])
    assert (ours[0, 4:] == pad).all()


def test_scanned_layout_and_python_loop_agree_with_defaults(model, reference):
    """The non-default decode paths (stacked-cache scan, Python-driven step) give the default path's tokens."""
    ids, mask = text_batch(model, np.random.default_rng(7))
    expected = model.generate(ids, mask, max_new_tokens=NEW)  # unrolled layout (CPU), device loop
    np.testing.assert_array_equal(expected, hf_generate(reference, ids, mask, NEW, *stops(model)))
    other = Engine(model.config, model.params, model.dtype, BUCKETS, layout="scanned", loop="python")
    np.testing.assert_array_equal(other.generate(ids, mask, max_new_tokens=NEW), expected)


def test_streamer_callback_and_iterator_see_every_step(model):
    ids, mask = text_batch(model, np.random.default_rng(5))
    media = {}
    steps = []
    out = model.generate(ids, mask, max_new_tokens=NEW, streamer=steps.append, **media)
    assert np.stack(steps, axis=1).shape[1] <= NEW
    np.testing.assert_array_equal(np.stack(steps, axis=1), out[:, :len(steps)])
    assert (out[:, len(steps):] == model.config.text.pad_token_id).all()

    streamer = TokenStreamer(timeout=120)
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=model.generate(
        ids, mask, max_new_tokens=NEW, streamer=streamer, **media)))
    worker.start()
    received = list(streamer)
    worker.join()
    np.testing.assert_array_equal(np.stack(received, axis=1), np.stack(steps, axis=1))
    np.testing.assert_array_equal(result["out"], out)


def test_sampling_is_reproducible_per_seed(model):
    rng = np.random.default_rng(6)
    ids = np.stack([text_ids(rng, 12, model.config) for _ in range(3)])
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.5, stop_token_ids=[])
    first = model.generate(ids, seed=7, **kwargs)
    np.testing.assert_array_equal(model.generate(ids, seed=7, **kwargs), first)
    assert not np.array_equal(model.generate(ids, seed=8, **kwargs), first)
    # top_k=1 leaves only the argmax: sampling must reproduce greedy decoding.
    greedy = model.generate(ids, max_new_tokens=16, stop_token_ids=[])
    np.testing.assert_array_equal(model.generate(ids, seed=1, **dict(kwargs, top_k=1)), greedy)


def test_blocked_causal_prefill_attention_equals_the_full_square():
    import jax.numpy as jnp

    from ov_jax.modeling.layers import attention
    from ov_jax.nn.attention import AttentionMeta, causal_block_attention
    from ov_jax.nn.backends.cpu import attention_by_head

    rng = np.random.default_rng(8)
    b, t, hd = 2, 700, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, hd), np.float32)) for n in (4, 2, 2))
    valid = np.arange(t)[None] >= np.array([[0], [250]])  # second row left-padded
    mask = AttentionMeta(causal=True, key_valid=jnp.asarray(valid)).mask(t, t)
    full, blocked = attention(q, k, v, mask), causal_block_attention(q, k, v, mask, attention, block=128)
    np.testing.assert_allclose(np.asarray(blocked)[valid], np.asarray(full)[valid], atol=2e-6)
    by_head = causal_block_attention(q, k, v, mask, attention_by_head, block=128)
    np.testing.assert_allclose(np.asarray(by_head)[valid], np.asarray(full)[valid], atol=2e-6)


@pytest.mark.parametrize("rows,slots", [(2, 96), (4, 4096)])  # both forms: below and above LONG_CACHE_ROW_SLOTS
def test_decode_attention_equals_the_model_attention(rows, slots):
    """The CPU decode path's attention over a heads-major cache, in both of its forms, against
    ``layers.attention`` on the sequence-major layout, with left padding and unwritten slots masked."""
    import jax.numpy as jnp

    from ov_jax.modeling.layers import attention
    from ov_jax.nn.backends.cpu import LONG_CACHE_ROW_SLOTS, decode_attention

    assert (rows * slots >= LONG_CACHE_ROW_SLOTS) == (slots == 4096)
    rng = np.random.default_rng(slots)
    q = jnp.asarray(rng.standard_normal((rows, 1, 6, 16), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((rows, slots, 2, 16), np.float32) * 3) for _ in range(2))
    starts, ends = rng.integers(0, slots // 2, rows), rng.integers(slots // 2, slots, rows)
    valid = (np.arange(slots)[None] >= starts[:, None]) & (np.arange(slots)[None] < ends[:, None])
    ours = decode_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), jnp.asarray(valid))
    expected = attention(q, k, v, jnp.asarray(valid)[:, None, :])
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), atol=1e-5)  # values up to ~10


@pytest.mark.parametrize("heads,kv_heads,masked", [(4, 2, True), (3, 3, False), (6, 1, True)])
def test_per_head_attention_equals_the_batched_one(heads, kv_heads, masked):
    """The CPU engine's attention (one 2-D product per kv head) against ``layers.attention``: GQA groups,
    bidirectional (no mask) and arbitrary masks."""
    import jax.numpy as jnp

    from ov_jax.modeling.layers import attention
    from ov_jax.nn.backends.cpu import attention_by_head

    rng = np.random.default_rng(heads)
    q = jnp.asarray(rng.standard_normal((2, 9, heads, 8), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((2, 11, kv_heads, 8), np.float32)) for _ in range(2))
    mask = jnp.asarray(rng.random((2, 9, 11)) > 0.4) if masked else None
    np.testing.assert_allclose(np.asarray(attention_by_head(q, k, v, mask)), np.asarray(attention(q, k, v, mask)),
                               atol=1e-6)
