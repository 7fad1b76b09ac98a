"""Pairwise judging of a model's outputs against reference outputs, both in AlpacaEval's format.

Inputs are lists of `{instruction, output, generator}` (an optional `input` is kept apart from the instruction),
read from JSON/JSONL files or `hf://datasets/<owner>/<name>@<revision>/<path>` Hub files, and matched on
(instruction, input): `match: intersection` (AlpacaEval's inner join: instructions on one side only are left out,
with a warning that lists them) or `strict` (any of them is an error). Identical answers are a tie without a request
(AlpacaEval scores them 1.5). Every other pair is judged by a judge client (`clients`) through a prompt template
(`templates`):

* `positions: both` (FastChat): the pair is judged with the model's answer as A and again as B. Discrete verdicts
  that agree are a win or a loss for the model, disagreeing ones a tie (flagged `inconsistent`); continuous
  preferences are averaged (`inconsistent` when the two orders prefer different answers).
* `positions: random_swap` (AlpacaEval): one judgement; the model's answer goes first where AlpacaEval's seeded switch
  says so (`random.Random("is_switched_outputs" + instruction + str(seed))`, AlpacaEval's RandomSwitchTwoColumns).

Replies are cached (`cache`) the moment they arrive, so a killed or repeated job never asks twice, and parsed on
every run, so a parser fix needs no new requests. A reply without a verdict (empty, truncated, unparseable, or a
prompt too long for the judge) is recorded and listed, never scored; `rejudge` asks again for exactly those.

Entry points: `judge_outputs` (used by `experiments/judge.py` and the SFT recipe), `load_outputs`, `match_outputs`,
`alpaca_eval_annotations` and `alpaca_eval_leaderboard` (AlpacaEval's `annotations.json` and `leaderboard.csv`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from experiments.pipeline.hub import fetch_file, is_hf_url, parse_hf_url
from experiments.pipeline.judging.cache import JudgementCache, request_key
from experiments.pipeline.judging.clients import build_judge
from experiments.pipeline.judging.templates import JudgeReply, JudgeRequest, JudgeTemplate
from experiments.pipeline.judging.winrate import (OUTCOME_SCORES, length_controlled_win_rate, outcome_counts,
                                                  outcome_of, win_rate)

log = logging.getLogger(__name__)

ORDERS = ("model_first", "reference_first")  # model's answer in position A / in position B
MATCH_MODES = ("intersection", "strict")
FAILURES = ("empty", "truncated", "no_logprobs", "unparseable", "too_long")
REJUDGE_FAILED = ("empty", "truncated", "no_logprobs", "unparseable")


class PairingError(ValueError):
    """Model and reference outputs that cannot be matched by instruction."""


@dataclass(frozen=True)
class Pair:
    """One instruction with the model's and the reference's outputs (and the reference's `dataset` when known)."""

    instruction: str
    input: str
    output: str
    reference_output: str
    generator: str
    reference_generator: str
    dataset: str | None = None

    @property
    def question(self) -> str:
        """The instruction, plus a blank line and the input when there is one."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


def _local_file(path: str | Path) -> Path:
    """`path`, or the local copy of an `hf://datasets/<owner>/<name>@<revision>/<file>` Hub file (read at the commit
    its revision resolves to, recorded for the manifest; offline and not cached, one clear line at once)."""
    if not is_hf_url(str(path)):
        return Path(path)
    location = parse_hf_url(str(path))
    if not location["revision"]:
        raise ValueError(f"{path}: pin the Hub file to a commit: hf://datasets/{location['repo_id']}@<commit>/"
                         f"{location['path']}.")
    return Path(fetch_file(str(path), what="outputs file",
                           hint="Download it once online, or pass a local AlpacaEval-format file instead."))


def load_outputs(path: str | Path) -> list[dict]:
    """AlpacaEval-format outputs from a JSON array or a JSONL file, local or `hf://datasets/...@<revision>/...`: each
    record needs string `instruction` and `output` fields; `generator` defaults to the file's stem."""
    local = _local_file(path)
    if not local.is_file():
        raise FileNotFoundError(f"Outputs file not found: {local}")
    text = local.read_text(encoding="utf-8")
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
        record.setdefault("generator", local.stem)
    return records


def _short(text: str, limit: int = 80) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[:limit - 1] + "…"


def _listing(keys: Sequence[tuple[str, str]], limit: int = 20) -> str:
    listed = "\n".join(f"    - {_short(i)}" + (f" [input: {_short(x, 40)}]" if x else "") for i, x in keys[:limit])
    return listed + (f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _single_generator(records: Sequence[Mapping], side: str, default: str) -> str:
    names = sorted({str(r.get("generator") or default) for r in records})
    if len(names) > 1:
        raise PairingError(f"The {side} outputs mix generators {names}; judge one model at a time.")
    return names[0] if names else default


def _index(records: Sequence[Mapping], side: str) -> dict:
    """`{(instruction, input): record}`; a repeated key with the same output is dropped, with another output it is a
    `PairingError`."""
    by_key, conflicts = {}, []
    for record in records:
        key = (record["instruction"], record.get("input") or "")
        if key in by_key and by_key[key]["output"] != record["output"]:
            conflicts.append(key)
        by_key.setdefault(key, record)
    if conflicts:
        raise PairingError(f"{len(conflicts)} instruction(s) appear more than once in the {side} outputs with "
                           f"different outputs:\n{_listing(conflicts)}")
    return by_key


def match_outputs(model_outputs: Sequence[Mapping], reference_outputs: Sequence[Mapping],
                  match: str = "strict") -> tuple[list[Pair], dict[str, list[dict]]]:
    """`(pairs, unmatched)`: pairs in the model outputs' order, matched on (instruction, input), and the instructions
    found on one side only (`{"missing_from_reference": [...], "missing_from_model": [...]}`, each `{instruction,
    input}`). With `match="strict"` any unmatched instruction raises `PairingError` listing them all; with
    `"intersection"` they are left out with a warning (AlpacaEval's inner join)."""
    if match not in MATCH_MODES:
        raise ValueError(f"pairwise.match must be one of {MATCH_MODES}, got {match!r}.")
    if not model_outputs:
        raise PairingError("The model outputs are empty: nothing to judge.")
    models, references = _index(model_outputs, "model"), _index(reference_outputs, "reference")
    missing = {"missing_from_reference": [k for k in models if k not in references],
               "missing_from_model": [k for k in references if k not in models]}
    problems = [f"  {len(keys)} instruction(s) {what.replace('_', ' ')} outputs:\n{_listing(keys)}"
                for what, keys in missing.items() if keys]
    if problems and (match == "strict" or len(missing["missing_from_reference"]) == len(models)):
        raise PairingError("Model and reference outputs do not match by instruction"
                           f"{' (none in common)' if match == 'intersection' else ''}:\n" + "\n".join(problems))
    if problems:
        log.warning("Judging the %d instruction(s) both sides have (pairwise.match=intersection, AlpacaEval's "
                    "inner join):\n%s", len(models) - len(missing["missing_from_reference"]), "\n".join(problems))
    generator = _single_generator(model_outputs, "model", "model")
    reference_generator = _single_generator(reference_outputs, "reference", "reference")
    pairs = [Pair(instruction, input_text, record["output"], references[(instruction, input_text)]["output"],
                  generator, reference_generator, references[(instruction, input_text)].get("dataset"))
             for (instruction, input_text), record in models.items() if (instruction, input_text) in references]
    unmatched = {what: [{"instruction": i, **({"input": x} if x else {})} for i, x in keys]
                 for what, keys in missing.items()}
    return pairs, unmatched


def judged_orders(pair: Pair, positions: str, seed: int) -> tuple[str, ...]:
    """The orders in which `pair` is judged: both, or the one AlpacaEval's seeded switch picks (switched: the model's
    answer, AlpacaEval's output_2, goes first)."""
    if positions == "both":
        return ORDERS
    if positions == "random_swap":
        switched = random.Random(f"is_switched_outputs{pair.question}{seed}").choices([False, True], k=1)[0]
        return ("model_first",) if switched else ("reference_first",)
    raise ValueError(f"judge.positions must be 'both' or 'random_swap', got {positions!r}.")


def combine(scores: Sequence[float], discrete: bool) -> tuple[float, bool]:
    """`(score, inconsistent)` of a pair from the model's score in each judged order: discrete verdicts that agree
    stand and disagreeing ones are a tie (FastChat); continuous preferences are averaged, inconsistent when the orders
    prefer different answers."""
    outcomes = {outcome_of(score) for score in scores}
    if discrete:
        return (scores[0], False) if len(outcomes) == 1 else (0.5, True)
    return sum(scores) / len(scores), {"win", "loss"} <= outcomes


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


def _scored(judgements: Sequence[Mapping], unparseable: str) -> list[tuple[Mapping, float]]:
    return [(row, row["score"] if row["score"] is not None else 0.5) for row in judgements
            if row["outcome"] in OUTCOME_SCORES or (row["outcome"] == "unparseable" and unparseable == "tie")]


def summarize(judgements: Sequence[Mapping], *, unparseable: str = "exclude",
              instruction_difficulty: str | Path | None = None, folds: int = 5) -> dict:
    """Metrics of a list of judgement rows (as `judge_outputs` returns them): counts, win rate and standard error,
    discrete win rate, the pairs without a verdict, average lengths and the length-controlled win rate."""
    if unparseable not in ("exclude", "tie"):
        raise ValueError(f"judge.unparseable must be 'exclude' or 'tie', got {unparseable!r}.")
    scored = _scored(judgements, unparseable)
    scores = [score for _, score in scored]
    counts = outcome_counts([outcome_of(score) for score in scores])
    difficulty = (_read_difficulty(instruction_difficulty, [row["instruction"] for row, _ in scored])
                  if instruction_difficulty else None)
    lengths = {side: [len(row[key]) for row in judgements] for side, key in (("model", "output"),
                                                                               ("reference", "reference_output"))}
    rate = win_rate(scores)
    return {
        "win_rate": rate["win_rate"], "win_rate_se": rate["win_rate_se"], "n_judged": rate["n"],
        "wins": counts["wins"], "ties": counts["ties"], "losses": counts["losses"],
        "discrete_win_rate": (counts["wins"] + counts["ties"] / 2) / len(scores) if scores else None,
        **{name: count for name, count in outcome_counts([row["outcome"] for row in judgements]).items()
           if name in ("unparseable", "skipped")},
        "n_pairs": len(judgements),
        "inconsistent": sum(bool(row["inconsistent"]) for row in judgements),
        "identical": sum(bool(row.get("identical")) for row in judgements),
        "unparseable_as": unparseable,
        "unparseable_pairs": [{"instruction": row["instruction"],
                               "orders": {v["order"]: v["failure"] for v in row["verdicts"] if v["failure"]}}
                              for row in judgements if row["outcome"] == "unparseable"],
        "skipped_pairs": [{"instruction": row["instruction"], "reason": "too_long"}
                          for row in judgements if row["outcome"] == "skipped"],
        "avg_length": {side: (sum(values) / len(values) if values else None) for side, values in lengths.items()},
        "length_controlled": length_controlled_win_rate(
            scores, [len(row["output"]) for row, _ in scored], [len(row["reference_output"]) for row, _ in scored],
            instruction_difficulty=difficulty, folds=folds),
    }


def _rejudge_kinds(value) -> set[str]:
    """The failure kinds `judge.rejudge` asks again for: none (default), `failed` (every kind but `too_long`), or one
    kind or a list of them (`empty`, `truncated`, `no_logprobs`, `unparseable`, `too_long`)."""
    if value in (None, False, "none", ""):
        return set()
    names = [value] if isinstance(value, str) else list(value)
    kinds = set()
    for name in names:
        if name not in (*FAILURES, "failed"):
            raise ValueError(f"judge.rejudge: unknown kind {name!r}; use none, failed or any of {FAILURES}.")
        kinds |= set(REJUDGE_FAILED) if name == "failed" else {name}
    return kinds


def _failure(template: JudgeTemplate, reply: JudgeReply) -> str | None:
    return reply.failure or (None if template.parse(reply) is not None else "unparseable")


@dataclass(frozen=True)
class _Planned:
    pair: Pair
    orders: tuple[tuple[str, JudgeRequest], ...]  # empty: identical answers, a tie without a request


def _plan(pairs: Sequence[Pair], judge, positions: str, seed: int) -> list[_Planned]:
    template, identity, params = judge.template, judge.identity, judge.request_params
    planned = []
    for pair in pairs:
        orders = []
        if pair.output != pair.reference_output:
            for order in judged_orders(pair, positions, seed):
                answer_a, answer_b = ((pair.output, pair.reference_output) if order == "model_first"
                                      else (pair.reference_output, pair.output))
                system, prompt = template.render(pair.instruction, pair.input, answer_a, answer_b)
                orders.append((order, JudgeRequest(key=request_key(identity, params, system, prompt),
                                                   instruction=pair.instruction, answer_a=answer_a,
                                                   answer_b=answer_b, system=system, prompt=prompt)))
        planned.append(_Planned(pair, tuple(orders)))
    return planned


def _judgement_row(item: _Planned, replies: Mapping[str, JudgeReply], template: JudgeTemplate,
                   judge_name: str) -> dict:
    pair, verdicts = item.pair, []
    for order, request in item.orders:
        reply = replies[request.key]
        preference_b = template.parse(reply)
        score = None if preference_b is None else (1 - preference_b if order == "model_first" else preference_b)
        verdicts.append({"order": order, "model_position": "A" if order == "model_first" else "B",
                         "preference_b": preference_b, "model_score": score,
                         "verdict": None if preference_b is None else {"win": "B", "loss": "A", "tie": "tie"}[
                             outcome_of(preference_b)],
                         "failure": _failure(template, reply), "reply": reply.text,
                         **({"top_logprobs": reply.top_logprobs[0]} if reply.top_logprobs else {})})
    if not item.orders:
        outcome, score, inconsistent = "tie", 0.5, False
    elif any(v["failure"] == "too_long" for v in verdicts):
        outcome, score, inconsistent = "skipped", None, False
    elif any(v["model_score"] is None for v in verdicts):
        outcome, score, inconsistent = "unparseable", None, False
    else:
        score, inconsistent = combine([v["model_score"] for v in verdicts], discrete=bool(template.verdicts))
        outcome = outcome_of(score)
    return {"instruction": pair.instruction, **({"input": pair.input} if pair.input else {}),
            "generator": pair.generator, "reference_generator": pair.reference_generator,
            **({"dataset": pair.dataset} if pair.dataset else {}),
            "output": pair.output, "reference_output": pair.reference_output, "verdicts": verdicts,
            "identical": not item.orders, "outcome": outcome, "inconsistent": inconsistent, "score": score,
            "judge": judge_name, "template": template.name}


def judge_outputs(model_outputs: Sequence[Mapping], reference_outputs: Sequence[Mapping], *, judge_cfg: Mapping,
                  cache_dir: str | Path | None, match: str = "strict", show_progress: bool = False,
                  judge=None) -> tuple[list[dict], dict]:
    """Match a model's outputs with reference outputs (both AlpacaEval format; `match_outputs`) and `judge_pairs`."""
    pairs, unmatched = match_outputs(model_outputs, reference_outputs, match)
    return judge_pairs(pairs, judge_cfg=judge_cfg, cache_dir=cache_dir, unmatched=unmatched, match=match,
                       show_progress=show_progress, judge=judge)


def judge_pairs(pairs: Sequence[Pair], *, judge_cfg: Mapping, cache_dir: str | Path | None,
                unmatched: Mapping | None = None, match: str = "strict", show_progress: bool = False,
                judge=None) -> tuple[list[dict], dict]:
    """Judge matched pairs and score them.

    `judge_cfg` is a `judge` config node (kind, model, template, positions, rejudge, ...). Replies are cached under
    `<cache_dir>/judgements/` (None: no cache). Pass a client from `build_judge` as `judge` to reuse a loaded model;
    `unmatched` and `match` (from `match_outputs`) are recorded in the metrics. Returns `(judgements, metrics)`: one
    row per instruction (outputs, per-order verdicts, raw replies and failures, outcome, score) and the metrics of
    `summarize` plus the judge, template, unmatched instructions and request counts.
    """
    judge = judge or build_judge(judge_cfg)
    template = judge.template
    positions = str(judge_cfg.get("positions") or template.positions)
    seed = int(judge_cfg.get("seed", 0))
    unparseable = str(judge_cfg.get("unparseable", "exclude"))
    if unparseable not in ("exclude", "tie"):  # checked before any request is paid for
        raise ValueError(f"judge.unparseable must be 'exclude' or 'tie', got {unparseable!r}.")
    rejudge = _rejudge_kinds(judge_cfg.get("rejudge"))
    cache = JudgementCache(Path(cache_dir) / "judgements", judge.identity) if cache_dir is not None else None
    planned = _plan(pairs, judge, positions, seed)
    unique = {request.key: request for item in planned for _, request in item.orders}
    replies = {key: cache[key] for key in unique if cache is not None and key in cache}
    again = [key for key, reply in replies.items() if _failure(template, reply) in rejudge]
    to_send = [request for key, request in unique.items() if key not in replies or key in again]
    n_prompts = sum(len(item.orders) for item in planned)
    log.info("Judging %d pairs (positions: %s) with %s / %s: %d prompts, %d distinct, %d cached, %d to send%s",
             len(pairs), positions, judge.name, template.name, n_prompts, len(unique), len(replies), len(to_send),
             f" ({len(again)} to judge again: {sorted(rejudge)})" if again else "")

    def on_result(request: JudgeRequest, reply: JudgeReply) -> None:
        replies[request.key] = reply
        if cache is not None:
            cache.put(request.key, reply, template.name)

    judge.run(to_send, on_result, show_progress=show_progress)

    judgements = [_judgement_row(item, replies, template, judge.name) for item in planned]
    length_control = judge_cfg.get("length_control") or {}
    metrics = summarize(judgements, unparseable=unparseable,
                        instruction_difficulty=length_control.get("instruction_difficulty"),
                        folds=int(length_control.get("folds", 5)))
    failures = [v["failure"] for row in judgements for v in row["verdicts"] if v["failure"]]
    metrics.update({
        "generator": pairs[0].generator if pairs else None,
        "reference_generator": pairs[0].reference_generator if pairs else None,
        "judge": judge.name, "judge_kind": judge.identity["kind"], "judge_identity": judge.record,
        "template": template.name, "template_source": dict(template.source), "positions": positions,
        "swap_seed": seed if positions == "random_swap" else None,
        "match": match, "unmatched": dict(unmatched or {}),
        "requests": {"prompts": n_prompts, "distinct": len(unique), "cached": len(unique) - len(to_send),
                     "sent": len(to_send), "rejudged": len(again),
                     "failed": {kind: failures.count(kind) for kind in FAILURES if kind in failures}},
    })
    if metrics["unparseable"] or metrics["skipped"]:
        log.warning("%d pair(s) without a verdict (%s; %s) and %d skipped as too long for the judge: %s. "
                    "judge.rejudge=failed asks again for them.", metrics["unparseable"],
                    ", ".join(f"{n} {k}" for k, n in metrics["requests"]["failed"].items()),
                    "excluded" if unparseable == "exclude" else "counted as ties", metrics["skipped"],
                    "; ".join(_short(p["instruction"], 40) for p in
                              (metrics["unparseable_pairs"] + metrics["skipped_pairs"])[:5]))
    return judgements, metrics


def alpaca_eval_annotations(judgements: Sequence[Mapping]) -> list[dict]:
    """AlpacaEval's `annotations.json` records: output_1 / generator_1 the reference, output_2 / generator_2 the model,
    `preference` 1 + the model's score (1: the reference is better, 2: the model, 1.5: a tie; null: no verdict),
    `annotator` the template and `raw_completion` the judge's reply (one per judged order)."""
    return [{"instruction": row["instruction"], **({"input": row["input"]} if row.get("input") else {}),
             **({"dataset": row["dataset"]} if row.get("dataset") else {}),
             "output_1": row["reference_output"], "generator_1": row["reference_generator"],
             "output_2": row["output"], "generator_2": row["generator"],
             "annotator": row["template"], "judge": row["judge"],
             "preference": None if row["score"] is None or row["outcome"] not in OUTCOME_SCORES else 1 + row["score"],
             "raw_completion": [v["reply"] for v in row["verdicts"]],
             "is_switched_outputs": [v["order"] == "model_first" for v in row["verdicts"]]}
            for row in judgements]


LEADERBOARD_COLUMNS = ("win_rate", "standard_error", "avg_length", "n_wins", "n_wins_base", "n_draws", "n_total",
                       "discrete_win_rate", "length_controlled_winrate", "lc_standard_error")
"""AlpacaEval's leaderboard.csv columns (`evaluate` with `get_length_controlled_winrate`), rates in percent."""


def alpaca_eval_leaderboard(metrics: Mapping, name: str) -> str:
    """AlpacaEval's `leaderboard.csv` for one model (the index column is its name)."""
    def percent(value):
        return None if value is None else 100.0 * value

    lc = metrics["length_controlled"]
    values = {"win_rate": percent(metrics["win_rate"]), "standard_error": percent(metrics["win_rate_se"]),
              "avg_length": int(metrics["avg_length"]["model"]) if metrics["avg_length"]["model"] is not None else None,
              "n_wins": metrics["wins"], "n_wins_base": metrics["losses"], "n_draws": metrics["ties"],
              "n_total": metrics["n_judged"], "discrete_win_rate": percent(metrics["discrete_win_rate"]),
              "length_controlled_winrate": percent(lc["win_rate"]), "lc_standard_error": percent(lc["win_rate_se"])}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["", *LEADERBOARD_COLUMNS])
    writer.writerow([name, *("" if values[c] is None else values[c] for c in LEADERBOARD_COLUMNS)])
    return buffer.getvalue()
