"""The fused lm head beside the peers' fused heads: forward + backward of sum over tokens of -log p(label), time
and peak memory, at the head shapes of Gemma-2-2B and Llama-3-8B.

Providers, each the peer's own code, imported without its trainer's heavy dependencies:
    ours     fpo_kernels.fused_linear_logprobs
    trl      trl.kernels.chunked_logprob.ChunkedLogProbFunction (TRL 1.16's DPO log-prob head; torch tiles where
             Triton cannot run)
    liger    liger_kernel.ops.fused_linear_cross_entropy.LigerFusedLinearCrossEntropyFunction, reduction "sum"
    cce      cut_cross_entropy.linear_cross_entropy (Apple's Cut Cross-Entropy), reduction "sum", its default
             gradient filter (filter_eps "high")
    naive    the [N, V] logits materialised, log_softmax, gather: the baseline every ratio is against
Every provider first computes a small shape in float32 and is checked against float64 values (the loss and the
gradients of hidden and the head); a provider that cannot run here (no CUDA for a Triton-only peer, not
installed) is listed with the reason. Equal work: every provider computes the same sum over the same tokens,
forward and backward, with no softcap.

`python -m benchmarks.bench_heads` (CUDA: the full shapes; CPU: the check and a tiny timing smoke run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import environment, write_results

SHAPES = {"gemma2-2b": (2304, 256000), "llama3-8b": (4096, 128256)}
PROVIDERS = ("ours", "trl", "liger", "cce", "naive")


def _loss_fn(name):
    """A function (hidden [N, d], weight [V, d], labels [N]) -> the scalar sum of -log p(label), or raise."""
    if name == "ours":
        from fpo_kernels import fused_linear_logprobs

        return lambda h, w, y: -fused_linear_logprobs(h, w, y).sum()
    if name == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        return lambda h, w, y: -ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 4096, None, 1.0, ())[0].sum()
    if name == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        return lambda h, w, y: LigerFusedLinearCrossEntropyFunction.apply(h, w, y, None, None, -100, 0.0, 0.0, "sum")[0]
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(h, w, y, reduction="sum")
    if name == "naive":
        return lambda h, w, y: -torch.log_softmax((h @ w.t()).float(), -1).gather(1, y[:, None]).sum()
    raise ValueError(f"provider must be one of {PROVIDERS}, got {name!r}")


def check(name, device, N=96, d=48, V=1000, seed=0) -> dict:
    """The provider on a small float32 shape against float64 values: relative errors of the loss and gradients."""
    g = torch.Generator().manual_seed(seed)
    h64 = torch.randn(N, d, generator=g, dtype=torch.float64)
    w64 = torch.randn(V, d, generator=g, dtype=torch.float64) / d**0.5
    y = torch.randint(0, V, (N,), generator=g)
    h, w = (t.clone().requires_grad_() for t in (h64, w64))
    want = -torch.log_softmax(h @ w.t(), -1).gather(1, y[:, None]).sum()
    want.backward()
    fn = _loss_fn(name)
    hf, wf = (t.detach().float().to(device).requires_grad_() for t in (h64, w64))
    got = fn(hf, wf, y.to(device))
    got.backward()
    rel = lambda a, b: float((a.double().cpu() - b).norm() / b.norm().clamp(min=1e-30))  # noqa: E731
    out = {
        "loss_rel_err": abs(got.item() - want.item()) / abs(want.item()),
        "grad_hidden_rel_err": rel(hf.grad, h.grad),
        "grad_weight_rel_err": rel(wf.grad, w.grad),
    }
    out["ok"] = max(out.values()) < 1e-3
    return out


def time_one(name, device, N, d, V, dtype, steps=5, warmup=2) -> dict:
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(N, d, generator=g) / 4).to(device, dtype).requires_grad_()
    w = (torch.randn(V, d, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).to(device)
    fn = _loss_fn(name)
    cuda = device == "cuda"
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    try:
        for _ in range(warmup + steps):
            h.grad = w.grad = None
            t = time.perf_counter()
            fn(h, w, y).backward()
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
    except torch.OutOfMemoryError:
        return {"ms": None, "peak_gb": None, "note": "out of memory"}
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    return {"ms": statistics.median(times[warmup:]), "peak_gb": peak}


def run(providers=PROVIDERS, shapes=tuple(SHAPES), tokens=None, dtype="bf16", log=print) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype if device == "cuda" else "fp32"]
    tokens = tokens or (8192 if device == "cuda" else 64)
    rows = []
    for shape in shapes:
        d, V = SHAPES[shape]
        if device == "cpu":  # the harness at a size the CPU runs in seconds
            d, V = 64, 2048
        naive_ms = naive_gb = None
        for name in sorted(providers, key=lambda p: p != "naive"):  # the baseline first
            row = {"shape": shape, "provider": name, "tokens": tokens, "d": d, "vocab": V, "dtype": str(dt)[6:]}
            try:
                row.update(check(name, device))
            except Exception as e:  # not installed, or a Triton-only peer without CUDA: say which
                row.update(ok=None, note=f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                rows.append(row)
                log(f"[bench_heads] {shape} {name}: {row['note']}")
                continue
            row.update(time_one(name, device, tokens, d, V, dt))
            if name == "naive":
                naive_ms, naive_gb = row["ms"], row["peak_gb"]
            row["time_vs_naive"] = row["ms"] / naive_ms if row.get("ms") and naive_ms else None
            row["memory_vs_naive"] = row["peak_gb"] / naive_gb if row.get("peak_gb") and naive_gb else None
            rows.append(row)
            log(f"[bench_heads] {shape} {name}: {row.get('ms')} ms, check ok {row['ok']}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", type=int, default=None, help="tokens per call (default 8192 on CUDA, 64 on the CPU)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = run(args.providers.split(","), args.shapes.split(","), args.tokens, args.dtype)
    notes = (
        "ms: median forward + backward of sum(-log p(label)) over the tokens; peak_gb: CUDA memory above the inputs. "
        "*_rel_err: against float64 on a 96 x 48 x 1000 float32 problem. cce runs its default gradient filter."
    )
    if not torch.cuda.is_available():
        notes += " CPU: the correctness check and a smoke run of the harness at a tiny size, not a measurement."
    write_results("bench_heads", rows, environment(), args.out, notes)


if __name__ == "__main__":
    main()
