"""One training path for every track: Hugging Face ``Trainer`` with any objective, no monkey-patching.

``ObjectiveLoss`` is a ``compute_loss_func`` for ``transformers.Trainer``: it shifts labels, ignores padding
(``-100``), and divides the summed token losses by ``num_items_in_batch`` so that gradient accumulation gives the
same loss and gradients as one large batch. ``ObjectiveTrainer`` wires it in and, during evaluation, reports plain
token cross-entropy as ``eval_loss`` so that checkpoints are selected by true perplexity for every objective.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from transformers import Trainer

from emo.cost import CostEmbedding
from emo.fused import linear_lm_loss
from emo.losses import lm_loss
from emo.registry import get_objective

IMPLEMENTATIONS = ("materialized", "fused")


class ObjectiveLoss:
    """Causal-LM loss for one objective, usable as ``Trainer(compute_loss_func=ObjectiveLoss(...))``.

    ``cost_embedding``: a ``CostEmbedding`` or ``(V, width)`` tensor for the EMO objectives (build it with
    ``emo.cost_embedding_from_model``). ``adaptive_emo`` instead reads the current LM head of ``model`` at every
    call, detached (objectives whose registry ``cost_source`` is ``live_head``). ``hparams`` are the objective's hyper-parameters. ``impl="fused"`` makes ``ObjectiveTrainer``
    stop the model's forward at the last hidden state during training and compute the loss with
    ``emo.linear_lm_loss`` (no ``N x V`` logits); evaluation and generation are unchanged.
    """

    def __init__(
        self,
        objective: str = "mle",
        hparams: Optional[dict] = None,
        cost_embedding: Union[CostEmbedding, torch.Tensor, None] = None,
        *,
        model: Optional[torch.nn.Module] = None,
        impl: str = "materialized",
        ignore_index: int = -100,
        chunk_size: Optional[int] = None,
    ):
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        spec = get_objective(objective)
        self.live_head = spec.cost_source == "live_head"
        self.impl = impl
        self.objective = objective
        self.hparams = spec.resolve_hparams(dict(hparams or {}))
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.model = model
        self.cost_embedding = None
        if spec.cost_source == "fixed":
            if cost_embedding is None:
                raise ValueError(f"objective {objective!r} needs a cost embedding (emo.cost_embedding_from_model)")
            self.cost_embedding = CostEmbedding.wrap(cost_embedding)

    def current_cost_embedding(self) -> Optional[CostEmbedding]:
        """The cost embedding for this step: the fixed one, or for a ``live_head`` objective the current head, detached."""
        if not self.live_head:
            return self.cost_embedding
        if self.model is None:
            raise ValueError(f"{self.objective} reads the model's current LM head: pass model= to ObjectiveLoss")
        return CostEmbedding(_unwrap(self.model).get_output_embeddings().weight, validate=False)

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None, *, objective: Optional[str] = None):
        """Loss from model ``outputs.logits``: summed token losses / ``num_items_in_batch`` (or the mean if None).

        ``objective`` overrides the configured one for this call (the trainer passes ``"mle"`` in evaluation).
        """
        objective = objective or self.objective
        is_configured = objective == self.objective
        total = lm_loss(
            outputs["logits"],
            labels,
            objective=objective,
            cost_embedding=self.current_cost_embedding() if is_configured else None,
            ignore_index=self.ignore_index,
            reduction="sum",
            chunk_size=self.chunk_size,
            **(self.hparams if is_configured else {}),
        )
        return total / normalizer(labels, num_items_in_batch, self.ignore_index)

    def from_hidden(self, hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, num_items_in_batch=None):
        """Fused loss from the last hidden state and the LM head module (``impl="fused"``), normalised as ``__call__``."""
        if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
            raise ValueError(
                "impl='fused' does not support an adapter (LoRA) on the LM head; "
                "leave lm_head out of the adapter's target_modules or use impl='materialized'"
            )
        total = linear_lm_loss(
            hidden,
            head.weight,
            labels,
            objective=self.objective,
            lm_head_bias=head.bias,
            cost_embedding=self.current_cost_embedding(),
            ignore_index=self.ignore_index,
            reduction="sum",
            chunk_size=self.chunk_size,
            **self.hparams,
        )
        return total / normalizer(labels, num_items_in_batch, self.ignore_index)


def normalizer(labels: torch.Tensor, num_items_in_batch, ignore_index: int) -> torch.Tensor:
    """``num_items_in_batch`` if given, else this batch's count of shifted valid labels (at least 1)."""
    if num_items_in_batch is None:
        num_items_in_batch = (labels[:, 1:] != ignore_index).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(labels.device)
    return num_items_in_batch


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying ``PreTrainedModel`` of a (DDP/FSDP/PEFT-)wrapped model."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class ObjectiveTrainer(Trainer):
    """``transformers.Trainer`` that trains with ``objective_loss`` and evaluates with token cross-entropy.

    All other arguments go to ``Trainer``. ``eval_loss`` is therefore the true validation CE for every objective
    (``exp(eval_loss)`` is perplexity), suitable for ``metric_for_best_model="eval_loss"``.
    """

    def __init__(self, *args, objective_loss: ObjectiveLoss, **kwargs):
        if "compute_loss_func" in kwargs:
            raise ValueError("ObjectiveTrainer sets compute_loss_func from objective_loss; pass only objective_loss")
        model = kwargs.get("model", args[0] if args else None)
        if model is not None and getattr(_unwrap(model), "loss_type", None) is None:
            # Declare the causal shift (e.g. GPT2LMHeadModel has no loss_type) so that the Trainer counts
            # num_items_in_batch over labels[..., 1:], the positions our objectives actually predict.
            _unwrap(model).loss_type = "ForCausalLM"
        super().__init__(*args, compute_loss_func=self._loss_for_mode, **kwargs)
        self.objective_loss = objective_loss
        self._captured_hidden = None
        if objective_loss.model is None:
            objective_loss.model = self.model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """As ``Trainer.compute_loss``; with ``impl="fused"`` in training, the LM head runs inside the loss."""
        if self.objective_loss.impl != "fused" or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        captured = []
        body = _unwrap(model).base_model
        hook = body.register_forward_hook(lambda module, args, output: captured.append(output[0]))
        self._captured_hidden = captured
        try:
            no_positions = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
            return super().compute_loss(model, {**inputs, "logits_to_keep": no_positions}, return_outputs, num_items_in_batch)
        finally:
            hook.remove()
            self._captured_hidden = None

    def _loss_for_mode(self, outputs, labels, num_items_in_batch=None):
        if self._captured_hidden:
            head = _unwrap(self.model).get_output_embeddings()
            return self.objective_loss.from_hidden(self._captured_hidden[-1], head, labels, num_items_in_batch)
        objective = None if self.model.training else "mle"
        return self.objective_loss(outputs, labels, num_items_in_batch, objective=objective)
