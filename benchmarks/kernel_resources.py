"""What each kernel variant costs an H100, from Triton's own compiler and ptxas: no GPU needed.

Every variant (kernel x autotune config x dtype x flags) is compiled for sm_90a with the argument
specialisation a real launch gets at Gemma-2-2B shapes (d 2304, SAE width 16384, vocabulary 256000):
pointers 16-byte aligned, and the integer arguments divisible by 16 at those shapes marked so
(tt.divisibility 16), which is what enables vectorised and cp.async loads. Then ptxas -v reports registers,
spills and shared memory; occupancy on an H100 SM follows from 65,536 registers, 228 KB of shared memory
(1 KB reserved per block) and 64 resident warps; `wgmma` tells whether tl.dot became Hopper's warpgroup MMA.

    python -m benchmarks.kernel_resources [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

import fpo_kernels.logprobs as lp
import fpo_kernels.sae_constraint as sc

H100 = dict(regs=65536, smem=228 * 1024, smem_reserved=1024, warps=64, blocks=32, max_regs_per_thread=255)
SHAPES = dict(D=2304, F=16384, M=16384, K=50, V=256000)   # Gemma-2-2B with a 16k SAE, k = 50

SAE_FWD = {"h": "*{dt}", "mask": "*i8", "span": "*i32", "tiles": "*i32", "w": "*{dt}", "bias": "*fp32",
           "theta": "*fp32", "idx": "*i32", "part": "*fp32", "D": "i32", "F": "i32", "M": "i32", "stride_h": "i32",
           "n_tiles": "i32"}
SAE_REDUCE = {"part": "*fp32", "tile_start": "*i32", "inv_n": "*fp32", "out": "*fp32", "F": "i32"}
SAE_GATE = {"h": "*{dt}", "mask": "*i8", "span": "*i32", "tiles": "*i32", "w": "*{dt}", "bias": "*fp32",
            "theta": "*fp32", "idx": "*i32", "coef": "*fp32", "g": "*{dt}", "D": "i32", "K": "i32", "M": "i32",
            "stride_h": "i32"}
SAE_DH = {"g": "*{dt}", "tiles": "*i32", "w": "*{dt}", "idx": "*i32", "dh": "*{dt}", "D": "i32", "K": "i32", "M": "i32"}
# the lm-head row kernels read fp32 logits; the backward writes dL/dlogits in the weight's dtype ({dt})
LP = {"logits": "*fp32", "labels": "*i64", "lse": "*fp32", "logp": "*fp32", "V": "i32", "ignore_index": "i32"}
LP_BWD = {"logits": "*fp32", "dlogits": "*{dt}", "labels": "*i64", "lse": "*fp32", "grad": "*fp32", "VB": "i32",
          "v_off": "i32", "V": "i32", "ignore_index": "i32"}
KL = {"logits": "*fp32", "ref_logits": "*fp32", "valid": "*i8", "labels": "*i64", "lse": "*fp32", "ref_lse": "*fp32",
      "kl": "*fp32", "logp": "*fp32", "ref_logp": "*fp32", "V": "i32"}
KL_BWD = {"logits": "*fp32", "dlogits": "*{dt}", "ref_logits": "*fp32", "valid": "*i8", "labels": "*i64",
          "lse": "*fp32", "ref_lse": "*fp32", "grad": "*fp32", "grad_logp": "*fp32", "VB": "i32", "v_off": "i32",
          "V": "i32"}
# integer arguments at the shapes above: the values a launch would see (F is the gathered k in GATHER variants)
INT_VALUES = {"D": SHAPES["D"], "stride_h": SHAPES["D"], "K": SHAPES["K"], "V": SHAPES["V"], "ignore_index": -100,
              "n_tiles": 67, "VB": 21760, "v_off": 21760}   # a backward vocabulary block of 4096 rows   # 8192 response rows in 128-row tiles, plus the sequences' partial tiles


def variants():
    """(kernel, signature, dtype, constexprs, options): every GPU autotune config of every kernel."""
    for dt in ("bf16", "fp16", "fp32"):
        prec = "ieee" if dt == "fp32" else None
        opt = lambda cfg: dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        for has_mask in (False, True):   # packed spans, padded mask
            for gather in (False, True):
                for cfg in sc._POOL_CONFIGS:
                    yield (sc._sae_pool_fwd_kernel, SAE_FWD, dt, dict(HAS_MASK=has_mask, GATHER=gather, BT=128,
                                                                       PRECISION=prec, **cfg.kwargs), opt(cfg))
            for cfg in sc._GATE_CONFIGS:
                yield (sc._sae_gate_kernel, SAE_GATE, dt, dict(HAS_MASK=has_mask, BT=64, BK=64, PRECISION=prec,
                                                               **cfg.kwargs), opt(cfg))
        for cfg in sc._DH_CONFIGS:
            yield sc._sae_dh_kernel, SAE_DH, dt, dict(BT=64, BK=64, PRECISION=prec, **cfg.kwargs), opt(cfg)
        if dt == "fp32":   # the reduction reads fp32 partial sums whatever the hidden dtype
            yield sc._sae_pool_reduce_kernel, SAE_REDUCE, dt, dict(BF=1024), {}
        for cap in (False, True):
            c = dict(CAP=30.0, HAS_CAP=cap, BV=1024)
            for fn, sig in ((lp._logprobs_fwd_kernel, LP), (lp._logprobs_bwd_kernel, LP_BWD)):
                yield fn, sig, dt, c, {}
            for labels in (False, True):   # KL alone, and KL with both models' log-probs
                for fn, sig in ((lp._kl_fwd_kernel, KL), (lp._kl_bwd_kernel, KL_BWD)):
                    yield fn, sig, dt, dict(c, HAS_LABELS=labels), {}


def launch_attrs(jit, signature, const):
    """tt.divisibility 16 where a real launch at SHAPES would mark it: every pointer (allocations are 16-byte
    aligned) and every integer argument divisible by 16."""
    attrs = {}
    for i, name in enumerate(jit.arg_names):
        if name in const:
            continue
        ty = signature[name]
        value = SHAPES["K"] if (name == "F" and const.get("GATHER")) else INT_VALUES.get(name, SHAPES.get(name))
        if ty.startswith("*") or (value is not None and value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _ptxas(cc: int) -> str:
    """The ptxas Triton itself uses for this architecture (its bundled one)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(cc).path
    except (ImportError, AttributeError):   # older Triton: one bundled ptxas
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_report(ptx: str, arch: str, cc: int) -> dict:
    ptxas = _ptxas(cc)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {log[-2000:]}")
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": regs, "spill_store_bytes": int(spill.group(1)), "spill_load_bytes": int(spill.group(2))}


def occupancy(regs: int, smem: int, warps: int) -> dict:
    """Resident blocks and warps per H100 SM (registers allocated per warp in units of 256)."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = H100["regs"] // (regs_per_warp * warps) if regs else H100["blocks"]
    by_smem = H100["smem"] // (smem + H100["smem_reserved"]) if smem else H100["blocks"]
    blocks = min(by_regs, by_smem, H100["warps"] // warps, H100["blocks"])
    limit = min((by_regs, "registers"), (by_smem, "shared memory"), (H100["warps"] // warps, "warps"))[1]
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "occupancy": blocks * warps / H100["warps"],
            "limited_by": limit}


def compile_variant(fn, sig, dt, const, options, arch_cc=90):
    jit = fn.fn if isinstance(fn, Autotuner) else fn   # an autotuned kernel wraps its JITFunction
    signature = {k: v.format(dt=dt) for k, v in sig.items()}
    signature.update({k: "constexpr" for k in const})
    src = ASTSource(fn=jit, signature=signature, constexprs=const, attrs=launch_attrs(jit, signature, const))
    k = triton.compile(src, target=GPUTarget("cuda", arch_cc, 32), options=options)
    ptx = k.asm["ptx"]
    arch = re.search(r"\.target (sm_\w+)", ptx).group(1)
    row = {"kernel": jit.__name__, "dtype": dt, "constexprs": {k: v for k, v in const.items() if k != "PRECISION"},
           "num_warps": k.metadata.num_warps, "num_stages": options.get("num_stages"), "shared_bytes": k.metadata.shared,
           "wgmma": "wgmma.mma_async" in ptx, "mma": "mma.sync" in ptx, "cp_async": "cp.async" in ptx}
    row.update(_ptxas_report(ptx, arch, arch_cc))
    row.update(occupancy(row["registers"], row["shared_bytes"], row["num_warps"]))
    return row


def report(log=print):
    rows, failures = [], []
    for fn, sig, dt, const, options in variants():
        name = (fn.fn if isinstance(fn, Autotuner) else fn).__name__
        try:
            rows.append(compile_variant(fn, sig, dt, const, options))
            r = rows[-1]
            log(f"ok   {name} {dt} {r['constexprs']} warps={r['num_warps']} regs={r['registers']} "
                f"spill={r['spill_store_bytes']} smem={r['shared_bytes']} occ={r['occupancy']:.2f} wgmma={r['wgmma']}")
        except Exception as e:   # report every failing variant, then fail
            failures.append((name, dt, const, f"{type(e).__name__}: {str(e)[:2000]}"))
            log(f"FAIL {name} {dt} {const}: {failures[-1][3]}")
    return rows, failures


def markdown(rows) -> str:
    lines = [f"Compiled for sm_90a by triton {triton.__version__} with launch specialisation at {SHAPES}.", "",
             "| kernel | dtype | flags and tiles | warps | regs | spill B | smem B | occ. | limited by | wgmma | cp.async |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        flags = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        lines.append(f"| {r['kernel']} | {r['dtype']} | {flags} | {r['num_warps']} | {r['registers']} | "
                     f"{r['spill_store_bytes']} | {r['shared_bytes']} | {r['occupancy']:.2f} | {r['limited_by']} | "
                     f"{'yes' if r['wgmma'] else 'no'} | {'yes' if r['cp_async'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write kernel_resources.{json,md} here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("kernel_resources compiles the GPU autotune configs: run it with TRITON_INTERPRET=0")
    rows, failures = report()
    print(f"triton {triton.__version__}: {len(rows)} variants compiled, {len(failures)} failures")
    if args.out:
        from benchmarks.common import environment
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernel_resources.json"), "w") as f:
            json.dump({"environment": environment(), "shapes": SHAPES, "h100": H100, "rows": rows,
                       "failures": failures}, f, indent=1)
        with open(os.path.join(args.out, "kernel_resources.md"), "w") as f:
            f.write("# kernel_resources\n\n" + markdown(rows) + "\n")
    if failures:
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
