"""Run records: `results/<experiment>/<run-id>/{metrics,manifest}.json` plus per-track JSONL files, written atomically.

A run directory appears only once complete: files are written into a hidden temporary sibling, then renamed into
place with `os.replace`, so readers (e.g. `experiments.tables`) never see half-written runs. A record is never
overwritten: `start_run` returns the metrics of a run already recorded under the same id and setup instead of
running it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from filelock import FileLock, Timeout

from experiments.pipeline import hub
from experiments.pipeline.distributed import is_main_process, launch_name

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
RUN_LOCK_FILE = "run.lock"  # in a run's output dir, locked by the process running it
TRACKED_PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "accelerate", "peft", "hydra-core", "omegaconf",
                    "mauve-text", "sentence-transformers", "scikit-learn", "faiss-cpu", "faiss-gpu", "openicl",
                    "openai", "numpy", "wandb", "emo-suite")
SCHEMA_VERSION = 1
SEED_KEYS = ("seed", "generation.base_seed", "metrics.kmeans_seeds")
BOOKKEEPING_KEYS = ("run_id", "launch", "rerun", "preflight", "experiment_name", "recipe", "paths", "tracker",
                    "trainer.logging_steps", "trainer.logging_first_step", "trainer.disable_tqdm",
                    "trainer.save_total_limit", "trainer.dataloader_num_workers", "trainer.dataloader_pin_memory")


def new_run_id(*parts: str, launch: str | None = None, job: str = "") -> str:
    """`<UTC time stamp of the launch>_<parts...>_<6 hex of the launch and job>`: sortable by time; the same for every
    rank of a launch given the same `job` (what identifies the run within the launch: `start_run` passes its output
    dir and setup), different for other launches and jobs."""
    launch = launch or launch_name()
    tag = hashlib.sha256(f"{launch}\0{job}".encode()).hexdigest()[:6]
    return "_".join([launch.split("_")[0], *[str(p).replace("/", "-") for p in parts if p], tag])


def git_commit(repo_dir: str | Path | None = None) -> str:
    """Current git commit (suffixed `-dirty` with uncommitted changes or untracked files), or "unknown" outside a
    repository."""
    cwd = repo_dir or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed versions of `names` (None when not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware_info() -> dict:
    """Python/platform, CPU count and, when present, the CUDA devices and versions."""
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["cuda_version"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def trained_run_header(cfg, run_id: str) -> dict:
    """The first fields of a training run's `metrics.json`: schema, experiment, run id, model, and the objective
    (`objective` = its label, the tables' row name; `objective_name` and `objective_hparams` = what was trained)."""
    from omegaconf import OmegaConf

    return {
        "schema_version": SCHEMA_VERSION,
        "experiment": cfg.experiment_name,
        "run_id": run_id,
        "model": cfg.model.name,
        "objective": cfg.objective.label,
        "objective_name": cfg.objective.name,
        "objective_hparams": OmegaConf.to_container(cfg.objective.hparams, resolve=True),
    }


def sha256_texts(texts: Iterable[str]) -> str:
    """SHA-256 over `texts` (each followed by a NUL byte): a fingerprint of a list of strings."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def hydra_overrides() -> list[str]:
    """The command-line overrides of the current Hydra job (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def flatten(mapping: Mapping, prefix: str = "") -> dict:
    """`{"a": {"b": 1}, "c": [2]}` -> `{"a.b": 1, "c": [2]}` (lists and empty mappings are kept as values)."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def run_setup(cfg, *, seed_keys: Iterable[str] = SEED_KEYS, ignore: Iterable[str] = BOOKKEEPING_KEYS) -> dict:
    """What makes a run's numbers what they are, for telling experiments apart: the flattened resolved config
    (dotted keys) without seeds (`seed_keys`: runs differing only there are repeats to aggregate) and bookkeeping
    (`ignore`: paths, tracker, logging). `paths.*` stay symbolic (`<paths.data_dir>/gpt2_tokenizer`), so the same
    experiment on another machine or in another run directory has the same setup."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=False)
    raw["paths"] = {key: f"<paths.{key}>" for key in raw.get("paths") or {}}
    resolved = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    return {key: value for key, value in flatten(resolved).items() if not _matches(key, [*seed_keys, *ignore])}


def build_manifest(cfg, *, run_id: str, seeds: Mapping, data_fingerprint: Mapping, output_dir: str | Path,
                   **extra) -> dict:
    """Everything needed to reproduce a run: resolved config, overrides, git commit, package versions, seeds, data
    fingerprint, hardware, the remote resources it read (`remote_resources`: each Hub repository with the commit its
    revision resolved to, each URL with its sha256 where pinned; `hub.recorded_resources`) (plus any `extra`
    entries), and the run's `setup` (`run_setup`), which tables use to keep different experiments apart."""
    from omegaconf import OmegaConf

    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "setup": run_setup(cfg),
        "overrides": hydra_overrides(),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "seeds": dict(seeds),
        "data_fingerprint": dict(data_fingerprint),
        "hardware": hardware_info(),
        "output_dir": str(output_dir),
        "remote_resources": hub.recorded_resources(),
        **extra,
    }


@dataclass(frozen=True)
class Run:
    """A run opened by `start_run`: its output dir (checkpoints under `checkpoints/`), its id, and, for a run that is
    already recorded, its recorded metrics (`complete`: the recipe returns them without working)."""

    output_dir: Path
    run_id: str
    recorded: dict | None = None

    @property
    def complete(self) -> bool:
        """True when the run is already recorded: nothing is to be done."""
        return self.recorded is not None

    @property
    def checkpoints(self) -> Path:
        """Where the run's Trainer writes its checkpoints (and resumes from)."""
        return self.output_dir / "checkpoints"


def start_run(cfg, *id_parts: str) -> Run:
    """Open a run before any work: its output dir (`cfg.paths.output_dir`) and id (`cfg.run_id`, or `new_run_id` of
    `id_parts`, the launch, the output dir and the setup, so that every rank agrees and concurrent jobs differ).

    A run already recorded under this id is not run again: with the same setup and seeds its recorded metrics come
    back (`Run.recorded`, and a log line says so); with another, a FileExistsError names the differences. With
    `cfg.rerun` it trains again from scratch as the new run `<run_id>_rerun_<launch>` in a sibling output dir of that
    name (the record stays; that run id resumes it). The main process claims the output dir for its lifetime
    (`claim_output_dir`), so a second live process for the same run fails at once.
    """
    results = Path(cfg.paths.results_dir) / cfg.experiment_name
    output_dir = Path(cfg.paths.output_dir)
    job = json.dumps([str(output_dir.resolve()), run_setup(cfg, seed_keys=())], sort_keys=True, default=str)
    run_id = cfg.run_id or new_run_id(*id_parts, launch=cfg.launch, job=job)
    if (results / run_id).exists() and cfg.get("rerun"):
        log.info("rerun=true: run %r of experiment %r is recorded; training it again as run %r", run_id,
                 cfg.experiment_name, f"{run_id}_rerun_{cfg.launch}")
        run_id = f"{run_id}_rerun_{cfg.launch}"
        output_dir = output_dir.parent / run_id
    elif (results / run_id).exists():
        return Run(output_dir, run_id, recorded_metrics(results / run_id, cfg))
    hub.clear_record()  # the manifest lists what this run reads
    if is_main_process():
        claim_output_dir(output_dir)
        if (results / run_id).exists():  # recorded by a process that finished in the meantime
            return Run(output_dir, run_id, recorded_metrics(results / run_id, cfg))
    output_dir.mkdir(parents=True, exist_ok=True)
    return Run(output_dir, run_id)


def recorded_metrics(run_dir: Path, cfg) -> dict:
    """The metrics of the run recorded in `run_dir`, if its manifest has `cfg`'s setup and seeds; else a
    FileExistsError naming the keys that differ (the run id was given to another setup)."""
    run_id, experiment = run_dir.name, run_dir.parent.name
    manifest_path = run_dir / MANIFEST_FILE
    advice = "Choose another run_id (or none), or set rerun=true to train this config as a new run."
    if not manifest_path.is_file():
        raise FileExistsError(f"Run {run_id!r} of experiment {experiment!r} is already complete ({run_dir}) but has "
                              f"no {MANIFEST_FILE} to compare this config with. {advice}")
    differences = setup_differences(json.loads(manifest_path.read_text()), cfg)
    if differences:
        raise FileExistsError(f"Run {run_id!r} of experiment {experiment!r} is already complete ({run_dir}) with "
                              f"another setup; these keys differ: {differences}. {advice}")
    log.info("Run %r of experiment %r is already complete (%s): not running it again, returning its recorded "
             "metrics (rerun=true trains it again as a new run).", run_id, experiment, run_dir)
    return json.loads((run_dir / METRICS_FILE).read_text())


def setup_differences(manifest: Mapping, cfg) -> list[str]:
    """The dotted config keys whose values differ between a recorded run's manifest and `cfg`: in the setup
    (`run_setup`: everything but bookkeeping and seeds) or in the seeds (`SEED_KEYS`)."""
    from omegaconf import OmegaConf

    recorded_config, config = flatten(manifest.get("config", {})), flatten(OmegaConf.to_container(cfg, resolve=True))
    recorded = {**manifest.get("setup", {}), **{key: recorded_config.get(key) for key in SEED_KEYS}}
    current = {**run_setup(cfg), **{key: config.get(key) for key in SEED_KEYS}}
    return sorted(key for key in recorded.keys() | current.keys() if recorded.get(key, ...) != current.get(key, ...))


_claims: dict[str, FileLock] = {}  # the output dirs this process has claimed, held until it exits


def claim_output_dir(output_dir: Path) -> None:
    """Hold a lock on `output_dir/run.lock` until this process exits (a killed process releases it at once): a
    second live process working in the same output dir (the same run) fails here instead of sharing checkpoints."""
    path = output_dir / RUN_LOCK_FILE
    if str(path) in _claims:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RuntimeError(f"Another process is running in {output_dir} (it holds {path}): two jobs cannot share a "
                           "run's output dir and checkpoints. Wait for it to end, or give this run another run_id."
                           ) from None
    _claims[str(path)] = lock


def require_new_run(root: str | Path, experiment: str, run_id: str) -> None:
    """Fail if `root/experiment/run_id` is already a complete run (records are never overwritten)."""
    if (Path(root) / experiment / run_id).exists():
        raise FileExistsError(f"Run {run_id!r} of experiment {experiment!r} is already complete: "
                              f"{Path(root) / experiment / run_id}. Choose another run_id (or none).")


def write_run(root: str | Path, experiment: str, run_id: str, *, metrics: Mapping, manifest: Mapping,
              jsonl: Mapping[str, Iterable[Mapping]] | None = None, json_files: Mapping[str, object] | None = None,
              text_files: Mapping[str, str] | None = None) -> Path:
    """Write one run atomically to `root/experiment/run_id/` and return that directory.

    Always `metrics.json` and `manifest.json`; `jsonl` maps file names to rows (e.g. `generations.jsonl`,
    `predictions.jsonl`), `json_files` maps file names to JSON values (e.g. AlpacaEval-format outputs), `text_files`
    file names to their text (e.g. AlpacaEval's `leaderboard.csv`).
    """
    parent = Path(root) / experiment
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / run_id
    require_new_run(root, experiment, run_id)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_id}.", dir=parent))
    try:
        documents = {METRICS_FILE: metrics, MANIFEST_FILE: manifest, **(json_files or {})}
        for name, value in documents.items():
            (tmp / name).write_text(json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False) + "\n")
        for name, text in (text_files or {}).items():
            (tmp / name).write_text(text)
        for name, rows in (jsonl or {}).items():
            with open(tmp / name, "w") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o755)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path` (hidden, same suffix) to write the file to; once the block ends it
    is renamed to `path` (`os.replace`), and removed if the block raises. Readers see the old file or the new one,
    never a part of it, and concurrent writers never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_runs(root: str | Path, experiment: str | None = None) -> list[dict]:
    """All complete runs under `root` (optionally one experiment): metrics.json contents plus `run_dir`, and the
    manifest's `setup` and `seeds` (unless metrics.json has its own).

    Hidden (in-progress) directories and the `tables` directory are skipped.
    """
    root = Path(root)
    runs = []
    if experiment:
        experiments = [root / experiment]
    else:
        experiments = sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []
    for exp_dir in experiments:
        if exp_dir.name == "tables" or exp_dir.name.startswith(".") or not exp_dir.is_dir():
            continue
        for run_dir in sorted(exp_dir.iterdir()):
            metrics_path = run_dir / METRICS_FILE
            if run_dir.name.startswith(".") or not metrics_path.is_file():
                continue
            record = json.loads(metrics_path.read_text())
            manifest_path = run_dir / MANIFEST_FILE
            manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
            for key in ("setup", "seeds"):
                if key in manifest:
                    record.setdefault(key, manifest[key])
            record["run_dir"] = str(run_dir)
            runs.append(record)
    return runs
