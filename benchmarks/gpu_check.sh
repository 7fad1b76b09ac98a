#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the loss benchmarks on the GPU, then every `cuda`-marked test (golden
# comparisons against EMOLoss==0.0.3 on the GPU, materialised vs fused kernels, Trainer steps in fp32/bf16, 1-GPU FSDP2
# runs of the tiny experiments, the divergence guard's host syncs). Logs go to the folder given (default gpu_check/).
# Exit status 1 if any step failed.
#   bash benchmarks/gpu_check.sh [log-dir]            # PY=... picks the interpreter (default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
logs=${1:-gpu_check}
mkdir -p "$logs"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
status=0
# `baselines/` is the package `emo.baselines` only through an install of this checkout (offline: no build isolation)
"$PY" -c "import emo" 2>/dev/null || "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . || status=1
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
'|', torch.cuda.get_device_name(0))" 2>&1 | tee "$logs/device.log" || status=1
"$PY" benchmarks/loss_bench.py --device cuda --warmup 3 --iters 10 2>&1 | tee "$logs/loss_bench_emo.log" || status=1
"$PY" benchmarks/loss_bench.py --device cuda --suite fused --warmup 3 --iters 10 2>&1 \
  | tee "$logs/loss_bench_fused.log" || status=1
mapfile -t cuda_tests < <(grep -l "pytest.mark.cuda" tests/test_*.py)
"$PY" -m pytest -q -s -rs -m cuda -p no:cacheprovider "${cuda_tests[@]}" 2>&1 | tee "$logs/cuda_tests.log" || status=1
exit "$status"
