"""Cost embeddings: the token vectors whose cosine distances define EMO's transport cost.

The paper's default is a frozen copy of the pre-trained model's LM head; any ``(vocab_size, width)`` matrix works, and
its width need not match the model's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch


class CostEmbedding:
    """A validated, row-normalised fp32 cost embedding, ready for the loss kernels.

    ``weight`` is any ``(vocab_size, width)`` tensor; it is detached and never receives gradient. Rows must be
    finite and non-zero (a zero row has no direction, so its cosine to other tokens is undefined).
    """

    def __init__(self, weight: torch.Tensor, *, validate: bool = True):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"cost embedding must be a 2-D (vocab_size, width) tensor, got {shape}")
        weight = weight.detach().float()
        norms = torch.linalg.vector_norm(weight, dim=1)
        if validate:
            bad = (~torch.isfinite(norms)) | (norms == 0)
            if bad.any():
                rows = bad.nonzero().flatten()
                raise ValueError(
                    f"cost embedding has {rows.numel()} non-finite or all-zero row(s) (first: {rows[:8].tolist()}); "
                    "every token needs a finite, non-zero vector"
                )
        self.normalized = weight / norms.unsqueeze(1)
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


def cost_embedding_from_model(model: torch.nn.Module) -> CostEmbedding:
    """Frozen fp32 copy of ``model``'s output embedding (LM head), the paper's default cost embedding.

    Build it after loading pre-trained weights (and after any tokenizer resize), never from a freshly initialised model.
    """
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embedding to copy as a cost embedding")
    return CostEmbedding(head.weight.detach().clone())


def load_cost_embedding(source: Union[str, os.PathLike], vocab_size: Optional[int] = None) -> CostEmbedding:
    """Load a cost embedding from a ``.pt``/``.safetensors``/``.npy`` file, or from a model (local path or hub id)
    whose LM head is copied (e.g. a larger model of the same tokenizer family, as the paper did for some runs).

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

        from emo.hub import ensure_model_available

        ensure_model_available("cost-embedding model", str(source), "Pass a local model directory or a weight file.")
        weight = AutoModelForCausalLM.from_pretrained(str(source)).get_output_embeddings().weight
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

