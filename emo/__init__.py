"""emo: Earth Mover Distance Optimization (EMO) and baseline objectives for causal language models.

Public API (torch only; ``emo.training``'s ``ObjectiveTrainer`` needs transformers):
    EMOLoss(logits, labels, cost_embedding, ignore_index=-100, mode=1)   drop-in for the ``EMOLoss`` package
    lm_loss(logits, labels, *, objective="emo", cost_embedding=None, ...) any objective in ``OBJECTIVES`` by name
    linear_lm_loss(hidden, lm_head_weight, labels, *, objective="emo", ...) the same, fused with the LM head
    LMLoss, LinearLMLoss                                                  the same as ``nn.Module`` losses
    ObjectiveLoss                                                         for transformers' Trainer, a model's own
                                                                          loss, TRL's SFTTrainer (emo.integrations)
    CostEmbedding, cost_embedding_from_model, load_cost_embedding         the transport-cost embeddings
    __version__                                                           the emo-suite distribution's version

``python -m emo`` reports the installation (versions, and a clash with the ``EMOLoss`` wheel: ``emo.installation``).
"""
__version__ = "0.1.0"  # first: the modules imported below recognise emo-suite's package by it (emo.installation)

from emo.cost import CostEmbedding, cost_embedding_from_model, load_cost_embedding
from emo.fused import linear_lm_loss
from emo.installation import warn_if_emoloss_installed
from emo.integrations import ObjectiveLoss
from emo.losses import EMOLoss, lm_loss
from emo.modules import LinearLMLoss, LMLoss
from emo.registry import get_objective, objective_names, register_objective

OBJECTIVES = objective_names()
warn_if_emoloss_installed()

__all__ = [
    "EMOLoss",
    "OBJECTIVES",
    "CostEmbedding",
    "LMLoss",
    "LinearLMLoss",
    "ObjectiveLoss",
    "cost_embedding_from_model",
    "get_objective",
    "linear_lm_loss",
    "lm_loss",
    "load_cost_embedding",
    "register_objective",
]
