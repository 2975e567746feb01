"""Row and feature layouts the fast paths share (the SAE constraint, TopK SAEs, the cache). The test oracle,
fpo_kernels.reference, writes its own: it shares no code with what it checks."""

from __future__ import annotations

import torch

__all__ = ["dense_from_topk", "span_rows"]


def dense_from_topk(ref_indices, ref_values, width, dtype):
    """[S, K] sparse (index, value) with -1 for empty slots -> [S, m] dense, 0 where absent. A row holding an
    index outside [-1, width) (a wrong cache, unchecked) is all NaN rather than an out-of-bounds scatter."""
    idx = ref_indices.long()
    valid = (idx >= 0) & (idx < width)
    broken = ((idx < -1) | (idx >= width)).any(1)
    dense = torch.zeros(ref_indices.shape[0], width, dtype=dtype, device=ref_values.device)
    vals = torch.where(valid, ref_values.to(dtype), torch.zeros((), dtype=dtype, device=ref_values.device))
    dense.scatter_add_(1, torch.where(valid, idx, 0), vals)
    return torch.where(broken[:, None], torch.full_like(dense, float("nan")), dense)


def span_rows(spans: torch.Tensor):
    """[S, 2] (start, end) spans -> (rows [n], seq [n]): every row of every span and the span it belongs to."""
    starts, ends = spans[:, 0].long(), spans[:, 1].long()
    lengths = (ends - starts).clamp(min=0)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=spans.device), lengths)
    offset = torch.arange(seq.numel(), device=spans.device) - (lengths.cumsum(0) - lengths)[seq]
    return starts[seq] + offset, seq
