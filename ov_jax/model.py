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

    try:
        with open(os.path.join(path, "config.json")) as f:
            return "ov_jax" in json.load(f)
    except (OSError, ValueError):
        return False


class LlavaOnevision:
    """LLaVA-OneVision in JAX. Build with :meth:`from_pretrained` or :meth:`from_params`."""

    source_dir: os.PathLike | None = None  # the checkpoint directory from_pretrained read (its files are exported)

    def __init__(self, config: OneVisionConfig, params: dict, dtype: Any = jnp.float32):
        check_tree(params, config)
        self.config = config
        self.params = params
        self.dtype = resolve_dtype(dtype)

    @classmethod
    def from_params(cls, config: OneVisionConfig, params: dict, dtype: Any = jnp.float32) -> "LlavaOnevision":
        dtype = resolve_dtype(dtype)
        return cls(config, jax.tree.map(lambda x: jnp.asarray(x, dtype), params), dtype)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, dtype: Any = jnp.float32, mesh: Any = None,
                        **kwargs) -> "LlavaOnevision":
        """Load a transformers checkpoint directory, a converted orbax directory, or a hub id.

        ``mesh``: a ``jax.sharding.Mesh`` with axes data / fsdp / tensor, a string such as ``"data=2,tensor=4"``
        or a preset name (`ov_jax.sharding`); each device then reads only its own slices of the weights.
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

            config, params = checkpoint.load_orbax(path, dtype=dtype, **kwargs)
        else:
            config, params = loading.load_params(path, dtype=dtype, **kwargs)
        model = cls(config, params, dtype)
        model.source_dir = path
        return model

    def save_pretrained(self, directory: str | os.PathLike, *, dtype: Any = None,
                        max_shard_size: int | str = "50GB") -> os.PathLike:
        """Write a transformers checkpoint (llava-hf layout) that ``LlavaOnevisionForConditionalGeneration``
        and ``AutoProcessor.from_pretrained`` load; see :func:`ov_jax.export.save_pretrained`.

        Tokenizer, processor and chat template files are copied from :attr:`source_dir` when the model came
        from :meth:`from_pretrained`. ``dtype`` casts the written weights (default: the params' dtype);
        ``max_shard_size`` (bytes or "5GB") splits larger models into indexed shards. ``directory`` must be
        new or empty (``FileExistsError``). Returns the absolute output directory.
        """
        from ov_jax import export

        return export.save_pretrained(self.config, self.params, directory, source=self.source_dir, dtype=dtype,
                                      max_shard_size=max_shard_size)

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
                 pixel_values_videos=None, max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_token_ids=None, streamer=None) -> np.ndarray:
        """New token ids ``[B, max_new_tokens]``: each row to its stop token (kept), then pad. See `ov_jax.engine`."""
        from ov_jax.engine import engine_for

        return engine_for(self).generate(
            input_ids, attention_mask, pixel_values, image_sizes, batch_num_images, pixel_values_videos,
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, stop_token_ids=stop_token_ids, streamer=streamer)

    def warmup(self, buckets=None, *, layout=None, loop=None, **options):
        """Precompile the engine's buckets (``ov_jax.engine.Buckets``) with a progress bar; returns the
        per-executable compile times. ``buckets``/``layout``/``loop`` reconfigure the engine first;
        ``options`` go to ``Engine.warmup`` (batch_sizes, prompt_lengths, sampling, compilation_cache_dir …)."""
        from ov_jax.engine import engine_for

        engine_options = {k: v for k, v in (("layout", layout), ("loop", loop)) if v is not None}
        return engine_for(self, buckets, **engine_options).warmup(**options)
