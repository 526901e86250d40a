"""Fine-tuning data (`ov_jax.train.data`): assistant-only labels against transformers' assistant mask, the length
budget with vision tokens, packing, bucketed shapes, grain determinism and file:line errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ov_jax import loading
from ov_jax.processing import LlavaOnevisionProcessor, chat
from ov_jax.tiny import CHAT_TEMPLATE
from ov_jax.train import data

ASSETS = Path(__file__).resolve().parent.parent / "ov_jax" / "assets"

TEXT_ONLY = [
    [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "There are 3 items."}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Where?"},
     {"role": "assistant", "content": "Near the river bank."}, {"role": "user", "content": "And then?"},
     {"role": "assistant", "content": "The dog runs towards the old man."}],
    [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."}],
    [{"role": "user", "content": "What is shown in this picture of the city street at night?"},
     {"role": "assistant", "content": "A white boat on the water and several colourful flowers."}],
]


def image_turn(path="small.jpg", text="What is shown in this image?"):
    return {"role": "user", "content": [{"type": "image", "path": path}, {"type": "text", "text": text}]}


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return LlavaOnevisionProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def config(tiny_ckpt):
    return loading.checkpoint_config(tiny_ckpt)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    Image.open(ASSETS / "sample.jpg").convert("RGB").resize((120, 90)).save(folder / "small.jpg")
    shutil.copy(ASSETS / "sample.mp4", folder / "clip.mp4")
    return folder


def test_training_template_renders_the_checkpoint_template_text():
    conversations = TEXT_ONLY + [
        [image_turn("a.jpg"), {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Compare."}, {"type": "image", "path": "a"},
                                      {"type": "video", "path": "v"}, {"type": "image", "path": "b"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Two "}, {"type": "text", "text": "views."}]},
         {"role": "assistant", "content": []}],
    ]
    for conversation in conversations:
        normalized, _ = chat.normalize_conversations([conversation])
        messages = [{**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
                     else m["content"]} for m in normalized[0]]
        for prompt in (False, True):
            ours = chat.render_conversations(data.TRAINING_CHAT_TEMPLATE, [messages], add_generation_prompt=prompt)
            assert ours == chat.render_conversations(CHAT_TEMPLATE, [messages], add_generation_prompt=prompt)
        text, spans = chat.render_with_generation_spans(data.TRAINING_CHAT_TEMPLATE, messages)
        assert text == chat.render_conversations(CHAT_TEMPLATE, [messages])[0]
        answers = [m for m in messages if m["role"] == "assistant"]
        assert [text[a:b] for a, b in spans] == [
            "".join(c["text"] for c in m["content"] if c["type"] == "text") + "<|im_end|>" for m in answers]


def test_labels_equal_transformers_assistant_mask(tiny_ckpt, processor, folder):
    from ov_jax.compare import reference_processor

    conversations = [
        [image_turn(), {"role": "assistant", "content": "A small dog is sitting on the wooden table."},
         {"role": "user", "content": "And the colour?"}, {"role": "assistant", "content": "Red."}],
        TEXT_ONLY[1],
    ]
    path = write_jsonl(folder / "mask.jsonl", conversations)
    dataset = data.scan(path, processor, max_length=4096)
    reference = reference_processor(tiny_ckpt)
    for example in dataset.examples:
        sample = data.encode(processor, example, path=str(path))
        expected = reference.apply_chat_template(example.messages, chat_template=data.TRAINING_CHAT_TEMPLATE,
                                                 tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                                 return_tensors="np")
        np.testing.assert_array_equal(sample["input_ids"], expected["input_ids"][0])
        mask = np.asarray(expected["assistant_masks"][0]).astype(bool)
        assert 0 < mask.sum() < len(mask)
        np.testing.assert_array_equal(sample["labels"] != data.IGNORE_INDEX, mask)
        np.testing.assert_array_equal(sample["labels"][mask], sample["input_ids"][mask])
        if "pixel_values" in sample:
            np.testing.assert_array_equal(sample["pixel_values"], expected["pixel_values"])


def test_video_sample_ids_match_the_processor_and_label_only_the_answer(processor, folder):
    conversation = [{"role": "user", "content": [{"type": "video", "path": "clip.mp4"},
                                                 {"type": "text", "text": "Describe the video."}]},
                    {"role": "assistant", "content": "A bird walks around."}]
    path = write_jsonl(folder / "video.jsonl", [conversation])
    (example,) = data.scan(path, processor, max_length=4096, num_frames=4).examples
    sample = data.encode(processor, example, num_frames=4, path=str(path))
    expected = processor.apply_chat_template(example.messages, tokenize=True, return_dict=True, num_frames=4)
    np.testing.assert_array_equal(sample["input_ids"], expected["input_ids"][0])
    np.testing.assert_array_equal(sample["pixel_values_videos"], expected["pixel_values_videos"])
    assert example.num_tokens == len(sample["input_ids"])
    assert (sample["input_ids"] == processor.video_token_id).sum() == 4 * 196 + 1
    assert processor.decode(sample["labels"][sample["labels"] >= 0]) == "A bird walks around.<|im_end|>"


def test_length_budget_counts_vision_tokens_and_reports_skips(processor, folder):
    conversations = [TEXT_ONLY[0], [image_turn(), {"role": "assistant", "content": "A cat."}], TEXT_ONLY[2]]
    path = write_jsonl(folder / "budget.jsonl", conversations)
    full = data.scan(path, processor, max_length=100000)
    lengths = [e.num_tokens for e in full.examples]
    image_tokens = processor.image_token_count(90, 120)
    assert lengths[1] > image_tokens > 729  # the image's tokens are counted, not its single placeholder
    budget = max(lengths[0], lengths[2])
    dataset = data.scan(path, processor, max_length=budget)
    assert [e.line for e in dataset.examples] == [1, 3]
    assert dataset.skipped == [(2, lengths[1])]
    assert f"skipped 1 longer than max_length={budget}" in dataset.report() and "line 2" in dataset.report()
    with pytest.raises(data.DataError, match="no sample"):
        data.scan(path, processor, max_length=5)


@pytest.mark.parametrize("content, message", [
    ("{not json\n", r"bad\.jsonl:2: not valid JSON"),
    (json.dumps({"text": "x"}) + "\n", r"bad\.jsonl:2: expected an object"),
    (json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n", r"bad\.jsonl:2: .*no assistant"),
    (json.dumps({"messages": [image_turn("missing.jpg"), {"role": "assistant", "content": "x"}]}) + "\n",
     r"bad\.jsonl:2: image .*missing\.jpg.* does not exist"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "audio"}]},
                              {"role": "assistant", "content": "x"}]}) + "\n", r"bad\.jsonl:2: unknown content type"),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}]}) + "\n", r"bad\.jsonl:2: message role"),
])
def test_bad_lines_are_named_by_file_and_line(processor, folder, content, message):
    path = folder / "bad.jsonl"
    path.write_text(json.dumps({"messages": TEXT_ONLY[0]}) + "\n" + content)
    with pytest.raises(data.DataError, match=message):
        data.scan(path, processor, max_length=512)


def test_media_root_resolves_relative_paths(processor, folder, tmp_path):
    path = write_jsonl(tmp_path / "elsewhere.jsonl", [[image_turn(), {"role": "assistant", "content": "A cat."}]])
    with pytest.raises(data.DataError, match="elsewhere.jsonl:1: image .*small.jpg"):
        data.scan(path, processor, max_length=4096)
    (example,) = data.scan(path, processor, max_length=4096, media_root=folder).examples
    assert example.messages[0]["content"][0]["path"] == str(folder / "small.jpg")


def test_pack_first_fit_and_segments(processor, folder):
    assert data.pack([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]
    path = write_jsonl(folder / "pack.jsonl", TEXT_ONLY)
    dataset = data.scan(path, processor, max_length=512)
    samples = [data.encode(processor, e) for e in dataset.examples[:3]]
    row = data.join_segments(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    starts = np.cumsum([0] + lengths[:-1])
    np.testing.assert_array_equal(row["segment_ids"], np.repeat([1, 2, 3], lengths))
    np.testing.assert_array_equal(row["position_ids"], np.concatenate([np.arange(n) for n in lengths]))
    np.testing.assert_array_equal(row["input_ids"], np.concatenate([s["input_ids"] for s in samples]))
    assert (row["labels"][starts] == data.IGNORE_INDEX).all()
    assert (row["labels"] != data.IGNORE_INDEX).sum() == sum((s["labels"] != data.IGNORE_INDEX).sum() for s in samples)


def test_packed_batches_hold_several_samples_per_row(processor, config, folder):
    path = write_jsonl(folder / "pack.jsonl", TEXT_ONLY * 3)
    dataset = data.scan(path, processor, max_length=256)
    spec = data.BatchSpec(batch_size=2, max_length=256, packing=True)
    batch = next(data.iterate(data.make_batches(dataset, processor, config, spec)))
    assert batch["num_samples"] == batch["segment_ids"].max(axis=1).sum() > spec.batch_size  # micro-batch > 2
    for row in range(2):
        segments = batch["segment_ids"][row]
        for k in range(1, segments.max() + 1):
            np.testing.assert_array_equal(batch["position_ids"][row][segments == k], np.arange((segments == k).sum()))
    np.testing.assert_array_equal(batch["attention_mask"], batch["segment_ids"] > 0)
    assert batch["num_tokens"] == batch["attention_mask"].sum()


def test_batches_take_bucketed_shapes(processor, config, folder):
    conversations = TEXT_ONLY + [[image_turn(), {"role": "assistant", "content": "A cat."}]]
    path = write_jsonl(folder / "buckets.jsonl", conversations)
    dataset = data.scan(path, processor, max_length=2048)
    spec = data.BatchSpec(batch_size=2, max_length=2048)
    assert spec.buckets == (64, 128, 256, 512, 1024, 2048)
    iterator = data.iterate(data.make_batches(dataset, processor, config, spec, seed=3))
    shapes = set()
    for _ in range(8):
        batch = next(iterator)
        t = batch["input_ids"].shape[1]
        assert t in spec.buckets and batch["input_ids"].shape[0] == 2
        assert batch["attention_mask"].sum(1).max() <= t and (t == 64 or batch["attention_mask"].sum(1).max() > t // 2)
        n = batch["tower_inputs"].shape[0]
        assert n == data.tower_bucket(n) and batch["is_media"].any() == (n > 0)
        shapes.add((t, n))
    # 8 batches, 3 executables: the image sample (1,700+ tokens, base + 1 tile) and two short text buckets
    assert shapes == {(64, 0), (128, 0), (2048, 2)}
    assert [data.tower_bucket(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [0, 1, 2, 4, 8, 8, 16]


def test_grain_order_is_seeded_and_resumable(processor, config, folder):
    path = write_jsonl(folder / "order.jsonl", TEXT_ONLY * 2)
    dataset = data.scan(path, processor, max_length=128)
    spec = data.BatchSpec(batch_size=2, max_length=128)

    def first_ids(seed, count, state=None):
        iterator = data.iterate(data.make_batches(dataset, processor, config, spec, seed=seed), state)
        return [next(iterator)["input_ids"] for _ in range(count)], iterator.get_state()

    run, _ = first_ids(0, 8)  # two epochs of 4 batches
    again, _ = first_ids(0, 8)
    assert all(np.array_equal(a, b) for a, b in zip(run, again))
    other, _ = first_ids(1, 4)
    assert not all(np.array_equal(a, b) for a, b in zip(run, other))
    assert not all(np.array_equal(a, b) for a, b in zip(run[:4], run[4:]))  # reshuffled each epoch
    _, state = first_ids(0, 3)
    resumed, _ = first_ids(0, 5, state)
    assert all(np.array_equal(a, b) for a, b in zip(run[3:], resumed))


def test_a_training_template_must_render_the_checkpoint_text(processor, folder):
    path = write_jsonl(folder / "template.jsonl", TEXT_ONLY[:1])
    other = "{% for m in messages %}{% generation %}{{ m['role'] }}{% endgeneration %}{% endfor %}"
    with pytest.raises(data.DataError, match=r"template\.jsonl:1: the training chat template renders different"):
        data.scan(path, processor, max_length=512, chat_template=other)
