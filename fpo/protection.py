"""Feature protection, the training side: a protected set of SAE features held near the reference by a term of
its own, for every method (docs/method.md, "Protection"):

    L = L_method + lambda * mean over the chosen and rejected responses of R(y)

R(y) is fpo_kernels.protection_penalty on the protected features' pooled activations
(fpo_kernels.protected_features, whose gradient can restore a feature pushed below its threshold), against the
reference's exact values for that response, each feature's change divided by a floored reference scale.

The reference values come from the cache: `fpo precompute --protect FILE` adds them to a cache (a new one, or an
existing one, whose other tensors are kept as they are): for every response, every protected feature's pooled
value, zeros included, independent of the cached top-K. They sit in protect-<set>-<start>-<end>.safetensors
shards (checksummed, the unit of resume) and are listed in meta.json's "protect" entry.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fpo_kernels.protect import protected_features, protected_preactivations, protection_penalty

from ._types import Device, Log, Model, PathLike, Tokenizer
from .feature_files import ProtectSet, read_protect_file
from .files import atomic_write_json, sha256_of
from .model import ActivationCapture, attention_length_scale, body_hidden, decoder_layers
from .packing import Batching
from .progress import progress_bar
from .reference_cache import shard_is_sound, shard_name, write_shard
from .sae import check_sae_fits

if TYPE_CHECKING:
    from .config import PrecomputeConfig
    from .pairs import TokenizedPair
    from .reference_cache import ReferenceCache
    from .runtime import Runtime
    from .sae import SAESpec

__all__ = [
    "ProtectTerm",
    "SCALE_FLOOR",
    "protect_scales",
    "protect_token_scales",
    "FORMS",
    "add_protected_values",
    "protect_shard_name",
    "protect_metrics",
]

# a feature's scale is its reference mean pooled activation, floored at this fraction of the set's median (and
# at ABS_FLOOR): a feature that rarely fires is not divided by ~0
SCALE_FLOOR = 0.1
ABS_FLOOR = 1e-4
# the term's two forms: each response's pooled activations, or every response token's pre-activations
FORMS = ("pooled", "token")


def protect_shard_name(features_key: str, start: int, end: int) -> str:
    return "protect-" + features_key + "-" + shard_name(start, end).removeprefix("shard-")


def protect_scales(mean: torch.Tensor, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """[P] per-feature scales: the reference's mean pooled activation over the cached responses, floored at
    SCALE_FLOOR x the set's median, at a hundredth of the feature's JumpReLU threshold (one token firing at the
    threshold in a 100-token response) and at ABS_FLOOR, so that a feature the reference never fires on these
    pairs (held at 0, no_increase) is not divided by ~0."""
    mean = mean.double().clamp(min=0)
    floor = torch.full_like(mean, max(SCALE_FLOOR * float(mean.median()), ABS_FLOOR))
    if threshold is not None:
        floor = torch.maximum(floor, 0.01 * threshold.double().cpu().clamp(min=0))
    return torch.maximum(mean, floor).float()


def protect_token_scales(z_sum: torch.Tensor, z_sq: torch.Tensor, n: int) -> torch.Tensor:
    """[P] the per-token form's scales: each protected pre-activation's standard deviation over the reference's
    response tokens (from its sum and sum of squares over n tokens), floored at SCALE_FLOOR x the set's median and
    at ABS_FLOOR."""
    n = max(int(n), 1)
    var = (z_sq / n - (z_sum / n) ** 2).clamp(min=0)
    std = var.sqrt()
    floor = max(SCALE_FLOOR * float(std.median()), ABS_FLOOR)
    return std.clamp(min=floor).float()


class _Stop(Exception):
    """Raised by a hook once the SAE's layer has run: the rest of the forward is not needed."""


def _stop_after(model, layer, site):
    block = decoder_layers(model)[layer]

    def stop(*args, **kwargs):
        raise _Stop

    if site == "resid_pre":
        return block.register_forward_pre_hook(stop, with_kwargs=True)
    return block.register_forward_hook(stop)


@torch.no_grad()
def reference_protected(model, batch, spec, ids, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference's protected features on one micro-batch, the forward stopped after the SAE's layer: their
    pooled values [2P, |ids|] (chosen rows first), and each response's per-token pre-activations [n_s, |ids|]."""
    cap = ActivationCapture(model, spec.layer, spec.site)
    stop = _stop_after(model, spec.layer, spec.site)
    try:
        try:
            body_hidden(model, batch, device)
        except _Stop:
            pass
        r = cap.pop()
    finally:
        stop.remove()
        cap.remove()
    flat, spans, fid = r.reshape(-1, r.shape[-1]), batch.pool_spans.cpu(), torch.tensor(ids)
    pooled = protected_features(flat, spec.sae, fid, spans=spans).float().cpu()
    z = protected_preactivations(flat, spec.sae, fid, spans=spans).float().cpu()
    return pooled, list(z.split((spans[:, 1] - spans[:, 0]).tolist()))


def add_protected_values(
    cfg: PrecomputeConfig,
    model: Model,
    tokenizer: Tokenizer,
    items: Sequence[TokenizedPair],
    saes: Sequence[SAESpec],
    rt: Runtime,
    shards: Sequence[tuple[int, int]],
    sae_keys: Sequence[str],
    say: Log,
) -> dict:
    """Add (or replace) the protected set's reference values in the complete cache cfg.out; returns meta.json's
    "protect" entry. The caller holds the cache's lock. Shards already written for this set and matching their
    checksums are kept (resume)."""
    import json

    from safetensors.torch import load_file

    out = cfg.out
    if cfg.protect is None:
        raise ValueError("add_protected_values: cfg.protect names no protect file")
    protect = read_protect_file(cfg.protect, saes)
    j = protect.index_in(saes)
    spec = saes[j]
    if spec.sae.activation == "topk":
        raise ValueError(
            f"protect {cfg.protect}: SAE '{spec.name}' is a TopK SAE, whose features cannot be encoded apart; "
            "protect features of a JumpReLU, ReLU or BatchTopK SAE"
        )
    fkey = protect.features_key
    meta_path = os.path.join(out, "meta.json")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    old = meta.get("protect")
    if (
        isinstance(old, dict)
        and old.get("features_key") == fkey
        and "token_scale" in old  # caches of 0.3.0's development had no per-token values
        and _protect_files_sound(out, old)
    ):
        say(f"[fpo] cache {out} already holds the reference's values of these {len(protect.ids)} protected features")
        return old
    if isinstance(old, dict) and old.get("features_key") != fkey:
        say(f"[fpo] cache {out}: replacing its protected set ({len(old.get('ids', []))} features) with this one")
    if "protect" in meta:  # unlisted before any of its files goes: a kill from here on leaves a usable cache
        del meta["protect"]
        atomic_write_json(meta_path, meta)
    names = {protect_shard_name(fkey, s, e) for s, e in shards}
    for n in os.listdir(out):  # another set's shards, or this set's half-written ones
        if n.startswith("protect-") and (n.split(".sha256")[0] not in names or ".tmp" in n):
            os.remove(os.path.join(out, n))
    todo = [(s, e) for s, e in shards if not shard_is_sound(out, protect_shard_name(fkey, s, e), say)]
    if len(todo) < len(shards):
        say(f"[fpo] protect: resuming, {len(shards) - len(todo)} of {len(shards)} shards already complete")
    bar = progress_bar(sum(e - s for s, e in todo), desc="protect", unit="pair") if cfg.progress else None
    batching = Batching.of(cfg, tokenizer.pad_token_id, attention_length_scale(model))
    for s, e in todo:
        pooled: dict = {"chosen": {}, "rejected": {}}
        tokens: dict = {"chosen": {}, "rejected": {}}
        for chunk, batch in batching.batches(items[s:e]):
            with rt.precision.autocast(rt.device):
                v, z = reference_protected(model, batch, spec, list(protect.ids), rt.device)
            P = len(chunk)
            for k, it in enumerate(chunk):
                for side, row in (("chosen", k), ("rejected", P + k)):
                    pooled[side][it.id], tokens[side][it.id] = v[row], z[row]
            if bar is not None:
                bar.update(len(chunk))
        ids = [it.id for it in items[s:e]]
        tensors = {"ids": torch.tensor(ids, dtype=torch.long)}
        for side in ("chosen", "rejected"):
            tensors[f"{side}_protect"] = torch.stack([pooled[side][i] for i in ids])
            # per token: the rows' pre-activations end to end, and each row's token count
            tensors[f"{side}_protect_z"] = torch.cat([tokens[side][i] for i in ids])
            tensors[f"{side}_protect_n"] = torch.tensor([len(tokens[side][i]) for i in ids], dtype=torch.long)
        write_shard(out, s, e, tensors, name=protect_shard_name(fkey, s, e))
    if bar is not None:
        bar.close()
    total, n_resp = torch.zeros(len(protect.ids), dtype=torch.float64), 0
    z_sum, z_sq, n_tok = torch.zeros_like(total), torch.zeros_like(total), 0
    entry_shards = []
    for s, e in shards:
        name = protect_shard_name(fkey, s, e)
        path = os.path.join(out, name)
        t = load_file(path)
        total += t["chosen_protect"].double().sum(0) + t["rejected_protect"].double().sum(0)
        n_resp += 2 * (e - s)
        for side in ("chosen", "rejected"):
            zs = t[f"{side}_protect_z"].double()
            z_sum, z_sq, n_tok = z_sum + zs.sum(0), z_sq + (zs * zs).sum(0), n_tok + zs.shape[0]
        entry_shards.append(
            {"file": name, "start": s, "end": e, "bytes": os.path.getsize(path), "sha256": sha256_of(path)}
        )
    entry = {
        "features_key": fkey,
        "sae": protect.sae,
        "sae_key": sae_keys[j],
        "layer": spec.layer,
        "site": spec.site,
        "ids": list(protect.ids),
        "mean": (total / max(n_resp, 1)).tolist(),
        # the per-token form's scales: each pre-activation's spread over the reference's response tokens
        "token_scale": protect_token_scales(z_sum, z_sq, n_tok).tolist(),
        "shards": entry_shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta["protect"] = entry
    atomic_write_json(meta_path, meta)
    say(f"[fpo] cache {out}: the reference's values of {len(protect.ids)} protected features on {n_resp} responses")
    return entry


def _protect_files_sound(out, entry) -> bool:
    try:
        return all(sha256_of(os.path.join(out, x["file"])) == x["sha256"] for x in entry["shards"])
    except (OSError, KeyError, TypeError):
        return False


class ProtectTerm:
    """What a run protects: the set, its SAE (an SAESpec), lambda, the form (pooled activations or per-token
    pre-activations) and the per-feature scales, weights and directions R takes. `from_cache` builds it against a
    cache's entry, checked to agree."""

    def __init__(
        self,
        protect: ProtectSet,
        spec: SAESpec,
        scale: torch.Tensor,
        coef: float,
        device: Device,
        gate: str = "restore",
        form: str = "pooled",
        token_scale: torch.Tensor | None = None,
    ):
        if form not in FORMS:
            raise ValueError(f"protect form must be one of {FORMS}, got {form!r}")
        if form == "token" and token_scale is None:
            raise ValueError("the per-token form needs the pre-activations' scales (token_scale)")
        self.protect, self.spec, self.coef, self.gate, self.form = protect, spec, float(coef), gate, form
        self.ids = torch.tensor(protect.ids, dtype=torch.long)
        self.scale = scale.float().to(device)
        self.token_scale = None if token_scale is None else token_scale.float().to(device)
        self.weights = torch.tensor(protect.weights, dtype=torch.float32, device=device)
        self.direction = protect.direction_codes().to(device)

    @classmethod
    def from_cache(
        cls,
        protect: ProtectSet,
        spec: SAESpec,
        cache: ReferenceCache,
        coef: float,
        device: Device,
        gate: str = "restore",
        form: str = "pooled",
    ) -> ProtectTerm:
        entry = cache.protect_entry
        where = f"cache {cache.path}"
        fix = "run `fpo precompute` with the same arguments and --protect FILE to add them (the rest is kept)"
        if entry is None:
            raise ValueError(f"{where} holds no protected features' reference values: {fix}")
        if entry["features_key"] != protect.features_key:
            raise ValueError(
                f"{where} holds the reference's values of another protected set ({len(entry['ids'])} features of "
                f"SAE {entry['sae']}; this run protects {len(protect.ids)} of {protect.sae}): {fix}"
            )
        if form == "token" and "token_scale" not in entry:
            raise ValueError(
                f"{where} holds the protected features' pooled values but not their per-token pre-activations, "
                f"which --protect-form token compares against: {fix}"
            )
        threshold = spec.sae.threshold[torch.tensor(protect.ids, device=spec.sae.device)]
        token_scale = torch.tensor(entry["token_scale"]) if "token_scale" in entry else None
        scale = protect_scales(torch.tensor(entry["mean"]), threshold)
        return cls(protect, spec, scale, coef, device, gate, form, token_scale)

    @classmethod
    def load(
        cls,
        path: PathLike,
        saes: Sequence[SAESpec],
        cache: ReferenceCache,
        model: Model,
        coef: float,
        device: Device,
        gate: str = "restore",
        form: str = "pooled",
    ) -> ProtectTerm:
        """The protect file at `path`, its SAE among `saes` (given the cache's layer and site where it has none,
        refused where they differ), checked to fit `model`, against `cache`'s entry: what train and eval hold."""
        protect = read_protect_file(path, saes)
        spec = saes[protect.index_in(saes)]
        entry = cache.protect_entry
        if spec.layer is None and entry is not None:
            spec.layer, spec.site = entry["layer"], entry["site"]
        if entry is not None and (entry["layer"], entry["site"]) != (spec.layer, spec.site):
            raise ValueError(
                f"protect: the cache holds the protected values at layer {entry['layer']} ({entry['site']}), the "
                f"run reads SAE '{spec.name}' at layer {spec.layer} ({spec.site}): pass --sae-layer {entry['layer']}"
            )
        check_sae_fits(model, spec.sae, spec.layer)
        return cls.from_cache(protect, spec, cache, coef, device, gate, form)

    def penalty(self, pooled: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """R [2P] of the policy's pooled protected features against the reference's."""
        # scale and weights were checked when the set was read: no device sync in the step
        return protection_penalty(
            pooled, ref, self.scale, weights=self.weights, direction=self.direction, check_inputs=False
        )

    def token_penalty(self, z: torch.Tensor, ref_z: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """R [S] of the per-token form: each response's mean over its tokens of R on the protected pre-activations
        (z, ref_z [n, |P|], the responses' tokens end to end; lengths [S] their token counts, summing to n)."""
        if z.shape != ref_z.shape:
            raise ValueError(
                f"protect: the policy's per-token pre-activations {tuple(z.shape)} and the cache's "
                f"{tuple(ref_z.shape)} differ: the cache was built for other responses or lengths"
            )
        assert self.token_scale is not None  # form "token" has them (checked when made)
        per_token = protection_penalty(
            z, ref_z, self.token_scale, weights=self.weights, direction=self.direction, check_inputs=False
        )
        n = lengths.to(z.device)
        seq = torch.repeat_interleave(torch.arange(len(n), device=z.device), n, output_size=z.shape[0])
        total = torch.zeros(len(n), dtype=per_token.dtype, device=z.device).index_add_(0, seq, per_token)
        return total / n.clamp(min=1).to(total)


def protect_metrics(pooled: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> dict:
    """Per pair [P]: the protected features' drift, the mean over features of (p - p_ref)^2, and their relative
    change, the mean |p - p_ref| / scale, on the chosen and on the rejected response."""
    P = pooled.shape[0] // 2
    diff = pooled.detach().float() - ref.float()
    drift = (diff * diff).mean(1)
    rel = (diff.abs() / scale.to(diff)).mean(1)
    return {
        "protect_drift_chosen": drift[:P],
        "protect_drift_rejected": drift[P:],
        "protect_rel_chosen": rel[:P],
        "protect_rel_rejected": rel[P:],
    }
