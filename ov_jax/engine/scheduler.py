"""Continuous batching: requests join a running decode batch at step boundaries and leave when done.

A :class:`Scheduler` owns one decode batch (``engine.slots`` rows, a KV cache of ``cache_length`` slots) and
advances it in :meth:`Scheduler.work` calls, each one unit of work:

1. cancelled requests leave (a running row is evicted, its slot freed);
2. prefilled rows take free slots (``insert``: their first token is chosen there);
3. if rows are running, one decode chunk (``engine.decode_steps`` steps on device) runs for all of them —
   unless every running row belongs to a batched call (``Request.group``) whose other rows are still being
   prefilled into free slots: a ``generate`` batch starts decoding whole;
4. one unit of prefill runs for the oldest waiting request: one vision-tower chunk (tiles or frames), or one
   text-prefill call of one row (the media rows + the whole prompt, or one ``Buckets.prefill_chunk``-slot chunk
   of a longer prompt bucket). A long video or a long text prompt therefore enters the batch a chunk at a time
   between decode chunks instead of stalling every running row for its whole tower pass or prefill.

Rows are prefilled only while a free slot waits for them, so prefilled KV never piles up. The KV cache is
one dense ``[slots, cache_length]`` block per layer, not paged: every row's slots are contiguous, inserts are
one copy, and decode attention stays a dense product the XLA backends run fast; the price is that each row
reserves ``cache_length`` slots (sized by the deployment, see `ov_jax.serve`).

``work`` runs on one thread (the one that owns the device); :meth:`submit` and :meth:`cancel` may be called
from any thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from ov_jax import sharding as sh
from ov_jax.engine.buckets import PaddedRequest, PromptTooLongError
from ov_jax.engine.features import pixel_key

log = logging.getLogger(__name__)


class MediaJob:
    """The tower features of one request's tiles and frames, computed a chunk at a time and shared by its rows.

    With a ``cache`` (`ov_jax.engine.features.FeatureCache`) features of the same pixel values come from it
    (no tower call) and newly computed ones are stored once the last chunk is encoded."""

    def __init__(self, tower_inputs: np.ndarray, cache: Any = None):
        self.tower_inputs = tower_inputs
        self.features: list = []
        self.complete = False
        self._cache, self._key = cache, None

    def encode_next(self, engine: Any) -> None:
        """Encode the next chunk (one tower call), or take every chunk from the cache."""
        if self._cache is not None and not self.features:
            self._key = pixel_key(self.tower_inputs, engine.tower_chunk)
            cached = self._cache.get(self._key)
            if cached is not None:
                self.features, self.complete = cached, True
                return
        first = len(self.features) * engine.tower_chunk
        self.features.append(engine.encode_chunk(self.tower_inputs, first))
        if len(self.features) * engine.tower_chunk >= len(self.tower_inputs):
            self.complete = True
            if self._cache is not None:
                self._cache.put(self._key, self.features)


class Request:
    """One row to generate. ``tokens`` grows as the scheduler emits them (the stop token included);
    ``on_tokens(new_tokens, finished)`` is called on the scheduler's thread after each step boundary.
    ``group``: any object shared by the rows of one batched call (``generate``): while every running row's
    group still has rows to prefill and a slot free for them, the scheduler prefills instead of decoding, so a
    batch starts decoding whole rather than paying a partial-batch decode chunk per joining row."""

    def __init__(self, row: PaddedRequest, settings: Any, seed: int = 0, row_index: int = 0,
                 media: MediaJob | None = None, on_tokens: Callable[[list[int], bool], None] | None = None,
                 group: Any = None):
        self.row = row
        self.group = group
        self.settings = settings
        self.seed = int(seed) % 2**32
        self.row_index = int(row_index)
        self.media = media
        self.on_tokens = on_tokens
        self.max_new_tokens = int(settings.max_new_tokens[0])
        self.stop_ids = {int(i) for i in settings.stop_ids[0] if i >= 0}
        self.tokens: list[int] = []
        self.error: BaseException | None = None
        self.cancelled = False
        self.finished = False
        self.done = threading.Event()
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.slot: int | None = None
        self._prefilled: tuple | None = None
        self._units = None

    def _deliver(self, new: list[int], finished: bool) -> None:
        if new and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.extend(new)
        if finished:
            self.finished = True
        if self.on_tokens is not None:
            try:
                self.on_tokens(new, finished)
            except Exception:  # noqa: BLE001  (a failing consumer must not disturb the batch)
                log.exception("the token consumer of a request failed")
        if finished:
            self.done.set()

    def _fail(self, error: BaseException | None) -> None:
        self.error = error
        self._deliver([], True)


class Scheduler:
    """Continuous batching over ``engine`` (an `ov_jax.engine.Engine`) with a ``cache_length``-slot KV cache."""

    def __init__(self, engine: Any, cache_length: int):
        self.engine = engine
        self.cache_length = int(cache_length)
        self.slots = engine.slots
        self._cache, self._state = engine.empty_batch(self.cache_length)
        self._running: dict[int, Request] = {}
        self._waiting: collections.deque[Request] = collections.deque()
        self._ready: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self.decode_chunks = 0
        self.decoded_tokens = 0

    # --- any thread ----------------------------------------------------------------------------------------

    def check_fits(self, row: PaddedRequest, max_new_tokens: int) -> None:
        """Raise `PromptTooLongError` when the row's padded prompt plus its new tokens exceed the cache."""
        needed = row.prompt_length + max_new_tokens - 1
        if needed > self.cache_length:
            raise PromptTooLongError(
                f"the prompt ({row.length} tokens: {row.length - row.media_tokens} text + {row.media_tokens} "
                f"image/video, padded to the {row.prompt_length}-token bucket) plus max_new_tokens={max_new_tokens} "
                f"needs {needed} KV slots but this scheduler's cache holds {self.cache_length}")

    def submit(self, request: Request) -> Request:
        """Queue ``request`` (checked against the cache length first)."""
        self.check_fits(request.row, request.max_new_tokens)
        with self._lock:
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Ask for ``request`` to leave at the next step boundary (its slot is freed there)."""
        with self._lock:
            request.cancelled = True
            self._lock.notify_all()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._waiting) + len(self._ready)

    def wait_for_work(self, timeout: float) -> None:
        """Block until something is queued or running (or ``timeout`` seconds pass)."""
        with self._lock:
            if not (self._waiting or self._ready or self._running):
                self._lock.wait(timeout)

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # --- the device thread ---------------------------------------------------------------------------------

    def work(self) -> bool:
        """One step boundary (see the module docstring). Returns whether anything is left to do.

        An exception raised by a call on the running batch (evict, insert, decode) fails every row in the batch
        with that error and replaces the batch by an empty one (the failed call may have consumed the donated
        cache and state); one raised while prefilling a request fails that request. Either way the rest of
        the queue is served afterwards."""
        try:
            self._drop_cancelled()
            self._admit()
            if self._running and not self._group_joining():
                self._decode()
        except Exception as error:  # noqa: BLE001  (any device or runtime error: fail the batch, not the loop)
            self._fail_batch(error)
        self._prefill_unit()
        return bool(self._running or self._ready or self._waiting)

    def _group_joining(self) -> bool:
        """Whether every running row belongs to a group with rows still to prefill while a slot is free."""
        if not self._free_slots():
            return False
        with self._lock:
            pending = {id(r.group) for r in (*self._waiting, *self._ready) if r.group is not None}
        return all(r.group is not None and id(r.group) in pending for r in self._running.values())

    def _fail_batch(self, error: BaseException) -> None:
        log.error("a call on the running batch failed; failing its %d row(s): %r", len(self._running), error)
        failed = list(self._running.values())
        self._running.clear()
        self._cache, self._state = self.engine.empty_batch(self.cache_length)
        for request in failed:
            request.slot = None
            request._fail(error)

    def _drop_cancelled(self) -> None:
        with self._lock:
            for queue in (self._waiting, self._ready):
                for request in [r for r in queue if r.cancelled]:
                    queue.remove(request)
                    request._fail(None)
        for slot, request in list(self._running.items()):
            if request.cancelled:
                self._state = self.engine._evict(self.cache_length)(self._state, np.int32(slot))
                del self._running[slot]
                request.slot = None
                request._fail(None)

    def _free_slots(self) -> list[int]:
        return [s for s in range(self.slots) if s not in self._running]

    def _admit(self) -> None:
        for slot in self._free_slots():
            if not self._ready:
                return
            request = self._ready.popleft()
            kv, logits, mask = request._prefilled
            request._prefilled = None
            request.slot, self._running[slot] = slot, request  # a failing insert fails it with the batch
            t = mask.shape[1]
            self._cache, self._state, first = self.engine._insert(t, self.cache_length)(
                self._cache, self._state, kv, logits, mask, np.int32(slot), request.settings,
                np.uint32(request.seed), np.int32(request.row_index))
            token = int(sh.fetch(first))
            finished = token in request.stop_ids or request.max_new_tokens <= 1
            if finished:
                del self._running[slot]
                request.slot = None
            request._deliver([token], finished)

    def _decode(self) -> None:
        self._cache, self._state, tokens, emitted = self.engine._decode(self.cache_length)(
            self.engine._decode_params, self.engine._layers, self._cache, self._state)
        tokens, emitted, done = sh.fetch(tokens), sh.fetch(emitted), sh.fetch(self._state.done)
        self.decode_chunks += 1
        for slot, request in list(self._running.items()):
            new = tokens[slot][emitted[slot]].tolist()
            self.decoded_tokens += len(new)
            if done[slot]:
                del self._running[slot]
                request.slot = None
            request._deliver(new, bool(done[slot]))

    def _prefill_unit(self) -> None:
        """One tower chunk or one prefill call for the oldest waiting request, while a slot waits for it."""
        if len(self._ready) >= len(self._free_slots()):
            return
        with self._lock:
            if not self._waiting:
                return
            request = self._waiting[0]
        try:
            if request._units is None:
                request._units = self._units(request)
            next(request._units)
        except StopIteration:  # the row is prefilled
            with self._lock:
                self._waiting.popleft()
                self._ready.append(request)
        except Exception as error:  # noqa: BLE001  (a bad request or a failed prefill call fails alone)
            with self._lock:
                if self._waiting and self._waiting[0] is request:
                    self._waiting.popleft()
            request._fail(error)

    def _units(self, request: Request):
        """Generator of prefill units: yields after each tower chunk and each prefill call but the last, ends
        when the row is prefilled."""
        engine, row = self.engine, request.row
        media = request.media
        if media is not None and row.is_media.any():
            while not media.complete:
                media.encode_next(engine)
                yield
        features = media.features if media is not None else []
        rows = engine.media_rows(row, features)
        mask = jax.device_put(row.attention_mask)
        logits, kv = yield from engine.prefill_row(row, rows)
        request._prefilled = (kv, jax.block_until_ready(logits), mask)  # a failed prefill fails here, alone
