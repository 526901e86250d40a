"""Hostile chat templates are bounded (time, output, memory) and every template failure is a ChatTemplateError
naming the template file; text that is not valid Unicode is a clear error."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from ov_jax.processing import LlavaOnevisionProcessor, chat, template_sandbox
from ov_jax.processing.chat import ChatTemplateError, InvalidTextError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELLO = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
OUTPUT_BOMB = "{% for i in range(100000) %}{% for j in range(100000) %}0123456789{% endfor %}{% endfor %}"


@pytest.fixture()
def checkpoint_with_template(tiny_ckpt, tmp_path):
    """A copy of the tiny checkpoint (about 1 MB) with the given chat template."""

    def make(template: str | bytes):
        folder = tmp_path / "ckpt"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(tiny_ckpt, folder)
        (folder / "chat_template.jinja").write_bytes(template if isinstance(template, bytes) else template.encode())
        return folder

    return make


def test_nested_loops_are_stopped_by_the_time_bound(checkpoint_with_template, monkeypatch):
    processor = LlavaOnevisionProcessor.from_pretrained(checkpoint_with_template(NESTED_LOOPS))
    monkeypatch.setattr(template_sandbox, "RENDER_TIMEOUT_S", 1.0)
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=r"chat_template.jinja' took longer than 1 s to render"):
        processor.apply_chat_template(HELLO)
    assert time.monotonic() - start < 10
    assert processor.apply_chat_template(HELLO, chat_template="{{ messages[0].role }}") == "user"  # recovered


@pytest.mark.parametrize("template, message", [
    (OUTPUT_BOMB, "renders more than 4,000,000 characters"),
    ("{{ 'x' * 10 ** 10 }}", "needs more than 2048 MiB of memory"),
    ("{{ ''.__class__.__mro__ }}", "is refused by the sandbox"),
    ("{{ messages.append(1) }}", "is refused by the sandbox: access to attribute 'append'"),
    ("{% for m in messages %}{{ m.role }", "does not parse"),
    ("{{ raise_exception('Conversation roles must alternate') }}", "raised an error: Conversation roles must alternate"),
    ("{{ messages[0].content | length + 'x' }}", "failed while rendering: TypeError"),
    ("{{ range(10 ** 6) | list }}", "failed while rendering: OverflowError"),
])
def test_template_failures_name_the_file(checkpoint_with_template, template, message):
    folder = checkpoint_with_template(template)
    processor = LlavaOnevisionProcessor.from_pretrained(folder)
    with pytest.raises(ChatTemplateError, match=f"chat template '{folder}/chat_template.jinja' {message}"):
        processor.apply_chat_template(HELLO, add_generation_prompt=True)
    assert issubclass(ChatTemplateError, ValueError)


def test_output_bound_is_configurable():
    template = "{% for i in range(50) %}ab{% endfor %}"
    assert chat.render_conversations(template, [HELLO], max_chars=100) == ["ab" * 50]
    with pytest.raises(ChatTemplateError, match="more than 99 characters"):
        chat.render_conversations(template, [HELLO], max_chars=99)


def test_template_file_that_is_not_utf8(checkpoint_with_template):
    folder = checkpoint_with_template(b"{{ messages }}\xff\xfe")
    with pytest.raises(ValueError, match="chat_template.jinja is not valid UTF-8"):
        LlavaOnevisionProcessor.from_pretrained(folder)


def test_text_that_is_not_valid_unicode(tiny_ckpt):
    processor = LlavaOnevisionProcessor.from_pretrained(tiny_ckpt)
    cases = [
        ([{"role": "user", "content": "bad \udc80 surrogate"}], r"message 0 content is not valid text: surrogates"),
        ([{"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "\ud800"}]}],
         r"message 0 content item 1\['text'\] is not valid text"),
        ([{"role": "user", "content": [{"type": "text", "text": b"bytes"}]}],
         r"message 0 content item 0\['text'\] is bytes, not text"),
        ([{"role": "user\udcff", "content": "hi"}], r"message 0\['role'\] is not valid text"),
        ([[{"role": "user", "content": "fine"}], [{"role": "user", "content": b"raw"}]],
         r"conversation 1 message 0 content is bytes"),
    ]
    for conversation, message in cases:
        with pytest.raises(InvalidTextError, match=message):
            processor.apply_chat_template(conversation)
    with pytest.raises(InvalidTextError, match=r"text\[1\] is not valid text"):
        processor(text=["fine", "lone \udc80"])
    with pytest.raises(InvalidTextError, match="a chat template argument"):
        processor.apply_chat_template(HELLO, chat_template="{{ extra }}", extra="\udc80")


def test_cli_reports_a_hostile_template_in_one_line(checkpoint_with_template):
    folder = checkpoint_with_template(OUTPUT_BOMB)
    result = subprocess.run([sys.executable, "-m", "ov_jax.cli", "generate", "--model", str(folder), "--prompt", "hi",
                             "--max-new-tokens", "1"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: chat template ") and "chat_template.jinja' renders more than" in lines[-1]
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
