"""LoRA against full fine-tuning: peak live tensor bytes of real training steps (weights, frozen reference,
gradients, optimizer states, activations), FPO and TDPO2, on the demo model by default.

Every tensor the steps allocate, and every tensor the trainer holds before them (policy, TDPO's reference model,
SAE, cache rows), is counted by benchmarks.estimate_step.StepTracer (live storage bytes, views once), so the
rows compare equal work: the same pairs, layout and steps, in the same process. On a CPU the fused ops take their
plain-PyTorch path (which holds a chunk of logits the GPU kernels do not); that part is the same in every row.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from fpo import assets
from fpo.config import config_from_dict
from fpo.precompute import precompute
from fpo.train import Trainer

from .common import environment
from .step_tracer import StepTracer

GB = 2**30


def _held(trainer) -> list[torch.Tensor]:
    """Every tensor the trainer holds before the first step."""
    held = list(trainer.model.parameters()) + list(trainer.model.buffers())
    if trainer.ref_model is not None:
        held += list(trainer.ref_model.parameters()) + list(trainer.ref_model.buffers())
    for spec in trainer.saes:
        held += [t for t in vars(spec.sae).values() if isinstance(t, torch.Tensor)]
    return held


def measure(cfg: dict, steps: int) -> dict:
    trainer = Trainer(config_from_dict(cfg), log=lambda *a, **k: None)
    try:
        tracer = StepTracer()
        tracer.hold(_held(trainer))
        weights = tracer.now
        with tracer:
            for s in range(steps):
                metrics, _ = trainer.train_step(s)
        trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        ref = (
            0
            if trainer.ref_model is None
            else sum(
                t.numel() * t.element_size()
                for t in list(trainer.ref_model.parameters()) + list(trainer.ref_model.buffers())
            )
        )
        return {
            "peak_gib": tracer.peak / GB,
            "held_before_gib": weights / GB,
            "trained_params": trained,
            "second_model": trainer.ref_model is not None,
            "reference_model_gib": ref / GB,
            "loss": float(metrics["loss"]),
        }
    finally:
        trainer.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a local model folder (default: the demo model)")
    p.add_argument("--sae", default=assets.DEMO_SAE)
    p.add_argument("--dataset", default=assets.TRAIN_PAIRS)
    p.add_argument("--methods", default="fpo,tdpo2")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument(
        "--precision", default="auto", help="as `fpo train --precision` (auto: bf16-mixed on cuda, fp32 on cpu)"
    )
    p.add_argument("--pairs", type=int, default=2, help="pairs per step (one micro-batch)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=None, help="write JSON here")
    args = p.parse_args(argv)
    model = args.model or assets.ensure_demo_model()
    lengths = dict(max_length=args.max_length, max_prompt_length=args.max_length // 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        methods = args.methods.split(",")
        if "fpo" in methods:
            precompute(
                model,
                args.dataset,
                cache,
                sae=args.sae,
                cache_k=64,
                max_pairs=args.pairs * args.steps,
                progress=False,
                precision=args.precision,
                **lengths,
            )
        for method in methods:
            for lora in (None, args.lora_r):
                cfg = dict(
                    method=method,
                    model=model,
                    dataset=args.dataset,
                    max_pairs=args.pairs * args.steps,
                    cache=cache if method == "fpo" else None,
                    sae=args.sae if method == "fpo" else None,
                    batch_size=args.pairs,
                    micro_batch_size=args.pairs,
                    warmup_steps=0,
                    lr=1e-5,
                    precision=args.precision,
                    lora_r=lora,
                    progress=False,
                    overwrite=True,
                    output_dir=os.path.join(tmp, "run"),
                    **lengths,
                )
                r = measure(cfg, args.steps)
                rows.append({"method": method, "lora_r": lora, **r})
                print(
                    f"{method:6s} {'LoRA r=' + str(lora) if lora else 'full':10s} peak {r['peak_gib']:.3f} GiB "
                    f"(held before the steps {r['held_before_gib']:.3f}; {r['trained_params'] / 1e6:.2f}M trained"
                    f"{'; a second model for the reference' if r['second_model'] else ''})",
                    flush=True,
                )
    print("\nLoRA / full fine-tuning, peak live bytes:")
    for method in methods:
        full, lora = (next(r for r in rows if r["method"] == method and bool(r["lora_r"]) == bool(x)) for x in (0, 1))
        print(
            f"  {method}: {lora['peak_gib']:.3f} / {full['peak_gib']:.3f} GiB = "
            f"{lora['peak_gib'] / full['peak_gib']:.2f}"
            + (
                f" (LoRA loads no reference model; full fine-tuning's is {full['reference_model_gib']:.3f} GiB)"
                if full["second_model"]
                else ""
            )
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": environment(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
