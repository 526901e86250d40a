"""The repository speaks of the project only: no tracked text file (code, docs, notebook outputs) holds a path of
the machine it was written on."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Home, scratch and pytest/tempfile directories of a development machine (split so this file does not match).
MACHINE_PATH = re.compile("|".join(re.escape("/" + part) for part in ("root/", "tmp/tmp", "work/")))


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / name for name in listed.decode().split("\0") if name]


def test_no_tracked_text_file_holds_a_machine_path():
    found = []
    for path in tracked_files():
        if not path.is_file():  # deleted in the working tree, or a submodule
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary
            continue
        text = data.decode("utf-8", errors="replace")
        found += [f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
                  for m in MACHINE_PATH.finditer(text)]
    assert not found, "machine paths in tracked files:\n" + "\n".join(found[:20])
