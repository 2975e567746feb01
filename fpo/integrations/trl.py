"""FPO and TDPO inside TRL's DPOTrainer (TRL 1.16): TRL's config, datasets, collator, callbacks and logging,
our fused ops for the loss. FPOTrainer: the reference's sparse features precomputed once, as TRL precomputes
reference log-probs, and our fused SAE op for the constraint. TDPOTrainer: TDPO1/2 with TRL's reference model
online, both models' log-probs and the sequential KL from one pass over the logits (fused_linear_logprobs_kl).

    from fpo.integrations.trl import FPOTrainer
    trainer = FPOTrainer(model, args=DPOConfig(..., precompute_ref_log_probs=True), train_dataset=ds,
                         processing_class=tok, sae=SAEWeights.from_file(path), sae_layer=15, alpha=0.5, k=50)
    trainer.train()

The loss is FPO's, u = beta ((a_w - a_l) - g_ref - alpha (D_l - sg D_w)) with a = mean completion log-prob:
TRL's own fused lm head gives the per-token log-probs (never full logits), `precompute_ref_log_probs=True`
gives the reference's summed log-probs (divided by the same completion lengths for g_ref), and at start-up
the trainer runs the reference (the initial model) once over the training set for each completion's top-K
pooled SAE features (`fpo_kernels.pack_topk`), kept as dataset columns (for eval datasets too, at init or
passed to evaluate() before training). TRL's metrics keep TRL's names and meanings (logps/* are summed
completion log-probs; entropy, logits/*, mean_token_accuracy and num_tokens as TRL logs them); every step adds
fpo/mean_logps/*, fpo/d_chosen, fpo/d_rejected and fpo/constraint_share (not logged while the margin is ~0).
DPOConfig's loss options are honoured (label_smoothing) or refused by name (check_loss_options).
"""

from __future__ import annotations

from typing import Any

import torch

from fpo_kernels import SAEWeights, pack_topk, sae_feature_mse, sae_pooled_features, sequence_logprobs_kl
from fpo_kernels.losses import constraint_share, preference_loss
from fpo_kernels.sequence_stats import SequenceStats

from ..model import ActivationCapture, decoder_layers, final_softcap, lm_head, run_body

__all__ = ["FPOTrainer", "TDPOTrainer", "TRL_VERSIONS", "check_trl", "check_loss_options"]

TRL_VERSIONS = ("1.16", "1.17")  # tested range: >= first, < second
FEATURE_COLUMNS = ("ref_chosen_idx", "ref_chosen_val", "ref_rejected_idx", "ref_rejected_val")


def check_trl():
    """The installed TRL, if its DPOTrainer is the one this integration is written against."""
    try:
        import trl
    except ImportError as e:
        raise ImportError("fpo.integrations.trl needs TRL: pip install 'fpo-kernels[trl]'") from e
    from packaging.version import Version

    v = Version(trl.__version__)
    if not Version(TRL_VERSIONS[0]) <= v < Version(TRL_VERSIONS[1]):
        raise ImportError(
            f"fpo.integrations.trl is tested with trl >= {TRL_VERSIONS[0]}, < {TRL_VERSIONS[1]}; "
            f"found {trl.__version__}: pip install 'fpo-kernels[trl]'"
        )
    return trl


def _base():
    return check_trl().DPOTrainer


def check_loss_options(args: Any, who: str) -> float:
    """Every DPOConfig option that changes the loss is honoured or refused here, by name: FPO's and TDPO's loss
    is a sigmoid of their own margin u, with TRL's label_smoothing (the conservative -(1-eps) log sigmoid(u) -
    eps log sigmoid(-u)); DPO's other loss types, their weights, LD-DPO, f-DPO, WPO weighting and padding-free
    batches are not theirs."""
    loss_type = getattr(args, "loss_type", ["sigmoid"]) or ["sigmoid"]
    loss_type = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    refused = []
    if loss_type != ["sigmoid"]:
        refused.append(f"loss_type={loss_type} (only ['sigmoid']: {who}'s loss is a sigmoid of its own margin)")
    if getattr(args, "loss_weights", None) not in (None, [1.0], [1]):
        refused.append(f"loss_weights={args.loss_weights}")
    if getattr(args, "ld_alpha", None) is not None:
        refused.append(f"ld_alpha={args.ld_alpha} (LD-DPO)")
    if getattr(args, "f_divergence_type", "reverse_kl") not in ("reverse_kl", None):
        refused.append(f"f_divergence_type={args.f_divergence_type!r} (f-DPO)")
    if getattr(args, "use_weighting", False):
        refused.append("use_weighting=True (WPO)")
    if getattr(args, "padding_free", False):
        refused.append("padding_free=True (the trainer reads padded completion masks)")
    if refused:
        raise ValueError(f"{who} does not support DPOConfig's " + "; ".join(refused) + ": leave them at their defaults")
    eps = getattr(args, "label_smoothing", 0.0)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {eps}")
    return eps


def log_trl_metrics(trainer, mode, outputs, inputs, logps, m):
    """TRL's DPO metrics under TRL's names and meanings: rewards/*, logps/* (summed completion log-probs),
    and where the fused head gave them (outputs is not None), entropy, logits/* and mean_token_accuracy;
    num_tokens."""
    gather = trainer.accelerator.gather_for_metrics
    P = logps.shape[0] // 2
    for key, value in (
        ("rewards/chosen", m["reward_chosen"]),
        ("rewards/rejected", m["reward_rejected"]),
        ("rewards/margins", m["margin"]),
        ("rewards/accuracies", m["accuracy"]),
        ("logps/chosen", logps[:P]),
        ("logps/rejected", logps[P:]),
    ):
        trainer._metrics[mode][key].append(gather(value.detach().float()).mean().item())
    if mode == "train":
        trainer._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
    trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]
    if outputs is None:
        return
    mask = inputs["completion_mask"][..., 1:]
    T = mask.shape[1]

    def token_mean(values, rows):
        total = gather((values[rows] * mask[rows]).sum()).sum()
        count = gather(mask[rows].sum()).sum()
        return (total / count).item() if count > 0 else 0.0

    chosen, rejected = slice(0, P), slice(P, 2 * P)
    every = slice(0, 2 * P)
    trainer._metrics[mode]["entropy"].append(token_mean(outputs.entropy[:, -T:].detach().float(), every))
    trainer._metrics[mode]["logits/chosen"].append(token_mean(outputs.mean_logits[:, -T:].detach().float(), chosen))
    trainer._metrics[mode]["logits/rejected"].append(token_mean(outputs.mean_logits[:, -T:].detach().float(), rejected))
    trainer._metrics[mode]["mean_token_accuracy"].append(token_mean(outputs.is_top1[:, -T:].float(), chosen))


class FPOTrainer(_base()):  # type: ignore[misc]  # TRL's DPOTrainer, imported when used
    """TRL's DPOTrainer with FPO's loss. Arguments beyond DPOTrainer's: sae (SAEWeights), sae_layer (the decoder
    block the SAE reads), sae_site (where in it: fpo.model.SITES, the block's output by default), alpha, k, select
    ("policy" or "reference"), cache_k (cached features per completion, >= k), d_scale (what D is divided by: 1, or
    a recorded reference feature scale). The config must set precompute_ref_log_probs=True: FPO's reference side is
    offline."""

    def __init__(
        self,
        *args,
        sae: SAEWeights | None = None,
        sae_layer: int | None = None,
        sae_site: str = "resid_post",
        alpha: float = 0.5,
        k: int = 50,
        select: str = "policy",
        cache_k: int = 256,
        d_scale: float = 1.0,
        **kwargs,
    ):
        if not isinstance(sae, SAEWeights):
            raise ValueError("FPOTrainer needs sae=fpo_kernels.SAEWeights")
        if not isinstance(sae_layer, int):
            raise ValueError("FPOTrainer needs sae_layer: the decoder block whose output the SAE reads")
        if select not in ("policy", "reference"):
            raise ValueError(f"select must be 'policy' or 'reference', got {select!r}")
        if not 1 <= k <= cache_k:
            raise ValueError(
                f"need 1 <= k ({k}) <= cache_k ({cache_k}): the cache holds cache_k features per completion"
            )
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is None or not getattr(config, "precompute_ref_log_probs", False):
            raise ValueError("FPOTrainer needs DPOConfig(precompute_ref_log_probs=True): FPO's reference is offline")
        self.fpo_label_smoothing = check_loss_options(config, "FPOTrainer")
        self.fpo_ready = False  # the reference features are added once the SAE is in place
        super().__init__(*args, **kwargs)
        self.fpo_alpha, self.fpo_k, self.fpo_select, self.fpo_cache_k, self.fpo_d_scale = (
            alpha,
            k,
            select,
            cache_k,
            d_scale,
        )
        base = self.accelerator.unwrap_model(self.model)
        if not 0 <= sae_layer < len(decoder_layers(base)):
            raise ValueError(f"sae_layer {sae_layer} is outside the model's {len(decoder_layers(base))} decoder layers")
        if sae.d_in != base.config.hidden_size:
            raise ValueError(f"the SAE reads d_in={sae.d_in} but the model's hidden size is {base.config.hidden_size}")
        self.fpo_sae = sae.to(self.accelerator.device)
        self.fpo_capture = ActivationCapture(base, sae_layer, sae_site)
        self.fpo_ready = True
        self.train_dataset = self._add_reference_features(self.train_dataset)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {name: self._add_reference_features(d) for name, d in self.eval_dataset.items()}
        elif self.eval_dataset is not None:
            self.eval_dataset = self._add_reference_features(self.eval_dataset)
        collate = self._trl_collator = self.data_collator

        def with_features(examples):
            out = collate(examples)
            for key in FEATURE_COLUMNS:
                if key in examples[0]:  # not yet while TRL precomputes a new dataset's reference log-probs
                    out[key] = torch.tensor([ex[key] for ex in examples])
            return out

        self.data_collator = with_features

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            c for c in FEATURE_COLUMNS if c not in self._signature_columns
        ]

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's reference log-probs, then (once the SAE is in place: a dataset passed to evaluate()) the
        reference's features for the same rows. TRL refuses a new dataset once training has started, when the
        reference (the initial model) is gone; the features follow the same rule."""
        dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        return self._add_reference_features(dataset) if self.fpo_ready else dataset

    @torch.no_grad()
    def _add_reference_features(self, dataset):
        """Each completion's top-K pooled SAE features under the reference (the model as it starts), as columns."""
        from torch.utils.data import DataLoader

        if all(c in dataset.column_names for c in FEATURE_COLUMNS):
            return dataset
        loader = DataLoader(
            dataset,
            batch_size=self.args.per_device_train_batch_size,
            collate_fn=getattr(self, "_trl_collator", self.data_collator),
            shuffle=False,
        )
        base = self.accelerator.unwrap_model(self.model)
        was_training = base.training
        base.eval()
        cols = {c: [] for c in FEATURE_COLUMNS}
        dev = self.accelerator.device
        for batch in loader:
            ids, attn, mask = (batch[k].to(dev) for k in ("input_ids", "attention_mask", "completion_mask"))
            base.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False)
            pooled = sae_pooled_features(self.fpo_capture.pop().float(), self.fpo_sae, mask=mask.bool())
            idx, val = pack_topk(pooled, self.fpo_cache_k)
            P = ids.shape[0] // 2
            for side, rows in (("chosen", slice(0, P)), ("rejected", slice(P, 2 * P))):
                cols[f"ref_{side}_idx"] += idx[rows].long().tolist()
                cols[f"ref_{side}_val"] += val[rows].float().tolist()
        base.train(was_training)
        for name, values in cols.items():
            dataset = dataset.add_column(name, values)
        return dataset

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        keep = {"input_ids", "attention_mask"}
        model_kwargs = {k: v for k, v in inputs.items() if k in keep}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)  # TRL's fused head: no full logits
        resid = self.fpo_capture.pop()
        shift = completion_mask[..., 1:]
        lengths = shift.sum(1).clamp(min=1).float()
        mean = outputs.log_probs[:, -shift.size(1) :].sum(1) / lengths  # [2P] length-normalised log-probs
        P = mean.shape[0] // 2
        ref_mean = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(mean) / lengths
        ref_idx = torch.cat([inputs["ref_chosen_idx"], inputs["ref_rejected_idx"]]).to(resid.device)
        ref_val = torch.cat([inputs["ref_chosen_val"], inputs["ref_rejected_val"]]).to(resid.device)
        d = (
            sae_feature_mse(
                resid,
                self.fpo_sae,
                ref_idx,
                ref_val,
                mask=completion_mask.bool(),
                k=self.fpo_k,
                select=self.fpo_select,
                check_inputs=False,
            )
            / self.fpo_d_scale
        )
        losses, m = preference_loss(
            "fpo",
            SequenceStats(logp_mean=mean, d=d),
            SequenceStats(logp_mean=ref_mean),
            beta=self.beta,
            alpha=self.fpo_alpha,
            label_smoothing=self.fpo_label_smoothing,
        )
        loss = losses.mean()
        gather = self.accelerator.gather_for_metrics
        total = outputs.log_probs[:, -shift.size(1) :].sum(1)
        log_trl_metrics(self, mode, outputs, inputs, total, m)
        for key, value in (
            ("fpo/mean_logps/chosen", mean[:P]),
            ("fpo/mean_logps/rejected", mean[P:]),
            ("fpo/d_chosen", m["d_chosen"]),
            ("fpo/d_rejected", m["d_rejected"]),
        ):
            self._metrics[mode][key].append(gather(value.detach().float()).mean().item())
        share = constraint_share(
            gather(m["constraint_abs"].float()).mean().item(), gather(m["margin_abs"].float()).mean().item()
        )
        if share is not None:  # not while the margin is ~0 (the policy still at the reference)
            self._metrics[mode]["fpo/constraint_share"].append(share)
        return (loss, outputs) if return_outputs else loss


class TDPOTrainer(_base()):  # type: ignore[misc]  # TRL's DPOTrainer, imported when used
    """TRL's DPOTrainer with TDPO's loss (Zeng et al. 2024), variant 1 or 2: the policy's and TRL's reference
    model's final hidden states through our fused op, which gives both log-probs and the sequential KL from one
    pass over the logits. The reference must be online (precompute_ref_log_probs=False). One process: the
    policy body runs outside TRL's fused-head forward, which a data-parallel wrapper would not see."""

    def __init__(self, *args, variant: int = 2, alpha: float = 0.5, **kwargs):
        if variant not in (1, 2):
            raise ValueError(f"variant must be 1 or 2, got {variant!r}")
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None and getattr(config, "precompute_ref_log_probs", False):
            raise ValueError(
                "TDPOTrainer needs the reference online (precompute_ref_log_probs=False): the KL "
                "compares both models over the whole vocabulary at every token"
            )
        if config is not None:
            check_loss_options(config, "TDPOTrainer")
        super().__init__(*args, **kwargs)
        self.tdpo_label_smoothing = check_loss_options(self.args, "TDPOTrainer")
        if self.accelerator.num_processes > 1:
            raise ValueError("TDPOTrainer runs on one process; use `fpo train --method tdpo2` under torchrun")
        if self.ref_model is None:
            raise ValueError(
                "TDPOTrainer needs TRL's reference model (a PEFT model's disabled adapters are not supported)"
            )
        self.tdpo_variant, self.tdpo_alpha = variant, alpha

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        base = self.accelerator.unwrap_model(model)
        ids, attn, mask = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        hidden = run_body(base, ids, attn)
        with torch.no_grad():
            ref_hidden = run_body(self.ref_model, ids, attn)
        w, b = lm_head(base)
        rw, rb = lm_head(self.ref_model)
        total, _, _, ref_total, kl = sequence_logprobs_kl(
            hidden,
            w,
            ref_hidden,
            rw.detach(),
            input_ids=ids,
            response_mask=mask.bool(),
            softcap=final_softcap(base),
            bias=b,
            ref_bias=None if rb is None else rb.detach(),
        )
        losses, m = preference_loss(
            f"tdpo{self.tdpo_variant}",
            SequenceStats(logp_sum=total, kl=kl),
            SequenceStats(logp_sum=ref_total),
            beta=self.beta,
            alpha=self.tdpo_alpha,
            label_smoothing=self.tdpo_label_smoothing,
        )
        log_trl_metrics(self, mode, None, inputs, total, m)  # no logits are formed: no entropy or token accuracy
        for key, value in (("tdpo/kl_chosen", m["kl_chosen"]), ("tdpo/kl_rejected", m["kl_rejected"])):
            self._metrics[mode][key].append(value.detach().float().mean().item())
        loss = losses.mean()
        return (loss, None) if return_outputs else loss
