"""torch.profiler summary of training steps per method: top kernels by device time, and the share of the
step spent in the SAE constraint and in the log-prob / KL kernels (forward and backward).

Names matched: the Triton kernels (_sae_*, _logprobs_*, _kl_*) and the GEMMs launched inside the
record_function ranges fpo::sae_constraint, fpo::logprobs and fpo::logprobs_kl (TDPO) of fpo.step.PolicyStats.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_step import NEEDS_REF, Step, make_optimizer
from benchmarks.common import environment


def _share(events, attr, pattern):
    total = sum(getattr(e, attr) for e in events if e.key.startswith(pattern))
    return total


def profile_method(bench, method, steps=3, trace_dir=None):
    cuda = torch.cuda.is_available()
    opt = make_optimizer(bench.policy, bench.precision, bench.device)
    for _ in range(2):  # warm up (autotuning, compilation)
        bench.loss(method).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=False) as prof:
        for _ in range(steps):
            bench.loss(method).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
    if trace_dir:
        prof.export_chrome_trace(os.path.join(trace_dir, f"trace_{method}.json"))
    attr = "device_time_total" if cuda else "cpu_time_total"
    ev = prof.key_averages()
    kernels = (
        [e for e in ev if (getattr(e, attr) > 0 and not e.key.startswith(("fpo::", "ProfilerStep", "aten::")))]
        if cuda
        else [e for e in ev if e.key.startswith("aten::") or e.key.startswith("_")]
    )
    step_total = sum(getattr(e, attr) for e in kernels)
    ranges = {
        name: next((getattr(e, attr) for e in ev if e.key == name), 0.0)
        for name in ("fpo::sae_constraint", "fpo::logprobs", "fpo::logprobs_kl")
    }
    triton_sae = sum(getattr(e, attr) for e in ev if e.key.startswith("_sae_"))
    triton_lp = sum(getattr(e, attr) for e in ev if e.key.startswith(("_logprobs_", "_kl_")))
    lines = [
        f"## {method}",
        f"total {'device' if cuda else 'CPU'} time over {steps} steps: {step_total / 1e3:.2f} ms",
        f"Triton SAE kernels: {triton_sae / max(step_total, 1e-9):.2%}; Triton log-prob/KL kernels: "
        f"{triton_lp / max(step_total, 1e-9):.2%}",
    ]
    lines += [f"range {k}: {v / 1e3:.2f} ms (forward, GEMMs included)" for k, v in ranges.items() if v]
    lines.append("")
    lines.append(ev.table(sort_by=attr, row_limit=15))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--methods", default="fpo,fpo-ref,simpo,tdpo2-lean,tdpo2-authors")
    ap.add_argument("--out", default=None, help="write profile_step_<preset>.txt (and traces with --trace) here")
    ap.add_argument("--trace", action="store_true", help="also write chrome traces")
    ap.add_argument(
        "--precision", default="auto", help="fpo.precision policy (auto: bf16-mixed on a GPU, fp32 on the CPU)"
    )
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    preset = args.preset or ("gemma2-2b" if cuda else "tiny")
    T = args.seq_len or (1024 if cuda else 64)
    bench = Step(preset, args.pairs, T, "cuda" if cuda else "cpu", args.precision)
    env = environment()
    parts = [
        f"# profile_step {preset} {args.pairs}x{T}, precision {bench.precision.name}: {env['device']}, "
        f"torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['git_commit']}, {env['date']}"
    ]
    methods = [m.strip() for m in args.methods.split(",")]
    for m in [m for m in methods if m not in NEEDS_REF] + [m for m in methods if m in NEEDS_REF]:
        if m in NEEDS_REF:
            bench.load_reference()
        parts.append(profile_method(bench, m, trace_dir=args.out if args.trace else None))
    text = "\n\n".join(parts)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"profile_step_{preset}.txt"), "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
