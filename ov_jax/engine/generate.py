"""The inference engine: bucketed, ahead-of-time compiled prefill and per-row decode over a donated KV cache.

:class:`Engine` owns one executable per (function, bucket shape), compiled on first use or by
:meth:`Engine.warmup`; a request is padded on the host into its buckets (`ov_jax.engine.buckets`) and never
reaches a compiled shape itself. ``compile_log`` records every compilation, so "zero recompiles after
warm-up" is a checkable number. Sampling settings, stop ids and seeds are per-row data
(`ov_jax.engine.slots`), never part of a compile key.

Flow of a row (driven by `ov_jax.engine.scheduler.Scheduler`): vision tower on a chunk of tiles/frames
(``encode``, once per request) → ``media_start`` / ``media_add`` (the row's media rows) → ``prefill``
(prompt KV + last logits, batch 1; a long prompt bucket as ``prompt_kv`` then ``prefill_chunk`` calls of
``buckets.prefill_chunk`` slots each) → ``insert`` (first token; KV into a free slot of the running batch) →
``decode`` chunks of ``decode_steps`` steps (``lax.while_loop``) shared by every running row → ``evict``
for a row that is cancelled. ``generate`` is a client of a scheduler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ov_jax import sharding as sh
from ov_jax.config import OneVisionConfig
from ov_jax.engine import slots, steps
from ov_jax.engine.buckets import Buckets, PaddedRequest, check_left_padded, drop_pad_columns, pad_rows
from ov_jax.engine.sampling import top_p_threshold
from ov_jax.engine.features import FeatureCache
from ov_jax.engine.scheduler import MediaJob, Request, Scheduler
from ov_jax.engine.slots import MAX_STOP_IDS, DecodeState, RowSettings
from ov_jax.engine.streaming import as_sink
from ov_jax.generation import (DEFAULT_NEW_TOKENS, GenerationConfig, GenerationConfigError, check_max_positions,
                               infer_attention_mask)
from ov_jax.media_plan import build_media_plan
from ov_jax.modeling import qwen2
from ov_jax.nn.backends import platform_of, resolve_attention

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CompileRecord:
    """One compilation: which function, for which bucket key, and how long it took."""

    name: str
    key: tuple
    seconds: float


def enable_compilation_cache(directory: str) -> None:
    """Turn on jax's persistent compilation cache in ``directory`` (every executable is cached)."""
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def compilation_cache_from_environment() -> None:
    """Make ``JAX_COMPILATION_CACHE_DIR`` cache every executable. jax alone writes only those that took over a
    second to compile (and are not tiny), which leaves out most of a small model's; this lowers both thresholds
    unless the environment sets them (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` / ``..._MIN_ENTRY_SIZE_BYTES``).
    Nothing happens without the variable or when the program chose another directory."""
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not directory or jax.config.jax_compilation_cache_dir != directory:
        return
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class Engine:
    """Bucketed generation for one model.

    ``params`` is the stacked params tree (``LlavaOnevision.params``). ``layout`` is ``"unrolled"``
    (default on CPU) or ``"scanned"`` (default elsewhere), see `ov_jax.engine.steps`. The decode batch has
    ``slots`` rows (the largest batch bucket); ``decode_steps`` tokens per row are decoded per device call
    (``lax.while_loop``), the step boundary where rows join and leave and where streamed tokens arrive.
    ``generation_config`` (`ov_jax.generation.GenerationConfig`, default: the text config's ids) supplies the
    stop and pad ids and the sampling defaults of :meth:`generate`. ``attention``: the attention backend of the
    tower, prefill and decode (`ov_jax.nn.backends`: ``"auto"``, ``"xla"``, ``"cpu"``, ``"cudnn"``,
    ``"splash"``; resolved for the params' platform and ``dtype``, an unavailable one raises ``ValueError``).

    The serving copies of the weights are derived from ``params``; :meth:`use_params` re-derives them from a
    new tree of the same shapes, dtypes and shardings and keeps every compiled executable.
    """

    def __init__(self, config: OneVisionConfig, params: dict, dtype: Any = jnp.float32,
                 buckets: Buckets | None = None, *, layout: str | None = None, decode_steps: int = 8,
                 generation_config: GenerationConfig | None = None, mesh: Any = None,
                 attention: str = "auto"):
        compilation_cache_from_environment()
        self.config = config
        self.mesh = sh.make_mesh(mesh) if mesh is not None else sh.mesh_of(params)
        self.dtype = jnp.dtype(dtype)
        self.buckets = buckets or Buckets()
        self.platform = platform_of(params)
        self.attention = resolve_attention(attention, self.platform, self.dtype)
        self.layout = layout or ("unrolled" if self.platform == "cpu" else "scanned")
        if self.layout not in steps.LAYOUTS:
            raise ValueError(f"layout must be one of {steps.LAYOUTS}, got {self.layout!r}")
        if int(decode_steps) < 1:
            raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
        self.decode_steps = int(decode_steps)
        self.slots = self.buckets.batch[-1]
        self.generation_config = generation_config or GenerationConfig.from_text_config(config.text)
        self.tower_chunk = self.buckets.resolved_chunk(self.platform)
        if self.mesh is not None:  # the tower runs data-parallel over the chunk: a multiple of the data axes
            multiple = sh.axis_multiple(self.mesh, "tiles")
            self.tower_chunk = -(-self.tower_chunk // multiple) * multiple
        self.tokens_per_tile = config.vision.num_patches
        self._derive_serving_params(params)
        self._executables: dict[tuple, Any] = {}
        self._compile_lock = threading.Lock()
        self._scheduler: Scheduler | None = None
        self.feature_cache: FeatureCache | None = None  # set one to skip the tower for pixels seen before
        self.compile_log: list[CompileRecord] = []

    def _derive_serving_params(self, params: dict) -> None:
        """The per-step weight trees the executables take, built from ``params`` (the model's live tree)."""
        self._source_leaves = jax.tree.leaves(params)
        self._source_signature = params_signature(params)
        self._media_params = {"vision": params["vision"], "projector": params["projector"]}
        self._newline = params["image_newline"]
        text = params["text"]
        self._prefill_params = {"text": text}
        if self.layout == "unrolled":
            self._decode_params = {"text": {"embed": text["embed"], "norm": text["norm"],
                                            "lm_head_t": steps.serving_lm_head(text)}}
            self._layers = steps.serving_layers(text["layers"])
        else:
            self._decode_params, self._layers = {"text": text}, None

    def serves(self, params: dict) -> bool:
        """Whether the serving copies were derived from exactly these leaves (compared by identity)."""
        leaves = jax.tree.leaves(params)
        return len(leaves) == len(self._source_leaves) and all(a is b for a, b in zip(leaves, self._source_leaves))

    def accepts(self, params: dict) -> bool:
        """Whether the compiled executables can take ``params`` (same structure, shapes, dtypes, shardings)."""
        return params_signature(params) == self._source_signature

    def use_params(self, params: dict) -> None:
        """Serve ``params`` from now on (e.g. after a training step). Compiled executables are kept; a tree
        that the engine does not :meth:`accept <accepts>` raises ``ValueError`` (build a new Engine)."""
        if not self.accepts(params):
            raise ValueError("the new params differ from the served ones in structure, shape, dtype or sharding; "
                             "the engine's executables cannot take them")
        self._derive_serving_params(params)

    # --- compilation -------------------------------------------------------------------------------------

    @property
    def compile_count(self) -> int:
        return len(self.compile_log)

    def _spec(self, shape, dtype, kind=None) -> jax.ShapeDtypeStruct:
        """Abstract input; on a mesh, sharded by its logical kind (`ov_jax.sharding.ACTIVATION_AXES`)."""
        return sh.spec(shape, dtype, self.mesh, kind)

    def _executable(self, name: str, key: tuple, fn: Callable, args: Sequence[Any], donate: tuple[int, ...] = ()):
        """The compiled ``fn`` for these argument shapes, compiling (and logging) it on first use."""
        full_key = (name,) + key
        exe = self._executables.get(full_key)
        if exe is None:
            with self._compile_lock:
                exe = self._executables.get(full_key)
                if exe is None:
                    start = time.perf_counter()
                    # Traced under the mesh: activation shardings from the rules table, fused attention per shard.
                    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                        exe = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
                    if self.mesh is not None:
                        exe = sh.sharded_call(exe)
                    record = CompileRecord(name, key, time.perf_counter() - start)
                    self.compile_log.append(record)
                    log.info("compiled %s %s in %.2fs", name, key, record.seconds)
                    self._executables[full_key] = exe
        return exe

    def _media_start(self, t: int):
        args = (self._newline, self._spec((1, t, 4), np.int32, "taps"), self._spec((1, t, 4), np.float32, "taps"))
        return self._executable("media_start", (t,), lambda nl, i, w: steps.media_start({"image_newline": nl}, i, w),
                                args)

    def _encode(self):
        c, v = self.tower_chunk, self.config.vision
        tiles = self._spec((c, v.num_channels, v.image_size, v.image_size), np.float32, "tower_inputs")
        args = (self._media_params, tiles)
        fn = functools.partial(steps.encode_tiles, config=self.config, dtype=self.dtype, attention=self.attention)
        return self._executable("encode", (c,), fn, args)

    def _media_add(self, t: int):
        c, h = self.tower_chunk, self.config.text.hidden_size
        features = self._spec((c * self.tokens_per_tile, h), self.dtype, ("tiles", None))
        args = (self._spec((1, t, h), np.float32, "hidden"), features, self._spec((1, t, 4), np.int32, "taps"),
                self._spec((1, t, 4), np.float32, "taps"), self._spec((), np.int32))
        fn = functools.partial(steps.media_add, tokens_per_tile=self.tokens_per_tile)
        return self._executable("media_add", (t, c), fn, args, donate=(0,))

    def _prefill(self, t: int):
        h = self.config.text.hidden_size
        args = (self._prefill_params, self._spec((1, t), np.int32, "tokens"), self._spec((1, t), bool, "tokens"),
                self._spec((1, t, h), np.float32, "hidden"), self._spec((1, t), bool, "tokens"))
        fn = functools.partial(steps.prefill, config=self.config, dtype=self.dtype, attention=self.attention)
        return self._executable("prefill", (t,), fn, args)

    def _prompt_kv_spec(self, t: int) -> qwen2.KVCache:
        tc = self.config.text
        shape = (tc.num_hidden_layers, 1, t, tc.num_key_value_heads, tc.head_dim)
        return qwen2.KVCache(self._spec(shape, self.dtype, "cache"), self._spec(shape, self.dtype, "cache"))

    def _prompt_kv(self, t: int):
        """A zero prompt KV ``[L, 1, T, nkv, hd]`` for :meth:`_prefill_chunk` to fill."""
        spec = self._prompt_kv_spec(t)

        def zeros():
            kv = qwen2.init_cache(self.config.text, 1, t, self.dtype)
            if self.mesh is None:
                return kv
            return qwen2.KVCache(*(jax.lax.with_sharding_constraint(x, s.sharding) for x, s in zip(kv, spec)))

        return self._executable("prompt_kv", (t,), zeros, ())

    def _prefill_chunk(self, t: int):
        h, c = self.config.text.hidden_size, self.buckets.prefill_chunk
        args = (self._prefill_params, self._prompt_kv_spec(t), self._spec((1, t), np.int32, "tokens"),
                self._spec((1, t), bool, "tokens"), self._spec((1, t, h), np.float32, "hidden"),
                self._spec((1, t), bool, "tokens"), self._spec((), np.int32))
        fn = functools.partial(steps.prefill_chunk, chunk=c, config=self.config, dtype=self.dtype,
                               attention=self.attention)
        return self._executable("prefill_chunk", (t, c), fn, args, donate=(1,))

    def _cache_spec(self, s: int) -> qwen2.KVCache:
        shape = slots.cache_shape(self.config, self.slots, s, self.layout)
        if self.layout == "scanned":
            return qwen2.KVCache(self._spec(shape, self.dtype, "cache"), self._spec(shape, self.dtype, "cache"))
        layers = (self._spec(shape, self.dtype, "layer_cache"),) * self.config.text.num_hidden_layers
        return qwen2.KVCache(layers, layers)

    def _settings_spec(self, b: int) -> RowSettings:
        vector = functools.partial(self._spec, (b,), kind="batch_vector")
        return RowSettings(self._spec((b, MAX_STOP_IDS), np.int32), vector(np.int32), vector(np.int32),
                           vector(bool), vector(np.float32), vector(np.int32), vector(np.float32),
                           self._spec((b, 2), np.uint32))

    def _state_spec(self, s: int) -> DecodeState:
        b = self.slots
        vector = functools.partial(self._spec, (b,), kind="batch_vector")
        return DecodeState(vector(np.int32), vector(np.int32), vector(np.int32), vector(np.int32),
                           self._spec((b, s), bool, "tokens"), vector(bool), self._settings_spec(b))

    def _insert(self, t: int, s: int):
        tc = self.config.text
        args = (self._cache_spec(s), self._state_spec(s), self._prompt_kv_spec(t),
                self._spec((1, tc.vocab_size), np.float32, ("batch", "vocab")), self._spec((1, t), bool, "tokens"),
                self._spec((), np.int32), self._settings_spec(1), self._spec((), np.uint32), self._spec((), np.int32))
        fn = functools.partial(slots.insert, layout=self.layout)
        return self._executable("insert", (t, s), fn, args, donate=(0, 1))

    def _evict(self, s: int):
        return self._executable("evict", (s,), slots.evict, (self._state_spec(s), self._spec((), np.int32)),
                                donate=(0,))

    def _decode(self, s: int):
        args = (self._decode_params, self._layers, self._cache_spec(s), self._state_spec(s))
        fn = functools.partial(slots.decode_chunk, steps=self.decode_steps, config=self.config, dtype=self.dtype,
                               attention=self.attention)
        return self._executable("decode", (s,), fn, args, donate=(2, 3))

    def empty_batch(self, s: int) -> tuple[Any, DecodeState]:
        """A free decode batch (cache and state) of ``slots`` rows and ``s`` cache slots, as host arrays: the
        first executable that takes them places them (no compilation)."""
        return (slots.empty_cache(self.config, self.slots, s, self.dtype, self.layout),
                slots.empty_state(self.slots, s))

    # --- the steps a scheduler drives --------------------------------------------------------------------

    def encode_chunk(self, tiles: np.ndarray, first: int) -> jax.Array:
        """Projected features ``[C·729, H]`` of tiles ``first … first + C - 1`` of ``tiles`` (zero-padded)."""
        c = self.tower_chunk
        chunk = tiles[first:first + c]
        if len(chunk) < c:
            chunk = np.concatenate([chunk, np.zeros((c - len(chunk),) + chunk.shape[1:], chunk.dtype)])
        return self._encode()(self._media_params, chunk)

    def media_rows(self, row: PaddedRequest, features: Sequence[jax.Array]) -> jax.Array:
        """Float32 media rows ``[1, T, H]`` of one padded row from its request's per-chunk ``features``."""
        t = row.prompt_length
        tap_index, tap_weight = jax.device_put(row.tap_index), jax.device_put(row.tap_weight)
        rows = self._media_start(t)(self._newline, tap_index, tap_weight)
        if row.is_media.any():
            add = self._media_add(t)
            for i, feats in enumerate(features):
                rows = add(rows, feats, tap_index, tap_weight, np.int32(i * self.tower_chunk))
        return rows

    def prefill_row(self, row: PaddedRequest, media_rows: jax.Array):
        """Prefill one padded row: a generator that yields after each prefill call but the last and returns
        the last-slot logits ``[1, V]`` and the prompt KV (``(logits, kv) = yield from engine.prefill_row(…)``).

        A prompt bucket longer than ``buckets.prefill_chunk`` runs as chunks (``Buckets.prefill_starts``) into
        a zero KV, so a caller can run other work (decode chunks) between them; a shorter one is one call."""
        t = row.prompt_length
        args = (row.input_ids, row.attention_mask, media_rows, row.is_media)
        starts = self.buckets.prefill_starts(t, int(row.attention_mask.sum()))
        if starts is None:
            return self._prefill(t)(self._prefill_params, *args)
        kv, chunk = self._prompt_kv(t)(), self._prefill_chunk(t)
        for i, start in enumerate(starts):
            if i:
                yield
            logits, kv = chunk(self._prefill_params, kv, *args, np.int32(start))
        return logits, kv

    # --- requests ----------------------------------------------------------------------------------------

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
                pixel_values_videos=None, generation_config: GenerationConfig | None = None) -> list[PaddedRequest]:
        """Validate a request, plan its media on the host and pad each row into its prompt bucket with the pad
        id of ``generation_config`` (default: the engine's). Without an ``attention_mask`` it is inferred from
        that pad id, as transformers does (`ov_jax.generation.infer_attention_mask`)."""
        generation_config = generation_config or self.generation_config
        ids = np.asarray(input_ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"input_ids must hold integers, got dtype {ids.dtype}")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {ids.shape}")
        if attention_mask is None:
            mask = infer_attention_mask(ids, generation_config)
        else:
            mask = np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        mask = mask.astype(bool)
        check_left_padded(mask)
        ids, mask = drop_pad_columns(ids, mask)
        plan = build_media_plan(ids, self.config, pixel_values, image_sizes, batch_num_images, pixel_values_videos)
        pad_id = 0 if generation_config.pad_id is None else generation_config.pad_id
        return pad_rows(ids, mask, plan, self.buckets, pad_id)

    def row_settings(self, generation_config: GenerationConfig, max_new_tokens: int) -> RowSettings:
        """One row's :class:`~ov_jax.engine.slots.RowSettings` (``[1]`` numpy leaves) from a merged config."""
        gen = generation_config
        if len(gen.eos_token_id) > MAX_STOP_IDS:
            raise GenerationConfigError(f"at most {MAX_STOP_IDS} stop token ids are supported, "
                                        f"got {len(gen.eos_token_id)}")
        stops = np.full((1, MAX_STOP_IDS), -1, np.int32)
        stops[0, :len(gen.eos_token_id)] = gen.eos_token_id
        one = functools.partial(np.full, (1,))
        return RowSettings(stops, one(0 if gen.pad_id is None else gen.pad_id, np.int32),
                           one(max_new_tokens, np.int32), one(gen.do_sample, bool),
                           one(gen.temperature if gen.do_sample else 1.0, np.float32),
                           one(gen.top_k, np.int32), one(top_p_threshold(gen.top_p), np.float32),
                           np.zeros((1, 2), np.uint32))

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
                 pixel_values_videos=None, max_new_tokens: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, stop_token_ids=None, pad_token_id: int | None = None, streamer=None,
                 allow_beyond_max_positions: bool = False) -> np.ndarray:
        """New token ids ``[B, max_new_tokens]`` (int32): each row up to and including its stop token, then pad.

        Arguments are as transformers' ``generate`` for LLaVA-OneVision (processor outputs, left padding; a
        missing ``attention_mask`` is inferred from the pad id). Sampling follows transformers (temperature →
        top-k → top-p) with a reproducible ``seed`` (row ``i`` draws from ``fold_in(key(seed), i)``). Arguments
        left ``None`` take the engine's ``generation_config`` (`ov_jax.generation`); bad values raise
        ``GenerationConfigError`` naming them. A prompt plus ``max_new_tokens`` beyond the text model's
        ``max_position_embeddings`` raises `ov_jax.generation.BeyondMaxPositionsError` unless
        ``allow_beyond_max_positions``. Each row is a request of a :class:`~ov_jax.engine.scheduler.Scheduler`
        whose cache bucket fits the longest row; ``streamer`` receives one ``[B]`` array per step.
        """
        gen = self.generation_config.merged(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                            temperature=temperature, top_k=top_k, top_p=top_p,
                                            eos_token_id=stop_token_ids, pad_token_id=pad_token_id)
        new_tokens = gen.new_tokens(np.shape(input_ids)[-1])
        settings = self.row_settings(gen, new_tokens)
        rows = self.prepare(input_ids, attention_mask, pixel_values, image_sizes, batch_num_images,
                            pixel_values_videos, generation_config=gen)
        longest = max(rows, key=lambda r: r.prompt_length)
        check_max_positions(self.config.text, max(r.length for r in rows), new_tokens, allow_beyond_max_positions)
        s = self.buckets.cache_bucket(longest.prompt_length, new_tokens, longest.length, longest.media_tokens)
        scheduler = self._generate_scheduler(s)
        media = MediaJob(rows[0].tower_inputs, self.feature_cache) if len(rows[0].tower_inputs) else None
        group = object()  # the call's rows start decoding together
        requests = [Request(row, settings, seed=seed, row_index=i, media=media, group=group)
                    for i, row in enumerate(rows)]
        for request in requests:
            scheduler.submit(request)
        put, end = as_sink(streamer)
        pad = int(settings.pad_id[0])
        sent = 0
        while True:
            busy = scheduler.work()
            ready = min(new_tokens if r.finished else len(r.tokens) for r in requests)
            ready = min(ready, max(len(r.tokens) for r in requests))
            for i in range(sent, ready):
                put(np.array([r.tokens[i] if i < len(r.tokens) else pad for r in requests], np.int32))
            sent = max(sent, ready)
            if all(r.finished for r in requests) or not busy:
                break
        end()
        for r in requests:
            if r.error is not None:
                raise r.error
        out = np.full((len(rows), new_tokens), pad, np.int32)
        for i, r in enumerate(requests):
            out[i, :len(r.tokens)] = r.tokens
        return out

    def _generate_scheduler(self, s: int) -> "Scheduler":
        """The scheduler ``generate`` uses for cache bucket ``s`` (one at a time: a new bucket replaces it)."""
        if self._scheduler is None or self._scheduler.cache_length != s:
            self._scheduler = None  # free the old cache first
            self._scheduler = Scheduler(self, s)
        return self._scheduler

    # --- warm-up -----------------------------------------------------------------------------------------

    def executable_jobs(self, prompt_lengths: Sequence[int] | None = None, max_new_tokens: int | None = None,
                        media: bool = True, cache_lengths: Sequence[int] | None = None
                        ) -> list[tuple[str, Callable]]:
        """The executables requests inside these buckets can need, as ``(label, compile)`` pairs.

        Per prompt bucket ``T``: media_start, media_add (with media), prefill (or, for ``T`` longer than
        ``buckets.prefill_chunk``, prompt_kv and prefill_chunk), and insert into each cache bucket it runs in;
        per cache bucket ``S``: decode and evict; plus the tower's encode. ``cache_lengths`` (the cache buckets
        to serve, e.g. a server's one) default to the bucket each ``T`` needs for ``max_new_tokens`` (default:
        the generation config's, 20 when unset; the largest bucket holding ``T`` when none holds both): with
        ``P`` prompt buckets (``P_c`` of them chunked) and ``C`` cache buckets in use, 1 + 4·P + P_c + 2·C; for
        the default buckets 1 + 4·17 + 12 + 2·15 = 111 executables.
        """
        prompt_lengths = tuple(prompt_lengths or self.buckets.prompt)
        if max_new_tokens is None:
            max_new_tokens = self.generation_config.max_new_tokens or DEFAULT_NEW_TOKENS

        def caches(t: int) -> tuple[int, ...]:
            if cache_lengths is not None:
                return tuple(s for s in cache_lengths if s >= t + max_new_tokens - 1) or ()
            fits = [s for s in self.buckets.cache_lengths_for(t) if s >= t + max_new_tokens - 1]
            return (fits or self.buckets.cache_lengths_for(t)[-1:])[:1]

        jobs: list[tuple[str, Callable]] = []
        if media:
            jobs.append((f"encode chunk={self.tower_chunk}", self._encode))
        for t in prompt_lengths:
            if not caches(t):
                continue
            jobs.append((f"media_start T={t}", functools.partial(self._media_start, t)))
            if media:
                jobs.append((f"media_add T={t}", functools.partial(self._media_add, t)))
            if t > self.buckets.prefill_chunk:
                jobs.append((f"prompt_kv T={t}", functools.partial(self._prompt_kv, t)))
                jobs.append((f"prefill_chunk T={t}", functools.partial(self._prefill_chunk, t)))
            else:
                jobs.append((f"prefill T={t}", functools.partial(self._prefill, t)))
            jobs += [(f"insert T={t} S={s}", functools.partial(self._insert, t, s)) for s in caches(t)]
        for s in sorted({s for t in prompt_lengths for s in caches(t)}):
            jobs += [(f"decode S={s}", functools.partial(self._decode, s)),
                     (f"evict S={s}", functools.partial(self._evict, s))]
        return jobs

    def warmup(self, prompt_lengths: Sequence[int] | None = None, max_new_tokens: int | None = None,
               media: bool = True, cache_lengths: Sequence[int] | None = None,
               compilation_cache_dir: str | None = None, progress: bool = True) -> list[CompileRecord]:
        """Compile every executable of :meth:`executable_jobs` not compiled yet; returns what was compiled.

        Every sampling setting runs in the same executables (they are per-row data), and a request of any
        number of rows up to the decode batch (``slots``) uses them. ``media=False`` skips the vision tower
        (text-only serving). ``compilation_cache_dir`` enables jax's persistent cache first, so a restarted
        process loads executables instead of compiling them.
        """
        if compilation_cache_dir is not None:
            enable_compilation_cache(compilation_cache_dir)
        return self._run_jobs(self.executable_jobs(prompt_lengths, max_new_tokens, media, cache_lengths), progress)

    def warmup_request(self, input_ids, max_new_tokens: int, *, media: bool = True,
                       allow_beyond_max_positions: bool = False, progress: bool = True) -> list[CompileRecord]:
        """:meth:`warmup` for one request: the prompt bucket of ``input_ids`` (``[B, T]`` or ``[T]``, its image
        and video placeholders counted) and the cache bucket ``max_new_tokens`` more need. Raises the errors
        :meth:`generate` would (``ValueError`` past ``max_position_embeddings`` unless
        ``allow_beyond_max_positions``; `ov_jax.engine.PromptTooLongError` when no bucket fits) before any
        compile."""
        ids = np.asarray(input_ids)
        prompt_length = ids.shape[-1]
        media_tokens = int(np.isin(ids, (self.config.image_token_id, self.config.video_token_id)).sum())
        check_max_positions(self.config.text, prompt_length, max_new_tokens, allow_beyond_max_positions)
        prompt_bucket = self.buckets.prompt_bucket(prompt_length, media_tokens)
        self.buckets.cache_bucket(prompt_bucket, max_new_tokens, prompt_length, media_tokens)
        return self.warmup(prompt_lengths=(prompt_bucket,), max_new_tokens=max_new_tokens, media=media,
                           progress=progress)

    def _run_jobs(self, jobs, progress: bool) -> list[CompileRecord]:
        from tqdm.auto import tqdm

        before = self.compile_count
        bar = tqdm(jobs, desc="compiling buckets", unit="exe", disable=not progress)
        for label, job in bar:
            bar.set_postfix_str(label)
            job()
        new = self.compile_log[before:]
        for record in new:
            log.info("warm-up compiled %s %s in %.2fs", record.name, record.key, record.seconds)
        return new


def params_signature(params: dict) -> tuple:
    """What a compiled executable depends on in a params tree: its structure and each leaf's shape, dtype and
    sharding (not the values)."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple((tuple(np.shape(x)), jnp.result_type(x), getattr(x, "sharding", None)) for x in leaves)


