"""Resumable jsonl batch inference: interruptions (exceptions, SIGKILL, torn lines) never redo or lose a record."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ov_jax.batch_inference import (RequestFileError, ResultWriter, finished_ids, read_requests, repair_torn_tail,
                                    request_conversation, run_batch_inference)


class Interrupted(BaseException):
    """Stands in for KeyboardInterrupt / preemption (not caught as a per-request error)."""


def _write_requests(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n")
    return path


def _results(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


class FakeModel:
    """Answers each prompt deterministically; records every id it was asked; can stop after N batches."""

    def __init__(self, stop_after_batches=None, fail_ids=()):
        self.seen, self.batches, self.stop_after, self.fail_ids = [], 0, stop_after_batches, set(fail_ids)

    def __call__(self, records):
        if self.stop_after is not None and self.batches == self.stop_after:
            raise Interrupted()
        self.batches += 1
        if any(r["id"] in self.fail_ids for r in records):
            raise ValueError(f"cannot read the image of {[r['id'] for r in records if r['id'] in self.fail_ids]}")
        self.seen += [r["id"] for r in records]
        return [r["prompt"].upper() for r in records]


def test_resume_after_interruption_neither_redoes_nor_loses(tmp_path):
    requests, results = _write_requests(tmp_path / "in.jsonl", 10), tmp_path / "out.jsonl"
    first = FakeModel(stop_after_batches=2)
    with pytest.raises(Interrupted):
        run_batch_inference(requests, results, first, batch_size=3)
    assert first.seen == [f"q{i}" for i in range(6)]
    assert [r["id"] for r in _results(results)] == first.seen  # written as they came, before the interruption

    second = FakeModel()
    summary = run_batch_inference(requests, results, second, batch_size=3)
    assert second.seen == [f"q{i}" for i in range(6, 10)]  # nothing redone
    assert (summary.total, summary.already_done, summary.answered, summary.failed) == (10, 6, 4, 0)
    out = _results(results)
    assert [r["id"] for r in out] == [f"q{i}" for i in range(10)]  # nothing lost, nothing twice
    assert out[7] == {"id": "q7", "answer": "QUESTION 7"}

    third = FakeModel()
    assert run_batch_inference(requests, results, third).answered == 0 and third.seen == []


def test_torn_last_line_is_dropped_and_its_record_redone(tmp_path):
    requests, results = _write_requests(tmp_path / "in.jsonl", 5), tmp_path / "out.jsonl"
    with pytest.raises(Interrupted):
        run_batch_inference(requests, results, FakeModel(stop_after_batches=3), batch_size=1)
    with open(results, "ab") as f:  # a crash in the middle of writing q3's line
        f.write(b'{"id": "q3", "answer": "QUES')
    model = FakeModel()
    run_batch_inference(requests, results, model, batch_size=2)
    assert model.seen == ["q3", "q4"]
    assert [r["id"] for r in _results(results)] == ["q0", "q1", "q2", "q3", "q4"]


def test_sigkill_mid_run_then_resume(tmp_path):
    """A real kill -9 while a subprocess is answering; the resumed run completes the file exactly once per id."""
    n = 40
    requests, results = _write_requests(tmp_path / "in.jsonl", n), tmp_path / "out.jsonl"
    script = textwrap.dedent(f"""
        import time
        from ov_jax.batch_inference import run_batch_inference
        def slow(records):
            time.sleep(0.05)
            return [r["prompt"].upper() for r in records]
        run_batch_inference({str(requests)!r}, {str(results)!r}, slow, batch_size=2)
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and (not results.exists() or len(results.read_bytes().splitlines()) < 6):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [r["id"] for r in _results_tolerant(results)]
    assert 6 <= len(before) < n, "the kill must land mid-run"

    model = FakeModel()
    run_batch_inference(requests, results, model, batch_size=4)
    assert set(model.seen).isdisjoint(before)
    assert [r["id"] for r in _results(results)] == [f"q{i}" for i in range(n)]


def _results_tolerant(path):
    lines = path.read_bytes().split(b"\n")
    return [json.loads(line) for line in lines[:-1]]  # the last piece is empty or torn


def test_a_failing_request_is_recorded_and_not_retried_unless_asked(tmp_path):
    requests, results = _write_requests(tmp_path / "in.jsonl", 6), tmp_path / "out.jsonl"
    summary = run_batch_inference(requests, results, FakeModel(fail_ids={"q4"}), batch_size=3)
    assert (summary.answered, summary.failed) == (5, 1)
    out = {r["id"]: r for r in _results(results)}
    assert out["q4"]["error"].startswith("ValueError: cannot read the image of ['q4']")
    assert out["q3"]["answer"] == "QUESTION 3" and out["q5"]["answer"] == "QUESTION 5"

    again = FakeModel()
    run_batch_inference(requests, results, again)
    assert again.seen == []
    run_batch_inference(requests, results, again, retry_errors=True)
    assert again.seen == ["q4"]
    assert finished_ids(results) == {json.dumps(f"q{i}") for i in range(6)}

    with pytest.raises(ValueError, match="cannot read the image"):
        run_batch_inference(requests, tmp_path / "strict.jsonl", FakeModel(fail_ids={"q1"}), on_error="raise")


def test_bad_request_files_are_clear_errors(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    with pytest.raises(RequestFileError, match=r"in.jsonl:2: id 1 repeats line 1"):
        read_requests(path)
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(RequestFileError, match=r"in.jsonl:3: not valid JSON"):
        read_requests(path)
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert [r["id"] for r in read_requests(path)] == [0, 2]  # default id: the line number
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run_batch_inference(path, tmp_path / "o.jsonl", FakeModel(), batch_size=0)


def test_writer_appends_whole_lines_and_repairs_only_a_torn_tail(tmp_path):
    path = tmp_path / "out.jsonl"
    with ResultWriter(path) as writer:
        writer.write({"id": 1, "answer": "ünïcode"})
    assert repair_torn_tail(path) == 0
    with open(path, "ab") as f:
        f.write(b'{"id": 2, "ans')
    assert repair_torn_tail(path) == len(b'{"id": 2, "ans')
    assert _results(path) == [{"id": 1, "answer": "ünïcode"}]
    path.write_bytes(b'{"id": 3')  # a torn first line leaves an empty file
    assert repair_torn_tail(path) == 8 and path.read_bytes() == b""


def test_request_conversation_builds_one_user_turn(tmp_path):
    conv = request_conversation({"id": 0, "prompt": "Compare.", "images": ["a.jpg", "b.png"], "video": "v.mp4"},
                                media_root=tmp_path)
    assert conv == [{"role": "user", "content": [
        {"type": "image", "path": str(tmp_path / "a.jpg")}, {"type": "image", "path": str(tmp_path / "b.png")},
        {"type": "video", "path": str(tmp_path / "v.mp4")}, {"type": "text", "text": "Compare."}]}]
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert request_conversation({"messages": messages}) is messages
    with pytest.raises(ValueError, match="neither 'messages' nor a string 'prompt'"):
        request_conversation({"id": 5})


# --- the real thing: processor + model.generate on a tiny checkpoint -------------------------------------------


def test_real_model_batch_answers_match_single_requests_and_resume(tiny_ckpt, tmp_path):
    from PIL import Image

    from ov_jax.batch_inference import make_generate_fn

    engine = pytest.importorskip("ov_jax.engine")
    from ov_jax.model import LlavaOnevision
    from ov_jax.processing.processor import LlavaOnevisionProcessor

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    requests = [
        {"id": "img", "prompt": "What is shown in this image?", "images": ["cat.png"], "max_new_tokens": 6},
        {"id": "txt", "prompt": "Describe the video in detail."},
        {"id": "short", "prompt": "How many objects are there?", "max_new_tokens": 3},
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    processor = LlavaOnevisionProcessor.from_pretrained(tiny_ckpt)
    model = LlavaOnevision.from_pretrained(tiny_ckpt)
    engine.engine_for(model, engine.Buckets(batch=(1, 2), prompt=(64, 2048), cache=(2112,)))
    infer = make_generate_fn(model, processor, max_new_tokens=8, media_root=tmp_path)

    singles = [infer([r])[0] for r in requests]
    assert len(singles[1].split()) > 1 and singles[0] != singles[1]

    results = tmp_path / "answers.jsonl"
    calls = []

    def interrupt_after_first_batch(records):
        if calls:
            raise Interrupted()
        calls.append(len(records))
        return infer(records)

    with pytest.raises(Interrupted):
        run_batch_inference(path, results, interrupt_after_first_batch, batch_size=2)
    summary = run_batch_inference(path, results, infer, batch_size=2)
    assert (summary.already_done, summary.answered) == (2, 1)
    assert _results(results) == [{"id": r["id"], "answer": a} for r, a in zip(requests, singles)]
