#!/usr/bin/env bash
# On a CUDA machine: the GPU test cases (bf16, full sizes), then every benchmark, into one folder.
# Usage: OUT=benchmarks/results/h100-$(date +%Y%m%d) bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -m pytest -q -m gpu -p no:cacheprovider tests/test_sae_constraint.py tests/test_logprobs.py 2>&1 | tee "$OUT/gpu_tests.txt"
python -m benchmarks.bench_sae_constraint --out "$OUT" 2>&1 | tee "$OUT/bench_sae_constraint.log"
python -m benchmarks.bench_logprobs --out "$OUT" 2>&1 | tee "$OUT/bench_logprobs.log"
python -m benchmarks.bench_step --out "$OUT" --pairs 2 --seq-len 1024 2>&1 | tee "$OUT/bench_step.log"
python -m benchmarks.profile_step --out "$OUT" 2>&1 | tail -40 > "$OUT/profile_step.log"
