"""The table of every Triton kernel in the package: each op module's KERNELS (its kernels' signatures, tiles and
flags, written beside them), gathered here so that the dispatch layer below them knows no op."""

from __future__ import annotations

from . import kl, logprobs, sae_constraint
from ._dispatch import Kernel

__all__ = ["all_kernels", "pin_autotune"]


def all_kernels() -> list[Kernel]:
    """Every op module's KERNELS, in one list."""
    return [*sae_constraint.KERNELS, *logprobs.KERNELS, *kl.KERNELS]


def pin_autotune() -> None:
    """Every autotuned kernel keeps only its first configuration. Ranks that autotune independently may pick
    different tiles, and different tiles sum in different orders: bitwise different pooled features, so
    top-k ties could break differently on each rank. Data-parallel runs call this (fpo.distributed.init)."""
    for kernel in all_kernels():
        if kernel.configs:
            kernel.jit.configs = kernel.jit.configs[:1]
