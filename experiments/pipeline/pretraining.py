"""Pre-training a student on a related oracle language before a recipe fine-tunes it: the paper's setting, in the demo.

`conf/pretraining/*.yaml` describes a pre-training domain: the target oracle (`data.oracle`) with shifted
probabilities (`pretraining.oracle`, see `OracleLanguage`), its corpus, and the trainer, objective (MLE) and seed of
the pre-training run. `pretrained_student(cfg)` trains that student once with the shared Trainer setup and caches it
in `pretraining.cache_dir/<16 hex of sha256(spec)>/` (`model/` + `pretraining.json`), where the spec is everything
that determines its weights: the pre-training domain, corpus and packing, the model architecture and vocabulary, the
trainer, objective and seed, and the torch and transformers versions. Concurrent jobs wait on a file lock instead of
training twice, and the directory is renamed into place once complete, so one that exists is a finished student.
The key does not cover the code: after changing the training code, delete the cache directory. Pre-training runs in
a single process; a multi-process launch (torchrun) finds its student in the cache or stops with an error saying so.
A recipe calls `load_student(cfg, tokenizer)` instead of `load_causal_lm`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import transformers
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from experiments.pipeline.data import load_text_splits, pack_blocks, write_once
from experiments.pipeline.distributed import world_size
from experiments.pipeline.models import load_causal_lm
from experiments.pipeline.oracle import OracleLanguage, OracleLM, class_cosine, exact_metrics, oracle_token_ids
from experiments.pipeline.training import build_trainer

log = logging.getLogger(__name__)

RECORD_FILE = "pretraining.json"
MODEL_SUBDIR = "model"
UNSPECIFIC_DATA_KEYS = ("name", "cache_dir", "tokenizer", "exact_metrics")
"""Data-config fields that do not change the pre-trained weights (names, paths, evaluation settings)."""


def pretraining_data(cfg: DictConfig) -> DictConfig:
    """The pre-training domain's data node: `cfg.data` with `pretraining.oracle` merged into its oracle and
    `pretraining.corpus` as its corpus sizes (written to its own cache directory by `load_text_splits`)."""
    if cfg.data.source != "oracle":
        raise ValueError(f"pretraining={cfg.pretraining.name} shifts the oracle language of the target data and "
                         f"needs data=oracle, not data={cfg.data.name}; drop the pretraining group (~pretraining) "
                         "to fine-tune from model.name_or_path instead.")
    if not cfg.model.get("from_config"):
        raise ValueError(f"pretraining={cfg.pretraining.name} builds its student from model.from_config; "
                         f"model={cfg.model.name} has none.")
    return OmegaConf.merge(cfg.data, {"name": f"{cfg.data.name}_{cfg.pretraining.name}",
                                      "oracle": cfg.pretraining.oracle, "corpus": cfg.pretraining.corpus})


def pretraining_spec(cfg: DictConfig, tokenizer) -> dict:
    """Everything that determines the pre-trained weights (JSON-serialisable); its hash keys the cache."""
    data = OmegaConf.to_container(pretraining_data(cfg), resolve=True)
    data["oracle"] = OracleLanguage(**data["oracle"]).config  # every OracleLanguage argument, defaults included
    pretraining = OmegaConf.to_container(cfg.pretraining, resolve=True)
    return {
        "data": {key: value for key, value in data.items() if key not in UNSPECIFIC_DATA_KEYS},
        "model": {"from_config": OmegaConf.to_container(cfg.model.from_config, resolve=True),
                  "dtype": cfg.model.dtype, "vocab": len(tokenizer)},
        "trainer": pretraining["trainer"], "objective": pretraining["objective"], "seed": pretraining["seed"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def pretraining_key(cfg: DictConfig, tokenizer) -> str:
    """16 hex digits of the SHA-256 of `pretraining_spec`: the cached student's directory name."""
    return hashlib.sha256(json.dumps(pretraining_spec(cfg, tokenizer), sort_keys=True).encode()).hexdigest()[:16]


def head_class_cosine(model: torch.nn.Module, tokenizer, oracle: OracleLanguage) -> dict[str, float]:
    """`class_cosine` of the model's LM head rows for the oracle's tokens (same-class vs cross-class words)."""
    head = model.get_output_embeddings().weight
    return class_cosine(head[oracle_token_ids(tokenizer, oracle).to(head.device)], oracle)


def pretrained_student(cfg: DictConfig, tokenizer) -> dict:
    """The pre-training record of `cfg.pretraining` (training and caching the student first if needed).

    Returns the `pretraining.json` record (key, spec, pre-training step count, losses and seconds, the distance of
    the pre-training domain from the target, the LM head's same-class vs cross-class cosines before and after
    pre-training) plus `model_dir` and `cached` (False when this call trained it).
    """
    key = pretraining_key(cfg, tokenizer)
    directory = Path(cfg.pretraining.cache_dir) / key
    directory.parent.mkdir(parents=True, exist_ok=True)
    cached = True
    with FileLock(str(directory) + ".lock"):
        if not directory.is_dir():
            if world_size() > 1:
                raise RuntimeError(f"The pre-trained student {key} is not in {directory.parent} yet and pre-training "
                                   "runs in one process: run the same command once without torchrun/accelerate "
                                   "(e.g. with trainer.max_steps=0), then launch again.")
            cached = False
            log.info("Pre-training the student on %s -> %s", pretraining_data(cfg).name, directory)
            write_once(directory, lambda tmp: _pretrain(cfg, tokenizer, key, tmp))
    record = json.loads((directory / RECORD_FILE).read_text())
    return {**record, "model_dir": str(directory / MODEL_SUBDIR), "cached": cached}


def _pretrain(cfg: DictConfig, tokenizer, key: str, out_dir: Path) -> None:
    """Train the student of `cfg.pretraining` on its domain; write `model/` and `pretraining.json` into `out_dir`."""
    started = time.time()
    data = pretraining_data(cfg)
    texts = load_text_splits(data)
    blocks = {split: pack_blocks(texts[split], tokenizer, data.block_size, data.pack_batch_texts,
                                 max_blocks=(data.max_blocks or {}).get(split))
              for split in ("train", "validation")}
    run_cfg = OmegaConf.create({**OmegaConf.to_container(cfg.pretraining, resolve=True),
                                "model": {"cost_embedding": None}})
    transformers.set_seed(run_cfg.seed)
    model = load_causal_lm(cfg.model, tokenizer)
    target = OracleLanguage(**cfg.data.oracle)
    initial_cosine = head_class_cosine(model, tokenizer, target)
    trainer = build_trainer(run_cfg, model, output_dir=out_dir / "checkpoints", run_name=f"pretraining_{key}",
                            report_to=[], train_dataset=blocks["train"], eval_dataset=blocks["validation"])
    train_output = trainer.train()
    validation = trainer.evaluate()
    trainer.save_model(str(out_dir / MODEL_SUBDIR))
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    domain_oracle = OracleLanguage(**data.oracle)
    distance = exact_metrics(OracleLM(domain_oracle, total_vocab_size=len(tokenizer)), tokenizer, target,
                             **dict(cfg.data.exact_metrics))
    record = {
        "key": key,
        "spec": pretraining_spec(cfg, tokenizer),
        "global_step": train_output.global_step,
        "train_loss": train_output.training_loss,
        "eval_loss": validation["eval_loss"],  # cross-entropy on the pre-training domain's validation split
        "best_checkpoint": Path(trainer.state.best_model_checkpoint or "").name or None,
        "domain_distance": {name: distance[name] for name in ("forward_kl", "reverse_kl", "tvd")},
        "head_cosine": {"initial": initial_cosine, "pretrained": head_class_cosine(trainer.model, tokenizer, target)},
        "seconds": time.time() - started,
    }
    (out_dir / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def load_student(cfg: DictConfig, tokenizer) -> tuple[torch.nn.Module, dict | None]:
    """`(model, pretraining record)`: the cached pre-trained student when `cfg.pretraining` is set, else
    `load_causal_lm(cfg.model)` and None. The random state is re-seeded with `cfg.seed` after pre-training, so a
    run does not depend on whether its student came from the cache."""
    if not cfg.get("pretraining"):
        return load_causal_lm(cfg.model, tokenizer), None
    record = pretrained_student(cfg, tokenizer)
    transformers.set_seed(cfg.seed)
    model_cfg = {**cfg.model, "from_config": None, "name_or_path": record["model_dir"]}
    return load_causal_lm(model_cfg, tokenizer), record
