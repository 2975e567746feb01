"""Compile every kernel variant for an H100 (CUDA sm_90) ahead of time, without a GPU: Triton's own
compiler and ptxas check what the interpreter cannot (types, layouts, shared memory).
Run with TRITON_INTERPRET=0; prints one line per variant and exits non-zero on any failure."""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

import fpo_kernels.logprobs as lp
import fpo_kernels.sae_constraint as sc

SAE_FWD = {"h": "*{dt}", "mask": "*i8", "span": "*i32", "inv_n": "*fp32", "w": "*{dt}", "bias": "*fp32", "theta": "*fp32",
           "idx": "*i32", "out": "*fp32", "D": "i32", "F": "i32", "stride_h": "i32"}
SAE_BWD = {"h": "*{dt}", "mask": "*i8", "span": "*i32", "w": "*{dt}", "bias": "*fp32", "theta": "*fp32", "idx": "*i32",
           "coef": "*fp32", "dh": "*fp32", "D": "i32", "K": "i32", "stride_h": "i32"}
LP = {"logits": "*{dt}", "labels": "*i64", "lse": "*fp32", "logp": "*fp32", "V": "i32", "ignore_index": "i32"}
LP_BWD = {"logits": "*{dt}", "labels": "*i64", "lse": "*fp32", "grad": "*fp32", "V": "i32", "ignore_index": "i32"}
KL = {"logits": "*{dt}", "ref_logits": "*{dt}", "valid": "*i8", "labels": "*i64", "lse": "*fp32", "ref_lse": "*fp32",
      "kl": "*fp32", "logp": "*fp32", "ref_logp": "*fp32", "V": "i32"}
KL_BWD = {"logits": "*{dt}", "ref_logits": "*{dt}", "valid": "*i8", "labels": "*i64", "lse": "*fp32", "ref_lse": "*fp32",
          "grad": "*fp32", "grad_logp": "*fp32", "V": "i32"}


def variants():
    """(kernel, signature, dtype, constexprs, options): every GPU autotune config of the SAE kernels."""
    for dt in ("bf16", "fp16", "fp32"):
        prec = "ieee" if dt == "fp32" else None
        for has_mask in (False, True):   # packed spans, padded mask
            for gather in (False, True):
                for cfg in sc._POOL_CONFIGS:
                    yield (sc._sae_pool_fwd_kernel, SAE_FWD, dt,
                           dict(HAS_MASK=has_mask, GATHER=gather, PRECISION=prec, **cfg.kwargs),
                           dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            for cfg in sc._BWD_CONFIGS:
                yield (sc._sae_constraint_bwd_kernel, SAE_BWD, dt, dict(HAS_MASK=has_mask, BK=64, PRECISION=prec, **cfg.kwargs),
                       dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        for cap in (False, True):
            c = dict(CAP=30.0, HAS_CAP=cap, BV=1024)
            for fn, sig in ((lp._logprobs_fwd_kernel, LP), (lp._logprobs_bwd_kernel, LP_BWD)):
                yield fn, sig, dt, c, {}
            for labels in (False, True):   # KL alone, and KL with both models' log-probs
                for fn, sig in ((lp._kl_fwd_kernel, KL), (lp._kl_bwd_kernel, KL_BWD)):
                    yield fn, sig, dt, dict(c, HAS_LABELS=labels), {}


def main():
    target = GPUTarget("cuda", 90, 32)
    failures = 0
    for fn, sig, dt, const, options in variants():
        fn_name = (fn.fn if isinstance(fn, Autotuner) else fn).__name__
        signature = {k: v.format(dt=dt) for k, v in sig.items()}
        signature.update({k: "constexpr" for k in const})
        try:
            jit = fn.fn if isinstance(fn, Autotuner) else fn  # an autotuned kernel wraps its JITFunction
            k = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=const), target=target, options=options)
            print(f"ok   {fn_name} {dt} {const} {options} shared={k.metadata.shared}")
        except Exception as e:  # report every failing variant, then fail
            failures += 1
            print(f"FAIL {fn_name} {dt} {const}: {type(e).__name__}: {str(e)[:2000]}")
    print(f"triton {triton.__version__}: {failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
