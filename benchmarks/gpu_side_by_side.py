"""Side by side in one run: our losses (materialised, fused; each transport precision and chunk kernel) against
``F.cross_entropy``, Liger-Kernel's fused linear cross-entropy (FLCE) and Cut Cross-Entropy (CCE), at the GPT-2 shape
(N = 8 x 256 tokens, H = 768, V = 50257) and the Llama-3 shape (N = 8192, H = 4096, V = 128256), bf16; then a
GPT-2-small and a LLaMA-architecture (SmolLM2-135M's) forward+backward step, EMO vs MLE. One table: median time of
``--iters`` forward+backward passes after ``--warmup`` (CUDA-synchronised), the extra peak memory over the inputs
(CUDA allocator peak), and ratios to each group's baseline, measured in the same process; then the goals.

The cost embedding is a frozen copy of the head (width = H); its fp32 rows and, for ``bf16``, their cached bf16 copy
exist before a case is timed (they are an input, like the head), and the memory goal allows for them.

    python benchmarks/gpu_side_by_side.py                           # CUDA, both shapes and both train steps
    python benchmarks/gpu_side_by_side.py --device cpu --smoke      # tiny shapes on CPU: proves the script end to end
    python benchmarks/gpu_side_by_side.py --json side_by_side.json  # also write every row as JSON

On CPU the rows that need CUDA (tf32, Liger, CCE; Triton outside its interpreter) say so instead of a number.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = {  # name: tokens N, head width H, vocabulary V, sequence length (rows of N)
    "gpt2": dict(tokens=8 * 256, hidden=768, vocab=50257, seq=256),
    "llama3": dict(tokens=8192, hidden=4096, vocab=128256, seq=2048),
}
SMOKE_SHAPES = {
    "gpt2": dict(tokens=2 * 32, hidden=32, vocab=1001, seq=32),
    "llama3": dict(tokens=128, hidden=64, vocab=3001, seq=64),
}
TRAIN_MODELS = {  # name: (architecture, config, batch, seq); smoke: a 2-layer model of the same family
    "gpt2_small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024), 8, 256),
    "llama_smollm2_135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                         tie_word_embeddings=True, max_position_embeddings=2048), 8, 256),
}
SMOKE_TRAIN_MODELS = {
    "gpt2_small": ("gpt2", dict(n_layer=2, n_embd=32, n_head=2, vocab_size=1001, n_positions=64), 2, 32),
    "llama_smollm2_135m": ("llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=1001,
                                         tie_word_embeddings=True, max_position_embeddings=64), 2, 32),
}
PRECISIONS = ("fp32", "tf32", "bf16")
GOALS = {"materialized_vs_ce": 1.6, "fused_vs_liger": 1.4, "train_emo_vs_mle": 1.10}


class NeedsCuda(Exception):
    """A case that cannot run on this device; its row says why."""


@dataclasses.dataclass
class Row:
    group: str
    shape: str
    case: str
    ms: Optional[float] = None
    extra_mb: Optional[float] = None
    note: str = ""
    baseline: bool = False


def _filled(*shape, device, dtype, std=1.0, requires_grad=False):
    import torch

    return torch.empty(*shape, dtype=dtype, device=device).normal_(std=std).requires_grad_(requires_grad)


def _check_kernel(device, precision, kernel):
    from emo.losses import check_chunk_kernel
    from emo.transport import check_transport_precision

    try:
        check_transport_precision(precision, device)
        check_chunk_kernel(kernel, device)
    except ValueError as error:
        raise NeedsCuda("needs CUDA") from error


def _cost(vocab, width, device, precision):
    """A frozen cost embedding with its transport operand for ``precision`` made (it is an input, like the head)."""
    import torch

    from emo import CostEmbedding
    from emo.transport import transport_operand

    cost = CostEmbedding(_filled(vocab, width, device=device, dtype=torch.float32))
    transport_operand(cost, precision, device)
    return cost


def logits_cases(shape, device, dtype, kernels):
    """Loss alone on materialised ``(B, T, V)`` logits of ``dtype``: F.cross_entropy, then ours."""
    import torch

    batch, seq, vocab = shape["tokens"] // shape["seq"], shape["seq"], shape["vocab"]

    def inputs():
        torch.manual_seed(0)
        logits = _filled(batch, seq, vocab, device=device, dtype=dtype, std=2.0, requires_grad=True)
        labels = torch.randint(0, vocab, (batch, seq), device=device)
        return logits, labels

    def cross_entropy():
        logits, labels = inputs()
        shifted = labels[:, 1:].reshape(-1)
        return lambda: torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), shifted), [logits]

    yield "F.cross_entropy", cross_entropy, True
    for kernel in kernels:
        for precision in PRECISIONS:
            def ours(precision=precision, kernel=kernel):
                from emo import lm_loss

                _check_kernel(device, precision, kernel)
                logits, labels = inputs()
                cost = _cost(vocab, shape["hidden"], device, precision)
                return (lambda: lm_loss(logits, labels, objective="emo", cost_embedding=cost,
                                        transport_precision=precision, chunk_kernel=kernel)), [logits]

            yield f"EMO materialised ({precision}, {kernel})", ours, False


def head_cases(shape, device, dtype, kernels):
    """LM head + loss from hidden states ``(N, H)`` and a head ``(V, H)`` of ``dtype``."""
    import torch

    tokens, hidden_size, vocab, seq = shape["tokens"], shape["hidden"], shape["vocab"], shape["seq"]

    def inputs():
        torch.manual_seed(0)
        hidden = _filled(tokens // seq, seq, hidden_size, device=device, dtype=dtype, requires_grad=True)
        weight = _filled(vocab, hidden_size, device=device, dtype=dtype, std=hidden_size**-0.5, requires_grad=True)
        labels = torch.randint(0, vocab, (tokens // seq, seq), device=device)
        return hidden, weight, labels

    def flat_shifted(hidden, labels):
        return hidden[:, :-1].reshape(-1, hidden_size), labels[:, 1:].reshape(-1)

    def liger():
        if device.type != "cuda":
            raise NeedsCuda("needs CUDA (Triton kernels)")
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        hidden, weight, labels = inputs()
        flat, targets = flat_shifted(hidden, labels)
        return lambda: LigerFusedLinearCrossEntropyFunction.apply(flat, weight, targets)[0], [hidden, weight]

    def cut_cross_entropy():
        if device.type != "cuda":
            raise NeedsCuda("needs CUDA (Triton kernels, Ampere or newer)")
        from cut_cross_entropy import linear_cross_entropy

        hidden, weight, labels = inputs()
        return lambda: linear_cross_entropy(hidden, weight, labels, shift=True), [hidden, weight]

    def head_cross_entropy():
        hidden, weight, labels = inputs()
        flat, targets = flat_shifted(hidden, labels)
        return lambda: torch.nn.functional.cross_entropy(flat @ weight.T, targets), [hidden, weight]

    yield "Liger FLCE", liger, True
    yield "Cut Cross-Entropy", cut_cross_entropy, False
    yield "head + F.cross_entropy", head_cross_entropy, False
    for kernel in kernels:
        def fused_mle(kernel=kernel):
            from emo import linear_lm_loss

            _check_kernel(device, "fp32", kernel)
            hidden, weight, labels = inputs()
            return (lambda: linear_lm_loss(hidden, weight, labels, objective="mle", chunk_kernel=kernel)), [hidden,
                                                                                                           weight]

        yield f"MLE fused ({kernel})", fused_mle, False
        for precision in PRECISIONS:
            def fused_emo(precision=precision, kernel=kernel):
                from emo import linear_lm_loss

                _check_kernel(device, precision, kernel)
                hidden, weight, labels = inputs()
                cost = _cost(vocab, hidden_size, device, precision)
                return (lambda: linear_lm_loss(hidden, weight, labels, objective="emo", cost_embedding=cost,
                                               transport_precision=precision, chunk_kernel=kernel)), [hidden, weight]

            yield f"EMO fused ({precision}, {kernel})", fused_emo, False


def train_cases(spec, device, bf16, kernels):
    """Forward+backward of a whole model (randomly initialised), under bf16 autocast on CUDA: MLE vs EMO."""
    import torch

    architecture, config, batch, seq = spec

    def build():
        import transformers

        from emo import cost_embedding_from_model

        torch.manual_seed(0)
        if architecture == "gpt2":
            model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
        else:
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
        model.to(device)
        ids = torch.randint(0, config["vocab_size"], (batch, seq), device=device)
        return model, ids, cost_embedding_from_model(model)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def hf_mle():
        model, ids, _ = build()

        def step():
            with autocast():
                return model(input_ids=ids, labels=ids).loss

        return step, list(model.parameters())

    def ours(objective, fused, precision, kernel):
        def case():
            from emo import linear_lm_loss, lm_loss
            from emo.transport import transport_operand

            _check_kernel(device, precision, kernel)
            model, ids, cost = build()
            if objective == "emo":
                transport_operand(cost, precision, device)
            options = dict(objective=objective, transport_precision=precision, chunk_kernel=kernel,
                           cost_embedding=cost if objective == "emo" else None)

            def step():
                with autocast():
                    if not fused:
                        return lm_loss(model(input_ids=ids).logits, ids, **options)
                    hidden = model.model(input_ids=ids) if architecture == "llama" else model.transformer(input_ids=ids)
                    return linear_lm_loss(hidden.last_hidden_state, model.lm_head.weight, ids, **options)

            return step, list(model.parameters())

        return case

    yield "MLE (HF model loss)", hf_mle, True
    yield "MLE fused (torch)", ours("mle", True, "fp32", "torch"), False
    for fused in (False, True):
        for precision, kernel in (("fp32", "torch"), ("bf16", "torch"), ("bf16", "triton")):
            if kernel not in kernels:
                continue
            yield (f"EMO {'fused' if fused else 'materialised'} ({precision}, {kernel})",
                   ours("emo", fused, precision, kernel), False)


def measure(build: Callable, device, warmup: int, iters: int) -> tuple[float, Optional[float]]:
    """Median ms of ``iters`` forward+backward passes after ``warmup``, and (CUDA) the extra peak memory in MB."""
    import torch
    from loss_bench import timed_passes

    cuda = device.type == "cuda"
    step, leaves = build()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    times = timed_passes(step, leaves, warmup, iters, cuda)
    extra = (torch.cuda.max_memory_allocated() - baseline) / 2**20 if cuda else None  # CPU: see loss_bench.py
    del step, leaves
    return 1000 * statistics.median(times), extra


def run_group(rows, group, shape_name, cases, device, warmup, iters):
    import torch

    for case, build, is_baseline in cases:
        row = Row(group, shape_name, case, baseline=is_baseline)
        try:
            row.ms, row.extra_mb = measure(build, device, warmup, iters)
        except NeedsCuda as reason:
            row.note = str(reason)
        except ImportError as error:
            row.note = f"not installed ({error.name})"
        except torch.cuda.OutOfMemoryError:
            row.note = "out of memory"
        except Exception as error:  # one failing case (e.g. a baseline's kernel on this Triton) keeps the table
            row.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"
        rows.append(row)
        memory = f"{row.extra_mb:9.1f} MB" if row.extra_mb is not None else ""
        print(f"  {group:<14} {shape_name:<34} {case:<30} "
              + (f"{row.ms:9.2f} ms {memory}" if row.ms is not None else row.note), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _ratio(value, baseline):
    return f"{value / baseline:.2f}x" if value is not None and baseline else "–"


def print_table(rows, title):
    print(f"\n{title}\n")
    print("| group | shape | case | ms fwd+bwd | x baseline | extra peak MB | x baseline | note |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        base = next((r for r in rows if r.baseline and r.group == row.group and r.shape == row.shape), None)
        base_ms = base.ms if base else None
        base_mb = base.extra_mb if base else None
        ms = f"{row.ms:.2f}" if row.ms is not None else "–"
        mb = f"{row.extra_mb:.0f}" if row.extra_mb is not None else "–"
        note = row.note or ("baseline" if row.baseline else "")
        print(f"| {row.group} | {row.shape} | {row.case} | {ms} | {_ratio(row.ms, base_ms)} | {mb} | "
              f"{_ratio(row.extra_mb, base_mb)} | {note} |")


def print_goals(rows, shapes):
    def get(group, shape, case):
        return next((r for r in rows if r.group == group and r.shape == shape and r.case == case), None)

    def best(group, shape, prefix):
        measured = [r for r in rows if r.group == group and r.shape == shape and r.case.startswith(prefix)
                    and r.ms is not None]
        return min(measured, key=lambda r: r.ms) if measured else None

    print("\nGoals (ratios from the rows above; best of our variants named):")
    for shape_name, shape in shapes.items():
        ce, ours = get("loss on logits", shape_name, "F.cross_entropy"), best("loss on logits", shape_name, "EMO")
        if ce and ours and ce.ms:
            print(f"- {shape_name}: materialised EMO / F.cross_entropy = {ours.ms / ce.ms:.2f}x [{ours.case}] "
                  f"(goal <= {GOALS['materialized_vs_ce']}x)")
        liger, fused = get("head + loss", shape_name, "Liger FLCE"), best("head + loss", shape_name, "EMO fused")
        cost_mb = shape["vocab"] * shape["hidden"] * 4 / 2**20
        if fused and liger and liger.ms and fused.extra_mb is not None:
            print(f"- {shape_name}: head + fused EMO / head + Liger FLCE = {fused.ms / liger.ms:.2f}x [{fused.case}] "
                  f"(goal <= {GOALS['fused_vs_liger']}x); extra peak {fused.extra_mb:.0f} MB vs Liger "
                  f"{liger.extra_mb:.0f} MB + cost embedding {cost_mb:.0f} MB fp32 "
                  f"(goal <= {liger.extra_mb + cost_mb:.0f} MB)")
        elif fused:
            head_ce = get("head + loss", shape_name, "head + F.cross_entropy")
            print(f"- {shape_name}: Liger FLCE {liger.note if liger else 'missing'}; head + fused EMO / head + "
                  f"F.cross_entropy = {_ratio(fused.ms, head_ce.ms if head_ce else None)} [{fused.case}]")
    for model in TRAIN_MODELS:
        mle = [r for r in rows if r.group == "train step" and r.shape == model and r.case.startswith("MLE")
               and r.ms is not None]
        emo_best = best("train step", model, "EMO")
        if mle and emo_best:
            fastest = min(mle, key=lambda r: r.ms)
            goal = f" (goal <= {GOALS['train_emo_vs_mle']:.2f})" if model == "gpt2_small" else ""
            print(f"- {model} step: EMO / MLE = {emo_best.ms / fastest.ms:.2f} [{emo_best.case} vs {fastest.case}]"
                  f"{goal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and models (CPU end-to-end check)")
    parser.add_argument("--shapes", default="gpt2,llama3")
    parser.add_argument("--kernels", default="torch,triton", help="chunk kernels of our rows")
    parser.add_argument("--no-train", dest="train", action="store_false", help="skip the whole-model steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before emo.triton_chunk is imported
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here (use --device cpu --smoke to check the script)")
    shapes = {name: (SMOKE_SHAPES if args.smoke else SHAPES)[name] for name in args.shapes.split(",")}
    models = SMOKE_TRAIN_MODELS if args.smoke else TRAIN_MODELS
    dtype = torch.bfloat16
    kernels = args.kernels.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name} | torch {torch.__version__} | warmup {args.warmup}, iters {args.iters}"
          f"{' | smoke shapes' if args.smoke else ''}", flush=True)
    rows: list[Row] = []
    for shape_name, shape in shapes.items():
        label = f"{shape_name} N={shape['tokens']} H={shape['hidden']} V={shape['vocab']}"
        for group, cases in (("loss on logits", logits_cases), ("head + loss", head_cases)):
            run_group(rows, group, label, cases(shape, device, dtype, kernels), device, args.warmup, args.iters)
    if args.train:
        for model_name, spec in models.items():
            run_group(rows, "train step", model_name, train_cases(spec, device, device.type == "cuda", kernels),
                      device, args.warmup, args.iters)
    shape_labels = {f"{n} N={s['tokens']} H={s['hidden']} V={s['vocab']}": s for n, s in shapes.items()}
    print_table(rows, f"Side by side on {name} (bf16 inputs; torch {torch.__version__}; median of {args.iters})")
    print_goals(rows, shape_labels)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__,
                                               "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
