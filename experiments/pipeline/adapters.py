"""Parameter-efficient fine-tuning for the tracks: LoRA via peft from a `conf/adapter/*.yaml` node, plus saving.

`adapter=lora` (the paper's Track-2 setting): `LoraConfig(r=32, lora_alpha=16, lora_dropout=0.05, bias="none",
task_type="CAUSAL_LM")` with peft's default target modules for the architecture (LLaMA: q_proj, v_proj); only the
adapter weights train. `adapter=none` trains every weight. After training a run saves `adapter/` (peft's
`adapter_config.json` + weights, whose `base_model_name_or_path` names the base as the model config does) and, with
`adapter.merge: true`, `merged/` (base + adapter folded into plain weights, loadable without peft); a full fine-tune
saves `model/`. The loaders of the evaluation side (`experiments.pipeline.models.load_model_for_eval`) read these.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

log = logging.getLogger(__name__)
ADAPTERS = ("none", "lora")


def lora_config(adapter_cfg: Mapping):
    """peft `LoraConfig` from an `adapter=lora` node (`target_modules: null` = peft's default for the architecture)."""
    from peft import LoraConfig

    targets = adapter_cfg.get("target_modules")
    return LoraConfig(r=int(adapter_cfg["r"]), lora_alpha=adapter_cfg["alpha"], lora_dropout=adapter_cfg["dropout"],
                      bias=adapter_cfg["bias"], task_type=adapter_cfg["task_type"],
                      target_modules=list(targets) if targets is not None and not isinstance(targets, str) else targets)


def apply_adapter(model: torch.nn.Module, adapter_cfg: Mapping, *, base_name: str | None = None) -> torch.nn.Module:
    """`model` wrapped for training as `adapter_cfg.name` says: `none` -> `model` itself; `lora` -> a peft
    `PeftModel` in which only the LoRA weights require gradients. `base_name` (the model config's `name_or_path`)
    becomes the adapter's `base_model_name_or_path`."""
    name = adapter_cfg.get("name")
    if name not in ADAPTERS:
        raise ValueError(f"adapter.name must be one of {ADAPTERS}, got {name!r}")
    if name == "none":
        return model
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(adapter_cfg))
    if base_name:  # as the model config names it (a Hub id, `package:...`), not the path it was loaded from
        peft_model.peft_config["default"].base_model_name_or_path = str(base_name)
    counts = parameter_counts(peft_model)
    targets = sorted(peft_model.peft_config["default"].target_modules)
    log.info("LoRA on %s: %d trainable of %d parameters (%.3f%%)", targets, counts["trainable"], counts["total"],
             100 * counts["trainable"] / counts["total"])
    return peft_model


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (tied weights counted once)."""
    unique = {id(p): p for p in model.parameters()}.values()
    return {"trainable": sum(p.numel() for p in unique if p.requires_grad), "total": sum(p.numel() for p in unique)}


def is_adapter_model(model: torch.nn.Module) -> bool:
    """True for a peft model (adapter weights on top of a frozen base)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_fine_tuned(trainer, tokenizer, directory: str | Path, *, merge: bool = True
                    ) -> tuple[torch.nn.Module, dict[str, str]]:
    """Save the model `trainer` fine-tuned under `directory`; return `(model to evaluate, {kind: path})`.

    A peft model saves `adapter/` and, with `merge`, folds the adapter into the base weights (`merge_and_unload`) and
    saves `merged/` (the merged model is then returned). A fully fine-tuned model is saved to `model/` with
    `trainer.save_model`, which gathers FSDP shards. The tokenizer is saved beside every full model.
    """
    directory = Path(directory)
    model = trainer.model
    if not is_adapter_model(model):
        trainer.save_model(str(directory / "model"))
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(directory / "model"))
        return model, {"model": str(directory / "model")}
    main = trainer.is_world_process_zero()  # with several (DDP) processes, one writes
    if main:
        model.save_pretrained(str(directory / "adapter"))
    saved = {"adapter": str(directory / "adapter")}
    if merge:
        model = model.merge_and_unload()
        if main:
            model.save_pretrained(str(directory / "merged"))
            tokenizer.save_pretrained(str(directory / "merged"))
        saved["merged"] = str(directory / "merged")
    return model, saved
