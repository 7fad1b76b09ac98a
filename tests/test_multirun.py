"""Concurrent jobs never collide: launches started together get their own output dirs and run ids, so do the jobs of
one sweep (run in parallel by the submitit local launcher), a second live process for the same run is refused (until
the first is killed), and processes loading the same oracle corpus at once (its cache, the datasets cache) leave one
complete cache."""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT, opened_runs, run_env, run_py, start_run_py

from experiments.pipeline.data import load_text_splits
from experiments.pipeline.records import new_run_id

PROBE = "recipe=tests.helpers:open_run_only"


def wait_for(condition, what: str, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_run_ids_differ_between_jobs_and_agree_within_one():
    launch = "20260101T000000Z_abcdef"
    assert new_run_id("ptb", "emo", launch=launch, job="/a") == new_run_id("ptb", "emo", launch=launch, job="/a")
    assert new_run_id("ptb", "emo", launch=launch, job="/a") != new_run_id("ptb", "emo", launch=launch, job="/b")
    assert new_run_id("ptb", "emo", launch=launch, job="/a") != new_run_id("ptb", "emo", job="/a")  # another launch
    assert new_run_id("x", launch=launch).startswith("20260101T000000Z_x_")


@pytest.mark.slow
def test_launches_started_together_get_their_own_dirs_and_ids(tmp_path):
    logs = [tmp_path / f"{i}.log" for i in range(2)]
    processes = [start_run_py(PROBE, root=tmp_path, log=log) for log in logs]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    (first,), (second,) = (opened_runs(log.read_text()) for log in logs)
    assert first["output_dir"] != second["output_dir"] and first["run_id"] != second["run_id"]
    assert len(list((tmp_path / "logs" / "default" / "runs").iterdir())) == 2


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_jobs_of_one_sweep_get_their_own_dirs_and_ids(tmp_path, launcher):
    swept = run_py("-m", f"hydra/launcher={launcher}", PROBE, "seed=1,2", root=tmp_path)
    assert swept.returncode == 0, swept.stdout[-3000:]
    (sweep,) = (tmp_path / "logs" / "default" / "multiruns").iterdir()  # one sweep dir, named by the launch
    output = swept.stdout + "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.out"))
    jobs = opened_runs(output)
    assert len(jobs) == 2 and len({job["run_id"] for job in jobs}) == 2
    directories = sorted(Path(job["output_dir"]) for job in jobs)  # <sweep>/<job number>_<its overrides>
    assert [d.parent for d in directories] == [sweep.resolve()] * 2
    assert [d.name[:2] for d in directories] == ["0_", "1_"]


@pytest.mark.slow
def test_a_run_in_use_is_refused_until_its_process_is_killed(tmp_path):
    holder = start_run_py(PROBE, "run_id=shared", "+hold_seconds=120", root=tmp_path, log=tmp_path / "holder.log")
    try:
        wait_for(lambda: opened_runs((tmp_path / "holder.log").read_text()), "the first process to open the run")
        second = run_py(PROBE, "run_id=shared", root=tmp_path)
        assert second.returncode != 0
        assert "Another process is running in" in second.stdout and "shared" in second.stdout
    finally:
        holder.kill()
        holder.wait()
    third = run_py(PROBE, "run_id=shared", root=tmp_path)  # the killed holder's lock is gone with it
    assert third.returncode == 0, third.stdout[-3000:]


LOAD_ORACLE_CORPUS = """
import hashlib, json, sys, time
from pathlib import Path
from experiments.pipeline.data import load_text_splits
cfg, go = json.loads(sys.argv[1]), Path(sys.argv[2])
Path(f"{go}.{sys.argv[3]}").touch()  # ready
while not go.exists():
    time.sleep(0.01)
splits = load_text_splits(cfg)  # writes the oracle corpus cache, then the datasets cache of its files
print(json.dumps({split: hashlib.sha256("\\n".join(ds["text"]).encode()).hexdigest() for split, ds in splits.items()}))
"""


@pytest.mark.slow
def test_concurrent_loads_of_the_oracle_corpus_leave_one_complete_cache(compose_cfg, tmp_path):
    """Three processes load the same oracle corpus at once, sharing its cache dir and the datasets cache (conftest's
    HF_DATASETS_CACHE): each gets the corpus a process alone builds, and the cache holds exactly what it would."""
    from omegaconf import OmegaConf

    def oracle_cfg(cache):
        cfg = compose_cfg("data=oracle", f"paths.cache_dir={cache}", "data.corpus.train_documents=400",
                          "data.corpus.validation_documents=50", "data.corpus.test_documents=50")
        return OmegaConf.to_container(cfg.data, resolve=True)

    go = tmp_path / "go"
    loaders = [subprocess.Popen([sys.executable, "-c", LOAD_ORACLE_CORPUS, json.dumps(oracle_cfg(tmp_path / "shared")),
                                 str(go), str(n)], cwd=REPO_ROOT, env=run_env(tmp_path), stdout=subprocess.PIPE,
                                text=True)
               for n in range(3)]
    wait_for(lambda: len(list(tmp_path.glob("go.*"))) == 3, "the loaders to start")
    go.touch()  # all three load at once
    outputs = [loader.communicate(timeout=300)[0] for loader in loaders]
    assert [loader.returncode for loader in loaders] == [0, 0, 0]

    alone = tmp_path / "alone"
    reference = {split: hashlib.sha256("\n".join(ds["text"]).encode()).hexdigest()
                 for split, ds in load_text_splits(oracle_cfg(alone)).items()}
    assert [json.loads(output.splitlines()[-1]) for output in outputs] == [reference] * 3
    shared, single = tmp_path / "shared" / "oracle", alone / "oracle"
    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in single.iterdir())
    assert not list(shared.rglob(".*"))  # no temporary directory left behind
    for path in single.rglob("*"):
        if path.is_file():
            assert (shared / path.relative_to(single)).read_bytes() == path.read_bytes(), path
