"""Packed micro-batches against padded ones: tokens through the model body per epoch, and measured training time.

Part 1 (tokens, no model run): over a dataset (default the shipped UltraFeedback sample), tokenised with the
demo model's tokenizer, the tokens one epoch sends through the model body in each layout (fpo.packing:
off = padded [2P, T], pack = [prompt, chosen] and [prompt, rejected] segments, share-prompt = [prompt,
chosen, rejected] with the prompt once; packed layouts as one stream, as FlexAttention runs them, or in
the rows the dense masks of sdpa and eager get for the demo model, fpo.packing._place), at several pairs per
micro-batch and max lengths (max_prompt_length = max_length / 2), and with a matching token budget
(max_tokens = P x max_length, pairs packed per optimizer step of 32). The figure to quote: tokens relative
to off. FLOPs of the body's linear layers and bytes of its activations scale with tokens; attention adds a
term in sum over rows of L^2.

Part 2 (time): FPO training steps on the demo model (SmolLM2-135M, fp32, sdpa attention: packed layouts
in rows) for each layout, each in its own process (its peak RSS is its own), on the same pairs from the same
start; the first step is a warm-up and is not timed. On a CPU the time per step follows the work through the
body, so the ratios against off are meaningful there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from benchmarks.common import environment, write_results
from fpo import assets
from fpo.packing import LAYOUTS, micro_batch_tokens, plan_micro_batches
from fpo.pairs import load_pairs, tokenize_pairs

STEP_PAIRS = 32  # pairs per optimizer step when planning by token budget


def epoch_tokens(items, layout, pairs_per_mb=None, max_tokens=None, seed=0, attention_scale=None):
    """Tokens through the body over one epoch (shuffled as the trainer does), and the micro-batch count."""
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    order = [items[i] for i in perm]
    if max_tokens is None:
        mbs = [order[i : i + pairs_per_mb] for i in range(0, len(order), pairs_per_mb)]
    else:
        mbs = [
            mb
            for s in range(0, len(order), STEP_PAIRS)
            for mb in plan_micro_batches(order[s : s + STEP_PAIRS], layout, max_tokens, attention_scale)
        ]
    return sum(micro_batch_tokens(mb, layout, attention_scale) for mb in mbs), len(mbs)


def token_table(dataset, tok, max_lengths, pairs_per_mb, attention_scale):
    pairs = load_pairs(dataset, bad_rows="skip", log=lambda *a: None)
    rows = []
    for L in max_lengths:
        items = tokenize_pairs(pairs, tok, L, L // 2)
        real = sum(len(it.prompt_ids) + len(it.chosen_ids) + len(it.rejected_ids) for it in items)
        for P in pairs_per_mb:
            off, _ = epoch_tokens(items, "off", P)
            variants = [("off", None, None)] + [
                (lay, None, sc) for lay in LAYOUTS[1:] for sc in (None, attention_scale)
            ]
            for layout, budget, scale in variants + [("share-prompt", P * L, None)]:
                tokens, n_mb = epoch_tokens(items, layout, P, budget, attention_scale=scale)
                name = layout + ("" if layout == "off" else " stream" if scale is None else " rows")
                rows.append(
                    {
                        "max_length": L,
                        "pairs_per_mb": P,
                        "layout": name + (f" max_tokens={budget}" if budget else ""),
                        "tokens": tokens,
                        "micro_batches": n_mb,
                        "vs_off": tokens / off,
                        "distinct_share": real / tokens,
                    }
                )
    return rows, len(pairs)


def _train_once(layout, model_dir, sae, dataset, cache, max_length, pairs_per_mb, steps, out, max_tokens=None):
    cfg = dict(
        method="fpo",
        model=model_dir,
        dataset=dataset,
        cache=cache,
        sae=sae,
        max_length=max_length,
        max_prompt_length=max_length // 2,
        batch_size=pairs_per_mb,
        micro_batch_size=pairs_per_mb,
        max_tokens=max_tokens,
        packing=layout,
        max_steps=steps,
        lr=1e-6,
        warmup_steps=0,
        log_every=1,
        output_dir=out,
        progress=False,
        device="cpu",
        max_pairs=pairs_per_mb * steps,
    )
    path = out + ".json"
    with open(path, "w") as f:
        json.dump({k: v for k, v in cfg.items() if v is not None}, f)
    subprocess.run(
        [sys.executable, "-m", "fpo.cli", "train", "--config", path],
        check=True,
        env=dict(os.environ, TRITON_INTERPRET="0"),
        stdout=subprocess.DEVNULL,
    )
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def time_table(dataset, max_length, pairs_per_mb, steps, work, model_dir=None, sae=None):
    """FPO steps per layout (the demo model and SAE unless given): mean step time (first step excluded), time per
    pair, peak RSS."""
    from fpo.precompute import precompute

    model_dir = model_dir or assets.ensure_demo_model()
    sae = sae or assets.DEMO_SAE
    n = pairs_per_mb * steps
    cache = os.path.join(work, "cache")
    precompute(
        model_dir,
        dataset,
        cache,
        sae=sae,
        max_length=max_length,
        max_prompt_length=max_length // 2,
        max_pairs=n,
        micro_batch_size=pairs_per_mb,
        device="cpu",
        overwrite=True,
        progress=False,
        log=lambda *a: None,
    )
    rows = []
    for layout, budget in [(lay, None) for lay in LAYOUTS] + [("share-prompt", pairs_per_mb * max_length)]:
        name = layout + (f" max_tokens={budget}" if budget else "")
        hist = _train_once(
            layout,
            model_dir,
            sae,
            dataset,
            cache,
            max_length,
            pairs_per_mb,
            steps,
            os.path.join(work, name.replace(" ", "_").replace("=", "")),
            budget,
        )
        timed = hist[1:] or hist
        step_s = statistics.mean(h["step_time_s"] for h in timed)
        rows.append(
            {
                "layout": name,
                "steps_timed": len(timed),
                "step_s": step_s,
                "s_per_pair": step_s / pairs_per_mb,
                "tokens_per_step": statistics.mean(h["tokens_processed"] for h in timed),
                "peak_rss_mb": max(h["peak_memory_mb"] for h in hist),
                "final_loss": hist[-1]["loss"],
            }
        )
    base = rows[0]
    for r in rows:
        r["time_vs_off"] = r["s_per_pair"] / base["s_per_pair"]
        r["memory_vs_off"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default=assets.TRAIN_PAIRS, help="local .jsonl/.json/.parquet of preference pairs")
    p.add_argument("--max-lengths", default="1024,2048")
    p.add_argument("--pairs-per-mb", default="1,2,4,8")
    p.add_argument("--time-steps", type=int, default=4, help="FPO steps per layout in part 2 (0: skip part 2)")
    p.add_argument("--time-max-length", type=int, default=1024)
    p.add_argument("--time-pairs-per-mb", type=int, default=2)
    p.add_argument("--model", default=None, help="the model part 2 trains (a local folder; default: the demo model)")
    p.add_argument("--sae", default=None, help="the SAE part 2 constrains with (default: the demo SAE)")
    p.add_argument("--out", default=None, help="write JSON and markdown here")
    args = p.parse_args(argv)
    from fpo.model import attention_length_scale, load_model, load_tokenizer

    tok = load_tokenizer(assets.ensure_demo_model())
    scale = attention_length_scale(load_model(assets.ensure_demo_model(), attn_implementation="sdpa"))
    env = environment()
    lengths = [int(x) for x in args.max_lengths.split(",")]
    sizes = [int(x) for x in args.pairs_per_mb.split(",")]
    rows, n = token_table(args.dataset, tok, lengths, sizes, scale)
    notes = (
        f"{n} pairs from {os.path.basename(args.dataset)}, demo tokenizer, max_prompt_length = max_length / 2; "
        "tokens through the model body per epoch, padding included; vs_off: against the padded layout at the "
        "same pairs per micro-batch; distinct_share: the pairs' own tokens (each prompt once) over tokens processed."
    )
    write_results("bench_packing_tokens", rows, env, args.out, notes)
    time_rows = []
    if args.time_steps > 0:
        with tempfile.TemporaryDirectory() as work:
            time_rows = time_table(
                args.dataset, args.time_max_length, args.time_pairs_per_mb, args.time_steps, work, args.model, args.sae
            )
        write_results(
            "bench_packing_time",
            time_rows,
            env,
            args.out,
            f"FPO on {args.model or assets.MODEL_NAME}, fp32, {args.time_pairs_per_mb} pairs per step and micro-batch, "
            f"max_length {args.time_max_length}, {args.time_steps} steps per layout (the first not timed); "
            "peak_rss_mb: each run's own process; time_vs_off, memory_vs_off: against the padded layout.",
        )
    return rows, time_rows


if __name__ == "__main__":
    main()
