"""`LlavaOnevision`: the user-facing model, shaped like transformers' ``LlavaOnevisionForConditionalGeneration``.

Holds a config and a plain params pytree; calls run jitted pure functions (`ov_jax.modeling.llava`)
on a host-side media plan (`ov_jax.media_plan`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ov_jax.config import OneVisionConfig
from ov_jax.generation import GenerationConfig
from ov_jax.inputs import integers, model_inputs
from ov_jax.modeling import llava, lm_head
from ov_jax.nn.backends import platform_of, resolve_attention
from ov_jax.params import LoraSpec, check_tree, param_specs
from ov_jax.sharding import mesh_of

# `llava.hidden_states`' array arguments, in order (keys of `ov_jax.inputs.model_inputs`).
HIDDEN_INPUTS = ("input_ids", "attention_mask", "position_ids", "tower_inputs", "tap_index", "tap_weight", "is_media")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: Any) -> Any:
    """``"bfloat16"`` / ``jnp.bfloat16`` / ``np.float32`` → a jnp dtype; anything else is an error."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass
class OneVisionOutput:
    """``logits [B, K, V]`` (float32; ``K`` = the positions ``logits_to_keep`` keeps, all ``T`` by default) and,
    when labels were given, the mean next-token ``loss`` (float32 scalar)."""

    logits: jax.Array
    loss: jax.Array | None = None


def _logits_to_keep(value, length: int) -> tuple[int, np.ndarray | None]:
    """``logits_to_keep`` as ``(keep_last, keep_index)``: an int (last N positions, 0 = all) or positions."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"logits_to_keep must be >= 0, got {value}")
        return int(value), None
    index = integers(value, "logits_to_keep")
    if index.ndim != 1:
        raise ValueError(f"logits_to_keep must be an int or a 1-D array of positions, got shape {index.shape}")
    if index.size and (index.min() < -length or index.max() >= length):
        raise ValueError(f"logits_to_keep positions must lie in [{-length}, {length}), got {index.min()}..{index.max()}")
    return 0, (index % length).astype(np.int32)


def _is_converted(path: os.PathLike) -> bool:
    """A directory written by ``ov-jax convert`` (its config.json carries our own ``ov_jax`` section)."""
    import json

    from ov_jax.hub import checkpoint_file

    try:
        with open(checkpoint_file(path, "config.json")) as f:
            return "ov_jax" in json.load(f)
    except (OSError, ValueError):
        return False


def _asked_quantization(mode: str | None, given: dict, stored, path) -> Any:
    """The `ov_jax.config.QuantConfig` that ``from_pretrained``'s arguments ask for (``given``: the options not
    left out, by field name), the options left out taken from ``stored`` (the source's quantization, None for
    float weights) when it has ``mode``, else the defaults; None when nothing is asked for."""
    from ov_jax.config import QuantConfig

    mode = mode or (stored.mode if stored is not None and given else None)
    if mode is None:
        if given:
            names = ", ".join("quantize_vision" if k == "vision" else k for k in given)
            raise ValueError(f"{names} apply only with quantization='int8' or 'int4' ({path} holds float weights)")
        return None
    base = stored if stored is not None and stored.mode == mode else QuantConfig(mode)
    return dataclasses.replace(base, **given)


class LlavaOnevision:
    """LLaVA-OneVision in JAX. Build with :meth:`from_pretrained` or :meth:`from_params`.

    ``params`` is the one weights tree: assigning a new tree (or replacing a leaf) is what the next
    ``generate`` uses. ``generation_config`` (`ov_jax.generation.GenerationConfig`) holds the stop / pad ids
    and sampling defaults ``generate`` uses; default: the text config's ids and transformers' defaults.
    """

    source_dir: os.PathLike | None = None  # the checkpoint directory from_pretrained read (its files are exported)

    def __init__(self, config: OneVisionConfig, params: dict, dtype: Any = jnp.float32, lora: LoraSpec | None = None,
                 generation_config: GenerationConfig | None = None, attention: str = "auto"):
        """``params`` in the `ov_jax.params` layout (with ``lora``'s adapters, `ov_jax.nn.lora.add_lora`), stored
        in any float dtype; ``dtype`` is the compute dtype of every call (e.g. float32 master weights with a
        bfloat16 forward). ``attention``: the attention backend of every call and of the engine, one of
        ``"auto"``, ``"xla"``, ``"cpu"``, ``"cudnn"``, ``"splash"`` (`ov_jax.nn.backends`); ``"auto"`` picks
        ``cpu`` on CPU, ``cudnn`` on GPU in bfloat16 / float16 (``xla`` in float32) and ``splash`` on TPU. The
        resolved name is :attr:`attention`. Raises ``ValueError`` when the tree does not match the config, and
        `ov_jax.nn.backends.AttentionBackendError` (a ``ValueError``) for an unknown or unavailable backend."""
        check_tree(params, config, lora)
        self.config = config
        self.params = params
        self.dtype = resolve_dtype(dtype)
        self.attention = attention
        self.lora = lora
        self.generation_config = generation_config or GenerationConfig.from_text_config(config.text)

    @classmethod
    def from_params(cls, config: OneVisionConfig, params: dict, dtype: Any = jnp.float32,
                    generation_config: GenerationConfig | None = None, attention: str = "auto") -> "LlavaOnevision":
        dtype = resolve_dtype(dtype)
        return cls(config, jax.tree.map(lambda x: jnp.asarray(x, dtype), params), dtype,
                   generation_config=generation_config, attention=attention)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, dtype: Any = jnp.float32, mesh: Any = None,
                        verify: bool = True, quantization: str | None = None, group_size: int | None = None,
                        quantize_vision: bool | None = None, int8_weights: Any = None, attention: str = "auto",
                        **kwargs) -> "LlavaOnevision":
        """Load a transformers checkpoint directory, a converted orbax directory, or a hub id.

        ``mesh``: a ``jax.sharding.Mesh`` with axes data / fsdp / tensor, a string such as ``"data=2,tensor=4"``
        or a preset name (`ov_jax.sharding`); each device then reads only its own slices of the weights.
        ``verify``: check a converted directory against its checksums (`ov_jax.checkpoint.load_orbax`);
        ``False`` skips that for speed. The checkpoint's ``generation_config.json`` becomes
        ``generation_config`` (`ov_jax.generation.GenerationConfig.from_pretrained`).
        ``quantization``: ``"int8"`` (per output channel) or ``"int4"`` (per ``group_size`` input features)
        weight-only quantization of the language model's weights (and with ``quantize_vision`` the tower's and
        the projector's), see `ov_jax.nn.quant`; ``int8_weights``: the language-model linears int4 mode keeps
        at int8 (`ov_jax.config.QuantConfig`; ``()`` for int4 everywhere). A directory converted with
        ``--quantize`` loads straight into its quantized form; ``quantization`` and the three options may be
        left out (``None``: as stored) and what is given must match. Other sources are read in float and then
        quantized (peak memory: the float weights), the options left out taking ``group_size=128``,
        ``quantize_vision=False`` and ``int8_weights=("v", "o")``. ``ValueError`` for an unknown mode, a group
        size that does not divide a weight's input size, an option given without ``quantization`` for a float
        source, or a mismatch with a quantized directory. ``attention``: the
        attention backend (see :class:`LlavaOnevision`); an unknown or unavailable one is an error before any
        weight loads.
        """
        from ov_jax import loading
        from ov_jax.config import QuantConfig, load_config
        from ov_jax.hub import resolve_checkpoint

        dtype = resolve_dtype(dtype)
        resolve_attention(attention, jax.default_backend(), dtype)
        given = {field: value for field, value in (("group_size", group_size), ("vision", quantize_vision),
                                                   ("int8_weights", int8_weights)) if value is not None}
        QuantConfig(quantization or "int4", **given)  # bad values fail before any file is read
        path = resolve_checkpoint(path_or_id)
        converted = _is_converted(path)
        config = load_config(path) if converted else loading.checkpoint_config(path)
        stored = config.quantization
        quant = _asked_quantization(quantization, given, stored, path)
        if stored is not None:
            if quant is not None and quant != stored:
                raise ValueError(f"{path} holds weights quantized as {stored}; asked for {quant}")
            quant = None  # already in that form
        if mesh is not None:
            from ov_jax import sharding

            mesh = sharding.make_mesh(mesh)
            kwargs["shardings"] = sharding.param_shardings(config, mesh)
        if quant is not None:
            param_specs(config.replace(quantization=quant))  # a bad group size fails before any weight is read
        if converted:
            from ov_jax import checkpoint

            config, params = checkpoint.load_orbax(path, dtype=dtype, verify=verify, **kwargs)
        else:
            config, params = loading.load_params(path, dtype=dtype, **kwargs)
        if quant is not None:
            from ov_jax.nn.quant import quantize_params

            params, config = quantize_params(params, config, quant)
            if mesh is not None:
                from ov_jax import sharding

                params = sharding.shard_params(params, config, mesh)
        model = cls(config, params, dtype, generation_config=GenerationConfig.from_pretrained(path, config.text),
                    attention=attention)
        model.source_dir = path
        return model

    def save_pretrained(self, directory: str | os.PathLike, *, dtype: Any = None,
                        max_shard_size: int | str = "50GB", overwrite: bool = False) -> os.PathLike:
        """Write a transformers checkpoint (llava-hf layout) that ``LlavaOnevisionForConditionalGeneration``
        and ``AutoProcessor.from_pretrained`` load; see :func:`ov_jax.export.save_pretrained`.

        LoRA adapters are merged into their weights. Tokenizer, processor and chat template files are copied
        from :attr:`source_dir` (set by :meth:`from_pretrained`; assign it for a model built from params).
        ``dtype`` casts the written weights (default: the params' dtype);
        ``max_shard_size`` (bytes or "5GB") splits larger models into indexed shards. ``directory`` must be
        new, empty, or an earlier export to replace with ``overwrite`` (never the source; ``OSError``
        otherwise). Returns the absolute output directory.
        """
        from ov_jax import export

        return export.save_pretrained(self.config, self.params, directory, source=self.source_dir, dtype=dtype,
                                      max_shard_size=max_shard_size, overwrite=overwrite)

    @property
    def attention(self) -> str:
        """The resolved attention backend name; assigning a choice (``"auto"``, ``"xla"``, …) resolves it and
        makes the next call, and the engine, use it."""
        return self._attention

    @attention.setter
    def attention(self, choice: str) -> None:
        self._attention = resolve_attention(choice, platform_of(self.params), self.dtype)
        self.__dict__.pop("_jit_hidden", None)

    @functools.cached_property
    def _jit_logits(self):
        def logits(text, hidden, keep_index, keep_last):
            kept = lm_head.keep_positions(hidden, keep_last if keep_index is None else keep_index)
            return lm_head.lm_logits(text, kept)

        return jax.jit(logits, static_argnames=("keep_last",))

    @functools.cached_property
    def _jit_loss(self):
        return jax.jit(lambda text, hidden, labels: lm_head.mean_loss(*lm_head.causal_lm_loss(text, hidden, labels)))

    @functools.cached_property
    def _jit_hidden(self):
        return jax.jit(functools.partial(llava.hidden_states, config=self.config, dtype=self.dtype,
                                         attention=self.attention))

    def _inputs(self, input_ids, attention_mask, pixel_values, image_sizes, batch_num_images, pixel_values_videos,
                position_ids, labels=None) -> dict[str, np.ndarray]:
        """Checked inputs of `llava.hidden_states` (`ov_jax.inputs.model_inputs`), ``labels`` included if given."""
        return model_inputs(self.config, input_ids, attention_mask, pixel_values, image_sizes, batch_num_images,
                            pixel_values_videos, position_ids, labels=labels)

    def _hidden(self, inputs: dict[str, np.ndarray]) -> jax.Array:
        """`llava.hidden_states` of :meth:`_inputs`, traced under the params' mesh when they are placed on one
        (``jax.set_mesh``: the rules table's activation shardings apply and fused attention kernels run per
        shard)."""
        mesh = mesh_of(self.params)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            return self._jit_hidden(self.params, *(inputs[k] for k in HIDDEN_INPUTS))

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
                      batch_num_images=None, pixel_values_videos=None, position_ids=None) -> jax.Array:
        """The decoder's final-normed hidden states ``[B, T, H]`` (``self.dtype``), what the logits are computed
        from (``lm_head.lm_logits``); arguments as :meth:`__call__`."""
        return self._hidden(self._inputs(input_ids, attention_mask, pixel_values, image_sizes, batch_num_images,
                                         pixel_values_videos, position_ids))

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
                 pixel_values_videos=None, position_ids=None, labels=None, logits_to_keep=0) -> OneVisionOutput:
        """Logits for a full sequence, as transformers' forward (positions default to ``arange``).

        ``logits_to_keep``: an int keeps the logits of the last that many positions (0 = all), an integer
        array of positions keeps those. ``labels [B, T]`` (-100 = ignored) add the mean next-token ``loss``,
        computed in chunks over the vocabulary from every position whatever ``logits_to_keep`` keeps.
        """
        inputs = self._inputs(input_ids, attention_mask, pixel_values, image_sizes, batch_num_images,
                              pixel_values_videos, position_ids, labels)
        keep_last, keep_index = _logits_to_keep(logits_to_keep, inputs["input_ids"].shape[1])
        # Three executables, not one: XLA:CPU holds a second [B, T, V] buffer when the logits product is fused
        # into the same program as the decoder (measured: 5.7 vs 3.0 GB peak at 4,314 tokens, 151,936 vocab).
        hidden = self._hidden(inputs)
        logits = self._jit_logits(self.params["text"], hidden, keep_index, keep_last=keep_last)
        loss = None if labels is None else self._jit_loss(self.params["text"], hidden, inputs["labels"])
        return OneVisionOutput(logits=logits, loss=loss)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
                 pixel_values_videos=None, max_new_tokens: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, stop_token_ids=None, pad_token_id: int | None = None, streamer=None,
                 allow_beyond_max_positions: bool = False) -> np.ndarray:
        """New token ids ``[B, max_new_tokens]`` (int32): each row to its stop token (kept), then pad.

        Arguments left ``None`` take ``self.generation_config`` (the checkpoint's ``generation_config.json``,
        then transformers' defaults: greedy, 20 new tokens, ``top_k=50`` when sampling); ``stop_token_ids``
        overrides its ``eos_token_id``. Without ``attention_mask`` the mask is inferred from the pad id as
        transformers does. Prompt plus ``max_new_tokens`` beyond ``config.text.max_position_embeddings``
        raises ``ValueError`` unless ``allow_beyond_max_positions=True``. See `ov_jax.engine.Engine.generate`.
        """
        from ov_jax.engine import engine_for

        return engine_for(self).generate(
            input_ids, attention_mask, pixel_values, image_sizes, batch_num_images, pixel_values_videos,
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id, streamer=streamer,
            allow_beyond_max_positions=allow_beyond_max_positions)

    def warmup(self, buckets=None, *, layout=None, decode_steps=None, **options):
        """Precompile the engine's buckets (``ov_jax.engine.Buckets``) with a progress bar; returns the
        per-executable compile times. ``buckets``/``layout``/``decode_steps`` reconfigure the engine first;
        ``options`` go to ``Engine.warmup`` (prompt_lengths, max_new_tokens, media, compilation_cache_dir …)."""
        from ov_jax.engine import engine_for

        engine_options = {k: v for k, v in (("layout", layout), ("decode_steps", decode_steps)) if v is not None}
        return engine_for(self, buckets, **engine_options).warmup(**options)
