"""The Trainer integration: label shifting, padding, and gradient-accumulation equivalence on tiny GPT-2 and Llama."""
import pytest
import torch
from transformers import TrainingArguments

import emo
from emo import cost_embedding_from_model, lm_loss
from emo.training import ObjectiveLoss, ObjectiveTrainer
from helpers import VOCAB, padded_dataset, tiny_gpt2, tiny_llama, train_once


@pytest.mark.slow
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


@pytest.mark.parametrize("impl", ["materialized", "fused"])
@pytest.mark.parametrize("objective", emo.OBJECTIVES)
def test_evaluation_reports_cross_entropy(objective, impl, tmp_path):
    """``eval_loss`` is the true token CE for every objective and implementation."""
    torch.manual_seed(0)
    model = tiny_gpt2()
    data = padded_dataset(num_rows=4)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    loss = ObjectiveLoss(objective, cost_embedding=cost_embedding_from_model(model), impl=impl)
    trainer = ObjectiveTrainer(model=model, args=args, eval_dataset=data, objective_loss=loss)
    eval_loss = trainer.evaluate()["eval_loss"]
    inputs = {k: torch.tensor(v) for k, v in data[:].items()}
    with torch.no_grad():
        expected = lm_loss(model(**inputs).logits, inputs["labels"], objective="mle")
    assert eval_loss == pytest.approx(expected.item(), rel=1e-5)


def test_live_head_objective_needs_the_model():
    loss = ObjectiveLoss("adaptive_emo")
    with pytest.raises(ValueError, match="reads the model's LM head: pass model="):
        loss({"logits": torch.randn(1, 3, VOCAB)}, torch.tensor([[1, 2, 3]]))


def test_missing_cost_embedding_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a cost embedding"):
        ObjectiveLoss("emo")
