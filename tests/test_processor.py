"""``LlavaOnevisionProcessor`` against transformers 5.24's processor on the tiny checkpoint.

input_ids / attention_mask must be identical (and pixel_values bit-identical) for every prompt shape the issue
lists. transformers' video processor needs torchvision (not installable here), so the reference gets a stand-in
``TorchVideoProcessor`` that follows its code path: ``make_batched_videos``, ``default_sample_indices_fn`` when
sampling, then the torch call torchvision's uint8 resize reduces to (``F.interpolate(bicubic, antialias=True)``)
and the fused rescale/normalize. Token ids only depend on the frame count; video pixels are compared with the
tolerance of PIL vs torch antialiased bicubic (≤ 2 uint8 levels, docs/VIDEO.md).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from ov_jax.compare import reference_processor
from ov_jax.processing import LlavaOnevisionProcessor

TWO_LEVELS = 2 / 255 / 0.5 + 1e-6  # two uint8 levels after (x/255 - 0.5) / 0.5


class TorchVideoProcessor:
    """transformers' LlavaOnevisionVideoProcessor path for frame arrays, without torchvision."""

    def __init__(self, mean, std, size=384):
        self.mean, self.std, self.size = mean, std, size

    def __call__(self, videos, do_sample_frames=None, num_frames=None, fps=None, **_):
        from transformers.video_utils import VideoMetadata, default_sample_indices_fn, make_batched_videos

        out = []
        for frames in make_batched_videos(videos):
            frames = np.asarray(frames)
            if do_sample_frames:
                metadata = VideoMetadata(total_num_frames=len(frames))
                frames = frames[default_sample_indices_fn(metadata, num_frames=num_frames, fps=fps)]
            tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
            tensor = torch.nn.functional.interpolate(tensor, size=[self.size] * 2, mode="bicubic",
                                                     align_corners=False, antialias=True)
            mean = torch.tensor(self.mean).view(-1, 1, 1) * 255
            std = torch.tensor(self.std).view(-1, 1, 1) * 255
            out.append(((tensor.float() - mean) / std).numpy())
        return {"pixel_values_videos": np.stack(out)}


@pytest.fixture(scope="module")
def ours(tiny_ckpt):
    return LlavaOnevisionProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    processor = reference_processor(tiny_ckpt)
    processor.video_processor = TorchVideoProcessor([0.5] * 3, [0.5] * 3)
    return processor


def image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def frames(count, height=90, width=120, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def text(value):
    return {"type": "text", "text": value}


def assert_same_inputs(got, expected, *, video_atol=None):
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        value = np.asarray(value)
        assert got[key].shape == value.shape, key
        assert got[key].dtype == value.dtype, key
        if key == "pixel_values_videos":
            np.testing.assert_allclose(got[key], value, rtol=0, atol=video_atol)
        else:
            assert np.array_equal(got[key], value), key


def both(ours, reference, conversation, **kwargs):
    """apply_chat_template(tokenize=True, return_dict=True) on both sides (our defaults: numpy, left padding)."""
    processor_kwargs = kwargs.pop("processor_kwargs", {})
    expected = reference.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="np",
                                             processor_kwargs=dict(processor_kwargs), **kwargs)
    got = ours.apply_chat_template(conversation, tokenize=True, return_dict=True, processor_kwargs=processor_kwargs,
                                   **kwargs)
    return got, expected


CONVERSATIONS = {
    "one_image": [{"role": "user", "content": [{"type": "image", "image": image(899, 1024)},
                                               text("What is shown in this image?")]}],
    "multi_turn_with_system": [
        {"role": "system", "content": [text("You are a helpful assistant.")]},
        {"role": "user", "content": [text("Describe it."), {"type": "image", "image": image(300, 500)}]},
        {"role": "assistant", "content": [text("A red car on a street.")]},
        {"role": "user", "content": [text("What colour is the car?")]},
    ],
    "multi_image_nested": [{"role": "user", "content": [{"type": "image", "image": image(90, 400, 1)},
                                                        {"type": "image", "image": image(500, 70, 2)},
                                                        text("Compare the two images.")]}],
    "video": [{"role": "user", "content": [{"type": "video", "video": frames(8)}, text("Describe the video.")]}],
    "image_and_video": [{"role": "user", "content": [text("Is the photo a frame of the clip?"),
                                                     {"type": "video", "video": frames(4, seed=3)},
                                                     {"type": "image", "image": image(480, 640, 4)}]}],
    "text_only": [{"role": "system", "content": [text("Be brief.")]},
                  {"role": "user", "content": [text("It's 3 o'clock — café?")]}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_prompt_and_model_inputs_identical(ours, reference, name, add_generation_prompt):
    conversation = CONVERSATIONS[name]
    prompt = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert prompt == reference.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    got, expected = both(ours, reference, conversation, add_generation_prompt=add_generation_prompt)
    assert_same_inputs(got, expected, video_atol=TWO_LEVELS)
    ids = got["input_ids"][0]
    assert np.sum(ids == ours.image_token_id) == sum(
        ours.image_token_count(h, w, multi_image=n > 1) for (h, w), n in
        zip(got.get("image_sizes", []), np.repeat(got.get("batch_num_images", []), got.get("batch_num_images", []))))


def test_system_prompt_example_from_reference_notes(ours):
    conversation = [{"role": "system", "content": [text("You are a helpful assistant.")]},
                    {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "video"},
                                                 text("Compare.")]},
                    {"role": "assistant", "content": [text("Sure.")]}]
    assert ours.apply_chat_template(conversation) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n<image>\n<video>\n"
        "Compare.<|im_end|>\n<|im_start|>assistant\nSure.<|im_end|>\n")


def test_flat_image_list_is_one_anyres_sample_per_image(ours, reference):
    prompt = "<|im_start|>user\n<image>\n<image>\nCompare.<|im_end|>\n<|im_start|>assistant\n"
    images = [image(90, 400, 1), image(500, 70, 2)]
    got = ours(text=prompt, images=images)
    assert_same_inputs(got, reference(text=prompt, images=images, return_tensors="np"))
    assert list(got["batch_num_images"]) == [1, 1]
    nested = ours(text=prompt, images=[images])
    assert_same_inputs(nested, reference(text=prompt, images=[images], return_tensors="np"))
    assert np.sum(nested["input_ids"] == ours.image_token_id) == 2 * 730


def test_left_padded_batch_mixing_everything(ours, reference):
    batch = [CONVERSATIONS[name] for name in ("one_image", "text_only", "multi_image_nested", "multi_turn_with_system")]
    got, expected = both(ours, reference, batch, add_generation_prompt=True,
                         processor_kwargs={"padding": True, "padding_side": "left"})
    assert_same_inputs(got, expected)
    assert list(got["batch_num_images"]) == [1, 2, 1]  # the text-only sample has no entry, as in transformers
    mask = got["attention_mask"]
    assert mask[:, -1].all() and not mask[1, 0]  # left padding; pad id from tokenizer_config
    assert np.all(got["input_ids"][mask == 0] == ours.tokenizer.pad_token_id)
    assert ours.tokenizer.pad_token_id == reference.tokenizer.pad_token_id


def test_batch_with_videos_and_right_padding(ours, reference):
    prompts = ["<|im_start|>user\n<video>\nWhat happens?<|im_end|>\n", "<video><image>short"]
    videos, images = [frames(6, seed=1), frames(6, 50, 200, seed=2)], [image(200, 1000)]
    got = ours(text=prompts, images=images, videos=videos, padding_side="right")
    expected = reference(text=prompts, images=images, videos=videos, padding=True, padding_side="right",
                         return_tensors="np")
    assert_same_inputs(got, expected, video_atol=TWO_LEVELS)
    assert got["attention_mask"][0, 0] == 1 and got["attention_mask"][0, -1] == 0  # right padding


def test_frame_sampling_keywords(ours, reference):
    conversation = [{"role": "user", "content": [{"type": "video", "video": frames(10)}, text("Go.")]}]
    got, expected = both(ours, reference, conversation, num_frames=4)  # turns sampling on, as transformers
    assert_same_inputs(got, expected, video_atol=TWO_LEVELS)
    assert got["pixel_values_videos"].shape[1] == 4
    unsampled = ours.apply_chat_template(conversation, tokenize=True, return_dict=True)
    assert unsampled["pixel_values_videos"].shape[1] == 10
    sampled = ours(text="<video>", videos=frames(10), do_sample_frames=True, num_frames=5)
    assert sampled["pixel_values_videos"].shape[1] == 5
    assert np.sum(sampled["input_ids"] == ours.video_token_id) == 5 * 196 + 1


def test_video_file_through_the_chat_template(ours, tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in frames(12, 48, 64):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    conversation = [{"role": "user", "content": [{"type": "video", "path": str(path)}, text("What happens?")]}]
    inputs = ours.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      num_frames=3)
    assert inputs["pixel_values_videos"].shape == (1, 3, 3, 384, 384)
    assert np.sum(inputs["input_ids"] == ours.video_token_id) == 3 * 196 + 1


def test_output_forms(ours, reference):
    conversation = CONVERSATIONS["one_image"]
    ids = ours.apply_chat_template(conversation, tokenize=True)
    expected = reference.apply_chat_template(conversation, tokenize=True, return_tensors="np")
    assert np.array_equal(ids, expected) and ids.shape[0] == 1
    lists = ours(text=["<image>hi", "a b c d e"], images=[image(30, 40)], padding=False, return_tensors=None)
    assert isinstance(lists["input_ids"][0], list) and len(lists["input_ids"][1]) != len(lists["input_ids"][0])
    assert lists.input_ids is lists["input_ids"]  # attribute access
    assert ours(text="x" * 7, padding="max_length", max_length=12)["input_ids"].shape == (1, 12)
    as_jax = ours(text="<image>hi", images=image(30, 40), return_tensors="jax")
    assert type(as_jax["pixel_values"]).__module__.startswith("jax") and as_jax["input_ids"].shape[0] == 1


def test_decode_matches_reference(ours, reference):
    ids = ours(text="<|im_start|>user\n<image>\nhello there, café 123!<|im_end|>", images=image(20, 20))["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids[0], skip_special_tokens=skip) == reference.decode(ids[0], skip_special_tokens=skip)
        assert ours.batch_decode(ids, skip_special_tokens=skip) == reference.batch_decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids[0], skip_special_tokens=True) == "user\n\nhello there, café 123!"  # as in the HF docs


def test_continue_final_message_matches_reference(ours, reference):
    conversation = [{"role": "user", "content": [text("Hi")]},
                    {"role": "assistant", "content": [text("The answer is")]}]
    assert (ours.apply_chat_template(conversation, continue_final_message=True)
            == reference.apply_chat_template(conversation, continue_final_message=True)
            == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nThe answer is")


# ------------------------------------------------------------------------------------------------- errors


def test_placeholder_count_errors(ours):
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) but 1 image"):
        ours(text="<image><image>", images=image(10, 10))
    with pytest.raises(ValueError, match=r"0 <image> placeholder\(s\) but 1 image"):
        ours(text="no placeholder", images=image(10, 10))
    with pytest.raises(ValueError, match=r"1 <video> placeholder\(s\) but 0 video"):
        ours(text="<video>")
    with pytest.raises(ValueError, match=r"1 <video> placeholder\(s\) but 2 video"):
        ours(text=["<video>", "x"], videos=[frames(2), frames(2)])


def test_content_and_file_errors(ours, tmp_path):
    with pytest.raises(ValueError, match="unknown content type 'audio'"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "audio", "path": "a.wav"}]}])
    with pytest.raises(ValueError, match="dicts with a 'type' key"):
        ours.apply_chat_template([{"role": "user", "content": ["just a string item"]}])
    with pytest.raises(ValueError, match="'image' content item has no data"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=True)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "image", "path": str(broken)}]}],
                                 tokenize=True)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ours(text="<image>", images=str(tmp_path / "missing.png"))
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        ours(text="<video>", videos=str(tmp_path / "missing.mp4"))
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("plain text")
    with pytest.raises(ValueError, match="notes.mp4"):
        ours(text="<video>", videos=str(not_a_video))
    with pytest.raises(ValueError, match="same number of frames"):
        ours(text="<video><video>", videos=[frames(3), frames(4)])
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['video_fps'\].*called fps now"):
        ours.apply_chat_template(CONVERSATIONS["video"], tokenize=True, video_fps=1)
    with pytest.raises(TypeError, match="text must be a string"):
        ours(text=[1, 2])


def test_tokenizer_matches_reference_on_tricky_text(ours, reference):
    texts = ["  multiple   spaces\tand\ttabs \r\n\r\nnew lines\n\n\n", "Cafe\u0301 (NFD) vs Café, naïve 你好，世界！ 🙂🙂",
             "numbers 1234567890 3.14159 -42 1e-5", "<|im_start|>assistant\n<image><video><|im_end|><|endoftext|>",
             "<imag e> < image> <IMAGE> <|im_start |>", "It's we're they'll I'd you've DON'T", "", " ", "a" * 300]
    assert ours.tokenizer.encode_batch(texts) == reference.tokenizer(texts)["input_ids"]
    for ids in reference.tokenizer(texts)["input_ids"]:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_video_as_list_of_pil_frames(ours, reference):
    pil_frames = [Image.fromarray(frame) for frame in frames(5, seed=7)]
    conversation = [{"role": "user", "content": [{"type": "video", "video": pil_frames}, text("Go.")]}]
    got, expected = both(ours, reference, conversation)
    assert_same_inputs(got, expected, video_atol=TWO_LEVELS)
    assert got["pixel_values_videos"].shape[:2] == (1, 5)
