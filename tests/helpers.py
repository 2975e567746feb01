"""Shared builders and paths for the tests."""

import os

import torch

from fpo_kernels import SAEWeights

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)  # the repository
DIST_DRIVER = os.path.join(TESTS, "dist_driver.py")


# One tolerance table per dtype, for outputs compared with a float64 reference: (atol, rtol).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-2), torch.bfloat16: (2e-2, 5e-2)}


def random_sae(d, m, device="cpu", b_dec=True, apply_b_dec=True, dtype=torch.float32):
    """W_enc is rounded to `dtype`: the kernels multiply in the hidden states' dtype, and JumpReLU's jump
    would turn a rounding difference at a threshold into a whole feature's worth of error."""
    W = (torch.randn(d, m, device=device) / d**0.5).to(dtype).float()
    b_enc = torch.randn(m, device=device) * 0.1
    theta = torch.rand(m, device=device) * 0.3
    bd = torch.randn(d, device=device) * 0.2 if b_dec else None
    return SAEWeights.from_tensors(W, b_enc, theta, bd, apply_b_dec and b_dec)


def random_mask(B, T, device="cpu", one_token_row=True, full_row=True):
    """Contiguous response spans after a prompt, with padding after; row 0 a one-token response,
    row 1 the whole sequence, the rest random spans."""
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    for b in range(B):
        if b == 0 and one_token_row:
            t = torch.randint(0, T, ()).item()
            mask[b, t] = True
        elif b == 1 and full_row:
            mask[b] = True
        else:
            s = torch.randint(0, T - 1, ()).item()
            e = torch.randint(s + 1, T + 1, ()).item()
            mask[b, s:e] = True
    return mask


def poison(monkeypatch, module):
    """Make torch.empty inside a module return NaN-filled tensors, so an element a kernel forgets shows."""
    real_empty = torch.empty

    def nan_empty(*a, **k):
        t = real_empty(*a, **k)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(module.torch, "empty", nan_empty)
