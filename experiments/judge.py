"""Track-3 judging recipe (`experiment=judge`): two AlpacaEval-format output files -> pairwise win rates.

Steps: load `pairwise.model_outputs` and `pairwise.reference_outputs` (local files, or `hf://` Hub files pinned to a
commit; by default AlpacaEval's 805 instructions with the GPT-4 Turbo baseline) -> match by instruction
(`pairwise.match`: AlpacaEval's intersection, or strict) -> judge every pair with `judge` (cached;
`experiments.pipeline.judging`) -> win rate +- s.e., counts, pairs without a verdict, length-controlled win rate +- s.e.
-> `results/judge/<run-id>/` (`metrics.json`, `manifest.json`, `judgements.jsonl`, and AlpacaEval's
`annotations.json` and `leaderboard.csv`). The run directory appears only when everything succeeded.
"""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from experiments.pipeline.distributed import is_main_process
from experiments.pipeline.judging.pairwise import (alpaca_eval_annotations, alpaca_eval_leaderboard, judge_pairs,
                                                   load_outputs, match_outputs)
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
    model_outputs, reference_outputs = load_outputs(pairwise.model_outputs), load_outputs(pairwise.reference_outputs)
    pairs, unmatched = match_outputs(model_outputs, reference_outputs, pairwise.match)  # before any judge is built
    pairs = pairs[:pairwise.max_instructions] if pairwise.max_instructions else pairs
    opened = start_run(cfg, pairs[0].generator, "vs", pairs[0].reference_generator, cfg.judge.name)
    if opened.complete or not is_main_process():
        return opened.recorded or {}
    run_id = opened.run_id

    judgements, judged = judge_pairs(pairs, judge_cfg=cfg.judge, cache_dir=cfg.paths.cache_dir, unmatched=unmatched,
                                     match=pairwise.match, show_progress=True)
    model_name = pairwise.model or judged["generator"]
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "experiment": cfg.experiment_name,
        "run_id": run_id,
        "model": model_name,
        "objective": pairwise.objective,
        **judged,
        "seconds": {"total": time.time() - started},
    }
    manifest = build_manifest(
        cfg, run_id=run_id, output_dir=cfg.paths.output_dir,
        seeds={"random_swap": judged["swap_seed"]},
        data_fingerprint={
            "model_outputs": {"path": str(pairwise.model_outputs), "rows": len(model_outputs),
                              "sha256": sha256_texts(r["output"] for r in model_outputs)},
            "reference_outputs": {"path": str(pairwise.reference_outputs), "rows": len(reference_outputs),
                                  "sha256": sha256_texts(r["output"] for r in reference_outputs)},
            "instructions_sha256": sha256_texts(j["instruction"] for j in judgements)})
    run_dir = write_run(cfg.paths.results_dir, cfg.experiment_name, run_id, metrics=metrics, manifest=manifest,
                        jsonl={"judgements.jsonl": judgements},
                        json_files={"annotations.json": alpaca_eval_annotations(judgements)},
                        text_files={"leaderboard.csv": alpaca_eval_leaderboard(judged, model_name)})
    lc = judged["length_controlled"]
    log.info("%s vs %s (judge %s, %s): win rate %s +- %s, LC %s +- %s, W/T/L %d/%d/%d, without a verdict %d, "
             "skipped %d -> %s", judged["generator"], judged["reference_generator"], judged["judge"],
             judged["template"], _percent(judged["win_rate"]), _percent(judged["win_rate_se"]),
             _percent(lc["win_rate"]), _percent(lc["win_rate_se"]), judged["wins"], judged["ties"], judged["losses"],
             judged["unparseable"], judged["skipped"], run_dir)
    return metrics
