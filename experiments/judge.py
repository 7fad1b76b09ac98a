"""Track-3 judging recipe (`experiment=judge`): two AlpacaEval-format output files -> pairwise win rates.

Steps: load `pairwise.model_outputs` and `pairwise.reference_outputs` -> match by instruction (a clear error listing
mismatches) -> judge every pair with `judge` (cached, both orders by default; `experiments.pipeline.judging`) ->
win rate +- SE, counts, unparseable verdicts, length-controlled win rate -> `results/judge/<run-id>/`
(`metrics.json`, `manifest.json`, `judgements.jsonl`). The run directory appears only when everything succeeded.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from experiments.pipeline.distributed import is_main_process
from experiments.pipeline.judging import judge_outputs, load_outputs, match_outputs
from experiments.pipeline.records import SCHEMA_VERSION, build_manifest, sha256_texts, start_run, write_run

log = logging.getLogger(__name__)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def run(cfg: DictConfig) -> dict:
    """Judge one model's outputs against reference outputs; returns the metrics written to metrics.json (those
    recorded, for a run already complete). Under a multi-process launch rank 0 judges alone, the other ranks return
    an empty dict."""
    started = time.time()
    pairwise = cfg.pairwise
    model_path, reference_path = Path(pairwise.model_outputs), Path(pairwise.reference_outputs)
    model_outputs, reference_outputs = load_outputs(model_path), load_outputs(reference_path)
    pairs = match_outputs(model_outputs, reference_outputs)  # fail early, before any judge is built
    if pairwise.max_instructions:
        kept = {(p.instruction, p.input) for p in pairs[:pairwise.max_instructions]}
        model_outputs = [r for r in model_outputs if (r["instruction"], r.get("input") or "") in kept]
        reference_outputs = [r for r in reference_outputs if (r["instruction"], r.get("input") or "") in kept]
    opened = start_run(cfg, pairs[0].generator if pairs else "model", "vs",
                       pairs[0].reference_generator if pairs else "reference", cfg.judge.name)
    if opened.complete or not is_main_process():
        return opened.recorded or {}
    run_id = opened.run_id

    judgements, judged = judge_outputs(model_outputs, reference_outputs, judge_cfg=cfg.judge,
                                       cache_dir=cfg.paths.cache_dir, show_progress=True)
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "experiment": cfg.experiment_name,
        "run_id": run_id,
        "model": pairwise.model or judged["generator"],
        "objective": pairwise.objective,
        **judged,
        "seconds": {"total": time.time() - started},
    }
    manifest = build_manifest(
        cfg, run_id=run_id, output_dir=cfg.paths.output_dir,
        seeds={"random_swap": judged["swap_seed"]},
        data_fingerprint={
            "model_outputs": {"path": str(model_path), "rows": len(model_outputs),
                              "sha256": sha256_texts(r["output"] for r in model_outputs)},
            "reference_outputs": {"path": str(reference_path), "rows": len(reference_outputs),
                                  "sha256": sha256_texts(r["output"] for r in reference_outputs)},
            "instructions_sha256": sha256_texts(j["instruction"] for j in judgements)})
    run_dir = write_run(cfg.paths.results_dir, cfg.experiment_name, run_id, metrics=metrics, manifest=manifest,
                        jsonl={"judgements.jsonl": judgements})
    lc = judged["length_controlled"]["win_rate"]
    log.info("%s vs %s (judge %s, %s): win rate %s +- %s, LC %s, W/T/L %d/%d/%d, unparseable %d -> %s",
             judged["generator"], judged["reference_generator"], judged["judge"], judged["template"],
             _percent(judged["win_rate"]), _percent(judged["win_rate_se"]), _percent(lc), judged["wins"],
             judged["ties"], judged["losses"], judged["unparseable"], run_dir)
    return metrics
