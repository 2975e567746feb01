"""Fused linear log-probs and sequential KL: no [tokens x vocab] logits in memory.

    logp_n = log_softmax(softcap(h_n @ W^T + b))[y_n]                  softcap(z) = c tanh(z / c)
    KL_n   = sum_v q_nv (log q_nv - log p_nv),  q = softmax(softcap(h_ref_n @ W_ref^T)),  p likewise for the policy

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
from ._dispatch import FLOAT_DTYPES, Kernel, compile_boundary, compute_dtype, is_fake, launch, no_autocast, use_triton

__all__ = [
    "fused_linear_logprobs",
    "fused_linear_kl",
    "fused_linear_logprobs_kl",
    "logprobs_fwd",
    "logprobs_bwd",
    "kl_fwd",
    "kl_bwd",
    "FusedLinearLogprobsFunction",
    "FusedLinearKLFunction",
    "default_chunk_size",
    "backward_blocks",
]


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates to +-1 without overflow, and runs under the interpreter.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


# a lane's running max before it has seen a logit: finite, so that exp(_LOW - _LOW) = 1 never meets -inf - -inf
_LOW = tl.constexpr(-1.0e30)


@triton.jit
def _softcap_logits(z, CAP: tl.constexpr, HAS_CAP: tl.constexpr):
    if HAS_CAP:
        z = CAP * _tanh(z / CAP)
    return z


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


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
FORWARD_BYTES = 1 << 29  # 512 MiB of fp32 logits per forward chunk: [C, d] x [d, V] is compute-bound on an H100
BACKWARD_BYTES = 1 << 29  # 512 MiB of logits and dL/dlogits per backward block


# What each kernel takes and the tiles it runs, written once (see _dispatch.Kernel). The row kernels read a chunk's
# fp32 logits whatever the weight's dtype; the backward writes dL/dlogits in the weight's ({dt}). BV is the widest
# vocabulary tile (a narrower vocabulary takes the next power of two).
_ROW_TILES = dict(tiles=dict(BV=1024), interpreted_tiles=dict(BV=4096))
_CAP = dict(CAP=(30.0,), HAS_CAP=(False, True))
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
KERNELS = (LOGPROBS_FWD, LOGPROBS_BWD, KL_FWD, KL_BWD)


def default_chunk_size(V: int, bytes_per_logit: int = 4) -> int:
    """Forward tokens per chunk: a power of two in [16, 8192] whose fp32 logits (4 bytes a logit; 8 with a
    reference's logits too) stay within FORWARD_BYTES. At Gemma-2's 256k vocabulary: 512 rows for log-probs,
    256 with the KL. Each row needs the whole vocabulary for its logsumexp."""
    c = 1 << max(4, (FORWARD_BYTES // max(V * bytes_per_logit, 1)).bit_length() - 1)
    return min(c, 8192)


def backward_blocks(N: int, V: int, bytes_per_logit: int = 6, chunk_size=None):
    """(rows C, vocabulary columns VB) of a backward block. Given the saved logsumexps, dL/dlogits of a block
    needs only the block's own logits, so the backward walks vocabulary blocks (outer) and token chunks (inner):
    grad_weight's block is complete (and fp32-accumulated) when its vocabulary block is, grad_hidden
    accumulates in fp32 across blocks, and at up to 4096 rows a block the head weight is read N / 4096 times."""
    C = min(N, chunk_size or 4096)
    VB = BACKWARD_BYTES // max(C * bytes_per_logit, 1)
    return C, (V if VB >= V else max(128, VB // 128 * 128))


def _half(t) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def _mm_fp32(a, b):
    """a @ b with fp32 output: cuBLAS writes fp32 from half-precision operands on CUDA (and fake tensors
    plan it so); elsewhere, the operands are upcast."""
    if not _half(a):
        return a @ b
    if a.is_cuda or is_fake(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _addmm_fp32_(acc, a, b):
    """acc (fp32) += a @ b for half-precision a, b, with no half-precision rounding of the product."""
    if a.is_cuda or is_fake(a):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _bv(V):
    return min(LOGPROBS_FWD.tile("BV"), triton.next_power_of_2(V))


def _cap_args(softcap):
    return dict(CAP=float(softcap) if softcap is not None else 1.0, HAS_CAP=softcap is not None)


def _chunk_logits(h, weight, bias):
    """A chunk's logits [C, V] in fp32: half-precision logits would carry 0.125 of rounding at |z| ~ 20."""
    z = _mm_fp32(h, weight.t())
    return z if bias is None else z.add_(bias.float())


def _dlogits_buffer(z, weight):
    """Where the backward kernels write dL/dlogits: over the fp32 logits for fp32 weights, else a buffer in
    the weight's dtype, which the two gradient GEMMs read."""
    return z if weight.dtype == torch.float32 else torch.empty(z.shape, dtype=weight.dtype, device=z.device)


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
            BV=_bv(V),
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
            BV=_bv(v1 - v0),
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


def _accumulate(acc, a, b, first):
    """acc (+)= a @ b: written by the first product, then accumulated (fp32 accumulators take half-precision
    operands without rounding the product)."""
    if first and acc.dtype == a.dtype:
        torch.mm(a, b, out=acc)
    elif acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        if first:
            acc.zero_()
        _addmm_fp32_(acc, a, b)


def _blocked_backward(hidden, weight, bias, block, blocks, need_hidden, need_weight, need_bias, grad_dtypes=None):
    """The backward's loop over (vocabulary block, token chunk): the block's logits (fp32), the kernel's
    dL/dlogits (block(z, dz, s, e, v0, v1)), then grad_hidden (fp32 across vocabulary blocks), grad_weight
    (fp32 across token chunks within a block, written once per block) and grad_bias. grad_dtypes: the dtypes
    of grad_hidden and grad_weight (default: the operands'); an fp32 one is accumulated in place."""
    N, d = hidden.shape
    V = weight.shape[0]
    C, VB = blocks
    many_vb, many_tc = V > VB, N > C
    h_dtype, w_dtype = grad_dtypes or (hidden.dtype, weight.dtype)
    half = (torch.float16, torch.bfloat16)
    gh = None
    if need_hidden:
        gh = torch.empty(N, d, device=hidden.device, dtype=torch.float32 if (many_vb and h_dtype in half) else h_dtype)
    gw = torch.empty(V, d, device=weight.device, dtype=w_dtype) if need_weight else None
    gb = torch.empty(V, device=hidden.device, dtype=torch.float32) if (need_bias and bias is not None) else None
    for v0 in range(0, V, VB):
        v1 = min(v0 + VB, V)
        w_blk = weight[v0:v1]
        gw_blk, own_gw = None, many_tc and w_dtype in half  # own_gw: an fp32 accumulator, copied in after the block
        if gw is not None:
            gw_blk = torch.empty(v1 - v0, d, device=weight.device, dtype=torch.float32) if own_gw else gw[v0:v1]
        for s in range(0, N, C):
            e = min(s + C, N)
            z = _chunk_logits(hidden[s:e], w_blk, None if bias is None else bias[v0:v1])  # [C, VB] fp32
            dz = _dlogits_buffer(z, weight)
            block(z, dz, s, e, v0, v1)
            del z
            if gh is not None:
                _accumulate(gh[s:e], dz, w_blk, first=v0 == 0)
            if gw_blk is not None:
                _accumulate(gw_blk, dz.t(), hidden[s:e], first=s == 0)
            if gb is not None:
                part = dz.float().sum(0)
                gb[v0:v1] = part if s == 0 else gb[v0:v1] + part
            del dz  # before the next block's logits: one block alive at a time
        if gw_blk is not None and own_gw:
            gw[v0:v1] = gw_blk
    return (None if gh is None else gh.to(h_dtype), gw, None if gb is None else gb.to(bias.dtype))


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
            BV=_bv(V),
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
            BV=_bv(v1 - v0),
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


def _rows(t, placeholder, s, e):
    """t[s:e], or a placeholder pointer for a kernel argument its constexpr flag leaves unread."""
    return (t if t is not None else placeholder)[s:e]


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------
def _as_compute(dtype, *tensors):
    """The operands in the compute dtype: a copy only where the dtype differs (an fp32 lm head under bf16
    autocast: V x d x 2 bytes, made in the forward and again in the backward, never kept between them)."""
    return [None if t is None else t.to(dtype) for t in tensors]


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


# ------------------------------------------------------------------------------------------------
# public ops
# ------------------------------------------------------------------------------------------------
def _check_linear(hidden, weight, hname="hidden", wname="weight"):
    if not torch.is_tensor(hidden) or hidden.dim() != 2:
        raise ValueError(f"{hname} must be [N, d], got {getattr(hidden, 'shape', type(hidden))}")
    if not torch.is_tensor(weight) or weight.dim() != 2:
        raise ValueError(f"{wname} must be [V, d], got {getattr(weight, 'shape', type(weight))}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{hname} has d={hidden.shape[1]} but {wname} has d={weight.shape[1]}")
    if hidden.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"{hname} must be bf16, fp16 or fp32, got {hidden.dtype}")
    if weight.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"{wname} must be bf16, fp16 or fp32, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{wname} is on {weight.device} but {hname} is on {hidden.device}")


def check_softcap(softcap):
    """None, or a finite number > 0: softcap(z) = c tanh(z / c) at c = inf is inf x 0 (NaN)."""
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < float("inf")
    ):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")


def _check_labels(labels, hidden, V, ignore_index, check_values):
    N = hidden.shape[0]
    if not torch.is_tensor(labels) or tuple(labels.shape) != (N,):
        raise ValueError(f"labels must be [N] = [{N}], got {getattr(labels, 'shape', type(labels))}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    if check_values and not is_fake(labels):  # fake tensors have no values to check
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bad.any():
            i = bad.nonzero()[0].item()
            raise ValueError(
                f"labels[{i}] = {labels[i].item()} is outside [0, {V}) and is not ignore_index={ignore_index}"
            )


def _check_bias(bias, hidden, V, name="bias"):
    if bias is not None and (not torch.is_tensor(bias) or tuple(bias.shape) != (V,) or bias.device != hidden.device):
        raise ValueError(f"{name} must be a [V] = [{V}] tensor on {hidden.device}")


def _check_chunk_size(chunk_size):
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


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
