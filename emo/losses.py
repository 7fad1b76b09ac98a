"""Objective losses on materialised logits: ``lm_loss`` for every objective and the drop-in ``EMOLoss``.

The kernel works on chunks of predicted tokens. Per chunk it computes, in fp32 whatever the input dtype, the softmax,
the token NLL and (for EMO objectives) the transport term from a single product ``S = E[y] @ E^T`` of the
row-normalised cost embedding (in the precision ``transport_precision`` names, ``emo.transport``), then writes the
exact logit gradient straight away ("gradient in forward"):

    dz = a * (q - onehot(y)) + b * (q * d - q * emo),   d = 1 - S = cosine distance to the gold token

where ``(a, b)`` are the objective's stop-gradient token weights (``emo.registry``); ignored positions get zero
weights. ``chunk_kernel`` picks who runs that elementwise chain: ``torch`` (the reference and the default: a sequence
of in-place torch ops) or ``triton`` (``emo.triton_chunk``: two fused passes over each chunk, CUDA; opt-in). No
``N x V`` one-hot is ever built. The gradient buffer is fp32 whatever the logits' dtype: the upstream gradient (e.g. a
65536 loss scale) is applied in fp32 first and only then is the result cast to the logits' dtype, so fp16/bf16
gradients are as precise as autograd's. Every buffer is allocated on the inputs' device.

The gradient is computed in forward, so the losses are differentiable once: second-order gradients
(``create_graph=True``) raise an error instead of silently missing their second-order terms.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from emo.cost import CostEmbedding
from emo.registry import Objective, get_objective
from emo.transport import check_transport_precision, transport_distance, transport_operand

REDUCTIONS = ("mean", "sum", "none")
CHUNK_KERNELS = ("torch", "triton")
MASK_EPS = 1e-15
CHUNK_ELEMENTS = 1 << 24
SECOND_ORDER_ERROR = (
    "emo losses compute their gradient in the forward pass and are differentiable only once: second-order "
    "gradients (create_graph=True, e.g. double backward or gradient penalties) are not supported"
)


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
    precision: str = "fp32",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token loss values and, if ``with_grad``, their fp32 logit gradient for one chunk of tokens (torch ops).

    ``logits`` is an fp32 ``(n, V)`` tensor this function owns: it is overwritten and returned as the gradient.
    ``targets`` are valid class ids; ``cost`` is the transport product's operand for ``precision``
    (``emo.transport.transport_operand``) on the logits' device, or ``None``; ``scratch`` is an optional ``(n, V)``
    fp32 buffer for the transport costs (reused across chunks; allocated here if missing);
    ``valid`` optionally marks the rows that count (others get value and gradient 0; their targets may be any id).
    Returns ``(values (n,), dlogits (n, V) or None)``.
    """
    rows = targets.unsqueeze(1)
    target_logit = logits.gather(1, rows).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    unnormalized = logits.sub_(row_max).exp_()
    normalizer = unnormalized.sum(dim=1, keepdim=True)
    nll = (row_max.squeeze(1) - target_logit) + normalizer.log().squeeze(1)  # exact 0 + log Z when y is the argmax
    p_target = torch.exp(-nll)
    inverse_normalizer = normalizer.reciprocal_()

    emo = weighted_distance = None
    if objective.needs_cost_embedding:
        # 1 - cos(e_v, e_y) for every v, then weighted by the (unnormalised) probabilities.
        distance = torch.empty_like(logits) if scratch is None else scratch
        weighted_distance = transport_distance(distance, cost, targets, precision).mul_(unnormalized)
        emo = weighted_distance.sum(dim=1, keepdim=True).mul_(inverse_normalizer).squeeze(1).clamp_(min=0.0)
    values, nll_weight, emo_weight = objective.token_weights(nll, p_target, emo, hparams, valid)
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

    Chunks are contiguous position ranges (ignored positions get zero value and gradient). With gradient, each chunk
    is turned into the gradient in its rows of the fp32 gradient buffer (``torch``: copied there once and transformed
    in place; ``triton``: read from the logits, written there); backward scales it by the upstream gradient in fp32 and
    casts it to the logits' dtype (``scale_rows_and_cast``).
    """

    @staticmethod
    def forward(
        ctx, flat_logits, flat_targets, valid, objective, hparams, cost, chunk_size, with_grad,
        precision="fp32", chunk_kernel="torch",
    ):
        num_positions, vocab_size = flat_logits.shape
        values = flat_logits.new_empty(num_positions, dtype=torch.float32)
        chunk_size = max(1, min(chunk_size, num_positions))
        grad = flat_logits.new_empty(num_positions, vocab_size, dtype=torch.float32) if with_grad else None
        scratch = flat_logits.new_empty(chunk_size, vocab_size, dtype=torch.float32) if cost is not None else None
        targets = flat_targets.where(valid, 0)
        if chunk_kernel == "triton":
            from emo.triton_chunk import triton_objective_chunk

            for start in range(0, num_positions, chunk_size):
                span = slice(start, min(start + chunk_size, num_positions))
                values[span] = triton_objective_chunk(
                    flat_logits[span], targets[span], objective, hparams, cost, grad[span] if with_grad else None,
                    None if scratch is None else scratch[: span.stop - span.start], valid[span], precision,
                )
        else:
            work = None if with_grad else flat_logits.new_empty(chunk_size, vocab_size, dtype=torch.float32)
            for start in range(0, num_positions, chunk_size):
                span = slice(start, min(start + chunk_size, num_positions))
                size = span.stop - span.start
                chunk = grad[span] if with_grad else work[:size]
                chunk.copy_(flat_logits[span])
                values[span], _ = objective_chunk(
                    chunk,
                    targets[span],
                    objective,
                    hparams,
                    cost,
                    with_grad,
                    None if scratch is None else scratch[:size],
                    valid[span],
                    precision,
                )
        ctx.grad_buffer = grad
        ctx.logits_dtype = flat_logits.dtype
        ctx.chunk_size = chunk_size
        return values

    @staticmethod
    def backward(ctx, grad_values):
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_ORDER_ERROR)
        grad = ctx.grad_buffer
        if grad is None:
            raise RuntimeError("the objective loss was already back-propagated once; compute it again to backward twice")
        ctx.grad_buffer = None
        grad = scale_rows_and_cast(grad, grad_values, ctx.logits_dtype, ctx.chunk_size)
        return grad, None, None, None, None, None, None, None, None, None


def scale_rows_and_cast(
    grad: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype, chunk_size: int
) -> torch.Tensor:
    """``grad * row_scale[:, None]`` computed in fp32, then cast to ``dtype``; consumes the fp32 ``(N, V)`` ``grad``.

    A narrower ``dtype`` (fp16/bf16) is written into the front of ``grad``'s own storage, so the cast needs no second
    ``N x V`` buffer (the result is a view of that storage). Rows ``[start, stop)`` of the result occupy the bytes of
    fp32 rows ``[start / 2, stop / 2)``, so with ``stop <= 2 * start`` they never overlap rows not yet cast nor their
    own source: blocks double in size from row 1 (row 0 goes through a one-row temporary), up to ``chunk_size``.
    """
    if dtype == grad.dtype:
        return grad.mul_(row_scale.unsqueeze(1))
    if dtype.itemsize > grad.dtype.itemsize:
        return grad.mul_(row_scale.unsqueeze(1)).to(dtype)
    num_rows, vocab_size = grad.shape
    packed = grad.view(-1).view(dtype)[: grad.numel()].view(num_rows, vocab_size)
    start = 0
    while start < num_rows:
        stop = min(num_rows, start + chunk_size, max(2 * start, 1))
        block = grad[start:stop].mul_(row_scale[start:stop].unsqueeze(1))
        if start == 0:
            packed[:stop] = block.to(dtype)
        else:
            packed[start:stop].copy_(block)
        start = stop
    return packed


def shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Next-token targets aligned with each position: ``labels[:, 1:]`` padded with ``ignore_index`` at the end."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def check_targets(flat_targets: torch.Tensor, valid: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Check that every valid (non-ignored) target is a class id in ``[0, vocab_size)``, without a host sync where one
    would cost: on CPU (eager) a ``ValueError`` names the first bad label; on accelerators and under ``torch.compile``
    an asynchronous device-side assertion (``torch._assert_async``, as ``F.cross_entropy`` fails there) raises when
    the result is next read."""
    if not flat_targets.numel():
        return
    if flat_targets.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(flat_targets.where(valid, 0)))
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"label {bad} is out of range for vocabulary size {vocab_size} (ignore_index is {ignore_index})"
            )
        return
    in_range = ((flat_targets >= 0) & (flat_targets < vocab_size)) | ~valid
    torch._assert_async(
        in_range.all(), f"a label is out of range for vocabulary size {vocab_size} (ignore_index is {ignore_index})"
    )


def integer_labels(labels: torch.Tensor, like_shape: tuple, what: str) -> torch.Tensor:
    """``labels`` as int64 after checking it is an integer ``(batch, seq_len)`` tensor matching ``like_shape``; any
    integer dtype is accepted (``uint8``, ``int32``, ...), so ``ignore_index`` compares without overflow."""
    if (
        labels.dim() != 2
        or tuple(labels.shape) != tuple(like_shape)
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
    ):
        raise ValueError(
            f"labels must be an integer (batch, seq_len) tensor matching {what} {tuple(like_shape)}, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    return labels.long()


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


def check_chunk_kernel(chunk_kernel: str, device: torch.device) -> None:
    """Raise ``ValueError`` unless ``chunk_kernel`` is one of ``CHUNK_KERNELS`` and runs on ``device``."""
    if chunk_kernel not in CHUNK_KERNELS:
        raise ValueError(f"chunk_kernel must be one of {CHUNK_KERNELS}, got {chunk_kernel!r}")
    if chunk_kernel == "triton":
        from emo.triton_chunk import check_triton_device

        check_triton_device(device)


def transport_options(
    cost: Optional[CostEmbedding], transport_precision: str, chunk_kernel: str, device: torch.device
) -> Optional[torch.Tensor]:
    """Check ``transport_precision`` and ``chunk_kernel`` for ``device``; return ``cost``'s transport operand there."""
    check_transport_precision(transport_precision, device)
    check_chunk_kernel(chunk_kernel, device)
    return None if cost is None else transport_operand(cost, transport_precision, device)


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


def prediction_targets(
    labels: torch.Tensor, vocab_size: int, ignore_index: int, shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat targets of every position and their validity mask, range-checked (``check_targets``).

    ``shift=True``: position ``t`` predicts ``labels[:, t + 1]`` (the last position predicts nothing), as in Hugging
    Face models and ``EMOLoss``; ``shift=False``: ``labels`` are already aligned with the positions (e.g.
    transformers' ``shift_labels`` of padding-free batches)."""
    targets = (shift_labels(labels, ignore_index) if shift else labels).reshape(-1)
    valid = targets != ignore_index
    check_targets(targets, valid, vocab_size, ignore_index)
    return targets, valid


def per_position(values: torch.Tensor, labels_shape: torch.Size, shift: bool) -> torch.Tensor:
    """Flat per-position values as ``(B, T - 1)`` (``shift=True``: the last position predicts nothing) or ``(B, T)``."""
    values = values.view(labels_shape)
    return values[:, :-1] if shift else values


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    objective: str = "emo",
    cost_embedding: Union[CostEmbedding, torch.Tensor, None] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool = True,
    chunk_size: Optional[int] = None,
    transport_precision: str = "fp32",
    chunk_kernel: str = "torch",
    **hparams,
) -> torch.Tensor:
    """Causal-LM loss for any registered objective (``emo.OBJECTIVES``) on ``(B, T, V)`` logits.

    ``labels`` is an integer ``(B, T)`` tensor aligned with ``logits``; position ``t`` predicts ``labels[:, t + 1]``
    (shifted inside, as in ``EMOLoss`` and Hugging Face models), or ``labels[:, t]`` with ``shift=False`` (labels
    already shifted). ``cost_embedding`` is a ``(V, width)`` tensor or ``CostEmbedding`` (any width; never receives
    gradient), needed by the EMO objectives; build a ``CostEmbedding`` once: it moves to the logits' device in place
    on first use, so it is copied there once, not at every call. ``hparams`` override the objective's
    hyper-parameters (e.g. ``eta`` for MixCE). Computed in fp32; returns an fp32 scalar for ``mean`` (``sum / count``
    of valid tokens; 0, with zero gradients, when all are ignored) and ``sum``, or per-position values (``(B, T - 1)``,
    or ``(B, T)`` with ``shift=False``; 0 at ignored positions) for ``none``. Differentiable once (see module doc).
    ``transport_precision`` (``fp32``, ``tf32``, ``bf16``; ``emo.transport``) is the precision of the transport
    product; ``chunk_kernel`` (``torch``, ``triton``) runs the per-chunk elementwise work.
    """
    check_reduction(reduction)
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating (batch, seq_len, vocab) tensor, got shape {tuple(logits.shape)}")
    labels = integer_labels(labels, logits.shape[:2], "logits")
    vocab_size = logits.shape[-1]
    spec, resolved, cost = resolve_objective(objective, cost_embedding, vocab_size, hparams)
    operand = transport_options(cost, transport_precision, chunk_kernel, logits.device)
    flat_targets, valid = prediction_targets(labels, vocab_size, ignore_index, shift)
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    values = _ObjectiveOnLogits.apply(
        logits.reshape(-1, vocab_size),
        flat_targets,
        valid,
        spec,
        resolved,
        operand,
        chunk_size or default_chunk_size(vocab_size),
        with_grad,
        transport_precision,
        chunk_kernel,
    )
    if reduction == "none":
        return per_position(values, labels.shape, shift)
    return reduce_token_values(values, valid.sum(), reduction)


def EMOLoss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    cost_embedding: Union[CostEmbedding, torch.Tensor],
    ignore_index: int = -100,
    mode: int = 1,
) -> torch.Tensor:
    """Drop-in replacement for ``EMOLoss`` from the ``EMOLoss==0.0.3`` package, with the same arguments and values.

    ``mode=1`` weights towards MLE (objective ``emo_clamped``: the ratio clamped at 3), ``mode=2`` towards EMO
    (``emo2``). Unlike the reference it builds no one-hot matrix, computes in fp32, and never back-propagates into
    ``cost_embedding``.
    """
    if mode not in (1, 2):
        raise ValueError(f"EMOLoss mode must be 1 or 2, got {mode!r}")
    return lm_loss(
        logits,
        labels,
        objective="emo_clamped" if mode == 1 else "emo2",
        cost_embedding=cost_embedding,
        ignore_index=ignore_index,
    )
