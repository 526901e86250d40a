"""Output directories: only a previous output of the same command is ever replaced, and writes are atomic."""

import json
import os

import pytest

from ov_jax.outputs import (MARKER, OutputPathError, atomic_output_dir, check_output_dir, output_kind,
                            prepare_output_dir)


def write(directory, kind="convert", overwrite=False, sources=(), files=("a.txt",)):
    with atomic_output_dir(directory, kind=kind, overwrite=overwrite, sources=sources) as tmp:
        for name in files:
            (tmp / name).write_text(name)
    return directory


def test_new_and_empty_destinations_are_written_with_a_marker(tmp_path):
    write(tmp_path / "new" / "deeper")
    assert output_kind(tmp_path / "new" / "deeper") == "convert"
    marker = json.loads((tmp_path / "new" / "deeper" / MARKER).read_text())
    assert marker == {"kind": "convert", "entries": ["a.txt"]}
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty")
    assert sorted(os.listdir(tmp_path / "empty")) == [MARKER, "a.txt"]
    assert sorted(os.listdir(tmp_path)) == ["empty", "new"]


def test_a_previous_output_is_replaced_whole_only_with_overwrite(tmp_path):
    write(tmp_path / "out", files=("old.txt", "shared.txt"))
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        write(tmp_path / "out")
    write(tmp_path / "out", overwrite=True, files=("shared.txt",))
    assert sorted(os.listdir(tmp_path / "out")) == [MARKER, "shared.txt"]  # no stale old.txt
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("layout", ["dst_is_cwd", "dst_holds_source", "dst_is_source", "foreign_files",
                                    "other_kind", "user_file_added", "a_file"])
def test_everything_else_is_refused_and_untouched(layout, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "weights").write_text("w")
    (work / "notes.txt").write_text("n")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    sources = [work / "src"]
    monkeypatch.chdir(work)
    dst, match = {
        "dst_is_cwd": (".", "contains the current directory"),
        "dst_holds_source": (work, "contains the source"),
        "dst_is_source": ("src", "is the source"),
        "foreign_files": (work, "holding other files"),
        "a_file": ("notes.txt", "existing file"),
    }.get(layout, (None, None))
    if layout == "dst_is_cwd":
        sources = []
    if layout == "foreign_files":
        sources, dst = [], tmp_path / "work"
        monkeypatch.chdir(tmp_path)
    if layout in ("other_kind", "user_file_added"):
        dst = write(tmp_path / "prev", kind="make-tiny")
        if layout == "user_file_added":
            (dst / "mine.txt").write_text("keep")
            match = "besides an earlier make-tiny output it holds mine.txt"
        else:
            match = "output of 'make-tiny'"
        before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    kind = "make-tiny" if layout == "user_file_added" else "convert"
    with pytest.raises(OutputPathError, match=match):
        write(dst, kind=kind, overwrite=True, sources=sources)
    with pytest.raises(OutputPathError, match=match):
        prepare_output_dir(dst, kind=kind, overwrite=True, sources=sources)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_a_failed_write_leaves_nothing_and_keeps_the_previous_output(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out", kind="convert") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("disk trouble")
    assert os.listdir(tmp_path) == []
    write(tmp_path / "out", files=("good",))
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out", kind="convert", overwrite=True):
            raise RuntimeError("disk trouble")
    assert sorted(os.listdir(tmp_path / "out")) == [MARKER, "good"]
    assert os.listdir(tmp_path) == ["out"]


def test_a_parent_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="a parent path is an existing file"):
        write(tmp_path / "file" / "out")


def test_prepare_output_dir_for_outputs_written_over_time(tmp_path):
    run = prepare_output_dir(tmp_path / "run", kind="finetune")
    (run / "step_1").mkdir()
    assert output_kind(run) == "finetune" and output_kind(tmp_path) is None
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_output_dir(run, kind="finetune")
    assert prepare_output_dir(run, kind="finetune", overwrite=True) == run.resolve()
    assert os.listdir(run) == [MARKER]


def test_a_symlinked_destination_is_checked_where_it_points(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious").write_text("p")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    with pytest.raises(OutputPathError, match="holding other files"):
        check_output_dir(tmp_path / "link", kind="convert", overwrite=True)
    assert (tmp_path / "data" / "precious").exists()
