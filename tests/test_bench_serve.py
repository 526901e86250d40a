"""`benchmarks/bench_serve.py --preset tiny --dry-run` runs end to end and reports every row, the transformers serve
leg (its rows, or why a request kind or the whole server did not run) and the stalls; the 0.5B preset's tokenizer
decodes every id of the large vocab without changing how text encodes."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")

REPO = pathlib.Path(__file__).resolve().parents[1]
KINDS = {"text", "image", "video"}


@pytest.fixture
def bench_serve(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_serve

    return bench_serve


def test_bench_serve_dry_run(tmp_path):
    out = tmp_path / "serve.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--preset", "tiny",
                             "--dry-run", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| sequential generate | 1 | 3 | text,image,video |" in result.stdout
    assert "video prompt is prefilled" in result.stdout and "SIMD:" in result.stdout
    numbers = json.loads(out.read_text())
    rows = numbers["rows"]
    ours = [r for r in rows if r["system"] == "ov-jax serve"]
    assert [r["clients"] for r in ours] == [1, 2] and all(r["kinds"] == "text,image,video" for r in ours)
    assert all(r["tokens"] > 0 and r["tok_s"] > 0 and r["ttft_p95"] >= r["ttft_p50"] > 0 for r in rows)
    assert numbers["prompt_tokens"]["image"] > 1000 and numbers["prompt_tokens"]["video"] > 2 * 196
    # transformers serve: rows for what it answered, and a note naming each kind (or the server) that did not run
    theirs = [r for r in rows if r["system"] == "transformers serve"]
    notes = [n for n in numbers["notes"] if n.startswith("transformers serve")]
    if not theirs:
        assert any("not run" in n and "its log" in n for n in notes), numbers["notes"]
    else:
        assert [r["clients"] for r in theirs] == [1, 2]
        ran = set(theirs[0]["kinds"].split(","))
        assert all(any(f"{kind} requests not run" in n for n in notes) for kind in KINDS - ran), notes
        assert any("continuous batching" in n for n in notes)  # VLMs fall back to sequential generation
    stall = numbers["stall"]
    assert stall["decode_gap_s_video_prefill"] > 0 and stall["video_prompt_tokens"] > 1000
    assert "text prompt is prefilled in 512-slot chunks" in result.stdout
    assert stall["decode_gap_s_text_prefill"] > 0 and stall["decode_gap_s_text_prefill_one_call"] > 0
    assert stall["text_prompt_tokens"] > 2 * stall["prefill_chunk"]


def test_fill_vocab_decodes_every_id_and_keeps_encoding(bench_serve, tiny_ckpt, tmp_path):
    from tokenizers import Tokenizer

    path = tmp_path / "tokenizer.json"
    shutil.copy(tiny_ckpt / "tokenizer.json", path)
    before = Tokenizer.from_file(str(path))
    bench_serve.fill_vocab(path, 5000)
    after = Tokenizer.from_file(str(path))
    assert after.get_vocab_size() == 5000 > before.get_vocab_size()
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
    assert [after.token_to_id(t) for t in specials] == [before.token_to_id(t) for t in specials]
    assert after.decode([4999, 1000]) == " w4999 w1000"
    text = "<|im_start|>user\n<image>\n<video>\nDescribe item 3. Café 你好<|im_end|>\n"
    assert after.encode(text).ids == before.encode(text).ids
