"""Prompts from test-set text and batched, KV-cached sampling of continuations (the Track-1 protocol).

A prompt is the first `prefix_words` whitespace words of a test row; its gold text is the prefix plus the next
`continuation_words` words. Predictions are the prefix plus the first `continuation_words` words of the sampled
continuation, so gold and prediction have the same length in words (the reference compared 80 *tokens* against
80/25/30 *words*). The token budget is derived from the gold continuations: `ceil(slack * max_i tokens(gold_i))`, so
every prediction has enough tokens to reach the word count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import transformers


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: `prefix` is fed to the model, `gold` = prefix + " " + reference continuation."""

    index: int
    prefix: str
    continuation: str

    @property
    def gold(self) -> str:
        return f"{self.prefix} {self.continuation}"


def extract_prompts(texts: Iterable[str], *, prefix_words: int, continuation_words: int, min_chars: int,
                    min_extra_words: int, exclude: Sequence[str] = (), scan_rows: int | None = None,
                    max_prompts: int | None = None) -> list[Prompt]:
    """Prompts from rows of `texts` (the reference filter): keep a row with at least `min_chars` characters,
    at least `prefix_words + continuation_words + min_extra_words` words and none of the `exclude` substrings.

    Only the first `scan_rows` rows are scanned (None: all); at most `max_prompts` prompts are returned.
    """
    prompts = []
    need = prefix_words + continuation_words + min_extra_words
    for i, text in enumerate(texts):
        if scan_rows is not None and i >= scan_rows:
            break
        if max_prompts is not None and len(prompts) >= max_prompts:
            break
        if not text or len(text) < min_chars or any(bad in text for bad in exclude):
            continue
        words = text.split()
        if len(words) < need:
            continue
        prompts.append(Prompt(i, " ".join(words[:prefix_words]),
                              " ".join(words[prefix_words:prefix_words + continuation_words])))
    return prompts


def prompts_from_config(texts: Iterable[str], prompts_cfg: Mapping | None, *, corpus: str) -> list[Prompt]:
    """`extract_prompts` with a `conf/prompts/*.yaml` node; a clear error when the corpus has no prompt settings or
    no row passes the filter."""
    if prompts_cfg is None:
        raise ValueError(f"No Track-1 prompt settings for data={corpus}: add conf/prompts/{corpus}.yaml (see "
                         "conf/prompts/base.yaml) or reuse another corpus's with prompts=<name>, e.g. prompts=local.")
    settings = {key: (list(value) if key == "exclude" else value) for key, value in prompts_cfg.items()}
    prompts = extract_prompts(texts, **settings)
    if not prompts:
        raise ValueError(f"Corpus '{corpus}': no test row passes the prompt filter {settings}.")
    return prompts


def continuation_token_budget(tokenizer, prompts: Sequence[Prompt], *, quantile: float, slack: float) -> int:
    """Tokens to sample per prompt: `ceil(slack * quantile of the gold continuations' token lengths)`."""
    lengths = [len(tokenizer(" " + p.continuation, add_special_tokens=False)["input_ids"]) for p in prompts]
    return max(1, math.ceil(slack * float(np.quantile(lengths, quantile))))


def decoding_kwargs(decoding: Mapping) -> dict:
    """`generate` keyword arguments for a `conf/decoding/*.yaml` node (drops the `name` key)."""
    return {k: v for k, v in decoding.items() if k != "name"}


def truncate_words(text: str, n_words: int) -> str:
    """First `n_words` whitespace-separated words of `text`, joined by single spaces."""
    return " ".join(text.split()[:n_words])


@torch.inference_mode()
def sample_continuations(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int, seed: int,
                         decoding: Mapping, batch_size: int, max_prompt_tokens: int, suppress_eos: bool = True,
                         show_progress: bool = False) -> list[str]:
    """Sample one continuation per prompt with `model.generate` (left padding, KV cache), deterministically per `seed`.

    Returns the decoded continuation text (prefix excluded, special tokens skipped). With `suppress_eos`, exactly
    `max_new_tokens` tokens are sampled per prompt (min_new_tokens = max_new_tokens, as the reference does).
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    transformers.set_seed(seed)
    gen_kwargs = dict(decoding_kwargs(decoding), max_new_tokens=max_new_tokens, use_cache=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if suppress_eos:
        gen_kwargs["min_new_tokens"] = max_new_tokens
    outputs = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc=f"Sampling (seed {seed})", disable=not show_progress):
        batch = [p.prefix for p in prompts[start:start + batch_size]]
        enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_tokens,
                        add_special_tokens=False).to(device)
        generated = model.generate(**enc, **gen_kwargs)
        new_tokens = generated[:, enc["input_ids"].shape[1]:]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    return outputs


def generation_records(prompts: Sequence[Prompt], continuations_by_seed: Mapping[int, Sequence[str]],
                       continuation_words: int) -> list[dict]:
    """Rows for `generations.jsonl`: one per (seed, prompt) with prefix, gold, raw continuation and prediction."""
    rows = []
    for seed, continuations in continuations_by_seed.items():
        for prompt, raw in zip(prompts, continuations, strict=True):
            rows.append({**asdict(prompt), "seed": seed, "gold": prompt.gold, "sample": raw,
                         "prediction": f"{prompt.prefix} {truncate_words(raw, continuation_words)}"})
    return rows
