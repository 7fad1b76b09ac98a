"""`experiment=icl_tiny` end to end, offline: the recipe writes metrics, predictions and manifest; `make tables` then
builds the ICL accuracy table; the OpenICL engine gives the same predictions; the paper config shows the protocol."""

import json
import subprocess
import sys

import pytest

from experiments.icl import run
from experiments.tables import main as tables_main
from tests.conftest import REPO_ROOT


def _overrides(tmp_path, *extra):
    return ["experiment=icl_tiny", "icl.tasks=[sst2,trec]", "icl.max_test_rows=10", f"paths.results_dir={tmp_path}/res",
            f"paths.output_dir={tmp_path}/out", f"paths.cache_dir={tmp_path}/cache", *extra]


@pytest.mark.slow
def test_icl_tiny_writes_run_and_table(tmp_path, compose_cfg, capsys):
    metrics = run(compose_cfg(*_overrides(tmp_path)))
    run_dir = tmp_path / "res" / "icl_tiny" / metrics["run_id"]
    saved = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert saved["icl"]["tasks_order"] == ["sst2", "trec"] and saved["icl"]["shots"] == 8
    assert saved["icl"]["retriever"]["model"] == "minilm" and saved["objective"] == "base"
    assert saved["model"] == "tiny_llama" and saved["model_source"]["adapter"] is None
    for task in ("sst2", "trec"):
        task_metrics = saved["icl"]["tasks"][task]
        assert task_metrics["n"] == 10 and 0 <= task_metrics["accuracy"] <= 1
        task_rows = [r for r in rows if r["task"] == task]
        assert task_metrics["accuracy"] == sum(r["label"] == r["prediction"] for r in task_rows) / 10
        assert all(len(r["scores"]) == (2 if task == "sst2" else 6) for r in task_rows)
    assert saved["mean_accuracy"] == pytest.approx(sum(saved["accuracy"].values()) / 2)
    assert manifest["config"]["icl"]["ice_num"] == 8 and manifest["packages"]["openicl"] == "0.1.8"
    assert list((tmp_path / "cache" / "icl_embeddings").glob("*.npy"))

    assert tables_main(["--results-dir", str(tmp_path / "res"), "--experiment", "icl_tiny"]) == 0
    table = (tmp_path / "res" / "tables" / "icl_accuracy.md").read_text()
    assert "| tiny_llama " in table and "sst2" in table and "average" in table
    assert (tmp_path / "res" / "tables" / "icl_accuracy.tex").is_file()
    assert (tmp_path / "res" / "tables" / "icl_accuracy.csv").read_text().startswith("model,")


@pytest.mark.slow
def test_openicl_engine_gives_the_same_predictions(tmp_path, compose_cfg, data_dir):
    pool = tmp_path / "pool.jsonl"  # a 40-row pool: plain OpenICL embeds it one text at a time
    pool.write_text("".join((data_dir / "fewshot/sst2/train.jsonl").read_text().splitlines(keepends=True)[:40]))
    common = ["icl.tasks=[sst2]", "icl.max_test_rows=6", f"icl.task_specs.sst2.data_files.train={pool}"]
    fast = run(compose_cfg(*_overrides(tmp_path, *common, "run_id=fast")))
    plain = run(compose_cfg(*_overrides(tmp_path, *common, "run_id=plain", "icl.engine=openicl")))
    assert plain["engine"] == "openicl"

    def predictions(run_id):
        path = tmp_path / "res" / "icl_tiny" / run_id / "predictions.jsonl"
        return [(r["index"], r["prediction"]) for r in map(json.loads, path.read_text().splitlines())]

    assert predictions("fast") == predictions("plain")
    assert fast["accuracy"] == plain["accuracy"]


def test_paper_protocol_in_cfg_job():
    out = subprocess.run([sys.executable, "run.py", "experiment=icl_eval", "model=llama7b", "--cfg", "job"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    for expected in ("name_or_path: huggyllama/llama-7b", "ice_num: 8", "all-mpnet-base-v2", "gpt2-xl",
                     "pool_fraction: 0.3", "path: gpt3mix/sst2",
                     "Review: <X> It is positive'\n", "recipe: experiments.icl:run"):
        assert expected in out, expected
