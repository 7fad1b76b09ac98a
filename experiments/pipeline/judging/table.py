"""The instruction-following win-rate table (`results/tables/instruct_winrate.{md,csv,tex}`), registered in
`experiments.tables`.

Reads every run whose metrics.json holds pairwise-judging metrics (`experiment=judge`, and SFT runs that judge their
answers): rows = model / objective vs reference; for each judge (judge name and template, plus the position protocol
when it is not `both`) two columns: the win rate in % ± its standard error, and the length-controlled win rate in %.

Rows follow the shared run identity (`experiments.pipeline.run_groups`): runs whose setups differ only in their seeds
(training, generation, the judge's random-swap seed) are pooled into one cell, `mean ± std over runs (n=k)`; a rerun
with the same seeds replaces the earlier one; runs whose setups differ in anything else (decoding, judge temperature,
hyper-parameters, the number of judged pairs, ...) get their own rows, labelled with what differs, e.g.
`tiny / EMO vs gpt4 (decoding=top_p)`. Differences that the row label already shows (model, objective, the output
files) label only rows that would otherwise share a name. Runs of different experiments (`judge`, `sft_tiny`, ...)
are labelled among themselves (an SFT run's own judge and a later `experiment=judge` of its outputs share the row);
a row name that two experiments use in the same judge column gets `[experiment]` appended. The CSV holds the
numbers: win rate, `se` (the ± of the cell), LC win rate and `lc_se` (AlpacaEval's `lc_standard_error` for one run,
the std over pooled runs), counts summed over pooled runs, and `runs`.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence

import pandas as pd

from experiments.pipeline.run_groups import RunGroup, aggregate, group_runs, run_refs
from experiments.pipeline.table_format import MISSING, Table, bold_best, empty_sources

CAPTION = ("Pairwise win rate against the reference (%, the mean preference for the model: wins + ties/2 for "
           "discrete verdicts; ± standard error, or mean ± std over runs that differ only in seeds; LC: "
           "length-controlled, AlpacaEval-style GLM fitted offline)")
ROW_KEYS = ("model", "objective", "objective_name", "objective_hparams", "generator", "generation.generator",
            "eval_instructions.reference_generator", "pairwise.model", "pairwise.objective", "pairwise.model_outputs",
            "pairwise.reference_outputs")
"""Setup keys the row label already represents (`row_label`): they label only rows that would share a name."""
SEED_KEYS = ("judge.seed",)
"""Setup keys that are seeds here (runs differing only there are repeats): the random-swap order's seed."""
FALLBACK_SETUP = ("model", "objective", "objective_name", "objective_hparams", "generator", "decoding", "instructions",
                  "eval_set", "judge_identity", "positions", "unparseable_as")
"""metrics.json fields standing for the setup of records without one (older records)."""
COUNTS = ("wins", "ties", "losses", "unparseable", "n_judged")


def is_judged(run: Mapping) -> bool:
    """Whether a run's metrics hold judging results (`experiments.pipeline.judging.pairwise.judge_pairs`)."""
    return all(key in run for key in ("win_rate", "reference_generator", "judge", "template"))


def row_label(run: Mapping) -> str:
    """`model / objective vs reference` (the objective when known)."""
    model = str(run.get("model") or run.get("generator") or "?")
    objective = run.get("objective")
    return f"{model}{f' / {objective}' if objective else ''} vs {run['reference_generator']}"


def judge_label(run: Mapping) -> str:
    """`judge (template)`, plus the position protocol when it is not both orders."""
    positions = run.get("positions", "both")
    return f"{run['judge']} ({run['template']})" + ("" if positions == "both" else f" [{positions}]")


def _matches(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def _table_run(run: Mapping) -> dict:
    """A copy of `run` with its row and judge labels, and a setup for `group_runs`: seeds dropped, row-label keys moved
    under `row.` (so they label only rows with the same name), the number of judged pairs added."""
    setup = run.get("setup")
    if setup is None:
        setup = {key: run.get(key) for key in FALLBACK_SETUP}
    identity = {(f"row.{key}" if _matches(key, ROW_KEYS) else key): value for key, value in setup.items()
                if not _matches(key, SEED_KEYS)}
    identity["n_pairs"] = run.get("n_pairs")
    return {**run, "setup": identity, "row": row_label(run), "judge_column": judge_label(run)}


def _groups(runs: Sequence[Mapping]) -> dict[tuple[str, str], RunGroup]:
    """`{(row label, judge column): group}`, labelled per experiment; raises ValueError on an ambiguous cell."""
    by_experiment: dict[str, list[dict]] = {}
    for run in runs:
        by_experiment.setdefault(str(run.get("experiment") or "?"), []).append(_table_run(run))
    labelled = []
    for experiment, members in by_experiment.items():
        for group in group_runs(members, row="row", column="judge_column"):
            labelled.append((experiment, re.sub(r"(\(|, )row\.", r"\1", group.label), group))
    experiments_of = {}
    for experiment, label, group in labelled:
        experiments_of.setdefault((label, group.column), set()).add(experiment)
    cells = {}
    for experiment, label, group in labelled:
        label = f"{label} [{experiment}]" if len(experiments_of[(label, group.column)]) > 1 else label
        if (label, group.column) in cells:
            raise ValueError(f"Judged runs of different setups share the table cell ({label}, {group.column}): "
                             f"{[r.get('run_dir', r.get('run_id')) for r in group.runs]}")
        cells[(label, group.column)] = group
    return cells


def _win_rate(run: Mapping) -> float | Mapping:
    rate, se = 100.0 * float(run["win_rate"]), run.get("win_rate_se")
    return rate if se is None else {"mean": rate, "std": 100.0 * float(se)}


def _format(mean: float, spread: float | None, runs: int) -> str:
    return f"{mean:.1f}" + (f" ± {spread:.1f}" if spread is not None else "") + (f" (n={runs})" if runs > 1 else "")


def instruct_tables(runs: Sequence[Mapping]) -> dict[str, Table]:
    """`{"instruct_winrate": Table}`, or `{}` without judged runs; a cell's sources are its pooled runs."""
    judged = [run for run in runs if is_judged(run) and run["win_rate"] is not None]
    if not judged:
        return {}
    groups = _groups(judged)
    rows = sorted({row for row, _ in groups})
    judges = sorted({judge for _, judge in groups})
    cells = pd.DataFrame(MISSING, index=rows, columns=[name for j in judges for name in (j, f"{j} LC")], dtype=object)
    sources = empty_sources(cells)
    values = pd.DataFrame(index=rows, dtype=float)
    for (row, judge), group in groups.items():
        rate, spread, n_runs = aggregate(group, _win_rate)
        lc_runs = [run for run in group.runs if (run.get("length_controlled") or {}).get("win_rate") is not None]
        lcs = [100.0 * float(run["length_controlled"]["win_rate"]) for run in lc_runs]
        lc = statistics.fmean(lcs) if lcs else None
        lc_se = (statistics.stdev(lcs) if len(lcs) > 1 else
                 100.0 * float(lc_runs[0]["length_controlled"].get("win_rate_se") or 0.0) if lcs else None)
        numbers = {"win_rate": rate, "se": spread, "lc_win_rate": lc, "lc_se": lc_se, "runs": n_runs,
                   **{name: sum(run.get(name) or 0 for run in group.runs) for name in COUNTS}}
        for name, number in numbers.items():
            values.loc[row, f"{judge} {name}"] = number
        cells.loc[row, judge] = _format(rate, spread, n_runs)
        sources.at[row, judge] = run_refs(group.runs)
        if lcs:
            sources.at[row, f"{judge} LC"] = run_refs(lc_runs)
            cells.loc[row, f"{judge} LC"] = _format(lc, statistics.stdev(lcs) if len(lcs) > 1 else None, len(lcs))
    for judge in judges:
        for column, key in ((judge, "win_rate"), (f"{judge} LC", "lc_win_rate")):
            numbers = pd.to_numeric(values[f"{judge} {key}"], errors="coerce")
            if len(rows) > 1:
                bold_best(cells, column, numbers, higher_better=True)
    values.index.name = cells.index.name = sources.index.name = "model vs reference"
    return {"instruct_winrate": Table(values, cells, CAPTION, sources)}
