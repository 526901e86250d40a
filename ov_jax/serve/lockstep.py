"""Multi-host serving: process 0 answers HTTP; every process runs the same scheduler steps.

On a mesh that spans several processes (`jax.distributed`, see `ov_jax.distributed`) every executable is one
SPMD program: each process must call the same executables with the same global inputs in the same order. A
`ov_jax.engine.Scheduler`'s sequence of device calls is a deterministic function of three things: the requests
submitted to it, the cancellations, and the device outputs it fetches (`ov_jax.sharding.fetch` gives every
process the same values). So the leader (process 0) replicates only the first two. Its request handlers hand
submissions and cancellations to a :class:`Lockstep` instead of the scheduler; before each ``Scheduler.work``
the device thread calls :meth:`Lockstep.lead`, which broadcasts what arrived since the previous step and then
applies it to the leader's scheduler. Every other process (a follower) loops on :meth:`Lockstep.follow` —
receive, apply the same changes to its own scheduler — and ``Scheduler.work``: the same device calls on the
same inputs, whose tokens it discards. Shutdown is broadcast the same way.

Each step broadcasts a fixed-size ``int32`` header: the command (step or shutdown), the payload's byte count,
and the leader's scheduler counters after its previous step (running rows, queued requests, decode chunks,
decoded tokens). A follower whose own counters differ raises :class:`LockstepError` rather than run
mismatched collectives. When requests arrive or leave, a payload follows: the new requests' host-side inputs
(the padded `ov_jax.engine.buckets.PaddedRequest` with its pixel values, per-row sampling settings, seed) and
the ids of cancelled ones, pickled (it travels only between the job's own processes) into a ``uint8`` buffer
whose size is rounded up to a power of two (at least 4 KiB), so the broadcast compiles one small program per
size class, not one per request. Broadcasts use `ov_jax.distributed.broadcast_from_writer`
(``jax.experimental.multihost_utils.broadcast_one_to_all``).

The scheduler itself is unchanged; the contract it must keep is determinism: no decision may depend on wall
time or on anything that differs between processes.
"""

from __future__ import annotations

import logging
import pickle
import threading
from typing import Any

import numpy as np

from ov_jax import distributed
from ov_jax.engine.scheduler import MediaJob, Request

log = logging.getLogger(__name__)

STEP, SHUTDOWN = 0, 1
HEADER_SIZE = 6  # command, payload bytes, then the four scheduler counters of :meth:`Lockstep._counters`
MIN_PAYLOAD = 4096


class LockstepError(RuntimeError):
    """A follower's scheduler diverged from the leader's (a bug: the scheduler made a non-deterministic step)."""


def payload_size(nbytes: int) -> int:
    """The broadcast buffer for ``nbytes`` of payload: the next power of two, at least ``MIN_PAYLOAD``."""
    return max(MIN_PAYLOAD, 1 << (int(nbytes) - 1).bit_length())


class Lockstep:
    """Keeps the schedulers of every process of a multi-host job in step (see the module docstring).

    On the leader, :meth:`submit`, :meth:`cancel`, :attr:`queued`, :meth:`wait_for_work` and :meth:`wake`
    stand in for the scheduler's methods of the same names (any thread); :meth:`lead` runs on the device
    thread before each ``work``. Followers call :meth:`follow` before each ``work``. ``feature_cache`` is the
    `ov_jax.engine.features.FeatureCache` followers give their requests' media jobs (the same size as the
    leader's, so both hit and miss alike).
    """

    def __init__(self, scheduler: Any, feature_cache: Any = None):
        self.scheduler = scheduler
        self.feature_cache = feature_cache
        self.leader = distributed.is_writer()
        self.closed = False
        self._lock = threading.Condition()
        self._submitted: list[Request] = []
        self._cancelled: list[Request] = []
        self._by_id: dict[int, Request] = {}  # live requests, under the same ids on every process
        self._id_of: dict[Request, int] = {}  # the leader's inverse of _by_id
        self._next_id = 0

    # --- the leader, any thread ----------------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue ``request`` for the next step (checked against the cache length first)."""
        self.scheduler.check_fits(request.row, request.max_new_tokens)
        with self._lock:
            self._submitted.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Cancel ``request`` at the next step on every process."""
        with self._lock:
            self._cancelled.append(request)
            self._lock.notify_all()

    @property
    def queued(self) -> int:
        """Requests waiting: those not yet broadcast plus the scheduler's queue."""
        return len(self._submitted) + self.scheduler.queued

    def wait_for_work(self, timeout: float) -> None:
        """Block until a submission or cancellation arrives (or ``timeout`` seconds pass)."""
        with self._lock:
            if not (self._submitted or self._cancelled):
                self._lock.wait(timeout)

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # --- the device thread ---------------------------------------------------------------------------------

    def lead(self, shutdown: bool = False) -> None:
        """Leader: broadcast the submissions and cancellations since the previous step (or the shutdown), then
        apply them to this process's scheduler. Every follower must be in :meth:`follow`."""
        self._forget_finished()
        with self._lock:
            submitted, self._submitted = self._submitted, []
            cancelled, self._cancelled = self._cancelled, []
        entries = []
        for request in submitted:
            self._remember(self._next_id, request)
            entries.append((self._next_id, request.row, request.settings, request.seed, request.row_index,
                            request.media is not None))
            self._next_id += 1
        cancel_ids = [self._id_of[r] for r in cancelled if r in self._id_of]
        payload = pickle.dumps((entries, cancel_ids), protocol=5) if entries or cancel_ids else b""
        header = np.array([SHUTDOWN if shutdown else STEP, len(payload), *self._counters()], np.int32)
        try:
            distributed.broadcast_from_writer(header)
            if payload:
                buffer = np.zeros(payload_size(len(payload)), np.uint8)
                buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
                distributed.broadcast_from_writer(buffer)
        except BaseException:
            self.closed = True  # the followers' state is unknown: never broadcast again
            raise
        if shutdown:
            self.closed = True
            return
        self._apply(submitted, cancel_ids)

    def follow(self) -> bool:
        """Follower: receive one step from the leader and apply it; False when the leader shut down."""
        self._forget_finished()
        header = distributed.broadcast_from_writer(np.zeros(HEADER_SIZE, np.int32))
        command, nbytes, leader_counters = int(header[0]), int(header[1]), tuple(int(x) for x in header[2:])
        if command == SHUTDOWN:
            self.closed = True
            return False
        if leader_counters != self._counters():
            raise LockstepError(f"this process's scheduler (running, queued, decode chunks, decoded tokens) = "
                                f"{self._counters()} diverged from process 0's {leader_counters}")
        if not nbytes:
            return True
        buffer = distributed.broadcast_from_writer(np.zeros(payload_size(nbytes), np.uint8))
        entries, cancel_ids = pickle.loads(buffer[:nbytes].tobytes())
        submitted = []
        for ident, row, settings, seed, row_index, has_media in entries:
            media = MediaJob(row.tower_inputs, self.feature_cache) if has_media else None
            request = Request(row, settings, seed=seed, row_index=row_index, media=media)
            self._remember(ident, request)
            submitted.append(request)
        self._apply(submitted, cancel_ids)
        return True

    def _apply(self, submitted: list[Request], cancel_ids: list[int]) -> None:
        for request in submitted:
            self.scheduler.submit(request)
        for ident in cancel_ids:
            self.scheduler.cancel(self._by_id[ident])

    def _remember(self, ident: int, request: Request) -> None:
        self._by_id[ident] = request
        if self.leader:
            self._id_of[request] = ident

    def _forget_finished(self) -> None:
        """Drop finished requests (the same ones on every process: they finish inside ``work``)."""
        for ident, request in list(self._by_id.items()):
            if request.finished:
                del self._by_id[ident]
                self._id_of.pop(request, None)

    def _counters(self) -> tuple[int, ...]:
        s = self.scheduler
        return tuple(int(v) % 2**31 for v in (s.running, s.queued, s.decode_chunks, s.decoded_tokens))
