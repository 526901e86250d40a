"""``ov-jax finetune`` and ``ov-jax export`` in subprocesses: a 3-step LoRA run on the tiny checkpoint with an
image, a video and a text sample, its export (adapters merged) loaded by transformers, and every bad argument as
one ``error:`` line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "ov_jax" / "assets"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1")
    return env


def ov_jax(*args, cwd, env):
    return subprocess.run([sys.executable, "-m", "ov_jax.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune")
    Image.open(ASSETS / "sample.jpg").convert("RGB").resize((120, 90)).save(folder / "photo.jpg")
    shutil.copy(ASSETS / "sample.mp4", folder / "clip.mp4")
    conversations = [
        [{"role": "user", "content": [{"type": "image", "path": "photo.jpg"}, {"type": "text", "text": "What?"}]},
         {"role": "assistant", "content": "The bright image shows a white boat."}],
        [{"role": "user", "content": [{"type": "video", "path": "clip.mp4"}, {"type": "text", "text": "And?"}]},
         {"role": "assistant", "content": "A bird walks around the green field."}],
        [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "There are 3 items."}],
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return folder


def test_lora_finetune_then_export_loads_in_transformers(tiny_ckpt, folder, env):
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from ov_jax import export
    from ov_jax.loading import checkpoint_config
    from ov_jax.nn.lora import merge_lora
    from ov_jax.train import runs

    # batch 3 holds every sample, so all 3 steps share one shape (one compile)
    result = ov_jax("finetune", "--model", tiny_ckpt, "--data", "train.jsonl", "--output", "run", "--steps", 3,
                    "--batch-size", 3, "--learning-rate", 1e-2, "--max-length", 2048, "--num-frames", 2,
                    "--lora-rank", 4, "--lora-alpha", 8, "--lora-targets", r"text\.layers\.(q|v)", "--save-every", 2,
                    "--attention", "xla", "--remat", "full", cwd=folder, env=env)
    assert result.returncode == 0, result.stderr
    assert "step 3, loss" in result.stdout
    settings = json.loads((folder / "run" / "run.json").read_text())
    assert settings["attention"] == "xla" and settings["remat"] == "full"
    records = runs.read_metrics(folder / "run")
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["samples"] == 3 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]

    result = ov_jax("export", "run", "exported", cwd=folder, env=env)
    assert result.returncode == 0, result.stderr
    model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(folder / "exported",
                                                                         output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    step, params = runs.latest_params(folder / "run")
    assert params["text"]["layers"]["q"]["lora_a"].shape[-1] == 4
    expected = export.hf_state_dict(checkpoint_config(tiny_ckpt), merge_lora(params))
    written = load_file(folder / "exported" / "model.safetensors")
    assert step == 3 and set(written) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(written[name], array, err_msg=name)
    np.testing.assert_array_equal(model.state_dict()["lm_head.weight"].numpy(),
                                  expected["language_model.lm_head.weight"])
    base = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ckpt).state_dict()
    for layer in ("language_model.layers.1.self_attn.q_proj", "language_model.layers.0.self_attn.v_proj"):
        name = f"model.{layer}.weight"
        assert not torch.equal(base[name], model.state_dict()[name])  # adapter merged in
    for layer in ("language_model.layers.0.self_attn.k_proj", "language_model.layers.0.mlp.up_proj",
                  "vision_tower.encoder.layers.0.self_attn.q_proj", "multi_modal_projector.linear_1"):
        name = f"model.{layer}.weight"
        assert torch.equal(base[name], model.state_dict()[name])  # no adapter: the base weights


@pytest.mark.parametrize("args, message", [
    (["--model", "{tiny}", "--output", "r"], "a new run needs data"),
    (["--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--steps", "0"], "steps must be an integer"),
    (["--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--learning-rate", "nan"], "learning_rate"),
    (["--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--warmup", "200"], "warmup"),
    (["--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--weight-decay", "nan"],
     "weight_decay must be a finite number >= 0, got nan"),
    (["--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--weight-decay", "-1"], "weight_decay"),
    (["--model", "{tiny}", "--data", "missing.jsonl", "--output", "r"], "does not exist"),
    (["--model", "{tiny}", "--data", "bad.jsonl", "--output", "r"], "bad.jsonl:2: not valid JSON"),
    (["--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--max-length", "10"], "no sample"),
    (["--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--freeze", "nothing_matches_this"],
     "nothing_matches_this"),
    (["--model", "{tiny}", "--data", "train.jsonl", "--output", "mine"], "holding other files"),
    (["--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--lora-rank", "0"], "LoRA rank"),
    (["--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--lora-targets", "q"], "need lora_rank"),
    (["--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--lora-rank", "2", "--lora-targets", "nope"],
     "nope"),
    (["--output", "mine", "--resume"], "not a fine-tuning run directory"),
    (["--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--attention", "flash"],
     "attention must be one of auto, xla, cpu, cudnn, splash, got 'flash'"),
    (["--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--attention", "cudnn"],
     "attention='cudnn' needs an NVIDIA GPU"),
    (["--model", "{tiny}", "--data", "train.jsonl", "--output", "r", "--remat", "most"],
     "remat must be one of none, full, dots_saveable, dots_with_no_batch_dims_saveable, got 'most'"),
])
def test_bad_finetune_arguments_are_one_error_line(tiny_ckpt, folder, env, args, message):
    (folder / "bad.jsonl").write_text((folder / "train.jsonl").read_text().splitlines()[2] + "\n{oops\n")
    (folder / "mine").mkdir(exist_ok=True)
    (folder / "mine" / "notes.txt").write_text("mine")
    result = ov_jax("finetune", *[a.format(tiny=tiny_ckpt) for a in args], cwd=folder, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0] and "internal error" not in lines[0]
    assert not (folder / "r").exists() and (folder / "mine" / "notes.txt").read_text() == "mine"


def test_bad_export_arguments_are_one_error_line(folder, env):
    result = ov_jax("export", "mine", "out", cwd=folder, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "not a fine-tuning run directory" in lines[0]
    assert not (folder / "out").exists()


def test_export_again_needs_the_overwrite_flag_it_names(tiny_ckpt, folder, env, tmp_path):
    """A second export into the same folder is refused with the flag to pass, and that flag exists."""
    from ov_jax.model import LlavaOnevision
    from ov_jax.train import make_train_step, optimizer, runs

    config = runs.RunConfig(model=str(tiny_ckpt), data=str(folder / "train.jsonl"), steps=2)
    directory, _ = runs.open_run(tmp_path / "run", config)
    model = LlavaOnevision.from_pretrained(tiny_ckpt)
    state = make_train_step(model.config, optimizer(1e-3), log=None).init(model.params)
    manager = runs.checkpoint_manager(directory, config)
    runs._save(manager, state, {})
    manager.close()
    assert ov_jax("export", directory, "out", cwd=tmp_path, env=env).returncode == 0
    again = ov_jax("export", directory, "out", cwd=tmp_path, env=env)
    assert again.returncode == 2 and "(--overwrite)" in again.stderr, again.stderr
    replaced = ov_jax("export", directory, "out", "--overwrite", cwd=tmp_path, env=env)
    assert replaced.returncode == 0, replaced.stderr
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == load_file(
        tiny_ckpt / "model.safetensors").keys()


@pytest.mark.parametrize("args, message", [
    (["finetune", "--steps", "abc", "--output", "r"], "argument --steps: invalid int value"),
    (["finetune", "--data", "train.jsonl"], "required: --output"),
    (["export", "onlyone"], "required: OUT"),
])
def test_unparsable_arguments_are_one_error_line(folder, env, args, message):
    result = ov_jax(*args, cwd=folder, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
