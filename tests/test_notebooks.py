"""The notebooks run top to bottom (their cells assert what they show) and are stored without outputs."""

import json
import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ has no .ipynb files"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_is_clean(path, monkeypatch):
    notebook = json.loads(path.read_text())
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code_cells and all(not cell["outputs"] and cell["execution_count"] is None for cell in code_cells)
    monkeypatch.chdir(path.parent)
    namespace = {"__name__": "__notebook__"}
    for number, cell in enumerate(code_cells):
        exec(compile("".join(cell["source"]), f"{path.name}[code cell {number}]", "exec"), namespace)
    assert os.getcwd() == str(path.parent)
