"""Preflight: check every remote resource a composed run needs, without downloading weights or data.

    python run.py experiment=icl_eval model=llama7b preflight=true

`resources(cfg)` lists what the config names (model and tokenizer repos, the cost-embedding source, every dataset
with its config, splits and the columns the run reads, the files it downloads, the MAUVE featurizer, the retriever's
encoder and tokenizer, the instruction and evaluation sets, a judge endpoint, every `hf://` URL, and the local paths
among them); `check` looks each up with `huggingface_hub` (repository info at the revision, its file list, the dataset
card's features, a HEAD request for access), a HEAD request (URLs) or the `openai` client (`/models`); `report`
prints one table (resource, revision -> commit, status, what to do) and returns the exit status: 0 when every row is
ok, 1 otherwise. Offline, every remote row says it could not be checked.

Each recipe calls `require(cfg, sections)` at its start for what it needs after training (the ICL tasks of `cft_*`, the
featurizer of `lm_*`, the evaluation set and judge of `sft_*`): a resource that is definitely unusable stops the run
before its first training step; one that could not be checked (offline) only logs a warning.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from experiments.pipeline import hub
from experiments.pipeline.credentials import public_url, redact
from experiments.pipeline.judging.clients import OPENAI_DEFAULT_BASE_URL, endpoint_settings

log = logging.getLogger(__name__)

OK, FAILED, UNCHECKED = "ok", "failed", "not checked"
SECTIONS = ("model", "data", "icl", "metrics", "instructions", "eval_instructions", "judge", "pairwise")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")
DATA_SUFFIXES = (".parquet", ".arrow", ".json", ".jsonl", ".csv", ".tsv", ".txt")
SPLIT_WORDS = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"), "test": ("test",)}
MISSING = "???"


class PreflightError(RuntimeError):
    """A resource the run needs is unusable (the message is the table of failing rows)."""


@dataclass
class Resource:
    """One thing a run reads: `role` is the config key naming it, `kind` how it is checked."""

    role: str
    kind: str  # model | tokenizer | retriever | dataset | hub_file | url | local | judge
    name: str
    revision: str | None = None
    details: dict = field(default_factory=dict)


@dataclass
class Row:
    """The outcome of checking one resource."""

    resource: Resource
    status: str
    note: str
    commit: str | None = None


# ------------------------------------------------------------------------------------------------------ collecting
def _model_like(role: str, kind: str, name, revision, **details) -> Iterator[Resource]:
    if name in (None, MISSING):
        if name == MISSING:
            yield Resource(role, "local", MISSING)
        return
    path = hub.resolve_model_path(str(name))
    if hub.is_local(path) or path.endswith(".gguf") or Path(path).suffix in WEIGHT_SUFFIXES:
        yield Resource(role, "local", path)
    else:
        yield Resource(role, kind, path, revision, details)


def _model_resources(model: Mapping) -> Iterator[Resource]:
    if not model.get("from_config"):
        yield from _model_like("model.name_or_path", "model", model.get("name_or_path"), model.get("revision"),
                               gguf_file=model.get("gguf_file"))
    yield from _model_like("model.tokenizer", "tokenizer", model.get("tokenizer"), model.get("tokenizer_revision"))
    if model.get("cost_embedding"):
        yield from _model_like("model.cost_embedding", "model", model["cost_embedding"],
                               model.get("cost_embedding_revision"))


def _files(role: str, paths, fallbacks=None, checksums=None) -> Iterator[Resource]:
    for split, value in (paths or {}).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for index, path in enumerate(v for v in values if v is not None):
            key = f"{role}.{split}" + (f"[{index}]" if len(values) > 1 else "")
            yield _file_resource(key, str(path), fallback=(fallbacks or {}).get(split),
                                 sha256=(checksums or {}).get(split))


def _file_resource(role: str, path: str, **details) -> Resource:
    if hub.is_hf_url(path):
        return Resource(role, "hub_file", path, hub.parse_hf_url(path)["revision"])
    if path.startswith(("http://", "https://")):
        return Resource(role, "url", path, details={k: v for k, v in details.items() if v})
    return Resource(role, "local", path)


def _data_resources(data: Mapping) -> Iterator[Resource]:
    if data.get("source") == "hub":
        yield Resource("data.path", "dataset", data["path"], data.get("revision"),
                       {"config": data.get("config_name"), "splits": ["train"], "columns": [data["text_column"]]})
    elif data.get("source") == "files":
        yield from _files("data.data_files", data.get("data_files"), data.get("fallback_data_files"))


def _icl_resources(icl: Mapping) -> Iterator[Resource]:
    for name in icl.get("tasks") or []:
        spec = (icl.get("task_specs") or {}).get(name) or {}
        remote, role = spec.get("hub"), f"icl.task_specs.{name}"
        if icl.get("source") == "local" or not remote:
            yield from _files(f"{role}.data_files", spec.get("data_files"))
        elif remote.get("files"):
            yield from _files(f"{role}.hub.files", remote["files"], checksums=remote.get("sha256"))
        else:
            columns = [*(spec.get("input_columns") or {"text": None}), spec.get("label_column", "label")]
            yield Resource(f"{role}.hub", "dataset", remote["path"], remote.get("revision"),
                           {"config": remote.get("name"), "columns": columns, "label_names": remote.get("label_names"),
                            "label_column": spec.get("label_column", "label"),
                            "splits": [spec.get("train_split", "train"), spec.get("test_split", "test")]})
    retriever = icl.get("retriever") or {}
    if retriever.get("model") not in (None, "minilm"):
        yield from _model_like("icl.retriever.model", "retriever", hub.sentence_transformer_id(str(retriever["model"])),
                               retriever.get("model_revision"))
    yield from _model_like("icl.retriever.tokenizer", "tokenizer", retriever.get("tokenizer"),
                           retriever.get("tokenizer_revision"))


def _instruction_resources(role: str, node: Mapping) -> Iterator[Resource]:
    if node.get("source") == "hub":
        columns = ["instruction", "output"] if role == "instructions" else ["instruction"]
        yield Resource(f"{role}.path", "dataset", node["path"], node.get("revision"),
                       {"config": node.get("config_name"), "splits": [node.get("split") or "train"],
                        "columns": columns})
    elif node.get("source") == "hub_file":
        url = hub.hf_url(node["path"], node["filename"], revision=node.get("revision"))
        yield _file_resource(f"{role}.filename", url)
    elif node.get("source") == "files":
        paths = node.get("data_files")
        for index, path in enumerate([paths] if isinstance(paths, str) else list(paths or [])):
            yield _file_resource(f"{role}.data_files" + (f"[{index}]" if not isinstance(paths, str) else ""), path)


def _judge_resources(judge: Mapping) -> Iterator[Resource]:
    if judge.get("kind") == "openai":
        base_url, key_env = endpoint_settings(judge)
        yield Resource("judge.base_url", "judge", public_url(base_url),  # the table never shows credentials
                       details={"url": base_url, "model": judge.get("model"), "api_key_env": key_env})
    elif judge.get("kind") == "hf_local":
        yield from _model_like("judge.model", "model", judge.get("model"), judge.get("revision"))
        if judge.get("tokenizer") != judge.get("model"):
            yield from _model_like("judge.tokenizer", "tokenizer", judge.get("tokenizer"), judge.get("revision"))


def _hf_urls(node, prefix: str = "") -> Iterator[tuple[str, str]]:
    """`(dotted key, url)` of every hf:// string in a resolved config."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _hf_urls(value, f"{prefix}{key}.")
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _hf_urls(value, f"{prefix[:-1]}[{index}].")
    elif hub.is_hf_url(node):
        yield prefix[:-1], node


def resources(cfg, sections=SECTIONS) -> list[Resource]:
    """The resources of the composed config `cfg` in `sections`, in config order, each once (plus every hf:// URL
    those sections hold)."""
    from omegaconf import DictConfig, OmegaConf

    plain = {section: OmegaConf.to_container(cfg[section], resolve=True, throw_on_missing=False)
             if isinstance(cfg[section], DictConfig) else cfg[section]
             for section in sections if section in cfg and cfg[section]}
    found: list[Resource] = []
    if "model" in plain:
        found += _model_resources(plain["model"])
    if "data" in plain:
        found += _data_resources(plain["data"])
    if "icl" in plain:
        found += _icl_resources(plain["icl"])
    if "metrics" in plain and plain["metrics"].get("featurizer") != "minilm":
        found += _model_like("metrics.featurizer", "model", plain["metrics"].get("featurizer"),
                             plain["metrics"].get("featurizer_revision"))
    for role in ("instructions", "eval_instructions"):
        if role in plain:
            found += _instruction_resources(role, plain[role])
    if "judge" in plain:
        found += _judge_resources(plain["judge"])
    if "pairwise" in plain:
        for key in ("model_outputs", "reference_outputs"):
            found.append(_file_resource(f"pairwise.{key}", str(plain["pairwise"].get(key))))
    named = {r.name for r in found}
    found += [_file_resource(key, url) for key, url in _hf_urls(plain) if url not in named]
    unique, seen = [], set()
    for resource in found:
        key = (resource.kind, resource.name, resource.revision, resource.role.split(".")[0])
        if key not in seen:
            seen.add(key)
            unique.append(resource)
    return unique


# -------------------------------------------------------------------------------------------------------- checking
def _files_of(info) -> list[str]:
    return [sibling.rfilename for sibling in info.siblings or ()]


def _access(resource: Resource, commit: str, filename: str, repo_type: str = "model") -> Row | None:
    """None when `filename` of the repository can be downloaded (a HEAD request), else the failing row."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(resource.name, filename, repo_type=repo_type, revision=commit, endpoint=hub.endpoint())
    try:
        get_hf_file_metadata(url, endpoint=hub.endpoint(), timeout=10)
    except Exception as error:
        return Row(resource, FAILED, str(hub.hub_error(error, resource.kind, resource.name, resource.revision,
                                                       repo_type)), commit)
    return None


def _info(resource: Resource, repo_type: str):
    try:
        return hub.api().repo_info(resource.name, repo_type=repo_type, revision=resource.revision, timeout=15), None
    except Exception as error:
        mapped = hub.hub_error(error, resource.kind, resource.name, resource.revision, repo_type)
        return None, Row(resource, UNCHECKED if isinstance(mapped, hub.OfflineError) else FAILED, str(mapped))


def _check_model(resource: Resource) -> Row:
    info, failed = _info(resource, "model")
    if failed:
        return failed
    files = _files_of(info)
    if resource.kind == "tokenizer":
        needed = [f for f in TOKENIZER_FILES if f in files]
        if not needed:
            return Row(resource, FAILED, f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in the repository",
                       info.sha)
        found = ", ".join(needed)
    else:
        gguf = resource.details.get("gguf_file")
        weights = [f for f in files if (f == gguf if gguf else f.endswith(WEIGHT_SUFFIXES))]
        if not weights:
            what = f"the GGUF file {gguf}" if gguf else "weights (*.safetensors, *.bin)"
            return Row(resource, FAILED, f"{what} not found in the repository", info.sha)
        needed = ["modules.json" if resource.kind == "retriever" and "modules.json" in files else "config.json"]
        if needed[0] not in files:
            return Row(resource, FAILED, f"no {needed[0]} in the repository", info.sha)
        found = f"{needed[0]} and {len(weights)} weight file(s), not downloaded"
    denied = _access(resource, info.sha, needed[0])
    if denied:
        return denied
    return Row(resource, OK, ("gated, access granted: " if info.gated else "") + found, info.sha)


def _class_names(feature: Mapping) -> list[str] | None:
    names = ((feature.get("dtype") or {}).get("class_label") or {}).get("names") if isinstance(
        feature.get("dtype"), Mapping) else None
    if isinstance(names, Mapping):
        return [names[key] for key in sorted(names, key=int)]
    return list(names) if names else None


def _card(info, config: str) -> tuple[dict | None, set | None, list | None]:
    """`(features by name, split names, config names)` the dataset card declares for `config` (None: not declared)."""
    card = info.card_data.to_dict() if info.card_data is not None else {}
    configs = card.get("configs") or []
    names = [c.get("config_name", "default") for c in configs] or None
    splits = None
    for entry in configs:
        if entry.get("config_name", "default") == config and isinstance(entry.get("data_files"), list):
            splits = {f.get("split", "train") for f in entry["data_files"] if isinstance(f, Mapping)}
    infos = card.get("dataset_info")
    for entry in [infos] if isinstance(infos, Mapping) else infos or []:
        if entry.get("config_name", "default") == config:
            features = {f["name"]: f for f in entry.get("features") or [] if isinstance(f, Mapping)}
            declared = {s["name"] for s in entry.get("splits") or [] if isinstance(s, Mapping)}
            return features or None, declared or splits, names
    return None, splits, names


def _file_splits(files: list[str], prefix: str = "") -> set[str]:
    stems = [f[len(prefix):].lower() for f in files if f.startswith(prefix) and f.endswith(DATA_SUFFIXES)]
    return {split for split, words in SPLIT_WORDS.items() for stem in stems
            if any(word in stem.replace("-", "/").replace("_", "/").replace(".", "/").split("/") for word in words)}


def _check_dataset(resource: Resource) -> Row:
    info, failed = _info(resource, "dataset")
    if failed:
        return failed
    files, details = _files_of(info), resource.details
    if hub.script_name(resource.name) in files:
        return Row(resource, FAILED, str(hub.loading_script_error(resource.name, resource.revision)), info.sha)
    parquet = bool(resource.revision and resource.revision.startswith(hub.PARQUET_REVISION))
    config = details.get("config") or "default"
    prefix = f"{config}/" if parquet else ""
    data = [f for f in files if f.startswith(prefix) and f.endswith(DATA_SUFFIXES) and not f.startswith(".")]
    if not data:
        return Row(resource, FAILED, f"no data files{f' under {prefix}' if prefix else ''} in the repository", info.sha)
    features, splits, configs = (None, None, None) if parquet else _card(info, config)
    if details.get("config") and configs and config not in configs:
        return Row(resource, FAILED, f"no config {config!r}; the card declares {configs}", info.sha)
    splits = splits or _file_splits(files, prefix)
    missing = [s for s in details.get("splits", []) if splits and s not in splits]
    if missing:
        return Row(resource, FAILED, f"no split(s) {missing}; it has {sorted(splits)}", info.sha)
    notes = [f"{len(data)} data files"]
    if features:
        absent = [c for c in details.get("columns", []) if c not in features]
        if absent:
            return Row(resource, FAILED, f"no column(s) {absent}; the card declares {sorted(features)}", info.sha)
        names = _class_names(features.get(details.get("label_column"), {}))
        if details.get("label_names") and names and names != list(details["label_names"]):
            return Row(resource, FAILED, f"labels {names} differ from the templates' {details['label_names']}",
                       info.sha)
        notes.append("columns " + ", ".join(details.get("columns", [])) + " declared")
    denied = _access(resource, info.sha, data[0], "dataset")
    return denied or Row(resource, OK, "; ".join(notes), info.sha)


def _check_hub_file(resource: Resource) -> Row:
    location = hub.parse_hf_url(resource.name)
    located = Resource(resource.role, resource.kind, location["repo_id"], location["revision"])
    info, failed = _info(located, location["repo_type"])
    if failed:
        return Row(resource, failed.status, failed.note)
    if location["path"] not in _files_of(info):
        return Row(resource, FAILED, f"no file {location['path']} at this revision", info.sha)
    denied = _access(located, info.sha, location["path"], location["repo_type"])
    return Row(resource, denied.status, denied.note, info.sha) if denied else Row(resource, OK, "file found", info.sha)


def _check_url(resource: Resource) -> Row:
    answers, detail = hub.url_status(resource.name)
    fallback = resource.details.get("fallback")
    if answers is not True and fallback:
        fallback_answers, fallback_detail = hub.url_status(fallback)
        if fallback_answers:
            return Row(resource, OK, f"{detail}; its fallback {fallback} answers ({fallback_detail})")
    if answers is None:
        return Row(resource, UNCHECKED, detail)
    if not answers:
        return Row(resource, FAILED, f"{detail}: point the config at a copy of the file")
    pinned = " (sha256 checked when read)" if resource.details.get("sha256") else ""
    return Row(resource, OK, detail + pinned)


def _check_local(resource: Resource) -> Row:
    if resource.name == MISSING:
        return Row(resource, FAILED, f"not set: pass {resource.role}=<path>")
    if Path(resource.name).exists():
        return Row(resource, OK, "local path")
    return Row(resource, FAILED, f"not found on this machine: fix {resource.role}")


def _check_judge(resource: Resource) -> Row:
    import openai

    key_env, model, url = (resource.details[k] for k in ("api_key_env", "model", "url"))
    key = os.environ.get(key_env)
    if not key and resource.name == OPENAI_DEFAULT_BASE_URL:
        return Row(resource, FAILED, f"no API key: set the environment variable {key_env} (judge.api_key_env)")
    reason = hub.unreachable_reason(url) if not hub.hub_offline() else None
    if reason:
        return Row(resource, UNCHECKED, reason)
    client = openai.OpenAI(base_url=url, api_key=key or "unused", timeout=10.0, max_retries=0)
    try:
        served = [entry.id for entry in client.models.list()]
    except openai.AuthenticationError:
        refused = f"refused the key in {key_env}" if key else f"asks for a key: set {key_env}"
        return Row(resource, FAILED, f"the endpoint {refused} (HTTP 401)")
    except openai.APIConnectionError as error:
        return Row(resource, UNCHECKED, f"no answer from {resource.name}/models ({redact(str(error), [key])})")
    except openai.APIStatusError as error:
        return Row(resource, FAILED, f"GET {resource.name}/models answered HTTP {error.status_code}")
    if model not in served:
        return Row(resource, FAILED, f"the endpoint serves no model {model!r} (it serves {served[:8]}): fix "
                                     "judge.model")
    return Row(resource, OK, f"/models lists {model}")


CHECKS = {"model": _check_model, "tokenizer": _check_model, "retriever": _check_model, "dataset": _check_dataset,
          "hub_file": _check_hub_file, "url": _check_url, "local": _check_local, "judge": _check_judge}
HUB_KINDS = ("model", "tokenizer", "retriever", "dataset", "hub_file")


def check(found: list[Resource]) -> list[Row]:
    """One row per resource, in order (the lookups run concurrently). When the Hub cannot be reached every Hub row is
    `not checked`, with the reason."""
    offline = hub.unreachable_reason() if any(r.kind in HUB_KINDS for r in found) else None

    def one(resource: Resource) -> Row:
        if offline and resource.kind in HUB_KINDS:
            return Row(resource, UNCHECKED, offline)
        try:
            return CHECKS[resource.kind](resource)
        except Exception as error:  # a check must report, never crash the table
            return Row(resource, FAILED, f"{type(error).__name__}: {error}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, found))


# -------------------------------------------------------------------------------------------------------- reporting
def _short(revision: str | None) -> str:
    return revision[:12] if revision and hub.COMMIT_PATTERN.fullmatch(revision) else (revision or "main")


def format_table(rows: list[Row]) -> str:
    """The rows as a text table: resource, revision -> commit, status, what was found or what to do."""
    body = []
    for row in rows:
        resource = row.resource
        revision = "" if resource.kind in ("url", "local", "judge") else _short(resource.revision)
        pinned = f"{revision} -> {row.commit[:12]}" if row.commit else revision
        body.append((f"{resource.role}: {resource.name}", pinned, row.status, row.note))
    header = ("resource", "revision -> commit", "status", "what to do / found")
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line[:3], widths)) + "  " + line[3]
             for line in [header, *body]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def summary(rows: list[Row]) -> str:
    """One line: how many rows are ok, failed, not checked (and why, when nothing could be checked)."""
    counts = {status: sum(r.status == status for r in rows) for status in (OK, FAILED, UNCHECKED)}
    line = (f"preflight: {len(rows)} resources, {counts[OK]} ok, {counts[FAILED]} failed, {counts[UNCHECKED]} not "
            "checked")
    if counts[UNCHECKED] and not counts[OK] + counts[FAILED]:
        reasons = sorted({r.note for r in rows if r.status == UNCHECKED})
        line = (f"preflight: offline -- none of the {len(rows)} resources could be checked ({'; '.join(reasons)}). "
                "Run the preflight on a machine that reaches the Hub.")
    return line


def report(cfg, stream=sys.stdout) -> int:
    """`preflight=true`: check every resource of `cfg`, print the table and a summary line; 0 if every row is ok."""
    rows = check(resources(cfg))
    print(format_table(rows), file=stream)
    print(summary(rows), file=stream, flush=True)
    return 0 if all(row.status == OK for row in rows) else 1


def require(cfg, sections) -> None:
    """At a recipe's start: raise `PreflightError` (with the failing rows) if a resource of `sections` is unusable;
    rows that could not be checked (offline) are logged, not raised."""
    rows = check(resources(cfg, sections))
    failed = [row for row in rows if row.status == FAILED]
    if failed:
        raise PreflightError("A resource this run needs after training is unusable, so it stops before training:\n"
                             + format_table(failed))
    for row in rows:
        if row.status == UNCHECKED:
            log.warning("could not check %s (%s): %s", row.resource.role, row.resource.name, row.note)
