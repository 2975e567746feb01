"""Against the peers as they run: TRL's DPOTrainer (sigmoid DPO, reference log-probs precomputed) and CPOTrainer
(SimPO), each with and without Liger's kernels and with its own torch_compile=True, next to `fpo train` (SimPO,
DPO, FPO; eager and with --compile) on the same pairs, model, max_length and pairs per step; and the fastest run
of each side against the other's.

Each run trains in its own process from the same weights, one micro-batch of P pairs per optimizer step, every
run taking the pairs in the file's order (TRL's sequential sampler; our trainer's micro-batches set to the same
slices), so step i holds the same pairs everywhere. Reported: time per pair (median over the steps after the
first, the fastest and slowest of them, and the timed steps' total), tokens
through the model body (positions, padding included, and the real tokens among them), and the peak memory of
the training steps (RSS on the CPU, its high-water mark reset once the run is set up; max allocated on CUDA).
What a run does before its first step (loading, TRL's reference pass, our reference cache) is not timed: each
method's reference side is offline in both. The tokenisation is each trainer's own (the same chat template,
prompt and lengths), so the token columns say how much work each run did.

Precision: fp32 on the CPU; on CUDA both sides keep fp32 weights and run the forward under bf16 autocast
(TRL's bf16=True on an fp32 model, our --precision bf16-mixed). Activation checkpointing is on in every run by
default, as TRL's trainers default to it (--gradient-checkpointing off turns it off in every run: never a
baseline that recomputes against a fast path that does not). Liger's kernels are Triton kernels: its rows
run only on CUDA. Optimizer: torch's fused AdamW, no weight decay, constant lr, for every run.

    python -m benchmarks.bench_peers                       # CPU: demo model, 10 shipped pairs, max_length 1024
    python -m benchmarks.bench_peers --model google/gemma-2-2b-it --pairs 64 --out benchmarks/results/h100
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

RUNS = {  # name: (peer, method, options)
    "trl-dpo": ("trl", "dpo", {}),
    "trl-dpo+liger": ("trl", "dpo", {"liger": True}),
    "trl-simpo": ("trl", "simpo", {}),
    "trl-simpo+liger": ("trl", "simpo", {"liger": True}),
    "fpo-simpo": ("fpo", "simpo", {"packing": "share-prompt"}),
    "fpo-simpo-padded": ("fpo", "simpo", {"packing": "off"}),
    "fpo-dpo": ("fpo", "dpo", {"packing": "share-prompt"}),
    "fpo-fpo": ("fpo", "fpo", {"packing": "share-prompt"}),
    # the body compiled, each side its own way: TRL's torch_compile=True (the whole model, through accelerate),
    # ours --compile (each decoder layer, the fused ops outside)
    "trl-dpo+compile": ("trl", "dpo", {"compile": True}),
    "trl-simpo+compile": ("trl", "simpo", {"compile": True}),
    "fpo-simpo+compile": ("fpo", "simpo", {"packing": "share-prompt", "compile": True}),
    "fpo-dpo+compile": ("fpo", "dpo", {"packing": "share-prompt", "compile": True}),
    "fpo-fpo+compile": ("fpo", "fpo", {"packing": "share-prompt", "compile": True}),
}
# what each of our rows is judged against (a +compile row: the same peer's +compile run)
BASELINE = {"simpo": "trl-simpo", "dpo": "trl-dpo", "fpo": "trl-simpo"}
TARGETS = {  # (our run, its peer, column, at most); time judged on the median step and on the timed total
    ("fpo-simpo", "trl-simpo", "s_per_pair"): 0.6,
    ("fpo-simpo", "trl-simpo", "timed_s"): 0.6,
    ("fpo-simpo", "trl-simpo", "peak_mb"): 0.8,
    ("fpo-fpo", "trl-simpo", "s_per_pair"): 0.65,
    ("fpo-fpo", "trl-simpo", "timed_s"): 0.65,
    ("fpo-simpo+compile", "trl-simpo+compile", "s_per_pair"): 0.6,
    ("fpo-fpo+compile", "trl-simpo+compile", "s_per_pair"): 0.65,
}
BETA = {"dpo": 0.1, "simpo": 2.0, "fpo": 0.1}
GAMMA = 0.5  # SimPO's target margin (absolute; TRL's simpo_gamma)
LR = 5e-7


# ---- measuring inside a worker -----------------------------------------------------------------------------
def _reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux)
        f.write("5")


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class BodyTokens:
    """Counts what enters the model body (the decoder, under the lm head): positions and real tokens."""

    def __init__(self, model):
        body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.positions = self.real = 0
        self.active = True
        self._h = body.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if not self.active or not torch.is_grad_enabled():  # training forwards only
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.positions += ids.numel()
        # summed on the device, read after the steps: no host sync inside a timed step
        self.real = self.real + (mask.sum() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else ids.numel())

    def remove(self):
        self._h.remove()
        self.real = int(self.real)


def _timed_steps(step_fn, n_steps, device):
    times = []
    for _ in range(n_steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return times


def _trl_rows(pairs):
    """The pairs as TRL's conversational preference rows: its chat template, as ours."""

    def msgs(p):
        return p.prompt if isinstance(p.prompt, list) else [{"role": "user", "content": p.prompt}]

    return [
        {
            "prompt": msgs(p),
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in pairs
    ]


def run_trl(spec, device):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from fpo.pairs import load_pairs

    method, liger, P = spec["method"], spec.get("liger", False), spec["pairs_per_step"]
    pairs = load_pairs(spec["dataset"], max_pairs=spec["pairs"], log=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).to(device)
    common = dict(
        output_dir=spec["tmp"],
        per_device_train_batch_size=P,
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch_fused",  # torch's fused AdamW, as ours: the same optimizer step on both sides
        weight_decay=0.0,
        max_grad_norm=10.0,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        use_liger_kernel=liger,
        torch_compile=spec.get("compile", False),
        torch_compile_backend=spec["compile_backend"] if spec.get("compile") else None,
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        max_length=spec["max_length"],
        remove_unused_columns=False,
        gradient_checkpointing=spec["gradient_checkpointing"],
        train_sampling_strategy="sequential",
    )  # the file's order: every run steps through the same pairs
    data = Dataset.from_list(_trl_rows(pairs))
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(beta=BETA["dpo"], loss_type=["sigmoid"], precompute_ref_log_probs=True, **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=BETA["simpo"], simpo_gamma=GAMMA, **common)
        trainer = CPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)

    counter = BodyTokens(trainer.model)
    times = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(StepClock())
    _reset_peak(device)
    trainer.train()
    peak = _peak_mb(device)
    counter.remove()
    return _result(times, counter, peak)


def _result(times, counter, peak):
    from torch._dynamo.utils import counters

    return {
        "times": times,
        "positions": counter.positions,
        "real_tokens": counter.real,
        "peak_mb": peak,
        "graphs": counters["stats"]["unique_graphs"],  # compiled graphs: 0 unless the run compiled
    }


def run_fpo(spec, device):
    from fpo.config import config_from_dict
    from fpo.train import Trainer

    method = spec["method"]
    cfg = config_from_dict(
        dict(
            method=method,
            model=spec["model"],
            dataset=spec["dataset"],
            max_pairs=spec["pairs"],
            cache=spec.get("cache"),
            sae=spec.get("sae") if method == "fpo" else None,
            beta=BETA[method],
            gamma=GAMMA,
            batch_size=spec["pairs_per_step"],
            micro_batch_size=spec["pairs_per_step"],
            max_steps=spec["steps"],
            epochs=1000,
            lr=LR,
            warmup_steps=0,
            optimizer="adamw",
            weight_decay=0.0,
            max_grad_norm=10.0,
            max_length=spec["max_length"],
            max_prompt_length=spec["max_prompt_length"],
            packing=spec["packing"],
            output_dir=spec["tmp"],
            overwrite=True,
            progress=False,
            save_optimizer=False,
            device=str(device),
            precision="bf16-mixed" if device.type == "cuda" else "fp32",
            seed=0,
            gradient_checkpointing=spec["gradient_checkpointing"],
            compile=spec.get("compile", False),
            compile_backend=spec["compile_backend"],
        )
    )
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    P = spec["pairs_per_step"]
    # the file's order, as TRL's sequential sampler takes it: every run steps through the same pairs
    trainer.micro_batches = lambda step, rank=None: [trainer.items[step * P : (step + 1) * P]]
    try:
        counter = BodyTokens(trainer.model)
        step = iter(range(cfg.max_steps))
        _reset_peak(device)
        times = _timed_steps(lambda: trainer.train_step(next(step)), cfg.max_steps, device)
        peak = _peak_mb(device)
        counter.remove()
    finally:
        trainer.close()
    return _result(times, counter, peak)


def worker(spec_json):
    spec = json.loads(spec_json)
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    out = (run_trl if spec["peer"] == "trl" else run_fpo)(spec, device)
    print("BENCH_PEERS_RESULT " + json.dumps(out), flush=True)


# ---- the parent: one process per run, one table ------------------------------------------------------------
def summarise(name, spec, res):
    P = spec["pairs_per_step"]
    timed = res["times"][1:] or res["times"]
    per_pair = [t / P for t in timed]
    return {
        "run": name,
        "steps": len(res["times"]),
        "s_per_pair": statistics.median(per_pair),
        "fastest": min(per_pair),
        "slowest": max(per_pair),
        "timed_s": sum(timed),
        "positions_per_pair": res["positions"] / (len(res["times"]) * P),
        "real_tokens_per_pair": res["real_tokens"] / (len(res["times"]) * P),
        "peak_mb": res["peak_mb"],
        "graphs": res["graphs"],
    }


def _launch(name, spec, log):
    peer, method, opts = RUNS[name]
    spec = dict(spec, peer=peer, method=method, **opts)
    with tempfile.TemporaryDirectory(prefix=f"bench-peers-{name}-") as tmp:
        spec["tmp"] = tmp
        t = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_peers", "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=dict(os.environ, TQDM_DISABLE="1"),
        )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_PEERS_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"run {name} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    row = summarise(name, spec, json.loads(lines[-1].split(" ", 1)[1]))
    log(
        f"[bench_peers] {name}: {row['s_per_pair']:.3f} s/pair, {row['positions_per_pair']:.0f} positions/pair, "
        f"peak {row['peak_mb']:.0f} MB ({time.time() - t:.0f} s)"
    )
    return row


def select_pairs(dataset, model, n, max_prompt_length, out_path):
    """The first n usable pairs whose prompt, under the chat template, fits max_prompt_length: TRL's trainers
    truncate the prompt differently (DPOTrainer keeps the start of prompt + response, CPOTrainer never cuts the
    prompt), so only on such pairs does every trainer cut the same thing, the end of the response. Written to
    out_path as JSON lines; returns how many rows were passed over."""
    from fpo.model import load_tokenizer
    from fpo.pairs import load_pairs, prompt_ids

    tok = load_tokenizer(model)
    rows = [json.loads(line) for line in open(dataset) if line.strip()]
    kept, passed = [], 0
    for pair in load_pairs(dataset, bad_rows="skip", log=lambda *a: None):
        if len(kept) == n:
            break
        if len(prompt_ids(tok, pair.prompt)) <= max_prompt_length:
            kept.append(rows[pair.id])
        else:
            passed += 1
    if len(kept) < n:
        raise ValueError(
            f"--dataset {dataset}: only {len(kept)} pairs have a prompt of at most {max_prompt_length} "
            f"tokens; --pairs asks for {n}"
        )
    with open(out_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    return passed


def _precompute(spec, cache, with_sae, log):
    cmd = [
        sys.executable,
        "-m",
        "fpo.cli",
        "precompute",
        "--model",
        spec["model"],
        "--dataset",
        spec["dataset"],
        "--out",
        cache,
        "--max-pairs",
        str(spec["pairs"]),
        "--max-length",
        str(spec["max_length"]),
        "--max-prompt-length",
        str(spec["max_prompt_length"]),
        "--device",
        spec["device"],
        "--no-progress",
    ]
    if with_sae:
        cmd += ["--sae", spec["sae"]]
    log(f"[bench_peers] reference cache ({'log-probs and SAE features' if with_sae else 'log-probs'}), not timed")
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _parser():
    from fpo import assets

    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="policy folder (default: the demo model, SmolLM2-135M-Instruct)")
    ap.add_argument("--sae", default=assets.DEMO_SAE, help="SAE for the fpo run (default: the shipped demo SAE)")
    ap.add_argument(
        "--dataset",
        default=assets.TRAIN_PAIRS,
        help="preference pairs, .jsonl (default: the shipped UltraFeedback sample)",
    )
    ap.add_argument("--pairs", type=int, default=10, help="pairs read from the dataset (default 10)")
    ap.add_argument(
        "--pairs-per-step", type=int, default=2, help="pairs per optimizer step, one micro-batch (default 2)"
    )
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-prompt-length", type=int, default=256)
    ap.add_argument(
        "--gradient-checkpointing",
        choices=("on", "off"),
        default="on",
        help="activation checkpointing in every run (default on: TRL's default; off: ours)",
    )
    ap.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the +compile runs, both sides (default inductor)",
    )
    ap.add_argument("--runs", default=None, help=f"comma-separated, from {','.join(RUNS)} (default: all that run here)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--out", default=None, help="folder for peers_<device>.json and .md")
    ap.add_argument(
        "--report",
        default=None,
        metavar="JSON",
        help="no run: print (and with --out write) a written result's table again from its rows",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap


def run_all(spec, runs, source, log):
    """Every run in its own process on the same pairs (and, for ours, one reference cache built first);
    returns (rows, pairs passed over for a long prompt)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-peers-cache-") as tmp:
        spec["dataset"] = os.path.join(tmp, "pairs.jsonl")
        passed = select_pairs(source, spec["model"], spec["pairs"], spec["max_prompt_length"], spec["dataset"])
        log(
            f"[bench_peers] {spec['pairs']} pairs, {passed} passed over for a prompt over "
            f"{spec['max_prompt_length']} tokens"
        )
        ours = [RUNS[r][1] for r in runs if RUNS[r][0] == "fpo"]
        if "dpo" in ours or "fpo" in ours:
            spec["cache"] = os.path.join(tmp, "cache")
            _precompute(spec, spec["cache"], "fpo" in ours, log)
        for name in runs:
            rows.append(_launch(name, spec, log))
    return rows, passed


def compare(rows):
    """Each of our rows' time and memory against its peer's (BASELINE), in place; the TARGETS, judged."""
    by = {r["run"]: r for r in rows}
    for r in rows:
        peer, method, opts = RUNS[r["run"]]
        base = by.get(BASELINE[method] + ("+compile" if opts.get("compile") else ""))
        if peer == "fpo" and base is not None:
            r.update(
                vs=base["run"],
                time_ratio=r["s_per_pair"] / base["s_per_pair"],
                total_ratio=r["timed_s"] / base["timed_s"],
                memory_ratio=r["peak_mb"] / base["peak_mb"],
            )
    checks = []
    for (ours, peer, col), limit in TARGETS.items():
        if ours in by and peer in by:
            ratio = by[ours][col] / by[peer][col]
            checks.append(
                {"ours": ours, "peer": peer, "column": col, "ratio": ratio, "target": limit, "met": ratio <= limit}
            )
    return checks


def best_of_each_side(rows):
    """For each of our methods: our fastest run (median s / pair) against the fastest TRL run of its peer method
    (BASELINE), whatever each switched on (Liger, compile): [{method, ours, peer, <column>_ratio}]."""
    fastest = {}
    for r in rows:
        peer, method, _ = RUNS[r["run"]]
        key = (peer, method)
        if key not in fastest or r["s_per_pair"] < fastest[key]["s_per_pair"]:
            fastest[key] = r
    out = []
    for method in ("simpo", "dpo", "fpo"):
        ours, theirs = fastest.get(("fpo", method)), fastest.get(("trl", RUNS[BASELINE[method]][1]))
        if ours and theirs:
            out.append(
                {"method": method, "ours": ours["run"], "peer": theirs["run"]}
                | {f"{c}_ratio": ours[c] / theirs[c] for c in ("s_per_pair", "timed_s", "peak_mb")}
            )
    return out


def main(argv=None):
    from benchmarks.common import environment
    from fpo import assets

    ap = _parser()
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.report:
        return rereport(args.report, args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    runs = args.runs.split(",") if args.runs else [r for r in RUNS if device == "cuda" or not RUNS[r][2].get("liger")]
    if [r for r in runs if r not in RUNS]:
        ap.error(f"--runs: unknown {[r for r in runs if r not in RUNS]}; choose from {list(RUNS)}")
    if device == "cpu" and any(RUNS[r][2].get("liger") for r in runs):
        ap.error("--runs: Liger's kernels are Triton kernels and need CUDA; the +liger runs take --device cuda")
    if args.pairs < args.pairs_per_step * 2:
        ap.error(f"--pairs ({args.pairs}) must give at least two steps of --pairs-per-step ({args.pairs_per_step})")
    if not args.dataset.endswith(".jsonl"):
        ap.error("--dataset: a .jsonl file of prompt / chosen / rejected rows")
    model = args.model or assets.ensure_demo_model(print)
    spec = dict(
        model=model,
        sae=args.sae,
        pairs=args.pairs,
        pairs_per_step=args.pairs_per_step,
        steps=args.pairs // args.pairs_per_step,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        device=device,
        gradient_checkpointing=args.gradient_checkpointing == "on",
        compile_backend=args.compile_backend,
    )
    rows, passed = run_all(spec, runs, args.dataset, print)
    return report(
        rows, dict(spec, dataset=args.dataset, cache=None), {**environment(), **_versions()}, passed, args.out
    )


def report(rows, settings, env, passed, out):
    """The table, the ratios and the targets, printed and (with out) written as peers_<device>[_no_ckpt].json/.md."""
    from benchmarks.common import write_results

    rows = [{k: v for k, v in r.items() if k not in ("vs", "time_ratio", "total_ratio", "memory_ratio")} for r in rows]
    checks = compare(rows)
    best = best_of_each_side(rows)
    device = settings["device"]
    mem = "peak MB (CUDA alloc)" if device == "cuda" else "peak MB (RSS)"
    columns = [
        ("run", "run", ""),
        ("s_per_pair", "s / pair", ".3f"),
        ("fastest", "fastest", ".3f"),
        ("slowest", "slowest", ".3f"),
        ("timed_s", "timed s", ".1f"),
        ("positions_per_pair", "positions / pair", ".0f"),
        ("real_tokens_per_pair", "real tokens / pair", ".0f"),
        ("peak_mb", mem, ".0f"),
        ("graphs", "graphs", ""),
        ("vs", "vs", ""),
        ("time_ratio", "median ratio", ".2f"),
        ("total_ratio", "total ratio", ".2f"),
        ("memory_ratio", "memory ratio", ".2f"),
    ]
    ckpt = "on" if settings["gradient_checkpointing"] else "off"
    notes = (
        f"{os.path.basename(settings['model'].rstrip('/'))}, the first {settings['pairs']} pairs of "
        f"{os.path.basename(settings['dataset'])} whose prompt fits (passed over: {passed}), "
        f"{settings['pairs_per_step']} pairs per step, max_length {settings['max_length']} (prompt "
        f"{settings['max_prompt_length']}), activation checkpointing {ckpt}, {device}. s / pair: the median step "
        "after the first, per pair; timed s: those steps' total (the same pairs in every run). +compile runs: "
        f"TRL's torch_compile=True against our --compile, backend {settings.get('compile_backend', 'inductor')}; "
        "their first step (compilation) is not timed, a recompilation for a new length later is. Targets: "
        + "; ".join(
            f"{c['ours']} / {c['peer']} {c['column']} {c['ratio']:.2f} (<= {c['target']}: "
            f"{'met' if c['met'] else 'missed'})"
            for c in checks
        )
        + "".join(
            f"\nbest of each side, {b['method']}: {b['ours']} against {b['peer']}: s / pair "
            f"{b['s_per_pair_ratio']:.2f}x, timed s {b['timed_s_ratio']:.2f}x, peak {b['peak_mb_ratio']:.2f}x"
            for b in best
        )
    )
    name = f"peers_{device}" + ("" if settings["gradient_checkpointing"] else "_no_ckpt")
    write_results(
        name,
        rows,
        env,
        out,
        notes=notes,
        columns=columns,
        extra={"settings": settings, "targets": checks, "best_of_each_side": best, "passed_over": passed},
    )
    return rows, checks


def rereport(path, out):
    """A written result's table again, from its measured rows (the comparisons and targets recomputed)."""
    with open(path) as f:
        doc = json.load(f)
    passed = doc.get("passed_over")
    if passed is None:  # written before the count had its own key
        import re

        passed = int(re.search(r"passed over: (\d+)", doc["notes"]).group(1))
    return report(doc["rows"], doc["settings"], doc["environment"], passed, out)


def _versions():
    out = {}
    for name in ("transformers", "trl", "liger_kernel", "datasets"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed: the runs that need it fail with their own message
            out[name] = None
    return out


if __name__ == "__main__":
    main()
