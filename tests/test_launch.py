"""Scale-out entry points: the SLURM launcher config composes, run.py turns SLURM task variables into the
torch.distributed environment the Trainer reads (as torchrun would), and a 2-job sweep runs through the local submitit
launcher (`hydra/launcher=local`)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
SLURM_TASK = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
              "SLURM_LOCALID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
              "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_STEP_NODELIST": "gpu[01-02]"}
DISTRIBUTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clear_env(monkeypatch, names) -> None:
    """Unset `names` for this test; teardown restores (or removes) whatever the code under test exported."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def load_run_module():
    spec = importlib.util.spec_from_file_location("emo_run_entry", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slurm_launcher_config_composes(compose_cfg):
    cfg = compose_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60",
                      "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4", return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["timeout_min"] == 60
    assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 4 and launcher["tasks_per_node"] == 4
    local = OmegaConf.to_container(compose_cfg("hydra/launcher=local", return_hydra_config=True).hydra.launcher)
    assert local["_target_"].endswith("LocalLauncher") and local["gpus_per_node"] == 0


@pytest.mark.slow
def test_two_job_sweep_through_the_local_submitit_launcher(tmp_path):
    """`run.py -m hydra/launcher=local experiment=lm_tiny objective=mle,emo`: two submitit jobs (own processes, run
    in parallel), each completes and writes its own run directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "EMO_RESULTS_DIR": str(tmp_path / "results"),
           "EMO_LOG_DIR": str(tmp_path / "logs"), "EMO_CACHE_DIR": str(tmp_path / "cache")}
    launched = subprocess.run([sys.executable, "run.py", "-m", "hydra/launcher=local", "experiment=lm_tiny",
                               "objective=mle,emo", "generation.num_seeds=1", "prompts.max_prompts=4"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in launched.stdout + launched.stderr
    run_dirs = sorted((tmp_path / "results" / "lm_tiny").iterdir())
    metrics = [json.loads((run_dir / "metrics.json").read_text()) for run_dir in run_dirs]
    assert len(run_dirs) == 2 and sorted(m["objective"] for m in metrics) == ["emo", "mle"]
    assert [m["run_id"] for m in metrics] == [run_dir.name for run_dir in run_dirs]
    (sweep,) = (tmp_path / "logs" / "lm_tiny" / "multiruns").iterdir()
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # one finished submitit job per sweep point


def test_multi_task_slurm_job_exports_torch_distributed_env(monkeypatch):
    clear_env(monkeypatch, (*DISTRIBUTED, "CUDA_VISIBLE_DEVICES"))
    for name, value in SLURM_TASK.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("subprocess.check_output", lambda *a, **k: b"gpu01\ngpu02\n")
    load_run_module().export_slurm_distributed_env()
    exported = {name: os.environ[name] for name in DISTRIBUTED}
    assert exported["RANK"] == "3" and exported["WORLD_SIZE"] == "4" and exported["LOCAL_RANK"] == "1"
    assert exported["LOCAL_WORLD_SIZE"] == "2" and exported["MASTER_ADDR"] == "gpu01"
    assert 20000 <= int(exported["MASTER_PORT"]) <= 60000
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # every task sees the node's GPUs; LOCAL_RANK picks one


def test_torchrun_or_single_task_jobs_are_left_alone(monkeypatch):
    clear_env(monkeypatch, DISTRIBUTED)
    for name, value in SLURM_TASK.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RANK", "0")
    load_run_module().export_slurm_distributed_env()
    assert "WORLD_SIZE" not in os.environ
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    load_run_module().export_slurm_distributed_env()
    assert "RANK" not in os.environ


def test_zz_no_distributed_variables_leak_from_these_tests():
    assert not any(name in os.environ for name in DISTRIBUTED)  # runs last in this module
