"""Held-out evaluation: preference accuracy, sequential KL to the reference, the FPO constraint, and the
mean per-token entropy of sampled responses (the FPO paper's diversity measure)."""

from __future__ import annotations

import os
from typing import Any

import torch

from ._types import Log, Model, PathLike, Tokenizer
from .config import EvalConfig, renamed_keys
from .model import attention_length_scale
from .packing import Batching
from .protection import ProtectTerm, protect_metrics
from .reference_cache import ReferenceCache
from .runtime import load_config_saes, load_items, load_model, start
from .sae import cached_sae_keys
from .step import PolicyStats, reference_side

__all__ = ["evaluate"]


@torch.no_grad()
def _sample_entropy(model, tok, items, n, max_new_tokens, device, seed):
    """Mean entropy (nats) of the policy's next-token distribution along its own sampled responses."""
    if n <= 0:
        return None
    g = torch.Generator(device="cpu").manual_seed(seed)
    total, count = 0.0, 0
    for it in items[:n]:
        ids = torch.tensor([it.prompt_ids], device=device)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=tok.pad_token_id,
        )
        for step_logits in out.logits:  # one [1, V] per generated token; generation stops at EOS
            logp = torch.log_softmax(step_logits.float(), -1)
            total += float(-(logp.exp() * logp).sum())
            count += 1
    return total / max(count, 1)


@torch.no_grad()
def evaluate(
    model: PathLike | Model,
    dataset: PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    log: Log = print,
    **options: Any,
) -> dict:
    """Metrics on held-out pairs; options: fpo.config.EvalConfig's keys (the flags of `fpo eval`, with their
    defaults and help there).

    accuracy_logp: fraction of pairs whose chosen response has the higher mean log-prob (needs nothing else);
    accuracy_reward: fraction whose implicit reward a - a_ref is higher for chosen (needs the cache; ties
    count half, so an untrained policy scores 0.5); reward_margin: the mean over pairs of that implicit reward's
    margin, (a_w - a_w_ref) - (a_l - a_l_ref) in nats per token, one scale for every method (needs the cache);
    kl: mean sequential KL(pi_ref || pi) per response (needs
    reference_model); d: mean FPO constraint over chosen and rejected (needs sae and a cache with features;
    several SAEs: sae, sae_layer and sae_weight as lists, d = sum of weight x d_sae as in training, and each
    SAE's own d as d[name@layer]);
    entropy: mean per-token entropy of sampled responses (entropy_samples > 0). packing: the layout of the
    forward passes (fpo.packing); the metrics do not depend on it beyond rounding. bad_rows: as for training
    ("error" stops at a bad row, "skip" skips and reports it). precision: the forward's policy (fpo.precision),
    with bf16 weights under any bf16 policy: an evaluated model is frozen."""
    model = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model
    cfg = EvalConfig(model=model, dataset=os.fspath(dataset), **renamed_keys(options))
    rt = start(cfg, log, distributed=False)
    device, prec = rt.device, rt.precision
    model, tokenizer = load_model(model, cfg, rt, prec.frozen_dtype, tokenizer)
    model.eval()
    ref_model = cfg.reference_model
    if ref_model is not None:
        ref_model, _ = load_model(
            ref_model, cfg, rt, prec.frozen_dtype, tokenizer, attn_implementation=model.config._attn_implementation
        )
        ref_model.eval()
    ref_cache = ReferenceCache(cfg.cache) if isinstance(cfg.cache, str) else cfg.cache
    saes, keys = _saes_in_cache(cfg, model, ref_cache, rt)
    protect = _protect_term(cfg, saes, ref_cache, model, device)
    items = load_items(cfg, tokenizer, rt)
    policy = PolicyStats(
        model,
        k=cfg.k,
        select=cfg.select,
        saes=saes if keys else [],
        autocast=prec.autocast,
        check_inputs=True,
        protect=protect,
    )
    try:
        scores = _score(cfg, policy, tokenizer.pad_token_id, ref_model, ref_cache, keys, items, device)
    finally:
        policy.remove_hooks()
    protected = {k: float(torch.cat(v).mean()) for k, v in scores.items() if k.startswith("protect_") and v}
    return {
        "pairs": len(items),
        **_summary(cfg, scores, saes, keys, ref_cache),
        **protected,
        "entropy": _sample_entropy(model, tokenizer, items, cfg.entropy_samples, cfg.max_new_tokens, device, cfg.seed),
    }


def _saes_in_cache(cfg: EvalConfig, model, ref_cache, rt):
    """(the SAE specs, the key of each one's tensors in the cache, also set on each spec): keys only when the cache
    holds features."""
    pooled = ref_cache.meta["pooling"] if ref_cache is not None else None
    if pooled is not None and cfg.sae is not None and pooled != cfg.pooling:
        raise ValueError(
            f"cache {ref_cache.path} pooled the reference's features with pooling {pooled!r}, this eval "
            f"uses {cfg.pooling!r}: pass --pooling {pooled} (as the run trained)"
        )
    saes = load_config_saes(cfg, rt)
    if not (saes and ref_cache is not None and ref_cache.has_features):
        return saes, []
    keys = cached_sae_keys(ref_cache, saes, model, cfg.k, cfg.select)
    for spec, key in zip(saes, keys):
        spec.key = key
    return saes, keys


def _protect_term(cfg: EvalConfig, saes, ref_cache, model, device):
    """With --protect: the protected set and the cache's exact reference values of it (fpo.protection)."""
    if not cfg.protect:
        return None
    if ref_cache is None or not saes:
        raise ValueError(
            f"protect: the protected features' held-out drift needs their SAE (--sae) and a cache of these pairs "
            f"holding their reference values (`fpo precompute --protect {cfg.protect}`, then --cache)"
        )
    return ProtectTerm.load(cfg.protect, saes, ref_cache, model, 0.0, device)


def _score(cfg: EvalConfig, policy: PolicyStats, pad_id, ref_model, ref_cache, keys, items, device) -> dict:
    """Per-pair and per-sequence scores of every batch, on the device, from the statistics a training step
    computes (fpo.step): acc_logp, acc_reward, kl, and one D list per SAE."""
    scores: dict[str, list] = {"acc_logp": [], "acc_reward": [], "reward_margin": [], "kl": [], "d": [[] for _ in keys]}
    for chunk, batch in Batching.of(cfg, pad_id, attention_length_scale(policy.model)).batches(items):
        P = len(chunk)
        reference, kw = reference_side(batch, device, ref_cache, policy.saes, ref_model, autocast=policy.autocast)
        stats = policy(batch, **kw)
        mean = stats.get("logp_mean")
        scores["acc_logp"].append((mean[:P] > mean[P:]).float())
        if reference is not None:
            reward = mean - reference.get("logp_mean")  # [2P], chosen first
            rw_, rl_ = reward[:P], reward[P:]
            scores["acc_reward"].append((rw_ > rl_).float() + 0.5 * (rw_ == rl_).float())  # a tie counts half
            scores["reward_margin"].append(rw_ - rl_)
        for out, d in zip(scores["d"], stats.get("d_each") if keys else []):
            out.append(d)
        if stats.kl is not None:
            scores["kl"].append(stats.kl)
        if stats.protect is not None:
            # a protect set needs its cache
            assert reference is not None and reference.protect is not None and policy.protect is not None
            for name, v in protect_metrics(stats.protect, reference.protect, policy.protect.scale).items():
                scores.setdefault(name, []).append(v)
    return scores


def _summary(cfg: EvalConfig, scores, saes, keys, ref_cache) -> dict:
    """The means; D as training weighs it (sum of weight x each SAE's D), and over each SAE's recorded
    reference feature scale (what constraint_norm "ref" trains on)."""

    def mean_of(xs):
        return float(torch.cat(xs).mean()) if xs else None

    per_sae = [mean_of(x) for x in scores["d"]]
    d = sum(s.weight * v for s, v in zip(saes, per_sae)) if per_sae and None not in per_sae else None
    scales = [next((e.get("feature_scale") for e in ref_cache.saes if e["key"] == key), None) for key in keys]
    d_over_scale = None
    if d is not None and all(sc and cfg.k <= len(sc) for sc in scales):
        d_over_scale = sum(s.weight * v / ref_cache.feature_scale(cfg.k, key) for s, v, key in zip(saes, per_sae, keys))
    each = {f"d[{s.name}@{s.layer}]": v for s, v in zip(saes, per_sae)} if len(per_sae) > 1 else {}
    return {
        "accuracy_logp": mean_of(scores["acc_logp"]),
        "accuracy_reward": mean_of(scores["acc_reward"]),
        "reward_margin": mean_of(scores["reward_margin"]),
        "kl": mean_of(scores["kl"]),
        "d": d,
        "d_over_scale": d_over_scale,
        **each,
    }
