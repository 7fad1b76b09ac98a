"""Objective losses: golden values against the published EMOLoss, hand-computed baselines, robustness, errors."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import emo
from emo import CostEmbedding, EMOLoss, lm_loss
from helpers import load_reference_emoloss


@pytest.fixture(scope="module")
def reference_emoloss():
    return load_reference_emoloss()


def _case(seed, batch, seq, vocab, width, ignore_fraction, ignore_index=-100, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64)).float()
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < ignore_fraction] = ignore_index
    cost = torch.randn(vocab, width, generator=gen)
    return logits.requires_grad_(), labels, cost


def _value_and_grad(fn, logits):
    logits.grad = None
    value = fn(logits)
    value.backward()
    return value.detach(), logits.grad.clone()


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize(
    "seed,batch,seq,vocab,width,ignore_fraction",
    [
        (0, 2, 9, 50, 16, 0.0),
        (1, 3, 17, 257, 8, 0.3),  # narrow cost embedding
        (2, 1, 33, 128, 300, 0.5),  # wide cost embedding
        (3, 4, 5, 1000, 64, 0.9),  # heavy ignore mask
    ],
)
def test_emoloss_matches_reference_values_and_gradients(reference_emoloss, mode, seed, batch, seq, vocab, width,
                                                        ignore_fraction):
    logits, labels, cost = _case(seed, batch, seq, vocab, width, ignore_fraction)
    ours, our_grad = _value_and_grad(lambda z: EMOLoss(z, labels, cost, mode=mode), logits)
    ref, ref_grad = _value_and_grad(lambda z: reference_emoloss(z, labels, cost, mode=mode), logits)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-4, atol=1e-8)


def test_emoloss_matches_reference_with_custom_ignore_index(reference_emoloss):
    logits, labels, cost = _case(7, 2, 12, 64, 32, 0.4, ignore_index=5)
    for mode in (1, 2):
        ours, our_grad = _value_and_grad(lambda z: EMOLoss(z, labels, cost, ignore_index=5, mode=mode), logits)
        ref, ref_grad = _value_and_grad(lambda z: reference_emoloss(z, labels, cost, ignore_index=5, mode=mode), logits)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(our_grad, ref_grad, rtol=1e-4, atol=1e-8)


def test_lm_loss_emo_names_are_emoloss_modes():
    logits, labels, cost = _case(11, 2, 8, 40, 12, 0.2)
    torch.testing.assert_close(
        lm_loss(logits, labels, objective="emo_clamped", cost_embedding=cost), EMOLoss(logits, labels, cost)
    )
    torch.testing.assert_close(
        lm_loss(logits, labels, objective="emo2", cost_embedding=cost), EMOLoss(logits, labels, cost, mode=2)
    )


# One predicted token: logits (0, ln 3, 0), gold id 1, so p = 3/5 and nll = ln(5/3); q = (0.2, 0.6, 0.2).
NLL = math.log(5 / 3)
TINY_LOGITS = [[[0.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0]]]
TINY_LABELS = [[0, 1]]


@pytest.mark.parametrize(
    "objective,hparams,weight",
    [
        ("mle", {}, 1.0),
        ("mixce", {"eta": 0.1}, 0.1 + 0.9 * 0.6),  # 0.64
        ("mixce", {"eta": 1.0}, 1.0),
        ("tailr", {"gamma": 0.5, "min_weight": 0.2}, 0.6 / (0.5 + 0.5 * 0.6)),  # 0.75
        ("tailr", {"gamma": 1.0, "min_weight": 0.0}, 0.6),  # w = p
        ("tailr", {"gamma": 1.0, "min_weight": 0.7}, 0.7),  # floor active
        ("tvd", {"mixing_ratio": 0.5}, 0.5 + 0.5 * 0.75),  # 0.875
        ("tvd", {"mixing_ratio": 0.2}, 0.2 + 0.8 * (0.6 / (0.8 + 0.2 * 0.6))),
    ],
)
def test_baselines_hand_computed(objective, hparams, weight):
    logits = torch.tensor(TINY_LOGITS, requires_grad=True)
    labels = torch.tensor(TINY_LABELS)
    value, grad = _value_and_grad(lambda z: lm_loss(z, labels, objective=objective, **hparams), logits)
    assert value.item() == pytest.approx(weight * NLL, rel=1e-6)
    expected = torch.tensor([[[0.2, -0.4, 0.2], [0.0, 0.0, 0.0]]]) * weight
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_tvd_matches_drsy_formula():
    logits, labels, _ = _case(5, 3, 10, 30, 4, 0.2)
    ratio = 0.3

    def drsy(z):
        shift_logits, shift_labels = z[:, :-1].reshape(-1, z.shape[-1]), labels[:, 1:].reshape(-1)
        ce = F.cross_entropy(shift_logits, shift_labels, reduction="none")
        p = torch.exp(-ce).detach()
        weight = torch.clamp(p / ((1 - ratio) + ratio * p), min=0.2, max=1.0)
        loss = ratio * ce + (1 - ratio) * weight * ce
        mask = shift_labels != -100
        return (loss * mask).sum() / mask.sum()

    ours, our_grad = _value_and_grad(lambda z: lm_loss(z, labels, objective="tvd", mixing_ratio=ratio), logits)
    ref, ref_grad = _value_and_grad(drsy, logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(our_grad, ref_grad)


@pytest.mark.parametrize("mode", [1, 2])
def test_adaptive_emo_matches_gt_q_formula(mode):
    """The repository's ``q - sg(q * onehot)`` form, written literally with autograd."""
    logits, labels, cost = _case(9, 2, 11, 60, 20, 0.2)

    def literal(z):
        shift_logits, shift_labels = z[:, :-1].reshape(-1, z.shape[-1]), labels[:, 1:].reshape(-1)
        mask = shift_labels != -100
        gold = shift_labels.clamp(min=0)
        ce = F.cross_entropy(shift_logits, shift_labels, reduction="none")
        q = torch.softmax(shift_logits, dim=-1)
        onehot = F.one_hot(gold, z.shape[-1]).float()
        q_hat = q - (q * onehot).detach()
        unit = F.normalize(cost, dim=1)
        transport = (1 - ((q_hat @ unit) * unit[gold]).sum(-1)) * mask
        if mode == 1:
            loss = 0.5 * (ce + (ce / (transport + 1e-10)).detach() * transport)
        else:
            loss = (transport / (ce + 1e-10)).detach() * ce + transport
        return (loss * mask).sum() / mask.sum()

    ours, our_grad = _value_and_grad(
        lambda z: lm_loss(z, labels, objective="adaptive_emo", cost_embedding=cost, mode=mode), logits
    )
    ref, ref_grad = _value_and_grad(literal, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("objective", emo.OBJECTIVES)
def test_reductions_agree(objective):
    logits, labels, cost = _case(3, 2, 9, 70, 10, 0.3)
    per_token = lm_loss(logits, labels, objective=objective, cost_embedding=cost, reduction="none")
    assert per_token.shape == (2, 8)
    assert (per_token[labels[:, 1:] == -100] == 0).all()
    total = lm_loss(logits, labels, objective=objective, cost_embedding=cost, reduction="sum")
    mean = lm_loss(logits, labels, objective=objective, cost_embedding=cost)
    count = (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(per_token.sum(), total)
    torch.testing.assert_close(mean, total / count)


@pytest.mark.parametrize("objective", emo.OBJECTIVES)
def test_per_token_upstream_gradient(objective):
    """Backward with non-uniform per-token weights equals the weighted sum of per-token gradients."""
    logits, labels, cost = _case(4, 2, 7, 30, 6, 0.2)
    weights = torch.rand(2, 6, generator=torch.Generator().manual_seed(0))
    _, grad = _value_and_grad(
        lambda z: (lm_loss(z, labels, objective=objective, cost_embedding=cost, reduction="none") * weights).sum(),
        logits,
    )
    expected = torch.zeros_like(logits)
    for b in range(2):
        for t in range(6):
            if labels[b, t + 1] == -100:
                continue
            masked = torch.full_like(labels, -100)
            masked[b, t + 1] = labels[b, t + 1]
            _, token_grad = _value_and_grad(
                lambda z: lm_loss(z, masked, objective=objective, cost_embedding=cost, reduction="sum"), logits
            )
            expected += weights[b, t] * token_grad
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunk_size_does_not_change_result(chunk_size):
    logits, labels, cost = _case(8, 3, 13, 90, 24, 0.25)
    full, full_grad = _value_and_grad(lambda z: lm_loss(z, labels, cost_embedding=cost, objective="emo2"), logits)
    chunked, chunk_grad = _value_and_grad(
        lambda z: lm_loss(z, labels, cost_embedding=cost, objective="emo2", chunk_size=chunk_size), logits
    )
    torch.testing.assert_close(full, chunked)
    torch.testing.assert_close(full_grad, chunk_grad)


def test_robust_to_dtype_scale_and_masks():
    """1000+ random cases over fp32/bf16/fp16, logits up to +-1e4 and heavy masks: no NaN or Inf anywhere."""
    gen = torch.Generator().manual_seed(1234)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    objectives = emo.OBJECTIVES
    for case in range(1050):
        batch, seq, vocab = (int(torch.randint(1, n, (1,), generator=gen)) for n in (4, 9, 48))
        seq, vocab = seq + 1, vocab + 2
        scale = float(10 ** torch.empty(1).uniform_(-2, 4, generator=gen))
        dtype = dtypes[case % 3]
        logits = (scale * (2 * torch.rand(batch, seq, vocab, generator=gen) - 1)).clamp(-1e4, 1e4).to(dtype)
        logits.requires_grad_()
        labels = torch.randint(0, vocab, (batch, seq), generator=gen)
        labels[torch.rand(batch, seq, generator=gen) < float(torch.rand(1, generator=gen))] = -100
        cost = torch.randn(vocab, int(torch.randint(1, 20, (1,), generator=gen)), generator=gen)
        objective = objectives[case % len(objectives)]
        loss = lm_loss(logits, labels, objective=objective, cost_embedding=cost)
        loss.backward()
        assert torch.isfinite(loss), (case, objective, dtype, scale)
        assert torch.isfinite(logits.grad).all(), (case, objective, dtype, scale)
        assert logits.grad.dtype == dtype


@pytest.mark.parametrize("objective", emo.OBJECTIVES)
def test_all_ignored_batch_is_zero_with_zero_gradient(objective):
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    loss = lm_loss(logits, labels, objective=objective, cost_embedding=torch.randn(11, 4))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_half_precision_input_is_computed_in_fp32(reference_emoloss):
    logits, labels, cost = _case(12, 2, 10, 80, 16, 0.1)
    bf16 = logits.detach().bfloat16().requires_grad_()
    loss = EMOLoss(bf16, labels, cost)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, EMOLoss(bf16.detach().float(), labels, cost))


def test_cost_embedding_receives_no_gradient(reference_emoloss):
    """Unlike the reference, a live parameter passed as cost embedding (e.g. a tied head) gets no gradient."""
    logits, labels, _ = _case(13, 1, 6, 20, 8, 0.0)
    head = torch.nn.Parameter(torch.randn(20, 8))
    EMOLoss(logits, labels, head).backward()
    assert head.grad is None
    reference_emoloss(logits, labels, head).backward()
    assert head.grad is not None


def test_second_backward_is_refused():
    logits = torch.randn(1, 4, 9, requires_grad=True)
    loss = lm_loss(logits, torch.randint(0, 9, (1, 4)), objective="mle")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already back-propagated"):
        loss.backward()


@pytest.mark.parametrize(
    "kwargs,labels,message",
    [
        ({"cost_embedding": torch.randn(12, 4)}, None, "vocabulary size mismatch: logits have 10 classes"),
        ({"cost_embedding": torch.randn(10, 4)}, torch.tensor([[1, 2, 10]]), "label 10 is out of range"),
        ({"cost_embedding": torch.randn(10, 4)}, torch.tensor([[1, -3, 2]]), "label -3 is out of range"),
        ({"objective": "kl"}, None, "unknown objective 'kl'; valid objectives: mle, mixce, tailr, tvd, emo"),
        ({"objective": "emo"}, None, "needs a cost_embedding"),
        ({"objective": "mixce", "gamma": 0.1}, None, r"unknown hyper-parameter\(s\) \['gamma'\]; valid: eta"),
        ({"objective": "mle", "reduction": "avg"}, None, "reduction must be one of"),
        ({"cost_embedding": torch.randn(10)}, None, "must be a 2-D"),
    ],
)
def test_bad_input_errors(kwargs, labels, message):
    logits = torch.randn(1, 3, 10)
    labels = torch.tensor([[1, 2, 3]]) if labels is None else labels
    with pytest.raises(ValueError if "hyper" not in message else TypeError, match=message):
        lm_loss(logits, labels, **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="logits must be a floating"):
        lm_loss(torch.randn(3, 10), torch.tensor([[1, 2, 3]]), objective="mle")
    with pytest.raises(ValueError, match="labels must be an integer"):
        lm_loss(torch.randn(1, 3, 10), torch.tensor([[1, 2]]), objective="mle")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_cost_rows_are_named(bad):
    cost = torch.randn(10, 4)
    cost[7] = bad
    with pytest.raises(ValueError, match=r"1 non-finite row\(s\) \(first: \[7\]\)"):
        CostEmbedding(cost)


@pytest.mark.parametrize("validate", [True, False])
def test_zero_cost_rows_have_cosine_zero_to_every_token(validate):
    """A zero row (a tied head's padding row): cosine 0 to every token, itself included (transport cost 1), a warning
    naming it, and finite losses and gradients, also unvalidated; the other rows are normalised as usual."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 4, generator=gen)
    weight[[3, 7]] = 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cost = CostEmbedding(weight, validate=validate)
    messages = [str(w.message) for w in caught]
    assert any("2 all-zero row(s) (first: [3, 7])" in m and "transport cost 1" in m for m in messages) == validate
    assert torch.equal(cost.normalized[[3, 7]], torch.zeros(2, 4))
    torch.testing.assert_close(cost.normalized[0], weight[0] / weight[0].norm())
    logits = torch.randn(2, 6, 10, generator=gen, requires_grad=True)
    labels = torch.tensor([[1, 3, 7, 3, 2, 7], [7, 7, 0, 3, 5, 1]])
    per_token = lm_loss(logits, labels, objective="emo2", cost_embedding=cost, reduction="none")
    assert torch.isfinite(per_token).all()
    (grad,) = torch.autograd.grad(per_token.sum(), logits)
    assert torch.isfinite(grad).all()
    # Mode 2's value is 2 * emo; a gold zero-row token has emo = 1 whatever the model predicts.
    torch.testing.assert_close(per_token[0, 0], torch.tensor(2.0))  # position 0 predicts token 3


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_integer_labels_of_any_dtype(dtype):
    logits = torch.randn(2, 5, 10)
    labels = torch.tensor([[1, 2, 3, 4, 5], [9, 8, 7, 6, 0]])
    expected = lm_loss(logits, labels, objective="mle")
    torch.testing.assert_close(lm_loss(logits, labels.to(dtype), objective="mle"), expected)
    with pytest.raises(ValueError, match="labels must be an integer"):
        lm_loss(logits, labels.bool(), objective="mle")


def test_emoloss_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be 1 or 2"):
        EMOLoss(torch.randn(1, 3, 5), torch.tensor([[1, 2, 3]]), torch.randn(5, 2), mode=3)
