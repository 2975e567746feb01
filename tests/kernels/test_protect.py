"""Feature protection's op and penalty vs float64 oracles: the pooled values of a few features, JumpReLU's
gradient where the loss asks a feature to fall, the restoring gradient on tokens where it is off, and the
bounded, per-feature-normalised penalty."""

import dataclasses

import pytest
import torch
from helpers import random_mask, random_sae

from fpo_kernels import SAEWeights, pack_topk, reference, sae_feature_mse
from fpo_kernels.protect import protected_features, protected_preactivations, protection_penalty


def _spans_of(mask):
    return torch.tensor([[r.nonzero().min().item(), r.nonzero().max().item() + 1] for r in mask])


def _flat(hidden, mask):
    """Padded [B, T, d] + contiguous mask rows -> flat [B * T, d] and spans in flat row numbers."""
    B, T, _ = hidden.shape
    spans = _spans_of(mask) + torch.arange(B)[:, None] * T
    return hidden.reshape(B * T, -1), spans


@pytest.mark.parametrize("B,T,d,m,P", [(3, 23, 20, 97, 5), (4, 9, 16, 40, 1)])
@pytest.mark.parametrize("layout", ["mask", "spans"])
def test_values_and_jumprelu_gradient_match_the_oracle(B, T, d, m, P, layout, device):
    sae = random_sae(d, m, device)
    hidden = torch.randn(B, T, d, device=device, dtype=torch.float64, requires_grad=True)
    mask = random_mask(B, T, device)
    ids = torch.randperm(m)[:P]
    flat, spans = _flat(hidden, mask)
    kw = dict(mask=mask) if layout == "mask" else dict(spans=spans)
    x = hidden if layout == "mask" else flat
    got = protected_features(x, sae, ids, gate="jumprelu", **kw)
    want = reference.protected_features_ref(flat, spans, sae, ids)
    assert got.shape == (B, P)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # the SAE keeps its fused bias in fp32
    g = torch.randn(B, P, dtype=torch.float64)
    (a,) = torch.autograd.grad(got, hidden, g)
    (b,) = torch.autograd.grad(want, hidden, g)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("gate", ["restore", "near"])
def test_restoring_gradient_passes_only_upward_on_off_tokens(gate, device):
    """gate restore (every off token) or near (off tokens with a positive pre-activation): where the loss asks a
    feature to fall (g > 0) the gradient is JumpReLU's; where it asks it to rise (g < 0), the gate's off tokens pass
    the pre-activation's gradient too, computed here on its own."""
    B, T, d, m, P = 3, 15, 12, 50, 4
    sae = random_sae(d, m, device)
    hidden = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    mask = random_mask(B, T, device)
    ids = torch.randperm(m)[:P]
    # thresholds wide enough that the near band (0, theta] holds tokens, and a loss asking half the features to rise
    # and half to fall: without them a draw can leave the off-token case unexercised
    theta = sae.threshold.clone()
    theta[ids] = 0.5 + 0.5 * torch.rand(P, device=theta.device)
    sae = dataclasses.replace(sae, threshold=theta)
    g = torch.randn(B, P, dtype=torch.float64).abs() * torch.tensor([-1.0, 1.0] * (P // 2), dtype=torch.float64)
    (got,) = torch.autograd.grad(protected_features(hidden, sae, ids, mask=mask, gate=gate), hidden, g)
    flat, spans = _flat(hidden, mask)
    (jump,) = torch.autograd.grad(reference.protected_features_ref(flat, spans, sae, ids), hidden, g)
    # the off tokens' share, written out: d/dh of sum_s sum_i min(g_si, 0) / n_s * sum_{t off} z_ti
    W = sae.W_enc_t.double()[ids]  # [P, d]
    x = hidden.detach()
    if sae.apply_b_dec_to_input:
        x = x - sae.b_dec.double()
    z = x @ W.t() + sae.b_enc.double()[ids]  # [B, T, P]
    off = (z <= sae.threshold.double()[ids]) & mask[..., None]
    if gate == "near":
        off = off & (z > 0)
    n = mask.sum(1).double()
    coef = (g.clamp(max=0) / n[:, None])[:, None, :] * off  # [B, T, P]
    extra = coef @ W
    torch.testing.assert_close(got, jump + extra, rtol=1e-6, atol=1e-9)
    assert extra.abs().sum() > 0  # the case was exercised


def test_a_suppressed_feature_gets_a_gradient_back(device):
    """One token, one feature pushed below its threshold: JumpReLU's gradient is 0, the protection term's pulls it
    up, along the feature's encoder column."""
    d, m = 8, 6
    W = torch.randn(d, m, dtype=torch.float64)
    sae = SAEWeights.from_tensors(W, torch.zeros(m), torch.full((m,), 0.5))
    h = (-2.0 * W[:, 2] / W[:, 2].norm()).reshape(1, 1, d).requires_grad_(True)  # z_2 < 0 < theta: off
    mask = torch.ones(1, 1, dtype=torch.bool)
    ids = torch.tensor([2])
    p = protected_features(h, sae, ids, mask=mask)
    assert p.item() == 0.0
    R = protection_penalty(p, torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    (grad,) = torch.autograd.grad(R.sum(), h)
    assert grad.abs().sum() > 0
    cos = torch.nn.functional.cosine_similarity(-grad.flatten(), W[:, 2].to(grad), dim=0)
    assert cos > 0.999  # descent raises z_2
    p_jump = protected_features(h, sae, ids, mask=mask, gate="jumprelu")
    R2 = protection_penalty(
        p_jump, torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    )
    (none,) = torch.autograd.grad(R2.sum(), h)
    assert none.abs().sum() == 0


def test_outside_top_k_and_cache_the_feature_gets_the_oracles_gradient_scaled_by_its_weight(device):
    """A protected feature that D never selects (outside the policy's top-k and the cached top-K): D gives it no
    gradient at all; R gives the float64 oracle's, linear in its weight."""
    torch.manual_seed(1234)
    B, T, d, m, k = 2, 11, 16, 60, 4
    sae = random_sae(d, m, device)
    hidden = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    mask = random_mask(B, T, device, one_token_row=False)
    flat, spans = _flat(hidden, mask)
    pooled = reference.sae_pooled_features_ref(hidden.detach(), mask, sae)
    weakest = int(pooled.sum(0).argsort()[pooled.shape[1] // 2])  # fires somewhere, far from the top
    assert all(weakest not in r for r in pooled.topk(k, dim=1).indices.tolist())
    ref_idx, ref_val = pack_topk(pooled.float(), k)
    assert (ref_idx != weakest).all()
    fw = torch.ones(m)
    fw[weakest] = 10.0
    D = sae_feature_mse(hidden, sae, ref_idx, ref_val, mask=mask, k=k, feature_weights=fw)
    (dg,) = torch.autograd.grad(D.sum(), hidden)
    # D's gradient does not depend on the weight of a feature it never selects
    D1 = sae_feature_mse(hidden, sae, ref_idx, ref_val, mask=mask, k=k)
    (dg1,) = torch.autograd.grad(D1.sum(), hidden)
    torch.testing.assert_close(dg, dg1)

    ids = torch.tensor([weakest, (weakest + 1) % m])
    ref = pooled[:, ids] * torch.tensor([1.3, 0.9], dtype=torch.float64)  # the reference, away from the policy
    scale = torch.tensor([0.2, 0.3], dtype=torch.float64)
    grads = []
    for w0 in (1.0, 2.0, 4.0):
        weights = torch.tensor([w0, 1.0], dtype=torch.float64)
        R = protection_penalty(
            protected_features(hidden, sae, ids, mask=mask, gate="jumprelu"), ref, scale, weights=weights
        )
        (g,) = torch.autograd.grad(R.sum(), hidden)
        # the oracle: the full float64 encode, then R written out
        p = reference.protected_features_ref(flat, spans, sae, ids)
        delta = (p - ref) / scale
        R_ref = ((torch.sqrt(1 + delta**2) - 1) * weights).sum(1) / weights.sum()
        (g_ref,) = torch.autograd.grad(R_ref.sum(), hidden)
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-9)
        grads.append(g * weights.sum())  # undo the normalisation by the total weight
    assert grads[0].abs().sum() > 0
    # the protected feature's share of the gradient grows linearly with its weight
    share = [gr - grads[0] for gr in grads]
    torch.testing.assert_close(share[2], 3 * share[1], rtol=1e-9, atol=1e-12)


def test_penalty_formula_directions_and_bounded_slope():
    torch.manual_seed(7)
    S, P = 5, 4
    p = torch.rand(S, P, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(S, P, dtype=torch.float64)
    scale = torch.rand(P, dtype=torch.float64) + 0.1
    w = torch.tensor([1.0, 2.0, 0.0, 0.5], dtype=torch.float64)
    direction = torch.tensor([0, 1, -1, -1], dtype=torch.int8)
    R = protection_penalty(p, ref, scale, weights=w, direction=direction)
    delta = (p.detach() - ref) / scale
    delta[:, 1] = delta[:, 1].clamp(min=0)
    delta[:, 2:] = delta[:, 2:].clamp(max=0)
    want = ((torch.sqrt(1 + delta**2) - 1) * w).sum(1) / w.sum()
    torch.testing.assert_close(R.detach(), want)
    (g,) = torch.autograd.grad(R.sum(), p)
    assert (g.abs() <= (w / w.sum() / scale) + 1e-12).all()  # slope at most 1 per unit of relative change
    far = protection_penalty(
        torch.full((1, 1), 1e6, dtype=torch.float64, requires_grad=True),
        torch.zeros(1, 1, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
    )
    assert torch.isfinite(far).all()


def test_bad_inputs_are_refused(device):
    sae = random_sae(8, 20, device)
    h = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    cases = [
        (dict(feature_ids=torch.tensor([20])), "outside the SAE's width"),
        (dict(feature_ids=torch.tensor([3, 3])), "twice"),
        (dict(feature_ids=torch.tensor([1.0])), "integer"),
        (dict(feature_ids=torch.tensor([], dtype=torch.long)), "non-empty"),
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), r"mask must have shape"),
        (dict(mask=torch.zeros(2, 5, dtype=torch.bool)), "no token"),
        (dict(hidden=torch.randn(2, 5, 7)), "d_in=8"),
        (dict(mask=None), "either mask"),
    ]
    for change, match in cases:
        kw = dict(hidden=h, feature_ids=torch.tensor([1, 4]), mask=mask) | change
        with pytest.raises(ValueError, match=match):
            protected_features(kw.pop("hidden"), sae, kw.pop("feature_ids"), **kw)
    topk = SAEWeights(torch.randn(20, 8), torch.zeros(20), torch.zeros(20), activation="topk", k=3)
    with pytest.raises(ValueError, match="TopK"):
        protected_features(h, topk, torch.tensor([1]), mask=mask)
    with pytest.raises(ValueError, match="positive"):
        protection_penalty(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="not all 0"):
        protection_penalty(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(2), weights=torch.zeros(2))


def test_nan_hidden_stays_nan_and_fp16_matches(device):
    sae = random_sae(16, 30, device, dtype=torch.float16)
    h = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    ids = torch.tensor([0, 5, 29])
    got = protected_features(h.half(), sae, ids, mask=mask)
    want = reference.protected_features_ref(
        h.half().double().reshape(12, 16), torch.tensor([[0, 6], [6, 12]]), sae, ids
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    h[1, 2] = float("nan")
    out = protected_features(h, sae, ids, mask=mask)
    assert out[0].isfinite().all() and out[1].isnan().all()


def test_bf16_activations_as_a_gpu_step_gives_them(device):
    """Under bf16 autocast the residual stream arrives in bf16: the op reads it in fp32 (values equal the oracle on
    the same bf16 rows), and hands its gradient back in bf16."""
    sae = random_sae(24, 60, device)
    h = torch.randn(3, 9, 24).bfloat16().requires_grad_()
    mask = random_mask(3, 9, device)
    ids = torch.tensor([2, 17, 40])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = protected_features(h, sae, ids, mask=mask)
    flat, spans = _flat(h.detach().double(), mask)
    want = reference.protected_features_ref(flat, spans, sae, ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(got.sum(), h)
    assert g.dtype == torch.bfloat16 and g.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["mask", "spans"])
def test_preactivations_match_the_oracle_with_a_gradient_on_every_token(dtype, layout, device):
    """The per-token form: every response token's pre-activations of the protected features against the float64
    full encode, and a gradient through every token (the feature firing or not), equal to the oracle's."""
    B, T, d, m, P = 3, 17, 12, 60, 5
    sae = random_sae(d, m, device)
    hidden = torch.randn(B, T, d, device=device, dtype=dtype, requires_grad=True)
    mask = random_mask(B, T, device)
    ids = torch.randperm(m)[:P]
    flat, spans = _flat(hidden, mask)
    kw = dict(mask=mask) if layout == "mask" else dict(spans=spans)
    got = protected_preactivations(hidden if layout == "mask" else flat, sae, ids, **kw)
    want = reference.protected_preactivations_ref(flat, spans, sae, ids)
    assert got.shape == (int(mask.sum()), P) and got.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.double(), want, **tol)
    g = torch.randn(got.shape, dtype=torch.float64)
    (a,) = torch.autograd.grad(got, hidden, g.to(dtype))
    (b,) = torch.autograd.grad(want, hidden, g)
    torch.testing.assert_close(a.double(), b.double(), **tol)
    off = want <= sae.threshold.double()[ids]
    assert off.any() and (a.abs().sum(-1)[mask] > 0).all()  # off tokens included: every response row has one


def test_preactivations_refuse_what_they_cannot_use():
    sae = random_sae(8, 20)
    h = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="feature_ids holds 20"):
        protected_preactivations(h, sae, torch.tensor([20]), mask=mask)
    with pytest.raises(ValueError, match="d_in=8"):
        protected_preactivations(torch.randn(2, 5, 7), sae, torch.tensor([1]), mask=mask)
    mask[1] = False
    with pytest.raises(ValueError, match="response 1 has no token"):
        protected_preactivations(h, sae, torch.tensor([1]), mask=mask)
