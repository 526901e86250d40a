"""Conversion to orbax: bit-identical round trips, atomic output, streaming memory."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from loading_helpers import assert_trees_equal, mesh_shardings
from ov_jax import checkpoint, loading
from ov_jax.checkpoint import convert, is_orbax_checkpoint, load_orbax, save_orbax
from ov_jax.loading import CheckpointError, load_params

REPO = Path(__file__).resolve().parents[1]
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
              "processor_config.json", "video_preprocessor_config.json", "generation_config.json")


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything a conversion into ``parent / name`` left beside it (temporaries, orbax partial saves)."""
    return sorted(p.name for p in parent.iterdir() if name in p.name and p.name != name)


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_ckpt_tied"])
def test_round_trip_is_bit_identical_and_the_directory_is_complete(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    report = convert(src, tmp_path / "out", progress=False)
    assert report.destination == tmp_path / "out" and report.leaves == (40 if fixture == "tiny_ckpt_tied" else 41)
    assert is_orbax_checkpoint(tmp_path / "out") and not is_orbax_checkpoint(src)
    want_config, want = load_params(src)
    config, params = load_orbax(tmp_path / "out")
    assert config == want_config.replace(dtype="float32")
    assert_trees_equal(params, want)
    for name in SIDE_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (Path(src) / name).read_bytes()
    assert not list((tmp_path / "out").glob("*.safetensors"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "llava_onevision" and written["ov_jax"]["text"]["hidden_size"] == 64
    assert leftovers(tmp_path, "out") == []


def test_converted_dtype_and_load_dtype(tiny_ckpt, tmp_path):
    convert(tiny_ckpt, tmp_path / "bf16", "bfloat16", progress=False)
    assert load_orbax(tmp_path / "bf16")[0].dtype == "bfloat16"
    _, stored = load_orbax(tmp_path / "bf16", dtype="bfloat16")
    assert_trees_equal(stored, load_params(tiny_ckpt, dtype="bfloat16")[1])
    _, widened = load_orbax(tmp_path / "bf16")  # default float32: exact widening of the stored bf16
    assert_trees_equal(widened, jax.tree.map(lambda x: np.asarray(x).astype(np.float32), stored))
    convert(tiny_ckpt, tmp_path / "f32", progress=False)
    _, cast_on_restore = load_orbax(tmp_path / "f32", dtype="bfloat16")  # orbax casts like ml_dtypes/torch
    assert_trees_equal(cast_on_restore, stored)


def test_load_orbax_into_shardings(tiny_ckpt, tmp_path):
    convert(tiny_ckpt, tmp_path / "out", progress=False)
    config = loading.checkpoint_config(tiny_ckpt)
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"))
    shardings = mesh_shardings(config, mesh)
    _, params = load_orbax(tmp_path / "out", shardings=shardings)
    assert params["text"]["layers"]["q"]["kernel"].sharding == shardings["text"]["layers"]["q"]["kernel"]
    assert params["text"]["layers"]["q"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert_trees_equal(params, load_params(tiny_ckpt)[1])


def test_refuses_an_existing_destination_unless_overwrite(tiny_ckpt, tiny_ckpt_tied, tmp_path):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "keep.txt").write_text("user data")
    with pytest.raises(OSError, match="holding other files"):
        convert(tiny_ckpt, tmp_path / "user", overwrite=True, progress=False)
    assert (tmp_path / "user" / "keep.txt").read_text() == "user data"
    convert(tiny_ckpt, tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        convert(tiny_ckpt_tied, tmp_path / "out", progress=False)
    convert(tiny_ckpt_tied, tmp_path / "out", overwrite=True, progress=False)
    assert load_orbax(tmp_path / "out")[0].lm_head_tied
    assert leftovers(tmp_path, "out") == []


def test_an_interrupted_conversion_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    calls = []
    real_read_leaf = checkpoint.read_leaf

    def read_leaf_then_interrupt(leaf, index=None, dtype=None):
        calls.append(leaf.path)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_read_leaf(leaf, index, dtype)

    monkeypatch.setattr(checkpoint, "read_leaf", read_leaf_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_killed_conversion_leaves_nothing_that_looks_complete(tiny_ckpt, tmp_path):
    """SIGKILL mid-write: no ``dst``; the hidden temporary is not a checkpoint and the next run removes it."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from ov_jax import checkpoint
        real = checkpoint.read_leaf
        def slow(leaf, index=None, dtype=None):
            if leaf.path[0] == "text":
                print("writing", flush=True)
                time.sleep(60)
            return real(leaf, index, dtype)
        checkpoint.read_leaf = slow
        checkpoint.convert({str(tiny_ckpt)!r}, {str(tmp_path / "out")!r}, progress=False)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "out").exists()
    (stale,) = tmp_path.iterdir()
    assert stale.name.startswith(".out.ov_jax-tmp-") and not is_orbax_checkpoint(stale)
    assert not (stale / "config.json").exists()
    convert(tiny_ckpt, tmp_path / "out", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_orbax_round_trip(tiny_ckpt, tmp_path):
    config, params = load_params(tiny_ckpt)
    path = save_orbax(params, config, tmp_path / "saved", files_from=tiny_ckpt)
    loaded_config, loaded = load_orbax(path)
    assert loaded_config == config
    assert_trees_equal(loaded, params)
    assert (path / "tokenizer.json").exists()
    del params["image_newline"]
    with pytest.raises(ValueError, match="image_newline"):
        save_orbax(params, config, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_load_orbax_errors(tiny_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="not a converted ov_jax checkpoint"):
        load_orbax(tiny_ckpt)
    convert(tiny_ckpt, tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="converted orbax checkpoint: use ov_jax.checkpoint.load_orbax"):
        load_params(tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    raw["ov_jax"]["text"]["num_hidden_layers"] = 3
    (tmp_path / "out" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_orbax(tmp_path / "out")


def test_command_line(tiny_ckpt, tmp_path, capsys):
    from convert.convert_checkpoint import main

    assert main([str(tiny_ckpt), str(tmp_path / "out"), "--dtype", "float16", "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_orbax(tmp_path / "out", dtype="float16")[1]["text"]["embed"].dtype == np.float16
    assert main([str(tiny_ckpt), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), str(tmp_path / "x"), "--no-progress"]) == 1
    assert "does not exist" in capsys.readouterr().err


MID_SIZE = dict(
    text=dict(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
              num_key_value_heads=4),
    vision=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8),
)
_WRITE_MID_SIZE = """
import json, sys
import numpy as np
from safetensors.numpy import save_file
from ov_jax.config import config_from_hf_dict
from ov_jax.loading import checkpoint_keys

out, sizes = sys.argv[1], json.loads(sys.argv[2])
raw = {"model_type": "llava_onevision", "tie_word_embeddings": False,
       "text_config": dict(model_type="qwen2", tie_word_embeddings=False, **sizes["text"]),
       "vision_config": dict(model_type="siglip_vision_model", **sizes["vision"])}
json.dump(raw, open(f"{out}/config.json", "w"))
prefixes = {"text.": "language_model.model.", "lm_head.": "language_model.lm_head.", "vision.": "vision_tower.",
            "projector.": "multi_modal_projector.", "image_newline": "image_newline"}
rng, shards, weight_map = np.random.default_rng(0), 4, {}
keys = list(checkpoint_keys(config_from_hf_dict(raw)).items())
for s in range(shards):  # one shard in memory at a time
    name, tensors = f"model-{s + 1:05d}-of-{shards:05d}.safetensors", {}
    for canonical, (_, _, _, shape) in keys[s::shards]:
        prefix = next(p for p in prefixes if canonical.startswith(p))
        key = prefixes[prefix] + canonical[len(prefix):]
        tensors[key] = rng.standard_normal(shape, dtype=np.float32)
        weight_map[key] = name
    save_file(tensors, f"{out}/{name}", metadata={"format": "pt"})
    del tensors
json.dump({"weight_map": weight_map}, open(f"{out}/model.safetensors.index.json", "w"))
"""
_CONVERT_AND_REPORT = """
import dataclasses, json, sys, time
from ov_jax.checkpoint import convert
report = convert(sys.argv[1], sys.argv[2], progress=False)
print(json.dumps({k: v for k, v in dataclasses.asdict(report).items() if k != "destination"}))
"""
_TIME_LOADS = """
import json, sys, time
from ov_jax.checkpoint import load_orbax
from ov_jax.loading import load_params
t = time.perf_counter(); load_params(sys.argv[1]); safetensors_s = time.perf_counter() - t
t = time.perf_counter(); load_orbax(sys.argv[2]); orbax_s = time.perf_counter() - t
print(json.dumps({"safetensors_s": safetensors_s, "orbax_s": orbax_s}))
"""


def _run(code: str, *args: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}


@pytest.mark.slow
def test_conversion_memory_stays_near_the_largest_leaf(tmp_path):
    """Convert a ~520 MB checkpoint in a fresh process: peak RSS grows by about the largest leaf twice
    (the leaf plus orbax's write buffer), far below the model size."""
    src = tmp_path / "src"
    src.mkdir()
    _run(_WRITE_MID_SIZE, str(src), json.dumps(MID_SIZE))
    start = time.perf_counter()
    report = _run(_CONVERT_AND_REPORT, str(src), str(tmp_path / "out"))
    mib = 1 << 20
    growth = report["peak_rss_bytes"] - report["rss_before_bytes"]
    loads = _run(_TIME_LOADS, str(src), str(tmp_path / "out"))
    print(f"\nmodel {report['bytes_written'] / mib:.0f} MiB, largest leaf {report['largest_leaf_bytes'] / mib:.0f} MiB, "
          f"largest file tensor {report['largest_file_tensor_bytes'] / mib:.0f} MiB; peak RSS "
          f"{report['peak_rss_bytes'] / mib:.0f} MiB = start {report['rss_before_bytes'] / mib:.0f} MiB + "
          f"{growth / mib:.0f} MiB; conversion {report['seconds']:.1f} s (process {time.perf_counter() - start:.1f} s); "
          f"load safetensors {loads['safetensors_s']:.1f} s, orbax {loads['orbax_s']:.1f} s")
    assert report["bytes_written"] > 500 * mib
    assert growth < 2.5 * report["largest_leaf_bytes"] + 64 * mib
    assert growth < 0.6 * report["bytes_written"]
