"""The request format of batch inference: one JSON object per line of a jsonl, checked before anything runs.

A request has exactly one of ``prompt`` (text) and ``messages`` (chat turns); with ``prompt``, optionally
``images`` / ``image`` and ``videos`` / ``video``; optionally ``id`` and ``max_new_tokens``
(:func:`check_request` lists the rules). :func:`read_requests` reads and checks a whole file, naming
``file:line`` in every error, so one bad line among millions costs nothing but the error.
"""

from __future__ import annotations

import codecs
import json
import os
from typing import Any, Iterable

from ov_jax.paths import NotUTF8Error, check_file, decode_utf8

Record = dict[str, Any]


class RequestFileError(ValueError):
    """The requests jsonl (or a results file to resume) cannot be processed; the message names the file and line."""


class RequestError(ValueError):
    """One request does not follow the request format (see the module docstring)."""


REQUEST_FIELDS = ("id", "prompt", "messages", "images", "image", "videos", "video", "max_new_tokens")
MEDIA_FIELDS = (("images", "image"), ("videos", "video"))


def id_key(value: Any) -> str:
    """Ids compare by their JSON text, so 1 and "1" stay distinct and any JSON scalar works."""
    return json.dumps(value, sort_keys=True)


def is_integer(value: Any) -> bool:
    """An int that is not a bool (JSON's ``true`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text(value: Any, where: str) -> None:
    """Every string inside ``value`` is encodable text (a JSON escape such as \\udcff is not)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise RequestError(f"{where} holds a lone surrogate escape (\\u{ord(value[err.start]):04x}), which is "
                               "not valid text") from None
    elif isinstance(value, dict):
        for item in value.values():
            _check_text(item, where)
    elif isinstance(value, list):
        for item in value:
            _check_text(item, where)


def check_request(record: Any) -> None:
    """A :class:`RequestError` naming the first way ``record`` breaks the request format, else nothing.

    A request is a JSON object with exactly one of ``prompt`` (non-empty text) and ``messages`` (a non-empty
    list of ``{"role": str, "content": str | list of {"type": str, ...}}``); with ``prompt``, optionally
    ``images`` or ``image`` and ``videos`` or ``video`` (a path or a list of paths); optionally ``id`` (a string
    or an integer) and ``max_new_tokens`` (an integer >= 1). Any other field is an error (a misspelt field
    would otherwise be ignored on every record).
    """
    if not isinstance(record, dict):
        raise RequestError(f"a request must be a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; a request has "
                           f"{', '.join(REQUEST_FIELDS)}")
    if "id" in record and not (isinstance(record["id"], str) or is_integer(record["id"])):
        raise RequestError(f"'id' must be a string or an integer, got {json.dumps(record['id'])}")
    if ("prompt" in record) == ("messages" in record):
        raise RequestError("a request needs exactly one of 'prompt' and 'messages'")
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise RequestError(f"'prompt' must be non-empty text, got {json.dumps(record['prompt'])[:80]}")
        for plural, singular in MEDIA_FIELDS:
            if plural in record and singular in record:
                raise RequestError(f"give '{plural}' or '{singular}', not both")
            value = record.get(plural, record.get(singular, []))
            paths = [value] if isinstance(value, str) else value
            if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
                raise RequestError(f"'{plural if plural in record else singular}' must be a path or a list of "
                                   f"paths, got {json.dumps(value)[:80]}")
    else:
        media = [f for pair in MEDIA_FIELDS for f in pair if f in record]
        if media:
            raise RequestError(f"{', '.join(map(repr, media))} cannot go with 'messages': put the media in the "
                               "messages' content")
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of turns")
        for number, turn in enumerate(messages):
            content = turn.get("content") if isinstance(turn, dict) else None
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not (
                    isinstance(content, str) or isinstance(content, list) and all(
                        isinstance(part, dict) and isinstance(part.get("type"), str) for part in content)):
                raise RequestError(f"messages[{number}] must be {{\"role\": str, \"content\": str or a list of "
                                   "{\"type\": str, ...}}")
    if "max_new_tokens" in record and not (is_integer(record["max_new_tokens"]) and record["max_new_tokens"] >= 1):
        raise RequestError(f"'max_new_tokens' must be an integer >= 1, got {json.dumps(record['max_new_tokens'])}")
    _check_text(record, "the request")


def read_requests(path: str | os.PathLike) -> list[Record]:
    """All requests of a jsonl file (a leading UTF-8 byte-order mark is skipped), each checked
    (:func:`check_request`) and given an ``id`` (default: its 0-based line number). Any problem is a
    :class:`RequestFileError` naming ``file:line``: text that is not UTF-8, a line that is not a JSON object, a
    request that breaks the format, a repeated id, no requests."""
    check_file(path, "requests file")
    records, seen = [], {}
    with open(path, "rb") as f:
        for number, data in enumerate(f):
            where = f"{path}:{number + 1}"
            try:
                line = decode_utf8(data[3:] if number == 0 and data.startswith(codecs.BOM_UTF8) else data, "the line")
            except NotUTF8Error as err:
                raise RequestFileError(f"{where}: {err}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                check_request(record)
            except json.JSONDecodeError as err:
                raise RequestFileError(f"{where}: not valid JSON ({err})") from None
            except RequestError as err:
                raise RequestFileError(f"{where}: {err}") from None
            record.setdefault("id", number)
            key = id_key(record["id"])
            if key in seen:
                raise RequestFileError(f"{where}: id {record['id']!r} repeats line {seen[key]}; ids must be unique "
                                       "for resuming to know what is done")
            seen[key] = number + 1
            records.append(record)
    if not records:
        raise RequestFileError(f"{path}: no requests (the file holds no JSON lines)")
    return records


def check_records(records: Iterable[Record]) -> list[Record]:
    """Already-read requests as a list, each checked (:func:`check_request`), with an ``id``, ids unique; a
    :class:`RequestError` naming the request's position otherwise."""
    records, seen = list(records), {}
    for number, record in enumerate(records):
        try:
            check_request(record)
        except RequestError as err:
            raise RequestError(f"request {number}: {err}") from None
        if "id" not in record:
            raise RequestError(f"request {number} has no 'id' (needed to know what is done when resuming)")
        key = id_key(record["id"])
        if key in seen:
            raise RequestError(f"request {number}: id {record['id']!r} repeats request {seen[key]}")
        seen[key] = number
    return records
