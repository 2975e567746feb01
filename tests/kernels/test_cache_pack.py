"""Sparse-index cache packing: exact round trip, packed dtypes on both sides of the int16 boundary."""

import pytest
import torch

from fpo_kernels import index_dtype_for, pack_topk, unpack_topk
from fpo_kernels.reference import pack_topk_ref


@pytest.mark.parametrize(
    "m,dtype", [(100, torch.int16), (32768, torch.int16), (32769, torch.int32), (65536, torch.int32)]
)
def test_pack_dtypes_and_round_trip(m, dtype):
    B, K = 3, 64
    pooled = torch.rand(B, m)
    idx, val = pack_topk(pooled, K)
    assert idx.dtype == dtype == index_dtype_for(m) and val.dtype == torch.float16
    ridx, rval = pack_topk_ref(pooled, K)
    assert torch.equal(idx.long(), ridx)  # exact indices, including the top of the range
    assert torch.equal(val, rval.half())  # values: exactly the reference rounded once
    assert (val[:, :-1] >= val[:, 1:]).all()
    dense = unpack_topk(idx, val, m)
    assert torch.equal(dense.gather(1, idx.long()), val.float())
    if m >= 32768:  # the largest index survives the packed dtype
        p = torch.zeros(1, m)
        p[0, m - 1] = 1.0
        i, _ = pack_topk(p, 1)
        assert i.long().item() == m - 1


def test_k_larger_than_width_pads():
    idx, val = pack_topk(torch.rand(2, 5), 8)
    assert (idx[:, 5:] == -1).all() and (val[:, 5:] == 0).all()
    assert sorted(idx[0, :5].tolist()) == list(range(5))


@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_value_dtypes(value_dtype):
    pooled = torch.rand(2, 50) * 10
    idx, val = pack_topk(pooled, 8, value_dtype)
    assert val.dtype == value_dtype
    assert torch.equal(val, pooled.gather(1, idx.long()).to(value_dtype))


def test_bad_input():
    with pytest.raises(ValueError, match="float16's range"):
        pack_topk(torch.full((1, 4), 7e4), 2)
    with pytest.raises(ValueError, match="pooled row 1"):
        p = torch.rand(2, 10)
        p[1, 3] = float("nan")
        pack_topk(p, 4)
    with pytest.raises(ValueError, match="K must"):
        pack_topk(torch.rand(2, 10), 0)
    with pytest.raises(ValueError, match="outside"):
        unpack_topk(torch.tensor([[11]]), torch.tensor([[1.0]]), 10)
