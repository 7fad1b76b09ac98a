"""One training path for every track: Hugging Face ``Trainer`` with any objective, no monkey-patching.

``ObjectiveLoss`` is a ``compute_loss_func`` for ``transformers.Trainer``: it shifts labels, ignores padding
(``-100``), and divides the summed token losses by ``num_items_in_batch`` so that gradient accumulation gives the
same loss and gradients as one large batch. ``ObjectiveTrainer`` wires it in (adding the model inputs the loss asks
for, e.g. hidden states instead of logits for the fused path) and, during evaluation, reports plain token
cross-entropy as ``eval_loss`` so that checkpoints are selected by true perplexity for every objective, and
guards every optimizer step against divergence (``DivergenceGuard``: a non-finite loss or gradient norm stops the run,
or skips that update, per ``ObjectiveTrainingArguments.on_nonfinite``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from emo.cost import CostEmbedding
from emo.fused import linear_lm_loss
from emo.losses import lm_loss
from emo.registry import get_objective

IMPLEMENTATIONS = ("materialized", "fused")
NONFINITE_ACTIONS = ("stop", "skip")

logger = logging.getLogger(__name__)


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
        spec = get_objective(objective)
        self.cost_source = spec.cost_source
        self.impl = impl
        self.objective = objective
        self.hparams = spec.resolve_hparams(dict(hparams or {}))
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.transport_precision = transport_precision
        self.chunk_kernel = chunk_kernel
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
            transport_precision=self.transport_precision,
            chunk_kernel=self.chunk_kernel,
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


def _check_nonfinite_action(action: str) -> None:
    if action not in NONFINITE_ACTIONS:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {action!r}")


@dataclasses.dataclass
class ObjectiveTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the divergence guard's setting, read by ``ObjectiveTrainer``.

    ``on_nonfinite``: what an optimizer step whose loss or gradient norm is not finite does: ``"stop"`` raises a
    ``FloatingPointError`` naming the step before any weight changes; ``"skip"`` drops that update and counts it.
    ``logging_nan_inf_filter`` defaults to False here: the guard already watches every loss, on the device, while the
    Trainer's filter costs a host sync per micro-batch (and logs a non-finite loss as the running mean).
    """

    on_nonfinite: str = dataclasses.field(default="stop", metadata={"help": f"one of {NONFINITE_ACTIONS}"})
    logging_nan_inf_filter: bool = False

    def __post_init__(self):
        _check_nonfinite_action(self.on_nonfinite)
        super().__post_init__()


class DivergenceGuard(TrainerCallback, ExportableState):
    """Stops the run (``action="stop"``) or skips the update (``"skip"``) of an optimizer step whose loss or gradient
    norm is not finite.

    ``ObjectiveTrainer`` shows it every micro-batch's loss (``observe_loss``: a flag kept on the device) and the
    gradient norm the Trainer computed for clipping (``check_step``: one host sync per optimizer step; the flags are
    all-reduced, so every process decides alike). Under an fp16 loss scaler, non-finite gradients are the scaler's
    business (it skips those steps itself) and only the loss is checked. A skipped step leaves every weight and the
    optimizer state alone (its gradients are cleared) while the learning-rate schedule advances; ``skipped_steps``
    counts them and is saved with each checkpoint, so a resumed run keeps counting.
    """

    def __init__(self, action: str = "stop", skipped_steps: int = 0):
        _check_nonfinite_action(action)
        self.action = action
        self.skipped_steps = skipped_steps
        self._loss_nonfinite = None

    def observe_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Record (on the device) whether ``loss`` is finite; return it with a non-finite value replaced by 0, so the
        logged training loss stays finite when a step is skipped."""
        nonfinite = ~torch.isfinite(loss)
        self._loss_nonfinite = nonfinite if self._loss_nonfinite is None else self._loss_nonfinite | nonfinite
        return torch.where(nonfinite, torch.zeros_like(loss), loss)

    def check_step(self, grad_norm, *, step: int, device: torch.device, check_gradients: bool = True) -> bool:
        """True if optimizer step ``step`` may update the weights. Otherwise raises (``stop``) or counts the skip and
        returns False (``skip``)."""
        loss_nonfinite = self._loss_nonfinite if self._loss_nonfinite is not None else torch.tensor(False)
        self._loss_nonfinite = None
        check_gradients = check_gradients and grad_norm is not None
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor norm (already reduced over the processes)
            grad_norm = grad_norm.full_tensor()
        grad_nonfinite = ~torch.isfinite(torch.as_tensor(grad_norm)) if check_gradients else torch.tensor(False)
        flags = torch.stack([loss_nonfinite.to(device), grad_nonfinite.to(device)]).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        loss_bad, grad_bad = flags.tolist()
        if not (loss_bad or grad_bad):
            return True
        problems = [name for name, bad in (("loss", loss_bad), (f"gradient norm ({float(grad_norm)})", grad_bad)) if bad]
        what = f"{' and the '.join(problems)} {'are' if len(problems) > 1 else 'is'}"
        if self.action == "stop":
            raise FloatingPointError(
                f"training diverged at step {step}: the {what} not finite. The weights are those before step "
                f"{step}. Lower the learning rate (or check the data), or set on_nonfinite='skip' (run.py: "
                "trainer.on_nonfinite=skip) to skip such steps."
            )
        self.skipped_steps += 1
        logger.warning("step %d: the %s not finite; update skipped (%d so far)", step, what, self.skipped_steps)
        return False

    def on_train_begin(self, args, state, control, **kwargs):
        """Take ``skipped_steps`` back from the checkpoint a run resumes from (it is in ``state.stateful_callbacks``)."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):
            self.skipped_steps = saved["attributes"]["skipped_steps"]
        self._loss_nonfinite = None

    def state(self) -> dict:
        """What a checkpoint keeps of the guard (``ExportableState``)."""
        return {"args": {"action": self.action}, "attributes": {"skipped_steps": self.skipped_steps}}


class ObjectiveTrainer(Trainer):
    """``transformers.Trainer`` that trains with ``objective_loss``, evaluates with token cross-entropy and guards each
    optimizer step against divergence.

    All other arguments go to ``Trainer``. ``eval_loss`` is therefore the true validation CE for every objective
    (``exp(eval_loss)`` is perplexity), suitable for ``metric_for_best_model="eval_loss"``. A ``DivergenceGuard``
    acts on ``args.on_nonfinite`` (``ObjectiveTrainingArguments``; ``"stop"`` with plain ``TrainingArguments``).
    """

    def __init__(self, *args, objective_loss: ObjectiveLoss, **kwargs):
        if not hasattr(Trainer, "_get_grad_norm"):
            raise ImportError("this transformers' Trainer has no _get_grad_norm, the hook of ObjectiveTrainer's "
                              "divergence guard (transformers 5.24 has it)")
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
        self.add_callback(DivergenceGuard(getattr(self.args, "on_nonfinite", "stop")))
        if self.is_fsdp_enabled:
            logger.info("FSDP%d on %d process(es), mixed precision %s", self.accelerator.state.fsdp_plugin.fsdp_version,
                        self.accelerator.num_processes, self.accelerator.mixed_precision)

    @property
    def divergence_guard(self) -> DivergenceGuard:
        """This trainer's ``DivergenceGuard`` (``skipped_steps``: updates skipped for a non-finite loss or gradient)."""
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, DivergenceGuard))

    def training_step(self, model, inputs, num_items_in_batch=None):
        """``Trainer.training_step``, its loss shown to the divergence guard (on the device: no host sync)."""
        return self.divergence_guard.observe_loss(super().training_step(model, inputs, num_items_in_batch))

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm of this optimizer step (computed for clipping), checked by the divergence guard
        before the optimizer step; a skipped step's gradients are cleared, so the optimizer changes nothing."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if not self.divergence_guard.check_step(grad_norm, step=self.state.global_step + 1, device=self.args.device,
                                                check_gradients=self.accelerator.scaler is None):
            model.zero_grad(set_to_none=True)
        return grad_norm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``Trainer.compute_loss`` with the extra model inputs the objective asks for (``forward_kwargs``)."""
        device = next(value.device for value in inputs.values() if torch.is_tensor(value))
        extra = self.objective_loss.forward_kwargs(model.training, device=device)
        return super().compute_loss(model, {**inputs, **extra}, return_outputs, num_items_in_batch)

    def _loss_for_mode(self, outputs, labels, num_items_in_batch=None):
        objective = None if self.model.training else "mle"
        return self.objective_loss(outputs, labels, num_items_in_batch, objective=objective)

    def _save_rng_state(self, output_dir: str) -> None:
        """``Trainer._save_rng_state``, then a barrier: every process's files of the checkpoint are on disk before the
        main process writes its ``trainer_state.json``, the file that completes it (``last_checkpoint``)."""
        super()._save_rng_state(output_dir)
        self.accelerator.wait_for_everyone()


def last_checkpoint(folder: Union[str, os.PathLike]) -> Optional[str]:
    """The newest complete ``checkpoint-<step>`` directory in ``folder``, or None.

    ``transformers.trainer_utils.get_last_checkpoint`` returns the highest-numbered directory whatever its state, so a
    save killed half-way would be resumed from. The Trainer writes a checkpoint's ``trainer_state.json`` last, and only
    then removes older checkpoints (``ObjectiveTrainer``: after every process wrote its files): a checkpoint counts
    once that file reads back, and a killed save never becomes the last checkpoint.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    steps = {}
    for path in Path(folder).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if Path(folder).is_dir() else ():
        step = path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if step.isdigit() and path.is_dir():
            steps[int(step)] = path
    for step in sorted(steps, reverse=True):
        try:
            json.loads((steps[step] / "trainer_state.json").read_text())
        except (OSError, ValueError):
            logger.warning("ignoring incomplete checkpoint %s (a save that did not finish)", steps[step])
            continue
        return str(steps[step])
    return None
