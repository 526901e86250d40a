"""The train-step benchmark's dry run (benchmarks/bench_train.py --preset tiny): the script works end to end."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_train.py"


def test_bench_train_tiny_dry_run(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(SCRIPT.parent.parent))
    env.pop("XLA_FLAGS", None)  # one device, as a user runs it
    result = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--modes", "full,lora", "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CPU: " in result.stdout and "SIMD: " in result.stdout
    results = json.loads(out.read_text())["runs"]
    for mode in ("full", "lora"):
        for system in ("ov_jax", "transformers"):
            assert results[mode][system]["tokens_per_s"] > 0 and results[mode][system]["peak_rss_gb"] > 0
    # full fine-tuning checkpoints activations on both sides by default; LoRA keeps them
    assert "| full | yes | ov_jax / transformers |" in result.stdout
    assert "| lora | no | ov_jax / transformers |" in result.stdout
