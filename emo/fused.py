"""Fused LM head + objective: every objective without ever materialising the ``N x V`` logits.

``linear_lm_loss`` projects chunks of hidden states through the LM head, evaluates the objective on each chunk with
the shared kernel (``emo.losses.objective_chunk``) and, for ``mean``/``sum`` reductions, turns the chunk's logit
gradient into gradients for the hidden states, the head weight and its bias right away ("gradient in forward", as
Liger-Kernel's fused linear cross-entropy does). Peak memory is a few ``chunk x V`` buffers plus one fp32 ``V x H``
weight-gradient accumulator, independent of the number of tokens. EMO adds a single ``chunk x V x width`` product
per chunk (the cosine of every token to the gold one), reused for the value and the gradient. ``reduction="none"``
keeps only the inputs and recomputes the chunks in backward, scaled by the per-token upstream gradient. Gradients
stay fp32 until the upstream gradient is applied and are then cast to the inputs' dtypes; like ``lm_loss``, the fused
loss is differentiable once (``create_graph=True`` raises).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch.torch_version import TorchVersion

from emo.cost import CostEmbedding
from emo.losses import (
    SECOND_ORDER_ERROR,
    check_reduction,
    default_chunk_size,
    integer_labels,
    objective_chunk,
    per_position,
    prediction_targets,
    reduce_token_values,
    resolve_objective,
    transport_options,
)
from emo.transport import FP32_OUTPUT_DEVICES


class TokenValues(NamedTuple):
    """Per-position outputs of ``linear_lm_loss(..., reduction="none", return_token_stats=True)``."""

    values: torch.Tensor  # the objective's per-token loss (differentiable)
    entropy: torch.Tensor  # entropy of the model's next-token distribution (fp32, no gradient)
    is_top1: torch.Tensor  # whether the label is the model's most likely next token (bool)


def _gradient_operand_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Dtype of the operands of the backward products, whose results and accumulators are always fp32.

    The logit gradient is formed before the upstream gradient (e.g. a loss scale) is known, so it must not be rounded
    to a narrow range: fp16 operands would flush its small entries to zero, so fp16 (and fp64) inputs use fp32
    operands (one fp32 copy of the weight per call). bf16 shares fp32's exponent range, so rounding it before or
    after the scale is alike: bf16 keeps its fast products where they can write fp32 results (CUDA, torch >= 2.8); the
    fp32 results keep the weight gradient, a sum over all chunks, from being rounded once per chunk.
    """
    if (
        hidden.dtype == weight.dtype == torch.bfloat16
        and hidden.device.type in FP32_OUTPUT_DEVICES
        and TorchVersion(torch.__version__) >= (2, 8)
    ):
        return torch.bfloat16
    return torch.float32


def token_statistics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row entropy of ``softmax(logits)`` (fp32) and whether the target is the (first) argmax, for ``(n, V)``
    logits, without modifying them (TRL's ``entropy`` and ``mean_token_accuracy`` metrics)."""
    log_probs = torch.log_softmax(logits, dim=1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=1)
    return entropy, logits.argmax(dim=1) == targets


def _project_chunks(
    hidden, weight, bias, targets, valid, objective, hparams, cost, chunk_size, precision, chunk_kernel, with_grad,
    row_scale=None, stats=None,
):
    """Run the objective over token chunks; returns fp32 values and, if ``with_grad``, fp32 gradients
    ``(hidden (N, H), weight (V, H), bias (V,))`` of ``sum(row_scale * values)`` (``row_scale`` defaults to 1).
    ``valid`` (optional) marks the rows that count; the others get value and gradient 0. ``stats`` (optional) is a
    pair of ``(N,)`` buffers filled with each row's ``token_statistics``.

    Chunk buffers are allocated once on the inputs' device and reused; for fp32 inputs the products write into them
    directly and the weight gradient accumulates in place (``addmm_``), so no per-chunk ``V x H`` temporary is created.
    The forward product runs in the inputs' dtype, the backward products as ``_gradient_operand_dtype`` says; the
    transport product in ``precision`` and the per-chunk elementwise work with ``chunk_kernel`` (``emo.losses``).
    """
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    rows = min(chunk_size, num_tokens)
    fp32 = dict(dtype=torch.float32, device=hidden.device)
    logits_in_place = weight.dtype == torch.float32 and hidden.dtype == torch.float32
    operand_dtype = _gradient_operand_dtype(hidden, weight)
    values = torch.empty(num_tokens, **fp32)
    logits_buffer = torch.empty(rows, vocab_size, **fp32)
    scratch = torch.empty(rows, vocab_size, **fp32) if cost is not None else None
    grad_hidden = torch.empty(hidden.shape, **fp32) if with_grad else None
    grad_weight = torch.zeros(weight.shape, **fp32) if with_grad else None
    grad_bias = torch.zeros(bias.shape, **fp32) if bias is not None and with_grad else None
    weight_operand = weight.to(operand_dtype) if with_grad else None
    for start in range(0, num_tokens, chunk_size):
        span = slice(start, min(start + chunk_size, num_tokens))
        size = span.stop - span.start
        chunk_hidden = hidden[span]
        logits = logits_buffer[:size]
        if logits_in_place:
            torch.mm(chunk_hidden, weight.T, out=logits)
        else:
            logits.copy_(chunk_hidden @ weight.T)
        if bias is not None:
            logits.add_(bias)
        if stats is not None:
            stats[0][span], stats[1][span] = token_statistics(logits, targets[span])
        chunk_scratch = None if scratch is None else scratch[:size]
        chunk_valid = None if valid is None else valid[span]
        if chunk_kernel == "triton":
            from emo.triton_chunk import triton_objective_chunk

            values[span] = triton_objective_chunk(
                logits, targets[span], objective, hparams, cost, logits if with_grad else None, chunk_scratch,
                chunk_valid, precision,
            )
            dlogits = logits
        else:
            values[span], dlogits = objective_chunk(
                logits, targets[span], objective, hparams, cost, with_grad, chunk_scratch, chunk_valid, precision
            )
        if not with_grad:
            continue
        if row_scale is not None:
            dlogits.mul_(row_scale[span].unsqueeze(1))
        if grad_bias is not None:
            grad_bias.add_(dlogits.sum(dim=0))
        hidden_operand = chunk_hidden.to(operand_dtype)
        if operand_dtype == torch.float32:
            torch.mm(dlogits, weight_operand, out=grad_hidden[span])
            grad_weight.addmm_(dlogits.T, hidden_operand)
        else:
            dlogits = dlogits.to(operand_dtype)
            grad_hidden[span] = torch.mm(dlogits, weight_operand, out_dtype=torch.float32)
            grad_weight.add_(torch.mm(dlogits.T, hidden_operand, out_dtype=torch.float32))
    return values, grad_hidden, grad_weight, grad_bias


class _FusedLinearObjective(torch.autograd.Function):
    """Objective values of valid tokens ``(N,)`` from hidden states ``(N, H)`` and the LM head."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, valid, objective, hparams, cost, chunk_size, mode, precision="fp32",
        chunk_kernel="torch",
    ):
        ctx.mode = mode
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        needs_grad = any(ctx.needs_input_grad[:3])
        config = (objective, hparams, cost, chunk_size, precision, chunk_kernel)
        if mode == "total":
            values, *grads = _project_chunks(hidden, weight, bias, targets, valid, *config, needs_grad)
            ctx.grads = grads if needs_grad else None
            return values.sum()
        ctx.save_for_backward(hidden, weight, bias, targets, valid)
        ctx.config = config
        if mode == "tokens":
            values, *_ = _project_chunks(hidden, weight, bias, targets, valid, *config, False)
            return values
        stats = (hidden.new_empty(targets.shape, dtype=torch.float32), targets.new_empty(targets.shape, dtype=torch.bool))
        values, *_ = _project_chunks(hidden, weight, bias, targets, valid, *config, False, stats=stats)
        ctx.mark_non_differentiable(*stats)
        return values, *stats

    @staticmethod
    def backward(ctx, grad_output, *_stats_grads):
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_ORDER_ERROR)
        if ctx.mode == "total":
            if ctx.grads is None:
                raise RuntimeError("the fused loss was already back-propagated once; compute it again to backward twice")
            grad_hidden, grad_weight, grad_bias = (None if g is None else g.mul_(grad_output) for g in ctx.grads)
            ctx.grads = None
        else:
            hidden, weight, bias, targets, valid = ctx.saved_tensors
            _, grad_hidden, grad_weight, grad_bias = _project_chunks(
                hidden, weight, bias, targets, valid, *ctx.config, True, row_scale=grad_output.float()
            )
        grads = (
            grad.to(dtype) if needed and grad is not None else None
            for grad, needed, dtype in zip((grad_hidden, grad_weight, grad_bias), ctx.needs_input_grad, ctx.dtypes)
        )
        return (*grads, None, None, None, None, None, None, None, None, None)


def _autocast_inputs(hidden, weight, bias):
    """Under ``torch.autocast``, the head runs in the autocast dtype, as the model's own LM head would."""
    device_type = hidden.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _common_dtype(hidden, weight, bias):
    """Mixed floating inputs (e.g. a bf16 hidden state and an fp32 head) run in their promoted dtype, as PyTorch's type
    promotion would compute them; the casts are part of the autograd graph, so each input gets its gradient in its own
    dtype."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


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
    shift: bool = True,
    chunk_size: Optional[int] = None,
    transport_precision: str = "fp32",
    chunk_kernel: str = "torch",
    return_token_stats: bool = False,
    **hparams,
) -> Union[torch.Tensor, TokenValues]:
    """``emo.lm_loss(hidden @ lm_head_weight.T + lm_head_bias, labels, ...)`` without materialising the logits.

    ``hidden`` is ``(B, T, H)`` (the last hidden state, before the LM head), ``lm_head_weight`` ``(V, H)``,
    ``labels`` ``(B, T)`` aligned with ``hidden`` (shifted inside unless ``shift=False``). Same objectives,
    hyper-parameters, reductions and values as ``lm_loss``; the objective is computed in fp32 per chunk, with
    gradients for ``hidden``, ``lm_head_weight`` and ``lm_head_bias``. ``chunk_size`` is in tokens. Under
    ``torch.autocast`` the head products run in the autocast dtype, like the model's own LM head; otherwise inputs of
    different floating dtypes run in their promoted dtype (a bf16 hidden state with an fp32 head: fp32), each getting
    its gradient in its own dtype. Ignored tokens are dropped before the projection, except under ``torch.compile``,
    where every position is projected (zero weight where ignored) so that shapes do not depend on the data.
    ``return_token_stats=True`` (with ``reduction="none"``) also returns, from the same pass, each position's entropy
    and whether its label is the model's top-1 token (``TokenValues``; 0 / False at ignored positions).
    ``transport_precision`` and ``chunk_kernel`` are ``lm_loss``'s.
    """
    check_reduction(reduction)
    if return_token_stats and reduction != "none":
        raise ValueError("return_token_stats=True needs reduction='none' (the statistics are per token)")
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating (batch, seq_len, hidden) tensor, got shape {tuple(hidden.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1] or not lm_head_weight.is_floating_point():
        raise ValueError(
            f"lm_head_weight must be a floating (vocab, {hidden.shape[-1]}) tensor to match hidden, "
            f"got {lm_head_weight.dtype} {tuple(lm_head_weight.shape)}"
        )
    if lm_head_bias is not None and lm_head_bias.shape != lm_head_weight.shape[:1]:
        raise ValueError(f"lm_head_bias must be ({lm_head_weight.shape[0]},), got {tuple(lm_head_bias.shape)}")
    labels = integer_labels(labels, hidden.shape[:2], "hidden")
    vocab_size = lm_head_weight.shape[0]
    spec, resolved, cost = resolve_objective(objective, cost_embedding, vocab_size, hparams)
    operand = transport_options(cost, transport_precision, chunk_kernel, hidden.device)
    hidden, lm_head_weight, lm_head_bias = _autocast_inputs(hidden, lm_head_weight, lm_head_bias)
    hidden, lm_head_weight, lm_head_bias = _common_dtype(hidden, lm_head_weight, lm_head_bias)
    flat_targets, valid = prediction_targets(labels, vocab_size, ignore_index, shift)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    if torch.compiler.is_compiling():
        rows, row_valid = None, valid
        targets = flat_targets.where(valid, 0)
    else:
        rows, row_valid = valid.nonzero().squeeze(1), None
        flat_hidden, targets = flat_hidden.index_select(0, rows), flat_targets.index_select(0, rows)
    values = _FusedLinearObjective.apply(
        flat_hidden,
        lm_head_weight,
        lm_head_bias,
        targets,
        row_valid,
        spec,
        resolved,
        operand,
        chunk_size or default_chunk_size(vocab_size),
        ("tokens+stats" if return_token_stats else "tokens") if reduction == "none" else "total",
        transport_precision,
        chunk_kernel,
    )
    if reduction != "none":
        return reduce_token_values(values, valid.sum(), reduction)
    outputs = values if return_token_stats else (values,)
    if rows is not None:
        outputs = [x.new_zeros(flat_targets.shape).index_put((rows,), x) for x in outputs]
    else:  # compiled: every position was projected; the statistics of ignored ones are zeroed like their values
        outputs = [x.masked_fill(~valid, 0) for x in outputs]
    outputs = [per_position(x, labels.shape, shift) for x in outputs]
    return TokenValues(*outputs) if return_token_stats else outputs[0]
