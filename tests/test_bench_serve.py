"""`benchmarks/bench_serve.py --preset tiny --dry-run` runs end to end and reports every row and the stalls."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_bench_serve_dry_run(tmp_path):
    out = tmp_path / "serve.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--preset", "tiny",
                             "--dry-run", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| sequential generate |" in result.stdout and "video prompt is prefilled" in result.stdout
    numbers = json.loads(out.read_text())
    assert [r["clients"] for r in numbers["rows"]] == [1, 2, "sequential generate"]
    assert all(r["tokens"] > 0 and r["tok_s"] > 0 and r["ttft_p95"] >= r["ttft_p50"] > 0 for r in numbers["rows"])
    stall = numbers["stall"]
    assert stall["decode_gap_s_video_prefill"] > 0 and stall["video_prompt_tokens"] > 1000
    assert "text prompt is prefilled in 512-slot chunks" in result.stdout
    assert stall["decode_gap_s_text_prefill"] > 0 and stall["decode_gap_s_text_prefill_one_call"] > 0
    assert stall["text_prompt_tokens"] > 2 * stall["prefill_chunk"]
