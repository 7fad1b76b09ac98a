"""EMO objectives (Ren, Wu, Zhu, ICLR 2024) as detached per-token weights (see ``emo.registry``).

``emo_t = 1 - sum_v softmax(z_t)_v * cos(e_v, e_{y_t})`` is the earth mover distance between the model's next-token
distribution and the one-hot gold token under the cosine transport cost of a cost embedding ``e``. The published
objectives mix it with the token NLL through stop-gradient ratios; the constants below (``1e-10`` in the ratio
denominators, the ratio clamp at 3 of ``emo_clamped``) are those of the reference package ``EMOLoss==0.0.3``.
"""
from __future__ import annotations

from typing import Optional

import torch

RATIO_EPS = 1e-10


def _mode1(nll: torch.Tensor, emo: torch.Tensor, max_ratio: Optional[float]):
    ratio = nll / (emo + RATIO_EPS)
    if max_ratio is not None:
        ratio = ratio.clamp(max=max_ratio)
    return 0.5 * (nll + ratio * emo), torch.full_like(nll, 0.5), 0.5 * ratio


def _mode2(nll: torch.Tensor, emo: torch.Tensor):
    ratio = emo / (nll + RATIO_EPS)
    return ratio * nll + emo, ratio, torch.ones_like(emo)


def emo_mode1(
    nll: torch.Tensor, p_target: torch.Tensor, emo: torch.Tensor, *, max_ratio: Optional[float] = None, gt_q: bool = False
):
    """EMO mode 1 (weighted towards MLE): ``0.5 * (nll + min(sg(nll / emo), max_ratio) * emo)``.

    The defaults are the EMO repository's Track-1 GPT-2 code (``emo``: no clamp); ``max_ratio=3`` is ``EMOLoss==0.0.3``
    mode 1 (``emo_clamped``). While the clamp is inactive the value equals ``nll``; the gradient is
    ``0.5 dnll + 0.5 (nll/emo) demo``. ``gt_q=True`` is the repository's "gt_q" trick with a fixed cost embedding: the
    transport term seen by the stop-gradient weights becomes ``emo + sg(q[y])`` (the gold mass is subtracted from the
    model distribution, detached, before transport); its gradient is unchanged.
    """
    return _mode1(nll, emo + p_target if gt_q else emo, max_ratio)


def emo_mode2(nll: torch.Tensor, p_target: torch.Tensor, emo: torch.Tensor, *, gt_q: bool = False):
    """EMO mode 2 (weighted towards EMO): ``sg(emo / nll) * nll + emo``; its value is ``2 * emo``.

    The defaults are ``EMOLoss==0.0.3`` mode 2; ``gt_q=True`` uses ``emo + sg(q[y])`` in place of ``emo`` (value and
    ratio), as the repository's continual fine-tuning code does; the gradient of the transport term is unchanged.
    """
    return _mode2(nll, emo + p_target if gt_q else emo)


def adaptive_emo(
    nll: torch.Tensor, p_target: torch.Tensor, emo: torch.Tensor, *, mode: int = 1, max_ratio: Optional[float] = None
):
    """The EMO repository's adaptive variant: the cost embedding is the *current* LM head (detached each step), and
    the detached gold-token mass is subtracted from the model distribution before transport, ``q - sg(q * onehot(y))``.

    That subtraction raises the transport term's *value* by ``p = q[y]`` (``emo' = emo + p``) but leaves its gradient
    unchanged; only the stop-gradient ratio weights see it (mode 1's ``nll/emo'`` shrinks, mode 2's ``emo'/nll``
    grows). ``mode=1`` with no clamp is ``gpt2.py``'s ``adaptive_emo``, which crashes as published
    (``weight.data()``); ``mode=2`` is ``emo_patch.py``'s EMO-2 adaptive forward.
    """
    shifted = emo + p_target
    if mode == 1:
        return _mode1(nll, shifted, max_ratio)
    if mode == 2:
        return _mode2(nll, shifted)
    raise ValueError(f"adaptive_emo mode must be 1 or 2, got {mode!r}")
