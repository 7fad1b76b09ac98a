"""The notebooks in `notebooks/`: where they read runs, and `make notebooks` (`python -m experiments.notebooks`).

A notebook reads run records only (`records.load_runs`) from the results directory that `EMO_RESULTS_DIR` names
(default: the repository's `results/`), never trains, and raises `MissingResults`, naming the command that produces
them, when the runs it plots are not there. `python -m experiments.notebooks [--results-dir DIR] [NOTEBOOK ...]`
executes the notebooks (default: all of `notebooks/`) with nbclient against DIR, writes each executed copy, figures
included, to `DIR/notebooks/<name>.ipynb` (also when a cell failed, up to that cell), and exits non-zero if a cell
of any notebook raised. The notebooks themselves stay in git without outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from experiments.pipeline.records import atomic_file, load_runs

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
EXECUTED_DIR = "notebooks"
"""Folder of the results directory that receives the executed copies."""


class MissingResults(FileNotFoundError):
    """The runs a notebook plots are not under the results directory."""


def results_dir() -> Path:
    """The results directory the notebooks read: `EMO_RESULTS_DIR`, else the repository's `results/`."""
    return Path(os.environ.get("EMO_RESULTS_DIR") or REPO_ROOT / "results")


def runs_by_experiment(select: Callable[[dict], bool], *, what: str, how: str,
                       experiments: Iterable[str] | None = None, root: str | Path | None = None) -> dict[str, list]:
    """`{experiment: runs}` of the complete runs under `root` (default `results_dir()`) that `select` keeps,
    optionally only those of `experiments`. Raises `MissingResults` saying that `what` is missing and `how` to
    produce it when no run is kept."""
    root = Path(root) if root is not None else results_dir()
    wanted = None if experiments is None else set(experiments)
    grouped: dict[str, list] = {}
    for run in load_runs(root):
        experiment = Path(run["run_dir"]).parent.name
        if select(run) and (wanted is None or experiment in wanted):
            grouped.setdefault(experiment, []).append(run)
    if not grouped:
        scope = f" of experiments {sorted(wanted)}" if wanted is not None else ""
        raise MissingResults(f"No {what}{scope} under {root.resolve()}. Produce them with {how}, or set "
                             "EMO_RESULTS_DIR to a results directory that has them.")
    return dict(sorted(grouped.items()))


def execute_notebook(path: str | Path, results: str | Path, *, output_dir: str | Path | None = None,
                     timeout: int = 600):
    """Execute the notebook at `path` with nbclient (kernel `python3`, working directory = its folder) with
    `EMO_RESULTS_DIR=results`; returns the executed notebook. With `output_dir`, the executed copy is written there
    atomically, also when a cell raised. Raises `nbclient.exceptions.CellExecutionError` if a cell raises."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    try:
        client.execute(env={**os.environ, "EMO_RESULTS_DIR": str(Path(results).resolve())})
    finally:
        if output_dir is not None:
            with atomic_file(Path(output_dir) / path.name) as tmp:
                nbformat.write(notebook, tmp)
    return notebook


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: execute notebooks against a results directory; 1 if a cell of any notebook raised."""
    from nbclient.exceptions import CellExecutionError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in notebooks/")
    parser.add_argument("--results-dir", type=Path, default=Path(os.environ.get("EMO_RESULTS_DIR", "results")))
    parser.add_argument("--timeout", type=int, default=600, help="seconds a cell may run")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
    output_dir = args.results_dir / EXECUTED_DIR
    failed = []
    for path in notebooks:
        try:
            execute_notebook(path, args.results_dir, output_dir=output_dir, timeout=args.timeout)
        except CellExecutionError as error:
            failed.append(path.name)
            print(f"{path.name}: {error.ename}: {error.evalue} (traceback: {output_dir / path.name})", file=sys.stderr)
            continue
        print(f"{path.name}: executed -> {output_dir / path.name}")
    if failed:
        print(f"{len(failed)} of {len(notebooks)} notebooks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
