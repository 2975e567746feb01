"""Per-token values -> per-sequence statistics over response tokens, shared by every loss.

Two layouts. Padded: hidden [B, T, d] with a response mask, position t predicting token t + 1. Flat
("varlen", for packed token streams): hidden rows [N, d] and, for each response token, the row that
predicts it, its label and its sequence; a row may predict several tokens (the last prompt token of a
shared prompt predicts the first chosen and the first rejected token). Each op takes the layout's
arguments as keywords, either the padded ones or the flat ones (fla's convention: one entry per op, the layout
chosen by what is passed)."""

from __future__ import annotations

import torch

from ._dispatch import compile_boundary
from .kl import fused_linear_logprobs_kl
from .logprobs import fused_linear_logprobs

__all__ = ["sequence_logprobs", "sequence_logprobs_kl", "prediction_rows"]


def prediction_rows(response_mask: torch.Tensor) -> torch.Tensor:
    """The positions t whose next token t + 1 is a response token: the rows that go through the lm head.

    Compute it where the mask lives on the host (a data loader): on a GPU tensor it is a device sync.

    Args:
        response_mask: [B, T] bool or 0/1, 1 on response tokens.

    Returns:
        [n, 2] (sequence, position), one row per response token after a sequence's first position.
    """
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


def _flat(hidden, input_ids, response_mask, rows, labels, seq_ids, num_seqs):
    """(flat hidden [N, d], rows [n], labels [n], seq_ids [n], S) from either layout: padded (input_ids and
    response_mask [B, T], rows prediction_rows or None) or flat (rows, labels, seq_ids, num_seqs)."""
    if labels is None and seq_ids is None and num_seqs is None:
        if input_ids is None or response_mask is None:
            raise ValueError(
                "pass input_ids and response_mask (padded hidden [B, T, d]), or rows, labels, seq_ids "
                "and num_seqs (flat hidden rows [N, d])"
            )
        if not torch.is_tensor(hidden) or hidden.dim() != 3:
            raise ValueError(f"hidden must be [B, T, d] with input_ids, got {getattr(hidden, 'shape', type(hidden))}")
        B, T, d = hidden.shape
        if input_ids.shape != (B, T) or response_mask.shape != (B, T):
            raise ValueError(f"input_ids and response_mask must be [B, T] = {[B, T]}")
        seq, pos = (prediction_rows(response_mask) if rows is None else rows).t()
        return hidden.reshape(B * T, d), seq * T + pos, input_ids[seq, pos + 1], seq, B
    if input_ids is not None or response_mask is not None:
        raise ValueError(
            "pass either input_ids and response_mask (padded) or labels, seq_ids and num_seqs (flat), not both"
        )
    _check_varlen(hidden, rows, labels, seq_ids, num_seqs)
    return hidden, rows, labels, seq_ids, num_seqs


@compile_boundary
def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed and length-normalised log-probs of each sequence's response tokens.

    Only the rows that predict a response token go through the lm head, chunked (`fused_linear_logprobs`).

    Args:
        hidden: final hidden states. Padded: [B, T, d] (position t predicts token t + 1) with `input_ids` and
            `response_mask`. Flat (a packed stream): [N, d] with `rows`, `labels`, `seq_ids`, `num_seqs`.
        weight: the lm head, [V, d].
        input_ids: padded layout, [B, T].
        response_mask: padded layout, [B, T], 1 on response tokens.
        rows: padded layout: `prediction_rows(response_mask)` on hidden's device, or None to compute it here
            (a device sync on a GPU). Flat layout: [n] integer, the row predicting each response token (rows
            may repeat: a shared prompt's last row predicts two).
        labels: flat layout, [n], the response tokens.
        seq_ids: flat layout, [n] in [0, num_seqs), the sequence each token belongs to.
        num_seqs: flat layout, the number of sequences S.
        softcap: the model's final logit softcap (Gemma-2: 30.0), or None.
        bias: the lm head's bias [V], or None.
        chunk_size: tokens per lm-head chunk (default: from V).

    Returns:
        (sum, mean, count), each [S] float32; S = B (padded) or num_seqs (flat).
    """
    flat, rows, labels, seq_ids, S = _flat(hidden, input_ids, response_mask, rows, labels, seq_ids, num_seqs)
    lp = fused_linear_logprobs(
        flat[rows], weight, labels, softcap=softcap, bias=bias, chunk_size=chunk_size, check_inputs=False
    )
    total = _per_sequence(lp, seq_ids, S)
    count = _per_sequence(torch.ones_like(lp), seq_ids, S)
    return total, total / count.clamp(min=1), count


@compile_boundary
def sequence_logprobs_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TDPO's per-sequence terms over response tokens, from one pass over both models' logits.

    Args:
        hidden: the policy's final hidden states, in either layout of `sequence_logprobs`.
        weight: the policy's lm head, [V, d].
        ref_hidden: the reference's final hidden states on the same layout ([B, T, d_ref] or [N, d_ref]).
        ref_weight: the reference's lm head, [V, d_ref].
        input_ids: padded layout, [B, T], as in `sequence_logprobs`.
        response_mask: padded layout, [B, T].
        rows: the row predicting each response token (flat), or `prediction_rows` / None (padded).
        labels: flat layout, [n], the response tokens.
        seq_ids: flat layout, [n], the sequence of each.
        num_seqs: flat layout, the number of sequences S.
        softcap: the models' final logit softcap, or None.
        bias: the policy's lm-head bias [V], or None.
        chunk_size: tokens per lm-head chunk (default: from V).
        ref_bias: the reference's lm-head bias [V], or None.

    Returns:
        (sum, mean, count, ref_sum, kl_sum), each [S] float32: the policy's log-probs as in
        `sequence_logprobs`, the reference's summed log-probs (a constant) and the summed KL(pi_ref || pi_theta).
    """
    flat, rows, labels, seq_ids, S = _flat(hidden, input_ids, response_mask, rows, labels, seq_ids, num_seqs)
    if not torch.is_tensor(ref_hidden) or ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"ref_hidden must be {list(hidden.shape[:-1]) + ['d_ref']}, the layout of hidden, "
            f"got {getattr(ref_hidden, 'shape', None)}"
        )
    if not torch.is_tensor(ref_weight):
        raise ValueError("ref_weight (the reference's lm head [V, d_ref]) is required")
    ref_flat = ref_hidden.reshape(flat.shape[0], -1)
    logp, ref_logp, kl = fused_linear_logprobs_kl(
        flat[rows],
        weight,
        labels,
        ref_flat[rows],
        ref_weight,
        softcap,
        bias,
        ref_bias,
        chunk_size=chunk_size,
        check_inputs=False,
    )
    total, ref_total, kl_total = (_per_sequence(t, seq_ids, S) for t in (logp, ref_logp, kl))
    count = _per_sequence(torch.ones_like(logp), seq_ids, S)
    return total, total / count.clamp(min=1), count, ref_total, kl_total
