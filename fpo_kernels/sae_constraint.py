"""Fused SAE feature constraint: encode + JumpReLU + masked pooling (+ top-k + MSE), forward and backward.

    p_s   = (1/n_s) sum_{t in response(s)} JumpReLU(W_enc^T (h_t - b_dec) + b_enc; theta)        [S, m]
    D_s   = (1/k) sum_{i in I_s} w_i (p_si - p_ref_si)^2                                          [S]

The kernels work on flat hidden rows [N, d] and one row span [start, end) per sequence, so padded
batches ([B, T, d] plus a mask: spans b*T + [first, last], the mask marking holes) and packed token
streams (one span per response, no mask) share them. The forward never writes [N, m]: one program owns a
tile of features of one sequence, walks that sequence's span tile by tile, and keeps only the pooled sum;
masked tiles with no response token are skipped. The backward touches only the k selected features:
    dh_t = [t in response(s)] / n_s * sum_{i in I_s} g_si [z_ti > theta_i] W_enc[:, i],   g_si = dL/dD_s * 2/k w_i (p_si - p_ref_si)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import FLOAT_DTYPES, dot_precision, interpreter_on, is_fake, launch, use_triton
from .sae_weights import SAEWeights

__all__ = ["sae_pooled_features", "sae_feature_mse", "sae_pooled_features_varlen", "sae_feature_mse_varlen",
           "sae_pool_fwd", "sae_constraint_bwd", "SAEFeatureMSEFunction"]


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
def _configs(gpu, interpreted):
    """A few tile shapes for the GPU; one under the interpreter (it would run them all)."""
    if interpreter_on():
        return [triton.Config(interpreted, num_warps=1, num_stages=1)]
    return [triton.Config(c, num_warps=w, num_stages=st) for c, w, st in gpu]


_POOL_CONFIGS = _configs(
    [(dict(BT=64, BF=128, BD=64), 4, 3), (dict(BT=128, BF=128, BD=64), 8, 3), (dict(BT=64, BF=256, BD=64), 8, 3),
     (dict(BT=128, BF=64, BD=64), 4, 3), (dict(BT=64, BF=64, BD=64), 4, 3)],
    dict(BT=16, BF=32, BD=32))
# no BD=128 tile: at 4 warps it needs 255 registers and spills ~100 B (benchmarks/kernel_resources.py)
_BWD_CONFIGS = _configs(
    [(dict(BT=64, BD=64), 4, 3), (dict(BT=128, BD=64), 8, 3)],
    dict(BT=16, BD=32))


@triton.autotune(configs=_POOL_CONFIGS, key=["D", "F", "GATHER", "HAS_MASK"])
@triton.jit
def _sae_pool_fwd_kernel(
    h,        # [N, D] hidden rows (row stride stride_h, unit stride over D)
    mask,     # [N] int8, 1 on response rows (HAS_MASK); unread otherwise
    span,     # [S, 2] int32: first row of each sequence's response, one past its last
    inv_n,    # [S] fp32: 1 / number of response rows
    w,        # [M, D] W_enc transposed, same dtype as h
    bias,     # [M] fp32: b_enc - b_dec @ W_enc
    theta,    # [M] fp32 JumpReLU threshold
    idx,      # [S, F] int32 feature ids when GATHER, else unused
    out,      # [S, F] fp32 pooled features
    D, F, M, stride_h,
    HAS_MASK: tl.constexpr, GATHER: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[s, j] = inv_n[s] * sum_{t in span s} mask[t] * JumpReLU(h[t] @ w[f_j] + bias[f_j]; theta[f_j]),
    f_j = idx[s, j] (GATHER) or j. A gathered id outside [0, M) is never read: its output is NaN."""
    i_f = tl.program_id(0)
    i_s = tl.program_id(1).to(tl.int64)
    o_f = i_f * BF + tl.arange(0, BF)
    m_out = o_f < F
    m_f = m_out
    if GATHER:
        feat = tl.load(idx + i_s * F + o_f, mask=m_f, other=0).to(tl.int64)
        m_f = m_f & (feat >= 0) & (feat < M)
        feat = tl.where(m_f, feat, 0)
    else:
        feat = o_f.to(tl.int64)
    b_bias = tl.load(bias + feat, mask=m_f, other=0.0)     # [BF]
    b_theta = tl.load(theta + feat, mask=m_f, other=0.0)   # [BF]
    lo = tl.load(span + i_s * 2)
    hi = tl.load(span + i_s * 2 + 1)
    b_acc = tl.zeros([BF], dtype=tl.float32)
    for t0 in range(lo, hi, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < hi                                                          # [BT]
        if HAS_MASK:
            m_t = m_t & (tl.load(mask + o_t, mask=m_t, other=0) != 0)
        if tl.max(m_t.to(tl.int32), 0) > 0:  # skip tiles with no response token
            b_z = tl.zeros([BT, BF], dtype=tl.float32)
            for d0 in range(0, D, BD):
                o_d = d0 + tl.arange(0, BD)
                m_d = o_d < D
                p_h = h + o_t[:, None].to(tl.int64) * stride_h + o_d[None, :]
                b_h = tl.load(p_h, mask=m_t[:, None] & m_d[None, :], other=0.0)                # [BT, BD]
                b_w = tl.load(w + feat[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_f[None, :], other=0.0)  # [BD, BF]
                b_z += tl.dot(b_h, b_w, input_precision=PRECISION)
            b_z += b_bias[None, :]
            b_fire = (b_z > b_theta[None, :]) | (b_z != b_z)   # NaN passes through
            b_acc += tl.sum(tl.where(b_fire & m_t[:, None], b_z, 0.0), 0)
    tl.store(out + i_s * F + o_f, tl.where(m_f, b_acc * tl.load(inv_n + i_s), float("nan")), mask=m_out)


# Autotuning reruns the kernel: safe, as the first k block stores (never accumulates) and rows outside
# every span keep the zeros the launcher allocated.
@triton.autotune(configs=_BWD_CONFIGS, key=["D", "K", "HAS_MASK"])
@triton.jit
def _sae_constraint_bwd_kernel(
    h,        # [N, D] hidden rows (row stride stride_h)
    mask,     # [N] int8 (HAS_MASK)
    span,     # [S, 2] int32
    w,        # [M, D] W_enc transposed, same dtype as h
    bias,     # [M] fp32
    theta,    # [M] fp32
    idx,      # [S, K] int32 selected features
    coef,     # [S, K] fp32: dL/dD_s * 2/k * w_i * (p_si - p_ref_si) / n_s
    dh,       # [N, D] fp32 gradient of the hidden rows
    D, K, M, stride_h,
    HAS_MASK: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
):
    """dh[t] = mask[t] * sum_j coef[s, j] * [z[t, j] > theta] * w[idx[s, j]] for t in span s, recomputing z
    for the k selected features only; an id outside [0, M) is never read (it adds nothing)."""
    i_t = tl.program_id(0)
    i_s = tl.program_id(1).to(tl.int64)
    lo = tl.load(span + i_s * 2)
    hi = tl.load(span + i_s * 2 + 1)
    o_t = lo + i_t * BT + tl.arange(0, BT)
    m_row = o_t < hi                                                            # [BT] rows this program owns
    m_t = m_row
    if HAS_MASK:
        m_t = m_t & (tl.load(mask + o_t, mask=m_row, other=0) != 0)
    if tl.max(m_row.to(tl.int32), 0) > 0:
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            feat = tl.load(idx + i_s * K + o_k, mask=m_k, other=0).to(tl.int64)
            m_k = m_k & (feat >= 0) & (feat < M)
            feat = tl.where(m_k, feat, 0)
            b_z = tl.zeros([BT, BK], dtype=tl.float32)
            for d0 in range(0, D, BD):
                o_d = d0 + tl.arange(0, BD)
                m_d = o_d < D
                p_h = h + o_t[:, None].to(tl.int64) * stride_h + o_d[None, :]
                b_h = tl.load(p_h, mask=m_t[:, None] & m_d[None, :], other=0.0)                           # [BT, BD]
                b_w = tl.load(w + feat[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_k[None, :], other=0.0)  # [BD, BK]
                b_z += tl.dot(b_h, b_w, input_precision=PRECISION)
            b_z += tl.load(bias + feat, mask=m_k, other=0.0)[None, :]
            b_fire = (b_z > tl.load(theta + feat, mask=m_k, other=0.0)[None, :]) | (b_z != b_z)
            b_c = tl.load(coef + i_s * K + o_k, mask=m_k, other=0.0)
            b_g = tl.where(b_fire & m_t[:, None] & m_k[None, :], b_c[None, :], 0.0)   # [BT, BK] dL/dz
            b_g = b_g.to(h.dtype.element_ty)
            for d0 in range(0, D, BD):
                o_d = d0 + tl.arange(0, BD)
                m_d = o_d < D
                b_w = tl.load(w + feat[:, None] * D + o_d[None, :], mask=m_k[:, None] & m_d[None, :], other=0.0)  # [BK, BD]
                p_dh = dh + o_t[:, None].to(tl.int64) * D + o_d[None, :]
                m_dh = m_row[:, None] & m_d[None, :]
                b_dh = tl.dot(b_g, b_w, input_precision=PRECISION)
                if k0 > 0:
                    b_dh += tl.load(p_dh, mask=m_dh, other=0.0)
                tl.store(p_dh, b_dh, mask=m_dh)


# ------------------------------------------------------------------------------------------------
# launchers (no autograd)
# ------------------------------------------------------------------------------------------------
class Spans:
    """Where each sequence's response lies in the flat hidden rows, computed once per call:
    span [S, 2] int32 (start, end), inv_n [S] fp32, mask8 [N] int8 or None (rows inside a span that are not
    response tokens: holes of a padded mask), max_len (the longest span: the backward's grid)."""

    def __init__(self, span, inv_n, mask8, max_len):
        self.span, self.inv_n, self.mask8, self.max_len = span, inv_n, mask8, int(max_len)

    @classmethod
    def from_mask(cls, mask):
        """A padded [B, T] mask over hidden [B, T, d] seen as [B*T, d] rows: span b = b*T + [first, last]."""
        B, T = mask.shape
        m8 = mask.to(torch.int8).contiguous()
        pos = torch.arange(T, device=mask.device)
        on = m8 != 0
        first = torch.where(on, pos, T).amin(1)
        last = torch.where(on, pos + 1, 0).amax(1)
        base = torch.arange(B, device=mask.device) * T
        span = torch.stack([base + first, base + last], 1).to(torch.int32).contiguous()
        inv_n = (1.0 / on.sum(1).clamp(min=1).float()).contiguous()
        return cls(span, inv_n, m8.reshape(-1), T)

    @classmethod
    def from_spans(cls, spans, max_len=None):
        """Response spans [S, 2] (start, end) over flat rows: every row of a span is a response token."""
        span = spans.to(torch.int32).contiguous()
        n = (span[:, 1] - span[:, 0]).clamp(min=1)
        if max_len is None:
            max_len = int(n.max()) if n.numel() else 1   # a device sync on a GPU: pass max_len to avoid it
        return cls(span, (1.0 / n.float()).contiguous(), None, max(int(max_len), 1))

    @property
    def count(self):
        return self.span.shape[0]


def sae_pool_fwd(hidden, spans: Spans, sae: SAEWeights, idx=None):
    """Pooled JumpReLU features [S, F] fp32 of flat hidden rows [N, d]: every feature (idx None, F = m) or
    idx [S, F] gathered ones."""
    N, D = hidden.shape
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    S = spans.count
    F = sae.width if idx is None else idx.shape[1]
    out = torch.empty(S, F, device=hidden.device, dtype=torch.float32)
    idx32 = idx.to(torch.int32).contiguous() if idx is not None else spans.span  # unused placeholder when dense
    has_mask = spans.mask8 is not None
    launch(
        _sae_pool_fwd_kernel, lambda meta: (triton.cdiv(F, meta["BF"]), S),
        hidden, spans.mask8 if has_mask else spans.span, spans.span, spans.inv_n, sae.weight_as(hidden.dtype),
        sae.bias, sae.threshold, idx32, out, D, F, sae.width, hidden.stride(0),
        HAS_MASK=has_mask, GATHER=idx is not None, PRECISION=dot_precision(hidden.dtype),
    )
    return out


def sae_constraint_bwd(hidden, spans: Spans, sae: SAEWeights, idx, coef):
    """dL/dhidden [N, d] in hidden's dtype, through the k selected features idx [S, k] only; zero outside the spans."""
    N, D = hidden.shape
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    K = idx.shape[1]
    dh = torch.zeros(N, D, device=hidden.device, dtype=torch.float32)
    # one k block holds k <= 64 (the usual k = 50): the gate is computed once per token tile
    BK = min(32 if interpreter_on() else 64, max(16, triton.next_power_of_2(K)))
    has_mask = spans.mask8 is not None
    launch(
        _sae_constraint_bwd_kernel, lambda meta: (triton.cdiv(spans.max_len, meta["BT"]), spans.count),
        hidden, spans.mask8 if has_mask else spans.span, spans.span, sae.weight_as(hidden.dtype), sae.bias,
        sae.threshold, idx.to(torch.int32).contiguous(), coef.float().contiguous(), dh, D, K, sae.width, hidden.stride(0),
        HAS_MASK=has_mask, BK=BK, PRECISION=dot_precision(hidden.dtype),
    )
    return dh.to(hidden.dtype)


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------
class SAEFeatureMSEFunction(torch.autograd.Function):
    """D(y) per sequence from flat hidden rows [N, d]; saves the hidden rows it was given, the selected
    indices and one coefficient per selected feature: O(S*k) beyond what the caller already holds."""

    @staticmethod
    def forward(ctx, hidden, spans, sae, ref_indices, ref_values, k, select, feature_weights):
        if select == "policy":
            pooled = sae_pool_fwd(hidden, spans, sae)                      # [S, m]
            p, idx = pooled.topk(k, dim=1)                                 # [S, k]
            dense = reference._dense_reference(ref_indices, ref_values, sae.width, torch.float32)
            ref = dense.gather(1, idx)
        else:
            idx = ref_indices[:, :k].long()
            p = sae_pool_fwd(hidden, spans, sae, idx)                      # [S, k]
            ref = ref_values[:, :k].float()
        w = torch.ones_like(p) if feature_weights is None else feature_weights.float()[idx]
        diff = p - ref
        ctx.save_for_backward(hidden, idx, 2.0 / k * w * diff * spans.inv_n[:, None])
        ctx.sae, ctx.spans = sae, spans
        return (w * diff * diff).sum(1) / k

    @staticmethod
    def backward(ctx, grad_d):
        hidden, idx, coef = ctx.saved_tensors
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = sae_constraint_bwd(hidden, ctx.spans, ctx.sae, idx, grad_d.float()[:, None] * coef)
        return (
            grad_hidden,  # hidden
            None,         # spans
            None,         # sae (frozen)
            None,         # ref_indices
            None,         # ref_values (cached reference: a constant)
            None,         # k
            None,         # select
            None,         # feature_weights (not learned)
        )


# ------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------
def _check_sae_hidden(hidden, sae, dims, layout):
    if not isinstance(sae, SAEWeights):
        raise ValueError(f"sae must be an fpo_kernels.SAEWeights, got {type(sae).__name__}")
    if not torch.is_tensor(hidden) or hidden.dim() != dims:
        raise ValueError(f"hidden must be a {layout} tensor, got {getattr(hidden, 'shape', type(hidden))}")
    if hidden.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"hidden must be bf16, fp16 or fp32, got {hidden.dtype}")
    if hidden.shape[-1] != sae.d_in:
        raise ValueError(f"hidden has d={hidden.shape[-1]} but the SAE expects d_in={sae.d_in}")
    if sae.W_enc_t.device != hidden.device:
        raise ValueError(f"sae is on {sae.W_enc_t.device} but hidden is on {hidden.device}")


def _check_mask(hidden, mask, check_values):
    B, T, _ = hidden.shape
    if not torch.is_tensor(mask) or tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must have shape [B, T] = {[B, T]}, got {getattr(mask, 'shape', type(mask))}")
    if mask.device != hidden.device:
        raise ValueError(f"mask is on {mask.device} but hidden is on {hidden.device}")
    if mask.dtype.is_floating_point and check_values and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 and 1 (or be bool)")
    if check_values:
        empty = (mask == 0).all(1).nonzero().flatten()
        if empty.numel():
            raise ValueError(f"mask row {empty[0].item()} has no response token (an empty response is bad data)")


def _check_spans(hidden, spans, max_len, check_values):
    N = hidden.shape[0]
    if not torch.is_tensor(spans) or spans.dim() != 2 or spans.shape[1] != 2:
        raise ValueError(f"spans must be an [S, 2] tensor of (start, end) rows, got {getattr(spans, 'shape', type(spans))}")
    if spans.dtype.is_floating_point or spans.dtype == torch.bool:
        raise ValueError(f"spans must be an integer tensor, got {spans.dtype}")
    if spans.device != hidden.device:
        raise ValueError(f"spans is on {spans.device} but hidden is on {hidden.device}")
    if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1):
        raise ValueError(f"max_len must be a positive integer (the longest span), got {max_len!r}")
    if not check_values or spans.shape[0] == 0:
        return
    s, e = spans[:, 0].long(), spans[:, 1].long()
    bad = ((s < 0) | (e > N)).nonzero().flatten()
    if bad.numel():
        i = bad[0].item()
        raise ValueError(f"spans row {i} = {spans[i].tolist()} is outside the {N} hidden rows")
    empty = (e <= s).nonzero().flatten()
    if empty.numel():
        i = empty[0].item()
        raise ValueError(f"spans row {i} = {spans[i].tolist()} is empty (an empty response is bad data)")
    if max_len is not None and (e - s).max().item() > max_len:
        raise ValueError(f"max_len={max_len} is shorter than the longest span ({(e - s).max().item()})")
    order = s.argsort()
    overlap = (e[order][:-1] > s[order][1:]).nonzero().flatten()
    if overlap.numel():
        a, b = order[overlap[0]].item(), order[overlap[0] + 1].item()
        raise ValueError(f"spans rows {a} and {b} overlap: a row belongs to one response at most")


def _check_reference(S, m, ref_indices, ref_values, k, select, feature_weights, device, check_values):
    if select not in ("policy", "reference"):
        raise ValueError(f"select must be 'policy' or 'reference', got {select!r}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= m:
        raise ValueError(f"k must be an integer in [1, {m}] (the SAE width), got {k!r}")
    if not torch.is_tensor(ref_indices) or ref_indices.dim() != 2 or ref_indices.shape[0] != S:
        raise ValueError(f"ref_indices must be [S, K] with S={S} sequences, got {getattr(ref_indices, 'shape', type(ref_indices))}")
    if ref_indices.dtype.is_floating_point or ref_indices.dtype == torch.bool:
        raise ValueError(f"ref_indices must be an integer tensor, got {ref_indices.dtype}")
    if not torch.is_tensor(ref_values) or ref_values.shape != ref_indices.shape:
        raise ValueError(f"ref_values must have the shape of ref_indices {tuple(ref_indices.shape)}, "
                         f"got {getattr(ref_values, 'shape', type(ref_values))}")
    for arg, t in (("ref_indices", ref_indices), ("ref_values", ref_values)):
        if t.device != device:
            raise ValueError(f"{arg} is on {t.device} but hidden is on {device}")
    if select == "reference" and ref_indices.shape[1] < k:
        raise ValueError(f"select='reference' needs at least k={k} cached features, ref_indices has K={ref_indices.shape[1]}")
    if feature_weights is not None:
        if not torch.is_tensor(feature_weights) or feature_weights.shape != (m,):
            raise ValueError(f"feature_weights must have shape [{m}] (the SAE width), "
                             f"got {getattr(feature_weights, 'shape', type(feature_weights))}")
        if feature_weights.device != device:
            raise ValueError(f"feature_weights is on {feature_weights.device} but hidden is on {device}")
    if check_values:
        wide = ref_indices.int()  # an int16 tensor compared with 32768 would overflow
        bad = (wide < -1) | (wide >= m)
        if bad.any():
            row = bad.any(1).nonzero()[0].item()
            raise ValueError(f"ref_indices row {row} holds {wide[bad][0].item()}, outside [-1, {m})")
        if select == "reference":
            short = ((ref_indices[:, :k] < 0).any(1)).nonzero().flatten()
            if short.numel():
                raise ValueError(f"select='reference': ref_indices row {short[0].item()} has fewer than k={k} valid cached features")
        if feature_weights is not None and (feature_weights < 0).any():
            raise ValueError("feature_weights must be >= 0")


# ------------------------------------------------------------------------------------------------
# public ops
# ------------------------------------------------------------------------------------------------
def sae_pooled_features(hidden, mask, sae: SAEWeights, check_inputs: bool = True) -> torch.Tensor:
    """Masked mean of the JumpReLU SAE features over each sequence's response tokens.

    hidden [B, T, d] bf16/fp16/fp32, mask [B, T] bool or 0/1 (1 on response tokens), sae: SAEWeights.
    Returns [B, m] float32. Never materialises [B, T, m]. Not differentiable (the training loss is
    sae_feature_mse, which has its own sparse backward); the result is detached.
    check_inputs=False skips the checks that read values (empty rows): for callers that validated their batch.
    """
    check_inputs = check_inputs and not is_fake(hidden)
    _check_sae_hidden(hidden, sae, 3, "[B, T, d]")
    _check_mask(hidden, mask, check_inputs)
    with torch.no_grad():
        if not use_triton(hidden) or hidden.dtype == torch.float64:
            return reference.sae_pooled_features_ref(hidden, mask, sae).float()
        B, T, d = hidden.shape
        return sae_pool_fwd(hidden.detach().reshape(B * T, d), Spans.from_mask(mask), sae)


def sae_pooled_features_varlen(hidden, spans, sae: SAEWeights, max_len=None, check_inputs: bool = True) -> torch.Tensor:
    """sae_pooled_features on flat hidden rows: hidden [N, d] (a packed token stream), spans [S, 2] integer
    (start, end) rows of each sequence's response, non-overlapping and non-empty; max_len: the longest
    span, if the caller knows it. Returns [S, m] float32, detached."""
    check_inputs = check_inputs and not is_fake(hidden)
    _check_sae_hidden(hidden, sae, 2, "[N, d]")
    _check_spans(hidden, spans, max_len, check_inputs)
    with torch.no_grad():
        if not use_triton(hidden) or hidden.dtype == torch.float64:
            return reference.sae_pooled_features_varlen_ref(hidden, spans, sae).float()
        return sae_pool_fwd(hidden.detach(), Spans.from_spans(spans, max_len), sae)


def sae_feature_mse(hidden, mask, sae: SAEWeights, ref_indices, ref_values, k: int = 50, select: str = "policy",
                    feature_weights=None, check_inputs: bool = True) -> torch.Tensor:
    """FPO feature constraint D(y) = (1/k) sum_{i in I} w_i (p_i - p_ref_i)^2 per sequence, [B] float32.

    hidden [B, T, d]: the residual stream at the SAE's layer; mask [B, T]: response tokens;
    ref_indices [B, K] integer (-1 = empty slot) and ref_values [B, K]: the cached reference top-K pooled
    features; k: features in the constraint; select: "policy" (top-k of the policy's pooled features; a
    feature absent from the cache has reference value 0) or "reference" (the first k cached features,
    which needs only k columns of W_enc); feature_weights [m] >= 0 or None.
    Differentiable in hidden only. check_inputs=False skips the checks that read tensor values
    (empty rows, index range, valid slots), for callers that validated their batch once.
    """
    check_inputs = check_inputs and not is_fake(hidden)   # fake tensors have no values to check
    _check_sae_hidden(hidden, sae, 3, "[B, T, d]")
    _check_mask(hidden, mask, check_inputs)
    _check_reference(hidden.shape[0], sae.width, ref_indices, ref_values, k, select, feature_weights, hidden.device,
                     check_inputs)
    if not use_triton(hidden) or hidden.dtype == torch.float64:
        return reference.sae_feature_mse_ref(hidden, mask, sae, ref_indices, ref_values, k, select,
                                             feature_weights).float()
    B, T, d = hidden.shape
    return SAEFeatureMSEFunction.apply(hidden.reshape(B * T, d), Spans.from_mask(mask), sae, ref_indices, ref_values,
                                       k, select, feature_weights)


def sae_feature_mse_varlen(hidden, spans, sae: SAEWeights, ref_indices, ref_values, k: int = 50,
                           select: str = "policy", feature_weights=None, max_len=None,
                           check_inputs: bool = True) -> torch.Tensor:
    """sae_feature_mse on flat hidden rows: hidden [N, d] (a packed token stream), spans [S, 2] integer
    (start, end) rows of each sequence's response (non-overlapping, non-empty), ref_indices / ref_values
    [S, K]; max_len: the longest span if the caller knows it (else read from spans: a device sync on a GPU).
    Returns [S] float32; rows outside every span get zero gradient."""
    check_inputs = check_inputs and not is_fake(hidden)
    _check_sae_hidden(hidden, sae, 2, "[N, d]")
    _check_spans(hidden, spans, max_len, check_inputs)
    _check_reference(spans.shape[0], sae.width, ref_indices, ref_values, k, select, feature_weights, hidden.device,
                     check_inputs)
    if not use_triton(hidden) or hidden.dtype == torch.float64:
        return reference.sae_feature_mse_varlen_ref(hidden, spans, sae, ref_indices, ref_values, k, select,
                                                    feature_weights).float()
    return SAEFeatureMSEFunction.apply(hidden, Spans.from_spans(spans, max_len), sae, ref_indices, ref_values, k,
                                       select, feature_weights)
