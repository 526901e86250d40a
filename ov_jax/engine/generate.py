"""The inference engine: bucketed, ahead-of-time compiled prefill and decode with a donated KV cache.

:class:`Engine` owns one executable per (function, bucket shape, sampling mode), compiled on first use
or by :meth:`Engine.warmup`; a request is padded on the host into its buckets (`ov_jax.engine.buckets`)
and never reaches a compiled shape itself. ``compile_log`` records every compilation, so "zero
recompiles after warm-up" is a checkable number.

Flow of ``generate``: host media plan → ``media_start`` → (vision tower on a chunk → ``media_add``) per
chunk of tiles/frames → ``prefill`` (prompt KV + last logits) → ``start`` (first token, KV moved into the
decode cache) → decode, either a Python loop over a jitted step (streams, stops early when every row is
done) or a ``lax.while_loop`` on device.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ov_jax import sharding as sh
from ov_jax.config import OneVisionConfig
from ov_jax.engine import steps
from ov_jax.engine.buckets import Buckets, PaddedRequest, check_left_padded, drop_pad_columns, pad_request
from ov_jax.engine.sampling import GREEDY, SamplingMode, top_p_threshold
from ov_jax.engine.steps import MAX_STOP_IDS, DecodeState, TokenRules
from ov_jax.engine.streaming import as_sink
from ov_jax.generation import GenerationConfig, GenerationConfigError, check_max_positions, infer_attention_mask
from ov_jax.media_plan import build_media_plan
from ov_jax.modeling import qwen2
from ov_jax.nn.backends import platform_of, resolve_attention

log = logging.getLogger(__name__)

LOOPS = ("python", "device")


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
    (default on CPU) or ``"scanned"`` (default elsewhere), see `ov_jax.engine.steps`. ``loop`` is
    ``"device"`` (``lax.while_loop``; default: never slower than the Python loop in our measurements,
    and clearly faster when the host is busy, since no host thread has to be scheduled per token) or
    ``"python"`` (a jitted step per token); a streamer always uses the Python loop.
    ``generation_config`` (`ov_jax.generation.GenerationConfig`, default: the text config's ids) supplies the
    stop and pad ids and the sampling defaults of :meth:`generate`. ``attention``: the attention backend of the
    tower, prefill and decode (`ov_jax.nn.backends`: ``"auto"``, ``"xla"``, ``"cpu"``, ``"cudnn"``,
    ``"splash"``; resolved for the params' platform and ``dtype``, an unavailable one raises ``ValueError``).

    The serving copies of the weights are derived from ``params``; :meth:`use_params` re-derives them from a
    new tree of the same shapes, dtypes and shardings and keeps every compiled executable.
    """

    def __init__(self, config: OneVisionConfig, params: dict, dtype: Any = jnp.float32,
                 buckets: Buckets | None = None, *, layout: str | None = None, loop: str = "device",
                 generation_config: GenerationConfig | None = None, mesh: Any = None, attention: str = "auto"):
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
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
        self.loop = loop
        self.generation_config = generation_config or GenerationConfig.from_text_config(config.text)
        self.tower_chunk = self.buckets.resolved_chunk(self.platform)
        if self.mesh is not None:  # the tower runs data-parallel over the chunk: a multiple of the data axes
            multiple = sh.axis_multiple(self.mesh, "tiles")
            self.tower_chunk = -(-self.tower_chunk // multiple) * multiple
        self.tokens_per_tile = config.vision.num_patches
        self._derive_serving_params(params)
        self._executables: dict[tuple, Any] = {}
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

    def _rules_spec(self) -> TokenRules:
        return TokenRules(*(self._spec(x.shape, x.dtype) for x in _rules_spec()))

    def _executable(self, name: str, key: tuple, fn: Callable, args: Sequence[Any], donate: tuple[int, ...] = ()):
        """The compiled ``fn`` for these argument shapes, compiling (and logging) it on first use."""
        full_key = (name,) + key
        exe = self._executables.get(full_key)
        if exe is None:
            start = time.perf_counter()
            exe = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
            if self.mesh is not None:
                exe = sh.sharded_call(exe)
            record = CompileRecord(name, key, time.perf_counter() - start)
            self.compile_log.append(record)
            log.info("compiled %s %s in %.2fs", name, key, record.seconds)
            self._executables[full_key] = exe
        return exe

    def _media_start(self, b: int, t: int):
        args = (self._newline, self._spec((b, t, 4), np.int32, "taps"), self._spec((b, t, 4), np.float32, "taps"))
        return self._executable("media_start", (b, t), lambda nl, i, w: steps.media_start({"image_newline": nl}, i, w),
                                args)

    def _encode(self):
        c, v = self.tower_chunk, self.config.vision
        tiles = self._spec((c, v.num_channels, v.image_size, v.image_size), np.float32, "tower_inputs")
        args = (self._media_params, tiles)
        fn = functools.partial(steps.encode_tiles, config=self.config, dtype=self.dtype, attention=self.attention)
        return self._executable("encode", (c,), fn, args)

    def _media_add(self, b: int, t: int):
        c, h = self.tower_chunk, self.config.text.hidden_size
        features = self._spec((c * self.tokens_per_tile, h), self.dtype, ("tiles", None))
        args = (self._spec((b, t, h), np.float32, "hidden"), features, self._spec((b, t, 4), np.int32, "taps"),
                self._spec((b, t, 4), np.float32, "taps"), self._spec((), np.int32))
        fn = functools.partial(steps.media_add, tokens_per_tile=self.tokens_per_tile)
        return self._executable("media_add", (b, t, c), fn, args, donate=(0,))

    def _prefill(self, b: int, t: int):
        h = self.config.text.hidden_size
        args = (self._prefill_params, self._spec((b, t), np.int32, "tokens"), self._spec((b, t), bool, "tokens"),
                self._spec((b, t, h), np.float32, "hidden"), self._spec((b, t), bool, "tokens"))
        fn = functools.partial(steps.prefill, config=self.config, dtype=self.dtype, attention=self.attention)
        return self._executable("prefill", (b, t), fn, args)

    def _prompt_kv_spec(self, b: int, t: int) -> qwen2.KVCache:
        tc = self.config.text
        shape = (tc.num_hidden_layers, b, t, tc.num_key_value_heads, tc.head_dim)
        return qwen2.KVCache(self._spec(shape, self.dtype, "cache"), self._spec(shape, self.dtype, "cache"))

    def _start(self, b: int, t: int, s: int, mode: SamplingMode):
        logits = self._spec((b, self.config.text.vocab_size), np.float32, ("batch", "vocab"))
        args = (self._prompt_kv_spec(b, t), logits, self._spec((b, t), bool, "tokens"), self._rules_spec())
        fn = functools.partial(steps.start_decode, mode=mode, cache_length=s, layout=self.layout)
        return self._executable("start", (b, t, s, mode.name), fn, args)

    def _cache_spec(self, b: int, s: int) -> qwen2.KVCache:
        tc = self.config.text
        if self.layout == "scanned":
            shape = (tc.num_hidden_layers, b, s, tc.num_key_value_heads, tc.head_dim)
            return qwen2.KVCache(self._spec(shape, self.dtype, "cache"), self._spec(shape, self.dtype, "cache"))
        layer = self._spec((b, tc.num_key_value_heads, s, tc.head_dim), self.dtype, "layer_cache")
        layers = (layer,) * tc.num_hidden_layers
        return qwen2.KVCache(layers, layers)

    def _state_spec(self, b: int, s: int) -> DecodeState:
        return DecodeState(self._spec((b,), np.int32, "batch_vector"), self._spec((b,), np.int32, "batch_vector"),
                           self._spec((b, s), bool, "tokens"), self._spec((b,), bool, "batch_vector"),
                           self._spec((), np.int32), self._spec((), np.int32))

    def _decode_step(self, b: int, s: int, mode: SamplingMode):
        args = (self._decode_params, self._layers, self._cache_spec(b, s), self._state_spec(b, s), self._rules_spec())
        fn = functools.partial(steps.decode_step, mode=mode, config=self.config, dtype=self.dtype,
                               attention=self.attention)
        return self._executable("decode_step", (b, s, mode.name), fn, args, donate=(2,))

    def _decode_loop(self, b: int, s: int, mode: SamplingMode):
        args = (self._decode_params, self._layers, self._cache_spec(b, s), self._state_spec(b, s), self._rules_spec(),
                self._spec((), np.int32))
        fn = functools.partial(steps.decode_loop, mode=mode, config=self.config, dtype=self.dtype,
                               attention=self.attention)
        return self._executable("decode_loop", (b, s, mode.name), fn, args, donate=(2, 3))

    # --- requests ----------------------------------------------------------------------------------------

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
                pixel_values_videos=None, generation_config: GenerationConfig | None = None) -> PaddedRequest:
        """Validate a request, plan its media on the host and pad everything into buckets with the pad id of
        ``generation_config`` (default: the engine's). Without an ``attention_mask`` it is inferred from that
        pad id, as transformers does (`ov_jax.generation.infer_attention_mask`)."""
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
        return pad_request(ids, mask, plan, self.buckets, pad_id)

    def _media_rows(self, req: PaddedRequest) -> jax.Array:
        b, t = req.batch, req.prompt_length
        tap_index, tap_weight = jax.device_put(req.tap_index), jax.device_put(req.tap_weight)
        rows = self._media_start(b, t)(self._newline, tap_index, tap_weight)
        tiles = req.tower_inputs
        if len(tiles):
            encode, add, c = self._encode(), self._media_add(b, t), self.tower_chunk
            for first in range(0, len(tiles), c):
                chunk = tiles[first:first + c]
                if len(chunk) < c:
                    chunk = np.concatenate([chunk, np.zeros((c - len(chunk),) + chunk.shape[1:], chunk.dtype)])
                features = encode(self._media_params, chunk)
                rows = add(rows, features, tap_index, tap_weight, np.int32(first))
        return rows

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
                 pixel_values_videos=None, max_new_tokens: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, stop_token_ids=None, pad_token_id: int | None = None, streamer=None,
                 allow_beyond_max_positions: bool = False) -> np.ndarray:
        """New token ids ``[B, max_new_tokens]`` (int32): each row up to and including its stop token, then pad.

        Arguments are as transformers' ``generate`` for LLaVA-OneVision (processor outputs, left padding; a
        missing ``attention_mask`` is inferred from the pad id). Sampling follows transformers (temperature →
        top-k → top-p) with a reproducible ``seed``. Arguments left ``None`` take the engine's
        ``generation_config`` (`ov_jax.generation`); bad values raise ``GenerationConfigError`` naming them.
        A prompt plus ``max_new_tokens`` beyond the text model's ``max_position_embeddings`` raises
        `ov_jax.generation.BeyondMaxPositionsError` unless ``allow_beyond_max_positions``.
        """
        gen = self.generation_config.merged(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                            temperature=temperature, top_k=top_k, top_p=top_p,
                                            eos_token_id=stop_token_ids, pad_token_id=pad_token_id)
        if len(gen.eos_token_id) > MAX_STOP_IDS:
            raise GenerationConfigError(f"at most {MAX_STOP_IDS} stop token ids are supported, "
                                        f"got {len(gen.eos_token_id)}")
        new_tokens = gen.new_tokens(np.shape(input_ids)[-1])
        req = self.prepare(input_ids, attention_mask, pixel_values, image_sizes, batch_num_images,
                           pixel_values_videos, generation_config=gen)
        check_max_positions(self.config.text, req.length, new_tokens, allow_beyond_max_positions)
        b, t = req.batch, req.prompt_length
        s = self.buckets.cache_bucket(t, new_tokens, req.length, req.media_tokens)
        mode = SamplingMode.from_args(gen.do_sample, gen.top_k, gen.top_p)
        rules = _rules(gen.eos_token_id, 0 if gen.pad_id is None else gen.pad_id, gen.temperature, gen.top_p, seed)

        mask = jax.device_put(req.attention_mask)
        rows = self._media_rows(req)
        logits, prompt_kv = self._prefill(b, t)(self._prefill_params, req.input_ids, mask, rows, req.is_media)
        del rows
        cache, state = self._start(b, t, s, mode)(prompt_kv, logits, mask, rules)
        del prompt_kv
        put, end = as_sink(streamer)
        if self.loop == "device" and streamer is None:
            tokens = self._run_device_loop(cache, state, rules, b, s, mode, new_tokens)
        else:
            tokens = self._run_python_loop(cache, state, rules, b, s, mode, new_tokens, req.rows, put)
        end()
        return tokens[:req.rows]

    def _run_device_loop(self, cache, state, rules, b, s, mode, max_new_tokens) -> np.ndarray:
        _, _, out = self._decode_loop(b, s, mode)(self._decode_params, self._layers, cache, state, rules,
                                                  np.int32(max_new_tokens))
        return sh.fetch(out)[:, :max_new_tokens]

    def _run_python_loop(self, cache, state, rules, b, s, mode, max_new_tokens, rows, put) -> np.ndarray:
        """Jitted step per token; the host reads step i while step i+1 runs, and stops when all rows are done."""
        step = self._decode_step(b, s, mode) if max_new_tokens > 1 else None
        out = np.full((b, max_new_tokens), int(rules.pad_id), np.int32)
        pending = state
        for i in range(max_new_tokens):
            current = pending
            if i + 1 < max_new_tokens:
                cache, pending = step(self._decode_params, self._layers, cache, current, rules)
            tokens, done = sh.fetch(current.tokens), sh.fetch(current.done)
            out[:, i] = tokens
            put(tokens[:rows])
            if done.all():
                break
        return out

    # --- warm-up -----------------------------------------------------------------------------------------

    def warmup(self, batch_sizes: Sequence[int] | None = None, prompt_lengths: Sequence[int] | None = None,
               max_new_tokens: int | None = None, sampling: Sequence[SamplingMode | str] = ("greedy",),
               media: bool = True, streaming: bool = False, compilation_cache_dir: str | None = None,
               progress: bool = True) -> list[CompileRecord]:
        """Compile every executable a request inside the buckets can need; returns what was compiled.

        Defaults are the engine's buckets. ``max_new_tokens`` limits the cache buckets to the one each
        prompt bucket needs for that many new tokens (default: every cache bucket that fits the prompt).
        ``sampling`` lists modes (``"greedy"``, ``"sample"`` — sampling with the generation config's top-k
        and top-p — or :class:`SamplingMode`); ``media=False``
        skips the vision tower (text-only serving); ``streaming=True`` also compiles the per-token step
        that streamed requests use with the device loop. ``compilation_cache_dir`` enables jax's persistent
        cache first, so a restarted process loads executables instead of compiling them.
        """
        if compilation_cache_dir is not None:
            enable_compilation_cache(compilation_cache_dir)
        batch_sizes = tuple(batch_sizes or self.buckets.batch)
        prompt_lengths = tuple(prompt_lengths or self.buckets.prompt)
        modes = [self._mode(m) for m in sampling]

        def caches(t: int) -> tuple[int, ...]:
            if max_new_tokens is None:
                return self.buckets.cache_lengths_for(t)
            return (self.buckets.cache_bucket(t, max_new_tokens, t),)

        decoders = [self._decode_loop] if self.loop == "device" else []
        decoders += [self._decode_step] if self.loop == "python" or streaming else []
        jobs: list[tuple[str, Callable]] = []
        if media:
            jobs.append((f"encode chunk={self.tower_chunk}", self._encode))
        for b in batch_sizes:
            for t in prompt_lengths:
                jobs.append((f"media_start B={b} T={t}", functools.partial(self._media_start, b, t)))
                if media:
                    jobs.append((f"media_add B={b} T={t}", functools.partial(self._media_add, b, t)))
                jobs.append((f"prefill B={b} T={t}", functools.partial(self._prefill, b, t)))
                jobs += [(f"start B={b} T={t} S={s} {m.name}", functools.partial(self._start, b, t, s, m))
                         for s in caches(t) for m in modes]
            jobs += [(f"decode B={b} S={s} {m.name}", functools.partial(decode, b, s, m)) for decode in decoders
                     for s in sorted({s for t in prompt_lengths for s in caches(t)}) for m in modes]
        return self._run_jobs(jobs, progress)

    def _mode(self, m: SamplingMode | str) -> SamplingMode:
        if isinstance(m, SamplingMode):
            return m
        if m == "greedy":
            return GREEDY
        if m == "sample":
            return SamplingMode.from_args(True, self.generation_config.top_k, self.generation_config.top_p)
        raise ValueError(f"sampling mode must be 'greedy', 'sample' or a SamplingMode, got {m!r}")

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


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _rules_spec() -> TokenRules:
    return TokenRules(_spec((MAX_STOP_IDS,), np.int32), _spec((), np.int32), _spec((), np.float32),
                      _spec((), np.float32), _spec((), np.uint32))


def _rules(stop_ids, pad_id, temperature, top_p, seed) -> TokenRules:
    stops = np.full((MAX_STOP_IDS,), -1, np.int32)
    stops[:len(stop_ids)] = stop_ids
    return TokenRules(stops, np.int32(pad_id), np.float32(temperature), top_p_threshold(top_p),
                      np.uint32(int(seed) % 2**32))
