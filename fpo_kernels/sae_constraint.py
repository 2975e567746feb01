"""Fused SAE feature constraint: encode + JumpReLU + masked pooling (+ top-k + MSE), forward and backward.

    p_s   = (1/n_s) sum_{t in response(s)} JumpReLU(W_enc^T (h_t - b_dec) + b_enc; theta)        [S, m]
    D_s   = (1/k) sum_{i in I_s} w_i (p_si - p_ref_si)^2                                          [S]

The kernels work on flat hidden rows [N, d] and one row span [start, end) per sequence, so padded
batches ([B, T, d] plus a mask: spans b*T + [first, last], the mask marking holes) and packed token
streams (one span per response, no mask) share them. Work is laid out as a table of row tiles: BT rows of
one sequence each (tiles with no response row are skipped).

Forward: one program per (row tile, feature tile), ordered in groups of GROUP row tiles so that the
programs running together share a slice of W_enc and of the hidden rows small enough for L2 (W_enc is read
about N / (GROUP BT) times, not once per row tile); each writes the tile's partial sum over its rows, and a
second kernel adds each sequence's partials in a fixed order: deterministic, no atomics, never [N, m].
Backward, through the k selected features only, in two passes over the row tiles:
    g_ti  = [t in response(s)] coef_si [z_ti > theta_i],   coef_si = dL/dD_s * 2/k w_i (p_si - p_ref_si) / n_s
    dh_t  = sum_{i in I_s} g_ti W_enc[:, i]
the first recomputes the k pre-activations of each row and writes g [N, k]; the second, over (row tile,
d tile) for more programs, accumulates dh on chip across all k and writes it once, in the hidden states'
dtype, with explicit zeros on rows outside every response.
Precision: the hidden rows are taken in compute_dtype (autocast's dtype under autocast: an fp32 residual
stream under bf16 autocast is encoded in bf16, as an nn.Linear there would be), W_enc in the same dtype
(SAEWeights.weight_as), fp32 accumulation and pooling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference, sae_topk
from ._dispatch import (
    FLOAT_DTYPES,
    Kernel,
    compile_boundary,
    dot_precision,
    in_compute_dtype,
    is_fake,
    launch,
    no_autocast,
    use_triton,
)
from ._layout import dense_from_topk
from .sae_weights import SAEWeights

__all__ = [
    "sae_pooled_features",
    "sae_feature_mse",
    "sae_pool_fwd",
    "sae_constraint_bwd",
    "SAEFeatureMSEFunction",
    "Spans",
]


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _tile_rows(tiles, span, mask, i_t, BT: tl.constexpr, HAS_MASK: tl.constexpr):
    """(sequence, rows [BT], rows that are response tokens [BT], rows inside the tile's own range [BT]) of
    row tile i_t: tiles[i_t] = (sequence or -1 for a tile that only holds zeros, first row, end of range)."""
    i_s = tl.load(tiles + i_t * 3).to(tl.int64)
    r0 = tl.load(tiles + i_t * 3 + 1)
    r1 = tl.load(tiles + i_t * 3 + 2)
    o_t = r0 + tl.arange(0, BT)
    m_own = o_t < r1
    lo = tl.load(span + tl.maximum(i_s, 0) * 2)
    hi = tl.load(span + tl.maximum(i_s, 0) * 2 + 1)
    m_t = m_own & (o_t >= lo) & (o_t < hi) & ((o_t * 0 + i_s) >= 0)  # a zero tile (-1) has no response row
    if HAS_MASK:
        m_t = m_t & (tl.load(mask + o_t, mask=m_t, other=0) != 0)
    return i_s, o_t, m_t, m_own


@triton.jit
def _jumprelu_tile(
    h,
    w,
    bias,
    theta,
    o_t,
    m_t,
    feat,
    m_f,
    D,
    stride_h,
    BT: tl.constexpr,
    BF: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Pre-activations z [BT, BF] fp32 of the rows o_t (m_t) of h at the features feat (m_f; ids already in
    range), and whether each fires (z > theta; NaN passes through): shared by the pooling and the gate."""
    b_z = tl.zeros([BT, BF], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        p_h = h + o_t[:, None].to(tl.int64) * stride_h + o_d[None, :]
        b_h = tl.load(p_h, mask=m_t[:, None] & m_d[None, :], other=0.0)  # [BT, BD]
        b_w = tl.load(w + feat[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_f[None, :], other=0.0)  # [BD, BF]
        b_z += tl.dot(b_h, b_w, input_precision=PRECISION)
    b_z += tl.load(bias + feat, mask=m_f, other=0.0)[None, :]
    b_fire = (b_z > tl.load(theta + feat, mask=m_f, other=0.0)[None, :]) | (b_z != b_z)
    return b_z, b_fire


@triton.jit
def _sae_pool_fwd_kernel(
    h,  # [N, D] hidden rows (row stride stride_h, unit stride over D)
    mask,  # [N] int8, 1 on response rows (HAS_MASK); unread otherwise
    span,  # [S, 2] int32: first row of each sequence's response, one past its last
    tiles,  # [n_tiles, 3] int32: (sequence, first row, end of range) of each row tile
    w,  # [M, D] W_enc transposed, same dtype as h
    bias,  # [M] fp32: b_enc - b_dec @ W_enc
    theta,  # [M] fp32 JumpReLU threshold
    idx,  # [S, F] int32 feature ids when GATHER, else unused
    part,  # [n_tiles, F] fp32 out: each row tile's sum of JumpReLU features over its response rows
    D,
    F,
    M,
    stride_h,
    n_tiles,
    HAS_MASK: tl.constexpr,
    GATHER: tl.constexpr,
    BT: tl.constexpr,
    BF: tl.constexpr,
    BD: tl.constexpr,
    GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """part[t, j] = sum_{rows r of tile t in its response} JumpReLU(h[r] @ w[f_j] + bias[f_j]; theta[f_j]),
    f_j = idx[s, j] (GATHER) or j. A gathered id outside [0, M) is never read: its sum is NaN."""
    # grouped order: consecutive programs walk GROUP row tiles, then the next feature tile
    pid = tl.program_id(0)
    n_f = tl.cdiv(F, BF)
    per_group = GROUP * n_f
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_tiles - first, GROUP)
    i_t = (first + (pid % per_group) % size).to(tl.int64)
    i_f = (pid % per_group) // size
    i_s, o_t, m_t, m_own = _tile_rows(tiles, span, mask, i_t, BT, HAS_MASK)
    o_f = i_f * BF + tl.arange(0, BF)
    m_out = o_f < F
    m_f = m_out
    if GATHER:
        feat = tl.load(idx + tl.maximum(i_s, 0) * F + o_f, mask=m_f, other=0).to(tl.int64)
        m_f = m_f & (feat >= 0) & (feat < M)
        feat = tl.where(m_f, feat, 0)
    else:
        feat = o_f.to(tl.int64)
    b_acc = tl.zeros([BF], dtype=tl.float32)
    if tl.max(m_t.to(tl.int32), 0) > 0:  # skip tiles with no response token
        b_z, b_fire = _jumprelu_tile(h, w, bias, theta, o_t, m_t, feat, m_f, D, stride_h, BT, BF, BD, PRECISION)
        b_acc = tl.sum(tl.where(b_fire & m_t[:, None], b_z, 0.0), 0)
    tl.store(part + i_t * F + o_f, tl.where(m_f, b_acc, float("nan")), mask=m_out)


@triton.jit
def _sae_pool_reduce_kernel(
    part,  # [n_tiles, F] fp32 partial sums; a sequence's tiles are consecutive
    tile_start,  # [S + 1] int32: sequence s owns tiles [tile_start[s], tile_start[s + 1])
    inv_n,  # [S] fp32: 1 / number of response rows
    out,  # [S, F] fp32 pooled features
    F,
    BF: tl.constexpr,
):
    """out[s] = inv_n[s] * sum of its tiles' partials, added in tile order: the same bits every run."""
    i_s = tl.program_id(0).to(tl.int64)
    o_f = tl.program_id(1) * BF + tl.arange(0, BF)
    m_f = o_f < F
    t0 = tl.load(tile_start + i_s)
    p_part = part + t0.to(tl.int64) * F + o_f
    b_acc = tl.zeros([BF], dtype=tl.float32)
    for _ in range(t0, tl.load(tile_start + i_s + 1)):
        b_acc += tl.load(p_part, mask=m_f, other=0.0)
        p_part += F
    tl.store(out + i_s * F + o_f, b_acc * tl.load(inv_n + i_s), mask=m_f)


@triton.jit
def _sae_gate_kernel(
    h,  # [N, D] hidden rows (row stride stride_h)
    mask,  # [N] int8 (HAS_MASK)
    span,  # [S, 2] int32
    tiles,  # [n_tiles, 3] int32: (sequence or -1, first row, end of range)
    w,  # [M, D] W_enc transposed, same dtype as h
    bias,  # [M] fp32
    theta,  # [M] fp32
    idx,  # [S, K] int32 selected features
    coef,  # [S, K] fp32: dL/dD_s * 2/k * w_i * (p_si - p_ref_si) / n_s
    g,  # [N, K] out, h's dtype: dL/dz of the selected pre-activations (rows of zero tiles unwritten)
    D,
    K,
    M,
    stride_h,
    HAS_MASK: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """g[r, j] = [r a response row] * coef[s, j] * [h[r] @ w[idx[s, j]] + bias > theta], every row of the tile
    (0 outside the response); ids outside [0, M) are never read (their g is 0)."""
    i_t = tl.program_id(0).to(tl.int64)
    i_s, o_t, m_t, m_own = _tile_rows(tiles, span, mask, i_t, BT, HAS_MASK)
    if i_s >= 0:
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            feat = tl.load(idx + i_s * K + o_k, mask=m_k, other=0).to(tl.int64)
            m_k = m_k & (feat >= 0) & (feat < M)
            feat = tl.where(m_k, feat, 0)
            b_g = tl.zeros([BT, BK], dtype=tl.float32)
            if tl.max(m_t.to(tl.int32), 0) > 0:
                b_z, b_fire = _jumprelu_tile(h, w, bias, theta, o_t, m_t, feat, m_k, D, stride_h, BT, BK, BD, PRECISION)
                b_c = tl.load(coef + i_s * K + o_k, mask=m_k, other=0.0)
                b_g = tl.where(b_fire & m_t[:, None] & m_k[None, :], b_c[None, :], 0.0)  # [BT, BK]
            tl.store(
                g + o_t[:, None].to(tl.int64) * K + o_k[None, :],
                b_g.to(g.dtype.element_ty),
                mask=m_own[:, None] & (o_k < K)[None, :],
            )


@triton.jit
def _sae_dh_kernel(
    g,  # [N, K] dL/dz of the selected pre-activations, h's dtype
    tiles,  # [n_tiles, 3] int32
    w,  # [M, D] W_enc transposed, h's dtype
    idx,  # [S, K] int32 selected features
    dh,  # [N, D] out, h's dtype: written on every row of every tile, zeros where no feature contributes
    D,
    K,
    M,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dh[r, d-tile] = sum_j g[r, j] * w[idx[s, j], d-tile], accumulated on chip over every k block."""
    i_t = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_d = o_d < D
    i_s = tl.load(tiles + i_t * 3).to(tl.int64)
    r0 = tl.load(tiles + i_t * 3 + 1)
    r1 = tl.load(tiles + i_t * 3 + 2)
    o_t = r0 + tl.arange(0, BT)
    m_own = o_t < r1
    b_dh = tl.zeros([BT, BD], dtype=tl.float32)
    if i_s >= 0:
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            feat = tl.load(idx + i_s * K + o_k, mask=m_k, other=0).to(tl.int64)
            m_k = m_k & (feat >= 0) & (feat < M)
            feat = tl.where(m_k, feat, 0)
            b_g = tl.load(
                g + o_t[:, None].to(tl.int64) * K + o_k[None, :], mask=m_own[:, None] & m_k[None, :], other=0.0
            )  # [BT, BK]
            b_w = tl.load(w + feat[:, None] * D + o_d[None, :], mask=m_k[:, None] & m_d[None, :], other=0.0)  # [BK, BD]
            b_dh += tl.dot(b_g, b_w, input_precision=PRECISION)
    tl.store(
        dh + o_t[:, None].to(tl.int64) * D + o_d[None, :],
        b_dh.to(dh.dtype.element_ty),
        mask=m_own[:, None] & m_d[None, :],
    )


# What each kernel takes and the tiles it runs, written once (see _dispatch.Kernel). Row tiles (BT) are fixed per
# pass, since the tile table is laid out on the host for them; the feature and d tiles are autotuned.
_HIDDEN = {
    "h": "*{dt}",
    "mask": "*i8",
    "span": "*i32",
    "tiles": "*i32",
    "w": "*{dt}",
    "bias": "*fp32",
    "theta": "*fp32",
    "idx": "*i32",
}
SAE_POOL_FWD = Kernel(
    _sae_pool_fwd_kernel,
    {**_HIDDEN, "part": "*fp32", "D": "i32", "F": "i32", "M": "i32", "stride_h": "i32", "n_tiles": "i32"},
    tiles=dict(BT=128),
    interpreted_tiles=dict(BT=16),
    flags=dict(HAS_MASK=(False, True), GATHER=(False, True)),
    dot=True,
    autotune_key=["D", "F", "GATHER", "HAS_MASK"],
    configs=[
        (dict(BF=128, BD=64, GROUP=16), 8, 3),
        (dict(BF=64, BD=64, GROUP=16), 4, 3),
        (dict(BF=128, BD=64, GROUP=8), 8, 4),
        (dict(BF=256, BD=32, GROUP=16), 8, 3),
    ],
    interpreted_config=dict(BF=32, BD=32, GROUP=2),
)
SAE_POOL_REDUCE = Kernel(  # reads fp32 partial sums whatever the hidden dtype
    _sae_pool_reduce_kernel,
    {"part": "*fp32", "tile_start": "*i32", "inv_n": "*fp32", "out": "*fp32", "F": "i32"},
    tiles=dict(BF=1024),
    interpreted_tiles=dict(BF=256),
    dtypes=("fp32",),
)
SAE_GATE = Kernel(
    _sae_gate_kernel,
    {**_HIDDEN, "coef": "*fp32", "g": "*{dt}", "D": "i32", "K": "i32", "M": "i32", "stride_h": "i32"},
    tiles=dict(BT=64, BK=64),
    interpreted_tiles=dict(BT=16, BK=32),
    flags=dict(HAS_MASK=(False, True)),
    dot=True,
    autotune_key=["D", "K", "HAS_MASK"],
    configs=[(dict(BD=64), 4, 3), (dict(BD=128), 8, 3)],
    interpreted_config=dict(BD=32),
)
SAE_DH = Kernel(
    _sae_dh_kernel,
    {"g": "*{dt}", "tiles": "*i32", "w": "*{dt}", "idx": "*i32", "dh": "*{dt}", "D": "i32", "K": "i32", "M": "i32"},
    tiles=dict(BT=64, BK=64),
    interpreted_tiles=dict(BT=16, BK=32),
    dot=True,
    autotune_key=["D", "K"],
    configs=[(dict(BD=64), 4, 3), (dict(BD=128), 8, 3)],
    interpreted_config=dict(BD=32),
)
KERNELS = (SAE_POOL_FWD, SAE_POOL_REDUCE, SAE_GATE, SAE_DH)
# the gate and dh walk one tile table, laid out for one row-tile height
assert (SAE_GATE.tiles, SAE_GATE.interpreted_tiles) == (SAE_DH.tiles, SAE_DH.interpreted_tiles)


# ------------------------------------------------------------------------------------------------
# launchers (no autograd)
# ------------------------------------------------------------------------------------------------
class Spans:
    """Where each sequence's response lies in the flat hidden rows, computed once per call:
    span [S, 2] int32 (start, end) on the device, inv_n [S] fp32, mask8 [N] int8 or None (rows inside a span
    that are not response tokens: holes of a padded mask), and the row-tile tables the kernels walk, laid
    out on the host (from the host's copy of the spans, or, for a padded batch, from its shape alone)."""

    def __init__(self, span, inv_n, mask8, n_rows, host_spans=None, padded=None):
        self.span, self.inv_n, self.mask8, self.n_rows = span, inv_n, mask8, n_rows
        self._host, self._padded, self._tables = host_spans, padded, {}

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
        return cls(span, inv_n, m8.reshape(-1), B * T, padded=(B, T))

    @classmethod
    def from_spans(cls, spans, n_rows, device):
        """Response spans [S, 2] (start, end) over n_rows flat rows, every row of a span a response token;
        spans on the host or the device (a host copy is what the tile table needs: a sync if on the GPU)."""
        host = spans.detach().to("cpu", torch.int64) if not is_fake(spans) else None
        span = spans.to(device=device, dtype=torch.int32).contiguous()
        n = (span[:, 1] - span[:, 0]).clamp(min=1)
        return cls(span, (1.0 / n.float()).contiguous(), None, n_rows, host_spans=host)

    @property
    def count(self):
        return self.span.shape[0]

    def tiles(self, BT):
        """(tiles [n, 3] int32 on the device, tile_start [S + 1] int32, number of tiles): the sequence's row
        tiles in order, then zero tiles over the rows no span covers (the backward writes zeros there)."""
        if BT not in self._tables:
            rows, starts = [], [0]
            if self._padded is not None:  # every row of every sequence, whatever its mask
                B, T = self._padded
                for b in range(B):
                    rows += [(b, r, b * T + T) for r in range(b * T, b * T + T, BT)]
                    starts.append(len(rows))
            elif self._host is not None:
                covered = []
                for s, (lo, hi) in enumerate(self._host.tolist()):
                    rows += [(s, r, hi) for r in range(lo, hi, BT)]
                    starts.append(len(rows))
                    covered.append((lo, hi))
                pos = 0
                for lo, hi in sorted(covered) + [(self.n_rows, self.n_rows)]:
                    rows += [(-1, r, lo) for r in range(pos, lo, BT)]
                    pos = max(pos, hi)
            else:  # fake tensors: shapes only (one tile per BT rows)
                rows = [(0, r, self.n_rows) for r in range(0, self.n_rows, BT)]
                starts += [len(rows)] * self.count
            dev = self.span.device
            self._tables[BT] = (
                torch.tensor(rows or [(-1, 0, 0)], dtype=torch.int32, device=dev),
                torch.tensor(starts, dtype=torch.int32, device=dev),
                len(rows),
            )
        return self._tables[BT]


def sae_pool_fwd(hidden, spans: Spans, sae: SAEWeights, idx=None):
    """Pooled JumpReLU features [S, F] fp32 of flat hidden rows [N, d]: every feature (idx None, F = m) or
    idx [S, F] gathered ones."""
    N, D = hidden.shape
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    S = spans.count
    F = sae.width if idx is None else idx.shape[1]
    BT = SAE_POOL_FWD.tile("BT")
    tiles, tile_start, n_tiles = spans.tiles(BT)
    n_tiles = max(n_tiles, 1)
    part = torch.empty(n_tiles, F, device=hidden.device, dtype=torch.float32)
    out = torch.empty(S, F, device=hidden.device, dtype=torch.float32)
    has_mask = spans.mask8 is not None
    launch(
        SAE_POOL_FWD,
        lambda meta: (n_tiles * triton.cdiv(F, meta["BF"]),),
        h=hidden,
        mask=spans.mask8 if has_mask else spans.span,
        span=spans.span,
        tiles=tiles,
        w=sae.weight_as(hidden.dtype),
        bias=sae.bias,
        theta=sae.threshold,
        idx=idx.to(torch.int32).contiguous() if idx is not None else spans.span,  # a placeholder when dense
        part=part,
        D=D,
        F=F,
        M=sae.width,
        stride_h=hidden.stride(0),
        n_tiles=n_tiles,
        HAS_MASK=has_mask,
        GATHER=idx is not None,
        BT=BT,
        PRECISION=dot_precision(hidden.dtype),
    )
    BF = SAE_POOL_REDUCE.tile("BF")
    launch(
        SAE_POOL_REDUCE,
        (S, triton.cdiv(F, BF)),
        part=part,
        tile_start=tile_start,
        inv_n=spans.inv_n,
        out=out,
        F=F,
        BF=BF,
    )
    return out


def sae_constraint_bwd(hidden, spans: Spans, sae: SAEWeights, idx, coef):
    """dL/dhidden [N, d] in hidden's dtype, through the k selected features idx [S, k] only; zero outside the
    spans. Two passes: the gate g [N, k], then dh accumulated on chip over all k."""
    N, D = hidden.shape
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    K = idx.shape[1]
    BT = SAE_GATE.tile("BT")  # the gate and dh walk the same tile table
    tiles, _, n_tiles = spans.tiles(BT)
    n_tiles = max(n_tiles, 1)
    w = sae.weight_as(hidden.dtype)
    idx32 = idx.to(torch.int32).contiguous()
    g = torch.empty(N, K, device=hidden.device, dtype=hidden.dtype)
    dh = torch.empty(N, D, device=hidden.device, dtype=hidden.dtype)
    # one k block holds k <= 64 (the usual k = 50): the gate is computed once per row tile
    BK = min(SAE_GATE.tile("BK"), max(16, triton.next_power_of_2(K)))
    has_mask = spans.mask8 is not None
    launch(
        SAE_GATE,
        (n_tiles,),
        h=hidden,
        mask=spans.mask8 if has_mask else spans.span,
        span=spans.span,
        tiles=tiles,
        w=w,
        bias=sae.bias,
        theta=sae.threshold,
        idx=idx32,
        coef=coef.float().contiguous(),
        g=g,
        D=D,
        K=K,
        M=sae.width,
        stride_h=hidden.stride(0),
        HAS_MASK=has_mask,
        BT=BT,
        BK=BK,
        PRECISION=dot_precision(hidden.dtype),
    )
    launch(
        SAE_DH,
        lambda meta: (n_tiles, triton.cdiv(D, meta["BD"])),
        g=g,
        tiles=tiles,
        w=w,
        idx=idx32,
        dh=dh,
        D=D,
        K=K,
        M=sae.width,
        BT=BT,
        BK=BK,
        PRECISION=dot_precision(hidden.dtype),
    )
    return dh


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------
class SAEFeatureMSEFunction(torch.autograd.Function):
    """D(y) per sequence from flat hidden rows [N, d]; saves the hidden rows it was given, the selected
    indices and one coefficient per selected feature: O(S*k) beyond what the caller already holds."""

    @staticmethod
    def forward(ctx, hidden, spans, sae, ref_indices, ref_values, k, select, feature_weights):
        if select == "policy":
            pooled = sae_pool_fwd(hidden, spans, sae)  # [S, m]
            p, idx = pooled.topk(k, dim=1)  # [S, k]
            dense = dense_from_topk(ref_indices, ref_values, sae.width, torch.float32)
            ref = dense.gather(1, idx)
        else:
            idx = ref_indices[:, :k].long()
            p = sae_pool_fwd(hidden, spans, sae, idx)  # [S, k]
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
            with no_autocast(hidden):  # a backward called inside an autocast region
                grad_hidden = sae_constraint_bwd(hidden, ctx.spans, ctx.sae, idx, grad_d.float()[:, None] * coef)
        return (
            grad_hidden,  # hidden
            None,  # spans
            None,  # sae (frozen)
            None,  # ref_indices
            None,  # ref_values (cached reference: a constant)
            None,  # k
            None,  # select
            None,  # feature_weights (not learned)
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


def _check_spans(hidden, spans, check_values):
    N = hidden.shape[0]
    if not torch.is_tensor(spans) or spans.dim() != 2 or spans.shape[1] != 2:
        raise ValueError(
            f"spans must be an [S, 2] tensor of (start, end) rows, got {getattr(spans, 'shape', type(spans))}"
        )
    if spans.dtype.is_floating_point or spans.dtype == torch.bool:
        raise ValueError(f"spans must be an integer tensor, got {spans.dtype}")
    if spans.device != hidden.device and spans.device.type != "cpu":
        raise ValueError(f"spans is on {spans.device}: it must be on hidden's device ({hidden.device}) or the host")
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
        raise ValueError(
            f"ref_indices must be [S, K] with S={S} sequences, got {getattr(ref_indices, 'shape', type(ref_indices))}"
        )
    if ref_indices.dtype.is_floating_point or ref_indices.dtype == torch.bool:
        raise ValueError(f"ref_indices must be an integer tensor, got {ref_indices.dtype}")
    if not torch.is_tensor(ref_values) or ref_values.shape != ref_indices.shape:
        raise ValueError(
            f"ref_values must have the shape of ref_indices {tuple(ref_indices.shape)}, "
            f"got {getattr(ref_values, 'shape', type(ref_values))}"
        )
    for arg, t in (("ref_indices", ref_indices), ("ref_values", ref_values)):
        if t.device != device:
            raise ValueError(f"{arg} is on {t.device} but hidden is on {device}")
    if select == "reference" and ref_indices.shape[1] < k:
        raise ValueError(
            f"select='reference' needs at least k={k} cached features, ref_indices has K={ref_indices.shape[1]}"
        )
    if feature_weights is not None:
        if not torch.is_tensor(feature_weights) or feature_weights.shape != (m,):
            raise ValueError(
                f"feature_weights must have shape [{m}] (the SAE width), "
                f"got {getattr(feature_weights, 'shape', type(feature_weights))}"
            )
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
                raise ValueError(
                    f"select='reference': ref_indices row {short[0].item()} has fewer than k={k} valid cached features"
                )
        if feature_weights is not None and (feature_weights < 0).any():
            raise ValueError("feature_weights must be >= 0")


# ------------------------------------------------------------------------------------------------
# public ops
# ------------------------------------------------------------------------------------------------
def _flat_rows(hidden, mask, spans, sae, check_inputs):
    """Checks hidden against the layout it comes in: padded ([B, T, d] and mask [B, T]) or flat ([N, d] and
    spans [S, 2]); returns (flat rows [N, d], number of sequences)."""
    if (mask is None) == (spans is None):
        raise ValueError(
            "pass either mask (padded hidden [B, T, d]) or spans (flat hidden rows [N, d]), not "
            + ("both" if mask is not None else "neither")
        )
    if spans is None:
        _check_sae_hidden(hidden, sae, 3, "[B, T, d]")
        _check_mask(hidden, mask, check_inputs)
        return hidden.reshape(-1, hidden.shape[-1]), hidden.shape[0]
    _check_sae_hidden(hidden, sae, 2, "[N, d]")
    _check_spans(hidden, spans, check_inputs)
    return hidden, spans.shape[0]


def _pooled_ref(hidden, mask, spans, sae):
    if spans is None:
        return reference.sae_pooled_features_ref(hidden, mask, sae)
    return reference.sae_pooled_features_spans_ref(hidden, spans.to(hidden.device), sae)


def _mse_ref(hidden, mask, spans, sae, *args):
    if spans is None:
        return reference.sae_feature_mse_ref(hidden, mask, sae, *args)
    return reference.sae_feature_mse_spans_ref(hidden, spans.to(hidden.device), sae, *args)


def _spans(flat, mask, spans):
    return Spans.from_mask(mask) if spans is None else Spans.from_spans(spans, flat.shape[0], flat.device)


@compile_boundary
@in_compute_dtype
def sae_pooled_features(
    hidden: torch.Tensor,
    sae: SAEWeights,
    *,
    mask: torch.Tensor | None = None,
    spans: torch.Tensor | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """Masked mean of the SAE's features over each sequence's response tokens. Never materialises [N, m].

    Not differentiable: the training loss is `sae_feature_mse`, which has its own sparse backward.

    Args:
        hidden: the residual stream at the SAE's layer, bf16/fp16/fp32. Padded: [B, T, d] with `mask`.
            Flat (a packed token stream): [N, d] rows with `spans`.
        sae: the frozen encoder and its activation.
        mask: padded layout only, [B, T] bool or 0/1, 1 on response tokens.
        spans: flat layout only, [S, 2] integer (start, end) rows of each sequence's response, non-overlapping
            and non-empty; best on the host (the kernels lay out their row tiles from a host copy, which a GPU
            tensor costs a sync).
        check_inputs: False skips the checks that read values (empty rows, span bounds), for callers that
            validated their batch.

    Returns:
        [S, m] float32, detached; S = B (padded) or the number of spans (flat).
    """
    check_inputs = check_inputs and not is_fake(hidden)
    flat, S = _flat_rows(hidden, mask, spans, sae, check_inputs)
    with torch.no_grad():
        if not use_triton(hidden) or hidden.dtype == torch.float64:
            return _pooled_ref(hidden, mask, spans, sae).float()
        if sae.activation == "topk":
            rows, seq, inv_n, _ = sae_topk.topk_rows(hidden.device, mask=mask, spans=spans)
            return sae_topk.topk_pool_fwd(flat.detach(), rows, seq, S, inv_n, sae)[0].float()
        return sae_pool_fwd(flat.detach(), _spans(flat, mask, spans), sae)


@compile_boundary
@in_compute_dtype
def sae_feature_mse(
    hidden: torch.Tensor,
    sae: SAEWeights,
    ref_indices: torch.Tensor,
    ref_values: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    spans: torch.Tensor | None = None,
    k: int = 50,
    select: str = "policy",
    feature_weights: torch.Tensor | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """FPO's feature constraint D(y) = (1/k) sum_{i in I} w_i (p_i - p_ref_i)^2 for each sequence.

    Differentiable in hidden only; rows outside every response get zero gradient.

    Args:
        hidden: the residual stream at the SAE's layer: [B, T, d] with `mask`, or flat rows [N, d] with `spans`
            (as in `sae_pooled_features`).
        sae: the frozen encoder and its activation.
        ref_indices: [S, K] integer, the cached reference's top-K pooled features (-1 = empty slot).
        ref_values: [S, K], their pooled values.
        mask: padded layout only, [B, T], 1 on response tokens.
        spans: flat layout only, [S, 2] (start, end) of each sequence's response rows.
        k: features in the constraint, 1 <= k <= m.
        select: "policy" (top-k of the policy's pooled features; a feature absent from the cache has reference
            value 0) or "reference" (the first k cached features, which needs only k columns of W_enc).
        feature_weights: [m] >= 0, or None for 1 everywhere.
        check_inputs: False skips the checks that read tensor values (empty rows, index range, valid slots),
            for callers that validated their batch once.

    Returns:
        D, [S] float32.
    """
    check_inputs = check_inputs and not is_fake(hidden)  # fake tensors have no values to check
    flat, S = _flat_rows(hidden, mask, spans, sae, check_inputs)
    _check_reference(S, sae.width, ref_indices, ref_values, k, select, feature_weights, hidden.device, check_inputs)
    if not use_triton(hidden) or hidden.dtype == torch.float64:
        return _mse_ref(hidden, mask, spans, sae, ref_indices, ref_values, k, select, feature_weights).float()
    if sae.activation == "topk":
        rows, seq, inv_n, offsets = sae_topk.topk_rows(hidden.device, mask=mask, spans=spans)
        return sae_topk.TopKFeatureMSEFunction.apply(
            flat, rows, seq, offsets, inv_n, sae, ref_indices, ref_values, k, select, feature_weights
        )
    return SAEFeatureMSEFunction.apply(
        flat, _spans(flat, mask, spans), sae, ref_indices, ref_values, k, select, feature_weights
    )
