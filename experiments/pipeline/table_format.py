"""What every table shares: `Table` (numbers, formatted cells, caption, and the runs behind each cell), `pivot_table`
(runs -> rows x columns of `mean ± std`), bold-best, booktabs LaTeX, and `write_table`, which writes
`<dir>/<name>.{md,csv,tex}` and the table's rows of `<dir>/sources.csv`.

Every file is written atomically (a temporary file in the same folder, renamed into place with `os.replace`), and
`sources.csv` is updated under a file lock, so concurrent jobs never see or produce a half-written table. A cell
without a result reads `–` (empty in the CSV): nothing is filled or imputed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from filelock import FileLock

from experiments.pipeline.records import atomic_file
from experiments.pipeline.run_groups import OBJECTIVE_ORDER, RunGroup, aggregate, group_runs, ordered, run_refs

MISSING = "–"
SOURCES_FILE = "sources.csv"
SOURCES_HEADER = ("table", "row", "column", "run_ids")
"""`sources.csv`: one line per cell of every table written; `run_ids` are `<experiment>/<run id>` joined by `;`."""


class Table(NamedTuple):
    """A built table: `values` (numbers, written to CSV), `cells` (formatted strings, md/tex; `MISSING` where there
    is no result), `caption` (a sentence without its final period), and `sources` (indexed like `cells`: the tuple of
    `run_refs` behind each cell; `empty_sources`)."""

    values: pd.DataFrame
    cells: pd.DataFrame
    caption: str = ""
    sources: pd.DataFrame | None = None


def empty_sources(cells: pd.DataFrame) -> pd.DataFrame:
    """A sources frame for `cells` with no run behind any cell yet."""
    return pd.DataFrame([[() for _ in cells.columns] for _ in cells.index], index=cells.index, columns=cells.columns,
                        dtype=object)


def row_sources(cells: pd.DataFrame, groups: Sequence[RunGroup]) -> pd.DataFrame:
    """Sources for a table whose rows are `groups` (by label): a group's row is its runs; any other row (a reference
    row computed from the records) is every group's runs."""
    by_label = {group.label: run_refs(group.runs) for group in groups}
    every = run_refs([run for group in groups for run in group.runs])
    sources = empty_sources(cells)
    for row in cells.index:
        for column in cells.columns:
            sources.at[row, column] = by_label.get(row, every)
    return sources


def bold_best(cells: pd.DataFrame, column: str, numbers: pd.Series, higher_better: bool) -> None:
    """Wrap in `**` the cells of `column` whose number (indexed like the rows of `numbers`) is the best (NaN never)."""
    best = numbers.max() if higher_better else numbers.min()
    for row in numbers.index:
        if numbers[row] == best:
            cells.loc[row, column] = f"**{cells.loc[row, column]}**"


def pivot_table(runs: Sequence[Mapping], *, read: Callable[[Mapping], object], higher_better: bool | None,
                decimals: int, row: str = "objective", column: str = "corpus",
                row_order: Sequence[str] = OBJECTIVE_ORDER, column_order: Sequence[str] = ()) -> Table:
    """Rows = experiment setups labelled by `row`, columns = values of `column`, cells = `aggregate(read)`.

    `values` has `<col> mean` and `<col> std` columns (and `<col> runs` when some cell pools several runs);
    `cells` has `mean ± std` strings (` (n=3)` for pooled runs), `MISSING` where no run, the best per column in bold
    (none when `higher_better` is None). Empty without runs.
    """
    groups = group_runs(runs, row=row, column=column)
    if not groups:
        return Table(pd.DataFrame(), pd.DataFrame(), sources=pd.DataFrame())
    bases = {g.label: g.base for g in groups}
    rows = ordered(bases, row_order, base=bases.get)
    cols = ordered([g.column for g in groups], column_order)
    stats = {(g.label, g.column): aggregate(g, read) for g in groups}
    pooled = any(n > 1 for _, _, n in stats.values())
    suffixes = ("mean", "std", "runs") if pooled else ("mean", "std")
    values = pd.DataFrame(index=rows, columns=[f"{c} {s}" for c in cols for s in suffixes], dtype=float)
    cells = pd.DataFrame(MISSING, index=rows, columns=cols)
    sources = empty_sources(cells)
    for group in groups:
        label, col = group.label, group.column
        mean, std, n = stats[(label, col)]
        values.loc[label, f"{col} mean"], values.loc[label, f"{col} std"] = mean, std
        if pooled:
            values.loc[label, f"{col} runs"] = n
        cells.loc[label, col] = (f"{mean:.{decimals}f}" + (f" ± {std:.{decimals}f}" if std is not None else "")
                                 + (f" (n={n})" if n > 1 else ""))
        sources.at[label, col] = run_refs(group.runs)
    if higher_better is not None:
        for col in cols:
            bold_best(cells, col, values[f"{col} mean"], higher_better)
    values.index.name = cells.index.name = sources.index.name = row
    cells.columns.name = column
    return Table(values, cells, sources=sources)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "$": r"\$", "{": r"\{",
        "}": r"\}", "±": r"$\pm$", "–": "--", "↓": r"$\downarrow$", "↑": r"$\uparrow$"}


def tex_escape(text: str) -> str:
    """`text` with LaTeX's special characters (and ±, –, arrows) escaped."""
    return "".join(_TEX.get(char, char) for char in text)


def latex(cells: pd.DataFrame, caption: str) -> str:
    """A booktabs `table` environment (`\\toprule`, `\\midrule`, `\\bottomrule`; needs `\\usepackage{booktabs}`)
    for formatted cells (`**x**` becomes `\\textbf{x}`)."""
    def tex(cell: str) -> str:
        return rf"\textbf{{{tex_escape(cell[2:-2])}}}" if cell.startswith("**") else tex_escape(cell)

    header = " & ".join([tex_escape(cells.index.name or ""), *[tex_escape(str(c)) for c in cells.columns]])
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{l{'c' * len(cells.columns)}}}", r"\toprule",
             header + r" \\", r"\midrule"]
    lines += [" & ".join([tex_escape(str(row)), *[tex(str(c)) for c in cells.loc[row]]]) + r" \\"
              for row in cells.index]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{tex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (`records.atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def full_caption(table: Table) -> str:
    """The caption as written: the table's own, the experiments behind it, and what bold, `(n=k)` and `–` mean."""
    refs = {ref for cell in table.sources.to_numpy().ravel() for ref in cell}
    experiments = sorted({ref.split("/", 1)[0] for ref in refs})
    cells = table.cells.to_numpy().ravel()
    parts = [table.caption,
             f"{len(refs)} run{'s' * (len(refs) != 1)} of experiment{'s' * (len(experiments) != 1)} "
             + ", ".join(experiments),
             f"best per {table.cells.columns.name or 'column'} in bold"]
    if any("(n=" in str(cell) for cell in cells):
        parts.append("(n=k): k runs pooled that differ only in their seeds")
    if any(MISSING in str(cell) for cell in cells):
        parts.append(f"{MISSING}: no result")
    return "; ".join(part for part in parts if part)


def write_table(out_dir: str | Path, name: str, table: Table) -> Path:
    """Write `out_dir/<name>.{md,csv,tex}` (the CSV holds `values`) and replace the table's rows of
    `out_dir/sources.csv`, each atomically; returns the markdown path."""
    if table.sources is None:
        raise ValueError(f"Table {name!r} has no sources: its builder must say which runs are behind each cell.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    caption = full_caption(table)
    write_text_atomic(out_dir / f"{name}.md", f"{caption}.\n\n{table.cells.to_markdown(disable_numparse=True)}\n")
    write_text_atomic(out_dir / f"{name}.tex", latex(table.cells, f"{caption}."))
    write_text_atomic(out_dir / f"{name}.csv", table.values.to_csv(quoting=csv.QUOTE_MINIMAL))
    rows = [(name, str(row), str(column), ";".join(table.sources.at[row, column]))
            for row in table.cells.index for column in table.cells.columns]
    update_sources(out_dir, name, rows)
    return out_dir / f"{name}.md"


def update_sources(out_dir: Path, name: str, rows: Sequence[Sequence[str]]) -> None:
    """Replace the lines of table `name` in `out_dir/sources.csv` by `rows` (other tables' lines are kept; lines
    sorted by table, each table's in its own order)."""
    path = out_dir / SOURCES_FILE
    with FileLock(out_dir / f".{SOURCES_FILE}.lock"):
        kept = []
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as stream:
                kept = [line for line in list(csv.reader(stream))[1:] if line[0] != name]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(SOURCES_HEADER)
        writer.writerows(sorted([*kept, *rows], key=lambda line: line[0]))
        write_text_atomic(path, buffer.getvalue())
