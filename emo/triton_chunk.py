"""The per-chunk elementwise work of the objective losses as two fused Triton passes (``chunk_kernel="triton"``).

``emo.losses.objective_chunk`` (``chunk_kernel="torch"``, the reference and the default) runs the chain as about a dozen
torch ops, each a pass over the ``chunk x V`` buffer. Here each row of the chunk is one Triton program:

1. ``_row_statistics`` reads the logits (any float dtype) and, for EMO objectives, the cosine distances ``d = 1 - S``
   once, and keeps an online softmax: the row max ``m``, ``Z = sum_v exp(z_v - m)``, ``W = sum_v exp(z_v - m) d_v``
   and the gold logit. Then, in torch on ``(n,)`` vectors: ``nll = m + log Z - z_y``, ``emo = W / Z`` and the
   objective's token weights ``(a, b)`` (``Objective.token_weights``).
2. ``_row_gradient`` (with gradient) reads them again and writes the fp32 logit gradient
   ``q_v (a + b (d_v - emo)) - a [v = y]``, ``q_v = exp(z_v - m) / Z``, in place or into another buffer.

The distances come from the transport product in the chosen precision (``emo.transport``), as in the torch path. The
kernels run on CUDA tensors; on CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1`` set before this
module is imported), which is how the tests check them against the torch reference. Not a default: it becomes one
only after it ran in this repository's GPU check (``benchmarks/gpu_check.sh``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from emo.registry import Objective
from emo.transport import transport_distance

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BLOCK = 4096


def check_triton_device(device: torch.device) -> None:
    """Raise ``ValueError`` unless the Triton kernels can run on ``device``."""
    if device.type == "cuda" or (INTERPRETED and device.type == "cpu"):
        return
    raise ValueError(
        f"chunk_kernel='triton' runs on CUDA tensors (or on CPU under Triton's interpreter, TRITON_INTERPRET=1 set "
        f"before emo.triton_chunk is imported); the inputs are on {device.type}: use chunk_kernel='torch'"
    )


@triton.jit
def _row_statistics(
    logits_ptr, logits_stride, distance_ptr, distance_stride, targets_ptr, stats_ptr, vocab_size,
    HAS_DISTANCE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_stride
    distance_row = distance_ptr + row * distance_stride
    row_max = float("-inf")
    normalizer = 0.0
    weighted = 0.0
    for start in range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab_size
        z = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(z, axis=0))
        rescale = tl.exp(row_max - new_max)
        unnormalized = tl.exp(z - new_max)
        normalizer = normalizer * rescale + tl.sum(unnormalized, axis=0)
        if HAS_DISTANCE:
            d = tl.load(distance_row + cols, mask=mask, other=0.0)
            weighted = weighted * rescale + tl.sum(unnormalized * d, axis=0)
        row_max = new_max
    target_logit = tl.load(logits_row + tl.load(targets_ptr + row)).to(tl.float32)
    stats_row = stats_ptr + row * 4
    tl.store(stats_row, row_max)
    tl.store(stats_row + 1, normalizer)
    tl.store(stats_row + 2, weighted)
    tl.store(stats_row + 3, target_logit)


@triton.jit
def _row_gradient(
    logits_ptr, logits_stride, distance_ptr, distance_stride, grad_ptr, grad_stride, targets_ptr, stats_ptr,
    coefficients_ptr, vocab_size, HAS_DISTANCE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_stride
    distance_row = distance_ptr + row * distance_stride
    grad_row = grad_ptr + row * grad_stride
    row_max = tl.load(stats_ptr + row * 4)
    inverse_normalizer = 1.0 / tl.load(stats_ptr + row * 4 + 1)
    nll_weight = tl.load(coefficients_ptr + row * 3)
    base = tl.load(coefficients_ptr + row * 3 + 1)  # a - b * emo
    emo_weight = tl.load(coefficients_ptr + row * 3 + 2)
    target = tl.load(targets_ptr + row)
    for start in range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab_size
        z = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.exp(z - row_max) * inverse_normalizer
        coefficient = base
        if HAS_DISTANCE:
            coefficient = base + emo_weight * tl.load(distance_row + cols, mask=mask, other=0.0)
        grad = q * coefficient - tl.where(cols == target, nll_weight, 0.0)
        tl.store(grad_row + cols, grad, mask=mask)


def _launch_options(vocab_size: int) -> dict:
    """Columns per block (a power of two, at most ``MAX_BLOCK``) and warps per program (8 for wide blocks)."""
    block = min(MAX_BLOCK, triton.next_power_of_2(vocab_size))
    return {"BLOCK": block, "num_warps": 8 if block >= 2048 else 4}


def triton_objective_chunk(
    logits: torch.Tensor,
    targets: torch.Tensor,
    objective: Objective,
    hparams: dict,
    cost: Optional[torch.Tensor],
    grad_out: Optional[torch.Tensor],
    scratch: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """``emo.losses.objective_chunk`` with the Triton kernels: per-token values ``(n,)``; with ``grad_out`` (an fp32
    ``(n, V)`` buffer, possibly ``logits`` itself) the fp32 logit gradient is written there.

    ``logits`` is ``(n, V)`` of any float dtype and is only read (unless it is ``grad_out``); the other arguments are
    ``objective_chunk``'s.
    """
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_rows, vocab_size = logits.shape
    has_distance = objective.needs_cost_embedding
    distance = logits
    if has_distance:
        if scratch is None:
            scratch = torch.empty(num_rows, vocab_size, dtype=torch.float32, device=logits.device)
        distance = transport_distance(scratch, cost, targets, precision)
    stats = torch.empty(num_rows, 4, dtype=torch.float32, device=logits.device)
    launch = _launch_options(vocab_size)
    grid = (num_rows,)
    _row_statistics[grid](
        logits, logits.stride(0), distance, distance.stride(0), targets, stats, vocab_size,
        HAS_DISTANCE=has_distance, **launch,
    )
    row_max, normalizer, weighted, target_logit = stats.unbind(1)
    nll = (row_max - target_logit) + normalizer.log()
    p_target = torch.exp(-nll)
    emo = (weighted / normalizer).clamp_(min=0.0) if has_distance else None
    values, nll_weight, emo_weight = objective.token_weights(nll, p_target, emo, hparams, valid)
    if grad_out is None:
        return values
    if emo_weight is None:
        coefficients = torch.stack([nll_weight, nll_weight, torch.zeros_like(nll_weight)], dim=1)
    else:
        coefficients = torch.stack([nll_weight, nll_weight - emo_weight * emo, emo_weight], dim=1)
    _row_gradient[grid](
        logits, logits.stride(0), distance, distance.stride(0), grad_out, grad_out.stride(0), targets, stats,
        coefficients.float().contiguous(), vocab_size, HAS_DISTANCE=has_distance, **launch,
    )
    return values
