"""Make OpenICL 0.1.8 run under transformers 5 without editing installed files: `import_openicl()`.

OpenICL is installed with `pip install --no-deps openicl==0.1.8` (its pins want transformers 4.28 and a CUDA faiss);
the small packages it imports at package import (rank-bm25, nltk, evaluate, openai) are real dependencies in
requirements.txt rather than stubs, so the OpenICL we compare against is OpenICL as shipped. What breaks, and the
patch for each (all idempotent, applied once):

1. `tokenizer.encode_plus` / `batch_encode_plus` are gone from transformers 5 tokenizers (TopK/VoteK/MDL/DPP
   retrievers, the generation inferencers): thin wrappers around `tokenizer(...)` that drop OpenICL's `verbose`.
2. `BatchEncoding.to(device, non_blocking=...)` passes `non_blocking` to OpenICL's `ListWrapper.to(device)`: accept it.
3. `AccEvaluator.score` calls `evaluate.load("accuracy")`, which needs the Hub (evaluate 0.4.6 ships no metric
   scripts): the module's `evaluate` is replaced by a local accuracy metric with the same `compute` result.
4. `TopkRetriever` hands its model name to sentence-transformers 6, which rejects `pathlib.Path`
   (`TypeError: argument of type 'PosixPath' is not iterable`), and its tokenizer name to `os.stat`: both become `str`.

`PPLInferencer` with a model object needs no patch. Nothing else of OpenICL's behaviour is changed.
"""

from __future__ import annotations

import os

_PATCHED = False


def _encode_plus(self, text, text_pair=None, verbose=None, **kwargs):
    return self(text, text_pair, **kwargs)


def _batch_encode_plus(self, batch_text_or_text_pairs, verbose=None, **kwargs):
    return self(list(batch_text_or_text_pairs), **kwargs)


def _list_wrapper_to(self, device=None, non_blocking=False, **kwargs):
    return self.data


class _LocalAccuracy:
    """Drop-in for `evaluate.load("accuracy")`: `compute(references=, predictions=) -> {"accuracy": float}`."""

    def compute(self, references, predictions):
        if len(references) != len(predictions):
            raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
        correct = sum(int(r == p) for r, p in zip(references, predictions))
        return {"accuracy": correct / len(references) if references else float("nan")}


class _OfflineEvaluate:
    """Stands in for the `evaluate` module inside OpenICL's AccEvaluator: only the accuracy metric is served."""

    @staticmethod
    def load(name, *args, **kwargs):
        if name != "accuracy":
            raise ValueError(f"openicl_compat serves only the 'accuracy' metric offline, not {name!r}")
        return _LocalAccuracy()


def import_openicl():
    """Import OpenICL with the transformers-5 patches applied; returns the `openicl` package."""
    global _PATCHED
    import openicl
    if _PATCHED:
        return openicl

    from openicl.icl_evaluator import icl_acc_evaluator
    from openicl.icl_retriever import icl_topk_retriever
    from openicl.utils import collators
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    if not hasattr(PreTrainedTokenizerBase, "encode_plus"):
        PreTrainedTokenizerBase.encode_plus = _encode_plus
    if not hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):
        PreTrainedTokenizerBase.batch_encode_plus = _batch_encode_plus
    collators.ListWrapper.to = _list_wrapper_to
    icl_acc_evaluator.evaluate = _OfflineEvaluate()

    original_init = icl_topk_retriever.TopkRetriever.__init__

    def topk_init(self, dataset_reader, *args, **kwargs):
        for key in ("sentence_transformers_model_name", "tokenizer_name"):
            if isinstance(kwargs.get(key), os.PathLike):
                kwargs[key] = os.fspath(kwargs[key])
        original_init(self, dataset_reader, *args, **kwargs)

    icl_topk_retriever.TopkRetriever.__init__ = topk_init
    _PATCHED = True
    return openicl
