"""Track 3 end to end, offline: `experiment=sft_tiny` trains a tiny LLaMA on the repository's Alpaca-GPT4 fixture,
answers the evaluation slice, judges the answers with the fake judge and writes a run record that the tables read;
`experiment=sft_alpaca` composes the reference recipe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.sft import run

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_sft_tiny_trains_generates_judges_and_tabulates(compose_cfg, tmp_path, data_dir):
    results = tmp_path / "results"
    common = [f"paths.results_dir={results}", f"paths.cache_dir={tmp_path / 'cache'}"]
    metrics = run(compose_cfg("experiment=sft_tiny", *common, f"paths.output_dir={tmp_path / 'out'}"))
    (run_dir,) = (results / "sft_tiny").iterdir()
    assert run_dir.name == metrics["run_id"] and json.loads((run_dir / "metrics.json").read_text()) == metrics

    outputs = json.loads((run_dir / "model_outputs.json").read_text())
    references = json.loads((run_dir / "reference_outputs.json").read_text())
    judgements = [json.loads(line) for line in (run_dir / "judgements.jsonl").read_text().splitlines()]
    evals = json.loads((data_dir / "alpaca" / "alpaca_gpt4_eval_20.json").read_text())[:4]
    instructions = [e["instruction"] for e in evals]
    assert [o["instruction"] for o in outputs] == instructions == [r["instruction"] for r in references]
    assert all(set(o) >= {"instruction", "output", "generator"} and o["generator"] == "tiny_llama_mle" for o in outputs)
    assert [r["output"] for r in references] == [e["output"] for e in evals]
    assert len(judgements) == 4 and all(len(j["verdicts"]) == 2 for j in judgements)  # both orders
    assert len(json.loads((run_dir / "annotations.json").read_text())) == 4 and (run_dir / "leaderboard.csv").is_file()

    # the fake judge prefers the longer answer: the 16-token responses lose to the GPT-4 answers
    assert metrics["judge"] == "fake-longer" and (metrics["wins"], metrics["ties"], metrics["losses"]) == (0, 0, 4)
    assert metrics["win_rate"] == 0.0 and metrics["unparseable"] == 0
    assert metrics["model"] == "tiny_llama" and metrics["objective"] == "mle"
    assert metrics["train"] == {"global_step": 4, "gradient_accumulation_steps": 2, "world_size": 1,
                                "skipped_nonfinite_steps": 0, "resumed_from": None,
                                "train_loss": metrics["train"]["train_loss"]}
    assert metrics["data"]["pad_rows_added"] == 1 and metrics["data"]["records"] == 32
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["judge"]["kind"] == "fake"
    assert len(manifest["data_fingerprint"]["instructions_sha256"]) == 64

    from experiments.tables import main as tables_main

    assert tables_main(["--results-dir", str(results), "--experiment", "sft_tiny"]) == 0
    table = (results / "tables" / "instruct_winrate.md").read_text()
    assert "tiny_llama" in table and "fake-longer" in table


def test_sft_alpaca_composes_the_reference_recipe():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    shown = subprocess.run([sys.executable, "run.py", "experiment=sft_alpaca", "model=llama7b", "objective=sft/emo",
                            "--cfg", "job", "--resolve"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    import yaml

    cfg = yaml.safe_load(shown.stdout)
    trainer = cfg["trainer"]
    batch = (trainer["num_train_epochs"], trainer["per_device_train_batch_size"], trainer["global_batch_size"])
    assert batch == (3, 4, 128)
    assert (trainer["learning_rate"], trainer["weight_decay"], trainer["warmup_steps"]) == (2e-5, 0.0, 0.03)
    assert trainer["lr_scheduler_type"] == "cosine" and trainer["mixed_precision"] == "bf16"
    assert trainer["fsdp"] is True and trainer["fsdp_config"]["version"] == 2
    assert cfg["sft"]["model_max_length"] == 512 and cfg["sft"]["tokenize_jointly"] is False
    assert cfg["instructions"]["path"] == "vicgalle/alpaca-gpt4"
    assert cfg["eval_instructions"]["path"] == "tatsu-lab/alpaca_eval"
    assert cfg["objective"]["name"] == "sft/emo" and cfg["objective"]["hparams"] == {"max_ratio": None, "gt_q": True}
    assert cfg["model"]["name"] == "llama7b" and cfg["model"]["cost_embedding"] is None
    assert cfg["model"]["dtype"] == "float32"  # fp32 master weights under bf16 autocast
    assert cfg["recipe"] == "experiments.sft:run"


@pytest.mark.slow
def test_two_process_run_keeps_the_global_batch_and_rank_zero_writes(tmp_path):
    """torchrun with 2 CPU processes (gloo DDP): gradient accumulation drops from 2 to 1 so the global batch stays 4,
    both ranks train, only rank 0 generates, judges and writes the run record."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "EMO_RESULTS_DIR": str(tmp_path / "results"),
           "EMO_LOG_DIR": str(tmp_path / "logs"), "EMO_CACHE_DIR": str(tmp_path / "cache")}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "run.py",
                               "experiment=sft_tiny", "run_id=ddp", "+trainer.use_cpu=true",
                               "+trainer.ddp_find_unused_parameters=false"],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    log = launched.stdout + launched.stderr
    assert log.count("2 per device x 2 process(es) x 1 accumulation steps") == 2
    (run_dir,) = (tmp_path / "results" / "sft_tiny").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run_dir.name == "ddp" and metrics["train"]["world_size"] == 2
    assert metrics["train"]["gradient_accumulation_steps"] == 1 and metrics["train"]["global_step"] == 4
    assert len(json.loads((run_dir / "model_outputs.json").read_text())) == 4


def test_judge_problems_fail_before_training(compose_cfg, tmp_path, monkeypatch):
    """No API key for OpenAI, or an evaluation set without reference answers: an error before any training step."""
    from experiments.pipeline.instruct import InstructionDataError
    from experiments.pipeline.judging.clients import JudgeConfigError

    common = ["experiment=sft_tiny", f"paths.results_dir={tmp_path / 'results'}", f"paths.output_dir={tmp_path / 'o'}"]
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(JudgeConfigError, match="OPENAI_API_KEY"):
        run(compose_cfg(*common, "judge=openai"))
    no_references = tmp_path / "eval.jsonl"
    no_references.write_text('{"instruction": "Name a colour."}\n')
    with pytest.raises(InstructionDataError, match="no reference 'output'"):
        run(compose_cfg(*common, f"eval_instructions.data_files={no_references}"))
    assert not (tmp_path / "o" / "checkpoints").exists() and not (tmp_path / "results").exists()


def test_a_recorded_run_id_is_refused_before_any_work(compose_cfg, tmp_path, monkeypatch):
    """`run_id` of a complete run: FileExistsError at the start (no data read, no training), the record untouched."""
    import experiments.sft

    recorded = tmp_path / "results" / "sft_tiny" / "done"
    recorded.mkdir(parents=True)
    (recorded / "metrics.json").write_text("{}")

    def must_not_run(*args, **kwargs):
        raise AssertionError("the run started although its record exists")

    monkeypatch.setattr(experiments.sft, "load_instruction_records", must_not_run)
    with pytest.raises(FileExistsError, match="'done' of experiment 'sft_tiny' is already complete"):
        run(compose_cfg("experiment=sft_tiny", "run_id=done", f"paths.results_dir={tmp_path / 'results'}",
                        f"paths.output_dir={tmp_path / 'o'}"))
    assert (recorded / "metrics.json").read_text() == "{}" and not (tmp_path / "o" / "checkpoints").exists()
