"""The instruction-following win-rate table (`results/tables/instruct_winrate.{md,csv,tex}`), registered in
`experiments.tables`.

Reads every run whose metrics.json holds pairwise-judging metrics (`experiment=judge`, and SFT runs that judge their
answers): rows = model / objective vs reference; for each judge (judge name and template, plus the position protocol
when it is not `both`) two columns: the win rate in % ± its standard error, and the length-controlled win rate in %.
The latest run (by run id) of a (row, judge) cell wins. When runs judged different numbers of pairs (e.g. a
`pairwise.max_instructions` subset), the number is added to the row label so they are never silently mixed. The CSV
holds the numbers, counts included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

CAPTION = ("Pairwise win rate against the reference (%, wins + ties/2, ± standard error; LC: length-controlled, "
           "AlpacaEval-style GLM fitted offline)")


def is_judged(run: Mapping) -> bool:
    """Whether a run's metrics hold judging results (`experiments.pipeline.judging.judge_outputs`)."""
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


def _percent(value) -> float | None:
    return None if value is None else 100.0 * float(value)


def instruct_tables(runs: Sequence[Mapping]) -> dict[str, tuple[pd.DataFrame, pd.DataFrame, str]]:
    """`{"instruct_winrate": (values, cells, caption)}`, or `{}` without judged runs."""
    judged = sorted((r for r in runs if is_judged(r)), key=lambda r: str(r.get("run_id", "")))
    several_sizes = len({r.get("n_pairs") for r in judged}) > 1  # e.g. a pairwise.max_instructions subset
    latest: dict[tuple[str, str], Mapping] = {}
    for run in judged:
        row = row_label(run) + (f" [n={run.get('n_pairs')}]" if several_sizes else "")
        latest[(row, judge_label(run))] = run
    if not latest:
        return {}
    rows = sorted({row for row, _ in latest})
    judges = sorted({judge for _, judge in latest})
    columns = [name for judge in judges for name in (judge, f"{judge} LC")]
    cells = pd.DataFrame("–", index=rows, columns=columns, dtype=object)
    values = pd.DataFrame(index=rows, dtype=float)
    for (row, judge), run in latest.items():
        rate, se = _percent(run["win_rate"]), _percent(run.get("win_rate_se"))
        lc = _percent((run.get("length_controlled") or {}).get("win_rate"))
        numbers = {"win_rate": rate, "se": se, "lc_win_rate": lc, "wins": run.get("wins"), "ties": run.get("ties"),
                   "losses": run.get("losses"), "unparseable": run.get("unparseable"), "n": run.get("n_judged")}
        for name, number in numbers.items():
            values.loc[row, f"{judge} {name}"] = number
        if rate is not None:
            cells.loc[row, judge] = f"{rate:.1f}" + (f" ± {se:.1f}" if se is not None else "")
        if lc is not None:
            cells.loc[row, f"{judge} LC"] = f"{lc:.1f}"
    for judge in judges:
        for column, key in ((judge, "win_rate"), (f"{judge} LC", "lc_win_rate")):
            numbers = pd.to_numeric(values[f"{judge} {key}"], errors="coerce")
            if len(rows) > 1 and numbers.notna().any():
                for row in numbers.index[numbers == numbers.max()]:
                    cells.loc[row, column] = f"**{cells.loc[row, column]}**"
    values.index.name = cells.index.name = "model vs reference"
    return {"instruct_winrate": (values, cells, CAPTION)}
