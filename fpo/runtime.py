"""What every command sets up first, one way and in one order: the process group and the device, the precision
policy, the tokenizer and model, the tokenised pairs, the SAEs. `fpo train`, `fpo precompute` and `fpo eval`
start here, so a flag such as --device or --max-tokens means the same in each."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import distributed as dist_utils
from ._types import Model, Tokenizer
from .config import CommandConfig
from .model import load_model_for_layout, load_tokenizer, resolve_device
from .pairs import TokenizedPair, load_pairs, tokenize_pairs
from .precision import Precision, resolve_precision
from .sae import SAESpec, load_saes

__all__ = ["Runtime", "start", "load_model", "load_items", "load_config_saes"]


def _silent(*args, **kwargs):
    pass


@dataclass(frozen=True)
class Runtime:
    """Where a command runs: its rank among world processes, its device and precision policy, and its log (the
    caller's on rank 0, silent on the others)."""

    rank: int
    world: int
    device: torch.device
    precision: Precision
    log: Callable[..., None]


def start(cfg: CommandConfig, log: Callable[..., None] = print, distributed: bool = True) -> Runtime:
    """The process group (under torchrun, when distributed), then the device: --device when given (cuda under
    torchrun is the rank's own GPU), else the rank's GPU, else cuda when available, else cpu; then the
    precision policy on it."""
    rank, world, dist_dev = dist_utils.init() if distributed else (0, 1, None)
    device = resolve_device(cfg.device) if cfg.device else (dist_dev or resolve_device())
    if dist_dev is not None and device.type == "cuda":
        device = dist_dev
    return Runtime(rank, world, device, resolve_precision(cfg.precision, device), log if rank == 0 else _silent)


def load_model(
    spec: str | Model,
    cfg: CommandConfig,
    rt: Runtime,
    dtype: torch.dtype,
    tokenizer: Tokenizer | None = None,
    attn_implementation: str | None = None,
) -> tuple[Model, Tokenizer]:
    """(model, tokenizer): a model named by a path or hub name, loaded in dtype on the run's device with the
    attention the layout needs (attn_implementation, else --attn-implementation, else the layout's default),
    with its tokenizer unless one is given; or a model already loaded, whose tokenizer must be given."""
    if isinstance(spec, (str, os.PathLike)):
        tokenizer = tokenizer or load_tokenizer(os.fspath(spec))
        model = load_model_for_layout(
            os.fspath(spec), dtype, rt.device, cfg.packing, attn_implementation or cfg.attn_implementation, rt.log
        )
        return model, tokenizer
    if tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer (tokenizer=...)")
    return spec, tokenizer


def load_items(cfg: CommandConfig, tokenizer: Tokenizer, rt: Runtime) -> list[TokenizedPair]:
    """The dataset's pairs (--split, --max-pairs, --bad-rows), tokenised and cut to --max-length,
    --max-prompt-length and --max-tokens as every command cuts them (a cache's rows then match the run's)."""
    pairs = load_pairs(cfg.dataset, cfg.max_pairs, cfg.bad_rows, log=rt.log, split=cfg.split)
    assert cfg.max_prompt_length is not None  # CommandConfig sets it from max_length
    return tokenize_pairs(pairs, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.max_tokens, log=rt.log)


def load_config_saes(cfg: CommandConfig, rt: Runtime) -> list[SAESpec]:
    """The SAEs of --sae (paths, release:id or SAEWeights), each with its --sae-layer and --sae-weight, on the
    run's device."""
    return load_saes(
        [(x if not isinstance(x, os.PathLike) else os.fspath(x), layer, w) for x, layer, w in cfg.sae_specs],
        rt.device,
    )
