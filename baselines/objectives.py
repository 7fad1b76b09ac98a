"""Baseline objectives as detached per-token weights on the token NLL (see ``emo.registry``).

Each returns ``(value, a, None)``: the loss is ``a * nll`` with ``a`` a stop-gradient weight that depends only on the
model's probability of the gold token, ``p = exp(-nll)``. Plain formulas: ``emo.registry`` registers them.
"""
from __future__ import annotations

import torch


def mle(nll: torch.Tensor, p_target: torch.Tensor, emo: None):
    """Maximum likelihood: token cross-entropy, ``loss = nll``."""
    weight = torch.ones_like(nll)
    return nll, weight, None


def mixce(nll: torch.Tensor, p_target: torch.Tensor, emo: None, *, eta: float = 0.1):
    """MixCE (Zhang et al., ACL 2023), the official token-level approximation.

    ``loss = eta * nll + (1 - eta) * sg(p) * nll``; ``eta = 1`` is MLE. Default ``eta = 0.1`` is the value of the
    released WikiText model (bloomberg/MixCE-acl2023).
    """
    weight = eta + (1.0 - eta) * p_target
    return weight * nll, weight, None


def tailr(nll: torch.Tensor, p_target: torch.Tensor, emo: None, *, gamma: float = 0.5, min_weight: float = 0.2):
    """TaiLr (Ji et al., ICLR 2023): total-variation-guided weighting of the NLL.

    ``w = clamp(sg(p) / (gamma + (1 - gamma) * sg(p)), min_weight, 1)`` and ``loss = w * nll``; ``gamma -> 0`` is MLE,
    ``gamma = 1`` gives ``w = p``. Label smoothing, which the TaiLr code adds on some tasks, is not part of this term.
    """
    weight = (p_target / (gamma + (1.0 - gamma) * p_target)).clamp(min=min_weight, max=1.0)
    return weight * nll, weight, None


def tvd(nll: torch.Tensor, p_target: torch.Tensor, emo: None, *, mixing_ratio: float = 0.5):
    """The DRSY/EMO repository's TaiLr variant (``language_modeling/gpt2.py`` mode ``tvd``).

    With ``m = mixing_ratio``: ``loss = m * nll + (1 - m) * clamp(sg(p) / ((1 - m) + m * sg(p)), 0.2, 1) * nll``.
    It mixes in MLE and uses ``m`` where TaiLr uses ``1 - gamma``; the two agree only at ``m = 0.5``.
    """
    density_ratio = (p_target / ((1.0 - mixing_ratio) + mixing_ratio * p_target)).clamp(min=0.2, max=1.0)
    weight = mixing_ratio + (1.0 - mixing_ratio) * density_ratio
    return weight * nll, weight, None
