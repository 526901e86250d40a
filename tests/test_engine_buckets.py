"""Buckets: zero compilations after warm-up, clear errors for prompts that do not fit, input validation."""

import jax
import numpy as np
import pytest

from ov_jax.engine import Buckets, Engine, PromptTooLongError
from ov_jax.geometry import image_tile_count, image_token_count, video_token_count
from ov_jax.media_plan import MediaMismatchError

BUCKETS = Buckets(batch=(1, 2), prompt=(256, 2048), cache=(272, 2056), tower_chunk=2)
NEW = 8


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from ov_jax.loading import load_params

    config, params = load_params(tiny_ckpt)
    return Engine(config, params, buckets=BUCKETS)


class CompileCounter:
    """Counts every XLA compilation in the process (jax.monitoring backend-compile events)."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COUNTER = CompileCounter()


def random_row(rng, config):
    """ids + media of one row: text only, an anyres image of random size, or a video of 1-4 frames."""
    pad, pins = config.text.pad_token_id, config.image_grid_pinpoints
    text = lambda: rng.integers(3, pad, rng.integers(1, 40))
    kind = rng.choice(["text", "image", "video"])
    if kind == "image":
        h, w = (int(v) for v in rng.integers(4, 385, 2))  # one 384 grid tile: 757 to 1485 tokens
        ids = np.r_[text(), [config.image_token_id] * image_token_count(h, w, pins), text()]
        pixels = rng.standard_normal((image_tile_count(h, w, pins), 3, 384, 384)).astype(np.float32)
        return ids, ("image", pixels, (h, w))
    if kind == "video":
        frames = int(rng.integers(1, 5))
        ids = np.r_[text(), [config.video_token_id] * video_token_count(frames), text()]
        return ids, ("video", rng.standard_normal((frames, 3, 384, 384)).astype(np.float32), frames)
    return text(), ("text", None, None)


def random_request(rng, config):
    """A left-padded batch of 1-2 rows; videos in one batch share a frame count, as the processor requires."""
    rows = [random_row(rng, config) for _ in range(int(rng.integers(1, 3)))]
    videos = [m for _, m in rows if m[0] == "video"]
    if len({m[2] for m in videos}) > 1:
        rows = [r for r in rows if r[1][0] != "video"] + [next(r for r in rows if r[1][0] == "video")]
    width = max(len(ids) for ids, _ in rows)
    pad = config.text.pad_token_id
    ids = np.stack([np.r_[np.full(width - len(r), pad), r] for r, _ in rows])
    mask = np.stack([np.arange(width) >= width - len(r) for r, _ in rows]).astype(np.int64)
    images = [m for _, m in rows if m[0] == "image"]
    media = {}
    if images:
        tiles = max(len(p) for _, p, _ in images)
        pixels = np.zeros((len(images), tiles, 3, 384, 384), np.float32)
        for i, (_, p, _) in enumerate(images):
            pixels[i, :len(p)] = p
        media.update(pixel_values=pixels, image_sizes=np.array([s for _, _, s in images]))
    videos = [m for _, m in rows if m[0] == "video"]
    if videos:
        media["pixel_values_videos"] = np.stack([p for _, p, _ in videos])
    return ids, mask, media


def test_no_compilation_after_warmup(engine):
    records = engine.warmup(max_new_tokens=NEW, progress=False)
    assert records and all(r.seconds > 0 for r in records)
    assert {r.name for r in records} == {"encode", "media_start", "media_add", "prefill", "prompt_kv", "prefill_chunk",
                                         "insert", "decode", "evict"}  # the 2048 bucket is prefilled in chunks
    compiled, events = engine.compile_count, COUNTER.count
    rng = np.random.default_rng(0)
    shapes = set()
    for _ in range(20):
        ids, mask, media = random_request(rng, engine.config)
        out = engine.generate(ids, mask, max_new_tokens=NEW, **media)
        assert out.shape == (len(ids), NEW)
        shapes.add((ids.shape, tuple(media.get("pixel_values", np.zeros(0)).shape)))
    assert len(shapes) > 15  # the requests really had different shapes
    assert engine.compile_count == compiled, engine.compile_log[compiled:]
    assert COUNTER.count == events, "a jax compilation happened outside the engine's executables"


def test_warmup_reports_each_bucket_and_caches_on_disk(tiny_ckpt, tmp_path):
    from ov_jax.loading import load_params

    config, params = load_params(tiny_ckpt)
    fresh = Engine(config, params, buckets=Buckets(batch=(1,), prompt=(32,), cache=(40,)))
    try:
        records = fresh.warmup(media=False, compilation_cache_dir=str(tmp_path), progress=False)
    finally:  # leave no persistent cache behind for the other tests of this process
        from jax._src import compilation_cache

        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
    assert [(r.name, r.key) for r in records] == [
        ("media_start", (32,)), ("prefill", (32,)), ("insert", (32, 40)), ("decode", (40,)), ("evict", (40,))]
    assert any(tmp_path.iterdir()), "the persistent compilation cache wrote nothing"
    assert fresh.warmup(media=False, progress=False) == []  # already compiled: nothing new


def test_prompt_longer_than_the_largest_bucket_is_a_clear_error(engine):
    config = engine.config
    h, w = 2304, 2304  # 7371 image tokens: more than the 2048-token prompt bucket
    ids = np.r_[[5, 6], [config.image_token_id] * image_token_count(h, w, config.image_grid_pinpoints), [7]][None]
    pixels = np.zeros((1, image_tile_count(h, w, config.image_grid_pinpoints), 3, 384, 384), np.float32)
    with pytest.raises(PromptTooLongError, match=r"7374 tokens \(3 text \+ 7371 image/video.*2048"):
        engine.generate(ids, pixel_values=pixels, image_sizes=np.array([(h, w)]), max_new_tokens=4)


def test_prompt_plus_new_tokens_beyond_the_cache_is_a_clear_error(engine):
    ids = np.arange(3, 203)[None]
    with pytest.raises(PromptTooLongError, match=r"max_new_tokens=4000 needs a KV cache of 4255 slots.*2056"):
        engine.generate(ids, max_new_tokens=4000)


def test_bad_requests_are_named(engine):
    ids = np.arange(3, 13)[None]
    with pytest.raises(ValueError, match="not left-padded"):
        engine.generate(ids, np.r_[np.ones(8), 0, 0][None].astype(int), max_new_tokens=2)
    with pytest.raises(ValueError, match="hold no tokens"):
        engine.generate(np.stack([ids[0], ids[0]]), np.stack([np.ones(10), np.zeros(10)]).astype(int))
    with pytest.raises(MediaMismatchError, match="image"):
        engine.generate(np.r_[[engine.config.image_token_id] * 5, [3]][None], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="batch of 3 rows exceeds"):
        engine.generate(np.stack([ids[0]] * 3), max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids must hold integers"):
        engine.generate(ids.astype(float), max_new_tokens=2)


def test_all_pad_leading_columns_do_not_change_the_result(engine):
    ids = np.arange(3, 13)[None]
    pad = engine.config.text.pad_token_id
    padded = np.r_[[pad] * 300, ids[0]][None]  # longer than the 256 bucket until the pad columns are dropped
    mask = (np.arange(310) >= 300).astype(np.int64)[None]
    np.testing.assert_array_equal(engine.generate(padded, mask, max_new_tokens=NEW),
                                  engine.generate(ids, max_new_tokens=NEW))
