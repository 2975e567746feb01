"""The `fpo` command: precompute, train, eval, features, bench, demo."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from .config import METHODS, EvalConfig, FeaturesConfig, PrecomputeConfig, TrainConfig


def _add_config_flags(p, config_class, config_file=False):
    """One flag per key of a config dataclass (TrainConfig, PrecomputeConfig, EvalConfig), with its help text,
    its choices and its default, all read from the class: the command restates none of them. Flags not given
    are None, so the config's own defaults (or a --config file's values) apply. config_file: a --config file
    may give the required keys, so the config, not argparse, asks for them."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        kinds = typing.get_args(hint) or (hint,)
        base = next((t for t in kinds if t not in (type(None), list)), str)
        text = f.metadata.get("help", "")
        if f.default not in ("", None) and "default" not in text:
            text += f" (default {f.default})"
        low, high, open_low = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("low_open")
        if low is not None or high is not None:  # the range the config checks, as it checks it
            left = "(" if open_low else "["
            text += f"; range {left}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        required = bool(f.metadata.get("required")) and not config_file
        if base is bool:
            p.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=text)
        else:
            choices = f.metadata.get("choices")
            p.add_argument(
                flag,
                dest=f.name,
                type=base,
                default=None,
                help=text,
                required=required,
                action="append" if list in kinds else "store",  # repeatable: several SAEs
                choices=list(choices) if choices else None,
                metavar=None if choices else f.name.upper(),
            )
    _add_renamed_flags(p, config_class)


class _RenamedFlag(argparse.Action):
    """A flag of an earlier release (fpo.config.RENAMED_KEYS): stored under the key's name now, with a warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"fpo: warning: {option_string} is now {new}; the old name will stop working", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_renamed_flags(p, config_class):
    """The renamed keys' old flags, hidden from --help, for a config class that has the key."""
    from .config import RENAMED_KEYS

    names = {f.name: f for f in dataclasses.fields(config_class)}
    for old, new in RENAMED_KEYS.items():
        if new in names:
            hint = typing.get_type_hints(config_class)[new]
            p.add_argument(
                "--" + old.replace("_", "-"),
                dest=new,
                type=hint,
                default=None,
                action=_RenamedFlag,
                help=argparse.SUPPRESS,
            )


def _given(args, config_class) -> dict:
    """The flags given for a config class's keys; a repeatable flag given once is its plain value."""
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if getattr(args, f.name) is not None
    }
    return {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in given.items()}


def _load_train_config(args):
    from .config import load_config

    # a repeatable flag given once is the plain value (the config a run saves then matches a YAML's)
    return load_config(args.config, **_given(args, TrainConfig))


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
        print(
            "usage: fpo bench {" + ",".join(BENCHMARKS) + "} [args]\n\nbenchmarks (CPU sizes without a GPU; "
            "`fpo bench NAME --help` lists each one's flags):\n" + "\n".join(lines)
        )
        if not argv or argv[0] not in ("-h", "--help"):  # a usage error, as argparse reports one
            print(
                "fpo bench: error: " + (f"unknown benchmark {argv[0]!r}" if argv else "name a benchmark"),
                file=sys.stderr,
            )
            sys.exit(2)
        return 0
    # the benchmarks are not installed with the package: they run from the source checkout, as `python -m`
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "__init__.py")):
        print(
            f"fpo bench: error: the benchmarks live in the source checkout (benchmarks/ beside fpo/), not in this "
            f"install ({root}): run `fpo bench` from an editable install of a clone (scripts/setup.sh), or "
            f"`python -m {BENCHMARKS[argv[0]][0]}` in one",
            file=sys.stderr,
        )
        sys.exit(2)
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
    launcher = (
        "import runpy, sys; sys.argv[0] = sys.argv.pop(1); "  # the usage line names `fpo bench NAME`
        "runpy.run_module(sys.argv.pop(1), run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", launcher, f"fpo bench {argv[0]}", BENCHMARKS[argv[0]][0], *argv[1:]], env=env
    ).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fpo", description="FPO and its baselines on fused Triton kernels")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("precompute", help="run the reference model once and write the reference cache")
    _add_config_flags(p, PrecomputeConfig)

    p = sub.add_parser("train", help="train with fpo, dpo, simpo, tdpo1 or tdpo2")
    p.add_argument("--config", default=None, help="YAML (or JSON) file of TrainConfig keys; flags override it")
    _add_config_flags(p, TrainConfig, config_file=True)

    p = sub.add_parser("eval", help="held-out accuracy, KL to the reference, FPO constraint, sample entropy")
    _add_config_flags(p, EvalConfig)
    p.add_argument("--json", default=None, help="also write the metrics here")

    p = sub.add_parser(
        "features", help="which SAE features alignment moved: per-feature drift, with the contexts that fire them"
    )
    _add_config_flags(p, FeaturesConfig)

    sub.add_parser("bench", help="benchmarks: " + " | ".join(BENCHMARKS) + " (`fpo bench --help`)", add_help=False)

    p = sub.add_parser(
        "demo", help="SmolLM2-135M + its SAE + UltraFeedback: FPO vs SimPO vs TDPO2, end to end", formatter_class=_Help
    )
    p.add_argument(
        "--methods",
        default="fpo,simpo,tdpo2",
        help=f"comma-separated, from {','.join(METHODS)},fpo-paper (fpo: its alpha adapted to hold the constraint "
        "at 10%% of the margin term; fpo-paper: the paper's alpha 0.5)",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: 10 on cpu, 60 on cuda)")
    p.add_argument("--pairs", type=int, default=None, help="training pairs (default: 20 on cpu, 1000 on cuda)")
    p.add_argument("--eval-pairs", type=int, default=None, help="held-out pairs (default: 12 on cpu, 200 on cuda)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (default: 2 on cpu, 16 on cuda)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default: 96 on cpu, 512 on cuda)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 2e-5 on cpu, 1e-6 on cuda)")
    p.add_argument(
        "--entropy-samples",
        type=int,
        default=None,
        help="held-out prompts sampled for the entropy column (default: 2 on cpu, 32 on cuda)",
    )
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--output-dir", default="runs/demo", help="where the table, plot and metrics go")
    p.add_argument(
        "--keep-models",
        action="store_true",
        help="keep each method's final model (about 540 MB each); by default only metrics and the plot stay",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# What `pip install 'fpo-kernels[train]'` brings (import names): a command that needs one says so in a sentence.
TRAIN_EXTRA = ("transformers", "datasets", "sae_lens", "gguf", "tqdm", "yaml", "matplotlib", "optimi")


# what each `fpo eval` column needs, said under the table when it is blank
EVAL_BLANKS = {
    "accuracy_reward": "pass --cache (a cache of these pairs from `fpo precompute`)",
    "kl": "pass --reference-model",
    "d": "pass --sae and a --cache built with it",
    "d_over_scale": "pass --sae and a --cache built with it",
    "entropy": "pass --entropy-samples N",
}

# flags earlier versions took, and what replaced them: named in the error instead of argparse's bare refusal
REMOVED_FLAGS = {"--dtype": "--precision", "--K": "--cache-k (fpo precompute) or --k (fpo train, fpo eval)"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    for arg in argv:
        old = arg.split("=", 1)[0]
        if old in REMOVED_FLAGS:
            sys.exit(f"fpo: error: {old} was removed; use {REMOVED_FLAGS[old]}")
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C: what was written is whole (every writer is atomic); no traceback
        sys.stderr.write(
            f"\nfpo {args.cmd}: interrupted; files written so far are complete, the rest was not started\n"
        )
        sys.exit(130)
    except (ValueError, RuntimeError, FloatingPointError) as e:
        sys.exit(f"fpo {args.cmd}: error: {e}")
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in TRAIN_EXTRA:
            raise
        sys.exit(
            f"fpo {args.cmd}: error: this command needs the train extra ({e.name} is not installed): "
            "pip install 'fpo-kernels[train]'"
        )


def _run(args):
    if args.cmd == "precompute":
        from .precompute import precompute

        given = _given(args, PrecomputeConfig)
        precompute(given.pop("model"), given.pop("dataset"), given.pop("out"), **given)
    elif args.cmd == "train":
        from .train import train

        train(_load_train_config(args))
    elif args.cmd == "eval":
        from .evaluate import evaluate
        from .tables import format_table

        given = _given(args, EvalConfig)
        if args.json and os.path.isdir(args.json):  # checked before the evaluation, not after it
            raise ValueError(f"--json {args.json} is a folder: name a file")
        res = evaluate(given.pop("model"), given.pop("dataset"), **given)
        # significant digits: FPO's D is often 1e-6 on a policy that has barely moved, and must not print as 0
        print(format_table([res], [(k, k, ".4g" if isinstance(v, float) else "") for k, v in res.items()]))
        for key, why in EVAL_BLANKS.items():  # a blank column says what it needs
            if key in res and res[key] is None:
                print(f"{key}: blank; {why}")
        if args.json:
            from .files import atomic_write_json

            folder = os.path.dirname(os.path.abspath(args.json))
            os.makedirs(folder, exist_ok=True)
            atomic_write_json(args.json, res)
    elif args.cmd == "features":
        from .features import feature_report

        given = _given(args, FeaturesConfig)
        if ({"protect", "protect_weight"} & set(given)) and not (given.get("weights_out") or given.get("protect_out")):
            raise ValueError(
                "--protect and --protect-weight say what --weights-out or --protect-out writes: pass one of them"
            )
        feature_report(given.pop("model"), given.pop("reference"), given.pop("dataset"), **given)
    elif args.cmd == "demo":
        from .demo import DEMO_METHODS, demo

        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in methods if m not in DEMO_METHODS]
        if bad:
            raise ValueError(f"--methods: unknown {bad}; choose from {DEMO_METHODS}")
        demo(
            methods,
            steps=args.steps,
            train_pairs=args.pairs,
            eval_pairs=args.eval_pairs,
            device=args.device,
            output_dir=args.output_dir,
            lr=args.lr,
            max_length=args.max_length,
            batch_size=args.batch_size,
            entropy_samples=args.entropy_samples,
            progress=not args.no_progress,
            keep_models=args.keep_models,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
