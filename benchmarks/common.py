"""Shared benchmark helpers: environment record, timing, peak memory, result files."""

from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import time

import torch

CPU_NOTE = " CPU: 'fused' is the plain-PyTorch fallback (no GPU): a smoke run of the harness, not a measurement."


def environment() -> dict:
    import triton

    env = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        env["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__)
            ).stdout.strip()
            or None
        )
    except OSError:
        env["git_commit"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            env["driver"] = None
    else:
        env["device"] = "cpu"
        env["driver"] = None
    return env


def timing(fn, warmup=3, rep=15) -> tuple[float, float]:
    """(median ms, spread): triton.testing.do_bench on CUDA, wall clock on the CPU; spread = (80th - 20th
    percentile) / median, so a ratio between two rows is worth quoting only when both spreads are small."""
    if torch.cuda.is_available():
        import triton

        p20, p50, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
        return p50, (p80 - p20) / p50
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=10)
    med = statistics.median(times)
    return med, (q[7] - q[1]) / med


def bench(fn, warmup=3, rep=15) -> float:
    """Median milliseconds (timing's first value)."""
    return timing(fn, warmup, rep)[0]


def peak_extra_mb(fn) -> float | None:
    """Peak memory allocated during fn beyond what was allocated before it (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def write_results(
    name: str,
    rows: list[dict],
    env: dict,
    out_dir: str | None,
    notes: str = "",
    columns=None,
    extra: dict | None = None,
    echo: bool = True,
):
    """rows -> stdout table (unless not echo), and <out_dir>/<name>.json (with extra's keys) + .md when out_dir
    is given."""
    from fpo.files import atomic_write_json, atomic_write_text
    from fpo.tables import format_table

    def fmt(key):
        return ".3g" if any(isinstance(r.get(key), float) for r in rows) else ""

    cols = columns or [(k, k, fmt(k)) for k in rows[0]]
    table = format_table(rows, cols)
    header = (
        f"{name}: {env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env.get('git_commit')}, "
        f"{env['date']}"
    )
    if echo:
        print(header)
        print(table)
        if notes:
            print(notes)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_json(
            os.path.join(out_dir, f"{name}.json"), {"environment": env, "rows": rows, "notes": notes, **(extra or {})}
        )
        atomic_write_text(
            os.path.join(out_dir, f"{name}.md"), f"# {name}\n\n{header}\n\n```\n{table}\n```\n\n{notes}\n"
        )
    return table


def subset_jsonl(src, dst, n):
    """The first n lines of a .jsonl file of pairs, written to dst."""
    with open(src) as f, open(dst, "w") as g:
        g.writelines(line for i, line in enumerate(f) if i < n)


def evidence_settings(settings: dict, args) -> tuple[str, dict, dict]:
    """An evidence script's (device, settings, lengths): the device's row of `settings` ("cpu" or "cuda") with the
    flags the user gave over it, and the sequence lengths every run and cache takes (the prompt half the length)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = dict(settings["cuda" if device.startswith("cuda") else "cpu"])
    s.update({k: v for k, v in vars(args).items() if k in s and v is not None})
    return device, s, dict(max_length=s["max_length"], max_prompt_length=s["max_length"] // 2)


def evidence_run(model, dataset, settings: dict, device, warmup: int, lengths: dict) -> dict:
    """The `fpo train` keys every evidence run shares: the settings' pairs, steps of batch_size pairs (micro-batches
    of at most 2), lr and warmup, one metric line a step, no optimizer state kept, epochs without limit (the steps
    decide)."""
    return dict(
        model=model,
        dataset=dataset,
        max_pairs=settings["pairs"],
        batch_size=settings["batch_size"],
        micro_batch_size=min(2, settings["batch_size"]),
        max_steps=settings["steps"],
        epochs=1000,
        lr=settings["lr"],
        warmup_steps=warmup,
        log_every=1,
        progress=False,
        device=device,
        save_optimizer=False,
        overwrite=True,
        **lengths,
    )


def train_in_process(name, cfg: dict, work: str, env=None) -> tuple[str, list[dict]]:
    """`fpo train` on cfg in a process of its own (a clean start from the same weights, its own peak memory), in
    work/name: (that folder, its metric records)."""
    import json
    import sys

    out = os.path.join(work, name)
    path = out + ".json"
    with open(path, "w") as f:
        json.dump(dict(cfg, output_dir=out), f)
    subprocess.run([sys.executable, "-m", "fpo.cli", "train", "--config", path], check=True, env=env)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return out, [json.loads(line) for line in f]
