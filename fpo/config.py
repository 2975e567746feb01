"""Training configuration: a frozen dataclass, validated on creation, loaded from YAML and/or overrides.
Unknown keys are errors; values are type-checked and range-checked (every key carries its help text, its
choices or its range: the CLI shows them)."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
import warnings
from dataclasses import dataclass, field, fields

from .packing import LAYOUTS, POOLINGS
from .precision import OPTIMIZERS, PRECISIONS, SAVE_DTYPES
from .trackers import TRACKERS, tracker_names

if typing.TYPE_CHECKING:
    from fpo_kernels.losses import LossSettings

__all__ = [
    "CommandConfig",
    "ScoringConfig",
    "TrainConfig",
    "PrecomputeConfig",
    "EvalConfig",
    "FeaturesConfig",
    "load_config",
    "METHODS",
    "ATTENTION",
    "RESUMABLE_CHANGES",
    "config_from_dict",
    "renamed_keys",
]

METHODS = ("fpo", "dpo", "simpo", "tdpo1", "tdpo2")
ATTENTION = ("sdpa", "eager", "flex_attention")
_DEFAULT_BETA = {"fpo": 0.1, "dpo": 0.1, "simpo": 2.0, "tdpo1": 0.1, "tdpo2": 0.1}


def _key(default, help, choices=None, low=None, low_open=False, high=None, required=False):
    """A config key: its default, its help text (shown by `fpo <command> --help`), its allowed values or range;
    required: a flag the command cannot run without."""
    return field(
        default=default,
        metadata=dict(help=help, choices=choices, low=low, low_open=low_open, high=high, required=required),
    )


_POOLING = (
    "the rows the SAE features are pooled over: each response's own tokens, a mean (response); or as the "
    "authors' code does, the rows predicting them divided by the pair's padded length less one (authors: "
    "packing off or pack; a cache and the runs that read it must agree)"
)
_BAD_ROWS = "a row with a missing column or an empty response: stop (error) or skip it and report"


@dataclass(frozen=True)
class CommandConfig:
    """The keys every command shares (train, precompute, eval): the model, the pairs and how they are cut and
    laid out, the SAEs, the device and precision. Each key is declared once, here, with its help text."""

    model: str = _key(
        "",
        "the model (train: the policy; precompute: the reference; eval: the trained policy, e.g. OUT/final): a "
        "local folder, a .gguf file, or a hub name when online",
        required=True,
    )
    dataset: str = _key(
        "",
        "preference pairs: a local .json/.jsonl/.parquet file, a saved dataset, or a folder of one such file per split",
        required=True,
    )
    split: str | None = _key(
        None,
        "the split of a saved DatasetDict or of a folder of one file per split (default: train, or the only "
        "split; several and none named train is an error that lists them)",
    )
    sae: str | list | None = _key(
        None,
        "sae-lens or sparsify folder, safetensors file, Gemma Scope params.npz, or release:id; repeat --sae for "
        "several SAEs",
    )
    sae_layer: int | list | None = _key(
        None, "decoder block each SAE reads, in --sae order (default: from the SAE, else the cache)", low=0
    )
    pooling: str = _key("response", _POOLING, POOLINGS)
    max_length: int = _key(512, "tokens per sequence (prompt + response)", low=2)
    max_prompt_length: int | None = _key(
        None,
        "prompt tokens kept (the last ones); responses are cut to fit max_length (default: half of max_length)",
        low=1,
    )
    max_pairs: int | None = _key(None, "use only the first pairs of the dataset", low=1)
    max_tokens: int | None = _key(
        None,
        "token budget per forward instead of a number of pairs: whole pairs packed up to it; also caps each "
        "sequence at max_tokens / 2 (a cache and the runs that read it must agree)",
        low=1,
    )
    micro_batch_size: int = _key(4, "pairs per forward (unless --max-tokens is set)", low=1)
    packing: str = _key(
        "share-prompt",
        "micro-batch layout: padded (off), [prompt, response] segments (pack), or [prompt, chosen, rejected] "
        "with the prompt once (share-prompt)",
        LAYOUTS,
    )
    attn_implementation: str | None = _key(
        None, "attention: default flex_attention for packed layouts on cuda, else the model's own", ATTENTION
    )
    bad_rows: str = _key("error", _BAD_ROWS, ("error", "skip"))
    device: str | None = _key(None, "default: cuda when available (under torchrun, the rank's), else cpu")
    precision: str = _key(
        "auto",
        "the forward's precision policy, as `fpo train --precision` names it (auto: bf16-mixed on cuda, fp32 on "
        "cpu); the model is frozen, so its weights are bf16 under any bf16 policy",
        PRECISIONS,
    )

    def __post_init__(self):
        if self.max_prompt_length is None and isinstance(self.max_length, int):  # follows --max-length
            object.__setattr__(self, "max_prompt_length", max(1, self.max_length // 2))
        _check_values(self)
        for f in fields(self):
            if f.metadata.get("required") and getattr(self, f.name) in ("", None):
                raise ValueError(f"{f.name} is required: {f.metadata['help']}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length}): pass "
                f"--max-prompt-length {self.max_length // 2} or less (left out, it is half of --max-length)"
            )
        if self.max_tokens is not None and self.max_tokens // 2 <= self.max_prompt_length:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must exceed 2 x max_prompt_length "
                f"({2 * self.max_prompt_length}): every pair must fit one micro-batch with room for its responses"
            )
        if self.pooling == "authors" and self.packing == "share-prompt":
            raise ValueError(
                "pooling 'authors' needs --packing off or pack: with the prompt shared, the rows that "
                "predict the rejected response are not contiguous"
            )

    @property
    def sae_specs(self) -> list:
        """[(spec, layer or None, weight)] for every SAE, in --sae order."""
        return sae_specs(self.sae, self.sae_layer, getattr(self, "sae_weight", None))


@dataclass(frozen=True)
class ScoringConfig(CommandConfig):
    """The keys train and eval share beyond CommandConfig's: the reference side and the FPO constraint."""

    cache: str | None = _key(
        None,
        "reference cache of these pairs from `fpo precompute` (train: required for fpo and dpo; eval: reward "
        "accuracy and D)",
    )
    reference_model: str | None = _key(
        None, "a reference model run online: TDPO's (default: --model), and eval's KL column"
    )
    sae_weight: float | list | None = _key(None, "each SAE's weight in D, in --sae order (default 1)", low=0)
    k: int = _key(50, "fpo: SAE features in the constraint", low=1)
    select: str = _key(
        "policy", "fpo: the k features: policy's top-k, or the cached reference's first k", ("policy", "reference")
    )
    protect: str | None = _key(
        None,
        "a protect file (JSON: the SAE's fingerprint and the features to hold, each with a weight and a direction; "
        "`fpo features --protect-out` writes one): train holds them near the reference with a term of their own, "
        "for any method, against the exact reference values `fpo precompute --protect` added to the cache; eval "
        "reports their held-out drift",
    )


@dataclass(frozen=True)
class TrainConfig(ScoringConfig):
    """`fpo train`'s settings: the command's flags and a --config file's keys."""

    method: str = _key("fpo", "training method", METHODS)
    precision: str = _key(
        "auto",
        "fp32; bf16-mixed (fp32 weights, gradients and Adam states, forward under bf16 "
        "autocast); bf16-compensated (bf16 weights and states, Kahan-summed updates: less memory, "
        "no update lost); bf16-pure (bf16 weights under plain Adam: small updates round away); "
        "auto: bf16-mixed on cuda, fp32 on cpu",
        PRECISIONS,
    )
    # loss
    beta: float | None = _key(None, "loss temperature (default by method: 0.1; simpo 2.0)", low=0, low_open=True)
    alpha: float = _key(0.5, "fpo / tdpo2: weight of the constraint (D for fpo, KL for tdpo2)", low=0)
    gamma: float = _key(0.5, "simpo: target margin, absolute (the official code's gamma_beta_ratio is gamma / beta)")
    feature_weights: str | None = _key(
        None,
        'fpo: a file of per-feature weights in D, JSON {id: weight} or {"sae": fingerprint, "weights": {...}}, '
        "or CSV feature,weight rows; unlisted features weigh 1 (`fpo features --weights-out` writes one)",
    )
    target_share: float | None = _key(
        None,
        "fpo / tdpo2: adapt alpha after every step so that the constraint term stays this share of the margin term "
        "(|constraint term| / |beta x margin|, running means) over the whole run, starting from --alpha; each step "
        "logs its alpha",
        low=0,
        low_open=True,
        high=100,
    )
    protect_coef: float = _key(
        1.0,
        "with --protect: lambda, the protection term's weight, L = L_method + lambda x mean over responses of R "
        "(R: each protected feature's change relative to its reference scale, through a loss whose slope is at "
        "most 1)",
        low=0,
    )
    protect_gate: str = _key(
        "restore",
        "with --protect: the off tokens (a protected feature below its threshold) through which the term may raise "
        "the feature: all of them (restore), those whose pre-activation is positive (near), or none, as JumpReLU "
        "(jumprelu)",
        ("restore", "near", "jumprelu"),
    )
    protect_form: str = _key(
        "pooled",
        "with --protect: what R compares with the reference's values: each response's pooled activations of the "
        "protected features (pooled), or their pre-activations on every response token, which have a gradient "
        "whether the feature fires or not (token; the cache holds them since `fpo precompute --protect` of 0.3)",
        ("pooled", "token"),
    )
    protect_share: float | None = _key(
        None,
        "with --protect: adapt lambda after every step so that the protection term stays this share of the margin "
        "term (|beta x margin|), starting from --protect-coef; the share, not lambda, is what carries across "
        "methods (FPO's beta of 0.1 makes its margin term 20x smaller than SimPO's)",
        low=0,
        low_open=True,
        high=100,
    )
    constraint_norm: str = _key(
        "none",
        "fpo: D as in the paper (none), or divided by the reference's mean squared "
        "top-k feature value recorded by `fpo precompute` (ref), so one alpha means the "
        "same across SAEs and models",
        ("none", "ref"),
    )
    # optimisation (paper defaults)
    lr: float = _key(5e-7, "learning rate", low=0, low_open=True)
    warmup_steps: int = _key(150, "linear warmup steps, then the schedule", low=0)
    lr_scheduler: str = _key(
        "constant",
        "after the warmup: constant (the paper's), or linear or cosine decay to 0 at "
        "the last step (transformers' schedules)",
        ("constant", "linear", "cosine"),
    )
    optimizer: str = _key(
        "adam",
        "optimizer: Adam (the paper's), AdamW (decoupled weight decay; the authors' code: "
        "betas 0.9, 0.95, weight decay 1e-4, clip 1.0) or RMSprop; fused on CUDA",
        OPTIMIZERS,
    )
    adam_beta1: float = _key(0.9, "adam / adamw: beta1", low=0, high=1)
    adam_beta2: float = _key(0.999, "adam / adamw: beta2", low=0, high=1)
    adam_eps: float = _key(1e-8, "adam / adamw / rmsprop: epsilon", low=0, low_open=True)
    weight_decay: float = _key(0.0, "weight decay (adam and rmsprop: L2; adamw: decoupled)", low=0)
    max_grad_norm: float | None = _key(10.0, "clip the gradient norm to this (none: no clipping)", low=0, low_open=True)
    batch_size: int = _key(32, "pairs per optimizer step, all ranks together", low=1)
    micro_batch_size: int = _key(2, "pairs per forward on one rank (unless --max-tokens is set)", low=1)
    epochs: int = _key(1, "passes over the dataset", low=1)
    max_steps: int | None = _key(
        None, "train this many optimizer steps, over as many epochs as they take (overrides --epochs, as in TRL)", low=1
    )
    # LoRA (peft): adapters on the policy's linear layers instead of full fine-tuning
    lora_r: int | None = _key(
        None,
        "LoRA rank: train adapters of this rank (peft) instead of every weight; the "
        "base weights stay frozen (bf16 under a bf16 policy); none: full fine-tuning",
        low=1,
    )
    lora_alpha: float | None = _key(
        None, "LoRA scaling numerator (adapter scale lora_alpha / lora_r; default 2 x lora_r)", low=0, low_open=True
    )
    lora_dropout: float = _key(0.0, "dropout on the LoRA adapters' input", low=0, high=1)
    lora_target_modules: str | list = _key(
        "all-linear",
        "modules that get adapters: all-linear (every linear "
        "layer of the decoder, not the lm head), or module names (repeatable: "
        "--lora-target-modules q_proj --lora-target-modules v_proj)",
    )
    merge_lora: bool = _key(
        False,
        "also save the adapters merged into the base weights (in fp32, or save_dtype) "
        "as OUTPUT_DIR/final-merged, a plain model",
    )
    # data
    # runtime
    gradient_checkpointing: bool = _key(False, "recompute each decoder layer in the backward")
    compile: bool = _key(
        False,
        "compile the model body region by region, as transformers and TRL compile for training: each decoder "
        "layer once (the layers share the compiled code, so compile time does not grow with depth); the fused "
        "lm head and SAE ops stay as they are; the first step's time, compilation included, is reported apart",
    )
    body_kernels: str | None = _key(
        None,
        "fused kernels for the model body: liger (liger-kernel's RMSNorm, RoPE and SwiGLU / GeGLU for the model's "
        "architecture; never its fused linear cross-entropy, which fpo's lm head replaces)",
        ("liger",),
    )
    compile_backend: str = _key(
        "inductor", "torch.compile's backend for --compile (aot_eager: no code generation)", ("inductor", "aot_eager")
    )
    fsdp: bool = _key(False, "under torchrun: FSDP2 instead of DDP")
    seed: int = _key(0, "seed of the data order and the run")
    output_dir: str = _key("runs/fpo", "where metrics, checkpoints and the final model go")
    overwrite: bool = _key(False, "replace a finished or different run in output_dir")
    log_every: int = _key(10, "optimizer steps between metric lines", low=1)
    save_every: int = _key(0, "optimizer steps between checkpoints (0: only the final model)", low=0)
    save_optimizer: bool = _key(True, "store optimizer, scheduler and RNG beside the final model (resumable)")
    save_dtype: str = _key(
        "auto",
        "dtype of the final model's weights: auto keeps the trained weights' own (float32 "
        "under bf16-mixed); another makes the final model a copy that cannot be resumed",
        ("auto",) + tuple(SAVE_DTYPES),
    )
    resume: str | None = _key(None, "a checkpoint folder, or 'latest' in output_dir")
    progress: bool = _key(True, "progress bar (plain lines when stdout is not a terminal)")
    report_to: str | list = _key(
        "none",
        "experiment trackers that get every metric line and the config "
        "(repeatable); each works offline: tensorboard (OUTPUT_DIR/tensorboard), wandb "
        "(offline unless WANDB_MODE says otherwise), trackio (its local store), mlflow "
        "(MLFLOW_TRACKING_URI, else OUTPUT_DIR/mlflow.db)",
        TRACKERS,
    )
    run_name: str | None = _key(None, "the run's name in the trackers (default: output_dir's folder name)")

    def __post_init__(self):
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):  # types too: a config file's values are strings and numbers, never objects
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        super().__post_init__()
        if self.method in ("fpo", "dpo") and not self.cache:
            raise ValueError(
                f"method {self.method} needs a reference cache: build one with `fpo precompute` and pass cache="
            )
        if self.method == "fpo" and not self.sae:
            raise ValueError("method fpo needs an SAE (sae=...)")
        if self.target_share is not None and self.method not in ("fpo", "tdpo2"):
            raise ValueError(
                f"target_share adapts the constraint's alpha, which methods fpo and tdpo2 have; {self.method} has none"
            )
        if self.protect_share is not None and not self.protect:
            raise ValueError("protect_share adapts the protection term's lambda: pass --protect FILE too")
        if self.protect_gate != "restore" and not self.protect:
            raise ValueError(
                f"protect_gate {self.protect_gate!r} shapes the protection term's gradient: pass --protect FILE too"
            )
        if self.protect_form != "pooled" and not self.protect:
            raise ValueError(
                f"protect_form {self.protect_form!r} is the protection term's form: pass --protect FILE too"
            )
        if self.protect_form == "token" and self.protect_gate != "restore":
            raise ValueError(
                "protect_gate shapes the pooled form's gradient; the per-token form (protect_form 'token') compares "
                "pre-activations, which pass a gradient on every token: leave --protect-gate out"
            )
        if self.protect and not (self.cache and self.sae):
            raise ValueError(
                f"protect needs the SAE its features belong to (--sae) and a cache holding their reference values "
                f"(--cache, built or extended with `fpo precompute --protect {self.protect}`)"
            )
        sae_specs(self.sae, self.sae_layer, self.sae_weight)  # one layer and weight per SAE, or one for all
        tracker_names(self.report_to)  # none alone, or trackers
        if self.lora_r is None and (self.merge_lora or self.lora_alpha is not None):
            raise ValueError(
                f"{'merge_lora' if self.merge_lora else 'lora_alpha'} is set but lora_r is not: pass "
                "--lora-r to train LoRA adapters"
            )
        if self.lora_r is not None and self.save_dtype != "auto" and not self.merge_lora:
            raise ValueError(
                f"save_dtype {self.save_dtype} with LoRA applies to the merged model: pass --merge-lora "
                "(the adapters are saved in their trained dtype)"
            )

    @property
    def beta_value(self) -> float:
        return self.beta if self.beta is not None else _DEFAULT_BETA[self.method]

    @property
    def loss_settings(self) -> LossSettings:
        """The loss's settings (fpo_kernels.losses.LossSettings), made once per run from these keys."""
        from fpo_kernels.losses import LossSettings

        return LossSettings(self.method, self.beta_value, alpha=self.alpha, gamma=self.gamma)

    def replace(self, **kw) -> TrainConfig:
        return dataclasses.replace(self, **kw)

    @property
    def lora_alpha_value(self) -> float:
        if self.lora_alpha is not None:
            return self.lora_alpha
        if self.lora_r is None:
            raise ValueError("lora_alpha_value: the run trains no LoRA adapters (lora_r is not set)")
        return 2.0 * self.lora_r


def sae_specs(sae, sae_layer=None, sae_weight=None) -> list:
    """[(spec, layer or None, weight)] from one SAE or a list of them; sae_layer and sae_weight give one value
    per SAE, or one for all (weight default 1)."""
    specs, layers, weights = _as_list(sae), _as_list(sae_layer) or [None], _as_list(sae_weight) or [1.0]
    for name, values in (("sae_layer", layers), ("sae_weight", weights)):
        if len(values) > 1 and len(values) != len(specs):
            raise ValueError(
                f"{name} gives {len(values)} values for {len(specs)} SAEs: give one per --sae, or one for all"
            )
    pick = lambda values, i: values[i] if len(values) > 1 else values[0]
    return [(spec, pick(layers, i), float(pick(weights, i))) for i, spec in enumerate(specs)]


def _as_list(value) -> list:
    return [] if value is None else (list(value) if isinstance(value, (list, tuple)) else [value])


# What may differ between a checkpoint's config and the run that resumes it; any other difference is an error.
RESUMABLE_CHANGES = (
    "max_steps",
    "epochs",
    "save_every",
    "log_every",
    "progress",
    "resume",
    "overwrite",
    "save_optimizer",
    "save_dtype",
    "device",
    "report_to",
    "run_name",
    "merge_lora",
    "compile",  # compiled and eager steps are equal within rounding (tests/training/test_compile.py)
    "compile_backend",
)


@dataclass(frozen=True)
class PrecomputeConfig(CommandConfig):
    """`fpo precompute`'s settings: the keyword arguments of fpo.precompute.precompute and the command's flags.
    model may also be a loaded model, sae SAEWeights (or a list of either), in Python."""

    out: str = _key("", "cache directory", required=True)
    cache_k: int | None = _key(
        None,
        "the reference's top pooled features cached per response (fpo train's --k may be at most this; default "
        "256, or the narrowest SAE's width when that is smaller)",
        low=1,
    )
    value_dtype: str = _key(
        "float16",
        "storage of the cached feature values (see the fidelity table in the README)",
        ("float16", "bfloat16", "float32"),
    )
    shard_rows: int = _key(256, "pairs per cache shard (the unit of resume)", low=1)
    protect: str | None = _key(
        None,
        "a protect file: also cache the reference's pooled value of each protected feature for every response, "
        "zeros included (what `fpo train --protect` compares against); an existing cache gains them without "
        "recomputing the rest",
    )
    overwrite: bool = _key(False, "replace a cache built with other settings")
    progress: bool = _key(True, "progress bar")


@dataclass(frozen=True)
class EvalConfig(ScoringConfig):
    """`fpo eval`'s settings: the keyword arguments of fpo.evaluate.evaluate and the command's flags. model and
    reference_model may also be loaded models in Python."""

    entropy_samples: int = _key(0, "prompts to sample from, for the entropy column", low=0)
    max_new_tokens: int = _key(64, "tokens per sampled response", low=1)
    seed: int = _key(0, "seed of the sampling")


@dataclass(frozen=True)
class FeaturesConfig(CommandConfig):
    """`fpo features`' settings: the keyword arguments of fpo.features.feature_report and the command's flags."""

    model: str | list = _key(  # type: ignore[assignment]  # a list: several runs side by side
        "",
        "a trained run's model (e.g. OUT/final: full weights or LoRA adapters, as `fpo eval` loads them); repeat "
        "--model for several runs side by side",
        required=True,
    )
    reference: str = _key("", "the model the runs started from", required=True)
    top: int = _key(20, "features listed per SAE: those that drifted most", low=1)
    rank_by: str | None = _key(None, "the run whose drift ranks the features (default: the largest over the runs)")
    contexts: int = _key(3, "held-out contexts shown per listed feature (where the reference activates it most)", low=0)
    rank_split: bool = _key(
        True,
        "rank the features on half of the pairs and report every number on the other half, so that the features "
        "listed are not those that happened to move most on the pairs they are judged on (off: all pairs for both)",
    )
    bootstrap: int = _key(1000, "bootstrap resamples of the judged responses for each change's 95% interval", low=0)
    seed: int = _key(0, "seed of the bootstrap")
    context_tokens: int = _key(4, "tokens each side of a context's token", low=0)
    json: str | None = _key(None, "write the report here (JSON)")
    png: str | None = _key(None, "write the picture here (PNG)")
    html: str | None = _key(
        None,
        "write the report as one self-contained page here: the table sortable, a card per feature with its contexts "
        "shaded by activation (reference and each run), its change per side with intervals",
    )
    progress: bool = _key(True, "progress bars")
    weights_out: str | None = _key(
        None,
        "also write a --feature-weights file for `fpo train` that protects the --protect features ranked first "
        "(of the first SAE) with weight --protect-weight",
    )
    protect: int = _key(10, "with --weights-out or --protect-out: how many of the top features", low=1)
    protect_out: str | None = _key(
        None,
        "also write a protect file for `fpo train --protect` holding the --protect features ranked first (of the "
        "first SAE); rank them on pairs other than those protection will be judged on",
    )
    protect_file: str | None = _key(
        None, "a protect file: report its features' summed drift per run, on chosen and on rejected responses"
    )
    protect_weight: float = _key(10.0, "with --weights-out: their weight in D (every other feature weighs 1)", low=0)

    @property
    def models(self) -> list:
        return self.model if isinstance(self.model, list) else [self.model]


def _check_values(config):
    """Choices and ranges of every key (types are the Python caller's: a loaded model, SAEWeights, ...)."""
    for f in fields(config):
        value = getattr(config, f.name)
        for v in value if isinstance(value, list) else [value]:
            _check_value(f, v)


def _check_value(f, value):
    """Finite numbers inside the key's range; strings among its choices."""
    m = f.metadata
    if value is None:
        return
    if isinstance(value, list):
        for v in value:
            _check_value(f, v)
        return
    if m.get("choices") is not None and value not in m["choices"]:
        raise ValueError(f"{f.name} must be one of {tuple(m['choices'])}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ValueError(f"{f.name} must be a finite number, got {value!r}")
    low, high = m.get("low"), m.get("high")
    if low is not None and (value <= low if m.get("low_open") else value < low):
        raise ValueError(f"{f.name} must be {'>' if m.get('low_open') else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{f.name} must be <= {high}, got {value!r}")


def _check_type(name, value, hint):
    args = typing.get_args(hint)
    allowed = args if args else (hint,)
    if isinstance(value, list) and list in allowed:  # a list of the key's scalar type (several SAEs)
        if not value:
            raise ValueError(f"config value {name} is an empty list")
        scalar = tuple(t for t in allowed if t not in (list, type(None)))
        for v in value:
            one = typing.Union[scalar] if len(scalar) > 1 else scalar[0]  # noqa: UP007 (built from a runtime tuple)
            _check_type(name, v, one)
        return
    if value is None:
        if type(None) in allowed:
            return
        raise ValueError(f"config value {name} is missing (None)")
    for t in allowed:
        if t is type(None):
            continue
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if t in (str, bool) and isinstance(value, t):
            return
    names = "/".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ValueError(f"config value {name} must be {names}, got {type(value).__name__} {value!r}")


RENAMED_KEYS = {"batch_pairs": "micro_batch_size"}  # 0.2 name -> its name now


def renamed_keys(options: dict) -> dict:
    """options with the keys of earlier releases under their names now (RENAMED_KEYS), each with a FutureWarning;
    both names given is an error."""
    out = dict(options)
    for old, new in RENAMED_KEYS.items():
        if old in out:
            if new in out:
                raise ValueError(f"{old} and {new} are one key (its name since 0.3 is {new}): give {new} only")
            warnings.warn(f"{old} is now called {new}; the old name will stop working", FutureWarning, stacklevel=3)
            out[new] = out.pop(old)
    return out


def config_from_dict(d: dict) -> TrainConfig:
    d = renamed_keys(d)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
    d = dict(d)
    for f in fields(TrainConfig):  # YAML writes 1e-6 as a string
        if (
            f.name in d
            and isinstance(d[f.name], str)
            and typing.get_type_hints(TrainConfig)[f.name] in (float, float | None)
        ):
            try:
                d[f.name] = float(d[f.name])
            except ValueError:
                pass
    return TrainConfig(**d)


MAX_CONFIG_BYTES = 1 << 20


def _load_yaml(text: str):
    """yaml.safe_load without anchors and aliases: a config needs neither, and a few hundred bytes of nested
    aliases expand to gigabytes (a "billion laughs")."""
    try:
        import yaml
    except ImportError:
        raise ValueError(
            "reading a YAML --config needs PyYAML, which is not installed: pip install 'fpo-kernels[train]' (or "
            "pyyaml), or pass the config as .json"
        ) from None

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.YAMLError("anchors and aliases (*name) are not read in a config")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliases)  # noqa: S506 (a SafeLoader)


def load_config(path: str | None = None, **overrides) -> TrainConfig:
    """A TrainConfig from a YAML (or .json) file of its keys, with the overrides that are not None on top: what
    `fpo train --config FILE --flag ...` runs. Only plain keys and values are read (yaml.safe_load)."""
    base = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_CONFIG_BYTES + 1)
        except OSError as e:
            raise ValueError(f"--config {path}: cannot be read ({e.strerror})") from None
        if len(data) > MAX_CONFIG_BYTES:
            raise ValueError(f"--config {path} is larger than {MAX_CONFIG_BYTES} bytes: a config holds keys and values")
        try:
            text = data.decode("utf-8-sig")
            if path.endswith(".json"):
                base = json.loads(text)
            else:
                base = _load_yaml(text) or {}
        except Exception as e:  # JSON / YAML syntax, or a YAML tag that safe_load refuses (e.g. !!python/object)
            if "needs PyYAML" in str(e):  # the package is missing, not the file wrong
                raise
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(
                f"--config {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'} "
                f"config ({first}); only plain keys and values are read"
            ) from None
        if not isinstance(base, dict):
            raise ValueError(
                f"--config {path} must hold a mapping of config keys to values, got a {type(base).__name__}"
            )
    return config_from_dict({**base, **{k: v for k, v in overrides.items() if v is not None}})
