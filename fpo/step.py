"""One training step's statistics and loss, shared by the trainer, evaluation and the tools that measure them.

PolicyStats wraps the policy so that everything touching its weights (body, lm head, SAE constraint, and TDPO's
reference when it is the policy with its LoRA adapters off) runs inside one forward, as DDP and FSDP need;
reference_side gives a micro-batch's reference (the cached statistics, the cached features PolicyStats compares
against, a reference model's final hidden states); compute_loss gives the run's loss on both
(fpo_kernels.losses.preference_loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.profiler import record_function

from fpo_kernels import sae_feature_mse, sequence_logprobs, sequence_logprobs_kl
from fpo_kernels.losses import LossSettings
from fpo_kernels.protect import protected_features, protected_preactivations
from fpo_kernels.sequence_stats import SequenceStats

from ._types import Device, Model
from .model import ActivationCapture, body_hidden, final_softcap, lm_head
from .protection import protect_metrics
from .sae import SAESpec

if TYPE_CHECKING:
    from .packing import MicroBatch
    from .protection import ProtectTerm
    from .reference_cache import ReferenceCache

__all__ = ["PolicyStats", "reference_side", "compute_loss"]


class PolicyStats(nn.Module):
    """Wraps the policy so that everything touching its weights (body, lm head) runs inside forward: DDP and FSDP2
    see one forward. Returns per-sequence statistics for the 2P sequences of a micro-batch. saes: fpo.sae.SAESpec
    records (the encoder, its layer and site, its weight and scale in D, its feature weights): D = sum of weight x
    D_sae / scale ("d"), and each SAE's own D ("d_each", [n_saes, 2P]), one forward hook per layer and site.
    check_inputs: sae_feature_mse's checks of the cached features (off in training, whose cache was checked once
    when the run started)."""

    def __init__(
        self,
        model: Model,
        *,
        saes: Sequence[SAESpec] = (),
        k: int = 50,
        select: str = "policy",
        autocast: Callable[[torch.device], AbstractContextManager] | None = None,
        adapters_off: Callable[[], AbstractContextManager] | None = None,
        check_inputs: bool = False,
        protect: ProtectTerm | None = None,
    ):
        super().__init__()
        self.check_inputs = check_inputs
        self.model = model
        self.adapters_off = adapters_off  # LoRA: a context in which the model is the frozen base (TDPO's reference)
        self.autocast = autocast or (lambda device: nullcontext())  # the precision policy's forward context
        self.k, self.select = k, select
        self.saes = list(saes)
        for x in self.saes:
            if not isinstance(x, SAESpec):
                raise TypeError(f"saes: fpo.sae.SAESpec records, got {type(x).__name__}")
        # fpo.protection.ProtectTerm: its features' pooled values, protect [2P, |P|], and in its per-token form
        # their pre-activations on every response token, protect_tokens [n, |P|]
        self.protect = protect
        points = {(x.layer, x.site) for x in self.saes}
        if protect is not None:
            points.add((protect.spec.layer, protect.spec.site))
        if any(layer is None for layer, _ in points):
            raise ValueError("saes, protect: every SAE's layer must be known (SAESpec.layer)")
        self.captures = {
            point: ActivationCapture(model, *point)  # type: ignore[arg-type]  # layers checked above
            for point in sorted(points, key=str)
        }
        self.softcap = final_softcap(model)

    def remove_hooks(self):
        for cap in self.captures.values():
            cap.remove()

    def forward(
        self,
        batch: MicroBatch,
        *,
        ref_features: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        reference_without_adapters: bool = False,
    ) -> SequenceStats:
        """batch: an fpo.packing.MicroBatch (any layout). ref_features: [(ref_idx, ref_val)] per SAE, in
        order. With ref_hidden (TDPO: the reference's final hidden states on
        the same layout, flat [N, d_ref]), the reference's log-probs and the KL come from the same pass over
        the logits. reference_without_adapters (LoRA TDPO): the reference is this model with its adapters off,
        run here, inside the one forward DDP and FSDP see."""
        dev = next(self.model.parameters()).device
        with self.autocast(dev):
            if reference_without_adapters:
                if self.adapters_off is None:
                    raise ValueError("reference_without_adapters needs adapters_off (a LoRA policy's)")
                with torch.no_grad(), self.adapters_off():
                    ref_hidden = body_hidden(self.model, batch, dev)
                for cap in self.captures.values():  # the reference pass is not the policy's residual stream
                    cap.value = None
                ref_weight, ref_bias = (None if t is None else t.detach() for t in lm_head(self.model))
            return self._stats(batch, dev, ref_hidden, ref_weight, ref_bias, ref_features)

    def _stats(self, batch, dev, ref_hidden, ref_weight, ref_bias, ref_features) -> SequenceStats:
        hidden = body_hidden(self.model, batch, dev)  # [N, d] flat rows
        w, b = lm_head(self.model)
        rows, labels, seq = (t.to(dev) for t in (batch.pred_rows, batch.labels, batch.seq_ids))
        S = batch.num_seqs
        if ref_hidden is not None:
            with record_function("fpo::logprobs_kl"):
                total, mean, count, ref_total, kl = sequence_logprobs_kl(
                    hidden,
                    w,
                    ref_hidden,
                    ref_weight,
                    softcap=self.softcap,
                    bias=b,
                    ref_bias=ref_bias,
                    rows=rows,
                    labels=labels,
                    seq_ids=seq,
                    num_seqs=S,
                )
            out = dict(logp_sum=total, logp_mean=mean, length=count, ref_logp_sum=ref_total, kl=kl)
        else:
            with record_function("fpo::logprobs"):
                total, mean, count = sequence_logprobs(
                    hidden, w, softcap=self.softcap, bias=b, rows=rows, labels=labels, seq_ids=seq, num_seqs=S
                )
            out = dict(logp_sum=total, logp_mean=mean, length=count)
        resid = {point: cap.pop() for point, cap in self.captures.items()}
        if self.protect is not None:
            spec = self.protect.spec
            flat, spans = resid[(spec.layer, spec.site)], batch.pool_spans.cpu()
            flat = flat.reshape(-1, flat.shape[-1])
            token_form = self.protect.form == "token"
            with record_function("fpo::protect"):
                if token_form:  # the term's input; the pooled values below are for the metrics only
                    out["protect_tokens"] = protected_preactivations(
                        flat, spec.sae, self.protect.ids, spans=spans, check_inputs=self.check_inputs
                    )
                with torch.no_grad() if token_form else nullcontext():
                    out["protect"] = protected_features(
                        flat,
                        spec.sae,
                        self.protect.ids,
                        spans=spans,
                        gate=self.protect.gate,
                        check_inputs=self.check_inputs,
                    )
        if self.saes:
            if ref_features is None or len(ref_features) != len(self.saes):
                raise ValueError(f"ref_features: one (indices, values) pair per SAE ({len(self.saes)}) is needed")
            each = []
            with record_function("fpo::sae_constraint"):
                for spec, (idx, val) in zip(self.saes, ref_features):
                    r, fw = resid[(spec.layer, spec.site)], spec.feature_weights
                    # spans stay on the host: the kernels lay out their row tiles from them with no device sync
                    raw = sae_feature_mse(
                        r.reshape(-1, r.shape[-1]),
                        spec.sae,
                        idx,
                        val,
                        k=self.k,
                        select=self.select,
                        check_inputs=self.check_inputs,
                        spans=batch.pool_spans.cpu(),
                        feature_weights=None if fw is None else fw.to(r.device),
                    )
                    d, factor = raw * (spec.weight / spec.scale), batch.d_factor
                    if factor is not None:  # pooling "authors" (fpo.packing.pooling_rows)
                        d, raw = d * factor.to(d), raw * factor.to(raw)
                    each.append(raw)
                    out["d"] = d if "d" not in out else out["d"] + d
            out["d_each"] = torch.stack(each)
        return SequenceStats(**out)


def reference_side(
    batch: MicroBatch,
    device: Device,
    cache: ReferenceCache | None = None,
    saes: Sequence[SAESpec] = (),
    ref_model: Model | None = None,
    reference_is_base: bool = False,
    autocast: Callable[[torch.device], AbstractContextManager] | None = None,
) -> tuple[SequenceStats | None, dict]:
    """(the reference's cached statistics in the [2P] layout or None, what PolicyStats takes of the reference):
    the cached features of each SAE (saes: SAESpecs, by their key in the cache), a reference model's final hidden
    states on the batch's layout and its lm head (its log-probs then come with the KL, from one pass over both
    models' logits), or, reference_is_base, the policy with its LoRA adapters off."""
    reference = None
    if cache is not None:
        if batch.ids is None:
            raise ValueError("cache: the batch has no example ids to look its rows up by (from_padded makes none)")
        reference = cache.reference(batch.ids, batch.row_hash, device)
    kw: dict[str, Any] = {}
    if saes:
        assert reference is not None  # the runs that read features have a cache (checked when they start)
        kw["ref_features"] = [reference.features[spec.key] for spec in saes]  # type: ignore[index]
    if ref_model is not None:
        with torch.no_grad(), (autocast or (lambda d: nullcontext()))(torch.device(device)):
            rh = body_hidden(ref_model, batch, device)
        rw, rb = lm_head(ref_model)
        kw.update(ref_hidden=rh, ref_weight=rw.detach(), ref_bias=None if rb is None else rb.detach())
    elif reference_is_base:
        kw["reference_without_adapters"] = True
    return reference, kw


def compute_loss(
    settings: LossSettings,
    stats: SequenceStats,
    reference: SequenceStats | None,
    protect: ProtectTerm | None = None,
    alpha: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """(losses [P], metrics) of one micro-batch: the policy's statistics and the reference's, both in the [2P]
    layout (chosen first), through the run's loss settings (TrainConfig.loss_settings); with protect
    (fpo.protection.ProtectTerm), plus lambda x the mean of R over the pair's chosen and rejected responses. alpha:
    the step's (an adapted one, --target-share), else the settings'."""
    losses, metrics = settings(stats, reference, alpha=alpha)
    if protect is None:
        return losses, metrics
    if stats.protect is None or reference is None or reference.protect is None:
        raise ValueError("protect: the policy's and the cache's protected features are both needed")
    if protect.form == "token":
        if stats.protect_tokens is None or reference.protect_tokens is None or stats.length is None:
            raise ValueError("protect form 'token': the policy's and the cache's per-token values are both needed")
        R = protect.token_penalty(stats.protect_tokens, reference.protect_tokens, stats.length.long())  # [2P]
    else:
        R = protect.penalty(stats.protect, reference.protect)  # [2P]
    P = losses.shape[0]
    term = protect.coef * (R[:P] + R[P:]) / 2
    metrics.update(
        protect_term=term.detach(),
        reward_margin_abs=metrics["margin"].abs(),
        **protect_metrics(stats.protect, reference.protect, protect.scale),
    )
    return losses + term, metrics
