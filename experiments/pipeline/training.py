"""Training setup shared by every track: precision, `TrainingArguments`, the objective's loss, and the trainer.

A recipe composes them; everything comes from the config (`conf/trainer/*.yaml`, `conf/objective/*.yaml`,
`conf/model/*.yaml`), so tracks differ only in data and in what they do after training.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from emo import get_objective
from emo.training import ObjectiveLoss, ObjectiveTrainer, ObjectiveTrainingArguments, last_checkpoint
from experiments.pipeline.distributed import check_ranks_agree, world_size
from experiments.pipeline.models import build_cost_embedding

log = logging.getLogger(__name__)


def precision_flags(mode: str) -> dict:
    """`bf16`/`fp16` TrainingArguments flags: `auto` picks bf16, else fp16, on CUDA and fp32 on CPU."""
    if mode == "auto":
        if not torch.cuda.is_available():
            mode = "no"
        else:
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode not in ("bf16", "fp16", "no"):
        raise ValueError(f"trainer.mixed_precision must be auto, bf16, fp16 or no; got {mode!r}")
    if mode != "no" and not torch.cuda.is_available():
        raise ValueError(f"trainer.mixed_precision={mode} needs a CUDA GPU; use auto or no on CPU.")
    return {"bf16": mode == "bf16", "fp16": mode == "fp16"}


def fsdp_options(options: dict) -> dict:
    """TrainingArguments' `fsdp`/`fsdp_config` from `trainer.fsdp` (a switch) and `trainer.fsdp_config` (FSDP2 options:
    null values are left to transformers, e.g. the layer class to wrap defaults to the model's `_no_split_modules`, its
    decoder layer); refuse FSDP without GPUs.

    accelerate silently trains with DDP when FSDP is asked for on CPU, so that request is an error here.
    """
    enabled = options.pop("fsdp", False)
    config = {key: value for key, value in (options.pop("fsdp_config", None) or {}).items() if value is not None}
    if not isinstance(enabled, bool):
        raise ValueError(f"trainer.fsdp is true or false, got {enabled!r}: sharding options go in trainer.fsdp_config "
                         "(FSDP2: reshard_after_forward, activation_checkpointing, transformer_layer_cls_to_wrap)")
    if not enabled:
        return {}
    if not torch.cuda.is_available():
        raise ValueError("trainer.fsdp=true needs CUDA GPUs (accelerate would silently fall back to DDP on CPU); "
                         "set trainer.fsdp=false to train without FSDP.")
    return {"fsdp": True, "fsdp_config": config}


def accumulation_for_global_batch(global_batch_size: int | None, per_device: int, default: int) -> int:
    """Gradient-accumulation steps that keep `global_batch_size` on the current number of processes."""
    if not global_batch_size:
        return default
    processes = world_size()
    steps, remainder = divmod(global_batch_size, per_device * processes)
    if remainder or steps < 1:
        raise ValueError(f"trainer.global_batch_size={global_batch_size} is not a multiple of "
                         f"per_device_train_batch_size={per_device} x {processes} process(es)")
    return steps


def training_arguments(trainer_cfg: DictConfig, *, output_dir: Path, report_to: list[str], seed: int,
                       run_name: str) -> ObjectiveTrainingArguments:
    """`ObjectiveTrainingArguments` (TrainingArguments + the divergence guard's `on_nonfinite`) from a
    `conf/trainer/*.yaml` node.

    Every key is one of their fields except `mixed_precision` (auto/bf16/fp16/no) and `global_batch_size` (kept across
    GPU counts via gradient accumulation); `fsdp` is a switch whose options are `fsdp_config` (`fsdp_options`).
    Starts torch.distributed in a multi-process launch (on CPU with `use_cpu`, so the processes train as one DDP run
    over gloo), checks that every rank has the same `output_dir` and `run_name` (`distributed.check_ranks_agree`) and
    logs the effective (global) batch.
    """
    options = OmegaConf.to_container(trainer_cfg, resolve=True)
    sharding = fsdp_options(options)
    precision = precision_flags(options.pop("mixed_precision"))
    options["gradient_accumulation_steps"] = accumulation_for_global_batch(
        options.pop("global_batch_size", None), options["per_device_train_batch_size"],
        options.get("gradient_accumulation_steps", 1))
    if world_size() > 1 and not torch.cuda.is_available():
        options.setdefault("use_cpu", True)  # else transformers trains each CPU process alone instead of DDP on gloo
    check_training_argument_names(options)
    args = ObjectiveTrainingArguments(output_dir=str(output_dir), report_to=report_to or "none", seed=seed,
                                      run_name=run_name, **options, **precision, **sharding)
    if args.world_size != world_size():
        raise RuntimeError(f"{world_size()} processes were launched but the Trainer would train on {args.world_size}: "
                           "each process would train alone and write the same run. On CPU keep trainer.use_cpu "
                           "unset (or true) in a multi-process launch.")
    check_ranks_agree(output_dir=str(Path(output_dir).resolve()), run_id=run_name)
    log.info("global batch %d = %d per device x %d process(es) x %d accumulation steps",
             args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
             args.per_device_train_batch_size, args.world_size, args.gradient_accumulation_steps)
    return args


def check_training_argument_names(options: dict) -> None:
    """Raise a ValueError naming every trainer config key that ObjectiveTrainingArguments (this transformers'
    TrainingArguments + `on_nonfinite`) lacks."""
    known = {f.name for f in dataclasses.fields(ObjectiveTrainingArguments)}
    unknown = sorted(set(options) - known)
    if unknown:
        hint = (" transformers 5 removed warmup_ratio: use warmup_steps: 0.03 (a float < 1 is a fraction of the "
                "training steps)." if "warmup_ratio" in unknown else "")
        raise ValueError(f"trainer config keys {unknown} are not TrainingArguments fields in transformers "
                         f"{transformers.__version__}.{hint}")


def objective_loss(objective_cfg: DictConfig, model: torch.nn.Module, *, cost_source: str | None,
                   device: torch.device, fsdp: bool = False, cost_revision: str | None = None) -> ObjectiveLoss:
    """`ObjectiveLoss` for a `conf/objective/*.yaml` node.

    The registry says where the objective's cost embedding comes from: `none`; `fixed` (built here from
    `cost_source`: null = a frozen copy of `model`'s current LM head, else a file or model path/Hub id (at
    `cost_revision`), moved to `device`); `live_head` (read from `model` at every step by the loss itself). Under FSDP
    (`fsdp=True`) the LM head weight is sharded outside the model's forward, so the fused path and live-head
    objectives are refused.
    """
    spec = get_objective(objective_cfg.name)
    if fsdp and (objective_cfg.impl == "fused" or spec.cost_source == "live_head"):
        raise ValueError(f"objective {objective_cfg.label!r} (impl={objective_cfg.impl}, cost from "
                         f"{spec.cost_source}) reads the LM head weight outside the model's forward, where FSDP keeps "
                         "it sharded: use objective.impl=materialized and a fixed cost embedding with FSDP.")
    cost = None
    if spec.cost_source == "fixed":
        vocab_size = model.get_output_embeddings().weight.shape[0]
        cost = build_cost_embedding(cost_source, model, vocab_size, cost_revision).to(device)
    return ObjectiveLoss(objective_cfg.name, hparams=OmegaConf.to_container(objective_cfg.hparams, resolve=True),
                         cost_embedding=cost, model=model, impl=objective_cfg.impl,
                         transport_precision=objective_cfg.transport_precision, chunk_kernel=objective_cfg.chunk_kernel)


def build_trainer(cfg: DictConfig, model: torch.nn.Module, *, train_dataset, eval_dataset=None, data_collator=None,
                  args: ObjectiveTrainingArguments | None = None, output_dir: Path | None = None,
                  run_name: str | None = None, report_to: list[str] | None = None) -> ObjectiveTrainer:
    """An `ObjectiveTrainer` for `cfg.trainer`, `cfg.objective` and `cfg.model.cost_embedding`, seeded by `cfg.seed`.

    `args`: the `training_arguments` built already (e.g. to prepare data under `args.main_process_first()`);
    otherwise they are built here for `output_dir`, `run_name` and `report_to`.
    """
    args = args or training_arguments(cfg.trainer, output_dir=output_dir, report_to=report_to or [], seed=cfg.seed,
                                      run_name=run_name)
    loss = objective_loss(cfg.objective, model, cost_source=cfg.model.cost_embedding,
                          cost_revision=cfg.model.get("cost_embedding_revision"), device=args.device,
                          fsdp=bool(args.fsdp))
    return ObjectiveTrainer(model=model, args=args, objective_loss=loss, train_dataset=train_dataset,
                            eval_dataset=eval_dataset,
                            data_collator=data_collator or transformers.default_data_collator)


def resume_checkpoint(output_dir: Path) -> str | None:
    """The newest complete `checkpoint-*` directory under `output_dir` (`emo.training.last_checkpoint`: a save killed
    half-way is skipped), logged as the checkpoint a killed run resumes from; None for a fresh start."""
    checkpoint = last_checkpoint(output_dir)
    if checkpoint:
        log.info("Resuming training from checkpoint %s", checkpoint)
    return checkpoint


def train_unless_zero_steps(trainer: transformers.Trainer, resume_from: str | None = None):
    """`trainer.train(resume_from_checkpoint=resume_from)`, except with `max_steps=0`: no training at all (the
    initial model, e.g. a pre-trained start, is evaluated as it is; the Trainer itself reads 0 as "use the epochs").
    Returns the `TrainOutput` (global step 0 and no training loss when nothing was trained)."""
    from transformers.trainer_utils import TrainOutput

    if trainer.args.max_steps == 0:
        return TrainOutput(global_step=0, training_loss=None, metrics={})
    return trainer.train(resume_from_checkpoint=resume_from)


class LogAtCheckpoints(transformers.TrainerCallback):
    """Logs the training loss also at each checkpoint and at the last step (the Trainer logs every `logging_steps`
    only), so that a checkpoint's log history accounts for every step before it, and the run's for every step."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True


def train_run(trainer: ObjectiveTrainer, checkpoints: Path) -> dict:
    """Train, resuming from the newest complete checkpoint in `checkpoints` (`resume_checkpoint`), and return the
    run's `train` record: `global_step`, `train_loss` (`mean_training_loss` over every step, so a resumed run reports
    what an uninterrupted one does; the Trainer's own covers only the steps since the resume),
    `skipped_nonfinite_steps` (the divergence guard's count) and `resumed_from` (the checkpoint, or None)."""
    trainer.add_callback(LogAtCheckpoints())
    resumed_from = resume_checkpoint(checkpoints)
    output = train_unless_zero_steps(trainer, resumed_from)
    return {"global_step": output.global_step, "train_loss": mean_training_loss(trainer.state.log_history),
            "skipped_nonfinite_steps": trainer.divergence_guard.skipped_steps, "resumed_from": resumed_from}


def mean_training_loss(log_history: list[dict]) -> float | None:
    """Mean training loss per optimizer step from a Trainer's log history (each logged `loss` is the mean since the
    previous log, weighted here by its steps); None when nothing was logged."""
    total, previous = 0.0, 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    return total / previous if previous else None
