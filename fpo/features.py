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

import heapq
import json
import math
import os
import sys
import textwrap
import time

import torch

from fpo_kernels import reference as ops_reference
from fpo_kernels import sae_pooled_features

from .config import FeaturesConfig
from .feature_files import ProtectSet, read_protect_file, write_feature_weights, write_protect_file
from .files import atomic_write_json
from .model import ActivationCapture, config_fingerprint
from .packing import attention_length_scale, body_hidden, collate, plan_micro_batches
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


def _chunks(cfg, items, scale):
    if cfg.max_tokens is None:
        return [items[b : b + cfg.batch_pairs] for b in range(0, len(items), cfg.batch_pairs)]
    return plan_micro_batches(items, cfg.packing, cfg.max_tokens, scale)


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


def _pooled(model, batch, saes, rt) -> list[torch.Tensor]:
    """Each SAE's pooled features [2P, width] (chosen rows first) of one micro-batch."""
    acts = _activations(model, batch, saes, rt)
    return [sae_pooled_features(acts[(s.layer, s.site)], s.sae, spans=batch.pool_spans) for s in saes]


def _pass(model, items, saes, cfg, rt, pad_id, scale, desc, each):
    """One forward over every held-out pair: each(pair positions [P], pooled per SAE) per micro-batch."""
    bar = progress_bar(len(items), desc=desc, unit="pair") if cfg.progress else None
    position = {it.id: i for i, it in enumerate(items)}
    for chunk in _chunks(cfg, items, scale):
        batch = collate(chunk, cfg.packing, pad_id, scale, cfg.pooling)
        each([position[it.id] for it in chunk], _pooled(model, batch, saes, rt))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()


def feature_report(models, reference, dataset, *, tokenizer=None, log=print, **options) -> dict:
    """The per-feature report of one or several trained runs against the model they started from; options:
    fpo.config.FeaturesConfig's keys (the flags of `fpo features`). Returns what --json writes."""
    models = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    cfg = FeaturesConfig(
        model=[os.fspath(m) for m in models], reference=os.fspath(reference), dataset=dataset, **options
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
    items = load_items(cfg, tokenizer, rt)
    n, pad, scale = len(items), tokenizer.pad_token_id, attention_length_scale(ref_model)

    # the reference: each response's pooled features, kept sparse; sums for the means
    ref_rows = [[None] * (2 * n) for _ in saes]
    ref_sum = [torch.zeros(2, s.sae.width, dtype=torch.float64) for s in saes]

    def keep_reference(pos, pooled):
        P = len(pos)
        for j, p in enumerate(pooled):
            p = p.double().cpu()
            ref_sum[j][0] += p[:P].sum(0)
            ref_sum[j][1] += p[P:].sum(0)
            for i, where in enumerate(pos):
                ref_rows[j][where] = p[i].to_sparse()
                ref_rows[j][n + where] = p[P + i].to_sparse()

    _pass(ref_model, items, saes, cfg, rt, pad, scale, "features: reference", keep_reference)

    runs = []
    for path, name in zip(cfg.models, names):
        policy, _ = load_model(path, cfg, rt, rt.precision.frozen_dtype, tokenizer)
        policy.eval()
        _check_started_from(path, policy, ref_model, cfg.reference, log)
        pol_sum = [torch.zeros(2, s.sae.width, dtype=torch.float64) for s in saes]
        drift_sum = [torch.zeros(2, s.sae.width, dtype=torch.float64) for s in saes]  # chosen, rejected

        def compare(pos, pooled, pol_sum=pol_sum, drift_sum=drift_sum):
            P = len(pos)
            for j, p in enumerate(pooled):
                p = p.double().cpu()
                pol_sum[j][0] += p[:P].sum(0)
                pol_sum[j][1] += p[P:].sum(0)
                rows = [ref_rows[j][w] for w in pos] + [ref_rows[j][n + w] for w in pos]
                ref = torch.stack([r.to_dense() for r in rows])
                sq = (p - ref) ** 2
                drift_sum[j][0] += sq[:P].sum(0)
                drift_sum[j][1] += sq[P:].sum(0)

        _pass(policy, items, saes, cfg, rt, pad, scale, f"features: {name}", compare)
        del policy
        runs.append({"name": name, "model": path, "pol_sum": pol_sum, "drift_sum": drift_sum})

    report = {
        "reference": cfg.reference,
        "runs": names,
        "models": list(cfg.models),
        "dataset": os.fspath(dataset),
        "pairs": n,
        "responses": 2 * n,
        "saes": [],
        "features": [],
    }
    tops = []
    for j, spec in enumerate(saes):
        ref_mean = ref_sum[j] / max(n, 1)  # [2, width]
        pol_mean = torch.stack([r["pol_sum"][j] / max(n, 1) for r in runs])  # [runs, 2, width]
        side_drift = torch.stack([r["drift_sum"][j] / max(n, 1) for r in runs])  # [runs, 2, width]
        drift = side_drift.mean(1)  # [runs, width]: over every response
        rank = drift[ranking] if ranking is not None else drift.max(0).values
        broken = rank.isnan().nonzero().flatten().tolist()
        if broken:  # listed first, said aloud: a NaN would otherwise rank anywhere
            log(f"[fpo] warning: SAE {spec.name}: {len(broken)} features have a NaN drift (e.g. {broken[:5]}): a run's "
                "activations were not finite there; they are listed first")  # fmt: skip
        top = torch.nan_to_num(rank, nan=float("inf")).topk(min(cfg.top, spec.sae.width)).indices.tolist()
        fires = ((ref_mean.sum(0) > 0) | (pol_mean.sum(1) > 0).any(0)).sum().item()
        label = f"{spec.name}@{spec.layer}" + ("" if spec.site == "resid_post" else f"@{spec.site}")
        report["saes"].append(
            {
                "name": spec.name,
                "label": label,
                "layer": spec.layer,
                "site": spec.site,
                "width": spec.sae.width,
                "fingerprint": spec.sae.fingerprint(),
                "fires": int(fires),
                "drift_total": drift.sum(1).tolist(),  # per run: the sum of every feature's drift
                **_protected_drift(protect, spec, side_drift),
                "ref_mean": ref_mean.mean(0).tolist(),  # every feature, for the picture
                "policy_mean": pol_mean.mean(1).tolist(),
            }
        )
        for i in top:
            report["features"].append(
                {
                    "sae": label,
                    "id": i,
                    "ref_chosen": ref_mean[0, i].item(),
                    "ref_rejected": ref_mean[1, i].item(),
                    "policy_chosen": pol_mean[:, 0, i].tolist(),
                    "policy_rejected": pol_mean[:, 1, i].tolist(),
                    "drift": drift[:, i].tolist(),
                    "drift_chosen": side_drift[:, 0, i].tolist(),
                    "drift_rejected": side_drift[:, 1, i].tolist(),
                    "contexts": [],
                }
            )
        tops.append(top)
    if cfg.contexts:
        _add_contexts(report, ref_model, items, saes, tops, cfg, rt, tokenizer, scale)
    report["seconds"] = time.time() - t0
    report["settings"] = dict(vars(cfg))
    report["versions"] = _versions()
    _print_table(report, log)
    if cfg.json:
        atomic_write_json(cfg.json, _clean_numbers(report))
        log(f"[fpo] features: {cfg.json}")
    if cfg.png:
        plot_features(report, cfg.png)
        log(f"[fpo] features: {cfg.png}")
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
    return report


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
    for flag in ("json", "png", "weights_out", "protect_out"):
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


def _add_contexts(report, model, items, saes, tops, cfg, rt, tokenizer, scale):
    """For each listed feature, the cfg.contexts response tokens where the reference activates it most (a plain
    heap over every response token of the held-out pairs), written as text around the token."""
    heaps = [{i: [] for i in top} for top in tops]  # (activation, pair, side, position) min-heaps
    pad = tokenizer.pad_token_id
    for chunk in _chunks(cfg, items, scale):
        batch = collate(chunk, cfg.packing, pad, scale, cfg.pooling)
        acts = _activations(model, batch, saes, rt)
        P = len(chunk)
        for j, spec in enumerate(saes):
            cols = torch.tensor(tops[j])
            flat = acts[(spec.layer, spec.site)]
            for s, (a, e) in enumerate(batch.pool_spans.tolist()):
                feats = ops_reference.sae_encode_ref(flat[a:e].float(), spec.sae)[:, cols].float().cpu()
                side, p = divmod(s, P)
                for c, i in enumerate(tops[j]):
                    values, where = feats[:, c].topk(min(cfg.contexts, e - a))
                    for v, t in zip(values.tolist(), where.tolist()):
                        if v <= 0:
                            continue
                        entry = (v, chunk[p].id, side, t)
                        heap = heaps[j][i]
                        (heapq.heappush if len(heap) < cfg.contexts else heapq.heappushpop)(heap, entry)
    by_id = {it.id: it for it in items}
    offset = 0
    for j, top in enumerate(tops):
        for k, i in enumerate(top):
            feature = report["features"][offset + k]
            for v, pair, side, t in sorted(heaps[j][i], reverse=True):
                it = by_id[pair]
                response = (it.chosen_ids, it.rejected_ids)[side]
                # the rows pooled over are the response's own tokens (or, pooling authors, the rows before them)
                pos = len(it.prompt_ids) + t - (1 if cfg.pooling == "authors" else 0)
                feature["contexts"].append(
                    {
                        "text": _context(tokenizer, list(it.prompt_ids) + list(response), pos, cfg.context_tokens),
                        "activation": v,
                        "pair": int(pair),
                        "response": ("chosen", "rejected")[side],
                    }
                )
        offset += len(top)


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
                f"the {len(feats)} that drifted most over {report['responses']} held-out responses",
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


def plot_features(report, path):
    """One row per SAE: the top features' drift by run (bars), and every firing feature's reference against
    policy activation (one colour per run; the diagonal is no change)."""
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
            title=f"{sae['label']}: the features that drifted most",
            xlabel="feature",
            ylabel="drift: mean (p - p_ref)^2",
        )
        ref = sae["ref_mean"]
        for r, name in enumerate(runs):
            pol = sae["policy_mean"][r]
            fire = [i for i in range(len(ref)) if ref[i] > 0 or pol[i] > 0]
            row[1].scatter([ref[i] for i in fire], [pol[i] for i in fire], s=6, alpha=0.5, color=f"C{r}", label=name)
        top = max([max(sae["ref_mean"])] + [max(p) for p in sae["policy_mean"]] + [1e-12])
        row[1].plot([0, top], [0, top], color="k", lw=0.8, ls="--", label="no change")
        row[1].set(
            title=f"{sae['label']}: every feature that fires",
            xlabel="reference's mean pooled activation",
            ylabel="policy's mean pooled activation",
        )
        for ax in row:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")  # the name as given, never with ".png" added
    plt.close(fig)
