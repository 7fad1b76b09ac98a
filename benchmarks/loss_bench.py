"""Side-by-side speed and peak-memory benchmark of the objective losses.

Each case runs in its own process (so peak RSS is its own): inputs are allocated in place, then ``--warmup`` plus
``--iters`` forward+backward passes are timed and the median is reported. "Extra" memory is the rise of peak RSS
over the RSS right after allocation. Ratios are printed against the baseline case of each comparison.

    python benchmarks/loss_bench.py                      # EMO loss vs EMOLoss==0.0.3 at (8, 256, 50257) x 768
    python benchmarks/loss_bench.py --suite fused        # fused linear+loss vs materialised logits
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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def filled(*shape, requires_grad=False, dtype=torch.float32, std=1.0):
    tensor = torch.empty(*shape, dtype=dtype).normal_(std=std)
    return tensor.requires_grad_(requires_grad)


def logits_case(args):
    """Materialised logits (B, T, V) with a padded tail, labels and a frozen cost embedding."""
    torch.manual_seed(0)
    logits = filled(args.batch, args.seq, args.vocab, requires_grad=True, std=2.0)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels[:, -16:] = -100
    cost = filled(args.vocab, args.width)
    return logits, labels, cost


def case_reference(args):
    from reference_emoloss import load_reference_emoloss

    reference = load_reference_emoloss()
    logits, labels, cost = logits_case(args)
    return lambda: reference(logits, labels, cost, mode=1), [logits]


def case_emo(args):
    from emo import CostEmbedding, EMOLoss

    logits, labels, cost = logits_case(args)
    cost = CostEmbedding(cost)
    return lambda: EMOLoss(logits, labels, cost, mode=1), [logits]


def case_cross_entropy(args):
    logits, labels, _ = logits_case(args)
    shifted = labels[:, 1:].reshape(-1)

    def step():
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, args.vocab), shifted)

    return step, [logits]


CASES = {"reference": case_reference, "emo": case_emo, "cross_entropy": case_cross_entropy}

SUITES = {
    "emo": {
        "defaults": {"batch": 8, "seq": 256, "vocab": 50257, "width": 768},
        "cases": ["reference", "emo", "cross_entropy"],
        "ratios": [("emo", "reference", "EMO loss vs EMOLoss==0.0.3", 2.5, 0.35)],
    },
}


def run_worker(args) -> dict:
    torch.set_num_threads(args.threads)
    step, leaves = CASES[args.worker](args)
    baseline = max(rss_mb(), peak_rss_mb())
    times = []
    for i in range(args.warmup + args.iters):
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        step().backward()
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            times.append(elapsed)
    return {"case": args.worker, "ms": 1000 * statistics.median(times), "extra_mb": peak_rss_mb() - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="emo")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    suite = SUITES[args.suite]
    for key, value in suite["defaults"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    shared = [f"--{k}={getattr(args, k)}" for k in ("batch", "seq", "vocab", "width", "warmup", "iters", "threads")]
    results = {}
    for case in suite["cases"]:
        command = [sys.executable, __file__, f"--suite={args.suite}", f"--worker={case}", *shared]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[case] = json.loads(output.strip().splitlines()[-1])
        print(f"{case:>16}: {results[case]['ms']:9.1f} ms fwd+bwd   extra peak {results[case]['extra_mb']:8.1f} MB")
    print(f"shape: batch={args.batch} seq={args.seq} vocab={args.vocab} width={args.width}, threads={args.threads}")
    for case, baseline, label, speed_target, memory_target in suite["ratios"]:
        speedup = results[baseline]["ms"] / results[case]["ms"]
        memory = results[case]["extra_mb"] / results[baseline]["extra_mb"]
        print(
            f"{label}: {speedup:.2f}x faster (target >= {speed_target}x), "
            f"{memory:.2f}x extra peak memory (target <= {memory_target}x)"
        )


if __name__ == "__main__":
    main()
