"""Fine-tuning data: a chat jsonl → labelled, bucketed (optionally packed) batches, loaded with grain.

Each line of the jsonl is one ``{"messages": [...]}`` object in the processor's conversation format (TRL /
OpenAI layout): ``{"role": ..., "content": [{"type": "text", "text": ...}, {"type": "image", "path": ...},
{"type": "video", "path": ...}, {"type": "image_url", "image_url": {"url": ...}}]}``; a plain-string content is
one text item. Relative media paths are resolved against ``media_root`` (default: the jsonl's folder).

Labels keep the tokens the chat template's ``{% generation %}`` blocks produce (the assistant turns, as
transformers' ``return_assistant_tokens_mask``) and mask everything else with ``-100``. The OneVision template
marks only the assistant text, so training uses :data:`TRAINING_CHAT_TEMPLATE`, which renders the same text
and also marks each assistant turn's ``<|im_end|>`` (the model learns to stop).

Lengths count the vision tokens (`ov_jax.geometry` through the processor), so a sample longer than the budget
is skipped and reported, never cut inside a placeholder run. Batches have a fixed number of rows and a length
and a vision-tower batch taken from small bucket sets, so the train step compiles once per bucket pair.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from ov_jax.config import OneVisionConfig
from ov_jax.media_plan import build_media_plan
from ov_jax.processing import chat, media

IGNORE_INDEX = -100

# The llava-hf OneVision template with generation blocks around each assistant turn's text and <|im_end|>;
# it renders exactly the text of the original (tests/test_train_data.py checks both).
TRAINING_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{'<|im_end|>' + '\\n'}}"
    "{% else %}{% generation %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class DataError(ValueError):
    """A training file or sample that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One usable line of the jsonl: ``line`` (1-based), normalized ``messages`` with resolved media sources,
    and ``num_tokens``, its sequence length with every image / video placeholder expanded."""

    line: int
    messages: list
    num_tokens: int


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A scanned jsonl: the examples that fit ``max_length`` and ``skipped`` ``(line, num_tokens)`` for the
    ones that do not."""

    path: str
    examples: list[Example]
    skipped: list[tuple[int, int]]
    max_length: int

    def report(self) -> str:
        """One line: how many samples are used and which lines were skipped for length."""
        text = f"{self.path}: {len(self.examples)} samples"
        if self.skipped:
            shown = ", ".join(f"line {line} ({n} tokens)" for line, n in self.skipped[:10])
            more = f" and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
            text += (f"; skipped {len(self.skipped)} longer than max_length={self.max_length} (vision tokens "
                     f"included): {shown}{more}")
        return text


# ------------------------------------------------------------------------------------------- reading


def read_jsonl(path: str | os.PathLike, media_root: str | os.PathLike | None = None) -> list[tuple[int, list]]:
    """``(line, messages)`` for each non-blank line, messages normalized as the processor does, string
    contents turned into one text item, and local media paths made absolute (relative to ``media_root``,
    default the file's folder). Raises :class:`DataError` naming ``file:line`` for bad JSON, a missing
    ``messages`` list, unknown content types, media items without a source, or missing media files."""
    path = pathlib.Path(path)
    root = pathlib.Path(media_root) if media_root is not None else path.resolve().parent
    if not path.is_file():
        raise DataError(f"training data {str(path)!r} does not exist or is not a file")
    records = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            where = f"{path}:{line_number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 ({err})") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err})") from None
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
                raise DataError(f'{where}: expected an object {{"messages": [...]}} with a non-empty list')
            try:
                messages = _normalize_messages(record["messages"], root)
            except (ValueError, TypeError) as err:
                raise DataError(f"{where}: {err}") from None
            records.append((line_number, messages))
    if not records:
        raise DataError(f"training data {str(path)!r} holds no samples")
    return records


def _normalize_messages(messages: list, root: pathlib.Path) -> list[dict]:
    as_lists = []
    for message in messages:
        if isinstance(message, Mapping) and isinstance(message.get("content"), str):
            message = {**message, "content": [{"type": "text", "text": message["content"]}]}
        as_lists.append(message)
    (normalized,), _ = chat.normalize_conversations([as_lists])
    for message in normalized:
        if message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message role must be system, user or assistant, got {message.get('role')!r}")
        if not isinstance(message.get("content"), list):
            raise ValueError(f"a {message['role']!r} message has no content list")
    if not any(m["role"] == "assistant" for m in normalized):
        raise ValueError("the conversation has no assistant message, so nothing would be trained")
    images, videos = chat.media_from_conversations([normalized], require=True)
    for source in images[0] + videos[0]:
        if not isinstance(source, str):
            raise ValueError(f"media sources must be strings (paths or URLs), got {type(source).__name__}")
    for message in normalized:
        for item in message["content"]:
            if item["type"] in ("image", "video"):
                keys = chat.IMAGE_KEYS if item["type"] == "image" else chat.VIDEO_KEYS
                key = next(k for k in keys if k in item)
                item[key] = _resolve(item[key], root, item["type"])
    return normalized


def _resolve(source: str, root: pathlib.Path, kind: str) -> str:
    """A local path joined to ``root`` (as `ov_jax.processing.media` resolves image sources) and checked to be
    a readable file; URLs, data URIs and base64 image data are kept for the processor's loaders."""
    if media.is_url(source) or source.startswith("data:"):
        return source
    resolved = media.resolve_image_source(source, root) if kind == "image" else str(root / source)
    if resolved == source and not os.path.isabs(source):
        return source  # base64 image data
    return media.check_local_file(resolved, kind)


# ------------------------------------------------------------------------------------- tokenization


@dataclasses.dataclass(frozen=True)
class _Rendered:
    text: str
    ids: list[int]          # token ids before placeholder expansion
    mask: list[int]         # 1 where a token overlaps a {% generation %} span
    images: list[str]
    videos: list[str]


def _render(processor, messages: list, template: str) -> _Rendered:
    text, spans = chat.render_with_generation_spans(template, messages, **processor.tokenizer.special_tokens)
    bos = processor.tokenizer.bos_token
    add_special = not (bos is not None and text.startswith(bos))
    encoding = processor.tokenizer.backend.encode(text, add_special_tokens=add_special)
    mask = [int(any(start < end_char and end > start_char for start_char, end_char in spans))
            for start, end in encoding.offsets]
    images, videos = chat.media_from_conversations([messages], require=True)
    return _Rendered(text, list(encoding.ids), mask, images[0], videos[0])


def _expansion_counts(processor, image_sizes: Sequence[Sequence[int]], num_videos: int, num_frames: int
                      ) -> tuple[list[int], list[int]]:
    """Tokens each image / video placeholder expands to (one sample: several images means multi-image mode)."""
    multi = len(image_sizes) > 1
    images = [processor.image_token_count(int(h), int(w), multi_image=multi) for h, w in image_sizes]
    return images, [processor.video_token_count(num_frames)] * num_videos


def _expanded_length(rendered: _Rendered, counts: tuple[list[int], list[int]]) -> int:
    return len(rendered.ids) + sum(n - 1 for n in counts[0] + counts[1])


def check_template(processor, template: str, messages: list, where: str) -> None:
    """The training template must render the same text as the checkpoint's own template."""
    special = processor.tokenizer.special_tokens
    ours, _ = chat.render_with_generation_spans(template, messages, **special)
    theirs = chat.render_conversations(processor.resolve_chat_template(), [messages], **special)[0]
    if ours != theirs:
        raise DataError(f"{where}: the training chat template renders different text than the checkpoint's chat "
                        "template; pass a chat_template with {% generation %} blocks that renders the same text")


def scan(path: str | os.PathLike, processor, *, max_length: int, num_frames: int = 8,
         media_root: str | os.PathLike | None = None, chat_template: str = TRAINING_CHAT_TEMPLATE) -> Dataset:
    """Read and measure every sample (images opened for their size; videos count ``num_frames`` frames).

    Samples longer than ``max_length`` tokens (vision tokens included) are skipped and listed in
    :attr:`Dataset.skipped`. Raises :class:`DataError` naming ``file:line`` for bad samples, and when no
    sample fits.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    examples, skipped = [], []
    for line, messages in read_jsonl(path, media_root):
        where = f"{path}:{line}"
        check_template(processor, chat_template, messages, where)
        try:
            rendered = _render(processor, messages, chat_template)
            sizes = [media.load_image(source).size[::-1] for source in rendered.images]
        except (ValueError, OSError) as err:
            raise DataError(f"{where}: {err}") from None
        if not any(rendered.mask):
            raise DataError(f"{where}: the chat template marks no assistant tokens (no {{% generation %}} output)")
        length = _expanded_length(rendered, _expansion_counts(processor, sizes, len(rendered.videos), num_frames))
        if length > max_length:
            skipped.append((line, length))
        else:
            examples.append(Example(line, messages, length))
    if not examples:
        raise DataError(f"no sample of {path} fits max_length={max_length} (shortest: "
                        f"{min(n for _, n in skipped)} tokens with vision tokens)")
    return Dataset(str(path), examples, skipped, max_length)


def encode(processor, example: Example, *, num_frames: int = 8, chat_template: str = TRAINING_CHAT_TEMPLATE,
           path: str = "") -> dict[str, Any]:
    """One sample's model inputs: ``input_ids`` / ``labels`` int32 ``[T]`` (labels ``-100`` outside the
    assistant turns and on placeholders), ``pixel_values`` ``[I, tiles, 3, s, s]`` / ``image_sizes`` ``[I, 2]``
    and ``pixel_values_videos`` ``[V, F, 3, s, s]`` when present. Errors name ``path:line``."""
    where = f"{path}:{example.line}"
    try:
        rendered = _render(processor, example.messages, chat_template)
        outputs = processor(text=[rendered.text], images=[rendered.images] if rendered.images else None,
                            videos=rendered.videos or None, num_frames=num_frames if rendered.videos else None,
                            padding=False, add_special_tokens=processor.tokenizer.bos_token is None
                            or not rendered.text.startswith(processor.tokenizer.bos_token))
    except (ValueError, OSError) as err:
        raise DataError(f"{where}: {err}") from None
    ids = outputs["input_ids"][0]
    sizes = outputs["image_sizes"].tolist() if rendered.images else []
    image_counts, video_counts = _expansion_counts(processor, sizes, len(rendered.videos), num_frames)
    placeholder = {processor.image_token_id: iter(image_counts), processor.video_token_id: iter(video_counts)}
    labels = []
    for token, keep in zip(rendered.ids, rendered.mask):
        if token in placeholder:
            labels += [IGNORE_INDEX] * next(placeholder[token])
        else:
            labels.append(token if keep else IGNORE_INDEX)
    if len(ids) != example.num_tokens or len(labels) != len(ids):
        raise DataError(f"{where}: the sample now has {len(ids)} tokens, {example.num_tokens} when scanned "
                        "(did a media file change?)")
    sample: dict[str, Any] = {"input_ids": ids.astype(np.int32), "labels": np.asarray(labels, np.int32)}
    for key in ("pixel_values", "image_sizes", "pixel_values_videos"):
        if key in outputs:
            sample[key] = outputs[key]
    return sample


# ------------------------------------------------------------------------------------ rows and batches


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """How samples become batches.

    ``batch_size`` rows per batch (fewer rows given to :func:`collate` are filled with empty ones); rows are
    ``max_length`` tokens at most and padded to the smallest of ``length_buckets`` that fits (default: powers
    of two from 64, and ``max_length``); the vision tower's batch (tiles + frames) is padded to 0 or a power of
    two. With ``packing``, several samples share a row (first-fit by length), each its own segment:
    ``segment_ids`` 1, 2, ... (0 = padding) and positions restarting at 0 in every segment.
    """

    batch_size: int
    max_length: int
    packing: bool = False
    length_buckets: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.length_buckets is not None and (not self.length_buckets or max(self.length_buckets) < self.max_length
                                                or min(self.length_buckets) < 1):
            raise ValueError(f"length_buckets {self.length_buckets} must be positive and reach max_length "
                             f"{self.max_length}")

    @property
    def buckets(self) -> tuple[int, ...]:
        if self.length_buckets is not None:
            return tuple(sorted(set(self.length_buckets)))
        powers = [2 ** k for k in range(6, max(6, math.ceil(math.log2(self.max_length))))]
        return tuple(sorted({n for n in powers if n < self.max_length} | {self.max_length}))

    def length_bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)


def tower_bucket(count: int) -> int:
    """Vision-tower batch for ``count`` tiles and frames: 0, or the next power of two."""
    return 0 if count == 0 else 1 << (count - 1).bit_length()


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing packing of samples (by index) into rows of at most ``max_length`` tokens; each row
    lists its samples in index order. Deterministic (ties broken by index)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[index] > max_length:
            raise ValueError(f"sample {index} has {lengths[index]} tokens, more than max_length={max_length}")
        row = next((r for r, space in enumerate(free) if space >= lengths[index]), None)
        if row is None:
            rows.append([])
            free.append(max_length)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= lengths[index]
    return [sorted(row) for row in rows]


def join_segments(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row from encoded samples: concatenated ids / labels, ``segment_ids`` 1..k, positions restarting per
    segment, every image and video in order, and ``batch_num_images`` per segment."""
    ids = np.concatenate([s["input_ids"] for s in samples])
    labels = np.concatenate([s["labels"] for s in samples])
    starts = np.cumsum([0] + [len(s["input_ids"]) for s in samples[:-1]])
    labels[starts] = IGNORE_INDEX  # a segment's first token is never a target of the previous segment
    return {
        "input_ids": ids, "labels": labels,
        "segment_ids": np.concatenate([np.full(len(s["input_ids"]), k + 1, np.int32) for k, s in enumerate(samples)]),
        "position_ids": np.concatenate([np.arange(len(s["input_ids"]), dtype=np.int32) for s in samples]),
        "images": [(tiles, size) for s in samples if "pixel_values" in s
                   for tiles, size in zip(s["pixel_values"], s["image_sizes"].tolist())],
        "batch_num_images": [len(s["image_sizes"]) if "image_sizes" in s else 0 for s in samples],
        "videos": [video for s in samples if "pixel_values_videos" in s for video in s["pixel_values_videos"]],
    }


def collate(rows: Sequence[Mapping[str, Any]], spec: BatchSpec, config: OneVisionConfig, pad_id: int
            ) -> dict[str, np.ndarray]:
    """A fixed-shape batch from rows made by :func:`join_segments`.

    Returns ``input_ids`` / ``labels`` / ``segment_ids`` / ``position_ids`` int32 ``[B, T]`` (pad id, -100, 0, 0
    on padding), ``attention_mask`` bool ``[B, T]``, the media plan (``tower_inputs`` float32 ``[N, 3, s, s]``,
    ``tap_index`` int32 / ``tap_weight`` float32 ``[B, T, 4]``, ``is_media`` bool ``[B, T]``) and scalars
    ``num_samples`` / ``num_tokens`` (real tokens). ``B = spec.batch_size``, ``T`` a length bucket, ``N`` a
    tower bucket.
    """
    from ov_jax.geometry import image_tile_count

    b = spec.batch_size
    if len(rows) > b:
        raise ValueError(f"{len(rows)} rows for a batch of {b}")
    t = spec.length_bucket(max(len(r["input_ids"]) for r in rows))
    batch = {
        "input_ids": np.full((b, t), pad_id, np.int32), "labels": np.full((b, t), IGNORE_INDEX, np.int32),
        "segment_ids": np.zeros((b, t), np.int32), "position_ids": np.zeros((b, t), np.int32),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        for key in batch:
            batch[key][i, :n] = row[key]
    batch["attention_mask"] = batch["segment_ids"] > 0

    images = [image for row in rows for image in row["images"]]
    videos = [video for row in rows for video in row["videos"]]
    counts = [n for row in rows for n in row["batch_num_images"]]
    pixel_values = image_sizes = pixel_values_videos = None
    tiles = 0
    if images:
        most = max(len(view) for view, _ in images)
        pixel_values = np.zeros((len(images), most) + images[0][0].shape[1:], np.float32)
        for i, (view, _) in enumerate(images):
            pixel_values[i, :len(view)] = view
        image_sizes = np.asarray([size for _, size in images], np.int64)
        modes = [n > 1 for n in counts for _ in range(n)]
        tiles += sum(image_tile_count(h, w, config.image_grid_pinpoints, multi_image=multi,
                                      tile=config.vision.image_size) for (h, w), multi in zip(image_sizes, modes))
    if videos:
        if len({len(v) for v in videos}) > 1:
            raise ValueError(f"videos in one batch have different frame counts {[len(v) for v in videos]}")
        pixel_values_videos = np.stack(videos)
        tiles += pixel_values_videos.shape[0] * pixel_values_videos.shape[1]
    plan = build_media_plan(batch["input_ids"], config, pixel_values, image_sizes, np.asarray(counts),
                            pixel_values_videos, tower_bucket=tower_bucket(tiles))
    batch.update(tower_inputs=plan.tower_inputs, tap_index=plan.tap_index, tap_weight=plan.tap_weight,
                 is_media=plan.is_media)
    batch["num_samples"] = np.int32(sum(int(r["segment_ids"].max()) for r in rows))
    batch["num_tokens"] = np.int32(sum(len(r["input_ids"]) for r in rows))
    return batch


def make_batches(dataset: Dataset, processor, config: OneVisionConfig, spec: BatchSpec, *, seed: int = 0,
                 num_frames: int = 8, chat_template: str = TRAINING_CHAT_TEMPLATE):
    """An endless ``grain.MapDataset`` of batches (:func:`collate`): rows shuffled with ``seed``, reshuffled
    every epoch, batch ``k`` always the same for the same data, spec and seed. Iterate it with
    :func:`iterate` (checkpointable position)."""
    import grain

    if spec.max_length < dataset.max_length:
        raise ValueError(f"the batch spec's max_length {spec.max_length} is below the scan's {dataset.max_length}")
    lengths = [example.num_tokens for example in dataset.examples]
    rows = pack(lengths, spec.max_length) if spec.packing else [[i] for i in range(len(lengths))]
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id or 0

    def encode_row(row: list[int]) -> dict[str, Any]:
        return join_segments([encode(processor, dataset.examples[i], num_frames=num_frames,
                                     chat_template=chat_template, path=dataset.path) for i in row])

    return (grain.MapDataset.source(rows).seed(seed).shuffle().repeat().map(encode_row)
            .batch(spec.batch_size, drop_remainder=True, batch_fn=lambda group: collate(group, spec, config, pad_id)))


def iterate(batches, state: Mapping[str, Any] | None = None, *, num_threads: int = 2, prefetch: int = 2):
    """A grain iterator over ``batches`` (reading ahead on ``num_threads`` threads); ``state`` (from the
    iterator's ``get_state()``, a small JSON-able dict) resumes at the batch where that state was taken."""
    import grain

    iterator = batches.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                         prefetch_buffer_size=prefetch)).__iter__()
    if state is not None:
        iterator.set_state(dict(state))
    return iterator
