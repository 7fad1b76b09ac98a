"""Track 1 recipe: fine-tune a causal LM with one objective, sample test-prefix continuations, score MAUVE.

Steps: check that the MAUVE featurizer can be read (`preflight.require`) -> load corpus and pack blocks, test prompts
(`cfg.prompts`) -> build model, or with `cfg.pretraining` load the cached student pre-trained on a related oracle
language (+ cost embedding: a frozen copy of its head) ->
`ObjectiveTrainer` (best checkpoint by validation cross-entropy; resumes from the newest checkpoint in the run's
output dir; `trainer.max_steps=0` evaluates the initial model untrained) -> test perplexity ->
`generation.num_seeds` sampling runs -> MAUVE against the gold texts (features computed once per text set) and
diversity -> with `data=oracle`, exact distances from the oracle (`metrics.json` key `oracle`) ->
`results/<experiment>/<run-id>/`.
"""

from __future__ import annotations

import logging
import math
import time

import pandas as pd
import transformers
from omegaconf import DictConfig, OmegaConf

from experiments.pipeline.data import blocks_fingerprint, load_text_splits, pack_blocks
from experiments.pipeline.generation import (continuation_token_budget, generation_records, prompts_from_config,
                                             sample_continuations, truncate_words)
from experiments.pipeline.metrics import Featurizer, diversity, mauve_score, mean_std
from experiments.pipeline.models import model_tokenizer
from experiments.pipeline.oracle import oracle_metrics
from experiments.pipeline.pretraining import load_student
from experiments.pipeline.preflight import require
from experiments.pipeline.records import build_manifest, sha256_texts, start_run, trained_run_header, write_run
from experiments.pipeline.tracking import make_tracker, scalar_metrics
from experiments.pipeline.training import build_trainer, train_run, training_arguments

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Run one Track-1 job described by the composed config; returns the metrics written to metrics.json (those
    recorded, for a run already complete; an empty dict on the non-zero ranks of a multi-process run)."""
    started = time.time()
    opened = start_run(cfg, cfg.data.name, cfg.objective.label, cfg.model.name)
    if opened.complete:
        return opened.recorded
    output_dir, run_id = opened.output_dir, opened.run_id
    require(cfg, ["metrics"])  # the MAUVE featurizer, read after training
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tracker = make_tracker(cfg.tracker, run_name=run_id, config=resolved, directory=output_dir)
    args = training_arguments(cfg.trainer, output_dir=opened.checkpoints, report_to=tracker.report_to, seed=cfg.seed,
                              run_name=run_id)
    transformers.set_seed(cfg.seed)

    with args.main_process_first(desc="data preparation"):  # rank 0 fills the caches, the others then read them
        texts = load_text_splits(cfg.data)  # first: data=oracle also writes the tokenizer the model config names
        tokenizer = model_tokenizer(cfg.model)
        max_blocks = cfg.data.max_blocks or {}
        blocks = {split: pack_blocks(texts[split], tokenizer, cfg.data.block_size, cfg.data.pack_batch_texts,
                                     max_blocks=max_blocks.get(split))
                  for split in texts}
    model, pretraining = load_student(cfg, tokenizer)  # with cfg.pretraining: the cached pre-trained student
    prompts = prompts_from_config(texts["test"]["text"], cfg.get("prompts"), corpus=cfg.data.name)
    log.info("%s: %s blocks, %d prompts", cfg.data.name, {s: len(b) for s, b in blocks.items()}, len(prompts))

    trainer = build_trainer(cfg, model, args=args, train_dataset=blocks["train"], eval_dataset=blocks["validation"])
    trained = train_run(trainer, opened.checkpoints)
    validation = trainer.evaluate()
    test = trainer.evaluate(eval_dataset=blocks["test"], metric_key_prefix="test")
    train_seconds = time.time() - started
    if not trainer.is_world_process_zero():  # the other ranks only train and evaluate
        return {}

    model = trainer.model
    max_new_tokens = continuation_token_budget(tokenizer, prompts, quantile=cfg.generation.budget_quantile,
                                               slack=cfg.generation.budget_slack)
    seeds = [cfg.generation.base_seed + i for i in range(cfg.generation.num_seeds)]
    featurizer = Featurizer(cfg.metrics.featurizer, max_text_length=cfg.metrics.max_text_length,
                            batch_size=cfg.metrics.batch_size, revision=cfg.metrics.featurizer_revision)
    gold_features = featurizer([p.gold for p in prompts])
    words = cfg.prompts.continuation_words
    continuations, mauves, per_seed_div = {}, [], []
    for seed in seeds:
        samples = sample_continuations(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed,
                                       decoding=cfg.decoding, batch_size=cfg.generation.batch_size,
                                       max_prompt_tokens=cfg.generation.max_prompt_tokens,
                                       suppress_eos=cfg.generation.suppress_eos,
                                       show_progress=not cfg.trainer.disable_tqdm)
        continuations[seed] = samples
        predictions = [f"{p.prefix} {truncate_words(s, words)}" for p, s in zip(prompts, samples, strict=True)]
        score = mauve_score(gold_features, featurizer(predictions), kmeans_seeds=list(cfg.metrics.kmeans_seeds),
                            mauve_options=OmegaConf.to_container(cfg.metrics.mauve, resolve=True))
        mauves.append(score["mauve"])
        per_seed_div.append(diversity([truncate_words(s, words) for s in samples], cfg.metrics.distinct_orders,
                                      cfg.metrics.rep_orders))
        log.info("seed %d: MAUVE %.4f", seed, score["mauve"])

    metrics = {
        **trained_run_header(cfg, run_id),
        "corpus": cfg.data.name,
        "decoding": cfg.decoding.name,
        "featurizer": cfg.metrics.featurizer,
        "num_prompts": len(prompts),
        "sampling_seeds": seeds,
        "max_new_tokens": max_new_tokens,
        "mauve": mean_std(mauves),
        "diversity": {key: mean_std([d[key] for d in per_seed_div]) for key in per_seed_div[0]},
        "gold_diversity": diversity([p.continuation for p in prompts], cfg.metrics.distinct_orders,
                                    cfg.metrics.rep_orders),
        "eval_loss": validation["eval_loss"],
        "eval_perplexity": math.exp(validation["eval_loss"]),
        "test_loss": test["test_loss"],
        "test_perplexity": math.exp(test["test_loss"]),
        "train": {**trained, "best_checkpoint": trainer.state.best_model_checkpoint},
        "seconds": {"train_and_eval": train_seconds, "total": time.time() - started},
    }
    if pretraining:
        metrics["pretraining"] = pretraining
    if cfg.data.source == "oracle":
        metrics["oracle"] = oracle_metrics(model, tokenizer, cfg.data)
        metrics["seconds"]["total"] = time.time() - started
        log.info("oracle: forward KL %.4f, reverse KL %.4f, TVD %.4f", metrics["oracle"]["forward_kl"],
                 metrics["oracle"]["reverse_kl"], metrics["oracle"]["tvd"])
    manifest = build_manifest(
        cfg, run_id=run_id, output_dir=output_dir,
        seeds={"training": cfg.seed, "sampling": seeds, "mauve_kmeans": list(cfg.metrics.kmeans_seeds)},
        data_fingerprint={"blocks_sha256": blocks_fingerprint(blocks),
                          "prompts_sha256": sha256_texts(p.gold for p in prompts),
                          "rows": {s: len(t) for s, t in texts.items()},
                          "blocks": {s: len(b) for s, b in blocks.items()}})
    generations = generation_records(prompts, continuations, words)
    run_dir = write_run(cfg.paths.results_dir, cfg.experiment_name, run_id, metrics=metrics, manifest=manifest,
                        jsonl={"generations.jsonl": generations})
    log.info("MAUVE %.4f ± %.4f, test ppl %.2f -> %s", metrics["mauve"]["mean"], metrics["mauve"]["std"],
             metrics["test_perplexity"], run_dir)
    tracker.log_metrics(scalar_metrics(metrics))
    tracker.log_table("summary", pd.DataFrame([{"objective": metrics["objective"], "corpus": metrics["corpus"],
                                                **scalar_metrics(metrics)}]))
    tracker.log_table("samples", pd.DataFrame([g for g in generations if g["seed"] == seeds[0]]))
    tracker.finish()
    return metrics

