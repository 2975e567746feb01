"""What FPO does over a run longer than the demo's, and which SAE features each method moves.

On the demo model (SmolLM2-135M-Instruct), its shipped SAE and the shipped UltraFeedback pairs, each run its
own process from the same start:
    fpo             D over the reference's feature scale, its alpha adapted to hold the constraint at 10% of
                    the margin term (--target-share 0.1)
    fpo-paper       the paper's alpha 0.5 and D
    simpo, tdpo2, dpo
then `fpo features` over all of them (ranked by SimPO's drift), and one more FPO run that protects the 10
features SimPO moved most (`--feature-weights`, weight --protect-weight), to see whether those features drift
less than in the unweighted FPO run. Every run is evaluated on the held-out pairs: accuracy with its sampling
error, reward accuracy, KL, D, entropy; the training records give the time and memory per step.

Writes <out>/evidence_features.{md,json}, features.json, features.png and evidence.png. Reports whatever comes
out, including no difference. One command runs it again: `python -m benchmarks.evidence_features`; with a GPU
it takes the GPU's settings (more pairs, longer sequences).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import torch

from benchmarks.common import environment, evidence_run, subset_jsonl, train_in_process, write_results
from fpo import assets
from fpo.demo import _plot, _sampling_error
from fpo.evaluate import evaluate
from fpo.feature_files import read_feature_weights
from fpo.features import feature_report
from fpo.precompute import precompute
from fpo.sae import load_saes

METHODS = ("fpo", "fpo-paper", "simpo", "tdpo2", "dpo")
SETTINGS = {
    "cpu": dict(pairs=200, eval_pairs=100, steps=100, batch_size=2, max_length=192, lr=2e-5, entropy_samples=8),
    "cuda": dict(pairs=2000, eval_pairs=400, steps=250, batch_size=8, max_length=512, lr=1e-6, entropy_samples=32),
}


def _train(name, cfg, work, log):
    """One run in its own process from the same start: (its output folder, its metric records)."""
    t0 = time.time()
    out, hist = train_in_process(name, cfg, work)
    log(f"[evidence] {name}: trained in {time.time() - t0:.0f} s")
    return out, hist


def run(args, log=print) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = dict(SETTINGS["cuda" if device.startswith("cuda") else "cpu"])
    s.update({k: v for k, v in vars(args).items() if k in s and v is not None})
    model = assets.ensure_demo_model(log)
    work = args.work_dir
    os.makedirs(work, exist_ok=True)
    lengths = dict(max_length=s["max_length"], max_prompt_length=s["max_length"] // 2)
    files, caches = {}, {}
    for split, src, n in (("train", assets.TRAIN_PAIRS, s["pairs"]), ("eval", assets.EVAL_PAIRS, s["eval_pairs"])):
        files[split] = os.path.join(work, f"{split}.jsonl")
        subset_jsonl(src, files[split], n + 8)  # spare rows: pairs with chosen == rejected are dropped
        caches[split] = os.path.join(work, f"cache-{split}")
        precompute(
            model,
            files[split],
            caches[split],
            sae=assets.DEMO_SAE,
            cache_k=256,
            max_pairs=n,
            device=device,
            overwrite=True,
            progress=False,
            log=log,
            **lengths,
        )
    eval_kw = dict(
        dataset=files["eval"],
        cache=caches["eval"],
        sae=assets.DEMO_SAE,
        max_pairs=s["eval_pairs"],
        device=device,
        entropy_samples=s["entropy_samples"],
        max_new_tokens=32,
        log=log,
        **lengths,
    )
    before = evaluate(model, reference_model=model, **eval_kw)
    base = dict(evidence_run(model, files["train"], s, device, max(1, s["steps"] // 10), lengths), seed=0)
    fpo = dict(base, method="fpo", cache=caches["train"], sae=assets.DEMO_SAE)
    runs, configs = {}, {}
    for name in METHODS:
        if name == "fpo":
            cfg = dict(fpo, alpha=0.5, constraint_norm="ref", target_share=0.1)
        elif name == "fpo-paper":
            cfg = dict(fpo, alpha=0.5)
        else:
            cfg = dict(base, method=name, cache=caches["train"] if name == "dpo" else None)
        out, hist = _train(name, cfg, work, log)
        runs[name] = {"history": hist, "after": evaluate(os.path.join(out, "final"), reference_model=model, **eval_kw)}
        configs[name] = cfg

    finals = {name: os.path.join(work, name, "final") for name in runs}
    feat_kw = dict(sae=assets.DEMO_SAE, max_pairs=s["eval_pairs"], device=device, progress=False, log=log, **lengths)
    # the 10 features SimPO moved most, protected in one more FPO run
    protect = os.path.join(work, "protect-simpo-top10.json")
    feature_report(
        [finals["simpo"]],
        model,
        files["eval"],
        top=args.protect,
        contexts=0,
        weights_out=protect,
        protect=args.protect,
        protect_weight=args.protect_weight,
        **feat_kw,
    )
    cfg = dict(configs["fpo"], feature_weights=protect)
    out, hist = _train("fpo-protect", cfg, work, log)
    runs["fpo-protect"] = {
        "history": hist,
        "after": evaluate(os.path.join(out, "final"), reference_model=model, **eval_kw),
    }
    configs["fpo-protect"] = cfg
    finals["fpo-protect"] = os.path.join(out, "final")

    report = feature_report(
        list(finals.values()),
        model,
        files["eval"],
        top=20,
        rank_by="simpo",
        contexts=2,
        json=os.path.join(args.out, "features.json"),
        png=os.path.join(args.out, "features.png"),
        **feat_kw,
    )
    [spec] = load_saes([(assets.DEMO_SAE, None, 1.0)])
    _, weights, _ = read_feature_weights(protect, [spec])
    protected = (weights != 1).nonzero().flatten().tolist()
    if not args.keep_models:
        for path in finals.values():
            shutil.rmtree(path, ignore_errors=True)
    return {
        "settings": s,
        "before": before,
        "runs": runs,
        "configs": configs,
        "features": report,
        "protected": protected,
    }


def _protected_drift(result) -> dict:
    """({run: mean drift over the protected features}, those features): the protected features are SimPO's
    top ones, so the report ranked by SimPO lists them with every run's drift."""
    report, names = result["features"], result["features"]["runs"]
    rows = {f["id"]: f for f in report["features"]}
    listed = [i for i in result["protected"] if i in rows]
    return {
        name: (sum(rows[i]["drift"][r] for i in listed) / len(listed) if listed else None)
        for r, name in enumerate(names)
    }, listed


def table(result) -> list[dict]:
    n = result["before"]["pairs"]
    drift, _ = _protected_drift(result)
    totals = dict(zip(result["features"]["runs"], result["features"]["saes"][0]["drift_total"]))
    rows = []
    for name, r in result["runs"].items():
        h, a = r["history"], r["after"]
        late = h[1:] or h
        rows.append(
            {
                "run": name,
                "alpha": result["configs"][name].get("alpha"),
                "acc": a["accuracy_logp"],
                "acc_se": _sampling_error(a["accuracy_logp"], n),
                "reward_acc": a["accuracy_reward"],
                "kl": a["kl"],
                "d": a["d"],
                "entropy": a["entropy"],
                "drift_all": totals.get(name),
                "drift_protected": drift.get(name),
                "step_s": sum(x["step_time_s"] for x in late) / len(late),
                "peak_mb": max(x["peak_memory_mb"] for x in h),
            }
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.evidence_features", description=__doc__.splitlines()[0])
    for key in ("pairs", "eval_pairs", "steps", "batch_size", "max_length", "entropy_samples"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"default by device: {SETTINGS}")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--protect", type=int, default=10, help="SimPO's top features protected in the fpo-protect run")
    p.add_argument("--protect-weight", type=float, default=10.0, help="their weight in D (others: 1)")
    p.add_argument("--device", default=None)
    p.add_argument("--work-dir", default="runs/evidence-features")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<cpu|gpu>")
    p.add_argument("--keep-models", action="store_true")
    args = p.parse_args(argv)
    kind = "gpu" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", kind)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    result = run(args)
    rows = table(result)
    _plot(
        result["runs"],
        result["before"],
        os.path.join(args.out, "evidence.png"),
        result["before"]["pairs"],
        result["features"],
    )
    _, listed = _protected_drift(result)
    s = result["settings"]
    notes = (
        f"{s['pairs']} training pairs, {s['eval_pairs']} held-out, {s['steps']} steps of {s['batch_size']} pairs, "
        f"{s['max_length']} tokens, lr {s['lr']}; each run its own process from the same start. acc: held-out "
        "fraction whose chosen response has the higher mean log-prob (acc_se: its sampling error); reward_acc: "
        "the same with the implicit reward; kl: sequential KL(ref || policy); d: held-out D (top-k); drift_all: "
        "the sum over every feature of its drift (mean over responses of (p - p_ref)^2); drift_protected: the "
        f"mean drift of the {len(listed)} features SimPO moved most that fpo-protect weighs by "
        f"{args.protect_weight:g} in D ({result['protected']}). step_s: mean step time after the first; peak_mb: "
        f"process peak RSS on the CPU. Total {time.time() - t0:.0f} s."
    )
    slim = {k: v for k, v in result.items() if k != "features"}
    write_results("evidence_features", rows, environment(), args.out, notes=notes, extra=slim)


if __name__ == "__main__":
    main()
