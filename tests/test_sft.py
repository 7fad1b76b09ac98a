"""Track 3 instruction tuning: Alpaca prompts, response-only labels, padding, the pad-token resize, the loss and
gradient accumulation through the trainer, record loading and batched response generation (real GPT-2 tokenizer,
the repository's Alpaca-GPT4 fixtures, a tiny random LLaMA)."""

import json
import time

import pytest
import torch

from experiments.pipeline.hub import OfflineError
from experiments.pipeline.instruct import (IGNORE_INDEX, PROMPT_NO_INPUT, PROMPT_WITH_INPUT, InstructionDataError,
                                           SupervisedCollator, add_pad_token, format_prompt, generate_responses,
                                           load_instruction_records, load_sft_tokenizer, read_records_file,
                                           reference_outputs, tokenize_records)
from experiments.pipeline.models import load_causal_lm
from experiments.pipeline.training import build_trainer
from tests.conftest import require_data

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def records():
    return read_records_file(require_data("alpaca/alpaca_gpt4_train_200.json"))


@pytest.fixture
def sft_cfg(compose_cfg, tmp_path):
    def compose(*overrides):
        return compose_cfg("experiment=sft_tiny", f"paths.results_dir={tmp_path / 'results'}",
                           f"paths.cache_dir={tmp_path / 'cache'}", *overrides)
    return compose


def tokenizer_and_model(cfg, seed=0):
    tokenizer = load_sft_tokenizer(cfg.model, model_max_length=cfg.sft.model_max_length)
    torch.manual_seed(seed)
    model = load_causal_lm(cfg.model, tokenizer)
    add_pad_token(tokenizer, model, cfg.sft.pad_token)
    return tokenizer, model


def test_alpaca_prompts_are_the_stanford_strings():
    assert format_prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:")
    assert format_prompt("Translate.", "Bonjour") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n### Input:\nBonjour"
        "\n\n### Response:")
    assert format_prompt("x", "") == PROMPT_NO_INPUT.format(instruction="x")
    assert PROMPT_WITH_INPUT.count("{") == 2


@pytest.mark.parametrize("with_input", [False, True], ids=["no_input", "input"])
def test_exactly_response_and_eos_carry_labels(sft_cfg, records, with_input):
    cfg = sft_cfg("sft.model_max_length=512")
    tokenizer = load_sft_tokenizer(cfg.model, model_max_length=512)
    chosen = [r for r in records if bool(r["input"]) == with_input and len(r["output"]) < 600][:3]
    columns, stats = tokenize_records(tokenizer, chosen, max_length=512)
    assert stats["truncated"] == 0 and stats["with_input"] == (3 if with_input else 0)
    for record, ids, labels in zip(chosen, columns["input_ids"], columns["labels"]):
        prompt = format_prompt(record["instruction"], record["input"])
        n_prompt = len(tokenizer(prompt)["input_ids"])
        assert len(ids) == len(labels)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert IGNORE_INDEX not in labels[n_prompt:]
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tokenizer.decode(ids[:n_prompt]) == prompt
        assert tokenizer.decode(labels[n_prompt:]) == record["output"] + EOS
        assert labels[-1] == tokenizer.eos_token_id


def test_joint_tokenization_reproduces_the_reference_off_by_one(sft_cfg, records):
    """With GPT-2's BPE, 13 of the fixture's 200 records merge `:` with the response's first character (57 of the
    full 999-record demo file); joint tokenization then labels a token that is partly prompt."""
    cfg = sft_cfg()
    tokenizer = load_sft_tokenizer(cfg.model, model_max_length=4096)
    separate, separate_stats = tokenize_records(tokenizer, records, max_length=4096)
    joint, joint_stats = tokenize_records(tokenizer, records, max_length=4096, tokenize_jointly=True)
    assert joint_stats["boundary_merges"] == 13 and "boundary_merges" not in separate_stats
    shifted = [i for i, (a, b) in enumerate(zip(separate["labels"], joint["labels"])) if a != b]
    assert len(shifted) == 13
    i = shifted[0]
    joint_target = tokenizer.decode([t for t in joint["labels"][i] if t != IGNORE_INDEX])
    separate_target = tokenizer.decode([t for t in separate["labels"][i] if t != IGNORE_INDEX])
    assert separate_target == records[i]["output"] + EOS
    assert joint_target != separate_target and joint_target.endswith(EOS)


def test_truncation_at_model_max_length(sft_cfg, records):
    cfg = sft_cfg()
    tokenizer = load_sft_tokenizer(cfg.model, model_max_length=64)
    columns, stats = tokenize_records(tokenizer, records[:20], max_length=64)
    assert max(len(ids) for ids in columns["input_ids"]) == 64 and stats["truncated"] > 0
    assert all(len(a) == len(b) <= 64 for a, b in zip(columns["input_ids"], columns["labels"]))
    _, tiny = tokenize_records(tokenizer, records[:20], max_length=8)
    assert tiny["no_response_tokens"] == 20


def test_collator_pads_right_with_ignored_labels():
    batch = SupervisedCollator(pad_token_id=7)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                                                {"input_ids": [7, 5], "labels": [-100, 7]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [7, 5, 7]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]  # pad = a real token id: mask by length
    assert SupervisedCollator(0, pad_to_multiple_of=4)([{"input_ids": [1], "labels": [1]}])["input_ids"].shape == (1, 4)


def test_pad_token_rows_are_the_mean_and_cost_embedding_follows_the_resize(sft_cfg, tmp_path):
    cfg = sft_cfg("objective=sft/emo")
    tokenizer = load_sft_tokenizer(cfg.model, model_max_length=64)
    assert tokenizer.pad_token is None
    torch.manual_seed(0)
    model = load_causal_lm(cfg.model, tokenizer)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    assert add_pad_token(tokenizer, model, "[PAD]") == 1
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == 50257 == model.config.pad_token_id
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape == new_out.shape == (50258, 64)
    torch.testing.assert_close(new_in[:-1], old_in)
    torch.testing.assert_close(new_in[-1], old_in.mean(0))
    torch.testing.assert_close(new_out[-1], old_out.mean(0))
    trainer = build_trainer(cfg, model, output_dir=tmp_path, run_name="t", report_to=[], train_dataset=[])
    cost = trainer.objective_loss.cost_embedding
    assert cost.vocab_size == 50258
    assert add_pad_token(tokenizer, model, "[PAD]") == 0  # already has one: nothing added


def hand_response_cross_entropy(logits, labels):
    total, count = 0.0, 0
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    for row in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[row, t] != IGNORE_INDEX:
                total -= log_probs[row, t - 1, labels[row, t]].item()
                count += 1
    return total / count


def test_trainer_loss_is_response_only_cross_entropy(sft_cfg, records, tmp_path):
    cfg = sft_cfg()
    tokenizer, model = tokenizer_and_model(cfg)
    chosen = [next(r for r in records if r["input"]), next(r for r in records if not r["input"])]
    columns, _ = tokenize_records(tokenizer, chosen, max_length=48)
    batch = SupervisedCollator(tokenizer.pad_token_id)(
        [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])])
    assert (batch["labels"] != IGNORE_INDEX).sum() < batch["attention_mask"].sum()  # prompts really are masked
    trainer = build_trainer(cfg, model, output_dir=tmp_path, run_name="t", report_to=[], train_dataset=[])
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert loss.item() == pytest.approx(hand_response_cross_entropy(logits, batch["labels"]), rel=1e-5)


def train_tiny(cfg, records, tmp_path, name):
    from datasets import Dataset

    tokenizer, model = tokenizer_and_model(cfg)
    columns, _ = tokenize_records(tokenizer, records, max_length=cfg.sft.model_max_length)
    trainer = build_trainer(cfg, model, output_dir=tmp_path / name, run_name=name, report_to=[],
                            train_dataset=Dataset.from_dict(columns),
                            data_collator=SupervisedCollator(tokenizer.pad_token_id))
    trainer.train()
    return model, [e["loss"] for e in trainer.state.log_history if "loss" in e], trainer


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mle", "sft/emo"])
def test_gradient_accumulation_matches_one_large_batch(sft_cfg, records, tmp_path, objective):
    """Records of different lengths (right padding, different label counts): 2 x 2 accumulated == 4 at once."""
    common = [f"objective={objective}", "sft.model_max_length=40", "trainer.max_steps=2", "+trainer.optim=sgd",
              "trainer.learning_rate=0.5", "trainer.lr_scheduler_type=constant", "trainer.global_batch_size=4"]
    chosen = records[:8]
    big, big_losses, big_trainer = train_tiny(sft_cfg(*common, "trainer.per_device_train_batch_size=4"), chosen,
                                              tmp_path, "big")
    acc, acc_losses, acc_trainer = train_tiny(sft_cfg(*common, "trainer.per_device_train_batch_size=2"), chosen,
                                              tmp_path, "acc")
    assert big_trainer.args.gradient_accumulation_steps == 1 and acc_trainer.args.gradient_accumulation_steps == 2
    assert len(big_losses) == 2 and big_losses == pytest.approx(acc_losses, rel=1e-4)
    for (name, p_big), p_acc in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(p_big, p_acc, rtol=1e-4, atol=1e-5, msg=name)


def test_records_from_json_array_and_jsonl(tmp_path):
    rows = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "output": "e"}]
    (tmp_path / "r.json").write_text(json.dumps(rows))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("r.json", "r.jsonl"):
        loaded = read_records_file(tmp_path / name)
        assert [(r["instruction"], r["input"], r["output"]) for r in loaded] == [("a", "b", "c"), ("d", "", "e")]
    cfg = {"name": "mine", "source": "files", "data_files": [str(tmp_path / "r.json"), str(tmp_path / "r.jsonl")],
           "max_records": 3}
    assert len(load_instruction_records(cfg)) == 3


def test_bad_records_are_clear_errors(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(InstructionDataError, match=r"bad.json: record 1 lacks \['output'\]"):
        read_records_file(tmp_path / "bad.json")
    assert len(read_records_file(tmp_path / "bad.json", require_output=False)) == 2
    (tmp_path / "num.jsonl").write_text('{"instruction": 3, "output": "x"}\n')
    with pytest.raises(InstructionDataError, match="field 'instruction' is a int"):
        read_records_file(tmp_path / "num.jsonl")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(InstructionDataError, match="not a JSON array or JSONL"):
        read_records_file(tmp_path / "broken.json")
    with pytest.raises(InstructionDataError, match="not found"):
        read_records_file(tmp_path / "missing.json")
    with pytest.raises(InstructionDataError, match="no reference 'output'"):
        reference_outputs([{"instruction": "a", "input": ""}], "ref")


@pytest.mark.parametrize("experiment_group", ["instructions=alpaca_gpt4", "eval_instructions=alpaca_eval"])
def test_hub_sets_fail_fast_offline(compose_cfg, experiment_group):
    cfg = compose_cfg("experiment=sft_tiny", experiment_group)
    node = cfg.instructions if experiment_group.startswith("instructions") else cfg.eval_instructions
    start = time.monotonic()
    with pytest.raises(OfflineError, match="alpaca"):
        load_instruction_records(node)
    assert time.monotonic() - start < 5


@pytest.mark.slow
def test_generation_is_batched_left_padded_and_in_alpaca_eval_format(sft_cfg):
    cfg = sft_cfg()
    tokenizer, model = tokenizer_and_model(cfg)
    evals = read_records_file(require_data("alpaca/alpaca_gpt4_eval_20.json"), require_output=False)[:5]
    evals[1] = {**evals[1], "input": "some context"}
    kwargs = dict(generator="tiny", decoding={"name": "greedy", "do_sample": False}, max_new_tokens=6,
                  max_prompt_tokens=128, seed=0)
    model.train()
    batched = generate_responses(model, tokenizer, evals, batch_size=3, **kwargs)
    assert tokenizer.padding_side == "right" and model.training  # both restored
    one_by_one = generate_responses(model, tokenizer, evals, batch_size=1, **kwargs)
    assert [r["output"] for r in batched] == [r["output"] for r in one_by_one]
    assert [r["instruction"] for r in batched] == [r["instruction"] for r in evals]
    assert all(r["generator"] == "tiny" and isinstance(r["output"], str) for r in batched)
    assert set(batched[0]) == {"instruction", "output", "generator", "dataset"}
    assert batched[1]["input"] == "some context"
    sampled = dict(kwargs, decoding={"name": "top_p", "do_sample": True, "top_k": 0, "top_p": 0.95})
    first = generate_responses(model, tokenizer, evals, batch_size=5, **sampled)
    assert first == generate_responses(model, tokenizer, evals, batch_size=5, **sampled)  # seeded
