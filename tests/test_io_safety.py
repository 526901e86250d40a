"""Hostile paths and damaged files: outputs never replace what the user did not point at, a checkpoint only
makes us read its own files, converted checkpoints are verified, failed writes leave nothing, configs of
other models are refused."""

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

from loading_helpers import assert_trees_equal
from ov_jax import checkpoint, cli
from ov_jax.checkpoint import CorruptCheckpointError, convert, load_orbax
from ov_jax.config import ConfigError, load_config
from ov_jax.loading import CheckpointError, load_params, weight_files
from ov_jax.model import LlavaOnevision
from ov_jax.outputs import MARKER
from ov_jax.processing.processor import LlavaOnevisionProcessor
from ov_jax.tiny import make_tiny

REPO = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (what must survive a refused command unchanged)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def error_line(capsys, argv) -> str:
    assert cli.main(argv) == cli.EXIT_ERROR
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def folder(tmp_path, tiny_ckpt):
    """A user's folder: a checkpoint ``tiny/`` beside other files."""
    shutil.copytree(tiny_ckpt, tmp_path / "dir" / "tiny")
    (tmp_path / "dir" / "notes.txt").write_text("mine")
    (tmp_path / "dir" / "photos").mkdir()
    (tmp_path / "dir" / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    return tmp_path / "dir"


# ------------------------------------------------------------------------------------ output directories


@pytest.mark.parametrize("cwd, src, dst, why", [
    ("dir", "tiny", ".", "contains the source"),
    (".", "dir/tiny", "dir", "contains the source"),
    ("dir", "tiny", "tiny", "is the source"),
    ("dir/photos", "../tiny", "..", "contains the source"),
    ("dir/photos", "../tiny", ".", "contains the current directory"),
])
def test_convert_overwrite_never_replaces_the_source_its_folder_or_the_cwd(folder, monkeypatch, capsys, cwd, src,
                                                                           dst, why):
    before = tree(folder.parent)
    monkeypatch.chdir(folder.parent / cwd)
    assert why in error_line(capsys, ["convert", src, dst, "--overwrite", "--no-progress"])
    assert tree(folder.parent) == before


def test_overwrite_replaces_only_an_earlier_output_of_the_same_command(folder, tiny_ckpt_tied, monkeypatch, capsys):
    monkeypatch.chdir(folder)
    assert "holding other files" in error_line(capsys, ["convert", "tiny", "photos", "--overwrite", "--no-progress"])
    assert cli.main(["convert", "tiny", "out", "--no-progress"]) == 0
    capsys.readouterr()
    assert "pass overwrite=True (--overwrite)" in error_line(capsys, ["convert", "tiny", "out", "--no-progress"])
    assert "output of 'convert'" in error_line(capsys, ["make-tiny", "out", "--overwrite"])
    (folder / "out" / "mine.txt").write_text("added by the user")
    assert "mine.txt" in error_line(capsys, ["convert", "tiny", "out", "--overwrite", "--no-progress"])
    (folder / "out" / "mine.txt").unlink()
    assert cli.main(["convert", str(tiny_ckpt_tied), "out", "--overwrite", "--no-progress"]) == 0
    assert load_orbax(folder / "out")[0].lm_head_tied
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "out", "photos", "tiny"]


def test_make_tiny_overwrite_replaces_the_whole_directory(tmp_path, monkeypatch, capsys):
    """An index left from an earlier sharded checkpoint must never survive and shadow the new weights."""
    out = tmp_path / "out"
    make_tiny(out, seed=1)
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    assert "model.safetensors.index.json" in error_line(capsys, ["make-tiny", str(out), "--overwrite"])
    (out / "model.safetensors.index.json").unlink()
    assert cli.main(["make-tiny", str(out), "--overwrite", "--seed", "2"]) == 0
    _, params = load_params(out)
    _, want = load_params(make_tiny(tmp_path / "seed2", seed=2))
    assert_trees_equal(params, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "seed2"]
    assert (out / MARKER).is_file()


# ---------------------------------------------------------------------------- files outside a checkpoint


def _sharded(src: Path, dst: Path, shard_name: str) -> Path:
    shutil.copytree(src, dst)
    keys = list(weight_files(dst))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, shard_name)}))
    return dst


@pytest.mark.parametrize("shard_name", ["../outside.safetensors", "/etc/shadow", "sub/../../outside.safetensors"])
def test_index_shard_names_outside_the_checkpoint_are_refused(tiny_ckpt, tmp_path, shard_name):
    ckpt = _sharded(tiny_ckpt, tmp_path / "ckpt", shard_name)
    shutil.move(ckpt / "model.safetensors", tmp_path / "outside.safetensors")
    with pytest.raises(CheckpointError, match=f"names the file '{shard_name}', which is outside the checkpoint"):
        load_params(ckpt)
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        convert(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_index_shard_name_with_a_nul_is_named(tiny_ckpt, tmp_path):
    ckpt = _sharded(tiny_ckpt, tmp_path / "ckpt", "model.safetensors\0")
    with pytest.raises(CheckpointError, match="names the file 'model.safetensors\\\\x00', which is not a file name"):
        load_params(ckpt)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja",
                                  "preprocessor_config.json", "generation_config.json"])
def test_symlinks_leaving_the_checkpoint_are_refused(tiny_ckpt, tmp_path, name):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    shutil.move(ckpt / name, tmp_path / name)
    (ckpt / name).symlink_to(tmp_path / name)
    match = f"{ckpt / name} is a link to {tmp_path / name}, outside the checkpoint directory"
    with pytest.raises(CheckpointError, match=match):
        if name in ("model.safetensors", "config.json", "generation_config.json"):
            LlavaOnevision.from_pretrained(ckpt)
        else:
            LlavaOnevisionProcessor.from_pretrained(ckpt)
    with pytest.raises(CheckpointError, match=match):  # conversion never copies it
        convert(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_pipe_in_place_of_a_checkpoint_file_is_refused_not_read(tiny_ckpt, tmp_path):
    """Opening a FIFO named config.json blocked forever."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    with pytest.raises(CheckpointError, match="config.json is not a regular file"):
        LlavaOnevision.from_pretrained(ckpt)


def test_links_inside_the_checkpoint_and_hub_cache_snapshots_load(tiny_ckpt, tmp_path):
    """The Hugging Face cache links ``snapshots/<rev>/file`` to ``../../blobs/<hash>``: that stays allowed."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(Path(tiny_ckpt).iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    (snapshot / "chat_template.jinja").unlink()
    (snapshot / "templates").mkdir()
    shutil.copy(Path(tiny_ckpt) / "chat_template.jinja", snapshot / "templates" / "t.jinja")
    (snapshot / "chat_template.jinja").symlink_to(Path("templates") / "t.jinja")  # a link inside: allowed
    assert_trees_equal(load_params(snapshot)[1], load_params(tiny_ckpt)[1])
    assert LlavaOnevisionProcessor.from_pretrained(snapshot).chat_template == (
        Path(tiny_ckpt) / "chat_template.jinja").read_text()
    convert(snapshot, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (Path(tiny_ckpt) / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------------------- converted-checkpoint integrity


@pytest.fixture(scope="module")
def converted_once(tiny_ckpt, tmp_path_factory):
    return convert(tiny_ckpt, tmp_path_factory.mktemp("converted") / "out", progress=False).destination


@pytest.fixture
def converted(converted_once, tmp_path):
    shutil.copytree(converted_once, tmp_path / "conv")
    return tmp_path / "conv"


def largest_chunk(directory: Path) -> Path:
    return max((p for p in (directory / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x40
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])


def damage_metadata(file: Path) -> None:
    file.write_text(file.read_text()[:-40] + "}")


DAMAGE = {
    "flipped bytes": (lambda d: flip(largest_chunk(d)), "does not match its sha256 checksum"),
    "truncated chunk": (lambda d: truncate(largest_chunk(d)), "bytes, .* were written"),
    "missing chunk": (lambda d: largest_chunk(d).unlink(), "is missing"),
    "damaged metadata": (lambda d: damage_metadata(d / "params" / "state" / "_METADATA"), "params/state/_METADATA"),
    "damaged index": (lambda d: flip(d / "params" / "state" / "manifest.ocdbt"), "params/state/manifest.ocdbt"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_converted_checkpoints_are_one_clear_error(converted, tiny_ckpt, damage):
    apply, match = DAMAGE[damage]
    _, want = load_params(tiny_ckpt)
    assert_trees_equal(load_orbax(converted)[1], want)
    apply(converted)
    with pytest.raises(CorruptCheckpointError, match=f"converted checkpoint {converted} is damaged: .*{match}.*"
                                                     "convert it again") as caught:
        LlavaOnevision.from_pretrained(converted)
    assert len(str(caught.value)) < 400 and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("damage", ["truncated chunk", "missing chunk", "damaged metadata", "damaged index"])
def test_without_verification_orbax_failures_are_still_short(converted, damage):
    DAMAGE[damage][0](converted)
    match = "orbax cannot read its (arrays|metadata)|params/ does not match its config"
    with pytest.raises(CorruptCheckpointError, match=match) as caught:
        load_orbax(converted, verify=False)
    assert len(str(caught.value)) < 600


def test_verification_catches_what_verify_false_loads(converted, tiny_ckpt):
    flip(largest_chunk(converted))
    _, loaded = load_orbax(converted, verify=False)  # the opt-out reads what is there
    with pytest.raises(AssertionError):
        assert_trees_equal(loaded, load_params(tiny_ckpt)[1])
    with pytest.raises(CorruptCheckpointError):
        load_orbax(converted, dtype="bfloat16")


def test_sharded_loads_verify_the_files(converted):
    import jax

    from loading_helpers import mesh_shardings

    flip(largest_chunk(converted))
    shardings = mesh_shardings(load_config(converted), jax.make_mesh((2, 4), ("fsdp", "tensor")))
    with pytest.raises(CorruptCheckpointError, match="does not match its sha256"):
        load_orbax(converted, shardings=shardings)


def test_array_checksums_are_checked_on_unsharded_loads(converted):
    checksums = json.loads((converted / "checksums.json").read_text())
    assert len(checksums["arrays"]) == 41 and checksums["arrays"]["text.embed"]["dtype"] == "float32"
    checksums["arrays"]["text.embed"]["sha256"] = "0" * 64
    (converted / "checksums.json").write_text(json.dumps(checksums))
    with pytest.raises(CorruptCheckpointError, match="array text.embed does not match its sha256"):
        load_orbax(converted)
    load_orbax(converted, dtype="bfloat16")  # narrowing: the array check cannot apply, the file check passes


def test_missing_or_damaged_checksums_file(converted):
    (converted / "checksums.json").write_text("{")
    with pytest.raises(CorruptCheckpointError, match="checksums.json is unreadable"):
        load_orbax(converted)
    (converted / "checksums.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="has no checksums.json.*verify=False"):
        load_orbax(converted)
    load_orbax(converted, verify=False)


def _edit_checksums(converted: Path, edit) -> None:
    checksums = json.loads((converted / "checksums.json").read_text())
    edit(checksums)
    (converted / "checksums.json").write_text(json.dumps(checksums))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["files"].update(dict.fromkeys(c["files"], "0")), "checksums.json is unreadable"),
    (lambda c: c["arrays"].update({"text.embed": "0"}), "checksums.json is unreadable"),
    (lambda c: c.update(files={}), "params/.* has no entry in checksums.json"),
    (lambda c: c["arrays"].pop("text.embed"), "array text.embed has no entry in checksums.json"),
])
def test_an_edited_checksums_file_is_damage_not_a_pass(converted, edit, match):
    """Entries that are not objects, or files and arrays left out, cannot turn verification off."""
    _edit_checksums(converted, edit)
    with pytest.raises(CorruptCheckpointError, match=match):
        load_orbax(converted)


def test_links_inside_params_that_leave_the_checkpoint_are_refused(converted, tmp_path):
    chunk = largest_chunk(converted)
    shutil.move(chunk, tmp_path / "chunk")
    chunk.symlink_to(tmp_path / "chunk")
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        load_orbax(converted, verify=False)


# --------------------------------------------------------------------------- failed writes leave nothing


def test_disk_full_in_orbax_is_one_error_and_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch, capsys):
    real_save, calls = ocp.v1.partial.save, []

    def save_until_full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ocp.v1.partial, "save", save_until_full)
    line = error_line(capsys, ["convert", str(tiny_ckpt), str(tmp_path / "out"), "--no-progress"])
    assert line == f"error: cannot write {tmp_path / 'out'}: No space left on device; nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_copying_files_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.shutil, "copy", full)
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device"):
        convert(tiny_ckpt, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destinations_are_one_line(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "a parent path is an existing file" in error_line(
        capsys, ["convert", str(tiny_ckpt), str(tmp_path / "file" / "out"), "--no-progress"])
    if os.path.isdir("/sys") and not os.access("/sys", os.W_OK | os.X_OK) or os.path.ismount("/sys"):
        assert "cannot write to /sys" in error_line(capsys, ["make-tiny", "/sys/ov_jax_tiny"])
    assert (tmp_path / "file").read_text() == "x"


@contextlib.contextmanager
def small_tmpfs(path: Path, options: str):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("options, reason", [("size=1m", "No space left on device"),
                                             ("size=1m,ro", "Read-only file system")])
def test_real_full_and_read_only_filesystems(tiny_ckpt, tmp_path, options, reason):
    """A real 1 MiB / read-only tmpfs (needs mount rights): one stderr line, no absl output, nothing left."""
    with small_tmpfs(tmp_path / "fs", options) as fs:
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
        done = subprocess.run([sys.executable, "-m", "ov_jax.cli", "convert", str(tiny_ckpt), str(fs / "out"),
                               "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and reason in done.stderr, \
            done.stderr
        assert list(fs.iterdir()) == []


def test_damaged_chunk_through_generate_is_one_line(converted, tmp_path):
    flip(largest_chunk(converted))
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    done = subprocess.run([sys.executable, "-m", "ov_jax.cli", "generate", "--model", str(converted), "--prompt",
                           "hi", "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("\r")]
    assert done.returncode == 2 and lines[-1].startswith(f"error: converted checkpoint {converted} is damaged")
    assert "Traceback" not in done.stderr and "absl" not in done.stderr and "internal error" not in done.stderr


# ---------------------------------------------------------------------------------------------- configs


def test_other_model_types_are_refused(tiny_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "bert"
    shutil.copytree(tiny_ckpt, ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(raw | {"model_type": "bert"}))
    with pytest.raises(ConfigError, match="model_type 'bert': not a LLaVA-OneVision checkpoint"):
        load_config(ckpt)
    assert "model_type 'bert'" in error_line(capsys, ["convert", str(ckpt), str(tmp_path / "out"), "--no-progress"])
    assert not (tmp_path / "out").exists()


def test_unknown_fields_in_our_config_section_are_named(converted):
    raw = json.loads((converted / "config.json").read_text())
    raw["ov_jax"]["text"]["rope_scaling_factor"] = 4.0
    raw["ov_jax"]["speculative"] = True
    (converted / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="unknown field in the 'ov_jax' config section: ov_jax.speculative"):
        load_orbax(converted)
    del raw["ov_jax"]["speculative"]
    (converted / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="ov_jax.text.rope_scaling_factor"):
        LlavaOnevision.from_pretrained(converted)
