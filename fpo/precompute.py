"""Offline reference precompute: run the frozen reference model once over the dataset and cache, for each
chosen and rejected response, its summed and mean log-probs, its length and its top-K pooled SAE features.
Training then needs no reference model (FPO, DPO)."""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from fpo_kernels import index_dtype_for, pack_topk, sae_pooled_features, sequence_logprobs
from fpo_kernels.cache import VALUE_DTYPES

from . import distributed as dist_utils
from ._types import Device, Log, Model, PathLike, Tokenizer
from .config import PrecomputeConfig, renamed_keys
from .feature_files import read_protect_file
from .files import atomic_write_json, sha256_of
from .locking import LOCK_NAME, DirectoryLock
from .model import ActivationCapture, attention_length_scale, body_hidden, final_softcap, lm_head, model_fingerprint
from .packing import Batching
from .pairs import dataset_fingerprint, tokenizer_fingerprint
from .progress import progress_bar
from .protection import add_protected_values
from .reference_cache import FORMAT_VERSION, is_cache_file, shard_is_sound, shard_name, write_shard
from .runtime import load_config_saes, load_items, load_model, start
from .sae import check_sae_fits

if TYPE_CHECKING:
    from .packing import MicroBatch
    from .sae import SAESpec

__all__ = ["precompute", "reference_stats", "DEFAULT_CACHE_K"]

DEFAULT_CACHE_K = 256  # the reference's top pooled features cached per response, unless an SAE is narrower


def feature_key(index: int, spec) -> str:
    """The suffix of an SAE's tensors in a cache, recorded as its "key" in meta.json: none for the first SAE,
    '@name@layer' for the others ('@name@layer@site' for an SAE not on the residual stream after its block)."""
    return "" if index == 0 else f"@{spec.name}@{spec.layer}" + ("" if spec.site == "resid_post" else f"@{spec.site}")


@torch.no_grad()
def reference_stats(
    model: Model,
    batch: MicroBatch,
    saes: Sequence[SAESpec] = (),
    cache_k: int = 256,
    device: Device = "cpu",
    value_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """Reference statistics of one fpo.packing.MicroBatch (any layout; 2P sequences,
    chosen first): log-prob sums and means, lengths, and each SAE's top-K pooled features (saes: SAESpecs,
    one hook per layer and site, one forward)."""
    if any(s.layer is None for s in saes):
        raise ValueError("reference_stats: every SAE's layer must be known (SAESpec.layer)")
    caps = {(s.layer, s.site): ActivationCapture(model, s.layer, s.site) for s in saes}  # type: ignore[arg-type]
    try:
        hidden = body_hidden(model, batch, device)
        w, b = lm_head(model)
        rows, labels, seq = (t.to(device) for t in (batch.pred_rows, batch.labels, batch.seq_ids))
        total, mean, count = sequence_logprobs(
            hidden,
            w,
            softcap=final_softcap(model),
            bias=b,
            rows=rows,
            labels=labels,
            seq_ids=seq,
            num_seqs=batch.num_seqs,
        )
        out = {"logp_sum": total, "logp_mean": mean, "len": count}
        resid = {layer: cap.pop() for layer, cap in caps.items()}
        for i, spec in enumerate(saes):
            r = resid[(spec.layer, spec.site)]
            pooled = sae_pooled_features(
                r.reshape(-1, r.shape[-1]), spec.sae, check_inputs=False, spans=batch.pool_spans.cpu()
            )
            key = feature_key(i, spec)
            out["idx" + key], out["val" + key] = pack_topk(pooled, cache_k, value_dtype)
    finally:
        for cap in caps.values():
            cap.remove()
    P = batch.num_pairs
    res = {}
    for side, sl in (("chosen", slice(0, P)), ("rejected", slice(P, 2 * P))):
        for k, v in out.items():
            res[f"{side}_{k}"] = v[sl].cpu()
    return res


def _feature_scale(out, shards, key=""):
    """The reference's pooled-feature scale on this data, for each k = 1..K: the mean over responses of the mean
    squared top-k cached value. D is a mean squared difference of such values, so D / scale[k - 1] is
    comparable across SAEs and models (constraint_norm "ref")."""
    from safetensors.torch import load_file

    total, n = None, 0
    for s, e in shards:
        t = load_file(os.path.join(out, shard_name(s, e)))
        for side in ("chosen", "rejected"):
            v = t[f"{side}_val{key}"].double().clamp(min=0)  # sorted descending; empty slots hold 0
            cum = (v * v).cumsum(1) / torch.arange(1, v.shape[1] + 1, dtype=torch.float64)
            total = cum.sum(0) if total is None else total + cum.sum(0)
            n += v.shape[0]
    return [float(x) for x in (total / max(n, 1))]


def _complete_cache(out, settings) -> dict | None:
    """meta.json when `out` holds a finished cache of exactly these settings, every shard it lists present and
    matching its recorded checksum; else None. Reads only."""
    import json

    try:
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
        saes = [{k: v for k, v in x.items() if k != "feature_scale"} for x in meta["saes"]]  # added when finished
        if any((saes if k == "saes" else meta.get(k)) != v for k, v in settings.items()):
            return None
        return meta if all(sha256_of(os.path.join(out, x["file"])) == x["sha256"] for x in meta["shards"]) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_settings(path) -> dict:
    import json

    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} could not be read ({e}): the cache is damaged; rebuild it with --overwrite") from None
    if not isinstance(old, dict):
        raise ValueError(f"{path} is not a settings object: the cache is damaged; rebuild it with --overwrite")
    return old


def precompute(
    model: PathLike | Model,
    dataset: PathLike,
    out: PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    model_name: str | None = None,
    log: Log = print,
    **options: Any,
) -> dict:
    """Build the reference cache in directory `out`; returns the summary it prints.

    model: a path / hub name / .gguf, or a loaded model (then pass tokenizer and model_name); dataset: a local
    .json/.jsonl/.parquet file or saved dataset; options: fpo.config.PrecomputeConfig's keys (the flags of
    `fpo precompute`, with their defaults and help there): sae, an SAE spec (see fpo.sae.load_sae) or SAEWeights,
    a list of them (each SAE's top-K cached under its own name, one forward for all), or None (log-probs only,
    enough for DPO); sae_layer: the decoder block each SAE reads (default: from the SAE's hook name); precision:
    the forward's policy, as training runs it, with bf16 weights under any bf16 policy (a frozen model needs no
    master copy); value_dtype: how feature values are stored; packing: the micro-batch layout (the values do
    not depend on it beyond rounding); max_tokens: a token budget per forward instead of micro_batch_size pairs,
    which also caps each sequence at max_tokens // 2 tokens exactly as training with the same max_tokens does.
    A run that stops part-way resumes where it stopped when started again with the same arguments. Under
    torchrun each rank computes its share of the shards."""
    model = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model
    cfg = PrecomputeConfig(model=model, dataset=os.fspath(dataset), out=os.fspath(out), **renamed_keys(options))
    if cfg.cache_k is not None and (not isinstance(cfg.cache_k, int) or isinstance(cfg.cache_k, bool)):
        raise ValueError(f"cache_k must be a positive integer, got {cfg.cache_k!r}")
    rt = start(cfg, log)
    rank, world, device, prec, say = rt.rank, rt.world, rt.device, rt.precision, rt.log
    if isinstance(cfg.model, (str, os.PathLike)):
        model_name = model_name or os.fspath(cfg.model)
    model, tokenizer = load_model(cfg.model, cfg, rt, prec.frozen_dtype, tokenizer)
    model.eval()
    saes = load_config_saes(cfg, rt)
    if cfg.cache_k is None:  # the default: 256 slots, never more than an SAE has features
        cfg = dataclasses.replace(cfg, cache_k=min([DEFAULT_CACHE_K] + [s.sae.width for s in saes]))
    assert cfg.cache_k is not None  # set just above
    for spec in saes:
        check_sae_fits(model, spec.sae, spec.layer)
        if cfg.cache_k > spec.sae.width:  # each slot past the width would be stored, and always empty
            raise ValueError(
                f"cache_k {cfg.cache_k} exceeds the width {spec.sae.width} of SAE '{spec.name}': a response has at "
                f"most {spec.sae.width} features to cache; pass --cache-k {spec.sae.width} or less"
            )
    items = load_items(cfg, tokenizer, rt)
    settings = _settings(cfg, model, model_name, tokenizer, items, saes, prec)
    if cfg.protect:  # the file and its SAE checked before any forward
        read_protect_file(cfg.protect, saes)
    n = len(items)
    shards = [(s, min(s + cfg.shard_rows, n)) for s in range(0, n, cfg.shard_rows)]
    done = _complete_cache(cfg.out, settings)
    if done is not None and not cfg.protect:  # nothing to write: a complete cache is read, never written
        total = sum(x["bytes"] for x in done["shards"])
        say(
            f"[fpo] cache {cfg.out} is complete for these settings ({len(items)} pairs, {total / 1e6:.2f} MB, every "
            "shard matching its checksum): nothing to do"
        )
        return {
            "rows": len(items),
            "path": cfg.out,
            "bytes": total,
            "bytes_per_example": total / max(len(items), 1),
            "dense_fp32_bytes": len(items) * 2 * sum(x.sae.width for x in saes) * 4,
            "seconds": 0.0,
        }
    lock = _claim(cfg, settings, say) if rank == 0 else None
    dist_utils.barrier()
    try:
        t0 = time.time()
        summary = {"rows": n, "path": cfg.out}
        if done is None:
            _compute_shards(cfg, model, tokenizer, items, saes, prec, device, shards, rank, world, say)
            dist_utils.barrier()
            if rank == 0:
                summary.update(_write_meta(cfg.out, settings, shards, saes, say))
        else:
            say(f"[fpo] cache {cfg.out} is complete for these settings: adding the protected features' values only")
        if cfg.protect and rank == 0:
            keys = [feature_key(i, x) for i, x in enumerate(saes)]
            summary["protect"] = add_protected_values(cfg, model, tokenizer, items, saes, rt, shards, keys, say)
        summary["seconds"] = time.time() - t0
        dist_utils.barrier()
        return summary
    finally:
        if lock is not None:
            lock.release()


def _settings(cfg, model, model_name, tokenizer, items, saes, prec) -> dict:
    """What the cache is for: the model, tokenizer, data, lengths and SAEs it was built with (settings.json; a
    resumed or reused cache must match it)."""
    settings = {
        "format_version": FORMAT_VERSION,
        "model": model_fingerprint(model, model_name or type(model).__name__),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dataset": dataset_fingerprint(items),
        "dataset_path": os.fspath(cfg.dataset),
        "rows": len(items),
        "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length,
        "shard_rows": cfg.shard_rows,
        "cache_k": cfg.cache_k if saes else None,
        "value_dtype": cfg.value_dtype if saes else None,
        "pooling": cfg.pooling,
        "saes": [
            {
                "name": x.name,
                "layer": x.layer,
                "site": x.site,
                "fingerprint": x.sae.fingerprint(),
                "width": x.sae.width,
                "activation": x.sae.activation,
                "key": feature_key(i, x),
                "index_dtype": str(index_dtype_for(x.sae.width)).replace("torch.", ""),
            }
            for i, x in enumerate(saes)
        ],
        "reference_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "precision": prec.name,
    }
    return settings


def _claim(cfg, settings, say):
    """Rank 0: the cache directory made, locked and checked to hold this cache or none (a cache of other
    settings is removed only with overwrite, files that are not the cache's never), settings.json written,
    what a killed run left half-written removed. Returns the lock."""
    out = cfg.out
    settings_path = os.path.join(out, "settings.json")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(
            f"out {out} is {'a broken symlink' if os.path.islink(out) else 'a file'}, not a "
            "directory: choose a directory path"
        )
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # a parent that is a file, a read-only mount, no permission
        raise ValueError(f"out {out} cannot be created ({e.strerror}): choose a folder path you can write") from None
    lock = DirectoryLock(out, "cache")  # one precompute per cache directory at a time
    try:
        theirs = [n for n in os.listdir(out) if not is_cache_file(n) and n != LOCK_NAME]
        if os.path.exists(settings_path):
            old = _read_settings(settings_path)
            if old != settings:
                if not cfg.overwrite:
                    diff = next(k for k in settings if old.get(k) != settings[k])
                    raise ValueError(
                        f"{out} holds a cache built with other settings ({diff}: {old.get(diff)!r} "
                        f"vs {settings[diff]!r}): use another directory or overwrite=True (--overwrite)"
                    )
                for n in os.listdir(out):  # only what precompute wrote; anything else stays
                    if is_cache_file(n):
                        os.remove(os.path.join(out, n))
                say(
                    f"[fpo] overwrite: removed the cache in {out}"
                    + (f" (kept {len(theirs)} other entries)" if theirs else "")
                )
        elif theirs:
            raise ValueError(
                f"{out} is not empty and holds no cache ({', '.join(sorted(theirs)[:3])}"
                f"{', ...' if len(theirs) > 3 else ''}): choose an empty or new directory. --overwrite "
                "only ever replaces a cache, never other files"
            )
        if not os.path.exists(settings_path):
            atomic_write_json(settings_path, settings)
        for n in os.listdir(out):  # what a killed run left half-written
            if ".tmp" in n and is_cache_file(n):
                os.remove(os.path.join(out, n))
    except BaseException:
        lock.release()
        raise
    return lock


def _compute_shards(cfg, model, tokenizer, items, saes, prec, device, shards, rank, world, say):
    """This rank's shards that are not already sound on disk: the reference forward over their pairs, in
    micro-batches, each shard written whole in dataset order."""
    out = cfg.out
    mine = [sh for j, sh in enumerate(shards) if j % world == rank]
    todo = [sh for sh in mine if not shard_is_sound(out, shard_name(*sh), say)]
    if len(todo) < len(mine):
        say(f"[fpo] resuming: {len(mine) - len(todo)} of {len(mine)} shards already complete")
    bar = None
    if cfg.progress and rank == 0:
        bar = progress_bar(sum(e - s for s, e in todo) * world, desc="precompute", unit="pair")
    batching = Batching.of(cfg, tokenizer.pad_token_id, attention_length_scale(model))
    for s, e in todo:
        parts, order = [], []
        for chunk, batch in batching.batches(items[s:e]):  # the batch's d_factor applies to D, in training
            with prec.autocast(device):
                parts.append(reference_stats(model, batch, saes, cfg.cache_k, device, VALUE_DTYPES[cfg.value_dtype]))
            order += [it.id for it in chunk]
            if bar is not None:
                bar.update(len(chunk) * world)
        # rows in dataset order whatever the micro-batches were
        where = {i: r for r, i in enumerate(order)}
        perm = torch.tensor([where[it.id] for it in items[s:e]], dtype=torch.long)
        tensors = {k: torch.cat([p[k] for p in parts])[perm] for k in parts[0]}
        tensors["ids"] = torch.tensor([it.id for it in items[s:e]], dtype=torch.long)
        tensors["row_hash"] = torch.tensor([it.row_hash for it in items[s:e]], dtype=torch.long)
        try:
            write_shard(out, s, e, tensors)
        except Exception as err:  # a full disk, a read-only folder (safetensors raises its own error type)
            full = getattr(err, "errno", None) == errno.ENOSPC or "No space" in str(err)
            why = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise RuntimeError(
                f"{'the disk is full' if full else 'writing failed'} while writing "
                f"{shard_name(s, e)} into {out} ({why}): the shards already written are "
                f"complete and kept; {'free space and ' if full else ''}run the same command "
                "again to resume"
            ) from None
    if bar is not None:
        bar.close()


def _write_meta(out, settings, shards, saes, say) -> dict:
    """Rank 0, once every shard exists: meta.json (the settings, each shard's size and checksum, each SAE's
    feature scale), written last; returns the summary's sizes."""
    n = shards[-1][1] if shards else 0
    meta = dict(settings)
    meta["shards"] = []
    total = 0
    for s, e in shards:
        p = os.path.join(out, shard_name(s, e))
        if not os.path.exists(p):
            raise RuntimeError(f"shard {p} is missing after every rank finished")
        size = os.path.getsize(p)
        total += size
        meta["shards"].append({"file": shard_name(s, e), "start": s, "end": e, "bytes": size, "sha256": sha256_of(p)})
    for entry in meta["saes"]:
        entry["feature_scale"] = _feature_scale(out, shards, entry["key"])
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        atomic_write_json(os.path.join(out, "meta.json"), meta)
    except OSError as e:  # a full disk: every shard is written and kept, only meta.json is missing
        raise RuntimeError(
            f"writing {out}/meta.json failed ({e.strerror}): the shards are complete and kept; free space and run "
            "the same command again to finish the cache"
        ) from None
    dense = n * 2 * sum(x.sae.width for x in saes) * 4
    msg = f"[fpo] cache {out}: {n} pairs, {total / 1e6:.2f} MB, {total / max(n, 1):.0f} bytes per pair"
    if saes:
        msg += f"; a dense fp32 pooled cache would need {dense / 1e6:.1f} MB ({dense / max(total, 1):.0f}x more)"
    say(msg)
    return {"bytes": total, "bytes_per_example": total / max(n, 1), "dense_fp32_bytes": dense}
