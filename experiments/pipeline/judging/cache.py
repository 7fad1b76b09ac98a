"""The on-disk cache of judge replies: paid judgements are never bought twice.

A reply is keyed by what changes it and nothing else: the judge's identity (kind, model, API), its sampling parameters
(normalised: `None` dropped, numbers as floats so `0` and `0.0` agree, keys sorted, the token budget under one name
whatever `token_limit_param` sends it as) and the rendered prompt (system and user text, which hold the template's
text). The display label (`judge.name`), the endpoint URL and the parser are not part of it: renaming a judge or moving
a server reuses its judgements, and a parser change re-reads the replies without asking again.

One JSONL file per judge identity under `<cache_dir>/judgements/`; one line appended per reply, incomplete replies
(empty, truncated, too long) included: they are recorded, not verdicts, and `judge.rejudge` asks again for them. The
last line of a key wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from experiments.pipeline.judging.templates import JudgeReply

log = logging.getLogger(__name__)


def normalised(value):
    """`value` in a canonical form for hashing: mappings without None values and with sorted keys, numbers (not
    booleans) as floats, sequences as lists."""
    if isinstance(value, Mapping):
        return {str(key): normalised(item) for key, item in sorted(value.items(), key=lambda kv: str(kv[0]))
                if item is not None}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [normalised(item) for item in value]
    return str(value)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(normalised(value), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def request_key(identity: Mapping, params: Mapping, system: str | None, prompt: str) -> str:
    """The cache key of one prompt sent to one judge with `params` (see the module docstring)."""
    return _digest({"judge": identity, "params": params, "system": system, "prompt": prompt})


class JudgementCache:
    """Judge replies on disk for one judge identity (see the module docstring).

    Each line is written with one `write` system call on a file opened with O_APPEND, so concurrent writers never
    interleave and a killed job leaves at most one torn last line, which is skipped on reading (and ended before the
    next entry is appended).
    """

    def __init__(self, directory: str | Path, identity: Mapping):
        model = str(identity.get("model") or identity.get("rule") or "judge")
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{identity.get('kind', 'judge')}__{model}").strip("-")[:80]
        self.path = Path(directory) / f"{slug}__{_digest(identity)[:12]}.jsonl"
        self._identity = dict(identity)
        self._lock = threading.Lock()
        self._replies: dict[str, JudgeReply] = {}
        self._torn_tail = False
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            self._torn_tail = bool(text) and not text.endswith("\n")
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    row = json.loads(line)
                    self._replies[row["key"]] = JudgeReply.from_json(row["reply"])
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
                    log.warning("%s:%d: skipping an unreadable cache line (an interrupted write)", self.path, number)

    def __contains__(self, key: str) -> bool:
        return key in self._replies

    def __getitem__(self, key: str) -> JudgeReply:
        return self._replies[key]

    def put(self, key: str, reply: JudgeReply, template: str) -> None:
        """Store one reply (memory and disk) received through `template`."""
        line = json.dumps({"key": key, "reply": reply.to_json(), "judge": self._identity, "template": template,
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
