"""Drop-in fused preference losses: against the loss formulas on float64 full-logit statistics, against
Liger-Kernel's chunked losses (when installed), packed equals padded, and bad input."""

import pytest
import torch
from helpers import random_sae

from fpo_kernels import pack_topk, reference, sae_pooled_features
from fpo_kernels.losses import dpo_loss, fpo_loss, simpo_loss, tdpo_loss
from fpo_kernels.preference import FusedLinearDPOLoss, FusedLinearFPOLoss, FusedLinearSimPOLoss, FusedLinearTDPOLoss

P, T, d, V = 3, 11, 24, 97


def _batch(device, prompt=(3, 5, 2), bias=False):
    """_input [2P, T, d], target [2P, T] shifted, ignore_index before each response and after it."""
    h = torch.randn(2 * P, T, d, device=device)
    w = torch.randn(V, d, device=device) * 0.3
    b = torch.randn(V, device=device) * 0.2 if bias else None
    target = torch.randint(0, V, (2 * P, T), device=device)
    for i in range(2 * P):
        lp = prompt[i % P]
        end = T - (i % 3)  # rows of different lengths: padding at the end
        target[i, :lp] = -100
        target[i, end:] = -100
    return h, w, b, target


def _stats64(h, w, b, target, softcap):
    """Summed and mean response log-probs per sequence from full float64 logits, written out plainly."""
    flat, y = h.double().reshape(-1, d), target.reshape(-1)
    keep = y != -100
    logp = reference.fused_linear_logprobs_ref(
        flat, w.double(), torch.where(keep, y, 0), softcap, -100, None if b is None else b.double()
    )
    logp = torch.where(keep, logp, 0.0).reshape(2 * P, T)
    s = logp.sum(1)
    return s, s / keep.reshape(2 * P, T).sum(1)


def _grads(loss, *ts):
    return torch.autograd.grad(loss, ts)


@pytest.mark.parametrize("softcap,bias", [(None, False), (5.0, True)])
def test_simpo_dpo_tdpo_match_the_formulas(softcap, bias, device):
    h, w, b, target = _batch(device, bias=bias)
    ref_h = h + 0.1 * torch.randn_like(h)
    ref_w = w + 0.05 * torch.randn_like(w)
    ref_s, _ = _stats64(ref_h, ref_w, None, target, softcap)
    for name in ("simpo", "dpo", "tdpo1", "tdpo2"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        bb = b.clone().requires_grad_() if bias else None
        if name == "simpo":
            mod = FusedLinearSimPOLoss(beta=2.0, gamma=0.5, compute_nll_loss=False, softcap=softcap)
            loss, out = mod(ww, hh, target, bb)
        elif name == "dpo":
            mod = FusedLinearDPOLoss(beta=0.1, softcap=softcap)
            loss, out = mod(
                ww, hh, target, bb, ref_chosen_logps=ref_s[:P].float(), ref_rejected_logps=ref_s[P:].float()
            )
        else:
            mod = FusedLinearTDPOLoss(beta=0.1, alpha=0.5, variant=int(name[-1]), softcap=softcap)
            loss, out = mod(ww, hh, target, bb, ref_input=ref_h, ref_weight=ref_w)
        h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
        b64 = b.double().requires_grad_() if bias else None
        s, a = _stats64(h64, w64, b64, target, softcap)
        if name == "simpo":
            want, _ = simpo_loss(a[:P], a[P:], 2.0, 0.5)
        elif name == "dpo":
            want, _ = dpo_loss(s[:P], s[P:], ref_s[:P], ref_s[P:], 0.1)
        else:
            keep = (target != -100).reshape(-1)
            _, _, kl = reference.fused_linear_logprobs_kl_ref(
                h64.reshape(-1, d)[keep],
                w64,
                target.reshape(-1)[keep],
                ref_h.double().reshape(-1, d)[keep],
                ref_w.double(),
                softcap,
                b64,
            )
            seq = torch.arange(2 * P, device=device).repeat_interleave(T)[keep]
            kl = torch.zeros(2 * P, dtype=torch.float64, device=device).index_add(0, seq, kl)
            want, _ = tdpo_loss(s[:P], s[P:], ref_s[:P], ref_s[P:], kl[:P], kl[P:], 0.1, 0.5, int(name[-1]))
        want = want.mean()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6), name
        got_g = _grads(loss, hh, ww, *([bb] if bias else []))
        want_g = _grads(want, h64, w64, *([b64] if bias else []))
        for g1, g2 in zip(got_g, want_g):
            assert ((g1.double() - g2).norm() / g2.norm()).item() < 1e-4, name
        chosen_logps, rejected_logps, cm, rm, nll, rw, rl = out  # Liger's 7-tuple
        metrics = mod.metrics
        assert chosen_logps.shape == (P,) and "accuracy" in metrics and "margin" in metrics
        if name.startswith("tdpo"):
            assert "kl_chosen" in metrics


@pytest.mark.parametrize("select", ["policy", "reference"])
def test_fpo_matches_the_formula(select, device):
    h, w, b, target = _batch(device)
    m, k = 60, 5
    sae = random_sae(d, m, device)
    resid = torch.randn(2 * P, T, d, device=device)
    mask = torch.zeros(2 * P, T, dtype=torch.bool, device=device)
    mask[:, 4:] = True
    ref_idx, ref_val = pack_topk(sae_pooled_features(resid + 0.05 * torch.randn_like(resid), sae, mask=mask), 16)
    ref_a = -torch.rand(2 * P, device=device)
    hh, rr = h.clone().requires_grad_(), resid.clone().requires_grad_()
    mod = FusedLinearFPOLoss(sae, beta=0.1, alpha=20.0, k=k, select=select)
    loss, out = mod(
        w,
        hh,
        target,
        sae_hidden=rr,
        sae_mask=mask,
        ref_indices=ref_idx,
        ref_values=ref_val,
        ref_chosen_mean_logps=ref_a[:P],
        ref_rejected_mean_logps=ref_a[P:],
    )
    h64, r64 = h.double().requires_grad_(), resid.double().requires_grad_()
    _, a = _stats64(h64, w, None, target, None)
    # the reference's summed log-probs (TRL's columns, the DPO module's argument) give the same loss
    count = (target != -100).sum(1).double()  # the response tokens each sequence's log-prob sums over
    with torch.no_grad():
        summed, _ = mod(
            w,
            h,
            target,
            sae_hidden=resid,
            sae_mask=mask,
            ref_indices=ref_idx,
            ref_values=ref_val,
            ref_chosen_logps=(ref_a[:P].double() * count[:P]).float(),
            ref_rejected_logps=(ref_a[P:].double() * count[P:]).float(),
        )
    assert summed.item() == pytest.approx(loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="log-probs once"):
        mod(w, h, target, sae_hidden=resid, sae_mask=mask, ref_indices=ref_idx, ref_values=ref_val)
    D = reference.sae_feature_mse_ref(r64, mask, sae, ref_idx, ref_val, k, select)
    want, _ = fpo_loss(a[:P], a[P:], ref_a[:P].double(), ref_a[P:].double(), D[:P], D[P:], 0.1, 20.0)
    want = want.mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    for g1, g2 in zip(_grads(loss, hh, rr), _grads(want, h64, r64)):
        assert ((g1.double() - g2).norm() / g2.norm()).item() < 1e-3
    assert "d_chosen" in mod.metrics and len(out) == 7


def test_packed_input_equals_padded(device):
    """A packed micro-batch (flat rows, seq_ids) gives the padded one's loss and gradients."""
    h, w, _, target = _batch(device)
    keep_rows = torch.randperm(2 * P * T, device=device)  # any row order: a packed stream
    flat_h = h.reshape(-1, d)[keep_rows]
    flat_t = target.reshape(-1)[keep_rows]
    seq = torch.arange(2 * P, device=device).repeat_interleave(T)[keep_rows]
    mod = FusedLinearSimPOLoss()
    hh = h.clone().requires_grad_()
    a, _ = mod(w, hh, target)
    ff = flat_h.clone().requires_grad_()
    b, _ = mod(w, ff, flat_t, seq_ids=seq)
    assert torch.allclose(a, b, rtol=1e-6)
    (ga,) = _grads(a, hh)
    (gb,) = _grads(b, ff)
    assert torch.allclose(ga.reshape(-1, d)[keep_rows], gb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "case,match",
    [
        ("odd", "2P sequences"),
        ("shape", "leading shape"),
        ("float_target", "integer"),
        ("empty", "no response token"),
        ("packed_no_ids", "seq_ids"),
        ("ref_shape", "ref_chosen_logps"),
        ("tdpo_no_ref", "ref_input"),
    ],
)
def test_bad_input(case, match, device):
    h, w, _, target = _batch(device)
    mod, kw = FusedLinearSimPOLoss(), {}
    if case == "odd":
        h, target = h[:5], target[:5]
    elif case == "shape":
        target = target[:, :-1]
    elif case == "float_target":
        target = target.float()
    elif case == "empty":
        target[4] = -100
    elif case == "packed_no_ids":
        h, target = h.reshape(-1, d), target.reshape(-1)
    elif case == "ref_shape":
        mod, kw = FusedLinearDPOLoss(), dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(P))
    elif case == "tdpo_no_ref":
        mod = FusedLinearTDPOLoss()
    with pytest.raises(ValueError, match=match):
        mod(w, h, target, **kw)


# ---- side by side with Liger-Kernel's chunked losses (plain PyTorch on the CPU) -------------------
def _liger():
    return pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")


def test_simpo_equals_liger(device):
    liger = _liger()
    h, w, _, target = _batch(device)
    theirs_mod = liger.LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.5, compute_nll_loss=False, compiled=False)
    h1, w1, h2, w2 = (t.clone().requires_grad_() for t in (h, w, h, w))
    ours, out = FusedLinearSimPOLoss(beta=2.0, gamma=0.5, compute_nll_loss=False)(w1, h1, target)
    theirs, aux = theirs_mod(w2, h2, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert torch.allclose(out[0], aux[0], rtol=1e-5) and torch.allclose(out[1], aux[1], rtol=1e-5)
    assert out[2].item() == pytest.approx(aux[2].item(), rel=1e-4, abs=1e-6)  # the logits means
    for g1, g2 in zip(_grads(ours, h1, w1), _grads(theirs, h2, w2)):
        assert ((g1 - g2).norm() / g2.norm()).item() < 1e-5


def test_dpo_equals_liger(device):
    """Liger computes the reference's log-probs from its hidden states; ours takes them precomputed."""
    liger = _liger()
    h, w, _, target = _batch(device)
    ref_h, ref_w = h + 0.1 * torch.randn_like(h), w + 0.05 * torch.randn_like(w)
    ref_s, _ = _stats64(ref_h, ref_w, None, target, None)
    theirs_mod = liger.LigerFusedLinearDPOLoss(beta=0.1, compute_nll_loss=False, compiled=False, use_ref_model=True)
    h1, w1, h2, w2 = (t.clone().requires_grad_() for t in (h, w, h, w))
    ours, out = FusedLinearDPOLoss(beta=0.1)(
        w1, h1, target, ref_chosen_logps=ref_s[:P].float(), ref_rejected_logps=ref_s[P:].float()
    )
    theirs, aux = theirs_mod(w2, h2, target, ref_input=ref_h, ref_weight=ref_w)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert torch.allclose(out[0], aux[0], rtol=1e-5)
    for g1, g2 in zip(_grads(ours, h1, w1), _grads(theirs, h2, w2)):
        assert ((g1 - g2).norm() / g2.norm()).item() < 1e-5


def test_what_would_give_nan_is_refused(device):
    """d_scale 0, no pair at all, an infinite softcap, a reference head over another vocabulary: each a sentence,
    where each once returned NaN or a loss."""
    from fpo_kernels import fused_linear_logprobs

    h, w, _, target = _batch(device)
    sae = random_sae(d, 12, device)
    for bad in (0, 0.0, float("inf"), float("nan"), -1.0, True):
        with pytest.raises(ValueError, match="d_scale must be a finite number > 0"):
            FusedLinearFPOLoss(sae, d_scale=bad)
    with pytest.raises(ValueError, match="no pair"):
        FusedLinearSimPOLoss()(w, h[:0], target[:0])
    with pytest.raises(ValueError, match="finite number > 0"):
        fused_linear_logprobs(h.reshape(-1, d), w, target.reshape(-1).clamp(min=0), softcap=float("inf"))
    with pytest.raises(ValueError, match="finite number > 0"):
        FusedLinearSimPOLoss(softcap=float("nan"))
    other = torch.randn(w.shape[0] + 3, d, device=device)
    with pytest.raises(ValueError, match="over the policy's vocabulary"):
        FusedLinearDPOLoss()(w, h, target, ref_input=h, ref_weight=other)
