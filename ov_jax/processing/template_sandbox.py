"""Chat templates rendered in a worker process with bounded time, memory and output.

A chat template is code from the checkpoint. jinja2's sandbox stops it from reaching Python objects, but not
from running forever (``{% for i in range(100000) %}{% for j in range(100000) %}...``), from building huge
strings, or from computing ``10 ** 10 ** 9`` in one native call that no in-process check can interrupt. So
templates are compiled in the environment transformers uses (jinja2's immutable sandbox, ``trim_blocks`` /
``lstrip_blocks``, loop controls, ``tojson`` / ``raise_exception`` / ``strftime_now``, a ``{% generation %}``
tag that renders its body unchanged and can report its spans) and rendered in a worker process (a
``subprocess`` running this file on its own: it imports only the standard library and jinja2) with these
bounds:

- time: :data:`RENDER_TIMEOUT_S` seconds of wall clock per :func:`render` call; past it the worker is killed;
- output: :data:`MAX_RENDERED_CHARS` characters per rendered conversation (checked while rendering);
- memory: :data:`WORKER_MEMORY_BYTES` of address space (``RLIMIT_AS``; Linux and macOS);
- ``range``: at most 100,000 items per call (jinja2's sandbox).

Every failure, including sandbox refusals (``SecurityError``), template syntax errors, ``raise_exception``
and crashes of the worker, is a :class:`ChatTemplateError` (a ``ValueError``) naming the template. The worker
is started on first use, reused while it behaves, and restarted in a forked child process.
"""

from __future__ import annotations

import atexit
import contextvars
import datetime
import functools
import json
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDER_TIMEOUT_S = 10.0
MAX_RENDERED_CHARS = 4_000_000
WORKER_MEMORY_BYTES = 2 << 30


class ChatTemplateError(ValueError):
    """A chat template that does not parse, is refused by the sandbox, raises, or exceeds a bound."""


# While a span-tracking render runs: (pieces rendered so far, generation spans found so far).
_GENERATION_TRACKER: contextvars.ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = contextvars.ContextVar(
    "generation_tracker", default=None)


class GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body unchanged; in :func:`render_with_spans` it also
    records the body's ``[start, end)`` character span (as transformers' ``AssistantTracker``)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller) -> str:
        text = caller()
        tracker = _GENERATION_TRACKER.get()
        if tracker is not None:
            pieces, spans = tracker
            start = sum(len(piece) for piece in pieces)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    """The jinja2 environment of transformers' ``apply_chat_template``."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _parse(source: str) -> jinja2.nodes.Template:
    try:
        return environment().parse(source)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"does not parse: {err.message} (line {err.lineno})") from None


def _variables(source: str) -> list[str]:
    # The analysis runs jinja2's code generator, which folds constant expressions: worker side only.
    return sorted(jinja2.meta.find_undeclared_variables(_parse(source)))


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    return environment().from_string(_parse(source))


def _render_one(source: str, context: dict, max_chars: int, spans: list | None = None) -> str:
    """The rendered text; ``spans``, when given, receives the ``{% generation %}`` spans."""
    pieces, length = [], 0
    token = None if spans is None else _GENERATION_TRACKER.set((pieces, spans))
    try:
        for piece in _compile(source).generate(**context):
            length += len(piece)
            if length > max_chars:
                raise ChatTemplateError(f"renders more than {max_chars:,} characters")
            pieces.append(piece)
    finally:
        if token is not None:
            _GENERATION_TRACKER.reset(token)
    return "".join(pieces)


def _render_with_spans(source: str, context: dict, max_chars: int) -> tuple[str, list[tuple[int, int]]]:
    spans: list[tuple[int, int]] = []
    return _render_one(source, context, max_chars, spans), spans


# ------------------------------------------------------------------------------------------ the worker side


def _serve() -> None:
    """Worker loop: read ``("variables", source)`` or ``("render", source, contexts, max_chars)`` requests and
    answer ``("ok", names or texts)`` or ``("error", message)``."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    requests, replies = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    while True:
        head = requests.read(8)
        if len(head) < 8:
            return
        kind, source, *rest = pickle.loads(requests.read(struct.unpack("<Q", head)[0]))
        try:
            if kind == "variables":
                reply: tuple = ("ok", _variables(source))
            else:
                contexts, max_chars = rest
                render_one = _render_with_spans if kind == "render_spans" else _render_one
                reply = ("ok", [render_one(source, context, max_chars) for context in contexts])
        except ChatTemplateError as err:
            reply = ("error", str(err))
        except MemoryError:
            reply = ("error", f"needs more than {WORKER_MEMORY_BYTES >> 20} MiB of memory")
        except jinja2.sandbox.SecurityError as err:
            reply = ("error", f"is refused by the sandbox: {err}")
        except jinja2.TemplateError as err:  # raise_exception(...) and undefined values
            reply = ("error", f"raised an error: {err}")
        except Exception as err:  # noqa: BLE001 (any error of the template's own code)
            reply = ("error", f"failed while rendering: {type(err).__name__}: {err}")
        data = pickle.dumps(reply)
        replies.write(struct.pack("<Q", len(data)) + data)
        replies.flush()


# ------------------------------------------------------------------------------------------ the caller side


class _Worker:
    def __init__(self):
        command = [sys.executable, "-P", "-c", _WORKER_BOOTSTRAP, __file__, str(os.getpid())]
        self.owner = os.getpid()
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, process_group=0)

    def ask(self, request: tuple, deadline: float) -> tuple:
        data = pickle.dumps(request)
        self.process.stdin.write(struct.pack("<Q", len(data)) + data)
        self.process.stdin.flush()
        head = self._read(8, deadline)
        return pickle.loads(self._read(struct.unpack("<Q", head)[0], deadline))

    def _read(self, size: int, deadline: float) -> bytes:
        descriptor, chunks, missing = self.process.stdout.fileno(), [], size
        while missing:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([descriptor], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(descriptor, min(missing, 1 << 20))
            if not chunk:
                raise EOFError(f"exit code {self.process.wait()}")
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


_WORKER_BOOTSTRAP = r'''
import importlib.util, os, sys
if sys.platform.startswith("linux"):  # die with the parent
    import ctypes, signal
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    if os.getppid() != int(sys.argv[2]):
        sys.exit(0)
spec = importlib.util.spec_from_file_location("ov_jax_template_sandbox", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module._serve()
'''

_worker: _Worker | None = None
_worker_lock = threading.Lock()


def shutdown_worker() -> None:
    """Stop the rendering worker (a new one starts on the next render)."""
    global _worker
    with _worker_lock:
        if _worker is not None and _worker.owner == os.getpid():
            _worker.kill()
        _worker = None


def _ask(request: tuple, origin: str, timeout_s: float) -> Any:
    """Send one request to the worker (started or restarted as needed) and return its answer."""
    global _worker
    with _worker_lock:
        if _worker is None or _worker.owner != os.getpid() or _worker.process.poll() is not None:
            _worker = _Worker()
        worker = _worker
        try:
            reply = worker.ask(request, time.monotonic() + timeout_s)
        except TimeoutError:
            worker.kill()
            _worker = None
            raise ChatTemplateError(f"chat template {origin} took longer than {timeout_s:g} s to "
                                    f"{'compile' if request[0] == 'variables' else 'render'} (stopped)") from None
        except (EOFError, OSError) as err:
            worker.kill()
            _worker = None
            raise ChatTemplateError(f"chat template {origin} crashed its renderer ({err})") from None
        except BaseException:  # an interrupt mid-request: the worker's state is unknown
            worker.kill()
            _worker = None
            raise
    if reply[0] == "error":
        raise ChatTemplateError(f"chat template {origin} {reply[1]}")
    return reply[1]


@functools.lru_cache(maxsize=16)
def _cached_variables(source: str, origin: str) -> frozenset[str]:
    return frozenset(_ask(("variables", source), origin, RENDER_TIMEOUT_S))


def template_variables(source: str, *, origin: str) -> frozenset[str]:
    """Names a template reads from its context (found by jinja2 in the worker; cached per template).
    :class:`ChatTemplateError` naming ``origin`` when the template does not parse or compile in time."""
    return _cached_variables(source, origin)


def render(source: str, contexts: Sequence[dict], *, origin: str, timeout_s: float | None = None,
           max_chars: int | None = None) -> list[str]:
    """Render ``source`` once per context dict (plain data only: str, numbers, None, lists, tuples, dicts).

    ``origin`` names the template in errors (its file). Bounds: ``timeout_s`` of wall clock for the whole call
    (default :data:`RENDER_TIMEOUT_S`), ``max_chars`` characters per rendered text (default
    :data:`MAX_RENDERED_CHARS`), :data:`WORKER_MEMORY_BYTES` of memory. Raises :class:`ChatTemplateError` for a
    syntax error, a sandbox refusal, an error the template raises or any bound.
    """
    timeout_s = RENDER_TIMEOUT_S if timeout_s is None else timeout_s
    max_chars = MAX_RENDERED_CHARS if max_chars is None else max_chars
    return _ask(("render", source, list(contexts), max_chars), origin, timeout_s)


def render_with_spans(source: str, contexts: Sequence[dict], *, origin: str, timeout_s: float | None = None,
                      max_chars: int | None = None) -> list[tuple[str, list[tuple[int, int]]]]:
    """Like :func:`render`, with each text's ``[start, end)`` character spans that ``{% generation %}`` blocks
    produced (what transformers turns into ``assistant_masks``)."""
    timeout_s = RENDER_TIMEOUT_S if timeout_s is None else timeout_s
    max_chars = MAX_RENDERED_CHARS if max_chars is None else max_chars
    return [(text, [tuple(span) for span in spans]) for text, spans in
            _ask(("render_spans", source, list(contexts), max_chars), origin, timeout_s)]


atexit.register(shutdown_worker)
