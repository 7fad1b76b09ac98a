"""Registry of training objectives, each expressed as detached per-token weights.

Every objective in this suite (MLE, MixCE, TaiLr, the EMO repository's TVD variant and the EMO family) is, per
predicted token ``t``, a combination ``loss_t = a_t * nll_t + b_t * emo_t`` whose coefficients ``a_t`` and ``b_t``
are stop-gradient quantities computed from the token's own detached values. An objective is therefore a function
``weights(nll, p_target, emo) -> (value, a, b)`` on detached 1-D tensors; the loss kernels assemble the exact
gradient ``a_t * dnll_t/dz + b_t * demo_t/dz`` analytically, so no objective needs autograd through the vocabulary.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Optional

import torch

import emo.baselines.objectives as baselines
import emo.objectives as emo_objectives

TokenWeights = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


COST_SOURCES = ("none", "fixed", "live_head")


@dataclasses.dataclass(frozen=True)
class Objective:
    """A named objective: its per-token weight function, hyper-parameter defaults, and where its cost embedding
    comes from: ``none`` (no transport term), ``fixed`` (a frozen matrix given once, e.g. a copy of the initial LM
    head) or ``live_head`` (the model's current LM head, detached at every step)."""

    name: str
    weights: Callable[..., TokenWeights]
    cost_source: str
    defaults: dict

    @property
    def needs_cost_embedding(self) -> bool:
        """True when the objective has a transport term (``cost_source`` is not ``none``)."""
        return self.cost_source != "none"

    def token_weights(
        self, nll: torch.Tensor, p_target: torch.Tensor, emo: Optional[torch.Tensor], hparams: dict,
        valid: Optional[torch.Tensor] = None,
    ) -> TokenWeights:
        """``weights(nll, p_target, emo, **hparams)``: per-token ``(values, a, b)``, 0 on rows ``valid`` marks False."""
        values, nll_weight, emo_weight = self.weights(nll, p_target, emo, **hparams)
        if valid is not None:
            values, nll_weight = values.where(valid, 0.0), nll_weight.where(valid, 0.0)
            emo_weight = None if emo_weight is None else emo_weight.where(valid, 0.0)
        return values, nll_weight, emo_weight

    def resolve_hparams(self, hparams: dict) -> dict:
        """Return the objective's defaults updated by ``hparams``; unknown names raise ``TypeError``."""
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise TypeError(f"objective {self.name!r} got unknown hyper-parameter(s) {unknown}; valid: {valid}")
        return {**self.defaults, **hparams}


_OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, *, cost_source: str = "none", **defaults):
    """Decorator registering ``fn(nll, p_target, emo, **hparams) -> (value, a, b)`` under ``name``.

    Keyword-only parameters of ``fn`` with defaults are the objective's hyper-parameters; ``defaults`` overrides some
    of their values for this name (a preset: one weight function can be registered under several names, each meaning
    one formula). ``cost_source`` is one of ``COST_SOURCES``.
    """
    if cost_source not in COST_SOURCES:
        raise ValueError(f"cost_source must be one of {COST_SOURCES}, got {cost_source!r}")

    def decorate(fn):
        if name in _OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        signature_defaults = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        unknown = sorted(set(defaults) - set(signature_defaults))
        if unknown:
            raise TypeError(f"objective {name!r}: {fn.__name__} has no hyper-parameter(s) {unknown}")
        _OBJECTIVES[name] = Objective(name, fn, cost_source, {**signature_defaults, **defaults})
        return fn

    return decorate


def objective_names() -> tuple[str, ...]:
    """Names of all registered objectives, in registration order."""
    return tuple(_OBJECTIVES)


def get_objective(name: str) -> Objective:
    """Look up an objective by name; an unknown name raises ``ValueError`` listing the valid ones."""
    try:
        return _OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid objectives: {', '.join(_OBJECTIVES)}") from None


# One name, one formula: the same names as conf/objective/ (Hydra ``objective=<name>``) and the README's preset table.
for _name, _weights, _cost_source, _defaults in (
    ("mle", baselines.mle, "none", {}),
    ("mixce", baselines.mixce, "none", {}),
    ("tailr", baselines.tailr, "none", {}),
    ("tvd", baselines.tvd, "none", {}),  # DRSY/EMO language_modeling/gpt2.py `tvd`
    ("emo", emo_objectives.emo_mode1, "fixed", {}),  # Track 1, language_modeling/gpt2.py: mode 1, no clamp
    ("emo_clamped", emo_objectives.emo_mode1, "fixed", {"max_ratio": 3.0}),  # EMOLoss==0.0.3 mode 1
    ("emo2", emo_objectives.emo_mode2, "fixed", {}),  # EMOLoss==0.0.3 mode 2
    ("cft/emo", emo_objectives.emo_mode1, "fixed", {"max_ratio": 3.0, "gt_q": True}),  # Track 2 EMOLlamaForCausalLM
    ("cft/emo2", emo_objectives.emo_mode2, "fixed", {"gt_q": True}),  # Track 2 EMOLlama2ForCausalLM
    ("sft/emo", emo_objectives.emo_mode1, "fixed", {"gt_q": True}),  # Track 3 instruction_tuning/emo_llama.py
    ("adaptive_emo", emo_objectives.adaptive_emo, "live_head", {}),  # emo_patch.py, current head
):
    register_objective(_name, cost_source=_cost_source, **_defaults)(_weights)
