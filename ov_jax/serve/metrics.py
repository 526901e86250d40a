"""Prometheus metrics of a running server (its own registry, so several servers in one process never clash)."""

from __future__ import annotations

import collections
import time
from typing import Any


class Metrics:
    """Queue length, running rows, decode tokens/s (over the last 10 s), time to first token, request counts,
    compilations and feature-cache hits of a `ov_jax.serve.app.Service`."""

    WINDOW_S = 10.0

    def __init__(self, service: Any):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        scheduler, engine = service.scheduler, service.engine
        Gauge("ov_jax_queue_length", "requests waiting for a slot or being prefilled",
              registry=self.registry).set_function(lambda: scheduler.queued)
        Gauge("ov_jax_running_rows", "rows in the decode batch", registry=self.registry).set_function(
            lambda: scheduler.running)
        Gauge("ov_jax_compilations", "executables compiled since start", registry=self.registry).set_function(
            lambda: engine.compile_count)
        Gauge("ov_jax_feature_cache_hits", "vision-feature cache hits", registry=self.registry).set_function(
            lambda: service.feature_cache.hits)
        self._rate = Gauge("ov_jax_decode_tokens_per_second", "decoded tokens per second over the last 10 s",
                           registry=self.registry)
        self._ttft = Histogram("ov_jax_time_to_first_token_seconds", "submission to first token",
                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self._tokens = Counter("ov_jax_generated_tokens", "completion tokens", registry=self.registry)
        self._requests = Counter("ov_jax_requests", "finished requests by outcome", ["outcome"],
                                 registry=self.registry)
        self._samples: collections.deque = collections.deque()

    def observe_rate(self, decoded_total: int) -> None:
        now = time.monotonic()
        self._samples.append((now, decoded_total))
        while self._samples and self._samples[0][0] < now - self.WINDOW_S:
            self._samples.popleft()
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        self._rate.set((n1 - n0) / (t1 - t0) if t1 > t0 else 0.0)

    def finished(self, completion: Any) -> None:
        request = completion.request
        if request.first_token_at is not None:
            self._ttft.observe(request.first_token_at - request.submitted_at)
        self._tokens.inc(len(completion.tokens))
        outcome = "error" if request.error is not None else completion.finish_reason or "cancelled"
        self._requests.labels(outcome).inc()

    def rejected(self, status: int) -> None:
        self._requests.labels(f"http_{status}").inc()

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
