"""The thin training loop: FPO, DPO, SimPO, TDPO1 and TDPO2 on the fused kernels, one GPU or many.

Per optimizer step and per micro-batch of P pairs (a fixed number, or as many as fit max_tokens): one
policy forward over the 2P chosen and rejected sequences in the micro-batch's layout (fpo.packing: padded,
packed, or packed with each prompt shared by its chosen and rejected response); the residual stream after
block L_sae from a hook; the final hidden states from the model body (no logits); the fused log-probs of
the flat rows with the lm head; sae_feature_mse against the cached reference features (fpo); for tdpo,
the reference body on the same layout and sequence_logprobs_kl instead: both models' log-probs and
the KL from one pass over the logits; the loss; backward. Metrics stay on the device and are read once per
log step.

Here: building a run (model, LoRA, reference side, data, optimizer), its micro-batches, the step and the loop.
Beside it: fpo.step (the policy's statistics and the loss), fpo.run_dir (the output directory, checkpoints,
resume), fpo.run_log (metrics, trackers, the progress bar and the constraint-share warning).
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from typing import Any

import torch

from fpo_kernels.sequence_stats import SequenceStats

from . import distributed as dist_utils
from ._types import Log
from .alpha_control import AlphaController
from .config import TrainConfig, config_from_dict
from .feature_files import read_feature_weights
from .files import atomic_write_json
from .locking import DirectoryLock
from .lora import add_adapters, describe_lora
from .model import (
    apply_body_kernels,
    attention_length_scale,
    compile_body,
    config_fingerprint,
    enable_activation_checkpointing,
    final_softcap,
    model_fingerprint,
)
from .packing import Batching, micro_batch_tokens
from .pairs import tokenizer_fingerprint
from .precision import SAVE_DTYPES, describe_precision, make_optimizer
from .protection import ProtectTerm
from .reference_cache import ReferenceCache
from .run_dir import (
    Checkpointer,
    check_resumable,
    check_resumable_inputs,
    checkpoints,
    claim_output_dir,
    find_checkpoint,
    load_adapters,
    read_state,
    written,
)
from .run_log import RunLog
from .runtime import load_config_saes, load_items, load_model, start
from .sae import cached_sae_keys
from .step import PolicyStats, compute_loss, reference_side

__all__ = ["train", "Trainer", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    pass


class Trainer:
    """Holds everything a run needs; `fit()` runs it. Built by `train(cfg)`."""

    def __init__(self, cfg: TrainConfig, log: Log = print):
        self._lock: DirectoryLock | None = None
        try:
            self._build(cfg, log)
        except BaseException:
            self._release_lock()  # a run that fails to start leaves its directory free
            raise

    def _build(self, cfg: TrainConfig, log):
        self._setup(cfg, log)
        self._load_policy(cfg)
        self._load_reference(cfg)
        self._load_data(cfg)
        self._build_step(cfg)
        self._log_packing()

    def _setup(self, cfg: TrainConfig, log):
        """Device, precision, the output directory claimed, the checkpoint to resume, the batch arithmetic."""
        self.cfg = cfg
        self.runtime = rt = start(cfg, log)
        self.rank, self.world, self.device, self.precision = rt.rank, rt.world, rt.device, rt.precision
        self.log = rt.log
        self._resume_from, self._resume_state = None, None
        self.inputs: dict[str, object] = {}  # what the run reads from files, by content: a resume must find the same
        if dist_utils.is_main():  # before any model loads: a bad directory fails in a second
            self._lock = claim_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite, self.log)
        if cfg.resume:
            self._resume_from = find_checkpoint(cfg.output_dir, cfg.resume)
            self._resume_state = read_state(self._resume_from, self.precision.name, self.device.type)
            check_resumable(cfg, self._resume_state.get("config", {}))
        per_step = (cfg.micro_batch_size if cfg.max_tokens is None else 1) * self.world
        if cfg.batch_size % per_step:
            raise ValueError(
                f"batch_size {cfg.batch_size} must be a multiple of "
                f"{'micro_batch_size x ' if cfg.max_tokens is None else ''}ranks = {per_step}"
            )
        self.accum = cfg.batch_size // per_step  # micro-batches per step with a fixed micro_batch_size
        self.pairs_per_rank = cfg.batch_size // self.world
        torch.manual_seed(cfg.seed)

    def _load_policy(self, cfg: TrainConfig):
        """The tokenizer and the policy (LoRA adapters on a frozen base, activation checkpointing)."""
        # LoRA: the base weights are frozen (bf16 under any bf16 policy); the adapters get the trained dtype
        dtype = self.precision.frozen_dtype if cfg.lora_r else self.precision.param_dtype
        model, self.tokenizer = load_model(cfg.model, cfg, self.runtime, dtype)
        # what the cache was built from: the base weights, before any adapter
        self._weights_bf16 = model_fingerprint(model, "")["weights_bf16"] if cfg.cache or cfg.lora_r else None
        if cfg.lora_r:  # adapters resumed on another base would be another model, silently
            self.inputs["base_model"] = self._weights_bf16
        if cfg.body_kernels and self.device.type != "cuda":
            raise ValueError(
                f"--body-kernels {cfg.body_kernels}: its kernels are Triton kernels for CUDA devices; this run is on "
                f"{self.device.type}: train without --body-kernels"
            )
        if cfg.body_kernels:  # before the adapters (peft wraps the linear layers the patched MLP calls)
            applied = apply_body_kernels(model, cfg.body_kernels)
            self.log(f"[fpo] body kernels: liger-kernel's {', '.join(applied)} on the {model.config.model_type} body")
        if cfg.gradient_checkpointing and not cfg.compile:  # compiled: checkpointed inside the compiled layers
            enable_activation_checkpointing(model)
        self.peft_model = None
        if cfg.lora_r:
            self.peft_model = add_adapters(
                model,
                cfg.lora_r,
                cfg.lora_alpha_value,
                cfg.lora_dropout,
                cfg.lora_target_modules,
                self.precision.param_dtype,
            )
        if cfg.compile_backend != "inductor" and not cfg.compile:
            raise ValueError(f"--compile-backend {cfg.compile_backend} chooses --compile's backend: add --compile")
        if cfg.compile and cfg.compile_backend == "inductor" and self.device.type == "cpu" and not _cpp_compiler():
            raise ValueError(
                "--compile on the CPU generates C++ and needs a compiler (g++, c++ or clang++ on PATH): install one, "
                "or pass --compile-backend aot_eager (traced, no code generated)"
            )
        if cfg.compile:  # after the adapters, before any sharding: the layers as they will run
            compile_body(model, cfg.compile_backend, checkpoint=cfg.gradient_checkpointing)
        model.train()
        self.model = model
        self.row_scale = attention_length_scale(model)  # packed micro-batches as one stream (FlexAttention) or rows
        self.batching = Batching.of(self.cfg, self.tokenizer.pad_token_id, self.row_scale)
        self.loss_settings = self.cfg.loss_settings

    def _load_reference(self, cfg: TrainConfig):
        """The reference side: the cache and its SAEs (fpo, dpo), or TDPO's online reference model."""
        self.cache: ReferenceCache | None = None
        if cfg.cache:  # TrainConfig requires one for fpo and dpo
            self.cache = ReferenceCache(cfg.cache)
        self.saes = []  # SAESpecs, each with its key in the cache, its scale and its feature weights in D
        if cfg.method == "fpo":
            assert self.cache is not None  # TrainConfig checked
            built = self.cache.meta["pooling"]
            if built != cfg.pooling:
                raise ValueError(
                    f"cache {cfg.cache} pooled the reference's features with pooling {built!r}, this run "
                    f"uses {cfg.pooling!r}: rebuild it with `fpo precompute --pooling {cfg.pooling}`"
                )
            if not self.cache.has_features:
                raise ValueError(f"cache {cfg.cache} holds no SAE features: build it with --sae for method fpo")
            self.saes = load_config_saes(cfg, self.runtime)
            inside = [s for s in self.saes if s.site in ("mlp_out", "attn_out")]
            if cfg.compile and inside:  # the hook sits on a module inside a compiled layer: dynamo traces past it
                raise ValueError(
                    f"--compile reads SAEs on the residual stream only (resid_post, resid_pre): SAE "
                    f"'{inside[0].name}' reads {inside[0].site}, inside a compiled decoder layer, where its hook "
                    "does not fire; train it without --compile"
                )
            keys = cached_sae_keys(self.cache, self.saes, self.model, cfg.k, cfg.select)
            # constraint_norm "ref": each SAE's D divided by its recorded reference feature scale
            for spec, key in zip(self.saes, keys):
                spec.key = key
                spec.scale = self.cache.feature_scale(cfg.k, key) if cfg.constraint_norm == "ref" else 1.0
        if cfg.feature_weights:
            if cfg.method != "fpo":
                raise ValueError(f"feature_weights weighs FPO's D; method {cfg.method} has no D")
            j, weights, digest = read_feature_weights(cfg.feature_weights, self.saes)
            self.saes[j].feature_weights = weights.to(self.device)
            self.inputs["feature_weights"] = digest
            self._report_feature_weights(cfg, j, weights)
        self.protect = self._load_protect(cfg) if cfg.protect else None
        if self._resume_state is not None:
            check_resumable_inputs(self.inputs, self._resume_state.get("inputs"))
        self.ref_model = None
        self.reference_is_base = (
            cfg.method.startswith("tdpo") and not cfg.reference_model and self.peft_model is not None
        )
        if self.reference_is_base:
            self.log("[fpo] LoRA: TDPO's reference is the policy with its adapters off (no second model)")
        elif cfg.method.startswith("tdpo"):
            # frozen: bf16 weights under any bf16 policy (no master copy), the forward under the run's autocast
            self.ref_model, _ = load_model(
                cfg.reference_model or cfg.model,
                cfg,
                self.runtime,
                self.precision.frozen_dtype,
                tokenizer=self.tokenizer,
                attn_implementation=self.model.config._attn_implementation,
            )
            self.ref_model.eval()
            if cfg.body_kernels:
                apply_body_kernels(self.ref_model, cfg.body_kernels)
            if cfg.compile:
                compile_body(self.ref_model, cfg.compile_backend)
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
            if final_softcap(self.ref_model) != final_softcap(self.model):
                raise ValueError(
                    f"reference_model's final logit softcap {final_softcap(self.ref_model)} differs from "
                    f"the policy's {final_softcap(self.model)}: TDPO's fused KL applies one softcap to both"
                )

    def _report_feature_weights(self, cfg, j, weights):
        """Once, at start-up: which features the file weighs, and on what fraction of the cached responses each
        weight can act at all (a weight acts only on a feature D selects, and D's reference value of a feature
        outside the cached top-K is 0)."""
        moved = (weights != 1).nonzero().flatten().tolist()
        spec = self.saes[j]
        key = spec.key
        self.log(
            f"[fpo] feature_weights {cfg.feature_weights}: {len(moved)} features of SAE '{spec.name}' weighted in D "
            f"(e.g. {', '.join(f'{i}: {weights[i]:g}' for i in moved[:5])})"
        )
        if not moved:
            return
        cached = torch.cat([self.cache.data["chosen_idx" + key], self.cache.data["rejected_idx" + key]]).long()
        first_k = cached[:, : cfg.k]
        for i in moved[:10]:
            in_cache = (cached == i).any(1).float().mean().item()
            in_k = (first_k == i).any(1).float().mean().item()
            self.log(
                f"[fpo]   feature {i} (weight {weights[i]:g}): in the reference's cached top-{cached.shape[1]} on "
                f"{in_cache:.0%} of responses, in its top-{cfg.k} on {in_k:.0%}; the weight acts only where D "
                "selects the feature (use --protect to hold a feature whatever D selects)"
            )

    def _load_protect(self, cfg: TrainConfig):
        """The protected set, its SAE and the cache's exact reference values of it (ProtectTerm)."""
        if self.cache is None:
            raise ValueError(
                f"protect: method {cfg.method} has no cache; build one with `fpo precompute --protect "
                f"{cfg.protect}` and pass --cache"
            )
        built = self.cache.meta["pooling"]
        if built != cfg.pooling:  # the protected values were pooled as the cache's features were
            raise ValueError(
                f"cache {cfg.cache} pooled the reference's features with pooling {built!r}, this run uses "
                f"{cfg.pooling!r}: pass --pooling {built}, or rebuild it with `fpo precompute --pooling {cfg.pooling}`"
            )
        saes = self.saes if self.saes else load_config_saes(cfg, self.runtime)
        assert cfg.protect is not None  # checked by the caller
        term = ProtectTerm.load(
            cfg.protect, saes, self.cache, self.model, cfg.protect_coef, self.device, cfg.protect_gate, cfg.protect_form
        )
        protect, spec = term.protect, term.spec
        self.inputs["protect"] = protect.as_dict()
        self.log(
            f"[fpo] protect {cfg.protect}: {len(protect.ids)} features of SAE '{spec.name}' held near the reference "
            f"on chosen and rejected responses ({cfg.protect_form} form), lambda {cfg.protect_coef:g} "
            f"(L = L_{cfg.method} + lambda x mean R)"
        )
        return term

    def _load_data(self, cfg: TrainConfig):
        """The tokenised pairs, checked against the cache, and the number of steps."""
        self.items = load_items(cfg, self.tokenizer, self.runtime)
        if self.cache is not None:
            # the cache must come from this model's weights, not only its architecture
            self.cache.verify(
                model={"config": config_fingerprint(self.model), "weights_bf16": self._weights_bf16},
                tokenizer=tokenizer_fingerprint(self.tokenizer),
                max_length=cfg.max_length,
                max_prompt_length=cfg.max_prompt_length,
            )
            self.cache.check_rows(self.items)
        self.steps_per_epoch = len(self.items) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {len(self.items)} usable pairs, fewer than batch_size {cfg.batch_size}")
        # max_steps overrides epochs, as TRL's and the HF Trainer's do: the data is gone over as often as it takes
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else self.steps_per_epoch * cfg.epochs
        if cfg.warmup_steps > self.total_steps:  # the warmup never ends: every step runs below --lr
            self.log(
                f"[fpo] warning: warmup_steps {cfg.warmup_steps} exceeds the run's {self.total_steps} steps, so the "
                f"lr never reaches {cfg.lr:.3g}: it rises from {cfg.lr / cfg.warmup_steps:.3g} to "
                f"{cfg.lr * self.total_steps / cfg.warmup_steps:.3g}; pass --warmup-steps {self.total_steps // 10} "
                "(a tenth of the run) or fewer"
            )

    def _build_step(self, cfg: TrainConfig):
        """What one step runs: the policy's statistics (wrapped for DDP / FSDP), the optimizer and schedule, and
        the state of a resumed run."""
        self.policy = PolicyStats(
            self.model,
            k=cfg.k,
            select=cfg.select,
            saes=self.saes,
            autocast=self.precision.autocast,
            adapters_off=self.peft_model.disable_adapter if self.peft_model is not None else None,
            protect=self.protect,
        )
        if self._resume_from is not None and self.peft_model is not None:  # before any sharding: plain tensors
            load_adapters(self.model, self._resume_from)
        self.wrapped = self._wrap(self.policy)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(
            params,
            self.precision,
            cfg.optimizer,
            cfg.lr,
            cfg.weight_decay,
            (cfg.adam_beta1, cfg.adam_beta2),
            cfg.adam_eps,
            self.device,
        )
        if self.peft_model is not None:
            self.log(describe_lora(cfg, params, self.model.parameters(), self.precision))
        for line in describe_precision(
            self.precision, params, cfg.optimizer, cfg.lr, trained="trained " if self.peft_model is not None else ""
        ):
            self.log(line)
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_scheduler, cfg.warmup_steps, self.total_steps)
        self.checkpointer = Checkpointer(
            cfg,
            self.model,
            self.policy,
            self.optimizer,
            self.scheduler,
            self.tokenizer,
            self.peft_model,
            self.precision,
            sharded=cfg.fsdp and self.world > 1,
            log=self.log,
            inputs=self.inputs,
        )
        # --target-share, --protect-share: alpha and lambda adapted after every step, their state in each checkpoint
        self.alpha = AlphaController(cfg.alpha, cfg.target_share) if cfg.target_share is not None else None
        self.protect_ctl = None
        if cfg.protect_share is not None:
            self.protect_ctl = AlphaController(cfg.protect_coef, cfg.protect_share)
        self.checkpointer.controller = _Controllers(alpha=self.alpha, protect=self.protect_ctl)
        self.step, self.history = 0, []
        if self._resume_from is not None and self._resume_state is not None:
            saved = self._resume_state.get("controller")
            self.step, self.history = self.checkpointer.restore(self._resume_from, self._resume_state)
            self._resume_state = None
            if saved is not None:
                self.checkpointer.controller.load_state_dict(saved)
            if self.protect_ctl is not None and self.protect is not None:
                self.protect.coef = self.protect_ctl.alpha

    # ---- distributed wrapping -------------------------------------------------------------------
    def _wrap(self, module):
        if self.world == 1:
            return module
        if self.cfg.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            from .model import decoder_layers

            # bf16-mixed: fp32 shards (what the optimizer updates), gathered in bf16, gradients reduced in fp32
            mp = (
                MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                if self.precision.name == "bf16-mixed"
                else MixedPrecisionPolicy()
            )
            for layer in decoder_layers(module.model):
                fully_shard(layer, mp_policy=mp)
            return fully_shard(module, mp_policy=mp)
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ---- data -----------------------------------------------------------------------------------
    def micro_batches(self, step: int, rank: int | None = None) -> list:
        """The micro-batches a rank runs at optimizer step `step`: a deterministic function of the step.
        With max_tokens, each rank packs its share of the step's pairs into micro-batches of at most
        max_tokens tokens, and every rank runs as many micro-batches as the rank that needs the most
        (FSDP's collectives need equal counts): the others split their largest micro-batches."""
        cfg = self.cfg
        rank = self.rank if rank is None else rank
        epoch, within = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)
        perm = torch.randperm(len(self.items), generator=g)
        batch = perm[within * cfg.batch_size : (within + 1) * cfg.batch_size].tolist()
        if cfg.max_tokens is None:
            mb = cfg.micro_batch_size
            return [
                [self.items[i] for i in batch[(j * self.world + r) * mb : (j * self.world + r + 1) * mb]]
                for r in (rank,)
                for j in range(self.accum)
            ]
        n = self.pairs_per_rank
        plans = [self.batching.split([self.items[i] for i in batch[r * n : (r + 1) * n]]) for r in range(self.world)]
        mine, target = plans[rank], max(len(p) for p in plans)
        while len(mine) < target:
            j = max(range(len(mine)), key=lambda i: len(mine[i]))
            mine[j : j + 1] = [mine[j][: len(mine[j]) // 2], mine[j][len(mine[j]) // 2 :]]
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
        how = (
            ""
            if cfg.packing == "off"
            else f" ({'one stream' if self.row_scale is None else 'rows'} for "
            f"{self.model.config._attn_implementation} attention)"
        )
        self.log(
            f"[fpo] packing {cfg.packing}{how}: {body} tokens per epoch through the model body ({len(mbs)} forwards), "
            f"{real / max(body, 1):.0%} of them distinct; {body / max(padded, 1):.2f}x the padded layout's {padded}"
        )

    # ---- one step -------------------------------------------------------------------------------
    def _losses(self, items):
        """(losses [P], metrics, batch) of one micro-batch: the policy forward and the reference side."""
        batch = self.batching.collate(items)
        reference, kw = reference_side(
            batch,
            self.device,
            self.cache,
            self.saes,
            self.ref_model,
            self.reference_is_base,
            self.precision.autocast,
        )
        stats = self.wrapped(batch, **kw)
        if stats.ref_logp_sum is not None:  # TDPO: the reference's log-probs came with the KL
            reference = (reference or SequenceStats()).replace(logp_sum=stats.ref_logp_sum)
        alpha = self.alpha.alpha if self.alpha else None
        losses, metrics = compute_loss(self.loss_settings, stats, reference, self.protect, alpha)
        # TRL's logps/*: each response's summed log-prob
        metrics["logps_chosen"], metrics["logps_rejected"] = (t.detach() for t in stats.pair("logp_sum"))
        return losses, metrics, batch

    def train_step(self, step: int):
        """One optimizer step: (the step's metrics on the device, tokens through the body, the lr it ran at)."""
        cfg = self.cfg
        sums: dict[str, torch.Tensor] = {}
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
            tokens["tokens_processed"] += batch.tokens
            tokens["response_tokens"] += batch.response_tokens
        # the norm before clipping, as TRL and the HF Trainer log it (no clipping: an infinite bound)
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm or float("inf"))
        sums["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: the global norm
        lr = self.optimizer.param_groups[0]["lr"]  # the lr this step applies, read before the schedule moves on
        if self.alpha is not None:  # the alpha this step ran at, then the next step's from this step's terms
            sums["alpha"] = torch.tensor(self.alpha.alpha, device=self.device)
            both = dist_utils.all_reduce_mean(torch.stack([sums["constraint_abs"], sums["margin_abs"]]).float())
            self.alpha.update(*both.tolist())
        if self.protect_ctl is not None and self.protect is not None:  # lambda likewise, against |beta x margin|
            sums["protect_coef"] = torch.tensor(self.protect.coef, device=self.device)
            both = dist_utils.all_reduce_mean(torch.stack([sums["protect_term"], sums["reward_margin_abs"]]).float())
            self.protect.coef = self.protect_ctl.update(*both.tolist())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for k, v in tokens.items():
            sums[k] = torch.tensor(float(v), device=self.device)
        return sums, tokens["tokens_processed"], lr

    @torch.no_grad()
    def weights_are_sound(self) -> bool:
        """Finite parameters and a finite loss on the next step's first micro-batch, on every rank: what a
        checkpoint must hold (a step can leave finite weights whose next loss is already NaN). The RNG is
        restored, so the check changes nothing in the run."""
        rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        try:
            ok = torch.stack([dist_utils.local_shard(p).isfinite().all() for p in self.policy.parameters()]).all()
            losses, _, _ = self._losses(self.micro_batches(self.step % self.total_steps)[0])
            ok = (ok & losses.isfinite().all()).float()
        finally:
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state_all(rng[1])
        return dist_utils.all_reduce_mean(ok).item() == 1.0

    def save_checkpoint(self, name: str | None = None, with_state: bool = True, dtype: torch.dtype | None = None):
        """output_dir/checkpoint-<step> (or `name`): see Checkpointer.save."""
        return self.checkpointer.save(self.step, self.history, name, with_state, dtype)

    # ---- the loop -------------------------------------------------------------------------------
    def _stop_diverged(self, what):
        d = self.cfg.output_dir
        last = checkpoints(d)
        raise NonFiniteLossError(
            f"{what}: training stopped. The last good checkpoint is "
            f"{os.path.join(d, last[-1]) if last else 'none (no checkpoint was saved)'}; "
            "lower lr, check the data, or use --precision fp32 or bf16-mixed."
        )

    def _report_compile(self, seconds):
        """Once, after the first step of a compiled run: its time (compilation included, kept out of the step
        times) and the graph breaks dynamo met inside the compiled layers."""
        from torch._dynamo.utils import counters

        breaks = counters["graph_break"]
        reasons = "; ".join(f"{n} x {why.splitlines()[0][:80]}" for why, n in breaks.most_common(3))
        self.log(
            f"[fpo] compile ({self.cfg.compile_backend}): the first step took {seconds:.1f} s, compilation included "
            f"(its step time is not reported); {sum(breaks.values())} graph breaks in the compiled layers"
            + (f": {reasons}" if reasons else "")
            + "; the fused lm head and SAE ops run outside them, as they are"
        )

    def fit(self) -> dict:
        cfg = self.cfg
        main = dist_utils.is_main()
        report = RunLog(
            cfg, self.history, self.step, self.total_steps, self.steps_per_epoch, self.world, self.device, self.log
        )
        pending, tokens, t0 = [], 0, time.time()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        compiling = cfg.compile  # the first step compiles: it is timed and logged on its own
        graphs = _compiled_graphs() if cfg.compile else None
        try:
            while self.step < self.total_steps:
                metrics, n, lr = self.train_step(self.step)
                self.step += 1
                if graphs is not None:  # a step that compiled again (new shapes) says so, and is marked
                    now = _compiled_graphs()
                    again = now > graphs and not compiling
                    metrics["recompiled"] = torch.tensor(float(again), device=self.device)
                    if again:
                        self.log(
                            f"[fpo] step {self.step} compiled {now - graphs} new graph(s) (new shapes): its time "
                            "includes compilation (metrics.jsonl: recompiled)"
                        )
                    graphs = now
                pending.append((self.step, metrics, lr))
                tokens += n
                last = self.step == self.total_steps
                save = cfg.save_every and self.step % cfg.save_every == 0
                if compiling or self.step % cfg.log_every == 0 or last or save:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    if compiling:
                        self._report_compile(time.time() - t0)
                    report.flush(pending, t0, tokens, self._stop_diverged, timed=not compiling)
                    pending, tokens, t0, compiling = [], 0, time.time(), False
                report.step_done()  # after the flush: a progress line shows this step's metrics
                if save:  # never a diverged checkpoint: this step's metrics were checked above, the next loss here
                    if not self.weights_are_sound():
                        self._stop_diverged(f"after step {self.step} the weights give a non-finite loss")
                    self.save_checkpoint()
        finally:
            report.close()
        save_dtype = None if cfg.save_dtype == "auto" else SAVE_DTYPES[cfg.save_dtype]
        if not self.weights_are_sound():  # the final model gets the check every checkpoint gets
            self._stop_diverged(f"after step {self.step} the weights give a non-finite loss (or are not finite)")
        final = self.save_checkpoint("final", with_state=cfg.save_optimizer, dtype=save_dtype)
        if self.peft_model is not None and cfg.merge_lora:
            self.checkpointer.save_merged(save_dtype or torch.float32)
        elif save_dtype is not None and save_dtype != self.precision.param_dtype:
            self.log(
                f"[fpo] final model saved in {cfg.save_dtype} (trained in "
                f"{str(self.precision.param_dtype).removeprefix('torch.')}): a copy for inference, not resumable"
            )
        summary = {
            "method": cfg.method,
            "steps": self.step,
            "final": final,
            "last": self.history[-1] if self.history else None,
        }
        if main:
            atomic_write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
            if self.history:
                h = self.history[-1]
                speed = f"{h['tokens_per_s']:.0f} tokens/s, " if h.get("tokens_per_s") is not None else ""
                self.log(
                    f"[fpo] {cfg.method}: {self.step} steps, final loss {h['loss']:.4g}, "
                    f"last batch's reward accuracy {h['rewards/accuracies']:.2f}, {speed}"
                    f"peak memory {h['peak_memory_mb']:.0f} MB; saved {final}"
                )
            self.log(written(final, cfg.output_dir, self.checkpointer.saved_optimizer_state))
        return summary

    def close(self):
        self.policy.remove_hooks()
        self._release_lock()

    def _release_lock(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class _Controllers:
    """The adapted parts of the loss a checkpoint keeps (--target-share's alpha, --protect-share's lambda)."""

    def __init__(self, **controllers):
        self.controllers = {k: c for k, c in controllers.items() if c is not None}

    def state_dict(self) -> dict:
        return {k: c.state_dict() for k, c in self.controllers.items()}

    def load_state_dict(self, state: dict):
        for k, c in self.controllers.items():
            if k in state:
                c.load_state_dict(state[k])


def _compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _cpp_compiler() -> str | None:
    import shutil

    return next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


def make_scheduler(optimizer, name: str, warmup: int, total_steps: int):
    """Linear warmup over `warmup` steps (step s runs at (s + 1) / warmup of lr), then constant, or
    transformers' linear or cosine decay, evaluated one step ahead so that its warmup is the same and its
    last step's lr is not 0."""
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    from transformers import get_scheduler

    decay = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps + 1).lr_lambdas[0]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: decay(s + 1))


def train(config: TrainConfig | dict | None = None, log: Log = print, **overrides: Any) -> dict:
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
