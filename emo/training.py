"""One training path for every track: Hugging Face ``Trainer`` with any objective, no monkey-patching.

``ObjectiveLoss`` is a ``compute_loss_func`` for ``transformers.Trainer``: it shifts labels, ignores padding
(``-100``), and divides the summed token losses by ``num_items_in_batch`` so that gradient accumulation gives the
same loss and gradients as one large batch. ``ObjectiveTrainer`` wires it in (adding the model inputs the loss asks
for, e.g. hidden states instead of logits for the fused path) and, during evaluation, reports plain token
cross-entropy as ``eval_loss`` so that checkpoints are selected by true perplexity for every objective.
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

    ``cost_embedding``: a ``CostEmbedding`` or ``(V, width)`` tensor for objectives whose registry ``cost_source`` is
    ``fixed`` (build it with ``emo.cost_embedding_from_model``); ``live_head`` objectives read the current LM head of
    ``model`` at every call, detached. ``hparams`` are the objective's hyper-parameters.

    ``impl="fused"`` computes the training loss with ``emo.linear_lm_loss`` (no ``N x V`` logits). The contract with
    the caller is explicit: ``forward_kwargs(training=True, device=...)`` are extra model inputs that stop the LM head
    at zero positions and return the hidden states; given such outputs (no logits for the labels), ``__call__`` takes
    ``outputs.hidden_states[-1]`` (the final, normed hidden state) through ``model``'s output embedding inside the loss.
    Evaluation and generation run the model as usual.
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
        self.cost_source = spec.cost_source
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

    def forward_kwargs(self, training: bool, device: Union[str, torch.device]) -> dict:
        """Extra model inputs this loss needs: for ``impl="fused"`` in training, no logits (``logits_to_keep`` selects
        zero positions) and the last hidden state (``output_hidden_states=-1``); otherwise none."""
        if self.impl != "fused" or not training:
            return {}
        return {"logits_to_keep": torch.empty(0, dtype=torch.long, device=device), "output_hidden_states": -1}

    def current_cost_embedding(self) -> Optional[CostEmbedding]:
        """The cost embedding for this step: the fixed one, or for a ``live_head`` objective the current head, detached."""
        if self.cost_source != "live_head":
            return self.cost_embedding
        return CostEmbedding(self._output_embedding().weight, validate=False)

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None, *, objective: Optional[str] = None):
        """Summed token losses / ``num_items_in_batch`` (or the mean over valid tokens if None).

        Uses ``outputs.logits`` when they cover ``labels``; otherwise (the model ran with ``forward_kwargs``) the fused
        loss from ``outputs.hidden_states[-1]`` and the model's output embedding. ``objective`` overrides the configured
        one for this call (``"mle"`` gives plain token cross-entropy, without hyper-parameters or cost embedding).
        """
        objective = objective or self.objective
        is_configured = objective == self.objective
        options = dict(
            objective=objective,
            cost_embedding=self.current_cost_embedding() if is_configured else None,
            ignore_index=self.ignore_index,
            reduction="sum",
            chunk_size=self.chunk_size,
            **(self.hparams if is_configured else {}),
        )
        logits = outputs["logits"] if "logits" in outputs else None
        if logits is not None and logits.shape[:2] == labels.shape:
            total = lm_loss(logits, labels, **options)
        else:
            hidden = _last_hidden_state(outputs, labels)
            head = self._output_embedding()
            if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
                raise ValueError(
                    "impl='fused' does not support an adapter (LoRA) on the LM head; "
                    "leave lm_head out of the adapter's target_modules or use impl='materialized'"
                )
            total = linear_lm_loss(hidden, head.weight, labels, lm_head_bias=head.bias, **options)
        return total / normalizer(labels, num_items_in_batch, self.ignore_index)

    def _output_embedding(self) -> torch.nn.Module:
        if self.model is None:
            raise ValueError(
                f"objective {self.objective!r} (cost_source={self.cost_source}, impl={self.impl}) reads the model's LM "
                "head: pass model= to ObjectiveLoss"
            )
        head = _unwrap(self.model).get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            raise ValueError(f"{type(_unwrap(self.model)).__name__} has no output embedding (LM head) to read")
        return head


def _last_hidden_state(outputs, labels: torch.Tensor) -> torch.Tensor:
    hidden_states = outputs["hidden_states"] if "hidden_states" in outputs else None
    if not hidden_states or hidden_states[-1] is None or hidden_states[-1].shape[:2] != labels.shape:
        raise ValueError(
            "the model outputs have neither logits nor a last hidden state for every label position: run the model "
            "with ObjectiveLoss.forward_kwargs(...) (ObjectiveTrainer does) or return full logits"
        )
    return hidden_states[-1]


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
        if objective_loss.model is None:
            objective_loss.model = self.model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``Trainer.compute_loss`` with the extra model inputs the objective asks for (``forward_kwargs``)."""
        device = next(value.device for value in inputs.values() if torch.is_tensor(value))
        extra = self.objective_loss.forward_kwargs(model.training, device=device)
        return super().compute_loss(model, {**inputs, **extra}, return_outputs, num_items_in_batch)

    def _loss_for_mode(self, outputs, labels, num_items_in_batch=None):
        objective = None if self.model.training else "mle"
        return self.objective_loss(outputs, labels, num_items_in_batch, objective=objective)
