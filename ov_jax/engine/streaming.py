"""Token streamers: receive each step's new tokens while ``generate`` runs.

``generate(streamer=...)`` accepts either a callable, called with one ``np.ndarray [B]`` of token ids per
step, or an object with transformers' streamer protocol (``put(tokens)`` per step, ``end()`` once).
Finished rows receive the pad id, as in transformers. :class:`TokenStreamer` is such an object that can
be iterated from another thread.
"""

from __future__ import annotations

import queue
from typing import Any, Callable, Iterator

import numpy as np

_END = object()


class TokenStreamer:
    """Iterator over per-step token arrays ``[B]``; fill it by passing it to ``generate`` in another thread.

    >>> streamer = TokenStreamer()
    >>> threading.Thread(target=model.generate, kwargs=dict(input_ids=ids, streamer=streamer)).start()
    >>> for tokens in streamer: ...
    """

    def __init__(self, timeout: float | None = None):
        self._queue: queue.Queue = queue.Queue()
        self.timeout = timeout

    def put(self, tokens: np.ndarray) -> None:
        self._queue.put(np.asarray(tokens))

    def end(self) -> None:
        self._queue.put(_END)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            item = self._queue.get(timeout=self.timeout)
            if item is _END:
                return
            yield item


def as_sink(streamer: Any) -> tuple[Callable[[np.ndarray], None], Callable[[], None]]:
    """``(put, end)`` for a callable or a ``put``/``end`` streamer; no-ops for None."""
    if streamer is None:
        return (lambda tokens: None), (lambda: None)
    if hasattr(streamer, "put"):
        return streamer.put, getattr(streamer, "end", lambda: None)
    if callable(streamer):
        return streamer, (lambda: None)
    raise TypeError(f"streamer must be callable or have put()/end() methods, got {type(streamer).__name__}")
