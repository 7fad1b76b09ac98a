"""Aggregate Track-1 runs into tables: `python -m experiments.tables` (or `make tables`).

Writes `<results>/tables/lm_mauve.{md,csv,tex}` (rows = objectives, columns = corpora, cells = MAUVE mean ± std over
sampling seeds, best per corpus in bold) and the same for test perplexity (`lm_perplexity.*`, lower is better).
When several runs share an (objective, corpus) cell, the most recent one (by run id) is used. With runs of several
models, rows are `model / objective`.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from experiments.pipeline.records import load_runs

CORPUS_ORDER = ("wikitext2", "wikitext103", "webtext", "ptb", "writingprompts", "ag_news")
OBJECTIVE_ORDER = ("mle", "mixce", "tailr", "tvd", "emo", "emo2", "adaptive_emo")
TABLES = {  # name -> (how to read (mean, std) from metrics.json, higher is better, decimals)
    "lm_mauve": (lambda m: (m["mauve"]["mean"], m["mauve"]["std"]), True, 3),
    "lm_perplexity": (lambda m: (m["test_perplexity"], None), False, 2),
}


def ordered(values, preferred: Sequence[str]) -> list[str]:
    """Distinct `values` in `preferred` order (by the part after the last ' / '), unknown ones last, by name."""
    rank = {name: i for i, name in enumerate(preferred)}
    return sorted(set(values), key=lambda v: (rank.get(v.split(" / ")[-1], len(rank)), v))


def latest_runs(runs: list[dict]) -> pd.DataFrame:
    """One row per (model, objective, corpus): the most recent run (run ids start with a UTC timestamp)."""
    frame = pd.DataFrame(runs)
    if frame.empty:
        return frame
    frame = frame.sort_values("run_id").groupby(["model", "objective", "corpus"], as_index=False).last()
    multi_model = frame["model"].nunique() > 1
    frame["row"] = [f"{m} / {o}" if multi_model else o for m, o in zip(frame["model"], frame["objective"])]
    return frame


def bold_best(cells: pd.DataFrame, column: str, numbers: pd.Series, higher_better: bool) -> None:
    """Wrap in `**` the cells of `column` whose number (indexed like the rows of `numbers`) is the best."""
    best = numbers.max() if higher_better else numbers.min()
    for row in numbers.index:
        if numbers[row] == best:
            cells.loc[row, column] = f"**{cells.loc[row, column]}**"


def build_table(runs: list[dict], name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`(values, cells)`: numbers (rows x `<corpus> mean`/`<corpus> std`) and `mean ± std` strings with `**best**`."""
    read, higher_better, decimals = TABLES[name]
    frame = latest_runs(runs)
    if frame.empty:
        return pd.DataFrame(), pd.DataFrame()
    stats = {(r["row"], r["corpus"]): read(r) for r in frame.to_dict("records")}
    rows, cols = ordered(frame["row"], OBJECTIVE_ORDER), ordered(frame["corpus"], CORPUS_ORDER)
    values = pd.DataFrame(index=rows, columns=[f"{c} {s}" for c in cols for s in ("mean", "std")], dtype=float)
    cells = pd.DataFrame("–", index=rows, columns=cols)
    for (row, col), (mean, std) in stats.items():
        values.loc[row, f"{col} mean"], values.loc[row, f"{col} std"] = mean, std
        cells.loc[row, col] = f"{mean:.{decimals}f}" + (f" ± {std:.{decimals}f}" if std is not None else "")
    for col in cols:
        bold_best(cells, col, values[f"{col} mean"], higher_better)
    values.index.name = cells.index.name = "objective"
    return values, cells


def _tex_escape(text: str) -> str:
    return text.replace("_", r"\_").replace("±", r"$\pm$").replace("–", "--")


def _latex(cells: pd.DataFrame, caption: str) -> str:
    def tex(cell: str) -> str:
        return rf"\textbf{{{_tex_escape(cell[2:-2])}}}" if cell.startswith("**") else _tex_escape(cell)

    header = " & ".join(["objective", *[_tex_escape(c) for c in cells.columns]])
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{l{'c' * len(cells.columns)}}}", r"\toprule",
             header + r" \\", r"\midrule"]
    lines += [" & ".join([_tex_escape(row), *[tex(c) for c in cells.loc[row]]]) + r" \\" for row in cells.index]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_tables(results_dir: str | Path, experiment: str | None = None) -> dict[str, Path]:
    """Write every table in `TABLES` under `results_dir/tables/`; returns {name: markdown path} for non-empty ones."""
    runs = [r for r in load_runs(results_dir, experiment) if "mauve" in r]
    out_dir = Path(results_dir) / "tables"
    written = {}
    for name in TABLES:
        values, cells = build_table(runs, name)
        if cells.empty:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        what = "MAUVE (mean ± std over sampling seeds)" if name == "lm_mauve" else "Test perplexity"
        scope = f"experiment {experiment}" if experiment else "all experiments"
        tmp_paths = {}
        for suffix, text in (("md", f"{what}, {scope}; best per corpus in bold.\n\n{cells.to_markdown()}\n"),
                             ("tex", _latex(cells, f"{what}, {scope}."))):
            tmp_paths[suffix] = out_dir / f".{name}.{suffix}.tmp"
            tmp_paths[suffix].write_text(text)
        tmp_paths["csv"] = out_dir / f".{name}.csv.tmp"
        values.to_csv(tmp_paths["csv"], quoting=csv.QUOTE_MINIMAL)
        for suffix, tmp in tmp_paths.items():
            os.replace(tmp, out_dir / f"{name}.{suffix}")
        written[name] = out_dir / f"{name}.md"
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: aggregate runs and print the MAUVE table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=os.environ.get("EMO_RESULTS_DIR", "results"))
    parser.add_argument("--experiment", default="lm_gpt2", help="experiment name; 'all' for every experiment")
    parser.add_argument("--wandb-project", default=None, help="also log the tables to this W&B project")
    args = parser.parse_args(argv)
    experiment = None if args.experiment == "all" else args.experiment
    written = write_tables(args.results_dir, experiment)
    if not written:
        print(f"No Track-1 runs found under {args.results_dir} (experiment: {args.experiment}).")
        return 1
    for name, path in written.items():
        print(f"{name}: {path.with_suffix('')}.{{md,csv,tex}}")
    print(written["lm_mauve"].read_text() if "lm_mauve" in written else "")
    if args.wandb_project:
        log_tables_to_wandb(args.wandb_project, args.results_dir, experiment)
    return 0


def log_tables_to_wandb(project: str, results_dir: str | Path, experiment: str | None) -> None:
    """Log the formatted tables as `wandb.Table`s in one W&B run (honours WANDB_MODE)."""
    from experiments.pipeline.tracking import WandbTracker

    runs = [r for r in load_runs(results_dir, experiment) if "mauve" in r]
    tracker = WandbTracker(project=project, name=f"tables-{experiment or 'all'}", config={"experiment": experiment},
                           directory=Path(results_dir) / "tables")
    for name in TABLES:
        _, cells = build_table(runs, name)
        if not cells.empty:
            tracker.log_table(name, cells)
    tracker.finish()


if __name__ == "__main__":
    raise SystemExit(main())
