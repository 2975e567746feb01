"""Does FPO's feature constraint matter? FPO at several alphas beside SimPO and TDPO2, from one start.

Runs, on the demo model (SmolLM2-135M-Instruct), its shipped SAE and the shipped UltraFeedback pairs:
    fpo alpha 0             length-normalised DPO with an offline reference: the constraint switched off
    fpo alpha 0.5           the paper's alpha, D as in the paper (constraint_norm none)
    fpo alpha matched       the alpha at which the constraint term is --target-share of the margin term over
                            the second half of training (measured on the alpha 0.5 run: alpha = 0.5 x target /
                            share; the policy starts at the reference, where D is 0, so step 1 cannot tell)
    fpo alpha 0.5 ref       the paper's alpha with D divided by the reference's recorded feature scale
    simpo, tdpo2            the baselines
then evaluates each final model on held-out pairs against the reference: preference accuracy, the held-out
constraint D, sequence KL to the reference, sample entropy; and records the constraint's share of the margin
term over training. Writes a table, a JSON and a PNG with one panel per quantity.

What a CPU-sized run can show: whether the constraint term is large enough to move D and the KL at all
(its share, and D and KL against alpha 0), on the same data and start. What it cannot show: alignment
quality, or differences between methods smaller than the noise of 16 held-out pairs and a few dozen steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from benchmarks.common import environment, subset_jsonl, train_in_process, write_results
from fpo import assets
from fpo.evaluate import evaluate
from fpo.precompute import precompute

RUNS = ("fpo alpha 0", "fpo alpha 0.5", "fpo alpha matched", "fpo alpha 0.5 ref", "simpo", "tdpo2")


def run(args, log=print):
    model = assets.ensure_demo_model()
    work = args.work_dir
    os.makedirs(work, exist_ok=True)
    lengths = dict(max_length=args.max_length, max_prompt_length=args.max_length // 2)
    files, caches = {}, {}
    for split, src, n in (("train", assets.TRAIN_PAIRS, args.pairs), ("eval", assets.EVAL_PAIRS, args.eval_pairs)):
        files[split] = os.path.join(work, f"{split}.jsonl")
        subset_jsonl(src, files[split], n + 4)  # a few spare rows: pairs with chosen == rejected are dropped
        caches[split] = os.path.join(work, f"cache-{split}")
        precompute(
            model,
            files[split],
            caches[split],
            sae=assets.DEMO_SAE,
            cache_k=256,
            max_pairs=n,
            device="cpu",
            overwrite=True,
            progress=False,
            log=log,
            **lengths,
        )
    eval_kw = dict(
        dataset=files["eval"],
        cache=caches["eval"],
        sae=assets.DEMO_SAE,
        max_pairs=args.eval_pairs,
        device="cpu",
        entropy_samples=args.entropy_samples,
        max_new_tokens=16,
        k=args.k,
        log=log,
        **lengths,
    )
    before = evaluate(model, reference_model=model, **eval_kw)
    base = dict(
        model=model,
        dataset=files["train"],
        max_pairs=args.pairs,
        batch_size=args.batch_size,
        micro_batch_size=min(2, args.batch_size),
        max_steps=args.steps,
        epochs=1000,
        lr=args.lr,
        warmup_steps=2,
        seed=0,
        log_every=1,
        progress=False,
        device="cpu",
        k=args.k,
        save_optimizer=False,
        overwrite=True,
        **lengths,
    )
    fpo = dict(base, method="fpo", cache=caches["train"], sae=assets.DEMO_SAE)
    results, matched_alpha = {}, None
    for name in RUNS:
        if name == "fpo alpha 0":
            cfg = dict(fpo, alpha=0.0)
        elif name == "fpo alpha 0.5":
            cfg = dict(fpo, alpha=0.5)
        elif name == "fpo alpha matched":
            hist = results["fpo alpha 0.5"]["history"]
            late = hist[len(hist) // 2 :]
            share = sum(h["constraint_share"] for h in late) / len(late)
            matched_alpha = 0.5 * args.target_share / max(share, 1e-12)
            cfg = dict(fpo, alpha=matched_alpha)
        elif name == "fpo alpha 0.5 ref":
            cfg = dict(fpo, alpha=0.5, constraint_norm="ref")
        else:
            cfg = dict(base, method=name)
        log(f"[ablation] {name}")
        out, hist = train_in_process(name.replace(" ", "_"), cfg, work, env=dict(os.environ, TRITON_INTERPRET="0"))
        after = evaluate(os.path.join(out, "final"), reference_model=model, **eval_kw)
        shutil.rmtree(os.path.join(out, "final"), ignore_errors=True)
        results[name] = {
            "config": {k: cfg[k] for k in ("method", "alpha", "lr", "max_steps") if k in cfg}
            | {"constraint_norm": cfg.get("constraint_norm", "none")},
            "history": hist,
            "after": after,
        }
    return before, results, matched_alpha


def table(before, results):
    rows = [
        {
            "run": "start",
            "alpha": None,
            "heldout_acc": before["accuracy_logp"],
            "heldout_D": before["d"],
            "kl": before["kl"],
            "entropy": before["entropy"],
            "share_late": None,
        }
    ]
    for name, r in results.items():
        h, a = r["history"], r["after"]
        late = [x["constraint_share"] for x in h[len(h) // 2 :] if "constraint_share" in x]
        rows.append(
            {
                "run": name,
                "alpha": r["config"].get("alpha"),
                "heldout_acc": a["accuracy_logp"],
                "heldout_D": a["d"],
                "kl": a["kl"],
                "entropy": a["entropy"],
                "share_late": sum(late) / len(late) if late else None,
            }
        )
    return rows


def plot(results, before, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 5, figsize=(19, 3.8), dpi=110)
    panels = (
        ("accuracy_logp", "held-out preference accuracy"),
        ("d", "held-out D (SAE constraint)"),
        ("kl", "sequence KL to the reference"),
        ("entropy", "sample entropy (nats/token)"),
    )
    for ax, (key, title) in zip(axes, panels):
        ax.bar(range(len(names)), [results[n]["after"][key] or 0 for n in names], color="tab:blue")
        if before.get(key) is not None:
            ax.axhline(before[key], color="k", ls="--", lw=1, label="start")
            ax.legend()
        ax.set_title(title)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    for n in names:
        h = results[n]["history"]
        if "constraint_share" in h[0]:
            axes[4].plot([x["step"] for x in h], [x["constraint_share"] for x in h], marker="o", ms=3, label=n)
    axes[4].set_yscale("log")
    axes[4].set_title("constraint share of the margin term")
    axes[4].set_xlabel("optimizer step")
    axes[4].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=48, help="training pairs")
    p.add_argument("--eval-pairs", type=int, default=16, help="held-out pairs")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--max-length", type=int, default=96, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--k", type=int, default=50, help="features in the constraint")
    p.add_argument(
        "--target-share",
        type=float,
        default=0.1,
        help="the matched alpha makes the constraint term this share of the margin term at step 1",
    )
    p.add_argument("--entropy-samples", type=int, default=4, help="held-out prompts sampled for the entropy")
    p.add_argument("--work-dir", default="runs/ablation", help="caches and runs (models are deleted after evaluation)")
    p.add_argument("--out", default=None, help="write ablation.{json,md,png} here")
    args = p.parse_args(argv)
    before, results, matched = run(args)
    rows = table(before, results)
    notes = (
        f"{args.pairs} training and {args.eval_pairs} held-out UltraFeedback pairs, {args.steps} steps of "
        f"{args.batch_size} pairs, lr {args.lr}, max_length {args.max_length}, k {args.k}; matched alpha "
        f"{matched:.4g} (constraint {args.target_share:.0%} of the margin term over the second half of the alpha "
        "0.5 run). share_late: mean |constraint term| / mean |beta x margin| over the second half of training "
        "(the policy starts at the reference, where the constraint is 0). A CPU-sized run shows whether the "
        "constraint moves D and the KL at all; it cannot show alignment quality."
    )
    write_results("ablation", rows, environment(), args.out, notes)
    if args.out:
        with open(os.path.join(args.out, "ablation_runs.json"), "w") as f:
            json.dump({"args": vars(args), "matched_alpha": matched, "before": before, "runs": results}, f, indent=1)
        plot(results, before, os.path.join(args.out, "ablation.png"))
    return rows, results


if __name__ == "__main__":
    main()
