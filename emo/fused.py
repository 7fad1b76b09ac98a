"""Fused LM head + objective: every objective without ever materialising the ``N x V`` logits.

``linear_lm_loss`` projects chunks of hidden states through the LM head, evaluates the objective on each chunk with
the shared kernel (``emo.losses.objective_chunk``) and, for ``mean``/``sum`` reductions, turns the chunk's logit
gradient into gradients for the hidden states, the head weight and its bias right away ("gradient in forward", as
Liger-Kernel's fused linear cross-entropy does). Peak memory is a few ``chunk x V`` buffers plus one fp32 ``V x H``
weight-gradient accumulator, independent of the number of tokens. EMO adds a single ``chunk x V x width`` product
per chunk (the cosine of every token to the gold one), reused for the value and the gradient. ``reduction="none"``
keeps only the inputs and recomputes the chunks in backward, scaled by the per-token upstream gradient.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from emo.cost import CostEmbedding
from emo.losses import (
    check_reduction,
    check_targets,
    default_chunk_size,
    objective_chunk,
    reduce_token_values,
    resolve_objective,
    shift_labels,
)


def _project_chunks(hidden, weight, bias, targets, objective, hparams, cost, chunk_size, with_grad, row_scale=None):
    """Run the objective over token chunks; returns fp32 values and, if ``with_grad``, fp32 gradients
    ``(hidden (N, H), weight (V, H), bias (V,))`` of ``sum(row_scale * values)`` (``row_scale`` defaults to 1).

    Chunk buffers are allocated once and reused; for fp32 inputs the products write into them directly and the
    weight gradient accumulates in place (``addmm_``), so no per-chunk ``V x H`` temporary is created.
    """
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    rows = min(chunk_size, num_tokens)
    fp32 = dict(dtype=torch.float32, device=hidden.device)
    exact = weight.dtype == torch.float32 and hidden.dtype == torch.float32
    values = torch.empty(num_tokens, **fp32)
    logits_buffer = torch.empty(rows, vocab_size, **fp32)
    scratch = torch.empty(rows, vocab_size, **fp32) if cost is not None else None
    grad_hidden = torch.empty(hidden.shape, **fp32) if with_grad else None
    grad_weight = torch.zeros(weight.shape, **fp32) if with_grad else None
    grad_bias = torch.zeros(bias.shape, **fp32) if bias is not None and with_grad else None
    for start in range(0, num_tokens, chunk_size):
        span = slice(start, min(start + chunk_size, num_tokens))
        size = span.stop - span.start
        chunk_hidden = hidden[span]
        logits = logits_buffer[:size]
        if exact:
            torch.mm(chunk_hidden, weight.T, out=logits)
        else:
            logits.copy_(chunk_hidden @ weight.T)
        if bias is not None:
            logits.add_(bias)
        values[span], dlogits = objective_chunk(
            logits, targets[span], objective, hparams, cost, with_grad, None if scratch is None else scratch[:size]
        )
        if not with_grad:
            continue
        if row_scale is not None:
            dlogits.mul_(row_scale[span].unsqueeze(1))
        if grad_bias is not None:
            grad_bias.add_(dlogits.sum(dim=0))
        if exact:
            torch.mm(dlogits, weight, out=grad_hidden[span])
            grad_weight.addmm_(dlogits.T, chunk_hidden)
        else:
            dlogits = dlogits.to(weight.dtype)
            grad_hidden[span] = dlogits @ weight
            grad_weight.add_(dlogits.T @ chunk_hidden)
    return values, grad_hidden, grad_weight, grad_bias


class _FusedLinearObjective(torch.autograd.Function):
    """Objective values of valid tokens ``(N,)`` from hidden states ``(N, H)`` and the LM head."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, objective, hparams, cost, chunk_size, mode):
        ctx.mode = mode
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        needs_grad = any(ctx.needs_input_grad[:3])
        if mode == "total":
            values, *grads = _project_chunks(
                hidden, weight, bias, targets, objective, hparams, cost, chunk_size, needs_grad
            )
            ctx.grads = grads if needs_grad else None
            return values.sum()
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.config = (objective, hparams, cost, chunk_size)
        values, *_ = _project_chunks(hidden, weight, bias, targets, objective, hparams, cost, chunk_size, False)
        return values

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.mode == "total":
            if ctx.grads is None:
                raise RuntimeError("the fused loss was already back-propagated once; compute it again to backward twice")
            grad_hidden, grad_weight, grad_bias = (None if g is None else g * grad_output for g in ctx.grads)
            ctx.grads = None
        else:
            hidden, weight, bias, targets = ctx.saved_tensors
            _, grad_hidden, grad_weight, grad_bias = _project_chunks(
                hidden, weight, bias, targets, *ctx.config, True, row_scale=grad_output.float()
            )
        grads = (
            grad.to(dtype) if needed and grad is not None else None
            for grad, needed, dtype in zip((grad_hidden, grad_weight, grad_bias), ctx.needs_input_grad, ctx.dtypes)
        )
        return (*grads, None, None, None, None, None, None)


def linear_lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    objective: str = "emo",
    lm_head_bias: Optional[torch.Tensor] = None,
    cost_embedding: Union[CostEmbedding, torch.Tensor, None] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    **hparams,
) -> torch.Tensor:
    """``emo.lm_loss(hidden @ lm_head_weight.T + lm_head_bias, labels, ...)`` without materialising the logits.

    ``hidden`` is ``(B, T, H)`` (the last hidden state, before the LM head), ``lm_head_weight`` ``(V, H)``,
    ``labels`` ``(B, T)`` aligned with ``hidden`` (shifted inside). Same objectives, hyper-parameters, reductions
    and values as ``lm_loss``; ignored tokens are dropped before the projection; computed in fp32 per chunk, with
    gradients for ``hidden``, ``lm_head_weight`` and ``lm_head_bias``. ``chunk_size`` is in tokens.
    """
    check_reduction(reduction)
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating (batch, seq_len, hidden) tensor, got shape {tuple(hidden.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be (vocab, {hidden.shape[-1]}) to match hidden, got {tuple(lm_head_weight.shape)}"
        )
    if lm_head_bias is not None and lm_head_bias.shape != lm_head_weight.shape[:1]:
        raise ValueError(f"lm_head_bias must be ({lm_head_weight.shape[0]},), got {tuple(lm_head_bias.shape)}")
    if labels.dim() != 2 or labels.shape != hidden.shape[:2] or labels.is_floating_point():
        raise ValueError(
            f"labels must be an integer (batch, seq_len) tensor matching hidden {tuple(hidden.shape[:2])}, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    vocab_size = lm_head_weight.shape[0]
    spec, resolved, cost = resolve_objective(objective, cost_embedding, vocab_size, hparams)
    flat_targets = shift_labels(labels, ignore_index).reshape(-1)
    valid = flat_targets != ignore_index
    check_targets(flat_targets, valid, vocab_size, ignore_index)
    rows = valid.nonzero().squeeze(1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    args = (
        flat_hidden,
        lm_head_weight,
        lm_head_bias,
        flat_targets.index_select(0, rows),
        spec,
        resolved,
        None if cost is None else cost.normalized.to(hidden.device),
        chunk_size or default_chunk_size(vocab_size),
        "tokens" if reduction == "none" else "total",
    )
    values = _FusedLinearObjective.apply(*args)
    if reduction == "none":
        per_position = values.new_zeros(flat_targets.shape).index_put((rows,), values)
        return per_position.view(labels.shape)[:, :-1]
    return reduce_token_values(values, valid.sum(), reduction)
