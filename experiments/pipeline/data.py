"""Corpora for Track 1: load text splits from the Hub, URLs or local files, derive missing splits, pack token blocks.

Every loader returns a `datasets.DatasetDict` with `train`, `validation` and `test` splits and one column, `text`.
Missing splits are derived deterministically (no shuffling):

* no validation split: the first `validation_fraction` of train rows become validation, the rest stay train;
* no test split: the second half (`test_fraction`) of validation becomes test, the first half stays validation.

The splits are disjoint (the reference script evaluated on `train[:5%]` without removing it from train).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import datasets
import numpy as np

from experiments.pipeline import hub

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
HUB_FIELDS = ("path", "config_name", "revision")
FILE_FIELDS = ("data_files", "fallback_data_files")
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
FORMATS_BY_SUFFIX = {
    ".txt": "text", ".raw": "text", ".tokens": "text",
    ".json": "json", ".jsonl": "json",
    ".csv": "csv", ".tsv": "csv",
    ".parquet": "parquet",
}
LOCAL_FILES_HINT = (
    "Point the config at local files instead, e.g. `data=local data.data_files.train=/path/train.txt "
    "data.data_files.test=/path/test.txt` (.txt/.json/.jsonl/.csv; set data.text_column for json/csv), "
    "or unset HF_HUB_OFFLINE once the machine is online."
)


class DataError(ValueError):
    """A corpus could not be read or does not have the expected shape (message names the file and the problem)."""


def _is_url(path: str) -> bool:
    return urlparse(str(path)).scheme in ("http", "https")


def _as_list(value) -> list[str]:
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return [str(v) for v in value]


def _file_format(paths: Sequence[str], declared: str | None) -> str:
    if declared:
        return declared
    suffixes = {Path(urlparse(p).path if _is_url(p) else p).suffix.lower() for p in paths}
    formats = {FORMATS_BY_SUFFIX.get(s) for s in suffixes}
    if len(formats) != 1 or None in formats:
        raise DataError(
            f"Cannot infer the file format of {list(paths)} from suffixes {sorted(suffixes)}; "
            f"use one of {sorted(FORMATS_BY_SUFFIX)} or set data.format (text/json/csv/parquet)."
        )
    return formats.pop()


def _load_split_files(split: str, paths: list[str], cfg: Mapping) -> datasets.Dataset:
    fmt = _file_format(paths, cfg.get("format"))
    for path in paths:
        if _is_url(path):
            hub.ensure_remote_available("data file", path, LOCAL_FILES_HINT, url=path)
            hub.record({"what": "corpus file", "url": path})
        elif not Path(path).is_file():
            raise DataError(f"Data file for split '{split}' not found: {path}")
    kwargs = {}
    if fmt == "text":
        kwargs["sample_by"] = cfg.get("sample_by") or "line"
    elif fmt == "csv" and any(p.lower().endswith(".tsv") for p in paths):
        kwargs["sep"] = "\t"
    try:
        loaded = datasets.load_dataset(fmt, data_files={split: paths}, split=split, **kwargs)
    except Exception as exc:  # datasets raises many types for unreadable/malformed files
        raise DataError(f"Could not read {paths} as {fmt} for split '{split}': {type(exc).__name__}: {exc}") from exc
    return _select_text(loaded, cfg["text_column"], where=", ".join(paths))


def _select_text(ds: datasets.Dataset, column: str, where: str) -> datasets.Dataset:
    if column not in ds.column_names:
        raise DataError(f"{where}: text column '{column}' not found; available columns: {ds.column_names}. "
                        "Set data.text_column.")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def _load_hub(cfg: Mapping) -> dict[str, datasets.Dataset]:
    path, name = cfg["path"], cfg.get("config_name")
    label = f"{path}/{name}" if name else path
    try:
        loaded = hub.load_dataset(path, name, revision=cfg.get("revision"), what="corpus", hint=LOCAL_FILES_HINT)
    except hub.HubResourceError as exc:
        raise DataError(str(exc)) from exc
    out = {}
    for split, ds in loaded.items():
        split = SPLIT_ALIASES.get(split, split)
        if split in SPLITS:
            out[split] = _select_text(ds, cfg["text_column"], where=f"dataset '{label}' split '{split}'")
    return out


def _answering_files(split: str, paths: list[str], cfg: Mapping) -> list[str]:
    """`paths`, or the split's `fallback_data_files` when a URL among them gets no answer (e.g. a retired CDN)."""
    fallback = (cfg.get("fallback_data_files") or {}).get(split)
    if not fallback or not any(_is_url(p) and hub.url_status(p)[0] is None for p in paths):
        return paths
    log.warning("data.data_files.%s (%s) does not answer; reading the fallback %s", split, paths, fallback)
    return _as_list(fallback)


def _load_files(cfg: Mapping) -> dict[str, datasets.Dataset]:
    files = cfg.get("data_files") or {}
    out = {}
    for split, paths in files.items():
        if paths is None:
            continue
        split = SPLIT_ALIASES.get(split, split)
        if split not in SPLITS:
            raise DataError(f"Unknown split '{split}' in data.data_files; use {SPLITS}.")
        out[split] = _load_split_files(split, _answering_files(split, _as_list(paths), cfg), cfg)
    if "train" not in out:
        raise DataError("data.data_files needs at least a 'train' entry (validation and test can be derived).")
    return out


def materialize_oracle(cfg: Mapping) -> dict[str, str]:
    """Write the oracle corpus and tokenizer of a `conf/data/oracle.yaml` node unless already there; return split paths.

    The corpus goes to `cache_dir/<12 hex of sha256(oracle config + corpus sizes)>/` and the tokenizer to
    `cfg.tokenizer`; both are written to a temporary directory first and renamed into place, so a directory that
    exists is complete. Sampling is deterministic, so the files depend only on the config.
    """
    from experiments.pipeline.oracle import OracleLanguage, make_tokenizer, write_corpus

    oracle = OracleLanguage(**cfg["oracle"])
    corpus = dict(cfg["corpus"])
    key = json.dumps({"oracle": oracle.config, "corpus": corpus}, sort_keys=True)
    directory = Path(cfg["cache_dir"]) / hashlib.sha256(key.encode()).hexdigest()[:12]
    write_once(directory, lambda tmp: write_corpus(oracle, tmp, **corpus))
    write_once(Path(cfg["tokenizer"]), lambda tmp: make_tokenizer(oracle).save_pretrained(str(tmp)))
    return {split: str(directory / f"{split}.txt") for split in SPLITS}


def write_once(directory: Path, write) -> None:
    """`write(tmp_dir)` into a fresh sibling of `directory`, then rename it to `directory` (unless it appeared)."""
    if directory.is_dir():
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(tmp)
        os.rename(tmp, directory)
    except OSError:
        if not directory.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def derive_missing_splits(splits: dict[str, datasets.Dataset], validation_fraction: float,
                          test_fraction: float) -> datasets.DatasetDict:
    """Fill in missing validation/test splits deterministically (see module docstring); splits stay disjoint."""
    splits = dict(splits)
    if "validation" not in splits:
        train = splits["train"]
        n_val = max(1, math.ceil(len(train) * validation_fraction))
        if n_val >= len(train):
            raise DataError(f"Train split has {len(train)} rows: too few to carve out a validation split.")
        splits["validation"] = train.select(range(n_val))
        splits["train"] = train.select(range(n_val, len(train)))
    if "test" not in splits:
        val = splits["validation"]
        n_test = max(1, math.floor(len(val) * test_fraction))
        if n_test >= len(val):
            raise DataError(f"Validation split has {len(val)} rows: too few to carve out a test split.")
        splits["test"] = val.select(range(len(val) - n_test, len(val)))
        splits["validation"] = val.select(range(len(val) - n_test))
    return datasets.DatasetDict({s: splits[s] for s in SPLITS})


def _cap_rows(ds: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return ds.select(range(min(limit, len(ds)))) if limit is not None else ds


def load_text_splits(cfg: Mapping) -> datasets.DatasetDict:
    """Load a corpus described by a `conf/data/*.yaml` node into train/validation/test splits with a `text` column.

    `cfg.source` is `hub` (`path`, optional `config_name`, `revision` resolved to its commit), `files` (`data_files`
    mapping split -> local paths or URLs, with optional `fallback_data_files` for URLs that do not answer) or `oracle`
    (the synthetic corpus written by `materialize_oracle`). Raises `DataError` for unreadable files, a missing text
    column, an empty split or a field of the other source (e.g. `path` with `source: files`), and
    `hub.OfflineError` (within seconds) when a remote corpus is requested offline.
    """
    source = cfg["source"]
    if source in ("hub", "files"):
        misplaced = hub.misplaced_fields(cfg, "data", hub_source=source == "hub", hub_fields=HUB_FIELDS,
                                         file_fields=FILE_FIELDS)
        if misplaced:
            raise DataError(f"Corpus '{cfg['name']}': {misplaced}")
    if source == "hub":
        splits = _load_hub(cfg)
    elif source == "files":
        splits = _load_files(cfg)
    elif source == "oracle":
        splits = _load_files({**cfg, "data_files": materialize_oracle(cfg)})
    else:
        raise DataError(f"data.source must be 'hub', 'files' or 'oracle', got '{source}'.")
    if "train" not in splits:
        raise DataError(f"Corpus '{cfg['name']}' has no train split (found {sorted(splits)}).")
    dsd = derive_missing_splits(splits, cfg["validation_fraction"], cfg["test_fraction"])
    limits = cfg.get("max_rows") or {}
    dsd = datasets.DatasetDict({s: _cap_rows(ds, limits.get(s)) for s, ds in dsd.items()})
    for split, ds in dsd.items():
        if not any(t and t.strip() for batch in ds.iter(batch_size=1000) for t in batch["text"]):
            raise DataError(f"Corpus '{cfg['name']}': split '{split}' is empty (no non-blank text)"
                            f"{_where(cfg, split)}.")
    return dsd


def _where(cfg: Mapping, split: str) -> str:
    files = (cfg.get("data_files") or {}).get(split)
    return f" in {_as_list(files)}" if files else ""


def pack_blocks(ds: datasets.Dataset, tokenizer, block_size: int, batch_texts: int = 1000,
                max_blocks: int | None = None) -> datasets.Dataset:
    """Tokenise `ds["text"]` and pack it into `block_size` blocks with `input_ids`, `attention_mask`, `labels`.

    Texts are concatenated within map batches of `batch_texts` rows and each batch's remainder is dropped (the
    reference `run_lm.py` behaviour); `max_blocks` keeps only the first blocks. Raises `DataError` if not even one
    block fits.
    """

    def tokenize_and_pack(batch):
        ids = tokenizer([t or "" for t in batch["text"]], add_special_tokens=False)["input_ids"]
        flat = [tok for seq in ids for tok in seq]
        usable = (len(flat) // block_size) * block_size
        blocks = [flat[i:i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks],
                "labels": [list(b) for b in blocks]}

    packed = ds.map(tokenize_and_pack, batched=True, batch_size=batch_texts, remove_columns=ds.column_names,
                    desc=f"Packing {block_size}-token blocks")
    if len(packed) == 0:
        raise DataError(f"No {block_size}-token block could be packed from {len(ds)} rows; "
                        "lower data.block_size or add text.")
    return _cap_rows(packed, max_blocks)


def blocks_fingerprint(blocks: Mapping[str, datasets.Dataset]) -> dict[str, str]:
    """SHA-256 of each split's packed token ids (int32, row-major), plus one over all splits under key `all`."""
    total = hashlib.sha256()
    out = {}
    for split in sorted(blocks):
        ids = np.asarray(blocks[split]["input_ids"], dtype=np.int32)
        digest = hashlib.sha256(ids.tobytes()).hexdigest()
        out[split] = digest
        total.update(f"{split}:{digest}".encode())
    out["all"] = total.hexdigest()
    return out
