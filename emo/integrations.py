"""Objectives inside other people's training code: Hugging Face ``Trainer``, the model's own loss, TRL's ``SFTTrainer``.

``ObjectiveLoss`` is one configured objective with three ways in, each exact for gradient accumulation (the summed
token losses are divided by the Trainer's ``num_items_in_batch``, the count of the whole accumulated batch):

* ``Trainer(compute_loss_func=ObjectiveLoss(..., model=model))``: transformers' loss hook of the Trainer;
* ``ObjectiveLoss(...).attach_to_model(model)``: afterwards ``model(**batch, labels=labels).loss`` is the objective
  (the model's per-instance ``loss_function``), for any trainer or loop that reads ``outputs.loss``;
* ``ObjectiveLoss(...).attach_to_sft_trainer(trainer)``: TRL's ``SFTTrainer`` computes the objective in its own fused
  LM-head forward, one forward per step, with TRL's metrics.

Causal-LM objectives predict ``labels[..., 1:]``, so the count must be taken over those shifted labels; transformers
does so only for models whose ``loss_type`` maps to ``ForCausalLMLoss`` (GPT-2's is ``None``: it would count one
token too many per row and shrink every loss and gradient). ``ObjectiveLoss(model=...)`` and both ``attach_*`` calls
declare that shift on the model (``loss_type = "ForCausalLM"``), so build the Trainer after them; an
``ObjectiveLoss`` that receives ``num_items_in_batch`` without knowing its model refuses it instead of guessing.
This module needs only torch; transformers and TRL are used when present.
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Optional, Union

import torch

from emo.cost import CostEmbedding
from emo.fused import linear_lm_loss
from emo.losses import lm_loss
from emo.modules import ObjectiveSpec, unwrap_model

IMPLEMENTATIONS = ("materialized", "fused")
CAUSAL_LOSS_TYPE = "ForCausalLM"


def declares_causal_shift(model: torch.nn.Module) -> bool:
    """True if transformers' Trainer counts ``num_items_in_batch`` over ``labels[..., 1:]`` for ``model``: its
    ``loss_type`` maps to ``ForCausalLMLoss`` (transformers >= 5's rule; older versions count what the model says)."""
    loss_type = getattr(unwrap_model(model), "loss_type", None)
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:
        return loss_type == CAUSAL_LOSS_TYPE
    return LOSS_MAPPING.get(loss_type) is ForCausalLMLoss


def declare_causal_shift(model: torch.nn.Module) -> None:
    """Set ``loss_type = "ForCausalLM"`` on ``model`` (unwrapped) unless its loss type already implies the causal
    shift, so that a ``transformers.Trainer`` built afterwards counts the shifted labels the objectives predict."""
    if not declares_causal_shift(model):
        unwrap_model(model).loss_type = CAUSAL_LOSS_TYPE


class ObjectiveLoss:
    """Causal-LM loss for one objective: ``Trainer(compute_loss_func=ObjectiveLoss(...))``, or attached to a model or
    a TRL ``SFTTrainer`` (see the module docstring).

    ``objective`` is a registry name (``emo.OBJECTIVES``; the same names as ``conf/objective``), ``hparams`` override
    its hyper-parameters. ``cost_embedding``: a ``CostEmbedding`` or ``(V, width)`` tensor for objectives whose
    ``cost_source`` is ``fixed`` (build it with ``emo.cost_embedding_from_model``); ``live_head`` objectives read the
    current LM head of ``model`` at every call, detached. Pass ``model`` when a Trainer will call this loss (before
    building the Trainer): see the module docstring.

    ``impl="fused"`` computes the training loss with ``emo.linear_lm_loss`` (no ``N x V`` logits). It needs a caller
    that runs the model without its LM head: ``emo.training.ObjectiveTrainer`` (through ``forward_kwargs``) or
    ``attach_to_sft_trainer``. Given full logits it raises instead of silently materialising them.

    ``transport_precision`` (``fp32``, ``tf32``, ``bf16``) and ``chunk_kernel`` (``torch``, ``triton``) are passed to
    the loss functions (``emo.lm_loss``): the precision of the transport product and who runs the per-chunk work.
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
        transport_precision: str = "fp32",
        chunk_kernel: str = "torch",
    ):
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        self.spec = ObjectiveSpec(objective, hparams, cost_embedding)
        self.impl = impl
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.transport_precision = transport_precision
        self.chunk_kernel = chunk_kernel
        self.model = None
        if model is not None:
            self.bind(model)

    @property
    def objective(self) -> str:
        return self.spec.objective

    @property
    def hparams(self) -> dict:
        return self.spec.hparams

    @property
    def cost_source(self) -> str:
        return self.spec.cost_source

    @property
    def cost_embedding(self) -> Optional[CostEmbedding]:
        """The fixed cost embedding (None for other cost sources)."""
        return self.spec.cost_embedding

    @property
    def model(self) -> Optional[torch.nn.Module]:
        return self.spec.model

    @model.setter
    def model(self, model: Optional[torch.nn.Module]) -> None:
        self.spec.model = model

    def bind(self, model: torch.nn.Module) -> None:
        """Use ``model``'s LM head (fused path, ``live_head`` objectives) and declare its causal shift."""
        declare_causal_shift(model)
        self.model = model

    def forward_kwargs(self, training: bool, device: Union[str, torch.device]) -> dict:
        """Extra model inputs this loss needs: for ``impl="fused"`` in training, no logits (``logits_to_keep`` selects
        zero positions) and the last hidden state (``output_hidden_states=-1``); otherwise none."""
        if self.impl != "fused" or not training:
            return {}
        return {"logits_to_keep": torch.empty(0, dtype=torch.long, device=device), "output_hidden_states": -1}

    def current_cost_embedding(self) -> Optional[CostEmbedding]:
        """The cost embedding for this step: the fixed one, or for a ``live_head`` objective the current head, detached."""
        return self.spec.step_cost()

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """Summed token losses / ``num_items_in_batch`` (the mean over this batch's valid tokens if None).

        Uses ``outputs.logits`` when they cover ``labels`` (``impl="materialized"``); otherwise, for ``impl="fused"``
        (the model ran with ``forward_kwargs``), ``outputs.hidden_states[-1]`` and the model's output embedding.
        """
        logits = _full_logits(outputs, labels)
        if logits is not None and self.impl == "fused":
            raise ValueError(
                "ObjectiveLoss(impl='fused') was given the model's full logits, so nothing would be fused: the caller "
                "ran the model with its LM head. Use emo.training.ObjectiveTrainer, attach_to_sft_trainer for TRL, or "
                "emo.linear_lm_loss on the hidden states in your own loop; or impl='materialized'"
            )
        options = self._loss_options(self.current_cost_embedding())
        if logits is not None:
            total = lm_loss(logits, labels, **options)
        else:
            head = self._fusable_head()
            total = linear_lm_loss(_last_hidden_state(outputs, labels), head.weight, labels, lm_head_bias=head.bias,
                                   **options)
        return total / self._normalizer(labels, num_items_in_batch)

    def cross_entropy(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """Token cross-entropy of ``outputs.logits`` (e.g. evaluation: perplexity for every objective), normalised
        like ``__call__``."""
        logits = _full_logits(outputs, labels)
        if logits is None:
            raise ValueError("cross_entropy needs the model's full logits (run the model without forward_kwargs)")
        total = lm_loss(logits, labels, objective="mle", ignore_index=self.ignore_index, reduction="sum",
                        chunk_size=self.chunk_size)
        return total / self._normalizer(labels, num_items_in_batch)

    def attach_to_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Make this objective ``model``'s own loss: afterwards ``model(**batch, labels=labels).loss`` is the
        objective, normalised by the ``num_items_in_batch`` the caller passes (transformers' Trainer does, for models
        that take loss kwargs) or averaged over the batch's valid tokens. Works through PEFT/DDP wrappers (the
        underlying model's ``loss_function`` is replaced, per instance); call it before building a Trainer.
        TRL's ``SFTTrainer`` bypasses the model's loss (its own fused LM head): use ``attach_to_sft_trainer``."""
        if self.impl == "fused":
            raise ValueError(
                "the model's loss hook receives full logits (the model has already applied its LM head), so "
                "impl='fused' cannot apply there: use impl='materialized', or ObjectiveTrainer / attach_to_sft_trainer"
            )
        self.bind(model)
        unwrap_model(model).loss_function = self._model_loss_function
        return model

    def attach_to_sft_trainer(self, trainer):
        """Train TRL ``SFTTrainer`` ``trainer`` with this objective, in the fused LM-head forward TRL already uses:
        one forward per step, the objective's per-token values (``-log_probs`` of TRL's fused output, which TRL sums
        over the completion tokens and divides by ``num_items_in_batch``), and TRL's ``entropy`` and
        ``mean_token_accuracy`` metrics from the same pass. Completion-only loss, padding-free batches and packing
        work as TRL prepares them. Needs ``SFTConfig(loss_type="nll")``, no ``compute_loss_func`` and no label
        smoothing; ``impl`` does not matter (this path is always fused). Returns ``trainer``."""
        args = trainer.args
        if getattr(args, "loss_type", "nll") != "nll" or getattr(trainer, "compute_loss_func", None) is not None:
            raise ValueError("attach_to_sft_trainer needs SFTConfig(loss_type='nll') and no compute_loss_func: the "
                             "objective replaces TRL's per-token NLL")
        if getattr(trainer, "label_smoother", None) is not None:
            raise ValueError("attach_to_sft_trainer does not combine with label smoothing (label_smoothing_factor)")
        base = unwrap_model(trainer.model)
        trl_forward = base.forward
        if "fused_lm_head" not in inspect.signature(trl_forward, follow_wrapped=False).parameters:
            raise ValueError(
                "this model's forward has no fused_lm_head argument: attach_to_sft_trainer expects TRL >= 1.16's "
                "SFTTrainer, which patches it in its constructor (call this after building the trainer)"
            )
        _check_plain_logits(base)
        self.bind(trainer.model)
        if hasattr(trainer, "_loss_shifts_labels"):  # fixed when the Trainer was built; count labels[..., 1:] from now on
            trainer._loss_shifts_labels = True
        loss = self

        @functools.wraps(type(base).forward)  # generate() validates its kwargs against the model's own signature
        def forward(model, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                    **kwargs):
            if not fused_lm_head:
                return trl_forward(*args, labels=labels, shift_labels=shift_labels,
                                   num_items_in_batch=num_items_in_batch, **kwargs)
            return loss._fused_sft_outputs(model, args, kwargs, labels, shift_labels, num_items_in_batch)

        base.forward = types.MethodType(forward, base)
        return trainer

    def _fused_sft_outputs(self, model, args, kwargs, labels, shift_labels, num_items_in_batch):
        """TRL's ``FusedCausalLMOutput`` with this objective: ``-log_probs`` are its per-token values."""
        from trl.trainer.utils import FusedCausalLMOutput

        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **kwargs).last_hidden_state
        targets, shift = (labels, True) if shift_labels is None else (shift_labels, False)
        head = self._fusable_head()
        out = linear_lm_loss(
            hidden.to(head.weight.device), head.weight, targets.to(head.weight.device), lm_head_bias=head.bias,
            reduction="none", shift=shift, return_token_stats=True,
            **self._loss_options(self.current_cost_embedding(), reduction=None),
        )
        label_mask = (targets[:, 1:] if shift else targets).to(head.weight.device) != self.ignore_index
        count = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=out.values.sum() / count, log_probs=-out.values, entropy=out.entropy,
                                   is_top1=out.is_top1, label_mask=label_mask)

    def _model_loss_function(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=None,
                             shift_labels=None, **kwargs):
        """transformers' ``loss_function`` signature (extra kwargs, e.g. attention metadata, are ignored)."""
        if ignore_index is not None and ignore_index != self.ignore_index:
            raise ValueError(f"the model asked for ignore_index={ignore_index}, this ObjectiveLoss uses "
                             f"{self.ignore_index}")
        targets, shift = (labels, True) if shift_labels is None else (shift_labels, False)
        total = lm_loss(logits, targets.to(logits.device), shift=shift, **self._loss_options(self.current_cost_embedding()))
        if num_items_in_batch is None:
            return total / _valid_count(targets, self.ignore_index, shift).clamp(min=1)
        return total / _clamped(num_items_in_batch, total.device)

    def _loss_options(self, cost, reduction: Optional[str] = "sum") -> dict:
        options = dict(objective=self.objective, cost_embedding=cost, ignore_index=self.ignore_index,
                       chunk_size=self.chunk_size, transport_precision=self.transport_precision,
                       chunk_kernel=self.chunk_kernel, **self.hparams)
        if reduction is not None:
            options["reduction"] = reduction
        return options

    def _fusable_head(self) -> torch.nn.Module:
        head = self.spec.output_embedding()
        if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
            raise ValueError(
                "the fused loss does not support an adapter (LoRA) on the LM head; leave lm_head out of the adapter's "
                "target_modules or use impl='materialized'"
            )
        if type(head.weight).__name__ == "DTensor":
            raise ValueError("the fused loss reads the LM head's full weight, which FSDP shards: use impl='materialized'")
        return head

    def _normalizer(self, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """``num_items_in_batch`` (at least 1) if given and known to count shifted labels, else this batch's count."""
        if num_items_in_batch is None:
            return _valid_count(labels, self.ignore_index, shift=True).clamp(min=1)
        if self.model is None or not declares_causal_shift(self.model):
            raise ValueError(
                "ObjectiveLoss got num_items_in_batch (the Trainer's token count for gradient accumulation) but cannot "
                "tell whether it counts the shifted labels labels[..., 1:] that the objective predicts. Build it with "
                "model=<your model> before the Trainer: that declares the model's causal shift (loss_type="
                "'ForCausalLM'), so the Trainer counts them (for GPT-2 it would otherwise count one token too many "
                "per row and shrink every loss and gradient)"
            )
        return _clamped(num_items_in_batch, labels.device)


def _clamped(count, device) -> torch.Tensor:
    """A token count as a tensor on ``device``, at least 1 (0 valid tokens give a zero loss, not 0/0)."""
    return torch.as_tensor(count, device=device).clamp(min=1)


def _valid_count(labels: torch.Tensor, ignore_index: int, shift: bool) -> torch.Tensor:
    return ((labels[:, 1:] if shift else labels) != ignore_index).sum()


def _full_logits(outputs, labels: torch.Tensor) -> Optional[torch.Tensor]:
    logits = outputs["logits"] if "logits" in outputs else None
    return logits if logits is not None and logits.shape[:2] == labels.shape else None


def _last_hidden_state(outputs, labels: torch.Tensor) -> torch.Tensor:
    hidden_states = outputs["hidden_states"] if "hidden_states" in outputs else None
    if not hidden_states or hidden_states[-1] is None or hidden_states[-1].shape[:2] != labels.shape:
        raise ValueError(
            "the model outputs have neither logits nor a last hidden state for every label position: run the model "
            "with ObjectiveLoss.forward_kwargs(...) (ObjectiveTrainer does) or return full logits"
        )
    return hidden_states[-1]


def _check_plain_logits(model: torch.nn.Module) -> None:
    """Refuse models whose logits are not ``hidden @ W.T + b`` (soft-capped or scaled), which the fused loss assumes."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier"):
        if getattr(text_config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__} transforms its logits ({name}={getattr(text_config, name)}), "
                             "which the fused objective does not: use compute_loss_func with impl='materialized'")
    if getattr(text_config, "output_router_logits", False):
        raise ValueError(f"{type(model).__name__} adds a router (MoE) loss, which attach_to_sft_trainer does not")
