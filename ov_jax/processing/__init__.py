"""Processor: PIL/NumPy image preprocessing, chat template (jinja2), tokenizer (`tokenizers`), video frames.

Names are imported lazily so that importing a submodule (e.g. ``ov_jax.processing.video``) stays cheap.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("LlavaOnevisionProcessor", "Processor"):
        from ov_jax.processing import processor

        return getattr(processor, name)
    raise AttributeError(f"module 'ov_jax.processing' has no attribute {name!r}")


__all__ = ["LlavaOnevisionProcessor", "Processor"]
