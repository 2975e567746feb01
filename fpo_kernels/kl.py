"""Fused linear sequential KL: no [tokens x vocab] logits of either model in memory.

    KL_n = sum_v q_nv (log q_nv - log p_nv),  q = softmax(softcap(h_ref_n @ W_ref^T)),  p likewise for the policy

with, given labels, both models' log-probs of the labels from the same pass (TDPO's one pass over two heads).
Forward: tokens in chunks, one GEMM per model writing the chunk's fp32 logits, and a Triton row kernel reducing
both (two online logsumexps, the KL, the labels' logits); backward: vocabulary blocks outer, token chunks inner,
as for the log-probs (fpo_kernels.logprobs, whose chunking and blocked backward this module shares through
fpo_kernels._vocab_head). The reference gets no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import Kernel, compile_boundary, compute_dtype, launch, no_autocast, use_triton
from ._vocab_head import (
    _CAP,
    _LOW,
    _ROW_TILES,
    _as_compute,
    _blocked_backward,
    _bv,
    _cap_args,
    _check_bias,
    _check_chunk_size,
    _check_labels,
    _check_linear,
    _chunk_logits,
    _rows,
    _softcap_logits,
    _tanh,
    backward_blocks,
    check_softcap,
    default_chunk_size,
)

__all__ = ["fused_linear_kl", "fused_linear_logprobs_kl", "kl_fwd", "kl_bwd", "FusedLinearKLFunction"]


@triton.jit
def _kl_fwd_kernel(
    logits,  # [C, V] policy raw logits
    ref_logits,  # [C, V] reference raw logits
    valid,  # [C] int8: positions that count
    labels,  # [C] int64 (HAS_LABELS): the tokens whose log-probs are wanted too
    lse,  # [C] fp32 out: policy logsumexp
    ref_lse,  # [C] fp32 out: reference logsumexp
    kl,  # [C] fp32 out
    logp,  # [C] fp32 out (HAS_LABELS): policy log-prob of the label
    ref_logp,  # [C] fp32 out (HAS_LABELS): reference log-prob of the label
    V,
    CAP: tl.constexpr,
    HAS_CAP: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    BV: tl.constexpr,
):
    """KL = sum_v e^{r_v - lse_r} (r_v - t_v) - lse_r + lse_t, all three sums online in one pass, per lane,
    reduced across lanes once at the end; with labels, both models' log-probs of the label from the same pass."""
    i_n = tl.program_id(0).to(tl.int64)
    b_mt = tl.full([BV], _LOW, tl.float32)
    b_st = tl.zeros([BV], dtype=tl.float32)
    b_mr = tl.full([BV], _LOW, tl.float32)
    b_sr = tl.zeros([BV], dtype=tl.float32)
    b_a = tl.zeros([BV], dtype=tl.float32)  # per lane: sum_v e^{r_v - m_r} (r_v - t_v)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        b_t = _softcap_logits(tl.load(logits + i_n * V + o_v, mask=m_v, other=0.0).to(tl.float32), CAP, HAS_CAP)
        b_r = _softcap_logits(tl.load(ref_logits + i_n * V + o_v, mask=m_v, other=0.0).to(tl.float32), CAP, HAS_CAP)
        b_diff = tl.where(m_v, b_r - b_t, 0.0)
        b_t = tl.where(m_v, b_t, -float("inf"))  # after the softcap, which would map -inf to -CAP
        b_r = tl.where(m_v, b_r, -float("inf"))
        b_mtn = tl.maximum(b_mt, b_t)
        b_st = b_st * tl.exp(b_mt - b_mtn) + tl.exp(b_t - b_mtn)
        b_mt = b_mtn
        b_mrn = tl.maximum(b_mr, b_r)
        b_scale = tl.exp(b_mr - b_mrn)
        b_er = tl.exp(b_r - b_mrn)
        b_sr = b_sr * b_scale + b_er
        b_a = b_a * b_scale + b_er * b_diff
        b_mr = b_mrn
    b_max = tl.max(b_mt, 0)
    b_st = tl.sum(b_st * tl.exp(b_mt - b_max), 0)
    b_mt = b_max
    b_max = tl.max(b_mr, 0)
    b_lane = tl.exp(b_mr - b_max)
    b_sr = tl.sum(b_sr * b_lane, 0)
    b_a = tl.sum(b_a * b_lane, 0)
    b_mr = b_max
    b_lt = b_mt + tl.log(b_st)
    b_lr = b_mr + tl.log(b_sr)
    ok = tl.load(valid + i_n) != 0
    tl.store(lse + i_n, b_lt)
    tl.store(ref_lse + i_n, b_lr)
    tl.store(kl + i_n, tl.where(ok, b_a / b_sr - b_lr + b_lt, 0.0))
    if HAS_LABELS:
        y = tl.where(ok, tl.load(labels + i_n), 0)
        inside = (y >= 0) & (y < V)  # a label outside the vocabulary is never read: NaN shows it
        y = tl.where(inside, y, 0)
        b_ty = _softcap_logits(tl.load(logits + i_n * V + y).to(tl.float32), CAP, HAS_CAP)
        b_ry = _softcap_logits(tl.load(ref_logits + i_n * V + y).to(tl.float32), CAP, HAS_CAP)
        tl.store(logp + i_n, tl.where(ok, tl.where(inside, b_ty - b_lt, float("nan")), 0.0))
        tl.store(ref_logp + i_n, tl.where(ok, tl.where(inside, b_ry - b_lr, float("nan")), 0.0))


@triton.jit
def _kl_bwd_kernel(
    logits,  # [C, VB] policy raw logits of one vocabulary block (fp32)
    dlogits,  # [C, VB] out: dL/dlogits in the weight's dtype (may be logits itself)
    ref_logits,  # [C, VB] reference raw logits of the same block
    valid,  # [C] int8
    labels,  # [C] int64 (HAS_LABELS)
    lse,  # [C] fp32
    ref_lse,  # [C] fp32
    grad,  # [C] fp32 upstream dL/dKL
    grad_logp,  # [C] fp32 upstream dL/dlogp (HAS_LABELS)
    VB,
    v_off,
    V,  # block width, its first vocabulary id, the vocabulary size
    CAP: tl.constexpr,
    HAS_CAP: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    BV: tl.constexpr,
):
    """dL/dz_v = (g_kl (softmax(t)_v - softmax(r)_v) + g_logp ([v == y] - softmax(t)_v)) * softcap'(z_v), for the
    block's columns v = v_off + j (the saved logsumexps make blocks independent)."""
    i_n = tl.program_id(0).to(tl.int64)
    ok = tl.load(valid + i_n) != 0
    b_g = tl.where(ok, tl.load(grad + i_n), 0.0)
    b_lt = tl.load(lse + i_n)
    b_lr = tl.load(ref_lse + i_n)
    if HAS_LABELS:
        y = tl.load(labels + i_n)
        b_gl = tl.where(ok & (y >= 0) & (y < V), tl.load(grad_logp + i_n), 0.0)
    for v0 in range(0, VB, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < VB
        b_raw = tl.load(logits + i_n * VB + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_r = _softcap_logits(tl.load(ref_logits + i_n * VB + o_v, mask=m_v, other=0.0).to(tl.float32), CAP, HAS_CAP)
        if HAS_CAP:
            b_th = _tanh(b_raw / CAP)
            b_t = CAP * b_th
        else:
            b_t = b_raw
        b_p = tl.exp(b_t - b_lt)
        b_dz = b_g * (b_p - tl.exp(b_r - b_lr))
        if HAS_LABELS:
            b_dz += b_gl * (tl.where(o_v + v_off == y, 1.0, 0.0) - b_p)
        if HAS_CAP:
            b_dz = b_dz * (1.0 - b_th * b_th)
        tl.store(dlogits + i_n * VB + o_v, b_dz.to(dlogits.dtype.element_ty), mask=m_v)


KL_FWD = Kernel(
    _kl_fwd_kernel,
    {
        "logits": "*fp32",
        "ref_logits": "*fp32",
        "valid": "*i8",
        "labels": "*i64",
        "lse": "*fp32",
        "ref_lse": "*fp32",
        "kl": "*fp32",
        "logp": "*fp32",
        "ref_logp": "*fp32",
        "V": "i32",
    },
    flags=dict(_CAP, HAS_LABELS=(False, True)),
    dtypes=("fp32",),
    **_ROW_TILES,
)
KL_BWD = Kernel(
    _kl_bwd_kernel,
    {
        "logits": "*fp32",
        "dlogits": "*{dt}",
        "ref_logits": "*fp32",
        "valid": "*i8",
        "labels": "*i64",
        "lse": "*fp32",
        "ref_lse": "*fp32",
        "grad": "*fp32",
        "grad_logp": "*fp32",
        "VB": "i32",
        "v_off": "i32",
        "V": "i32",
    },
    flags=dict(_CAP, HAS_LABELS=(False, True)),
    **_ROW_TILES,
)
KERNELS = (KL_FWD, KL_BWD)


def kl_fwd(
    hidden, weight, ref_hidden, ref_weight, valid8, softcap=None, chunk_size=None, labels=None, bias=None, ref_bias=None
):
    """(kl [N] fp32, lse [N], ref_lse [N], logp [N] or None, ref_logp [N] or None): logp and ref_logp,
    the label's log-prob under each model, come with labels."""
    N, V = hidden.shape[0], weight.shape[0]
    C = chunk_size or default_chunk_size(V, 8)
    kl = torch.empty(N, device=hidden.device, dtype=torch.float32)
    lse = torch.empty_like(kl)
    ref_lse = torch.empty_like(kl)
    logp = torch.empty_like(kl) if labels is not None else None
    ref_logp = torch.empty_like(kl) if labels is not None else None
    for s in range(0, N, C):
        e = min(s + C, N)
        z = _chunk_logits(hidden[s:e], weight, bias)
        zr = _chunk_logits(ref_hidden[s:e], ref_weight, ref_bias)
        launch(
            KL_FWD,
            (e - s,),
            logits=z,
            ref_logits=zr,
            valid=valid8[s:e],
            labels=_rows(labels, valid8, s, e),
            lse=lse[s:e],
            ref_lse=ref_lse[s:e],
            kl=kl[s:e],
            logp=_rows(logp, kl, s, e),
            ref_logp=_rows(ref_logp, kl, s, e),
            V=V,
            BV=_bv(KL_FWD, V),
            HAS_LABELS=labels is not None,
            **_cap_args(softcap),
        )
    return kl, lse, ref_lse, logp, ref_logp


def kl_bwd(
    grad_kl,
    hidden,
    weight,
    ref_hidden,
    ref_weight,
    valid8,
    lse,
    ref_lse,
    softcap=None,
    chunk_size=None,
    need_hidden=True,
    need_weight=True,
    labels=None,
    grad_logp=None,
    bias=None,
    ref_bias=None,
    need_bias=True,
    grad_dtypes=None,
):
    """(grad_hidden, grad_weight, grad_bias), each None when not needed; through the KL and, with labels
    and grad_logp, the label's log-prob as well: one pass over the logits for both. grad_dtypes as in
    logprobs_bwd."""
    N, V = hidden.shape[0], weight.shape[0]
    grad_kl = grad_kl.float().contiguous()
    if grad_logp is not None:
        grad_logp = grad_logp.float().contiguous()

    def block(z, dz, s, e, v0, v1):
        zr = _chunk_logits(ref_hidden[s:e], ref_weight[v0:v1], None if ref_bias is None else ref_bias[v0:v1])
        launch(
            KL_BWD,
            (e - s,),
            logits=z,
            dlogits=dz,
            ref_logits=zr,
            valid=valid8[s:e],
            labels=_rows(labels, valid8, s, e),
            lse=lse[s:e],
            ref_lse=ref_lse[s:e],
            grad=grad_kl[s:e],
            grad_logp=_rows(grad_logp, grad_kl, s, e),
            VB=v1 - v0,
            v_off=v0,
            V=V,
            BV=_bv(KL_BWD, v1 - v0),
            HAS_LABELS=labels is not None,
            **_cap_args(softcap),
        )

    return _blocked_backward(
        hidden,
        weight,
        bias,
        block,
        backward_blocks(N, V, 8 + weight.element_size(), chunk_size),
        need_hidden,
        need_weight,
        need_bias,
        grad_dtypes,
    )


class FusedLinearKLFunction(torch.autograd.Function):
    """KL(reference || policy) per position; with labels, both models' log-probs of the labels from the same
    pass (the reference's is a constant)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid8, labels, softcap, chunk_size, dtype
    ):
        hc, wc, rhc, rwc = _as_compute(dtype, hidden, weight, ref_hidden, ref_weight)
        kl, lse, ref_lse, logp, ref_logp = kl_fwd(hc, wc, rhc, rwc, valid8, softcap, chunk_size, labels, bias, ref_bias)
        del hc, wc, rhc, rwc
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid8, labels, lse, ref_lse)
        ctx.args = (softcap, chunk_size, dtype)
        if labels is None:
            return kl
        ctx.mark_non_differentiable(ref_logp)
        return kl, logp, ref_logp

    @staticmethod
    def backward(ctx, grad_kl, grad_logp=None, grad_ref_logp=None):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid8, labels, lse, ref_lse = ctx.saved_tensors
        softcap, chunk_size, dtype = ctx.args
        need = ctx.needs_input_grad
        with no_autocast(hidden):
            hc, wc, rhc, rwc = _as_compute(dtype, hidden, weight, ref_hidden, ref_weight)
            gh, gw, gb = kl_bwd(
                grad_kl,
                hc,
                wc,
                rhc,
                rwc,
                valid8,
                lse,
                ref_lse,
                softcap,
                chunk_size,
                need[0],
                need[1],
                labels,
                grad_logp,
                bias,
                ref_bias,
                need[2],
                (hidden.dtype, weight.dtype),
            )
        return (
            gh,  # hidden
            gw,  # weight
            gb,  # bias
            None,  # ref_hidden (the reference is frozen)
            None,  # ref_weight
            None,  # ref_bias
            None,  # valid mask
            None,  # labels
            None,  # softcap
            None,  # chunk_size
            None,  # dtype
        )


def _check_pair(hidden, weight, ref_hidden, ref_weight):
    _check_linear(hidden, weight)
    _check_linear(ref_hidden, ref_weight, "ref_hidden", "ref_weight")
    N, V = hidden.shape[0], weight.shape[0]
    if ref_hidden.shape[0] != N:
        raise ValueError(f"ref_hidden has {ref_hidden.shape[0]} rows but hidden has {N}")
    if ref_weight.shape[0] != V:
        raise ValueError(f"ref_weight has vocabulary {ref_weight.shape[0]} but weight has {V}")
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")


@compile_boundary
def fused_linear_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    mask: torch.Tensor,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-position KL(pi_ref || pi_theta) over the whole vocabulary without [N, V] logits.

    Precision as in `fused_linear_logprobs`: both models' GEMMs run in compute_dtype(hidden).

    Args:
        hidden: [N, d], the policy's final hidden states (differentiable).
        weight: [V, d], the policy's lm head (differentiable).
        ref_hidden: [N, d_ref], the reference's (a constant).
        ref_weight: [V, d_ref], the reference's lm head (a constant).
        mask: [N] bool or 0/1, the positions that count (0 elsewhere).
        softcap: as in `fused_linear_logprobs`.
        chunk_size: as in `fused_linear_logprobs`.

    Returns:
        [N] float32, >= 0 up to rounding.
    """
    _check_pair(hidden, weight, ref_hidden, ref_weight)
    check_softcap(softcap)
    _check_chunk_size(chunk_size)
    N = hidden.shape[0]
    if not torch.is_tensor(mask) or tuple(mask.shape) != (N,) or mask.device != hidden.device:
        raise ValueError(f"mask must be an [N] = [{N}] tensor on {hidden.device}")
    if N == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    dtype = compute_dtype(hidden)
    with no_autocast(hidden):
        if not use_triton(hidden) or dtype == torch.float64:
            h, w, rh, rw = (t.to(dtype) for t in (hidden, weight, ref_hidden.detach(), ref_weight.detach()))
            return reference.fused_linear_kl_ref(h, w, rh, rw, mask, softcap).float()
        return FusedLinearKLFunction.apply(
            hidden,
            weight,
            None,
            ref_hidden.detach(),
            ref_weight.detach(),
            None,
            mask.to(torch.int8).contiguous(),
            None,
            softcap,
            chunk_size,
            dtype,
        )


@compile_boundary
def fused_linear_logprobs_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    check_inputs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TDPO's per-token terms in one pass over both models' logits, without [N, V] logits:
    (logp [N], ref_logp [N], kl [N]) float32 = the label's log-prob under the policy and under the reference,
    and KL(pi_ref || pi_theta) over the vocabulary; all three 0 where labels == ignore_index.

    Against `fused_linear_logprobs` twice plus `fused_linear_kl`, this computes each model's logits once in the
    forward and the policy's gradient in one backward pass.

    Args:
        hidden: [N, d], the policy's final hidden states (differentiable through logp and kl).
        weight: [V, d], the policy's lm head.
        labels: [N] integer in [0, V), or ignore_index.
        ref_hidden: [N, d_ref], the reference's (a constant).
        ref_weight: [V, d_ref], the reference's lm head.
        softcap: as in `fused_linear_logprobs`, shared by both models.
        bias: the policy's lm-head bias [V], or None.
        ref_bias: the reference's, or None.
        ignore_index: the label of positions that do not count.
        chunk_size: as in `fused_linear_logprobs`.
        check_inputs: False skips the label range check (a sync).

    Returns:
        (logp, ref_logp, kl), each [N] float32.
    """
    _check_pair(hidden, weight, ref_hidden, ref_weight)
    check_softcap(softcap)
    _check_chunk_size(chunk_size)
    N, V = hidden.shape[0], weight.shape[0]
    _check_labels(labels, hidden, V, ignore_index, check_inputs)
    _check_bias(bias, hidden, V)
    _check_bias(ref_bias, hidden, V, "ref_bias")
    if N == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone(), empty.clone()
    dtype = compute_dtype(hidden)
    with no_autocast(hidden):
        if not use_triton(hidden) or dtype == torch.float64:
            h, w, rh, rw = (t.to(dtype) for t in (hidden, weight, ref_hidden.detach(), ref_weight.detach()))
            logp, ref_logp, kl = reference.fused_linear_logprobs_kl_ref(
                h, w, labels, rh, rw, softcap, bias, None if ref_bias is None else ref_bias.detach(), ignore_index
            )
            return logp.float(), ref_logp.float(), kl.float()
        valid8 = (labels != ignore_index).to(torch.int8).contiguous()
        kl, logp, ref_logp = FusedLinearKLFunction.apply(
            hidden,
            weight,
            bias,
            ref_hidden.detach(),
            ref_weight.detach(),
            None if ref_bias is None else ref_bias.detach(),
            valid8,
            labels.long().contiguous(),
            softcap,
            chunk_size,
            dtype,
        )
    return logp, ref_logp, kl
