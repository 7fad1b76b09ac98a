"""The Trainer integration: label shifting, padding, and gradient-accumulation equivalence on tiny GPT-2 and Llama."""
import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, TrainingArguments

from emo import cost_embedding_from_model, lm_loss
from emo.training import ObjectiveLoss, ObjectiveTrainer

VOCAB = 64


def tiny_gpt2():
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(config)


def tiny_llama():
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def padded_dataset(num_rows=8, seq_len=12, seed=0):
    """Rows of different true lengths, right-padded with -100 labels, so per-batch means differ from token means."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(num_rows):
        ids = torch.randint(0, VOCAB, (seq_len,), generator=gen)
        length = 3 + (i * 5) % (seq_len - 2)
        mask = torch.arange(seq_len) < length
        labels = torch.where(mask, ids, torch.tensor(-100))
        rows.append({"input_ids": ids.tolist(), "attention_mask": mask.long().tolist(), "labels": labels.tolist()})
    return Dataset.from_list(rows)


def train_once(build_model, objective, batch_size, accumulation, tmp_path, steps=2):
    torch.manual_seed(0)
    model = build_model()
    cost = cost_embedding_from_model(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / f"{objective}-{batch_size}x{accumulation}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    trainer = ObjectiveTrainer(
        model=model,
        args=args,
        train_dataset=padded_dataset(),
        objective_loss=ObjectiveLoss(objective, cost_embedding=cost),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model, losses


@pytest.mark.parametrize("build_model", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("objective", ["mle", "mixce", "emo", "adaptive_emo"])
def test_gradient_accumulation_equals_one_big_batch(build_model, objective, tmp_path):
    big, big_losses = train_once(build_model, objective, batch_size=4, accumulation=1, tmp_path=tmp_path)
    accumulated, acc_losses = train_once(build_model, objective, batch_size=2, accumulation=2, tmp_path=tmp_path)
    assert big_losses == pytest.approx(acc_losses, rel=1e-4)
    for (name, p_big), p_acc in zip(big.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(p_big, p_acc, rtol=1e-4, atol=1e-5, msg=name)


def test_loss_matches_hf_cross_entropy_for_mle():
    """Same shifting and padding convention as the model's own loss."""
    torch.manual_seed(0)
    model = tiny_gpt2()
    batch = padded_dataset(num_rows=3)[:]
    inputs = {k: torch.tensor(v) for k, v in batch.items()}
    outputs = model(**inputs)
    ours = ObjectiveLoss("mle")(outputs, inputs["labels"])
    torch.testing.assert_close(ours, outputs.loss)


def test_evaluation_reports_cross_entropy(tmp_path):
    torch.manual_seed(0)
    model = tiny_gpt2()
    data = padded_dataset(num_rows=4)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    trainer = ObjectiveTrainer(
        model=model, args=args, eval_dataset=data, objective_loss=ObjectiveLoss("emo2", cost_embedding=cost_embedding_from_model(model))
    )
    eval_loss = trainer.evaluate()["eval_loss"]
    inputs = {k: torch.tensor(v) for k, v in data[:].items()}
    with torch.no_grad():
        expected = lm_loss(model(**inputs).logits, inputs["labels"], objective="mle")
    assert eval_loss == pytest.approx(expected.item(), rel=1e-5)


def test_missing_cost_embedding_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a cost embedding"):
        ObjectiveLoss("emo")
