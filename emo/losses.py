"""Objective losses on materialised logits: ``lm_loss`` for every objective and the drop-in ``EMOLoss``.

The kernel works on chunks of predicted tokens. Per chunk it computes, in fp32 whatever the input dtype, the softmax,
the token NLL and (for EMO objectives) the transport term from a single product ``S = E[y] @ E^T`` of the
row-normalised cost embedding, then writes the exact logit gradient straight away ("gradient in forward"):

    dz = a * (q - onehot(y)) + b * (q * d - q * emo),   d = 1 - S = cosine distance to the gold token

where ``(a, b)`` are the objective's stop-gradient token weights (``emo.registry``); ignored positions get zero
weights. No ``N x V`` one-hot is ever built, and the extra memory is the gradient buffer plus one or two chunk buffers.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from emo.cost import CostEmbedding
from emo.registry import Objective, get_objective

REDUCTIONS = ("mean", "sum", "none")
MASK_EPS = 1e-15
CHUNK_ELEMENTS = 1 << 24
_ONE = torch.ones(1, 1)


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one fp32 ``chunk x vocab`` buffer holds about 16M elements (64 MiB)."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def objective_chunk(
    logits: torch.Tensor,
    targets: torch.Tensor,
    objective: Objective,
    hparams: dict,
    cost: Optional[torch.Tensor],
    with_grad: bool,
    scratch: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token loss values and, if ``with_grad``, their fp32 logit gradient for one chunk of tokens.

    ``logits`` is an fp32 ``(n, V)`` tensor this function owns: it is overwritten and returned as the gradient.
    ``targets`` are valid class ids; ``cost`` is the row-normalised fp32 cost embedding (``CostEmbedding.normalized``)
    or ``None``; ``scratch`` is an optional ``(n, V)`` fp32 buffer for the transport costs (reused across chunks);
    ``valid`` optionally marks the rows that count (others get value and gradient 0; their targets may be any id).
    Returns ``(values (n,), dlogits (n, V) or None)``.
    """
    rows = targets.unsqueeze(1)
    target_logit = logits.gather(1, rows).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    unnormalized = logits.sub_(row_max).exp_()
    normalizer = unnormalized.sum(dim=1, keepdim=True)
    nll = (row_max + normalizer.log()).squeeze(1) - target_logit
    p_target = torch.exp(-nll)
    inverse_normalizer = normalizer.reciprocal_()

    emo = weighted_distance = None
    if objective.needs_cost_embedding:
        # 1 - cos(e_v, e_y) for every v, then weighted by the (unnormalised) probabilities.
        weighted_distance = torch.addmm(_ONE, cost[targets], cost.T, alpha=-1.0, out=scratch).mul_(unnormalized)
        emo = weighted_distance.sum(dim=1, keepdim=True).mul_(inverse_normalizer).squeeze(1).clamp_(min=0.0)
    values, nll_weight, emo_weight = objective.weights(nll, p_target, emo, **hparams)
    if valid is not None:
        values, nll_weight = values.where(valid, 0.0), nll_weight.where(valid, 0.0)
        emo_weight = None if emo_weight is None else emo_weight.where(valid, 0.0)
    if not with_grad:
        return values, None

    if emo is None:
        grad = unnormalized.mul_(nll_weight.unsqueeze(1) * inverse_normalizer)
    else:
        grad = unnormalized.mul_((nll_weight - emo_weight * emo).unsqueeze(1) * inverse_normalizer)
        grad.addcmul_(weighted_distance, emo_weight.unsqueeze(1) * inverse_normalizer)
    grad.scatter_add_(1, rows, -nll_weight.unsqueeze(1))
    return values, grad


class _ObjectiveOnLogits(torch.autograd.Function):
    """Per-position objective values ``(B*T,)`` from flat logits, with the logit gradient computed in forward.

    Chunks are contiguous position ranges (ignored positions get zero value and gradient), so for fp32 logits each
    chunk is copied once into its rows of the gradient buffer and turned into the gradient there, in place.
    """

    @staticmethod
    def forward(ctx, flat_logits, flat_targets, valid, objective, hparams, cost, chunk_size, with_grad):
        num_positions, vocab_size = flat_logits.shape
        values = flat_logits.new_empty(num_positions, dtype=torch.float32)
        grad = torch.empty_like(flat_logits) if with_grad else None
        chunk_size = max(1, min(chunk_size, num_positions))
        in_place = with_grad and flat_logits.dtype == torch.float32
        work = None if in_place else flat_logits.new_empty(chunk_size, vocab_size, dtype=torch.float32)
        scratch = flat_logits.new_empty(chunk_size, vocab_size, dtype=torch.float32) if cost is not None else None
        targets = flat_targets.where(valid, 0)
        for start in range(0, num_positions, chunk_size):
            span = slice(start, min(start + chunk_size, num_positions))
            size = span.stop - span.start
            chunk = grad[span] if in_place else work[:size]
            chunk.copy_(flat_logits[span])
            values[span], chunk_grad = objective_chunk(
                chunk,
                targets[span],
                objective,
                hparams,
                cost,
                with_grad,
                None if scratch is None else scratch[:size],
                valid[span],
            )
            if with_grad and not in_place:
                grad[span].copy_(chunk_grad)
        ctx.grad_buffer = grad
        return values

    @staticmethod
    def backward(ctx, grad_values):
        grad = ctx.grad_buffer
        if grad is None:
            raise RuntimeError("the objective loss was already back-propagated once; compute it again to backward twice")
        ctx.grad_buffer = None
        grad.mul_(grad_values.unsqueeze(1))
        return grad, None, None, None, None, None, None, None


def shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Next-token targets aligned with each position: ``labels[:, 1:]`` padded with ``ignore_index`` at the end."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def check_targets(flat_targets: torch.Tensor, valid: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise ``ValueError`` naming the first out-of-range label among the valid (non-ignored) targets."""
    if not flat_targets.numel():
        return
    low, high = (int(v) for v in torch.aminmax(flat_targets.where(valid, 0)))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"label {bad} is out of range for vocabulary size {vocab_size} (ignore_index is {ignore_index})")


def resolve_objective(
    objective: str, cost_embedding: Union[CostEmbedding, torch.Tensor, None], vocab_size: int, hparams: dict
) -> tuple[Objective, dict, Optional[CostEmbedding]]:
    """Look up ``objective``, merge its hyper-parameters, and validate the cost embedding against ``vocab_size``."""
    spec = get_objective(objective)
    resolved = spec.resolve_hparams(hparams)
    if not spec.needs_cost_embedding:
        return spec, resolved, None
    if cost_embedding is None:
        raise ValueError(
            f"objective {objective!r} needs a cost_embedding of shape (vocab_size, width), "
            "e.g. emo.cost_embedding_from_model(model)"
        )
    cost = CostEmbedding.wrap(cost_embedding)
    if cost.vocab_size != vocab_size:
        raise ValueError(
            f"vocabulary size mismatch: logits have {vocab_size} classes but the cost embedding has "
            f"{cost.vocab_size} rows"
        )
    return spec, resolved, cost


def check_reduction(reduction: str) -> None:
    """Raise ``ValueError`` unless ``reduction`` is one of ``REDUCTIONS``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_token_values(values: torch.Tensor, num_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-position values (zeros at ignored positions) as ``sum / (1e-15 + count)``, ``sum``, or ``none``."""
    if reduction == "none":
        return values
    total = values.sum()
    return total if reduction == "sum" else total / (MASK_EPS + num_valid)


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    objective: str = "emo",
    cost_embedding: Union[CostEmbedding, torch.Tensor, None] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    **hparams,
) -> torch.Tensor:
    """Causal-LM loss for any registered objective (``emo.OBJECTIVES``) on unshifted ``(B, T, V)`` logits.

    ``labels`` is ``(B, T)`` and aligned with ``logits``; position ``t`` predicts ``labels[:, t + 1]`` (shifted
    inside, as in ``EMOLoss`` and Hugging Face models). ``cost_embedding`` is a ``(V, width)`` tensor or
    ``CostEmbedding`` (any width; never receives gradient), needed by the EMO objectives. ``hparams`` are the
    objective's hyper-parameters (e.g. ``eta`` for MixCE). Computed in fp32; returns an fp32 scalar for ``mean``
    (``sum / count`` of valid tokens; 0 when all are ignored) and ``sum``, or ``(B, T - 1)`` values for ``none``.
    """
    check_reduction(reduction)
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating (batch, seq_len, vocab) tensor, got shape {tuple(logits.shape)}")
    if labels.dim() != 2 or labels.shape != logits.shape[:2] or labels.is_floating_point():
        raise ValueError(
            f"labels must be an integer (batch, seq_len) tensor matching logits {tuple(logits.shape[:2])}, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    vocab_size = logits.shape[-1]
    spec, resolved, cost = resolve_objective(objective, cost_embedding, vocab_size, hparams)
    flat_targets = shift_labels(labels, ignore_index).reshape(-1)
    valid = flat_targets != ignore_index
    check_targets(flat_targets, valid, vocab_size, ignore_index)
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    values = _ObjectiveOnLogits.apply(
        logits.reshape(-1, vocab_size),
        flat_targets,
        valid,
        spec,
        resolved,
        None if cost is None else cost.normalized.to(logits.device),
        chunk_size or default_chunk_size(vocab_size),
        with_grad,
    )
    if reduction == "none":
        return values.view(labels.shape)[:, :-1]
    return reduce_token_values(values, valid.sum(), reduction)


def EMOLoss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    cost_embedding: Union[CostEmbedding, torch.Tensor],
    ignore_index: int = -100,
    mode: int = 1,
) -> torch.Tensor:
    """Drop-in replacement for ``EMOLoss`` from the ``EMOLoss==0.0.3`` package, with the same arguments and values.

    ``mode=1`` weights towards MLE (``emo`` objective), ``mode=2`` towards EMO (``emo2``). Unlike the reference it
    builds no one-hot matrix, computes in fp32, and never back-propagates into ``cost_embedding``.
    """
    if mode not in (1, 2):
        raise ValueError(f"EMOLoss mode must be 1 or 2, got {mode!r}")
    return lm_loss(
        logits,
        labels,
        objective="emo" if mode == 1 else "emo2",
        cost_embedding=cost_embedding,
        ignore_index=ignore_index,
    )
