"""Cost embeddings: the token vectors whose cosine distances define EMO's transport cost.

The paper's default is a frozen copy of the pre-trained model's LM head; any ``(vocab_size, width)`` matrix works, and
its width need not match the model's.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from emo.installation import require_emo_suite_init

# Every kernel and trainer module imports this one: they fail here, saying why, when another distribution's
# emo/__init__.py replaced emo-suite's (the only place emo-suite's code still runs then).
require_emo_suite_init()


class CostEmbedding:
    """A validated, row-normalised fp32 cost embedding, ready for the loss kernels.

    ``weight`` is any ``(vocab_size, width)`` tensor; it is detached and never receives gradient. Rows must be
    finite. An all-zero row (e.g. a padding token's row of a tied head) has no direction: its cosine to every token,
    itself included, is defined as 0, so moving probability mass to or from that token costs 1 (the transport cost of
    an unrelated token), and ``validate`` warns naming those rows. ``validate=False`` skips the checks (and their host
    sync), e.g. for a live LM head re-read at every step; zero rows still get cosine 0, never NaN.
    """

    def __init__(self, weight: torch.Tensor, *, validate: bool = True):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"cost embedding must be a 2-D (vocab_size, width) tensor, got {shape}")
        weight = weight.detach().float()
        norms = torch.linalg.vector_norm(weight, dim=1)
        if validate:
            _check_rows(norms)
        self.normalized = weight / torch.where(norms > 0, norms, 1.0).unsqueeze(1)
        self._operands = {}

    @property
    def vocab_size(self) -> int:
        return self.normalized.shape[0]

    @property
    def width(self) -> int:
        return self.normalized.shape[1]

    def to(self, device: Union[str, torch.device]) -> "CostEmbedding":
        """Move to ``device`` in place (the embedding stays fp32) and return self."""
        moved = self.normalized.to(device)
        if moved is not self.normalized:
            self.normalized, self._operands = moved, {}
        return self

    def cached_operand(self, key: str, convert) -> torch.Tensor:
        """``convert(self.normalized)``, computed once per ``key`` and device (e.g. the bf16 operand of the transport
        product, ``emo.transport``) and kept while the embedding stays on its device."""
        if key not in self._operands:
            self._operands[key] = convert(self.normalized)
        return self._operands[key]

    @classmethod
    def wrap(cls, value: Union["CostEmbedding", torch.Tensor, None]) -> Optional["CostEmbedding"]:
        """Return ``value`` as a ``CostEmbedding`` (validating a raw tensor), passing ``None`` through."""
        if value is None or isinstance(value, CostEmbedding):
            return value
        return cls(value)


def _check_rows(norms: torch.Tensor) -> None:
    """Refuse non-finite rows; warn about all-zero rows (cosine 0 to every token), naming them."""
    nonfinite = (~torch.isfinite(norms)).nonzero().flatten()
    if nonfinite.numel():
        raise ValueError(
            f"cost embedding has {nonfinite.numel()} non-finite row(s) (first: {nonfinite[:8].tolist()}); every token "
            "needs a finite vector"
        )
    zero = (norms == 0).nonzero().flatten()
    if zero.numel():
        warnings.warn(
            f"cost embedding has {zero.numel()} all-zero row(s) (first: {zero[:8].tolist()}): those tokens get cosine 0 "
            "to every token, i.e. transport cost 1 to and from them",
            stacklevel=3,
        )


def output_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """``model.get_output_embeddings()`` (the LM head) of a Hugging Face-style model; ``ValueError`` if it has none."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no output embedding (LM head): it needs get_output_embeddings() returning a "
            "module with a weight, as Hugging Face causal-LM models have"
        )
    return head


def cost_embedding_from_model(model: torch.nn.Module) -> CostEmbedding:
    """Frozen fp32 copy of ``model``'s output embedding (LM head), the paper's default cost embedding.

    Build it after loading pre-trained weights (and after any tokenizer resize), never from a freshly initialised model.
    """
    return CostEmbedding(output_embedding(model).weight.detach().clone())


def load_cost_embedding(source: Union[str, os.PathLike], vocab_size: Optional[int] = None, *,
                        revision: Optional[str] = None) -> CostEmbedding:
    """Load a cost embedding from a ``.pt``/``.safetensors``/``.npy`` file, or from a model (local directory or Hub id,
    at ``revision``) whose LM head is copied (e.g. a larger model of the same tokenizer family, as the paper did for
    some runs).

    ``vocab_size``, when given, must match the embedding's number of rows.
    """
    path = Path(source)
    if path.suffix in {".pt", ".pth", ".bin"}:
        weight = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(weight, dict):
            weight = _single_matrix(weight, path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        weight = _single_matrix(load_file(str(path)), path)
    elif path.suffix == ".npy":
        import numpy as np

        weight = torch.from_numpy(np.load(path))
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(source), revision=revision)
        weight = model.get_output_embeddings().weight
    embedding = CostEmbedding(weight)
    if vocab_size is not None and embedding.vocab_size != vocab_size:
        raise ValueError(
            f"cost embedding from {source} has {embedding.vocab_size} rows but the model's vocabulary has {vocab_size}"
        )
    return embedding


def _single_matrix(tensors: dict, path: Path) -> torch.Tensor:
    matrices = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.dim() == 2}
    if len(matrices) != 1:
        raise ValueError(f"{path} must hold exactly one 2-D tensor to use as a cost embedding, found {sorted(matrices)}")
    return next(iter(matrices.values()))

