"""Where an op runs, and how its kernels are described and launched.

CUDA tensors take the Triton kernels; CPU tensors take the reference, unless the Triton interpreter is on
(TRITON_INTERPRET=1), which runs the kernels themselves on the CPU.

Each op module lists its kernels in a KERNELS table of `Kernel` entries (argument types, tile sizes, flags,
autotune configs), checked against the kernel's signature when the module loads; `launch` passes every
argument by name and refuses one the table does not know.

Fake tensors (torch._subclasses.FakeTensorMode) take the kernel path too, with every launch skipped: the
ops then allocate exactly what they allocate on a GPU, so memory planners and step estimators see their
true footprint without a GPU. Observers registered with `on_fake_launch` hear of each skipped launch, with
its arguments by name. This, rather than torch.library.custom_op with a register_fake (QuACK's way), because
a registered fake returns an op's outputs only: the workspace the fused ops allocate (partial sums, the
gate, a chunk's logits, each backward block's dL/dlogits: most of their memory) would be invisible, and every
op's output shapes would be written a second time in its fake. The ops are called eagerly inside a step (the
trainer compiles nothing), so the graph capture custom_op would add is not needed yet."""

import functools
import os
from contextlib import nullcontext

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_fake_launch_observers: list = []


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
    return (
        torch.autocast(t.device.type, enabled=False)
        if torch.amp.is_autocast_available(t.device.type)
        else nullcontext()
    )


def compile_boundary(op):
    """torch.compile traces around the op, never into it (a graph break at each call): its checks and its tile
    plans read the layout's values on the host (a mask's response spans, the rows of a flat batch), which a
    traced graph cannot hold as constants; traced anyway, under settings such as dynamo's
    capture_dynamic_output_shape_ops, they fail on data-dependent shapes. The kernels inside are already fused."""
    return torch.compiler.disable(op)


def in_compute_dtype(op):
    """op(hidden, ...) with hidden cast to compute_dtype(hidden) and autocast off inside: the op's GEMMs run in
    the dtype an nn.Linear would, its sums stay fp32. The cast is differentiable (hidden's gradient comes back
    in hidden's own dtype)."""

    @functools.wraps(op)
    def wrapper(hidden, *args, **kwargs):
        if not torch.is_tensor(hidden):  # the op's own check names the argument
            return op(hidden, *args, **kwargs)
        dtype = compute_dtype(hidden)
        with no_autocast(hidden):
            return op(hidden.to(dtype), *args, **kwargs)

    return wrapper


def dot_precision(dtype: torch.dtype):
    """fp32 operands: full-precision products ("ieee"), not TF32, so fp32 inputs give fp32 answers."""
    return "ieee" if dtype == torch.float32 else None


class Kernel:
    """One Triton kernel and its facts, written once beside it (each op module's KERNELS table) and read by
    its launches, `pin_autotune` (fpo_kernels.kernels), the fake-launch observers (benchmarks.estimate_step), the
    compile report (benchmarks.kernel_resources) and the tests.

    args      every runtime argument in the kernel's signature order, with its Triton type: "*fp32" a pointer,
              "i32" an integer; "{dt}" stands for the operand dtype the kernel is compiled for.
    tiles     constexpr tile sizes on the GPU (where a launch narrows one to a small dimension, its largest);
              interpreted_tiles: under the Triton interpreter (it pays per operation: wide tiles, short loops).
    flags     the other constexprs and the values launches pass (CAP: the softcap compiled for, Gemma-2's).
    dtypes    the operand dtypes ({dt}) launches use; dot: takes PRECISION, tl.dot's input precision, from it
              (full fp32 products for fp32 operands, never TF32).
    configs   an autotuned kernel's GPU configs (tile constexprs, num_warps, num_stages), tuned over
              autotune_key; interpreted_config: the one config the interpreter runs.
    """

    def __init__(
        self,
        fn,
        args,
        *,
        tiles=None,
        interpreted_tiles=None,
        flags=None,
        dtypes=("bf16", "fp16", "fp32"),
        dot=False,
        configs=(),
        interpreted_config=None,
        autotune_key=(),
    ):
        self.fn, self.args, self.name = fn, dict(args), fn.__name__
        self.tiles, self.interpreted_tiles = dict(tiles or {}), dict(interpreted_tiles or tiles or {})
        self.flags, self.dtypes, self.dot = dict(flags or {}), tuple(dtypes), dot
        self.configs, self.interpreted_config = tuple(configs), interpreted_config
        self.jit = fn
        if configs:
            import triton

            tuned = (
                [triton.Config(interpreted_config, num_warps=1, num_stages=1)]
                if interpreter_on()
                else [triton.Config(c, num_warps=w, num_stages=st) for c, w, st in configs]
            )
            self.jit = triton.autotune(configs=tuned, key=list(autotune_key))(fn)
        self.constexprs = (
            set(self.tiles)
            | set(self.flags)
            | ({"PRECISION"} if dot else set())
            | {k for c, _, _ in self.configs for k in c}
        )
        names = list(fn.arg_names)  # the table must be the kernel's signature: no argument missed or misnamed
        if [n for n in names if n not in self.constexprs] != list(self.args) or set(names) - set(
            self.args
        ) != self.constexprs:
            raise TypeError(
                f"{self.name}: the table's arguments {list(self.args)} and constexprs "
                f"{sorted(self.constexprs)} do not match the kernel's signature {names}"
            )

    def tile(self, name) -> int:
        """A tile size for this launch: the interpreter's or the GPU's."""
        return (self.interpreted_tiles if interpreter_on() else self.tiles)[name]

    def __repr__(self):
        return f"Kernel({self.name})"


def launch(kernel: Kernel, grid, **arguments):
    """kernel.jit[grid](**arguments), every argument by name, checked against the kernel's table; on fake
    tensors a report to the observers instead: observer(kernel, runtime arguments by name, constexprs)."""
    args = {n: arguments.pop(n) for n in kernel.args if n in arguments}
    missing = [n for n in kernel.args if n not in args]
    unknown = sorted(set(arguments) - kernel.constexprs)
    if missing or unknown:
        raise TypeError(f"{kernel.name}: launched without {missing} or with arguments it does not take {unknown}")
    if any(is_fake(a) for a in args.values() if torch.is_tensor(a)):
        for observer in _fake_launch_observers:
            observer(kernel, args, arguments)
        return
    kernel.jit[grid](**args, **arguments)


class on_fake_launch:
    """Context manager: observer(kernel, args, constexprs) is called for every launch skipped on fake tensors
    (kernel: its Kernel entry; args: the runtime arguments by name)."""

    def __init__(self, observer):
        self.observer = observer

    def __enter__(self):
        _fake_launch_observers.append(self.observer)
        return self

    def __exit__(self, *exc):
        _fake_launch_observers.remove(self.observer)
