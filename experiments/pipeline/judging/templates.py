"""Judge prompt templates (config group `judge/template`) and their verdict parsers.

A template renders one (instruction, answer A, answer B) triple into what the judge sees: chat messages (`format:
chat`, e.g. FastChat's pair-v2) or one raw prompt for a base model behind a completions endpoint (`format: text`, e.g.
PandaLM, Auto-J). Its parser maps the judge's reply to "A", "B", "tie" or None (unparseable). Templates that are
published protocols are reproduced verbatim in `conf/judge/template/*.yaml`, each naming its source.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

VERDICTS = ("A", "B", "tie")
_PAIR_V2_TAG = re.compile(r"\[\[([ABC])\]\]")
_AUTOJ_DECISION = "final decision is "


def parse_pair_v2(reply: str) -> str | None:
    """FastChat pair-v2: the last `[[A]]` / `[[B]]` / `[[C]]` (tie) in the reply, None when there is none.

    FastChat takes the first tag found when searching A, then B, then C; the two agree whenever the reply holds one
    tag. We take the last one because the prompt asks for the verdict after the explanation, which may quote tags.
    """
    tags = _PAIR_V2_TAG.findall(reply)
    if not tags:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[tags[-1]]


def parse_pandalm(reply: str) -> str | None:
    """PandaLM: the first non-empty line is "1", "2" or "Tie" (case-insensitive). PandaLM's own parser reads any other
    reply as a tie; here it is unparseable."""
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    if not lines:
        return None
    return {"1": "A", "2": "B", "tie": "tie"}.get(lines[0].lower())


def parse_autoj(reply: str) -> str | None:
    """Auto-J (`extract_pariwise_result`): the text after the last "final decision is " starts with "Response 1",
    "Response 2" or "Tie" (case-insensitive)."""
    position = reply.rfind(_AUTOJ_DECISION)
    if position < 0:
        return None
    rest = reply[position + len(_AUTOJ_DECISION):].strip().lower()
    for prefix, verdict in (("response 1", "A"), ("response 2", "B"), ("tie", "tie")):
        if rest.startswith(prefix):
            return verdict
    return None


PARSERS: dict[str, Callable[[str], str | None]] = {"pair_v2": parse_pair_v2, "pandalm": parse_pandalm,
                                                   "autoj": parse_autoj}


@dataclass(frozen=True)
class JudgeRequest:
    """One prompt for the judge: the rendered `system` (None for text templates) and `prompt`, the answers as shown
    in positions A and B, and `key`, the on-disk cache key."""

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


@dataclass(frozen=True)
class JudgeTemplate:
    """A judge prompt protocol (see the module docstring); built from a `judge/template` config node."""

    name: str
    format: str
    parser: str
    user: str
    system: str | None = None
    user_with_input: str | None = None
    strip_answers_pattern: str | None = None
    verdict_text: Mapping[str, str] = field(default_factory=dict)
    source: str | None = None
    max_tokens: int | None = None

    def __post_init__(self):
        if self.format not in ("chat", "text"):
            raise ValueError(f"Judge template '{self.name}': format must be 'chat' or 'text', got {self.format!r}.")
        if self.parser not in PARSERS:
            raise ValueError(f"Judge template '{self.name}': unknown parser {self.parser!r}; known: {sorted(PARSERS)}.")
        if self.format == "text" and self.system:
            raise ValueError(f"Judge template '{self.name}': a text template has no system prompt; put it in `user`.")
        missing = [v for v in VERDICTS if v not in self.verdict_text]
        if missing:
            raise ValueError(f"Judge template '{self.name}': verdict_text lacks {missing}.")
        for verdict, text in self.verdict_text.items():
            if self.parse(text) != verdict:
                raise ValueError(f"Judge template '{self.name}': its parser reads verdict_text[{verdict!r}] = "
                                 f"{text!r} as {self.parse(text)!r}.")

    @classmethod
    def from_cfg(cls, cfg: Mapping) -> JudgeTemplate:
        """From a `conf/judge/template/*.yaml` node (an OmegaConf node or a plain mapping)."""
        known = {"name", "format", "parser", "user", "system", "user_with_input", "strip_answers_pattern",
                 "verdict_text", "source", "max_tokens"}
        values = {key: cfg[key] for key in cfg if key in known}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"Judge template '{cfg.get('name')}': unknown keys {unknown}; known: {sorted(known)}.")
        values["verdict_text"] = dict(values.get("verdict_text") or {})
        return cls(**values)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of everything that shapes the prompt and its reading (part of every cache key)."""
        content = [self.name, self.format, self.parser, self.system, self.user, self.user_with_input,
                   self.strip_answers_pattern]
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()

    def clean(self, answer: str) -> str:
        """The answer as the judge sees it (PandaLM strips special-token strings and surrounding whitespace)."""
        if not self.strip_answers_pattern:
            return answer
        return re.sub(self.strip_answers_pattern, "", answer.strip()).strip()

    def render(self, instruction: str, input_text: str, answer_a: str, answer_b: str) -> tuple[str | None, str]:
        """`(system, prompt)` for one pair. `{question}` is the instruction, plus a blank line and the input when the
        record has one and the template has no `user_with_input`."""
        body = self.user_with_input if input_text and self.user_with_input else self.user
        question = f"{instruction}\n\n{input_text}" if input_text else instruction
        prompt = body.format(question=question, instruction=instruction, input=input_text,
                             answer_a=self.clean(answer_a), answer_b=self.clean(answer_b))
        return self.system, prompt

    def parse(self, reply: str) -> str | None:
        """The verdict in a judge reply: "A", "B", "tie", or None when it cannot be read."""
        return PARSERS[self.parser](reply)
