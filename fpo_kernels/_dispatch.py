"""Where an op runs: CUDA tensors take the Triton kernels; CPU tensors take the reference, unless the
Triton interpreter is on (TRITON_INTERPRET=1), which runs the kernels themselves on the CPU."""
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or interpreter_on()


def dot_precision(dtype: torch.dtype):
    """fp32 operands: full-precision products ("ieee"), not TF32, so fp32 inputs give fp32 answers."""
    return "ieee" if dtype == torch.float32 else None
