#!/usr/bin/env bash
# On a CUDA machine: correctness on the GPU (every kernel test case, compiled, plus the bf16 cases), then the
# benchmarks, into one folder. Parts fit a 10-minute call each: tests | kernels | topk | step | all (default).
# Usage: OUT=benchmarks/results/h100-$(date +%Y%m%d) bash benchmarks/run_gpu.sh [part]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}
PART=${1:-all}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$(pwd) PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
if [ "$PART" = tests ] || [ "$PART" = all ]; then
  # sae-lens is not needed on the GPU: its two comparison tests run in CI
  python -m pytest -q -p no:cacheprovider tests/test_sae_constraint.py tests/test_sae_topk.py tests/test_logprobs.py \
    tests/test_cache_pack.py -k "not sae_lens and not shipped_sae and not release_id" 2>&1 | tee "$OUT/gpu_tests.txt"
  # FlexAttention over packed micro-batches, forward and backward (a random model: no downloads)
  python -m pytest -q -p no:cacheprovider tests/test_packing.py -m gpu 2>&1 | tee -a "$OUT/gpu_tests.txt"
fi
if [ "$PART" = kernels ] || [ "$PART" = all ]; then
  python -m benchmarks.kernel_resources --out "$OUT" > "$OUT/kernel_resources.log" 2>&1
  python -m benchmarks.bench_sae_constraint --out "$OUT" 2>&1 | tee "$OUT/bench_sae_constraint.log"
  python -m benchmarks.bench_logprobs --out "$OUT" 2>&1 | tee "$OUT/bench_logprobs.log"
fi
if [ "$PART" = topk ] || [ "$PART" = all ]; then
  # TopK SAEs at Llama-3-8B shapes; the prediction beside it for comparison
  python -m benchmarks.bench_sae_constraint --activation topk --out "$OUT" 2>&1 | tee "$OUT/bench_sae_topk.log"
  python -m benchmarks.estimate_sae_topk --out "$OUT" > "$OUT/estimate_sae_topk.log" 2>&1
fi
if [ "$PART" = step ] || [ "$PART" = all ]; then
  # The authors' TDPO is predicted at 76.5 GiB (results/estimates): expandable segments keep the caching
  # allocator's fragmentation from turning that into an out-of-memory on an 80 GB card. Same for every method.
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  python -m benchmarks.bench_step --out "$OUT" --pairs 2 --seq-len 1024 2>&1 | tee "$OUT/bench_step.log"
  python -m benchmarks.bench_step --out "$OUT" --pairs 2 --seq-len 1024 --gradient-checkpointing 2>&1 \
    | tee "$OUT/bench_step_ckpt.log"
  python -m benchmarks.profile_step --out "$OUT" > "$OUT/profile_step.log" 2>&1
fi
