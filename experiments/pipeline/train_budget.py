"""How much of a corpus a continual fine-tuning run trains on: a number of sentences (the paper's unit) or of blocks.

The paper fine-tunes on "25,000 sentences" of WikiText-103, while the reference script's only knob
(`--max_train_samples`) counts packed 256-token blocks; both units are offered and named explicitly
(`cft.train_budget: {unit, count}`).

Sentences are counted in corpus order over the train split's rows:

* empty rows (only whitespace) and headings (a stripped row that starts and ends with `=`, as WikiText's
  ` = Title = ` and ` = = Section = = `) are skipped and not trained on;
* every other row is cut into sentences after `.`, `!` or `?` (plus any closing quotes or brackets) when whitespace and
  then an upper-case letter, a digit or an opening quote/bracket follow; the end of a row ends its last sentence. The
  rule is deliberately simple and language-agnostic: an abbreviation followed by a capital ("U.S. Army") splits too;
* the first `count` sentences are kept. Rows stay whole except the last one, which is cut after its last kept sentence,
  so the kept text is a prefix of the corpus minus its headings and blank rows.

The kept rows are then packed into blocks like any corpus (`experiments.pipeline.data.pack_blocks`). With
`unit: blocks` the whole train split is packed and the first `count` blocks are kept; `count: null` trains on the
whole train split in either unit.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import datasets

from experiments.pipeline.data import DataError, pack_blocks

log = logging.getLogger(__name__)
UNITS = ("sentences", "blocks")
SENTENCE_END = re.compile(r"""[.!?]["'”’)\]]*\s+(?=["'“‘(\[]?[A-Z0-9])""")


def is_heading(text: str) -> bool:
    """A WikiText-style heading row: stripped, it starts and ends with `=`."""
    stripped = text.strip()
    return len(stripped) > 1 and stripped.startswith("=") and stripped.endswith("=")


def sentence_ends(text: str) -> list[int]:
    """Character offsets in `text` just after each sentence (see the module docstring); the last is the text's end."""
    body = text.rstrip()
    ends = [match.start() + len(match.group().rstrip()) for match in SENTENCE_END.finditer(body)]
    return [*ends, len(body)] if body.strip() else []


def first_sentences(ds: datasets.Dataset, count: int) -> tuple[datasets.Dataset, dict]:
    """The rows holding the first `count` sentences of `ds["text"]` (headings and blank rows dropped, the last row cut
    after its last kept sentence) and a summary: sentences kept, rows kept, rows scanned."""
    if count < 1:
        raise DataError(f"cft.train_budget.count must be a positive number of sentences, got {count}")
    kept, sentences, scanned = [], 0, 0
    for batch in ds.iter(batch_size=1000):
        for text in batch["text"]:
            scanned += 1
            if not text or not text.strip() or is_heading(text):
                continue
            ends = sentence_ends(text)
            needed = count - sentences
            if len(ends) >= needed:
                kept.append(text[:ends[needed - 1]].strip())
                sentences = count
                break
            kept.append(text.strip())
            sentences += len(ends)
        if sentences >= count:
            break
    if not kept:
        raise DataError("The train split has no text outside headings and blank rows.")
    if sentences < count:
        log.warning("the train split holds only %d sentences (asked for %d): training on all of them", sentences, count)
    return datasets.Dataset.from_dict({"text": kept}), {"sentences": sentences, "rows": len(kept),
                                                        "rows_scanned": scanned}


def budget_blocks(ds: datasets.Dataset, tokenizer, budget: Mapping, *, block_size: int,
                  batch_texts: int = 1000) -> tuple[datasets.Dataset, dict]:
    """Packed training blocks for `budget` = `{unit: sentences|blocks, count: N|null}`, and a summary of what was
    selected (unit, count, sentences/rows kept for `sentences`, blocks and tokens)."""
    unit, count = budget.get("unit"), budget.get("count")
    if unit not in UNITS:
        raise DataError(f"cft.train_budget.unit must be one of {UNITS}, got {unit!r}")
    summary = {"unit": unit, "count": count}
    if unit == "sentences" and count is not None:
        ds, selected = first_sentences(ds, int(count))
        summary |= selected
    blocks = pack_blocks(ds, tokenizer, block_size, batch_texts,
                         max_blocks=int(count) if unit == "blocks" and count is not None else None)
    if unit == "blocks" and count is not None and len(blocks) < int(count):
        log.warning("the train split packs into only %d blocks (asked for %d)", len(blocks), count)
    summary |= {"blocks": len(blocks), "tokens": len(blocks) * block_size}
    log.info("training budget %s -> %d blocks of %d tokens", {k: v for k, v in summary.items() if k != "blocks"},
             len(blocks), block_size)
    return blocks, summary
