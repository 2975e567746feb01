"""Every public SAE architecture through our encoder and the fused constraint: TopK (sae-lens, sparsify),
BatchTopK and Matryoshka-BatchTopK (their inference threshold), standard and JumpReLU, against sae-lens' own
encode and a plain float64 statement of TopK written here; ties, k = 1 and k = width, gradients, bad input."""

import json

import pytest
import torch
from helpers import random_mask

import fpo_kernels.sae_topk as stk
from fpo_kernels import SAEWeights, pack_topk, reference, sae_feature_mse, sae_pooled_features

D, M = 20, 44


def _topk64(hidden, sae_tensors, k):
    """TopK written out in float64: z = (h - b_dec) W + b; per token, ReLU of the k largest, 0 elsewhere."""
    W, b, bd = sae_tensors
    z = (hidden.double() - bd.double()) @ W.double() + b.double()
    out = torch.zeros_like(z)
    vals, ids = torch.topk(z, k, dim=-1)
    return out.scatter(-1, ids, vals.clamp(min=0))


def _random_topk(k, device, repeat=False):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    W = torch.randn(D, M, generator=g) / D**0.5
    b = torch.randn(M, generator=g) * 0.1
    bd = torch.randn(D, generator=g) * 0.2
    if repeat:  # exact ties: columns 1 and 2 are copies of column 0
        W[:, 1:3] = W[:, :1]
        b[1:3] = b[0]
    sae = SAEWeights.from_tensors(W.to(device), b.to(device), None, bd.to(device), True, topk=k)
    return sae, (W.to(device), b.to(device), bd.to(device))


@pytest.mark.parametrize("k", [1, 7, M])
def test_topk_pooled_and_constraint_match_float64(k, device):
    B, T = 4, 13
    sae, tensors = _random_topk(k, device)
    hidden = torch.randn(B, T, D, device=device)
    mask = random_mask(B, T, device)  # one-token row, full row, random spans
    feats = _topk64(hidden, tensors, k)  # [B, T, m]
    assert ((feats != 0).sum(-1) <= k).all()
    want = (feats * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    got = sae_pooled_features(hidden, sae, mask=mask)
    assert torch.allclose(got.double(), want, atol=1e-5)
    ref_idx, ref_val = pack_topk(want.float() + 0.01 * torch.rand_like(want.float()), 16)
    for select in ("policy", "reference"):
        kk = min(5, k) if select == "reference" else 5
        h = hidden.clone().requires_grad_()
        D_got = sae_feature_mse(h, sae, ref_idx, ref_val, mask=mask, k=kk, select=select)
        g = torch.randn(B, device=device)
        D_got.backward(g)
        h64 = hidden.double().requires_grad_()
        f64 = _topk64(h64, tensors, k)
        p64 = (f64 * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        idx = p64.detach().topk(kk, 1).indices if select == "policy" else ref_idx[:, :kk].long()
        dense = reference._dense_reference(ref_idx, ref_val, M, torch.float64)
        D_want = ((p64.gather(1, idx) - dense.gather(1, idx)) ** 2).sum(1) / kk
        D_want.backward(g.double())
        assert torch.allclose(D_got.double(), D_want, rtol=1e-4, atol=1e-8), select
        err = (h.grad.double() - h64.grad).norm() / h64.grad.norm().clamp(min=1e-30)
        diff = p64.gather(1, idx) - dense.gather(1, idx)  # the gradient scales with it: fp32 cancels in it
        cond = (p64.gather(1, idx).abs().max() / diff.pow(2).mean().sqrt()).item()
        assert err < max(1e-4, 2e-6 * cond), (select, err.item(), cond)
        assert (h.grad[~mask] == 0).all()


def test_topk_varlen_equals_padded_and_ties_keep_exactly_k(device):
    """Repeated columns tie exactly: each token still keeps exactly k features (torch.topk's count), and the
    varlen form over a packed stream equals the padded one."""
    k = 4
    sae, tensors = _random_topk(k, device, repeat=True)
    hidden = torch.randn(3, 9, D, device=device)
    hidden[0, :, :] = 0  # z = b everywhere: ties at columns 0, 1, 2
    mask = torch.ones(3, 9, dtype=torch.bool, device=device)
    feats = _topk64(hidden, tensors, k)
    assert ((feats != 0).sum(-1) <= k).all()
    kept, _ = (
        stk.topk_pool_fwd(
            hidden.reshape(-1, D),
            torch.arange(27, device=device),
            torch.arange(3, device=device).repeat_interleave(9),
            3,
            torch.full((3,), 1 / 9),
            sae,
        )[1],
        None,
    )
    assert kept.shape == (27, k) and all(len(set(r.tolist())) == k for r in kept)
    # chunks of 5 rows (chunks split sequences) pool as one chunk does
    args = (
        hidden.reshape(-1, D),
        torch.arange(27, device=device),
        torch.arange(3, device=device).repeat_interleave(9),
        3,
        torch.full((3,), 1 / 9, device=device),
        sae,
    )
    assert torch.allclose(stk.topk_pool_fwd(*args)[0], stk.topk_pool_fwd(*args, chunk_rows=5)[0], atol=1e-6)
    padded = sae_pooled_features(hidden, sae, mask=mask)
    # the tied group shares its total whichever copies torch.topk keeps
    want = (feats * mask[..., None]).sum(1) / 9
    assert torch.allclose(padded[:, :3].sum(1).double(), want[:, :3].sum(1), atol=1e-5)
    assert torch.allclose(padded[:, 3:].double(), want[:, 3:], atol=1e-5)
    flat = torch.cat([torch.randn(2, D, device=device), hidden[1], torch.randn(3, D, device=device), hidden[2]])
    spans = torch.tensor([[2, 11], [14, 23]])
    assert torch.allclose(sae_pooled_features(flat, sae, spans=spans), padded[1:], atol=1e-6)
    ref_idx, ref_val = pack_topk(padded[1:], 8)
    a = sae_feature_mse(flat, sae, ref_idx, ref_val, k=3, spans=spans)
    b = sae_feature_mse(hidden[1:], sae, ref_idx, ref_val, mask=mask[1:], k=3)
    assert torch.allclose(a, b, atol=1e-7)


# ---- sae-lens and sparsify checkpoints --------------------------------------------------------------
def _fill(lens):
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_(0, 0.3)
    return lens


def test_sae_lens_topk_folder_and_object(tmp_path):
    from sae_lens import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

    x = torch.randn(6, D)
    lens = _fill(TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=5, dtype="float32", device="cpu", apply_b_dec_to_input=True)))
    lens.save_model(str(tmp_path / "topk"))
    for ours in (SAEWeights.from_sae_lens(lens), SAEWeights.from_file(tmp_path / "topk")):
        assert ours.activation == "topk" and ours.k == 5
        with torch.no_grad():
            assert torch.allclose(reference.sae_encode_ref(x, ours), lens.encode(x), atol=1e-5)
    # a decoder-norm rescaled TopK (sae-lens' training default): folded into the encoder, from object or folder
    train = _fill(
        TopKTrainingSAE(
            TopKTrainingSAEConfig(
                d_in=D, d_sae=M, k=5, dtype="float32", device="cpu", rescale_acts_by_decoder_norm=True
            )
        )
    )
    assert train.cfg.rescale_acts_by_decoder_norm
    with torch.no_grad():
        assert torch.allclose(reference.sae_encode_ref(x, SAEWeights.from_sae_lens(train)), train.encode(x), atol=1e-5)
        train.save_model(str(tmp_path / "rescaled"))
        assert torch.allclose(
            reference.sae_encode_ref(x, SAEWeights.from_file(tmp_path / "rescaled")), train.encode(x), atol=1e-5
        )


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka"])
def test_sae_lens_batchtopk_inference_threshold(kind, tmp_path):
    from sae_lens import (
        SAE,
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )

    common = dict(d_in=D, d_sae=M, k=5, dtype="float32", device="cpu")
    lens = _fill(
        BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
        if kind == "batchtopk"
        else MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=[11, M], **common))
    )
    lens.topk_threshold.fill_(0.4)
    ours = SAEWeights.from_sae_lens(lens)  # the training object: its global threshold
    assert ours.activation == "batchtopk" and torch.allclose(ours.threshold, torch.full((M,), 0.4))
    lens.save_inference_model(str(tmp_path / kind))  # saved for inference: a JumpReLU
    disk = SAEWeights.from_file(tmp_path / kind)
    inference = SAE.load_from_disk(str(tmp_path / kind))
    x = torch.randn(6, D)
    with torch.no_grad():
        assert torch.allclose(reference.sae_encode_ref(x, disk), inference.encode(x), atol=1e-5)
        assert torch.allclose(reference.sae_encode_ref(x, ours), inference.encode(x), atol=1e-5)


def test_sparsify_folder(tmp_path):
    """EleutherAI sparsify: cfg.json with k, sae.safetensors with encoder.weight [m, d], encoder.bias, b_dec
    (subtracted from the input); ReLU, then the top k."""
    from safetensors.torch import save_file

    k = 6
    enc, bias, bd = torch.randn(M, D) / D**0.5, torch.randn(M) * 0.1, torch.randn(D) * 0.2
    folder = tmp_path / "layers.7"
    folder.mkdir()
    save_file(
        {"encoder.weight": enc, "encoder.bias": bias, "W_dec": torch.randn(M, D), "b_dec": bd},
        str(folder / "sae.safetensors"),
    )
    (folder / "cfg.json").write_text(
        json.dumps({"k": k, "expansion_factor": 2, "normalize_decoder": True, "num_latents": M, "d_in": D})
    )
    ours = SAEWeights.from_file(folder)
    x = torch.randn(10, D, dtype=torch.float64)
    pre = torch.relu((x - bd.double()) @ enc.double().t() + bias.double())  # sparsify's pre_acts
    vals, ids = pre.topk(k, dim=-1)
    want = torch.zeros_like(pre).scatter(-1, ids, vals)
    assert ours.activation == "topk" and ours.k == k and ours.apply_b_dec_to_input
    assert torch.allclose(reference.sae_encode_ref(x, ours), want, atol=1e-10)
    from fpo.sae import load_sae

    sae, layer, _ = load_sae(str(folder))
    assert layer == 7 and sae.k == k


def test_bad_sae_checkpoints(tmp_path):
    from safetensors.torch import save_file

    W, b = torch.randn(D, M), torch.randn(M)
    with pytest.raises(ValueError, match="k in \\[1, 44\\]"):
        SAEWeights.from_tensors(W, b, topk=M + 1)
    for arch in ("gated", "topk"):
        folder = tmp_path / arch
        folder.mkdir()
        save_file({"W_enc": W, "b_enc": b, "b_dec": torch.zeros(D)}, str(folder / "sae_weights.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({"architecture": arch, "d_in": D, "d_sae": M}))
        with pytest.raises(ValueError, match="gated" if arch == "gated" else "no k"):
            SAEWeights.from_file(folder)
    folder = tmp_path / "sparsify"
    folder.mkdir()
    save_file(
        {"encoder.weight": W.t().contiguous(), "encoder.bias": b, "b_dec": torch.zeros(D)},
        str(folder / "sae.safetensors"),
    )
    (folder / "cfg.json").write_text(json.dumps({"expansion_factor": 2}))
    with pytest.raises(ValueError, match="no k"):
        SAEWeights.from_file(folder)
    a = SAEWeights.from_tensors(W, b, topk=5)
    assert (
        a.fingerprint()
        != SAEWeights.from_tensors(W, b, topk=6).fingerprint()
        != SAEWeights.from_tensors(W, b).fingerprint()
    )


@pytest.mark.parametrize("tuple_form", [False, True])
def test_load_sae_release_id_follows_sae_lens_6(monkeypatch, tuple_form):
    """`release:id` goes through SAE.from_pretrained, which returns the SAE alone in sae-lens 6 (the older tuple
    form is still read); the layer comes from the hook name. The hub is replaced by a local SAE here."""
    import sae_lens
    from sae_lens import TopKSAE, TopKSAEConfig

    from fpo.sae import load_sae

    lens = _fill(
        TopKSAE(
            TopKSAEConfig(
                d_in=D,
                d_sae=M,
                k=3,
                dtype="float32",
                device="cpu",
                metadata=sae_lens.saes.sae.SAEMetadata(hook_name="blocks.9.hook_resid_post"),
            )
        )
    )
    asked = []

    def from_pretrained(release, sae_id, device="cpu"):
        asked.append((release, sae_id))
        return (lens, {}, None) if tuple_form else lens

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", staticmethod(from_pretrained))
    sae, layer, site = load_sae("some_release:blocks.9.hook_resid_post__trainer_0")
    assert asked == [("some_release", "blocks.9.hook_resid_post__trainer_0")]
    assert layer == 9 and site == "resid_post" and sae.activation == "topk" and sae.k == 3
    x = torch.randn(5, D)
    with torch.no_grad():
        assert torch.allclose(reference.sae_encode_ref(x, sae), lens.encode(x), atol=1e-5)


def test_pooling_of_kept_pairs_matches_a_dense_sum(device):
    """The sort-and-prefix-sum pooling against a float64 dense accumulation written out here; no rows, no pooled
    features."""
    n, k, m, S = 60, 5, 9, 4
    kept = torch.stack([torch.randperm(m)[:k] for _ in range(n)]).int().to(device)
    vals = torch.rand(n, k, device=device) * (torch.rand(n, k, device=device) > 0.3)  # some kept values ReLU'd to 0
    seq = torch.sort(torch.randint(0, S - 1, (n,))).values.to(device)  # the last sequence has no rows
    want = torch.zeros(S, m, dtype=torch.float64)
    for r in range(n):
        for j in range(k):
            want[seq[r], kept[r, j]] += vals[r, j].double().cpu()
    got = stk._pool_kept(kept, vals, seq, S, m)
    assert got.dtype == vals.dtype and torch.allclose(got.double().cpu(), want, rtol=1e-6, atol=1e-6)
    assert (got[S - 1] == 0).all()
    empty = stk._pool_kept(kept[:0], vals[:0], seq[:0], 2, m)
    assert empty.shape == (2, m) and (empty == 0).all()
