"""`data=oracle` and the `make demo` pipeline: the corpus and tokenizer materialise deterministically; a shortened
demo (`experiment=demo_smoke`) runs end to end offline (Hydra multirun, then the report), writes exact oracle
metrics, and a rerun in another process repeats its numbers."""

import filecmp
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.pipeline.data import load_text_splits, materialize_oracle
from experiments.pipeline.models import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL_CORPUS = ("data.corpus.train_documents=120", "data.corpus.validation_documents=20",
                "data.corpus.test_documents=30")
DEMO_OBJECTIVES = ("mle", "emo")


def test_oracle_data_materialises_deterministically(compose_cfg, tmp_path):
    dirs = {}
    for name in ("a", "b"):
        cfg = compose_cfg("data=oracle", "model=oracle_gpt2", f"paths.cache_dir={tmp_path / name}", *SMALL_CORPUS)
        paths = materialize_oracle(cfg.data)
        assert materialize_oracle(cfg.data) == paths  # second call: cached
        dirs[name] = Path(paths["train"]).parent
        assert dirs[name].parent == tmp_path / name / "oracle" and len(dirs[name].name) == 12
        assert Path(cfg.model.tokenizer) == tmp_path / name / "oracle" / "tokenizer_512"
    files = ["train.txt", "validation.txt", "test.txt", "oracle.json"]
    assert filecmp.cmpfiles(dirs["a"], dirs["b"], files, shallow=False)[0] == files
    assert dirs["a"].name == dirs["b"].name

    texts = load_text_splits(cfg.data)
    assert {s: len(t) for s, t in texts.items()} == {"train": 120, "validation": 20, "test": 30}
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.special_tokens)
    line = texts["test"][0]["text"]
    assert tokenizer.decode(tokenizer(line, add_special_tokens=False)["input_ids"]) == line
    assert len(tokenizer) == 515 and tokenizer.unk_token_id not in tokenizer(line)["input_ids"]

    other = compose_cfg("data=oracle", f"paths.cache_dir={tmp_path / 'a'}", "data.oracle.seed=1", *SMALL_CORPUS)
    assert Path(materialize_oracle(other.data)["train"]).parent != dirs["a"]


def _comparable(metrics: dict) -> dict:
    """metrics.json without what differs between reruns (ids, paths, timings)."""
    return {k: v for k, v in metrics.items() if k not in ("run_id", "seconds", "train")} | {
        "train_loss": metrics["train"]["train_loss"]}


@pytest.mark.slow
def test_short_demo_end_to_end_and_reproducible(tmp_path, compose_cfg, one_thread):
    from experiments.demo import main as demo_main
    from experiments.lm import run

    env = {**os.environ, "EMO_RESULTS_DIR": str(tmp_path / "results"), "EMO_LOG_DIR": str(tmp_path / "logs"),
           "EMO_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cli = subprocess.run([sys.executable, "run.py", "-m", "experiment=demo_smoke",
                          f"objective={','.join(DEMO_OBJECTIVES)}"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]

    runs = {}
    for run_dir in (tmp_path / "results" / "demo_smoke").iterdir():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        runs[metrics["objective"]] = metrics
    assert set(runs) == set(DEMO_OBJECTIVES)
    for metrics in runs.values():
        exact = metrics["oracle"]
        assert metrics["corpus"] == "oracle" and metrics["model"] == "oracle_gpt2" and metrics["num_prompts"] == 8
        assert 3.0 < exact["oracle_entropy"] < 4.2 and exact["num_tokens"] > 500
        assert 0.0 < exact["forward_kl"] < 10.0 and 0.0 < exact["reverse_kl"] < 10.0 and 0.0 < exact["tvd"] < 1.0
        assert exact["perplexity"] == pytest.approx(math.exp(exact["cross_entropy"]))
        assert exact["perplexity"] > math.exp(exact["oracle_cross_entropy"])
        assert 0.0 < metrics["mauve"]["mean"] <= 1.0

    assert demo_main(["--results-dir", str(tmp_path / "results"), "--experiment", "demo_smoke"]) == 0
    table = (tmp_path / "results" / "tables" / "demo_smoke.md").read_text()
    assert all(f"| {objective} " in table for objective in DEMO_OBJECTIVES) and "forward KL" in table
    png = tmp_path / "results" / "tables" / "demo_smoke.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    cfg = compose_cfg("experiment=demo_smoke", "objective=emo", f"paths.cache_dir={tmp_path / 'cache'}",
                      f"paths.results_dir={tmp_path / 'rerun'}", f"paths.output_dir={tmp_path / 'rerun_out'}")
    assert _comparable(run(cfg)) == _comparable(runs["emo"])
