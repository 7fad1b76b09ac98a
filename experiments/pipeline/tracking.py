"""Experiment trackers. `none` keeps only the local result files; `wandb` also logs the run to Weights & Biases.

The tracker decides the HF Trainer's `report_to` (set explicitly, never "all"), so training losses and the learning
rate reach W&B through transformers' own `WandbCallback`; final metrics and tables are logged by the recipe.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from experiments.pipeline.distributed import is_main_process


class NoTracker:
    """Tracker that records nothing beyond the local result files."""

    report_to: list[str] = []

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Ignore metrics."""

    def log_table(self, name: str, frame) -> None:
        """Ignore tables."""

    def finish(self) -> None:
        """Nothing to close."""


class WandbTracker:
    """One W&B run per experiment run; honours `WANDB_MODE` (offline runs go to `<dir>/wandb/`, sync later)."""

    report_to = ["wandb"]

    def __init__(self, *, project: str, name: str, config: Mapping, directory: str | Path, mode: str | None = None,
                 entity: str | None = None, group: str | None = None, tags: list[str] | None = None):
        import wandb

        Path(directory).mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(project=project, name=name, config=dict(config), dir=str(directory), mode=mode,
                              entity=entity, group=group, tags=tags, reinit="finish_previous")

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Log scalar metrics and copy them into the run summary."""
        self.run.log(dict(metrics))
        self.run.summary.update(dict(metrics))

    def log_table(self, name: str, frame) -> None:
        """Log a pandas DataFrame as a `wandb.Table`."""
        self.run.log({name: self._wandb.Table(dataframe=frame.reset_index())})

    def finish(self) -> None:
        """Close the run (flushes offline files)."""
        self.run.finish()


def scalar_metrics(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics.json document, flattened for trackers: `{"mauve": {"mean": 0.9}}` ->
    `{"mauve.mean": 0.9}`; strings, booleans, lists and nulls are left out."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update(scalar_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def make_tracker(cfg: Mapping, *, run_name: str, config: Mapping, directory: str | Path):
    """Tracker for a `conf/tracker/*.yaml` node (`name: none | wandb`); in a multi-process run only the main process
    opens a tracker run (one per job, not one per rank), the others get `NoTracker`."""
    if cfg["name"] == "none" or not is_main_process():
        return NoTracker()
    if cfg["name"] == "wandb":
        return WandbTracker(project=cfg["project"], name=run_name, config=config, directory=directory,
                            mode=cfg.get("mode"), entity=cfg.get("entity"), group=cfg.get("group"),
                            tags=list(cfg.get("tags") or []))
    raise ValueError(f"Unknown tracker '{cfg['name']}'; use none or wandb.")
