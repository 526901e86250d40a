"""Named architecture presets (0.5B / 7B / 72B, si and ov) and the tiny test config.

The si (single-image) and ov (OneVision) checkpoints share an architecture; the preset names map to
their hub ids. ``configs/*.json`` are these presets written as transformers-style ``config.json``
files (regenerate with ``python -m ov_jax.presets configs``; a test keeps them in sync).
"""

from __future__ import annotations

import json
import os
import sys

from ov_jax.config import OneVisionConfig, TextConfig, VisionConfig, config_from_hf_dict

_TEXT = {
    "0.5b": TextConfig(vocab_size=152000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    "7b": TextConfig(vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False),
    "72b": TextConfig(vocab_size=152128, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}

HUB_IDS = {
    f"{size}-{kind}": f"llava-hf/llava-onevision-qwen2-{size}-{kind}-hf" for size in _TEXT for kind in ("si", "ov")
}

TINY = OneVisionConfig(
    vision=VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2),
    text=TextConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    tie_word_embeddings=False,
)


def preset(name: str) -> OneVisionConfig:
    """``"0.5b-ov"``, ``"7b-si"``, ``"72b"`` (size alone = ov), or ``"tiny"``."""
    if name == "tiny":
        return TINY
    size = name.split("-")[0].lower()
    if size not in _TEXT or (name not in HUB_IDS and name.lower() != size):
        raise KeyError(f"unknown preset {name!r}; known: tiny, {', '.join(sorted(HUB_IDS))}")
    text = _TEXT[size]
    return OneVisionConfig(text=text, tie_word_embeddings=text.tie_word_embeddings, dtype="float16")


def to_hf_dict(config: OneVisionConfig) -> dict:
    """A transformers-style ``config.json`` dict for ``config`` (what ``configs/*.json`` hold)."""
    v, t = config.vision, config.text
    return {
        "model_type": "llava_onevision",
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "dtype": config.dtype,
        "image_token_index": config.image_token_id,
        "video_token_index": config.video_token_id,
        "image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
        "vision_aspect_ratio": config.vision_aspect_ratio,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "projector_hidden_act": config.projector_hidden_act,
        "multimodal_projector_bias": config.multimodal_projector_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads, "patch_size": v.patch_size, "image_size": v.image_size,
            "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
            "vision_use_head": False,
        },
        "text_config": {
            "model_type": "qwen2", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
            "hidden_act": t.hidden_act, "use_sliding_window": False, "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
            # transformers derives hidden_size // heads when absent; written only where it differs
            **({"head_dim": t.head_dim} if t.head_dim != t.hidden_size // t.num_attention_heads else {}),
        },
    }


def write_presets(directory: str) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    written = []
    for name in ["tiny", *sorted(HUB_IDS)]:
        file = os.path.join(directory, f"{name}.json")
        with open(file, "w") as f:
            json.dump(to_hf_dict(preset(name)), f, indent=2)
            f.write("\n")
        written.append(file)
    return written


if __name__ == "__main__":
    print("\n".join(write_presets(sys.argv[1] if len(sys.argv) > 1 else "configs")))
    assert config_from_hf_dict(to_hf_dict(preset("7b"))) == preset("7b")
