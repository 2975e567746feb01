"""Fused linear log-probs: no [tokens x vocab] logits in memory (the sequential KL: fpo_kernels.kl).

    logp_n = log_softmax(softcap(h_n @ W^T + b))[y_n]                  softcap(z) = c tanh(z / c)

Forward: tokens in chunks of C rows; one GEMM writes a chunk's [C, V] logits in fp32 and a Triton row kernel
reduces them (softcap, a per-lane online logsumexp, the label's logit). Backward: the saved logsumexps make
every (token chunk, vocabulary block) independent, so it walks vocabulary blocks outer and token chunks inner:
a block's fp32 logits, a row kernel writing dL/dlogits in the weight's dtype, two GEMMs into grad_hidden
(fp32 across blocks) and the block's grad_weight (fp32 across chunks, written once). Memory: O(C x V) and
O(C x VB), independent of N beyond the gradients themselves.
Saved for backward: the inputs (already alive in the caller) and one logsumexp per token.
The upstream gradient may differ per token (preference losses weight each sequence differently),
so the backward recomputes a chunk's logits rather than folding the gradient into the forward.
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
    _softcap_logits,
    _tanh,
    backward_blocks,
    check_softcap,
    default_chunk_size,
)

__all__ = [
    "fused_linear_logprobs",
    "logprobs_fwd",
    "logprobs_bwd",
    "FusedLinearLogprobsFunction",
    "default_chunk_size",
    "backward_blocks",
    "check_softcap",
]


@triton.jit
def _logprobs_fwd_kernel(
    logits,  # [C, V] one chunk's raw logits (any float dtype), row stride V
    labels,  # [C] int64; ignore_index rows are skipped
    lse,  # [C] fp32 out: logsumexp of the softcapped logits
    logp,  # [C] fp32 out: log-prob of the label, 0 on ignored rows
    V,
    ignore_index,
    CAP: tl.constexpr,
    HAS_CAP: tl.constexpr,
    BV: tl.constexpr,
):
    """lse = logsumexp_v softcap(z_v) with an online max; logp = softcap(z_y) - lse. Each lane keeps its own
    running max and sum, reduced across lanes once at the end: no block-wide reduction per tile."""
    i_n = tl.program_id(0).to(tl.int64)
    p_row = logits + i_n * V
    b_m = tl.full([BV], _LOW, tl.float32)  # per lane: running max and sum of exp(z - max)
    b_s = tl.zeros([BV], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        b_z = _softcap_logits(tl.load(p_row + o_v, mask=m_v, other=0.0).to(tl.float32), CAP, HAS_CAP)
        b_z = tl.where(m_v, b_z, -float("inf"))  # after the softcap, which would map -inf to -CAP
        b_mnew = tl.maximum(b_m, b_z)
        b_s = b_s * tl.exp(b_m - b_mnew) + tl.exp(b_z - b_mnew)
        b_m = b_mnew
    b_max = tl.max(b_m, 0)
    b_s = tl.sum(b_s * tl.exp(b_m - b_max), 0)
    b_m = b_max
    b_lse = b_m + tl.log(b_s)
    y = tl.load(labels + i_n)
    ok = y != ignore_index
    inside = (y >= 0) & (y < V)  # a label outside the vocabulary is never read: NaN shows it
    b_zy = _softcap_logits(tl.load(p_row + tl.where(ok & inside, y, 0)).to(tl.float32), CAP, HAS_CAP)
    tl.store(lse + i_n, b_lse)
    tl.store(logp + i_n, tl.where(ok, tl.where(inside, b_zy - b_lse, float("nan")), 0.0))


@triton.jit
def _logprobs_bwd_kernel(
    logits,  # [C, VB] raw logits of one vocabulary block (fp32)
    dlogits,  # [C, VB] out: dL/dlogits in the weight's dtype (may be logits itself)
    labels,  # [C] int64
    lse,  # [C] fp32 saved logsumexp (of the whole vocabulary)
    grad,  # [C] fp32 upstream dL/dlogp
    VB,
    v_off,
    V,
    ignore_index,  # block width, its first vocabulary id, the vocabulary size
    CAP: tl.constexpr,
    HAS_CAP: tl.constexpr,
    BV: tl.constexpr,
):
    """dL/dz_v = g * ([v == y] - softmax_v) * softcap'(z_v), softcap'(z) = 1 - tanh(z / c)^2, for the block's
    columns v = v_off + j: softmax needs only the saved logsumexp, so blocks are independent."""
    i_n = tl.program_id(0).to(tl.int64)
    p_row = logits + i_n * VB
    y = tl.load(labels + i_n)
    b_g = tl.where((y != ignore_index) & (y >= 0) & (y < V), tl.load(grad + i_n), 0.0)
    b_lse = tl.load(lse + i_n)
    for v0 in range(0, VB, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < VB
        b_raw = tl.load(p_row + o_v, mask=m_v, other=0.0).to(tl.float32)
        if HAS_CAP:
            b_t = _tanh(b_raw / CAP)
            b_z = CAP * b_t
        else:
            b_z = b_raw
        b_dz = b_g * (tl.where(o_v + v_off == y, 1.0, 0.0) - tl.exp(b_z - b_lse))
        if HAS_CAP:
            b_dz = b_dz * (1.0 - b_t * b_t)
        tl.store(dlogits + i_n * VB + o_v, b_dz.to(dlogits.dtype.element_ty), mask=m_v)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
LOGPROBS_FWD = Kernel(
    _logprobs_fwd_kernel,
    {"logits": "*fp32", "labels": "*i64", "lse": "*fp32", "logp": "*fp32", "V": "i32", "ignore_index": "i32"},
    flags=_CAP,
    dtypes=("fp32",),
    **_ROW_TILES,
)
LOGPROBS_BWD = Kernel(
    _logprobs_bwd_kernel,
    {
        "logits": "*fp32",
        "dlogits": "*{dt}",
        "labels": "*i64",
        "lse": "*fp32",
        "grad": "*fp32",
        "VB": "i32",
        "v_off": "i32",
        "V": "i32",
        "ignore_index": "i32",
    },
    flags=_CAP,
    **_ROW_TILES,
)
KERNELS = (LOGPROBS_FWD, LOGPROBS_BWD)


def logprobs_fwd(hidden, weight, labels, bias=None, softcap=None, ignore_index=-100, chunk_size=None):
    """(logp [N] fp32, lse [N] fp32)."""
    N, V = hidden.shape[0], weight.shape[0]
    C = chunk_size or default_chunk_size(V)
    logp = torch.empty(N, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(N, device=hidden.device, dtype=torch.float32)
    for s in range(0, N, C):
        e = min(s + C, N)
        z = _chunk_logits(hidden[s:e], weight, bias)  # [C, V] fp32
        launch(
            LOGPROBS_FWD,
            (e - s,),
            logits=z,
            labels=labels[s:e],
            lse=lse[s:e],
            logp=logp[s:e],
            V=V,
            ignore_index=ignore_index,
            BV=_bv(LOGPROBS_FWD, V),
            **_cap_args(softcap),
        )
    return logp, lse


def logprobs_bwd(
    grad_logp,
    hidden,
    weight,
    labels,
    lse,
    bias=None,
    softcap=None,
    ignore_index=-100,
    chunk_size=None,
    need_hidden=True,
    need_weight=True,
    need_bias=True,
    grad_dtypes=None,
):
    """(grad_hidden, grad_weight, grad_bias), each None when not needed; grad_dtypes: (grad_hidden's,
    grad_weight's) dtype when they differ from the operands' (fp32 master weights, bf16 operands)."""
    N, V = hidden.shape[0], weight.shape[0]
    grad_logp = grad_logp.float().contiguous()

    def block(z, dz, s, e, v0, v1):
        launch(
            LOGPROBS_BWD,
            (e - s,),
            logits=z,
            dlogits=dz,
            labels=labels[s:e],
            lse=lse[s:e],
            grad=grad_logp[s:e],
            VB=v1 - v0,
            v_off=v0,
            V=V,
            ignore_index=ignore_index,
            BV=_bv(LOGPROBS_BWD, v1 - v0),
            **_cap_args(softcap),
        )

    return _blocked_backward(
        hidden,
        weight,
        bias,
        block,
        backward_blocks(N, V, 4 + weight.element_size(), chunk_size),
        need_hidden,
        need_weight,
        need_bias,
        grad_dtypes,
    )


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------
class FusedLinearLogprobsFunction(torch.autograd.Function):
    """hidden and weight as given (saved as given); the GEMMs run in dtype, the gradients come back in the
    inputs' own dtypes."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, softcap, ignore_index, chunk_size, dtype):
        hc, wc = _as_compute(dtype, hidden, weight)
        logp, lse = logprobs_fwd(hc, wc, labels, bias, softcap, ignore_index, chunk_size)
        ctx.save_for_backward(hidden, weight, labels, bias, lse)
        ctx.args = (softcap, ignore_index, chunk_size, dtype)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, labels, bias, lse = ctx.saved_tensors
        softcap, ignore_index, chunk_size, dtype = ctx.args
        with no_autocast(hidden):  # a backward called inside an autocast region
            hc, wc = _as_compute(dtype, hidden, weight)
            gh, gw, gb = logprobs_bwd(
                grad_logp,
                hc,
                wc,
                labels,
                lse,
                bias,
                softcap,
                ignore_index,
                chunk_size,
                *ctx.needs_input_grad[:2],
                ctx.needs_input_grad[3],
                (hidden.dtype, weight.dtype),
            )
        return (
            gh,  # hidden
            gw,  # weight
            None,  # labels
            gb,  # bias
            None,  # softcap
            None,  # ignore_index
            None,  # chunk_size
            None,  # dtype
        )


# ------------------------------------------------------------------------------------------------
# public ops
# ------------------------------------------------------------------------------------------------
@compile_boundary
def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None = None,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """Per-token log-probs log_softmax(softcap(hidden @ weight.T + bias))[labels] without [N, V] logits.

    Differentiable in hidden, weight and bias.

    Args:
        hidden: [N, d], the final hidden states.
        weight: [V, d], the lm head.
        labels: [N] integer in [0, V), or ignore_index.
        softcap: Gemma-2's final logit softcap c (z -> c tanh(z / c)), or None.
        ignore_index: the label of positions that do not count.
        bias: the lm head's bias [V], or None.
        chunk_size: tokens per forward chunk and per backward block (default: default_chunk_size, 512 MiB of
            fp32 logits, and backward_blocks).
        check_inputs: False skips the label range check (a sync).

    Returns:
        [N] float32, 0 where labels == ignore_index.

    Precision: the GEMMs run in compute_dtype(hidden) (autocast's dtype under autocast, else hidden's), with
    fp32 logits, sums and gradient accumulators; a weight in another dtype (fp32 master weights) is cast
    to it inside the op and gets its gradient in its own dtype.
    """
    _check_linear(hidden, weight)
    check_softcap(softcap)
    N, V = hidden.shape[0], weight.shape[0]
    _check_labels(labels, hidden, V, ignore_index, check_inputs)
    _check_bias(bias, hidden, V)
    _check_chunk_size(chunk_size)
    if N == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    dtype = compute_dtype(hidden)
    with no_autocast(hidden):
        if not use_triton(hidden) or dtype == torch.float64:
            return reference.fused_linear_logprobs_ref(
                hidden.to(dtype), weight.to(dtype), labels, softcap, ignore_index, bias
            ).float()
        return FusedLinearLogprobsFunction.apply(
            hidden, weight, labels.long().contiguous(), bias, softcap, ignore_index, chunk_size, dtype
        )
