"""Side-by-side speed and peak-memory benchmark of the objective losses.

Each case runs in its own process (so peak RSS is its own): inputs are allocated in place, then ``--warmup`` plus
``--iters`` forward+backward passes are timed and the median is reported. "Extra" memory is the rise of peak RSS
over the RSS right after allocation (the peak mark is reset there). With ``--device cuda`` the inputs live on the GPU,
each pass is timed between device synchronisations, and "extra" memory is the CUDA allocator's peak over what was
allocated before the first pass. Ratios are printed against the baseline case of each comparison.
The default suite also prices half-precision logits: our loss keeps the logit gradient in fp32 until the upstream
gradient (loss scale) is applied, so fp16/bf16 inputs cost what fp32 inputs cost, not half of it.

    python benchmarks/loss_bench.py                      # EMO loss vs EMOLoss==0.0.3 at (8, 256, 50257) x 768
    python benchmarks/loss_bench.py --suite fused        # fused linear+loss vs materialised logits
    python benchmarks/loss_bench.py --device cuda        # the same comparisons on a GPU
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so setup transients do not hide what the loss allocates."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def filled(*shape, device, requires_grad=False, dtype=torch.float32, std=1.0):
    tensor = torch.empty(*shape, dtype=dtype, device=device).normal_(std=std)
    return tensor.requires_grad_(requires_grad)


def logits_case(args, dtype=torch.float32):
    """Materialised logits (B, T, V) of ``dtype`` with a padded tail, labels and a frozen cost embedding."""
    torch.manual_seed(0)
    logits = filled(args.batch, args.seq, args.vocab, device=args.device, requires_grad=True, std=2.0, dtype=dtype)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    labels[:, -16:] = -100
    cost = filled(args.vocab, args.width, device=args.device)
    return logits, labels, cost


def case_reference(args):
    from helpers import load_reference_emoloss

    reference = load_reference_emoloss()
    logits, labels, cost = logits_case(args)
    return lambda: reference(logits, labels, cost, mode=1), [logits]


def case_emo(dtype=torch.float32):
    def build(args):
        from emo import CostEmbedding, EMOLoss

        logits, labels, cost = logits_case(args, dtype)
        cost = CostEmbedding(cost)
        return lambda: EMOLoss(logits, labels, cost, mode=1), [logits]

    return build


def case_cross_entropy(dtype=torch.float32):
    def build(args):
        logits, labels, _ = logits_case(args, dtype)
        shifted = labels[:, 1:].reshape(-1)

        def step():
            return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, args.vocab), shifted)

        return step, [logits]

    return build


def head_case(args):
    """Hidden states (B, T, H) for ``args.tokens`` tokens, an LM head (V, H) and a frozen cost embedding."""
    torch.manual_seed(0)
    seq = 256
    hidden = filled(args.tokens // seq, seq, args.hidden, device=args.device, requires_grad=True)
    weight = filled(args.vocab, args.hidden, device=args.device, requires_grad=True, std=args.hidden**-0.5)
    labels = torch.randint(0, args.vocab, (args.tokens // seq, seq), device=args.device)
    from emo import CostEmbedding

    return hidden, weight, labels, CostEmbedding(filled(args.vocab, args.width, device=args.device))


def case_head_materialized(objective):
    def build(args):
        from emo import lm_loss

        hidden, weight, labels, cost = head_case(args)
        return lambda: lm_loss(hidden @ weight.T, labels, objective=objective, cost_embedding=cost), [hidden, weight]

    return build


def case_head_fused(objective, scale_tokens=1):
    def build(args):
        from emo import linear_lm_loss

        args.tokens *= scale_tokens
        hidden, weight, labels, cost = head_case(args)
        return lambda: linear_lm_loss(hidden, weight, labels, objective=objective, cost_embedding=cost), [hidden, weight]

    return build


def case_head_cross_entropy(args):
    """The usual Hugging Face path: materialised logits, then cross-entropy on shifted labels."""
    hidden, weight, labels, _ = head_case(args)
    shifted = labels[:, 1:].reshape(-1)

    def step():
        logits = hidden @ weight.T
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, args.vocab), shifted)

    return step, [hidden, weight]


def case_train_step(objective, fused):
    """Forward+backward of a GPT-2-small-shaped model (12 layers, width 768, vocab 50257)."""

    def build(args):
        from transformers import GPT2Config, GPT2LMHeadModel

        from emo import cost_embedding_from_model, linear_lm_loss

        torch.manual_seed(0)
        config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=args.vocab, n_positions=args.train_seq)
        model = GPT2LMHeadModel(config).to(args.device)
        cost = cost_embedding_from_model(model)
        ids = torch.randint(0, args.vocab, (args.train_batch, args.train_seq), device=args.device)
        if not fused:
            return lambda: model(input_ids=ids, labels=ids).loss, list(model.parameters())

        def step():
            hidden = model.transformer(input_ids=ids).last_hidden_state
            return linear_lm_loss(hidden, model.lm_head.weight, ids, objective=objective, cost_embedding=cost)

        return step, list(model.parameters())

    return build


CASES = {
    "reference": case_reference,
    "emo": case_emo(),
    "cross_entropy": case_cross_entropy(),
    "emo_fp16": case_emo(torch.float16),
    "emo_bf16": case_emo(torch.bfloat16),
    "cross_entropy_fp16": case_cross_entropy(torch.float16),
    "materialized_emo": case_head_materialized("emo"),
    "fused_emo": case_head_fused("emo"),
    "fused_emo_2n": case_head_fused("emo", scale_tokens=2),
    "materialized_cross_entropy": case_head_cross_entropy,
    "train_mle_hf": case_train_step("mle", fused=False),
    "train_mle_fused": case_train_step("mle", fused=True),
    "train_emo_fused": case_train_step("emo", fused=True),
}

SUITES = {  # per suite: the shape defaults, the cases (one process each); its REPORTS entry prints the ratios
    "emo": {
        "defaults": {"batch": 8, "seq": 256, "vocab": 50257, "width": 768},
        "cases": ["reference", "emo", "cross_entropy", "emo_fp16", "emo_bf16", "cross_entropy_fp16"],
    },
    "fused": {
        "defaults": {"tokens": 8192, "vocab": 50257, "hidden": 768, "width": 768, "train_batch": 4, "train_seq": 256},
        "cases": [
            "materialized_emo",
            "fused_emo",
            "fused_emo_2n",
            "materialized_cross_entropy",
            "train_mle_hf",
            "train_mle_fused",
            "train_emo_fused",
        ],
    },
}


def timed_passes(step, leaves, warmup: int, iters: int, cuda: bool) -> list[float]:
    """Seconds of each of ``iters`` forward+backward passes (``step().backward()``, gradients cleared first) after
    ``warmup`` untimed ones; on CUDA each pass ends with a device synchronisation."""
    times = []
    for i in range(warmup + iters):
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        step().backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def run_worker(args) -> dict:
    torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    step, leaves = CASES[args.worker](args)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        reset_peak_rss()
        baseline = rss_mb()
    times = timed_passes(step, leaves, args.warmup, args.iters, cuda)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    return {"case": args.worker, "ms": 1000 * statistics.median(times), "extra_mb": peak - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="emo")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--tokens", type=int, help="fused suite: tokens per step (N)")
    parser.add_argument("--hidden", type=int, help="fused suite: model width (H)")
    parser.add_argument("--train-batch", type=int, dest="train_batch")
    parser.add_argument("--train-seq", type=int, dest="train_seq")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    suite = SUITES[args.suite]
    for key, value in suite["defaults"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    names = [*suite["defaults"], "warmup", "iters", "threads", "device"]
    shared = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in names]
    results = {}
    for case in suite["cases"]:
        command = [sys.executable, __file__, f"--suite={args.suite}", f"--worker={case}", *shared]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[case] = json.loads(output.strip().splitlines()[-1])
        print(f"{case:>26}: {results[case]['ms']:9.1f} ms fwd+bwd   extra peak {results[case]['extra_mb']:8.1f} MB")
    print(", ".join(f"{name}={getattr(args, name)}" for name in names))
    REPORTS[args.suite](results, args)


def report_emo(results, args):
    speedup = results["reference"]["ms"] / results["emo"]["ms"]
    memory = results["emo"]["extra_mb"] / results["reference"]["extra_mb"]
    print(f"EMO loss vs EMOLoss==0.0.3: {speedup:.2f}x faster (target >= 2.5x), "
          f"{memory:.2f}x extra peak memory (target <= 0.35x)")
    half_logits_mb = args.batch * args.seq * args.vocab * 2 / 2**20
    for case in ("emo_fp16", "emo_bf16"):
        extra = results[case]["extra_mb"]
        print(f"{case} (fp32 gradient buffer): extra peak {extra:.0f} MB = "
              f"{extra / results['emo']['extra_mb']:.2f}x the fp32-logits case, "
              f"{extra / results['cross_entropy_fp16']['extra_mb']:.2f}x F.cross_entropy in fp16; "
              f"{extra - results['emo']['extra_mb']:+.0f} MB vs fp32 logits")
    print(f"cost of the fp32 gradient buffer over a half one: +{half_logits_mb:.0f} MB (2 bytes x B x T x V, the size "
          "of the half logits); it is cast in place into its own storage, so no second N x V buffer")


def report_fused(results, args):
    def ratio(key, a, b):
        return results[a][key] / results[b][key]

    best_mle = min(results["train_mle_hf"]["ms"], results["train_mle_fused"]["ms"])
    print(f"peak memory fused / materialised EMO (logits + loss): {ratio('extra_mb', 'fused_emo', 'materialized_emo'):.3f}"
          " (target <= 0.15)")
    print(f"peak memory fused EMO at 2N / at N: {ratio('extra_mb', 'fused_emo_2n', 'fused_emo'):.2f} (flat = 1.0)")
    print(f"time fused / materialised EMO: {ratio('ms', 'fused_emo', 'materialized_emo'):.2f}x (target <= 1.2x)")
    print(f"head + EMO fused / head + cross-entropy materialised: "
          f"{ratio('ms', 'fused_emo', 'materialized_cross_entropy'):.2f}x (FLOP floor 1.33x, target <= 1.5x)")
    print(f"train step (fwd+bwd) GPT-2-small-shaped, fused EMO / best MLE: "
          f"{results['train_emo_fused']['ms'] / best_mle:.2f}x (target <= 1.15x)")


REPORTS = {"emo": report_emo, "fused": report_fused}

if __name__ == "__main__":
    main()
