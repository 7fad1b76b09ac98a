"""EMO in other people's training code, exact: a plain PyTorch loop (materialised and fused), transformers' ``Trainer``
with ``compute_loss_func``, the model's own loss hook (also under PEFT), and TRL's ``SFTTrainer`` (completion-only
loss, padding-free, packing).

Each is compared, on tiny GPT-2 and LLaMA models, with a hand-written reference: the literal formula
(``helpers.LITERAL_TOKEN_LOSSES``) applied to every row on its own (no padding, no packing), summed over the whole
batch, divided by its number of predicted tokens and differentiated by autograd. Trainers run one SGD step (lr 1, no
clipping, no weight decay), so the weight change is minus the gradient; gradient accumulation 2 x 2 must equal 4 x 1.
Each comparison prints its largest differences (``pytest -s``).
"""
from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import emo
from helpers import LITERAL_TOKEN_LOSSES, REPO_ROOT, VOCAB, padded_dataset, tiny_gpt2, tiny_llama, tiny_tokenizer

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
ROWS = 4  # one optimizer step covers the whole dataset, whatever order the sampler picks


def fresh(model_name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[model_name]()


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def unpadded_rows(dataset) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` of every row without its padding (``attention_mask``) or split at packing boundaries
    (TRL's ``seq_lengths``)."""
    rows = []
    for row in dataset:
        if "seq_lengths" in row:
            start = 0
            for length in row["seq_lengths"]:
                rows.append((row["input_ids"][start:start + length], row["labels"][start:start + length]))
                start += length
        else:
            length = sum(row["attention_mask"]) if "attention_mask" in row else len(row["input_ids"])
            rows.append((row["input_ids"][:length], row["labels"][:length]))
    return rows


def reference(model, rows, objective: str, cost_weight: torch.Tensor):
    """The literal objective over ``rows``, each run through ``model`` alone: (loss, gradients, entropy, accuracy);
    entropy and top-1 accuracy are means over the predicted tokens (TRL's metrics)."""
    total, count, entropy, correct = 0.0, 0, 0.0, 0
    for ids, labels in rows:
        logits = model(input_ids=torch.tensor([ids])).logits
        labels = torch.tensor([labels])
        loss, mask = LITERAL_TOKEN_LOSSES[objective](logits, labels, cost_weight)
        total = total + (loss * mask).sum()
        count += int(mask.sum())
        flat = logits[0, :-1].detach()
        entropy += float((torch.distributions.Categorical(logits=flat).entropy() * mask).sum())
        correct += int(((flat.argmax(-1) == labels[0, 1:]) & mask).sum())
    value = total / count
    return value.detach(), torch.autograd.grad(value, trainable(model)), entropy / count, correct / count


def assert_exact(name, value, grads, expected_value, expected_grads):
    """Loss within 1e-5 relative, every gradient within 1e-6 (+1e-4 relative); prints the largest differences."""
    value = torch.as_tensor(value, dtype=torch.float32)
    loss_diff = float((value - expected_value).abs())
    grad_diff = max(float((g - e).abs().max()) for g, e in zip(grads, expected_grads))
    print(f"\n[exactness] {name}: max |loss diff| {loss_diff:.1e}, max |gradient diff| {grad_diff:.1e}")
    torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def sgd_step(trainer):
    """One optimizer step of ``trainer``: (logged loss, gradients = weights before - after, logs)."""
    params = trainable(trainer.model)
    before = [p.detach().clone() for p in params]
    trainer.train()
    logs = trainer.state.log_history[0]
    return logs["loss"], [b - p.detach() for b, p in zip(before, params)], logs


def sgd_arguments(tmp_path, batch_size, accumulation, config_class=TrainingArguments, **extra):
    return config_class(
        output_dir=str(tmp_path / f"{batch_size}x{accumulation}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, **extra,
    )


def batch_of(dataset) -> tuple[dict, torch.Tensor]:
    tensors = {k: torch.tensor(v) for k, v in dataset[:].items()}
    labels = tensors.pop("labels")
    return tensors, labels


# ---- 1. a plain PyTorch loop --------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_plain_loop_materialized_and_fused(model_name):
    """``lm_loss`` on the logits and ``linear_lm_loss`` on the decoder's hidden states (no logits): one batch, and
    gradient accumulation by hand (each micro-batch's summed loss / the whole batch's token count)."""
    model, data = fresh(model_name), padded_dataset(num_rows=ROWS)
    cost = emo.cost_embedding_from_model(model)
    cost_weight = model.get_output_embeddings().weight.detach().clone()
    expected, expected_grads, _, _ = reference(model, unpadded_rows(data), "emo", cost_weight)
    inputs, labels = batch_of(data)
    head = model.get_output_embeddings()

    def materialized(inputs, labels, reduction="mean"):
        return emo.lm_loss(model(**inputs).logits, labels, objective="emo", cost_embedding=cost, reduction=reduction)

    def fused(inputs, labels, reduction="mean"):
        hidden = model.base_model(**inputs).last_hidden_state
        return emo.linear_lm_loss(hidden, head.weight, labels, objective="emo", cost_embedding=cost,
                                  reduction=reduction)

    count = (labels[:, 1:] != -100).sum()
    for name, loss_fn in (("materialized", materialized), ("fused", fused)):
        value = loss_fn(inputs, labels)
        assert_exact(f"plain loop {name} {model_name}", value.detach(),
                     torch.autograd.grad(value, trainable(model)), expected, expected_grads)
        halves = [loss_fn({k: v[rows] for k, v in inputs.items()}, labels[rows], "sum") / count
                  for rows in (slice(0, 2), slice(2, 4))]
        grads = [sum(g) for g in zip(*(torch.autograd.grad(h, trainable(model)) for h in halves))]
        assert_exact(f"plain loop {name} {model_name} 2x2", sum(h.detach() for h in halves), grads, expected,
                     expected_grads)


def test_fully_masked_batch_gives_zero_loss_and_gradients():
    """0 valid tokens (what a Trainer passes as ``num_items_in_batch=tensor(0)``): a zero loss and zero gradients."""
    model = fresh("gpt2")
    cost = emo.cost_embedding_from_model(model)
    inputs, labels = batch_of(padded_dataset(num_rows=2))
    labels = torch.full_like(labels, -100)
    objective = emo.ObjectiveLoss("emo", cost_embedding=cost, model=model)
    losses = {
        "lm_loss": emo.lm_loss(model(**inputs).logits, labels, objective="emo", cost_embedding=cost),
        "ObjectiveLoss": objective(model(**inputs), labels, num_items_in_batch=torch.tensor(0)),
        "ObjectiveLoss without a count": objective(model(**inputs), labels),
    }
    objective.attach_to_model(model)
    losses["model hook"] = model(**inputs, labels=labels, num_items_in_batch=torch.tensor(0)).loss
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, trainable(model), allow_unused=True)
        assert loss.item() == 0.0, name
        assert all(g is None or not g.any() for g in grads), name


# ---- 2. transformers.Trainer(compute_loss_func=...) --------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_trainer_compute_loss_func(model_name, tmp_path):
    """Vanilla ``Trainer`` with ``compute_loss_func=ObjectiveLoss(..., model=model)``: exact, GA 2 x 2 = 4 x 1 (GPT-2
    has no ``loss_type``: without the declared shift transformers would count one token too many per row)."""
    data = padded_dataset(num_rows=ROWS)
    results = {}
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = fresh(model_name)
        cost_weight = model.get_output_embeddings().weight.detach().clone()
        objective = emo.ObjectiveLoss("cft/emo2", cost_embedding=cost_weight, model=model)
        trainer = Trainer(model=model, args=sgd_arguments(tmp_path, batch_size, accumulation), train_dataset=data,
                          compute_loss_func=objective)
        results[batch_size, accumulation] = sgd_step(trainer)
    expected, expected_grads, _, _ = reference(fresh(model_name), unpadded_rows(data), "cft/emo2", cost_weight)
    for (batch_size, accumulation), (loss, grads, _) in results.items():
        assert_exact(f"Trainer compute_loss_func {model_name} {batch_size}x{accumulation}", loss, grads, expected,
                     expected_grads)


def test_trainer_count_of_unknown_origin_is_refused(tmp_path):
    """An ObjectiveLoss that was not told its model cannot check what ``num_items_in_batch`` counts: it refuses."""
    model = fresh("gpt2")
    trainer = Trainer(model=model, args=sgd_arguments(tmp_path, 2, 1), train_dataset=padded_dataset(num_rows=2),
                      compute_loss_func=emo.ObjectiveLoss("mle"))
    with pytest.raises(ValueError, match=r"cannot tell whether it counts the shifted labels.*model=<your model>"):
        trainer.train()


def test_fused_impl_refuses_full_logits(tmp_path):
    """``impl="fused"`` under a caller that computes full logits says so instead of silently materialising them."""
    model = fresh("gpt2")
    objective = emo.ObjectiveLoss("emo", cost_embedding=emo.cost_embedding_from_model(model), model=model,
                                  impl="fused")
    trainer = Trainer(model=model, args=sgd_arguments(tmp_path, 2, 1), train_dataset=padded_dataset(num_rows=2),
                      compute_loss_func=objective)
    with pytest.raises(ValueError, match="was given the model's full logits, so nothing would be fused"):
        trainer.train()
    with pytest.raises(ValueError, match="impl='fused' cannot apply there"):
        objective.attach_to_model(model)


# ---- 3. the model's own loss hook ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_model_loss_hook(model_name, tmp_path):
    """After ``attach_to_model``, ``model(**batch, labels=labels).loss`` is the objective: called directly, and inside
    a vanilla ``Trainer`` (no compute_loss_func: the model receives ``num_items_in_batch``), GA 2 x 2 = 4 x 1."""
    data = padded_dataset(num_rows=ROWS)
    model = fresh(model_name)
    cost_weight = model.get_output_embeddings().weight.detach().clone()
    expected, expected_grads, _, _ = reference(fresh(model_name), unpadded_rows(data), "emo", cost_weight)
    emo.ObjectiveLoss("emo", cost_embedding=cost_weight).attach_to_model(model)
    inputs, labels = batch_of(data)
    loss = model(**inputs, labels=labels).loss
    assert_exact(f"model hook, direct call {model_name}", loss.detach(),
                 torch.autograd.grad(loss, trainable(model)), expected, expected_grads)
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = fresh(model_name)
        emo.ObjectiveLoss("emo", cost_embedding=cost_weight).attach_to_model(model)
        trainer = Trainer(model=model, args=sgd_arguments(tmp_path, batch_size, accumulation), train_dataset=data)
        logged, grads, _ = sgd_step(trainer)
        assert_exact(f"model hook in Trainer {model_name} {batch_size}x{accumulation}", logged, grads, expected,
                     expected_grads)


def test_model_loss_hook_in_an_accelerate_loop():
    """An accelerate loop that reads ``outputs.loss``: passing the accumulated batch's token count as
    ``num_items_in_batch`` makes two micro-batches sum to the one-batch gradient."""
    from accelerate import Accelerator

    data = padded_dataset(num_rows=ROWS)
    model = fresh("llama")
    cost_weight = model.get_output_embeddings().weight.detach().clone()
    expected, expected_grads, _, _ = reference(fresh("llama"), unpadded_rows(data), "emo", cost_weight)
    emo.ObjectiveLoss("emo", cost_embedding=cost_weight).attach_to_model(model)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    inputs, labels = batch_of(data)
    count = (labels[:, 1:] != -100).sum()
    total = 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        loss = model(**{k: v[rows] for k, v in inputs.items()}, labels=labels[rows], num_items_in_batch=count).loss
        accelerator.backward(loss)
        total += loss.detach()
    assert_exact("model hook in an accelerate loop 2x2", total, [p.grad for p in trainable(model)], expected,
                 expected_grads)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_model_loss_hook_under_peft(model_name):
    """A PEFT-wrapped model: the hook sits on the underlying model, LoRA gradients match the reference."""
    from peft import LoraConfig, get_peft_model

    targets = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}[model_name]
    base = fresh(model_name)
    cost_weight = base.get_output_embeddings().weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    data = padded_dataset(num_rows=ROWS)
    expected, expected_grads, _, _ = reference(model, unpadded_rows(data), "cft/emo2", cost_weight)
    emo.ObjectiveLoss("cft/emo2", cost_embedding=cost_weight).attach_to_model(model)
    inputs, labels = batch_of(data)
    loss = model(**inputs, labels=labels).loss
    assert_exact(f"model hook under PEFT LoRA {model_name}", loss.detach(),
                 torch.autograd.grad(loss, trainable(model)), expected, expected_grads)


# ---- 4. TRL's SFTTrainer ------------------------------------------------------------------------------------------

def sft_rows(num_rows: int, seed: int = 0) -> Dataset:
    """Tokenised prompt-completion rows (``input_ids`` + ``completion_mask``) of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(num_rows):
        prompt, completion = 2 + i % 3, 3 + (2 * i) % 4
        ids = torch.randint(3, VOCAB, (prompt + completion,), generator=gen).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * completion})
    return Dataset.from_list(rows)


SFT_MODES = {  # mode -> (SFTConfig options, rows, (batch size, accumulation) pairs covering all sequences once)
    "completion_only": (dict(max_length=64), ROWS, ((4, 1), (2, 2))),
    "padding_free": (dict(padding_free=True, max_length=None), ROWS, ((4, 1), (2, 2))),
    "packing": (dict(packing=True, max_length=16), 8, ((4, 1), (2, 2))),  # 8 rows pack into 4 sequences
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(SFT_MODES))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_sft_trainer(model_name, mode, tmp_path):
    """``attach_to_sft_trainer``: one fused forward per step; the loss, gradients (GA 2 x 2 = 4 x 1) and TRL's own
    ``entropy`` / ``mean_token_accuracy`` metrics match the per-row reference on the completion tokens."""
    from trl import SFTConfig, SFTTrainer

    options, num_rows, schedules = SFT_MODES[mode]
    results, datasets = {}, {}
    for batch_size, accumulation in schedules:
        model = fresh(model_name)
        cost_weight = model.get_output_embeddings().weight.detach().clone()
        # SFTConfig defaults to bf16 autocast (also on CPU): fp32 here, so that differences are the integration's
        args = sgd_arguments(tmp_path, batch_size, accumulation, SFTConfig, completion_only_loss=True, bf16=False,
                             dataset_num_proc=None, **options)
        trainer = SFTTrainer(model=model, args=args, train_dataset=sft_rows(num_rows),
                             processing_class=tiny_tokenizer())
        emo.ObjectiveLoss("sft/emo", cost_embedding=cost_weight).attach_to_sft_trainer(trainer)
        assert len(trainer.train_dataset) == batch_size * accumulation  # one step sees every sequence
        datasets[batch_size, accumulation] = trainer.train_dataset
        forwards = count_forward_calls(model)
        results[batch_size, accumulation] = sgd_step(trainer)
        assert forwards() == accumulation  # one forward per micro-batch
    rows = unpadded_rows(datasets[schedules[0]])
    assert all(any(label != -100 for label in labels) for _, labels in rows)
    expected, expected_grads, entropy, accuracy = reference(fresh(model_name), rows, "sft/emo", cost_weight)
    for (batch_size, accumulation), (loss, grads, logs) in results.items():
        assert_exact(f"TRL SFTTrainer {mode} {model_name} {batch_size}x{accumulation}", loss, grads, expected,
                     expected_grads)
    logs = results[schedules[0]][2]  # one micro-batch: TRL's per-micro-batch means are the batch's means
    assert logs["entropy"] == pytest.approx(entropy, rel=1e-5)
    assert logs["mean_token_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def count_forward_calls(model):
    """Count calls of ``model``'s backbone (the decoder), which every forward of the model runs once."""
    calls = []
    model.base_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return lambda: len(calls)


def test_sft_trainer_refuses_other_losses(tmp_path):
    from trl import SFTConfig, SFTTrainer

    model = fresh("gpt2")
    args = sgd_arguments(tmp_path, 2, 1, SFTConfig, loss_type="dft", dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_rows(2), processing_class=tiny_tokenizer())
    with pytest.raises(ValueError, match="needs SFTConfig\\(loss_type='nll'\\)"):
        emo.ObjectiveLoss("emo", cost_embedding=model.get_output_embeddings().weight).attach_to_sft_trainer(trainer)


# ---- 5. the nn.Module forms ----------------------------------------------------------------------------------------

def test_module_forms_and_already_shifted_labels():
    """``LMLoss`` / ``LinearLMLoss`` equal the functions; ``shift=False`` takes labels already aligned with the
    positions (transformers' ``shift_labels``) and gives the same loss as shifting inside."""
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 7, 16, generator=gen), torch.randn(VOCAB, 16, generator=gen)
    labels = torch.randint(0, VOCAB, (2, 7), generator=gen)
    labels[1, :3] = -100
    cost = emo.CostEmbedding(torch.randn(VOCAB, 8, generator=gen))
    logits = hidden @ weight.T
    expected = emo.lm_loss(logits, labels, objective="cft/emo2", cost_embedding=cost)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(emo.LMLoss("cft/emo2", cost)(logits, labels), expected)
    torch.testing.assert_close(emo.LMLoss("cft/emo2", cost, shift=False)(logits, shifted), expected)
    torch.testing.assert_close(emo.LinearLMLoss("cft/emo2", cost)(hidden, weight, labels), expected)
    torch.testing.assert_close(emo.LinearLMLoss("cft/emo2", cost, shift=False)(hidden, weight, shifted), expected)
    per_token = emo.LMLoss("cft/emo2", cost, reduction="none", shift=False)(logits, shifted)
    assert per_token.shape == labels.shape and (per_token[:, -1] == 0).all()
    with pytest.raises(ValueError, match="needs a cost embedding"):
        emo.LMLoss("emo")


# ---- the README's "The loss" section, line by line -----------------------------------------------------------------

def readme_loss_code() -> str:
    section = (REPO_ROOT / "README.md").read_text().split("\n## The loss\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_readme_loss_section_runs(model_name, tmp_path, monkeypatch):
    """Every line of the README's code block runs as written (given a model, a batch, datasets and configs), and the
    trainers it builds then train a step."""
    monkeypatch.chdir(tmp_path)
    data = padded_dataset(num_rows=ROWS)
    inputs, labels = batch_of(data)
    from trl import SFTConfig

    namespace = dict(model=fresh(model_name), inputs=inputs, labels=labels, data=data, sft_data=sft_rows(ROWS),
                     args=sgd_arguments(tmp_path, 2, 1), tokenizer=tiny_tokenizer(),
                     sft_config=SFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, bf16=False, max_steps=1,
                                          report_to=[], dataset_num_proc=None))
    exec(compile(readme_loss_code(), "README.md (The loss)", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
    for trainer in (namespace["sft"], namespace["trainer"]):
        trainer.train()
        assert trainer.state.global_step == 1 and math.isfinite(trainer.state.log_history[-1]["train_loss"])
