#!/usr/bin/env bash
# On a CUDA machine: correctness on the GPU (every kernel test case, compiled, plus the bf16 cases), then the
# benchmarks, into one folder. Parts fit a 10-minute call each: tests | kernels | topk | step | all (default);
# quick: the four stages below in at most 8 minutes (the stages' limits add up to 480 s), each result written the
# moment it is measured.
# Usage: OUT=benchmarks/results/h100-$(date +%Y%m%d) bash benchmarks/run_gpu.sh [part]
#        DRY_RUN=1 bash benchmarks/run_gpu.sh quick     (CPU: lists each stage; every command imports and parses)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}
PART=${1:-all}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$(pwd) PYTHONUNBUFFERED=1
# Pure-Python wheels the GPU image may lack (torch-optimi for the bf16-compensated rows, liger-kernel for its rows and
# tests, trl and cut-cross-entropy for the lm-head peers), downloaded beforehand with
# `pip download --no-deps -d .wheels torch-optimi liger-kernel trl cut-cross-entropy` and carried
# along: installed when present.
if ls .wheels/*.whl > /dev/null 2>&1; then pip install -q --no-deps --no-index .wheels/*.whl > "$OUT/wheels.log" 2>&1; fi
DRY_FAILED=""
stage() {   # stage NAME SECONDS CMD...: CMD (pytest ... or python -m MODULE ...) under a time limit; DRY_RUN: checked only
  local name=$1 limit=$2; shift 2
  echo "[quick] $name (at most ${limit}s): $*" | tee -a "$OUT/quick.log"
  if [ -n "${DRY_RUN:-}" ]; then
    if [ "$1" = pytest ]; then shift; python -m pytest --collect-only -q -p no:cacheprovider "$@" > "$OUT/collect.txt" 2>&1
    else shift 2; python -m benchmarks.dry_run "$@" > "$OUT/collect.txt" 2>&1; fi || DRY_FAILED="$DRY_FAILED $name"
    grep -v "^$" "$OUT/collect.txt" | tail -1
    return
  fi
  timeout "$limit" "$@"
}
if [ "$PART" = quick ]; then
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  [ -n "${DRY_RUN:-}" ] || {
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    python -c "import torch, triton, transformers; print(torch.cuda.get_device_name(), 'driver', torch.version.cuda, 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" > "$OUT/versions.txt"
  }
  # 1. correctness: every kernel test case on CUDA (bf16 included), the precision entry, packed FlexAttention, the
  #    body compiled by inductor and under Liger's kernels against eager
  for f in kernels/test_sae_constraint:35 kernels/test_sae_topk:30 kernels/test_logprobs:30 kernels/test_cache_pack:15 \
           training/test_precision:20 training/test_packing:20 training/test_compile:30 training/test_body_kernels:20; do
    limit=${f#*:} f=${f%:*}
    case $f in
      training/test_precision) sel=(-k "mixed_entry or under_autocast") ;;
      training/test_*) sel=(-m gpu) ;;
      *) sel=(-k "not sae_lens and not shipped_sae and not release_id") ;;
    esac
    stage "tests $f" "$limit" pytest -q -p no:cacheprovider "tests/$f.py" "${sel[@]}" > "$OUT/tests_${f#*/}.txt" 2>&1
    echo "$f: $(grep -v "^$" "$OUT/tests_${f#*/}.txt" | tail -1)" | tee -a "$OUT/gpu_tests_summary.txt"
  done
  # 2. one training step per method, Gemma-2-2B config, 2 pairs x 1024 tokens, bf16-mixed (+ rows under other policies)
  #    (last: SimPO and FPO with --protect's term on 20 features, its cost beside each method without it)
  stage step 120 python -m benchmarks.bench_step --out "$OUT" --pairs 2 --seq-len 1024 --precision bf16-mixed \
    --methods fpo,fpo-ref,simpo,dpo,tdpo2-lean,tdpo2-authors,fpo-authors,simpo-liger,simpo+protect,fpo+protect,simpo+protect-token,fpo+protect-token \
    2>&1 | tee "$OUT/bench_step.log"
  #    the body eager, under Liger's kernels and compiled (the first step, compilation, reported apart)
  stage body 70 python -m benchmarks.bench_step --out "$OUT" --pairs 2 --seq-len 1024 --precision bf16-mixed \
    --methods fpo,simpo --no-other-policies --body eager,liger-body,compile 2>&1 | tee "$OUT/bench_step_body.log"
  # 3. kernels: SAE pooling forward and backward vs naive and its compile, the TopK path, the lm head
  stage sae 25 python -m benchmarks.bench_sae_constraint --out "$OUT" --quick 2>&1 | tee "$OUT/bench_sae_constraint.log"
  stage topk 10 python -m benchmarks.bench_sae_constraint --out "$OUT/topk" --quick --activation topk --no-compile 2>&1 \
    | tee "$OUT/bench_sae_topk.log"
  stage logprobs 15 python -m benchmarks.bench_logprobs --out "$OUT" --tokens 4096 2>&1 | tee "$OUT/bench_logprobs.log"
  #    our lm head beside TRL's, Liger's and Cut Cross-Entropy's, each checked against float64 first
  stage heads 15 python -m benchmarks.bench_heads --out "$OUT" 2>&1 | tee "$OUT/bench_heads.log"
  # 4. where the step's time goes
  stage profile 25 python -m benchmarks.profile_step --out "$OUT" --methods fpo,simpo,tdpo2-lean --precision bf16-mixed \
    > "$OUT/profile_step.log" 2>&1
  [ -z "${DRY_FAILED:-}" ] || { echo "[quick] dry run: failed:$DRY_FAILED"; exit 1; }
  exit 0
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt"
if [ "$PART" = tests ] || [ "$PART" = all ]; then
  # sae-lens is not needed on the GPU: its two comparison tests run in CI
  python -m pytest -q -p no:cacheprovider tests/kernels/test_sae_constraint.py tests/kernels/test_sae_topk.py \
    tests/kernels/test_logprobs.py tests/kernels/test_cache_pack.py -k "not sae_lens and not shipped_sae and not release_id" 2>&1 | tee "$OUT/gpu_tests.txt"
  # FlexAttention over packed micro-batches, forward and backward (a random model: no downloads)
  python -m pytest -q -p no:cacheprovider tests/training/test_packing.py -m gpu 2>&1 | tee -a "$OUT/gpu_tests.txt"
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
