"""What each method costs at equal preference gain, over seeds: D, KL and feature drift against held-out gain.

On the demo model (SmolLM2-135M-Instruct), its shipped SAE and the shipped UltraFeedback pairs, for every seed
(the data order) and method, each run in a process of its own from the same start:
    fpo      D over the reference's feature scale, alpha adapted to hold the constraint at --target-share of
             the margin term (the realised share per phase is reported)
    simpo    no constraint
    tdpo2    the sequential KL constraint
Every run keeps a checkpoint every --every steps; each is evaluated on held-out pairs: the implicit reward
margin (a_w - a_w_ref) - (a_l - a_l_ref) of the length-normalised log-prob, one scale for every method (the
gain), reward accuracy, KL(ref || policy) and D. A 2-step run of each method and seed gives the noise floor.

Equal gain: per seed, g* is the largest held-out margin that every method's run reached at a checkpoint (the
smallest of the runs' highest margins); each run's D and KL at g* come from its curve (the reference at (0, 0, 0),
then its checkpoints), linear between the two points where it first reached g*. Per pair of methods the
per-seed ratios at g*; an effect is claimed only where its sign holds in every seed and the mean log-ratio is
more than 2 standard errors from 0. The final models' total feature drift (every feature's (p - p_ref)^2,
summed) comes from `fpo features`.

Writes <out>/evidence_methods.{md,json,png}. Reports whatever comes out, no difference included.
`python -m benchmarks.evidence_methods`; with a GPU it takes the GPU's settings. `--from-json FILE` reads the
curves of an earlier run and writes the summary again (the analysis changed, the runs not).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import time

from benchmarks.common import environment, evidence_run, evidence_settings, subset_jsonl, train_in_process
from fpo import assets
from fpo.alpha_control import phase_shares
from fpo.evaluate import evaluate
from fpo.features import feature_report
from fpo.files import atomic_write_json, atomic_write_text
from fpo.precompute import precompute
from fpo.run_dir import checkpoints

SETTINGS = {
    "cpu": dict(pairs=200, eval_pairs=64, steps=40, every=20, batch_size=2, max_length=128, lr=5e-5, warmup=4),
    "cuda": dict(pairs=2000, eval_pairs=256, steps=200, every=25, batch_size=8, max_length=384, lr=1e-5, warmup=20),
}
METHODS = ("fpo", "simpo", "tdpo2")
PAIRS = (("fpo", "simpo"), ("fpo", "tdpo2"), ("tdpo2", "simpo"))
METRICS = ("d", "kl")


def at_gain(curve: list[dict], g: float, key: str) -> float | None:
    """`key` where the curve's margin first reaches g, linear between the two points that bracket it; None where it
    never does. curve: [{"margin", key}], the reference's point (margin 0) first."""
    for a, b in zip(curve, curve[1:]):
        lo, hi = a["margin"], b["margin"]
        if lo <= g <= hi and hi > lo:
            t = (g - lo) / (hi - lo)
            return a[key] + t * (b[key] - a[key])
        if lo == g:
            return a[key]
    return None


def paired_claim(ratios: list[float]) -> dict:
    """Per-seed ratios: their mean and SD, the mean log-ratio and its standard error, and whether an effect is
    claimed (every seed on one side of 1, |mean log| > 2 SE)."""
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean_log = statistics.mean(logs)
    se = statistics.stdev(logs) / n**0.5 if n > 1 else float("inf")
    same_sign = all(x < 0 for x in logs) or all(x > 0 for x in logs)
    return {
        "ratios": ratios,
        "mean": statistics.mean(ratios),
        "sd": statistics.stdev(ratios) if n > 1 else 0.0,
        "mean_log": mean_log,
        "se_log": se,
        "claimed": bool(same_sign and abs(mean_log) > 2 * se),
    }


def run(args, log=print) -> dict:
    device, s, lengths = evidence_settings(SETTINGS, args)
    model = assets.ensure_demo_model(log)
    work = args.work_dir
    os.makedirs(work, exist_ok=True)
    sae = dict(sae=assets.DEMO_SAE)
    t_start = time.time()

    files = {split: os.path.join(work, f"{split}.jsonl") for split in ("train", "eval")}
    caches = {split: os.path.join(work, f"cache-{split}") for split in files}
    count = {"train": s["pairs"], "eval": s["eval_pairs"]}
    subset_jsonl(assets.TRAIN_PAIRS, files["train"], s["pairs"] + 8)  # spare rows: pairs with chosen == rejected
    subset_jsonl(assets.EVAL_PAIRS, files["eval"], s["eval_pairs"] + 8)
    for split, path in caches.items():
        precompute(model, files[split], path, cache_k=256, max_pairs=count[split], device=device, overwrite=True,
                   progress=False, log=log, **sae, **lengths)  # fmt: skip

    base = evidence_run(model, files["train"], s, device, s["warmup"], lengths)
    config_of = {
        "fpo": dict(
            base,
            method="fpo",
            cache=caches["train"],
            **sae,
            alpha=1.0,
            constraint_norm="ref",
            target_share=args.target_share,
        ),  # fmt: skip
        "simpo": dict(base, method="simpo"),
        "tdpo2": dict(base, method="tdpo2"),
        "dpo": dict(base, method="dpo", cache=caches["train"]),
    }
    eval_kw = dict(cache=caches["eval"], **sae, max_pairs=s["eval_pairs"], device=device, reference_model=model,
                   log=lambda *a: None, **lengths)  # fmt: skip

    def point(path, step):
        e = evaluate(path, files["eval"], **eval_kw)
        return {"step": step, "margin": e["reward_margin"], "acc": e["accuracy_reward"], "kl": e["kl"], "d": e["d"]}

    runs = {}
    for seed in args.seeds:
        for method in args.methods:
            name = f"{method}-s{seed}"
            t0 = time.time()
            out, hist = train_in_process(name, dict(config_of[method], seed=seed, save_every=s["every"]), work)
            curve = [{"step": 0, "margin": 0.0, "acc": 0.5, "kl": 0.0, "d": 0.0}]  # the reference itself
            for ck in sorted(checkpoints(out), key=lambda n: int(n.split("-")[1])):
                curve.append(point(os.path.join(out, ck), int(ck.split("-")[1])))
            if curve[-1]["step"] != s["steps"]:
                curve.append(point(os.path.join(out, "final"), s["steps"]))
            early, _ = train_in_process(f"{name}-2steps", dict(config_of[method], seed=seed, max_steps=2), work)
            runs[name] = {
                "method": method,
                "seed": seed,
                "curve": curve,
                "two_steps": point(os.path.join(early, "final"), 2),
                "final": os.path.join(out, "final"),
                "shares": phase_shares(hist) if method == "fpo" else None,
                "history": hist,
                "seconds": time.time() - t0,
            }
            shutil.rmtree(early, ignore_errors=True)
            for ck in sorted(checkpoints(out), key=lambda n: int(n.split("-")[1])):
                shutil.rmtree(os.path.join(out, ck), ignore_errors=True)
            c = curve[-1]
            log(f"[evidence] {name}: margin {c['margin']:.4f}, D {c['d']:.3g}, KL {c['kl']:.3g}, "
                f"{time.time() - t0:.0f} s")  # fmt: skip

    # the final models' total drift over every feature
    names = list(runs)
    report = feature_report([runs[n]["final"] for n in names], model, files["eval"], top=10, contexts=0,
                            rank_split=False, max_pairs=s["eval_pairs"], device=device, progress=False,
                            log=lambda *a: None, **sae, **lengths)  # fmt: skip
    for k, n in enumerate(names):
        runs[n]["drift_total"] = report["saes"][0]["drift_total"][k]
    if not args.keep_models:
        for n in names:
            shutil.rmtree(os.path.dirname(runs[n]["final"]), ignore_errors=True)

    settings = dict(s, seeds=args.seeds, methods=args.methods, target_share=args.target_share)
    result = summarise(runs, settings) | {"seconds": time.time() - t_start, "environment": environment()}
    os.makedirs(args.out, exist_ok=True)
    _plot(result, os.path.join(args.out, "evidence_methods.png"))
    atomic_write_json(os.path.join(args.out, "evidence_methods.json"), result)
    atomic_write_text(os.path.join(args.out, "evidence_methods.md"), markdown(result))
    log(markdown(result))
    return result


def summarise(runs: dict, settings: dict) -> dict:
    """The runs' curves read at equal gain per seed, the paired ratios and their claims, the final checkpoints'
    means over seeds. runs: {"<method>-s<seed>": {"curve", "two_steps", "drift_total", "shares", ...}}."""
    seeds, methods = settings["seeds"], settings["methods"]
    matched = {}
    for seed in seeds:
        g = min(max(p["margin"] for p in runs[f"{m}-s{seed}"]["curve"]) for m in methods)
        row: dict = {"gain": g if g > 0 else None}
        for m in methods:
            curve = runs[f"{m}-s{seed}"]["curve"]
            row[m] = {key: (at_gain(curve, g, key) if g > 0 else None) for key in METRICS}
        matched[seed] = row
    claims = {}
    for a, b in PAIRS:
        if a not in methods or b not in methods:
            continue
        for key in METRICS:
            ratios = [
                matched[seed][a][key] / matched[seed][b][key]
                for seed in seeds
                if (matched[seed][a][key] or 0) > 0 and (matched[seed][b][key] or 0) > 0
            ]
            claims[f"{key} {a}/{b}"] = paired_claim(ratios) if len(ratios) == len(seeds) else None
    finals = {}
    for m in methods:
        rs = [runs[f"{m}-s{seed}"] for seed in seeds]
        finals[m] = {key: _mean_sd([r["curve"][-1][key] for r in rs]) for key in ("margin", "acc", "kl", "d")} | {
            "drift_total": _mean_sd([r["drift_total"] for r in rs]),
            "noise_floor_d": _mean_sd([r["two_steps"]["d"] / max(r["curve"][-1]["d"], 1e-30) for r in rs]),
            "noise_floor_kl": _mean_sd([r["two_steps"]["kl"] / max(r["curve"][-1]["kl"], 1e-30) for r in rs]),
        }
    return {
        "settings": settings,
        "matched": {str(k): v for k, v in matched.items()},
        "claims": claims,
        "finals": finals,
        "runs": {n: {k: v for k, v in r.items() if k not in ("final", "history")} for n, r in runs.items()},
        "pairs_judged": settings["eval_pairs"],
    }


def resummarise(path, out, log=print) -> dict:
    """The summary, markdown and plot of an earlier run's results file, from its curves (its runs, settings,
    timing and environment kept)."""
    import json

    with open(path) as f:
        old = json.load(f)
    result = summarise(old["runs"], old["settings"]) | {k: old[k] for k in ("seconds", "environment") if k in old}
    os.makedirs(out, exist_ok=True)
    _plot(result, os.path.join(out, "evidence_methods.png"))
    atomic_write_json(os.path.join(out, "evidence_methods.json"), result)
    atomic_write_text(os.path.join(out, "evidence_methods.md"), markdown(result))
    log(markdown(result))
    return result


def _mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def _plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    methods = res["settings"]["methods"]
    for i, m in enumerate(methods):
        for seed in res["settings"]["seeds"]:
            c = res["runs"][f"{m}-s{seed}"]["curve"]
            style = dict(color=f"C{i}", marker="o", ms=3, lw=1.2, alpha=0.8)
            label = m if seed == res["settings"]["seeds"][0] else None
            axes[0].plot([p["margin"] for p in c], [p["d"] for p in c], label=label, **style)
            axes[1].plot([p["margin"] for p in c], [p["kl"] for p in c], label=label, **style)
    panels = ((axes[0], "held-out D", "mean per response"), (axes[1], "held-out KL(ref || policy)", "nats"))
    for ax, key, unit in panels:
        ax.set(title=f"{key} against the held-out gain", xlabel="held-out implicit reward margin (nats per token)",
               ylabel=unit)  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("each seed one line; the reference at (0, 0)")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def markdown(res) -> str:
    s = res["settings"]
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    ms = lambda v: "-" if v is None else f"{v['mean']:.3g} ± {v['sd']:.2g}"  # noqa: E731
    lines = [
        "# Methods over seeds at equal gain",
        "",
        f"Demo model and SAE; {s['pairs']} training pairs, {s['steps']} steps of {s['batch_size']} pairs, "
        f"{s['max_length']} tokens, lr {s['lr']:g} (warmup {s['warmup']}), seeds {s['seeds']}; judged on "
        f"{res['pairs_judged']} held-out pairs every {s['every']} steps. FPO: D over the reference scale, alpha "
        f"adapted to a constraint share of {s['target_share']:g}.",
        "",
        "Final checkpoints, mean ± SD over seeds (noise floor: the 2-step run's value over the final one):",
        "",
        "| method | margin | reward acc | KL | D | total drift | noise floor D | noise floor KL | FPO share "
        "early / middle / late |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, f in res["finals"].items():
        shares = [res["runs"][f"{m}-s{seed}"]["shares"] for seed in s["seeds"]]
        share = "-"
        if all(shares):
            parts = [[x[p] for x in shares if x[p] is not None] for p in ("early", "middle", "late")]
            share = " / ".join(f"{statistics.mean(v):.2g}" if v else "-" for v in parts)
        lines.append(
            f"| {m} | {ms(f['margin'])} | {ms(f['acc'])} | {ms(f['kl'])} | {ms(f['d'])} | {ms(f['drift_total'])} | "
            f"{ms(f['noise_floor_d'])} | {ms(f['noise_floor_kl'])} | {share} |"
        )
    lines += ["", "At equal gain, per seed (g*: the largest held-out margin every run of the seed reached):", "",
              "| seed | g* | " + " | ".join(f"{m} D | {m} KL" for m in s["methods"]) + " |",
              "|---|---|" + "---|---|" * len(s["methods"])]  # fmt: skip
    for seed, row in res["matched"].items():
        cells = " | ".join(f"{fmt(row[m]['d'])} | {fmt(row[m]['kl'])}" for m in s["methods"])
        lines.append(f"| {seed} | {fmt(row['gain'])} | {cells} |")
    lines += ["", "Paired ratios at equal gain (claimed: every seed on one side of 1 and |mean log| > 2 SE):", "",
              "| ratio | per seed | mean ± SD | claimed |", "|---|---|---|---|"]  # fmt: skip
    for name, c in res["claims"].items():
        if c is None:
            lines.append(f"| {name} | not every seed reached a positive common gain | - | no |")
            continue
        per = ", ".join(f"{r:.3g}" for r in c["ratios"])
        lines.append(f"| {name} | {per} | {c['mean']:.3g} ± {c['sd']:.2g} | {'yes' if c['claimed'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.evidence_methods", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/cpu")
    p.add_argument("--work-dir", default="/tmp/fpo-evidence-methods")
    p.add_argument("--device", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=("fpo", "simpo", "tdpo2", "dpo"))
    p.add_argument("--target-share", type=float, default=0.1, help="FPO's constraint share, held by adapting alpha")
    for key in SETTINGS["cpu"]:
        p.add_argument("--" + key.replace("_", "-"), type=type(SETTINGS["cpu"][key]), default=None)
    p.add_argument("--keep-models", action="store_true")
    p.add_argument("--from-json", default=None, help="an earlier evidence_methods.json: summarise its runs again")
    args = p.parse_args(argv)
    if args.from_json:
        resummarise(args.from_json, args.out)
    else:
        run(args)


if __name__ == "__main__":
    main()
