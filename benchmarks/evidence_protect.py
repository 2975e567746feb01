"""Does `--protect` hold the features it protects, over seeds, at what cost?

On the demo model (SmolLM2-135M-Instruct), its shipped SAE and the shipped UltraFeedback pairs:
1. the protected set: a SimPO run (seed 100, not one of the judged seeds) ranks the features by their drift on a
   selection split of held-out pairs; its top --protect features are written as a protect file;
2. FPO and SimPO, each with and without protection (lambda --coef), for every seed (the data order), each run in
   a process of its own from the same start, plus a 2-step run of each unprotected one (the noise floor) and
   SimPO with the other lambdas of the sweep on the first seed;
3. everything judged on a third split, never seen by the selection: the protected features' drift per side
   (chosen, rejected), the other features' drift, the KL to the reference, held-out reward accuracy, and the
   protected features' five nearest features by decoder cosine (do they take over?).

Accepted, per method and seed (paired), when protection gives: protected drift <= 0.5x the unprotected run's,
KL within +-20%, the other features' drift <= 1.25x, reward accuracy not lower by more than one standard error;
and the regime is loss-driven: each unprotected run's 2-step drift under 10% of its final drift, and its drift
growing faster than a random walk (final / 2-step > steps / 2).

Writes <out>/evidence_protect.{md,json} and evidence_protect.png (the lambda trade-off). Reports whatever comes
out. `python -m benchmarks.evidence_protect`; with a GPU it takes the GPU's settings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import torch

from benchmarks.common import environment, evidence_run, evidence_settings, subset_jsonl, train_in_process
from fpo import assets
from fpo.evaluate import evaluate
from fpo.feature_files import read_protect_file
from fpo.features import feature_report
from fpo.files import atomic_write_json, atomic_write_text
from fpo.precompute import precompute
from fpo_kernels.protect import GATES

SETTINGS = {
    "cpu": dict(pairs=200, select_pairs=48, judge_pairs=64, steps=40, batch_size=2, max_length=128, lr=5e-5, warmup=4),
    "cuda": dict(
        pairs=1000, select_pairs=100, judge_pairs=100, steps=200, batch_size=8, max_length=384, lr=1e-5, warmup=20
    ),
}
METHODS = ("simpo", "fpo")


def _decoder_neighbours(ids, n=5) -> dict:
    """Each protected feature's n nearest other features by the cosine of their decoder rows."""
    from safetensors.torch import load_file

    W = load_file(os.path.join(assets.DEMO_SAE, "sae_weights.safetensors"))["W_dec"].double()  # [m, d]
    W = W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)
    out = {}
    for i in ids:
        cos = W @ W[i]
        cos[i] = -2
        out[i] = cos.topk(n).indices.tolist()
    return out


def run(args, log=print) -> dict:
    device, s, lengths = evidence_settings(SETTINGS, args)
    seeds, coef, sweep = args.seeds, args.coef, sorted(set(args.sweep) | {args.coef})
    model = assets.ensure_demo_model(log)
    work = args.work_dir
    os.makedirs(work, exist_ok=True)
    sae = dict(sae=assets.DEMO_SAE)
    t_start = time.time()

    # the splits: training pairs, and the held-out pairs cut in two (selection, judgement)
    files = {name: os.path.join(work, f"{name}.jsonl") for name in ("train", "heldout", "select", "judge")}
    subset_jsonl(assets.TRAIN_PAIRS, files["train"], s["pairs"] + 8)  # spare rows: pairs with chosen == rejected
    with open(assets.EVAL_PAIRS) as f:
        rows = f.readlines()
    cut = s["select_pairs"] + 4
    with open(files["select"], "w") as f:
        f.writelines(rows[:cut])
    with open(files["judge"], "w") as f:
        f.writelines(rows[cut : cut + s["judge_pairs"] + 4])
    caches = {name: os.path.join(work, f"cache-{name}") for name in ("train", "judge")}
    count = {"train": s["pairs"], "judge": s["judge_pairs"]}
    for name, path in caches.items():
        precompute(model, files[name], path, cache_k=256, max_pairs=count[name], device=device, overwrite=True,
                   progress=False, log=log, **sae, **lengths)  # fmt: skip

    base = evidence_run(model, files["train"], s, device, s["warmup"], lengths)
    fpo = dict(
        base, method="fpo", cache=caches["train"], **sae, alpha=args.alpha, constraint_norm="ref",
        target_share=args.target_share,
    )  # fmt: skip
    config_of = {"simpo": dict(base, method="simpo"), "fpo": fpo}

    # 1. the protected set, from a SimPO run ranked on the selection split
    out, _ = train_in_process("select-simpo", dict(config_of["simpo"], seed=100), work)
    protect = os.path.join(work, "protect.json")
    feature_report(
        [os.path.join(out, "final")], model, files["select"], top=args.protect, contexts=0, protect_out=protect,
        protect=args.protect, rank_split=False, max_pairs=s["select_pairs"], device=device, progress=False, log=log,
        **sae, **lengths,
    )  # fmt: skip
    protected = list(read_protect_file(protect).ids)
    for name, path in caches.items():  # the reference's exact values of the set, added to both caches
        precompute(model, files[name], path, cache_k=256, max_pairs=count[name], device=device, progress=False,
                   protect=protect, log=log, **sae, **lengths)  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)

    # 2. the runs
    runs = {}

    def train(name, cfg):
        t0 = time.time()
        out, hist = train_in_process(name, cfg, work)
        runs[name] = {"final": os.path.join(out, "final"), "history": hist, "seconds": time.time() - t0}
        log(f"[evidence] {name}: {time.time() - t0:.0f} s")

    for seed in seeds:
        for method in args.methods:
            cfg = dict(config_of[method], cache=caches["train"], **sae, seed=seed)
            train(f"{method}-s{seed}", cfg)
            for gate in args.gates:
                lam = args.fpo_coef if method == "fpo" and args.fpo_coef is not None else coef
                on = dict(cfg, protect=protect, protect_coef=lam, **_term_keys(gate))
                if args.protect_share is not None:  # lambda adapted to hold the term's share of the margin term
                    on["protect_share"] = args.protect_share
                train(f"{method}-protect-{gate}-s{seed}", on)
            train(f"{method}-2steps-s{seed}", dict(cfg, max_steps=2))
    swept, gate0 = args.methods[0], args.gates[0]  # the sweep: the first method and gate, on the first seed
    for lam in sweep:
        if lam != coef:
            cfg = dict(config_of[swept], cache=caches["train"], **sae, seed=seeds[0], **_term_keys(gate0))
            train(f"{swept}-protect-{gate0}-l{lam:g}-s{seeds[0]}", dict(cfg, protect=protect, protect_coef=lam))

    # 3. judged on the judgement split
    eval_kw = dict(cache=caches["judge"], **sae, protect=protect, max_pairs=s["judge_pairs"], device=device,
                   reference_model=model, log=log, **lengths)  # fmt: skip
    for r in runs.values():
        r["eval"] = evaluate(r["final"], files["judge"], **eval_kw)
    names = list(runs)
    report = feature_report(
        [runs[n]["final"] for n in names], model, files["judge"], top=20, contexts=0, protect_file=protect,
        rank_split=False,
        max_pairs=s["judge_pairs"], device=device, progress=False, log=log, **sae, **lengths,
    )  # fmt: skip
    summary = report["saes"][0]
    neighbours = _decoder_neighbours(protected)
    near = sorted({j for ids in neighbours.values() for j in ids} - set(protected))
    ref_mean = torch.tensor(summary["ref_mean"])
    for k, n in enumerate(names):
        r = runs[n]
        pc, pr = summary["protected"]["drift_chosen"][k], summary["protected"]["drift_rejected"][k]
        r["protected_chosen"], r["protected_rejected"], r["protected"] = pc, pr, (pc + pr) / 2
        r["others"] = summary["drift_total"][k] - r["protected"]
        pol = torch.tensor(summary["policy_mean"][k])
        r["neighbours_change"] = float((pol[near] - ref_mean[near]).abs().sum())  # |mean change| of the neighbours
        r["neighbours_protected_change"] = float((pol[protected] - ref_mean[protected]).abs().sum())
    if not args.keep_models:
        for r in runs.values():
            shutil.rmtree(os.path.dirname(r["final"]), ignore_errors=True)

    # the verdict
    def se(acc, n):
        return (acc * (1 - acc) / n) ** 0.5

    pairs_judged = runs[names[0]]["eval"]["pairs"]
    rows, verdict = [], {}
    for method, gate in ((m, g) for m in args.methods for g in args.gates):
        checks = []
        for seed in seeds:
            off, on, early = (runs[f"{method}{x}-s{seed}"] for x in ("", f"-protect-{gate}", "-2steps"))
            acc_off, acc_on = off["eval"]["accuracy_reward"], on["eval"]["accuracy_reward"]
            row = {
                "method": method,
                "gate": gate,
                "seed": seed,
                "protected_ratio": on["protected"] / max(off["protected"], 1e-30),
                "protected_chosen_ratio": on["protected_chosen"] / max(off["protected_chosen"], 1e-30),
                "protected_rejected_ratio": on["protected_rejected"] / max(off["protected_rejected"], 1e-30),
                "kl_ratio": on["eval"]["kl"] / max(off["eval"]["kl"], 1e-30),
                "others_ratio": on["others"] / max(off["others"], 1e-30),
                "acc_off": acc_off,
                "acc_on": acc_on,
                "acc_se": se(acc_off, pairs_judged),
                "noise_floor": early["protected"] / max(off["protected"], 1e-30),
                "noise_floor_total": (early["protected"] + early["others"])
                / max(off["protected"] + off["others"], 1e-30),
                "growth": (off["protected"] + off["others"]) / max(early["protected"] + early["others"], 1e-30),
                "protect_share": _mean_late(on["history"], "protect_share"),
            }
            row["pass"] = (
                row["protected_ratio"] <= 0.5
                and 0.8 <= row["kl_ratio"] <= 1.2
                and row["others_ratio"] <= 1.25
                and acc_on >= acc_off - row["acc_se"]
            )
            row["loss_driven"] = row["noise_floor_total"] < 0.1 and row["growth"] > s["steps"] / 2
            rows.append(row)
            checks.append(row)
        ratios = [c["protected_ratio"] for c in checks]
        verdict[f"{method} ({gate})"] = {
            "accepted": all(c["pass"] for c in checks),
            "loss_driven": all(c["loss_driven"] for c in checks),
            "protected_ratio_mean": statistics.mean(ratios),
            "protected_ratio_sd": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
        }
    sweep_rows = []
    for lam in sweep:
        lam_tag = "" if lam == coef else f"-l{lam:g}"
        r, off = runs[f"{swept}-protect-{gate0}{lam_tag}-s{seeds[0]}"], runs[f"{swept}-s{seeds[0]}"]
        sweep_rows.append(
            {
                "lambda": lam,
                "protected_ratio": r["protected"] / max(off["protected"], 1e-30),
                "kl_ratio": r["eval"]["kl"] / max(off["eval"]["kl"], 1e-30),
                "acc": r["eval"]["accuracy_reward"],
                "protect_share": _mean_late(r["history"], "protect_share"),
            }
        )
    result = {
        "settings": dict(
            s,
            seeds=seeds,
            coef=coef,
            fpo_coef=args.fpo_coef,
            sweep=sweep,
            alpha=args.alpha,
            protect=args.protect,
            methods=args.methods,
            gates=args.gates,
            swept=f"{swept} ({gate0})",
            target_share=args.target_share,
            protect_share=args.protect_share,
        ),
        "protected": protected,
        "neighbours": {str(k): v for k, v in neighbours.items()},
        "rows": rows,
        "verdict": verdict,
        "sweep": sweep_rows,
        "runs": {
            n: {k: v for k, v in r.items() if k not in ("final",)} | {"history": r["history"][-1:]}
            for n, r in runs.items()
        },
        "pairs_judged": pairs_judged,
        "seconds": time.time() - t_start,
        "environment": environment(),
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "evidence_protect" + (f"_{args.tag}" if args.tag else ""))
    _plot_sweep(sweep_rows, stem + ".png", result["settings"]["swept"])
    atomic_write_json(stem + ".json", result)
    atomic_write_text(stem + ".md", _markdown(result))
    log(_markdown(result))
    return result


def _term_keys(term: str) -> dict:
    """fpo train's keys of one protection term: the pooled form with a gate, or the per-token form ("token")."""
    return dict(protect_form="token") if term == "token" else dict(protect_gate=term)


def _mean_late(history, key):
    """The mean of a logged metric over the second half of a run (None where it was never logged)."""
    vals = [h[key] for h in history[len(history) // 2 :] if h.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _plot_sweep(rows, path, swept):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    lam = [r["lambda"] for r in rows]
    ax.plot(lam, [r["protected_ratio"] for r in rows], "o-", label="protected features' drift / unprotected")
    ax.plot(lam, [r["kl_ratio"] for r in rows], "s--", label="KL to the reference / unprotected")
    ax.plot(lam, [r["acc"] for r in rows], "^:", label="held-out reward accuracy")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="lambda (--protect-coef)", ylabel="ratio, or accuracy",
           title=f"{swept} with --protect: the lambda trade-off (one seed)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _markdown(res) -> str:
    s = res["settings"]
    lines = [
        "# Protection over seeds: does --protect hold the features it protects?",
        "",
        f"Demo model and SAE; {s['pairs']} training pairs, {s['steps']} steps of {s['batch_size']} pairs, "
        f"{s['max_length']} tokens, lr {s['lr']:g} (warmup {s['warmup']}), seeds {s['seeds']}; the "
        f"{len(res['protected'])} protected features ({res['protected']}) chosen from a SimPO run (seed 100) "
        f"on {s['select_pairs']} selection pairs; judged on {res['pairs_judged']} other held-out pairs. "
        f"lambda {s['coef']:g}"
        + (f" (FPO: {s['fpo_coef']:g})" if s.get("fpo_coef") is not None else "")
        + f", terms {', '.join(s['gates'])} (token: the per-token form, R on every response "
        f"token's pre-activations; otherwise the pooled form with that gate, the off tokens through which the term "
        f"may raise a feature); FPO on D over the reference scale, alpha adapted to a constraint share of "
        f"{s['target_share']:g} (from {s['alpha']:g}).",
        "",
        "| method | term | seed | protected drift on/off | chosen | rejected | others on/off | KL on/off | "
        "acc off | acc on | 2-step / final drift | final / 2-step | protect share | pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {r['gate']} | {r['seed']} | {fmt(r['protected_ratio'])} | "
            f"{fmt(r['protected_chosen_ratio'])} | "
            f"{fmt(r['protected_rejected_ratio'])} | {fmt(r['others_ratio'])} | {fmt(r['kl_ratio'])} | "
            f"{fmt(r['acc_off'])} | {fmt(r['acc_on'])} ± {fmt(r['acc_se'])} | {fmt(r['noise_floor_total'])} | "
            f"{fmt(r['growth'])} | {fmt(r['protect_share'])} | {'yes' if r['pass'] else 'no'} |"
        )
    lines += ["", "| method | accepted in every seed | loss-driven regime | protected drift on/off, mean ± SD |",
              "|---|---|---|---|"]  # fmt: skip
    for m, v in res["verdict"].items():
        lines.append(
            f"| {m} | {'yes' if v['accepted'] else 'no'} | {'yes' if v['loss_driven'] else 'no'} | "
            f"{v['protected_ratio_mean']:.3g} ± {v['protected_ratio_sd']:.2g} |"
        )
    lines += ["", f"lambda sweep ({s['swept']}, first seed):", "",
              "| lambda | protected drift on/off | KL on/off | acc | share |", "|---|---|---|---|---|"]  # fmt: skip
    for r in res["sweep"]:
        lines.append(
            f"| {r['lambda']:g} | {fmt(r['protected_ratio'])} | {fmt(r['kl_ratio'])} | {fmt(r['acc'])} | "
            f"{fmt(r['protect_share'])} |"
        )
    lines += [
        "",
        "Drift: the mean over held-out responses of (p - p_ref)^2 of a feature's pooled activation, summed over the "
        "protected features (or over all the others). 2-step / final: the unprotected run's total drift after 2 "
        "steps over its final drift (the noise floor; under 0.1 for a loss-driven regime); final / 2-step above "
        "steps / 2 means faster than a random walk. Neighbours (five nearest by decoder cosine, per protected "
        "feature) are in the JSON, with the summed |mean change| of the neighbours per run.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/cpu")
    p.add_argument("--work-dir", default="/tmp/fpo-evidence-protect")
    p.add_argument("--device", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--coef", type=float, default=1.0, help="lambda of the seeded runs (their start, with --protect-share)"
    )
    p.add_argument(
        "--fpo-coef",
        type=float,
        default=None,
        help="FPO's lambda where it differs from --coef (its beta of 0.1 makes its margin term 20x smaller)",
    )
    p.add_argument("--protect-share", type=float, default=None, help="adapt the seeded runs' lambda to this share")
    p.add_argument("--sweep", type=float, nargs="+", default=[0.3, 1.0, 3.0], help="lambdas of the trade-off")
    p.add_argument("--alpha", type=float, default=1.0, help="FPO's starting alpha (D over the reference scale)")
    p.add_argument("--target-share", type=float, default=0.1, help="FPO's constraint share, held by adapting alpha")
    p.add_argument("--protect", type=int, default=10, help="features protected")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--gates",
        nargs="+",
        default=["restore"],
        choices=GATES + ("token",),
        help="the protection terms run: the pooled form with this --protect-gate, or token (--protect-form token)",
    )
    p.add_argument("--tag", default="", help="written as evidence_protect_<tag>.{md,json,png}")
    for key in SETTINGS["cpu"]:
        p.add_argument("--" + key.replace("_", "-"), type=type(SETTINGS["cpu"][key]), default=None)
    p.add_argument("--keep-models", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    run(args)


if __name__ == "__main__":
    main()
