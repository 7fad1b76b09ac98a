"""Instruction tuning (Track 3, as the reference's `instruction_tuning/train.py`, itself Stanford Alpaca's):
Alpaca-format records, Alpaca prompts, response-only labels, padding, and batched response generation written in
AlpacaEval's format.

A record is `{instruction, input, output}` (`input` may be empty or absent). The training sequence is the Stanford
Alpaca prompt followed by `output + EOS`; every prompt token is labelled -100, so the loss covers exactly the response
and its EOS.

Prompt and response are tokenized separately and concatenated, so the labels start exactly at the first response
token. The reference tokenized `prompt + output + EOS` as one string and masked the first `len(tokenize(prompt))`
tokens; with GPT-2's byte-level BPE the last prompt character can merge with the first response character (`:"`),
which shifts that mask by one token (57 of the 999 records of the Alpaca-GPT4 demo file). `tokenize_jointly=True`
keeps the reference behaviour for exact reproductions and logs how many records it shifts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import transformers

from experiments.pipeline import hub
from experiments.pipeline.generation import decoding_kwargs
from experiments.pipeline.models import model_tokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
HUB_FIELDS = ("path", "config_name", "revision", "filename")
FILE_FIELDS = ("data_files",)
LOCAL_RECORDS_HINT = (
    "Point the config at a local JSON array or JSONL file of {instruction, input, output} records instead, e.g. "
    "`instructions=alpaca_local instructions.data_files=/path/alpaca_gpt4_data.json` (training data) or "
    "`eval_instructions=alpaca_local eval_instructions.data_files=/path/alpaca_eval.json` (evaluation set)."
)


class InstructionDataError(ValueError):
    """Instruction records could not be read or lack a required field (the message names the file and record)."""


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the Alpaca field is called `input`
    """The Stanford Alpaca prompt; the `### Input:` section appears only when `input` is non-empty."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# ---------------------------------------------------------------------------------------------------------------- data

def _check_records(rows: Sequence, where: str, require_output: bool) -> list[dict]:
    """Validate rows and normalise them to dicts with string `instruction`, `input` (default "") and `output`."""
    required = ("instruction", "output") if require_output else ("instruction",)
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InstructionDataError(f"{where}: record {i} is a {type(row).__name__}, expected an object with "
                                       f"keys {list(required)}")
        missing = [key for key in required if key not in row]
        if missing:
            raise InstructionDataError(f"{where}: record {i} lacks {missing}; it has {sorted(row)}")
        record = dict(row)
        record["input"] = record.get("input") or ""
        for key in ("instruction", "input", *(("output",) if "output" in record else ())):
            if not isinstance(record[key], str):
                raise InstructionDataError(f"{where}: record {i} field '{key}' is a {type(record[key]).__name__}, "
                                           "expected a string")
        records.append(record)
    if not records:
        raise InstructionDataError(f"{where}: no records")
    return records


def read_records_file(path: str | Path, *, require_output: bool = True) -> list[dict]:
    """Records from a JSON array (Alpaca, AlpacaEval) or a JSONL file (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise InstructionDataError(f"Instruction file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise InstructionDataError(f"{path}: not a JSON array or JSONL file ({exc})") from exc
    return _check_records(rows, str(path), require_output)


def _hub_label(cfg: Mapping) -> str:
    return "/".join(str(part) for part in (cfg["path"], cfg.get("config_name") or cfg.get("filename")) if part)


def _load_hub_records(cfg: Mapping, require_output: bool) -> list[dict]:
    label = _hub_label(cfg)
    try:
        if cfg["source"] == "hub_file":
            url = hub.hf_url(cfg["path"], cfg["filename"], revision=cfg.get("revision"))
            local = hub.fetch_file(url, what="instruction file", hint=LOCAL_RECORDS_HINT)
            return read_records_file(local, require_output=require_output)
        rows = hub.load_dataset(cfg["path"], cfg.get("config_name"), revision=cfg.get("revision"),
                                split=cfg.get("split") or "train", what="instruction dataset", hint=LOCAL_RECORDS_HINT)
    except hub.HubResourceError as exc:
        raise InstructionDataError(f"'{label}': {exc}") from exc
    return _check_records(rows.to_list(), f"dataset '{label}'", require_output)


def load_instruction_records(cfg: Mapping, *, require_output: bool = True, where: str = "instructions"
                             ) -> list[dict]:
    """Records for a `conf/instructions/*.yaml` or `conf/eval_instructions/*.yaml` node (`where`: its config key, for
    messages).

    `source`: `hub` (`datasets.load_dataset(path, config_name, split=split)`), `hub_file` (one JSON file `filename`
    of the Hub dataset repo `path`, e.g. AlpacaEval's `alpaca_eval.json`) or `files` (`data_files`: a local JSON
    array / JSONL path, or a list of them); Hub sets are read at the commit `revision` resolves to. The first
    `max_records` are kept. Raises `InstructionDataError` for bad files or records, or a field of the other source
    (e.g. `path` with `source: files`), and `hub.OfflineError` (within seconds) for a Hub set requested offline.
    """
    source = cfg["source"]
    misplaced = hub.misplaced_fields(cfg, where, hub_source=source != "files", hub_fields=HUB_FIELDS,
                                     file_fields=FILE_FIELDS)
    if misplaced and source in ("hub", "hub_file", "files"):
        raise InstructionDataError(misplaced)
    if source in ("hub", "hub_file"):
        records = _load_hub_records(cfg, require_output)
    elif source == "files":
        paths = cfg.get("data_files")
        if not paths:
            raise InstructionDataError(f"'{cfg['name']}': source=files needs data_files (a JSON/JSONL path).")
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        records = [r for p in paths for r in read_records_file(p, require_output=require_output)]
    else:
        raise InstructionDataError(f"'{cfg['name']}': source must be hub, hub_file or files; got {source!r}")
    limit = cfg.get("max_records")
    return records[:limit] if limit is not None else records


def records_fingerprint(records: Sequence[Mapping]) -> str:
    """SHA-256 of the records' instruction, input and output (order-sensitive)."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r["instruction"], r.get("input", ""), r.get("output", "")]).encode() + b"\0")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ tokenizer and model

def load_sft_tokenizer(model_cfg: Mapping, *, model_max_length: int):
    """Tokenizer for instruction tuning (`models.model_tokenizer`): right padding and right truncation at
    `model_max_length`. A missing pad token is not replaced by EOS: `add_pad_token` adds one after the model is
    loaded, as the reference does. `model.special_tokens` fills in roles a bare tokenizer.json lacks.
    """
    tokenizer = model_tokenizer(model_cfg, padding_side="right", pad_with_eos=False)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"Tokenizer '{model_cfg['tokenizer']}' has no eos token: set model.special_tokens (e.g. "
                         "{eos_token: '</s>'}); the response target ends with it.")
    tokenizer.model_max_length = model_max_length
    tokenizer.truncation_side = "right"
    return tokenizer


def add_pad_token(tokenizer, model: torch.nn.Module, pad_token: str = "[PAD]") -> int:
    """Give `tokenizer` a pad token if it has none, growing `model`'s embeddings; returns the number of rows added.

    New input and output embedding rows are set to the mean of the existing rows (the reference's
    `smart_tokenizer_and_embedding_resize`). Build the EMO cost embedding only after this call.
    """
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": pad_token})
    old_rows = model.get_input_embeddings().weight.shape[0]
    added = max(0, len(tokenizer) - old_rows)
    if added:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
                weight = embedding.weight
                weight[old_rows:] = weight[:old_rows].mean(dim=0, keepdim=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return added


# ------------------------------------------------------------------------------------------------ training examples

def tokenize_records(tokenizer, records: Sequence[Mapping], *, max_length: int,
                     tokenize_jointly: bool = False) -> tuple[dict[str, list[list[int]]], dict[str, int]]:
    """`({"input_ids", "labels"}, stats)` for Alpaca records: prompt labelled -100, then response + EOS.

    The prompt is tokenized with the tokenizer's special tokens (e.g. LLaMA's BOS), the response without; sequences
    are cut at `max_length`. `tokenize_jointly=True` reproduces the reference (see the module docstring). `stats`
    counts records, records with an input, truncated records, records left without any labelled token, and (joint
    mode) records whose mask is shifted by a token merged across the prompt/response boundary.
    """
    eos = tokenizer.eos_token_id
    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in records]
    prompt_ids = tokenizer(prompts, verbose=False)["input_ids"]  # truncation below, after the concatenation
    input_ids, labels = [], []
    stats = {"records": len(records), "with_input": sum(1 for r in records if r.get("input")), "truncated": 0,
             "no_response_tokens": 0}
    if tokenize_jointly:
        joined = tokenizer([p + r["output"] + tokenizer.eos_token for p, r in zip(prompts, records)],
                           verbose=False)["input_ids"]
        stats["boundary_merges"] = sum(1 for ids, p in zip(joined, prompt_ids) if ids[:len(p)] != p)
        pairs = [(ids, [IGNORE_INDEX] * len(p) + ids[len(p):]) for ids, p in zip(joined, prompt_ids)]
    else:
        responses = tokenizer([r["output"] for r in records], add_special_tokens=False, verbose=False)["input_ids"]
        pairs = [(p + resp + [eos], [IGNORE_INDEX] * len(p) + resp + [eos]) for p, resp in zip(prompt_ids, responses)]
    for ids, target in pairs:
        stats["truncated"] += len(ids) > max_length
        ids, target = ids[:max_length], target[:max_length]
        stats["no_response_tokens"] += all(t == IGNORE_INDEX for t in target)
        input_ids.append(ids)
        labels.append(target)
    if stats.get("boundary_merges"):
        log.warning("tokenize_jointly: %d of %d records merge a token across the prompt/response boundary; their "
                    "masks are shifted by one token (reference behaviour)", stats["boundary_merges"], len(records))
    if stats["no_response_tokens"]:
        log.warning("%d of %d records have no response token within %d tokens (they add no loss)",
                    stats["no_response_tokens"], len(records), max_length)
    return {"input_ids": input_ids, "labels": labels}, stats


def build_sft_dataset(tokenizer, records: Sequence[Mapping], *, max_length: int,
                      tokenize_jointly: bool = False) -> tuple[datasets.Dataset, dict[str, int]]:
    """`tokenize_records` as a `datasets.Dataset` (columns `input_ids`, `labels`) plus its stats."""
    columns, stats = tokenize_records(tokenizer, records, max_length=max_length, tokenize_jointly=tokenize_jointly)
    log.info("instruction data: %s", stats)
    return datasets.Dataset.from_dict(columns), stats


@dataclass
class SupervisedCollator:
    """Right-pads `input_ids` with `pad_token_id` and `labels` with -100; the attention mask comes from the true
    lengths (not from `input_ids != pad`, which would hide EOS tokens when pad = EOS)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths)):
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"])
            labels[row, :length] = torch.as_tensor(feature["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------------------------------------------- generation

@torch.inference_mode()
def generate_responses(model, tokenizer, records: Sequence[Mapping], *, generator: str, decoding: Mapping,
                       max_new_tokens: int, batch_size: int, max_prompt_tokens: int, seed: int,
                       show_progress: bool = False) -> list[dict]:
    """Responses to `records` (`instruction`, optional `input`) in AlpacaEval's format.

    Prompts are the Alpaca prompt, left-padded and batched by length (longest first, order restored afterwards)
    with a KV cache; decoding follows `decoding` (a `conf/decoding/*.yaml` node: greedy or sampled), seeded once by
    `seed`. Generation stops at EOS or after `max_new_tokens`. Returns `[{instruction, output, generator}, ...]` in
    the order of `records` (plus `input` when non-empty and `dataset` when the record has one).
    """
    from tqdm.auto import tqdm

    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in records]
    was_training, sides = model.training, (tokenizer.padding_side, tokenizer.truncation_side)
    model.eval()
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"  # prompts keep their "### Response:" end
    device = next(model.parameters()).device
    transformers.set_seed(seed)
    gen_kwargs = dict(decoding_kwargs(decoding), max_new_tokens=max_new_tokens, use_cache=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    lengths = [len(ids) for ids in tokenizer(prompts, verbose=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    outputs: list[str] = [""] * len(prompts)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="Generating responses", disable=not show_progress):
            batch = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_prompt_tokens).to(device)
            generated = model.generate(**enc, **gen_kwargs)
            texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                outputs[i] = text.strip()
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
        model.train(was_training)
    rows = []
    for record, output in zip(records, outputs):
        row = {"instruction": record["instruction"], "output": output, "generator": generator}
        if record.get("input"):
            row["input"] = record["input"]
        if record.get("dataset"):
            row["dataset"] = record["dataset"]
        rows.append(row)
    return rows


def reference_outputs(records: Sequence[Mapping], default_generator: str) -> list[dict]:
    """The reference answers carried by an evaluation set (AlpacaEval's `output`), in AlpacaEval's format."""
    missing = [i for i, r in enumerate(records) if not r.get("output")]
    if missing:
        raise InstructionDataError(f"evaluation records {missing[:5]}{'...' if len(missing) > 5 else ''} have no "
                                   "reference 'output' to judge against")
    return [{"instruction": r["instruction"], "output": r["output"],
             "generator": r.get("generator") or default_generator, **({"input": r["input"]} if r.get("input") else {})}
            for r in records]
