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


# --- chunked text prefill ----------------------------------------------------------------------------------


def test_prefill_starts_cover_the_prompt_and_skip_padding_chunks():
    b = Buckets(prompt=(32, 96), prefill_chunk=32)
    assert b.prefill_starts(32, 30) is None  # one call
    assert b.prefill_starts(96, 70) == (0, 32, 64)
    assert b.prefill_starts(96, 50) == (32, 64)  # slots 0-31 hold only padding
    assert Buckets(prefill_chunk=40).prefill_starts(96, 90) == (0, 16, 56)  # the first chunk overlaps the next
    with pytest.raises(ValueError, match="prefill_chunk"):
        Buckets(prefill_chunk=0)


def run_prefill(engine, row):
    """``engine.prefill_row`` driven to the end: ``(logits, kv, calls)``."""
    steps = engine.prefill_row(row, engine.media_rows(row, []))
    calls = 1
    while True:
        try:
            next(steps)
            calls += 1
        except StopIteration as end:
            return (*end.value, calls)


def close(got, want, scale=5e-6):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=scale * float(np.abs(want).max()))


@pytest.mark.parametrize("attention", ["cpu", "xla"])
def test_chunked_prefill_equals_one_call(tiny_ckpt, attention):
    from ov_jax.engine import Engine
    from ov_jax.loading import load_params

    config, params = load_params(tiny_ckpt)
    engines = {c: Engine(config, params, buckets=Buckets(batch=(1,), prompt=(96,), cache=(128,), prefill_chunk=c),
                         decode_steps=4, attention=attention) for c in (32, 40, 96)}
    rng = np.random.default_rng(4)
    for length, chunk, calls in ((70, 32, 3), (50, 32, 2), (90, 40, 3)):
        ids = text(rng, config, length)
        (row,) = engines[96].prepare(ids[None])
        want_logits, want_kv, one = run_prefill(engines[96], row)
        logits, kv, n = run_prefill(engines[chunk], row)
        assert (one, n) == (1, calls)
        # float32 round-off: the chunks multiply 32-row instead of 96-row matrices and sum attention over other
        # (masked) key sets; measured up to 2.2e-6 of the largest logit (|logit| <= 11.4) and 1.6e-6 of the KV
        close(logits, want_logits)
        valid = row.attention_mask[0]
        for got, want in zip(kv, want_kv):
            close(np.asarray(got)[:, :, valid], np.asarray(want)[:, :, valid])
        if attention == "cpu" and chunk == 32:  # greedy tokens through insert and decode (the default backend)
            greedy = [e.generate(ids[None], max_new_tokens=12, stop_token_ids=[]) for e in (engines[96], engines[32])]
            np.testing.assert_array_equal(greedy[1], greedy[0])
    assert {r.name for r in engines[32].compile_log} >= {"prompt_kv", "prefill_chunk"}
    assert "prefill" not in {r.name for r in engines[32].compile_log}


def test_long_text_prefill_interleaves_with_decoding(tiny_ckpt):
    """Each prefill chunk of a long text prompt is one unit of work: a running row decodes between them, so the
    longest run of work() calls without a decode chunk is one chunk, not the whole prompt."""
    from ov_jax.engine import Engine
    from ov_jax.loading import load_params

    config, params = load_params(tiny_ckpt)
    engine = Engine(config, params, buckets=Buckets(batch=(2,), prompt=(32, 256), cache=(320,), prefill_chunk=32),
                    decode_steps=2)
    rng = np.random.default_rng(5)
    scheduler = Scheduler(engine, 320)
    running = scheduler.submit(request(engine, text(rng, config, 6), 60))
    while not running.tokens:
        scheduler.work()
    joining = scheduler.submit(request(engine, text(rng, config, 250), 3))
    progress, chunks = [], []
    while not joining.tokens:
        scheduler.work()
        progress.append(len(running.tokens))
        chunks.append(scheduler.decode_chunks)
    assert len(progress) >= 8  # 8 chunks of 32 slots, one per work() call
    assert all(b > a for a, b in zip(chunks, chunks[1:]))  # a decode chunk ran at every boundary
    assert progress == sorted(progress) and progress[-1] >= progress[0] + 2 * 7
    while scheduler.work():
        pass
    alone = engine.generate(text(np.random.default_rng(5), config, 6)[None], max_new_tokens=60, stop_token_ids=[],
                            seed=3)
    np.testing.assert_array_equal(running.tokens, alone[0])


# --- device errors -----------------------------------------------------------------------------------------


def alone(model, ids, new_tokens):
    return model.generate(ids[None], max_new_tokens=new_tokens, stop_token_ids=[], seed=3)[0]


def test_a_failing_decode_fails_the_running_rows_and_the_queue_is_served_after(model, fail_next_call):
    engine = engine_for(model)
    rng = np.random.default_rng(6)
    prompts = [text(rng, model.config, n) for n in (8, 11, 5)]
    want = alone(model, prompts[2], 9)
    scheduler = Scheduler(engine, 64)
    running = [scheduler.submit(request(engine, ids, 20)) for ids in prompts[:2]]
    while scheduler.running < 2:
        scheduler.work()
    waiting = scheduler.submit(request(engine, prompts[2], 9))
    armed = fail_next_call(engine, "_decode")
    scheduler.work()
    assert not armed[0]
    for r in running:
        assert r.finished and r.done.is_set() and isinstance(r.error, RuntimeError)
        assert "injected _decode failure" in str(r.error)
    assert scheduler.running == 0 and not waiting.finished
    while scheduler.work():
        pass
    assert waiting.error is None
    np.testing.assert_array_equal(waiting.tokens, want)


def test_a_failing_insert_fails_the_batch_and_a_failing_prefill_only_its_request(model, fail_next_call):
    engine = engine_for(model)
    rng = np.random.default_rng(7)
    first, second, third = (text(rng, model.config, n) for n in (6, 9, 7))
    scheduler = Scheduler(engine, 64)
    running = scheduler.submit(request(engine, first, 30))
    while not running.tokens:
        scheduler.work()
    fail_next_call(engine, "_prefill")
    bad_prefill = scheduler.submit(request(engine, second, 5))
    while not bad_prefill.finished:
        scheduler.work()
    assert "injected _prefill failure" in str(bad_prefill.error) and not bad_prefill.tokens
    assert scheduler.running == 1 and running.error is None  # the running row goes on

    fail_next_call(engine, "_insert")
    bad_insert = scheduler.submit(request(engine, second, 5))
    while not bad_insert.finished:
        scheduler.work()
    for r in (bad_insert, running):
        assert r.finished and "injected _insert failure" in str(r.error)
    assert scheduler.running == 0

    after = scheduler.submit(request(engine, third, 8))
    while scheduler.work():
        pass
    assert after.error is None
    np.testing.assert_array_equal(after.tokens, alone(model, third, 8))


def test_generate_raises_a_device_error_and_the_next_call_works(model, fail_next_call):
    rng = np.random.default_rng(8)
    ids = text(rng, model.config, 10)
    want = alone(model, ids, 10)
    fail_next_call(engine_for(model), "_decode")
    with pytest.raises(RuntimeError, match="injected _decode failure"):
        alone(model, ids, 10)
    np.testing.assert_array_equal(alone(model, ids, 10), want)


def test_a_generate_batch_starts_decoding_whole(model, monkeypatch):
    """The rows of one generate call are all prefilled before the first decode chunk (a partial batch would
    decode a chunk per joining row), and the answers equal each row's alone."""
    rng = np.random.default_rng(5)
    config = model.config
    ids = np.stack([text(rng, config, 12), text(rng, config, 12)])
    alone = [model.generate(row[None], max_new_tokens=9, stop_token_ids=[])[0] for row in ids]
    running_at_decode = []
    decode = Scheduler._decode

    def spy(self):
        running_at_decode.append(self.running)
        return decode(self)

    monkeypatch.setattr(Scheduler, "_decode", spy)
    together = model.generate(ids, max_new_tokens=9, stop_token_ids=[])
    assert running_at_decode and running_at_decode[0] == 2
    for got, want in zip(together, alone):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
