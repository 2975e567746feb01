"""StepTracer: live tensor bytes and a roofline time for every op a step dispatches, on fake tensors (no GPU),
with the Triton launches the fused ops skip costed from their arguments. Used by estimate_step.py and by the
memory tests (tests/kernels/test_memory.py)."""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

import fpo_kernels.sae_constraint as _sae

__all__ = [
    "StepTracer",
    "phase",
    "H100_SXM",
    "GEMM_EFFICIENCY",
    "BANDWIDTH_EFFICIENCY",
    "KERNEL_FLOOR_S",
    "SAE_TRAFFIC",
]

# NVIDIA H100 SXM5 80GB datasheet: dense bf16 tensor-core FLOP/s, fp32 FLOP/s, HBM3 bandwidth.
H100_SXM = {"name": "NVIDIA H100 80GB HBM3 (SXM5)", "tensor_flops": 989e12, "fp32_flops": 67e12, "bandwidth": 3.35e12}
GEMM_EFFICIENCY = 0.70  # large bf16 cuBLAS GEMMs reach about 70% of the dense peak
BANDWIDTH_EFFICIENCY = 0.85
KERNEL_FLOOR_S = 3e-6  # the shortest a kernel takes, launch included
SAE_GROUP = _sae.SAE_POOL_FWD.configs[0][0]["GROUP"]  # row tiles per program group: the first config's
SAE_TRAFFIC = (
    "SAE pooling forward: the hidden rows are read once (a group's rows stay in L2 while its programs "
    f"walk the feature tiles) and W_enc once per group of {SAE_GROUP} row tiles of "
    f"{_sae.SAE_POOL_FWD.tiles['BT']} rows; partial sums [tiles, m] fp32 written and read once"
)
_SPARSE_WRITES = {"scatter_", "scatter_add_", "index_put_", "index_add_"}  # in place, at indices only
_WRITE_ONLY = {"zero_", "fill_"}  # in place: a write, not a read and a write
_FREE = {
    "empty",
    "empty_strided",
    "empty_like",
    "detach",
    "alias",
    "lift_fresh",
    "_local_scalar_dense",
    "set_",
    "new_empty",
    "new_empty_strided",
    "resize_",
    "sym_size",
    "sym_stride",
}


class StepTracer(TorchDispatchMode):
    """Live tensor bytes (now, peak) and a roofline time per phase, for every op dispatched inside it."""

    def __init__(self, spec=H100_SXM):
        super().__init__()
        self.spec = spec
        self.live = {}
        self.now = self.peak = 0
        self.seconds = defaultdict(float)
        self.by_op = defaultdict(float)
        self.flops = 0.0
        self.phase = "model"
        self.timing = False

    # ---- memory -----------------------------------------------------------------------------
    def hold(self, tensors):
        """Count tensors that exist before the step (weights, inputs, caches)."""
        for t in tensors:
            self._alloc(t)

    def _alloc(self, t):
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        n = st.nbytes()
        self.live[key] = (weakref.ref(st, partial(self._free, key)), n)
        self.now += n
        self.peak = max(self.peak, self.now)

    def _free(self, key, _ref):
        entry = self.live.pop(key, None)
        if entry is not None:
            self.now -= entry[1]

    # ---- time -------------------------------------------------------------------------------
    def cost(self, name, flops, nbytes, dtype):
        rate = self.spec["tensor_flops"] if dtype in (torch.bfloat16, torch.float16) else self.spec["fp32_flops"]
        t = max(
            flops / (rate * GEMM_EFFICIENCY), nbytes / (self.spec["bandwidth"] * BANDWIDTH_EFFICIENCY), KERNEL_FLOOR_S
        )
        if self.timing:
            self.seconds[self.phase] += t
            self.by_op[name] += t
            self.flops += flops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for t in outs:
            self._alloc(t)
        name = func._overloadpacket.__name__
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        # views and metadata ops move no data: outputs that alias an input, from an op that writes nothing
        aliases = {t.untyped_storage()._cdata for t in ins}
        moves_nothing = func.is_view or (
            not func._schema.is_mutable and outs and all(t.untyped_storage()._cdata in aliases for t in outs)
        )
        if func.namespace == "aten" and not moves_nothing and name not in _FREE:
            nbytes = sum(t.numel() * t.element_size() for t in ins + outs)
            if name in _SPARSE_WRITES:  # touches only the indexed elements: read index and source, write as many
                nbytes = 2 * sum(t.numel() * t.element_size() for t in ins[1:])
            elif name in _WRITE_ONLY:
                nbytes = sum(t.numel() * t.element_size() for t in outs)
            counter = flop_registry.get(func._overloadpacket)
            # mm/addmm with an fp32 output: the counters know the plain signature (no out_dtype, no out=)
            plain_args = args[:-1] if func._overloadname in ("dtype", "dtype_out") else args
            plain = {k: v for k, v in kwargs.items() if k not in ("out", "out_dtype")}
            flops = counter(*plain_args, **plain, out_val=out) if counter is not None else 0
            # the operands' precision sets the rate: a half-precision GEMM into an fp32 accumulator (addmm's
            # first input, or out_dtype) still runs on the tensor cores
            half = [t.dtype for t in ins if t.dtype in (torch.bfloat16, torch.float16)]
            self.cost(
                name,
                flops,
                nbytes,
                half[0] if half and counter is not None else (ins[0].dtype if ins else torch.float32),
            )
        return out

    def triton_launch(self, kernel, args, constexprs):
        """Cost of a Triton kernel skipped on fake tensors, from its arguments by name (the kernel's table)."""
        tensors = [a for a in args.values() if torch.is_tensor(a)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        flops, dtype = 0, tensors[0].dtype
        if kernel is _sae.SAE_POOL_FWD:
            (N, D), (n_tiles, F) = args["h"].shape, args["part"].shape  # flat rows; a partial sum per row tile
            flops = 2 * N * D * F  # every row costed as a response row (an upper bound: prompt tiles are skipped)
            w = args["w"]
            if F == w.shape[0]:  # dense: see SAE_TRAFFIC; gathered rows are few and stay in L2
                nbytes += (-(-n_tiles // SAE_GROUP) - 1) * w.numel() * w.element_size()
        elif kernel in (_sae.SAE_GATE, _sae.SAE_DH):
            N, K = args["g"].shape
            flops = 2 * N * args["w"].shape[1] * K  # the k pre-activations again, then dh
        self.cost(kernel.name, flops, nbytes, dtype)


@contextlib.contextmanager
def phase(tracer, name, owners):
    """Attribute the ops of the named functions to a phase while they run."""
    saved = []

    def wrap(fn):
        def inner(*a, **k):
            prev, tracer.phase = tracer.phase, name
            try:
                return fn(*a, **k)
            finally:
                tracer.phase = prev

        return inner

    for owner, attr in owners:
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, wrap(getattr(owner, attr)))
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
