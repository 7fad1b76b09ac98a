"""The GPU benchmark scripts run end to end on a CPU at tiny shapes (``--smoke``), so the one GPU run they are written
for finds no error in them: every row is measured or says why not, and the goals are printed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    done = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_side_by_side_smoke_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    stdout = _run("benchmarks/gpu_side_by_side.py", "--device", "cpu", "--smoke", "--warmup", "0", "--iters", "1",
                  "--kernels", "torch", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    by_case = {(r["group"], r["shape"].split()[0], r["case"]): r for r in rows}
    for shape in ("gpt2", "llama3"):
        assert by_case[("loss on logits", shape, "F.cross_entropy")]["ms"] > 0
        assert by_case[("loss on logits", shape, "EMO materialised (bf16, torch)")]["ms"] > 0
        assert by_case[("head + loss", shape, "EMO fused (fp32, torch)")]["ms"] > 0
        assert by_case[("head + loss", shape, "Liger FLCE")]["note"].startswith("needs CUDA")
        assert by_case[("head + loss", shape, "Cut Cross-Entropy")]["note"].startswith("needs CUDA")
        assert by_case[("loss on logits", shape, "EMO materialised (tf32, torch)")]["note"] == "needs CUDA"
    for model in ("gpt2_small", "llama_smollm2_135m"):
        assert by_case[("train step", model, "EMO fused (bf16, torch)")]["ms"] > 0
        assert by_case[("train step", model, "MLE (HF model loss)")]["baseline"]
    assert "| group | shape | case |" in stdout and "Goals" in stdout
    assert "gpt2_small step: EMO / MLE =" in stdout and "materialised EMO / F.cross_entropy =" in stdout


@pytest.mark.slow
def test_precision_table_on_cpu():
    stdout = _run("benchmarks/precision_error.py", "--tokens", "4")
    lines = {line.split("|")[1].strip(): line for line in stdout.splitlines() if line.startswith("| ")}
    assert {"fp32", "bf16", "tf32 (emulated, nearest)", "tf32 (emulated, truncated)"} <= set(lines)
    for name, line in lines.items():
        if name != "precision":
            s_max, *_, bound = (float(v) for v in line.split("|")[2:6])
            assert s_max <= bound, line
