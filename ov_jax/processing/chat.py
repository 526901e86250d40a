"""Chat-template rendering with jinja2, matching transformers' ``apply_chat_template`` environment.

Templates run in transformers' environment in a worker process with bounded time, memory and output
(:mod:`.template_sandbox`); every template failure is a :class:`ChatTemplateError` naming the template file.
Conversations are normalised the way transformers does (batched or not, ``None`` values dropped, OpenAI
``image_url`` items turned into ``image`` items), text must be valid Unicode (``str`` that encodes as UTF-8: no
``bytes``, no lone surrogates; :class:`InvalidTextError` otherwise), and everything the template sees is reduced
to plain JSON data, so media objects never reach the sandbox.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from ov_jax.processing import template_sandbox
from ov_jax.processing.template_sandbox import ChatTemplateError

CONTENT_TYPES = ("text", "image", "video")
IMAGE_KEYS = ("image", "url", "path", "base64")  # where transformers looks for an image item's data, in order
VIDEO_KEYS = ("video", "url", "path")


def template_variables(source: str, origin: str = "(given as a string)") -> frozenset[str]:
    """Names a template reads from its context (to tell template kwargs from processor kwargs)."""
    return template_sandbox.template_variables(source, origin=origin)


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


class InvalidTextError(ValueError):
    """Text that is not valid Unicode: ``bytes``, or a ``str`` with lone surrogates (not encodable as UTF-8)."""


def check_text(value: Any, where: str) -> None:
    """Raise :class:`InvalidTextError` naming ``where`` if ``value`` (or anything nested in it) is ``bytes`` or a
    ``str`` that is not valid UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidTextError(f"{where} is not valid text: {err.reason} at position {err.start} "
                                   f"({value[max(0, err.start - 20):err.start + 1]!r})") from None
    elif isinstance(value, (bytes, bytearray)):
        raise InvalidTextError(f"{where} is bytes, not text; decode it first (e.g. data.decode('utf-8'))")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_text(key, where)
            check_text(item, f"{where}[{key!r}]" if isinstance(key, str) and key.isprintable() else where)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_text(item, f"{where}[{index}]")


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
        for number, message in enumerate(normalized[-1]):
            where = f"conversation {index} message {number}" if is_batched else f"message {number}"
            check_text({k: v for k, v in message.items() if k != "content"}, where)
            content = message.get("content")
            if isinstance(content, list):
                for item_number, item in enumerate(content):
                    check_text({k: v for k, v in item.items() if k in ("type", "text")},
                               f"{where} content item {item_number}")
            else:
                check_text(content, f"{where} content")
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
    origin: str = "(given as a string)",
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    timeout_s: float | None = None,
    max_chars: int | None = None,
    **template_kwargs: Any,
) -> list[str]:
    """Render each conversation with the template (``continue_final_message`` cuts the text after the final
    message's last text so that generation continues it). ``origin`` names the template in errors; the bounds
    (``timeout_s`` for all conversations together, ``max_chars`` per text) are :func:`.template_sandbox.render`'s.
    Raises :class:`ChatTemplateError`, :class:`InvalidTextError` or ``ValueError``."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
    context = plain_template_data(template_kwargs)
    check_text(context, "a chat template argument")
    tag = "CONTINUE_FINAL_MESSAGE_TAG "
    contexts, final_texts = [], []
    for conversation in conversations:
        messages = plain_template_data(list(conversation))
        final_texts.append(_tag_final_message(messages, tag) if continue_final_message else None)
        contexts.append({"messages": messages, "add_generation_prompt": add_generation_prompt, **context})
    rendered = []
    for text, final_text in zip(template_sandbox.render(source, contexts, origin=origin, timeout_s=timeout_s,
                                                        max_chars=max_chars), final_texts):
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


def single_turn(prompt: str, images: Sequence[Any] = (), video: Any = None) -> list[dict]:
    """One user turn holding the images, then the video, then the text (the chat template's order)."""
    content: list[dict] = [{"type": "image", "image": image} for image in images]
    if video is not None:
        content.append({"type": "video", "video": video})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def render_with_generation_spans(source: str, conversation: Sequence[Mapping], *, origin: str = "(given as a string)",
                                 **template_kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
    """Render one normalized conversation (no generation prompt) and return ``(text, spans)``: the ``[start,
    end)`` character spans of the text the template's ``{% generation %}`` blocks produced, which transformers'
    ``return_assistant_tokens_mask`` turns into assistant masks. Errors as :func:`render_conversations`."""
    context = plain_template_data(template_kwargs)
    check_text(context, "a chat template argument")
    context = {"messages": plain_template_data(list(conversation)), "add_generation_prompt": False, **context}
    ((text, spans),) = template_sandbox.render_with_spans(source, [context], origin=origin)
    return text, spans
