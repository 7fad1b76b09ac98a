"""Gradient quality: half-precision gradients as precise as autograd's under a loss scale, and a clear refusal of
second-order gradients (the kernels compute the gradient in forward)."""
import pytest
import torch
import torch.nn.functional as F

from emo import linear_lm_loss, lm_loss
from emo.losses import scale_rows_and_cast

LOSS_SCALE = 65536.0  # GradScaler's initial fp16 loss scale
BATCH, SEQ, VOCAB, WIDTH, HIDDEN = 4, 64, 5000, 32, 64


def _autograd_loss(logits, labels, cost, objective):
    """Plain autograd on fp32 logits: token CE, or EMOLoss 0.0.3 mode 1 (``emo_clamped``), mean over valid."""
    flat, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    mask = targets != -100
    ce = F.cross_entropy(flat, targets, reduction="none")
    if objective == "mle":
        loss = ce
    else:
        unit = F.normalize(cost, dim=1)
        transport = (1 - ((flat.softmax(-1) @ unit) * unit[targets.clamp(min=0)]).sum(-1)) * mask
        loss = 0.5 * (ce + (ce / (transport + 1e-10)).detach().clamp(max=3.0) * transport)
    return (loss * mask).sum() / mask.sum()


def _case(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels[:, -6:] = -100
    cost = torch.randn(VOCAB, WIDTH, generator=gen)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=gen).to(dtype)
    weight = (3.0 * torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5).to(dtype)
    logits = (3.0 * torch.randn(BATCH, SEQ, VOCAB, generator=gen)).to(dtype)
    return logits, hidden, weight, labels, cost


def _scaled_grads(loss_fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    (loss_fn(*leaves) * LOSS_SCALE).backward()
    return [leaf.grad for leaf in leaves]


def _flushed_fraction(grad, reference):
    """Fraction of the reference's non-zero entries that ``grad`` rounds to zero."""
    nonzero = reference != 0
    return ((grad == 0) & nonzero).sum().item() / nonzero.sum().item()


def _l1_relative_error(grad, reference):
    return ((grad.double() - reference.double()).abs().sum() / reference.double().abs().sum()).item()


def _assert_as_precise_as_autograd(ours, autograd_half, reference):
    assert ours.dtype == autograd_half.dtype
    ours_flushed, autograd_flushed = _flushed_fraction(ours, reference), _flushed_fraction(autograd_half, reference)
    ours_error, autograd_error = _l1_relative_error(ours, reference), _l1_relative_error(autograd_half, reference)
    assert ours_flushed <= 2 * autograd_flushed, (ours_flushed, autograd_flushed)
    assert ours_error <= 2 * autograd_error, (ours_error, autograd_error)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("objective", ["mle", "emo_clamped"])
def test_half_logit_gradients_are_as_precise_as_autograd(objective, dtype):
    """Half logits, loss scale 65536: we flush at most 2x as many entries to zero as autograd in that dtype (fp32 loss
    on upcast logits, as Hugging Face computes it) and have at most 2x its L1 error vs fp32 autograd."""
    logits, _, _, labels, cost = _case(dtype)
    (reference,) = _scaled_grads(lambda z: _autograd_loss(z, labels, cost, objective), logits.float())
    (autograd_half,) = _scaled_grads(lambda z: _autograd_loss(z.float(), labels, cost, objective), logits)
    (ours,) = _scaled_grads(lambda z: lm_loss(z, labels, objective=objective, cost_embedding=cost), logits)
    if dtype == torch.float16:
        assert _flushed_fraction(autograd_half, reference) > 0  # the case exercises fp16's range
    _assert_as_precise_as_autograd(ours, autograd_half, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("objective", ["mle", "emo_clamped"])
def test_fused_half_gradients_are_as_precise_as_autograd(objective, dtype):
    """The same bounds for the fused head's hidden-state and weight gradients, against autograd through a half LM
    head (``hidden @ weight.T`` in that dtype, loss in fp32)."""
    _, hidden, weight, labels, cost = _case(dtype, seed=1)
    def autograd(h, w):
        return _autograd_loss((h @ w.T).float(), labels, cost, objective)

    def fused(h, w):
        return linear_lm_loss(h, w, labels, objective=objective, cost_embedding=cost, chunk_size=64)

    reference = _scaled_grads(autograd, hidden.float(), weight.float())
    autograd_half = _scaled_grads(autograd, hidden, weight)
    ours = _scaled_grads(fused, hidden, weight)
    for our_grad, autograd_grad, reference_grad in zip(ours, autograd_half, reference):
        _assert_as_precise_as_autograd(our_grad, autograd_grad, reference_grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("num_rows,chunk_size", [(1, 4), (2, 1), (3, 2), (7, 64), (100, 3), (100, 1000)])
def test_scale_rows_and_cast_is_exact_and_in_place(num_rows, chunk_size, dtype):
    """Scaling in fp32 then casting equals the out-of-place computation bit for bit; narrower dtypes reuse the
    gradient buffer's own storage (no second N x V buffer)."""
    gen = torch.Generator().manual_seed(num_rows)
    grad = torch.randn(num_rows, 37, generator=gen) * 1e-6
    scale = torch.rand(num_rows, generator=gen) * 65536
    expected = (grad * scale.unsqueeze(1)).to(dtype)
    ours = scale_rows_and_cast(grad.clone() if dtype.itemsize > 4 else grad, scale, dtype, chunk_size)
    assert ours.dtype == dtype and torch.equal(ours, expected)
    if dtype.itemsize <= 4:
        assert ours.data_ptr() == grad.data_ptr()


def _second_order_cases():
    gen = torch.Generator().manual_seed(0)
    labels, cost = torch.randint(0, 30, (2, 5), generator=gen), torch.randn(30, 4, generator=gen)
    logits, hidden, weight = torch.randn(2, 5, 30), torch.randn(2, 5, 8), torch.randn(30, 8)
    return {
        "materialized": (lambda z: lm_loss(z, labels, objective="emo", cost_embedding=cost), (logits,)),
        "fused": (lambda h, w: linear_lm_loss(h, w, labels, objective="emo", cost_embedding=cost), (hidden, weight)),
        "fused_per_token": (
            lambda h, w: linear_lm_loss(h, w, labels, objective="mle", reduction="none").sum(), (hidden, weight)
        ),
    }


@pytest.mark.parametrize("case", sorted(_second_order_cases()))
def test_create_graph_is_refused_with_a_clear_error(case):
    loss_fn, inputs = _second_order_cases()[case]
    leaves = [x.clone().requires_grad_() for x in inputs]
    with pytest.raises(RuntimeError, match="gradient in the forward pass.*second-order gradients"):
        torch.autograd.grad(loss_fn(*leaves), leaves, create_graph=True)
    first_order = torch.autograd.grad(loss_fn(*leaves), leaves)
    assert all(torch.isfinite(g).all() for g in first_order)
