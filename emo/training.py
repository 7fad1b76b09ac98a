"""One training path for every track: Hugging Face ``Trainer`` with any objective, no monkey-patching.

``ObjectiveTrainer`` trains with an ``ObjectiveLoss`` (``emo.integrations``; re-exported here): it declares the
model's causal shift so gradient accumulation is exact, adds the model inputs the loss asks for (hidden states instead
of logits for the fused path), reports plain token cross-entropy as ``eval_loss`` during evaluation so that
checkpoints are selected by true perplexity for every objective, and guards every optimizer step against divergence
(``DivergenceGuard``: a non-finite loss or gradient norm stops the run, or skips that update, per
``ObjectiveTrainingArguments.on_nonfinite``). Needs transformers (``pip install emo-suite[trainer]``).
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

from emo.integrations import ObjectiveLoss, declare_causal_shift

NONFINITE_ACTIONS = ("stop", "skip")

logger = logging.getLogger(__name__)


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
                              "divergence guard: install emo-suite[transformers] (transformers>=5.10.1)")
        if "compute_loss_func" in kwargs:
            raise ValueError("ObjectiveTrainer sets compute_loss_func from objective_loss; pass only objective_loss")
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:
            # E.g. GPT2LMHeadModel has no loss_type: declared, the Trainer counts num_items_in_batch over
            # labels[..., 1:], the positions the objectives actually predict.
            declare_causal_shift(model)
        super().__init__(*args, compute_loss_func=self._loss_for_mode, **kwargs)
        self.objective_loss = objective_loss
        if objective_loss.model is None:
            objective_loss.bind(self.model)
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
        if self.model.training:
            return self.objective_loss(outputs, labels, num_items_in_batch)
        return self.objective_loss.cross_entropy(outputs, labels, num_items_in_batch)

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
