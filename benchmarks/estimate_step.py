"""Predicted peak memory and step time of bench_step's methods on an H100, worked out on the CPU.

Each method's training step runs on fake tensors (torch FakeTensorMode): real shapes, dtypes and
allocations, no values, no GPU. The fused ops take their GPU path with the Triton launches skipped
(fpo_kernels reports each skipped launch), so every allocation the GPU would make is made here too.

Peak memory: the peak of live tensor storage over two steps (Adam's states appear in the first), counted
from the parameters, inputs and caches already resident, as torch.cuda.max_memory_allocated counts it
(less the caching allocator's rounding to 512-byte blocks and the cuBLAS workspace).

Step time: a roofline sum over the second step's operations. Each op costs
    max(FLOPs / attainable FLOP/s, bytes read and written / attainable bandwidth, a per-kernel floor),
with bf16/fp16 matmuls on the tensor cores and fp32 ones on the CUDA cores (PyTorch leaves TF32 off).
The skipped Triton kernels are costed from their arguments: the SAE pooling kernel as a tiled GEMM whose
grouped program order reads the hidden rows once and W_enc once per group of row tiles (SAE_TRAFFIC, L2
holding one group's slices), select="reference" from its gathered k columns over every row tile, the
backward's two passes from their k gathered features, the log-prob row kernels from their fp32 logits
chunk (read) and dL/dlogits (written). Not modelled: CPU launch overhead beyond the floor (a step of this
size keeps the GPU fed), L2 reuse elsewhere, attention kernels' own efficiency (costed from their FLOPs and
bytes like any op).

A prediction, not a measurement: bench_step.py on an H100 measures; this says what to expect and why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch

import fpo.step
import fpo_kernels.kl as _kl
import fpo_kernels.logprobs as _lp
import fpo_kernels.sae_constraint as _sae
from benchmarks.bench_step import (
    METHODS,
    NEEDS_REF,
    OTHER_POLICIES,
    PRESETS,
    Step,
    make_optimizer,
    method_ratios,
    other_policies,
    policy_plan,
)
from benchmarks.common import environment
from benchmarks.step_tracer import (
    BANDWIDTH_EFFICIENCY,
    GEMM_EFFICIENCY,
    H100_SXM,
    KERNEL_FLOOR_S,
    SAE_TRAFFIC,
    StepTracer,
    phase,
)
from fpo.precision import PRECISIONS, resolve_precision
from fpo_kernels._dispatch import on_fake_launch


def _resident(bench):
    """Every tensor alive before a step: weights and buffers of both models, inputs, the cache, the SAE."""
    out = []
    for model in (bench.policy, bench.ref):
        if model is not None:
            out += list(model.parameters()) + list(model.buffers())
    out += [bench.ids, bench.attn, bench.resp] + [v for v in vars(bench.batch).values() if torch.is_tensor(v)]
    out += list(bench.cache.values()) + [bench.ref_idx, bench.ref_val]
    sae = bench.sae
    out += [t for t in (sae.W_enc_t, sae.b_enc, sae.threshold, sae.b_dec, sae.bias) if t is not None]
    return out


def estimate(
    preset="gemma2-2b",
    pairs=2,
    seq_len=1024,
    methods=METHODS,
    grad_ckpt=False,
    spec=H100_SXM,
    precision="bf16-mixed",
    others=OTHER_POLICIES,
    log=print,
):
    """Every method under `precision` (a GPU run's policy), then the `others` rows (policy -> methods) as
    method@policy. The fake tensors live on the CPU: the policy's autocast is the CPU's, whose bf16 op lists
    match CUDA's for what a step runs (matmuls in bf16, reductions and norms in fp32)."""
    main = resolve_precision(precision, "cuda")
    rows = []
    for prec, names in policy_plan(main, methods, others, "cuda"):
        n_params = _estimate_policy(preset, pairs, seq_len, names, grad_ckpt, spec, prec, prec is not main, rows, log)
    return rows, *_summary(rows, preset, pairs, seq_len, n_params, grad_ckpt, spec, main)


def _estimate_policy(preset, pairs, seq_len, methods, grad_ckpt, spec, precision, label, rows, log):
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        bench = Step(preset, pairs, seq_len, "cpu", precision, grad_ckpt=grad_ckpt)
        n_params = sum(p.numel() for p in bench.policy.parameters())
        for method in methods:
            if method in NEEDS_REF:
                bench.load_reference()
            else:
                bench.ref = None
            bench.sae._cast.clear()  # the bf16 copy of W_enc is made inside the step it serves
            tracer = StepTracer(spec)
            opt = make_optimizer(bench.policy, precision, "cpu")
            phases = [
                ("sae", [(fpo.step, "sae_feature_mse"), (_sae, "sae_constraint_bwd"), (Step, "_naive_pooled")]),
                ("lm head", [(_lp, "logprobs_fwd"), (_lp, "logprobs_bwd"), (_kl, "kl_fwd"), (_kl, "kl_bwd")]),
                ("optimizer", [(opt, "step")]),
            ]
            with contextlib.ExitStack() as stack:
                for name, owners in phases:
                    stack.enter_context(phase(tracer, name, owners))
                stack.enter_context(on_fake_launch(tracer.triton_launch))
                tracer.hold(_resident(bench))
                with tracer:
                    for i in range(2):
                        tracer.timing = i == 1
                        bench.loss(method).backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
            bench.release_fpo()
            del opt
            ms = sum(tracer.seconds.values()) * 1e3
            name = f"{method}@{precision.name}" if label else method
            row = {
                "method": name,
                "precision": precision.name,
                "bytes_per_param": precision.bytes_per_parameter("adam"),
                "step_ms_estimate": ms,
                "peak_gb_estimate": tracer.peak / 2**30,
                "tflop": tracer.flops / 1e12,
                "phases_ms": {k: v * 1e3 for k, v in sorted(tracer.seconds.items())},
                "top_ops_ms": {k: v * 1e3 for k, v in sorted(tracer.by_op.items(), key=lambda kv: -kv[1])[:12]},
            }
            rows.append(row)
            log(
                f"[estimate_step] {name}: {ms:.1f} ms, peak {row['peak_gb_estimate']:.2f} GiB, {row['tflop']:.1f} TFLOP"
            )
    return n_params


def _summary(rows, preset, pairs, seq_len, n_params, grad_ckpt, spec, precision):
    by = {r["method"]: r for r in rows}
    ratios = method_ratios(rows, ("peak_gb_estimate", "step_ms_estimate"))
    for m in ("fpo", "fpo-ref"):
        if m in by:
            ratios[f"{m} sae share of step"] = by[m]["phases_ms"].get("sae", 0.0) / by[m]["step_ms_estimate"]
    info = {
        "preset": preset,
        "pairs": pairs,
        "seq_len": seq_len,
        "params": n_params,
        "tokens": 2 * pairs * seq_len,
        "gradient_checkpointing": grad_ckpt,
        "precision": precision.name,
        "device_model": spec,
        "gemm_efficiency": GEMM_EFFICIENCY,
        "bandwidth_efficiency": BANDWIDTH_EFFICIENCY,
        "kernel_floor_s": KERNEL_FLOOR_S,
        "sae_traffic": SAE_TRAFFIC,
    }
    return ratios, info


def epoch_prediction(rows, info, dataset, log=print):
    """Predicted hours per epoch of a real dataset, per method and layout: each method's predicted step time per
    body token times the tokens an epoch sends through the body in each layout (benchmarks.bench_packing at
    the estimate's pairs per micro-batch and max_length = seq_len, the demo tokenizer standing in for the
    preset's). Assumes step time linear in tokens: attention's N^2 share is not rescaled."""
    from benchmarks.bench_packing import epoch_tokens
    from fpo import assets
    from fpo.model import load_tokenizer
    from fpo.packing import LAYOUTS
    from fpo.pairs import load_pairs, tokenize_pairs

    tok = load_tokenizer(assets.ensure_demo_model())
    L = info["seq_len"]
    items = tokenize_pairs(load_pairs(dataset, bad_rows="skip", log=log), tok, L, L // 2)
    tokens = {lay: epoch_tokens(items, lay, info["pairs"])[0] for lay in LAYOUTS}
    out = {"dataset": os.path.basename(dataset), "pairs": len(items), "epoch_tokens": tokens, "hours": {}}
    for r in rows:
        per_token_s = r["step_ms_estimate"] / 1e3 / info["tokens"]
        out["hours"][r["method"]] = {lay: per_token_s * n / 3600 for lay, n in tokens.items()}
    return out


def format_markdown(rows, ratios, info):
    lines = [
        f"Predicted on the CPU (fake tensors + roofline) for {info['device_model']['name']}: "
        f"{info['preset']}, {info['pairs']} pairs x {info['seq_len']} tokens, precision {info['precision']} "
        "(rows named method@policy: under that policy instead)"
        + (", gradient checkpointing." if info["gradient_checkpointing"] else "."),
        "",
        "| method | B/param (weights, grads, optimizer) | peak GiB (est.) | step ms (est.) | TFLOP | sae ms "
        "| lm head ms | optimizer ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["phases_ms"]
        lines.append(
            f"| {r['method']} | {r['bytes_per_param']} | {r['peak_gb_estimate']:.2f} | {r['step_ms_estimate']:.1f} | "
            f"{r['tflop']:.1f} | {p.get('sae', 0):.2f} | {p.get('lm head', 0):.2f} | {p.get('optimizer', 0):.2f} |"
        )
    lines += ["", "Ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items())]
    ep = info.get("epoch")
    if ep:
        lays = list(ep["epoch_tokens"])
        lines += [
            "",
            f"One epoch of {ep['dataset']} ({ep['pairs']} pairs, {info['pairs']} pairs per micro-batch): "
            "predicted hours per layout (step time scaled by the tokens through the body: "
            + ", ".join(f"{lay} {ep['epoch_tokens'][lay]}" for lay in lays)
            + ").",
            "",
            "| method | " + " | ".join(lays) + " |",
            "|---|" + "---:|" * len(lays),
        ]
        for m, h in ep["hours"].items():
            lines.append(f"| {m} | " + " | ".join(f"{h[lay]:.3f}" for lay in lays) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="gemma2-2b")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument(
        "--precision",
        default="bf16-mixed",
        choices=[p for p in PRECISIONS if p != "auto"],
        help="the policy every method runs under (a GPU run's default: bf16-mixed)",
    )
    ap.add_argument("--no-other-policies", action="store_true", help="skip the rows repeated under other policies")
    ap.add_argument(
        "--dataset", default=None, help="also predict one epoch of this dataset (.jsonl of pairs) per packing layout"
    )
    ap.add_argument("--out", default=None, help="write estimate_step_<preset>_<pairs>x<seq>.{json,md} here")
    args = ap.parse_args(argv)
    rows, ratios, info = estimate(
        args.preset,
        args.pairs,
        args.seq_len,
        [m.strip() for m in args.methods.split(",")],
        args.gradient_checkpointing,
        precision=args.precision,
        others=None if args.no_other_policies else other_policies(),
    )
    if args.dataset:
        info["epoch"] = epoch_prediction(rows, info, args.dataset)
    md = format_markdown(rows, ratios, info)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        ckpt = "_ckpt" if args.gradient_checkpointing else ""
        name = os.path.join(args.out, f"estimate_step_{args.preset}_{args.pairs}x{args.seq_len}{ckpt}")
        with open(name + ".json", "w") as f:
            json.dump({"environment": environment(), "info": info, "rows": rows, "ratios": ratios}, f, indent=1)
        with open(name + ".md", "w") as f:
            f.write(md + "\n")
    return rows, ratios, info


if __name__ == "__main__":
    main()
