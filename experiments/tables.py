"""Every table from the runs under results/: `python -m experiments.tables [--experiment NAME]` (`make tables`).

Without `--experiment` (or with `all`) every run under the results directory (`EMO_RESULTS_DIR`, default `results`)
is read; each builder in `TABLE_BUILDERS` (kind -> `builder(runs) -> {table name: Table}`) keeps the runs it
understands, and each table goes to `<results>/tables/<name>.{md,csv,tex}` (booktabs LaTeX, best in bold, `–` where
there is no result; the CSV holds the numbers) with its lines of `<results>/tables/sources.csv` (table, row, column,
run ids behind the cell), all written atomically (`experiments.pipeline.table_format`):

- Track 1 (`lm`, `experiments.pipeline.lm_table`): per model, `lm_mauve_<model>` and `lm_perplexity_<model>`
  (perplexity and diversity); rows = objectives, columns = corpora.
- Track 2 (`icl`, `experiments.pipeline.icl_table`): `icl_accuracy`, accuracy per task and average, base-model rows.
- Track 3 (`instruct`, `experiments.pipeline.judging.table`): `instruct_winrate`, win rates per judge.
- The demo (`demo`, `experiments.demo.report_table`): one table per experiment with oracle runs, named after it.

Tables never merge different experiment setups (`experiments.pipeline.run_groups`): runs that differ only in their
seeds are pooled into one cell (`mean ± std (n=k)`), a rerun with the same seeds replaces the earlier one, and runs
that differ in anything else get their own rows, labelled with what differs, e.g. `emo (decoding=top_p)`.
A new track registers one builder: `TABLE_BUILDERS["kind"] = my_tables`, where `my_tables` typically calls
`table_format.pivot_table(runs, read=..., higher_better=..., decimals=..., column="task")` and adds a caption.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from experiments.demo import report_table
from experiments.pipeline.icl_table import icl_tables
from experiments.pipeline.lm_table import lm_tables
from experiments.pipeline.records import load_runs
from experiments.pipeline.run_groups import run_ref
from experiments.pipeline.table_format import SOURCES_FILE, Table, write_table
from experiments.pipeline.judging.table import instruct_tables


def demo_tables(runs: Sequence[Mapping]) -> dict[str, Table]:
    """The `make demo` table (`experiments.demo.report_table`) of each experiment with oracle runs, named after it."""
    by_experiment: dict[str, list[Mapping]] = {}
    for run in runs:
        if "oracle" in run:
            by_experiment.setdefault(run_ref(run).split("/", 1)[0], []).append(run)
    return {experiment: report_table(members) for experiment, members in sorted(by_experiment.items())}


TABLE_BUILDERS: dict[str, Callable[[Sequence[Mapping]], Mapping[str, Table]]] = {
    "lm": lm_tables,
    "icl": icl_tables,
    "instruct": instruct_tables,
    "demo": demo_tables,
}
"""Builder kind -> builder(runs) -> {table name: Table}."""


def build_tables(runs: Sequence[Mapping]) -> dict[str, dict[str, Table]]:
    """`{builder kind: {table name: Table}}` of every registered builder's non-empty tables (names are unique across
    builders)."""
    tables: dict[str, dict[str, Table]] = {}
    names: dict[str, str] = {}
    for kind, builder in TABLE_BUILDERS.items():
        tables[kind] = {}
        for name, table in builder(runs).items():
            if table.cells.empty:
                continue
            if name in names:
                raise ValueError(f"Table name {name!r} of builder {kind!r} is already used by builder {names[name]!r}.")
            names[name] = kind
            tables[kind][name] = table
    return tables


def write_tables(results_dir: str | Path, experiment: str | None = None) -> dict[str, dict[str, Path]]:
    """Write every table built from the runs under `results_dir` (optionally one experiment) to
    `results_dir/tables/`; returns `{builder kind: {table name: markdown path}}` (empty for a builder without runs)."""
    out_dir = Path(results_dir) / "tables"
    return {kind: {name: write_table(out_dir, name, table) for name, table in tables.items()}
            for kind, tables in build_tables(load_runs(results_dir, experiment)).items()}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write and print the tables, then say what was written and which builders found no runs. Exit status 1
    when a named experiment gives no table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=os.environ.get("EMO_RESULTS_DIR", "results"))
    parser.add_argument("--experiment", default="all", help="one experiment's runs only (default: all)")
    parser.add_argument("--wandb-project", default=None, help="also log the tables to this W&B project")
    args = parser.parse_args(argv)
    experiment = None if args.experiment == "all" else args.experiment
    written = write_tables(args.results_dir, experiment)
    names = [name for tables in written.values() for name in tables]
    for path in (path for tables in written.values() for path in tables.values()):
        print(f"{path.with_suffix('')}.{{md,csv,tex}}\n{path.read_text()}")
    idle = [kind for kind, tables in written.items() if not tables]
    scope = f"experiment {experiment}" if experiment else "all experiments"
    if not names:
        print(f"No runs with a table under {args.results_dir} ({scope}): nothing written.")
        return 1 if experiment else 0
    print(f"Wrote {len(names)} table(s) from {scope} to {Path(args.results_dir) / 'tables'} (md, csv, tex; run ids "
          f"per cell in {SOURCES_FILE}): {', '.join(names)}."
          + (f" No runs for: {', '.join(idle)}." if idle else ""))
    if args.wandb_project:
        log_tables_to_wandb(args.wandb_project, args.results_dir, experiment)
    return 0


def log_tables_to_wandb(project: str, results_dir: str | Path, experiment: str | None) -> None:
    """Log the formatted tables as `wandb.Table`s in one W&B run (honours WANDB_MODE)."""
    from experiments.pipeline.tracking import WandbTracker

    tracker = WandbTracker(project=project, name=f"tables-{experiment or 'all'}", config={"experiment": experiment},
                           directory=Path(results_dir) / "tables")
    for tables in build_tables(load_runs(results_dir, experiment)).values():
        for name, table in tables.items():
            tracker.log_table(name, table.cells)
    tracker.finish()


if __name__ == "__main__":
    raise SystemExit(main())
