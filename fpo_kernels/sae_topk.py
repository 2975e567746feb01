"""The SAE feature constraint for TopK SAEs: each token keeps its k largest pre-activations (ReLU'd), exactly k,
ties broken as torch.topk breaks them (what sae-lens and sparsify do).

    z_t   = W_enc^T (h_t - b_dec) + b_enc                       the pre-activations of one response token
    f_t   = ReLU(z_t) on topk(z_t, k), 0 elsewhere             [m]
    p_s   = (1/n_s) sum_{t in response(s)} f_t                  [S, m]
    D_s   = (1/k_D) sum_{i in I_s} w_i (p_si - p_ref_si)^2

The selection is data-dependent per token, so the forward runs the response rows in chunks of C: one GEMM for
a chunk's [C, m] pre-activations (fp32 out, the bias added in place), torch.topk on it, each row's k kept
ids and ReLU'd values stored. Memory: one [C, m] fp32 buffer, never [N, m]; the chunk is sized by CHUNK_BYTES.
The pooling then works on the [n, k] kept pairs only (_pool_kept): sorted by (sequence, feature), summed by
float64 prefix sums, each (sequence, feature) total written once, so it is deterministic without any [C, m]
pass. Saved for the backward: each response row's k kept feature ids [n, k] int32. The backward touches only
the k_D constrained features, per sequence:
    dh_t = sum_{i in I_s} g_si [i kept at t] [z_ti > 0] W_enc[:, i],
    g_si = dL/dD_s * 2/k_D w_i (p_si - p_ref_si) / n_s
"""

from __future__ import annotations

import torch

from ._dispatch import is_fake, no_autocast
from ._layout import dense_from_topk, span_rows
from .sae_weights import SAEWeights

__all__ = [
    "topk_rows",
    "topk_pool_fwd",
    "topk_constraint_bwd",
    "TopKFeatureMSEFunction",
    "CHUNK_BYTES",
    "MIN_CHUNK_ROWS",
]

CHUNK_BYTES = 1 << 26  # 64 MiB of fp32 pre-activations per chunk (the one [C, m] buffer of the forward)
MIN_CHUNK_ROWS = 256  # below this, a chunk's GEMM streams W_enc for too few rows (< 256 FLOPs per byte)


def _chunk_rows(m: int) -> int:
    return max(MIN_CHUNK_ROWS, min(8192, CHUNK_BYTES // (4 * m)))


def _preacts(h, sae: SAEWeights, feats=None):
    """[C, d] rows -> fp32 pre-activations [C, m] (or [C, F] for the columns feats): a GEMM in the rows' dtype
    with an fp32 output."""
    w = sae.weight_as(h.dtype) if feats is None else sae.weight_as(h.dtype)[feats]
    b = sae.bias if feats is None else sae.bias[feats]
    if h.dtype in (torch.float16, torch.bfloat16) and (h.is_cuda or is_fake(h)):  # fake: what a GPU would run
        z = torch.mm(h, w.t(), out_dtype=torch.float32)
    else:
        z = h.float() @ w.float().t() if h.dtype != torch.float64 else h @ w.double().t()
    return z.add_(b.to(z.dtype))  # in place: one [C, m] buffer


def topk_rows(device, mask=None, spans=None):
    """The row layout of the TopK path, from a padded mask [B, T] or spans [S, 2]: the response rows [n] of
    the flat hidden rows, their sequence [n] and 1 / response length [S] on device, and where each sequence's
    rows start in them (a host list of S + 1 offsets, rows being grouped by sequence). Laid out on the host,
    as the JumpReLU path's tile tables are: host spans cost no device sync (a device mask, one copy)."""
    if mask is not None:
        T = mask.shape[1]
        seq, t = mask.detach().bool().cpu().nonzero(as_tuple=True)
        rows, counts = seq * T + t, torch.bincount(seq, minlength=mask.shape[0])
    else:
        spans = spans.detach().to("cpu", torch.int64)
        rows, seq = span_rows(spans)
        counts = (spans[:, 1] - spans[:, 0]).clamp(min=0)
    offsets = [0] + counts.cumsum(0).tolist()
    inv_n = 1.0 / counts.clamp(min=1).float()
    return rows.to(device), seq.to(device), inv_n.to(device), offsets


def topk_pool_fwd(hidden, rows, seq, n_seqs, inv_n, sae: SAEWeights, chunk_rows: int | None = None):
    """Pooled TopK features [S, m] fp32 of the response rows `rows` [n] of flat hidden [N, d] (sequence ids
    `seq` [n], 1 / response length inv_n [S]), and each row's kept feature ids [n, k] int32; chunk_rows
    overrides the chunking (tests)."""
    m, k = sae.width, sae.k
    if k is None:
        raise ValueError(f"SAE {sae.name!r} has no k: topk_pool_fwd takes TopK encoders only")
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n = rows.shape[0]
    kept = torch.empty(n, k, device=hidden.device, dtype=torch.int32)
    vals = torch.empty(n, k, device=hidden.device, dtype=dt)
    C = chunk_rows or _chunk_rows(m)
    for a in range(0, n, C):
        b = min(a + C, n)
        z = _preacts(hidden[rows[a:b]], sae)  # [c, m] fp32
        v, ids = torch.topk(z, k, dim=1, sorted=False)
        del z
        kept[a:b] = ids.to(torch.int32)
        vals[a:b] = v.clamp(min=0)  # ReLU of the kept
    return _pool_kept(kept, vals, seq, n_seqs, m) * inv_n[:, None].to(dt), kept


def _pool_kept(kept, vals, seq, n_seqs: int, m: int):
    """sum_{rows r of sequence s} vals[r, j] at feature kept[r, j], as [S, m]. The (sequence, feature) keys are
    sorted (stably); vals >= 0, so float64 prefix sums are nondecreasing and each key's total is its last
    prefix minus the previous key's last prefix (a running max). Every destination gets one nonzero addend
    and exact zeros, so the scatter's result does not depend on its order."""
    pooled = torch.zeros(n_seqs * m, device=vals.device, dtype=vals.dtype)
    keys = (seq.long()[:, None] * m + kept.long()).flatten()
    if keys.numel() == 0:
        return pooled.view(n_seqs, m)
    keys, order = torch.sort(keys, stable=True)
    prefix = vals.flatten()[order].double().cumsum(0)
    last = torch.ones_like(keys, dtype=torch.bool)
    last[:-1] = keys[1:] != keys[:-1]
    ends = torch.where(last, prefix, torch.zeros((), dtype=prefix.dtype, device=prefix.device))
    before = torch.cat([ends.new_zeros(1), ends.cummax(0).values[:-1]])  # the previous key's last prefix
    totals = torch.where(last, prefix - before, torch.zeros((), dtype=prefix.dtype, device=prefix.device))
    return pooled.scatter_add_(0, keys, totals.to(vals.dtype)).view(n_seqs, m)


def topk_constraint_bwd(hidden, rows, offsets, kept, sae: SAEWeights, idx, coef):
    """dL/dhidden [N, d] in hidden's dtype, through the constrained features idx [S, k_D] (coef [S, k_D] per
    feature, the 1/n_s included), gated by each row's kept set and ReLU; zero outside the response rows.
    Sequence s owns rows[offsets[s]:offsets[s + 1]] (offsets: a host list, so no device sync per sequence)."""
    dh = torch.zeros_like(hidden)
    for s in range(idx.shape[0]):
        r = slice(offsets[s], offsets[s + 1])
        if r.start == r.stop:
            continue
        feats = idx[s].long()
        h = hidden[rows[r]]
        z = _preacts(h, sae, feats)  # [n_s, k_D]
        chosen = (kept[r].long()[:, :, None] == feats[None, None, :]).any(1)  # [n_s, k_D] kept at that row
        g = torch.where(chosen & (z > 0), coef[s][None, :].to(z.dtype), torch.zeros((), dtype=z.dtype, device=z.device))
        w = sae.weight_as(hidden.dtype)[feats]  # [k_D, d]
        dh[rows[r]] = (g @ w.to(g.dtype)).to(hidden.dtype)
    return dh


class TopKFeatureMSEFunction(torch.autograd.Function):
    """D(y) per sequence for a TopK SAE, from flat hidden rows; saves the hidden rows, each response row's kept
    ids [n, k] and one coefficient per constrained feature."""

    @staticmethod
    def forward(ctx, hidden, rows, seq, offsets, inv_n, sae, ref_indices, ref_values, k, select, feature_weights):
        pooled, kept = topk_pool_fwd(hidden, rows, seq, ref_indices.shape[0], inv_n, sae)
        pooled = pooled.float()
        if select == "policy":
            p, idx = pooled.topk(k, dim=1)
            ref = dense_from_topk(ref_indices, ref_values, sae.width, torch.float32).gather(1, idx)
        else:
            idx = ref_indices[:, :k].long()
            p = pooled.gather(1, idx.clamp(0, sae.width - 1))
            p = torch.where((idx >= 0) & (idx < sae.width), p, torch.full_like(p, float("nan")))
            ref = ref_values[:, :k].float()
        w = torch.ones_like(p) if feature_weights is None else feature_weights.float()[idx.clamp(0, sae.width - 1)]
        diff = p - ref
        ctx.save_for_backward(hidden, rows, kept, idx, 2.0 / k * w * diff * inv_n[:, None])
        ctx.sae, ctx.offsets = sae, offsets
        return (w * diff * diff).sum(1) / k

    @staticmethod
    def backward(ctx, grad_d):
        hidden, rows, kept, idx, coef = ctx.saved_tensors
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            with no_autocast(hidden):  # a backward called inside an autocast region
                grad_hidden = topk_constraint_bwd(
                    hidden,
                    rows,
                    ctx.offsets,
                    kept,
                    ctx.sae,
                    idx.clamp(0, ctx.sae.width - 1),
                    grad_d.float()[:, None] * coef,
                )
        return (
            grad_hidden,  # hidden
            None,  # rows
            None,  # seq
            None,  # offsets
            None,  # inv_n
            None,  # sae (frozen)
            None,  # ref_indices
            None,  # ref_values (cached reference: a constant)
            None,  # k
            None,  # select
            None,  # feature_weights (not learned)
        )
