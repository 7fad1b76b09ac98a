"""Our ICL engine vs OpenICL 0.1.8's own TopkRetriever + PPLInferencer, side by side on the same model and tasks.

For each task (the repository's slices in data/fewshot, offline, MiniLM retrieval over the GPT-2 tokenizer) it times
plain OpenICL (with only the `openicl_compat` patches; retrieval embeds one text at a time, PPL batches of
`--batch-size` prompts per label) and our engine with a cold embedding cache, then again with a warm cache, checks
that the predictions are identical, and prints the times and the speed-up.

    python benchmarks/icl_bench.py                              # tiny random LLaMA, sst2 + trec, 120 test rows each
    python benchmarks/icl_bench.py --model smollm2 --tasks sst2 --test-rows 32 --no-share
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.pipeline.icl import (build_retriever, load_task, openicl_reference, score_prompts,  # noqa: E402
                                      summarize, task_prompts)
from experiments.pipeline.models import load_model_for_eval, model_tokenizer  # noqa: E402


def ours(model, tokenizer, task, icl_cfg, cache_dir, batch_size, share_prefix):
    """Retrieval (cached under `cache_dir`) + PPL scoring; returns (seconds, predictions)."""
    started = time.perf_counter()
    retriever = build_retriever(icl_cfg, cache_dir, False)
    retrieved = retriever.retrieve([task.retrieval_text(r) for r in task.pool],
                                   [task.retrieval_text(r) for r in task.test], int(icl_cfg["ice_num"]))
    _, prompts = task_prompts(task, retrieved, icl_cfg["ice_separator"], icl_cfg["ice_eos_token"])
    scores = score_prompts(model, tokenizer, prompts, batch_size=batch_size, share_prefix=share_prefix)
    _, rows = summarize(task, scores)
    return time.perf_counter() - started, [r["prediction"] for r in rows]


def best_of(repeats: int, timed, *args):
    """The fastest of `repeats` calls of `timed(*args) -> (seconds, result)` (the results are identical)."""
    return min((timed(*args) for _ in range(repeats)), key=lambda pair: pair[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_llama", help="a conf/model name (tiny_llama, smollm2, ...)")
    parser.add_argument("--tasks", nargs="+", default=["sst2", "trec"])
    parser.add_argument("--test-rows", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8, help="OpenICL's prompts per forward; ours: examples")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-share", action="store_true", help="also time ours without the shared-prefix KV cache")
    parser.add_argument("--repeats", type=int, default=1, help="warm and no-share runs: best of this many (noisy CPUs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=["experiment=icl_tiny", f"model={args.model}", "paths.output_dir=unused",
                                           f"icl.max_test_rows={args.test_rows}"])
    icl_cfg = OmegaConf.to_container(cfg.icl, resolve=True)
    icl_cfg["inference"]["batch_size"] = args.batch_size
    torch.manual_seed(cfg.seed)
    tokenizer = model_tokenizer(cfg.model)
    model, source = load_model_for_eval(OmegaConf.to_container(cfg.model, resolve=True), tokenizer, device="auto")
    print(f"model {args.model} ({source['dtype']}, {source['device']}), torch threads {torch.get_num_threads()}, "
          f"{icl_cfg['ice_num']} shots, batch {args.batch_size}, best of {args.repeats} for warm/no-share")
    header = f"{'task':<10} {'rows':>5} {'labels':>6} {'OpenICL s':>10} {'ours cold s':>11} {'ours warm s':>11} " \
             f"{'no-share s':>10} {'cold x':>7} {'warm x':>7} {'same':>5}"
    print(header)
    totals = np.zeros(4)
    for name in args.tasks:
        task = load_task(name, icl_cfg["task_specs"][name], "local", args.test_rows)
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            _, reference = openicl_reference(model, copy.deepcopy(tokenizer), task, icl_cfg, scratch)
            openicl_s = time.perf_counter() - started
            cache = Path(scratch) / "cache"
            cold_s, cold = ours(model, tokenizer, task, icl_cfg, cache, args.batch_size, True)
            warm_s, warm = best_of(args.repeats, ours, model, tokenizer, task, icl_cfg, cache, args.batch_size, True)
            flat_s, flat = (best_of(args.repeats, ours, model, tokenizer, task, icl_cfg, cache, args.batch_size, False)
                            if args.no_share else (float("nan"), warm))
        same = cold == warm == flat == [r["prediction"] for r in reference]
        totals += (openicl_s, cold_s, warm_s, flat_s)
        print(f"{name:<10} {len(task.test):>5} {len(task.labels):>6} {openicl_s:>10.1f} {cold_s:>11.1f} "
              f"{warm_s:>11.1f} {flat_s:>10.1f} {openicl_s / cold_s:>7.1f} {openicl_s / warm_s:>7.1f} "
              f"{'yes' if same else 'NO':>5}")
    print(f"{'total':<10} {'':>5} {'':>6} {totals[0]:>10.1f} {totals[1]:>11.1f} {totals[2]:>11.1f} {totals[3]:>10.1f} "
          f"{totals[0] / totals[1]:>7.1f} {totals[0] / totals[2]:>7.1f}")
    print("cold: embeddings computed; warm: embeddings from the disk cache; no-share (--no-share): warm, without the "
          "shared-prefix KV cache; x = OpenICL time / ours; same: identical predictions.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
