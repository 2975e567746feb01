"""Fused SAE feature constraint vs the naive PyTorch formulation, forward and forward+backward.

Providers: fused (fpo_kernels.sae_feature_mse), naive (full encode [N, m] in the model dtype, JumpReLU,
masked mean, top-k, gather, MSE, autograd: what the FPO authors' code does), naive under torch.compile,
and a bare torch.matmul [N, d] x [d, m] in bf16 as the floor of the policy-mode forward.

FLOPs and bytes, N tokens, d model width, m SAE width, k selected features:
    policy forward:    2 N d m FLOPs; reads N d + d m, writes B m (naive also writes and rereads N m fp32)
    reference forward: 2 N d k FLOPs (~m/k fewer)
    backward:          4 N d k FLOPs (recompute k pre-activations, multiply back), writes N d
Targets (H100): fwd+bwd >= 4x naive and >= 2x compiled naive; peak extra memory <= 1/50 of naive;
policy forward within 1.3x of the bare matmul; reference mode >= 50x faster than policy mode.

TopK SAEs (--activation topk, Llama-3-8B shapes: d 4096, m 65536 and 131072, the SAE's k 32, 64 and 192):
fused (fpo_kernels.sae_topk: chunked encode, torch.topk, pooled in place) against the naive TopK path (full
[N, m] encode, topk, scatter, pool: what sparsify and sae-lens' encode do before pooling), its compile, and
the fused JumpReLU op on the same weights. Targets: TopK pooling forward <= 2x the JumpReLU kernel at the
same shape; peak extra memory <= 1/50 of naive.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import CPU_NOTE, bench, environment, peak_extra_mb, timing, write_results
from fpo_kernels import SAEWeights, pack_topk, sae_feature_mse

SHAPES_GPU = [  # (label, d, m, sequences, tokens per sequence)
    ("gemma2-2b", 2304, 16384, 4, 1024),
    ("gemma2-2b", 2304, 16384, 8, 1024),
    ("gemma2-2b", 2304, 16384, 8, 4096),
    ("gemma2-9b", 3584, 16384, 8, 1024),
    ("gemma2-9b", 3584, 131072, 4, 1024),
]
SHAPES_CPU = [("cpu-small", 256, 2048, 2, 128)]
TOPK_SHAPES_GPU = [("llama3-8b", 4096, 65536, 4, 1024), ("llama3-8b", 4096, 131072, 4, 1024)]
TOPK_K_GPU, TOPK_K_CPU = (32, 64, 192), (32,)


def naive_sae_feature_mse(hidden, mask, W_enc, b_enc, threshold, ref_dense, k, select, ref_idx):
    """The unfused formulation: [N, m] features in memory, kept by autograd for the backward."""
    z = (hidden @ W_enc).float() + b_enc  # [B, T, m]
    f = torch.where(z > threshold, z, torch.zeros_like(z))
    m = mask.unsqueeze(-1).float()
    pooled = (f * m).sum(1) / m.sum(1)  # [B, m]
    idx = pooled.detach().topk(k, dim=1).indices if select == "policy" else ref_idx
    p = pooled.gather(1, idx)
    return ((p - ref_dense.gather(1, idx)) ** 2).mean(1)


def naive_topk_feature_mse(hidden, mask, W_enc, b_enc, b_dec, sae_k, ref_dense, k, select, ref_idx):
    """The unfused TopK formulation: [N, m] pre-activations, topk per token, scatter, masked mean, MSE."""
    z = ((hidden - b_dec) @ W_enc).float() + b_enc  # [B, T, m]
    vals, ids = z.topk(sae_k, dim=-1)
    f = torch.zeros_like(z).scatter(-1, ids, vals.clamp(min=0))
    m = mask.unsqueeze(-1).float()
    pooled = (f * m).sum(1) / m.sum(1)
    idx = pooled.detach().topk(k, dim=1).indices if select == "policy" else ref_idx
    p = pooled.gather(1, idx)
    return ((p - ref_dense.gather(1, idx)) ** 2).mean(1)


def _device_dtype(dtype):
    """CUDA in the given dtype when present; else the CPU in fp32 (the CPU has no fast half-precision GEMM)."""
    return ("cuda", dtype) if torch.cuda.is_available() else ("cpu", torch.float32)


def _measure(providers, hidden, modes, B, dev):
    """{mode: {provider: (ms, spread, peak extra MB)}}, each provider on its own copy of hidden."""
    out = {}
    for mode in modes:
        res = {}
        for name, fn in providers.items():
            h = hidden.clone().requires_grad_(mode == "full")
            g = torch.ones(B, device=dev)

            def step():
                if mode == "full":
                    h.grad = None
                    fn(h).backward(g)
                else:
                    with torch.no_grad():
                        fn(h)

            try:
                ms, spread = timing(step)
                mem = peak_extra_mb(step)
            except torch.OutOfMemoryError:
                ms, spread, mem = float("nan"), float("nan"), float("nan")
                torch.cuda.empty_cache()
            res[name] = (ms, spread, mem)
        out[mode] = res
    return out


def run_topk(shapes, sae_ks, k=50, dtype=torch.bfloat16, modes=("forward", "full"), compile_naive=True):
    """TopK SAEs: fused vs naive (and its compile) vs the fused JumpReLU op on the same weights."""
    dev, dtype = _device_dtype(dtype)
    rows = []
    for label, d, m, B, T in shapes:
        torch.manual_seed(0)
        W, b, bd = (
            torch.randn(d, m, device=dev) / d**0.5,
            torch.randn(m, device=dev) * 0.1,
            torch.randn(d, device=dev) * 0.1,
        )
        jump = SAEWeights.from_tensors(W, b, torch.rand(m, device=dev) * 0.3 + 0.1, bd, True)
        hidden = torch.randn(B, T, d, device=dev, dtype=dtype)
        mask = torch.ones(B, T, dtype=torch.bool, device=dev)  # equal work: every token a response token
        pooled = torch.rand(B, m, device=dev) * (torch.rand(B, m, device=dev) < 0.05)
        ref_idx, ref_val = pack_topk(pooled, 256)
        ref_dense = torch.zeros(B, m, device=dev).scatter_(1, ref_idx.long(), ref_val.float())
        Wd = jump.weight_as(dtype).t()
        naive_c = torch.compile(naive_topk_feature_mse) if compile_naive else None
        for sae_k in sae_ks:
            sae = SAEWeights.from_tensors(W, b, None, bd, True, topk=sae_k)
            select = "policy"
            providers = {
                "fused": lambda h: sae_feature_mse(
                    h, sae, ref_idx, ref_val, mask=mask, k=k, select=select, check_inputs=False
                ),
                "fused jumprelu": lambda h: sae_feature_mse(
                    h, jump, ref_idx, ref_val, mask=mask, k=k, select=select, check_inputs=False
                ),
                "naive": lambda h: naive_topk_feature_mse(
                    h, mask, Wd, b, bd.to(dtype), sae_k, ref_dense, k, select, None
                ),
            }
            if naive_c is not None:
                providers["naive+compile"] = lambda h: naive_c(
                    h, mask, Wd, b, bd.to(dtype), sae_k, ref_dense, k, select, None
                )
            for mode, res in _measure(providers, hidden, modes, B, dev).items():
                f_ms, _, f_mem = res["fused"]
                for name, (ms, spread, mem) in res.items():
                    rows.append(
                        {
                            "shape": label,
                            "d": d,
                            "m": m,
                            "tokens": B * T,
                            "sae_k": sae_k,
                            "mode": mode,
                            "provider": name,
                            "ms": ms,
                            "spread": spread,
                            "peak_extra_mb": mem,
                            "time_vs_fused": ms / f_ms if name != "fused" else None,
                            "fused_mem_ratio": (f_mem / mem)
                            if (mem and f_mem is not None and name != "fused")
                            else None,
                        }
                    )
    return rows


def run(shapes, k=50, dtype=torch.bfloat16, modes=("forward", "full"), compile_naive=True):
    dev, dtype = _device_dtype(dtype)
    rows = []
    for label, d, m, B, T in shapes:
        torch.manual_seed(0)
        sae = SAEWeights.from_tensors(
            torch.randn(d, m, device=dev) / d**0.5,
            torch.randn(m, device=dev) * 0.1,
            torch.rand(m, device=dev) * 0.3 + 0.1,
            torch.randn(d, device=dev) * 0.1,
            False,
        )
        W = sae.weight_as(dtype).t()
        hidden = torch.randn(B, T, d, device=dev, dtype=dtype)
        mask = torch.ones(B, T, dtype=torch.bool, device=dev)  # equal work: every token a response token
        prompted = mask.clone()
        prompted[:, : T // 4] = False  # a quarter prompt: tiles the fused kernel skips
        pooled = torch.rand(B, m, device=dev) * (torch.rand(B, m, device=dev) < 0.05)
        ref_idx, ref_val = pack_topk(pooled, 256)
        ref_dense = torch.zeros(B, m, device=dev).scatter_(1, ref_idx.long(), ref_val.float())
        N = B * T
        naive_c = torch.compile(naive_sae_feature_mse) if compile_naive else None
        mm_ms = bench(lambda: hidden.view(N, d) @ W)
        for select in ("policy", "reference"):
            providers = {
                "fused": lambda h: sae_feature_mse(
                    h, sae, ref_idx, ref_val, mask=mask, k=k, select=select, check_inputs=False
                ),
                "fused, 25% prompt": lambda h: sae_feature_mse(
                    h, sae, ref_idx, ref_val, mask=prompted, k=k, select=select, check_inputs=False
                ),
                "naive": lambda h: naive_sae_feature_mse(
                    h, mask, W, sae.bias, sae.threshold, ref_dense, k, select, ref_idx[:, :k].long()
                ),
            }
            if naive_c is not None:
                providers["naive+compile"] = lambda h: naive_c(
                    h, mask, W, sae.bias, sae.threshold, ref_dense, k, select, ref_idx[:, :k].long()
                )
            for mode, res in _measure(providers, hidden, modes, B, dev).items():
                flops = 2 * N * d * (m if select == "policy" else k) + (4 * N * d * k if mode == "full" else 0)
                f_ms, _, f_mem = res["fused"]
                for name, (ms, spread, mem) in res.items():
                    rows.append(
                        {
                            "shape": label,
                            "d": d,
                            "m": m,
                            "tokens": N,
                            "select": select,
                            "mode": mode,
                            "provider": name,
                            "ms": ms,
                            "spread": spread,
                            "peak_extra_mb": mem,
                            "tflops": flops / ms / 1e9
                            if ms == ms and "prompt" not in name
                            else None,  # equal-work rows
                            "time_vs_fused": ms / f_ms if name != "fused" else None,
                            "fused_mem_ratio": (f_mem / mem)
                            if (mem and f_mem is not None and name != "fused")
                            else None,
                            "vs_bare_matmul": ms / mm_ms if name == "fused" else None,
                        }
                    )
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write <out>/bench_sae_constraint.{json,md}")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--quick", action="store_true", help="first two GPU shapes only")
    ap.add_argument(
        "--activation",
        choices=["jumprelu", "topk", "all"],
        default="jumprelu",
        help="jumprelu: Gemma-2 shapes; topk: TopK SAEs at Llama-3-8B shapes (bench_sae_topk.{json,md})",
    )
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    topk_rows = []
    if args.activation in ("topk", "all"):
        shapes = (TOPK_SHAPES_GPU[:1] if args.quick else TOPK_SHAPES_GPU) if gpu else SHAPES_CPU
        topk_rows = run_topk(
            shapes, TOPK_K_GPU if gpu else TOPK_K_CPU, k=args.k, compile_naive=not args.no_compile and gpu
        )
        notes = (
            "Equal work: every token a response token. time_vs_fused = provider ms / fused TopK ms (for "
            "'fused jumprelu', the target's inverse: TopK <= 2x JumpReLU means time_vs_fused >= 0.5); "
            "fused_mem_ratio = fused peak extra / provider peak extra (target <= 1/50 against naive)."
        )
        write_results("bench_sae_topk", topk_rows, environment(), args.out, notes + ("" if gpu else CPU_NOTE))
        if args.activation == "topk":
            return topk_rows
    shapes = (SHAPES_GPU[:2] if args.quick else SHAPES_GPU) if gpu else SHAPES_CPU
    rows = run(shapes, k=args.k, compile_naive=not args.no_compile and gpu)
    notes = (
        "Equal work: every token is a response token for every provider; 'fused, 25% prompt' is the fused op "
        "with a quarter of each sequence as prompt, whose tiles it skips (the gain of skipping, reported apart). "
        "time_vs_fused = provider ms / fused ms; fused_mem_ratio = fused peak extra / provider peak extra; "
        "vs_bare_matmul = fused ms / bf16 torch.matmul of [N, d] x [d, m]; spread = (p80 - p20) / median."
    )
    if not gpu:
        notes += CPU_NOTE
    write_results("bench_sae_constraint", rows, environment(), args.out, notes)
    return topk_rows + rows


if __name__ == "__main__":
    main()
