"""An OpenAI-compatible chat server over the continuous-batching scheduler (FastAPI + uvicorn).

One device thread runs `ov_jax.engine.Scheduler.work` in a loop; request handlers (asyncio) validate, load
media and tokenize on worker threads, submit a `ov_jax.engine.Request` and receive its tokens through a
callback. In a multi-host job process 0 serves and the other processes follow its steps
(`ov_jax.serve.lockstep`). Endpoints: ``POST /v1/chat/completions`` (JSON or server-sent events),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). Errors carry OpenAI's body
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad field, image or over-long prompt (the field
is named), 429 when the queue is full, 503 while shutting down, 500 (``server_error``) for a request the engine
failed (a device error; a stream already under way ends with that error body as its last event).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from typing import Any


import jax
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ov_jax import distributed
from ov_jax.engine import Buckets, PromptTooLongError, Request, Scheduler, engine_for
from ov_jax.engine.features import FeatureCache
from ov_jax.engine.scheduler import MediaJob
from ov_jax.generation import BeyondMaxPositionsError, GenerationConfigError, check_max_positions
from ov_jax.processing import media as media_io
from ov_jax.serve.lockstep import Lockstep
from ov_jax.serve.metrics import Metrics
from ov_jax.serve.schema import ChatRequest, MediaRef, RequestValidationError, parse_chat_request

log = logging.getLogger(__name__)

PROCESSOR_INPUTS = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos")


@dataclasses.dataclass
class ServeOptions:
    """What ``ov-jax serve`` configures (see `ov_jax.cli`)."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 8
    max_queue: int = 64
    dtype: str = "float32"
    mesh: str | None = None
    cache_length: int = 4096
    prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 3072)
    decode_steps: int = 8
    feature_cache_mb: int = 256
    allow_local_media: bool = False
    warmup: bool = True
    shutdown_timeout: float = 30.0
    served_name: str | None = None
    coordinator: str | None = None  # multi-host: host:port of process 0 (see ov_jax.distributed)
    num_processes: int | None = None
    process_id: int | None = None


class ServeError(Exception):
    """An error answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class Service:
    """The model, its processor, one scheduler and the device thread that drives it."""

    def __init__(self, model: Any, processor: Any, options: ServeOptions):
        self.model, self.processor, self.options = model, processor, options
        self.name = options.served_name or os.path.basename(os.path.normpath(options.model))
        s = options.cache_length
        prompts = tuple(t for t in options.prompt_buckets if t <= s)
        if not prompts:
            raise ValueError(f"no prompt bucket fits the cache length {s}: {options.prompt_buckets}")
        buckets = Buckets(batch=(options.max_batch_size,), prompt=prompts, cache=(s,))
        self.engine = engine_for(model, buckets, decode_steps=options.decode_steps)
        self.scheduler = Scheduler(self.engine, s)
        self.feature_cache = FeatureCache(options.feature_cache_mb << 20)
        self.metrics = Metrics(self)
        # multi-host: submissions and cancellations go through the lockstep, which replays them everywhere
        self.lockstep = Lockstep(self.scheduler, self.feature_cache) if jax.process_count() > 1 else None
        self._intake = self.lockstep or self.scheduler
        self._preparing = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.draining = False
        self._thread = threading.Thread(target=self._device_loop, name="ov-jax-device", daemon=True)
        self._live: set[Request] = set()

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._warmup()
        self._thread.start()

    def _warmup(self) -> None:
        if self.options.warmup:
            self.engine.warmup(cache_lengths=(self.scheduler.cache_length,), max_new_tokens=1, progress=False)

    def stop(self) -> None:
        """Refuse new requests, let running ones finish for up to ``shutdown_timeout`` seconds, cancel the rest."""
        self.draining = True
        deadline = time.monotonic() + self.options.shutdown_timeout
        while self._live and time.monotonic() < deadline:
            time.sleep(0.05)
        for request in list(self._live):
            self.cancel(request)
        self._stop.set()
        self._intake.wake()
        self._thread.join(timeout=10)

    def submit(self, request: Request) -> None:
        """Queue a prepared request (multi-host: on every process at the next step)."""
        self._intake.submit(request)

    def cancel(self, request: Request) -> None:
        """Cancel a request at the next step boundary (its slot is freed there)."""
        self._intake.cancel(request)

    def _device_loop(self) -> None:
        while True:
            stopping = self._stop.is_set()
            if self.lockstep is not None:
                try:
                    self.lockstep.lead(shutdown=stopping)
                except Exception:  # the other processes are gone or out of step: nothing more can run
                    log.exception("multi-host step broadcast failed; the server stops serving")
                    self.draining = True
                    return
            if stopping:
                return
            busy = self._work()
            self.metrics.observe_rate(self.scheduler.decoded_tokens)
            if not busy:
                self._intake.wait_for_work(0.2)

    def _work(self) -> bool:
        try:
            return self.scheduler.work()
        except Exception:  # the batch's device state is unknown: fail what runs, keep serving
            log.exception("decode failed")
            return False

    def follow(self) -> None:
        """A follower process of a multi-host job: warm up, then run process 0's steps until it shuts down."""
        if self.lockstep is None or self.lockstep.leader:
            raise RuntimeError("only processes other than process 0 of a multi-host job follow")
        self._warmup()
        while self.lockstep.follow():
            self._work()

    def release_followers(self) -> None:
        """Process 0 after serving: tell the followers to exit if the device loop did not (start-up failed)."""
        if self.lockstep is not None and not self.lockstep.closed and not self._thread.is_alive():
            self.lockstep.lead(shutdown=True)

    # --- requests ----------------------------------------------------------------------------------------

    def admit(self) -> None:
        """Raise 503 while draining and 429 when the queue is full; otherwise count a request in preparation."""
        if self.draining:
            raise ServeError(503, "the server is shutting down", "server_error")
        with self._lock:
            if self._intake.queued + self._preparing >= self.options.max_queue:
                raise ServeError(429, f"the queue is full ({self.options.max_queue} requests waiting); retry later",
                                 "rate_limit_exceeded")
            self._preparing += 1

    def release(self) -> None:
        with self._lock:
            self._preparing -= 1

    def prepare(self, chat: ChatRequest) -> tuple[Request, int]:
        """Load media, tokenize, pad and check one chat request (a worker thread). Returns the scheduler request
        (not yet submitted) and the prompt's token count. Raises :class:`ServeError` (400) naming the field."""
        with contextlib.ExitStack() as cleanup:
            messages = [{"role": m["role"], "content": [self._load_part(p, cleanup) for p in m["content"]]}
                        for m in chat.messages]
            try:
                inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                            return_dict=True)
            except (ValueError, OSError) as err:
                raise ServeError(400, f"cannot process the messages: {err}", param="messages") from None
        gen = self._generation_config(chat)
        engine = self.engine
        try:
            (row,) = engine.prepare(inputs["input_ids"], inputs.get("attention_mask"),
                                    **{k: inputs[k] for k in PROCESSOR_INPUTS if k in inputs}, generation_config=gen)
            room = self.scheduler.cache_length - row.prompt_length + 1
            max_new = chat.max_tokens if chat.max_tokens is not None else gen.max_new_tokens or room
            if room < 1:
                raise PromptTooLongError(f"the prompt holds {row.length} tokens and leaves no room in the "
                                         f"{self.scheduler.cache_length}-slot cache")
            self.scheduler.check_fits(row, max_new)
            check_max_positions(self.model.config.text, row.length, max_new)
        except (PromptTooLongError, BeyondMaxPositionsError) as err:
            raise ServeError(400, str(err), param="messages", kind="invalid_request_error") from None
        except ValueError as err:
            raise ServeError(400, str(err), param="messages") from None
        settings = engine.row_settings(gen, max_new)
        seed = chat.seed if chat.seed is not None else int.from_bytes(os.urandom(4), "little")
        job = MediaJob(row.tower_inputs, self.feature_cache) if len(row.tower_inputs) else None
        return Request(row, settings, seed=seed, media=job), row.length

    def _generation_config(self, chat: ChatRequest):
        sampling: dict[str, Any] = {}
        if chat.temperature is not None:
            sampling["do_sample"] = chat.temperature > 0
            if chat.temperature > 0:
                sampling["temperature"] = chat.temperature
        if chat.top_p is not None:
            sampling["top_p"] = chat.top_p
        if chat.top_k is not None:
            sampling["top_k"] = max(chat.top_k, 0)  # -1 (vLLM's "off") is 0 here
        try:
            return self.model.generation_config.merged(**sampling)
        except GenerationConfigError as err:
            raise ServeError(400, str(err)) from None

    def _load_part(self, part: dict, cleanup: contextlib.ExitStack) -> dict:
        if part["type"] == "text":
            return part
        ref: MediaRef = part["ref"]
        local = not ref.url.startswith(("http://", "https://", "data:"))
        if local and not self.options.allow_local_media:
            raise ServeError(400, f"{ref.field}: local file paths are not accepted (start the server with "
                                  "--allow-local-media to allow them); use an http(s) URL or a base64 data URI",
                             param=ref.field)
        try:
            if ref.kind == "image":
                return {"type": "image", "image": media_io.load_image(ref.url)}
            return {"type": "video", "video": ref.url if local else self._video_file(ref, cleanup)}
        except (ValueError, OSError) as err:
            raise ServeError(400, f"{ref.field}: cannot read the {ref.kind}: {err}", param=ref.field) from None

    @staticmethod
    def _video_file(ref: MediaRef, cleanup: contextlib.ExitStack) -> str:
        """A temporary file holding a video given as a data URI or an http(s) URL (removed after the request)."""
        if ref.url.startswith("data:"):
            header, _, payload = ref.url.partition(",")
            if ";base64" not in header:
                raise ValueError("a video data URI must be base64-encoded")
            data = base64.b64decode(payload, validate=True)
        else:
            data = media_io._download(ref.url, 60.0).getvalue()
        handle = tempfile.NamedTemporaryFile(suffix=".mp4", delete=False)
        cleanup.callback(os.unlink, handle.name)
        with handle:
            handle.write(data)
        return handle.name

    def text_of(self, tokens: list[int]) -> str:
        return self.processor.decode(tokens, skip_special_tokens=True)


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in ``text`` (None when none occurs)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class Completion:
    """One request's progress seen from the event loop: tokens arrive through the scheduler's callback."""

    def __init__(self, service: Service, request: Request, chat: ChatRequest, prompt_tokens: int):
        self.service, self.request, self.chat, self.prompt_tokens = service, request, chat, prompt_tokens
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        request.on_tokens = lambda new, finished: self.loop.call_soon_threadsafe(self.events.put_nowait,
                                                                                 (new, finished))
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def submit(self) -> None:
        self.service._live.add(self.request)
        self.service.submit(self.request)

    def cancel(self) -> None:
        if not self.request.finished:
            self.service.cancel(self.request)

    async def pieces(self):
        """Yield text increments until the request ends (stop token, stop string, length or cancellation)."""
        sent = 0
        hold = max((len(s) for s in self.chat.stop), default=1) - 1
        try:
            while self.finish_reason is None:
                new, finished = await self.events.get()
                self.tokens += new
                text = self.service.text_of(self.tokens)
                cut = _stop_at(text, self.chat.stop)
                if cut is not None:
                    text, self.finish_reason = text[:cut], "stop"
                    self.cancel()
                elif finished:
                    if self.request.error is not None:  # the engine failed the request (e.g. a device error)
                        raise ServeError(500, f"generation failed: {self.request.error}",
                                         "server_error") from self.request.error
                    stopped = bool(self.tokens) and self.tokens[-1] in self.request.stop_ids
                    self.finish_reason = "stop" if stopped else "length"
                self.text = text
                end = len(text) if self.finish_reason else max(len(text) - hold, sent)
                if text.endswith("\ufffd") and not self.finish_reason:  # a partial UTF-8 sequence: wait for it
                    end = min(end, len(text) - 1)
                if end > sent:
                    yield text[sent:end]
                    sent = end
        finally:
            self.cancel()
            self.service._live.discard(self.request)
            self.service.metrics.finished(self)

    def usage(self) -> dict:
        completion = len(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


def create_app(service: Service):
    """The FastAPI application of ``service`` (started and stopped with the app's lifespan)."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(service.start)
        yield
        await asyncio.to_thread(service.stop)

    app = FastAPI(title="ov-jax", lifespan=lifespan)

    @app.exception_handler(ServeError)
    async def serve_error(request, err: ServeError):
        service.metrics.rejected(err.status)
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/health")
    async def health():
        body = {"status": "draining" if service.draining else "ok", "running": service.scheduler.running,
                "queued": service.scheduler.queued, "compilations": service.engine.compile_count,
                "feature_cache": {"hits": service.feature_cache.hits, "misses": service.feature_cache.misses}}
        return JSONResponse(body, status_code=503 if service.draining else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0,
                                            "owned_by": "ov-jax"}]}

    @app.get("/metrics")
    async def metrics():
        body, content_type = service.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        try:
            body = json.loads(await http.body())
        except ValueError as err:
            raise ServeError(400, f"the body is not valid JSON: {err}", param="body") from None
        try:
            chat = parse_chat_request(body, service.name)
        except RequestValidationError as err:
            raise ServeError(400, str(err), param=err.field) from None
        service.admit()
        try:
            request, prompt_tokens = await asyncio.to_thread(service.prepare, chat)
        finally:
            service.release()
        completion = Completion(service, request, chat, prompt_tokens)
        completion.submit()
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            return StreamingResponse(_sse(completion, ident, created, service.name),
                                     media_type="text/event-stream")
        pieces = completion.pieces()
        waiter = asyncio.ensure_future(_drain(pieces))
        while not waiter.done():
            await asyncio.wait([waiter], timeout=0.25)
            if not waiter.done() and await http.is_disconnected():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
                await pieces.aclose()
                return Response(status_code=499)
        waiter.result()
        return {"id": ident, "object": "chat.completion", "created": created, "model": service.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                             "finish_reason": completion.finish_reason}],
                "usage": completion.usage()}

    return app


async def _drain(pieces) -> None:
    async for _ in pieces:
        pass


async def _sse(completion: Completion, ident: str, created: int, model: str):
    def event(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    pieces = completion.pieces()
    try:
        yield event({"role": "assistant", "content": ""})
        async for piece in pieces:
            yield event({"content": piece})
        yield event({}, completion.finish_reason)
        if completion.chat.include_usage:
            yield event(None, usage=completion.usage())
    except ServeError as err:  # the status line is sent: the stream ends with an error event instead
        yield f"data: {json.dumps(err.body())}\n\n"
    else:
        yield "data: [DONE]\n\n"
    finally:
        await pieces.aclose()  # a disconnected client lands here: the request is cancelled, its slot freed


def serve(options: ServeOptions) -> None:
    """Load the model and processor, then serve until interrupted (SIGINT / SIGTERM: graceful shutdown).

    Multi-host (``options.coordinator`` / ``num_processes`` / ``process_id``, their environment variables, or a
    detected cluster: `ov_jax.distributed.maybe_initialize_distributed`): every process loads the model onto
    the mesh; process 0 serves HTTP on ``host:port`` and the others follow its steps until it shuts down."""
    import uvicorn

    distributed.maybe_initialize_distributed(options.coordinator, options.num_processes, options.process_id)
    from ov_jax.model import LlavaOnevision
    from ov_jax.processing import LlavaOnevisionProcessor

    processor = LlavaOnevisionProcessor.from_pretrained(options.model)
    model = LlavaOnevision.from_pretrained(options.model, dtype=options.dtype, mesh=options.mesh)
    service = Service(model, processor, options)
    if not distributed.is_writer():  # status lines on stderr, as uvicorn writes process 0's
        print(f"process {jax.process_index()} of {jax.process_count()}: following process 0's serving steps",
              file=sys.stderr, flush=True)
        service.follow()
        print(f"process {jax.process_index()}: process 0 shut down", file=sys.stderr, flush=True)
        return
    config = uvicorn.Config(create_app(service), host=options.host, port=options.port, log_level="info",
                            timeout_graceful_shutdown=int(options.shutdown_timeout) + 1)
    try:
        uvicorn.Server(config).run()
    finally:
        service.release_followers()
