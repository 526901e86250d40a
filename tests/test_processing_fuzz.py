"""Hypothesis fuzz of the processor and the chat template: for any conversation shape (content as a string or a
list, nested or batched, missing keys, unknown types, images of many sizes and modes, videos), either model
inputs whose ``<image>`` / ``<video>`` token counts equal ``ov_jax.geometry``'s, or a deliberate error: a
``ValueError`` (our subclasses included) or ``TypeError`` raised by ``ov_jax`` code itself, never an accident
of Python, NumPy or PIL surfacing from inside. The default profile is small; ``-m slow`` runs a longer one."""

import os
import traceback

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from ov_jax import geometry
from ov_jax.processing import LlavaOnevisionProcessor

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ov_jax")
FAST = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
LONG = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return LlavaOnevisionProcessor.from_pretrained(tiny_ckpt)


PIL_MODES = ("RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1", "I", "F")


@st.composite
def images(draw):
    """(image, (height, width)): a PIL image of some mode or a uint8 array HxW, HxWxC (C = 1, 3, 4)."""
    height, width = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    if draw(st.integers(0, 99)) < 8:  # now and then an extreme aspect ratio
        height, width = draw(st.sampled_from([(1, 700), (700, 1), (2, 500)]))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    form = draw(st.sampled_from(("pil", "hwc", "hw", "hw1", "hwc4")))
    if form == "hw":
        return pixels[..., 0], (height, width)
    if form != "pil":
        array = pixels[..., :{"hwc": 3, "hw1": 1, "hwc4": 4}[form]]
        # An array whose first axis could be channels is read channels-first, as transformers reads it.
        return array, ((width, array.shape[2]) if height in (1, 3, 4) else (height, width))
    mode = draw(st.sampled_from(PIL_MODES))
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    return image, (height, width)


def texts():
    """Any text, lone surrogates included, and now and then a literal placeholder token."""
    return st.one_of(st.text(st.characters(codec=None, exclude_categories=()), max_size=20),
                     st.sampled_from(["<image>", "<video>", "<|im_end|>", ""]))


@st.composite
def content_items(draw, sizes, frame_counts):
    """One content item; records the size of each image (None for anything that is not a valid image)."""
    kind = draw(st.sampled_from(("text", "image", "image", "video", "unknown", "no_type", "not_a_dict",
                                 "no_data", "bad_image")))
    if kind == "text":
        return {"type": "text", "text": draw(texts())}
    if kind == "image":
        image, size = draw(images())
        sizes.append(size)
        return {"type": "image", "image": image}
    if kind == "video":
        count = draw(st.integers(1, 3))
        frame_counts.append(count)
        return {"type": "video", "video": np.zeros((count, 8, 10, 3), np.uint8)}
    if kind == "unknown":
        return {"type": draw(st.sampled_from(["audio", "image_url", "", "Image"])), "url": "x"}
    if kind == "no_type":
        return {"text": "hi"}
    if kind == "not_a_dict":
        return draw(st.sampled_from(["plain string", 3, None, ["nested"]]))
    if kind == "no_data":
        return {"type": draw(st.sampled_from(["image", "video"]))}
    sizes.append(None)
    return {"type": "image", "image": draw(st.sampled_from([3, None, {"a": 1}, b"\x89PNG", np.zeros((2, 2, 2, 2))]))}


@st.composite
def conversations(draw):
    """(conversation or batch, per-conversation image sizes, per-conversation video frame counts)."""
    batched = draw(st.booleans())
    batch = []
    all_sizes, all_frames = [], []
    for _ in range(draw(st.integers(1, 3)) if batched else 1):
        sizes, frame_counts, messages = [], [], []
        for _ in range(draw(st.integers(1, 3))):
            message = {}
            if draw(st.integers(0, 9)):
                message["role"] = draw(st.sampled_from(["user", "assistant", "system", "tool", ""]))
            form = draw(st.sampled_from(["list", "list", "list", "string", "missing", "none", "number"]))
            if form == "list":
                message["content"] = [draw(content_items(sizes, frame_counts)) for _ in range(draw(st.integers(0, 3)))]
            elif form == "string":
                message["content"] = draw(texts())
            elif form == "none":
                message["content"] = None
            elif form == "number":
                message["content"] = 7
            messages.append(message if draw(st.integers(0, 19)) else draw(st.sampled_from(["text", 5, None])))
        batch.append(messages)
        all_sizes.append(sizes)
        all_frames.append(frame_counts)
    return (batch if batched else batch[0]), all_sizes, all_frames


def assert_deliberate(error: BaseException) -> None:
    """A ValueError / TypeError raised by ov_jax's own code (its innermost frame is in the package)."""
    assert isinstance(error, (ValueError, TypeError)), repr(error)
    innermost = traceback.extract_tb(error.__traceback__)[-1]
    assert innermost.filename.startswith(PACKAGE), f"{error!r} escaped from {innermost.filename}:{innermost.lineno}"
    assert str(error), repr(error)


def expected_counts(processor, sizes, frame_counts):
    config = processor.image_config
    image_tokens = 0
    for per_conversation in sizes:
        for height, width in per_conversation:
            count = geometry.image_token_count(height, width, config.pinpoints, multi_image=len(per_conversation) > 1,
                                               tile=config.tile_size, side=processor.patches_per_side,
                                               max_n=processor.max_tiles_cap)
            image_tokens += count - (processor.vision_feature_select_strategy == "default")
    video_tokens = sum(geometry.video_token_count(n, side=processor.patches_per_side)
                       for per_conversation in frame_counts for n in per_conversation)
    return image_tokens, video_tokens


def check(processor, case):
    conversation, sizes, frame_counts = case
    try:
        outputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
    except Exception as error:  # noqa: BLE001 (what is checked is which errors come out)
        assert_deliberate(error)
        event(f"error: {type(error).__name__}")
        return
    event("model inputs")
    assert all(size is not None for per_conversation in sizes for size in per_conversation)
    ids = np.asarray(outputs["input_ids"])
    image_tokens, video_tokens = expected_counts(processor, sizes, frame_counts)
    assert int((ids == processor.image_token_id).sum()) == image_tokens
    assert int((ids == processor.video_token_id).sum()) == video_tokens
    if image_tokens:
        assert outputs["image_sizes"].tolist() == [list(s) for per_conversation in sizes for s in per_conversation]


@FAST
@given(case=conversations())
def test_processor_fuzz(processor, case):
    check(processor, case)


@pytest.mark.slow
@LONG
@given(case=conversations())
def test_processor_fuzz_long(processor, case):
    check(processor, case)


def test_grayscale_arrays_with_a_short_side_keep_their_size(processor):
    """Found by the fuzz: a 2-D array 3 x 700 was read as 3 channels of 700 x 1."""
    for shape in ((3, 700), (1, 50), (4, 4)):
        assert processor.preprocess_images(np.full(shape, 9, np.uint8))["image_sizes"].tolist() == [list(shape)]
