"""The OpenAI chat-completions request, validated on the host before any work (one error names the field).

Accepted: ``model`` (optional; must be the served name when given), ``messages`` (roles ``system`` / ``user`` /
``assistant``; ``content`` a string or a list of ``{"type": "text", "text"}``, ``{"type": "image_url",
"image_url": {"url"}}`` and ``{"type": "video_url", "video_url": {"url"}}`` parts), ``stream``,
``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop`` (a string or
up to 4 strings), ``n`` (1 only). Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

MAX_STOP_STRINGS = 4
ROLES = ("system", "user", "assistant")


class RequestValidationError(ValueError):
    """A request field that cannot be served; ``field`` is its JSON path (e.g. ``messages[0].content``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass
class MediaRef:
    kind: str  # "image" or "video"
    url: str
    field: str  # where it was given, for error messages


@dataclasses.dataclass
class ChatRequest:
    messages: list[dict]  # the chat template's form; media parts hold MediaRef until loaded
    media: list[MediaRef]
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    include_usage: bool = False


def _number(body: dict, name: str, low: float, high: float, integer: bool = False, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestValidationError(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise RequestValidationError(name, f"must be in {bounds}, got {value!r}")
    return value


def _content(content: Any, where: str, media: list[MediaRef]) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise RequestValidationError(where, "must be a string or a non-empty list of content parts")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise RequestValidationError(at, "must be an object with a 'type'")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestValidationError(f"{at}.text", "must be a string")
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "video_url"):
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise RequestValidationError(f"{at}.{kind}.url", "must be a non-empty string")
            media.append(MediaRef(kind[:5], url, f"{at}.{kind}.url"))
            parts.append({"type": kind[:5], "ref": media[-1]})
        else:
            raise RequestValidationError(f"{at}.type", f"must be 'text', 'image_url' or 'video_url', got {kind!r}")
    return parts


def parse_chat_request(body: Any, served_model: str) -> ChatRequest:
    """Validate a decoded JSON body; raises :class:`RequestValidationError` naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestValidationError("body", "must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise RequestValidationError("model", f"this server serves {served_model!r}, got {model!r}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestValidationError("messages", "must be a non-empty list")
    media: list[MediaRef] = []
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestValidationError(f"messages[{i}]", "must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise RequestValidationError(f"messages[{i}].role", f"must be one of {ROLES}, got {role!r}")
        conversation.append({"role": role, "content": _content(message.get("content"), f"messages[{i}].content",
                                                                 media)})
    if body.get("n", 1) != 1:
        raise RequestValidationError("n", f"only n=1 is supported, got {body.get('n')!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestValidationError("stream", f"must be true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestValidationError("stream_options", "must be an object")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif (isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS
          and all(isinstance(s, str) and s for s in stop)):
        stop = tuple(stop)
    else:
        raise RequestValidationError("stop", f"must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                                             f"of them, got {stop!r}")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = _number({name: max_tokens}, name, 1, 2**31 - 1, integer=True)
    seed = _number(body, "seed", -2**63, 2**64 - 1, integer=True)
    return ChatRequest(
        messages=conversation, media=media, stream=stream, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0), top_p=_number(body, "top_p", 0.0, 1.0, low_open=True),
        top_k=_number(body, "top_k", -1, 2**31 - 1, integer=True), seed=seed, stop=stop,
        include_usage=bool(options.get("include_usage", False)))
