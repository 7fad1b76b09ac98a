"""The `make demo` report: `python -m experiments.demo` after `python run.py -m experiment=demo objective=...`.

Reads the runs of the demo experiment (runs on `data=oracle`, whose metrics.json has an `oracle` section; one row
per experiment setup: runs differing only in seeds are averaged, `(n=k)` after MAUVE, a rerun replaces an earlier
one), prints the comparison table and writes `<results>/tables/demo.{md,csv,png}`: per objective the exact per-token
forward KL(oracle||model), reverse KL(model||oracle) and TVD on held-out oracle text, the model's perplexity there,
MAUVE (mean ± std over sampling seeds) of its samples vs held-out oracle text, and the distinct-n of its samples.
A last row shows the oracle itself (KL = TVD = 0, its own perplexity, the gold texts' distinct-n).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from experiments.pipeline.records import load_runs
from experiments.pipeline.run_groups import OBJECTIVE_ORDER, aggregate, group_runs, ordered
from experiments.pipeline.table_format import Table, bold_best, row_sources, write_table

ORACLE_ROW = "oracle (reference)"
COLUMNS = {  # column -> (read from metrics.json (see run_groups.aggregate), higher is better, decimals)
    "forward KL ↓": (lambda m: m["oracle"]["forward_kl"], False, 3),
    "reverse KL ↓": (lambda m: m["oracle"]["reverse_kl"], False, 3),
    "TVD ↓": (lambda m: m["oracle"]["tvd"], False, 3),
    "MAUVE ↑": (lambda m: m["mauve"], True, 3),
    "perplexity ↓": (lambda m: m["oracle"]["perplexity"], False, 1),
}
MAUVE_STD = "MAUVE std"


def demo_table(runs: Sequence[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`(values, cells)` for oracle runs: numbers, and strings with the best objective per ranked column in bold.

    Rows are experiment setups (`experiments.tables.group_runs`): runs differing only in seeds are averaged (MAUVE
    pools its per-seed values), runs of different setups get their own labelled rows.
    """
    groups = {g.label: g for g in group_runs([r for r in runs if "oracle" in r], column=None)}
    if not groups:
        return pd.DataFrame(), pd.DataFrame()
    rows = ordered(groups, OBJECTIVE_ORDER, base=lambda label: groups[label].base)
    first = groups[rows[0]].runs[0]
    distinct = sorted(k for k in first["diversity"] if k.startswith("distinct_"))
    values = pd.DataFrame(index=[*rows, ORACLE_ROW], dtype=float)
    for column, (read, _, _) in COLUMNS.items():
        values[column] = [aggregate(groups[r], read)[0] for r in rows] + [float("nan")]
    values[MAUVE_STD] = [aggregate(groups[r], COLUMNS["MAUVE ↑"][0])[1] for r in rows] + [float("nan")]
    for key in distinct:
        values[key.replace("_", "-")] = [aggregate(groups[r], lambda m: m["diversity"][key])[0] for r in rows] + [
            first["gold_diversity"][key]]
    values.loc[ORACLE_ROW, ["forward KL ↓", "reverse KL ↓", "TVD ↓"]] = 0.0
    values.loc[ORACLE_ROW, "perplexity ↓"] = math.exp(first["oracle"]["oracle_cross_entropy"])

    cells = pd.DataFrame("–", index=values.index, columns=[c for c in values.columns if c != MAUVE_STD])
    for column in cells.columns:
        _, higher_better, decimals = COLUMNS.get(column, (None, None, 3))
        for row in values.index:
            value = values.loc[row, column]
            if pd.isna(value):
                continue
            cells.loc[row, column] = f"{value:.{decimals}f}"
            if column == "MAUVE ↑" and not pd.isna(values.loc[row, MAUVE_STD]):
                cells.loc[row, column] += f" ± {values.loc[row, MAUVE_STD]:.{decimals}f}"
            if column == "MAUVE ↑" and len(groups[row].runs) > 1:
                cells.loc[row, column] += f" (n={len(groups[row].runs)})"
        if higher_better is not None:
            bold_best(cells, column, values.loc[rows, column], higher_better)
    values.insert(0, "runs", [len(groups[r].runs) for r in rows] + [float("nan")])
    values.index.name = cells.index.name = "objective"
    return values, cells


def plot(values: pd.DataFrame, path: Path) -> None:
    """Bar chart: one panel per exact metric and MAUVE (± std), one bar per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = [r for r in values.index if r != ORACLE_ROW]
    panels = ["forward KL ↓", "reverse KL ↓", "TVD ↓", "MAUVE ↑"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    colors = [f"C{i}" for i in range(len(objectives))]
    for ax, column in zip(axes, panels, strict=True):
        errors = values.loc[objectives, MAUVE_STD] if column == "MAUVE ↑" else None
        ax.bar(objectives, values.loc[objectives, column], yerr=errors, color=colors, capsize=3)
        ax.set_title(column.replace("↓", "(lower is better)").replace("↑", "(higher is better)"), fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        if column == "MAUVE ↑":
            low = float((values.loc[objectives, column] - values.loc[objectives, MAUVE_STD]).min())
            ax.set_ylim(max(0.0, low - 0.05), 1.005)
    fig.suptitle("Students of the synthetic oracle language: exact distances and MAUVE", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_table(runs: Sequence[dict]) -> Table:
    """The demo table as `make demo` and `make tables` write it: `demo_table` with its caption and sources (a row's
    runs; the reference row's are every run)."""
    values, cells = demo_table(runs)
    caption = ("Students of the synthetic oracle language: exact per-token distances on held-out oracle text (forward "
               "KL = recall/coverage, reverse KL = precision), the student's perplexity there, MAUVE (mean ± std over "
               "sampling seeds) of samples vs held-out oracle text, distinct-n of samples")
    groups = group_runs([r for r in runs if "oracle" in r], column=None)
    return Table(values, cells, caption, row_sources(cells, groups))


def write_demo_report(results_dir: str | Path, experiment: str = "demo") -> dict[str, Path] | None:
    """Write `<results_dir>/tables/<experiment>.{md,csv,tex,png}` (and its lines of `sources.csv`); returns their
    paths, or None without oracle runs."""
    table = report_table(load_runs(results_dir, experiment))
    if table.cells.empty:
        return None
    markdown = write_table(Path(results_dir) / "tables", experiment, table)
    paths = {suffix: markdown.with_suffix(f".{suffix}") for suffix in ("md", "csv", "tex", "png")}
    plot(table.values, paths["png"])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the demo table and chart, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=os.environ.get("EMO_RESULTS_DIR", "results"))
    parser.add_argument("--experiment", default="demo")
    args = parser.parse_args(argv)
    paths = write_demo_report(args.results_dir, args.experiment)
    if paths is None:
        print(f"No oracle runs found under {args.results_dir}/{args.experiment}.")
        return 1
    print(paths["md"].read_text())
    print("Written:", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
