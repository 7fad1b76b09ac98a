"""Track 2 recipe: continual fine-tuning of a causal LM (LoRA, or every weight with FSDP) with one objective, then
few-shot in-context evaluation of the fine-tuned model in the same job.

Steps: TrainingArguments first (FSDP without GPUs, fp16 on CPU, unknown ICL tasks and ICL data, retriever or Hub
resources that cannot be read (`preflight.require`) fail here, before any download)
-> corpus -> training budget (`cft.train_budget`: the first N sentences or N packed blocks, `pipeline.train_budget`)
-> model -> objective loss with its cost embedding taken from the model's initial head (or `model.cost_embedding`)
BEFORE the adapter is applied -> adapter (`adapter=lora` | `none`) -> `ObjectiveTrainer`, resuming from the last
checkpoint -> validation perplexity -> `adapter/` + `merged/` (LoRA) or `model/` under the run's output dir -> ICL
accuracy of the fine-tuned model (`icl` config; skipped with `cft.evaluate=false`) ->
`results/<experiment>/<run-id>/{metrics.json, predictions.jsonl, manifest.json}`.

    python run.py -m experiment=cft_lora model=llama7b objective=mle,cft/emo,cft/emo2
"""

from __future__ import annotations

import gc
import logging
import math
import time

import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from emo.training import ObjectiveTrainer
from experiments.pipeline.adapters import apply_adapter, parameter_counts, save_fine_tuned
from experiments.pipeline.data import blocks_fingerprint, load_text_splits, pack_blocks
from experiments.pipeline.distributed import world_size
from experiments.pipeline.models import load_causal_lm, model_tokenizer
from experiments.pipeline.preflight import require
from experiments.pipeline.records import build_manifest, sha256_texts, start_run, trained_run_header, write_run
from experiments.pipeline.tracking import make_tracker
from experiments.pipeline.train_budget import budget_blocks
from experiments.pipeline.training import objective_loss, train_run, training_arguments

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Fine-tune `cfg.model` on `cfg.data` with `cfg.objective`, then evaluate ICL; returns the metrics written (those
    recorded, for a run already complete; an empty dict on the non-zero ranks of a multi-process run)."""
    started = time.time()
    opened = start_run(cfg, cfg.model.name, cfg.objective.label, cfg.adapter.name)
    if opened.complete:
        return opened.recorded
    output_dir, run_id = opened.output_dir, opened.run_id
    icl_cfg = OmegaConf.to_container(cfg.icl, resolve=True) if cfg.cft.evaluate else None
    if icl_cfg is not None:  # what the ICL phase reads, checked before any training
        from experiments.pipeline.icl import task_names

        task_names(icl_cfg)
        require(cfg, ["icl"])
    tracker = make_tracker(cfg.tracker, run_name=run_id, config=OmegaConf.to_container(cfg, resolve=True),
                           directory=output_dir)
    args = training_arguments(cfg.trainer, output_dir=opened.checkpoints, report_to=tracker.report_to, seed=cfg.seed,
                              run_name=run_id)
    transformers.set_seed(cfg.seed)

    with args.main_process_first(desc="data preparation"):  # rank 0 fills the caches, the others then read them
        texts = load_text_splits(cfg.data)
        tokenizer = model_tokenizer(cfg.model)
        blocks = {"train": None, "validation": None}
        blocks["train"], budget = budget_blocks(texts["train"], tokenizer, cfg.cft.train_budget,
                                                block_size=cfg.data.block_size, batch_texts=cfg.data.pack_batch_texts)
        if cfg.cft.validation_perplexity:
            blocks["validation"] = pack_blocks(texts["validation"], tokenizer, cfg.data.block_size,
                                               cfg.data.pack_batch_texts,
                                               max_blocks=(cfg.data.max_blocks or {}).get("validation"))
    model = load_causal_lm(cfg.model, tokenizer)

    loss = objective_loss(cfg.objective, model, cost_source=cfg.model.cost_embedding,
                          cost_revision=cfg.model.get("cost_embedding_revision"), device=args.device,
                          fsdp=bool(args.fsdp))
    model = apply_adapter(model, cfg.adapter, base_name=cfg.model.name_or_path or cfg.model.name)
    parameters = parameter_counts(model)
    trainer = ObjectiveTrainer(model=model, args=args, objective_loss=loss, train_dataset=blocks["train"],
                               eval_dataset=blocks["validation"], data_collator=transformers.default_data_collator)
    trained = train_run(trainer, opened.checkpoints)
    validation = trainer.evaluate() if blocks["validation"] is not None else None
    train_seconds = time.time() - started
    model, saved = save_fine_tuned(trainer, tokenizer, output_dir, merge=cfg.adapter.merge)
    if not trainer.is_world_process_zero():
        return {}
    if world_size() > 1 and "model" in saved:  # sharded (FSDP): evaluate the gathered checkpoint on this GPU alone
        del trainer, loss, model
        model = _reload_on_main_gpu(saved["model"], cfg, tokenizer)

    metrics = {
        **trained_run_header(cfg, run_id),
        "cost_embedding": cfg.model.cost_embedding or "initial LM head",
        "adapter": cfg.adapter.name,
        "corpus": cfg.data.name,
        "train_budget": budget,
        "parameters": parameters,
        "train": trained,
        "saved": saved,
    }
    if validation is not None:
        metrics |= {"eval_loss": validation["eval_loss"], "eval_perplexity": math.exp(validation["eval_loss"])}
    predictions = []
    if icl_cfg is not None:
        from experiments.pipeline.icl import evaluate_icl

        icl_metrics, predictions = evaluate_icl(model.eval(), tokenizer, icl_cfg, cache_dir=cfg.paths.cache_dir,
                                                show_progress=bool(cfg.icl.show_progress))
        metrics |= {"icl": icl_metrics, "accuracy": {n: m["accuracy"] for n, m in icl_metrics["tasks"].items()},
                    "mean_accuracy": icl_metrics["mean_accuracy"]}
    metrics["seconds"] = {"train": train_seconds, "total": time.time() - started}

    manifest = build_manifest(
        cfg, run_id=run_id, output_dir=output_dir, seeds={"training": cfg.seed},
        data_fingerprint={"blocks_sha256": blocks_fingerprint({s: b for s, b in blocks.items() if b is not None}),
                          "train_budget": budget,
                          "predictions_sha256": sha256_texts(f"{p['task']}:{p['index']}" for p in predictions)})
    run_dir = write_run(cfg.paths.results_dir, cfg.experiment_name, run_id, metrics=metrics, manifest=manifest,
                        jsonl={"predictions.jsonl": predictions} if predictions else None)
    summary = ", ".join(f"{n} {a:.3f}" for n, a in metrics.get("accuracy", {}).items()) or "not evaluated"
    log.info("%s + %s (%s): %d blocks, train loss %.4f; ICL %s -> %s", cfg.model.name, cfg.objective.label,
             cfg.adapter.name, budget["blocks"], trained["train_loss"], summary, run_dir)
    scalars = {"train_loss": trained["train_loss"]}
    scalars |= {f"icl/{n}": a for n, a in metrics.get("accuracy", {}).items()}
    for key, name in (("mean_accuracy", "icl/mean"), ("eval_perplexity", "eval_perplexity")):
        if key in metrics:
            scalars[name] = metrics[key]
    tracker.log_metrics(scalars)
    tracker.finish()
    return metrics


def _reload_on_main_gpu(directory: str, cfg: DictConfig, tokenizer) -> torch.nn.Module:
    """The fully fine-tuned model saved in `directory`, loaded onto the main process's GPU once the FSDP-wrapped copy
    is released (the other processes have returned)."""
    gc.collect()
    torch.cuda.empty_cache()
    model = load_causal_lm({"name_or_path": directory, "dtype": cfg.model.dtype}, tokenizer)
    return model.to(torch.device("cuda", torch.cuda.current_device()))
