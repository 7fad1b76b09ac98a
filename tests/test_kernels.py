"""The Triton chunk kernel (``chunk_kernel="triton"``) against the torch reference (``chunk_kernel="torch"``), as
Liger-Kernel tests its kernels: values and gradients of the materialised and the fused loss, every objective, fp32,
bf16 and fp16 inputs, ignored positions, odd vocabulary sizes and more than one block per row. On CPU the kernels run
in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py), so the shapes are tiny; the CUDA tests run the
compiled kernels at a realistic size."""
import pytest
import torch

import emo
from emo import CostEmbedding, linear_lm_loss, lm_loss
from emo.triton_chunk import MAX_BLOCK, check_triton_device

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tolerances(dtype):
    """fp32 results agree to rounding; half gradients may differ by one unit in the last place of the cast."""
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)


def _case(seed, batch, seq, vocab, width, dtype, device="cpu", ignore_fraction=0.3):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, seq, vocab, generator=gen)).to(device, dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < ignore_fraction] = -100
    return logits, labels.to(device), CostEmbedding(torch.randn(vocab, width, generator=gen)).to(device)


def _values_and_grads(loss_fn, leaves, reduction):
    for leaf in leaves:
        leaf.grad = None
    loss = loss_fn()
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.device)
    (loss * upstream).sum().backward()
    return [loss.detach()] + [leaf.grad.clone() for leaf in leaves]


def _assert_kernels_agree(run, leaves, reduction, dtype):
    reference = _values_and_grads(lambda: run("torch"), leaves, reduction)
    ours = _values_and_grads(lambda: run("triton"), leaves, reduction)
    for result, expected in zip(ours, reference):
        assert result.dtype == expected.dtype
        torch.testing.assert_close(result, expected, **_tolerances(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objective", emo.OBJECTIVES)
def test_triton_materialized_matches_torch(objective, dtype):
    logits, labels, cost = _case(0, 2, 9, 97, 16, dtype)
    logits.requires_grad_()

    def run(kernel):
        return lm_loss(logits, labels, objective=objective, cost_embedding=cost, reduction="none", chunk_size=5,
                       chunk_kernel=kernel)

    _assert_kernels_agree(run, [logits], "none", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objective", emo.OBJECTIVES)
def test_triton_fused_matches_torch(objective, dtype):
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 7, 12, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(61, 12, generator=gen) / 12**0.5).to(dtype).requires_grad_()
    bias = torch.randn(61, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, 61, (2, 7), generator=gen)
    labels[0, 2:4] = -100
    cost = CostEmbedding(torch.randn(61, 5, generator=gen))
    reduction = "none" if dtype == torch.float32 else "mean"

    def run(kernel):
        return linear_lm_loss(hidden, weight, labels, objective=objective, lm_head_bias=bias, cost_embedding=cost,
                              reduction=reduction, chunk_size=4, chunk_kernel=kernel)

    _assert_kernels_agree(run, [hidden, weight, bias], reduction, dtype)


@pytest.mark.parametrize("objective", ["mle", "emo2"])
def test_triton_rows_longer_than_one_block(objective):
    """A vocabulary past ``MAX_BLOCK`` (and not a power of two) takes several blocks per row: the online softmax
    rescales its running sums between them (the row maxima lie in the last block, or in the first)."""
    logits, labels, cost = _case(3, 1, 5, MAX_BLOCK + 905, 8, torch.float32, ignore_fraction=0.0)
    logits[0, ::2, -3] += 20.0
    logits[0, 1::2, 5] += 20.0
    logits.requires_grad_()

    def run(kernel):
        return lm_loss(logits, labels, objective=objective, cost_embedding=cost, chunk_kernel=kernel)

    _assert_kernels_agree(run, [logits], "mean", torch.float32)


def test_triton_without_gradient_and_all_ignored():
    """Evaluation (no gradient) takes the statistics pass only; a chunk whose positions are all ignored gives 0."""
    logits, labels, cost = _case(4, 2, 6, 53, 4, torch.bfloat16)
    labels[1] = -100
    with torch.no_grad():
        for objective in ("mle", "emo"):
            values = {kernel: lm_loss(logits, labels, objective=objective, cost_embedding=cost, reduction="none",
                                      chunk_size=5, chunk_kernel=kernel) for kernel in ("torch", "triton")}
            torch.testing.assert_close(values["triton"], values["torch"], rtol=1e-5, atol=1e-6)
            assert not values["triton"][1].any()


def test_triton_refuses_devices_it_cannot_run_on():
    check_triton_device(torch.device("cpu"))  # the interpreter (conftest.py)
    with pytest.raises(ValueError, match="chunk_kernel='triton' runs on CUDA tensors"):
        check_triton_device(torch.device("meta"))
    logits, labels, _ = _case(5, 1, 3, 11, 2, torch.float32)
    with pytest.raises(ValueError, match="chunk_kernel must be one of"):
        lm_loss(logits, labels, objective="mle", chunk_kernel="cuda")


# ---- CUDA: the compiled kernels (skipped without a GPU) ----

@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("objective", ["mle", "mixce", "emo", "emo2", "adaptive_emo"])
def test_cuda_triton_matches_torch(objective, dtype):
    """GPT-2's vocabulary (50257, odd, 13 blocks of 4096), 512 positions: compiled Triton vs the torch path on CUDA."""
    logits, labels, cost = _case(6, 2, 256, 50257, 768, dtype, device="cuda")
    logits.requires_grad_()

    def run(kernel):
        return lm_loss(logits, labels, objective=objective, cost_embedding=cost, reduction="none", chunk_kernel=kernel)

    _assert_kernels_agree(run, [logits], "none", dtype)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("objective", ["mle", "emo"])
def test_cuda_triton_fused_bf16_matches_torch(objective):
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(4, 128, 256, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    weight = (torch.randn(32003, 256, generator=gen) / 16).to("cuda", torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 32003, (4, 128), generator=gen).cuda()
    cost = CostEmbedding(torch.randn(32003, 64, generator=gen)).to("cuda")

    def run(kernel):
        return linear_lm_loss(hidden, weight, labels, objective=objective, cost_embedding=cost, chunk_kernel=kernel)

    _assert_kernels_agree(run, [hidden, weight], "mean", torch.bfloat16)
