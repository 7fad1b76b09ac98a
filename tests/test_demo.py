"""`data=oracle` and the `make demo` pipeline: the corpus and tokenizer materialise deterministically; a shortened
demo (`experiment=demo_smoke`: pre-trained student's row, Hydra multirun of fine-tuning objectives, then the report)
runs end to end offline, writes exact oracle metrics, and a rerun in another process repeats its numbers."""

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
    """The Makefile's demo steps on `experiment=demo_smoke`: the pre-trained student's own row (pre-training it into
    the cache), the objectives fine-tuning it (Hydra multirun), the report; a rerun repeats a run's numbers."""
    from experiments.demo import PRETRAINED_ROW
    from experiments.demo import main as demo_main
    from experiments.lm import run

    env = {**os.environ, "EMO_RESULTS_DIR": str(tmp_path / "results"), "EMO_LOG_DIR": str(tmp_path / "logs"),
           "EMO_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    for command in (["experiment=demo_smoke", "trainer.max_steps=0", "objective.label=untrained"],
                    ["-m", "experiment=demo_smoke", f"objective={','.join(DEMO_OBJECTIVES)}"]):
        cli = subprocess.run([sys.executable, "run.py", *command], cwd=REPO_ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert cli.returncode == 0, cli.stderr[-3000:]

    runs = {}
    for run_dir in (tmp_path / "results" / "demo_smoke").iterdir():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        runs[metrics["objective"]] = metrics
    assert set(runs) == {"untrained", *DEMO_OBJECTIVES}
    for metrics in runs.values():
        exact = metrics["oracle"]
        assert metrics["corpus"] == "oracle" and metrics["model"] == "oracle_gpt2" and metrics["num_prompts"] == 8
        assert 3.0 < exact["oracle_entropy"] < 4.2 and exact["num_tokens"] > 500
        assert 0.0 < exact["forward_kl"] < 10.0 and 0.0 < exact["reverse_kl"] < 10.0 and 0.0 < exact["tvd"] < 1.0
        assert exact["perplexity"] == pytest.approx(math.exp(exact["cross_entropy"]))
        assert exact["perplexity"] > math.exp(exact["oracle_cross_entropy"])
        assert 0.0 < metrics["mauve"]["mean"] <= 1.0
        assert metrics["pretraining"]["key"] == runs["untrained"]["pretraining"]["key"]
        assert metrics["pretraining"]["cached"] == (metrics["objective"] != "untrained")  # trained once, first
        assert metrics["train"]["global_step"] == (0 if metrics["objective"] == "untrained" else 4)
    assert runs["untrained"]["pretraining"]["global_step"] == 20

    assert demo_main(["--results-dir", str(tmp_path / "results"), "--experiment", "demo_smoke"]) == 0
    table = (tmp_path / "results" / "tables" / "demo_smoke.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows == [PRETRAINED_ROW, *DEMO_OBJECTIVES, "oracle (reference)"]
    assert "forward KL" in table and "share a class" in table
    png = tmp_path / "results" / "tables" / "demo_smoke.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    cfg = compose_cfg("experiment=demo_smoke", "objective=emo", f"paths.cache_dir={tmp_path / 'cache'}",
                      f"paths.results_dir={tmp_path / 'rerun'}", f"paths.output_dir={tmp_path / 'rerun_out'}")
    assert _comparable(run(cfg)) == _comparable(runs["emo"])


def test_demo_table_puts_the_starting_point_first_outside_the_ranking():
    """The untrained (pre-trained) run is the first row and never bold, even where it is best; the caption reports
    the pre-trained head's cosines."""
    from experiments.demo import PRETRAINED_ROW, demo_table, report_table

    record = {"key": "k", "global_step": 800, "spec": {"objective": {"label": "mle"}},
              "domain_distance": {"forward_kl": 0.3, "reverse_kl": 0.7, "tvd": 0.2},
              "head_cosine": {"initial": {"same_class": 0.0, "cross_class": 0.0},
                              "pretrained": {"same_class": 0.4, "cross_class": 0.25}}}

    def oracle_run(objective, steps, forward_kl, mauve):
        return {"experiment": "demo", "run_id": objective, "objective": objective, "train": {"global_step": steps},
                "pretraining": record, "mauve": {"mean": mauve, "std": 0.01, "values": [mauve]},
                "diversity": {"distinct_1": {"mean": 0.2, "std": 0.0, "values": [0.2]}},
                "gold_diversity": {"distinct_1": 0.2},
                "oracle": {"forward_kl": forward_kl, "reverse_kl": 0.8, "tvd": 0.3, "perplexity": 50.0,
                           "oracle_cross_entropy": 3.6}}

    runs = [oracle_run("emo", 300, 0.4, 0.95), oracle_run("untrained", 0, 0.5, 0.99), oracle_run("mle", 300, 0.3, 0.9)]
    _, cells = demo_table(runs)
    assert list(cells.index) == [PRETRAINED_ROW, "mle", "emo", "oracle (reference)"]
    assert cells.loc[PRETRAINED_ROW, "MAUVE ↑"] == "0.990 ± 0.010"
    assert cells.loc["emo", "MAUVE ↑"] == "**0.950 ± 0.010**" and cells.loc["mle", "forward KL ↓"] == "**0.300**"
    caption = report_table(runs).caption
    assert "share a class 0.400, across classes 0.250" in caption and "forward KL 0.300 / reverse KL 0.700" in caption
