"""Our ICL engine against plain OpenICL 0.1.8 (with only the `openicl_compat` patches) on a tiny LLaMA, and pins on
OpenICL's own behaviour (rendered prompts, PPL values) so that a change in OpenICL fails here."""

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from omegaconf import OmegaConf

from experiments.pipeline.icl import (Task, build_retriever, load_task, openicl_reference, render_context,
                                      render_prompt, score_prompts, summarize, task_prompts)
from experiments.pipeline.models import load_causal_lm
from experiments.pipeline.openicl_compat import import_openicl
from tests.conftest import REPO_ROOT, require_data

SST2 = {0: '</E>Review: "<X>" It is positive.', 1: '</E>Review: "<X>" It is negative.'}


@pytest.fixture(scope="module")
def tiny_lm(gpt2_tokenizer):
    """Tiny random LLaMA whose label scores are far enough apart (init std 0.2) that float noise cannot flip them."""
    cfg = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf/model/tiny_llama.yaml"))
    cfg["from_config"]["initializer_range"] = 0.2
    torch.manual_seed(0)
    return load_causal_lm(cfg, gpt2_tokenizer).eval()


@pytest.fixture(scope="module")
def tiny_icl():
    require_data("fewshot")
    return {"retriever": {"model": "minilm", "tokenizer": str(require_data("gpt2_tokenizer")),
                          "special_tokens": {"eos_token": "<|endoftext|>"}},
            "ice_num": 8, "ice_separator": "\n", "ice_eos_token": "\n", "inference": {"batch_size": 8}}


def _small_task(compose_cfg, name, pool_rows=40, test_rows=10):
    cfg = compose_cfg("experiment=icl_tiny")
    task = load_task(name, OmegaConf.to_container(cfg.icl.task_specs[name], resolve=True), "local")
    return Task(name, task.pool[:pool_rows], task.test[:test_rows], task.templates, task.label_column)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sst2", "trec"])
def test_fast_engine_matches_plain_openicl(compose_cfg, tiny_lm, gpt2_tokenizer, tiny_icl, tmp_path, name):
    task = _small_task(compose_cfg, name)
    reference, reference_rows = openicl_reference(tiny_lm, gpt2_tokenizer, task, tiny_icl, tmp_path)

    retriever = build_retriever(tiny_icl, tmp_path / "cache", False)
    retrieved = retriever.retrieve([task.retrieval_text(r) for r in task.pool],
                                   [task.retrieval_text(r) for r in task.test], 8)
    contexts, prompts = task_prompts(task, retrieved, "\n", "\n")
    assert contexts == reference["in_context"]  # same examples, same order, same rendering
    reference_scores = np.array([[row["scores"][str(label)] for label in task.labels] for row in reference_rows])
    ordered = np.sort(reference_scores, axis=1)
    smallest_gap = (ordered[:, 1] - ordered[:, 0]).min()  # between the best and second-best label of any example
    for share_prefix in (True, False):
        scores = score_prompts(tiny_lm, gpt2_tokenizer, prompts, batch_size=5, share_prefix=share_prefix)
        np.testing.assert_allclose(scores, reference_scores, rtol=0, atol=2e-5)
        # the comparison is meaningful: float noise is far below the margin that decides any prediction
        assert np.abs(scores - reference_scores).max() < smallest_gap / 4
        metrics, rows = summarize(task, scores)
        assert [r["prediction"] for r in rows] == [r["prediction"] for r in reference_rows]
        assert metrics["accuracy"] == reference["accuracy"]


def _openicl_prompts(task: Task, ice_ids):
    openicl = import_openicl()
    reader = openicl.DatasetReader(DatasetDict({"train": Dataset.from_list(task.pool),
                                                "test": Dataset.from_list(task.test)}),
                                   input_columns=["text"], output_column="label")
    template = openicl.PromptTemplate(task.templates, {"text": "<X>"}, ice_token="</E>")
    retriever = openicl.BaseRetriever(reader)  # OpenICL's defaults: ice_separator = ice_eos_token = "\n"
    ice = retriever.generate_ice(ice_ids, ice_template=template)
    return [retriever.generate_label_prompt(0, ice, label, ice_template=template) for label in task.labels]


def test_openicl_rendering_is_pinned():
    """OpenICL's own rendering of the SST-2 template (a change in OpenICL breaks this, not only our copy)."""
    task = Task("sst2", [{"text": "flat and dull", "label": 1}, {"text": "a joy", "label": 0}],
                [{"text": "great fun", "label": 0}], SST2, "label")
    expected = ['Review: "a joy" It is positive.\nReview: "flat and dull" It is negative.\n'
                'Review: "great fun" It is positive.',
                'Review: "a joy" It is positive.\nReview: "flat and dull" It is negative.\n'
                'Review: "great fun" It is negative.']
    assert _openicl_prompts(task, [1, 0]) == expected
    context = render_context(task, [1, 0])
    assert [render_prompt(task, task.test[0], context, label) for label in task.labels] == expected


def test_openicl_ppl_definition_is_pinned(tiny_lm, gpt2_tokenizer, tmp_path):
    """OpenICL's PPL of a prompt = summed NLL / number of non-pad tokens (first token included), computed by hand."""
    openicl = import_openicl()
    inferencer = openicl.PPLInferencer(model_name=tiny_lm, tokenizer_name=copy.deepcopy(gpt2_tokenizer),
                                       output_json_filepath=str(tmp_path))
    texts = ["Review: a joy It is positive.", "Review: flat It is negative, sadly."]
    values = inferencer._PPLInferencer__get_ppl(texts)
    expected = []
    for text in texts:
        ids = gpt2_tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = tiny_lm(input_ids=ids).logits[0]
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
        expected.append(nll / ids.shape[1])
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    np.testing.assert_allclose(score_prompts(tiny_lm, gpt2_tokenizer, [texts], share_prefix=False)[0], expected,
                               rtol=1e-5)


def test_compat_patches(gpt2_tokenizer):
    openicl = import_openicl()
    from openicl.utils.collators import ListWrapper

    encoded = gpt2_tokenizer.encode_plus("hello world", truncation=True, return_tensors="pt", verbose=False)
    assert encoded["input_ids"].tolist() == [gpt2_tokenizer("hello world")["input_ids"]]
    assert ListWrapper([1, 2]).to("cpu", non_blocking=True) == [1, 2]
    assert openicl.AccEvaluator().score(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0]) == {"accuracy": 0.75}
    assert import_openicl() is openicl  # idempotent
