"""Track 3 recipe: instruction-tune a causal LM on Alpaca-format data with one objective, answer an evaluation
instruction set, and (with a `judge` config) judge the answers against the set's reference outputs.

Steps: the judge built, the evaluation set and the judge endpoint checked (`preflight.require`) -> records ->
tokenizer (right padding, `sft.model_max_length`) -> model, pad token added with mean-initialised rows ->
response-only labels -> `ObjectiveTrainer` (the cost embedding is copied from the resized LM head) -> final model
saved (gathered under FSDP) -> responses in AlpacaEval's format -> pairwise judging -> `results/<experiment>/
<run-id>/` (`model_outputs.json`, `reference_outputs.json`, `judgements.jsonl`, AlpacaEval's `annotations.json` and
`leaderboard.csv`, metrics, manifest).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import transformers
from omegaconf import DictConfig, OmegaConf

from experiments.pipeline.instruct import (SupervisedCollator, add_pad_token, build_sft_dataset, generate_responses,
                                           load_instruction_records, load_sft_tokenizer, records_fingerprint,
                                           reference_outputs)
from experiments.pipeline.judging.clients import build_judge
from experiments.pipeline.judging.pairwise import alpaca_eval_annotations, alpaca_eval_leaderboard, judge_outputs
from experiments.pipeline.models import load_causal_lm
from experiments.pipeline.preflight import require
from experiments.pipeline.records import build_manifest, start_run, trained_run_header, write_run
from experiments.pipeline.tracking import make_tracker, scalar_metrics
from experiments.pipeline.training import build_trainer, train_run, training_arguments

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Run one Track-3 job described by the composed config; returns the metrics written to metrics.json (those
    recorded, for a run already complete; an empty dict on the non-zero ranks of a multi-process run, which only
    train)."""
    started = time.time()
    opened = start_run(cfg, cfg.instructions.name, cfg.objective.label, cfg.model.name)
    if opened.complete:
        return opened.recorded
    output_dir, run_id = opened.output_dir, opened.run_id
    judge = build_judge(cfg.judge) if cfg.get("judge") else None  # a missing API key fails now, not after training
    require(cfg, ["eval_instructions", "judge"])  # read after training: checked now
    tracker = make_tracker(cfg.tracker, run_name=run_id, config=OmegaConf.to_container(cfg, resolve=True),
                           directory=output_dir)
    args = training_arguments(cfg.trainer, output_dir=opened.checkpoints, report_to=tracker.report_to, seed=cfg.seed,
                              run_name=run_id)
    transformers.set_seed(cfg.seed)

    with args.main_process_first(desc="data preparation"):  # rank 0 fills the datasets cache, the others read it
        records = load_instruction_records(cfg.instructions)
        eval_records = load_instruction_records(cfg.eval_instructions, require_output=False,
                                                where="eval_instructions")
    references = reference_outputs(eval_records, cfg.eval_instructions.reference_generator) if judge else None
    tokenizer = load_sft_tokenizer(cfg.model, model_max_length=cfg.sft.model_max_length)
    model = load_causal_lm(cfg.model, tokenizer)
    added_rows = add_pad_token(tokenizer, model, cfg.sft.pad_token)
    train_set, data_stats = build_sft_dataset(tokenizer, records, max_length=cfg.sft.model_max_length,
                                              tokenize_jointly=cfg.sft.tokenize_jointly)

    trainer = build_trainer(cfg, model, args=args, train_dataset=train_set,
                            data_collator=SupervisedCollator(tokenizer.pad_token_id))
    trained = train_run(trainer, opened.checkpoints)
    final_dir = output_dir / "final_model"
    if cfg.sft.save_model or trainer.is_fsdp_enabled:
        trainer.save_model(str(final_dir))  # under FSDP: the full state dict, gathered on rank 0
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(final_dir))
    train_seconds = time.time() - started
    if not trainer.is_world_process_zero():
        return {}

    model = generation_model(trainer, final_dir, cfg.model.dtype)
    generator = cfg.generation.generator or f"{cfg.model.name}_{cfg.objective.label}"
    outputs = generate_responses(model, tokenizer, eval_records, generator=generator, decoding=cfg.decoding,
                                 max_new_tokens=cfg.generation.max_new_tokens, batch_size=cfg.generation.batch_size,
                                 max_prompt_tokens=cfg.generation.max_prompt_tokens,
                                 seed=cfg.generation.base_seed, show_progress=not cfg.trainer.disable_tqdm)
    generation_seconds = time.time() - started - train_seconds

    metrics = {
        **trained_run_header(cfg, run_id),
        "instructions": cfg.instructions.name,
        "eval_set": cfg.eval_instructions.name,
        "generator": generator,
        "decoding": cfg.decoding.name,
        "num_instructions": len(outputs),
        "mean_output_chars": sum(len(o["output"]) for o in outputs) / len(outputs),
        "data": {**data_stats, "pad_rows_added": added_rows, "tokenize_jointly": cfg.sft.tokenize_jointly},
        "train": {**trained, "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
                  "world_size": trainer.args.world_size},
    }
    json_files = {"model_outputs.json": outputs}
    jsonl, text_files = {}, {}
    if judge is not None:
        judgements, judge_metrics = judge_outputs(outputs, references, judge_cfg=cfg.judge, judge=judge,
                                                  cache_dir=cfg.paths.cache_dir,
                                                  show_progress=not cfg.trainer.disable_tqdm)
        metrics.update(judge_metrics)
        json_files["reference_outputs.json"] = references
        json_files["annotations.json"] = alpaca_eval_annotations(judgements)
        text_files["leaderboard.csv"] = alpaca_eval_leaderboard(judge_metrics, generator)
        jsonl["judgements.jsonl"] = judgements
    metrics["seconds"] = {"train": train_seconds, "generation": generation_seconds, "total": time.time() - started}
    manifest = build_manifest(
        cfg, run_id=run_id, output_dir=output_dir,
        seeds={"training": cfg.seed, "generation": cfg.generation.base_seed,
               **({"judge_random_swap": cfg.judge.seed} if judge is not None else {})},
        data_fingerprint={"instructions_sha256": records_fingerprint(records),
                          "eval_instructions_sha256": records_fingerprint(eval_records),
                          "records": len(records), "eval_records": len(eval_records)})
    run_dir = write_run(cfg.paths.results_dir, cfg.experiment_name, run_id, metrics=metrics, manifest=manifest,
                        jsonl=jsonl, json_files=json_files, text_files=text_files)
    log.info("%d responses by %s%s -> %s", len(outputs), generator,
             f", win rate {metrics['win_rate']:.3f}" if "win_rate" in metrics else "", run_dir)
    tracker.log_metrics(scalar_metrics(metrics))
    tracker.log_table("responses", pd.DataFrame(outputs[:50]))
    tracker.finish()
    return metrics


def generation_model(trainer, final_dir: Path, dtype: str | None):
    """The trained model ready for `generate`: unwrapped from DDP, or reloaded from the gathered FSDP save (in the
    training's mixed-precision dtype, next to the still-allocated training shards)."""
    if trainer.is_fsdp_enabled:
        args = trainer.args
        dtype = "bfloat16" if args.bf16 else "float16" if args.fp16 else (dtype or "auto")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(final_dir), dtype=dtype)
        return reloaded.to(args.device)
    return trainer.accelerator.unwrap_model(trainer.model)

