"""The Track 1 tables in the paper's layout, registered in `experiments.tables`: per model, `lm_mauve_<model>` (rows =
objectives, columns = corpora, MAUVE mean ± std over sampling seeds; higher is better) and `lm_perplexity_<model>`
(per corpus: test perplexity, lower is better, and the diversity of the samples, best = closest to the human text's,
which a `human (reference)` row shows).

Diversity is `prod_n (1 - rep_n)` over the recorded `rep_n` orders (Su et al. 2022, as in MixCE), per sampling seed.
Runs on the synthetic oracle (`make demo`, metrics with an `oracle` section) have their own table (`experiments.demo`).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence

import pandas as pd

from experiments.pipeline.run_groups import run_refs
from experiments.pipeline.table_format import MISSING, Table, bold_best, empty_sources, pivot_table

CORPUS_ORDER = ("wikitext2", "wikitext103", "webtext", "ptb", "writingprompts", "ag_news")
HUMAN_ROW = "human (reference)"
METRICS = {"perplexity": "PPL ↓", "diversity": "diversity"}
"""Quality-table metric -> its column suffix in the formatted table (the CSV uses the metric's name)."""


def _rep_keys(run: Mapping) -> list[str]:
    return sorted(key for key in run["diversity"] if key.startswith("rep_"))


def _diversity(run: Mapping) -> dict:
    """`{"mean", "std", "values"}` of `prod_n (1 - rep_n)` over the run's sampling seeds."""
    keys = _rep_keys(run)
    per_seed = [math.prod(1.0 - run["diversity"][key]["values"][i] for key in keys)
                for i in range(len(run["diversity"][keys[0]]["values"]))]
    return {"mean": statistics.fmean(per_seed), "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
            "values": per_seed}


def _human_diversity(run: Mapping) -> float:
    return math.prod(1.0 - run["gold_diversity"][key] for key in _rep_keys(run))


def file_label(model: str) -> str:
    """`model` as a table-name suffix: characters other than letters, digits, `.`, `_` and `-` become `-`."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", model)


def quality_table(runs: Sequence[Mapping]) -> Table:
    """Per corpus, test perplexity (lower is better) and diversity (best = closest to the human reference row)."""
    parts = {"perplexity": pivot_table(runs, read=lambda m: m["test_perplexity"], higher_better=False, decimals=2,
                                       column_order=CORPUS_ORDER),
             "diversity": pivot_table([r for r in runs if _rep_keys(r)], read=_diversity, higher_better=None,
                                      decimals=3, column_order=CORPUS_ORDER)}
    rows = [*parts["perplexity"].cells.index, *([HUMAN_ROW] if not parts["diversity"].cells.empty else [])]
    corpora = list(parts["perplexity"].cells.columns)
    cells = pd.DataFrame(MISSING, index=rows, columns=[f"{c} {s}" for c in corpora for s in METRICS.values()])
    values = pd.DataFrame(index=rows, dtype=float)
    sources = empty_sources(cells)
    for metric, part in parts.items():
        for corpus in part.cells.columns:
            column = f"{corpus} {METRICS[metric]}"
            labels = [label for label in part.cells.index if label in cells.index]
            cells.loc[labels, column] = part.cells.loc[labels, corpus]
            for label in labels:
                sources.at[label, column] = part.sources.at[label, corpus]
            for suffix in ("mean", "std", "runs"):
                if f"{corpus} {suffix}" in part.values:
                    values[f"{corpus} {metric} {suffix}"] = part.values.loc[labels, f"{corpus} {suffix}"]
            if metric == "diversity":
                in_corpus = [r for r in runs if r.get("corpus") == corpus and _rep_keys(r)]
                human = statistics.fmean(_human_diversity(r) for r in in_corpus)
                values.loc[HUMAN_ROW, f"{corpus} diversity mean"] = human
                cells.loc[HUMAN_ROW, column] = f"{human:.3f}"
                sources.at[HUMAN_ROW, column] = run_refs(in_corpus)
                bold_best(cells, column, (values.loc[labels, f"{corpus} diversity mean"] - human).abs(), False)
    values = values[[column for corpus in corpora for metric in METRICS for column in values
                     if column.startswith(f"{corpus} {metric} ")]]
    values.index.name = cells.index.name = sources.index.name = "objective"
    return Table(values, cells, sources=sources)


def lm_tables(runs: Sequence[Mapping]) -> dict[str, Table]:
    """Track 1: `lm_mauve_<model>` and `lm_perplexity_<model>` for each model with MAUVE runs (not oracle runs)."""
    by_model: dict[str, list[Mapping]] = {}
    for run in runs:
        if all(key in run for key in ("mauve", "test_perplexity", "diversity")) and "oracle" not in run:
            by_model.setdefault(str(run.get("model", "?")), []).append(run)
    tables = {}
    for model, model_runs in sorted(by_model.items()):
        mauve = pivot_table(model_runs, read=lambda m: m["mauve"], higher_better=True, decimals=3,
                            column_order=CORPUS_ORDER)
        tables[f"lm_mauve_{file_label(model)}"] = mauve._replace(
            caption=f"MAUVE ↑ of {model} fine-tuned with each objective (mean ± std over sampling seeds)")
        tables[f"lm_perplexity_{file_label(model)}"] = quality_table(model_runs)._replace(
            caption=f"Test perplexity ↓ of {model} fine-tuned with each objective, and the diversity of its samples, "
                    "prod_n (1 - rep-n) over the recorded orders n (best = closest to the human text's)")
    return tables
