"""Fused SAE constraint vs the float64 reference and vs sae-lens' own encoder (CPU: Triton interpreter)."""

import pytest
import torch
from helpers import ROOT, TOL, poison, random_mask, random_sae

import fpo_kernels.sae_constraint as sc
from fpo_kernels import SAEWeights, pack_topk, reference, sae_feature_mse, sae_pooled_features

SHAPES = [  # B, T, d, m: odd sizes, T = 63, d not a multiple of 16, m not a power of two
    (3, 63, 60, 150),
    (4, 17, 24, 97),
]


def _ref_cache(hidden, mask, sae, K, noise=0.05):
    """A reference cache near the policy: pooled features of perturbed hidden states, packed."""
    pooled = reference.sae_pooled_features_ref(hidden.double() + noise * torch.randn_like(hidden.double()), mask, sae)
    return pack_topk(pooled.float(), K)


def _assert_close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    err = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    assert (err <= bound).all(), f"{what}: max abs err {err.max().item():.3g}"


def _rel_rms(got, want):
    return (
        (got.double() - want.double()).pow(2).mean().sqrt() / want.double().pow(2).mean().sqrt().clamp(min=1e-30)
    ).item()


@pytest.mark.parametrize("B,T,d,m", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b_dec", [True, False])
def test_pooled_features_match_reference(B, T, d, m, dtype, b_dec, monkeypatch, device):
    poison(monkeypatch, sc)
    sae = random_sae(d, m, device, b_dec=b_dec, dtype=dtype)
    hidden = torch.randn(B, T, d, device=device).to(dtype)
    mask = random_mask(B, T, device)
    got = sae_pooled_features(hidden, sae, mask=mask)
    want = reference.sae_pooled_features_ref(hidden.double(), mask, sae)
    assert got.shape == (B, m) and got.dtype == torch.float32
    _assert_close(got, want, dtype, "pooled")


def _sae_lens_jumprelu(sae: SAEWeights):
    """sae-lens' JumpReLUSAE in float64 with our encoder weights (decoder random: unused)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    cfg = JumpReLUSAEConfig(
        d_in=sae.d_in, d_sae=sae.width, dtype="float64", device="cpu", apply_b_dec_to_input=sae.apply_b_dec_to_input
    )
    model = JumpReLUSAE(cfg)
    with torch.no_grad():
        model.W_enc.copy_(sae.W_enc.double().cpu())
        model.b_enc.copy_(sae.b_enc.double().cpu())
        model.threshold.copy_(sae.threshold.double().cpu())
        if sae.b_dec is not None:
            model.b_dec.copy_(sae.b_dec.double().cpu())
    return model


@pytest.mark.parametrize("select", ["policy", "reference"])
@pytest.mark.parametrize("weighted", [False, True])
def test_constraint_matches_sae_lens_written_out(select, weighted, device):
    """D(y) against sae-lens' JumpReLUSAE.encode, then masked mean, top-k, MSE, written out plainly."""
    B, T, d, m, k = 3, 63, 60, 150, 7
    sae = random_sae(d, m, device)
    hidden = torch.randn(B, T, d, device=device)
    mask = random_mask(B, T, device)
    ref_idx, ref_val = _ref_cache(hidden, mask, sae, K=32)
    fw = torch.rand(m, device=device) * 2 if weighted else None
    got = sae_feature_mse(hidden, sae, ref_idx, ref_val, mask=mask, k=k, select=select, feature_weights=fw)

    lens = _sae_lens_jumprelu(sae)
    for b in range(B):
        feats = lens.encode(hidden[b].double().cpu())  # [T, m]
        sel = mask[b].cpu()
        p = feats[sel].mean(0)  # masked mean over the response
        rdense = torch.zeros(m, dtype=torch.float64)
        for i, v in zip(ref_idx[b].tolist(), ref_val[b].double().tolist()):
            if i >= 0:
                rdense[i] = v
        if select == "policy":
            chosen = p.topk(k).indices
        else:
            chosen = ref_idx[b, :k].long().cpu()
        w = fw.double().cpu()[chosen] if weighted else torch.ones(k, dtype=torch.float64)
        want = (w * (p[chosen] - rdense[chosen]) ** 2).sum() / k
        assert abs(got[b].item() - want.item()) <= 1e-5 * (1 + abs(want.item())), (b, got[b].item(), want.item())


@pytest.mark.parametrize("B,T,d,m", SHAPES)
@pytest.mark.parametrize("select", ["policy", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_constraint_forward_backward_match_reference(B, T, d, m, select, dtype, monkeypatch, device):
    poison(monkeypatch, sc)
    sae = random_sae(d, m, device, dtype=dtype)
    hidden = torch.randn(B, T, d, device=device).to(dtype)
    mask = random_mask(B, T, device)
    ref_idx, ref_val = _ref_cache(hidden.float(), mask, sae, K=40)
    fw = torch.rand(m, device=device) + 0.5
    for k in (1, 13):
        h = hidden.clone().requires_grad_()
        got = sae_feature_mse(h, sae, ref_idx, ref_val, mask=mask, k=k, select=select, feature_weights=fw)
        g = torch.randn(B, device=device)
        got.backward(g)
        href = hidden.double().requires_grad_()
        want = reference.sae_feature_mse_ref(href, mask, sae, ref_idx, ref_val, k, select, fw)
        want.backward(g.double())
        _assert_close(got, want, dtype, f"D (k={k})")
        assert h.grad.dtype == dtype
        # the gradient is proportional to p - p_ref, a difference that cancels in fp32: its relative error grows
        # with |p| / |p - p_ref| (the condition number), 1e-4 at this test's usual values
        pooled = reference.sae_pooled_features_ref(hidden.double(), mask, sae)
        idx = pooled.topk(k, 1).indices if select == "policy" else ref_idx[:, :k].long()
        p = pooled.gather(1, idx)
        diff = p - reference._dense_reference(ref_idx, ref_val, m, torch.float64).gather(1, idx)
        cond = (p.abs().max() / diff.pow(2).mean().sqrt()).item()
        # fp16: the gradient's own rounding (5e-3), and the same fp32 cancellation as above
        tol = max(1e-4 if dtype == torch.float32 else 5e-3, 2e-6 * cond)
        assert _rel_rms(h.grad, href.grad) < tol, f"grad k={k}, condition {cond:.3g}"
        # gradient only on response tokens
        assert (h.grad[~mask] == 0).all()


def test_k_equals_width_and_single_token(device):
    B, T, d, m = 2, 9, 20, 33
    sae = random_sae(d, m, device)
    hidden = torch.randn(B, T, d, device=device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[0, 4] = True
    mask[1, 2:9] = True
    ref_idx, ref_val = _ref_cache(hidden, mask, sae, K=m)
    for select in ("policy", "reference"):
        h = hidden.clone().requires_grad_()
        got = sae_feature_mse(h, sae, ref_idx, ref_val, mask=mask, k=m, select=select)
        got.sum().backward()
        href = hidden.double().requires_grad_()
        want = reference.sae_feature_mse_ref(href, mask, sae, ref_idx, ref_val, m, select)
        want.sum().backward()
        _assert_close(got, want, torch.float32, select)
        assert _rel_rms(h.grad, href.grad) < 1e-4


def test_policy_topk_properties(device):
    """Gradient reaches hidden only through the k selected features: scaling a non-selected feature's
    reference value changes nothing; the selection is the policy's top-k."""
    B, T, d, m, k = 2, 15, 24, 64, 5
    sae = random_sae(d, m, device)
    hidden = torch.randn(B, T, d, device=device)
    mask = random_mask(B, T, device)
    pooled = sae_pooled_features(hidden, sae, mask=mask)
    top = pooled.topk(k, dim=1)
    assert (top.values[:, :-1] >= top.values[:, 1:]).all()
    assert torch.equal(pooled.gather(1, top.indices), top.values)
    ref_idx, ref_val = pack_topk(pooled, m)
    d0 = sae_feature_mse(hidden, sae, ref_idx, ref_val, mask=mask, k=k)
    rounding = ((top.values - top.values.half().float()) ** 2).mean(1)  # cache values are stored in fp16
    assert torch.allclose(d0, rounding, rtol=1e-3, atol=1e-12)
    ref_val2 = ref_val.clone()
    ref_val2[:, k:] += 1.0  # only non-selected features moved
    d1 = sae_feature_mse(hidden, sae, ref_idx, ref_val2, mask=mask, k=k)
    assert torch.allclose(d0, d1, atol=1e-6)


def test_nan_propagates(device):
    B, T, d, m = 2, 8, 16, 32
    sae = random_sae(d, m, device)
    hidden = torch.randn(B, T, d, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    hidden[1, 3, 5] = float("nan")
    pooled = sae_pooled_features(hidden, sae, mask=mask)
    assert torch.isfinite(pooled[0]).all() and torch.isnan(pooled[1]).any()
    ref_idx, ref_val = pack_topk(pooled[:1].expand(B, m), 16)
    for select in ("policy", "reference"):
        D = sae_feature_mse(hidden, sae, ref_idx, ref_val, mask=mask, k=4, select=select)
        assert torch.isfinite(D[0]) and torch.isnan(D[1]), select


def test_dispatch_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    sae = random_sae(16, 40)
    hidden = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    got = sae_pooled_features(hidden, sae, mask=mask)
    assert torch.allclose(got.double(), reference.sae_pooled_features_ref(hidden.double(), mask, sae), atol=1e-5)


def test_launcher_equals_function_equals_public(device):
    B, T, d, m, k = 2, 11, 24, 50, 6
    sae = random_sae(d, m, device)
    hidden = torch.randn(B, T, d, device=device)
    mask = random_mask(B, T, device)
    ref_idx, ref_val = _ref_cache(hidden, mask, sae, K=16)
    spans = sc.Spans.from_mask(mask)
    flat = hidden.reshape(B * T, d)
    pooled = sc.sae_pool_fwd(flat, spans, sae)
    assert torch.equal(pooled, sae_pooled_features(hidden, sae, mask=mask))
    gathered = sc.sae_pool_fwd(flat, spans, sae, ref_idx[:, :k].long())
    assert torch.allclose(gathered, pooled.gather(1, ref_idx[:, :k].long()), atol=1e-6)
    a = sc.SAEFeatureMSEFunction.apply(flat, spans, sae, ref_idx, ref_val, k, "reference", None)
    b = sae_feature_mse(hidden, sae, ref_idx, ref_val, mask=mask, k=k, select="reference")
    assert torch.equal(a, b)


def _stream(S, d, device, dtype, max_len=40):
    """S responses of random lengths (one a single token) laid end to end in one flat stream, with 0-5
    non-response rows (prompts) before each: (hidden [N, d], spans [S, 2], padded hidden [S, T, d], mask [S, T])."""
    lengths = [1] + torch.randint(1, max_len, (S - 1,)).tolist()
    gaps = torch.randint(0, 6, (S,)).tolist()
    spans, pos = [], 0
    for n, g in zip(lengths, gaps):
        spans.append((pos + g, pos + g + n))
        pos += g + n
    hidden = torch.randn(pos + 3, d, device=device).to(dtype)
    T = max(lengths)
    padded = torch.zeros(S, T, d, device=device, dtype=dtype)
    mask = torch.zeros(S, T, dtype=torch.bool, device=device)
    for i, (a, b) in enumerate(spans):
        padded[i, : b - a] = hidden[a:b]
        mask[i, : b - a] = True
    return hidden, torch.tensor(spans, device=device), padded, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("select", ["policy", "reference"])
def test_varlen_matches_padded_and_reference(dtype, select, monkeypatch, device):
    """Flat rows + spans (a packed stream) give what the padded op gives on the same sequences, and match the
    float64 reference; rows outside every span get exactly zero gradient."""
    poison(monkeypatch, sc)
    S, d, m, k = 5, 36, 120, 9
    sae = random_sae(d, m, device, dtype=dtype)
    hidden, spans, padded, mask = _stream(S, d, device, dtype)
    pooled = sae_pooled_features(hidden, sae, spans=spans)
    _assert_close(pooled, reference.sae_pooled_features_spans_ref(hidden.double(), spans, sae), dtype, "pooled")
    assert torch.allclose(pooled, sae_pooled_features(padded, sae, mask=mask), rtol=1e-5, atol=1e-6)
    ref_idx, ref_val = _ref_cache(padded.float(), mask, sae, K=32)
    h = hidden.clone().requires_grad_()
    got = sae_feature_mse(h, sae, ref_idx, ref_val, k=k, select=select, spans=spans)
    g = torch.randn(S, device=device)
    got.backward(g)
    href = hidden.double().requires_grad_()
    want = reference.sae_feature_mse_spans_ref(href, spans, sae, ref_idx, ref_val, k, select)
    want.backward(g.double())
    _assert_close(got, want, dtype, "D")
    assert _rel_rms(h.grad, href.grad) < (1e-4 if dtype == torch.float32 else 5e-3)
    inside = torch.zeros(hidden.shape[0], dtype=torch.bool, device=device)
    for a, b in spans.tolist():
        inside[a:b] = True
    assert (h.grad[~inside] == 0).all()
    hp = padded.clone().requires_grad_()
    sae_feature_mse(hp, sae, ref_idx, ref_val, mask=mask, k=k, select=select).backward(g)
    assert torch.allclose(
        got, sae_feature_mse(padded, sae, ref_idx, ref_val, mask=mask, k=k, select=select), rtol=1e-5, atol=1e-7
    )
    for i, (a, b) in enumerate(spans.tolist()):
        assert torch.allclose(h.grad[a:b].float(), hp.grad[i, : b - a].float(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    "case,match",
    [
        ("float", "integer"),
        ("shape", r"\[S, 2\]"),
        ("outside", "outside"),
        ("empty", "empty"),
        ("overlap", "overlap"),
        ("rows", "ref_indices"),
    ],
)
def test_varlen_bad_spans(case, match):
    sae = random_sae(16, 40)
    hidden = torch.randn(20, 16)
    spans = torch.tensor([[2, 6], [8, 15]])
    idx, val = pack_topk(sae_pooled_features(hidden, sae, spans=spans), 20)
    kw = {}
    if case == "float":
        spans = spans.float()
    elif case == "shape":
        spans = spans[:, :1]
    elif case == "outside":
        spans = torch.tensor([[2, 6], [8, 21]])
    elif case == "empty":
        spans = torch.tensor([[2, 2], [8, 15]])
    elif case == "overlap":
        spans = torch.tensor([[2, 9], [8, 15]])
    elif case == "rows":
        idx, val = idx[:1], val[:1]
    with pytest.raises(ValueError, match=match):
        sae_feature_mse(hidden, sae, idx, val, k=4, spans=spans, **kw)


def test_one_entry_takes_mask_or_spans():
    sae = random_sae(16, 40)
    hidden, spans = torch.randn(20, 16), torch.tensor([[2, 6], [8, 15]])
    mask = torch.ones(1, 20, dtype=torch.bool)
    with pytest.raises(ValueError, match="not both"):
        sae_pooled_features(hidden[None], sae, mask=mask, spans=spans)
    with pytest.raises(ValueError, match="not neither"):
        sae_pooled_features(hidden, sae)
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        sae_pooled_features(hidden[None], sae, spans=spans)


def test_one_signature_per_op():
    """sae comes second and the layout is keyword-only: a positional mask is refused by Python, not taken for the
    SAE; the flat entry points of 0.1.0 are gone, not aliased."""
    import fpo_kernels

    sae = random_sae(16, 40)
    hidden, mask = torch.randn(1, 20, 16), torch.ones(1, 20, dtype=torch.bool)
    idx, val = pack_topk(sae_pooled_features(hidden, sae, mask=mask), 20)
    with pytest.raises(TypeError):
        sae_pooled_features(hidden, sae, mask)
    with pytest.raises(TypeError):
        sae_feature_mse(hidden, sae, idx, val, mask, 4)
    for old in (
        "sae_pooled_features_varlen",
        "sae_feature_mse_varlen",
        "sequence_logprobs_varlen",
        "sequence_logprobs_kl_varlen",
    ):
        assert not hasattr(fpo_kernels, old)


@pytest.mark.gpu
@pytest.mark.parametrize("select", ["policy", "reference"])
def test_bf16_on_gpu(select):
    B, T, d, m, k = 4, 300, 256, 4096, 50
    sae = random_sae(d, m, "cuda", dtype=torch.bfloat16)
    hidden = torch.randn(B, T, d, device="cuda").bfloat16()
    mask = random_mask(B, T, "cuda")
    ref_idx, ref_val = _ref_cache(hidden.float(), mask, sae, K=256)
    h = hidden.clone().requires_grad_()
    got = sae_feature_mse(h, sae, ref_idx, ref_val, mask=mask, k=k, select=select)
    g = torch.randn(B, device="cuda")
    got.backward(g)
    href = hidden.double().requires_grad_()
    want = reference.sae_feature_mse_ref(href, mask, sae, ref_idx, ref_val, k, select)
    want.backward(g.double())
    assert _rel_rms(got, want) < 2e-2
    assert _rel_rms(h.grad, href.grad) < 3e-2
    pooled = sae_pooled_features(hidden, sae, mask=mask)
    assert _rel_rms(pooled, reference.sae_pooled_features_ref(hidden.double(), mask, sae)) < 1e-2


# ---- bad input -------------------------------------------------------------------------------
def _valid(device="cpu"):
    sae = random_sae(16, 40, device)
    hidden = torch.randn(2, 6, 16, device=device)
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    idx, val = pack_topk(sae_pooled_features(hidden, sae, mask=mask), 20)
    return sae, hidden, mask, idx, val


@pytest.mark.parametrize(
    "case,match",
    [
        ("hidden_2d", "hidden"),
        ("d_mismatch", "d_in"),
        ("mask_shape", "mask"),
        ("k0", "k must"),
        ("k_big", "k must"),
        ("empty_row", "mask row 1"),
        ("idx_range", "ref_indices row 0"),
        ("idx_low", "outside"),
        ("ref_short", "fewer than k"),
        ("fw_len", "feature_weights"),
        ("fw_neg", "feature_weights"),
        ("val_shape", "ref_values"),
        ("select", "select"),
        ("idx_float", "integer"),
        ("not_sae", "SAEWeights"),
        ("ref_rows", "ref_indices"),
    ],
)
def test_bad_input(case, match):
    sae, hidden, mask, idx, val = _valid()
    kw = dict(k=4, select="policy", feature_weights=None)
    args = [hidden, mask, sae, idx, val]
    if case == "hidden_2d":
        args[0] = hidden[0]
    elif case == "d_mismatch":
        args[0] = torch.randn(2, 6, 17)
    elif case == "mask_shape":
        args[1] = mask[:, :5]
    elif case == "k0":
        kw["k"] = 0
    elif case == "k_big":
        kw["k"] = 41
    elif case == "empty_row":
        args[1] = mask.clone()
        args[1][1] = False
    elif case == "idx_range":
        args[3] = idx.clone()
        args[3][0, 2] = 40
    elif case == "idx_low":
        args[3] = idx.clone()
        args[3][1, 0] = -2
    elif case == "ref_short":
        args[3] = idx.clone()
        args[3][1, 2] = -1
        kw["select"] = "reference"
    elif case == "fw_len":
        kw["feature_weights"] = torch.ones(39)
    elif case == "fw_neg":
        kw["feature_weights"] = -torch.ones(40)
    elif case == "val_shape":
        args[4] = val[:, :3]
    elif case == "select":
        kw["select"] = "both"
    elif case == "idx_float":
        args[3] = idx.float()
    elif case == "not_sae":
        args[2] = object()
    elif case == "ref_rows":
        args[3], args[4] = idx[:1], val[:1]
    hidden, mask, sae, idx, val = args
    with pytest.raises(ValueError, match=match):
        sae_feature_mse(hidden, sae, idx, val, mask=mask, **kw)


def test_sae_weights_from_files(tmp_path):
    """from_file: sae-lens directory, bare safetensors and a Gemma Scope params.npz all give one encoder."""
    import json

    import numpy as np
    from safetensors.torch import save_file

    d, m = 12, 30
    W, b, th, bd = torch.randn(d, m), torch.randn(m), torch.rand(m), torch.randn(d)
    (tmp_path / "lens").mkdir()
    save_file(
        {"W_enc": W, "b_enc": b, "threshold": th, "b_dec": bd, "W_dec": W.t().contiguous()},
        str(tmp_path / "lens" / "sae_weights.safetensors"),
    )
    (tmp_path / "lens" / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "apply_b_dec_to_input": True}))
    a = SAEWeights.from_file(tmp_path / "lens")
    assert a.apply_b_dec_to_input and torch.equal(a.W_enc, W)
    np.savez(tmp_path / "params.npz", W_enc=W.numpy(), b_enc=b.numpy(), threshold=th.numpy(), b_dec=bd.numpy())
    g = SAEWeights.from_file(tmp_path / "params.npz")
    assert not g.apply_b_dec_to_input and torch.equal(g.threshold, th)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(ValueError, match="could not be read"):
        SAEWeights.from_file(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="b_enc must have shape"):
        SAEWeights.from_tensors(W, b[:5], th)


def test_sae_weights_from_sae_lens_and_shipped_sae():
    import os

    from sae_lens import SAE

    path = os.path.join(ROOT, "assets", "sae-smollm2-135m-layer15")
    lens = SAE.load_from_disk(path)
    ours = SAEWeights.from_sae_lens(lens)
    disk = SAEWeights.from_file(path)
    assert torch.equal(ours.W_enc_t, disk.W_enc_t) and ours.fingerprint() == disk.fingerprint()
    x = torch.randn(5, 576)
    with torch.no_grad():
        assert torch.allclose(reference.sae_encode_ref(x, ours), lens.encode(x), atol=1e-4)


def test_sae_weights_from_sae_lens_standard_relu():
    """A standard (ReLU) sae-lens SAE is a JumpReLU with threshold 0."""
    from sae_lens import StandardSAE, StandardSAEConfig

    lens = StandardSAE(StandardSAEConfig(d_in=16, d_sae=40, dtype="float32", device="cpu", apply_b_dec_to_input=True))
    with torch.no_grad():
        for p in (lens.W_enc, lens.b_enc, lens.b_dec):
            p.normal_()
    ours = SAEWeights.from_sae_lens(lens)
    assert (ours.threshold == 0).all() and ours.apply_b_dec_to_input
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(reference.sae_encode_ref(x, ours), lens.encode(x), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_keeps_tiny_gradients(dtype, device):
    """Training-sized gradients: 2/k (p - p_ref) / n times the upstream gradient is ~1e-9. float16 cannot
    hold that (the output is as small as the per-feature coefficients), so float16 training scales the loss
    (GradScaler, 2^16); in that regime, and in float32 unscaled, the kernel's gradient matches the reference."""
    B, T, d, m, k = 2, 40, 32, 96, 8
    sae = random_sae(d, m, device, dtype=dtype)
    hidden = torch.randn(B, T, d, device=device).to(dtype)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    ref_idx, ref_val = _ref_cache(hidden.float(), mask, sae, K=32, noise=0.002)
    h = hidden.clone().requires_grad_()
    g = torch.full((B,), 1e-3 * (2.0**16 if dtype == torch.float16 else 1.0), device=device)
    sae_feature_mse(h, sae, ref_idx, ref_val, mask=mask, k=k, select="reference").backward(g)
    href = hidden.double().requires_grad_()
    reference.sae_feature_mse_ref(href, mask, sae, ref_idx, ref_val, k, "reference").backward(g.double())
    assert href.grad.abs().max() < (
        1e-4 if dtype == torch.float32 else 1e-2
    )  # the regime under test (seen: 3e-8, 2e-3)
    # p - p_ref is tiny here (the reference is the policy plus 0.2% noise): fp32 cancellation sets 1e-3
    assert _rel_rms(h.grad, href.grad) < (1e-3 if dtype == torch.float32 else 5e-3)


def test_unchecked_out_of_range_cache_indices_are_never_read(device):
    """check_inputs=False skips the index check; the kernels still never read outside the SAE: a row with a
    wrong cached index gets NaN (loud), the others are exact."""
    S, d, m, k = 3, 16, 40, 4
    sae = random_sae(d, m, device)
    hidden, spans, padded, mask = _stream(S, d, device, torch.float32)
    idx, val = pack_topk(sae_pooled_features(hidden, sae, spans=spans), 8)
    idx = idx.int()
    idx[1, 2] = m + 7
    for select in ("reference", "policy"):
        got = sae_feature_mse(hidden, sae, idx, val, k=k, select=select, check_inputs=False, spans=spans)
        assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2]]).all(), select
        want = reference.sae_feature_mse_spans_ref(hidden.double(), spans, sae, idx.clamp(max=m - 1), val, k, select)
        assert torch.allclose(got[[0, 2]].double(), want[[0, 2]], atol=1e-6), select


def test_pin_autotune_keeps_one_config(monkeypatch):
    """Data-parallel runs pin every autotuned kernel of the table to its first config (ranks must pick the
    same tiles)."""
    import triton

    from fpo_kernels import pin_autotune
    from fpo_kernels.kernels import all_kernels

    tuned = [k for k in all_kernels() if k.configs]
    assert {k.name for k in tuned} == {"_sae_pool_fwd_kernel", "_sae_gate_kernel", "_sae_dh_kernel"}
    for kernel in tuned:
        first = kernel.jit.configs[0]
        monkeypatch.setattr(kernel.jit, "configs", [first, triton.Config({}, num_warps=8)])
    pin_autotune()
    assert all(k.jit.configs == [k.jit.configs[0]] and k.jit.configs[0].num_warps != 8 for k in tuned)
