"""Run identity for tables: which runs are repeats of one experiment (pooled) and which are different experiments
(own rows, labelled by what differs). Used by `experiments.tables` and by the track table builders it registers.

A run's identity is its `setup` (the resolved config without seeds and bookkeeping,
`experiments.pipeline.records.run_setup`) plus the sizes derived from config and data (`DERIVED_SIZES`); records
without a setup fall back to the `FALLBACK_IDENTITY` fields of metrics.json.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from emo import OBJECTIVES
from experiments.pipeline.records import flatten

OBJECTIVE_ORDER = OBJECTIVES
"""Row order of objectives in every table: the registry's (unknown ones last, by name)."""

DERIVED_SIZES = ("num_prompts", "max_new_tokens")
"""metrics.json sizes that follow from config and data; part of every run's identity (the data may have changed)."""
FALLBACK_IDENTITY = ("model", "corpus", "objective", "objective_name", "objective_hparams", "decoding", "featurizer",
                     *DERIVED_SIZES)
"""metrics.json fields that identify a run recorded without a `setup` (older records)."""


@dataclass
class RunGroup:
    """Runs of one experiment setup (repeats that differ only in seeds): one table row within one column."""

    base: str                  # the row field's value (e.g. the objective label)
    label: str                 # base plus what distinguishes this setup from the others, e.g. `emo (decoding=top_p)`
    column: str | None
    runs: list[dict] = field(default_factory=list)


def run_identity(run: Mapping) -> dict[str, str]:
    """Flat `{key: canonical JSON value}` of what identifies a run's experiment: its `setup` and `DERIVED_SIZES`
    (else the `FALLBACK_IDENTITY` fields)."""
    fields = FALLBACK_IDENTITY if run.get("setup") is None else DERIVED_SIZES
    identity = {**(run.get("setup") or {}), **{key: run[key] for key in fields if key in run}}
    return {key: json.dumps(value, sort_keys=True) for key, value in flatten(identity).items()}


def run_ref(run: Mapping) -> str:
    """`<experiment>/<run id>`: the run's folder under the results directory (what `sources.csv` names)."""
    if run.get("run_dir"):
        path = Path(run["run_dir"])
        return f"{path.parent.name}/{path.name}"
    return f"{run.get('experiment', '?')}/{run.get('run_id', '?')}"


def run_refs(runs: Sequence[Mapping]) -> tuple[str, ...]:
    """The sorted, distinct `run_ref`s of `runs`."""
    return tuple(sorted({run_ref(run) for run in runs}))


def _seeds(run: Mapping) -> str:
    seeds = run.get("seeds") or {key: run.get(key) for key in ("seed", "sampling_seeds")}
    return json.dumps(seeds, sort_keys=True, default=str)


def latest_repeats(runs: Sequence[Mapping]) -> list[dict]:
    """Drop reruns: of runs with the same identity and the same seeds, keep the most recent (largest run id)."""
    latest = {}
    for run in sorted(runs, key=lambda r: str(r.get("run_id", ""))):
        latest[(json.dumps(run_identity(run), sort_keys=True), _seeds(run))] = run
    return list(latest.values())


def _display(key: str, value: str) -> str:
    text = json.loads(value) if value != "null" else None
    return f"{key}={text if isinstance(text, str) else json.dumps(text)}"


def _distinguishing(identities: list[dict[str, str]]) -> list[str]:
    """Keys whose value is not the same in all `identities` (a missing key counts as a value)."""
    keys = sorted({k for identity in identities for k in identity})
    return [k for k in keys if len({identity.get(k, "<unset>") for identity in identities}) > 1]


def _label_parts(identity: dict[str, str], keys: Sequence[str]) -> list[str]:
    """`key=value` for `keys`; when a config group's `name` differs, `group=name` stands for the whole group."""
    named = {k[: -len(".name")] for k in keys if k.endswith(".name")}
    parts = []
    for key in keys:
        group = key.rsplit(".", 1)[0] if "." in key else None
        if key.endswith(".name") and group in named:
            parts.append(_display(group, identity.get(key, "null")))
        elif group is None or not any(key.startswith(f"{g}.") for g in named):
            parts.append(_display(key, identity.get(key, "null")))
    return parts


def group_runs(runs: Sequence[Mapping], *, row: str = "objective", column: str | None = "corpus") -> list[RunGroup]:
    """Group runs into table cells: one group per (experiment identity, `column` value), labelled by `row`.

    Keys that differ between runs of the same column go into every row label; keys under the row field's own name
    (`objective.hparams.*`, `objective_hparams`) only into the labels of rows with the same base, since different
    objectives naturally have different ones. Raises ValueError if two different setups would share a cell.
    """
    runs = latest_repeats(runs)
    by_setup: dict[tuple, RunGroup] = {}
    identities: dict[tuple, dict[str, str]] = {}
    for run in runs:
        identity = run_identity(run)
        key = (json.dumps(identity, sort_keys=True), run.get(column) if column else None)
        if key not in by_setup:
            by_setup[key] = RunGroup(base=str(run[row]), label=str(run[row]), column=key[1])
            identities[key] = identity
        by_setup[key].runs.append(dict(run))

    def own(k: str) -> bool:
        return k.startswith((f"{row}.", f"{row}_"))

    shared_keys, own_keys = set(), {}
    for col in {g.column for g in by_setup.values()}:
        in_column = [k for k, g in by_setup.items() if g.column == col]
        shared_keys |= {k for k in _distinguishing([identities[i] for i in in_column]) if not own(k) and k != row}
        for base in {by_setup[i].base for i in in_column}:
            same_base = [identities[i] for i in in_column if by_setup[i].base == base]
            own_keys.setdefault(base, set()).update(k for k in _distinguishing(same_base) if own(k))

    cells: dict[tuple, RunGroup] = {}
    for key, group in by_setup.items():
        parts = _label_parts(identities[key], sorted(shared_keys | own_keys[group.base]))
        group.label = f"{group.base} ({', '.join(parts)})" if parts else group.base
        other = cells.setdefault((group.label, group.column), group)
        if other is not group:
            raise ValueError(f"Runs of different setups share the table cell ({group.label}, {group.column}): "
                             f"{[r.get('run_dir', r.get('run_id')) for r in other.runs + group.runs]}")
    return list(by_setup.values())


def ordered(values, preferred: Sequence[str], base: Callable[[str], str] = lambda v: v) -> list[str]:
    """Distinct `values` in `preferred` order (of `base(value)`), unknown ones last, ties by name."""
    rank = {name: i for i, name in enumerate(preferred)}
    return sorted(set(values), key=lambda v: (rank.get(base(v), len(rank)), v))


def aggregate(group: RunGroup, read: Callable[[Mapping], object]) -> tuple[float, float | None, int]:
    """`(mean, std, runs)` of `read` over a group's runs. `read(run)` is a number or a `{"mean", "std", "values"}`
    summary (e.g. MAUVE over sampling seeds): a single run keeps its own mean and std; several runs pool their values.
    The std is the sample std (None for a single number)."""
    readings = [read(run) for run in group.runs]
    if len(readings) == 1 and isinstance(readings[0], Mapping):
        return float(readings[0]["mean"]), float(readings[0]["std"]), 1
    values = [float(v) for r in readings for v in (r.get("values") or [r["mean"]] if isinstance(r, Mapping) else [r])]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(readings)
