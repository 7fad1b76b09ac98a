"""ICL engine units: PPL scoring with and without the shared-prefix KV cache, retrieval cache, metrics, model loading
for evaluation (run directories, LoRA adapters, errors), offline errors and the accuracy table."""

import json
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from experiments.pipeline.hub import OfflineError
from experiments.pipeline.icl import (Task, TopkRetriever, _shared_prefix_length, binomial_stderr, build_retriever,
                                      load_task, score_prompts, summarize)
from experiments.pipeline.icl_table import icl_tables
from experiments.pipeline.models import load_causal_lm, load_model_for_eval
from tests.conftest import REPO_ROOT, require_data


def tiny_llama_cfg(**sizes) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf/model/tiny_llama.yaml"))
    cfg.pop("defaults")
    cfg["tokenizer"] = str(require_data("gpt2_tokenizer"))
    cfg["from_config"].update(sizes)
    return cfg


@pytest.fixture(scope="module")
def tiny_lm(gpt2_tokenizer):
    torch.manual_seed(0)
    return load_causal_lm(tiny_llama_cfg(initializer_range=0.2), gpt2_tokenizer).eval()


PROMPTS = [
    ["a b c. It is good.", "a b c. It is bad.", "a b c. It is about the weather."],
    ["Review: this one is longer than the others by far. It is good.",
     "Review: this one is longer than the others by far. It is bad.",
     "Review: this one is longer than the others by far. It is about the weather."],
    ["x It is good.", "x It is bad.", "x It is about the weather."],
]


@pytest.mark.slow
def test_shared_prefix_scores_equal_full_scores(tiny_lm, gpt2_tokenizer):
    full = score_prompts(tiny_lm, gpt2_tokenizer, PROMPTS, batch_size=2, share_prefix=False)
    for batch_size in (1, 2, 8):
        shared = score_prompts(tiny_lm, gpt2_tokenizer, PROMPTS, batch_size=batch_size, share_prefix=True)
        np.testing.assert_allclose(shared, full, rtol=0, atol=1e-5)
    by_hand = []
    for text in PROMPTS[2]:
        ids = gpt2_tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = tiny_lm(input_ids=ids).logits[0]
        by_hand.append(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
                       / ids.shape[1])
    np.testing.assert_allclose(full[2], by_hand, rtol=1e-5)
    assert not tiny_lm.training


def test_shared_prefix_length_leaves_every_label_a_token():
    assert _shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert _shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # one prompt is a prefix of the other
    assert _shared_prefix_length([[7, 2], [1, 2]]) == 0


def test_summarize_accuracy_stderr_and_ties():
    task = Task("t", [{"text": "p", "label": 0}], [{"text": "a", "label": 1}, {"text": "b", "label": 0}],
                {1: "</E><X> yes", 0: "</E><X> no"}, "label")
    metrics, rows = summarize(task, np.array([[1.0, 2.0], [3.0, 3.0]]))  # label order [1, 0]
    assert [r["prediction"] for r in rows] == [1, 1]  # a tie goes to the first label, as OpenICL's min()
    assert rows[0] == {"task": "t", "index": 0, "label": 1, "prediction": 1, "scores": {"1": 1.0, "0": 2.0}}
    assert metrics == {"accuracy": 0.5, "n": 2, "stderr": pytest.approx(0.5 / np.sqrt(2))}
    assert binomial_stderr(0.8, 100) == pytest.approx(0.04)


def test_embeddings_are_cached_on_disk(tmp_path):
    icl = {"retriever": {"model": "minilm", "tokenizer": str(require_data("gpt2_tokenizer"))}}
    texts = ["a first sentence", "another one", "and a third"]
    first = build_retriever(icl, tmp_path, False)
    ids = first.retrieve(texts, ["another one!"], 2)
    assert ids[0, 0] == 1
    cached = sorted((tmp_path / "icl_embeddings").glob("*.npy"))
    assert len(cached) == 2  # pool and queries
    again = build_retriever(icl, tmp_path, False)
    np.testing.assert_array_equal(again.retrieve(texts, ["another one!"], 2), ids)
    assert again._encoder is None  # served from the cache without loading the model
    other = TopkRetriever(first.model_name, str(require_data("gpt2_tokenizer")) + "/", cache_dir=tmp_path)
    assert other._key(texts) != first._key(texts)  # the key covers the tokenizer (and model)


def test_hub_retriever_and_hub_task_fail_fast_offline(tmp_path, compose_cfg):
    icl = OmegaConf.to_container(compose_cfg("experiment=icl_eval", "model=tiny_llama").icl, resolve=True)
    started = time.time()
    with pytest.raises(OfflineError, match="retriever"):
        build_retriever(icl, tmp_path, False).embed(["hello"])
    with pytest.raises(OfflineError, match="gpt3mix/sst2"):
        load_task("sst2", icl["task_specs"]["sst2"], source="hub")
    assert time.time() - started < 10


def test_fp16_on_cpu_is_refused(gpt2_tokenizer):
    with pytest.raises(ValueError, match="float16 was requested on CPU"):
        load_model_for_eval(tiny_llama_cfg() | {"dtype": "float16"}, gpt2_tokenizer, device="cpu")


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory, gpt2_tokenizer):
    """A saved tiny base model, a LoRA adapter trained on it (random B, so it changes the logits), a run directory."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    base = load_causal_lm(tiny_llama_cfg(), gpt2_tokenizer)
    base.save_pretrained(root / "base")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", init_lora_weights=False))
    peft_model.save_pretrained(root / "run" / "adapter")
    config = json.loads((root / "run" / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(root / "base")
    (root / "run" / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(root / "merged_run" / "merged")
    return root


def test_load_for_eval_base_adapter_and_run_dirs(saved_runs, gpt2_tokenizer):
    ids = torch.tensor([gpt2_tokenizer("It is positive.")["input_ids"]])
    base_cfg = tiny_llama_cfg() | {"from_config": None, "name_or_path": str(saved_runs / "base")}
    base, base_info = load_model_for_eval(base_cfg, gpt2_tokenizer, device="cpu")
    adapted, info = load_model_for_eval(base_cfg, gpt2_tokenizer, adapter=str(saved_runs / "run"), device="cpu")
    assert info["adapter"].endswith("run/adapter") and base_info["adapter"] is None
    assert not adapted.training
    only_run, _ = load_model_for_eval(tiny_llama_cfg() | {"from_config": None, "name_or_path": str(saved_runs / "run")},
                                      gpt2_tokenizer, device="cpu")  # adapter-only run dir: base from adapter_config
    merged, merged_info = load_model_for_eval(
        tiny_llama_cfg() | {"from_config": None, "name_or_path": str(saved_runs / "merged_run")}, gpt2_tokenizer,
        device="cpu")
    assert merged_info["model"].endswith("merged_run/merged")
    with torch.no_grad():
        logits = {name: m(input_ids=ids).logits for name, m in
                  {"base": base, "adapted": adapted, "only_run": only_run, "merged": merged}.items()}
    assert not torch.allclose(logits["base"], logits["adapted"], atol=1e-4)
    torch.testing.assert_close(logits["adapted"], logits["only_run"])
    torch.testing.assert_close(logits["adapted"], logits["merged"], atol=1e-5, rtol=1e-4)


def test_adapter_on_the_wrong_base_is_refused(saved_runs, gpt2_tokenizer):
    other = tiny_llama_cfg() | {"from_config": None, "name_or_path": str(saved_runs / "merged_run" / "merged")}
    with pytest.raises(ValueError, match="was trained on .*base.*but the base model given is"):
        load_model_for_eval(other, gpt2_tokenizer, adapter=str(saved_runs / "run" / "adapter"), device="cpu")
    with pytest.raises(FileNotFoundError, match="No LoRA adapter"):
        load_model_for_eval(other, gpt2_tokenizer, adapter=str(saved_runs / "base"), device="cpu")


def _run(model, objective, accuracies, run_id, shots=8, n=100):
    return {"run_id": run_id, "model": model, "objective": objective,
            "icl": {"shots": shots, "source": "hub", "retriever": {"model": "all-mpnet-base-v2"},
                    "tasks": {t: {"accuracy": a, "n": n, "stderr": binomial_stderr(a, n)}
                              for t, a in accuracies.items()}}}


def test_accuracy_table_rows_columns_and_bold():
    runs = [_run("llama7b", "emo2", {"sst2": 0.9, "trec": 0.5}, "2"),
            _run("llama7b", None, {"sst2": 0.8, "trec": 0.6}, "1"),
            _run("llama7b", "mle", {"sst2": 0.7, "trec": 0.4}, "0"),
            _run("llama7b", "mle", {"sst2": 0.85, "trec": 0.45}, "3"),  # later run of the same row wins
            {"run_id": "4", "mauve": {"mean": 0.9}}]
    values, cells, caption = icl_tables(runs)["icl_accuracy"][:3]
    assert list(cells.index) == ["llama7b", "llama7b + emo2", "llama7b + mle"]
    assert list(cells.columns) == ["trec", "sst2", "average"]  # the paper's task order
    assert cells.loc["llama7b + emo2", "sst2"] == "**90.0 ± 3.0**"
    assert cells.loc["llama7b", "trec"] == "**60.0 ± 4.9**"
    assert values.loc["llama7b + mle", "average"] == pytest.approx(65.0)
    assert cells.loc["llama7b + emo2", "average"] == "**70.0**"
    assert "ICL accuracy" in caption
    assert icl_tables([{"run_id": "x"}]) == {}


def test_accuracy_table_separates_protocols():
    runs = [_run("tiny", None, {"sst2": 0.5}, "1", shots=8), _run("tiny", None, {"sst2": 0.6}, "2", shots=4)]
    _, cells, _ = icl_tables(runs)["icl_accuracy"][:3]
    assert len(cells) == 2 and all("-shot" in label for label in cells.index)


def test_accuracy_table_is_registered():
    from experiments.tables import TABLE_BUILDERS

    assert TABLE_BUILDERS["icl"] is icl_tables
