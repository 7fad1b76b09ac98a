"""Resuming and finished runs.

A run killed with SIGKILL after its first checkpoint, rerun with the same command, resumes from its last complete
checkpoint and records exactly the metrics of an uninterrupted run; rerun once more, it says it is complete and
returns its record without training. A checkpoint whose save did not finish is never resumed from. A recorded run
id is returned as it is, refused for another setup, or trained again as a new run with `rerun=true`.
"""

import json
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset
from helpers import run_py, start_run_py
from transformers.trainer_utils import get_last_checkpoint

from emo.training import last_checkpoint
from experiments.pipeline.models import load_causal_lm
from experiments.pipeline.records import build_manifest, flatten, start_run, write_run
from experiments.pipeline.training import build_trainer, resume_checkpoint

# 24 steps over 2.5 epochs of lm_tiny's 64 blocks, a checkpoint (and the best-checkpoint evaluation) every 8 steps,
# the loss logged every 3 (so log windows straddle the checkpoints)
KILLABLE_RUN = ("experiment=lm_tiny", "objective=emo", "trainer.max_steps=24", "trainer.save_steps=8",
                "trainer.eval_steps=8", "trainer.logging_steps=3", "trainer.learning_rate=1e-3")
# what may differ between a resumed run's metrics.json and an uninterrupted one's: its name, wall-clock times and the
# checkpoint it resumed from; the best checkpoint lies in each run's own output dir (its name is compared)
NOT_COMPARED = ("run_id", "seconds", "train.resumed_from", "train.best_checkpoint")


def comparable(metrics: dict) -> dict:
    return {key: value for key, value in flatten(metrics).items()
            if not any(key == name or key.startswith(f"{name}.") for name in NOT_COMPARED)}


@pytest.mark.slow
def test_run_killed_after_its_first_checkpoint_resumes_to_the_uninterrupted_metrics(tmp_path):
    uninterrupted = run_py(*KILLABLE_RUN, "run_id=uninterrupted", root=tmp_path)
    assert uninterrupted.returncode == 0, uninterrupted.stdout[-3000:]

    checkpoints = tmp_path / "logs" / "lm_tiny" / "runs" / "killed" / "checkpoints"
    killed = start_run_py(*KILLABLE_RUN, "run_id=killed", root=tmp_path, log=tmp_path / "killed.log")
    deadline = time.monotonic() + 300
    while last_checkpoint(checkpoints) is None:
        assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert not (tmp_path / "results" / "lm_tiny" / "killed").exists()

    resumed = run_py(*KILLABLE_RUN, "run_id=killed", root=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    checkpoint = re.search(r"Resuming training from checkpoint (\S+)", resumed.stdout).group(1)
    record = tmp_path / "results" / "lm_tiny" / "killed" / "metrics.json"
    metrics = json.loads(record.read_text())
    reference = json.loads((tmp_path / "results" / "lm_tiny" / "uninterrupted" / "metrics.json").read_text())
    assert metrics["train"]["resumed_from"] == checkpoint and Path(checkpoint).parent == checkpoints
    assert Path(checkpoint).name in ("checkpoint-8", "checkpoint-16")
    assert Path(metrics["train"]["best_checkpoint"]).name == Path(reference["train"]["best_checkpoint"]).name
    assert comparable(metrics) == comparable(reference)

    again = run_py(*KILLABLE_RUN, "run_id=killed", root=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "Run 'killed' of experiment 'lm_tiny' is already complete" in again.stdout
    assert "global batch" not in again.stdout and "Resuming" not in again.stdout  # no training at all
    assert json.loads(record.read_text()) == metrics


def test_last_checkpoint_skips_saves_that_did_not_finish(tmp_path):
    complete = tmp_path / "checkpoint-2"
    complete.mkdir()
    (complete / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-4").mkdir()  # killed before its trainer_state.json
    (tmp_path / "checkpoint-4" / "model.safetensors").write_bytes(b"\0" * 16)
    (tmp_path / "checkpoint-6").mkdir()  # killed while writing it
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6, "log_hist')
    (tmp_path / "checkpoint-8").write_text("not a directory")
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-6")  # what transformers would resume from
    assert last_checkpoint(tmp_path) == resume_checkpoint(tmp_path) == str(complete)
    assert last_checkpoint(tmp_path / "missing") is None


class Killed(RuntimeError):
    """Stands in for the process being killed."""


class StepRecorder(transformers.TrainerCallback):
    """Records the optimizer steps this process runs; raises `Killed` after step `kill_at`."""

    def __init__(self, kill_at: int | None = None):
        self.kill_at = kill_at
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        if state.global_step == self.kill_at:
            raise Killed(f"killed at step {state.global_step}")


def blocks(vocab_size: int, count: int = 24, length: int = 16) -> Dataset:
    ids = torch.randint(0, vocab_size, (count, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * count, "labels": ids})


def train(cfg, tokenizer, output_dir, kill_at=None):
    transformers.set_seed(cfg.seed)
    model = load_causal_lm(cfg.model, tokenizer)
    data = blocks(len(tokenizer))
    trainer = build_trainer(cfg, model, output_dir=output_dir, run_name="resume", report_to=[], train_dataset=data,
                            eval_dataset=data.select(range(4)))
    recorder = StepRecorder(kill_at)
    trainer.add_callback(recorder)
    output = trainer.train(resume_from_checkpoint=resume_checkpoint(output_dir))
    return output, trainer.model, recorder.steps


@pytest.mark.slow
def test_a_half_written_checkpoint_is_ignored_and_rewritten(compose_cfg, gpt2_tokenizer, tmp_path, one_thread):
    cfg = compose_cfg("experiment=lm_tiny", "objective=emo", "trainer.max_steps=4", "trainer.save_steps=2",
                      "trainer.eval_steps=2", "trainer.learning_rate=1e-3")
    full, reference, steps = train(cfg, gpt2_tokenizer, tmp_path / "full")
    assert steps == [1, 2, 3, 4]

    with pytest.raises(Killed):
        train(cfg, gpt2_tokenizer, tmp_path / "killed", kill_at=3)
    half_written = tmp_path / "killed" / "checkpoint-4"  # the next save, killed before its trainer_state.json
    shutil.copytree(tmp_path / "killed" / "checkpoint-2", half_written)
    (half_written / "trainer_state.json").unlink()
    (half_written / "model.safetensors").write_bytes(b"\0" * 16)
    resumed, model, steps = train(cfg, gpt2_tokenizer, tmp_path / "killed")

    assert steps == [3, 4] and resumed.global_step == full.global_step == 4  # only the steps after checkpoint-2
    for (name, expected), actual in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, msg=name)
    assert last_checkpoint(tmp_path / "killed") == str(half_written)  # saved again, completely


def recorded_run_cfg(compose_cfg, tmp_path, *overrides):
    return compose_cfg("experiment=lm_tiny", "run_id=done", f"paths.results_dir={tmp_path / 'results'}",
                       f"paths.output_dir={tmp_path / 'runs' / 'done'}", *overrides)


def test_a_recorded_run_is_returned_refused_for_another_setup_or_rerun_as_a_new_run(compose_cfg, tmp_path,
                                                                                    monkeypatch):
    import experiments.lm

    cfg = recorded_run_cfg(compose_cfg, tmp_path)
    write_run(tmp_path / "results", "lm_tiny", "done", metrics={"mauve": 0.5},
              manifest=build_manifest(cfg, run_id="done", seeds={}, data_fingerprint={}, output_dir="x"))

    def must_not_run(*args, **kwargs):
        raise AssertionError("a recorded run started again")

    monkeypatch.setattr(experiments.lm, "load_text_splits", must_not_run)
    assert experiments.lm.run(recorded_run_cfg(compose_cfg, tmp_path)) == {"mauve": 0.5}
    with pytest.raises(FileExistsError, match=r"'done' of experiment 'lm_tiny' is already complete .* another setup; "
                                              r"these keys differ: \[.*'objective.name'\]"):
        start_run(recorded_run_cfg(compose_cfg, tmp_path, "objective=emo2"))
    with pytest.raises(FileExistsError, match=r"these keys differ: \['seed'\]"):
        start_run(recorded_run_cfg(compose_cfg, tmp_path, "seed=7"))

    rerun = start_run(recorded_run_cfg(compose_cfg, tmp_path, "rerun=true"))
    assert not rerun.complete and re.fullmatch(r"done_rerun_20\d{6}T\d{6}Z_[0-9a-f]{6}", rerun.run_id)
    assert rerun.output_dir == tmp_path / "runs" / rerun.run_id and (rerun.output_dir / "run.lock").is_file()
    assert json.loads((tmp_path / "results" / "lm_tiny" / "done" / "metrics.json").read_text()) == {"mauve": 0.5}
