"""Golden tests of every objective name: one name, one formula. For each preset in ``conf/objective``, the Python API
called with just that name, and the Hydra preset composed exactly as a run composes it, give the values and gradients
of a literal autograd transcription of the reference code it names (DRSY/EMO at 14da9d5, or the published
``EMOLoss==0.0.3`` wheel itself), through both implementations."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import emo
from emo import linear_lm_loss, lm_loss
from emo.registry import get_objective
from emo.training import ObjectiveLoss
from helpers import LITERAL_TOKEN_LOSSES, literal_mean, load_reference_emoloss

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "objective"
BATCH, SEQ, HIDDEN, VOCAB, WIDTH = 3, 13, 16, 97, 12


def literal(preset):
    """The literal transcription of ``preset``'s reference formula as a mean over valid tokens."""
    def loss(logits, labels, cost):
        return literal_mean(LITERAL_TOKEN_LOSSES[preset], logits, labels, cost)

    return loss


def emoloss_wheel(mode):
    def loss(logits, labels, cost):
        return load_reference_emoloss()(logits, labels, cost, mode=mode)

    return loss


# preset -> (reference it reproduces, literal loss). The EMO constants are the reference code's, written here by
# hand: a preset whose hyper-parameters drift from its reference fails. Baseline presets check the formula.
GOLDEN = {
    "emo": ("language_modeling/gpt2.py `emo` (Track 1): mode 1, no clamp, no gt_q", literal("emo")),
    "emo_clamped": ("EMOLoss==0.0.3 mode 1 (the wheel): mode 1, clamp 3", emoloss_wheel(1)),
    "emo2": ("EMOLoss==0.0.3 mode 2 (the wheel)", emoloss_wheel(2)),
    "cft/emo2": ("continual_finetuning/emo_llama.py EMOLlama2ForCausalLM (Track 2): mode 2, gt_q", literal("cft/emo2")),
    "cft/emo": ("continual_finetuning/emo_llama.py EMOLlamaForCausalLM: mode 1, clamp 3, gt_q", literal("cft/emo")),
    "sft/emo": ("instruction_tuning/emo_llama.py (Track 3): mode 1, no clamp, gt_q", literal("sft/emo")),
    "adaptive_emo": ("emo_patch.py EMO-1 adaptive: current head, mode 1, no clamp, gt_q", literal("adaptive_emo")),
    "mle": ("token cross-entropy", literal("mle")),
    "mixce": ("MixCE token-level form, eta 0.1", literal("mixce")),
    "tailr": ("TaiLr weight, gamma 0.5, min_weight 0.2", literal("tailr")),
    "tvd": ("language_modeling/gpt2.py `tvd`, mixing_ratio 0.5", literal("tvd")),
}


def _preset_names():
    return sorted(str(p.relative_to(CONF_DIR).with_suffix("")) for p in CONF_DIR.rglob("*.yaml") if p.stem != "base")


def test_every_name_is_a_preset_with_a_golden_reference():
    """The registry's names, the Hydra presets and the golden references are the same set."""
    assert sorted(GOLDEN) == _preset_names() == sorted(emo.OBJECTIVES)


@pytest.mark.parametrize("preset", sorted(GOLDEN))
def test_preset_config_is_the_registry_objective(preset, compose_cfg):
    """``objective=<name>`` names the registry objective ``<name>`` and restates exactly its default hyper-parameters."""
    cfg = compose_cfg(f"objective={preset}").objective
    assert cfg.name == preset and cfg.label == preset
    assert OmegaConf.to_container(cfg.hparams, resolve=True) == get_objective(preset).defaults


class _Head(torch.nn.Module):
    """The smallest model ObjectiveLoss can read an LM head from."""

    def __init__(self, weight):
        super().__init__()
        self.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.lm_head.weight = torch.nn.Parameter(weight)

    def get_output_embeddings(self):
        return self.lm_head


def _inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels[torch.rand(BATCH, SEQ, generator=gen) < 0.25] = -100
    return hidden, weight, labels, torch.randn(VOCAB, WIDTH, generator=gen)


@pytest.mark.parametrize("impl", ["materialized", "fused"])
@pytest.mark.parametrize("preset", sorted(GOLDEN))
def test_preset_matches_its_reference(preset, impl, compose_cfg):
    cfg = compose_cfg(f"objective={preset}", f"objective.impl={impl}").objective
    spec = get_objective(cfg.name)
    hidden, weight, labels, fixed_cost = _inputs(seed=len(preset))
    hidden.requires_grad_()
    model = _Head(weight)
    head = model.lm_head.weight
    cost = {"none": None, "fixed": fixed_cost, "live_head": head.detach()}[spec.cost_source]
    _, literal = GOLDEN[preset]

    expected = literal(hidden @ head.T, labels, cost)
    expected_grads = torch.autograd.grad(expected, (hidden, head))

    loss = ObjectiveLoss(
        cfg.name, hparams=OmegaConf.to_container(cfg.hparams, resolve=True),
        cost_embedding=fixed_cost if spec.cost_source == "fixed" else None, model=model, impl=cfg.impl,
    )
    if impl == "fused":  # what the model returns given loss.forward_kwargs(training=True, ...)
        outputs = {"logits": hidden.new_empty(BATCH, 0, VOCAB), "hidden_states": (hidden,)}
    else:
        outputs = {"logits": hidden @ head.T}
    ours = loss(outputs, labels)
    grads = torch.autograd.grad(ours, (hidden, head))

    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)

    # The Python API by name alone (no hyper-parameters): the same formula.
    by_name = {"none": None, "fixed": fixed_cost, "live_head": head}[spec.cost_source]
    if impl == "fused":
        python = linear_lm_loss(hidden, head, labels, objective=preset, cost_embedding=by_name)
    else:
        python = lm_loss(hidden @ head.T, labels, objective=preset, cost_embedding=by_name)
    torch.testing.assert_close(python, expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(torch.autograd.grad(python, (hidden, head)), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_gt_q_changes_only_the_ratio_weights():
    """``gt_q`` raises the transport value seen by the ratios by ``q[y]``: mode 1 values stay CE while unclamped, and
    the gt_q presets differ from the plain ones (so the golden tests above can tell them apart)."""
    hidden, weight, labels, cost = _inputs(seed=0)
    logits = (hidden @ weight.T).requires_grad_()
    plain, with_gt_q, cross_entropy = literal("emo"), literal("sft/emo"), literal("mle")
    torch.testing.assert_close(plain(logits, labels, cost), cross_entropy(logits, labels, cost))
    torch.testing.assert_close(with_gt_q(logits, labels, cost), cross_entropy(logits, labels, cost))
    grad_plain = torch.autograd.grad(plain(logits, labels, cost), logits)[0]
    grad_gt_q = torch.autograd.grad(with_gt_q(logits, labels, cost), logits)[0]
    assert (grad_plain - grad_gt_q).abs().sum() > 1e-3 * grad_plain.abs().sum()
    two, two_gt_q = emoloss_wheel(2)(logits, labels, cost), literal("cft/emo2")(logits, labels, cost)
    assert two_gt_q > two


def test_missing_reference_wheel_fails_instead_of_skipping(tmp_path, monkeypatch):
    """Without the wheel (and without PyPI) the golden tests fail with instructions; they never skip."""
    import helpers

    monkeypatch.setattr(helpers, "REFERENCE_DIR", tmp_path / "reference")
    monkeypatch.setattr(helpers.subprocess, "run", lambda *args, **kwargs: None)  # PyPI unreachable
    with pytest.raises(pytest.fail.Exception, match=r"run `make install`"):
        helpers.load_reference_emoloss()
