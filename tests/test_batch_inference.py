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

from ov_jax.batch_inference import (OutputFileError, ResultWriter, finished_ids, repair_torn_tail, request_conversation,
                                    run_batch_inference)
from ov_jax.batch_requests import RequestError, RequestFileError, read_requests


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
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"id": "1", "prompt": "b"}\r\n{"id": 1, "prompt": "c"}\r\n')
    assert [(r["id"], r["prompt"]) for r in read_requests(path)] == [(0, "a"), ("1", "b"), (1, "c")]  # BOM, CRLF
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run_batch_inference(path, tmp_path / "o.jsonl", FakeModel(), batch_size=0)


BAD_REQUEST_FILES = [  # (file bytes, where and what the error says)
    (b'{"prompt": "a"}\n\xff\xfe\n', r"in.jsonl:2: the line is not valid UTF-8 text \(byte 0xff at offset 0"),
    (b'{"prompt": "a"}\n["b"]\n', r"in.jsonl:2: a request must be a JSON object, got list"),
    (b'{"prompt": "a", "max_tokens": 5}\n', r"in.jsonl:1: unknown field\(s\) 'max_tokens'"),
    (b'{"prompt": "a", "img": "x.jpg"}\n', r"in.jsonl:1: unknown field\(s\) 'img'"),
    (b'{"id": "x"}\n', r"in.jsonl:1: a request needs exactly one of 'prompt' and 'messages'"),
    (b'{"prompt": "a", "messages": [{"role": "user", "content": "a"}]}\n', "exactly one of 'prompt' and 'messages'"),
    (b'{"prompt": 5}\n', r"in.jsonl:1: 'prompt' must be non-empty text, got 5"),
    (b'{"prompt": "  "}\n', r"'prompt' must be non-empty text"),
    (b'{"prompt": "a \\udcff"}\n', r"in.jsonl:1: the request holds a lone surrogate escape \(\\udcff\)"),
    (b'{"prompt": "a", "image": "x.jpg", "images": ["y.jpg"]}\n', r"give 'images' or 'image', not both"),
    (b'{"prompt": "a", "images": [1]}\n', r"'images' must be a path or a list of paths, got \[1\]"),
    (b'{"prompt": "a", "video": {"path": "v.mp4"}}\n', r"'video' must be a path or a list of paths"),
    (b'{"prompt": "a", "max_new_tokens": 0}\n', r"in.jsonl:1: 'max_new_tokens' must be an integer >= 1, got 0"),
    (b'{"prompt": "a", "max_new_tokens": "64"}\n', r"'max_new_tokens' must be an integer >= 1, got \"64\""),
    (b'{"prompt": "a", "max_new_tokens": true}\n', r"'max_new_tokens' must be an integer >= 1, got true"),
    (b'{"prompt": "a", "id": null}\n', r"in.jsonl:1: 'id' must be a string or an integer, got null"),
    (b'{"prompt": "a", "id": 1.5}\n', r"'id' must be a string or an integer, got 1.5"),
    (b'{"messages": []}\n', r"'messages' must be a non-empty list of turns"),
    (b'{"messages": [{"role": "user"}]}\n', r"messages\[0\] must be"),
    (b'{"messages": [{"role": "user", "content": [{"text": "a"}]}]}\n', r"messages\[0\] must be"),
    (b'{"messages": [{"role": "user", "content": "a"}], "images": ["x.jpg"]}\n', r"'images' cannot go with 'messages'"),
    (b'{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', r"in.jsonl:2: id 1 repeats line 1"),
    (b'\n\n', r"in.jsonl: no requests"),
]


@pytest.mark.parametrize("content, message", BAD_REQUEST_FILES)
def test_every_request_is_checked_before_anything_runs_or_is_written(tmp_path, content, message):
    """The whole file is read and checked first: a bad line anywhere costs nothing, and the error names its line."""
    path, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    path.write_bytes(content)
    model = FakeModel()
    with pytest.raises(RequestFileError, match=message):
        run_batch_inference(path, results, model)
    assert model.seen == [] and model.batches == 0 and not results.exists()


def test_already_read_records_are_checked_too(tmp_path):
    results = tmp_path / "out.jsonl"
    with pytest.raises(RequestError, match="request 1 has no 'id'"):
        run_batch_inference([{"id": "a", "prompt": "x"}, {"prompt": "y"}], results, FakeModel())
    with pytest.raises(RequestError, match="request 1: id 'a' repeats request 0"):
        run_batch_inference([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], results, FakeModel())
    with pytest.raises(RequestError, match="request 0: 'max_new_tokens' must be an integer >= 1"):
        run_batch_inference([{"id": "a", "prompt": "x", "max_new_tokens": -3}], results, FakeModel())
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run_batch_inference([{"id": "a", "prompt": "x"}], results, FakeModel(), batch_size=1.5)
    assert not results.exists()


def test_output_paths_that_cannot_hold_results_are_refused(tmp_path):
    """The requests file itself (by name, symlink or hard link), a directory, a device, a loop, a path under a
    file, and an existing file that is not a results file: refused before any request runs, nothing changed."""
    requests = _write_requests(tmp_path / "in.jsonl", 3)
    original = requests.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(requests)
    os.link(requests, tmp_path / "hard.jsonl")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    (tmp_path / "outdir").mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"keep me\nand me")  # no final newline: must not be "repaired"
    results_like = tmp_path / "old.jsonl"
    results_like.write_bytes(b'{"id": "q0", "answer": "A"}\nnot a torn results line')
    other_requests = tmp_path / "other.jsonl"
    other_requests.write_bytes(b'{"id": "q0", "prompt": "another question"}\n')  # would skip q0 as done
    cases = [(requests, "is the requests file"), (tmp_path / "link.jsonl", "is the requests file"),
             (tmp_path / "hard.jsonl", "is the requests file"), (tmp_path / "outdir", "is a directory"),
             ("/dev/null", "is not a regular file"), (tmp_path / "loop_a", "is a symlink loop"),
             (notes / "out.jsonl", "a component of it is a file"),
             (notes, r"notes.txt:1: results line is not a JSON object"),
             (results_like, "old.jsonl: its last line is not a results line"),
             (other_requests, "other.jsonl:1: this is a request, not a result")]
    for output, message in cases:
        model = FakeModel()
        with pytest.raises((OutputFileError, RequestFileError), match=message):
            run_batch_inference(requests, output, model)
        assert model.batches == 0
    assert requests.read_bytes() == original and notes.read_bytes() == b"keep me\nand me"
    assert results_like.read_bytes().endswith(b"not a torn results line")
    assert other_requests.read_bytes() == b'{"id": "q0", "prompt": "another question"}\n'


def test_a_finished_dataset_is_not_run_again_and_loads_no_model(tmp_path):
    """The CLI path (run_from_args): every id already answered, so the summary comes back without loading the
    model (here a checkpoint that does not exist) and the results file is untouched."""
    import argparse

    from ov_jax.batch_inference import add_arguments, run_from_args

    requests, results = _write_requests(tmp_path / "in.jsonl", 3), tmp_path / "out.jsonl"
    run_batch_inference(requests, results, FakeModel())
    before = results.read_bytes()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "no-model"), "--input", str(requests), "--output",
                              str(results)])
    summary = run_from_args(args)
    assert (summary.total, summary.already_done, summary.answered, summary.failed) == (3, 3, 0, 0)
    assert results.read_bytes() == before


def test_module_entry_point_reports_bad_input_in_one_line(tmp_path):
    """``python -m ov_jax.batch_inference`` (the pod recipes' form): a bad flag is one line, nothing written."""
    requests = _write_requests(tmp_path / "in.jsonl", 2)
    result = subprocess.run([sys.executable, "-m", "ov_jax.batch_inference", "--model", str(tmp_path), "--input",
                             str(requests), "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "0"],
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stderr) == (2, "error: --max-new-tokens must be >= 1, got 0\n")
    assert not (tmp_path / "out.jsonl").exists()


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
