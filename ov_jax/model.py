"""`LlavaOnevision`: the user-facing model, shaped like transformers' ``LlavaOnevisionForConditionalGeneration``.

Holds a config and a plain params pytree; calls run jitted pure functions (`ov_jax.modeling.llava`)
on a host-side media plan (`ov_jax.media_plan`). The NNX module view is available as ``.module``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ov_jax.config import OneVisionConfig
from ov_jax.generation import GenerationConfig
from ov_jax.media_plan import build_media_plan
from ov_jax.modeling import llava
from ov_jax.modeling.nnx_modules import LlavaOnevisionModule, check_tree

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
    """``logits [B, T, V]`` (float32) and, when labels were given, the mean next-token ``loss``."""

    logits: jax.Array
    loss: jax.Array | None = None


def _as_int_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    return a


def _is_converted(path: os.PathLike) -> bool:
    """A directory written by ``ov-jax convert`` (its config.json carries our own ``ov_jax`` section)."""
    import json

    from ov_jax.hub import checkpoint_file

    try:
        with open(checkpoint_file(path, "config.json")) as f:
            return "ov_jax" in json.load(f)
    except (OSError, ValueError):
        return False


class LlavaOnevision:
    """LLaVA-OneVision in JAX. Build with :meth:`from_pretrained` or :meth:`from_params`.

    ``params`` is the one weights tree: assigning a new tree (or replacing a leaf) is what the next
    ``generate`` uses. ``generation_config`` (`ov_jax.generation.GenerationConfig`) holds the stop / pad ids
    and sampling defaults ``generate`` uses; default: the text config's ids and transformers' defaults.
    """

    def __init__(self, config: OneVisionConfig, params: dict, dtype: Any = jnp.float32,
                 generation_config: GenerationConfig | None = None):
        check_tree(params, config)
        self.config = config
        self.params = params
        self.dtype = resolve_dtype(dtype)
        self.generation_config = generation_config or GenerationConfig.from_text_config(config.text)

    @classmethod
    def from_params(cls, config: OneVisionConfig, params: dict, dtype: Any = jnp.float32,
                    generation_config: GenerationConfig | None = None) -> "LlavaOnevision":
        dtype = resolve_dtype(dtype)
        return cls(config, jax.tree.map(lambda x: jnp.asarray(x, dtype), params), dtype, generation_config)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, dtype: Any = jnp.float32, mesh: Any = None,
                        verify: bool = True, **kwargs) -> "LlavaOnevision":
        """Load a transformers checkpoint directory, a converted orbax directory, or a hub id.

        ``mesh``: a ``jax.sharding.Mesh`` with axes data / fsdp / tensor, a string such as ``"data=2,tensor=4"``
        or a preset name (`ov_jax.sharding`); each device then reads only its own slices of the weights.
        ``verify``: check a converted directory against its checksums (`ov_jax.checkpoint.load_orbax`);
        ``False`` skips that for speed. The checkpoint's ``generation_config.json`` becomes
        ``generation_config`` (`ov_jax.generation.GenerationConfig.from_pretrained`).
        """
        from ov_jax import loading
        from ov_jax.hub import resolve_checkpoint

        dtype = resolve_dtype(dtype)
        path = resolve_checkpoint(path_or_id)
        if mesh is not None:
            from ov_jax import sharding
            from ov_jax.config import load_config

            mesh = sharding.make_mesh(mesh)
            config = load_config(path) if _is_converted(path) else loading.checkpoint_config(path)
            kwargs["shardings"] = sharding.param_shardings(config, mesh)
        if _is_converted(path):
            from ov_jax import checkpoint

            config, params = checkpoint.load_orbax(path, dtype=dtype, verify=verify, **kwargs)
        else:
            config, params = loading.load_params(path, dtype=dtype, **kwargs)
        return cls(config, params, dtype, GenerationConfig.from_pretrained(path, config.text))

    @functools.cached_property
    def module(self) -> LlavaOnevisionModule:
        """The same weights as Flax NNX modules (shares the arrays; no copy)."""
        return LlavaOnevisionModule(self.params, self.config)

    @functools.cached_property
    def _jit_forward(self):
        return jax.jit(functools.partial(llava.forward, config=self.config, dtype=self.dtype))

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
                 pixel_values_videos=None, position_ids=None, labels=None) -> OneVisionOutput:
        """Logits for a full sequence, as transformers' forward (positions default to ``arange``)."""
        input_ids = _as_int_array(input_ids, "input_ids")
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        b, t = input_ids.shape
        mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.shape != (b, t):
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {(b, t)}")
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(t), (b, t))
        plan = build_media_plan(input_ids, self.config, pixel_values, image_sizes, batch_num_images,
                                pixel_values_videos)
        logits = self._jit_forward(self.params, input_ids.astype(np.int32), mask, np.asarray(position_ids, np.int32),
                                   plan.tower_inputs, plan.tap_index, plan.tap_weight, plan.is_media)
        loss = None
        if labels is not None:
            loss = llava.causal_lm_loss(logits, jnp.asarray(_as_int_array(labels, "labels")))
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
