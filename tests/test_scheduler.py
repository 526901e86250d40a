"""Continuous batching: rows join and leave a running batch without changing any answer; cancellation frees a
slot; the vision-feature cache hits on a repeated image and changes no output."""

import numpy as np
import pytest

from ov_jax.engine import Buckets, Request, Scheduler, engine_for
from ov_jax.engine.features import FeatureCache
from ov_jax.engine.scheduler import MediaJob
from ov_jax.geometry import image_tile_count, image_token_count

BUCKETS = Buckets(batch=(1, 2), prompt=(32, 2048), cache=(64, 2080), tower_chunk=2)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    from ov_jax.model import LlavaOnevision

    m = LlavaOnevision.from_pretrained(tiny_ckpt)
    engine_for(m, BUCKETS, decode_steps=4)
    return m


def text(rng, config, n):
    return rng.integers(3, config.text.pad_token_id, n)


def image_request(rng, config, size=(300, 500)):
    ids = np.r_[text(rng, config, 3), [config.image_token_id] * image_token_count(*size, config.image_grid_pinpoints),
                text(rng, config, 2)]
    tiles = image_tile_count(*size, config.image_grid_pinpoints)
    return ids, dict(pixel_values=rng.standard_normal((1, tiles, 3, 384, 384)).astype(np.float32),
                     image_sizes=np.array([size]))


def request(engine, ids, new_tokens, media=None, **sampling):
    gen = engine.generation_config.merged(max_new_tokens=new_tokens, eos_token_id=[], **sampling)
    (row,) = engine.prepare(ids[None], **(media or {}), generation_config=gen)
    return Request(row, engine.row_settings(gen, new_tokens), seed=3,
                   media=None if media is None else MediaJob(row.tower_inputs))


def test_rows_join_and_leave_mid_flight_without_changing_answers(model):
    engine = engine_for(model)
    config = model.config
    rng = np.random.default_rng(0)
    prompts = [(text(rng, config, 9), 17, {}), (text(rng, config, 20), 5, {}),
               (text(rng, config, 4), 11, dict(do_sample=True, temperature=1.5)), (text(rng, config, 14), 9, {})]
    alone = [model.generate(ids, max_new_tokens=n, stop_token_ids=[], seed=3, **kw)[0] for ids, n, kw in prompts]

    scheduler = Scheduler(engine, 64)
    first = scheduler.submit(request(engine, prompts[0][0], prompts[0][1], **prompts[0][2]))
    scheduler.work()
    scheduler.work()
    assert scheduler.running == 1 and 0 < len(first.tokens) < prompts[0][1]  # decoding when the others join
    rest = [scheduler.submit(request(engine, ids, n, **kw)) for ids, n, kw in prompts[1:]]
    seen_running = set()
    while scheduler.work():
        seen_running.add(scheduler.running)
    assert 2 in seen_running  # two rows shared the batch (two slots) while the queue drained
    for req, want in zip([first] + rest, alone):
        assert req.finished and req.error is None
        np.testing.assert_array_equal(req.tokens, want)


def test_cancellation_frees_the_slot_for_a_waiting_request(model):
    engine = engine_for(model)
    rng = np.random.default_rng(1)
    scheduler = Scheduler(engine, 64)
    long_ones = [scheduler.submit(request(engine, text(rng, model.config, 8), 30)) for _ in range(2)]
    waiting = scheduler.submit(request(engine, text(rng, model.config, 8), 6))
    for _ in range(4):
        scheduler.work()
    assert scheduler.running == 2 and not waiting.tokens
    scheduler.cancel(long_ones[0])
    scheduler.work()
    assert long_ones[0].finished and long_ones[0].error is None and len(long_ones[0].tokens) < 30
    while not waiting.finished:
        scheduler.work()
    assert len(waiting.tokens) == 6 and not long_ones[1].finished  # it took the freed slot while the other ran
    scheduler.cancel(long_ones[1])
    while scheduler.work():
        pass
    assert scheduler.running == 0 and scheduler.queued == 0


def test_prefill_interleaves_with_decoding(model):
    """A media request's tower chunks run between decode chunks of a running row (one unit per boundary)."""
    engine = engine_for(model)
    rng = np.random.default_rng(2)
    scheduler = Scheduler(engine, 2080)
    running = scheduler.submit(request(engine, text(rng, model.config, 6), 30))
    while not running.tokens:
        scheduler.work()
    ids, media = image_request(rng, model.config)
    joining = scheduler.submit(request(engine, ids, 4, media))
    progress = []
    while not joining.tokens:
        scheduler.work()
        progress.append(len(running.tokens))
    assert len(progress) >= 3 and progress == sorted(progress) and progress[-1] > progress[0]


def test_feature_cache_hits_on_a_repeated_image_and_changes_no_output(model):
    engine = engine_for(model)
    rng = np.random.default_rng(3)
    ids, media = image_request(rng, model.config)
    plain = model.generate(ids[None], max_new_tokens=6, **media)
    engine.feature_cache = FeatureCache(max_bytes=64 << 20)
    try:
        first = model.generate(ids[None], max_new_tokens=6, **media)
        assert (engine.feature_cache.hits, engine.feature_cache.misses, len(engine.feature_cache)) == (0, 1, 1)
        second = model.generate(ids[None], max_new_tokens=6, **media)
        assert engine.feature_cache.hits == 1
        other = dict(media, pixel_values=media["pixel_values"] + 1.0)
        model.generate(ids[None], max_new_tokens=6, **other)
        assert (engine.feature_cache.hits, engine.feature_cache.misses) == (1, 2)
    finally:
        engine.feature_cache = None
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(second, plain)


def test_feature_cache_is_bounded_in_bytes():
    cache = FeatureCache(max_bytes=100)
    cache.put("a", [np.zeros(10, np.float32)])  # 40 bytes
    cache.put("b", [np.zeros(10, np.float32)])
    cache.get("a")  # a is now the most recent
    cache.put("c", [np.zeros(10, np.float32)])  # 120 > 100: the least recently used (b) goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    cache.put("huge", [np.zeros(100, np.float32)])  # larger than the whole cache: not kept
    assert cache.get("huge") is None and cache.bytes == 80
