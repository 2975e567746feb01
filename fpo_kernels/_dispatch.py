"""Where an op runs: CUDA tensors take the Triton kernels; CPU tensors take the reference, unless the
Triton interpreter is on (TRITON_INTERPRET=1), which runs the kernels themselves on the CPU.

Fake tensors (torch._subclasses.FakeTensorMode) take the kernel path too, with every launch skipped:
the ops then allocate exactly what they allocate on a GPU, so memory planners and step estimators see
their true footprint without a GPU. Observers registered with `on_fake_launch` hear of each skipped launch."""
import functools
import os
from contextlib import nullcontext

import warnings

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_fake_launch_observers = []


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or interpreter_on() or is_fake(t)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype an op's products run in, given its activations t: autocast's where autocast is on for t's
    device (what an nn.Linear there would run in), else t's own. Weights follow the activations (an fp32 lm
    head or SAE encoder with bf16 activations runs in bf16, fp32 accumulation); activations are never upcast.
    float64 stays float64 (autocast leaves it alone too)."""
    dev = t.device.type
    if t.dtype in FLOAT_DTYPES and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def no_autocast(t: torch.Tensor):
    """Autocast off on t's device: an op casts its operands to compute_dtype itself, and its float32 sums
    (log-sum-exp, pooling, the loss) must stay float32."""
    return torch.autocast(t.device.type, enabled=False) if torch.amp.is_autocast_available(t.device.type) else nullcontext()


def in_compute_dtype(op):
    """op(hidden, ...) with hidden cast to compute_dtype(hidden) and autocast off inside: the op's GEMMs run in
    the dtype an nn.Linear would, its sums stay fp32. The cast is differentiable (hidden's gradient comes back
    in hidden's own dtype)."""
    @functools.wraps(op)
    def wrapper(hidden, *args, **kwargs):
        if not torch.is_tensor(hidden):   # the op's own check names the argument
            return op(hidden, *args, **kwargs)
        dtype = compute_dtype(hidden)
        with no_autocast(hidden):
            return op(hidden.to(dtype), *args, **kwargs)
    return wrapper


def dot_precision(dtype: torch.dtype):
    """fp32 operands: full-precision products ("ieee"), not TF32, so fp32 inputs give fp32 answers."""
    return "ieee" if dtype == torch.float32 else None


def deprecated(old: str, new: str):
    """The warning an old entry point gives for one release before it goes."""
    warnings.warn(f"fpo_kernels: {old} is deprecated and will be removed in the next release; use {new}",
                  DeprecationWarning, stacklevel=3)


def kernel_name(kernel) -> str:
    while not hasattr(kernel, "__name__") and hasattr(kernel, "fn"):   # Autotuner -> JITFunction -> function
        kernel = kernel.fn
    return getattr(kernel, "__name__", type(kernel).__name__)


def launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta), or, on fake tensors, a report to the observers instead."""
    if any(is_fake(a) for a in args if torch.is_tensor(a)):
        for observer in _fake_launch_observers:
            observer(kernel_name(kernel), args, meta)
        return
    kernel[grid](*args, **meta)


class on_fake_launch:
    """Context manager: observer(name, args, meta) is called for every launch skipped on fake tensors."""

    def __init__(self, observer):
        self.observer = observer

    def __enter__(self):
        _fake_launch_observers.append(self.observer)
        return self

    def __exit__(self, *exc):
        _fake_launch_observers.remove(self.observer)


def pin_autotune():
    """Every autotuned kernel keeps only its first configuration. Ranks that autotune independently may pick
    different tiles, and different tiles sum in different orders: bitwise different pooled features, so
    top-k ties could break differently on each rank. Data-parallel runs call this (fpo.distributed.init)."""
    from triton.runtime.autotuner import Autotuner

    from . import logprobs, sae_constraint
    for module in (sae_constraint, logprobs):
        for kernel in vars(module).values():
            if isinstance(kernel, Autotuner):
                kernel.configs = kernel.configs[:1]
