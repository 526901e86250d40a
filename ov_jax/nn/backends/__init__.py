"""Attention backends, picked by one selector (:func:`resolve_attention`).

=========  =====================================================================  ==============================
name       kernel                                                                 runs on
=========  =====================================================================  ==============================
``xla``    `ov_jax.modeling.layers.attention` on a dense mask (prefill: by causal   every platform, every dtype
           query blocks); causal forward / training: flash (`ov_jax.nn.flash`);
           the reference and float32 parity path
``cpu``    same numerics as ``xla``: one 2-D product per kv head, and decode on a   every platform (meant for CPU)
           heads-major cache (`ov_jax.nn.backends.cpu`)
``cudnn``  ``jax.nn.dot_product_attention(implementation="cudnn")`` for             NVIDIA GPU, bfloat16 / float16
           self-attention; decode as ``xla``
``splash`` Pallas splash attention for self-attention; decode as ``xla``            TPU (CPU: Pallas interpret mode)
=========  =====================================================================  ==============================

``"auto"`` picks ``cpu`` on CPU, ``cudnn`` on GPU for a bfloat16 / float16 compute dtype (``xla`` for
float32, which cuDNN's flash attention does not take), ``splash`` on TPU, and ``xla`` anywhere else.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

AUTO = "auto"
NAMES = ("xla", "cpu", "cudnn", "splash")
CHOICES = (AUTO,) + NAMES
HALF_DTYPES = ("bfloat16", "float16")


class AttentionBackendError(ValueError):
    """An unknown attention backend name, or one that cannot run on this platform / dtype."""


class Backend(NamedTuple):
    """One backend's two cases, both ``(q, k, v, meta: AttentionMeta) -> [B, T, nh, hd]``."""

    self_attention: Callable
    cached_attention: Callable


def get_backend(name: str) -> Backend:
    """The registered backend ``name`` (one of :data:`NAMES`; resolve ``"auto"`` first)."""
    if name not in NAMES:
        raise AttentionBackendError(f"attention backend {name!r} is not one of {list(NAMES)}"
                                    + (" (resolve 'auto' with resolve_attention first)" if name == AUTO else ""))
    module = importlib.import_module(f"ov_jax.nn.backends.{name}")
    return Backend(module.self_attention, module.cached_attention)


def resolve_attention(name: str, platform: str, dtype: Any) -> str:
    """The backend to run for ``name`` (one of :data:`CHOICES`) on ``platform`` (``"cpu"``, ``"gpu"`` /
    ``"cuda"`` / ``"rocm"``, ``"tpu"``) with compute ``dtype``. Raises :class:`AttentionBackendError` naming
    the choice for an unknown name, ``cudnn`` off an NVIDIA GPU or in float32, and ``splash`` on a GPU."""
    if not isinstance(name, str) or name not in CHOICES:
        raise AttentionBackendError(f"attention must be one of {list(CHOICES)}, got {name!r}")
    dtype = jnp.dtype(dtype).name
    gpu = platform in ("gpu", "cuda", "rocm")
    if name == AUTO:
        if platform == "cpu":
            return "cpu"
        if platform == "tpu":
            return "splash"
        return "cudnn" if platform in ("gpu", "cuda") and dtype in HALF_DTYPES else "xla"
    if name == "cudnn":
        if platform not in ("gpu", "cuda"):
            raise AttentionBackendError(f"attention='cudnn' needs an NVIDIA GPU; this model's arrays are on "
                                        f"{platform!r} (use 'auto' or 'xla')")
        if dtype not in HALF_DTYPES:
            raise AttentionBackendError(f"attention='cudnn' runs bfloat16 / float16 only, the compute dtype is "
                                        f"{dtype} (use 'xla', the float32 path)")
    if name == "splash" and gpu:
        raise AttentionBackendError("attention='splash' is a TPU kernel (interpret mode on CPU for tests); on a "
                                    "GPU use 'cudnn' or 'xla'")
    return name


def platform_of(tree: Any) -> str:
    """The platform of the first array in ``tree`` (``jax.default_backend()`` for host arrays)."""
    leaf = jax.tree.leaves(tree)[0]
    return next(iter(leaf.devices())).platform if isinstance(leaf, jax.Array) else jax.default_backend()
