"""Run records: `results/<experiment>/<run-id>/{metrics,manifest}.json` plus per-track JSONL files, written atomically.

A run directory appears only once complete: files are written into a hidden temporary sibling, then renamed into
place with `os.replace`, so readers (e.g. `experiments.tables`) never see half-written runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
TRACKED_PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "accelerate", "peft", "hydra-core", "omegaconf",
                    "mauve-text", "sentence-transformers", "scikit-learn", "faiss-cpu", "faiss-gpu", "openicl",
                    "openai", "numpy", "wandb", "emo-suite")
SCHEMA_VERSION = 1
SEED_KEYS = ("seed", "generation.base_seed", "metrics.kmeans_seeds")
BOOKKEEPING_KEYS = ("run_id", "experiment_name", "recipe", "paths", "tracker", "trainer.logging_steps",
                    "trainer.logging_first_step", "trainer.disable_tqdm", "trainer.save_total_limit",
                    "trainer.dataloader_num_workers", "trainer.dataloader_pin_memory")


def new_run_id(*parts: str) -> str:
    """`<UTC timestamp>_<parts...>_<6 hex>`: sortable by time, unique across concurrent runs."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return "_".join([stamp, *[str(p).replace("/", "-") for p in parts if p], uuid.uuid4().hex[:6]])


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
    fingerprint and hardware (plus any `extra` entries), and the run's `setup` (`run_setup`), which tables use to
    keep different experiments apart."""
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
        **extra,
    }


def start_run(cfg, *id_parts: str) -> tuple[Path, str]:
    """Open a run: create its output dir (`cfg.paths.output_dir`), take `cfg.run_id` or a new id from `id_parts`,
    and refuse, before any work, a run whose results record is already complete. Returns `(output_dir, run_id)`."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_id = cfg.run_id or new_run_id(*id_parts)
    require_new_run(cfg.paths.results_dir, cfg.experiment_name, run_id)
    return output_dir, run_id


def require_new_run(root: str | Path, experiment: str, run_id: str) -> None:
    """Fail before any work if `root/experiment/run_id` is already a complete run (records are never overwritten)."""
    if (Path(root) / experiment / run_id).exists():
        raise FileExistsError(f"Run {run_id!r} of experiment {experiment!r} is already complete: "
                              f"{Path(root) / experiment / run_id}. Choose another run_id (or none).")


def write_run(root: str | Path, experiment: str, run_id: str, *, metrics: Mapping, manifest: Mapping,
              jsonl: Mapping[str, Iterable[Mapping]] | None = None, json_files: Mapping[str, object] | None = None,
              ) -> Path:
    """Write one run atomically to `root/experiment/run_id/` and return that directory.

    Always `metrics.json` and `manifest.json`; `jsonl` maps file names to rows (e.g. `generations.jsonl`,
    `predictions.jsonl`), `json_files` maps file names to JSON values (e.g. AlpacaEval-format outputs).
    """
    parent = Path(root) / experiment
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / run_id
    if final.exists():
        raise FileExistsError(f"Run directory already exists: {final}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_id}.", dir=parent))
    try:
        documents = {METRICS_FILE: metrics, MANIFEST_FILE: manifest, **(json_files or {})}
        for name, value in documents.items():
            (tmp / name).write_text(json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False) + "\n")
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
