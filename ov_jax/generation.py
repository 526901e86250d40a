"""Generation defaults of a checkpoint: stop ids, pad id and sampling values, as transformers resolves them.

One :class:`GenerationConfig` per model (``LlavaOnevision.generation_config``), read by
:meth:`GenerationConfig.from_pretrained` from a checkpoint's ``generation_config.json``; without that file the
text config's ``eos_token_id`` / ``pad_token_id`` / ``bos_token_id`` are used (as transformers'
``GenerationConfig.from_model_config``). ``generate``, the CLI, batch inference and the engine all take their
stop ids, pad id and sampling defaults from it.

Precedence follows transformers' ``GenerationMixin._prepare_generation_config``: a value passed to ``generate``
wins over the checkpoint's ``generation_config.json``, which wins over transformers' global defaults
(``do_sample=False``, ``temperature=1.0``, ``top_k=50``, ``top_p=1.0``, 20 new tokens). ``top_k`` and ``top_p``
only filter sampled tokens; ``top_k=0`` turns top-k off.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

import numpy as np

from ov_jax.hub import checkpoint_file

log = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_NEW_TOKENS = 20  # transformers' default max_length=20 counts new tokens when nothing sets a length

# Fields transformers would act on but ov_jax does not implement, with the value that means "off".
UNSUPPORTED = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "typical_p": 1.0,
               "min_p": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "num_return_sequences": 1,
               "min_new_tokens": None, "bad_words_ids": None, "suppress_tokens": None,
               "begin_suppress_tokens": None, "forced_eos_token_id": None, "length_penalty": 1.0}


class GenerationConfigError(ValueError):
    """A generation value (argument or ``generation_config.json`` field) that transformers would not accept."""


class BeyondMaxPositionsError(ValueError):
    """A prompt plus the tokens to generate needs more positions than the text model was trained with."""


def check_max_positions(text_config: Any, prompt_length: int, max_new_tokens: int,
                        allow_beyond_max_positions: bool = False) -> None:
    """Raise :class:`BeyondMaxPositionsError` when ``prompt_length + max_new_tokens`` (tokens, media tokens
    included) exceeds ``text_config.max_position_embeddings``, unless ``allow_beyond_max_positions``."""
    positions = text_config.max_position_embeddings
    if prompt_length + max_new_tokens > positions and not allow_beyond_max_positions:
        raise BeyondMaxPositionsError(
            f"the prompt ({prompt_length} tokens) plus max_new_tokens={max_new_tokens} is beyond the text model's "
            f"max_position_embeddings={positions}; shorten the prompt, lower max_new_tokens, or allow it explicitly "
            "(allow_beyond_max_positions=True, CLI --allow-beyond-max-positions) to run past the positions the "
            "model was trained on")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_sampling_values(do_sample: bool, temperature: float, top_k: int, top_p: float) -> None:
    """Raise :class:`GenerationConfigError` naming the argument when a sampling value cannot work.

    ``temperature``: finite and ``>= 0`` (``> 0`` when sampling); ``top_k``: an integer ``>= 0`` (0 = off);
    ``top_p``: in ``(0, 1]`` (1 = off). Non-finite values are rejected whether or not sampling is on.
    """
    if not isinstance(do_sample, (bool, np.bool_)):
        raise GenerationConfigError(f"do_sample must be True or False, got {do_sample!r}")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise GenerationConfigError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature > float(np.finfo(np.float32).max):
        raise GenerationConfigError(f"temperature must be a finite float32 number (sampling runs in float32), got "
                                    f"{temperature!r}")
    if do_sample and not np.float32(temperature) > 0:
        raise GenerationConfigError(f"temperature must be > 0 when sampling (do_sample=True; in float32, which "
                                    f"sampling runs in), got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise GenerationConfigError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:  # also rejects nan
        raise GenerationConfigError(f"top_p must be a number in (0, 1] (1 = off), got {top_p!r}")


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
    """``None`` / an id / a list of ids → a tuple of non-negative ids."""
    if value is None:
        return ()
    ids = [value] if not isinstance(value, (list, tuple, np.ndarray)) else list(np.asarray(value).ravel())
    if not all(_is_int(i) and i >= 0 for i in ids):
        raise GenerationConfigError(f"{name} must be a non-negative token id or a list of them, got {value!r}")
    return tuple(int(i) for i in ids)


def _token_id(value: Any, name: str) -> int | None:
    if isinstance(value, (list, tuple)):  # transformers tolerates a one-element list here
        value = value[0] if value else None
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise GenerationConfigError(f"{name} must be a non-negative token id, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Stop / pad / bos ids and sampling defaults, with transformers' global defaults where unset.

    ``eos_token_id``: the stop ids (a generated stop id is kept, then the row is padded). ``pad_token_id``:
    ``None`` means "the first stop id", as transformers falls back (see :attr:`pad_id`). ``max_new_tokens`` /
    ``max_length`` as in transformers: ``max_length`` counts the prompt; with neither, 20 new tokens.
    """

    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int | None = None
    max_length: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "eos_token_id", _token_ids(self.eos_token_id, "eos_token_id"))
        object.__setattr__(self, "pad_token_id", _token_id(self.pad_token_id, "pad_token_id"))
        object.__setattr__(self, "bos_token_id", _token_id(self.bos_token_id, "bos_token_id"))
        check_sampling_values(self.do_sample, self.temperature, self.top_k, self.top_p)
        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise GenerationConfigError(f"{name} must be a positive integer, got {value!r}")

    @property
    def pad_id(self) -> int | None:
        """The id written after a row's stop token: ``pad_token_id``, else the first stop id, else ``None``."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id[0] if self.eos_token_id else None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GenerationConfig":
        """From a ``generation_config.json`` dict: ``None`` / absent fields take transformers' defaults.

        Fields transformers acts on that ov_jax does not implement (beam search, repetition penalty, ...) are
        logged as a warning and ignored; other unknown fields are ignored as transformers keeps them unused.
        """
        if not isinstance(values, dict):
            raise GenerationConfigError(f"a generation config must be a JSON object, got {type(values).__name__}")
        ignored = sorted(k for k, off in UNSUPPORTED.items() if values.get(k, off) not in (off, None))
        if ignored:
            log.warning("generation config fields not implemented by ov_jax are ignored: %s",
                        ", ".join(f"{k}={values[k]!r}" for k in ignored))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known and v is not None})

    @classmethod
    def from_text_config(cls, text_config: Any) -> "GenerationConfig":
        """Ids from a text config (``OneVisionConfig.text``), sampling values at transformers' defaults."""
        return cls(eos_token_id=text_config.eos_token_id, pad_token_id=text_config.pad_token_id,
                   bos_token_id=text_config.bos_token_id)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, text_config: Any) -> "GenerationConfig":
        """A checkpoint directory's ``generation_config.json`` (only it: absent fields are unset, as in
        transformers), or without that file the ids of ``text_config``. A file that is not a valid generation
        config raises :class:`GenerationConfigError` naming it."""
        path = checkpoint_file(directory, GENERATION_CONFIG_FILE)
        if not path.is_file():
            return cls.from_text_config(text_config)
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
            return cls.from_dict(values)
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError and GenerationConfigError included
            raise GenerationConfigError(f"{path}: not a valid generation config ({err})") from None

    def merged(self, **overrides: Any) -> "GenerationConfig":
        """This config with every override that is not ``None`` applied (a ``generate`` call's arguments).

        Keys are field names; ``stop_token_ids`` is accepted as ``eos_token_id``. Bad values raise
        :class:`GenerationConfigError` naming the argument.
        """
        if "stop_token_ids" in overrides:
            overrides["eos_token_id"] = overrides.pop("stop_token_ids")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def new_tokens(self, prompt_length: int) -> int:
        """How many tokens to generate after a prompt of ``prompt_length`` columns (padding included, as
        transformers counts ``max_length``): ``max_new_tokens``, else ``max_length - prompt_length``, else 20."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is None:
            return DEFAULT_NEW_TOKENS
        if self.max_length <= prompt_length:
            raise GenerationConfigError(f"max_length={self.max_length} leaves no room for new tokens after a "
                                        f"{prompt_length}-token prompt; set max_new_tokens")
        return self.max_length - prompt_length


def generation_overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``generate`` keywords that :meth:`GenerationConfig.merged` takes (fields and
    ``stop_token_ids``); the rest (``seed``, ``streamer`` ...) are left out."""
    names = {f.name for f in dataclasses.fields(GenerationConfig)} | {"stop_token_ids"}
    return {k: v for k, v in kwargs.items() if k in names}


def infer_attention_mask(input_ids: np.ndarray, generation_config: GenerationConfig) -> np.ndarray:
    """The attention mask ``generate`` uses when none is given (``[B, T]`` bool), by transformers' rule
    (``_prepare_attention_mask_for_generation``): pad positions are masked when the pad id (after the
    first-stop-id fallback) occurs in ``input_ids`` and is not a stop id; otherwise every token is attended."""
    ids = np.asarray(input_ids)
    pad = generation_config.pad_id
    if pad is None or pad in generation_config.eos_token_id or not (ids == pad).any():
        return np.ones(ids.shape, bool)
    return ids != pad
