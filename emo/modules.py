"""The losses as ``torch.nn.Module`` objects, used like ``nn.CrossEntropyLoss``: configure once, call per batch.

``LMLoss()(logits, labels)`` is ``emo.lm_loss`` and ``LinearLMLoss()(hidden, weight, labels)`` is
``emo.linear_lm_loss``, with the objective, its hyper-parameters and its cost embedding fixed at construction.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from emo.cost import CostEmbedding, output_embedding
from emo.fused import linear_lm_loss
from emo.losses import check_reduction, lm_loss
from emo.registry import get_objective

CostLike = Union[CostEmbedding, torch.Tensor, None]


class ObjectiveSpec:
    """One objective, resolved: its registry name, hyper-parameters (the registry's defaults updated by ``hparams``)
    and where each step's cost embedding comes from (``emo.registry.COST_SOURCES``).

    ``fixed`` objectives need ``cost_embedding`` (validated once); ``live_head`` objectives read the current LM head,
    detached, from the weight given at the call or from ``model``; ``none`` objectives ignore a cost embedding.
    """

    def __init__(self, objective: str, hparams: Optional[dict], cost_embedding: CostLike, model=None):
        spec = get_objective(objective)
        self.objective = objective
        self.cost_source = spec.cost_source
        self.hparams = spec.resolve_hparams(dict(hparams or {}))
        self.model = model
        self.cost_embedding = None
        if spec.cost_source == "fixed":
            if cost_embedding is None:
                raise ValueError(f"objective {objective!r} needs a cost embedding (emo.cost_embedding_from_model)")
            self.cost_embedding = CostEmbedding.wrap(cost_embedding)

    def step_cost(self, head_weight: Optional[torch.Tensor] = None) -> Optional[CostEmbedding]:
        """This step's cost embedding: the fixed one, or for ``live_head`` the current head (``head_weight``, else the
        LM head of ``model``), detached."""
        if self.cost_source != "live_head":
            return self.cost_embedding
        if head_weight is None:
            head_weight = self.output_embedding().weight
        return CostEmbedding(head_weight, validate=False)

    def output_embedding(self) -> torch.nn.Module:
        """The LM head of ``model`` (unwrapped from DDP/FSDP/PEFT); a ``ValueError`` says so when there is no model."""
        if self.model is None:
            raise ValueError(
                f"objective {self.objective!r} (cost_source={self.cost_source}) reads the model's LM head: pass model="
            )
        return output_embedding(unwrap_model(self.model))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying ``PreTrainedModel`` of a (DDP/FSDP/PEFT-)wrapped model."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class _ObjectiveModule(torch.nn.Module):
    """What ``LMLoss`` and ``LinearLMLoss`` share: the objective (``ObjectiveSpec``) and the loss function's options."""

    def __init__(
        self,
        objective: str = "mle",
        cost_embedding: CostLike = None,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        shift: bool = True,
        chunk_size: Optional[int] = None,
        transport_precision: str = "fp32",
        chunk_kernel: str = "torch",
        **hparams,
    ):
        super().__init__()
        check_reduction(reduction)
        self.spec = ObjectiveSpec(objective, hparams, cost_embedding)
        self.options = dict(ignore_index=ignore_index, reduction=reduction, shift=shift, chunk_size=chunk_size,
                            transport_precision=transport_precision, chunk_kernel=chunk_kernel)

    def extra_repr(self) -> str:
        return f"objective={self.spec.objective!r}, hparams={self.spec.hparams}, {self.options}"


class LMLoss(_ObjectiveModule):
    """``emo.lm_loss`` as a module: ``LMLoss("emo", cost_embedding=cost)(logits, labels)``.

    ``shift=True`` (default): position ``t`` predicts ``labels[:, t + 1]``; ``shift=False``: labels already shifted.
    The other options are ``emo.lm_loss``'s. ``model`` is needed only by ``live_head`` objectives (``adaptive_emo``),
    which read its current LM head.
    """

    def __init__(self, objective: str = "mle", cost_embedding: CostLike = None, *,
                 model: Optional[torch.nn.Module] = None, **options):
        super().__init__(objective, cost_embedding, **options)
        self.spec.model = model

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The objective's loss of ``(B, T, V)`` logits for ``(B, T)`` labels (see ``emo.lm_loss``)."""
        return lm_loss(
            logits, labels, objective=self.spec.objective, cost_embedding=self.spec.step_cost(), **self.options,
            **self.spec.hparams,
        )


class LinearLMLoss(_ObjectiveModule):
    """``emo.linear_lm_loss`` as a module: ``LinearLMLoss("emo", cost_embedding=cost)(hidden, lm_head.weight, labels)``
    computes the loss of ``hidden @ weight.T (+ bias)`` without materialising the logits; ``live_head`` objectives use
    the given weight, detached, as their cost embedding. The options are ``LMLoss``'s (without ``model``)."""

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The objective's loss of the LM head ``(weight, bias)`` applied to ``(B, T, H)`` hidden states."""
        return linear_lm_loss(
            hidden, weight, labels, objective=self.spec.objective, lm_head_bias=bias,
            cost_embedding=self.spec.step_cost(weight), **self.options, **self.spec.hparams,
        )
