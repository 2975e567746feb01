"""What the vocabulary-head ops share (fpo_kernels.logprobs, fpo_kernels.kl): the softcap and its tanh inside a
row kernel, the row kernels' tiles, the token chunks and vocabulary blocks that bound the fp32 logits in memory,
the blocked backward's GEMMs, and the checks of a head's inputs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import FLOAT_DTYPES, is_fake


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


FORWARD_BYTES = 1 << 29  # 512 MiB of fp32 logits per forward chunk: [C, d] x [d, V] is compute-bound on an H100
BACKWARD_BYTES = 1 << 29  # 512 MiB of logits and dL/dlogits per backward block


# What each kernel takes and the tiles it runs, written once (see _dispatch.Kernel). The row kernels read a chunk's
# fp32 logits whatever the weight's dtype; the backward writes dL/dlogits in the weight's ({dt}). BV is the widest
# vocabulary tile (a narrower vocabulary takes the next power of two).
_ROW_TILES = dict(tiles=dict(BV=1024), interpreted_tiles=dict(BV=4096))
_CAP = dict(CAP=(30.0,), HAS_CAP=(False, True))


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


def _bv(kernel, V):
    """The vocabulary tile of a row kernel's launch: its widest (the GPU's or the interpreter's), or the next
    power of two of a narrower vocabulary."""
    return min(kernel.tile("BV"), triton.next_power_of_2(V))


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


def _rows(t, placeholder, s, e):
    """t[s:e], or a placeholder pointer for a kernel argument its constexpr flag leaves unread."""
    return (t if t is not None else placeholder)[s:e]


def _as_compute(dtype, *tensors):
    """The operands in the compute dtype: a copy only where the dtype differs (an fp32 lm head under bf16
    autocast: V x d x 2 bytes, made in the forward and again in the backward, never kept between them)."""
    return [None if t is None else t.to(dtype) for t in tensors]


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
