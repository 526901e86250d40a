"""Inference engine: static buckets, AOT-compiled prefill/decode with a donated KV cache, sampling, streaming."""

from ov_jax.engine.buckets import Buckets, PromptTooLongError
from ov_jax.engine.generate import CompileRecord, Engine, enable_compilation_cache
from ov_jax.engine.sampling import SamplingMode
from ov_jax.engine.streaming import TokenStreamer

__all__ = ["Buckets", "CompileRecord", "Engine", "PromptTooLongError", "SamplingMode", "TokenStreamer",
           "enable_compilation_cache", "engine_for"]


def engine_for(model, buckets: Buckets | None = None, **options) -> Engine:
    """The engine attached to a ``LlavaOnevision`` (created on first use; new buckets/options replace it)."""
    engine = model.__dict__.get("_engine")
    if engine is None or buckets is not None or options:
        engine = Engine(model.config, model.params, model.dtype, buckets,
                        generation_config=getattr(model, "generation_config", None), **options)
        model.__dict__["_engine"] = engine
    return engine
