"""ov_jax.tiny writes checkpoints that transformers 5.24 and ov_jax both read as intended."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from ov_jax.compare import reference_processor
from ov_jax.config import load_config
from ov_jax.tiny import SPECIAL_TOKENS, make_tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT_CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
    {"role": "user", "content": [{"type": "text", "text": "What is shown in this image?"}, {"type": "image"}]},
]


def _file_tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _load_hf(path, **kwargs):
    from transformers import LlavaOnevisionForConditionalGeneration

    model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(path, output_loading_info=True, **kwargs)
    return model.eval(), info


def _image(height=300, width=500, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_ckpt_tied"])
def test_key_set_matches_transformers_save_pretrained(fixture, request, tmp_path):
    """The file holds exactly the keys and shapes transformers' own save_pretrained writes for this config."""
    path = request.getfixturevalue(fixture)
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    config = LlavaOnevisionConfig.from_pretrained(path)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(tmp_path)
    ours, metadata = _file_tensors(path)
    theirs, their_metadata = _file_tensors(tmp_path)
    assert metadata == their_metadata == {"format": "pt"}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(v.dtype == np.float32 for v in ours.values())
    assert ("language_model.lm_head.weight" in ours) == (fixture == "tiny_ckpt")


def test_config_json_matches_transformers_round_trip(tiny_ckpt, tmp_path):
    """config.json equals what LlavaOnevisionConfig.save_pretrained writes after loading it."""
    from transformers import LlavaOnevisionConfig

    LlavaOnevisionConfig.from_pretrained(tiny_ckpt).save_pretrained(tmp_path)
    ours = json.loads((tiny_ckpt / "config.json").read_text())
    theirs = json.loads((tmp_path / "config.json").read_text())
    assert ours == theirs


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_ckpt_tied"])
def test_transformers_loads_every_tensor_unchanged(fixture, request):
    path = request.getfixturevalue(fixture)
    model, info = _load_hf(path)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    state = model.state_dict()
    tensors, _ = _file_tensors(path)
    renamed = {
        k.replace("language_model.lm_head.", "lm_head.")
        .replace("language_model.model.", "model.language_model.")
        .replace("vision_tower.", "model.vision_tower.")
        .replace("multi_modal_projector.", "model.multi_modal_projector.")
        .replace("image_newline", "model.image_newline"): v
        for k, v in tensors.items()
    }
    expected_keys = set(renamed) | ({"lm_head.weight"} if fixture == "tiny_ckpt_tied" else set())
    assert set(state) == expected_keys
    for key, value in renamed.items():
        np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)
    if fixture == "tiny_ckpt_tied":
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_weights_are_non_default_and_deterministic(tiny_ckpt, tmp_path):
    tensors, _ = _file_tensors(tiny_ckpt)
    for key, value in tensors.items():
        if key.endswith("bias"):
            assert np.abs(value).min() > 0 and np.abs(value).mean() > 0.03, key
        if "norm" in key and key.endswith("weight"):
            assert np.abs(value - 1).mean() > 0.05, key
    again, _ = _file_tensors(make_tiny(tmp_path / "again"))
    other, _ = _file_tensors(make_tiny(tmp_path / "other", seed=1))
    for key, value in tensors.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
        assert not np.array_equal(other[key], value), key
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (tiny_ckpt / "tokenizer.json").read_text()


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_ckpt_tied"])
def test_forward_is_finite_informative_and_attention_is_sharp(fixture, request):
    path = request.getfixturevalue(fixture)
    model, _ = _load_hf(path, attn_implementation="eager")
    processor = reference_processor(path)
    prompt = processor.apply_chat_template(PROMPT_CONVERSATION, add_generation_prompt=True)
    inputs = processor(images=_image(), text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == processor.image_token_id).sum() > 729
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
        vision = model.model.vision_tower(inputs["pixel_values"][0], output_attentions=True)
    logits = out.logits[0]
    assert torch.isfinite(logits).all()
    assert 1.0 < logits.std(-1).mean() < 10 and logits.abs().max() < 40
    for attention in (*out.attentions, *vision.attentions):  # mean over queries of the largest probability
        assert attention.max(-1).values.mean() > 0.1  # uniform would be < 1/729 (vision) or 1/seq (text)


def test_processor_files_load_with_checkpoint_values(tiny_ckpt):
    processor = reference_processor(tiny_ckpt)
    config = json.loads((tiny_ckpt / "config.json").read_text())
    image_processor = processor.image_processor
    assert type(image_processor).__name__ == "LlavaOnevisionImageProcessorPil"
    assert list(image_processor.image_mean) == list(image_processor.image_std) == [0.5, 0.5, 0.5]
    assert image_processor.size == {"height": 384, "width": 384} and image_processor.resample == 3
    assert [list(p) for p in image_processor.image_grid_pinpoints] == config["image_grid_pinpoints"]
    assert processor.num_image_tokens == 729 and processor.vision_feature_select_strategy == "full"
    assert processor.image_token_id == config["image_token_index"]
    assert processor.video_token_id == config["video_token_index"]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"}]}], add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\n<image>\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_autoprocessor_needs_torchvision_for_the_video_processor(tiny_ckpt):
    """Documents why tests use conftest.reference_processor: AutoProcessor fails without torchvision."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        assert AutoProcessor.from_pretrained(tiny_ckpt).video_processor is not None
    else:
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(tiny_ckpt)


def test_tokenizer_agrees_with_transformers(tiny_ckpt):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(tiny_ckpt)
    assert type(theirs).__name__ == "Qwen2Tokenizer"
    assert theirs.eos_token == "<|im_end|>" and theirs.pad_token == "<|endoftext|>" and theirs.bos_token is None
    assert theirs.padding_side == "right"  # as Qwen2-Instruct / llava-hf ship; batch users set "left"
    config = json.loads((tiny_ckpt / "config.json").read_text())
    ids = {t: ours.token_to_id(t) for t in SPECIAL_TOKENS}
    assert ids["<image>"] == config["image_token_index"] and ids["<video>"] == config["video_token_index"]
    assert config["text_config"]["vocab_size"] % 64 == 0 and config["text_config"]["vocab_size"] >= ours.get_vocab_size()
    chat = reference_processor(tiny_ckpt).apply_chat_template(PROMPT_CONVERSATION, add_generation_prompt=True)
    samples = [
        "The cat is sitting on the wooden table.",
        "Café naïve 你好，世界! e\u0301 (NFC) 12345 it's 'sup THEY'LL   spaced\n\nlines\t",
        "<|im_start|>user\n<image><image>\n<video>\nDescribe.<|im_end|>\n<|endoftext|>",
        chat,
    ]
    for text in samples:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text).ids == expected, text
        assert ours.decode(expected, skip_special_tokens=False) == theirs.decode(expected)
    assert len(ours.encode("The cat is sitting").ids) < len("The cat is sitting") / 2  # merges are real
    assert len(json.loads(ours.to_str())["model"]["merges"]) > 300
    assert ours.encode("<image><image>").ids == [ids["<image>"]] * 2


def test_tokenizer_pipeline_is_the_one_transformers_builds(tiny_ckpt):
    """Qwen2Tokenizer rebuilds its own pipeline from vocab + merges; ours must be that pipeline."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = json.loads(Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json")).to_str())
    theirs = json.loads(AutoTokenizer.from_pretrained(tiny_ckpt).backend_tokenizer.to_str())
    for part in ("normalizer", "decoder", "model", "added_tokens"):
        assert ours[part] == theirs[part], part
    for pre_tokenizer in (ours["pre_tokenizer"], theirs["pre_tokenizer"]):  # trim_offsets only changes offsets
        pre_tokenizer["pretokenizers"][1].pop("trim_offsets")
    assert ours["pre_tokenizer"] == theirs["pre_tokenizer"]


def test_ov_jax_parses_the_config(tiny_ckpt, tiny_ckpt_tied):
    config = load_config(tiny_ckpt).validate()
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    assert config.image_token_id == raw["image_token_index"] and config.video_token_id == raw["video_token_index"]
    assert (config.vision.hidden_size, config.vision.num_hidden_layers, config.vision.image_size) == (48, 3, 384)
    assert (config.text.hidden_size, config.text.num_key_value_heads, config.text.head_dim) == (64, 2, 16)
    assert config.text.rope_theta == 1e6 and not config.lm_head_tied
    assert load_config(tiny_ckpt_tied).lm_head_tied


def test_options_reach_the_files(tmp_path):
    path = make_tiny(tmp_path, vision_feature_layer=-2, vision_aspect_ratio="anyres_max_4",
                     image_grid_pinpoints=[[384, 384], [384, 768]],
                     text_overrides={"num_hidden_layers": 3}, vision_overrides={"num_hidden_layers": 4})
    config = load_config(path).validate()
    assert config.vision_layers_used == 3 and config.anyres_max == 4 and config.text.num_hidden_layers == 3
    assert config.image_grid_pinpoints == ((384, 384), (384, 768))
    preprocessor = json.loads((path / "preprocessor_config.json").read_text())
    assert preprocessor["image_grid_pinpoints"] == [[384, 384], [384, 768]]
    assert json.loads((path / "processor_config.json").read_text())["vision_aspect_ratio"] == "anyres_max_4"
    tensors, _ = _file_tensors(path)
    assert "vision_tower.encoder.layers.3.mlp.fc2.bias" in tensors
    assert "language_model.model.layers.2.mlp.up_proj.weight" in tensors


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_files_load_as_that_dtype(dtype, tmp_path):
    path = make_tiny(tmp_path, dtype=dtype)
    assert json.loads((path / "config.json").read_text())["dtype"] == dtype
    model, info = _load_hf(path)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.dtype == getattr(torch, dtype)
    reference, _ = _load_hf(make_tiny(tmp_path / "f32"))
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(ours.float(), theirs.to(ours.dtype).float(), rtol=0, atol=0, msg=name)


def test_make_tiny_runs_without_torch_or_transformers(tmp_path):
    """The CLI's make-tiny must work on an install without the test extras."""
    code = (
        "import sys; sys.modules.update(torch=None, transformers=None)\n"
        "from ov_jax.tiny import make_tiny\n"
        "make_tiny(sys.argv[1], dtype='bfloat16')"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert (tmp_path / "model.safetensors").stat().st_size > 100_000


def test_generation_config_matches_the_tokenizer(tiny_ckpt):
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(tiny_ckpt)
    vocab = json.loads((tiny_ckpt / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    assert generation.eos_token_id == ids["<|im_end|>"]
    assert generation.pad_token_id == generation.bos_token_id == ids["<|endoftext|>"]


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        make_tiny(tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="text_overrides"):
        make_tiny(tmp_path, text_overrides={"hidden": 32})
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny(tmp_path, text_overrides={"vocab_size": 10})
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -5"):
        make_tiny(tmp_path, seed=-5)
