"""Offline reference precompute: run the frozen reference model once over the dataset and cache, for each
chosen and rejected response, its summed and mean log-probs, its length and its top-K pooled SAE features.
Training then needs no reference model (FPO, DPO)."""
from __future__ import annotations

import errno
import os
import time

import torch

from fpo_kernels import SAEWeights, index_dtype_for, pack_topk, sae_pooled_features, sequence_logprobs
from fpo_kernels.cache import VALUE_DTYPES

from . import distributed as dist_utils
from .cache import FORMAT_VERSION, is_cache_file, recorded_checksum, shard_name, write_shard
from .files import atomic_write_json, sha256_of
from .locking import LOCK_NAME, DirectoryLock
from .data import dataset_fingerprint, load_pairs, tokenize_pairs, tokenizer_fingerprint
from .model import (ResidualCapture, decoder_layers, final_softcap, lm_head, load_model_for_layout, load_tokenizer,
                    model_fingerprint, resolve_device)
from .packing import LAYOUTS, POOLINGS, attention_length_scale, body_hidden, collate, plan_micro_batches, pooling_rows
from .precision import resolve_precision
from .progress import progress_bar
from .sae import load_saes

__all__ = ["precompute", "reference_stats", "default_device"]


def default_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def check_sae_fits(model, sae: SAEWeights, layer):
    hidden = model.config.hidden_size
    if sae.d_in != hidden:
        raise ValueError(f"the SAE reads d_in={sae.d_in} but the model's hidden size is {hidden}: "
                         "pick the SAE trained on this model")
    n = len(decoder_layers(model))
    if layer is None:
        raise ValueError("the SAE layer is unknown: pass sae_layer (--sae-layer), the decoder block whose output the SAE reads")
    if not 0 <= layer < n:
        raise ValueError(f"sae_layer {layer} is outside the model's {n} decoder layers [0, {n})")


def feature_key(index: int, spec) -> str:
    """The suffix of an SAE's tensors in a cache: none for the first SAE (the layout of single-SAE caches),
    '@name@layer' for the others."""
    return "" if index == 0 else f"@{spec.name}@{spec.layer}"


@torch.no_grad()
def reference_stats(model, batch, saes=(), K=256, device="cpu", value_dtype=torch.float16):
    """Reference statistics of one collated micro-batch (fpo.packing.collate, any layout; 2P sequences,
    chosen first): log-prob sums and means, lengths, and each SAE's top-K pooled features (saes: SAESpecs,
    one hook per layer, one forward)."""
    layers = sorted({s.layer for s in saes})
    caps = {layer: ResidualCapture(model, layer) for layer in layers}
    try:
        hidden = body_hidden(model, batch, device)
        w, b = lm_head(model)
        rows, labels, seq = (batch[k].to(device) for k in ("pred_rows", "labels", "seq_ids"))
        total, mean, count = sequence_logprobs(hidden, w, softcap=final_softcap(model), bias=b, rows=rows,
                                               labels=labels, seq_ids=seq, num_seqs=batch["num_seqs"])
        out = {"logp_sum": total, "logp_mean": mean, "len": count}
        resid = {layer: cap.pop() for layer, cap in caps.items()}
        for i, spec in enumerate(saes):
            r = resid[spec.layer]
            pooled = sae_pooled_features(r.reshape(-1, r.shape[-1]), sae=spec.sae, check_inputs=False,
                                         spans=batch["spans"].cpu())
            key = feature_key(i, spec)
            out["idx" + key], out["val" + key] = pack_topk(pooled, K, value_dtype)
    finally:
        for cap in caps.values():
            cap.remove()
    P = batch["ids"].shape[0]
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
            v = t[f"{side}_val{key}"].double().clamp(min=0)      # sorted descending; empty slots hold 0
            cum = (v * v).cumsum(1) / torch.arange(1, v.shape[1] + 1, dtype=torch.float64)
            total = cum.sum(0) if total is None else total + cum.sum(0)
            n += v.shape[0]
    return [float(x) for x in (total / max(n, 1))]


def _shard_is_sound(out, name, say):
    """A shard counts as done only if it matches the checksum recorded when it was written; one that does
    not (or has none) is removed, to be rebuilt."""
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return False
    meta = None
    try:   # meta.json: the checksums of caches written before the .sha256 files; a damaged one counts as none
        import json
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
        meta = meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        pass
    want = recorded_checksum(out, name, meta)
    if want is not None and sha256_of(path) == want:
        return True
    say(f"[fpo] {name} {'fails its recorded checksum' if want else 'has no recorded checksum'}: rebuilding it")
    os.remove(path)
    return False


def _complete_cache(out, settings) -> dict | None:
    """meta.json when `out` holds a finished cache of exactly these settings, every shard it lists present and
    matching its recorded checksum; else None. Reads only."""
    import json
    try:
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
        saes = [{k: v for k, v in x.items() if k != "feature_scale"} for x in meta["saes"]]   # added when finished
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


def precompute(model, dataset, out, sae=None, sae_layer=None, K: int = 256, max_length: int = 512,
               max_prompt_length: int = 256, batch_pairs: int = 4, max_pairs=None, shard_rows: int = 256,
               device=None, precision: str = "auto", bad_rows: str = "error", overwrite: bool = False, tokenizer=None,
               model_name=None, value_dtype: str = "float16", packing: str = "share-prompt", max_tokens=None,
               attn_implementation=None, log=print, progress: bool = True, split=None, pooling: str = "response") -> dict:
    """Build the reference cache in directory `out`; returns the summary it prints.

    model: a path / hub name / .gguf, or a loaded model (then pass tokenizer and model_name);
    dataset: a local .json/.jsonl/.parquet file or saved dataset; sae: an SAE spec (see fpo.sae.load_sae)
    or SAEWeights, a list of them (each SAE's top-K cached under its own name, one forward for all), or None
    (log-probs only, enough for DPO); sae_layer: the decoder block the SAE reads, or a list (default: from the
    SAE's hook name); precision: the forward's policy (fpo.precision; auto: bf16-mixed on cuda, fp32 on cpu),
    as training runs it, with bf16 weights under any bf16 policy (a frozen model needs no master copy);
    value_dtype: how feature values are stored (float16, bfloat16 or
    float32; see the fidelity table in the README); packing: the micro-batch layout (fpo.packing; the values
    do not depend on it beyond rounding); max_tokens: a token budget per forward instead of batch_pairs pairs,
    which also caps each sequence at max_tokens // 2 tokens exactly as training with the same max_tokens does.
    A run that stops part-way resumes where it stopped when started again with the same arguments. Under
    torchrun each rank computes its share of the shards."""
    rank, world, dist_dev = dist_utils.init()
    device = resolve_device(device) if device is not None else (dist_dev or default_device())
    prec = resolve_precision(precision, device)
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive integer, got {K!r}")
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {list(VALUE_DTYPES)}, got {value_dtype!r}")
    if shard_rows < 1 or batch_pairs < 1:
        raise ValueError("shard_rows and batch_pairs must be >= 1")
    if packing not in LAYOUTS:
        raise ValueError(f"packing must be one of {LAYOUTS}, got {packing!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "authors" and packing == "share-prompt":
        raise ValueError("pooling 'authors' needs packing 'off' or 'pack': with the prompt shared, the rows that "
                         "predict the rejected response are not contiguous")
    say = log if rank == 0 else (lambda *a, **k: None)

    if isinstance(model, (str, os.PathLike)):
        model_name = model_name or os.fspath(model)
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model_for_layout(model, prec.frozen_dtype, device, packing, attn_implementation, say)
    elif tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer (tokenizer=...)")
    model.eval()
    sae_list = [] if sae is None else (list(sae) if isinstance(sae, (list, tuple)) else [sae])
    layers = sae_layer if isinstance(sae_layer, (list, tuple)) else [sae_layer] * len(sae_list)
    if len(layers) != len(sae_list):
        raise ValueError(f"sae_layer gives {len(layers)} layers for {len(sae_list)} SAEs: one per SAE")
    saes = load_saes([(x if isinstance(x, SAEWeights) else os.fspath(x), layer, 1.0)
                      for x, layer in zip(sae_list, layers)], device)
    for spec in saes:
        check_sae_fits(model, spec.sae, spec.layer)
    first = saes[0] if saes else None

    items = tokenize_pairs(load_pairs(dataset, max_pairs, bad_rows, log=say, split=split), tokenizer, max_length, max_prompt_length,
                           max_tokens, log=say)
    settings = {
        "format_version": FORMAT_VERSION,
        "model": model_fingerprint(model, model_name or type(model).__name__),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dataset": dataset_fingerprint(items), "dataset_path": os.fspath(dataset), "rows": len(items),
        "max_length": max_length, "max_prompt_length": max_prompt_length, "shard_rows": shard_rows,
        # the first SAE at the top level (the single-SAE layout), every SAE in "saes"
        "sae": first.sae.fingerprint() if first else None, "sae_name": first.name if first else None,
        "sae_width": first.sae.width if first else None, "layer": first.layer if first else None,
        "K": K if first else None,
        "index_dtype": str(index_dtype_for(first.sae.width)).replace("torch.", "") if first else None,
        "value_dtype": value_dtype if first else None,
        "saes": [{"name": x.name, "layer": x.layer, "fingerprint": x.sae.fingerprint(), "width": x.sae.width,
                  "activation": x.sae.activation, "key": feature_key(i, x),
                  "index_dtype": str(index_dtype_for(x.sae.width)).replace("torch.", "")} for i, x in enumerate(saes)],
        "reference_dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "precision": prec.name,
    }
    if pooling != "response":   # recorded only when not the default, so caches built before it stay valid
        settings["pooling"] = pooling
    out = os.fspath(out)
    settings_path = os.path.join(out, "settings.json")
    done = _complete_cache(out, settings)
    if done is not None:   # nothing to write: a complete cache is read, never written (it may be read-only)
        total = sum(x["bytes"] for x in done["shards"])
        say(f"[fpo] cache {out} is complete for these settings ({len(items)} pairs, {total / 1e6:.2f} MB, every "
            "shard matching its checksum): nothing to do")
        return {"rows": len(items), "path": out, "bytes": total, "bytes_per_example": total / max(len(items), 1),
                "dense_fp32_bytes": len(items) * 2 * sum(x.sae.width for x in saes) * 4, "seconds": 0.0}
    lock = None
    if rank == 0:
        if os.path.lexists(out) and not os.path.isdir(out):
            raise ValueError(f"out {out} is {'a broken symlink' if os.path.islink(out) else 'a file'}, not a "
                             "directory: choose a directory path")
        os.makedirs(out, exist_ok=True)
        lock = DirectoryLock(out, "cache")   # one precompute per cache directory at a time
        theirs = [n for n in os.listdir(out) if not is_cache_file(n) and n != LOCK_NAME]
        if os.path.exists(settings_path):
            old = _read_settings(settings_path)
            if old != settings:
                if not overwrite:
                    diff = next(k for k in settings if old.get(k) != settings[k])
                    raise ValueError(f"{out} holds a cache built with other settings ({diff}: {old.get(diff)!r} "
                                     f"vs {settings[diff]!r}): use another directory or overwrite=True (--overwrite)")
                for n in os.listdir(out):   # only what precompute wrote; anything else stays
                    if is_cache_file(n):
                        os.remove(os.path.join(out, n))
                say(f"[fpo] overwrite: removed the cache in {out}" + (f" (kept {len(theirs)} other entries)" if theirs else ""))
        elif theirs:
            raise ValueError(f"{out} is not empty and holds no cache ({', '.join(sorted(theirs)[:3])}"
                             f"{', ...' if len(theirs) > 3 else ''}): choose an empty or new directory. --overwrite "
                             "only ever replaces a cache, never other files")
        if not os.path.exists(settings_path):
            atomic_write_json(settings_path, settings)
        for n in os.listdir(out):   # what a killed run left half-written
            if ".tmp" in n and is_cache_file(n):
                os.remove(os.path.join(out, n))
    dist_utils.barrier()
    try:

        n = len(items)
        shards = [(s, min(s + shard_rows, n)) for s in range(0, n, shard_rows)]
        mine = [sh for j, sh in enumerate(shards) if j % world == rank]
        todo = [sh for sh in mine if not _shard_is_sound(out, shard_name(*sh), say)]
        if len(todo) < len(mine):
            say(f"[fpo] resuming: {len(mine) - len(todo)} of {len(mine)} shards already complete")
        bar = None
        if progress and rank == 0:
            bar = progress_bar(sum(e - s for s, e in todo) * world, desc="precompute", unit="pair")
        t0 = time.time()
        pad = tokenizer.pad_token_id
        scale = attention_length_scale(model)
        for s, e in todo:
            parts, order = [], []
            chunks = ([items[b:min(b + batch_pairs, e)] for b in range(s, e, batch_pairs)] if max_tokens is None
                      else plan_micro_batches(items[s:e], packing, max_tokens, scale))
            for chunk in chunks:
                batch = collate(chunk, packing, pad, scale)
                batch["spans"], _ = pooling_rows(batch, chunk, pooling)   # the factor applies to D, in training
                with prec.autocast(device):
                    parts.append(reference_stats(model, batch, saes, K, device, VALUE_DTYPES[value_dtype]))
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
            except Exception as err:   # a full disk, a read-only folder (safetensors raises its own error type)
                full = getattr(err, "errno", None) == errno.ENOSPC or "No space" in str(err)
                why = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0][:200]
                raise RuntimeError(f"{'the disk is full' if full else 'writing failed'} while writing "
                                   f"{shard_name(s, e)} into {out} ({why}): the shards already written are "
                                   f"complete and kept; {'free space and ' if full else ''}run the same command "
                                   "again to resume") from None
        if bar is not None:
            bar.close()
        dist_utils.barrier()

        summary = {"rows": n, "path": out}
        if rank == 0:
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
            if saes:
                meta["feature_scale"] = meta["saes"][0]["feature_scale"]
            meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            atomic_write_json(os.path.join(out, "meta.json"), meta)
            dense = n * 2 * sum(x.sae.width for x in saes) * 4
            summary.update(bytes=total, bytes_per_example=total / max(n, 1), dense_fp32_bytes=dense,
                           seconds=time.time() - t0)
            msg = f"[fpo] cache {out}: {n} pairs, {total / 1e6:.2f} MB, {total / max(n, 1):.0f} bytes per pair"
            if saes:
                msg += (f"; a dense fp32 pooled cache would need {dense / 1e6:.1f} MB "
                        f"({dense / max(total, 1):.0f}x more)")
            say(msg)
        dist_utils.barrier()
        return summary
    finally:
        if lock is not None:
            lock.release()
