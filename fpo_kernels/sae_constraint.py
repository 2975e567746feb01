"""Fused SAE feature constraint: encode + JumpReLU + masked pooling (+ top-k + MSE), forward and backward.

    p_b   = (1/n_b) sum_{t in response(b)} JumpReLU(W_enc^T (h_bt - b_dec) + b_enc; theta)      [B, m]
    D_b   = (1/k) sum_{i in I_b} w_i (p_bi - p_ref_bi)^2                                          [B]

The forward never writes [B, T, m]: one program owns a tile of features of one sequence, walks that
sequence's response tokens tile by tile, and keeps only the pooled sum. Token tiles that hold no response
token are skipped. The backward touches only the k selected features:
    dh_bt = mask_bt / n_b * sum_{i in I_b} g_bi [z_bti > theta_i] W_enc[:, i],   g_bi = dL/dD_b * 2/k w_i (p_bi - p_ref_bi)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import FLOAT_DTYPES, dot_precision, interpreter_on, is_fake, launch, use_triton
from .sae_weights import SAEWeights

__all__ = ["sae_pooled_features", "sae_feature_mse", "sae_pool_fwd", "sae_constraint_bwd", "SAEFeatureMSEFunction"]


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
_BWD_CONFIGS = _configs(
    [(dict(BT=64, BD=64), 4, 3), (dict(BT=128, BD=64), 8, 3), (dict(BT=64, BD=128), 4, 3)],
    dict(BT=16, BD=32))


@triton.autotune(configs=_POOL_CONFIGS, key=["D", "F", "GATHER"])
@triton.jit(do_not_specialize=["T"])
def _sae_pool_fwd_kernel(
    h,        # [B, T, D] hidden states (row stride stride_ht, batch stride stride_hb, unit stride over D)
    mask,     # [B, T] int8, 1 on response tokens
    span,     # [B, 2] int32: first response token, one past the last
    inv_n,    # [B] fp32: 1 / number of response tokens
    w,        # [M, D] W_enc transposed, same dtype as h
    bias,     # [M] fp32: b_enc - b_dec @ W_enc
    theta,    # [M] fp32 JumpReLU threshold
    idx,      # [B, F] int32 feature ids when GATHER, else unused
    out,      # [B, F] fp32 pooled features
    T, D, F, stride_hb, stride_ht,
    GATHER: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[b, j] = inv_n[b] * sum_t mask[b, t] * JumpReLU(h[b, t] @ w[f_j] + bias[f_j]; theta[f_j]),
    f_j = idx[b, j] (GATHER) or j."""
    i_f = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_f = i_f * BF + tl.arange(0, BF)
    m_f = o_f < F
    if GATHER:
        feat = tl.load(idx + i_b * F + o_f, mask=m_f, other=0).to(tl.int64)
    else:
        feat = o_f.to(tl.int64)
    b_bias = tl.load(bias + feat, mask=m_f, other=0.0)     # [BF]
    b_theta = tl.load(theta + feat, mask=m_f, other=0.0)   # [BF]
    lo = tl.load(span + i_b * 2)
    hi = tl.load(span + i_b * 2 + 1)
    b_acc = tl.zeros([BF], dtype=tl.float32)
    for t0 in range(lo, hi, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = tl.load(mask + i_b * T + o_t, mask=o_t < hi, other=0) != 0   # [BT]
        if tl.max(m_t.to(tl.int32), 0) > 0:  # skip tiles with no response token
            b_z = tl.zeros([BT, BF], dtype=tl.float32)
            for d0 in range(0, D, BD):
                o_d = d0 + tl.arange(0, BD)
                m_d = o_d < D
                p_h = h + i_b * stride_hb + o_t[:, None].to(tl.int64) * stride_ht + o_d[None, :]
                b_h = tl.load(p_h, mask=m_t[:, None] & m_d[None, :], other=0.0)                # [BT, BD]
                b_w = tl.load(w + feat[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_f[None, :], other=0.0)  # [BD, BF]
                b_z += tl.dot(b_h, b_w, input_precision=PRECISION)
            b_z += b_bias[None, :]
            b_fire = (b_z > b_theta[None, :]) | (b_z != b_z)   # NaN passes through
            b_acc += tl.sum(tl.where(b_fire & m_t[:, None], b_z, 0.0), 0)
    tl.store(out + i_b * F + o_f, b_acc * tl.load(inv_n + i_b), mask=m_f)


# Autotuning reruns the kernel: safe, as the first k block stores (never accumulates) and tiles
# without a response token leave the zeros the launcher allocated.
@triton.autotune(configs=_BWD_CONFIGS, key=["D", "K"])
@triton.jit(do_not_specialize=["T"])
def _sae_constraint_bwd_kernel(
    h,        # [B, T, D] hidden states
    mask,     # [B, T] int8
    w,        # [M, D] W_enc transposed, same dtype as h
    bias,     # [M] fp32
    theta,    # [M] fp32
    idx,      # [B, K] int32 selected features
    coef,     # [B, K] fp32: dL/dD_b * 2/k * w_i * (p_bi - p_ref_bi) / n_b
    dh,       # [B, T, D] fp32 gradient of the hidden states
    T, D, K, stride_hb, stride_ht,
    BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
):
    """dh[b, t] = mask[b, t] * sum_j coef[b, j] * [z[b, t, j] > theta] * w[idx[b, j]], recomputing z for the
    k selected features only."""
    i_t = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = tl.load(mask + i_b * T + o_t, mask=o_t < T, other=0) != 0   # [BT]
    if tl.max(m_t.to(tl.int32), 0) > 0:  # dh stays zero outside the response
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            feat = tl.load(idx + i_b * K + o_k, mask=m_k, other=0).to(tl.int64)
            b_z = tl.zeros([BT, BK], dtype=tl.float32)
            for d0 in range(0, D, BD):
                o_d = d0 + tl.arange(0, BD)
                m_d = o_d < D
                p_h = h + i_b * stride_hb + o_t[:, None].to(tl.int64) * stride_ht + o_d[None, :]
                b_h = tl.load(p_h, mask=m_t[:, None] & m_d[None, :], other=0.0)                           # [BT, BD]
                b_w = tl.load(w + feat[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_k[None, :], other=0.0)  # [BD, BK]
                b_z += tl.dot(b_h, b_w, input_precision=PRECISION)
            b_z += tl.load(bias + feat, mask=m_k, other=0.0)[None, :]
            b_fire = (b_z > tl.load(theta + feat, mask=m_k, other=0.0)[None, :]) | (b_z != b_z)
            b_c = tl.load(coef + i_b * K + o_k, mask=m_k, other=0.0)
            b_g = tl.where(b_fire & m_t[:, None] & m_k[None, :], b_c[None, :], 0.0)   # [BT, BK] dL/dz
            b_g = b_g.to(h.dtype.element_ty)
            for d0 in range(0, D, BD):
                o_d = d0 + tl.arange(0, BD)
                m_d = o_d < D
                b_w = tl.load(w + feat[:, None] * D + o_d[None, :], mask=m_k[:, None] & m_d[None, :], other=0.0)  # [BK, BD]
                p_dh = dh + i_b * T * D + o_t[:, None].to(tl.int64) * D + o_d[None, :]
                m_dh = (o_t[:, None] < T) & m_d[None, :]
                b_dh = tl.dot(b_g, b_w, input_precision=PRECISION)
                if k0 > 0:
                    b_dh += tl.load(p_dh, mask=m_dh, other=0.0)
                tl.store(p_dh, b_dh, mask=m_dh)


# ------------------------------------------------------------------------------------------------
# launchers (no autograd)
# ------------------------------------------------------------------------------------------------
def _prepare(hidden, mask):
    """int8 mask, [B, 2] response span and 1/n, computed once per call."""
    B, T = mask.shape
    m8 = mask.to(torch.int8).contiguous()
    pos = torch.arange(T, device=mask.device)
    on = m8 != 0
    first = torch.where(on, pos, T).amin(1)
    last = torch.where(on, pos + 1, 0).amax(1)
    span = torch.stack([first, last], 1).to(torch.int32).contiguous()
    n = on.sum(1)
    inv_n = (1.0 / n.clamp(min=1).float()).contiguous()
    return m8, span, inv_n


def sae_pool_fwd(hidden, mask8, span, inv_n, sae: SAEWeights, idx=None):
    """Pooled JumpReLU features [B, F] fp32: every feature (idx None, F = m) or idx [B, F] gathered ones."""
    B, T, D = hidden.shape
    if hidden.stride(2) != 1:
        hidden = hidden.contiguous()
    F = sae.width if idx is None else idx.shape[1]
    out = torch.empty(B, F, device=hidden.device, dtype=torch.float32)
    idx32 = idx.to(torch.int32).contiguous() if idx is not None else span  # unused placeholder when dense
    launch(
        _sae_pool_fwd_kernel, lambda meta: (triton.cdiv(F, meta["BF"]), B),
        hidden, mask8, span, inv_n, sae.weight_as(hidden.dtype), sae.bias, sae.threshold, idx32, out,
        T, D, F, hidden.stride(0), hidden.stride(1),
        GATHER=idx is not None, PRECISION=dot_precision(hidden.dtype),
    )
    return out


def sae_constraint_bwd(hidden, mask8, sae: SAEWeights, idx, coef):
    """dL/dhidden [B, T, d] in hidden's dtype, through the k selected features idx [B, k] only."""
    B, T, D = hidden.shape
    if hidden.stride(2) != 1:
        hidden = hidden.contiguous()
    K = idx.shape[1]
    dh = torch.zeros(B, T, D, device=hidden.device, dtype=torch.float32)
    # one k block holds k <= 64 (the usual k = 50): the gate is computed once per token tile
    BK = min(32 if interpreter_on() else 64, max(16, triton.next_power_of_2(K)))
    launch(
        _sae_constraint_bwd_kernel, lambda meta: (triton.cdiv(T, meta["BT"]), B),
        hidden, mask8, sae.weight_as(hidden.dtype), sae.bias, sae.threshold,
        idx.to(torch.int32).contiguous(), coef.float().contiguous(), dh,
        T, D, K, hidden.stride(0), hidden.stride(1),
        BK=BK, PRECISION=dot_precision(hidden.dtype),
    )
    return dh.to(hidden.dtype)


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------
class SAEFeatureMSEFunction(torch.autograd.Function):
    """D(y) per sequence; saves the hidden states it was given, the selected indices and one
    coefficient per selected feature: O(B*k) beyond what the caller already holds."""

    @staticmethod
    def forward(ctx, hidden, mask, sae, ref_indices, ref_values, k, select, feature_weights):
        m8, span, inv_n = _prepare(hidden, mask)
        if select == "policy":
            pooled = sae_pool_fwd(hidden, m8, span, inv_n, sae)            # [B, m]
            p, idx = pooled.topk(k, dim=1)                                 # [B, k]
            dense = reference._dense_reference(ref_indices, ref_values, sae.width, torch.float32)
            ref = dense.gather(1, idx)
        else:
            idx = ref_indices[:, :k].long()
            p = sae_pool_fwd(hidden, m8, span, inv_n, sae, idx)            # [B, k]
            ref = ref_values[:, :k].float()
        w = torch.ones_like(p) if feature_weights is None else feature_weights.float()[idx]
        diff = p - ref
        ctx.save_for_backward(hidden, m8, idx, 2.0 / k * w * diff * inv_n[:, None])
        ctx.sae = sae
        return (w * diff * diff).sum(1) / k

    @staticmethod
    def backward(ctx, grad_d):
        hidden, m8, idx, coef = ctx.saved_tensors
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = sae_constraint_bwd(hidden, m8, ctx.sae, idx, grad_d.float()[:, None] * coef)
        return (
            grad_hidden,  # hidden
            None,         # mask
            None,         # sae (frozen)
            None,         # ref_indices
            None,         # ref_values (cached reference: a constant)
            None,         # k
            None,         # select
            None,         # feature_weights (not learned)
        )


# ------------------------------------------------------------------------------------------------
# public ops
# ------------------------------------------------------------------------------------------------
def _check_hidden_mask(hidden, mask, sae, check_values):
    if not isinstance(sae, SAEWeights):
        raise ValueError(f"sae must be an fpo_kernels.SAEWeights, got {type(sae).__name__}")
    if not torch.is_tensor(hidden) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a [B, T, d] tensor, got {getattr(hidden, 'shape', type(hidden))}")
    if hidden.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"hidden must be bf16, fp16 or fp32, got {hidden.dtype}")
    B, T, d = hidden.shape
    if d != sae.d_in:
        raise ValueError(f"hidden has d={d} but the SAE expects d_in={sae.d_in}")
    if not torch.is_tensor(mask) or tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must have shape [B, T] = {[B, T]}, got {getattr(mask, 'shape', type(mask))}")
    if mask.dtype.is_floating_point and check_values and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 and 1 (or be bool)")
    for arg, t in (("mask", mask), ("sae", sae.W_enc_t)):
        if t.device != hidden.device:
            raise ValueError(f"{arg} is on {t.device} but hidden is on {hidden.device}")
    if check_values:
        empty = (mask == 0).all(1).nonzero().flatten()
        if empty.numel():
            raise ValueError(f"mask row {empty[0].item()} has no response token (an empty response is bad data)")


def sae_pooled_features(hidden, mask, sae: SAEWeights, check_inputs: bool = True) -> torch.Tensor:
    """Masked mean of the JumpReLU SAE features over each sequence's response tokens.

    hidden [B, T, d] bf16/fp16/fp32, mask [B, T] bool or 0/1 (1 on response tokens), sae: SAEWeights.
    Returns [B, m] float32. Never materialises [B, T, m]. Not differentiable (the training loss is
    sae_feature_mse, which has its own sparse backward); the result is detached.
    check_inputs=False skips the checks that read values (empty rows): for callers that validated their batch.
    """
    _check_hidden_mask(hidden, mask, sae, check_inputs and not is_fake(hidden))
    with torch.no_grad():
        if not use_triton(hidden) or hidden.dtype == torch.float64:
            return reference.sae_pooled_features_ref(hidden, mask, sae).float()
        m8, span, inv_n = _prepare(hidden, mask)
        return sae_pool_fwd(hidden.detach(), m8, span, inv_n, sae)


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
    _check_hidden_mask(hidden, mask, sae, check_inputs)
    B = hidden.shape[0]
    m = sae.width
    if select not in ("policy", "reference"):
        raise ValueError(f"select must be 'policy' or 'reference', got {select!r}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= m:
        raise ValueError(f"k must be an integer in [1, {m}] (the SAE width), got {k!r}")
    if not torch.is_tensor(ref_indices) or ref_indices.dim() != 2 or ref_indices.shape[0] != B:
        raise ValueError(f"ref_indices must be [B, K] with B={B}, got {getattr(ref_indices, 'shape', type(ref_indices))}")
    if ref_indices.dtype.is_floating_point or ref_indices.dtype == torch.bool:
        raise ValueError(f"ref_indices must be an integer tensor, got {ref_indices.dtype}")
    if not torch.is_tensor(ref_values) or ref_values.shape != ref_indices.shape:
        raise ValueError(f"ref_values must have the shape of ref_indices {tuple(ref_indices.shape)}, "
                         f"got {getattr(ref_values, 'shape', type(ref_values))}")
    for arg, t in (("ref_indices", ref_indices), ("ref_values", ref_values)):
        if t.device != hidden.device:
            raise ValueError(f"{arg} is on {t.device} but hidden is on {hidden.device}")
    if select == "reference" and ref_indices.shape[1] < k:
        raise ValueError(f"select='reference' needs at least k={k} cached features, ref_indices has K={ref_indices.shape[1]}")
    if feature_weights is not None:
        if not torch.is_tensor(feature_weights) or feature_weights.shape != (m,):
            raise ValueError(f"feature_weights must have shape [{m}] (the SAE width), "
                             f"got {getattr(feature_weights, 'shape', type(feature_weights))}")
        if feature_weights.device != hidden.device:
            raise ValueError(f"feature_weights is on {feature_weights.device} but hidden is on {hidden.device}")
    if check_inputs:
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
    if not use_triton(hidden) or hidden.dtype == torch.float64:
        return reference.sae_feature_mse_ref(hidden, mask, sae, ref_indices, ref_values, k, select,
                                             feature_weights).float()
    return SAEFeatureMSEFunction.apply(hidden, mask, sae, ref_indices, ref_values, k, select, feature_weights)
