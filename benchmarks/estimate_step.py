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
import weakref
from collections import defaultdict
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

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
from fpo.precision import PRECISIONS, resolve_precision
from fpo_kernels._dispatch import on_fake_launch

# NVIDIA H100 SXM5 80GB datasheet: dense bf16 tensor-core FLOP/s, fp32 FLOP/s, HBM3 bandwidth.
H100_SXM = {"name": "NVIDIA H100 80GB HBM3 (SXM5)", "tensor_flops": 989e12, "fp32_flops": 67e12, "bandwidth": 3.35e12}
GEMM_EFFICIENCY = 0.70  # large bf16 cuBLAS GEMMs reach about 70% of the dense peak
BANDWIDTH_EFFICIENCY = 0.85
KERNEL_FLOOR_S = 3e-6  # the shortest a kernel takes, launch included
SAE_GROUP = _sae.SAE_POOL_FWD.configs[0][0]["GROUP"]  # row tiles per program group: the first config's
SAE_TRAFFIC = (
    "SAE pooling forward: the hidden rows are read once (a group's rows stay in L2 while its programs "
    f"walk the feature tiles) and W_enc once per group of {SAE_GROUP} row tiles of "
    f"{_sae.SAE_POOL_FWD.tiles['BT']} rows; partial sums [tiles, m] fp32 written and read once"
)
_SPARSE_WRITES = {"scatter_", "scatter_add_", "index_put_", "index_add_"}  # in place, at indices only
_WRITE_ONLY = {"zero_", "fill_"}  # in place: a write, not a read and a write
_FREE = {
    "empty",
    "empty_strided",
    "empty_like",
    "detach",
    "alias",
    "lift_fresh",
    "_local_scalar_dense",
    "set_",
    "new_empty",
    "new_empty_strided",
    "resize_",
    "sym_size",
    "sym_stride",
}


class StepTracer(TorchDispatchMode):
    """Live tensor bytes (now, peak) and a roofline time per phase, for every op dispatched inside it."""

    def __init__(self, spec=H100_SXM):
        super().__init__()
        self.spec = spec
        self.live = {}
        self.now = self.peak = 0
        self.seconds = defaultdict(float)
        self.by_op = defaultdict(float)
        self.flops = 0.0
        self.phase = "model"
        self.timing = False

    # ---- memory -----------------------------------------------------------------------------
    def hold(self, tensors):
        """Count tensors that exist before the step (weights, inputs, caches)."""
        for t in tensors:
            self._alloc(t)

    def _alloc(self, t):
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        n = st.nbytes()
        self.live[key] = (weakref.ref(st, partial(self._free, key)), n)
        self.now += n
        self.peak = max(self.peak, self.now)

    def _free(self, key, _ref):
        entry = self.live.pop(key, None)
        if entry is not None:
            self.now -= entry[1]

    # ---- time -------------------------------------------------------------------------------
    def cost(self, name, flops, nbytes, dtype):
        rate = self.spec["tensor_flops"] if dtype in (torch.bfloat16, torch.float16) else self.spec["fp32_flops"]
        t = max(
            flops / (rate * GEMM_EFFICIENCY), nbytes / (self.spec["bandwidth"] * BANDWIDTH_EFFICIENCY), KERNEL_FLOOR_S
        )
        if self.timing:
            self.seconds[self.phase] += t
            self.by_op[name] += t
            self.flops += flops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for t in outs:
            self._alloc(t)
        name = func._overloadpacket.__name__
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        # views and metadata ops move no data: outputs that alias an input, from an op that writes nothing
        aliases = {t.untyped_storage()._cdata for t in ins}
        moves_nothing = func.is_view or (
            not func._schema.is_mutable and outs and all(t.untyped_storage()._cdata in aliases for t in outs)
        )
        if func.namespace == "aten" and not moves_nothing and name not in _FREE:
            nbytes = sum(t.numel() * t.element_size() for t in ins + outs)
            if name in _SPARSE_WRITES:  # touches only the indexed elements: read index and source, write as many
                nbytes = 2 * sum(t.numel() * t.element_size() for t in ins[1:])
            elif name in _WRITE_ONLY:
                nbytes = sum(t.numel() * t.element_size() for t in outs)
            counter = flop_registry.get(func._overloadpacket)
            # mm/addmm with an fp32 output: the counters know the plain signature (no out_dtype, no out=)
            plain_args = args[:-1] if func._overloadname in ("dtype", "dtype_out") else args
            plain = {k: v for k, v in kwargs.items() if k not in ("out", "out_dtype")}
            flops = counter(*plain_args, **plain, out_val=out) if counter is not None else 0
            # the operands' precision sets the rate: a half-precision GEMM into an fp32 accumulator (addmm's
            # first input, or out_dtype) still runs on the tensor cores
            half = [t.dtype for t in ins if t.dtype in (torch.bfloat16, torch.float16)]
            self.cost(
                name,
                flops,
                nbytes,
                half[0] if half and counter is not None else (ins[0].dtype if ins else torch.float32),
            )
        return out

    def triton_launch(self, kernel, args, constexprs):
        """Cost of a Triton kernel skipped on fake tensors, from its arguments by name (the kernel's table)."""
        tensors = [a for a in args.values() if torch.is_tensor(a)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        flops, dtype = 0, tensors[0].dtype
        if kernel is _sae.SAE_POOL_FWD:
            (N, D), (n_tiles, F) = args["h"].shape, args["part"].shape  # flat rows; a partial sum per row tile
            flops = 2 * N * D * F  # every row costed as a response row (an upper bound: prompt tiles are skipped)
            w = args["w"]
            if F == w.shape[0]:  # dense: see SAE_TRAFFIC; gathered rows are few and stay in L2
                nbytes += (-(-n_tiles // SAE_GROUP) - 1) * w.numel() * w.element_size()
        elif kernel in (_sae.SAE_GATE, _sae.SAE_DH):
            N, K = args["g"].shape
            flops = 2 * N * args["w"].shape[1] * K  # the k pre-activations again, then dh
        self.cost(kernel.name, flops, nbytes, dtype)


@contextlib.contextmanager
def _phase(tracer, name, owners):
    """Attribute the ops of the named functions to a phase while they run."""
    saved = []

    def wrap(fn):
        def inner(*a, **k):
            prev, tracer.phase = tracer.phase, name
            try:
                return fn(*a, **k)
            finally:
                tracer.phase = prev

        return inner

    for owner, attr in owners:
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, wrap(getattr(owner, attr)))
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


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
                    stack.enter_context(_phase(tracer, name, owners))
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
