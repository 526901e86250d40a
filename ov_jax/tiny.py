"""Offline builder of small random-weight LLaVA-OneVision checkpoints in the transformers 5.24 layout.

``make_tiny(out_dir)`` writes everything ``LlavaOnevisionForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` read (config, safetensors weights, a real byte-level BPE tokenizer,
processor configs, chat template, generation config) without torch or network access, so tests, demos
and the ``ov-jax make-tiny`` CLI work on a plain install. The weights are a params tree drawn tensor by
tensor through the loading key table and written with :func:`ov_jax.export.hf_state_dict`, so the names
come from the one table that loading and export use.

The weights are random but deliberately *non-default*: every bias is non-zero, every norm weight is
away from 1 (LayerNorm biases away from 0) and q/k are scaled up so attention is sharp. A dropped bias,
a wrong norm or a uniform-attention bug therefore changes the outputs, while activations stay of
order 1 through all layers in float32.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
import numpy as np

from ov_jax.config import DEFAULT_PINPOINTS, OneVisionConfig, config_from_hf_dict
from ov_jax.export import hf_state_dict
from ov_jax.loading import KEY_TABLE, checkpoint_keys, set_path
from ov_jax.outputs import atomic_output_dir
from ov_jax.params import Params, is_spec, param_specs

TRANSFORMERS_VERSION = "5.24.0"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
MAX_BPE_MERGES = 400  # the corpus yields ~340 merges of frequency ≥ 2
VOCAB_MULTIPLE = 64
NUM_IMAGE_TOKENS = 729  # (384 // 14) ** 2 for the base tile, as the hub processor_config.json says
DTYPES = ("float32", "bfloat16", "float16")
OUTPUT_KIND = "make-tiny"  # the `ov_jax.outputs` marker kind of its output directories
QK_GAIN = 2.0  # q and k each scaled ⇒ score std ≈ QK_GAIN², so softmax is far from uniform
EMBED_STD = 0.4  # embeddings and lm_head: logits std ≈ EMBED_STD·sqrt(hidden) ≈ 3, tied or not

# Qwen2's pre-tokenizer split pattern (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The template the llava-hf conversion script attaches to the processor (REFERENCE_NOTES §10.1).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEXT_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
)
VISION_SIZES = dict(
    hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, image_size=384,
    patch_size=14, num_channels=3, layer_norm_eps=1e-6,
)

# Small English corpus for the BPE merges: enough variety for a few hundred merges; the sentences are
# combined deterministically so training sees a few thousand words.
_SUBJECTS = ("The cat", "A small dog", "The old man", "My sister", "The red car", "A young girl", "The teacher",
             "Our neighbour", "The bright image", "This picture", "The video", "A bird")
_VERBS = ("is sitting on", "looks at", "runs towards", "shows", "stands next to", "is painted on",
          "jumps over", "describes", "contains", "is waiting near", "points to", "walks around")
_OBJECTS = ("the wooden table.", "a tall building.", "the green field.", "three people.", "the blue sky.",
            "a chart with numbers.", "the river bank.", "an open window.", "the kitchen door.",
            "several colourful flowers.", "the city street at night.", "a white boat on the water.")
_QUESTIONS = ("What is shown in this image?", "Describe the video in detail.", "How many objects are there?",
              "What colour is the car?", "Where was this photo taken?", "Compare the two images.",
              "Is there a person in the picture?", "What happens at the end of the clip?")


def _corpus() -> list[str]:
    lines = []
    for i, subject in enumerate(_SUBJECTS):
        for j, verb in enumerate(_VERBS):
            lines.append(f"{subject} {verb} {_OBJECTS[(i + j) % len(_OBJECTS)]}")
    lines += list(_QUESTIONS) * 4
    lines += [f"There are {n} items, and {n * 7} more in the year {1990 + n}." for n in range(12)]
    lines += ["Café, naïve, résumé — 你好，世界！ Über straße. It's we're they'll I'd you've."] * 3
    return lines


def build_tokenizer():
    """A Qwen2-style byte-level BPE (``tokenizers.Tokenizer``) trained deterministically on the corpus above.

    Pipeline = what transformers' ``Qwen2Tokenizer`` builds (and Qwen2's hub tokenizer.json holds): NFC, Qwen2
    split regex + ByteLevel (no regex, no prefix space), ByteLevel post-processor (offsets only) and decoder,
    no BOS. Ids: 256 byte tokens, the merges, then the special tokens in ``SPECIAL_TOKENS`` order.
    """
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                            trainers)

    tokenizer = Tokenizer(models.BPE())  # the trainer sets the model options (Qwen2's: no unk, "" affixes)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + MAX_BPE_MERGES, min_frequency=2,
                                  initial_alphabet=alphabet, show_progress=False, special_tokens=[],
                                  continuing_subword_prefix="", end_of_word_suffix="")
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _WeightMaker:
    """Deterministic non-default random tensors (float32)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def normal(self, shape, std: float, mean: float = 0.0) -> np.ndarray:
        return (mean + std * self.rng.standard_normal(shape)).astype(np.float32)


# Fixed standard deviations by canonical checkpoint name; other weights are linear / conv [out, in, ...].
_STDS = {"image_newline": 1.0, "vision.embeddings.position_embedding.weight": 0.5,
         "text.embed_tokens.weight": EMBED_STD, "lm_head.weight": EMBED_STD}
_GROUPS = {"vision": 0, "text": 1, "image_newline": 2, "projector": 2, "lm_head": 3}


def _random_tensor(make: _WeightMaker, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One checkpoint tensor (torch layout) for canonical ``name``: biases N(0, 0.1), norm weights
    N(1, 0.15), linear / conv weights N(0, gain²/fan_in) with gain QK_GAIN for q and k, else ``_STDS``."""
    if name.endswith("bias"):
        return make.normal(shape, 0.1)
    if "norm" in name:
        return make.normal(shape, 0.15, mean=1.0)
    if name in _STDS:
        return make.normal(shape, _STDS[name])
    gain = QK_GAIN if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
    return make.normal(shape, gain / np.sqrt(math.prod(shape[1:])))


def _draw_order(keys: dict[str, tuple]) -> list[str]:
    """Canonical names in the order the random stream draws them: the vision tower, the text model,
    image_newline and the projector, the lm_head; inside a tower the rows before its layers, then layer by
    layer in ``KEY_TABLE`` order, then the rows after (seed-stable since the first tiny checkpoints)."""
    rows = {template: r for r, (template, _, _) in enumerate(KEY_TABLE)}
    last_layer_row = {}
    for template, r in rows.items():
        if "{i}" in template:
            last_layer_row[_GROUPS[template.split(".")[0]]] = r

    def position(name: str) -> tuple[int, int, int, int]:
        layer = keys[name][2]
        row = rows[name if layer is None else name.replace(f".{layer}.", ".{i}.", 1)]
        group = _GROUPS[name.split(".")[0]]
        section = 1 if layer is not None else 2 if row > last_layer_row.get(group, row) else 0
        return group, section, layer or 0, row

    return sorted(keys, key=position)


def random_params(config: OneVisionConfig, *, seed: int) -> Params:
    """The tiny checkpoints' params tree (float32 numpy): each checkpoint tensor drawn by
    :func:`_random_tensor` in torch layout and read into its leaf through the loading key table."""
    keys = checkpoint_keys(config)
    specs = jax.tree_util.tree_leaves_with_path(param_specs(config), is_leaf=is_spec)
    leaves = {tuple(k.key for k in path): np.empty(spec.shape, np.float32) for path, spec in specs}
    make = _WeightMaker(seed)
    for name in _draw_order(keys):
        path, transform, layer, shape = keys[name]
        leaf = leaves[path] if layer is None else leaves[path][layer]
        leaf[...] = transform.read(_random_tensor(make, name, shape), leaf.shape,
                                   tuple(slice(0, n) for n in leaf.shape))
    params: Params = {}
    for path, leaf in leaves.items():
        set_path(params, path, leaf)
    return params


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes  # ships with jax

        return array.astype(ml_dtypes.bfloat16)
    return array.astype(dtype)


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _hf_config(text: dict[str, Any], vision: dict[str, Any], ids: dict[str, int], *, tie_word_embeddings: bool,
               vision_feature_layer, vision_aspect_ratio: str, pinpoints, dtype: str) -> dict[str, Any]:
    """``config.json`` as ``LlavaOnevisionConfig.save_pretrained`` writes it in transformers 5.24."""
    text_config = {
        "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu", "hidden_size": text["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": text["intermediate_size"],
        "layer_types": ["full_attention"] * text["num_hidden_layers"],
        "max_position_embeddings": text["max_position_embeddings"], "max_window_layers": 28,
        "model_type": "qwen2", "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": text["num_hidden_layers"], "num_key_value_heads": text["num_key_value_heads"],
        "pad_token_id": ids["<|endoftext|>"], "rms_norm_eps": text["rms_norm_eps"],
        "rope_parameters": {"rope_theta": float(text["rope_theta"]), "rope_type": "default"},
        "sliding_window": None, "tie_word_embeddings": tie_word_embeddings, "use_cache": True,
        "use_sliding_window": False, "vocab_size": text["vocab_size"],
    }
    vision_config = {
        "attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh", "model_type": "siglip_vision_model",
        "vision_use_head": False, **vision,
    }
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"], "dtype": dtype,
        "image_grid_pinpoints": [list(p) for p in pinpoints], "image_token_index": ids["<image>"],
        "model_type": "llava_onevision", "multimodal_projector_bias": True, "projector_hidden_act": "gelu",
        "text_config": text_config, "tie_word_embeddings": tie_word_embeddings,
        "transformers_version": TRANSFORMERS_VERSION, "video_token_index": ids["<video>"],
        "vision_aspect_ratio": vision_aspect_ratio, "vision_config": vision_config,
        "vision_feature_layer": vision_feature_layer, "vision_feature_select_strategy": "full",
    }


def _tokenizer_config(ids: dict[str, int]) -> dict[str, Any]:
    """``tokenizer_config.json`` in the Qwen2-Instruct / llava-hf form (no BOS, eos im_end, pad endoftext)."""
    added = {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    return {
        "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "processor_class": "LlavaOnevisionProcessor", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }


def _image_processor_config(pinpoints) -> dict[str, Any]:
    return {
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_grid_pinpoints": [list(p) for p in pinpoints], "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "LlavaOnevisionImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "LlavaOnevisionProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"height": 384, "width": 384},
    }


def _video_processor_config() -> dict[str, Any]:
    return {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "do_sample_frames": False, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "processor_class": "LlavaOnevisionProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"height": 384, "width": 384}, "video_processor_type": "LlavaOnevisionVideoProcessor",
    }


def make_tiny(out_dir, *, seed: int = 0, tie_word_embeddings: bool = False, vision_feature_layer=-1,
              vision_aspect_ratio: str = "anyres_max_9", image_grid_pinpoints=None, dtype: str = "float32",
              text_overrides: dict[str, Any] | None = None, vision_overrides: dict[str, Any] | None = None,
              overwrite: bool = False) -> pathlib.Path:
    """Write a small random-weight LLaVA-OneVision checkpoint (transformers 5.24 layout) into ``out_dir``.

    ``text_overrides`` / ``vision_overrides`` replace entries of ``TEXT_SIZES`` / ``VISION_SIZES``
    (e.g. ``{"num_hidden_layers": 4}``); ``vocab_size`` may be overridden but never below the tokenizer.
    ``out_dir`` must be new, empty, or (with ``overwrite``) an earlier make-tiny output, which is replaced
    whole; the write is atomic (`ov_jax.outputs.atomic_output_dir`). Returns the output directory.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    text, vision = dict(TEXT_SIZES), dict(VISION_SIZES)
    for sizes, overrides, what in ((text, text_overrides, "text"), (vision, vision_overrides, "vision")):
        unknown = set(overrides or {}) - set(sizes) - ({"vocab_size"} if what == "text" else set())
        if unknown:
            raise ValueError(f"unknown {what}_overrides {sorted(unknown)}; allowed: {sorted(sizes)}")
        sizes.update(overrides or {})
    pinpoints = [list(p) for p in (image_grid_pinpoints or DEFAULT_PINPOINTS)]

    tokenizer = build_tokenizer()
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    text.setdefault("vocab_size", _round_up(tokenizer.get_vocab_size(), VOCAB_MULTIPLE))
    if text["vocab_size"] < tokenizer.get_vocab_size():
        raise ValueError(f"vocab_size {text['vocab_size']} is smaller than the tokenizer ({tokenizer.get_vocab_size()})")

    hf_config = _hf_config(text, vision, ids, tie_word_embeddings=tie_word_embeddings,
                           vision_feature_layer=vision_feature_layer, vision_aspect_ratio=vision_aspect_ratio,
                           pinpoints=pinpoints, dtype=dtype)
    config = config_from_hf_dict(hf_config)
    tensors = hf_state_dict(config, random_params(config, seed=seed))
    with atomic_output_dir(out_dir, kind=OUTPUT_KIND, overwrite=overwrite) as out:
        _write_files(out, tokenizer, ids, tensors, hf_config, pinpoints=pinpoints,
                     vision_aspect_ratio=vision_aspect_ratio, dtype=dtype)
    return pathlib.Path(out_dir)


def _write_files(out: pathlib.Path, tokenizer, ids: dict[str, int], tensors: dict[str, np.ndarray],
                 hf_config: dict[str, Any], *, pinpoints, vision_aspect_ratio: str, dtype: str) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(_cast(v, dtype)) for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", hf_config)
    _write_json(out / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"], "transformers_version": TRANSFORMERS_VERSION})
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(ids))
    _write_json(out / "preprocessor_config.json", _image_processor_config(pinpoints))
    _write_json(out / "video_preprocessor_config.json", _video_processor_config())
    _write_json(out / "processor_config.json", {
        "image_token": "<image>", "num_image_tokens": NUM_IMAGE_TOKENS,
        "processor_class": "LlavaOnevisionProcessor", "video_token": "<video>",
        "vision_aspect_ratio": vision_aspect_ratio, "vision_feature_select_strategy": "full"})
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
