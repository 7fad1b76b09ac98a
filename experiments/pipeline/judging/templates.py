"""Judge prompt templates (config group `judge/template`), the judge's replies, and the parsers that read them.

A template renders one (instruction, answer A, answer B) triple into what the judge sees: chat messages (`format:
chat`: FastChat's pair-v2, AlpacaEval's judges) or one raw prompt for a base model behind a completions endpoint
(`format: text`: PandaLM, Auto-J). Its parser turns the judge's reply into a *preference for the answer in position B*
in [0, 1] (0: A is better, 1: B is better, 0.5: a tie; anything in between from a logprob judge), or None when the
reply cannot be read. Published templates are reproduced verbatim in `conf/judge/template/*.yaml`, each pinned to the
upstream commit it was taken from (`source`); `tests/test_judging_templates.py` checks them against those commits.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

VERDICTS = ("A", "B", "tie")
VERDICT_PREFERENCE = {"A": 0.0, "B": 1.0, "tie": 0.5}
PLACEHOLDERS = ("question", "instruction", "input", "answer_a", "answer_b")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
_PAIR_V2_TAG = re.compile(r"\[\[([ABC])\]\]")
_AUTOJ_DECISION = "final decision is "


@dataclass(frozen=True)
class JudgeReply:
    """What a judge sent back for one prompt: the text (None when the reply had none), why generation stopped, the
    top log-probabilities of each generated token (`[[(token, logprob), ...], ...]`, when requested) and `failure`,
    why the reply holds no verdict (None for a complete reply): `empty`, `truncated`, `no_logprobs`, `too_long`."""

    text: str | None
    finish_reason: str | None = None
    top_logprobs: tuple[tuple[tuple[str, float], ...], ...] | None = None
    failure: str | None = None

    def to_json(self) -> dict:
        """A JSON-serialisable form (the cache stores it; `from_json` reads it back)."""
        return {"text": self.text, "finish_reason": self.finish_reason, "failure": self.failure,
                "top_logprobs": None if self.top_logprobs is None else
                [[list(pair) for pair in token] for token in self.top_logprobs]}

    @classmethod
    def from_json(cls, value: Mapping) -> JudgeReply:
        """Inverse of `to_json`."""
        top = value.get("top_logprobs")
        return cls(text=value.get("text"), finish_reason=value.get("finish_reason"), failure=value.get("failure"),
                   top_logprobs=None if top is None else tuple(tuple((str(t), float(lp)) for t, lp in token)
                                                               for token in top))


def parse_pair_v2(text: str) -> float | None:
    """FastChat pair-v2: the last `[[A]]` / `[[B]]` / `[[C]]` (tie) in the reply, None when there is none.

    FastChat takes the first tag found when searching A, then B, then C; the two agree whenever the reply holds one
    tag. We take the last one because the prompt asks for the verdict after the explanation, which may quote tags.
    """
    tags = _PAIR_V2_TAG.findall(text)
    return VERDICT_PREFERENCE[{"A": "A", "B": "B", "C": "tie"}[tags[-1]]] if tags else None


def parse_pandalm(text: str) -> float | None:
    """PandaLM (`parse_pandalm_response`): the reply, stripped, up to its first "\\n" is exactly "1" or "2", or "Tie"
    in any case. PandaLM reads any other reply (also "2\\r\\n...") as a tie; here it is unparseable
    (`judge.unparseable=tie` reads it as PandaLM does)."""
    head = text.strip().split("\n")[0]
    verdict = {"1": "A", "2": "B"}.get(head) or ("tie" if head.lower() == "tie" else None)
    return VERDICT_PREFERENCE[verdict] if verdict else None


def parse_autoj(text: str) -> float | None:
    """Auto-J (`extract_pariwise_result`): the text after the last "final decision is " starts with "Response 1",
    "Response 2" or "Tie" (case-insensitive)."""
    position = text.rfind(_AUTOJ_DECISION)
    if position < 0:
        return None
    rest = text[position + len(_AUTOJ_DECISION):].strip().lower()
    for prefix, verdict in (("response 1", "A"), ("response 2", "B"), ("tie", "tie")):
        if rest.startswith(prefix):
            return VERDICT_PREFERENCE[verdict]
    return None


def parse_alpaca_eval_ranking(text: str) -> float | None:
    """AlpacaEval `ranking_parser`: the reply is a Python list of `{'model': ..., 'rank': ...}`; the rank (1 or 2) of
    `model_1`, the answer in position A, decides. None when it cannot be read."""
    try:
        ranking = ast.literal_eval(text.strip())
        rank = next(entry["rank"] for entry in ranking if entry["model"] == "model_1")
    except (ValueError, SyntaxError, TypeError, KeyError, StopIteration, MemoryError, RecursionError):
        return None
    return {1: 0.0, 2: 1.0}.get(rank) if isinstance(rank, int) else None


def logprob_preference(top_logprobs: Sequence[tuple[str, float]], token_a: str, token_b: str) -> float | None:
    """AlpacaEval `logprob_parser` (`is_binarize: false`) on one generated token: P(B) / (P(A) + P(B)) from the
    token's top log-probabilities, a token absent from them having probability 0; None when neither is present.
    (AlpacaEval's preference is `2 - P(A) / (P(A) + P(B))`, i.e. 1 + this value.)"""
    found = {token: logprob for token, logprob in top_logprobs if token in (token_a, token_b)}
    if not found:
        return None
    log_a, log_b = found.get(token_a, -math.inf), found.get(token_b, -math.inf)
    top = max(log_a, log_b)
    p_a, p_b = math.exp(log_a - top), math.exp(log_b - top)
    return p_b / (p_a + p_b)


@dataclass(frozen=True)
class Parser:
    """A verdict parser: what it reads (`text`, or the first token's `logprobs`) and the verdicts it can give."""

    reads: str
    verdicts: tuple[str, ...]
    read: Callable


PARSERS: dict[str, Parser] = {
    "pair_v2": Parser("text", VERDICTS, parse_pair_v2),
    "pandalm": Parser("text", VERDICTS, parse_pandalm),
    "autoj": Parser("text", VERDICTS, parse_autoj),
    "alpaca_eval_ranking": Parser("text", ("A", "B"), parse_alpaca_eval_ranking),
    "alpaca_eval_logprobs": Parser("logprobs", (), logprob_preference),
}


@dataclass(frozen=True)
class JudgeRequest:
    """One prompt for the judge: the rendered `system` (None for text templates) and `prompt`, the answers as shown
    in positions A and B, and `key`, the cache key (`experiments.pipeline.judging.cache.request_key`)."""

    key: str
    instruction: str
    answer_a: str
    answer_b: str
    system: str | None
    prompt: str

    def messages(self) -> list[dict[str, str]]:
        """OpenAI chat messages: the system prompt (when there is one), then the user prompt."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": self.prompt}]


TEMPLATE_KEYS = ("name", "source", "format", "parser", "user", "system", "user_with_input", "strip_answers_pattern",
                 "verdict_text", "verdict_tokens", "positions", "max_tokens", "temperature", "request_kwargs")


@dataclass(frozen=True)
class JudgeTemplate:
    """A judge prompt protocol (see the module docstring), built from a `judge/template` config node.

    Besides the prompt it carries the protocol's request defaults, used where the judge config leaves them null:
    `positions` (`both` or `random_swap`), `max_tokens`, `temperature` and `request_kwargs` (e.g. AlpacaEval 2.0's
    `logprobs: true, top_logprobs: 5`). `source` names the upstream repository, commit, path and entry it reproduces.
    """

    name: str
    format: str
    parser: str
    user: str
    source: Mapping[str, str] = field(default_factory=dict)
    system: str | None = None
    user_with_input: str | None = None
    strip_answers_pattern: str | None = None
    verdict_text: Mapping[str, str] = field(default_factory=dict)
    verdict_tokens: Mapping[str, str] = field(default_factory=dict)
    positions: str = "both"
    max_tokens: int | None = None
    temperature: float | None = None
    request_kwargs: Mapping = field(default_factory=dict)

    def __post_init__(self):
        where = f"Judge template '{self.name}'"
        if self.format not in ("chat", "text"):
            raise ValueError(f"{where}: format must be 'chat' or 'text', got {self.format!r}.")
        if self.parser not in PARSERS:
            raise ValueError(f"{where}: unknown parser {self.parser!r}; known: {sorted(PARSERS)}.")
        if self.format == "text" and self.system:
            raise ValueError(f"{where}: a text template has no system prompt; put it in `user`.")
        if self.positions not in ("both", "random_swap"):
            raise ValueError(f"{where}: positions must be 'both' or 'random_swap', got {self.positions!r}.")
        if self.reads_logprobs:
            if sorted(self.verdict_tokens) != ["A", "B"]:
                raise ValueError(f"{where}: a logprob parser needs verdict_tokens for A and B.")
            return
        missing = [v for v in self.verdicts if v not in self.verdict_text]
        if missing:
            raise ValueError(f"{where}: verdict_text lacks {missing}.")
        for verdict, text in self.verdict_text.items():
            if self.parse(JudgeReply(text)) != VERDICT_PREFERENCE[verdict]:
                raise ValueError(f"{where}: its parser reads verdict_text[{verdict!r}] = {text!r} as "
                                 f"{self.parse(JudgeReply(text))!r}.")

    @classmethod
    def from_cfg(cls, cfg: Mapping) -> JudgeTemplate:
        """From a `conf/judge/template/*.yaml` node (an OmegaConf node or a plain mapping)."""
        unknown = sorted(set(cfg) - set(TEMPLATE_KEYS))
        if unknown:
            raise ValueError(f"Judge template '{cfg.get('name')}': unknown keys {unknown}; known: {list(TEMPLATE_KEYS)}.")
        values = {key: cfg[key] for key in cfg if cfg[key] is not None}
        for key in ("source", "verdict_text", "verdict_tokens", "request_kwargs"):
            values[key] = dict(values.get(key) or {})
        return cls(**values)

    @property
    def reads_logprobs(self) -> bool:
        """Whether the verdict comes from the first token's log-probabilities (the reply text is not read)."""
        return PARSERS[self.parser].reads == "logprobs"

    @property
    def verdicts(self) -> tuple[str, ...]:
        """The discrete verdicts the parser can give (empty for a continuous preference)."""
        return PARSERS[self.parser].verdicts

    def clean(self, answer: str) -> str:
        """The answer as the judge sees it (PandaLM strips special-token strings and surrounding whitespace)."""
        if not self.strip_answers_pattern:
            return answer
        return re.sub(self.strip_answers_pattern, "", answer.strip()).strip()

    def render(self, instruction: str, input_text: str, answer_a: str, answer_b: str) -> tuple[str | None, str]:
        """`(system, prompt)` for one pair. Each placeholder is replaced once, in one pass (text inside an answer is
        never read as a placeholder; other braces are literal): `{question}` is the instruction, plus a blank line and
        the input when the record has one and the template has no `user_with_input`; `{instruction}`, `{input}`,
        `{answer_a}`, `{answer_b}`."""
        body = self.user_with_input if input_text and self.user_with_input else self.user
        values = {"question": f"{instruction}\n\n{input_text}" if input_text else instruction,
                  "instruction": instruction, "input": input_text, "answer_a": self.clean(answer_a),
                  "answer_b": self.clean(answer_b)}
        return self.system, _PLACEHOLDER.sub(lambda match: values[match.group(1)], body)

    def parse(self, reply: JudgeReply) -> float | None:
        """The preference for the answer in position B in [0, 1] (0: A, 1: B, 0.5: tie), or None when the reply holds
        no readable verdict."""
        if reply.failure:
            return None
        if self.reads_logprobs:
            if not reply.top_logprobs:
                return None
            return logprob_preference(reply.top_logprobs[0], self.verdict_tokens["A"], self.verdict_tokens["B"])
        return PARSERS[self.parser].read(reply.text or "")

    def reply_for(self, verdict: str) -> JudgeReply:
        """A complete reply that reads as `verdict` ("A", "B" or "tie"; the fake judge writes these). A template
        without ties gives "A" for "tie"."""
        if self.reads_logprobs:
            tokens = {"A": ((self.verdict_tokens["A"], 0.0),), "B": ((self.verdict_tokens["B"], 0.0),),
                      "tie": ((self.verdict_tokens["A"], math.log(0.5)), (self.verdict_tokens["B"], math.log(0.5)))}
            return JudgeReply(tokens[verdict][0][0], "length", (tokens[verdict],))
        return JudgeReply(self.verdict_text.get(verdict, self.verdict_text["A"]), "stop")
