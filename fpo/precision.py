"""Precision policies: the dtype of the trained weights, gradients and optimizer states, and what the forward
runs in. One policy per run, for every method.

    fp32              float32 weights and compute (the CPU default).
    bf16-mixed        float32 weights, gradients and Adam states (16 bytes a parameter); the forward and the
                      fused ops under bf16 autocast. The CUDA default: what SimPO's official configs, HF
                      Trainer, DeepSpeed and FSDP mixed precision do.
    bf16-compensated  bf16 weights and gradients, bf16 Adam states and a bf16 Kahan compensation per weight
                      (torch-optimi): 10 bytes a parameter, and the updates that bf16 rounding would drop
                      are carried in the compensation until they add up to a representable step.
    bf16-pure         bf16 weights under plain Adam: an update below about 2^-8 of a weight rounds away (at
                      lr 5e-7 nearly all of them). Kept to compare with code that trains this way.

Frozen models (TDPO's reference, `fpo precompute`'s reference, `fpo eval`) keep no master copy: under any
bf16 policy their weights are bf16, and under bf16-mixed their forward runs under the same autocast.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from ._types import Device
from .distributed import local_shard

__all__ = [
    "PRECISIONS",
    "OPTIMIZERS",
    "Precision",
    "resolve_precision",
    "make_optimizer",
    "updates_round_away",
    "describe_precision",
    "SAVE_DTYPES",
]

PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16-compensated", "bf16-pure")
OPTIMIZERS = ("adam", "adamw", "rmsprop")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Static bytes per trained parameter: weights + gradients + optimizer states (+ compensation). Adam keeps two
# states; RMSprop one.
_STATE_BYTES = {"fp32": 4, "bf16-mixed": 4, "bf16-compensated": 2, "bf16-pure": 2}


@dataclass(frozen=True)
class Precision:
    name: str  # resolved: never "auto"
    param_dtype: torch.dtype  # trained weights, their gradients and the optimizer's states
    autocast_dtype: torch.dtype | None

    @property
    def frozen_dtype(self) -> torch.dtype:
        """Weights of a model that is never trained (a reference, an evaluated policy): no master copy needed."""
        return torch.float32 if self.name == "fp32" else torch.bfloat16

    def autocast(self, device: Device) -> AbstractContextManager:
        """The forward's context: bf16 autocast under bf16-mixed, nothing otherwise."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.autocast_dtype)

    def bytes_per_parameter(self, optimizer: str = "adam") -> int:
        """Weights + gradients + optimizer states (+ the Kahan compensation): the static memory of one
        trained parameter, before activations and autocast's bf16 weight copies."""
        states = 1 if optimizer == "rmsprop" else 2
        b = _STATE_BYTES[self.name]
        return b * (2 + states) + (2 if self.name == "bf16-compensated" else 0)


def resolve_precision(name: str, device: Device) -> Precision:
    """`auto` is bf16-mixed on CUDA and fp32 elsewhere."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    if name == "auto":
        name = "bf16-mixed" if torch.device(device).type == "cuda" else "fp32"
    if name == "fp32":
        return Precision(name, torch.float32, None)
    if name == "bf16-mixed":
        return Precision(name, torch.float32, torch.bfloat16)
    return Precision(name, torch.bfloat16, None)


def make_optimizer(
    params: Iterable[torch.Tensor],
    precision: Precision,
    optimizer: str,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    device: Device = "cpu",
) -> torch.optim.Optimizer:
    """The run's optimizer. adam: Adam (L2 weight decay, as torch's); adamw: AdamW (decoupled weight decay,
    scaled by lr as torch's); rmsprop: torch's RMSprop (alpha 0.99; betas unused).
    bf16-compensated takes torch-optimi's Adam /
    AdamW with Kahan summation; the others torch's, fused on CUDA and the CPU (foreach on other
    devices)."""
    params = list(params)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if precision.name == "bf16-compensated":
        if optimizer == "rmsprop":
            raise ValueError(
                "precision bf16-compensated has no RMSprop (torch-optimi's Kahan-summed optimizers are "
                "Adam and AdamW): use --optimizer adam or adamw, or --precision bf16-mixed"
            )
        try:
            import optimi
        except ImportError:
            raise ValueError(
                "precision bf16-compensated needs torch-optimi (pip install 'fpo-kernels[train]', or "
                "pip install torch-optimi)"
            ) from None
        cls = optimi.AdamW if optimizer == "adamw" else optimi.Adam
        # optimi's Triton step is CUDA-only; its foreach path runs anywhere
        return cls(
            params,
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            kahan_sum=True,
            triton=None if torch.device(device).type == "cuda" else False,
        )
    # torch's fused Adam: one kernel over all tensors, on the CPU too (7x the foreach step there: foreach is a
    # per-tensor loop on the CPU)
    impl = {"fused": True} if torch.device(device).type in ("cuda", "cpu") else {"foreach": True}
    if optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, eps=eps, weight_decay=weight_decay, foreach=True)
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=(betas[0], betas[1]), eps=eps, weight_decay=weight_decay, **impl)


def updates_round_away(
    params: Iterable[torch.Tensor], lr: float, dtype: torch.dtype = torch.bfloat16
) -> tuple[bool, float]:
    """(lr below the dtype's resolution of the median |weight|, that median): Adam moves a weight by about lr
    a step, and a bf16 weight w moves only by steps of about 2^-8 |w|, so below that most updates round
    away. The median comes from a strided sample of every parameter."""
    sample = []
    for p in params:
        flat = p.detach().reshape(-1)
        sample.append(flat[:: max(1, flat.numel() // 4096)].float().abs().cpu())
    if not sample:
        return False, 0.0
    median = torch.cat(sample).median().item()
    spacing = torch.finfo(dtype).eps  # between 1 and the next value: 2^-7 for bf16; half of it rounds away
    return lr < spacing / 2 * median, median


def describe_precision(
    prec: Precision, params: Sequence[torch.Tensor], optimizer: str, lr: float, trained: str = ""
) -> list[str]:
    """What the precision policy costs the trained parameters (under FSDP: this rank's shards), and under
    bf16-pure a warning when lr is below the bf16 resolution of the typical weight (most updates would round
    away). The lines a run logs once."""
    params = [local_shard(p) for p in params]
    n = sum(p.numel() for p in params)
    per = prec.bytes_per_parameter(optimizer)
    lines = [
        f"[fpo] precision {prec.name}: {str(prec.param_dtype).removeprefix('torch.')} weights, gradients and "
        f"optimizer states{' with a Kahan compensation' if prec.name == 'bf16-compensated' else ''}"
        f"{', forward under bf16 autocast' if prec.autocast_dtype else ''}: "
        f"{per} bytes x {n / 1e6:.{1 if n >= 1e6 else 3}f}M "
        f"{trained}parameters = {per * n / 2**30:.{2 if per * n >= 2**28 else 4}f} GiB before activations"
    ]
    if prec.name == "bf16-pure":
        low, median = updates_round_away(params, lr)
        if low:
            lines.append(
                f"[fpo] warning: precision bf16-pure at lr {lr:g}: a bf16 weight of the median size "
                f"{median:.3g} moves only in steps of about {median * 2**-8:.2g} (2^-8 of it), so most Adam "
                "updates round away and the policy barely trains; use --precision bf16-mixed (fp32 master "
                "weights) or bf16-compensated (bf16 weights with Kahan-summed updates)"
            )
    return lines
