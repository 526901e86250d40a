"""Inference engine: static buckets, AOT-compiled prefill/decode with a donated KV cache, sampling, streaming."""

from ov_jax.engine.buckets import Buckets, PromptTooLongError
from ov_jax.engine.generate import CompileRecord, Engine, enable_compilation_cache
from ov_jax.engine.sampling import SamplingMode
from ov_jax.engine.streaming import TokenStreamer

__all__ = ["Buckets", "CompileRecord", "Engine", "PromptTooLongError", "SamplingMode",
           "TokenStreamer", "enable_compilation_cache", "engine_for"]


def engine_for(model, buckets: Buckets | None = None, **options) -> Engine:
    """The engine attached to a ``LlavaOnevision`` (created on first use; new buckets/options replace it).

    It always serves the model's live ``params`` and ``generation_config``: after either is reassigned (or a
    params leaf replaced) the serving copies are re-derived, keeping the compiled executables when the new tree
    has the same shapes, dtypes and shardings (a fresh engine with the same buckets and options otherwise).
    Its attention backend is the model's (``model.attention``; a new choice builds a new engine).
    """
    engine = model.__dict__.get("_engine")
    if engine is not None and engine.attention != model.attention:
        buckets, options = buckets or engine.buckets, options or model.__dict__["_engine_options"]
        engine = None
    if engine is None or buckets is not None or options:
        engine = Engine(model.config, model.params, model.dtype, buckets,
                        generation_config=model.generation_config, attention=model.attention, **options)
        model.__dict__["_engine"] = engine
        model.__dict__["_engine_options"] = options
    elif not engine.serves(model.params):
        if engine.accepts(model.params):
            engine.use_params(model.params)
        else:
            engine = Engine(model.config, model.params, model.dtype, engine.buckets,
                            generation_config=model.generation_config, attention=model.attention,
                            **model.__dict__["_engine_options"])
            model.__dict__["_engine"] = engine
    engine.generation_config = model.generation_config
    return engine
