"""``LlavaOnevisionProcessor.from_pretrained``: both file layouts, every chat-template source, hub ids, errors.

Layouts: the llava-hf hub one (separate preprocessor_config.json / video_preprocessor_config.json, a flat
processor_config.json, chat_template.json) and the transformers 5.x one, written here by transformers'
own ``save_pretrained`` (one processor_config.json with nested image_processor / video_processor sections,
chat_template.jinja). Config values are made non-default so that reading the wrong file shows.
"""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ov_jax.compare import reference_processor
from ov_jax.processing import LlavaOnevisionProcessor
from ov_jax.processing.tokenizer import TextTokenizer

IMAGE_MEAN, IMAGE_STD = [0.25, 0.5, 0.75], [0.2, 0.3, 0.4]
VIDEO_MEAN, VIDEO_STD = [0.1, 0.2, 0.3], [0.6, 0.5, 0.4]
PINPOINTS = [[384, 384], [384, 768], [768, 384], [768, 768], [384, 1152]]


def full_reference_processor(path):
    """transformers' processor *with* its video processor (constructible, though not callable, without
    torchvision) so that ``save_pretrained`` writes the nested video section. Its class check looks the base
    class up on transformers' lazy module, where torchvision-less installs lack it; we register it there."""
    import transformers.processing_utils as processing_utils
    import transformers.video_processing_utils as video_processing_utils
    from transformers import LlavaOnevisionProcessor as ReferenceProcessor
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    setattr(processing_utils.transformers_module, "VideoProcessorMixin", video_processing_utils.VideoProcessorMixin)
    partial = reference_processor(path)
    partial.image_processor.image_mean, partial.image_processor.image_std = tuple(IMAGE_MEAN), tuple(IMAGE_STD)
    partial.image_processor.image_grid_pinpoints = PINPOINTS
    video = LlavaOnevisionVideoProcessor(image_mean=VIDEO_MEAN, image_std=VIDEO_STD, num_frames=6)
    return ReferenceProcessor(partial.image_processor, partial.tokenizer, video,
                              num_image_tokens=partial.num_image_tokens, vision_aspect_ratio="anyres_max_4",
                              vision_feature_select_strategy="full", chat_template=partial.chat_template)


@pytest.fixture(scope="module")
def nested_layout(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved_by_transformers")
    full_reference_processor(tiny_ckpt).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hub_layout(nested_layout, tmp_path_factory):
    """The same configuration split into the separate files of the llava-hf hub repos."""
    out = tmp_path_factory.mktemp("hub_layout")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(nested_layout / name, out / name)
    processor = json.loads((nested_layout / "processor_config.json").read_text())
    (out / "preprocessor_config.json").write_text(json.dumps(processor.pop("image_processor")))
    (out / "video_preprocessor_config.json").write_text(json.dumps(processor.pop("video_processor")))
    (out / "processor_config.json").write_text(json.dumps(processor))
    template = (nested_layout / "chat_template.jinja").read_text()
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return out


def sample_inputs():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(300, 500), (90, 1100)]]
    conversation = [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
                    {"role": "user", "content": [{"type": "image", "image": images[0]},
                                                 {"type": "text", "text": "What is shown in this image?"}]}]
    return images, conversation


def test_nested_layout_is_what_transformers_writes(nested_layout):
    config = json.loads((nested_layout / "processor_config.json").read_text())
    assert {"image_processor", "video_processor", "num_image_tokens"} <= set(config)
    assert not (nested_layout / "preprocessor_config.json").exists()
    assert (nested_layout / "chat_template.jinja").exists()


@pytest.mark.parametrize("layout", ["nested_layout", "hub_layout"])
def test_both_layouts_load_the_same_processor(layout, request):
    path = request.getfixturevalue(layout)
    ours = LlavaOnevisionProcessor.from_pretrained(path)
    assert ours.image_config.image_mean == tuple(IMAGE_MEAN) and ours.image_config.image_std == tuple(IMAGE_STD)
    assert ours.image_config.pinpoints == tuple(map(tuple, PINPOINTS))
    assert ours.video_config.image_mean == tuple(VIDEO_MEAN) and ours.video_config.num_frames == 6
    assert ours.max_tiles_cap == 4 and ours.num_image_tokens == 729
    reference = reference_processor(path)
    images, conversation = sample_inputs()
    assert ours.apply_chat_template(conversation) == reference.apply_chat_template(conversation)
    prompt = "<|im_start|>user\n<image>\n<image>\nhi<|im_end|>\n"
    for batch in (images, [images]):  # anyres (pinpoints, cap) and multi-image (mean-colour pad)
        got = ours(text=prompt, images=batch)
        expected = reference(text=prompt, images=batch, return_tensors="np")
        for key in expected:
            assert np.array_equal(got[key], expected[key]), key


def test_nested_sections_win_over_stale_separate_files(nested_layout, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(nested_layout, path)
    stale = {"image_mean": [0.9] * 3, "image_std": [0.9] * 3, "size": {"height": 384, "width": 384}}
    (path / "preprocessor_config.json").write_text(json.dumps(stale))
    (path / "video_preprocessor_config.json").write_text(json.dumps(stale))
    ours = LlavaOnevisionProcessor.from_pretrained(path)
    assert ours.image_config.image_mean == tuple(IMAGE_MEAN)
    assert ours.video_config.image_mean == tuple(VIDEO_MEAN)
    assert reference_processor(path).image_processor.image_mean == tuple(IMAGE_MEAN)


def test_video_config_falls_back_to_the_image_processor_file(hub_layout, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(hub_layout, path)
    (path / "video_preprocessor_config.json").unlink()
    assert LlavaOnevisionProcessor.from_pretrained(path).video_config.image_mean == tuple(IMAGE_MEAN)


def test_chat_template_sources(hub_layout, tmp_path):
    template = json.loads((hub_layout / "chat_template.json").read_text())["chat_template"]
    conversation = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

    only_tokenizer = tmp_path / "template_in_tokenizer_config"
    shutil.copytree(hub_layout, only_tokenizer)
    (only_tokenizer / "chat_template.json").unlink()
    tokenizer_config = json.loads((only_tokenizer / "tokenizer_config.json").read_text())
    (only_tokenizer / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": template}))
    assert LlavaOnevisionProcessor.from_pretrained(only_tokenizer).apply_chat_template(
        conversation, add_generation_prompt=True) == expected

    named = tmp_path / "named_templates"
    shutil.copytree(only_tokenizer, named)
    (named / "tokenizer_config.json").write_text(json.dumps(
        {**tokenizer_config, "chat_template": [{"name": "default", "template": template},
                                               {"name": "shout", "template": "{{ messages[0]['role'] | upper }}"}]}))
    processor = LlavaOnevisionProcessor.from_pretrained(named)
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == expected
    assert processor.apply_chat_template(conversation, chat_template="shout") == "USER"
    assert processor.apply_chat_template(conversation, chat_template="{{ 'inline' }}") == "inline"

    none = tmp_path / "no_template"
    shutil.copytree(only_tokenizer, none)
    (none / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(ValueError, match="no chat template"):
        LlavaOnevisionProcessor.from_pretrained(none).apply_chat_template(conversation)


def test_template_kwargs_and_generation_tag(hub_layout, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(hub_layout, path)
    template = ("{% for m in messages %}{% generation %}{{ m['role'] }}{% endgeneration %}{% endfor %}"
                "{% if greeting %}{{ greeting }}{% endif %}{{ eos_token }}")
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    processor = LlavaOnevisionProcessor.from_pretrained(path)
    conversation = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    assert processor.apply_chat_template(conversation, greeting="hey") == "userhey<|im_end|>"


def test_loading_errors(hub_layout, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LlavaOnevisionProcessor.from_pretrained(tmp_path / "nowhere")
    no_count = tmp_path / "no_num_image_tokens"
    shutil.copytree(hub_layout, no_count)
    processor_config = json.loads((no_count / "processor_config.json").read_text())
    del processor_config["num_image_tokens"]
    (no_count / "processor_config.json").write_text(json.dumps(processor_config))
    with pytest.raises(ValueError, match="no num_image_tokens"):
        LlavaOnevisionProcessor.from_pretrained(no_count)
    no_image_config = tmp_path / "no_image_config"
    shutil.copytree(hub_layout, no_image_config)
    (no_image_config / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no image processor configuration"):
        LlavaOnevisionProcessor.from_pretrained(no_image_config)
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(hub_layout, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        LlavaOnevisionProcessor.from_pretrained(no_tokenizer)


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", b"\xff", "tokenizer.json is not valid UTF-8 text"),
    ("tokenizer.json", b"[1]", "tokenizer.json is not a tokenizer file the tokenizers library can read"),
    ("tokenizer_config.json", b"\xff", "tokenizer_config.json is not valid UTF-8 text"),
    ("tokenizer_config.json", b"{", "tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", b'{"pad_token": 5}', "tokenizer_config.json: cannot read a special token from 5"),
])
def test_tokenizer_file_errors_name_the_file(hub_layout, tmp_path, name, content, message):
    path = tmp_path / "ckpt"
    shutil.copytree(hub_layout, path)
    (path / name).write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}/{message}")):
        TextTokenizer.from_directory(path)


def test_hub_id_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set .* pass its local directory"):
        LlavaOnevisionProcessor.from_pretrained("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")


def test_hub_id_resolves_from_the_cache(nested_layout, monkeypatch, tmp_path):
    """A cached snapshot (the layout huggingface_hub writes) is found offline, by id."""
    import huggingface_hub

    repo = "someone/tiny-onevision"
    commit = "0" * 40
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    shutil.copytree(nested_layout, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    processor = LlavaOnevisionProcessor.from_pretrained(repo)
    assert processor.image_config.image_mean == tuple(IMAGE_MEAN)


def test_importing_ov_jax_is_cheap():
    code = ("import sys, ov_jax; heavy = [m for m in ('jax', 'PIL', 'tokenizers', 'jinja2', 'torch') if m in sys.modules];"
            "assert not heavy, heavy; assert ov_jax.Processor is ov_jax.LlavaOnevisionProcessor")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


@pytest.mark.parametrize("file, change, message", [
    ("preprocessor_config.json", {"size": {"height": 0, "width": 0}}, "tile size must be a positive integer, got 0"),
    ("preprocessor_config.json", {"image_std": [0, 0, 0]}, r"image_std must be 3 finite numbers \(none 0\)"),
    ("preprocessor_config.json", {"image_mean": [float("nan")] * 3}, "image_mean must be 3 finite numbers"),
    ("preprocessor_config.json", {"image_mean": [0.5, 0.5]}, "image_mean must be 3 finite numbers"),
    ("preprocessor_config.json", {"rescale_factor": float("nan")}, "rescale_factor must be a positive finite"),
    ("preprocessor_config.json", {"resample": 99}, "resample must be a PIL resampling filter"),
    ("preprocessor_config.json", {"image_grid_pinpoints": []}, "image_grid_pinpoints must be pairs"),
    ("preprocessor_config.json", {"image_grid_pinpoints": [[384_000, 384_000]]}, "147,456,000,000-pixel grid"),
    ("processor_config.json", {"num_image_tokens": -1}, "num_image_tokens must be a positive integer, got -1"),
    ("processor_config.json", {"vision_aspect_ratio": "anyres_max_0"}, "'anyres_max_N' with N >= 1"),
    ("processor_config.json", {"chat_template": 5}, "processor_config.json: chat_template must be a string"),
])
def test_processor_config_values_that_cannot_work_are_named(hub_layout, tmp_path, file, change, message):
    """Hostile or damaged values: one ValueError naming the value, not a ZeroDivisionError, NaN pixels, an
    isqrt error or a silently ignored template."""
    path = tmp_path / "ckpt"
    shutil.copytree(hub_layout, path)
    config = json.loads((path / file).read_text())
    (path / file).write_text(json.dumps(config | change))
    with pytest.raises(ValueError, match=message):
        LlavaOnevisionProcessor.from_pretrained(path)


@pytest.mark.parametrize("file, content, message", [
    ("tokenizer.json", "{not json", r"tokenizer.json is not a tokenizer file the tokenizers library can read"),
    ("tokenizer.json", "[1, 2]", r"tokenizer.json is not a tokenizer file"),
    ("tokenizer_config.json", {"image_token": "<nope>"}, r"token '<nope>' is not in the tokenizer's vocabulary"),
    ("tokenizer_config.json", {"added_tokens_decoder": 5}, "added_tokens_decoder must be an object, got int"),
])
def test_unreadable_tokenizer_files_are_named(hub_layout, tmp_path, file, content, message):
    """tokenizers raises a bare Exception, an unknown image token was a KeyError, a non-object decoder an
    AttributeError: each is now a ValueError naming the file or the token."""
    path = tmp_path / "ckpt"
    shutil.copytree(hub_layout, path)
    if isinstance(content, dict):
        content = json.dumps(json.loads((path / file).read_text()) | content)
    (path / file).write_text(content)
    with pytest.raises(ValueError, match=message):
        LlavaOnevisionProcessor.from_pretrained(path)
