"""Config parsing (transformers and lmms-lab layouts), presets, and clear errors for bad configs."""

import json
import pathlib

import pytest

from ov_jax.config import ConfigError, OneVisionConfig, config_from_hf_dict, load_config
from ov_jax.params import abstract_params, count_params
from ov_jax.presets import HUB_IDS, preset, to_hf_dict

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny", *sorted(HUB_IDS)])
def test_preset_files_in_sync(name):
    """configs/*.json are exactly the presets (regenerate with `python -m ov_jax.presets configs`)."""
    on_disk = json.loads((CONFIGS / f"{name}.json").read_text())
    assert on_disk == json.loads(json.dumps(to_hf_dict(preset(name))))
    assert load_config(CONFIGS / f"{name}.json") == preset(name)


def test_preset_sizes():
    # 0.5B: ~0.89B parameters with the vision tower and the padded 152000 vocab, tied head
    assert round(count_params(abstract_params(preset("0.5b-ov"))) / 1e9, 2) == 0.89
    assert preset("7b").text.num_attention_heads == 28 and not preset("7b").lm_head_tied
    assert preset("72b").text.num_key_value_heads == 8
    with pytest.raises(KeyError, match="unknown preset"):
        preset("13b")


def test_transformers_config_from_transformers_itself():
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=320, tie_word_embeddings=True),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=48, intermediate_size=96,
                           num_hidden_layers=3, num_attention_heads=2, image_size=384, patch_size=14),
        vision_feature_layer=[-2, -1], vision_aspect_ratio="anyres_max_4")
    cfg = config_from_hf_dict(hf.to_dict())
    assert cfg.feature_layers == (2, 3) and cfg.vision_layers_used == 3 and cfg.projector_in_dim == 96
    assert cfg.anyres_max == 4 and cfg.lm_head_tied  # text-level tie forces the top level, as in transformers
    assert cfg.text.head_dim == 16 and cfg.text.rope_theta == hf.text_config.rope_parameters["rope_theta"]
    assert OneVisionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_lmms_lab_config():
    d = {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava", "hidden_size": 896, "intermediate_size": 4864,
         "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24, "vocab_size": 151936,
         "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
         "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_projector_type": "mlp2x_gelu",
         "mm_hidden_size": 1152, "mm_vision_select_layer": -2, "image_aspect_ratio": "anyres_max_9",
         "image_grid_pinpoints": "(1x1),...,(6x6)", "mm_patch_merge_type": "spatial_unpad",
         "torch_dtype": "bfloat16"}
    cfg = config_from_hf_dict(d)
    assert cfg.vision.num_hidden_layers == 26 and cfg.vision_feature_layer == -1
    assert len(cfg.image_grid_pinpoints) == 36 and cfg.image_grid_pinpoints[1] == (384, 768)
    assert cfg.text.rope_theta == 1e6 and cfg.lm_head_tied and cfg.dtype == "bfloat16"


@pytest.mark.parametrize("change, message", [
    (dict(vision_aspect_ratio="anyres_9"), "anyres_max_N"),
    (dict(vision_feature_select_strategy="default"), "not supported"),
    (dict(vision_feature_layer=7), "outside the tower"),
    (dict(image_grid_pinpoints=[[384, 500]]), "not a multiple"),
    (dict(image_grid_pinpoints=[[0, 0]]), "pairs of positive integers"),
    (dict(image_token_index=-1), "image_token_id must be a non-negative integer"),
    (dict(text_config=None), "'text_config' must be a non-empty object, got null"),
    (dict(vision_config=[1]), "'vision_config' must be a non-empty object"),
    (dict(vision_config={"patch_size": 0}), "vision patch_size must be a positive integer, got 0"),
    (dict(vision_config={"image_size": 0}), "vision image_size must be a positive integer, got 0"),
])
def test_bad_top_level_values(change, message):
    d = to_hf_dict(preset("tiny")) | change
    with pytest.raises(ConfigError, match=message):
        config_from_hf_dict(d)


@pytest.mark.parametrize("change, message", [
    (dict(use_sliding_window=True), "sliding_window"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6}), "rope type"),
    (dict(num_key_value_heads=3), "multiple of kv heads"),
    # hostile or damaged values: named, not a ZeroDivisionError / TypeError / NaN later
    (dict(num_attention_heads=0, head_dim=None), "text num_attention_heads must be a positive integer, got 0"),
    (dict(num_hidden_layers=2.0), "text num_hidden_layers must be a positive integer, got 2.0"),
    (dict(num_hidden_layers="2"), "text num_hidden_layers must be a positive integer, got '2'"),
    (dict(rms_norm_eps=float("nan")), "text rms_norm_eps must be a positive finite number, got nan"),
    (dict(max_position_embeddings=0), "text max_position_embeddings must be a positive integer"),
])
def test_bad_text_values(change, message):
    d = to_hf_dict(preset("tiny"))
    d["text_config"] = d["text_config"] | change
    with pytest.raises(ConfigError, match=message):
        config_from_hf_dict(d)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    with pytest.raises(ConfigError, match="neither 'text_config'"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_onevision", "text_config": {"a": 1}}))
    with pytest.raises(ConfigError, match="the text config has no 'vocab_size', 'hidden_size'"):
        load_config(tmp_path)
