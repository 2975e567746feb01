"""The `fpo` command: precompute, train, eval, bench, demo."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from .config import ATTENTION, METHODS, REPLACED_KEYS, TrainConfig
from .packing import LAYOUTS, POOLINGS
from .precision import PRECISIONS

SPLIT_HELP = ("the split of a saved DatasetDict or of a folder of one file per split (default: train, or the only "
              "split; several and none named train is an error that lists them)")
POOLING_HELP = ("the rows the SAE features are pooled over: each response's own tokens, a mean (response); or as "
                "the authors' code does, the rows predicting them divided by the pair's padded length less one "
                "(authors: --packing off or pack)")
FROZEN_PRECISION_HELP = ("the forward's precision policy, as `fpo train --precision` names it (auto: bf16-mixed on "
                         "cuda, fp32 on cpu); the model is frozen, so its weights are bf16 under any bf16 policy")

def _add_train_flags(p):
    """One flag per TrainConfig key, with its help text, its choices and its default."""
    hints = typing.get_type_hints(TrainConfig)
    for key in REPLACED_KEYS:   # accepted by the parser only to be refused with the sentence that names the successor
        p.add_argument("--" + key.replace("_", "-"), dest="replaced_" + key, default=None, help=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        kinds = typing.get_args(hint) or (hint,)
        base = next((t for t in kinds if t not in (type(None), list)), str)
        text = f.metadata.get("help", "")
        if f.default not in ("", None) and "default" not in text:
            text += f" (default {f.default})"
        if base is bool:
            p.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=text)
        else:
            choices = f.metadata.get("choices")
            p.add_argument(flag, dest=f.name, type=base, default=None, help=text,
                           action="append" if list in kinds else "store",   # repeatable: several SAEs
                           choices=list(choices) if choices else None, metavar=None if choices else f.name.upper())


def _load_train_config(args):
    from .config import load_config
    for key in REPLACED_KEYS:
        if getattr(args, "replaced_" + key, None) is not None:
            raise ValueError(f"--{key.replace('_', '-')}: {REPLACED_KEYS[key]}")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    # a repeatable flag given once is the plain value (the config a run saves then matches a YAML's)
    overrides = {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in overrides.items()}
    return load_config(args.config, **overrides)


BENCHMARKS = {
    "sae": ("benchmarks.bench_sae_constraint", "the fused SAE constraint against the naive path"),
    "logprobs": ("benchmarks.bench_logprobs", "fused log-probs and KL against full logits"),
    "step": ("benchmarks.bench_step", "one training step per method: FPO, TDPO, SimPO, DPO"),
    "packing": ("benchmarks.bench_packing", "tokens and time per layout: padded, packed, shared prompt"),
    "peers": ("benchmarks.bench_peers", "fpo train against TRL's DPOTrainer and CPOTrainer (SimPO), step by step"),
}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows every default (except absent ones)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or action.required:
            return action.help
        return super()._get_help_string(action)


def _bench(argv):
    """`fpo bench WHICH [args]`: the benchmark's own flags (`fpo bench WHICH --help`)."""
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        lines = [f"  {name:9s} {text}" for name, (_, text) in BENCHMARKS.items()]
        print("usage: fpo bench {" + ",".join(BENCHMARKS) + "} [args]\n\nbenchmarks (CPU sizes without a GPU; "
              "`fpo bench NAME --help` lists each one's flags):\n" + "\n".join(lines))
        if not argv or argv[0] not in ("-h", "--help"):   # a usage error, as argparse reports one
            print("fpo bench: error: " + (f"unknown benchmark {argv[0]!r}" if argv else "name a benchmark"),
                  file=sys.stderr)
            sys.exit(2)
        return 0
    # the benchmarks are not installed with the package: they run from the source checkout, as `python -m`
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "__init__.py")):
        print(f"fpo bench: error: the benchmarks live in the source checkout (benchmarks/ beside fpo/), not in this "
              f"install ({root}): run `fpo bench` from an editable install of a clone (scripts/setup.sh), or "
              f"`python -m {BENCHMARKS[argv[0]][0]}` in one", file=sys.stderr)
        sys.exit(2)
    import subprocess
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
    launcher = ("import runpy, sys; sys.argv[0] = sys.argv.pop(1); "   # the usage line names `fpo bench NAME`
                "runpy.run_module(sys.argv.pop(1), run_name='__main__')")
    return subprocess.run([sys.executable, "-c", launcher, f"fpo bench {argv[0]}", BENCHMARKS[argv[0]][0], *argv[1:]],
                          env=env).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fpo", description="FPO and its baselines on fused Triton kernels")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("precompute", help="run the reference model once and write the reference cache",
                       formatter_class=_Help)
    p.add_argument("--model", required=True, help="the reference: local folder, .gguf file, or hub name when online")
    p.add_argument("--dataset", required=True, help="local .json/.jsonl/.parquet file or saved dataset")
    p.add_argument("--split", default=None, help=SPLIT_HELP)
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--sae", action="append", default=None,
                   help="sae-lens or sparsify dir, .safetensors, params.npz or release:id; repeat for several SAEs, "
                        "cached under their own names (omit for log-probs only)")
    p.add_argument("--sae-layer", type=int, action="append", default=None,
                   help="decoder block each SAE reads, in --sae order (default: from the SAE)")
    p.add_argument("--K", type=int, default=256, help="top-K pooled features cached per response")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence (prompt + response)")
    p.add_argument("--max-prompt-length", type=int, default=256,
                   help="longer prompts keep their last tokens; responses are cut to fit max-length")
    p.add_argument("--value-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="storage of the cached feature values (see the fidelity table in the README)")
    p.add_argument("--batch-pairs", type=int, default=4, help="pairs per forward")
    p.add_argument("--packing", choices=list(LAYOUTS), default="share-prompt",
                   help="micro-batch layout (the cache does not depend on it beyond rounding)")
    p.add_argument("--pooling", choices=list(POOLINGS), default="response", help=POOLING_HELP)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="token budget per forward instead of --batch-pairs; caps each sequence at max-tokens/2 "
                        "as `fpo train --max-tokens` does")
    p.add_argument("--attn-implementation", choices=list(ATTENTION), default=None,
                   help="attention (default: flex_attention for packed layouts on cuda, else the model's own)")
    p.add_argument("--max-pairs", type=int, default=None, help="only the first pairs of the dataset")
    p.add_argument("--shard-rows", type=int, default=256, help="pairs per cache shard (the unit of resume)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto", help=FROZEN_PRECISION_HELP)
    p.add_argument("--bad-rows", choices=["error", "skip"], default="error",
                   help="a row with a missing column or an empty response: stop (error) or skip it and report")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("train", help="train with fpo, dpo, simpo, tdpo1 or tdpo2")
    p.add_argument("--config", default=None, help="YAML (or JSON) file of TrainConfig keys; flags override it")
    _add_train_flags(p)

    p = sub.add_parser("eval", help="held-out accuracy, KL to the reference, FPO constraint, sample entropy",
                       formatter_class=_Help)
    p.add_argument("--model", required=True, help="the trained policy (e.g. OUT/final)")
    p.add_argument("--dataset", required=True, help="held-out pairs: local .json/.jsonl/.parquet or saved dataset")
    p.add_argument("--split", default=None, help=SPLIT_HELP)
    p.add_argument("--cache", default=None, help="reference cache of the held-out pairs (reward accuracy, D)")
    p.add_argument("--sae", action="append", default=None,
                   help="the SAE, for the FPO constraint D; repeat for several (d = sum of weight x d_sae, as in training)")
    p.add_argument("--sae-layer", type=int, action="append", default=None,
                   help="decoder block each SAE reads, in --sae order (default: from the SAE)")
    p.add_argument("--sae-weight", type=float, action="append", default=None,
                   help="each SAE's weight in d, in --sae order (default 1)")
    p.add_argument("--reference-model", default=None, help="the reference model, for the KL column")
    p.add_argument("--k", type=int, default=50, help="features in the constraint")
    p.add_argument("--select", choices=["policy", "reference"], default="policy", help="how the k features are chosen")
    p.add_argument("--pooling", choices=list(POOLINGS), default="response", help=POOLING_HELP)
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence (prompt + response)")
    p.add_argument("--max-prompt-length", type=int, default=256, help="prompt tokens kept (the last ones)")
    p.add_argument("--max-pairs", type=int, default=None, help="only the first pairs of the dataset")
    p.add_argument("--packing", choices=list(LAYOUTS), default="share-prompt", help="micro-batch layout")
    p.add_argument("--bad-rows", choices=["error", "skip"], default="error",
                   help="a row with a missing column or an empty response: stop (error) or skip it and report")
    p.add_argument("--entropy-samples", type=int, default=0, help="prompts to sample from, for the entropy column")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per sampled response")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto", help=FROZEN_PRECISION_HELP)
    p.add_argument("--json", default=None, help="also write the metrics here")

    sub.add_parser("bench", help="benchmarks: " + " | ".join(BENCHMARKS) + " (`fpo bench --help`)", add_help=False)

    p = sub.add_parser("demo", help="SmolLM2-135M + its SAE + UltraFeedback: FPO vs SimPO vs TDPO2, end to end",
                       formatter_class=_Help)
    p.add_argument("--methods", default="fpo,simpo,tdpo2",
                   help=f"comma-separated, from {','.join(METHODS)},fpo-paper (fpo: its constraint scaled to about 10%% "
                        "of the loss, chosen by a probe run; fpo-paper: the paper's alpha 0.5)")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: 10 on cpu, 60 on cuda)")
    p.add_argument("--pairs", type=int, default=None, help="training pairs (default: 20 on cpu, 1000 on cuda)")
    p.add_argument("--eval-pairs", type=int, default=None, help="held-out pairs (default: 12 on cpu, 200 on cuda)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (default: 2 on cpu, 16 on cuda)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default: 96 on cpu, 512 on cuda)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 2e-5 on cpu, 1e-6 on cuda)")
    p.add_argument("--entropy-samples", type=int, default=None,
                   help="held-out prompts sampled for the entropy column (default: 2 on cpu, 32 on cuda)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--output-dir", default="runs/demo", help="where the table, plot and metrics go")
    p.add_argument("--keep-models", action="store_true",
                   help="keep each method's final model (about 540 MB each); by default only metrics and the plot stay")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, RuntimeError, FloatingPointError) as e:
        sys.exit(f"fpo {args.cmd}: error: {e}")


def _run(args):
    if args.cmd == "precompute":
        from .precompute import precompute
        saes, layers = args.sae or [], args.sae_layer or [None] * len(args.sae or [])
        if len(layers) != len(saes):
            raise ValueError(f"--sae-layer given {len(layers)} times for {len(saes)} --sae: give it once per --sae")
        precompute(args.model, args.dataset, args.out, sae=saes or None, sae_layer=layers, K=args.K,
                   max_length=args.max_length, max_prompt_length=args.max_prompt_length, batch_pairs=args.batch_pairs,
                   max_pairs=args.max_pairs, shard_rows=args.shard_rows, device=args.device, bad_rows=args.bad_rows,
                   overwrite=args.overwrite, value_dtype=args.value_dtype, packing=args.packing,
                   max_tokens=args.max_tokens, attn_implementation=args.attn_implementation,
                   precision=args.precision, progress=not args.no_progress, split=args.split, pooling=args.pooling)
    elif args.cmd == "train":
        from .train import train
        train(_load_train_config(args))
    elif args.cmd == "eval":
        from .evaluate import evaluate
        from .tables import format_table
        res = evaluate(args.model, args.dataset, cache=args.cache, sae=args.sae, sae_layer=args.sae_layer,
                       sae_weight=args.sae_weight,
                       reference_model=args.reference_model, k=args.k, select=args.select, max_length=args.max_length,
                       max_prompt_length=args.max_prompt_length, max_pairs=args.max_pairs,
                       entropy_samples=args.entropy_samples, max_new_tokens=args.max_new_tokens, device=args.device,
                       packing=args.packing, bad_rows=args.bad_rows, precision=args.precision, split=args.split,
                       pooling=args.pooling)
        print(format_table([res], [(k, k, ".4f" if isinstance(v, float) else "") for k, v in res.items()]))
        if args.json:
            from .files import atomic_write_json
            folder = os.path.dirname(os.path.abspath(args.json))
            os.makedirs(folder, exist_ok=True)
            atomic_write_json(args.json, res)
    elif args.cmd == "demo":
        from .demo import DEMO_METHODS, demo
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in methods if m not in DEMO_METHODS]
        if bad:
            raise ValueError(f"--methods: unknown {bad}; choose from {DEMO_METHODS}")
        demo(methods, steps=args.steps, train_pairs=args.pairs, eval_pairs=args.eval_pairs, device=args.device,
             output_dir=args.output_dir, lr=args.lr, max_length=args.max_length, batch_size=args.batch_size,
             entropy_samples=args.entropy_samples, progress=not args.no_progress, keep_models=args.keep_models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
