"""Per-token values -> per-sequence statistics over response tokens, shared by every loss."""
from __future__ import annotations

import torch

from .logprobs import fused_linear_logprobs, fused_linear_logprobs_kl

__all__ = ["masked_sum", "masked_mean", "sequence_logprobs", "sequence_logprobs_kl", "prediction_rows"]


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T], [B, T] -> [B] float32 sum over positions where mask is true."""
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have one shape")
    return torch.where(mask.bool(), values.float(), 0.0).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T], [B, T] -> [B] float32 mean over positions where mask is true (NaN for an empty row)."""
    return masked_sum(values, mask) / mask.bool().sum(-1).float()


def prediction_rows(response_mask: torch.Tensor) -> torch.Tensor:
    """[n, 2] (sequence, position) of the positions t whose next token t + 1 is a response token.
    Compute it where the mask lives on the host (a data loader): on a GPU tensor it is a device sync."""
    return response_mask[:, 1:].bool().nonzero()


def sequence_logprobs(hidden, weight, input_ids, response_mask, softcap=None, bias=None, chunk_size=None, rows=None):
    """Summed and length-normalised log-probs of each sequence's response tokens.

    hidden [B, T, d] final hidden states (position t predicts token t + 1), weight [V, d] lm head,
    input_ids [B, T], response_mask [B, T] (1 on response tokens), rows: prediction_rows(response_mask)
    on hidden's device, or None to compute it here (a device sync on a GPU). Only rows that predict a
    response token go through the lm head. Returns (sum [B], mean [B], count [B]) float32.
    """
    B, T, d = hidden.shape
    if input_ids.shape != (B, T) or response_mask.shape != (B, T):
        raise ValueError(f"input_ids and response_mask must be [B, T] = {[B, T]}")
    target = response_mask[:, 1:].bool()                       # [B, T-1] positions predicting a response token
    rows = tuple((prediction_rows(response_mask) if rows is None else rows).t())
    h = hidden[:, :-1][rows]                                   # [n, d]
    labels = input_ids[:, 1:][rows]
    lp = fused_linear_logprobs(h, weight, labels, softcap=softcap, bias=bias, chunk_size=chunk_size,
                               check_inputs=False)
    total = torch.zeros(B, device=hidden.device, dtype=torch.float32).index_add(0, rows[0], lp)
    count = target.sum(1).float()
    return total, total / count.clamp(min=1), count


def sequence_logprobs_kl(hidden, weight, input_ids, response_mask, ref_hidden, ref_weight, softcap=None, bias=None,
                         ref_bias=None, chunk_size=None, rows=None):
    """TDPO's per-sequence terms over response tokens, from one pass over both models' logits
    (fused_linear_logprobs_kl): (sum, mean, count, ref_sum, kl_sum), each [B] float32, where sum and mean are
    the policy's log-probs as in sequence_logprobs, ref_sum the reference's summed log-probs (a constant) and
    kl_sum the summed KL(pi_ref || pi_theta). ref_hidden [B, T, d_ref], ref_weight [V, d_ref], ref_bias: the
    reference's final hidden states and lm head; the other arguments as in sequence_logprobs."""
    B, T, d = hidden.shape
    if input_ids.shape != (B, T) or response_mask.shape != (B, T):
        raise ValueError(f"input_ids and response_mask must be [B, T] = {[B, T]}")
    if ref_hidden.shape[:2] != (B, T):
        raise ValueError(f"ref_hidden must be [B, T, d_ref] with [B, T] = {[B, T]}, got {tuple(ref_hidden.shape)}")
    rows = tuple((prediction_rows(response_mask) if rows is None else rows).t())
    labels = input_ids[:, 1:][rows]
    logp, ref_logp, kl = fused_linear_logprobs_kl(hidden[:, :-1][rows], weight, labels, ref_hidden[:, :-1][rows],
                                                  ref_weight, softcap, bias, ref_bias, chunk_size=chunk_size,
                                                  check_inputs=False)
    zeros = torch.zeros(B, device=hidden.device, dtype=torch.float32)
    total, ref_total, kl_total = (zeros.index_add(0, rows[0], t) for t in (logp, ref_logp, kl))
    count = response_mask[:, 1:].bool().sum(1).float()
    return total, total / count.clamp(min=1), count, ref_total, kl_total
