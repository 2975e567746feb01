"""Training configuration: a frozen dataclass, validated on creation, loaded from YAML and/or overrides.
Unknown keys are errors; values are type-checked."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields

__all__ = ["TrainConfig", "load_config", "METHODS", "ATTENTION", "config_from_dict"]

from .packing import LAYOUTS

METHODS = ("fpo", "dpo", "simpo", "tdpo1", "tdpo2")
ATTENTION = ("sdpa", "eager", "flex_attention")
_DEFAULT_BETA = {"fpo": 0.1, "dpo": 0.1, "simpo": 2.0, "tdpo1": 0.1, "tdpo2": 0.1}


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    method: str = "fpo"                 # fpo | dpo | simpo | tdpo1 | tdpo2
    model: str = ""                     # local folder, .gguf file, or hub name when online
    dataset: str = ""                   # local .json/.jsonl/.parquet or a saved dataset
    cache: str | None = None            # reference cache from `fpo precompute` (fpo, dpo)
    reference_model: str | None = None  # tdpo: the online reference (default: model)
    sae: str | None = None              # fpo: sae-lens dir/file, params.npz, or release:id
    sae_layer: int | None = None        # decoder block the SAE reads (default: from the SAE / cache)
    # loss
    beta: float | None = None           # default 0.1 (2.0 for simpo)
    alpha: float = 0.5                  # fpo / tdpo2 constraint weight
    gamma: float = 0.5                  # simpo target margin (absolute; gamma_beta_ratio = gamma / beta)
    k: int = 50                         # fpo: features in the constraint
    select: str = "policy"              # fpo: policy | reference
    # optimisation (paper defaults)
    lr: float = 5e-7
    warmup_steps: int = 150
    optimizer: str = "adam"             # adam | rmsprop
    weight_decay: float = 0.0
    max_grad_norm: float | None = 10.0
    batch_size: int = 32                # pairs per optimizer step, all ranks together
    micro_batch_size: int = 2           # pairs per forward on one rank (unless max_tokens is set)
    max_tokens: int | None = None       # token budget per forward instead: pairs packed up to it
    packing: str = "share-prompt"       # off | pack | share-prompt (fpo.packing)
    epochs: int = 1
    max_steps: int | None = None
    # data
    max_length: int = 512
    max_prompt_length: int = 256
    max_pairs: int | None = None
    bad_rows: str = "error"             # error | skip
    # runtime
    device: str | None = None           # default cuda if available
    dtype: str | None = None            # default bfloat16 on cuda, float32 on cpu
    attn_implementation: str | None = None  # sdpa | eager | flex_attention; default: the model's own
    gradient_checkpointing: bool = False
    fsdp: bool = False                  # under torchrun: FSDP2 instead of DDP
    seed: int = 0
    output_dir: str = "runs/fpo"
    log_every: int = 10
    save_every: int = 0                 # 0: no intermediate checkpoints
    resume: str | None = None           # a checkpoint folder, or "latest" in output_dir
    progress: bool = True

    def __post_init__(self):
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.model:
            raise ValueError("model is required (a local folder, a .gguf file or a hub name)")
        if not self.dataset:
            raise ValueError("dataset is required (a local .json/.jsonl/.parquet file or a saved dataset)")
        if self.method in ("fpo", "dpo") and not self.cache:
            raise ValueError(f"method {self.method} needs a reference cache: build one with `fpo precompute` and pass cache=")
        if self.method == "fpo" and not self.sae:
            raise ValueError("method fpo needs an SAE (sae=...)")
        if self.select not in ("policy", "reference"):
            raise ValueError(f"select must be 'policy' or 'reference', got {self.select!r}")
        if self.optimizer not in ("adam", "rmsprop"):
            raise ValueError(f"optimizer must be 'adam' or 'rmsprop', got {self.optimizer!r}")
        if self.packing not in LAYOUTS:
            raise ValueError(f"packing must be one of {LAYOUTS}, got {self.packing!r}")
        if self.attn_implementation not in (None,) + ATTENTION:
            raise ValueError(f"attn_implementation must be one of {ATTENTION}, got {self.attn_implementation!r}")
        if self.max_tokens is not None and self.max_tokens // 2 <= self.max_prompt_length:
            raise ValueError(f"max_tokens ({self.max_tokens}) must exceed 2 x max_prompt_length "
                             f"({2 * self.max_prompt_length}): every pair must fit one micro-batch with room for its responses")
        if self.bad_rows not in ("error", "skip"):
            raise ValueError(f"bad_rows must be 'error' or 'skip', got {self.bad_rows!r}")
        for name in ("batch_size", "micro_batch_size", "epochs", "k", "max_length", "max_prompt_length", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def beta_value(self) -> float:
        return self.beta if self.beta is not None else _DEFAULT_BETA[self.method]

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


def _check_type(name, value, hint):
    args = typing.get_args(hint)
    allowed = args if args else (hint,)
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


def config_from_dict(d: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
    d = dict(d)
    for f in fields(TrainConfig):  # YAML writes 1e-6 as a string
        if f.name in d and isinstance(d[f.name], str) and typing.get_type_hints(TrainConfig)[f.name] in (float, float | None):
            try:
                d[f.name] = float(d[f.name])
            except ValueError:
                pass
    return TrainConfig(**d)


def load_config(path: str | None = None, **overrides) -> TrainConfig:
    d = {}
    if path:
        import yaml
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys to values")
    d.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(d)
