"""Token streamers: receive each step's new tokens while ``generate`` runs.

``generate(streamer=...)`` accepts either a callable, called with one ``np.ndarray [B]`` of token ids per
step, or an object with transformers' streamer protocol (``put(tokens)`` per step, ``end()`` once).
Finished rows receive the pad id, as in transformers. :class:`TokenStreamer` is such an object that can
be iterated from another thread; :class:`TextStreamer` prints the text as it grows.
"""

from __future__ import annotations

import queue
import sys
import time
from typing import Any, Callable, Iterator, Sequence

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


class TextStreamer:
    """Prints row 0's new tokens as text to ``out`` (default stdout) while ``generate`` runs; stops printing at
    a stop token. ``processor``: anything with ``decode(ids, skip_special_tokens=True)``; ``count`` and
    ``first_token_time`` (``time.perf_counter``) are there for throughput reports.

    The whole answer is re-decoded at each step and only the new suffix is printed, so multi-byte
    characters split across tokens appear once complete (as transformers' ``TextStreamer``).
    """

    def __init__(self, processor, stop_ids: Sequence[int], out=None):
        self.processor, self.stop_ids, self.out = processor, set(stop_ids), out or sys.stdout
        self.tokens: list[int] = []
        self.printed = ""
        self.finished = False
        self.first_token_time: float | None = None
        self.count = 0

    def put(self, tokens) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        if self.finished:
            return
        token = int(tokens[0])
        self.count += 1
        if token in self.stop_ids:
            self.finished = True
            return
        self.tokens.append(token)
        text = self.processor.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._write(text)

    def end(self) -> None:
        self._write(self.processor.decode(self.tokens, skip_special_tokens=True))
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text
