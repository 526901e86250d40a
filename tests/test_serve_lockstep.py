"""`ov_jax.serve.lockstep` in one process: a leader and a follower scheduler over the same engine, joined by an
in-memory stand-in for the broadcast, run the same steps (same tokens, same cancellations, same shutdown), and
a follower that diverges stops with `LockstepError`. The real two-process job is in test_serve_distributed.py."""

import collections

import numpy as np
import pytest

from ov_jax.engine import Buckets, Request, Scheduler, engine_for
from ov_jax.serve import lockstep as ls

BUCKETS = Buckets(batch=(2,), prompt=(32,), cache=(64,))


class Channel:
    """Replaces `distributed.broadcast_from_writer`: the leader's values are queued, the follower reads them."""

    def __init__(self):
        self.sent: collections.deque = collections.deque()
        self.leading = True
        self.sizes: list[int] = []

    def __call__(self, value):
        value = np.asarray(value)
        if self.leading:
            self.sent.append(value.copy())
            self.sizes.append(value.size)
            return value
        got = self.sent.popleft()
        assert got.shape == value.shape and got.dtype == value.dtype  # every process passes the same shapes
        return got


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from ov_jax.model import LlavaOnevision

    return engine_for(LlavaOnevision.from_pretrained(tiny_ckpt), BUCKETS, decode_steps=4)


@pytest.fixture
def pair(engine, monkeypatch):
    channel = Channel()
    monkeypatch.setattr(ls.distributed, "broadcast_from_writer", channel)
    leader, follower = ls.Lockstep(Scheduler(engine, 64)), ls.Lockstep(Scheduler(engine, 64))
    follower.leader = False
    received = []
    submit = follower.scheduler.submit
    follower.scheduler.submit = lambda r: received.append(r) or submit(r)
    return leader, follower, channel, received


def step(leader, follower, channel, shutdown=False):
    channel.leading = True
    leader.lead(shutdown=shutdown)
    if not shutdown:
        leader.scheduler.work()
    channel.leading = False
    if follower.follow():
        follower.scheduler.work()
        return True
    return False


def make_request(engine, rng, n, new_tokens, **sampling):
    gen = engine.generation_config.merged(max_new_tokens=new_tokens, eos_token_id=[], **sampling)
    (row,) = engine.prepare(rng.integers(3, 200, n)[None], generation_config=gen)
    return Request(row, engine.row_settings(gen, new_tokens), seed=int(rng.integers(1000)))


def test_the_follower_runs_the_leaders_steps_with_the_same_tokens_and_shuts_down(engine, pair):
    leader, follower, channel, received = pair
    rng = np.random.default_rng(0)
    sent = [leader.submit(make_request(engine, rng, 9, 14)),
            leader.submit(make_request(engine, rng, 20, 30, do_sample=True, temperature=1.3))]
    assert leader.queued == 2 and leader.scheduler.queued == 0  # held until the next step
    for _ in range(3):
        step(leader, follower, channel)
    assert leader.scheduler.running == 2
    leader.cancel(sent[1])  # leaves mid-flight on both processes
    sent.append(leader.submit(make_request(engine, rng, 5, 6)))  # takes the freed slot
    payload_steps = 2
    while not all(r.finished for r in sent):
        step(leader, follower, channel)
    assert not step(leader, follower, channel, shutdown=True) and leader.closed and follower.closed
    assert not channel.sent  # the follower consumed every broadcast

    assert len(received) == 3 and all(r.finished for r in received)
    assert [r.tokens for r in received] == [r.tokens for r in sent]
    assert [r.cancelled for r in received] == [r.cancelled for r in sent] == [False, True, False]
    assert len(sent[0].tokens) == 14 and len(sent[2].tokens) == 6 and 0 < len(sent[1].tokens) < 30
    assert follower._by_id == {} and leader._id_of == {}  # finished requests are forgotten everywhere
    # one header per step, and a payload only on the two steps that carried submissions or cancellations
    assert channel.sizes.count(ls.HEADER_SIZE) == len(channel.sizes) - payload_steps
    assert all(s >= ls.MIN_PAYLOAD for s in channel.sizes if s != ls.HEADER_SIZE)


def test_a_follower_out_of_step_stops_with_a_clear_error(engine, pair):
    leader, follower, channel, _ = pair
    rng = np.random.default_rng(1)
    leader.submit(make_request(engine, rng, 9, 8))
    step(leader, follower, channel)
    follower.scheduler.submit(make_request(engine, rng, 9, 8))  # a request process 0 never sent
    with pytest.raises(ls.LockstepError, match="diverged from process 0's"):
        step(leader, follower, channel)


def test_payload_sizes_are_powers_of_two_classes():
    assert ls.payload_size(1) == ls.payload_size(ls.MIN_PAYLOAD) == ls.MIN_PAYLOAD
    assert ls.payload_size(ls.MIN_PAYLOAD + 1) == 2 * ls.MIN_PAYLOAD
    sizes = {ls.payload_size(n) for n in np.random.default_rng(0).integers(1, 60 << 20, 1000)}
    assert all(s & (s - 1) == 0 for s in sizes) and len(sizes) <= 15
