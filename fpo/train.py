"""The thin training loop: FPO, DPO, SimPO, TDPO1 and TDPO2 on the fused kernels, one GPU or many.

Per optimizer step and per micro-batch of P pairs (a fixed number, or as many as fit max_tokens): one
policy forward over the 2P chosen and rejected sequences in the micro-batch's layout (fpo.packing: padded,
packed, or packed with each prompt shared by its chosen and rejected response); the residual stream after
block L_sae from a hook; the final hidden states from the model body (no logits); the varlen fused
log-probs with the lm head; sae_feature_mse_varlen against the cached reference features (fpo); for tdpo,
the reference body on the same layout and sequence_logprobs_kl_varlen instead: both models' log-probs and
the KL from one pass over the logits; the loss; backward. Metrics stay on the device and are read once per
log step.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
from contextlib import nullcontext
import random
import resource
import shutil
import time

import torch
from torch import nn
from torch.profiler import record_function

from fpo_kernels import sae_feature_mse_varlen, sequence_logprobs_kl_varlen, sequence_logprobs_varlen
from fpo_kernels.losses import constraint_share

from . import distributed as dist_utils
from .cache import ReferenceCache, atomic_write_json, atomic_write_text, temp_dir
from .locking import DirectoryLock
from .config import RESUMABLE_CHANGES, TrainConfig, config_from_dict
from .data import load_pairs, tokenize_pairs, tokenizer_fingerprint
from .losses import LOSSES
from .model import (ResidualCapture, config_fingerprint, enable_activation_checkpointing, final_softcap, lm_head,
                    load_model_for_layout, load_tokenizer, model_fingerprint, resolve_device)
from .packing import attention_length_scale, body_hidden, collate, micro_batch_tokens, plan_micro_batches
from .precision import SAVE_DTYPES, make_optimizer, resolve_precision, updates_round_away
from .precompute import check_sae_fits
from .progress import progress_bar
from .lora import ADAPTER_WEIGHTS, add_adapters, adapter_weights, load_adapter_weights, merged_weights, save_adapter_config
from .sae import load_saes
from .trackers import open_trackers

__all__ = ["train", "PolicyStats", "Trainer", "NonFiniteLossError"]

RUN_FILES = ("metrics.jsonl", "summary.json", "final", "final-merged", "tensorboard")   # with checkpoint-*: what marks a directory as a run
SHARE_CHECK_STEP = 10   # when the constraint's share of the loss is first judged (mean over the logged steps so far)


class NonFiniteLossError(FloatingPointError):
    pass


class PolicyStats(nn.Module):
    """Wraps the policy so that everything touching its weights (body, lm head) runs inside forward:
    DDP and FSDP2 see one forward. Returns per-sequence statistics for the 2P sequences of a micro-batch.
    SAEs: one (sae at layer), or saes = [(SAEWeights, layer, weight, scale)]: D = sum of weight x D_sae / scale,
    one forward hook per layer."""

    def __init__(self, model, sae=None, layer=None, k=50, select="policy", saes=None, autocast=None,
                 adapters_off=None):
        super().__init__()
        self.model = model
        self.adapters_off = adapters_off   # LoRA: a context in which the model is the frozen base (TDPO's reference)
        self.autocast = autocast or (lambda device: nullcontext())   # the precision policy's forward context
        self.k, self.select = k, select
        self.saes = list(saes) if saes is not None else ([] if sae is None else [(sae, layer, 1.0, 1.0)])
        self.captures = {L: ResidualCapture(model, L) for L in sorted({x[1] for x in self.saes})}
        self.softcap = final_softcap(model)

    def remove_hooks(self):
        for cap in self.captures.values():
            cap.remove()

    def forward(self, batch, ref_idx=None, ref_val=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                ref_features=None, reference_without_adapters=False):
        """batch: fpo.packing.collate's micro-batch (any layout). ref_features: [(ref_idx, ref_val)] per SAE, in
        order (or ref_idx, ref_val for one SAE). With ref_hidden (TDPO: the reference's final hidden states on
        the same layout, flat [N, d_ref]), the reference's log-probs and the KL come from the same pass over
        the logits. reference_without_adapters (LoRA TDPO): the reference is this model with its adapters off,
        run here, inside the one forward DDP and FSDP see."""
        dev = next(self.model.parameters()).device
        with self.autocast(dev):
            if reference_without_adapters:
                with torch.no_grad(), self.adapters_off():
                    ref_hidden = body_hidden(self.model, batch, dev)
                for cap in self.captures.values():   # the reference pass is not the policy's residual stream
                    cap.value = None
                ref_weight, ref_bias = (None if t is None else t.detach() for t in lm_head(self.model))
            return self._stats(batch, dev, ref_idx, ref_val, ref_hidden, ref_weight, ref_bias, ref_features)

    def _stats(self, batch, dev, ref_idx, ref_val, ref_hidden, ref_weight, ref_bias, ref_features):
        hidden = body_hidden(self.model, batch, dev)                         # [N, d] flat rows
        w, b = lm_head(self.model)
        rows, labels, seq = (batch[k].to(dev) for k in ("pred_rows", "labels", "seq_ids"))
        S = batch["num_seqs"]
        if ref_hidden is not None:
            with record_function("fpo::logprobs_kl"):
                total, mean, count, ref_total, kl = sequence_logprobs_kl_varlen(
                    hidden, w, rows, labels, seq, S, ref_hidden, ref_weight, self.softcap, b, ref_bias)
            out = {"logp_sum": total, "logp_mean": mean, "len": count, "ref_logp_sum": ref_total, "kl": kl}
        else:
            with record_function("fpo::logprobs"):
                total, mean, count = sequence_logprobs_varlen(hidden, w, rows, labels, seq, S, self.softcap, b)
            out = {"logp_sum": total, "logp_mean": mean, "len": count}
        if self.saes:
            resid = {L: cap.pop() for L, cap in self.captures.items()}
            refs = ref_features if ref_features is not None else [(ref_idx, ref_val)]
            with record_function("fpo::sae_constraint"):
                for (sae, layer, weight, scale), (idx, val) in zip(self.saes, refs):
                    r = resid[layer]
                    # spans stay on the host: the kernels lay out their row tiles from them with no device sync
                    d = sae_feature_mse_varlen(r.reshape(-1, r.shape[-1]), batch["spans"].cpu(), sae, idx, val,
                                               self.k, self.select, check_inputs=False) * (weight / scale)
                    out["d"] = d if "d" not in out else out["d"] + d
        return out


def _split(t, P):
    return t[:P], t[P:]


def compute_loss(cfg: TrainConfig, stats: dict, ref: dict | None, P: int, d_scale: float = 1.0):
    """(losses [P], metrics) for one micro-batch from policy statistics and reference values; d_scale: what
    D is divided by (the cache's recorded feature scale under constraint_norm "ref", else 1)."""
    beta = cfg.beta_value
    sw, sl = _split(stats["logp_sum"], P)
    aw, al = _split(stats["logp_mean"], P)
    m = cfg.method
    if m == "simpo":
        return LOSSES[m](aw, al, beta, cfg.gamma)
    if m == "dpo":
        return LOSSES[m](sw, sl, ref["chosen_logp_sum"], ref["rejected_logp_sum"], beta)
    if m == "fpo":
        dw, dl = _split(stats["d"] / d_scale, P)
        return LOSSES[m](aw, al, ref["chosen_logp_mean"], ref["rejected_logp_mean"], dw, dl, beta, cfg.alpha)
    kw, kl = _split(stats["kl"], P)
    return LOSSES[m](sw, sl, ref["chosen_logp_sum"], ref["rejected_logp_sum"], kw, kl, beta, cfg.alpha,
                     variant=1 if m == "tdpo1" else 2)


class Trainer:
    """Holds everything a run needs; `fit()` runs it. Built by `train(cfg)`."""

    def __init__(self, cfg: TrainConfig, log=print):
        self._lock = None
        try:
            self._build(cfg, log)
        except BaseException:
            self._release_lock()   # a run that fails to start leaves its directory free
            raise

    def _build(self, cfg: TrainConfig, log):
        self.cfg = cfg
        self.rank, self.world, dist_dev = dist_utils.init()
        self.device = resolve_device(cfg.device) if cfg.device else (dist_dev or resolve_device())
        if dist_dev is not None and self.device.type == "cuda":
            self.device = dist_dev
        self.precision = resolve_precision(cfg.precision, self.device)
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self._resume_from, self._resume_state = None, None
        self._claim_output_dir()          # before any model loads: a bad directory fails in a second
        if cfg.resume:
            self._resume_from = self._find_checkpoint(cfg.resume)
            self._resume_state = self._read_state(self._resume_from)
            self._check_resumable(self._resume_state.get("config", {}))
        per_step = (cfg.micro_batch_size if cfg.max_tokens is None else 1) * self.world
        if cfg.batch_size % per_step:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of "
                             f"{'micro_batch_size x ' if cfg.max_tokens is None else ''}ranks = {per_step}")
        self.accum = cfg.batch_size // per_step   # micro-batches per step with a fixed micro_batch_size
        self.pairs_per_rank = cfg.batch_size // self.world
        torch.manual_seed(cfg.seed)

        self.tokenizer = load_tokenizer(cfg.model)
        # LoRA: the base weights are frozen (bf16 under any bf16 policy); the adapters get the trained dtype
        model = load_model_for_layout(cfg.model, self.precision.frozen_dtype if cfg.lora_r else self.precision.param_dtype,
                                      self.device, cfg.packing, cfg.attn_implementation, self.log)
        # what the cache was built from: the base weights, before any adapter
        self._weights_bf16 = model_fingerprint(model, "")["weights_bf16"] if cfg.cache else None
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.peft_model = None
        if cfg.lora_r:
            self.peft_model = add_adapters(model, cfg.lora_r, cfg.lora_alpha_value, cfg.lora_dropout,
                                           cfg.lora_target_modules, self.precision.param_dtype)
        model.train()
        self.model = model
        self.row_scale = attention_length_scale(model)   # packed micro-batches as one stream (FlexAttention) or rows

        # the reference side
        self.cache = None
        if cfg.cache:  # TrainConfig requires one for fpo and dpo
            self.cache = ReferenceCache(cfg.cache)
        self.saes, self.sae_keys = [], []    # SAESpecs, and the suffix of each one's tensors in the cache
        if cfg.method == "fpo":
            if not self.cache.has_features:
                raise ValueError(f"cache {cfg.cache} holds no SAE features: build it with --sae for method fpo")
            self.saes = load_saes(cfg.sae_specs, self.device)
            if len(self.saes) == 1 and self.saes[0].layer is None:   # one SAE, its layer from the cache
                self.saes[0].layer = self.cache.meta.get("layer")
            for spec in self.saes:
                check_sae_fits(model, spec.sae, spec.layer)
                self.sae_keys.append(self.cache.find_sae(spec.sae.fingerprint(), spec.layer, spec.name)["key"])
            if cfg.k > self.cache.K:
                raise ValueError(f"k ({cfg.k}) exceeds the cache's K ({self.cache.K}): " + (
                    "select='reference' needs k cached features" if cfg.select == "reference" else
                    "selected features outside the cached top-K would count as 0 for the reference and inflate D "
                    "many times over") + f"; rebuild the cache with --K >= {cfg.k} or lower k")
        # constraint_norm "ref": each SAE's D divided by its recorded reference feature scale
        scales = [self.cache.feature_scale(cfg.k, key) if cfg.constraint_norm == "ref" else 1.0 for key in self.sae_keys]
        self._share_checked = False
        self.ref_model = None
        self.reference_is_base = cfg.method.startswith("tdpo") and not cfg.reference_model and self.peft_model is not None
        if self.reference_is_base:
            self.log("[fpo] LoRA: TDPO's reference is the policy with its adapters off (no second model)")
        elif cfg.method.startswith("tdpo"):
            # frozen: bf16 weights under any bf16 policy (no master copy), the forward under the run's autocast
            self.ref_model = load_model_for_layout(cfg.reference_model or cfg.model, self.precision.frozen_dtype,
                                                   self.device, cfg.packing, model.config._attn_implementation,
                                                   self.log).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
            if final_softcap(self.ref_model) != final_softcap(model):
                raise ValueError(f"reference_model's final logit softcap {final_softcap(self.ref_model)} differs from "
                                 f"the policy's {final_softcap(model)}: TDPO's fused KL applies one softcap to both")

        pairs = load_pairs(cfg.dataset, cfg.max_pairs, cfg.bad_rows, log=self.log, split=cfg.split)
        self.items = tokenize_pairs(pairs, self.tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.max_tokens,
                                    log=self.log)
        if self.cache is not None:
            # the cache must come from this model's weights, not only its architecture
            self.cache.verify(
                model={"config": config_fingerprint(model), "weights_bf16": self._weights_bf16},
                tokenizer=tokenizer_fingerprint(self.tokenizer),
                max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
            self.cache.check_rows(self.items)
        self.steps_per_epoch = len(self.items) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {len(self.items)} usable pairs, fewer than batch_size {cfg.batch_size}")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        self.policy = PolicyStats(model, k=cfg.k, select=cfg.select,
                                  saes=[(x.sae, x.layer, x.weight, sc) for x, sc in zip(self.saes, scales)],
                                  autocast=self.precision.autocast,
                                  adapters_off=self.peft_model.disable_adapter if self.peft_model is not None else None)
        if self._resume_from is not None and self.peft_model is not None:   # before any sharding: plain tensors
            self._load_adapters(self._resume_from)
        self.wrapped = self._wrap(self.policy)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(params, self.precision, cfg.optimizer, cfg.lr, cfg.weight_decay,
                                        (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps, self.device)
        self._log_precision(params)
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_scheduler, cfg.warmup_steps, self.total_steps)
        self.step = 0
        self.history = []
        if self._resume_from is not None:
            self._load_checkpoint(self._resume_from, self._resume_state)
            self._resume_state = None
        self._log_packing()

    def _log_precision(self, params):
        """Say once what the precision policy costs a parameter; under bf16-pure, warn when the learning rate is
        below the bf16 resolution of the typical weight (most updates would round away). Under FSDP: this rank's
        shards."""
        cfg, prec = self.cfg, self.precision
        params = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        n = sum(p.numel() for p in params)
        per = prec.bytes_per_parameter(cfg.optimizer)
        if self.peft_model is not None:
            total = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in self.model.parameters())
            self.log(f"[fpo] LoRA r={cfg.lora_r}, alpha {cfg.lora_alpha_value:g} on {cfg.lora_target_modules}: "
                     f"{n / 1e6:.2f}M trainable of {total / 1e6:.1f}M parameters ({n / total:.2%}); the base weights "
                     f"are frozen in {str(prec.frozen_dtype).removeprefix('torch.')}")
        self.log(f"[fpo] precision {prec.name}: {str(prec.param_dtype).removeprefix('torch.')} weights, gradients and "
                 f"optimizer states{' with a Kahan compensation' if prec.name == 'bf16-compensated' else ''}"
                 f"{', forward under bf16 autocast' if prec.autocast_dtype else ''}: {per} bytes x {n / 1e6:.{1 if n >= 1e6 else 3}f}M "
                 f"{'trained ' if self.peft_model is not None else ''}parameters = {per * n / 2**30:.{2 if per * n >= 2**28 else 4}f} "
                 "GiB before activations")
        if prec.name != "bf16-pure":
            return
        low, median = updates_round_away(params, cfg.lr)
        if low:
            self.log(f"[fpo] warning: precision bf16-pure at lr {cfg.lr:g}: a bf16 weight of the median size "
                     f"{median:.3g} moves only in steps of about {median * 2 ** -8:.2g} (2^-8 of it), so most Adam "
                     "updates round away and the policy barely trains; use --precision bf16-mixed (fp32 master "
                     "weights) or bf16-compensated (bf16 weights with Kahan-summed updates)")

    # ---- distributed wrapping -------------------------------------------------------------------
    def _wrap(self, module):
        if self.world == 1:
            return module
        if self.cfg.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            from .model import decoder_layers
            # bf16-mixed: fp32 shards (what the optimizer updates), gathered in bf16, gradients reduced in fp32
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if self.precision.name == "bf16-mixed" else MixedPrecisionPolicy()
            for layer in decoder_layers(module.model):
                fully_shard(layer, mp_policy=mp)
            return fully_shard(module, mp_policy=mp)
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ---- data -----------------------------------------------------------------------------------
    def micro_batches(self, step, rank=None):
        """The micro-batches a rank runs at optimizer step `step`: a deterministic function of the step.
        With max_tokens, each rank packs its share of the step's pairs into micro-batches of at most
        max_tokens tokens, and every rank runs as many micro-batches as the rank that needs the most
        (FSDP's collectives need equal counts): the others split their largest micro-batches."""
        cfg = self.cfg
        rank = self.rank if rank is None else rank
        epoch, within = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)
        perm = torch.randperm(len(self.items), generator=g)
        batch = perm[within * cfg.batch_size:(within + 1) * cfg.batch_size].tolist()
        if cfg.max_tokens is None:
            mb = cfg.micro_batch_size
            return [[self.items[i] for i in batch[(j * self.world + r) * mb:(j * self.world + r + 1) * mb]]
                    for r in (rank,) for j in range(self.accum)]
        n = self.pairs_per_rank
        plans = [plan_micro_batches([self.items[i] for i in batch[r * n:(r + 1) * n]], cfg.packing, cfg.max_tokens,
                                    self.row_scale) for r in range(self.world)]
        mine, target = plans[rank], max(len(p) for p in plans)
        while len(mine) < target:
            j = max(range(len(mine)), key=lambda i: len(mine[i]))
            mine[j:j + 1] = [mine[j][:len(mine[j]) // 2], mine[j][len(mine[j]) // 2:]]
        return mine

    def _log_packing(self):
        """Tokens one epoch sends through the model body in this run's layout, against the real tokens and the
        padded layout's count, logged once."""
        if self.rank != 0:
            return
        cfg = self.cfg
        steps = range(min(self.steps_per_epoch, self.total_steps))
        mbs = [mb for s in steps for r in range(self.world) for mb in self.micro_batches(s, r)]
        body = sum(micro_batch_tokens(mb, cfg.packing, self.row_scale) for mb in mbs)
        padded = sum(micro_batch_tokens(mb, "off") for mb in mbs)
        real = sum(len(it.prompt_ids) + len(it.chosen_ids) + len(it.rejected_ids) for mb in mbs for it in mb)
        how = "" if cfg.packing == "off" else \
            f" ({'one stream' if self.row_scale is None else 'rows'} for {self.model.config._attn_implementation} attention)"
        self.log(f"[fpo] packing {cfg.packing}{how}: {body} tokens per epoch through the model body ({len(mbs)} forwards), "
                 f"{real / max(body, 1):.0%} of them distinct; {body / max(padded, 1):.2f}x the padded layout's {padded}")

    # ---- one step -------------------------------------------------------------------------------
    def _reference(self, batch):
        ref = {}
        if self.cache is not None:
            ref = self.cache.lookup(batch["ids"], batch["row_hash"], self.device)
        if self.ref_model is not None:
            # the reference body only, on the same layout: its log-probs come with the KL, from one pass over
            # both models' logits
            with torch.no_grad(), self.precision.autocast(self.device):
                rh = body_hidden(self.ref_model, batch, self.device)
            rw, rb = lm_head(self.ref_model)
            ref.update(_hidden=rh, _weight=rw.detach(), _bias=None if rb is None else rb.detach())
        return ref

    def _losses(self, items):
        """(losses [P], metrics, batch) of one micro-batch: the policy forward and the reference side."""
        cfg = self.cfg
        batch = collate(items, cfg.packing, self.tokenizer.pad_token_id, self.row_scale)
        P = len(items)
        ref = self._reference(batch)
        kw = {}
        if cfg.method == "fpo":
            kw = dict(ref_features=[(torch.cat([ref["chosen_idx" + key], ref["rejected_idx" + key]]),
                                     torch.cat([ref["chosen_val" + key], ref["rejected_val" + key]]))
                                    for key in self.sae_keys])
        if self.ref_model is not None:
            kw = dict(ref_hidden=ref.pop("_hidden"), ref_weight=ref.pop("_weight"), ref_bias=ref.pop("_bias"))
        if self.reference_is_base:
            kw = dict(reference_without_adapters=True)
        stats = self.wrapped(batch, **kw)
        if "ref_logp_sum" in stats:
            ref.update(zip(("chosen_logp_sum", "rejected_logp_sum"), _split(stats["ref_logp_sum"], P)))
        losses, metrics = compute_loss(cfg, stats, ref, P)
        return losses, metrics, batch

    def train_step(self, step):
        cfg = self.cfg
        sums = {}
        tokens = {"tokens_processed": 0, "response_tokens": 0}
        mbs = self.micro_batches(step)
        for j, items in enumerate(mbs):
            sync = j == len(mbs) - 1
            ctx = self.wrapped.no_sync() if (hasattr(self.wrapped, "no_sync") and not sync) else nullcontext()
            with ctx:
                losses, metrics, batch = self._losses(items)
                # weighted by pairs, so micro-batches of different sizes (max_tokens) average correctly
                (losses.sum() / self.pairs_per_rank).backward()
            metrics["loss"] = losses.detach()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.float().sum() / self.pairs_per_rank
            tokens["tokens_processed"] += batch["tokens"]
            tokens["response_tokens"] += batch["response_tokens"]
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for k, v in tokens.items():
            sums[k] = torch.tensor(float(v), device=self.device)
        return sums, tokens["tokens_processed"]

    @torch.no_grad()
    def weights_are_sound(self) -> bool:
        """Finite parameters and a finite loss on the next step's first micro-batch, on every rank: what a
        checkpoint must hold (a step can leave finite weights whose next loss is already NaN). The RNG is
        restored, so the check changes nothing in the run."""
        rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        try:
            local = [p.to_local() if hasattr(p, "to_local") else p for p in self.policy.parameters()]   # FSDP: shards
            ok = torch.stack([p.isfinite().all() for p in local]).all()
            losses, _, _ = self._losses(self.micro_batches(self.step % self.total_steps)[0])
            ok = (ok & losses.isfinite().all()).float()
        finally:
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state_all(rng[1])
        return dist_utils.all_reduce_mean(ok).item() == 1.0

    # ---- checkpoints ----------------------------------------------------------------------------
    def _state_dicts(self):
        if self.cfg.fsdp and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            msd, osd = get_state_dict(self.policy, self.optimizer, options=opts)
            return {k.removeprefix("model."): v for k, v in msd.items()}, osd
        return self.model.state_dict(), self.optimizer.state_dict()

    def _claim_output_dir(self):
        """output_dir must be writable, and must not hold another run unless this run resumes it or was told
        to replace it (overwrite). Checked before any model loads."""
        cfg, d = self.cfg, self.cfg.output_dir
        if not dist_utils.is_main():
            return
        if os.path.lexists(d) and not os.path.isdir(d):
            raise ValueError(f"output_dir {d} is {'a broken symlink' if os.path.islink(d) else 'a file'}, not a "
                             "directory: choose another --output-dir")
        try:
            os.makedirs(d, exist_ok=True)
            self._lock = DirectoryLock(d, "output_dir")   # one run per directory at a time
        except OSError as e:
            raise ValueError(f"output_dir {d} is not writable ({e.strerror}): choose another --output-dir") from None
        for n in os.listdir(d):   # what a killed run left half-written: temporaries of its own names
            if ".tmp" in n and (n.split(".tmp", 1)[0] in RUN_FILES or n.startswith("checkpoint-")):
                path = os.path.join(d, n)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        held = sorted(n for n in os.listdir(d) if n in RUN_FILES or n.startswith("checkpoint-"))
        if not held or cfg.resume:
            return
        if not cfg.overwrite:
            if not any(n.startswith("checkpoint-") or n == "final" for n in held):   # stopped before its first save
                raise ValueError(f"output_dir {d} holds a run that stopped before saving any checkpoint "
                                 f"({', '.join(held[:4])}): nothing to resume; pass --overwrite to start it again, "
                                 "or choose another --output-dir")
            raise ValueError(f"output_dir {d} holds another run ({', '.join(held[:4])}): pass --resume latest to "
                             "continue it, --overwrite to replace it, or choose another --output-dir")
        for n in held:
            path = os.path.join(d, n)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        self.log(f"[fpo] overwrite: removed the previous run in {d}")

    def _find_checkpoint(self, where):
        if where == "latest":
            d = self.cfg.output_dir
            found = sorted(n for n in os.listdir(d) if n.startswith("checkpoint-") and ".tmp" not in n) if os.path.isdir(d) else []
            if not found:
                raise ValueError(f"resume='latest' but {d} holds no checkpoint-* folder: nothing to resume (a run "
                                 "stopped before its first save starts again with --overwrite instead of --resume)")
            where = os.path.join(d, found[-1])
        return where

    def _read_state(self, where):
        """trainer_state.pt through torch.load(weights_only=True): tensors, numbers, strings and containers
        only, so a crafted file cannot run code. Every file is checked against the checksums recorded when the
        checkpoint was written first."""
        state_path = os.path.join(where, "trainer_state.pt")
        if not os.path.exists(state_path):
            raise ValueError(f"resume: {where} is not a checkpoint (no trainer_state.pt)")
        _verify_checksums(where)
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"resume: {state_path} holds objects outside the safe set (tensors, numbers, strings, "
                             f"containers); not loading it, since unpickling them could run code ({type(e).__name__})") from None
        if not isinstance(state, dict) or not {"step", "history", "config"} <= set(state):
            raise ValueError(f"resume: {state_path} lacks the trainer state (step, history, config): not a checkpoint "
                             "this trainer wrote, or a damaged one; resume from another checkpoint")
        if "optimizer" in state and not {"scheduler", "rng"} <= set(state):
            raise ValueError(f"resume: {state_path} lacks its scheduler or RNG state (damaged); resume from another checkpoint")
        if "optimizer" not in state:
            raise ValueError(f"resume: {where} was saved without its optimizer state (save_optimizer false, or "
                             "save_dtype other than the trained weights'): it holds the model only and cannot be resumed")
        saved = state.get("precision")
        if saved is not None and saved != self.precision.name:
            raise ValueError(f"resume: {where} was trained under precision {saved}, this run resolves to "
                             f"{self.precision.name} (on {self.device.type}): pass --precision {saved}")
        return state

    def _check_resumable(self, saved: dict):
        """The resumed run must be the saved run: every key but RESUMABLE_CHANGES equal."""
        now = dataclasses.asdict(self.cfg)
        for key, value in now.items():
            if key in RESUMABLE_CHANGES or key not in saved:   # a key newer than the checkpoint: nothing to compare
                continue
            if saved[key] != value:
                raise ValueError(f"resume: {key} is {value!r} but the checkpoint's run used {saved[key]!r}; only "
                                 f"{', '.join(RESUMABLE_CHANGES)} may change on resume (start a new run in another "
                                 "--output-dir to change it)")

    def save_checkpoint(self, name=None, with_state=True, dtype=None):
        """output_dir/checkpoint-<step>: the model (save_pretrained) and trainer_state.pt (optimizer,
        scheduler, RNG, step; with_state False: step, history and config only). Written under a temporary
        name and renamed: never half a checkpoint; a full disk leaves the previous one intact.
        dtype: the saved weights' dtype when it is not the trained weights' own (then never resumable)."""
        msd, osd = self._state_dicts()
        cast = dtype is not None and dtype != self.precision.param_dtype and self.peft_model is None
        if self.peft_model is not None:   # the adapters only (the base is the run's --model)
            msd = adapter_weights(msd)
        if cast:
            msd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in msd.items()}
            with_state = False
        path = os.path.join(self.cfg.output_dir, name or f"checkpoint-{self.step:06d}")
        if dist_utils.is_main():
            tmp = temp_dir(path)   # a fresh, unpredictable name: nothing planted there is written through
            state = {"step": self.step, "history": self.history, "config": dataclasses.asdict(self.cfg),
                     "precision": self.precision.name}
            if with_state:
                state.update(optimizer=osd, scheduler=self.scheduler.state_dict(),
                             rng={"torch": torch.get_rng_state(), "python": random.getstate(),
                                  "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
            try:
                if self.peft_model is not None:
                    from safetensors.torch import save_file
                    save_file({k: v.contiguous() for k, v in msd.items()}, os.path.join(tmp, ADAPTER_WEIGHTS),
                              metadata={"format": "pt"})
                    save_adapter_config(self.peft_model, tmp, self.cfg.model)
                else:
                    self.model.save_pretrained(tmp, state_dict=msd)
                if cast:   # save_pretrained records the live model's dtype
                    _set_config_dtype(os.path.join(tmp, "config.json"), dtype)
                self.tokenizer.save_pretrained(tmp)
                torch.save(state, os.path.join(tmp, "trainer_state.pt"))
                _write_checksums(tmp)
            except (OSError, RuntimeError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                previous = sorted(n for n in os.listdir(self.cfg.output_dir) if n.startswith("checkpoint-")
                                  and ".tmp" not in n)
                full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "enforce fail" in str(e) or "No space" in str(e)
                raise RuntimeError(f"{'the disk is full' if full else 'writing failed'} while saving {path} "
                                   f"({str(e).splitlines()[0][:200]}); nothing half-written was kept, and "
                                   + (f"the previous checkpoint {previous[-1]} is intact: free space and resume "
                                      "with --resume latest" if previous else "no earlier checkpoint exists")) from None
            if os.path.islink(path):   # a planted link is removed, never written through
                os.remove(path)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        dist_utils.barrier()
        return path

    def save_merged(self, dtype):
        """output_dir/final-merged: the adapters merged into the base weights (computed in fp32), saved in
        `dtype` as a plain model; written under a temporary name and renamed."""
        msd, _ = self._state_dicts()
        merged = merged_weights(msd, self.cfg.lora_alpha_value / self.cfg.lora_r, dtype)
        path = os.path.join(self.cfg.output_dir, "final-merged")
        if dist_utils.is_main():
            tmp = temp_dir(path)
            try:
                self.peft_model.get_base_model().save_pretrained(tmp, state_dict=merged)
                _set_config_dtype(os.path.join(tmp, "config.json"), dtype)
                self.tokenizer.save_pretrained(tmp)
                _write_checksums(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if os.path.islink(path):
                os.remove(path)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            self.log(f"[fpo] LoRA adapters merged into the base weights in {str(dtype).removeprefix('torch.')}: "
                     f"{path} (a plain model)")
        dist_utils.barrier()
        return path

    def _load_adapters(self, where):
        from safetensors.torch import load_file
        path = os.path.join(where, ADAPTER_WEIGHTS)
        if not os.path.exists(path):
            raise ValueError(f"resume: {where} holds no {ADAPTER_WEIGHTS}: it was not saved by a LoRA run "
                             "(resume it without --lora-r)")
        load_adapter_weights(self.model, load_file(path), where)

    def _load_checkpoint(self, where, state):
        from safetensors.torch import load_file
        if self.peft_model is not None:   # the adapters were loaded before wrapping; the optimizer state here
            if self.cfg.fsdp and self.world > 1:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
                set_optimizer_state_dict(self.policy, self.optimizer, state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            weights = None
        else:
            weights = {}
            for n in sorted(os.listdir(where)):
                if n.endswith(".safetensors"):
                    weights.update(load_file(os.path.join(where, n)))
        if weights is None:
            pass
        elif self.cfg.fsdp and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            set_state_dict(self.policy, self.optimizer, model_state_dict={"model." + k: v for k, v in weights.items()},
                           optim_state_dict=state["optimizer"], options=opts)
        else:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
            if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
                raise ValueError(f"resume: checkpoint {where} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = state["step"]
        self.history = state["history"]
        self.log(f"[fpo] resumed from {where} at step {self.step}")

    # ---- the loop -------------------------------------------------------------------------------
    def _peak_memory_mb(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS on Linux

    def _flush(self, pending, t_start, tokens, metrics_file, bar, trackers=None):
        """Read the pending steps' device metrics once, check them, write them."""
        if not pending:
            return
        keys = sorted(pending[0][1])
        stacked = dist_utils.all_reduce_mean(torch.stack([torch.stack([m[k] for k in keys]) for _, m in pending])).cpu()
        elapsed = time.time() - t_start
        for (step, _), row in zip(pending, stacked.tolist()):
            rec = {"step": step, **dict(zip(keys, row))}
            for k in ("tokens_processed", "response_tokens"):   # totals over ranks, not means
                rec[k] = round(rec[k] * self.world)
            share = constraint_share(rec["constraint_abs"], rec["margin_abs"]) if "constraint_abs" in rec else None
            if share is not None:    # not logged while the margin is ~0 (the first step)
                rec["constraint_share"] = share
            if not all(math.isfinite(v) for v in row):
                bad = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
                self._stop_diverged(f"non-finite {bad} at step {step}")
            rec.update(lr=self.scheduler.get_last_lr()[0], tokens_per_s=tokens * self.world / max(elapsed, 1e-9),
                       step_time_s=elapsed / len(pending), peak_memory_mb=self._peak_memory_mb())
            self.history.append(rec)
            if metrics_file is not None:
                metrics_file.write(json.dumps(rec) + "\n")
            if trackers is not None:
                trackers.log(rec, step)
        if metrics_file is not None:
            metrics_file.flush()
        last = self.history[-1]
        # the policy starts at the reference, where D (and TDPO's KL) is 0: judge the share once it has moved
        if not self._share_checked and "constraint_abs" in last and \
                (last["step"] >= SHARE_CHECK_STEP or last["step"] == self.total_steps):
            recent = self.history[-SHARE_CHECK_STEP:]
            share = constraint_share(sum(h["constraint_abs"] for h in recent), sum(h["margin_abs"] for h in recent))
            if share is not None:
                self._share_checked = True
                self._warn_if_constraint_is_negligible(share, last["step"])
        if bar is not None:
            extra = {"share": f"{last['constraint_share']:.1%}"} if "constraint_share" in last else {}
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.2f}", **extra,
                            tok_s=f"{last['tokens_per_s']:.0f}")

    def _warn_if_constraint_is_negligible(self, share, step):
        """Once, at the first log step from step SHARE_CHECK_STEP: a constraint below 1% of the margin term
        changes next to nothing."""
        if share >= 0.01:
            return
        cfg = self.cfg
        knob = "--alpha" + (" or --constraint-norm ref (D divided by the reference's feature scale)"
                            if cfg.method == "fpo" and cfg.constraint_norm == "none" else "")
        self.log(f"[fpo] warning: at step {step} the {'feature' if cfg.method == 'fpo' else 'KL'} constraint is "
                 f"{share:.2%} of the margin term (mean |constraint term| / mean |beta x margin|): at alpha {cfg.alpha} it changes "
                 f"almost nothing; raise {knob} (alpha x {0.1 / max(share, 1e-12):.3g} would make it about 10%)")

    def _stop_diverged(self, what):
        d = self.cfg.output_dir
        last = sorted(n for n in os.listdir(d) if n.startswith("checkpoint-") and ".tmp" not in n) \
            if os.path.isdir(d) else []
        raise NonFiniteLossError(
            f"{what}: training stopped. The last good checkpoint is "
            f"{os.path.join(d, last[-1]) if last else 'none (no checkpoint was saved)'}; "
            "lower lr, check the data, or use --precision fp32 or bf16-mixed.")

    def fit(self) -> dict:
        cfg = self.cfg
        main = dist_utils.is_main()
        metrics_file = None
        if main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            path = os.path.join(cfg.output_dir, "metrics.jsonl")
            # on resume, the checkpoint's history is the truth: lines logged after it (or torn by a kill) go
            atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in self.history))
            metrics_file = open(path, "a")
        trackers = None
        if main:
            trackers = open_trackers(cfg.report_to, cfg.output_dir,
                                     cfg.run_name or os.path.basename(os.path.abspath(cfg.output_dir)),
                                     dataclasses.asdict(cfg))
        bar = None
        if cfg.progress and main:
            bar = progress_bar(self.total_steps, self.step, f"train {cfg.method}", "step")
        pending, tokens, t0 = [], 0, time.time()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            while self.step < self.total_steps:
                metrics, n = self.train_step(self.step)
                self.step += 1
                pending.append((self.step, metrics))
                tokens += n
                if bar is not None:
                    bar.update(1)
                last = self.step == self.total_steps
                save = cfg.save_every and self.step % cfg.save_every == 0
                if self.step % cfg.log_every == 0 or last or save:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self._flush(pending, t0, tokens, metrics_file, bar, trackers)
                    pending, tokens, t0 = [], 0, time.time()
                if save:  # never a diverged checkpoint: this step's metrics were checked above, the next loss here
                    if not self.weights_are_sound():
                        self._stop_diverged(f"after step {self.step} the weights give a non-finite loss")
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if metrics_file is not None:
                metrics_file.close()
            if trackers is not None:
                trackers.close()
        save_dtype = None if cfg.save_dtype == "auto" else SAVE_DTYPES[cfg.save_dtype]
        if not self.weights_are_sound():   # the final model gets the check every checkpoint gets
            self._stop_diverged(f"after step {self.step} the weights give a non-finite loss (or are not finite)")
        final = self.save_checkpoint("final", with_state=cfg.save_optimizer, dtype=save_dtype)
        if self.peft_model is not None and cfg.merge_lora:
            self.save_merged(save_dtype or torch.float32)
        elif save_dtype is not None and save_dtype != self.precision.param_dtype:
            self.log(f"[fpo] final model saved in {cfg.save_dtype} (trained in "
                     f"{str(self.precision.param_dtype).removeprefix('torch.')}): a copy for inference, not resumable")
        summary = {"method": cfg.method, "steps": self.step, "final": final,
                   "last": self.history[-1] if self.history else None}
        if main:
            atomic_write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
            if self.history:
                h = self.history[-1]
                self.log(f"[fpo] {cfg.method}: {self.step} steps, final loss {h['loss']:.4f}, "
                         f"last batch's reward accuracy {h['accuracy']:.2f}, {h['tokens_per_s']:.0f} tokens/s, "
                         f"peak memory {h['peak_memory_mb']:.0f} MB; saved {final}")
            self.log(_written(final, cfg.output_dir))
        return summary

    def close(self):
        self.policy.remove_hooks()
        self._release_lock()

    def _release_lock(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None


CHECKSUMS = "checksums.json"


def _write_checksums(folder):
    """sha256 of every file of a checkpoint, recorded beside them (checked before a resume)."""
    from .cache import _sha256
    sums = {n: _sha256(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n)) and n != CHECKSUMS}
    atomic_write_json(os.path.join(folder, CHECKSUMS), sums)


def _verify_checksums(folder):
    """Every file checksums.json lists must be there and match (checkpoints written before checksums.json
    existed are read as they are)."""
    from .cache import _sha256
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            sums = json.load(f)
        assert isinstance(sums, dict)
    except (OSError, ValueError, AssertionError):
        raise ValueError(f"resume: {path} is damaged: the checkpoint cannot be verified; resume from another one") from None
    for name, want in sums.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise ValueError(f"resume: checkpoint {folder} lacks {name} (truncated or partly deleted); resume from another checkpoint")
        if _sha256(file) != want:
            raise ValueError(f"resume: {file} does not match the checksum recorded when it was written (the file is "
                             "corrupted); resume from another checkpoint")


def _set_config_dtype(path, dtype):
    with open(path) as f:
        config = json.load(f)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    atomic_write_json(path, config)


def _size(*paths) -> str:
    n = sum(os.path.getsize(os.path.join(r, f)) for p in paths for r, _, fs in os.walk(p) for f in fs) + \
        sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def _written(final, output_dir) -> str:
    """Where a finished run's files are, and their sizes."""
    weights = [os.path.join(final, n) for n in os.listdir(final) if n.endswith(".safetensors")]
    state = os.path.join(final, "trainer_state.pt")
    adapters = os.path.exists(os.path.join(final, ADAPTER_WEIGHTS))
    lines = [f"[fpo] written: the {'LoRA adapters (peft format)' if adapters else 'model'} {final} "
             f"({'adapters' if adapters else 'weights'} {_size(*weights)})"]
    merged = os.path.join(output_dir, "final-merged")
    if adapters and os.path.isdir(merged):
        lines.append(f"  the adapters merged into the base weights, a plain model: {merged} ({_size(merged)})")
    if os.path.exists(state):
        lines.append(f"  optimizer, scheduler and RNG state {state} ({_size(state)}; --no-save-optimizer leaves it "
                     "out, and the run is then not resumable)")
    for name in ("metrics.jsonl", "summary.json"):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            lines.append(f"  {name}: {path} ({_size(path)})")
    return "\n".join(lines)


def make_scheduler(optimizer, name: str, warmup: int, total_steps: int):
    """Linear warmup over `warmup` steps (step s runs at (s + 1) / warmup of lr), then constant, or
    transformers' linear or cosine decay, evaluated one step ahead so that its warmup is the same and its
    last step's lr is not 0."""
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    from transformers import get_scheduler
    decay = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps + 1).lr_lambdas[0]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: decay(s + 1))


def train(config: TrainConfig | dict | None = None, log=print, **overrides) -> dict:
    """Train with a TrainConfig (or a dict of its fields) plus keyword overrides; returns the summary."""
    if config is None:
        config = {}
    if isinstance(config, dict):
        config = config_from_dict({**config, **overrides})
    elif overrides:
        config = config.replace(**overrides)
    trainer = Trainer(config, log=log)
    try:
        return trainer.fit()
    finally:
        trainer.close()
