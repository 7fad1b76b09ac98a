"""``torch.compile(loss, fullgraph=True)``: every objective, both implementations, forward and backward, with no graph
break (no host sync in the loss), and the same values and gradients as eager."""
import pytest
import torch

import emo
from emo import CostEmbedding, linear_lm_loss, lm_loss
from emo.registry import get_objective

BATCH, SEQ, HIDDEN, VOCAB, WIDTH = 2, 9, 16, 50, 12


def _case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels[0, :4] = -100
    return hidden, weight, labels, CostEmbedding(torch.randn(VOCAB, WIDTH, generator=gen))


def _losses(objective, cost):
    """(materialised, fused) loss functions of ``(hidden, weight, labels)``; live-head objectives use the head."""
    live = get_objective(objective).cost_source == "live_head"

    def materialized(hidden, weight, labels):
        step_cost = CostEmbedding(weight, validate=False) if live else cost
        return lm_loss(hidden @ weight.T, labels, objective=objective, cost_embedding=step_cost)

    def fused(hidden, weight, labels):
        step_cost = CostEmbedding(weight, validate=False) if live else cost
        return linear_lm_loss(hidden, weight, labels, objective=objective, cost_embedding=step_cost)

    return {"materialized": materialized, "fused": fused}


def _value_and_grads(loss_fn, hidden, weight, labels):
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    value = loss_fn(*leaves, labels)
    return value.detach(), torch.autograd.grad(value, leaves)


def _assert_compiled_matches_eager(loss_fn, backend, hidden, weight, labels):
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    value, grads = _value_and_grads(compiled, hidden, weight, labels)
    expected_value, expected_grads = _value_and_grads(loss_fn, hidden, weight, labels)
    torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["materialized", "fused"])
@pytest.mark.parametrize("objective", emo.OBJECTIVES)
def test_fullgraph_compile_for_every_objective(objective, impl):
    """Dynamo traces the whole loss (forward, and backward through AOT autograd) as one graph."""
    hidden, weight, labels, cost = _case()
    _assert_compiled_matches_eager(_losses(objective, cost)[impl], "aot_eager", hidden, weight, labels)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["materialized", "fused"])
def test_fullgraph_compile_with_inductor(impl):
    """The default backend (inductor: generated C++ on CPU, Triton on GPUs) on the Track-1 objective."""
    hidden, weight, labels, cost = _case(seed=1)
    _assert_compiled_matches_eager(_losses("emo", cost)[impl], "inductor", hidden, weight, labels)


def test_out_of_range_label_under_compile_raises():
    """Under compile the label check is an asynchronous assertion (no host sync), still an error."""
    hidden, weight, labels, cost = _case()
    labels[1, 3] = VOCAB
    torch._dynamo.reset()
    compiled = torch.compile(_losses("emo", cost)["materialized"], fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="out of range for vocabulary size 50"):
        compiled(hidden, weight, labels)


def test_per_token_statistics_under_compile_match_eager():
    """Compiled, the fused loss projects every position: its per-token values and statistics (TRL's metrics) are still
    zero at ignored positions, as in eager mode where those positions are dropped."""
    hidden, weight, labels, _ = _case(seed=2)

    def per_token(hidden, weight, labels):
        return linear_lm_loss(hidden, weight, labels, objective="mle", reduction="none", return_token_stats=True)

    torch._dynamo.reset()
    compiled = torch.compile(per_token, fullgraph=True, backend="aot_eager")(hidden, weight, labels)
    for ours, expected in zip(compiled, per_token(hidden, weight, labels)):
        torch.testing.assert_close(ours, expected)
    assert not compiled.entropy[0, :3].any() and compiled.entropy[1].all()
