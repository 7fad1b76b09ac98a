"""The `make demo` report: `python -m experiments.demo` after the demo's runs (see the Makefile's `demo` target).

Reads the runs of the demo experiment (runs on `data=oracle`, whose metrics.json has an `oracle` section; one row
per experiment setup: runs differing only in seeds are averaged, `(n=k)` after MAUVE, a rerun replaces an earlier
one), prints the comparison table and writes `<results>/tables/demo.{md,csv,tex,png}`: per objective the exact
per-token forward KL(oracle||model), reverse KL(model||oracle) and TVD on held-out oracle text, the model's perplexity
there, MAUVE (mean ± std over sampling seeds) of its samples vs held-out oracle text, and the distinct-n of its
samples. A first row shows the starting point, a run that was not trained (`trainer.max_steps=0`): the pre-trained
student (`PRETRAINED_ROW`) in the default demo; a last row the oracle itself (KL = TVD = 0, its own perplexity, the
gold texts' distinct-n). With pre-trained students the caption also gives the pre-training domain's distance from
the target and the pre-trained head's same-class vs cross-class cosines (`pretraining_summary`)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from experiments.pipeline.records import atomic_file, load_runs
from experiments.pipeline.run_groups import OBJECTIVE_ORDER, RunGroup, aggregate, group_runs, ordered
from experiments.pipeline.table_format import Table, bold_best, row_sources, write_table

ORACLE_ROW = "oracle (reference)"
PRETRAINED_ROW = "pre-trained, not fine-tuned"
INITIAL_ROW = "initial model, not trained"
COLUMNS = {  # column -> (read from metrics.json (see run_groups.aggregate), higher is better, decimals)
    "forward KL ↓": (lambda m: m["oracle"]["forward_kl"], False, 3),
    "reverse KL ↓": (lambda m: m["oracle"]["reverse_kl"], False, 3),
    "TVD ↓": (lambda m: m["oracle"]["tvd"], False, 3),
    "MAUVE ↑": (lambda m: m["mauve"], True, 3),
    "perplexity ↓": (lambda m: m["oracle"]["perplexity"], False, 1),
}
MAUVE_STD = "MAUVE std"


def untrained(run: dict) -> bool:
    """Whether a run evaluated its initial model without training it (`trainer.max_steps=0`): a starting-point row."""
    return (run.get("train") or {}).get("global_step") == 0


def demo_groups(runs: Sequence[dict]) -> dict[str, RunGroup]:
    """The table's rows as `{label: RunGroup}`: starting points first (`PRETRAINED_ROW`, or `INITIAL_ROW` for an
    untrained run without pre-training), then the fine-tuned objectives (`run_groups.group_runs`, in
    `OBJECTIVE_ORDER`). Oracle runs only."""
    runs = [r for r in runs if "oracle" in r]
    starts = group_runs([r for r in runs if untrained(r)], column=None)
    groups = {}
    for group in sorted(starts, key=lambda g: g.label):
        base = PRETRAINED_ROW if "pretraining" in group.runs[0] else INITIAL_ROW
        label = base + group.label[len(group.base):]  # what distinguishes several starting points, if any
        groups[label] = RunGroup(base, label, None, group.runs)
    trained = {g.label: g for g in group_runs([r for r in runs if not untrained(r)], column=None)}
    for label in ordered(trained, OBJECTIVE_ORDER, base=lambda label: trained[label].base):
        groups[label] = trained[label]
    return groups


def demo_table(runs: Sequence[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`(values, cells)` for oracle runs: numbers, and strings with the best trained objective per ranked column in
    bold (starting-point and oracle rows are references, never bold).

    Rows are `demo_groups`: runs differing only in seeds are averaged (MAUVE pools its per-seed values), runs of
    different setups get their own labelled rows.
    """
    groups = demo_groups(runs)
    if not groups:
        return pd.DataFrame(), pd.DataFrame()
    rows = list(groups)
    ranked = [r for r in rows if not untrained(groups[r].runs[0])]
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
        if higher_better is not None and ranked:
            bold_best(cells, column, values.loc[ranked, column], higher_better)
    values.insert(0, "runs", [len(groups[r].runs) for r in rows] + [float("nan")])
    values.index.name = cells.index.name = "objective"
    return values, cells


def pretraining_summary(runs: Sequence[dict]) -> str | None:
    """One sentence on the pre-trained student of the oracle runs (None without pre-training): its domain's exact
    distance from the target and its LM head's mean cosine between same-class and between cross-class words, vs the
    random initial head. Several pre-trained students: one clause each."""
    records = {r["pretraining"]["key"]: r["pretraining"] for r in runs if "oracle" in r and r.get("pretraining")}
    clauses = []
    for record in records.values():
        distance, cosine = record["domain_distance"], record["head_cosine"]
        clauses.append(
            f"pre-training: {record['global_step']} steps of {record['spec']['objective']['label']} on a related "
            f"oracle language at forward KL "
            f"{distance['forward_kl']:.3f} / reverse KL {distance['reverse_kl']:.3f} from the target (student "
            f"{record['key']}); mean cosine between its head's rows of words that share a class "
            f"{cosine['pretrained']['same_class']:.3f}, across classes {cosine['pretrained']['cross_class']:.3f} "
            f"(random initial head: {cosine['initial']['same_class']:.3f}, {cosine['initial']['cross_class']:.3f})")
    return "; ".join(clauses) or None


def plot(values: pd.DataFrame, path: Path) -> None:
    """Bar chart: one panel per exact metric and MAUVE (± std), one bar per row (a starting point in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = [r for r in values.index if r != ORACLE_ROW]
    panels = ["forward KL ↓", "reverse KL ↓", "TVD ↓", "MAUVE ↑"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    starts = [r.startswith((PRETRAINED_ROW, INITIAL_ROW)) for r in objectives]
    colors = ["0.6" if start else f"C{i}" for i, start in enumerate(starts)]
    labels = [r.replace(", ", "\n") for r in objectives]
    for ax, column in zip(axes, panels, strict=True):
        errors = values.loc[objectives, MAUVE_STD] if column == "MAUVE ↑" else None
        ax.bar(labels, values.loc[objectives, column], yerr=errors, color=colors, capsize=3)
        ax.set_title(column.replace("↓", "(lower is better)").replace("↑", "(higher is better)"), fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
        if column == "MAUVE ↑":
            low = float((values.loc[objectives, column] - values.loc[objectives, MAUVE_STD]).min())
            ax.set_ylim(max(0.0, low - 0.05), 1.005)
    fig.suptitle("Students of the synthetic oracle language: exact distances and MAUVE", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def report_table(runs: Sequence[dict]) -> Table:
    """The demo table as `make demo` and `make tables` write it: `demo_table` with its caption and sources (a row's
    runs; the reference row's are every run)."""
    values, cells = demo_table(runs)
    caption = ("Students of the synthetic oracle language: exact per-token distances on held-out oracle text (forward "
               "KL = recall/coverage, reverse KL = precision), the student's perplexity there, MAUVE (mean ± std over "
               "sampling seeds) of samples vs held-out oracle text, distinct-n of samples; a starting-point row (not "
               "trained) and the oracle row are references, outside the ranking")
    summary = pretraining_summary(runs)
    if summary:
        caption += f". {summary[0].upper()}{summary[1:]}"
    return Table(values, cells, caption, row_sources(cells, demo_groups(runs).values()))


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
