"""Causal LMs and tokenizers for the experiment tracks: by Hub id, by local path, or built from a config (tests)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from emo.hub import ensure_model_available

LOCAL_MODEL_HINT = (
    "Download it once while online (it is then cached), or point the config at a local directory "
    "(`model.name_or_path=/path/to/model`, `model.tokenizer=/path/to/tokenizer`)."
)


def _ensure_available(what: str, name_or_path: str) -> None:
    ensure_model_available(what, name_or_path, LOCAL_MODEL_HINT)


def load_tokenizer(name_or_path: str, special_tokens: Mapping[str, str] | None = None, padding_side: str = "left"):
    """Tokenizer from a Hub id or local path, prepared for batched sampling.

    `special_tokens` (e.g. `{eos_token: "<|endoftext|>"}`) fills in roles a bare tokenizer.json does not declare.
    Pad = EOS when there is no pad token; left padding and left truncation (prompts keep their last tokens).
    """
    if name_or_path is None:
        raise ValueError("model.tokenizer is null: set it, or use a data config that provides data.tokenizer "
                         "(data=oracle for model=oracle_gpt2).")
    _ensure_available("tokenizer", name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    for role, token in (special_tokens or {}).items():
        setattr(tokenizer, role, token)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer '{name_or_path}' has neither a pad nor an eos token; set "
                             "model.special_tokens (e.g. {eos_token: '<|endoftext|>'}).")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    tokenizer.truncation_side = "left"
    return tokenizer


def load_causal_lm(cfg: Mapping, tokenizer) -> torch.nn.Module:
    """Causal LM from a `conf/model/*.yaml` node.

    With `from_config` set, a fresh model of `from_config.model_type` is built with the given sizes and the tokenizer's
    vocabulary (randomly initialised from the current torch seed); otherwise `name_or_path` is loaded with
    `from_pretrained`. The model's pad/eos ids are aligned with the tokenizer.
    """
    if cfg.get("from_config"):
        spec = dict(cfg["from_config"])
        model_type = spec.pop("model_type")
        config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec)
        model = AutoModelForCausalLM.from_config(config)
    else:
        name = cfg["name_or_path"]
        _ensure_available("model", name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=cfg.get("dtype") or "auto")
        model.config.pad_token_id = tokenizer.pad_token_id
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_cost_embedding(cost_source: str | None, model: torch.nn.Module, vocab_size: int):
    """EMO cost embedding: a frozen copy of `model`'s LM head when `cost_source` is None, else loaded from `cost_source`.

    `cost_source` is a file (.pt/.safetensors/.npy) or a model path/Hub id whose LM head is used.
    """
    from emo.cost import cost_embedding_from_model, load_cost_embedding

    if cost_source is None:
        return cost_embedding_from_model(model)
    return load_cost_embedding(str(cost_source), vocab_size)
