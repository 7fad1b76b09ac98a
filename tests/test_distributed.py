"""torchrun and `accelerate launch` with 2 CPU processes (gloo DDP): the Track-1 tiny experiment trains with the
losses of a 1-process run of the same global batch and writes one output dir and one record; every rank derives the
same output dir and run id without being given one, and ranks that disagree stop with an error naming what differs.
No `use_cpu` is given: a multi-process launch on CPU trains as one DDP run by default."""

import json
import sys
from pathlib import Path

import pytest
from helpers import TORCHRUN, opened_runs, run_py

TWO_PROCESSES = (*TORCHRUN, "--nproc_per_node", "2")
ACCELERATE_TWO_PROCESSES = (str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
                            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                            "--dynamo_backend", "no")  # --multi_gpu: accelerate's torchrun path, gloo on CPU
STEPS = 6
LM_TINY = ("experiment=lm_tiny", "objective=emo2", "trainer.global_batch_size=8", f"trainer.max_steps={STEPS}",
           f"trainer.save_steps={STEPS}", f"trainer.eval_steps={STEPS}", "trainer.logging_steps=1",
           "+trainer.ddp_find_unused_parameters=false", "generation.num_seeds=1",
           *(f"+model.from_config.{name}=0.0" for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")))


def only_child(directory):
    (child,) = directory.iterdir()
    return child


def step_losses(run_dir) -> list[float]:
    """The training loss of every optimizer step, from the run's last checkpoint."""
    state = json.loads((run_dir / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    one = run_py(*LM_TINY, root=tmp_path / "one")
    assert one.returncode == 0, one.stdout[-3000:]
    assert "global batch 8 = 4 per device x 1 process(es) x 2 accumulation steps" in one.stdout
    single = step_losses(only_child(tmp_path / "one" / "logs" / "lm_tiny" / "runs"))
    assert len(single) == STEPS
    for name, launcher in (("torchrun", TWO_PROCESSES), ("accelerate", ACCELERATE_TWO_PROCESSES)):
        two = run_py(*LM_TINY, root=tmp_path / name, launcher=launcher)
        assert two.returncode == 0, two.stdout[-3000:]
        assert two.stdout.count("global batch 8 = 4 per device x 2 process(es) x 1 accumulation steps") == 2
        record = only_child(tmp_path / name / "results" / "lm_tiny")  # one record, written by rank 0
        run_dir = only_child(tmp_path / name / "logs" / "lm_tiny" / "runs")  # one output dir, shared by both ranks
        metrics = json.loads((record / "metrics.json").read_text())
        assert metrics["run_id"] == record.name and metrics["train"]["global_step"] == STEPS
        double = step_losses(run_dir)
        assert len(double) == STEPS and max(abs(a - b) for a, b in zip(single, double)) < 1e-5, (name, single, double)


@pytest.mark.slow
def test_every_rank_derives_the_same_run_without_a_run_id(tmp_path):
    launched = run_py("recipe=tests.helpers:open_run_only", root=tmp_path, launcher=TWO_PROCESSES)
    assert launched.returncode == 0, launched.stdout[-3000:]
    opened = sorted(opened_runs(launched.stdout), key=lambda run: run["rank"])
    assert [run["rank"] for run in opened] == [0, 1]
    assert opened[0]["run_id"] == opened[1]["run_id"] and opened[0]["output_dir"] == opened[1]["output_dir"]
    assert len(list((tmp_path / "logs" / "default" / "runs").iterdir())) == 1


@pytest.mark.slow
def test_ranks_that_disagree_on_the_run_stop_with_a_clear_error(tmp_path):
    launched = run_py(*LM_TINY, "run_id=rank${oc.env:RANK}", root=tmp_path, launcher=TWO_PROCESSES)
    assert launched.returncode != 0
    assert "The 2 processes of this run disagree on ['output_dir', 'run_id']" in launched.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_launch_the_trainer_would_not_join_is_refused(tmp_path):
    launched = run_py(*LM_TINY, "+trainer.use_cpu=false", root=tmp_path, launcher=TWO_PROCESSES)
    assert launched.returncode != 0
    assert "2 processes were launched but the Trainer would train on 1" in launched.stdout
    assert not list((tmp_path / "results").rglob("metrics.json"))
