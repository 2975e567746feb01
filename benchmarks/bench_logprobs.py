"""Fused linear log-probs and KL vs materialised logits, forward and forward+backward.

Providers, log-probs: fused (fpo_kernels.fused_linear_logprobs), naive (logits = h @ W.T, .float(),
softcap, log_softmax, gather: what TRL does), liger (LigerFusedLinearCrossEntropyLoss with reduction
"none", when liger-kernel is installed; no softcap). KL: fused (fpo_kernels.fused_linear_kl) vs the TDPO
authors' formulation (softmax of both models' logits, .log(), the product, summed). TDPO's three terms
(policy and reference log-probs, KL): fused_linear_logprobs_kl in one pass vs the separate ops. The whole
SimPO loss module (2 pairs, a quarter of each row prompt): fpo_kernels.FusedLinearSimPOLoss vs Liger's
LigerFusedLinearSimPOLoss (when installed; heads without softcap, as Liger has none).

FLOPs: 2 N d V per logits GEMM; the fused backward recomputes the chunk's logits (one GEMM more than naive).
Bytes: naive holds [N, V] logits in the model dtype plus fp32 copies (8.4 GB per copy at N 8192, V 256000).
Targets (H100, 8k tokens): peak extra memory <= 1/8 of naive; fwd+bwd within 1.2x of naive; KL <= 1/8 naive memory.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import CPU_NOTE, environment, peak_extra_mb, timing, write_results
from fpo_kernels import FusedLinearSimPOLoss, fused_linear_kl, fused_linear_logprobs, fused_linear_logprobs_kl

HEADS_GPU = [("gemma2-2b", 2304, 256000, 30.0), ("llama3", 4096, 128256, None)]
TOKENS_GPU = [2048, 8192, 32768]
HEADS_CPU = [("cpu-small", 128, 4000, 30.0)]
TOKENS_CPU = [256]


def naive_logprobs(h, W, labels, softcap):
    z = (h @ W.t()).float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return torch.log_softmax(z, -1).gather(1, labels[:, None]).squeeze(1)


def naive_kl_tdpo(h, W, rh, rW, softcap):
    """As the TDPO authors compute it: softmax of both, .log(), product, sum over the vocabulary."""
    z, zr = (h @ W.t()).float(), (rh @ rW.t()).float()
    if softcap:
        z, zr = softcap * torch.tanh(z / softcap), softcap * torch.tanh(zr / softcap)
    p, q = z.softmax(-1), zr.softmax(-1)
    return (q * (q.log() - p.log())).sum(-1)


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="none")
    except Exception:
        return None


def _liger_simpo():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss

        return LigerFusedLinearSimPOLoss(
            beta=2.0, gamma=0.5, compute_nll_loss=False, compiled=torch.cuda.is_available()
        )  # its torch.compile is for the GPU
    except Exception:
        return None


def _as_pairs(h, labels, P=2):
    """[N, d] tokens as P pairs [2P, T, d] with shifted labels, the first quarter of each row a prompt."""
    T = h.shape[0] // (2 * P)
    target = labels[: 2 * P * T].reshape(2 * P, T).clone()
    target[:, : T // 4] = -100
    return h[: 2 * P * T].reshape(2 * P, T, -1), target


def run(heads, tokens, dtype=torch.bfloat16):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        dtype = torch.float32
    liger, liger_simpo = _liger(), _liger_simpo()
    rows = []
    for label, d, V, cap in heads:
        torch.manual_seed(0)
        W = (torch.randn(V, d, device=dev) * d**-0.5).to(dtype).requires_grad_()
        rW = W.detach().clone()
        for N in tokens:
            h0 = torch.randn(N, d, device=dev, dtype=dtype)
            rh = h0 + 0.1 * torch.randn_like(h0)
            labels = torch.randint(0, V, (N,), device=dev)
            g = torch.randn(N, device=dev)
            providers = {
                "logprobs/fused": lambda h: fused_linear_logprobs(h, W, labels, softcap=cap, check_inputs=False),
                "logprobs/naive": lambda h: naive_logprobs(h, W, labels, cap),
                "kl/fused": lambda h: fused_linear_kl(
                    h, W, rh, rW, torch.ones(N, dtype=torch.bool, device=dev), softcap=cap
                ),
                "kl/naive-tdpo": lambda h: naive_kl_tdpo(h, W, rh, rW, cap),
                # TDPO's three terms: one pass (logprobs_kl) against the log-prob op twice plus the KL op
                "tdpo-terms/fused": lambda h: _sum_terms(
                    fused_linear_logprobs_kl(h, W, labels, rh, rW, cap, check_inputs=False)
                ),
                "tdpo-terms/separate": lambda h: _sum_terms(
                    (
                        fused_linear_logprobs(h, W, labels, softcap=cap, check_inputs=False),
                        fused_linear_logprobs(rh, rW, labels, softcap=cap, check_inputs=False),
                        fused_linear_kl(h, W, rh, rW, torch.ones(N, dtype=torch.bool, device=dev), softcap=cap),
                    )
                ),
            }
            if liger is not None and cap is None:
                providers["logprobs/liger"] = lambda h: -liger(W, h, labels)
            if liger_simpo is not None and cap is None:  # the whole SimPO loss module, ours against Liger's
                ours = FusedLinearSimPOLoss(beta=2.0, gamma=0.5, compute_nll_loss=False)
                providers["simpo-loss/fused"] = lambda h: ours(W, *_as_pairs(h, labels))[0].expand(N) / N
                providers["simpo-loss/liger"] = lambda h: liger_simpo(W, *_as_pairs(h, labels))[0].expand(N) / N
            for mode in ("forward", "full"):
                res = {}
                for name, fn in providers.items():
                    h = h0.clone().requires_grad_(mode == "full")

                    def step():
                        if mode == "full":
                            h.grad, W.grad = None, None
                            fn(h).backward(g)
                        else:
                            with torch.no_grad():
                                fn(h)

                    try:
                        res[name] = (*timing(step), peak_extra_mb(step))
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        res[name] = (float("nan"), float("nan"), float("nan"))
                for name, (ms, spread, mem) in res.items():
                    kind = name.split("/")[0]
                    f_ms, _, f_mem = res[f"{kind}/fused"]
                    gemms = {"kl": 2, "tdpo-terms": 2}.get(kind, 1) * (1 if mode == "forward" else 3)  # at the minimum
                    rows.append(
                        {
                            "head": label,
                            "d": d,
                            "V": V,
                            "softcap": cap,
                            "tokens": N,
                            "mode": mode,
                            "provider": name,
                            "ms": ms,
                            "spread": spread,
                            "tflops": 2 * N * d * V * gemms / ms / 1e9 if ms == ms else None,
                            "peak_extra_mb": mem,
                            "time_vs_fused": ms / f_ms if not name.endswith("fused") else None,
                            "fused_mem_ratio": f_mem / mem
                            if (mem and f_mem is not None and not name.endswith("fused"))
                            else None,
                        }
                    )
    return rows


def _sum_terms(terms):
    """logp + ref_logp + kl per token: one tensor to time forward and backward through."""
    return terms[0] + terms[1] + terms[2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    rows = run(HEADS_GPU if gpu else HEADS_CPU, args.tokens or (TOKENS_GPU if gpu else TOKENS_CPU))
    notes = (
        "time_vs_fused = provider ms / fused ms; fused_mem_ratio = fused peak extra / provider peak extra; "
        "spread = (p80 - p20) / median."
    )
    if not gpu:
        notes += CPU_NOTE
    write_results("bench_logprobs", rows, environment(), args.out, notes)
    return rows


if __name__ == "__main__":
    main()
