"""Fine-tuning runs (`ov_jax.train.runs`): resume gives the uninterrupted run's losses, keep-K checkpoints, the
metrics file, and the run directory's safety rules."""

import json
import shutil

import numpy as np
import pytest

from ov_jax import outputs
from ov_jax.train import runs

CONVERSATIONS = [
    [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "There are 3 items."}],
    [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Near the river bank."}],
    [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "The red car."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What happens at the end?"},
     {"role": "assistant", "content": "A bird jumps over the wooden table."}],
    [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "My sister looks at the blue sky."}],
]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs_data") / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    return path


def settings(tiny_ckpt, train_file, **overrides):
    values = dict(model=str(tiny_ckpt), data=str(train_file), steps=6, batch_size=2, learning_rate=3e-3,
                  warmup=2, max_length=128, save_every=2, keep=2, seed=1)
    return runs.RunConfig(**{**values, **overrides})


def losses(directory):
    return [record["loss"] for record in runs.read_metrics(directory)]


def leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def straight(tiny_ckpt, train_file, tmp_path_factory):
    """6 steps without interruption, a checkpoint every 2 steps, the last 2 kept."""
    return runs.finetune(tmp_path_factory.mktemp("runs") / "straight", settings(tiny_ckpt, train_file),
                         progress=False, log=None)


def test_resume_continues_with_the_uninterrupted_losses(tiny_ckpt, train_file, straight, tmp_path):
    assert [r["step"] for r in straight.metrics] == [1, 2, 3, 4, 5, 6]
    first = losses(straight.directory)
    assert first[-1] < first[0] - 0.5  # it learns

    interrupted = tmp_path / "interrupted"
    runs.finetune(interrupted, settings(tiny_ckpt, train_file), until=3, progress=False, log=None)
    with open(interrupted / runs.METRICS_FILE, "a") as f:  # a step that ran but was never checkpointed
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    resumed = runs.finetune(interrupted, resume=True, progress=False, log=None)
    assert [r["step"] for r in resumed.metrics] == [4, 5, 6]
    np.testing.assert_allclose(losses(interrupted), first, rtol=0, atol=1e-7)
    for a, b in zip(leaves(straight.state.params), leaves(resumed.state.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)


def test_checkpoints_keep_the_last_k_and_metrics_hold_every_step(straight):
    run = straight.directory
    assert sorted(int(p.name) for p in (run / runs.CHECKPOINTS).iterdir() if p.name.isdigit()) == [4, 6]
    records = runs.read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert set(r) == {"step", "loss", "learning_rate", "grad_norm", "tokens", "tokens_per_second", "samples"}
        assert r["loss"] > 0 and r["grad_norm"] > 0 and r["tokens"] > 0 and r["tokens_per_second"] > 0
        assert r["samples"] == 2
    # linear warm-up over 2 steps, then cosine decay to 0 at step 6
    cosine = [3e-3 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(4)]
    np.testing.assert_allclose([r["learning_rate"] for r in records], [0.0, 1.5e-3] + cosine, atol=1e-9)
    step, params = runs.latest_params(run)
    assert step == 6
    for a, b in zip(leaves(params), leaves(straight.state.params)):
        np.testing.assert_array_equal(a, b)
    assert outputs.output_kind(run) == runs.RUN_KIND
    assert json.loads((run / runs.RUN_FILE).read_text())["steps"] == 6


def test_run_directory_rules(tiny_ckpt, train_file, straight, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(outputs.OutputPathError, match="holding other files"):
        runs.finetune(user, settings(tiny_ckpt, train_file), progress=False, log=None)
    assert (user / "notes.txt").read_text() == "keep me"
    with pytest.raises(runs.RunError, match="not a fine-tuning run"):
        runs.finetune(user, resume=True, progress=False, log=None)
    with pytest.raises(runs.RunError, match="steps must be an integer >= 1"):
        settings(tiny_ckpt, train_file, steps=0)
    with pytest.raises(runs.RunError, match="warmup"):
        settings(tiny_ckpt, train_file, warmup=7)
    with pytest.raises(FileExistsError):
        runs.finetune(straight.directory, settings(tiny_ckpt, train_file), progress=False, log=None)
    with pytest.raises(runs.RunError, match="different learning_rate"):
        runs.finetune(straight.directory, settings(tiny_ckpt, train_file, learning_rate=1.0), resume=True,
                      progress=False, log=None)
    done = runs.finetune(straight.directory, resume=True, progress=False, log=None)
    assert done.metrics == [] and len(runs.read_metrics(straight.directory)) == 6


def test_overwrite_replaces_only_the_run(tiny_ckpt, train_file, tmp_path):
    """A run directory's --overwrite deletes the run's own files, not an export or notes put inside it."""
    config = settings(tiny_ckpt, train_file)
    directory, _ = runs.open_run(tmp_path / "run", config)
    (directory / runs.CHECKPOINTS).mkdir()
    (directory / "export").mkdir()
    (directory / "export" / "model.safetensors").write_text("weights")
    with pytest.raises(outputs.OutputPathError, match="besides an earlier finetune output it holds export"):
        runs.open_run(directory, config, overwrite=True)
    assert (directory / "export" / "model.safetensors").read_text() == "weights"
    shutil.rmtree(directory / "export")
    (directory / runs.METRICS_FILE).write_text("{}\n")
    runs.open_run(directory, config, overwrite=True)
    assert sorted(p.name for p in directory.iterdir()) == [outputs.MARKER, runs.RUN_FILE]


def test_weight_decay_and_clipping_are_checked_with_the_settings(tiny_ckpt, train_file):
    with pytest.raises(runs.RunError, match="weight_decay must be a finite number >= 0, got nan"):
        settings(tiny_ckpt, train_file, weight_decay=float("nan"))
    with pytest.raises(runs.RunError, match="max_grad_norm must be a number > 0 or None, got nan"):
        settings(tiny_ckpt, train_file, max_grad_norm=float("nan"))


def test_packed_rows_give_the_loss_of_separate_rows(tiny_ckpt, train_file, tmp_path):
    """One row packing all 5 samples (segment ids, positions restarting) = 5 rows of one sample each."""
    separate = runs.finetune(tmp_path / "separate", settings(tiny_ckpt, train_file, steps=1, warmup=0,
                                                             batch_size=5), progress=False, log=None)
    packed = runs.finetune(tmp_path / "packed", settings(tiny_ckpt, train_file, steps=1, warmup=0, batch_size=1,
                                                         max_length=256, packing=True), progress=False, log=None)
    assert packed.metrics[0]["samples"] == separate.metrics[0]["samples"] == 5
    assert packed.metrics[0]["tokens"] == separate.metrics[0]["tokens"]
    np.testing.assert_allclose(packed.metrics[0]["loss"], separate.metrics[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(packed.metrics[0]["grad_norm"], separate.metrics[0]["grad_norm"], rtol=1e-4)
