"""The notebooks in notebooks/ execute top to bottom (nbclient) on the tiny checkpoint, so they cannot rot.

Each notebook's key result is also checked here: identical tokens, a passing comparison, the seeded sampling.
"""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

# A line each notebook must print (its result, not just its absence of errors).
EXPECTED_OUTPUT = {
    "01_quickstart.ipynb": "True False",  # same seed → same tokens, other seed → other tokens
    "02_multi_image_and_video.ipynb": "batch_num_images [2]",
    "03_compare_with_pytorch.ipynb": "PASS: every stage within max abs diff 0.0001",
    "04_sharding.ipynb": "True [",  # sharded tokens == single-device tokens
    "05_finetune.ipynb": "loss fell: True",  # fine-tuning the tiny model halves the loss
}


def test_every_notebook_has_an_expected_output():
    assert sorted(EXPECTED_OUTPUT) == [p.name for p in NOTEBOOKS]


def cell_text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # as a user's fresh kernel: the sharding notebook sets its own
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "\n".join(cell_text(cell) for cell in notebook.cells if cell.cell_type == "code")
    assert EXPECTED_OUTPUT[path.name] in outputs
