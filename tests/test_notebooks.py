"""The notebooks are stored without outputs, and every one executes with nbclient (`make notebooks`) against the
results of the tiny experiments of every track (`make tiny-results`, run once for this module); a plotting notebook
without its runs fails with a message naming the command that produces them."""

import json
import os
import subprocess
import sys

import pytest

from experiments.notebooks import NOTEBOOKS_DIR, REPO_ROOT, MissingResults, main, runs_by_experiment
from experiments.pipeline.records import write_run

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
PLOTTING = ("track1_language_modeling.ipynb", "demo_oracle.ipynb", "track2_icl.ipynb",
            "track3_instruction_tuning.ipynb")
"""One notebook per track plus the demo: each reads runs only and draws at least one figure."""


def test_there_is_a_notebook_per_track_and_the_demo():
    assert set(PLOTTING) <= {path.name for path in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = json.loads(path.read_text())
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code_cells and all(not cell["outputs"] and cell["execution_count"] is None for cell in code_cells)


def has_mauve(run):
    return "mauve" in run


def test_runs_by_experiment_selects_and_names_what_is_missing(tmp_path):
    for experiment, run_id, metrics in (("lm_tiny", "a", {"mauve": 0.9}), ("lm_tiny", "b", {"icl": {}}),
                                        ("other", "c", {"mauve": 0.8})):
        write_run(tmp_path, experiment, run_id, metrics=metrics, manifest={})
    runs = runs_by_experiment(has_mauve, what="MAUVE runs", how="`make x`", root=tmp_path)
    assert {experiment: [run["mauve"] for run in members] for experiment, members in runs.items()} == {
        "lm_tiny": [0.9], "other": [0.8]}
    assert list(runs_by_experiment(has_mauve, what="MAUVE runs", how="`make x`", root=tmp_path,
                                   experiments=["other"])) == ["other"]
    with pytest.raises(MissingResults, match=r"No MAUVE runs of experiments \['lm_gpt2'\] under .*`make x`"):
        runs_by_experiment(has_mauve, what="MAUVE runs", how="`make x`", root=tmp_path, experiments=["lm_gpt2"])
    with pytest.raises(MissingResults, match="EMO_RESULTS_DIR"):
        runs_by_experiment(has_mauve, what="MAUVE runs", how="`make x`", root=tmp_path / "absent")


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """`make tiny-results` (its install step taken as done: `-o install`) into a fresh results folder, once."""
    root = tmp_path_factory.mktemp("tiny")
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAKE") and key != "MFLAGS"}
    env.update(EMO_RESULTS_DIR=str(root / "results"), EMO_LOG_DIR=str(root / "logs"), EMO_CACHE_DIR=str(root / "cache"))
    made = subprocess.run(["make", "--no-print-directory", "-o", "install", "tiny-results", f"PY={sys.executable}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-4000:]
    return root / "results"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_on_the_tiny_results(path, tiny_results):
    assert main(["--results-dir", str(tiny_results), str(path)]) == 0
    executed = json.loads((tiny_results / "notebooks" / path.name).read_text())
    outputs = [output for cell in executed["cells"] if cell["cell_type"] == "code" for output in cell["outputs"]]
    assert outputs and not [output for output in outputs if output["output_type"] == "error"]
    if path.name in PLOTTING:
        assert any("image/png" in output.get("data", {}) for output in outputs), "no figure was drawn"


@pytest.mark.slow
@pytest.mark.parametrize("name", PLOTTING)
def test_notebook_without_its_runs_fails_naming_the_command(name, tmp_path, capsys):
    assert main(["--results-dir", str(tmp_path), str(NOTEBOOKS_DIR / name)]) == 1
    assert f"{name}: MissingResults: " in capsys.readouterr().err
    executed = json.loads((tmp_path / "notebooks" / name).read_text())
    errors = [output for cell in executed["cells"] if cell["cell_type"] == "code" for output in cell["outputs"]
              if output["output_type"] == "error"]
    assert [error["ename"] for error in errors] == ["MissingResults"] and "make tiny-results" in errors[0]["evalue"]
