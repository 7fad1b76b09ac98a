"""The Hub code path, offline in CI: the real `huggingface_hub`, `datasets` and `transformers` clients load every
configured resource from a loopback Hub (tests/loopback_hub.py) that holds small replicas laid out like the real
repositories at the pinned revisions. Script-only repositories are refused, label orders are the reference's, and a
run's manifest records the commit behind each resource."""

import json
import random
import time

import pytest
from omegaconf import OmegaConf

from experiments.pipeline import hub
from experiments.pipeline.data import load_text_splits
from experiments.pipeline.icl import load_task, read_trec_labels
from experiments.pipeline.instruct import InstructionDataError, load_instruction_records
from experiments.pipeline.models import build_cost_embedding, load_causal_lm, load_tokenizer
from loopback_hub import on_loopback, read_jsonl
from tests.conftest import require_data

# The label order each task's templates follow, as the reference ran them (templates in conf/icl/task/*.yaml), and
# the class names the Hub's features give those ids where it declares them.
REFERENCE_LABELS = {"tweet_eval": [0, 1, 2, 3], "trec": [0, 1, 2, 3, 4, 5], "sst2": [0, 1], "subj": [0, 1],
                    "cr": [1, 0], "rt": [1, 0], "ag_news": [0, 1, 2, 3]}
CLASS_NAMES = {"tweet_eval": ["anger", "joy", "optimism", "sadness"], "rt": ["neg", "pos"],
               "ag_news": ["World", "Sports", "Business", "Sci/Tech"]}
FIXTURE_COLUMNS = {"trec": ("text", "coarse_label")}


def paper_tasks(compose_cfg, loopback) -> dict:
    """The paper's task specs, TREC's file URLs moved to the loopback's other origin (same paths)."""
    specs = OmegaConf.to_container(compose_cfg("experiment=icl_eval", "model=tiny_llama").icl.task_specs, resolve=True)
    specs["trec"]["hub"]["files"] = {s: on_loopback(loopback, url) for s, url in specs["trec"]["hub"]["files"].items()}
    return specs


@pytest.mark.parametrize("name", list(REFERENCE_LABELS))
def test_each_icl_task_loads_from_its_replica_as_configured(name, hub_online, compose_cfg, data_dir):
    spec = paper_tasks(compose_cfg, hub_online)[name]
    task = load_task(name, spec, source="hub")
    assert task.labels == REFERENCE_LABELS[name] and task.label_column == spec["label_column"]

    fixture = {split: read_jsonl(data_dir / "fewshot" / name / f"{split}.jsonl") for split in ("train", "test")}
    columns = FIXTURE_COLUMNS.get(name, ("text", "label"))
    if name == "trec":  # the original files: the fixture's rows were drawn from them (data/fewshot/SOURCES.md)
        picks = {"train": sorted(random.Random(0).sample(range(5452), 300)),
                 "test": sorted(random.Random(1).sample(range(500), 120))}
        rows = {"train": task.pool, "test": task.test}
        assert len(task.pool) == 5452 and len(task.test) == 500
        for split, indices in picks.items():
            assert [{c: rows[split][i][c] for c in columns} for i in indices] == fixture[split]
        [train, test] = [r for r in hub.recorded_resources() if "url" in r]
        assert (train["sha256"], test["sha256"]) == (spec["hub"]["sha256"]["train"], spec["hub"]["sha256"]["test"])
        return
    pool_rows = int(round(spec["pool_fraction"] * len(fixture["train"])))
    assert [{c: r[c] for c in columns} for r in task.pool] == fixture["train"][:pool_rows]
    assert [{c: r[c] for c in columns} for r in task.test] == fixture["test"]
    [record] = hub.recorded_resources()
    revision = spec["hub"]["revision"]
    expected = revision if hub.COMMIT_PATTERN.fullmatch(revision) else hub_online.commit(
        "dataset", spec["hub"]["path"], revision)
    assert (record["repo_id"], record["revision"], record["commit"]) == (spec["hub"]["path"], revision, expected)


def test_trec_reader_parses_the_original_files_as_the_hub_script_did():
    rows = read_trec_labels(require_data("trec/train_5500.label"))
    assert rows[0] == {"text": "How did serfdom develop in and then leave Russia ?", "coarse_label": 2,
                       "fine_label": "DESC:manner"}
    assert sum("sister city" in r["text"] for r in rows) == 1  # the one 0xF0 byte became a space, as in trec.py
    assert {r["coarse_label"] for r in rows} == set(range(6))


def test_class_names_on_the_hub_follow_the_reference_order(hub_online, compose_cfg):
    specs = paper_tasks(compose_cfg, hub_online)
    for name, names in CLASS_NAMES.items():
        remote = specs[name]["hub"]
        dataset = hub.load_dataset(remote["path"], remote["name"], revision=remote["revision"], split="test")
        assert dataset.features[specs[name]["label_column"]].names == names == remote["label_names"]


def test_a_changed_label_order_is_refused(hub_online, compose_cfg):
    spec = paper_tasks(compose_cfg, hub_online)["ag_news"]
    spec["hub"]["label_names"] = ["Sports", "World", "Business", "Sci/Tech"]
    with pytest.raises(ValueError, match="label order changed"):
        load_task("ag_news", spec, source="hub")


@pytest.mark.parametrize("repo_id, revision, script", [("CogComp/trec", None, "trec.py"),
                                                        ("gpt3mix/sst2", "main", "sst2.py"),
                                                        ("tatsu-lab/alpaca_eval", None, "alpaca_eval.py")])
def test_script_repositories_are_refused_and_their_scripts_never_fetched(repo_id, revision, script, hub_online):
    before = len(hub_online.requests)
    with pytest.raises(hub.HubResourceError, match=rf"loading script \({script}\), which datasets >= 4"):
        hub.load_dataset(repo_id, revision=revision)
    asked = [path for _, _, path in hub_online.requests[before:]]
    assert asked and not [path for path in asked if "/resolve/" in path]  # the file list was enough


@pytest.mark.parametrize("corpus", ["wikitext2", "wikitext103", "webtext", "ptb", "writingprompts", "ag_news"])
def test_each_track1_corpus_loads_from_its_replica_as_configured(corpus, hub_online, compose_cfg):
    data = OmegaConf.to_container(compose_cfg("experiment=lm_gpt2", f"data={corpus}").data, resolve=True)
    if data["source"] == "files":
        data["data_files"] = {s: on_loopback(hub_online, url) for s, url in data["data_files"].items()}
    splits = load_text_splits({**data, "max_rows": {"train": 200}})
    assert set(splits) == {"train", "validation", "test"} and splits["train"].column_names == ["text"]
    assert all(len(splits[s]) > 0 for s in splits)
    records = hub.recorded_resources()
    if data["source"] == "hub":
        [record] = records
        revision = data["revision"]
        assert record["revision"] == revision and record["commit"] == (
            revision if hub.COMMIT_PATTERN.fullmatch(revision) else hub_online.commit("dataset", data["path"]))
    else:
        assert {r["url"] for r in records} == set(data["data_files"].values())


def test_webtext_reads_its_fallback_when_the_primary_host_does_not_answer(hub_online, compose_cfg):
    data = OmegaConf.to_container(compose_cfg("experiment=lm_gpt2", "data=webtext").data, resolve=True)
    fallback = {s: on_loopback(hub_online, url) for s, url in data["fallback_data_files"].items()}
    primary = {s: "http://127.0.0.1:9" + url[len(hub_online.cdn):] for s, url in fallback.items()}  # nothing listens
    started = time.monotonic()
    splits = load_text_splits({**data, "data_files": primary, "fallback_data_files": fallback})
    assert len(splits["test"]) > 0 and time.monotonic() - started < 30
    assert {r["url"] for r in hub.recorded_resources()} == set(fallback.values())


def test_instruction_sets_load_at_their_revisions(hub_online, compose_cfg):
    cfg = compose_cfg("experiment=sft_alpaca")
    train = load_instruction_records(OmegaConf.merge(cfg.instructions, {"max_records": 5}))
    evals = load_instruction_records(cfg.eval_instructions, require_output=False, where="eval_instructions")
    assert len(train) == 5 and {"instruction", "input", "output"} <= set(train[0])
    assert len(evals) == 20 and evals[0]["generator"] == "text_davinci_003"
    commits = {r["repo_id"]: r["commit"] for r in hub.recorded_resources()}
    assert commits["tatsu-lab/alpaca_eval"] == cfg.eval_instructions.revision
    with pytest.raises(InstructionDataError, match=r"loading script \(alpaca_eval.py\)"):
        load_instruction_records(OmegaConf.merge(cfg.eval_instructions, {"source": "hub", "filename": None}),
                                 where="eval_instructions")


@pytest.fixture(scope="module")
def tiny_model_repo(loopback_hub, tmp_path_factory, gpt2_tokenizer):
    """A tiny random LLaMA with the GPT-2 tokenizer, as a model repository of the loopback Hub."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(gpt2_tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=128, tie_word_embeddings=False))
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    gpt2_tokenizer.save_pretrained(directory)
    files = {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    loopback_hub.add_repo("model", "emo-tests/tiny-llama", files)
    return "emo-tests/tiny-llama", model


def test_model_tokenizer_and_cost_embedding_load_at_a_revision(tiny_model_repo, hub_online):
    import torch

    repo_id, reference = tiny_model_repo
    commit = hub_online.commit("model", repo_id)
    tokenizer = load_tokenizer(repo_id, revision="main")
    model = load_causal_lm({"name_or_path": repo_id, "revision": commit, "dtype": "float32"}, tokenizer)
    assert torch.equal(model.get_output_embeddings().weight, reference.get_output_embeddings().weight)
    cost = build_cost_embedding(repo_id, model, len(tokenizer), revision=commit)
    assert cost.vocab_size == len(tokenizer)
    records = {(r["what"], r["revision"]): r["commit"] for r in hub.recorded_resources()}
    assert records == {("tokenizer", "main"): commit, ("model", commit): commit,
                       ("cost-embedding model", commit): commit}
    assert not hub_online.downloaded((".py",))


def test_an_unknown_revision_or_repository_is_a_clear_error(tiny_model_repo, hub_online, gpt2_tokenizer):
    with pytest.raises(hub.HubResourceError, match="has no such revision"):
        load_causal_lm({"name_or_path": tiny_model_repo[0], "revision": "0" * 40}, gpt2_tokenizer)
    with pytest.raises(hub.HubResourceError, match="does not exist on the Hub"):
        load_causal_lm({"name_or_path": "emo-tests/no-such-model"}, gpt2_tokenizer)


@pytest.mark.slow
def test_manifest_of_a_run_holds_the_commit_of_each_resource(tiny_model_repo, hub_online, compose_cfg, tmp_path):
    from experiments.icl import run

    repo_id, _ = tiny_model_repo
    trec = {f"icl.task_specs.trec.hub.files.{s}={on_loopback(hub_online, url)}" for s, url in (
        ("train", "https://cogcomp.seas.upenn.edu/Data/QA/QC/train_5500.label"),
        ("test", "https://cogcomp.seas.upenn.edu/Data/QA/QC/TREC_10.label"))}
    metrics = run(compose_cfg(
        "experiment=icl_tiny", "icl.source=hub", "icl.tasks=[sst2,trec]", "icl.max_test_rows=3", "icl.ice_num=2",
        "icl.task_specs.sst2.pool_fraction=0.05", "icl.task_specs.trec.pool_fraction=0.003", "icl.show_progress=false",
        f"model.name_or_path={repo_id}", f"model.tokenizer={repo_id}", "model.revision=main", "model.from_config=null",
        *sorted(trec),
        f"paths.results_dir={tmp_path}/res", f"paths.output_dir={tmp_path}/out", f"paths.cache_dir={tmp_path}/cache"))
    manifest = json.loads((tmp_path / "res" / "icl_tiny" / metrics["run_id"] / "manifest.json").read_text())
    resources = manifest["remote_resources"]
    by_repo = {(r.get("repo_id"), r["what"]): r for r in resources if "repo_id" in r}
    model_commit = hub_online.commit("model", repo_id)
    assert by_repo[(repo_id, "model")]["commit"] == by_repo[(repo_id, "tokenizer")]["commit"] == model_commit
    assert by_repo[("gpt3mix/sst2", "task dataset")]["commit"] == hub_online.commit(
        "dataset", "gpt3mix/sst2", "refs/convert/parquet")
    files = {r["url"]: r["sha256"] for r in resources if "url" in r}
    assert sorted(files.values()) == sorted(manifest["config"]["icl"]["task_specs"]["trec"]["hub"]["sha256"].values())
    assert metrics["icl"]["tasks"]["trec"]["n"] == 3


def test_cost_embedding_hub_id_fails_fast_offline(gpt2_tokenizer):
    from helpers import tiny_gpt2

    started = time.monotonic()
    with pytest.raises(hub.OfflineError, match="Cannot fetch cost-embedding model 'gpt2-large'.*model.cost_embedding"):
        build_cost_embedding("gpt2-large", tiny_gpt2(), 64)
    assert time.monotonic() - started < 5
