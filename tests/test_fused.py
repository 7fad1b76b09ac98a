"""Fused linear+objective: equal to the materialised path in values and gradients, and in training."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

import emo
from emo import cost_embedding_from_model, linear_lm_loss, lm_loss
from emo.training import ObjectiveLoss, ObjectiveTrainer
from helpers import padded_dataset, tiny_gpt2, tiny_llama, train_once


def _inputs(seed, batch, seq, hidden, vocab, width, ignore_fraction, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(dtype).requires_grad_()
    bias = torch.randn(vocab, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < ignore_fraction] = -100
    cost = torch.randn(vocab, width, generator=gen)
    return h, weight, bias, labels, cost


def _run(loss_fn, leaves, reduction):
    for leaf in leaves:
        leaf.grad = None
    loss = loss_fn()
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3)) if reduction == "none" else 1.0
    (loss * upstream).sum().backward()
    return [loss.detach()] + [leaf.grad.clone() for leaf in leaves]


@pytest.mark.parametrize("objective", emo.OBJECTIVES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "chunk_size,ignore_fraction,width,use_bias",
    [(4, 0.0, 8, True), (7, 0.3, 64, False), (64, 0.9, 3, True), (1, 0.5, 40, False)],
)
def test_fused_matches_materialized(objective, reduction, chunk_size, ignore_fraction, width, use_bias):
    h, weight, bias, labels, cost = _inputs(1, 3, 11, 24, 97, width, ignore_fraction)
    bias_arg = bias if use_bias else None
    leaves = [h, weight] + ([bias] if use_bias else [])

    def fused():
        return linear_lm_loss(
            h, weight, labels, objective=objective, lm_head_bias=bias_arg, cost_embedding=cost,
            reduction=reduction, chunk_size=chunk_size,
        )

    def materialized():
        logits = h @ weight.T + (bias if use_bias else 0)
        return lm_loss(logits, labels, objective=objective, cost_embedding=cost, reduction=reduction)

    for ours, expected in zip(_run(fused, leaves, reduction), _run(materialized, leaves, reduction)):
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_half_precision_is_finite_and_close(dtype):
    h, weight, bias, labels, cost = _inputs(2, 2, 16, 32, 120, 16, 0.2, dtype=dtype)
    fused = linear_lm_loss(h, weight, labels, objective="emo", lm_head_bias=bias, cost_embedding=cost, chunk_size=5)
    fused.backward()
    assert fused.dtype == torch.float32
    assert h.grad.dtype == dtype and weight.grad.dtype == dtype and bias.grad.dtype == dtype
    assert all(torch.isfinite(g).all() for g in (h.grad, weight.grad, bias.grad))
    reference = lm_loss((h.float() @ weight.float().T + bias.float()).detach(), labels, objective="emo", cost_embedding=cost)
    assert fused.item() == pytest.approx(reference.item(), rel=2e-2)


def test_fused_follows_autocast_like_the_materialized_head():
    """Under bf16 autocast the head runs in bf16 in both paths: same values and gradients up to bf16 rounding."""
    h, weight, bias, labels, cost = _inputs(6, 2, 12, 16, 80, 8, 0.2)
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                loss = linear_lm_loss(h, weight, labels, objective="emo", lm_head_bias=bias, cost_embedding=cost)
            else:
                logits = torch.nn.functional.linear(h, weight, bias)
                loss = lm_loss(logits, labels, objective="emo", cost_embedding=cost)
        results.append(_run(lambda: loss, [h, weight, bias], "mean"))
    for ours, expected in zip(*results):
        assert ours.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(ours, expected, rtol=2e-2, atol=1e-3)


def test_fused_tied_weight_accumulates_both_uses():
    """With tied embeddings the head weight is also the input embedding: gradients from both paths add up."""
    torch.manual_seed(0)
    embedding = torch.nn.Parameter(torch.randn(30, 8))
    ids = torch.randint(0, 30, (2, 6))
    grads = []
    for fused in (True, False):
        embedding.grad = None
        hidden = torch.tanh(embedding[ids])
        if fused:
            loss = linear_lm_loss(hidden, embedding, ids, objective="emo2", cost_embedding=embedding.detach())
        else:
            loss = lm_loss(hidden @ embedding.T, ids, objective="emo2", cost_embedding=embedding.detach())
        loss.backward()
        grads.append(embedding.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_fused_peak_memory_does_not_hold_logits():
    """The autograd graph keeps no N x V tensor: saved state is the fp32 gradients only."""
    h, weight, _, labels, cost = _inputs(4, 4, 64, 16, 5000, 8, 0.0)
    loss = linear_lm_loss(h, weight, labels, objective="emo", cost_embedding=cost, chunk_size=32)
    node = loss.grad_fn
    while not hasattr(node, "grads"):
        node = node.next_functions[0][0]
    assert not node.saved_tensors
    held = [g for g in node.grads if g is not None]
    valid_tokens = int((labels[:, 1:] != -100).sum())
    assert sum(g.numel() for g in held) == valid_tokens * h.shape[-1] + weight.numel()


@pytest.mark.parametrize("hidden_dtype,weight_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                                       (torch.float16, torch.bfloat16)], ids=str)
def test_fused_mixed_dtypes_run_in_the_promoted_dtype(hidden_dtype, weight_dtype):
    """A bf16 hidden state with an fp32 head (say): computed as in the promoted dtype, each gradient in its input's
    own dtype, equal to the loss of the promoted inputs."""
    h, weight, bias, labels, cost = _inputs(3, 2, 6, 8, 30, 4, 0.2)
    h, weight = h.detach().to(hidden_dtype).requires_grad_(), weight.detach().to(weight_dtype).requires_grad_()
    loss = linear_lm_loss(h, weight, labels, objective="emo", cost_embedding=cost)
    grad_h, grad_w = torch.autograd.grad(loss, (h, weight))
    assert (grad_h.dtype, grad_w.dtype) == (hidden_dtype, weight_dtype)
    common = torch.promote_types(hidden_dtype, weight_dtype)
    h2, w2 = h.detach().to(common).requires_grad_(), weight.detach().to(common).requires_grad_()
    expected = linear_lm_loss(h2, w2, labels, objective="emo", cost_embedding=cost)
    torch.testing.assert_close(loss, expected)
    expected_h, expected_w = torch.autograd.grad(expected, (h2, w2))
    torch.testing.assert_close(grad_h, expected_h.to(hidden_dtype))
    torch.testing.assert_close(grad_w, expected_w.to(weight_dtype))


def test_fused_rejects_mismatched_head():
    h, weight, _, labels, _ = _inputs(5, 1, 4, 8, 20, 4, 0.0)
    with pytest.raises(ValueError, match=r"lm_head_weight must be a floating \(vocab, 8\)"):
        linear_lm_loss(h, weight[:, :4], labels, objective="mle")
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        linear_lm_loss(h, weight, labels, objective="emo", cost_embedding=torch.randn(21, 3))


@pytest.mark.slow
@pytest.mark.parametrize("build_model", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("objective", ["mle", "emo", "adaptive_emo"])
def test_fused_training_matches_materialized(build_model, objective, tmp_path):
    """Through ObjectiveTrainer: the fused loss reads ``hidden_states[-1]`` (the final, normed state) and matches."""
    results = {
        impl: train_once(build_model, objective, batch_size=2, accumulation=2, tmp_path=tmp_path, steps=3, impl=impl)
        for impl in ("materialized", "fused")
    }
    (model_m, losses_m), (model_f, losses_f) = results["materialized"], results["fused"]
    assert losses_f == pytest.approx(losses_m, rel=1e-4)
    for p_m, p_f in zip(model_m.parameters(), model_f.parameters()):
        torch.testing.assert_close(p_f, p_m, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build_model", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_fused_contract_with_the_model(build_model):
    """``forward_kwargs`` makes the model skip the logits and return the last hidden state; ``__call__`` then gives
    the same loss as the materialised loss on full logits; given full logits it refuses to pretend to be fused, and
    without either output it says what is missing."""
    torch.manual_seed(0)
    model = build_model().eval()
    batch = {k: torch.tensor(v) for k, v in padded_dataset(num_rows=3)[:].items()}
    labels = batch.pop("labels")
    cost = cost_embedding_from_model(model)
    loss = ObjectiveLoss("emo2", cost_embedding=cost, model=model, impl="fused")
    materialized = ObjectiveLoss("emo2", cost_embedding=cost, model=model)
    assert loss.forward_kwargs(training=False, device="cpu") == {}
    extra = loss.forward_kwargs(training=True, device="cpu")
    outputs = model(**batch, **extra)
    assert outputs.logits.shape[1] == 0
    torch.testing.assert_close(loss(outputs, labels), materialized(model(**batch), labels))
    with pytest.raises(ValueError, match="was given the model's full logits, so nothing would be fused"):
        loss(model(**batch), labels)
    with pytest.raises(ValueError, match="neither logits nor a last hidden state"):
        loss({"logits": outputs.logits}, labels)


def test_fused_refuses_lora_on_lm_head(tmp_path):
    from transformers import TrainingArguments

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = ObjectiveTrainer(
        model=model, args=args, train_dataset=padded_dataset(num_rows=2), objective_loss=ObjectiveLoss("mle", impl="fused")
    )
    with pytest.raises(ValueError, match="does not support an adapter"):
        trainer.train()


def test_fused_trains_with_lora_on_attention(tmp_path):
    from transformers import TrainingArguments

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    cost = cost_embedding_from_model(model)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1
    )
    trainer = ObjectiveTrainer(
        model=model, args=args, train_dataset=padded_dataset(num_rows=4),
        objective_loss=ObjectiveLoss("emo", cost_embedding=cost, impl="fused"),
    )
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


@pytest.mark.slow
def test_recipe_with_fused_impl_matches_materialized(compose_cfg, tmp_path, one_thread):
    """`objective.impl=fused` through the Hydra recipe: same training losses and evaluation as `materialized`."""
    from experiments.lm import run

    metrics = {}
    for impl in ("materialized", "fused"):
        cfg = compose_cfg(
            "experiment=demo_smoke", "objective=emo", f"objective.impl={impl}", "generation.num_seeds=1",
            f"paths.cache_dir={tmp_path / 'cache'}", f"paths.results_dir={tmp_path / impl}",
            f"paths.output_dir={tmp_path / impl / 'out'}",
        )
        metrics[impl] = run(cfg)
    materialized, fused = metrics["materialized"], metrics["fused"]
    assert fused["train"]["train_loss"] == pytest.approx(materialized["train"]["train_loss"], rel=1e-4)
    assert fused["test_loss"] == pytest.approx(materialized["test_loss"], rel=1e-4)
    assert fused["oracle"]["forward_kl"] == pytest.approx(materialized["oracle"]["forward_kl"], rel=1e-3)
