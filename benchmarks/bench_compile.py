"""Eager against `--compile` (and `--body-kernels liger` where liger-kernel runs): the step time after the first
and the peak memory of `fpo train`, one process per setting from the same weights, on the demo model at
2 pairs x 512 tokens with the shared-prompt layout, for FPO and SimPO. Prints each setting's ratio to eager
measured in the same run; the target is a compiled step at most 0.85x eager's, with no more memory.

    python -m benchmarks.bench_compile [--steps 4] [--max-length 512] [--body-kernels]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics

import torch

from benchmarks.common import environment, train_in_process, write_results
from fpo import assets
from fpo.precompute import precompute


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_compile", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per setting (the first is not timed)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--pairs", type=int, default=2, help="pairs per step")
    p.add_argument("--body-kernels", action="store_true", help="also a row with --body-kernels liger (GPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--work-dir", default="runs/bench-compile")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<cpu|gpu>")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = args.out or os.path.join(os.path.dirname(__file__), "results", "gpu" if device == "cuda" else "cpu")
    os.makedirs(args.work_dir, exist_ok=True)
    model = assets.ensure_demo_model()
    lengths = dict(max_length=args.max_length, max_prompt_length=args.max_length // 2)
    n = args.pairs * args.steps
    cache = os.path.join(args.work_dir, "cache")
    precompute(
        model,
        assets.TRAIN_PAIRS,
        cache,
        sae=assets.DEMO_SAE,
        max_pairs=n,
        device=device,
        overwrite=True,
        progress=False,
        **lengths,
    )
    base = dict(
        model=model,
        dataset=assets.TRAIN_PAIRS,
        max_pairs=n,
        batch_size=args.pairs,
        micro_batch_size=args.pairs,
        max_steps=args.steps,
        lr=1e-6,
        warmup_steps=0,
        log_every=1,
        progress=False,
        device=device,
        save_optimizer=False,
        overwrite=True,
        packing="share-prompt",
        **lengths,
    )
    settings = [("eager", {}), ("compile", {"compile": True})]
    if args.body_kernels and importlib.util.find_spec("liger_kernel") is None:
        print("[bench_compile] liger-kernel is not installed: no --body-kernels rows")
    elif args.body_kernels:
        settings += [
            ("liger body", {"body_kernels": "liger"}),
            ("compile + liger", {"compile": True, "body_kernels": "liger"}),
        ]
    rows = []
    for method in ("fpo", "simpo"):
        extra = dict(cache=cache, sae=assets.DEMO_SAE) if method == "fpo" else {}
        eager = None
        for name, kw in settings:
            _, hist = train_in_process(
                f"{method}-{name.replace(' ', '-').replace('+', 'and')}",
                dict(base, method=method, **extra, **kw),
                args.work_dir,
            )
            timed = [h["step_time_s"] for h in hist[1:] if h.get("step_time_s") is not None]
            row = {
                "method": method,
                "setting": name,
                "step_s": statistics.mean(timed),
                "first_step_s": hist[0].get("first_step_s") or hist[0]["step_time_s"],
                "peak_mb": max(h["peak_memory_mb"] for h in hist),
                "loss_step1": hist[0]["loss"],
            }
            eager = eager or row
            row["time_vs_eager"] = row["step_s"] / eager["step_s"]
            row["memory_vs_eager"] = row["peak_mb"] / eager["peak_mb"]
            rows.append(row)
    notes = (
        f"demo model, {args.pairs} pairs x {args.max_length} tokens (share-prompt), {args.steps} steps per setting, "
        "each its own process from the same weights; step_s: mean over the steps after the first; first_step_s: "
        "the first step, compilation included; peak_mb: process peak RSS (CPU) or peak allocated (GPU). "
        "Target: compile's time_vs_eager <= 0.85 with memory_vs_eager <= 1."
    )
    write_results("bench_compile", rows, environment(), out_dir, notes=notes)


if __name__ == "__main__":
    main()
