"""The transport product of the EMO objectives, ``S = E[y] @ E^T``, in a selectable precision.

``transport_precision`` (one name in the loss functions, ``ObjectiveLoss`` and ``conf/objective``) says how the cosines
of every token to the gold one are multiplied, per chunk of tokens, from the row-normalised cost embedding ``E``:

- ``fp32`` (default): fp32 operands and results, exact fp32 products on every device (on CUDA, whatever the global
  ``torch.set_float32_matmul_precision`` or ``Trainer(tf32=True)`` says, for this product only).
- ``tf32``: fp32 operands rounded to TF32 by the tensor cores (CUDA only; other devices raise ``ValueError``).
- ``bf16``: operands rounded to bf16 (converted once per cost embedding and cached), fp32 accumulation and results
  (``torch.addmm(..., out_dtype=torch.float32)`` on CUDA, XPU and meta; elsewhere, e.g. on CPU, the bf16-rounded
  values multiplied in fp32: the same numbers up to the summation order, without the speed).

Each mode's error on a cosine ``S[t, v]`` of unit rows (``docs/library.md`` has the measured errors on SmolLM2-135M's
embedding) is at most ``2u + u^2 + width * 2^-24``, with unit roundoff ``u = 2^-24`` (fp32; the bound is then the
fp32 summation term), ``2^-10`` (tf32: 10 stored mantissa bits, truncation or rounding) or ``2^-8`` (bf16:
round-to-nearest); ``transport_error_bound`` returns it. The transport term ``emo = sum_v q_v (1 - S_v)`` inherits the
same bound, as ``q`` sums to 1.
"""
from __future__ import annotations

import contextlib

import torch

from emo.cost import CostEmbedding

TRANSPORT_PRECISIONS = ("fp32", "tf32", "bf16")
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "tf32": 2.0**-10, "bf16": 2.0**-8}
# Devices where ``torch.addmm(..., out_dtype=torch.float32)`` multiplies bf16 operands into fp32 results (``meta``
# checks shapes only).
FP32_OUTPUT_DEVICES = ("cuda", "xpu", "meta")


def check_transport_precision(precision: str, device: torch.device) -> None:
    """Raise ``ValueError`` unless ``precision`` is one of ``TRANSPORT_PRECISIONS`` and available on ``device``."""
    if precision not in TRANSPORT_PRECISIONS:
        raise ValueError(f"transport_precision must be one of {TRANSPORT_PRECISIONS}, got {precision!r}")
    if precision == "tf32" and device.type not in ("cuda", "meta"):
        raise ValueError(
            f"transport_precision='tf32' needs a CUDA device (TF32 tensor cores); the inputs are on {device.type}: "
            "use 'fp32' (exact) or 'bf16' there"
        )


def transport_error_bound(precision: str, width: int) -> float:
    """Worst-case absolute error of one cosine ``S[t, v]`` between unit rows of ``width`` entries in ``precision``."""
    u = UNIT_ROUNDOFF[precision]
    rounding = 0.0 if precision == "fp32" else 2 * u + u * u
    return rounding + width * UNIT_ROUNDOFF["fp32"]


def transport_operand(cost: CostEmbedding, precision: str, device: torch.device) -> torch.Tensor:
    """The operand ``E`` of the transport product for ``precision`` on ``device``, converted once per cost embedding.

    The fp32 rows for ``fp32``/``tf32``; for ``bf16`` their bf16 rounding, stored in bf16 where the device has
    fp32-output bf16 products (``FP32_OUTPUT_DEVICES``) and as fp32 values elsewhere.
    """
    cost.to(device)
    if precision != "bf16":
        return cost.normalized
    stored = torch.bfloat16 if device.type in FP32_OUTPUT_DEVICES else torch.float32
    return cost.cached_operand("bf16", lambda rows: rows.to(torch.bfloat16).to(stored))


@contextlib.contextmanager
def _float32_matmul(precision: str, device: torch.device):
    """On CUDA, fp32 products run exactly (``fp32``) or in TF32 (``tf32``) inside this block, whatever the global
    setting; the global setting is touched only when it differs, and restored. Under ``torch.compile`` the compiled
    graph follows the global setting instead (it cannot change inside a graph)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        yield
        return
    wanted = "high" if precision == "tf32" else "highest"
    current = torch.get_float32_matmul_precision()
    if current == wanted:
        yield
        return
    torch.set_float32_matmul_precision(wanted)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(current)


def transport_distance(out: torch.Tensor, operand: torch.Tensor, targets: torch.Tensor, precision: str) -> torch.Tensor:
    """Write ``1 - E[targets] @ E^T`` (cosine distances to the gold tokens) into the fp32 ``(n, V)`` buffer ``out``.

    ``operand`` comes from ``transport_operand`` for the same ``precision``.
    """
    rows = operand[targets]
    out.fill_(1.0)
    if operand.dtype == torch.float32:
        with _float32_matmul(precision, out.device):
            return out.addmm_(rows, operand.T, alpha=-1.0)
    return torch.addmm(out, rows, operand.T, alpha=-1.0, out_dtype=torch.float32, out=out)
