"""Typed configuration for LLaVA-OneVision, read from a checkpoint's ``config.json``.

Every field that changes numerics or token counts is explicit here. Two file layouts are read:
transformers' (``text_config`` / ``vision_config``) and the original lmms-lab one (Qwen2 fields at the
top level plus ``mm_*`` keys).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

DEFAULT_PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (384 * a, 384 * b) for a in range(1, 7) for b in range(1, 7)
)


class ConfigError(ValueError):
    """A config file is missing a field or holds a value this implementation cannot honour."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 384
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        """27 for 384/14: the conv drops the trailing 6 pixels."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder."""

    vocab_size: int = 152000
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None


QUANT_MODES = ("int8", "int4")
# The language model's per-layer linears, by their params key (`ov_jax.params`).
LM_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
# int4's default int8 exceptions: the attention value and output projections. They are 4% of the 0.5B
# language model's weights, yet at int4 they carry ~40% of its hidden-state error after an image or a video
# (measured, benchmarks/RESULTS.md): every text position reads the media block's attention-weighted values
# through them. Kept at int8 the weight bytes shrink 3.6x instead of 3.8x against bfloat16.
INT4_INT8_WEIGHTS = ("v", "o")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of the stored params (`ov_jax.nn.quant`).

    ``mode``: ``"int8"`` (symmetric, one scale per output channel) or ``"int4"`` (asymmetric, one scale and
    zero point per output channel and group of ``group_size`` consecutive input features, two values packed
    per byte).
    ``group_size`` is ignored for int8 (stored as ``None``); for int4 it must be a positive even integer that
    divides every quantized weight's input size. ``vision``: also quantize the vision tower's linears and the
    projector (the language model's linears, embedding and lm_head always are). ``int8_weights``: in int4
    mode, the language-model linears (names of :data:`LM_LINEARS`) stored int8 instead, as llama.cpp's
    ``Q4_K_M`` keeps its attention values at higher precision (a tuple, list or set; default
    :data:`INT4_INT8_WEIGHTS`; ``()`` for int4 everywhere); ignored for int8 (stored as ``()``). ``ValueError``
    for anything else.
    """

    mode: str
    group_size: int | None = 128
    vision: bool = False
    int8_weights: tuple[str, ...] = INT4_INT8_WEIGHTS

    def __post_init__(self):
        if self.mode not in QUANT_MODES:
            raise ValueError(f"quantization must be one of {QUANT_MODES}, got {self.mode!r}")
        if self.vision not in (True, False):
            raise ValueError(f"quantization's vision must be True or False, got {self.vision!r}")
        object.__setattr__(self, "vision", bool(self.vision))
        names = self.int8_weights
        if not isinstance(names, (str, bytes)) and hasattr(names, "__iter__"):
            names = tuple(names)  # a list, set or generator of names
        if (not isinstance(names, tuple) or not all(isinstance(n, str) for n in names)
                or set(names) - set(LM_LINEARS)):
            raise ValueError(f"int8_weights must be names among {LM_LINEARS} (a tuple, list or set; () for none), "
                             f"got {names!r}")
        object.__setattr__(self, "int8_weights", tuple(n for n in LM_LINEARS if n in names))
        if self.mode == "int8":
            object.__setattr__(self, "group_size", None)
            object.__setattr__(self, "int8_weights", ())
        elif (not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 2
              or self.group_size % 2):
            raise ValueError(f"int4 group_size must be a positive even integer, got {self.group_size!r}")


@dataclasses.dataclass(frozen=True)
class OneVisionConfig:
    """Top level: vision tower + projector + Qwen2 + the anyres / video rules."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_id: int = 151646
    video_token_id: int = 151647
    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    vision_aspect_ratio: str = "anyres_max_9"
    vision_feature_layer: int | tuple[int, ...] = -1
    vision_feature_select_strategy: str = "full"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = True
    dtype: str = "float32"  # dtype the checkpoint file declares (informational)
    quantization: QuantConfig | None = None  # quantized weights (`ov_jax.nn.quant`); None = float

    @property
    def anyres_max(self) -> int:
        """N of ``anyres_max_N`` (the cap on unpadded grid area, in base-tile units)."""
        return parse_anyres_max(self.vision_aspect_ratio)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Selected vision layers as hidden-state indices in ``[0, num_hidden_layers]``."""
        layers = self.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        n = self.vision.num_hidden_layers
        return tuple(layer if layer >= 0 else n + 1 + layer for layer in layers)

    @property
    def vision_layers_used(self) -> int:
        """How many encoder layers must run: the deepest selected one (trailing layers are skipped)."""
        return max(self.feature_layers)

    @property
    def projector_in_dim(self) -> int:
        return self.vision.hidden_size * len(self.feature_layers)

    @property
    def lm_head_tied(self) -> bool:
        return self.tie_word_embeddings or self.text.tie_word_embeddings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OneVisionConfig":
        """Rebuild from :meth:`to_dict` output (our own serialisation, used by orbax checkpoints).

        A field this version does not know is a :class:`ConfigError` naming it; a missing one takes its default.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"the 'ov_jax' config section must be an object, got {type(d).__name__}")
        _check_fields(cls, d, "ov_jax")
        d = dict(d)
        for name, section in (("vision", VisionConfig), ("text", TextConfig)):
            if not isinstance(d.get(name, {}), dict):
                raise ConfigError(f"the 'ov_jax.{name}' config section must be an object")
            _check_fields(section, d.get(name, {}), f"ov_jax.{name}")
        vision = VisionConfig(**d.pop("vision", {}))
        text = dict(d.pop("text", {}))
        if isinstance(text.get("eos_token_id"), list):
            text["eos_token_id"] = tuple(text["eos_token_id"])
        if "image_grid_pinpoints" in d:
            d["image_grid_pinpoints"] = tuple(tuple(p) for p in d["image_grid_pinpoints"])
        if isinstance(d.get("vision_feature_layer"), list):
            d["vision_feature_layer"] = tuple(d["vision_feature_layer"])
        if d.get("quantization") is not None:
            # written before int8_weights existed: int4 was int4 everywhere
            d["quantization"] = QuantConfig(**{"int8_weights": (), **d["quantization"]})
        return cls(vision=vision, text=TextConfig(**text), **d)

    def replace(self, **changes: Any) -> "OneVisionConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "OneVisionConfig":
        v, t = self.vision, self.text
        problems = _value_problems(self)
        if problems:  # the checks below divide by these sizes
            raise ConfigError("invalid LLaVA-OneVision config: " + "; ".join(problems))
        if v.hidden_size % v.num_attention_heads:
            problems.append(f"vision hidden_size {v.hidden_size} not divisible by heads {v.num_attention_heads}")
        if t.num_attention_heads % t.num_key_value_heads:
            problems.append(
                f"text heads {t.num_attention_heads} not a multiple of kv heads {t.num_key_value_heads}"
            )
        if self.vision_feature_select_strategy != "full":
            problems.append(
                f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} is not supported: only "
                "'full' keeps the 27x27 token grid that anyres packing needs (every released checkpoint uses it)")
        for layer in self.feature_layers:
            if not 0 < layer <= v.num_hidden_layers:
                problems.append(f"vision_feature_layer {self.vision_feature_layer} outside the tower")
        for h, w in self.image_grid_pinpoints:
            if h % v.image_size or w % v.image_size:
                problems.append(f"pinpoint {(h, w)} is not a multiple of the tile size {v.image_size}")
        if v.hidden_act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            problems.append(f"vision hidden_act {v.hidden_act!r} is not the tanh GELU")
        if self.projector_hidden_act != "gelu":
            problems.append(f"projector_hidden_act {self.projector_hidden_act!r} is not supported")
        if t.hidden_act != "silu":
            problems.append(f"text hidden_act {t.hidden_act!r} is not supported")
        self.anyres_max  # raises on a malformed string
        if problems:
            raise ConfigError("invalid LLaVA-OneVision config: " + "; ".join(problems))
        return self


_SIZES = {"vision": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                     "image_size", "num_channels"),
          "text": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "max_position_embeddings")}
_POSITIVE_REALS = {"vision": ("layer_norm_eps",), "text": ("rms_norm_eps", "rope_theta")}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _value_problems(config: "OneVisionConfig") -> list[str]:
    """Sizes that are not positive integers, epsilons / rope theta that are not positive finite numbers,
    negative or non-integer token ids and pinpoints that are not positive integer pairs (a hostile or damaged
    config.json would otherwise fail later with a division by zero or a NaN)."""
    problems = []
    for section, sizes in _SIZES.items():
        for name in sizes:
            value = getattr(getattr(config, section), name)
            if not _is_int(value) or value < 1:
                problems.append(f"{section} {name} must be a positive integer, got {value!r}")
    for section, names in _POSITIVE_REALS.items():
        for name in names:
            value = getattr(getattr(config, section), name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                problems.append(f"{section} {name} must be a positive finite number, got {value!r}")
    for name in ("image_token_id", "video_token_id"):
        value = getattr(config, name)
        if not _is_int(value) or value < 0:
            problems.append(f"{name} must be a non-negative integer token id, got {value!r}")
    if not all(len(p) == 2 and all(_is_int(x) and x > 0 for x in p) for p in config.image_grid_pinpoints):
        problems.append(f"image_grid_pinpoints must be pairs of positive integers, got {config.image_grid_pinpoints}")
    return problems


def _check_fields(cls: type, d: dict[str, Any], section: str) -> None:
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown field{'s' if len(unknown) > 1 else ''} in the {section!r} config section: "
                          f"{', '.join(f'{section}.{name}' for name in unknown)} (written by a different ov_jax "
                          "version? convert the checkpoint again)")


def parse_anyres_max(vision_aspect_ratio: str) -> int:
    """``"anyres_max_9"`` → 9 (transformers uses ``int(s.strip("anyres_max_"))``)."""
    s = vision_aspect_ratio.strip()
    if not s.startswith("anyres_max_") or not s[len("anyres_max_"):].isdigit():
        raise ConfigError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not of the form 'anyres_max_N'")
    return int(s[len("anyres_max_"):])


def _rope_theta(d: dict[str, Any]) -> float:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"rope type {rope_type!r} is not supported (only the default RoPE)")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def _eos(value: Any) -> int | tuple[int, ...] | None:
    return tuple(value) if isinstance(value, list) else value


def text_config_from_hf(d: dict[str, Any]) -> TextConfig:
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [name for name in required if name not in d]
    if missing:
        raise ConfigError(f"the text config has no {', '.join(map(repr, missing))}")
    if d.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=true is not supported")
    heads = d["num_attention_heads"]
    return TextConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads", heads),
        head_dim=d.get("head_dim") or (d["hidden_size"] // heads if _is_int(heads) and heads > 0 and
                                        _is_int(d["hidden_size"]) else 0),  # 0: validate() names the problem
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(d),
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        hidden_act=d.get("hidden_act", "silu"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=_eos(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
    )


def vision_config_from_hf(d: dict[str, Any]) -> VisionConfig:
    defaults = VisionConfig()
    return VisionConfig(
        hidden_size=d.get("hidden_size", defaults.hidden_size),
        intermediate_size=d.get("intermediate_size", defaults.intermediate_size),
        num_hidden_layers=d.get("num_hidden_layers", defaults.num_hidden_layers),
        num_attention_heads=d.get("num_attention_heads", defaults.num_attention_heads),
        patch_size=d.get("patch_size", defaults.patch_size),
        image_size=d.get("image_size", defaults.image_size),
        num_channels=d.get("num_channels", defaults.num_channels),
        layer_norm_eps=d.get("layer_norm_eps", defaults.layer_norm_eps),
        hidden_act=d.get("hidden_act", defaults.hidden_act),
    )


def _pinpoints(value: Any) -> tuple[tuple[int, int], ...]:
    if value is None:
        return DEFAULT_PINPOINTS
    if isinstance(value, str):  # lmms-lab: "(1x1),...,(6x6)" in units of 384
        import re

        grids = re.findall(r"\((\d+)x(\d+)\)", value)
        if not grids:
            raise ConfigError(f"cannot parse image_grid_pinpoints {value!r}")
        lo_h, lo_w = min(int(a) for a, _ in grids), min(int(b) for _, b in grids)
        hi_h, hi_w = max(int(a) for a, _ in grids), max(int(b) for _, b in grids)
        return tuple((384 * a, 384 * b) for a in range(lo_h, hi_h + 1) for b in range(lo_w, hi_w + 1))
    return tuple((int(h), int(w)) for h, w in value)


def _is_lmms_lab(d: dict[str, Any]) -> bool:
    return "text_config" not in d and any(k.startswith("mm_") for k in d)


MODEL_TYPE = "llava_onevision"  # transformers' LlavaOnevisionConfig
LMMS_LAB_MODEL_TYPES = ("llava", "llava_qwen")  # the original LLaVA-NeXT code's Qwen2 LLaVA


def _check_model_type(d: dict[str, Any]) -> None:
    model_type = d.get("model_type")
    allowed = LMMS_LAB_MODEL_TYPES if _is_lmms_lab(d) else (MODEL_TYPE,)
    if model_type not in allowed:
        found = "has no model_type" if model_type is None else f"has model_type {model_type!r}"
        raise ConfigError(f"config.json {found}: not a LLaVA-OneVision checkpoint (expected "
                          f"{' or '.join(repr(m) for m in allowed)}"
                          f"{' for the lmms-lab layout' if _is_lmms_lab(d) else ''})")


def config_from_hf_dict(d: dict[str, Any]) -> OneVisionConfig:
    """Parse a transformers or lmms-lab ``config.json`` dict; another model type is a :class:`ConfigError`."""
    _check_model_type(d)
    if _is_lmms_lab(d):
        return _config_from_lmms_lab(d)
    if "text_config" not in d:
        raise ConfigError("config.json has neither 'text_config' (transformers) nor 'mm_*' keys (lmms-lab)")
    for section in ("text_config", "vision_config"):
        if not isinstance(d.get(section, {}) or {}, dict) or section == "text_config" and not d[section]:
            raise ConfigError(f"config.json's {section!r} must be a non-empty object, got "
                              f"{json.dumps(d[section])[:80]}")
    text = text_config_from_hf(d["text_config"])
    vision = vision_config_from_hf(d.get("vision_config") or {})
    feature_layer = d.get("vision_feature_layer", -1)
    tie = bool(d.get("tie_word_embeddings", False)) or text.tie_word_embeddings
    return OneVisionConfig(
        vision=vision,
        text=text,
        image_token_id=d.get("image_token_index", d.get("image_token_id", 151646)),
        video_token_id=d.get("video_token_index", d.get("video_token_id", 151647)),
        image_grid_pinpoints=_pinpoints(d.get("image_grid_pinpoints")),
        vision_aspect_ratio=d.get("vision_aspect_ratio", "anyres_max_9"),
        vision_feature_layer=tuple(feature_layer) if isinstance(feature_layer, list) else feature_layer,
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", "full"),
        projector_hidden_act=d.get("projector_hidden_act", "gelu"),
        multimodal_projector_bias=d.get("multimodal_projector_bias", True),
        tie_word_embeddings=tie,
        dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
    ).validate()


def _config_from_lmms_lab(d: dict[str, Any]) -> OneVisionConfig:
    """The original LLaVA-NeXT / lmms-lab config: Qwen2 at the top level, ``mm_*`` for the vision side.

    The SigLIP tower there deletes its last layer and always uses the last remaining hidden state, so
    ``mm_vision_select_layer`` is ignored, as in the original code. Vision sizes default to
    siglip-so400m-patch14-384; an optional ``vision_config`` dict overrides them.
    """
    if d.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConfigError(f"mm_projector_type {d['mm_projector_type']!r} is not supported (mlp2x_gelu only)")
    text = text_config_from_hf(d)
    vision = vision_config_from_hf(d.get("vision_config") or {})
    if "mm_hidden_size" in d and d["mm_hidden_size"] != vision.hidden_size:
        vision = dataclasses.replace(vision, hidden_size=d["mm_hidden_size"])
    return OneVisionConfig(
        vision=vision,
        text=text,
        image_token_id=d.get("image_token_index", 151646),
        video_token_id=d.get("video_token_index", 151647),
        image_grid_pinpoints=_pinpoints(d.get("image_grid_pinpoints")),
        vision_aspect_ratio=d.get("image_aspect_ratio", "anyres_max_9"),
        vision_feature_layer=-1,
        tie_word_embeddings=text.tie_word_embeddings,
        dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
    ).validate()


def load_config(path: str | os.PathLike) -> OneVisionConfig:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    from ov_jax.hub import checkpoint_file

    path = os.fspath(path)
    file = checkpoint_file(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no config.json in {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{file} must hold a JSON object, got {type(d).__name__}")
    if "ov_jax" in d:  # our own converted checkpoints
        return OneVisionConfig.from_dict(d["ov_jax"]).validate()
    return config_from_hf_dict(d)
