"""Predicted H100 time and memory of the TopK SAE constraint at Llama-3-8B shapes, without a GPU.

The ops run on fake tensors (FakeTensorMode): they allocate what they allocate on a GPU and take their
GPU code path (bf16 GEMMs with fp32 outputs, the Triton launches skipped), while
benchmarks.estimate_step.StepTracer counts live bytes and costs each op on the H100 roofline. Compared, as in
bench_sae_constraint --activation topk: the fused TopK op (fpo_kernels.sae_topk), the fused JumpReLU op on the
same weights, and the naive TopK path (full [N, m] encode, topk, scatter, pool; autograd for the backward).

Assumptions beyond StepTracer's (70% of dense bf16 peak for GEMMs, 85% of HBM bandwidth otherwise, 3 us per
kernel at least): torch.topk on rows of 65536-131072 fp32 values runs a radix select that reads each row
TOPK_PASSES times (4 passes of 8-bit digits plus the final gather), so its StepTracer cost (one read) is
multiplied by TOPK_PASSES. The naive path's compile is not estimated (fusion would remove some of its
[N, m] passes but not the GEMM's output or the topk).
Targets (issue): TopK pooling forward <= 2x the JumpReLU kernel; peak extra memory <= 1/50 of naive.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_sae_constraint import TOPK_K_GPU, TOPK_SHAPES_GPU, naive_topk_feature_mse
from benchmarks.common import environment, write_results
from benchmarks.step_tracer import H100_SXM, StepTracer
from fpo_kernels import SAEWeights, sae_feature_mse, sae_topk
from fpo_kernels._dispatch import on_fake_launch

TOPK_PASSES = 5


def _trace(fn, held):
    tr = StepTracer(H100_SXM)
    tr.hold(held)
    base = tr.now
    tr.timing = True
    with on_fake_launch(tr.triton_launch), tr, torch.no_grad():
        fn()
    seconds = sum(tr.seconds.values()) + (TOPK_PASSES - 1) * tr.by_op.get("topk", 0.0)
    return seconds * 1e3, (tr.peak - base) / 2**20


def estimate(shapes=TOPK_SHAPES_GPU, sae_ks=TOPK_K_GPU, k=50):
    """The pooling forward of each provider (the backward's per-sequence row sets are data-dependent, which
    fake tensors cannot follow): predicted ms and peak extra MiB."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    rows = []
    with FakeTensorMode():
        for label, d, m, B, T in shapes:
            dev, dt, N = "cpu", torch.bfloat16, B * T  # fake tensors take the GPU code path on any device
            W = torch.empty(m, d, device=dev).t()  # [d, m] as the SAE stores it transposed: no copy
            b, bd = torch.empty(m, device=dev), torch.empty(d, device=dev)
            jump = SAEWeights.from_tensors(W, b, torch.empty(m, device=dev), bd, True)
            mask = torch.ones(B, T, dtype=torch.bool, device=dev)
            ref_idx = torch.zeros(B, 256, dtype=torch.int32, device=dev)
            ref_val = torch.empty(B, 256, dtype=torch.float16, device=dev)
            ref_dense = torch.empty(B, m, device=dev)
            resp = torch.arange(N, device=dev)  # every token a response token
            seq, inv_n = resp // T, torch.full((B,), 1.0 / T, device=dev)
            Wd = jump.weight_as(dt)  # the bf16 copy every provider reads
            for sae_k in sae_ks:
                sae = SAEWeights.from_tensors(W, b, None, bd, True, topk=sae_k)
                sae._cast[dt] = Wd
                h = torch.empty(B, T, d, dtype=dt, device=dev)
                held = [h, mask, ref_idx, ref_val, ref_dense, W, b, bd, Wd, jump.threshold, jump.bias, resp, seq, inv_n]
                res = {
                    "fused": _trace(lambda: sae_topk.topk_pool_fwd(h.view(N, d), resp, seq, B, inv_n, sae), held),
                    "fused jumprelu": _trace(
                        lambda: sae_feature_mse(
                            h, jump, ref_idx, ref_val, mask=mask, k=k, select="policy", check_inputs=False
                        ),
                        held,
                    ),
                    "naive": _trace(
                        lambda: naive_topk_feature_mse(
                            h, mask, Wd.t(), b, bd.to(dt), sae_k, ref_dense, k, "policy", None
                        ),
                        held,
                    ),
                }
                f_ms, f_mb = res["fused"]
                for name, (ms, mb) in res.items():
                    rows.append(
                        {
                            "shape": label,
                            "d": d,
                            "m": m,
                            "tokens": N,
                            "sae_k": sae_k,
                            "mode": "forward",
                            "provider": name,
                            "predicted_ms": ms,
                            "peak_extra_mib": mb,
                            "time_vs_fused": ms / f_ms if name != "fused" else None,
                            "fused_mem_ratio": f_mb / mb if name != "fused" and mb else None,
                        }
                    )
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write <out>/estimate_sae_topk.{json,md}")
    args = ap.parse_args(argv)
    rows = estimate()
    env = dict(environment(), device=f"predicted for {H100_SXM['name']} (fake tensors on {environment()['device']})")
    notes = (
        "Predictions, not measurements (see the module docstring for the assumptions, topk read "
        f"{TOPK_PASSES}x). time_vs_fused = provider / fused TopK (for 'fused jumprelu', TopK <= 2x JumpReLU "
        "means >= 0.5); fused_mem_ratio = fused peak extra / provider peak extra (target <= 0.02 vs naive)."
    )
    write_results("estimate_sae_topk", rows, env, args.out, notes)
    return rows


if __name__ == "__main__":
    main()
