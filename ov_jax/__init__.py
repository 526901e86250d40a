"""LLaVA-OneVision in JAX.

Public names are imported lazily (``_LAZY`` maps each to its module), so ``import ov_jax`` stays cheap and does
not pull in jax, PIL or tokenizers until they are used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "LlavaOnevision": "ov_jax.model",
    "make_tiny": "ov_jax.tiny",
    "LlavaOnevisionProcessor": "ov_jax.processing.processor",
    "Processor": "ov_jax.processing.processor",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ov_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(_LAZY)
