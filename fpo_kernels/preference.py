"""Drop-in fused preference losses for other trainers: lm-head weight, final hidden states and shifted labels in,
the mean loss and the usual metrics out, never [tokens, vocab] logits.

The calling convention is Liger-Kernel's chunked preference losses (and so TRL's `use_liger_kernel`):

    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, *aux) =
        module(lin_weight [V, d], _input [2P, T, d], target [2P, T], bias=None, ...)

with the chosen sequences in the first P rows and the rejected in the last P, `target` aligned with `_input`
(the caller shifts: row t of `_input` predicts `target[t]`) and `ignore_index` on every position that is not a
response token. A packed micro-batch works too: `_input [N, d]`, `target [N]` and `seq_ids [N]` (sequence
p for chosen p, P + p for rejected p). Only the rows that predict a response token go through the lm head;
Gemma-2's final logit softcap is an argument (Liger has none). `aux` is (chosen_rewards, rejected_rewards)
as in Liger, then a dict of our metrics (margins, accuracy, and D or KL).

    FusedLinearSimPOLoss   u = beta a_w - beta a_l - gamma                       (a = mean log-prob)
    FusedLinearDPOLoss     u = beta ((s_w - s_ref_w) - (s_l - s_ref_l))         reference log-probs passed in
    FusedLinearTDPOLoss    TDPO1 / TDPO2 with the reference's hidden states and head: KL from one pass
    FusedLinearFPOLoss     u = beta ((a_w - a_l) - g_ref - alpha (D_l - sg D_w)), D from the SAE op
"""
from __future__ import annotations

import torch
from torch import nn

from .losses import dpo_loss, fpo_loss, simpo_loss, tdpo_loss
from .sae_constraint import sae_feature_mse
from .sequence import sequence_logprobs_kl_varlen, sequence_logprobs_varlen

__all__ = ["FusedLinearSimPOLoss", "FusedLinearDPOLoss", "FusedLinearTDPOLoss", "FusedLinearFPOLoss",
           "response_rows"]


def response_rows(_input, target, ignore_index=-100, seq_ids=None):
    """(flat hidden [rows, d], rows [n], labels [n], seq_ids [n], number of sequences) of the positions that
    predict a response token, from the padded [2P, T, d] / [2P, T] layout or a packed one (seq_ids [N])."""
    if not torch.is_tensor(_input) or _input.dim() not in (2, 3):
        raise ValueError(f"_input must be [2P, T, d] or packed [N, d], got {getattr(_input, 'shape', type(_input))}")
    if not torch.is_tensor(target) or tuple(target.shape) != tuple(_input.shape[:-1]):
        raise ValueError(f"target must have _input's leading shape {tuple(_input.shape[:-1])} (the caller shifts it), "
                         f"got {getattr(target, 'shape', type(target))}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor, got {target.dtype}")
    keep = target.reshape(-1) != ignore_index
    if _input.dim() == 3:
        if seq_ids is not None:
            raise ValueError("seq_ids is for packed inputs [N, d]; a padded [2P, T, d] input numbers its rows itself")
        S, T, d = _input.shape
        if S % 2:
            raise ValueError(f"_input must hold 2P sequences, chosen first then rejected; got {S}")
        seq_all = torch.arange(S, device=_input.device).repeat_interleave(T)
    else:
        if seq_ids is None or not torch.is_tensor(seq_ids) or tuple(seq_ids.shape) != tuple(target.shape):
            raise ValueError("a packed _input [N, d] needs seq_ids [N]: p for chosen p, P + p for rejected p")
        seq_all = seq_ids.reshape(-1).long()
        S = int(seq_all[keep].max()) + 1 if keep.any() else 0
        if S % 2:
            raise ValueError(f"seq_ids must number 2P sequences (chosen 0..P-1, rejected P..2P-1), got {S}")
    rows = keep.nonzero().flatten()
    seq = seq_all[rows]
    counts = torch.zeros(S, device=_input.device, dtype=torch.long).index_add_(0, seq, torch.ones_like(seq))
    if (counts == 0).any():
        raise ValueError(f"sequence {int((counts == 0).nonzero()[0])} has no response token in target "
                         "(every position is ignore_index): an empty response is bad data")
    return _input.reshape(-1, _input.shape[-1]), rows, target.reshape(-1)[rows].long(), seq, S


def _logits_means(lin_weight, bias, _input, P):
    """Liger's chosen/rejected logits means (over every position and the vocabulary), in O(d) per row:
    mean_v (h W^T + b)_v = h . mean_v W_v + mean(b)."""
    if _input.dim() != 3:
        return None, None
    w_mean = lin_weight.detach().float().mean(0)
    b_mean = bias.detach().float().mean() if bias is not None else 0.0
    row = _input.detach().float() @ w_mean + b_mean          # [2P, T]
    return row[:P].mean(), row[P:].mean()


class _FusedLinearPreference(nn.Module):
    def __init__(self, ignore_index=-100, softcap=None, chunk_size=None):
        super().__init__()
        self.ignore_index, self.softcap, self.chunk_size = ignore_index, softcap, chunk_size

    def _stats(self, lin_weight, _input, target, bias, seq_ids):
        flat, rows, labels, seq, S = response_rows(_input, target, self.ignore_index, seq_ids)
        total, mean, count = sequence_logprobs_varlen(flat, lin_weight, rows, labels, seq, S, self.softcap, bias,
                                                      self.chunk_size)
        return total, mean, S // 2

    def _finish(self, losses, metrics, lin_weight, bias, _input, chosen_logps, rejected_logps, P):
        cm, rm = _logits_means(lin_weight, bias, _input, P)
        zero = losses.new_zeros(())
        return losses.mean(), (chosen_logps, rejected_logps, cm if cm is not None else zero,
                               rm if rm is not None else zero, zero, metrics["reward_chosen"],
                               metrics["reward_rejected"], metrics)


class FusedLinearSimPOLoss(_FusedLinearPreference):
    """SimPO (Meng et al. 2024) on the fused log-probs; gamma is the absolute margin (the official code's
    gamma_beta_ratio is gamma / beta; Liger's gamma is the same absolute margin)."""

    def __init__(self, beta=2.0, gamma=0.5, ignore_index=-100, softcap=None, chunk_size=None):
        super().__init__(ignore_index, softcap, chunk_size)
        self.beta, self.gamma = beta, gamma

    def forward(self, lin_weight, _input, target, bias=None, seq_ids=None):
        _, mean, P = self._stats(lin_weight, _input, target, bias, seq_ids)
        losses, m = simpo_loss(mean[:P], mean[P:], self.beta, self.gamma)
        return self._finish(losses, m, lin_weight, bias, _input, mean[:P], mean[P:], P)


class FusedLinearDPOLoss(_FusedLinearPreference):
    """DPO (Rafailov et al. 2023) with the reference's summed log-probs passed in (an offline cache, or a
    precomputed column such as TRL's ref_chosen_logps / ref_rejected_logps): no reference model in the step."""

    def __init__(self, beta=0.1, ignore_index=-100, softcap=None, chunk_size=None):
        super().__init__(ignore_index, softcap, chunk_size)
        self.beta = beta

    def forward(self, lin_weight, _input, target, bias=None, ref_chosen_logps=None, ref_rejected_logps=None,
                seq_ids=None):
        total, _, P = self._stats(lin_weight, _input, target, bias, seq_ids)
        ref_w, ref_l = _reference_pair(ref_chosen_logps, ref_rejected_logps, P, total)
        losses, m = dpo_loss(total[:P], total[P:], ref_w, ref_l, self.beta)
        return self._finish(losses, m, lin_weight, bias, _input, total[:P], total[P:], P)


class FusedLinearTDPOLoss(_FusedLinearPreference):
    """TDPO (Zeng et al. 2024), variant 1 or 2: the reference's hidden states and lm head in, its log-probs
    and the sequential KL(pi_ref || pi) from one pass over both models' logits."""

    def __init__(self, beta=0.1, alpha=0.5, variant=2, ignore_index=-100, softcap=None, chunk_size=None):
        super().__init__(ignore_index, softcap, chunk_size)
        if variant not in (1, 2):
            raise ValueError(f"variant must be 1 or 2, got {variant!r}")
        self.beta, self.alpha, self.variant = beta, alpha, variant

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None,
                seq_ids=None):
        if ref_input is None or ref_weight is None:
            raise ValueError("TDPO needs the reference's hidden states (ref_input) and lm head (ref_weight)")
        if tuple(ref_input.shape[:-1]) != tuple(_input.shape[:-1]):
            raise ValueError(f"ref_input must have _input's leading shape {tuple(_input.shape[:-1])}, "
                             f"got {tuple(ref_input.shape)}")
        flat, rows, labels, seq, S = response_rows(_input, target, self.ignore_index, seq_ids)
        total, _, _, ref_total, kl = sequence_logprobs_kl_varlen(
            flat, lin_weight, rows, labels, seq, S, ref_input.reshape(-1, ref_input.shape[-1]).detach(),
            ref_weight.detach(), self.softcap, bias, None if ref_bias is None else ref_bias.detach(), self.chunk_size)
        P = S // 2
        losses, m = tdpo_loss(total[:P], total[P:], ref_total[:P], ref_total[P:], kl[:P], kl[P:], self.beta,
                              self.alpha, self.variant)
        return self._finish(losses, m, lin_weight, bias, _input, total[:P], total[P:], P)


class FusedLinearFPOLoss(_FusedLinearPreference):
    """FPO (arXiv 2411.07618): the length-normalised margin against the reference's cached mean log-probs, and
    the SAE feature constraint D on the residual stream of the SAE's layer against the cached reference
    features. sae_hidden [2P, T', d_sae] with sae_mask [2P, T'] (its response tokens), and ref_indices /
    ref_values [2P, K]: the layer's residual stream and the reference's top-K pooled features, chosen rows
    first. D may be divided by the reference's feature scale (d_scale; see `fpo train --constraint-norm`)."""

    def __init__(self, sae, beta=0.1, alpha=0.5, k=50, select="policy", d_scale=1.0, ignore_index=-100,
                 softcap=None, chunk_size=None):
        super().__init__(ignore_index, softcap, chunk_size)
        self.sae, self.beta, self.alpha, self.k, self.select, self.d_scale = sae, beta, alpha, k, select, d_scale

    def forward(self, lin_weight, _input, target, bias=None, sae_hidden=None, sae_mask=None, ref_indices=None,
                ref_values=None, ref_chosen_logps=None, ref_rejected_logps=None, seq_ids=None):
        if sae_hidden is None or sae_mask is None or ref_indices is None or ref_values is None:
            raise ValueError("FPO needs sae_hidden, sae_mask, ref_indices and ref_values")
        _, mean, P = self._stats(lin_weight, _input, target, bias, seq_ids)
        if sae_hidden.shape[0] != 2 * P:
            raise ValueError(f"sae_hidden holds {sae_hidden.shape[0]} sequences, the batch {2 * P}")
        ref_w, ref_l = _reference_pair(ref_chosen_logps, ref_rejected_logps, P, mean)
        d = sae_feature_mse(sae_hidden, sae_mask, self.sae, ref_indices, ref_values, self.k, self.select) / self.d_scale
        losses, m = fpo_loss(mean[:P], mean[P:], ref_w, ref_l, d[:P], d[P:], self.beta, self.alpha)
        return self._finish(losses, m, lin_weight, bias, _input, mean[:P], mean[P:], P)


def _reference_pair(ref_w, ref_l, P, like):
    for name, t in (("ref_chosen_logps", ref_w), ("ref_rejected_logps", ref_l)):
        if not torch.is_tensor(t) or tuple(t.shape) != (P,):
            raise ValueError(f"{name} must be a [P] = [{P}] tensor of the reference's log-probs, "
                             f"got {getattr(t, 'shape', type(t))}")
    return ref_w.to(like.device, torch.float32), ref_l.to(like.device, torch.float32)
