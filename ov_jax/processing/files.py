"""Read a checkpoint's processor files in either layout transformers writes.

Hub checkpoints (written by transformers 4.4x) keep separate ``preprocessor_config.json``,
``video_preprocessor_config.json``, ``processor_config.json`` and ``chat_template.json``; transformers 5.x
``save_pretrained`` writes one ``processor_config.json`` with nested ``image_processor`` /
``video_processor`` sections and a ``chat_template.jinja``. The lookup order below is transformers'.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from ov_jax.hub import checkpoint_file
from ov_jax.paths import decode_utf8

PROCESSOR_FILE = "processor_config.json"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"
CHAT_TEMPLATE_JSON = "chat_template.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "chat_templates"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# What from_pretrained fetches from the Hub (no weights).
PROCESSOR_FILE_PATTERNS = ("*.json", "*.jinja", f"{CHAT_TEMPLATE_DIR}/*.jinja")


@dataclasses.dataclass
class ProcessorFiles:
    """The parsed configuration of a checkpoint's processor."""

    processor: dict[str, Any]  # top-level processor fields (num_image_tokens, vision_aspect_ratio, ...)
    image_processor: dict[str, Any]
    video_processor: dict[str, Any]
    tokenizer_config: dict[str, Any]
    chat_template: str | dict[str, str] | None
    # The file each template came from, for error messages ("default" for a single template).
    chat_template_files: dict[str, str] = dataclasses.field(default_factory=dict)


def read_json(directory: str | pathlib.Path, name: str) -> dict[str, Any] | None:
    """The JSON object in the checkpoint file ``name``, or None when there is none; a file that is not UTF-8, not
    JSON or not an object is a ``ValueError`` naming it."""
    path = checkpoint_file(directory, name)
    if not path.is_file():
        return None
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_text(path: pathlib.Path) -> str:
    """A checkpoint text file; invalid UTF-8 is a ``ValueError`` naming the file."""
    return decode_utf8(path.read_bytes(), str(path))


def _chat_template(value: Any, origin: pathlib.Path) -> str | dict[str, str] | None:
    """A file's ``chat_template`` field: a string, a ``{name: template}`` object or a list of
    ``{"name", "template"}`` entries; anything else is a ``ValueError`` naming ``origin``."""
    if isinstance(value, list) and all(isinstance(e, dict) and {"name", "template"} <= set(e) for e in value):
        value = {entry["name"]: entry["template"] for entry in value}
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    raise ValueError(f"{origin}: chat_template must be a string, an object of named template strings or a list of "
                     f"{{'name', 'template'}} entries, got {json.dumps(value)[:80]}")


def _section(data: dict[str, Any], name: str, origin: pathlib.Path) -> dict[str, Any] | None:
    """``data[name]`` removed from ``data``: a JSON object or absent; anything else names ``origin``."""
    value = data.pop(name, None)
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{origin}: {name!r} must be a JSON object, got {type(value).__name__}")
    return value


def read_processor_files(directory: str | pathlib.Path) -> ProcessorFiles:
    """Parse every processor file in ``directory`` (nested sections take priority over separate files)."""
    directory = pathlib.Path(directory)
    processor = read_json(directory, PROCESSOR_FILE) or {}
    image_file = read_json(directory, IMAGE_PROCESSOR_FILE)
    video_file = read_json(directory, VIDEO_PROCESSOR_FILE)
    image_processor = _section(processor, "image_processor", directory / PROCESSOR_FILE) or image_file
    if image_processor is None:
        raise FileNotFoundError(
            f"{directory} has no image processor configuration: expected {IMAGE_PROCESSOR_FILE} or an "
            f"'image_processor' section in {PROCESSOR_FILE}"
        )
    # transformers falls back to the image processor file for the video processor.
    video_processor = (_section(processor, "video_processor", directory / PROCESSOR_FILE) or video_file or image_file
                       or image_processor)
    tokenizer_config = read_json(directory, TOKENIZER_CONFIG_FILE) or {}

    chat_template: str | dict[str, str] | None = processor.pop("chat_template", None)
    origin = directory / PROCESSOR_FILE
    files: dict[str, pathlib.Path] = {}
    if chat_template is None:
        template_json = read_json(directory, CHAT_TEMPLATE_JSON)
        files = {p.stem: checkpoint_file(directory, f"{CHAT_TEMPLATE_DIR}/{p.name}")
                 for p in sorted(checkpoint_file(directory, CHAT_TEMPLATE_DIR).glob("*.jinja"))}
        named = {name: read_text(path) for name, path in files.items()}
        if template_json is not None:
            chat_template, origin = template_json.get("chat_template"), directory / CHAT_TEMPLATE_JSON
        else:
            if checkpoint_file(directory, CHAT_TEMPLATE_JINJA).is_file():
                files["default"] = checkpoint_file(directory, CHAT_TEMPLATE_JINJA)
                named["default"] = read_text(files["default"])
            chat_template = (named["default"] if list(named) == ["default"] else named) or None
    if chat_template is None:
        chat_template = tokenizer_config.get("chat_template")
        origin, files = directory / TOKENIZER_CONFIG_FILE, {}
    chat_template = _chat_template(chat_template, origin)
    names = list(chat_template) if isinstance(chat_template, dict) else ["default"]
    template_files = {name: str(files.get(name, origin)) for name in names}
    return ProcessorFiles(processor, dict(image_processor), dict(video_processor), tokenizer_config, chat_template,
                          template_files)
