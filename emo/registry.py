"""Registry of training objectives, each expressed as detached per-token weights.

Every objective in this suite (MLE, MixCE, TaiLr, the EMO repository's TVD variant and the EMO family) is, per
predicted token ``t``, a combination ``loss_t = a_t * nll_t + b_t * emo_t`` whose coefficients ``a_t`` and ``b_t``
are stop-gradient quantities computed from the token's own detached values. An objective is therefore a function
``weights(nll, p_target, emo) -> (value, a, b)`` on detached 1-D tensors; the loss kernels assemble the exact
gradient ``a_t * dnll_t/dz + b_t * demo_t/dz`` analytically, so no objective needs autograd through the vocabulary.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Callable, Optional

import torch

TokenWeights = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Objective:
    """A named objective: its per-token weight function and whether it needs a cost embedding."""

    name: str
    weights: Callable[..., TokenWeights]
    needs_cost_embedding: bool
    defaults: dict

    def resolve_hparams(self, hparams: dict) -> dict:
        """Return the objective's defaults updated by ``hparams``; unknown names raise ``TypeError``."""
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise TypeError(f"objective {self.name!r} got unknown hyper-parameter(s) {unknown}; valid: {valid}")
        return {**self.defaults, **hparams}


_OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, *, needs_cost_embedding: bool = False):
    """Decorator registering ``fn(nll, p_target, emo, **hparams) -> (value, a, b)`` under ``name``.

    Keyword-only parameters of ``fn`` with defaults are the objective's hyper-parameters.
    """

    def decorate(fn):
        if name in _OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        defaults = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        _OBJECTIVES[name] = Objective(name, fn, needs_cost_embedding, defaults)
        return fn

    return decorate


def _load_builtin_objectives() -> None:
    importlib.import_module("baselines.objectives")
    importlib.import_module("emo.objectives")


def objective_names() -> tuple[str, ...]:
    """Names of all registered objectives, in registration order."""
    _load_builtin_objectives()
    return tuple(_OBJECTIVES)


def get_objective(name: str) -> Objective:
    """Look up an objective by name; an unknown name raises ``ValueError`` listing the valid ones."""
    _load_builtin_objectives()
    try:
        return _OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid objectives: {', '.join(_OBJECTIVES)}") from None
