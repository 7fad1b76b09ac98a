"""Track 2 evaluation recipe: few-shot in-context accuracy of a causal LM on the paper's seven tasks (OpenICL protocol).

Steps: load the model (Hub id, local path, fine-tuned run directory, or base + LoRA adapter) -> for each task in
`icl.tasks`: TopK retrieval of `icl.ice_num` examples (embeddings cached under `paths.cache_dir`), PPL scoring of every
label's prompt, accuracy -> `results/<experiment>/<run-id>/{metrics.json, predictions.jsonl, manifest.json}`.
`icl.engine=openicl` runs the same tasks through OpenICL 0.1.8 itself (slow; for checks).

    python run.py experiment=icl_eval model=llama7b
    python run.py experiment=icl_eval model=llama7b icl.adapter=outputs/.../adapter objective=cft/emo2
    python run.py experiment=icl_tiny
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import transformers
from omegaconf import DictConfig, OmegaConf

from experiments.pipeline.distributed import is_main_process
from experiments.pipeline.icl import evaluate_icl, load_task, openicl_reference, task_names
from experiments.pipeline.models import load_model_for_eval, model_tokenizer
from experiments.pipeline.preflight import require
from experiments.pipeline.records import SCHEMA_VERSION, build_manifest, sha256_texts, start_run, write_run
from experiments.pipeline.tracking import make_tracker

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Evaluate `cfg.model` (plus `cfg.icl.adapter`) on `cfg.icl.tasks`; returns the metrics written to metrics.json
    (those recorded, for a run already complete). Under a multi-process launch rank 0 evaluates alone, the other
    ranks return an empty dict."""
    started = time.time()
    icl_cfg = OmegaConf.to_container(cfg.icl, resolve=True)
    names = task_names(icl_cfg)  # unknown tasks fail before the model loads
    transformers.set_seed(cfg.seed)
    objective = cfg.icl.get("objective") or "base"
    opened = start_run(cfg, cfg.model.name, objective, "icl")
    if opened.complete or not is_main_process():
        return opened.recorded or {}
    output_dir, run_id = opened.output_dir, opened.run_id
    require(cfg, ["icl"])  # tasks and retriever, read after the (possibly large) model loads

    tokenizer = model_tokenizer(cfg.model)
    model, source = load_model_for_eval(OmegaConf.to_container(cfg.model, resolve=True), tokenizer,
                                        adapter=cfg.icl.adapter, device=cfg.icl.device)
    log.info("evaluating %s (adapter %s) on %s, %s", source["model"], source["adapter"], source["device"], names)
    show_progress = bool(cfg.icl.show_progress)
    if cfg.icl.engine == "openicl":
        icl_metrics, predictions = _openicl_engine(model, tokenizer, icl_cfg, names, output_dir)
    elif cfg.icl.engine == "fast":
        icl_metrics, predictions = evaluate_icl(model, tokenizer, icl_cfg, cache_dir=cfg.paths.cache_dir,
                                                show_progress=show_progress)
    else:
        raise ValueError(f"icl.engine must be 'fast' or 'openicl', got {cfg.icl.engine!r}")

    metrics = {
        "schema_version": SCHEMA_VERSION,
        "experiment": cfg.experiment_name,
        "run_id": run_id,
        "model": cfg.model.name,
        "objective": objective,
        "model_source": source,
        "engine": cfg.icl.engine,
        "icl": icl_metrics,
        "accuracy": {name: m["accuracy"] for name, m in icl_metrics["tasks"].items()},
        "mean_accuracy": icl_metrics["mean_accuracy"],
        "seconds": {"total": time.time() - started},
    }
    manifest = build_manifest(cfg, run_id=run_id, output_dir=output_dir, seeds={"global": cfg.seed},
                              data_fingerprint={"predictions_sha256": sha256_texts(
                                  f"{p['task']}:{p['index']}:{p['label']}" for p in predictions)})
    run_dir = write_run(cfg.paths.results_dir, cfg.experiment_name, run_id, metrics=metrics, manifest=manifest,
                        jsonl={"predictions.jsonl": predictions})
    summary = ", ".join(f"{n} {m['accuracy']:.3f}±{m['stderr']:.3f}" for n, m in icl_metrics["tasks"].items())
    log.info("ICL accuracy: %s; mean %.4f -> %s", summary, metrics["mean_accuracy"], run_dir)
    tracker = make_tracker(cfg.tracker, run_name=run_id, config=OmegaConf.to_container(cfg, resolve=True),
                           directory=output_dir)
    tracker.log_metrics({f"icl/{n}": a for n, a in metrics["accuracy"].items()}
                        | {"icl/mean": metrics["mean_accuracy"]})
    tracker.finish()
    return metrics


def _openicl_engine(model, tokenizer, icl_cfg: dict, names: list[str], output_dir: Path) -> tuple[dict, list[dict]]:
    """The same evaluation through OpenICL itself (`experiments.pipeline.icl.openicl_reference`)."""
    import numpy as np

    results, predictions = {}, []
    with tempfile.TemporaryDirectory(dir=output_dir) as scratch:
        for name in names:
            task_started = time.time()
            task = load_task(name, icl_cfg["task_specs"][name], icl_cfg.get("source", "hub"),
                             icl_cfg.get("max_test_rows"))
            task_metrics, rows = openicl_reference(model, tokenizer, task, icl_cfg, scratch)
            task_metrics.pop("in_context")
            results[name] = task_metrics | {"seconds": time.time() - task_started, "pool_size": len(task.pool)}
            predictions.extend(rows)
    retriever = icl_cfg["retriever"]
    return ({"tasks": results, "shots": int(icl_cfg["ice_num"]), "tasks_order": names,
             "source": icl_cfg.get("source", "hub"),
             "retriever": {"name": "topk", "model": str(retriever["model"]), "tokenizer": str(retriever["tokenizer"])},
             "inference": {"method": "ppl", "engine": "openicl"},
             "mean_accuracy": float(np.mean([m["accuracy"] for m in results.values()]))}, predictions)
