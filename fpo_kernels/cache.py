"""Sparse-index cache packing: the reference's top-K pooled SAE features per sequence, in packed dtypes.

Indices are int16 when the SAE width is at most 32768 (every index fits), else int32; values are bf16;
slots past the width (K > m) hold index -1 and value 0. Entries are sorted by descending value, so the
first k of a row are its top-k: select="reference" reads them directly.
"""
from __future__ import annotations

import torch

__all__ = ["pack_topk", "unpack_topk", "index_dtype_for", "VALUE_DTYPE"]

VALUE_DTYPE = torch.bfloat16
INT16_MAX_WIDTH = 32768


def index_dtype_for(width: int) -> torch.dtype:
    """int16 holds every index of a width up to 32768 (indices 0..32767), int32 beyond."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    return torch.int16 if width <= INT16_MAX_WIDTH else torch.int32


def pack_topk(pooled: torch.Tensor, K: int):
    """[B, m] pooled features -> (indices [B, K] int16/int32, values [B, K] bf16), descending by value.

    NaN in pooled is an error (a cache must never hold garbage)."""
    if not torch.is_tensor(pooled) or pooled.dim() != 2 or not pooled.dtype.is_floating_point:
        raise ValueError(f"pooled must be a [B, m] float tensor, got {getattr(pooled, 'shape', type(pooled))}")
    if not isinstance(K, int) or isinstance(K, bool) or K < 1:
        raise ValueError(f"K must be a positive integer, got {K!r}")
    if torch.isnan(pooled).any():
        row = torch.isnan(pooled).any(1).nonzero()[0].item()
        raise ValueError(f"pooled row {row} holds NaN")
    B, m = pooled.shape
    kk = min(K, m)
    vals, idx = pooled.float().topk(kk, dim=1, sorted=True)
    indices = torch.full((B, K), -1, dtype=index_dtype_for(m), device=pooled.device)
    values = torch.zeros(B, K, dtype=VALUE_DTYPE, device=pooled.device)
    indices[:, :kk] = idx.to(indices.dtype)
    values[:, :kk] = vals.to(VALUE_DTYPE)
    return indices, values


def unpack_topk(indices: torch.Tensor, values: torch.Tensor, width: int) -> torch.Tensor:
    """(indices [B, K], values [B, K]) -> dense [B, width] float32, 0 where absent."""
    if indices.shape != values.shape or indices.dim() != 2:
        raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must be equal [B, K] shapes")
    wide = indices.int()  # an int16 tensor compared with 32768 would overflow
    if ((wide < -1) | (wide >= width)).any():
        raise ValueError(f"indices hold values outside [-1, {width})")
    from .reference import _dense_reference
    return _dense_reference(indices, values, width, torch.float32)
