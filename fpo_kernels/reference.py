"""Plain-PyTorch implementations of every op: the test oracle, a benchmark provider and the CPU fallback.

Each computes in float32 (float64 when given float64 inputs) and is differentiable by autograd.
They materialise what the fused kernels avoid ([B, T, m] features, [N, V] logits): that is their job.
"""

from __future__ import annotations

import torch

__all__ = [
    "jumprelu_ref",
    "sae_encode_ref",
    "sae_pooled_features_ref",
    "sae_feature_mse_ref",
    "sae_pooled_features_spans_ref",
    "sae_feature_mse_spans_ref",
    "fused_linear_logprobs_ref",
    "fused_linear_kl_ref",
    "fused_linear_logprobs_kl_ref",
    "pack_topk_ref",
    "protected_features_ref",
    "protected_preactivations_ref",
]


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def jumprelu_ref(z: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """z where z > threshold, else 0; NaN stays NaN (a NaN must never become a finite answer)."""
    return torch.where((z > threshold) | torch.isnan(z), z, torch.zeros_like(z))


def sae_encode_ref(hidden: torch.Tensor, sae) -> torch.Tensor:
    """[..., d] -> [..., m] SAE features: JumpReLU (ReLU and BatchTopK are JumpReLUs), or TopK: ReLU of each
    token's k largest pre-activations (torch.topk), 0 elsewhere."""
    dt = _acc_dtype(hidden)
    x = hidden.to(dt)
    if sae.apply_b_dec_to_input:
        x = x - sae.b_dec.to(dt)
    z = x @ sae.W_enc_t.to(dt).t() + sae.b_enc.to(dt)
    if getattr(sae, "activation", "jumprelu") == "topk":
        vals, ids = torch.topk(z, sae.k, dim=-1)
        return torch.zeros_like(z).scatter(-1, ids, vals.clamp(min=0))
    return jumprelu_ref(z, sae.threshold.to(dt))


def sae_pooled_features_ref(hidden: torch.Tensor, mask: torch.Tensor, sae) -> torch.Tensor:
    """[B, T, d], [B, T] -> [B, m]: masked mean over response tokens of the JumpReLU features."""
    f = sae_encode_ref(hidden, sae)  # [B, T, m]
    keep = mask.bool().unsqueeze(-1)
    n = mask.bool().sum(1, keepdim=True).to(f.dtype)
    return torch.where(keep, f, torch.zeros_like(f)).sum(1) / n


def _dense_reference(ref_indices, ref_values, width, dtype):
    """[S, K] sparse (index, value) with -1 for empty slots -> [S, m] dense, 0 where absent; a row holding an
    index outside [-1, width) is all NaN. Written as (row, column) puts, apart from the fast path's scatter."""
    S, K = ref_indices.shape
    idx = ref_indices.long()
    valid = (idx >= 0) & (idx < width)
    rows = torch.arange(S, device=idx.device)[:, None].expand(S, K)
    dense = torch.zeros(S, width, dtype=dtype, device=ref_values.device)
    dense.index_put_(
        (rows.reshape(-1), torch.where(valid, idx, 0).reshape(-1)),
        (ref_values.to(dtype) * valid).reshape(-1),
        accumulate=True,
    )
    broken = (~valid & (idx != -1)).any(1, keepdim=True)
    return dense.masked_fill(broken, float("nan"))


def _span_rows(spans: torch.Tensor):
    """[S, 2] (start, end) -> (rows [n], seq [n]): every row of every span, and its span."""
    pairs = [(r, s) for s, (lo, hi) in enumerate(spans.tolist()) for r in range(lo, hi)]
    rows = torch.tensor([r for r, _ in pairs], dtype=torch.long, device=spans.device)
    seq = torch.tensor([s for _, s in pairs], dtype=torch.long, device=spans.device)
    return rows, seq


def sae_pooled_features_spans_ref(hidden: torch.Tensor, spans: torch.Tensor, sae) -> torch.Tensor:
    """[N, d], [S, 2] -> [S, m]: mean over each span's rows of the JumpReLU features."""
    rows, seq = _span_rows(spans)
    f = sae_encode_ref(hidden[rows], sae)  # [n, m]: only the response rows
    pooled = torch.zeros(spans.shape[0], sae.width, dtype=f.dtype, device=f.device).index_add(0, seq, f)
    return pooled / (spans[:, 1] - spans[:, 0]).to(f.dtype)[:, None]


def _constraint(pooled, sae, ref_indices, ref_values, k, select, feature_weights):
    """D from pooled features [S, m]: top-k (or the cached reference's first k), then the weighted MSE."""
    dt = pooled.dtype
    if select == "policy":
        idx = pooled.detach().topk(k, dim=1).indices
        ref = _dense_reference(ref_indices, ref_values, sae.width, dt).gather(1, idx)
    elif select == "reference":
        idx = ref_indices[:, :k].long()
        ref = ref_values[:, :k].to(dt)
    else:
        raise ValueError(f"select must be 'policy' or 'reference', got {select!r}")
    p = pooled.gather(1, idx)
    sq = (p - ref) ** 2
    if feature_weights is not None:
        sq = sq * feature_weights.to(dt)[idx]
    return sq.sum(1) / k


def sae_feature_mse_ref(hidden, mask, sae, ref_indices, ref_values, k=50, select="policy", feature_weights=None):
    """[B] FPO feature constraint D(y) = (1/k) sum_{i in I} w_i (p_i - p_ref_i)^2 (docs/method.md)."""
    return _constraint(
        sae_pooled_features_ref(hidden, mask, sae), sae, ref_indices, ref_values, k, select, feature_weights
    )


def sae_feature_mse_spans_ref(hidden, spans, sae, ref_indices, ref_values, k=50, select="policy", feature_weights=None):
    """[S] D(y) of each span of flat hidden rows [N, d]."""
    return _constraint(
        sae_pooled_features_spans_ref(hidden, spans, sae), sae, ref_indices, ref_values, k, select, feature_weights
    )


def _softcap(z, softcap):
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def fused_linear_logprobs_ref(hidden, weight, labels, softcap=None, ignore_index=-100, bias=None):
    """[N, d], [V, d], [N] -> [N]: log_softmax(softcap(hidden @ weight.T + bias))[label]; 0 where ignored."""
    dt = _acc_dtype(hidden)
    logits = hidden.to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    logp = torch.log_softmax(_softcap(logits, softcap), dim=-1)
    ignored = labels == ignore_index
    out = logp.gather(1, torch.where(ignored, 0, labels).long().unsqueeze(1)).squeeze(1)
    return torch.where(ignored, torch.zeros_like(out), out)


def fused_linear_kl_ref(hidden, weight, ref_hidden, ref_weight, mask, softcap=None):
    """[N] KL(pi_ref || pi_theta) per position over the vocabulary; 0 where mask is false."""
    dt = _acc_dtype(hidden)
    logp = torch.log_softmax(_softcap(hidden.to(dt) @ weight.to(dt).t(), softcap), -1)
    logq = torch.log_softmax(_softcap(ref_hidden.to(dt) @ ref_weight.to(dt).t(), softcap), -1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return torch.where(mask.bool(), kl, torch.zeros_like(kl))


def fused_linear_logprobs_kl_ref(
    hidden, weight, labels, ref_hidden, ref_weight, softcap=None, bias=None, ref_bias=None, ignore_index=-100
):
    """(logp, ref_logp, kl), each [N]: both models' log-probs of the labels and KL(pi_ref || pi_theta); 0 where
    ignored."""
    dt = _acc_dtype(hidden)
    logits = [
        h.to(dt) @ w.to(dt).t() + (0 if b is None else b.to(dt))
        for h, w, b in ((hidden, weight, bias), (ref_hidden, ref_weight, ref_bias))
    ]
    logp, logq = (torch.log_softmax(_softcap(z, softcap), -1) for z in logits)
    ignored = labels == ignore_index
    y = torch.where(ignored, 0, labels).long().unsqueeze(1)
    zero = torch.zeros(labels.shape, dtype=dt, device=hidden.device)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return tuple(
        torch.where(ignored, zero, t) for t in (logp.gather(1, y).squeeze(1), logq.gather(1, y).squeeze(1), kl)
    )


def pack_topk_ref(pooled: torch.Tensor, K: int):
    """[B, m] -> (indices [B, K] int64, values [B, K] float32), by descending value, -1/0 past the width."""
    B, m = pooled.shape
    kk = min(K, m)
    vals, idx = pooled.float().topk(kk, dim=1)
    if kk < K:
        idx = torch.cat([idx, idx.new_full((B, K - kk), -1)], 1)
        vals = torch.cat([vals, vals.new_zeros(B, K - kk)], 1)
    return idx, vals


def protected_features_ref(hidden, spans, sae, feature_ids):
    """[N, d], [S, 2], [P] -> [S, P]: the full pooled encode, then the protected columns; autograd gives
    JumpReLU's own gradient (nothing through a token where a feature is off)."""
    return sae_pooled_features_spans_ref(hidden, spans, sae)[:, feature_ids.long()]


def protected_preactivations_ref(hidden, spans, sae, feature_ids):
    """[N, d], [S, 2], [P] -> [n, P]: every row's full pre-activation (b_dec subtracted from the input, then
    W_enc and b_enc, in float64), the protected columns, the spans' rows in order."""
    x = hidden.double()
    if sae.apply_b_dec_to_input:
        x = x - sae.b_dec.double()
    z = x @ sae.W_enc_t.double().t() + sae.b_enc.double()
    rows = torch.cat([torch.arange(int(s), int(e)) for s, e in spans.tolist()])
    return z[rows][:, feature_ids.long()]
