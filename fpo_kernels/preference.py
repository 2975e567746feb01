"""Drop-in fused preference losses for other trainers: lm-head weight, final hidden states and shifted labels in,
the mean loss and the usual outputs out, never [tokens, vocab] logits.

The calling convention, constructor arguments and defaults are Liger-Kernel's chunked preference losses (and so
TRL's `use_liger_kernel`); swapping LigerFusedLinearSimPOLoss or LigerFusedLinearDPOLoss for ours is one line:

    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
           chosen_rewards, rejected_rewards) = module(lin_weight [V, d], _input [2P, T, d], target [2P, T],
                                                       bias=None, ...)

with the chosen sequences in the first P rows and the rejected in the last P, `target` aligned with `_input`
(the caller shifts: row t of `_input` predicts `target[t]`) and `ignore_index` on every position that is not a
response token. Our own metrics (margins, accuracy, D or KL) are in `module.metrics` after each call. A packed
micro-batch works too: `_input [N, d]`, `target [N]` and `seq_ids [N]` (sequence p for chosen p, P + p for
rejected p). Only the rows that predict a response token go through the lm head, in chunks of
`token_chunk_size` rows; Liger's `chunk_size` (pairs per chunk) and `compiled` are accepted and change nothing.
Gemma-2's final logit softcap is an argument (Liger has none).

    FusedLinearSimPOLoss   u = beta a_w - beta a_l - gamma                       (a = mean log-prob)
    FusedLinearDPOLoss     u = beta ((s_w - s_ref_w) - (s_l - s_ref_l)), every Liger loss_type; the reference
                           online (ref_input, ref_weight, ref_bias, as Liger) or precomputed (ref_*_logps)
    FusedLinearTDPOLoss    TDPO1 / TDPO2 with the reference's hidden states and head: KL from one pass
    FusedLinearFPOLoss     u = beta ((a_w - a_l) - g_ref - alpha (D_l - sg D_w)), D from the SAE op
With compute_nll_loss, the loss adds alpha x the chosen responses' token-mean negative log-likelihood (SimPO and
DPO, as Liger: alpha there is the NLL weight). label_smoothing, in every module, is the conservative
-(1-eps) log sigmoid(u) - eps log sigmoid(-u) on the module's own margin u (DPO's other loss types use it as
Liger does).
"""

from __future__ import annotations

import torch
from torch import nn

from .logprobs import check_softcap
from .losses import check_dpo_options, preference_loss
from .sae_constraint import sae_feature_mse
from .sae_weights import SAEWeights
from .sequence import sequence_logprobs, sequence_logprobs_kl
from .sequence_stats import SequenceStats

__all__ = ["FusedLinearSimPOLoss", "FusedLinearDPOLoss", "FusedLinearTDPOLoss", "FusedLinearFPOLoss", "response_rows"]


def response_rows(_input, target, ignore_index=-100, seq_ids=None, allow_empty=False):
    """(flat hidden [rows, d], rows [n], labels [n], seq_ids [n], number of sequences) of the positions that
    predict a response token, from the padded [2P, T, d] / [2P, T] layout or a packed one (seq_ids [N]).
    allow_empty: a padded sequence with no response token is allowed (its summed log-prob is 0); a mean of
    none is undefined, so the averaging losses refuse it."""
    if not torch.is_tensor(_input) or _input.dim() not in (2, 3):
        raise ValueError(f"_input must be [2P, T, d] or packed [N, d], got {getattr(_input, 'shape', type(_input))}")
    if not torch.is_tensor(target) or tuple(target.shape) != tuple(_input.shape[:-1]):
        raise ValueError(
            f"target must have _input's leading shape {tuple(_input.shape[:-1])} (the caller shifts it), "
            f"got {getattr(target, 'shape', type(target))}"
        )
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
    if S == 0:
        raise ValueError("_input holds no pair (0 sequences): a preference loss needs at least one pair")
    rows = keep.nonzero().flatten()
    seq = seq_all[rows]
    counts = torch.zeros(S, device=_input.device, dtype=torch.long).index_add_(0, seq, torch.ones_like(seq))
    if (counts == 0).any() and not allow_empty:
        raise ValueError(
            f"sequence {int((counts == 0).nonzero()[0])} has no response token in target "
            "(every position is ignore_index): an empty response is bad data"
        )
    return _input.reshape(-1, _input.shape[-1]), rows, target.reshape(-1)[rows].long(), seq, S


def _logits_means(lin_weight, bias, _input, P):
    """Liger's chosen/rejected logits means (over every position and the vocabulary), in O(d) per row:
    mean_v (h W^T + b)_v = h . mean_v W_v + mean(b)."""
    if _input.dim() != 3:
        return None, None
    w_mean = lin_weight.detach().float().mean(0)
    b_mean = bias.detach().float().mean() if bias is not None else 0.0
    row = _input.detach().float() @ w_mean + b_mean  # [2P, T]
    return row[:P].mean(), row[P:].mean()


class _FusedLinearPreference(nn.Module):
    def __init__(self, ignore_index=-100, softcap=None, token_chunk_size=None):
        super().__init__()
        check_softcap(softcap)
        self.ignore_index, self.softcap, self.token_chunk_size = ignore_index, softcap, token_chunk_size
        self.metrics = {}

    def _stats(self, lin_weight, _input, target, bias, seq_ids, allow_empty=False):
        """(summed, mean, count [2P], P, rows): the policy's log-probs over each sequence's response tokens."""
        rows = response_rows(_input, target, self.ignore_index, seq_ids, allow_empty)
        flat, idx, labels, seq, S = rows
        total, mean, count = sequence_logprobs(
            flat,
            lin_weight,
            softcap=self.softcap,
            bias=bias,
            chunk_size=self.token_chunk_size,
            rows=idx,
            labels=labels,
            seq_ids=seq,
            num_seqs=S,
        )
        return total, mean, count, S // 2, rows

    def _nll(self, total, count, P, on: bool):
        """Liger's NLL term: the chosen responses' negative log-likelihood per token, over the whole batch."""
        if not on:
            return total.new_zeros(())
        return -total[:P].sum() / count[:P].sum().clamp(min=1)

    def _finish(self, losses, metrics, lin_weight, bias, _input, chosen_logps, rejected_logps, P, nll=None, alpha=0.0):
        cm, rm = _logits_means(lin_weight, bias, _input, P)
        zero = losses.new_zeros(())
        nll = zero if nll is None else nll
        self.metrics = dict(metrics, nll_loss=nll.detach())
        return losses.mean() + alpha * nll, (
            chosen_logps,
            rejected_logps,
            cm if cm is not None else zero,
            rm if rm is not None else zero,
            nll.detach(),
            metrics["reward_chosen"],
            metrics["reward_rejected"],
        )


class FusedLinearSimPOLoss(_FusedLinearPreference):
    """SimPO (Meng et al. 2024) on the fused log-probs, with Liger's arguments and defaults (beta 0.1 and the
    chosen NLL term on; the SimPO paper's setting is beta=2.0, compute_nll_loss=False). gamma is the absolute
    margin (the official code's gamma_beta_ratio is gamma / beta; Liger's gamma is the same absolute margin).
    average_log_prob False uses the summed log-probs in the margin (Liger always averages)."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
        *,
        average_log_prob: bool = True,
        softcap: float | None = None,
        token_chunk_size: int | None = None,
    ) -> None:
        super().__init__(ignore_index, softcap, token_chunk_size)
        self.beta, self.alpha, self.label_smoothing, self.gamma = beta, alpha, _smoothing(label_smoothing), gamma
        self.compute_nll_loss, self.average_log_prob = compute_nll_loss, average_log_prob
        self.compiled, self.chunk_size = compiled, chunk_size  # Liger's; nothing to choose here

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple]:
        """SimPO's loss on P pairs: `_input` [2P, T, d] (chosen rows first) or [N, d] with `seq_ids`, `target` the
        shifted labels. Returns Liger's `(loss, (chosen_logps, rejected_logps, chosen_logits_mean,
        rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards))`; more metrics in `self.metrics`."""
        total, mean, count, P, _ = self._stats(
            lin_weight, _input, target, bias, seq_ids, allow_empty=not self.average_log_prob
        )
        logps = mean if self.average_log_prob else total
        losses, m = preference_loss(
            "simpo",
            SequenceStats(logp_sum=total, logp_mean=mean),
            beta=self.beta,
            gamma=self.gamma,
            label_smoothing=self.label_smoothing,
            average_log_prob=self.average_log_prob,
        )
        nll = self._nll(total, count, P, self.compute_nll_loss)
        return self._finish(losses, m, lin_weight, bias, _input, logps[:P], logps[P:], P, nll, self.alpha)


class FusedLinearDPOLoss(_FusedLinearPreference):
    """DPO (Rafailov et al. 2023) and its variants (loss_type: every one Liger's DPO has), with Liger's
    arguments and defaults. The reference: online, from its hidden states and head (ref_input, ref_weight,
    ref_bias, as Liger; its log-probs under no_grad through the same fused op), or precomputed (ref_chosen_logps,
    ref_rejected_logps: an offline cache, or TRL's precomputed columns), or none (use_ref_model=False: 0)."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        *,
        softcap: float | None = None,
        token_chunk_size: int | None = None,
    ) -> None:
        super().__init__(ignore_index, softcap, token_chunk_size)
        check_dpo_options(loss_type, label_smoothing)
        self.beta, self.alpha, self.compute_nll_loss, self.use_ref_model = beta, alpha, compute_nll_loss, use_ref_model
        self.average_log_prob, self.loss_type = average_log_prob, loss_type
        self.label_smoothing, self.discopop_tau = label_smoothing, discopop_tau
        self.compiled, self.chunk_size = compiled, chunk_size  # Liger's; nothing to choose here

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        *,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple]:
        """DPO's loss on P pairs against the reference: online (`ref_input`, `ref_weight`, `ref_bias`), precomputed
        (`ref_chosen_logps`, `ref_rejected_logps` [P]) or none (`use_ref_model=False`). Returns Liger's 7-tuple,
        as `FusedLinearSimPOLoss.forward`."""
        total, mean, count, P, rows = self._stats(
            lin_weight, _input, target, bias, seq_ids, allow_empty=not self.average_log_prob
        )
        logps = mean if self.average_log_prob else total
        if not self.use_ref_model:
            ref = torch.zeros(2 * P, device=total.device)
        elif ref_input is not None or ref_weight is not None:
            if ref_input is None or ref_weight is None:
                raise ValueError(
                    "an online reference needs both ref_input (its hidden states) and ref_weight (its lm head)"
                )
            if ref_weight.dim() != 2 or ref_weight.shape[0] != lin_weight.shape[0]:
                raise ValueError(
                    f"ref_weight must be the reference's lm head [V, d_ref] over the policy's vocabulary "
                    f"(V = {lin_weight.shape[0]}), got {tuple(ref_weight.shape)}"
                )
            if tuple(ref_input.shape[:-1]) != tuple(_input.shape[:-1]):
                raise ValueError(
                    f"ref_input must have _input's leading shape {tuple(_input.shape[:-1])}, "
                    f"got {tuple(ref_input.shape)}"
                )
            _, idx, labels, seq, S = rows
            with torch.no_grad():
                rt, rm, _ = sequence_logprobs(
                    ref_input.reshape(-1, ref_input.shape[-1]).detach(),
                    ref_weight.detach(),
                    softcap=self.softcap,
                    bias=None if ref_bias is None else ref_bias.detach(),
                    chunk_size=self.token_chunk_size,
                    rows=idx,
                    labels=labels,
                    seq_ids=seq,
                    num_seqs=S,
                )
            ref = (rm if self.average_log_prob else rt).float()
        elif ref_chosen_logps is not None or ref_rejected_logps is not None:
            ref = torch.cat(_reference_pair(ref_chosen_logps, ref_rejected_logps, P, total))
        else:
            raise ValueError(
                "use_ref_model: pass the reference as ref_input and ref_weight (online), or as "
                "ref_chosen_logps and ref_rejected_logps (precomputed); or use_ref_model=False"
            )
        reference = SequenceStats(logp_mean=ref) if self.average_log_prob else SequenceStats(logp_sum=ref)
        losses, m = preference_loss(
            "dpo",
            SequenceStats(logp_sum=total, logp_mean=mean),
            reference,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            loss_type=self.loss_type,
            discopop_tau=self.discopop_tau,
            average_log_prob=self.average_log_prob,
        )
        nll = self._nll(total, count, P, self.compute_nll_loss)
        return self._finish(losses, m, lin_weight, bias, _input, logps[:P], logps[P:], P, nll, self.alpha)


class FusedLinearTDPOLoss(_FusedLinearPreference):
    """TDPO (Zeng et al. 2024), variant 1 or 2: the reference's hidden states and lm head in, its log-probs
    and the sequential KL(pi_ref || pi) from one pass over both models' logits."""

    def __init__(
        self,
        beta: float = 0.1,
        alpha: float = 0.5,
        variant: int = 2,
        ignore_index: int = -100,
        softcap: float | None = None,
        token_chunk_size: int | None = None,
        *,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(ignore_index, softcap, token_chunk_size)
        if variant not in (1, 2):
            raise ValueError(f"variant must be 1 or 2, got {variant!r}")
        self.beta, self.alpha, self.variant, self.label_smoothing = beta, alpha, variant, _smoothing(label_smoothing)

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple]:
        """TDPO's loss on P pairs, with the reference's final hidden states `ref_input` (the layout of `_input`) and
        lm head `ref_weight`: both models' log-probs and the KL from one pass. Returns Liger's 7-tuple."""
        if ref_input is None or ref_weight is None:
            raise ValueError("TDPO needs the reference's hidden states (ref_input) and lm head (ref_weight)")
        if tuple(ref_input.shape[:-1]) != tuple(_input.shape[:-1]):
            raise ValueError(
                f"ref_input must have _input's leading shape {tuple(_input.shape[:-1])}, got {tuple(ref_input.shape)}"
            )
        flat, rows, labels, seq, S = response_rows(_input, target, self.ignore_index, seq_ids)
        total, _, _, ref_total, kl = sequence_logprobs_kl(
            flat,
            lin_weight,
            ref_input.reshape(-1, ref_input.shape[-1]).detach(),
            ref_weight.detach(),
            softcap=self.softcap,
            bias=bias,
            ref_bias=None if ref_bias is None else ref_bias.detach(),
            chunk_size=self.token_chunk_size,
            rows=rows,
            labels=labels,
            seq_ids=seq,
            num_seqs=S,
        )
        P = S // 2
        losses, m = preference_loss(
            f"tdpo{self.variant}",
            SequenceStats(logp_sum=total, kl=kl),
            SequenceStats(logp_sum=ref_total),
            beta=self.beta,
            alpha=self.alpha,
            label_smoothing=self.label_smoothing,
        )
        return self._finish(losses, m, lin_weight, bias, _input, total[:P], total[P:], P)


class FusedLinearFPOLoss(_FusedLinearPreference):
    """FPO (arXiv 2411.07618): the length-normalised margin against the reference's cached mean log-probs, and
    the SAE feature constraint D on the residual stream of the SAE's layer against the cached reference
    features. sae_hidden [2P, T', d_sae] with sae_mask [2P, T'] (the response tokens' own positions, as the
    trainer and `fpo precompute` pool them: not the rows that predict them), and ref_indices /
    ref_values [2P, K]: the layer's residual stream and the reference's top-K pooled features, chosen rows
    first. D may be divided by the reference's feature scale (d_scale; see `fpo train --constraint-norm`)."""

    def __init__(
        self,
        sae: SAEWeights,
        beta: float = 0.1,
        alpha: float = 0.5,
        k: int = 50,
        select: str = "policy",
        d_scale: float = 1.0,
        ignore_index: int = -100,
        softcap: float | None = None,
        token_chunk_size: int | None = None,
        *,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(ignore_index, softcap, token_chunk_size)
        if isinstance(d_scale, bool) or not isinstance(d_scale, (int, float)) or not 0 < d_scale < float("inf"):
            raise ValueError(f"d_scale must be a finite number > 0 (D is divided by it), got {d_scale!r}")
        self.sae, self.beta, self.alpha, self.k, self.select, self.d_scale = sae, beta, alpha, k, select, d_scale
        self.label_smoothing = _smoothing(label_smoothing)

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        sae_hidden: torch.Tensor | None = None,
        sae_mask: torch.Tensor | None = None,
        ref_indices: torch.Tensor | None = None,
        ref_values: torch.Tensor | None = None,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        *,
        ref_chosen_mean_logps: torch.Tensor | None = None,
        ref_rejected_mean_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple]:
        """FPO's loss on P pairs: `sae_hidden` [2P, T', d_sae] and `sae_mask` at the SAE's layer, the cached
        `ref_indices` / `ref_values` [2P, K], and the reference's log-probs [P] either summed over each response
        (`ref_chosen_logps` / `ref_rejected_logps`, as FusedLinearDPOLoss and TRL's precomputed columns carry
        them; divided here by the response's token count) or already mean per token (`ref_chosen_mean_logps` /
        `ref_rejected_mean_logps`, as `fpo precompute` caches them). Returns Liger's 7-tuple; D is in
        `self.metrics`."""
        if sae_hidden is None or sae_mask is None or ref_indices is None or ref_values is None:
            raise ValueError("FPO needs sae_hidden, sae_mask, ref_indices and ref_values")
        summed = ref_chosen_logps is not None or ref_rejected_logps is not None
        if summed == (ref_chosen_mean_logps is not None or ref_rejected_mean_logps is not None):
            raise ValueError(
                "FPO needs the reference's log-probs once: summed over each response (ref_chosen_logps, "
                "ref_rejected_logps) or mean per token (ref_chosen_mean_logps, ref_rejected_mean_logps)"
            )
        _, mean, count, P, _ = self._stats(lin_weight, _input, target, bias, seq_ids)
        if sae_hidden.shape[0] != 2 * P:
            raise ValueError(f"sae_hidden holds {sae_hidden.shape[0]} sequences, the batch {2 * P}")
        if summed:  # the same response tokens as the policy's: the reference's mean is its sum over their count
            ref = torch.cat(_reference_pair(ref_chosen_logps, ref_rejected_logps, P, mean)) / count.to(mean)
        else:
            ref = torch.cat(
                _reference_pair(
                    ref_chosen_mean_logps,
                    ref_rejected_mean_logps,
                    P,
                    mean,
                    ("ref_chosen_mean_logps", "ref_rejected_mean_logps"),
                )
            )
        d = (
            sae_feature_mse(sae_hidden, self.sae, ref_indices, ref_values, mask=sae_mask, k=self.k, select=self.select)
            / self.d_scale
        )
        losses, m = preference_loss(
            "fpo",
            SequenceStats(logp_mean=mean, d=d),
            SequenceStats(logp_mean=ref),
            beta=self.beta,
            alpha=self.alpha,
            label_smoothing=self.label_smoothing,
        )
        return self._finish(losses, m, lin_weight, bias, _input, mean[:P], mean[P:], P)


def _smoothing(eps):
    if not 0.0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0.0, 0.5], got {eps}")
    return eps


def _reference_pair(ref_w, ref_l, P, like, names=("ref_chosen_logps", "ref_rejected_logps")):
    for name, t in zip(names, (ref_w, ref_l)):
        if not torch.is_tensor(t) or tuple(t.shape) != (P,):
            raise ValueError(
                f"{name} must be a [P] = [{P}] tensor of the reference's log-probs, got {getattr(t, 'shape', type(t))}"
            )
    return ref_w.to(like.device, torch.float32), ref_l.to(like.device, torch.float32)
