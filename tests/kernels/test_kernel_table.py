"""Each op module's KERNELS table is its kernels' signatures: a table that disagrees with a kernel is refused
when the module loads, a launch that misses or misnames an argument is refused before the kernel runs, and the
fake-launch observers hear every argument by its name."""

import pytest
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensorMode

import fpo_kernels.kl as kl
import fpo_kernels.logprobs as lp
import fpo_kernels.sae_constraint as sc
from fpo_kernels import SAEWeights, fused_linear_logprobs, sae_feature_mse
from fpo_kernels._dispatch import Kernel, launch, on_fake_launch
from fpo_kernels.kernels import all_kernels


@triton.jit
def _scale_kernel(x, out, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + o, tl.load(x + o, mask=o < n) * 2.0, mask=o < n)


def test_a_table_must_match_the_kernel_signature():
    Kernel(_scale_kernel, {"x": "*fp32", "out": "*fp32", "n": "i32"}, tiles=dict(BLOCK=64))
    for args, tiles in (
        ({"x": "*fp32", "n": "i32"}, dict(BLOCK=64)),  # one missing
        ({"out": "*fp32", "x": "*fp32", "n": "i32"}, dict(BLOCK=64)),  # out of order
        ({"x": "*fp32", "out": "*fp32", "n": "i32"}, {}),
    ):  # a constexpr missing
        with pytest.raises(TypeError, match="_scale_kernel: the table's arguments"):
            Kernel(_scale_kernel, args, tiles=tiles)


def test_a_launch_names_every_argument():
    k = Kernel(_scale_kernel, {"x": "*fp32", "out": "*fp32", "n": "i32"}, tiles=dict(BLOCK=64))
    x = torch.randn(100)
    out = torch.empty_like(x)
    launch(k, (2,), x=x, out=out, n=100, BLOCK=64)
    assert torch.equal(out, 2 * x)
    with pytest.raises(TypeError, match=r"_scale_kernel: launched without \['n'\]"):
        launch(k, (2,), x=x, out=out, BLOCK=64)
    with pytest.raises(TypeError, match=r"does not take \['N'\]"):
        launch(k, (2,), x=x, out=out, n=100, N=100, BLOCK=64)


def test_every_kernel_is_in_a_table_and_launched_by_name():
    """The modules' tables hold every @triton.jit kernel they define; on fake tensors each op's launches reach
    the observers with exactly the table's arguments, tensors where the table says pointers."""
    modules = (sc, lp, kl)
    defined = {n for m in modules for n, v in vars(m).items() if n.endswith("_kernel") and hasattr(v, "arg_names")}
    assert defined == {k.name for k in all_kernels()}
    heard = []

    def observer(kernel, args, constexprs):
        assert list(args) == list(kernel.args)
        assert all(torch.is_tensor(v) == t.startswith("*") for v, t in zip(args.values(), kernel.args.values()))
        assert set(constexprs) <= kernel.constexprs
        heard.append(kernel.name)

    with FakeTensorMode(), on_fake_launch(observer):
        N, d, V, m = 64, 32, 300, 96
        h = torch.empty(2, N // 2, d, requires_grad=True)
        sae = SAEWeights.from_tensors(torch.empty(d, m), torch.empty(m), torch.empty(m), torch.empty(d), True)
        mask = torch.ones(2, N // 2, dtype=torch.bool)
        d_s = sae_feature_mse(
            h,
            sae,
            torch.zeros(2, 8, dtype=torch.int32),
            torch.empty(2, 8),
            mask=mask,
            k=4,
            select="policy",
            check_inputs=False,
        )
        d_s.sum().backward()
        w = torch.empty(V, d, requires_grad=True)
        fused_linear_logprobs(h.reshape(N, d), w, torch.zeros(N, dtype=torch.long)).sum().backward()
        kl.kl_fwd(h.reshape(N, d), w, h.reshape(N, d), w, torch.ones(N, dtype=torch.int8))
    assert set(heard) == {k.name for k in all_kernels()} - {"_kl_bwd_kernel"}
