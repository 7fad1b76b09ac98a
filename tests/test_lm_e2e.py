"""Track 1 end to end, for real and offline: tiny GPT-2 + real GPT-2 tokenizer + real WikiText-2 text, every
objective trains a few steps, samples, gets MAUVE (MiniLM features), writes its run record; then the table is built."""

import json
import os
import subprocess
import sys
import time

import pytest

import emo
from experiments.lm import run
from experiments.tables import main as tables_main

pytestmark = pytest.mark.slow
CLI_OBJECTIVE = "adaptive_emo"   # run through `run.py -m` (Hydra multirun) instead of in-process
WANDB_OBJECTIVE = "emo2"         # run with tracker=wandb in offline mode


def check_run(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert metrics["corpus"] == "wikitext2_local" and metrics["run_id"] == run_dir.name
    assert metrics["num_prompts"] == 8 and metrics["sampling_seeds"] == [0, 1]
    assert 0.0 < metrics["mauve"]["mean"] <= 1.0 and len(metrics["mauve"]["values"]) == 2
    assert 1.0 < metrics["test_perplexity"] < 2 * 50257 and metrics["train"]["global_step"] == 2
    assert 0.0 <= metrics["diversity"]["distinct_2"]["mean"] <= 1.0
    assert set(manifest) >= {"config", "setup", "git_commit", "packages", "seeds", "data_fingerprint", "hardware"}
    assert manifest["config"]["objective"]["label"] == metrics["objective"]
    assert metrics["objective_name"] == manifest["config"]["objective"]["name"]
    assert metrics["objective_hparams"] == manifest["config"]["objective"]["hparams"]
    assert manifest["setup"]["prompts.prefix_words"] == 10 and "seed" not in manifest["setup"]
    assert manifest["seeds"] == {"training": 42, "sampling": [0, 1], "mauve_kmeans": [25]}
    assert manifest["packages"]["scikit-learn"] and manifest["packages"]["peft"] and manifest["packages"]["faiss-cpu"]
    assert metrics["train"]["resumed_from"] is None
    assert len(manifest["data_fingerprint"]["blocks_sha256"]["all"]) == 64
    assert len(rows) == 16 and {r["seed"] for r in rows} == {0, 1}
    assert all(r["prediction"].startswith(r["prefix"]) and r["gold"].startswith(r["prefix"]) for r in rows)
    assert all(len(r["prediction"].split()) <= 10 + 12 for r in rows)
    return metrics, manifest


def test_track1_tiny_all_objectives(tmp_path, compose_cfg, data_dir, monkeypatch):
    results = tmp_path / "results"
    start = time.monotonic()
    fingerprints, mauve = set(), {}
    for objective in emo.OBJECTIVES:
        if objective == CLI_OBJECTIVE:
            continue
        overrides = ["experiment=lm_tiny", f"objective={objective}", f"paths.results_dir={results}",
                     f"paths.output_dir={tmp_path / 'out' / objective}"]
        if objective == WANDB_OBJECTIVE:
            monkeypatch.setenv("WANDB_MODE", "offline")
            overrides.append("tracker=wandb")
        run(compose_cfg(*overrides))
        monkeypatch.setenv("WANDB_MODE", "disabled")
    assert list((tmp_path / "out" / WANDB_OBJECTIVE / "wandb").glob("offline-run-*/run-*.wandb"))

    env = {**os.environ, "EMO_RESULTS_DIR": str(results), "EMO_LOG_DIR": str(tmp_path / "logs")}
    cli = subprocess.run([sys.executable, "run.py", "-m", "experiment=lm_tiny", f"objective={CLI_OBJECTIVE}"],
                         cwd=os.path.dirname(os.path.dirname(__file__)), env=env, capture_output=True, text=True,
                         timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert list((tmp_path / "logs" / "lm_tiny" / "multiruns").glob(f"*/0_objective={CLI_OBJECTIVE}/checkpoints"))

    run_dirs = sorted((results / "lm_tiny").iterdir())
    assert len(run_dirs) == len(emo.OBJECTIVES) and not [d for d in run_dirs if d.name.startswith(".")]
    for run_dir in run_dirs:
        metrics, manifest = check_run(run_dir)
        fingerprints.add(manifest["data_fingerprint"]["blocks_sha256"]["all"])
        mauve[metrics["objective"]] = metrics["mauve"]["mean"]
    assert len(fingerprints) == 1 and set(mauve) == set(emo.OBJECTIVES)

    assert tables_main(["--results-dir", str(results), "--experiment", "lm_tiny"]) == 0
    table = (results / "tables" / "lm_mauve_tiny_gpt2.md").read_text()
    best = max(mauve.values())
    for objective, value in mauve.items():
        assert f"| {objective} " in table
        assert (f"| **{value:.3f} ±" in table.split(f"| {objective} ")[1].splitlines()[0]) == (value == best)
    print(table, f"\nTrack-1 tiny e2e: {time.monotonic() - start:.1f} s")
