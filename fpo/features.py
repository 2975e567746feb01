"""`fpo features`: what alignment changed inside the model, feature by feature.

For every feature of every SAE: its response-pooled activation (the mean over a response's own tokens, as D
pools it) under the reference and under each trained policy, for chosen and for rejected responses, and its
drift, the mean over responses of (p_i - p_ref_i)^2: the per-feature term of FPO's D before the top-k
selection. The features that drifted most are listed with the held-out contexts where the reference activates
them most (the token in «», a few tokens each side), so a person can tell what a feature is about.

Memory: one micro-batch's activations at a time. The reference's pooled features are kept per response as a
sparse matrix (JumpReLU and TopK features are mostly zero), never [tokens x width]; the contexts come from a
second reference pass over the top features only.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import textwrap
import time
from typing import Any

import torch

from fpo_kernels import reference as ops_reference
from fpo_kernels import sae_pooled_features

from ._types import Log, PathLike, Tokenizer
from .config import FeaturesConfig, renamed_keys
from .feature_files import ProtectSet, read_protect_file, write_feature_weights, write_protect_file
from .feature_page import render_page
from .files import atomic_write_json, atomic_write_text
from .model import ActivationCapture, attention_length_scale, body_hidden, config_fingerprint
from .packing import Batching
from .progress import progress_bar
from .run_dir import RUN_CONFIG
from .runtime import load_config_saes, load_items, load_model, start
from .sae import check_sae_fits
from .tables import format_table

__all__ = ["feature_report"]

REPORT_WIDTH = 100  # the terminal table fits this many columns


def run_name(path: str) -> str:
    """A run's short name: its output folder's (runs/simpo/final -> simpo)."""
    p = os.path.normpath(os.fspath(path))
    base = os.path.basename(p)
    return os.path.basename(os.path.dirname(p)) or base if base in ("final", "final-merged") else base


def _activations(model, batch, saes, rt):
    """{(layer, site): [N, d] flat activations} of one micro-batch, one forward for every SAE."""
    caps = {(s.layer, s.site): ActivationCapture(model, s.layer, s.site) for s in saes}
    try:
        with torch.no_grad(), rt.precision.autocast(rt.device):
            body_hidden(model, batch, rt.device)
        out = {}
        for point, cap in caps.items():
            value = cap.pop()
            out[point] = value.reshape(-1, value.shape[-1])
        return out
    finally:
        for cap in caps.values():
            cap.remove()


def _pass(model, items, saes, batching: Batching, rt, progress, desc, each):
    """One forward over every held-out pair: each(pair positions [P], pooled [2P, width] per SAE, the activations
    {(layer, site): [N, d]}, the micro-batch) per micro-batch."""
    bar = progress_bar(len(items), desc=desc, unit="pair") if progress else None
    position = {it.id: i for i, it in enumerate(items)}
    for chunk, batch in batching.batches(items):
        acts = _activations(model, batch, saes, rt)
        pooled = [sae_pooled_features(acts[(s.layer, s.site)], s.sae, spans=batch.pool_spans) for s in saes]
        each([position[it.id] for it in chunk], pooled, acts, batch)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()


def feature_report(
    models: PathLike | list[PathLike],
    reference: PathLike,
    dataset: PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    log: Log = print,
    **options: Any,
) -> dict:
    """The per-feature report of one or several trained runs against the model they started from; options:
    fpo.config.FeaturesConfig's keys (the flags of `fpo features`). Returns what --json writes."""
    models = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    cfg = FeaturesConfig(
        model=[os.fspath(m) for m in models],
        reference=os.fspath(reference),
        dataset=os.fspath(dataset),
        **renamed_keys(options),
    )
    names = [run_name(m) for m in cfg.models]
    if len(set(names)) != len(names):
        names = [os.fspath(m) for m in cfg.models]
    if cfg.rank_by is not None and cfg.rank_by not in names and cfg.rank_by not in cfg.models:
        raise ValueError(f"rank_by {cfg.rank_by!r} is none of the runs: {names}")
    # the run whose drift ranks the features, by name or path; None: the largest drift over the runs
    ranking = None if cfg.rank_by is None else (names + list(cfg.models)).index(cfg.rank_by) % len(names)
    t0 = time.time()
    rt = start(cfg, log, distributed=False)
    ref_model, tokenizer = load_model(cfg.reference, cfg, rt, rt.precision.frozen_dtype, tokenizer)
    ref_model.eval()
    saes = load_config_saes(cfg, rt)
    if not saes:
        raise ValueError("sae is required: the SAE(s) whose features to compare (--sae)")
    for spec in saes:
        check_sae_fits(ref_model, spec.sae, spec.layer)
    protect = read_protect_file(cfg.protect_file, saes) if cfg.protect_file else None
    _check_outputs(cfg)
    if (cfg.weights_out or cfg.protect_out) and cfg.protect > cfg.top:
        raise ValueError(
            f"protect {cfg.protect} is more than top {cfg.top}: the file can hold only listed features; pass "
            f"--top {cfg.protect} or more"
        )
    items = load_items(cfg, tokenizer, rt)
    n = len(items)
    batching = Batching.of(cfg, tokenizer.pad_token_id, attention_length_scale(ref_model))

    ref_rows, contexts = _reference_pass(ref_model, items, saes, batching, rt, cfg)
    policy_rows = _run_passes(cfg, names, ref_model, tokenizer, items, saes, batching, rt, log)

    rank_pairs, judge_pairs = _split_pairs(n, cfg.rank_split)
    report: dict[str, Any] = {
        "reference": cfg.reference,
        "runs": names,
        "models": list(cfg.models),
        "dataset": os.fspath(dataset),
        "pairs": n,
        "responses": 2 * n,
        "ranked_on_pairs": len(rank_pairs),
        "judged_on_pairs": len(judge_pairs),
        "groups": _groups(names),
        "saes": [],
        "features": [],
    }
    tops = []
    for j, spec in enumerate(saes):
        ref = _dense(ref_rows[j])  # [2n, width] float64
        pol = [_dense(r[j]) for r in policy_rows]
        # ranked on one half of the pairs, every number below judged on the other (no winner's curse)
        rows_rank = _rows(rank_pairs, n)
        drift_rank = torch.stack([((p[rows_rank] - ref[rows_rank]) ** 2).mean(0) for p in pol])  # [runs, width]
        rank = drift_rank[ranking] if ranking is not None else drift_rank.max(0).values
        broken = rank.isnan().nonzero().flatten().tolist()
        if broken:  # listed first, said aloud: a NaN would otherwise rank anywhere
            log(f"[fpo] warning: SAE {spec.name}: {len(broken)} features have a NaN drift (e.g. {broken[:5]}): a run's "
                "activations were not finite there; they are listed first")  # fmt: skip
        top = torch.nan_to_num(rank, nan=float("inf")).topk(min(cfg.top, spec.sae.width)).indices.tolist()
        judged = _judged(ref, pol, judge_pairs, n, top, cfg.bootstrap, cfg.seed)
        drift = judged["side_drift"].mean(1)  # [runs, width]: over every judged response
        fires = ((judged["ref_freq"].sum(0) > 0) | (judged["pol_freq"].sum(1) > 0).any(0)).sum().item()
        label = f"{spec.name}@{spec.layer}" + ("" if spec.site == "resid_post" else f"@{spec.site}")
        entry = {
            "name": spec.name,
            "label": label,
            "layer": spec.layer,
            "site": spec.site,
            "width": spec.sae.width,
            "fingerprint": spec.sae.fingerprint(),
            "neuronpedia": _neuronpedia(spec),
            "fires": int(fires),
            "drift_total": drift.sum(1).tolist(),  # per run: the sum of every feature's drift
            **_protected_drift(protect, spec, judged["side_drift"]),
            "ref_mean": judged["ref_mean"].mean(0).tolist(),  # every feature, for the picture
            "policy_mean": judged["pol_mean"].mean(1).tolist(),
        }
        entry["summary"] = _summary_line(entry, names, report)
        report["saes"].append(entry)
        for c, i in enumerate(top):
            entry = _feature_entry(label, i, c, judged, drift)
            entry["contexts"] = [] if contexts is None else contexts[j].of(i, items, tokenizer, cfg)
            report["features"].append(entry)
        tops.append(top)
        del ref, pol
    if cfg.html and contexts is not None:
        _add_token_activations(report, items, saes, tops, ref_model, cfg, rt, tokenizer, batching)
    report["seconds"] = time.time() - t0
    report["settings"] = dict(vars(cfg))
    report["versions"] = _versions()
    _print_table(report, log)
    _write_outputs(report, tops, cfg, log)
    return report


def _write_outputs(report, tops, cfg: FeaturesConfig, log):
    """What the flags ask for: --json, --png, --html, and --weights-out / --protect-out from the first SAE's
    top features."""
    if cfg.json:
        atomic_write_json(cfg.json, _clean_numbers(report))
        log(f"[fpo] features: {cfg.json}")
    if cfg.png:
        plot_features(report, cfg.png)
        log(f"[fpo] features: {cfg.png}")
    if cfg.html:
        atomic_write_text(cfg.html, render_page(_clean_numbers(report)))
        log(f"[fpo] features: {cfg.html}")
    if cfg.weights_out:
        first = report["saes"][0]
        protected = tops[0][: cfg.protect]
        write_feature_weights(
            cfg.weights_out,
            first["fingerprint"],
            {i: cfg.protect_weight for i in protected},
            f"the {len(protected)} features of {first['label']} that drifted most"
            + (f" under {cfg.rank_by}" if cfg.rank_by else "")
            + f" on {report['pairs']} pairs of {report['dataset']}",
        )
        log(f"[fpo] features: {cfg.weights_out} weighs features {protected} (weight {cfg.protect_weight:g}) in D")
    if cfg.protect_out:
        first = report["saes"][0]
        protected = tops[0][: cfg.protect]
        note = (
            f"the {len(protected)} features of {first['label']} that drifted most"
            + (f" under {cfg.rank_by}" if cfg.rank_by else "")
            + f" on {report['pairs']} pairs of {report['dataset']}: judge protection on other pairs"
        )
        write_protect_file(
            cfg.protect_out,
            ProtectSet(
                first["fingerprint"], tuple(protected), (1.0,) * len(protected), ("both",) * len(protected), note
            ),
        )
        log(f"[fpo] features: {cfg.protect_out} protects features {protected} (`fpo train --protect`)")


def _reference_pass(ref_model, items, saes, batching: Batching, rt, cfg: FeaturesConfig):
    """(per SAE, each response's pooled reference features kept sparse at row side * n + pair; per SAE, each
    feature's strongest held-out contexts or None), found in the one pass over the reference."""
    n = len(items)
    ref_rows = [[None] * (2 * n) for _ in saes]
    contexts = [_ContextHeap(s.sae.width, cfg.contexts) for s in saes] if cfg.contexts else None

    def keep_reference(pos, pooled, acts, batch):
        _keep_rows(ref_rows, pos, pooled, n)
        if contexts is not None:
            for j, spec in enumerate(saes):
                contexts[j].add(acts[(spec.layer, spec.site)], spec.sae, batch.pool_spans, pos)

    _pass(ref_model, items, saes, batching, rt, cfg.progress, "features: reference", keep_reference)
    return ref_rows, contexts


def _run_passes(cfg: FeaturesConfig, names, ref_model, tokenizer, items, saes, batching: Batching, rt, log):
    """Per run, per SAE: the sparse pooled rows of each response, one run loaded at a time."""
    n = len(items)
    policy_rows = []
    for path, name in zip(cfg.models, names):
        policy, _ = load_model(path, cfg, rt, rt.precision.frozen_dtype, tokenizer)
        policy.eval()
        _check_started_from(path, policy, ref_model, cfg.reference, log)
        rows = [[None] * (2 * n) for _ in saes]
        _pass(policy, items, saes, batching, rt, cfg.progress, f"features: {name}",
              lambda pos, p, a, b, rows=rows: _keep_rows(rows, pos, p, n))  # fmt: skip
        del policy
        policy_rows.append(rows)
    return policy_rows


def _feature_entry(label, i, c, judged, drift) -> dict:
    """One listed feature's numbers, judged on the judging half: the reference's and each run's mean and firing
    frequency per side, the drift, the signed and relative change with its bootstrap interval (c: its column
    in judged["ci"])."""
    return {
        "sae": label,
        "id": i,
        "ref_chosen": judged["ref_mean"][0, i].item(),
        "ref_rejected": judged["ref_mean"][1, i].item(),
        "ref_freq": judged["ref_freq"][:, i].tolist(),  # chosen, rejected: the share of responses where it fires
        "policy_chosen": judged["pol_mean"][:, 0, i].tolist(),
        "policy_rejected": judged["pol_mean"][:, 1, i].tolist(),
        "policy_freq": judged["pol_freq"][:, :, i].tolist(),  # per run: chosen, rejected
        "drift": drift[:, i].tolist(),
        "drift_chosen": judged["side_drift"][:, 0, i].tolist(),
        "drift_rejected": judged["side_drift"][:, 1, i].tolist(),
        "change_chosen": judged["change"][:, 0, i].tolist(),  # mean p - p_ref, signed
        "change_rejected": judged["change"][:, 1, i].tolist(),
        "change_ci_chosen": judged["ci"][:, 0, :, c].tolist(),  # per run: [2.5%, 97.5%] bootstrap
        "change_ci_rejected": judged["ci"][:, 1, :, c].tolist(),
        "rel_change_chosen": _relative(judged["change"][:, 0, i], judged["ref_mean"][0, i]),
        "rel_change_rejected": _relative(judged["change"][:, 1, i], judged["ref_mean"][1, i]),
    }


def _keep_rows(rows, pos, pooled, n):
    """Each SAE's pooled rows of one micro-batch, kept sparse at row side * n + pair position."""
    P = len(pos)
    for j, p in enumerate(pooled):
        p = p.double().cpu()
        for i, where in enumerate(pos):
            rows[j][where] = p[i].to_sparse()
            rows[j][n + where] = p[P + i].to_sparse()


def _dense(rows) -> torch.Tensor:
    return torch.stack([r.to_dense() for r in rows])


def _rows(pairs, n) -> torch.Tensor:
    """The response rows (chosen, then rejected) of these pair positions."""
    pairs = torch.tensor(pairs, dtype=torch.long)
    return torch.cat([pairs, pairs + n])


def _split_pairs(n, split: bool):
    """(the pairs that rank the features, the pairs that judge them): even and odd positions when split, else all
    for both (too few pairs to split, or asked)."""
    if not split or n < 4:
        return list(range(n)), list(range(n))
    return list(range(0, n, 2)), list(range(1, n, 2))


def _judged(ref, pol, pairs, n, top, bootstrap, seed) -> dict:
    """Per run and side on the judged pairs: mean activations, firing frequencies, drift and signed change of every
    feature; a bootstrap interval over the judged responses of the listed features' mean change."""
    sides = [torch.tensor(pairs), torch.tensor(pairs) + n]
    ref_mean = torch.stack([ref[r].mean(0) for r in sides])  # [2, width]
    ref_freq = torch.stack([(ref[r] > 0).double().mean(0) for r in sides])
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, len(pairs), (bootstrap, len(pairs)), generator=g) if bootstrap else None
    pol_mean, pol_freq, drift, change, ci = [], [], [], [], []
    for p in pol:
        diff = p - ref
        pol_mean.append(torch.stack([p[r].mean(0) for r in sides]))
        pol_freq.append(torch.stack([(p[r] > 0).double().mean(0) for r in sides]))
        drift.append(torch.stack([(diff[r] ** 2).mean(0) for r in sides]))
        change.append(torch.stack([diff[r].mean(0) for r in sides]))
        if draws is None:
            ci.append(torch.full((2, 2, len(top)), float("nan"), dtype=torch.float64))
            continue
        side_ci = []
        for r in sides:
            means = diff[r][:, top][draws].mean(1)  # [bootstrap, listed]
            side_ci.append(torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0))
        ci.append(torch.stack(side_ci))  # [2 sides, 2 bounds, listed]
    return {
        "ref_mean": ref_mean,
        "ref_freq": ref_freq,
        "pol_mean": torch.stack(pol_mean),  # [runs, 2, width]
        "pol_freq": torch.stack(pol_freq),
        "side_drift": torch.stack(drift),
        "change": torch.stack(change),
        "ci": torch.stack(ci),  # [runs, 2, 2, listed]
    }


def _relative(change: torch.Tensor, ref_mean: torch.Tensor) -> list:
    """Mean change over the reference's mean activation, per run; None where the reference never fires."""
    r = float(ref_mean)
    return [float(c) / r if r > 0 else None for c in change]


SEED_SUFFIX = re.compile(r"[-_.]?(?:s|seed)\d+$")


def _groups(names) -> list[dict]:
    """Runs that differ only in a seed suffix (simpo-s0, simpo-s1, or simpo_seed2) form one group."""
    by: dict[str, list] = {}
    for k, name in enumerate(names):
        by.setdefault(SEED_SUFFIX.sub("", name) or name, []).append(k)
    return [{"name": g, "runs": ks} for g, ks in by.items() if len(ks) > 1]


def _neuronpedia(spec) -> str | None:
    """The feature page's address prefix when the SAE's folder names its Neuronpedia id (sae-lens' cfg.json
    metadata: neuronpedia_id), else None."""
    np_id = getattr(spec.sae, "neuronpedia_id", None)
    return f"https://www.neuronpedia.org/{np_id}/" if np_id else None


def _summary_line(entry, names, report) -> str:
    totals = ", ".join(f"{name} {t:.3g}" for name, t in zip(names, entry["drift_total"]))
    return (
        f"{entry['label']}: {entry['fires']} of {entry['width']} features fire; total drift {totals} (ranked on "
        f"{report['ranked_on_pairs']} pairs, judged on {report['judged_on_pairs']}"
        + (" other pairs)" if report["ranked_on_pairs"] != report["pairs"] else " pairs, the same)")
    )


class _ContextHeap:
    """Per feature, the `size` response tokens where the reference activates it most, kept as [size, width]
    tensors while the reference pass runs (one encode per response, never stored)."""

    def __init__(self, width, size):
        self.vals = torch.full((size, width), -float("inf"), dtype=torch.float32)
        self.where = torch.zeros(3, size, width, dtype=torch.long)  # pair position, side, token within the response
        self.size = size

    def add(self, flat, sae, spans, pos):
        P = len(pos)
        for s, (a, e) in enumerate(spans.tolist()):
            feats = ops_reference.sae_encode_ref(flat[a:e].float(), sae).float().cpu()  # [tokens, width]
            vals, tok = feats.topk(min(self.size, e - a), dim=0)
            side, p = divmod(s, P)
            where = torch.stack([torch.full_like(tok, pos[p]), torch.full_like(tok, side), tok])
            allv = torch.cat([self.vals, vals])
            allw = torch.cat([self.where, where], 1)
            best = allv.topk(self.size, dim=0).indices
            self.vals = allv.gather(0, best)
            self.where = allw.gather(1, best.unsqueeze(0).expand(3, -1, -1))

    def of(self, i, items, tokenizer, cfg) -> list[dict]:
        out = []
        for k in range(self.size):
            v = self.vals[k, i].item()
            if not v > 0:
                continue
            p, side, t = (int(x) for x in self.where[:, k, i])
            it = items[p]
            response = (it.chosen_ids, it.rejected_ids)[side]
            # the rows pooled over are the response's own tokens (or, pooling authors, the rows before them)
            at = len(it.prompt_ids) + t - (1 if cfg.pooling == "authors" else 0)
            ids = list(it.prompt_ids) + list(response)
            out.append(
                {
                    "text": _context(tokenizer, ids, at, cfg.context_tokens),
                    "activation": v,
                    "pair": int(it.id),
                    "response": ("chosen", "rejected")[side],
                    "position": at,
                    "window_index": at - max(0, at - cfg.context_tokens),
                    "tokens": [
                        printable(tokenizer.decode([x]).replace("\n", "↵").replace("\t", "→"))
                        for x in ids[max(0, at - cfg.context_tokens) : at + cfg.context_tokens + 1]
                    ],
                }
            )
        return out


def _add_token_activations(report, items, saes, tops, ref_model, cfg, rt, tokenizer, batching: Batching):
    """For the page: each listed context's tokens' activation of its feature under the reference and each run,
    from one more pass over only the pairs that hold a context (None on prompt tokens, which are not pooled)."""
    by_id = {it.id: it for it in items}
    need = [by_id[i] for i in sorted({c["pair"] for f in report["features"] for c in f["contexts"]})]

    def activations(model) -> dict:
        out = {}
        for chunk, batch in batching.batches(need):
            acts = _activations(model, batch, saes, rt)
            for j, spec in enumerate(saes):
                flat = acts[(spec.layer, spec.site)]
                for s, (a, e) in enumerate(batch.pool_spans.tolist()):
                    side, p = divmod(s, len(chunk))
                    feats = ops_reference.sae_encode_ref(flat[a:e].float(), spec.sae)[:, tops[j]]
                    out[(j, chunk[p].id, side)] = feats.float().cpu()
        return out

    per_model = [activations(ref_model)]
    for path in report["models"]:
        policy, _ = load_model(path, cfg, rt, rt.precision.frozen_dtype, tokenizer)
        policy.eval()
        per_model.append(activations(policy))
        del policy
    labels = [s["label"] for s in report["saes"]]
    shift = 1 if cfg.pooling == "authors" else 0
    for f in report["features"]:
        j = labels.index(f["sae"])
        col = tops[j].index(f["id"])
        for ctx in f["contexts"]:
            it = by_id[ctx["pair"]]
            side = 0 if ctx["response"] == "chosen" else 1
            start = max(0, ctx["position"] - cfg.context_tokens)
            values = []
            for acts in per_model:
                a = acts[(j, it.id, side)][:, col]
                rows = [start + k - len(it.prompt_ids) + shift for k in range(len(ctx["tokens"]))]
                values.append([float(a[t]) if 0 <= t < len(a) else None for t in rows])
            ctx["token_acts"] = {"reference": values[0], "runs": values[1:]}


def _check_started_from(path, policy, reference, reference_path, log):
    """A run compared with --reference must be the same architecture (another vocabulary or shape is a sentence,
    not an IndexError), and, where its folder records what it trained from, that model."""
    if config_fingerprint(policy) != config_fingerprint(reference):
        raise ValueError(
            f"model {path} is not the architecture of --reference {reference_path} (their configs differ: vocabulary "
            f"{policy.config.vocab_size} vs {reference.config.vocab_size}, hidden size {policy.config.hidden_size} vs "
            f"{reference.config.hidden_size}, ...): compare a run with the model it started from"
        )
    recorded = os.path.join(os.fspath(path), RUN_CONFIG)
    try:
        with open(recorded) as f:
            started = json.load(f)["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if isinstance(started, str) and os.path.realpath(started) != os.path.realpath(reference_path):
        log(
            f"[fpo] warning: {path} was trained from {started} ({RUN_CONFIG}), not from --reference "
            f"{reference_path}: its drift is measured against a model it did not start from"
        )


def _clean_numbers(obj):
    """NaN and infinities as null: JSON has no such numbers (Python would write a bare NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean_numbers(v) for v in obj]
    return obj


def _protected_drift(protect, spec, side_drift) -> dict:
    """For the SAE a protect file names: the protected set's summed drift per run, per side."""
    if protect is None or protect.sae != spec.sae.fingerprint():
        return {}
    ids = list(protect.ids)
    return {
        "protected": {
            "ids": ids,
            "drift_chosen": side_drift[:, 0, ids].sum(1).tolist(),
            "drift_rejected": side_drift[:, 1, ids].sum(1).tolist(),
        }
    }


def _check_outputs(cfg):
    """Every file the report will write, checked before the computation: its folder exists and is writable, and
    the path is not a folder."""
    for flag in ("json", "png", "html", "weights_out", "protect_out"):
        path = getattr(cfg, flag)
        if not path:
            continue
        name = "--" + flag.replace("_", "-")
        if os.path.isdir(path):
            raise ValueError(f"{name} {path} is a folder: name a file")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ValueError(f"{name} {path}: its folder {parent} does not exist (or is a file)")
        if not os.access(parent, os.W_OK):
            raise ValueError(f"{name} {path}: its folder {parent} is not writable")


def _context(tokenizer, ids, pos, width) -> str:
    """The token at pos in «», with `width` tokens each side, on one line, as printable text. The window is decoded
    whole and cut where the token's text begins and ends: a character split across tokens (CJK, emoji) decodes
    only with its neighbours, never as U+FFFD one token at a time."""
    a, e = max(0, pos - width), min(len(ids), pos + 1 + width)
    text = lambda lo, hi: tokenizer.decode(ids[lo:hi]).strip("\ufffd")  # noqa: E731 (cut characters at the ends)
    whole, head = text(a, e), text(a, pos)
    j = pos + 1  # a token that is only part of a character: shown with the tokens that complete it
    while j < e and text(a, j) == head:
        j += 1
    upto = text(a, j)
    if whole.startswith(upto) and upto.startswith(head):
        before, token, after = head, upto[len(head) :], whole[len(upto) :]
    else:  # a tokenizer whose decoding is not prefix-stable: token by token
        before, token, after = head, tokenizer.decode(ids[pos : pos + 1]), tokenizer.decode(ids[pos + 1 : e])
    return printable(" ".join(f"{before}«{token}»{after}".split()))


def printable(text: str) -> str:
    """Control characters (an escape sequence in held-out text would drive the terminal) written as \\xNN."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _versions() -> dict:
    import transformers

    from fpo_kernels import __version__

    return {
        "fpo-kernels": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }


def _print_table(report, log):
    """Per SAE: rank, feature, the reference's mean activation, each run's drift, and the top context, within
    REPORT_WIDTH columns."""
    runs = report["runs"]
    for sae in report["saes"]:
        feats = [f for f in report["features"] if f["sae"] == sae["label"]]
        rows = []
        for r, f in enumerate(feats, 1):
            row = {"rank": r, "id": f["id"], "ref": (f["ref_chosen"] + f["ref_rejected"]) / 2}
            for name, d in zip(runs, f["drift"]):
                row[name] = d
            rows.append(row)
        columns = [("rank", "#", ""), ("id", "feature", ""), ("ref", "ref act", ".3g")]
        columns += [(name, header, ".3g") for name, header in zip(runs, _headers(runs))]
        table = format_table(rows, columns)
        room = REPORT_WIDTH - max(len(line) for line in table.splitlines()) - 2
        lines = table.splitlines()
        if room >= 20:  # the strongest context beside each row, cut to the room left
            lines[0] += "  context (reference's strongest)"
            lines[1] += "  " + "-" * min(room, 32)
            for k, f in enumerate(feats):
                text = f["contexts"][0]["text"] if f["contexts"] else "-"
                lines[2 + k] += "  " + (text if len(text) <= room else text[: room - 1] + "…")
        log("")
        log(
            textwrap.fill(
                f"[fpo] features of {sae['label']} ({sae['width']} features, {sae['fires']} fire on these pairs): "
                f"the {len(feats)} that drifted most"
                + (f" under {report['settings']['rank_by']}" if report["settings"].get("rank_by") else " under any run")
                + (
                    f", ranked on {report['ranked_on_pairs']} held-out pairs and measured on "
                    f"{report['judged_on_pairs']} others"
                    if report["ranked_on_pairs"] != report["pairs"]
                    else f", over {report['responses']} held-out responses"
                ),
                REPORT_WIDTH,
            )
        )
        log("\n".join(lines))
    log(
        textwrap.fill(
            "ref act: the reference's mean pooled activation over chosen and rejected responses. drift: the mean over "
            "responses of (policy - reference)^2 of that feature's pooled activation, the feature's term of D "
            "before the top-k selection.",
            REPORT_WIDTH,
        )
    )


def _headers(runs, width=16) -> list[str]:
    """One column header per run, at most `width` characters, never two alike."""
    heads = [f"drift {printable(name)}"[:width] for name in runs]
    if len(set(heads)) == len(heads):
        return heads
    return [f"#{i + 1} {printable(name)}"[:width] for i, name in enumerate(runs)]


def plot_features(report: dict, path: PathLike) -> None:
    """One row per SAE: the top features' drift by run (bars), and every firing feature's mean signed change
    against its reference activation (one colour per run, the largest changes labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saes, runs = report["saes"], report["runs"]
    fig, axes = plt.subplots(len(saes), 2, figsize=(14, 4.2 * len(saes)), dpi=110, squeeze=False)
    width = 0.8 / max(len(runs), 1)
    for row, sae in zip(axes, saes):
        feats = [f for f in report["features"] if f["sae"] == sae["label"]]
        x = range(len(feats))
        for r, name in enumerate(runs):
            row[0].bar([i + r * width for i in x], [f["drift"][r] for f in feats], width, color=f"C{r}", label=name)
        row[0].set_xticks([i + width * (len(runs) - 1) / 2 for i in x], [str(f["id"]) for f in feats], rotation=90)
        row[0].set(
            title=f"{sae['label']}: the features that drifted most"
            + (" (ranked on other pairs)" if report.get("ranked_on_pairs", 0) != report.get("pairs", 0) else ""),
            xlabel="feature",
            ylabel="drift: mean (p - p_ref)^2",
        )
        # every feature that fires: its mean signed change against its reference activation, the five largest
        # changes of each run labelled with their ids (a policy-against-reference scatter sits on its diagonal)
        ref = sae["ref_mean"]
        for r, name in enumerate(runs):
            pol = sae["policy_mean"][r]
            fire = [i for i in range(len(ref)) if ref[i] > 0 or pol[i] > 0]
            change = [pol[i] - ref[i] for i in fire]
            row[1].scatter([ref[i] for i in fire], change, s=6, alpha=0.5, color=f"C{r}", label=name)
            for j in sorted(range(len(fire)), key=lambda j: -abs(change[j]))[:5]:
                row[1].annotate(str(fire[j]), (ref[fire[j]], change[j]), fontsize=7, color=f"C{r}")
        row[1].axhline(0, color="k", lw=0.8, ls="--", label="no change")
        row[1].set(
            title=f"{sae['label']}: every feature that fires",
            xlabel="reference's mean pooled activation",
            ylabel="mean change (policy - reference)",
        )
        for ax in row:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")  # the name as given, never with ".png" added
    plt.close(fig)
