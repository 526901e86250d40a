"""Chat-template rendering with jinja2, matching transformers' ``apply_chat_template`` environment.

Templates run in jinja2's immutable sandbox with ``trim_blocks`` / ``lstrip_blocks``, the loop-control
extension, ``tojson`` / ``raise_exception`` / ``strftime_now``, and a ``{% generation %}`` tag that renders its
body unchanged (transformers uses it for assistant masks; :func:`render_with_generation_spans` returns the spans
it marks). Conversations are normalised the way transformers does (batched or not, ``None`` values dropped,
OpenAI ``image_url`` items turned into ``image`` items), and everything the template sees is reduced to plain
JSON data, so media objects never reach the sandbox.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import functools
import json
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

CONTENT_TYPES = ("text", "image", "video")
IMAGE_KEYS = ("image", "url", "path", "base64")  # where transformers looks for an image item's data, in order
VIDEO_KEYS = ("video", "url", "path")


# While :func:`render_with_generation_spans` runs: (blocks rendered so far, spans found so far).
_GENERATION_TRACKER: contextvars.ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = contextvars.ContextVar(
    "generation_tracker", default=None)


class GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body unchanged and, while
    :func:`render_with_generation_spans` runs, records the body's character span (as transformers' tracker)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller) -> str:
        text = caller()
        tracker = _GENERATION_TRACKER.get()
        if tracker is not None:
            blocks, spans = tracker
            start = sum(len(block) for block in blocks)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same environment transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"the chat template does not parse: {err}") from None


@functools.lru_cache(maxsize=16)
def template_variables(source: str) -> frozenset[str]:
    """Names a template reads from its context (to tell template kwargs from processor kwargs)."""
    env = compile_template(source).environment
    return frozenset(jinja2.meta.find_undeclared_variables(env.parse(source)))


def plain_template_data(value: Any) -> Any:
    """JSON-like copy of ``value``; any other object becomes a ``"<TypeName>"`` placeholder (as transformers)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(v) for v in value)
    if isinstance(value, np.generic):
        return plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def normalize_conversations(conversation: Any) -> tuple[list[list[dict]], bool]:
    """``(conversations, is_batched)``: one conversation or a batch of them, each a list of message dicts.

    ``None`` values are dropped, OpenAI ``{"type": "image_url", "image_url": {"url": ...}}`` items become
    ``{"type": "image", "url": ...}``, and content items are checked (dicts with a known ``type``).
    """
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("a conversation must be a non-empty list of messages (or a list of such lists)")
    is_batched = isinstance(conversation[0], (list, tuple))
    conversations = list(conversation) if is_batched else [conversation]
    normalized = []
    for index, messages in enumerate(conversations):
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"conversation {index} is a {type(messages).__name__}, expected a list of messages")
        normalized.append([_normalize_message(message) for message in messages])
    return normalized, is_batched


def _normalize_message(message: Any) -> dict:
    if not isinstance(message, Mapping):
        raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
    message = {key: value for key, value in message.items() if value is not None}
    content = message.get("content")
    if isinstance(content, (list, tuple)):
        items = []
        for item in content:
            if not isinstance(item, Mapping) or "type" not in item:
                raise ValueError(f"content items must be dicts with a 'type' key, got {item!r}")
            if item["type"] == "image_url" and "image_url" in item:
                info = item["image_url"]
                item = {"type": "image", "url": info.get("url", "") if isinstance(info, Mapping) else info}
            if item["type"] not in CONTENT_TYPES:
                raise ValueError(
                    f"unknown content type {item['type']!r} in a {message.get('role', '?')!r} message; "
                    f"LLaVA-OneVision accepts {', '.join(CONTENT_TYPES)}"
                )
            items.append(dict(item))
        message["content"] = items
    return message


def media_from_conversations(conversations: Sequence[Sequence[Mapping]], *, require: bool
                             ) -> tuple[list[list[Any]], list[list[Any]]]:
    """Per-conversation lists of image and video sources, in content order (``require``: every media item
    must carry its data under one of ``IMAGE_KEYS`` / ``VIDEO_KEYS``)."""
    batch_images, batch_videos = [], []
    for conversation in conversations:
        images, videos = [], []
        for message in conversation:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for item in content:
                keys, bucket = {"image": (IMAGE_KEYS, images), "video": (VIDEO_KEYS, videos)}.get(item["type"], ((), None))
                if bucket is None:
                    continue
                found = [item[key] for key in keys if key in item]
                if require and not found:
                    raise ValueError(
                        f"a {item['type']!r} content item has no data; give it one of the keys {', '.join(keys)} "
                        f"(got {sorted(item)})"
                    )
                bucket.extend(found)
        batch_images.append(images)
        batch_videos.append(videos)
    return batch_images, batch_videos


def render_conversations(
    source: str,
    conversations: Sequence[Sequence[Mapping]],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    **template_kwargs: Any,
) -> list[str]:
    """Render each conversation with the template (``continue_final_message`` cuts the text after the final
    message's last text so that generation continues it)."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
    template = compile_template(source)
    context = plain_template_data(template_kwargs)
    tag = "CONTINUE_FINAL_MESSAGE_TAG "
    rendered = []
    for conversation in conversations:
        messages = plain_template_data(list(conversation))
        final_text = None
        if continue_final_message:
            final_text = _tag_final_message(messages, tag)
        text = template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        if final_text is not None:
            if final_text.strip() not in text or tag.strip() not in text:
                raise ValueError("continue_final_message is set but the template does not render the final message")
            cut = text.rindex(tag.strip())
            text = text[:cut] if text[cut:cut + len(tag)] == tag else text[:cut].rstrip()
        rendered.append(text)
    return rendered


def _tag_final_message(messages: list[dict], tag: str) -> str:
    """Append ``tag`` to the last text of the final message; returns that text (before tagging)."""
    if not messages:
        raise ValueError("continue_final_message is set but the conversation is empty")
    content = messages[-1].get("content")
    if isinstance(content, str):
        messages[-1]["content"] = content + tag
        return content
    for item in reversed(content or []):
        if "text" in item:
            text = item["text"]
            item["text"] = text + tag
            return text
    raise ValueError("continue_final_message is set but the final message has no text to continue")


def render_with_generation_spans(source: str, conversation: Sequence[Mapping], **template_kwargs: Any
                                 ) -> tuple[str, list[tuple[int, int]]]:
    """Render one normalized conversation and return ``(text, spans)``: the ``[start, end)`` character spans of
    the text the template's ``{% generation %}`` blocks produced (what transformers turns into
    ``assistant_masks``). No generation prompt is added."""
    template = compile_template(source)
    messages = plain_template_data(list(conversation))
    context = plain_template_data(template_kwargs)
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _GENERATION_TRACKER.set((blocks, spans))
    try:
        for block in template.generate(messages=messages, add_generation_prompt=False, **context):
            blocks.append(block)
    finally:
        _GENERATION_TRACKER.reset(token)
    return "".join(blocks), spans


def single_turn(prompt: str, images: Sequence[Any] = (), video: Any = None) -> list[dict]:
    """One user turn holding the images, then the video, then the text (the chat template's order)."""
    content: list[dict] = [{"type": "image", "image": image} for image in images]
    if video is not None:
        content.append({"type": "video", "video": video})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]
