"""Pre-training a student on a related oracle language (`experiments.pipeline.pretraining`, `pretraining=` configs):
its head learns the word classes, it is trained once and cached (also under concurrent jobs), reproducibly, and a
fine-tuning run starts from it with EMO's cost embedding taken from its head."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.pipeline import pretraining
from experiments.pipeline.data import materialize_oracle
from experiments.pipeline.models import load_tokenizer
from experiments.pipeline.oracle import OracleLanguage
from experiments.pipeline.pretraining import load_student, pretrained_student, pretraining_key
from experiments.pipeline.training import objective_loss

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL_ORACLE = ("data.oracle.vocab_size=64", "data.oracle.num_states=10", "data.block_size=64",
                "data.exact_metrics.num_documents=16", "pretraining.corpus.train_documents=300")
"""experiment=demo_smoke on a 64-word oracle (8 word classes): a few seconds of pre-training."""


def small_cfg(compose_cfg, cache_dir, *overrides):
    return compose_cfg("experiment=demo_smoke", f"paths.cache_dir={cache_dir}", *SMALL_ORACLE, *overrides)


def oracle_tokenizer(cfg):
    materialize_oracle(cfg.data)  # writes the tokenizer the model config names
    return load_tokenizer(cfg.model.tokenizer, cfg.model.special_tokens)


def test_pretrained_head_reflects_word_classes(compose_cfg, tmp_path, one_thread):
    """What EMO's transport cost relies on: after pre-training, words that share a class have closer LM-head rows
    than words that do not; at the random initialisation they do not."""
    cfg = small_cfg(compose_cfg, tmp_path, "pretraining.trainer.max_steps=200", "pretraining.trainer.eval_steps=100",
                    "pretraining.trainer.save_steps=100", "pretraining.trainer.per_device_train_batch_size=16")
    record = pretrained_student(cfg, oracle_tokenizer(cfg))
    initial, trained = record["head_cosine"]["initial"], record["head_cosine"]["pretrained"]
    assert abs(initial["difference"]) < 0.02
    assert trained["same_class"] > trained["cross_class"] + 0.1
    assert trained["difference"] > 10 * abs(initial["difference"])
    assert record["global_step"] == 200 and not record["cached"]
    assert 0.0 < record["domain_distance"]["forward_kl"] < 2.0


def test_student_is_trained_once_and_cached(compose_cfg, tmp_path, monkeypatch, one_thread):
    cfg = small_cfg(compose_cfg, tmp_path)
    tokenizer = oracle_tokenizer(cfg)
    first = pretrained_student(cfg, tokenizer)
    assert not first["cached"] and first["key"] == pretraining_key(cfg, tokenizer)
    directory = Path(first["model_dir"]).parent
    assert directory == tmp_path / "pretrained" / first["key"]
    assert sorted(p.name for p in directory.parent.iterdir()) == [first["key"], f"{first['key']}.lock"]
    assert sorted(p.name for p in directory.iterdir()) == ["model", "pretraining.json"]  # no checkpoints left

    def no_training(*args):
        raise AssertionError("the cached student was trained again")

    monkeypatch.setattr(pretraining, "_pretrain", no_training)
    again = pretrained_student(cfg, tokenizer)
    assert again == {**first, "cached": True}

    # the key follows what determines the weights, and only that
    same = [small_cfg(compose_cfg, tmp_path, "objective=emo", "trainer.max_steps=9", "seed=3"),
            small_cfg(compose_cfg, tmp_path, "data.exact_metrics.num_documents=5"),
            small_cfg(compose_cfg, tmp_path / "elsewhere")]
    different = [small_cfg(compose_cfg, tmp_path, change) for change in (
        "pretraining.oracle.emission_shift=0.7", "pretraining.seed=1", "pretraining.trainer.learning_rate=1e-3",
        "pretraining.corpus.train_documents=301", "data.oracle.seed=1", "model.from_config.n_embd=32")]
    assert {pretraining_key(c, tokenizer) for c in same} == {first["key"]}
    assert len({pretraining_key(c, tokenizer) for c in different} | {first["key"]}) == len(different) + 1

    # the fine-tuning run starts from the cached student; EMO's cost is a frozen copy of its pre-trained head
    model, record = load_student(small_cfg(compose_cfg, tmp_path, "objective=emo"), tokenizer)
    assert record == again
    head = model.get_output_embeddings().weight.detach().clone()
    cost = objective_loss(small_cfg(compose_cfg, tmp_path, "objective=emo").objective, model, cost_source=None,
                          device=head.device).cost_embedding
    torch.testing.assert_close(cost.normalized, torch.nn.functional.normalize(head, dim=-1))
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(1.0)  # fine-tuning moves the head, not the cost
    torch.testing.assert_close(cost.normalized, torch.nn.functional.normalize(head, dim=-1))


def test_pretraining_refuses_other_data_and_models(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=demo_smoke", "data=wikitext2_local", f"paths.cache_dir={tmp_path}")
    with pytest.raises(ValueError, match="needs data=oracle"):
        pretraining.pretraining_data(cfg)
    cfg = compose_cfg("experiment=demo_smoke", "model=gpt2", f"paths.cache_dir={tmp_path}")
    with pytest.raises(ValueError, match="from_config"):
        pretraining.pretraining_data(cfg)
    related = OracleLanguage(**pretraining.pretraining_data(small_cfg(compose_cfg, tmp_path)).oracle)
    assert related.config["domain"] == 1 and related.vocab_size == 64


CONCURRENT_JOB = """
import json, sys, time
from hydra import compose, initialize_config_dir
from experiments.pipeline import pretraining
from experiments.pipeline.data import materialize_oracle
from experiments.pipeline.models import load_tokenizer

with initialize_config_dir(version_base="1.3", config_dir=sys.argv[1]):
    cfg = compose("config", overrides=sys.argv[2:])
materialize_oracle(cfg.data)
tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.special_tokens)
train = pretraining._pretrain
pretraining._pretrain = lambda *args: (time.sleep(4), train(*args))  # hold the lock long enough for the other job
record = pretraining.pretrained_student(cfg, tokenizer)
print(json.dumps({"key": record["key"], "cached": record["cached"]}))
"""


@pytest.mark.slow
def test_concurrent_jobs_train_one_student(tmp_path):
    """Two jobs that need the same student at once: one trains it, the other waits for it and loads it."""
    overrides = ["experiment=demo_smoke", f"paths.cache_dir={tmp_path}", *SMALL_ORACLE]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    jobs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_JOB, str(REPO_ROOT / "conf"), *overrides],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = []
    for job in jobs:
        stdout, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert len({r["key"] for r in results}) == 1
    assert sorted(r["cached"] for r in results) == [False, True]
    assert sorted(p.name for p in (tmp_path / "pretrained").iterdir()) == [results[0]["key"],
                                                                          f"{results[0]['key']}.lock"]


@pytest.mark.slow
def test_pretraining_is_reproducible(compose_cfg, tmp_path, one_thread):
    """The same config pre-trains the same student bit for bit (fresh caches, same process)."""
    records = []
    for name in ("a", "b"):
        cfg = small_cfg(compose_cfg, tmp_path / name)
        records.append(pretrained_student(cfg, oracle_tokenizer(cfg)))
    a, b = (Path(r["model_dir"]) / "model.safetensors" for r in records)
    assert a.read_bytes() == b.read_bytes()
    drop = ("seconds", "model_dir")
    assert {k: v for k, v in records[0].items() if k not in drop} == {k: v for k, v in records[1].items()
                                                                     if k not in drop}
