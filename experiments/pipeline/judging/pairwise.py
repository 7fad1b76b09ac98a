"""Pairwise judging of a model's outputs against reference outputs, both in AlpacaEval's format.

Inputs are lists of `{instruction, output, generator}` (an optional `input` is kept apart from the instruction),
matched by instruction. Each pair is judged by a judge client (`experiments.pipeline.judge_clients`) through a prompt
template (`experiments.pipeline.judge_templates`):

* `positions: both` (default, FastChat): the pair is judged with the model's answer as A and again as B; two
  agreeing verdicts are a win or a loss for the model, disagreeing ones a tie (flagged `inconsistent`).
* `positions: random_swap` (AlpacaEval): one judgement, the model's answer placed second when a hash of
  `(seed, instruction)` is odd.

Every reply is cached on disk under `<cache_dir>/judgements/`, keyed by (judge identity, template, instruction,
input, answer in position A, answer in position B), and appended the moment it arrives, so a killed or repeated job
never asks twice. Replies are parsed on every run, so a parser fix needs no new requests.

Entry points: `judge_outputs` (used by `experiments/judge.py` and the SFT recipe), `load_outputs`, `match_outputs`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from experiments.pipeline.judge_clients import build_judge
from experiments.pipeline.judge_templates import JudgeRequest, JudgeTemplate
from experiments.pipeline.winrate import OUTCOME_SCORES, length_controlled_win_rate, outcome_counts, win_rate

log = logging.getLogger(__name__)

ORDERS = ("model_first", "reference_first")  # model's answer in position A / in position B
_MODEL_RESULT = {("model_first", "A"): "win", ("model_first", "B"): "loss",
                 ("reference_first", "A"): "loss", ("reference_first", "B"): "win"}


class PairingError(ValueError):
    """Model and reference outputs that cannot be matched one-to-one by instruction."""


@dataclass(frozen=True)
class Pair:
    """One instruction with the model's and the reference's outputs."""

    instruction: str
    input: str
    output: str
    reference_output: str
    generator: str
    reference_generator: str


def load_outputs(path: str | Path) -> list[dict]:
    """AlpacaEval-format outputs from a JSON array or a JSONL file: each record needs string `instruction` and
    `output` fields; `generator` defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Outputs file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON array or JSONL file of records ({error}).") from None
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) \
                or not isinstance(record.get("output"), str):
            raise ValueError(f"{path}: record {index} needs string 'instruction' and 'output' fields (AlpacaEval "
                             f"format), got {str(record)[:200]}")
        record.setdefault("generator", path.stem)
    return records


def _short(text: str, limit: int = 80) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[:limit - 1] + "…"


def _single_generator(records: Sequence[Mapping], side: str, default: str) -> str:
    names = sorted({str(r.get("generator") or default) for r in records})
    if len(names) > 1:
        raise PairingError(f"The {side} outputs mix generators {names}; judge one model at a time.")
    return names[0] if names else default


def match_outputs(model_outputs: Sequence[Mapping], reference_outputs: Sequence[Mapping]) -> list[Pair]:
    """Pairs in the model outputs' order, matched on (instruction, input). Raises `PairingError` listing every
    duplicate and every instruction present on one side only."""
    def index(records: Sequence[Mapping]) -> tuple[dict, list]:
        by_key, duplicates = {}, []
        for record in records:
            key = (record["instruction"], record.get("input") or "")
            if key in by_key:
                duplicates.append(key)
            by_key[key] = record
        return by_key, duplicates

    if not model_outputs:
        raise PairingError("The model outputs are empty: nothing to judge.")
    models, model_dups = index(model_outputs)
    references, reference_dups = index(reference_outputs)
    problems = []
    for what, keys in (("duplicated in the model outputs", model_dups),
                       ("duplicated in the reference outputs", reference_dups),
                       ("missing from the reference outputs", [k for k in models if k not in references]),
                       ("missing from the model outputs", [k for k in references if k not in models])):
        if keys:
            listed = "\n".join(f"    - {_short(i)}" + (f" [input: {_short(x, 40)}]" if x else "") for i, x in keys[:20])
            more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
            problems.append(f"  {len(keys)} instruction(s) {what}:\n{listed}{more}")
    if problems:
        raise PairingError("Model and reference outputs do not match by instruction:\n" + "\n".join(problems))
    generator = _single_generator(model_outputs, "model", "model")
    reference_generator = _single_generator(reference_outputs, "reference", "reference")
    return [Pair(instruction, input_text, record["output"], references[(instruction, input_text)]["output"],
                 generator, reference_generator)
            for (instruction, input_text), record in models.items()]


class JudgementCache:
    """Judge replies on disk: one JSONL file per (judge identity, template), one line appended per reply.

    Each line is written with one `write` system call on a file opened with O_APPEND, so concurrent writers never
    interleave and a killed job leaves at most one torn last line, which is skipped on reading (and ended before the
    next entry is appended).
    """

    def __init__(self, directory: str | Path, judge_name: str, identity: Mapping, template: JudgeTemplate):
        digest = hashlib.sha256(json.dumps([identity, template.fingerprint], sort_keys=True).encode()).hexdigest()
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", judge_name).strip("-")[:60] or "judge"
        self.path = Path(directory) / f"{slug}__{template.name}__{digest[:12]}.jsonl"
        self._identity, self._template_name = dict(identity), template.name
        self._lock = threading.Lock()
        self._replies: dict[str, str] = {}
        self._torn_tail = False
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            self._torn_tail = bool(text) and not text.endswith("\n")
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    row = json.loads(line)
                    self._replies[row["key"]] = row["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("%s:%d: skipping an unreadable cache line (an interrupted write)", self.path, number)

    def __contains__(self, key: str) -> bool:
        return key in self._replies

    def __getitem__(self, key: str) -> str:
        return self._replies[key]

    def put(self, key: str, reply: str) -> None:
        """Store one reply (memory and disk)."""
        line = json.dumps({"key": key, "reply": reply, "judge": self._identity, "template": self._template_name,
                           "time": time.time()}, ensure_ascii=False) + "\n"
        with self._lock:
            if self._torn_tail:  # end the torn line first, or this entry would be glued to it
                line, self._torn_tail = "\n" + line, False
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(descriptor, line.encode("utf-8"))
            finally:
                os.close(descriptor)
            self._replies[key] = reply


def _request(pair: Pair, order: str, template: JudgeTemplate, identity: Mapping) -> JudgeRequest:
    answer_a, answer_b = ((pair.output, pair.reference_output) if order == "model_first"
                          else (pair.reference_output, pair.output))
    system, prompt = template.render(pair.instruction, pair.input, answer_a, answer_b)
    key = hashlib.sha256(json.dumps([identity, template.fingerprint, pair.instruction, pair.input, answer_a, answer_b],
                                    sort_keys=True).encode()).hexdigest()
    return JudgeRequest(key=key, instruction=pair.instruction, answer_a=answer_a, answer_b=answer_b, system=system,
                        prompt=prompt)


def judged_orders(pair: Pair, positions: str, seed: int) -> tuple[str, ...]:
    """The orders in which `pair` is judged: both, or one chosen by a hash of (seed, instruction)."""
    if positions == "both":
        return ORDERS
    if positions == "random_swap":
        digest = hashlib.sha256(f"{seed}\0{pair.instruction}\0{pair.input}".encode()).digest()
        return (ORDERS[digest[0] & 1],)
    raise ValueError(f"judge.positions must be 'both' or 'random_swap', got {positions!r}.")


def combine(results: Sequence[str | None]) -> tuple[str, bool]:
    """`(outcome, inconsistent)` from the model's per-order results ("win"/"tie"/"loss", None = unparseable):
    agreeing results stand, disagreeing ones are a tie, any unparseable one makes the pair unparseable."""
    if any(result is None for result in results):
        return "unparseable", False
    if len(set(results)) == 1:
        return results[0], False
    return "tie", True


def _read_difficulty(path: str | Path, instructions: Sequence[str]) -> list[float]:
    """Instruction difficulty from a JSON object {instruction: value} or a CSV with `instruction,difficulty`."""
    path = Path(path)
    if path.suffix == ".json":
        table = {str(k): float(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    else:
        with open(path, newline="", encoding="utf-8") as handle:
            table = {row["instruction"]: float(row["difficulty"]) for row in csv.DictReader(handle)}
    missing = [i for i in instructions if i not in table]
    if missing:
        raise ValueError(f"{path}: no difficulty for {len(missing)} judged instruction(s), "
                         f"e.g. {_short(missing[0])!r}.")
    return [table[i] for i in instructions]


def summarize(judgements: Sequence[Mapping], *, unparseable: str = "exclude",
              instruction_difficulty: str | Path | None = None, folds: int = 5) -> dict:
    """Metrics of a list of judgement rows (as `judge_outputs` returns): counts, win rate and standard error,
    the unparseable pairs, average lengths and the length-controlled win rate."""
    if unparseable not in ("exclude", "tie"):
        raise ValueError(f"judge.unparseable must be 'exclude' or 'tie', got {unparseable!r}.")
    outcomes = [row["outcome"] for row in judgements]
    scored = [row for row in judgements if row["outcome"] != "unparseable" or unparseable == "tie"]
    scores = [OUTCOME_SCORES.get(row["outcome"], 0.5) for row in scored]
    difficulty = (_read_difficulty(instruction_difficulty, [row["instruction"] for row in scored])
                  if instruction_difficulty else None)
    lengths = {side: [len(row[key]) for row in judgements] for side, key in (("model", "output"),
                                                                               ("reference", "reference_output"))}
    rate = win_rate(scores)
    return {
        "win_rate": rate["win_rate"], "win_rate_se": rate["win_rate_se"], "n_judged": rate["n"],
        **outcome_counts(outcomes),
        "n_pairs": len(judgements),
        "inconsistent": sum(bool(row["inconsistent"]) for row in judgements),
        "unparseable_as": unparseable,
        "unparseable_pairs": [{"instruction": row["instruction"],
                               "orders": [v["order"] for v in row["verdicts"] if v["verdict"] is None]}
                              for row in judgements if row["outcome"] == "unparseable"],
        "avg_length": {side: (sum(values) / len(values) if values else None) for side, values in lengths.items()},
        "length_controlled": length_controlled_win_rate(
            scores, [len(row["output"]) for row in scored], [len(row["reference_output"]) for row in scored],
            instruction_difficulty=difficulty, folds=folds),
    }


def judge_outputs(model_outputs: Sequence[Mapping], reference_outputs: Sequence[Mapping], *, judge_cfg: Mapping,
                  cache_dir: str | Path | None, show_progress: bool = False, judge=None) -> tuple[list[dict], dict]:
    """Judge a model's outputs against reference outputs (both AlpacaEval format) and score them.

    `judge_cfg` is a `judge` config node (kind, model, template, positions, ...). Replies are cached under
    `<cache_dir>/judgements/` (None: no cache). Pass a client from `build_judge` as `judge` to reuse a loaded model.
    Returns `(judgements, metrics)`: one row per instruction (outputs, per-order verdicts and raw replies, outcome,
    score) and the metrics of `summarize` plus generator, judge and template names and request counts.
    """
    pairs = match_outputs(model_outputs, reference_outputs)
    judge = judge or build_judge(judge_cfg)
    template = judge.template
    identity = judge.identity
    positions, seed = str(judge_cfg.get("positions", "both")), int(judge_cfg.get("seed", 0))
    unparseable = str(judge_cfg.get("unparseable", "exclude"))
    if unparseable not in ("exclude", "tie"):  # checked before any request is paid for
        raise ValueError(f"judge.unparseable must be 'exclude' or 'tie', got {unparseable!r}.")
    cache = (JudgementCache(Path(cache_dir) / "judgements", judge.name, identity, template)
             if cache_dir is not None else None)
    planned = [[(order, _request(pair, order, template, identity)) for order in judged_orders(pair, positions, seed)]
               for pair in pairs]
    unique = {request.key: request for orders in planned for _, request in orders}
    replies: dict[str, str] = {key: cache[key] for key in unique if cache is not None and key in cache}
    to_send = [request for key, request in unique.items() if key not in replies]
    n_prompts = sum(len(orders) for orders in planned)
    log.info("Judging %d pairs (positions: %s) with %s / %s: %d prompts, %d distinct, %d cached, %d to send",
             len(pairs), positions, judge.name, template.name, n_prompts, len(unique), len(replies), len(to_send))

    def on_result(request: JudgeRequest, reply: str) -> None:
        replies[request.key] = reply
        if cache is not None:
            cache.put(request.key, reply)

    judge.run(to_send, on_result, show_progress=show_progress)

    judgements = []
    for pair, orders in zip(pairs, planned, strict=True):
        verdicts = []
        for order, request in orders:
            reply = replies[request.key]
            verdict = template.parse(reply)
            verdicts.append({"order": order, "model_position": "A" if order == "model_first" else "B",
                             "verdict": verdict, "model_result": _MODEL_RESULT.get((order, verdict),
                                                                                   "tie" if verdict else None),
                             "reply": reply})
        outcome, inconsistent = combine([v["model_result"] for v in verdicts])
        judgements.append({"instruction": pair.instruction, **({"input": pair.input} if pair.input else {}),
                           "generator": pair.generator, "reference_generator": pair.reference_generator,
                           "output": pair.output, "reference_output": pair.reference_output,
                           "verdicts": verdicts, "outcome": outcome, "inconsistent": inconsistent,
                           "score": OUTCOME_SCORES.get(outcome), "judge": judge.name, "template": template.name})
    length_control = judge_cfg.get("length_control") or {}
    metrics = summarize(judgements, unparseable=unparseable,
                        instruction_difficulty=length_control.get("instruction_difficulty"),
                        folds=int(length_control.get("folds", 5)))
    metrics.update({
        "generator": pairs[0].generator if pairs else None,
        "reference_generator": pairs[0].reference_generator if pairs else None,
        "judge": judge.name, "judge_kind": identity["kind"], "judge_identity": identity,
        "template": template.name, "template_source": template.source, "positions": positions,
        "swap_seed": seed if positions == "random_swap" else None,
        "requests": {"prompts": n_prompts, "distinct": len(unique), "cached": len(unique) - len(to_send),
                     "sent": len(to_send)},
    })
    if metrics["unparseable"]:
        log.warning("%d pair(s) with an unparseable verdict (%s): %s", metrics["unparseable"],
                    "excluded" if metrics["unparseable_as"] == "exclude" else "counted as ties",
                    "; ".join(_short(p["instruction"], 40) for p in metrics["unparseable_pairs"][:5]))
    return judgements, metrics

