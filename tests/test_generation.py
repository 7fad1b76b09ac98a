"""Prompt extraction, token budget and batched KV-cached sampling on a tiny GPT-2."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from experiments.pipeline.generation import (Prompt, continuation_token_budget, extract_prompts, generation_records,
                                             prompts_from_config, sample_continuations, truncate_words)

WORDS = " ".join(f"w{i}" for i in range(60))


def test_extract_prompts_applies_the_reference_filter():
    rows = ["short", WORDS[:90], "== heading == " + WORDS, WORDS, "x" * 200, WORDS.upper()]
    prompts = extract_prompts(rows, prefix_words=5, continuation_words=20, min_chars=100, min_extra_words=10,
                              exclude=["=="])
    assert [p.index for p in prompts] == [3, 5]
    assert prompts[0].prefix == "w0 w1 w2 w3 w4" and prompts[0].continuation.split()[0] == "w5"
    assert len(prompts[0].continuation.split()) == 20 and prompts[0].gold.startswith("w0 w1")
    assert [p.index for p in extract_prompts(rows, prefix_words=5, continuation_words=20, min_chars=100,
                                              min_extra_words=10, scan_rows=4)] == [2, 3]
    assert len(extract_prompts(rows, prefix_words=5, continuation_words=20, min_chars=100, min_extra_words=10,
                               max_prompts=1)) == 1


def test_prompts_from_the_corpus_prompt_config(compose_cfg):
    rows = ["== heading == " + WORDS, WORDS + " " + WORDS]
    prompts = prompts_from_config(rows, compose_cfg("data=ptb").prompts, corpus="ptb")
    assert [(p.index, len(p.prefix.split()), len(p.continuation.split())) for p in prompts] == [(1, 5, 25)]
    with pytest.raises(ValueError, match=r"no test row passes the prompt filter"):
        prompts_from_config(rows[:1], compose_cfg("data=ptb").prompts, corpus="ptb")
    with pytest.raises(ValueError, match=r"No Track-1 prompt settings for data=mine: add conf/prompts/mine.yaml"):
        prompts_from_config(rows, None, corpus="mine")


def test_token_budget_and_truncation(gpt2_tokenizer):
    prompts = [Prompt(0, "a", "one two three"), Prompt(1, "b", "x " * 10)]
    longest = len(gpt2_tokenizer(" " + "x " * 10)["input_ids"])
    assert continuation_token_budget(gpt2_tokenizer, prompts, quantile=1.0, slack=1.0) == longest
    assert continuation_token_budget(gpt2_tokenizer, prompts, quantile=1.0, slack=2.0) == 2 * longest
    assert truncate_words(" a  b\nc d ", 3) == "a b c"


@pytest.fixture(scope="module")
def tiny_model(gpt2_tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(gpt2_tokenizer), n_positions=128,
                        eos_token_id=gpt2_tokenizer.eos_token_id, pad_token_id=gpt2_tokenizer.pad_token_id)
    return GPT2LMHeadModel(config).eval()


PROMPTS = [Prompt(0, "The cat sat on the", "mat"), Prompt(1, "Hello", "world"),
           Prompt(2, "A much longer prefix with several more words in it", "end")]


def sample(model, tok, prompts, seed=0, batch_size=3, decoding=None):
    return sample_continuations(model, tok, prompts, max_new_tokens=6, seed=seed,
                                decoding=decoding or {"name": "unbiased", "do_sample": True, "top_k": 0,
                                                      "top_p": 1.0, "typical_p": 1.0},
                                batch_size=batch_size, max_prompt_tokens=32)


def test_sampling_is_deterministic_per_seed(tiny_model, gpt2_tokenizer):
    first = sample(tiny_model, gpt2_tokenizer, PROMPTS, seed=3)
    assert first == sample(tiny_model, gpt2_tokenizer, PROMPTS, seed=3)
    assert first != sample(tiny_model, gpt2_tokenizer, PROMPTS, seed=4)
    assert all(len(gpt2_tokenizer(s)["input_ids"]) >= 5 for s in first)


def test_left_padded_batches_match_single_prompts(tiny_model, gpt2_tokenizer):
    greedy = {"name": "greedy", "do_sample": False}
    batched = sample(tiny_model, gpt2_tokenizer, PROMPTS, decoding=greedy, batch_size=3)
    singles = [sample(tiny_model, gpt2_tokenizer, [p], decoding=greedy, batch_size=1)[0] for p in PROMPTS]
    assert batched == singles


@pytest.mark.parametrize("decoding", ["unbiased", "top_k", "top_p", "typical"])
def test_decoding_configs_run(tiny_model, gpt2_tokenizer, compose_cfg, decoding):
    cfg = compose_cfg(f"decoding={decoding}")
    out = sample(tiny_model, gpt2_tokenizer, PROMPTS[:2], decoding=cfg.decoding)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


def test_generation_records():
    rows = generation_records(PROMPTS[:2], {0: [" a b c", " d"], 1: [" e", " f g"]}, continuation_words=2)
    assert len(rows) == 4 and rows[0]["prediction"] == "The cat sat on the a b" and rows[3]["seed"] == 1
    assert rows[0]["gold"] == "The cat sat on the mat"


def test_models_from_config_local_path_and_offline_hub(tmp_path, gpt2_tokenizer):
    import time

    from experiments.pipeline.hub import OfflineError
    from experiments.pipeline.models import build_cost_embedding, load_causal_lm, load_tokenizer

    spec = {"from_config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}}
    model = load_causal_lm(spec, gpt2_tokenizer)
    assert model.config.vocab_size == len(gpt2_tokenizer) and model.config.pad_token_id == gpt2_tokenizer.eos_token_id
    model.save_pretrained(tmp_path / "m")
    gpt2_tokenizer.save_pretrained(tmp_path / "m")
    reloaded = load_causal_lm({"name_or_path": str(tmp_path / "m"), "dtype": "float32"},
                              load_tokenizer(str(tmp_path / "m")))
    assert torch.equal(reloaded.get_output_embeddings().weight, model.get_output_embeddings().weight)
    cost = build_cost_embedding(None, model, len(gpt2_tokenizer))
    assert (cost.vocab_size, cost.width) == (len(gpt2_tokenizer), 16) and not cost.normalized.requires_grad
    start = time.monotonic()
    with pytest.raises(OfflineError, match="model.name_or_path=/path/to/model"):
        load_causal_lm({"name_or_path": "not-cached-org/not-a-model"}, gpt2_tokenizer)
    with pytest.raises(OfflineError):
        load_tokenizer("not-cached-org/not-a-model")
    assert time.monotonic() - start < 5
