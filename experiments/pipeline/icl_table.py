"""The few-shot accuracy table (`results/tables/icl_accuracy.{md,csv,tex}`), registered in `experiments.tables`.

Reads every run whose metrics.json has an `icl` section (`experiment=icl_eval`, and continual fine-tuning runs that
evaluate after training): rows = model × fine-tuning objective, the base model (objective `base`) first; columns =
tasks in the paper's order, then the average (only over a row with every task; otherwise `–`, like a task the row
lacks). Cells are accuracy in % ± the binomial standard error; the best per column is in bold. The latest run of a
row wins, and is the source of its cells. When runs used different protocols (retriever, shots, data source or
test size), the protocol is added to the row label so that they are never silently compared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from experiments.pipeline.run_groups import run_refs
from experiments.pipeline.table_format import MISSING, Table, bold_best, empty_sources

PAPER_TASKS = ("tweet_eval", "trec", "sst2", "subj", "cr", "rt", "ag_news")
CAPTION = "Few-shot ICL accuracy (%, ± binomial standard error; TopK retrieval, PPL scoring)"


def _protocol(icl: Mapping) -> str:
    retriever = str(icl.get("retriever", {}).get("model", "?")).rstrip("/").split("/")[-1]
    sizes = ",".join(str(m.get("n")) for m in icl["tasks"].values())
    return f"{icl.get('shots')}-shot, {retriever}, {icl.get('source', '?')}, n={sizes}"


def _row_label(model: str, objective: str) -> str:
    return model if objective == "base" else f"{model} + {objective}"


def icl_tables(runs: Sequence[Mapping]) -> dict[str, Table]:
    """`{"icl_accuracy": Table}`, or `{}` without ICL runs; values hold `<task>` accuracy (%) and `<task> stderr`
    columns plus `average`."""
    latest: dict[tuple[str, str, str], Mapping] = {}
    for run in sorted((r for r in runs if isinstance(r.get("icl"), Mapping)), key=lambda r: str(r.get("run_id", ""))):
        objective = run.get("objective") or "base"
        latest[(str(run.get("model", "?")), str(objective), _protocol(run["icl"]))] = run
    if not latest:
        return {}
    several_protocols = len({key[2] for key in latest}) > 1
    tasks = [t for t in PAPER_TASKS if any(t in run["icl"]["tasks"] for run in latest.values())]
    tasks += sorted({t for run in latest.values() for t in run["icl"]["tasks"]} - set(tasks))
    keys = sorted(latest, key=lambda k: (k[2], k[0], k[1] != "base", k[1]))
    labels = [_row_label(m, o) + (f" [{p}]" if several_protocols else "") for m, o, p in keys]
    values = pd.DataFrame(index=labels, dtype=float)
    cells = pd.DataFrame(MISSING, index=labels, columns=[*tasks, "average"], dtype=object)
    sources = empty_sources(cells)
    for label, key in zip(labels, keys):
        results = latest[key]["icl"]["tasks"]
        for task in tasks:
            if task in results:
                accuracy, stderr = 100 * results[task]["accuracy"], 100 * results[task]["stderr"]
                values.loc[label, task], values.loc[label, f"{task} stderr"] = accuracy, stderr
                cells.loc[label, task] = f"{accuracy:.1f} ± {stderr:.1f}"
                sources.at[label, task] = run_refs([latest[key]])
        complete = all(task in results for task in tasks)
        values.loc[label, "average"] = sum(values.loc[label, t] for t in tasks) / len(tasks) if complete else None
        if complete:
            cells.loc[label, "average"] = f"{values.loc[label, 'average']:.1f}"
            sources.at[label, "average"] = run_refs([latest[key]])
    for column in [*tasks, "average"]:
        bold_best(cells, column, pd.to_numeric(values[column], errors="coerce"), higher_better=True)
    values.index.name = cells.index.name = sources.index.name = "model"
    return {"icl_accuracy": Table(values, cells, CAPTION, sources)}
