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
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fpo_kernels.kernels import all_kernels

H100 = dict(regs=65536, smem=228 * 1024, smem_reserved=1024, warps=64, blocks=32, max_regs_per_thread=255)
SHAPES = dict(D=2304, F=16384, M=16384, K=50, V=256000)  # Gemma-2-2B with a 16k SAE, k = 50

# integer arguments at the shapes above: the values a launch would see (F is the gathered k in GATHER variants)
INT_VALUES = {
    "D": SHAPES["D"],
    "stride_h": SHAPES["D"],
    "K": SHAPES["K"],
    "V": SHAPES["V"],
    "ignore_index": -100,
    "n_tiles": 67,  # 8192 response rows in 128-row tiles, plus the sequences' partial tiles
    "VB": 21760,
    "v_off": 21760,
}  # a backward vocabulary block


def variants(kernels=None):
    """(kernel, dtype, constexprs, options): every kernel of the op modules' tables, in every operand dtype,
    every value of its flags and every GPU autotune config, with the GPU's tile sizes."""
    for kernel in kernels or all_kernels():
        for dt in kernel.dtypes:
            for values in itertools.product(*kernel.flags.values()):
                const = dict(zip(kernel.flags, values), **kernel.tiles)
                if kernel.dot:
                    const["PRECISION"] = "ieee" if dt == "fp32" else None
                for tiles, warps, stages in kernel.configs or [({}, None, None)]:
                    options = {} if warps is None else dict(num_warps=warps, num_stages=stages)
                    yield kernel, dt, dict(const, **tiles), options


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
    except (ImportError, AttributeError):  # older Triton: one bundled ptxas
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_report(ptx: str, arch: str, cc: int) -> dict:
    ptxas = _ptxas(cc)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True
        )
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
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "occupancy": blocks * warps / H100["warps"],
        "limited_by": limit,
    }


def compile_variant(kernel, dt, const, options, arch_cc=90):
    jit = kernel.fn  # the JITFunction (kernel.jit may be its autotuner)
    signature = {k: v.format(dt=dt) for k, v in kernel.args.items()}
    signature.update({k: "constexpr" for k in const})
    src = ASTSource(fn=jit, signature=signature, constexprs=const, attrs=launch_attrs(jit, signature, const))
    k = triton.compile(src, target=GPUTarget("cuda", arch_cc, 32), options=options)
    ptx = k.asm["ptx"]
    arch = re.search(r"\.target (sm_\w+)", ptx).group(1)
    row = {
        "kernel": jit.__name__,
        "dtype": dt,
        "constexprs": {k: v for k, v in const.items() if k != "PRECISION"},
        "num_warps": k.metadata.num_warps,
        "num_stages": options.get("num_stages"),
        "shared_bytes": k.metadata.shared,
        "wgmma": "wgmma.mma_async" in ptx,
        "mma": "mma.sync" in ptx,
        "cp_async": "cp.async" in ptx,
    }
    row.update(_ptxas_report(ptx, arch, arch_cc))
    row.update(occupancy(row["registers"], row["shared_bytes"], row["num_warps"]))
    return row


_TO_COMPILE = []  # what report() hands its forked workers


def _compile_one(i):
    """The i-th variant compiled: (row, None) or (None, the failure). Run in a worker process."""
    kernel, dt, const, options = _TO_COMPILE[i]
    try:
        return compile_variant(kernel, dt, const, options), None
    except Exception as e:  # report every failing variant, then fail
        return None, (kernel.name, dt, const, f"{type(e).__name__}: {str(e)[:2000]}")


def report(log=print, workers=None):
    """Every variant compiled, on one worker process per CPU (each compile is single-threaded), in order."""
    _TO_COMPILE[:] = variants()
    n = len(_TO_COMPILE)
    workers = workers or min(os.cpu_count() or 1, n)
    rows, failures = [], []
    ctx = multiprocessing.get_context("fork")  # the workers inherit the imported kernels; no GPU is touched
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        for row, failure in pool.map(_compile_one, range(n)):
            if failure:
                failures.append(failure)
                log(f"FAIL {failure[0]} {failure[1]} {failure[2]}: {failure[3]}")
                continue
            rows.append(row)
            log(
                f"ok   {row['kernel']} {row['dtype']} {row['constexprs']} warps={row['num_warps']} "
                f"regs={row['registers']} spill={row['spill_store_bytes']} smem={row['shared_bytes']} "
                f"occ={row['occupancy']:.2f} wgmma={row['wgmma']}"
            )
    return rows, failures


def markdown(rows) -> str:
    lines = [
        f"Compiled for sm_90a by triton {triton.__version__} with launch specialisation at {SHAPES}.",
        "",
        "| kernel | dtype | flags and tiles | warps | regs | spill B | smem B | occ. | limited by | wgmma | cp.async |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        flags = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {flags} | {r['num_warps']} | {r['registers']} | "
            f"{r['spill_store_bytes']} | {r['shared_bytes']} | {r['occupancy']:.2f} | {r['limited_by']} | "
            f"{'yes' if r['wgmma'] else 'no'} | {'yes' if r['cp_async'] else 'no'} |"
        )
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
            json.dump(
                {"environment": environment(), "shapes": SHAPES, "h100": H100, "rows": rows, "failures": failures},
                f,
                indent=1,
            )
        with open(os.path.join(args.out, "kernel_resources.md"), "w") as f:
            f.write("# kernel_resources\n\n" + markdown(rows) + "\n")
    if failures:
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
