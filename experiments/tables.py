"""Aggregate runs into tables: `python -m experiments.tables [--experiment NAME|all]` (or `make tables`).

Every builder in `TABLE_BUILDERS` (experiment kind -> `builder(runs) -> {table name: Table}`) sees the loaded runs,
keeps those it understands and returns its tables; `write_tables` writes each as `<results>/tables/<name>.{md,csv,tex}`
(cells `mean ± std`, best per column in bold; the CSV holds the numbers). Track 1 (`lm`) writes `lm_mauve` (rows =
objectives, columns = corpora, MAUVE over sampling seeds) and `lm_perplexity` (test perplexity, lower is better).

Tables never merge different experiments (`experiments.pipeline.run_groups`, shared with the track builders). A run's
identity is its `setup` (the resolved config without seeds and bookkeeping, `records.run_setup`) plus the sizes derived
from config and data (`DERIVED_SIZES`); records without a setup fall back to the `FALLBACK_IDENTITY` fields of
metrics.json. Runs of the same identity that differ only in their seeds are aggregated into one cell (values pooled,
`(n=3)` says how many runs); a rerun with the same seeds replaces the earlier one. Runs of different identities get
their own rows, labelled with what differs, e.g. `emo (decoding=top_p)` or `emo (objective.hparams.gt_q=true)`; two that
would still share a cell are an error.

A new track registers one builder: `TABLE_BUILDERS["kind"] = my_tables`, where `my_tables` typically calls
`pivot_table(runs, read=..., higher_better=..., decimals=..., column="task")` and wraps the result with a caption.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from experiments.pipeline.icl_table import icl_tables
from experiments.pipeline.records import load_runs
from experiments.pipeline.run_groups import aggregate, group_runs, ordered
from experiments.pipeline.winrate_table import instruct_tables

CORPUS_ORDER = ("wikitext2", "wikitext103", "webtext", "ptb", "writingprompts", "ag_news")
OBJECTIVE_ORDER = ("mle", "mixce", "tailr", "tvd", "emo", "emo2", "adaptive_emo")


class Table(NamedTuple):
    """A built table: `values` (numbers, written to CSV), `cells` (formatted strings, written to md/tex), caption."""

    values: pd.DataFrame
    cells: pd.DataFrame
    caption: str = ""


def bold_best(cells: pd.DataFrame, column: str, numbers: pd.Series, higher_better: bool) -> None:
    """Wrap in `**` the cells of `column` whose number (indexed like the rows of `numbers`) is the best."""
    best = numbers.max() if higher_better else numbers.min()
    for row in numbers.index:
        if numbers[row] == best:
            cells.loc[row, column] = f"**{cells.loc[row, column]}**"


def pivot_table(runs: Sequence[Mapping], *, read: Callable[[Mapping], object], higher_better: bool, decimals: int,
                row: str = "objective", column: str = "corpus", row_order: Sequence[str] = OBJECTIVE_ORDER,
                column_order: Sequence[str] = ()) -> Table:
    """Rows = experiment setups labelled by `row`, columns = values of `column`, cells = `aggregate(read)`.

    `values` has `<col> mean` and `<col> std` columns (and `<col> runs` when some cell pools several runs);
    `cells` has `mean ± std` strings (` (n=3)` for pooled runs), the best per column in bold. Empty without runs.
    """
    groups = group_runs(runs, row=row, column=column)
    if not groups:
        return Table(pd.DataFrame(), pd.DataFrame())
    bases = {g.label: g.base for g in groups}
    rows = ordered(bases, row_order, base=bases.get)
    cols = ordered([g.column for g in groups], column_order)
    stats = {(g.label, g.column): aggregate(g, read) for g in groups}
    pooled = any(n > 1 for _, _, n in stats.values())
    suffixes = ("mean", "std", "runs") if pooled else ("mean", "std")
    values = pd.DataFrame(index=rows, columns=[f"{c} {s}" for c in cols for s in suffixes], dtype=float)
    cells = pd.DataFrame("–", index=rows, columns=cols)
    for (label, col), (mean, std, n) in stats.items():
        values.loc[label, f"{col} mean"], values.loc[label, f"{col} std"] = mean, std
        if pooled:
            values.loc[label, f"{col} runs"] = n
        cells.loc[label, col] = (f"{mean:.{decimals}f}" + (f" ± {std:.{decimals}f}" if std is not None else "")
                                 + (f" (n={n})" if n > 1 else ""))
    for col in cols:
        bold_best(cells, col, values[f"{col} mean"], higher_better)
    values.index.name = cells.index.name = row
    cells.columns.name = column
    return Table(values, cells)


def lm_tables(runs: Sequence[Mapping]) -> dict[str, Table]:
    """Track 1: `lm_mauve` and `lm_perplexity` (rows = objectives, columns = corpora) from runs with MAUVE."""
    runs = [r for r in runs if "mauve" in r and "test_perplexity" in r]
    specs = {  # name -> (read, higher is better, decimals, caption)
        "lm_mauve": (lambda m: m["mauve"], True, 3, "MAUVE (mean ± std over sampling seeds)"),
        "lm_perplexity": (lambda m: m["test_perplexity"], False, 2, "Test perplexity"),
    }
    tables = {}
    for name, (read, higher_better, decimals, caption) in specs.items():
        table = pivot_table(runs, read=read, higher_better=higher_better, decimals=decimals,
                            column_order=CORPUS_ORDER)
        tables[name] = table._replace(caption=caption)
    return tables


TABLE_BUILDERS: dict[str, Callable[[Sequence[Mapping]], Mapping[str, Table]]] = {
    "lm": lm_tables,
    "instruct": instruct_tables,
    "icl": icl_tables,
}
"""Experiment kind -> builder(runs) -> {table name: Table or (values, cells[, caption])}."""


def _tex_escape(text: str) -> str:
    return text.replace("_", r"\_").replace("±", r"$\pm$").replace("–", "--")


def latex(cells: pd.DataFrame, caption: str) -> str:
    """A booktabs `table` environment for formatted cells (`**x**` becomes `\\textbf{x}`)."""
    def tex(cell: str) -> str:
        return rf"\textbf{{{_tex_escape(cell[2:-2])}}}" if cell.startswith("**") else _tex_escape(cell)

    header = " & ".join([_tex_escape(cells.index.name or ""), *[_tex_escape(str(c)) for c in cells.columns]])
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{l{'c' * len(cells.columns)}}}", r"\toprule",
             header + r" \\", r"\midrule"]
    lines += [" & ".join([_tex_escape(str(row)), *[tex(str(c)) for c in cells.loc[row]]]) + r" \\"
              for row in cells.index]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table_files(name: str, values: pd.DataFrame, cells: pd.DataFrame, out_dir: str | Path,
                      caption: str) -> Path:
    """Write `out_dir/<name>.{md,csv,tex}` atomically (each via a temporary file); returns the markdown path.

    `caption` (a sentence without its final period) heads the markdown, which adds "best per <columns' name> in
    bold", and captions the LaTeX table; the CSV holds `values`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_paths = {suffix: out_dir / f".{name}.{suffix}.tmp" for suffix in ("md", "tex", "csv")}
    best = f"best per {cells.columns.name or 'column'} in bold"
    tmp_paths["md"].write_text(f"{caption}; {best}.\n\n{cells.to_markdown(disable_numparse=True)}\n")
    tmp_paths["tex"].write_text(latex(cells, f"{caption}."))
    values.to_csv(tmp_paths["csv"], quoting=csv.QUOTE_MINIMAL)
    for suffix, tmp in tmp_paths.items():
        os.replace(tmp, out_dir / f"{name}.{suffix}")
    return out_dir / f"{name}.md"


def build_tables(runs: Sequence[Mapping]) -> dict[str, Table]:
    """Every non-empty table of every registered builder, by name (names must be unique across builders)."""
    tables = {}
    for kind, builder in TABLE_BUILDERS.items():
        for name, result in builder(runs).items():
            table = Table(*result)
            if table.cells.empty:
                continue
            if name in tables:
                raise ValueError(f"Table name {name!r} of builder {kind!r} is already used by another builder.")
            tables[name] = table
    return tables


def write_tables(results_dir: str | Path, experiment: str | None = None) -> dict[str, Path]:
    """Write every table built from the runs under `results_dir` (optionally one experiment) to
    `results_dir/tables/`; returns {name: markdown path}."""
    scope = f"experiment {experiment}" if experiment else "all experiments"
    written = {}
    for name, table in build_tables(load_runs(results_dir, experiment)).items():
        pooled = table.cells.map(lambda cell: "(n=" in str(cell)).to_numpy().any()
        caption = (f"{table.caption or name}, {scope}"
                   + ("; (n=k): k runs pooled that differ only in their seeds" if pooled else ""))
        written[name] = write_table_files(name, table.values, table.cells, Path(results_dir) / "tables", caption)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: aggregate runs, write and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=os.environ.get("EMO_RESULTS_DIR", "results"))
    parser.add_argument("--experiment", default="lm_gpt2", help="experiment name; 'all' for every experiment")
    parser.add_argument("--wandb-project", default=None, help="also log the tables to this W&B project")
    args = parser.parse_args(argv)
    experiment = None if args.experiment == "all" else args.experiment
    written = write_tables(args.results_dir, experiment)
    if not written:
        print(f"No runs with a table under {args.results_dir} (experiment: {args.experiment}).")
        return 1
    for name, path in written.items():
        print(f"{name}: {path.with_suffix('')}.{{md,csv,tex}}")
        print(path.read_text())
    if args.wandb_project:
        log_tables_to_wandb(args.wandb_project, args.results_dir, experiment)
    return 0


def log_tables_to_wandb(project: str, results_dir: str | Path, experiment: str | None) -> None:
    """Log the formatted tables as `wandb.Table`s in one W&B run (honours WANDB_MODE)."""
    from experiments.pipeline.tracking import WandbTracker

    tracker = WandbTracker(project=project, name=f"tables-{experiment or 'all'}", config={"experiment": experiment},
                           directory=Path(results_dir) / "tables")
    for name, table in build_tables(load_runs(results_dir, experiment)).items():
        tracker.log_table(name, table.cells)
    tracker.finish()


if __name__ == "__main__":
    raise SystemExit(main())
