"""Per-token values -> per-sequence statistics over response tokens, shared by every loss.

Two layouts. Padded: hidden [B, T, d] with a response mask, position t predicting token t + 1. Flat
("varlen", for packed token streams): hidden rows [N, d] and, for each response token, the row that
predicts it, its label and its sequence; a row may predict several tokens (the last prompt token of a
shared prompt predicts the first chosen and the first rejected token). The padded functions are thin
wrappers over the flat ones."""
from __future__ import annotations

import torch

from .logprobs import fused_linear_logprobs, fused_linear_logprobs_kl

__all__ = ["masked_sum", "masked_mean", "sequence_logprobs", "sequence_logprobs_kl", "prediction_rows",
           "sequence_logprobs_varlen", "sequence_logprobs_kl_varlen"]


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


def _check_varlen(hidden, rows, labels, seq_ids, num_seqs):
    if not torch.is_tensor(hidden) or hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, d] flat rows, got {getattr(hidden, 'shape', type(hidden))}")
    n = rows.shape[0] if torch.is_tensor(rows) and rows.dim() == 1 else None
    for name, t in (("rows", rows), ("labels", labels), ("seq_ids", seq_ids)):
        if not torch.is_tensor(t) or t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{name} must be a 1-D tensor with one entry per response token (the length of rows)")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if not isinstance(num_seqs, int) or num_seqs < 0:
        raise ValueError(f"num_seqs must be a non-negative integer, got {num_seqs!r}")


def _per_sequence(values, seq_ids, num_seqs):
    zeros = torch.zeros(num_seqs, device=values.device, dtype=torch.float32)
    return zeros.index_add(0, seq_ids, values)


def sequence_logprobs_varlen(hidden, weight, rows, labels, seq_ids, num_seqs: int, softcap=None, bias=None,
                             chunk_size=None):
    """Summed and length-normalised log-probs of each sequence's response tokens, from flat hidden rows.

    hidden [N, d] (a packed stream's final hidden states), weight [V, d] lm head, rows [n] integer: the
    hidden row predicting each response token (rows may repeat), labels [n]: those tokens, seq_ids [n] in
    [0, num_seqs): the sequence each belongs to. Only these n rows go through the lm head.
    Returns (sum [S], mean [S], count [S]) float32, S = num_seqs."""
    _check_varlen(hidden, rows, labels, seq_ids, num_seqs)
    lp = fused_linear_logprobs(hidden[rows], weight, labels, softcap=softcap, bias=bias, chunk_size=chunk_size,
                               check_inputs=False)
    total = _per_sequence(lp, seq_ids, num_seqs)
    count = _per_sequence(torch.ones_like(lp), seq_ids, num_seqs)
    return total, total / count.clamp(min=1), count


def sequence_logprobs_kl_varlen(hidden, weight, rows, labels, seq_ids, num_seqs: int, ref_hidden, ref_weight,
                                softcap=None, bias=None, ref_bias=None, chunk_size=None):
    """TDPO's per-sequence terms from flat hidden rows, one pass over both models' logits
    (fused_linear_logprobs_kl): (sum, mean, count, ref_sum, kl_sum), each [S] float32. ref_hidden [N, d_ref]:
    the reference's final hidden states on the same layout; the other arguments as in sequence_logprobs_varlen."""
    _check_varlen(hidden, rows, labels, seq_ids, num_seqs)
    if not torch.is_tensor(ref_hidden) or ref_hidden.dim() != 2 or ref_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"ref_hidden must be [N, d_ref] with N = {hidden.shape[0]}, got {getattr(ref_hidden, 'shape', None)}")
    logp, ref_logp, kl = fused_linear_logprobs_kl(hidden[rows], weight, labels, ref_hidden[rows], ref_weight, softcap,
                                                  bias, ref_bias, chunk_size=chunk_size, check_inputs=False)
    total, ref_total, kl_total = (_per_sequence(t, seq_ids, num_seqs) for t in (logp, ref_logp, kl))
    count = _per_sequence(torch.ones_like(logp), seq_ids, num_seqs)
    return total, total / count.clamp(min=1), count, ref_total, kl_total


def _padded_as_varlen(hidden, input_ids, response_mask, rows):
    """Padded [B, T] inputs -> (flat hidden [B*T, d], rows, labels, seq_ids) for the varlen functions."""
    B, T, d = hidden.shape
    if input_ids.shape != (B, T) or response_mask.shape != (B, T):
        raise ValueError(f"input_ids and response_mask must be [B, T] = {[B, T]}")
    seq, pos = (prediction_rows(response_mask) if rows is None else rows).t()
    return hidden.reshape(B * T, d), seq * T + pos, input_ids[seq, pos + 1], seq


def sequence_logprobs(hidden, weight, input_ids, response_mask, softcap=None, bias=None, chunk_size=None, rows=None):
    """Summed and length-normalised log-probs of each sequence's response tokens.

    hidden [B, T, d] final hidden states (position t predicts token t + 1), weight [V, d] lm head,
    input_ids [B, T], response_mask [B, T] (1 on response tokens), rows: prediction_rows(response_mask)
    on hidden's device, or None to compute it here (a device sync on a GPU). Only rows that predict a
    response token go through the lm head. Returns (sum [B], mean [B], count [B]) float32.
    """
    flat, r, labels, seq = _padded_as_varlen(hidden, input_ids, response_mask, rows)
    return sequence_logprobs_varlen(flat, weight, r, labels, seq, hidden.shape[0], softcap, bias, chunk_size)


def sequence_logprobs_kl(hidden, weight, input_ids, response_mask, ref_hidden, ref_weight, softcap=None, bias=None,
                         ref_bias=None, chunk_size=None, rows=None):
    """TDPO's per-sequence terms over response tokens, from one pass over both models' logits
    (fused_linear_logprobs_kl): (sum, mean, count, ref_sum, kl_sum), each [B] float32, where sum and mean are
    the policy's log-probs as in sequence_logprobs, ref_sum the reference's summed log-probs (a constant) and
    kl_sum the summed KL(pi_ref || pi_theta). ref_hidden [B, T, d_ref], ref_weight [V, d_ref], ref_bias: the
    reference's final hidden states and lm head; the other arguments as in sequence_logprobs."""
    B, T, _ = hidden.shape
    if ref_hidden.shape[:2] != (B, T):
        raise ValueError(f"ref_hidden must be [B, T, d_ref] with [B, T] = {[B, T]}, got {tuple(ref_hidden.shape)}")
    flat, r, labels, seq = _padded_as_varlen(hidden, input_ids, response_mask, rows)
    return sequence_logprobs_kl_varlen(flat, weight, r, labels, seq, B, ref_hidden.reshape(B * T, -1), ref_weight,
                                       softcap, bias, ref_bias, chunk_size)
