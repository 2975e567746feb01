"""The rows FPO's constraint pools over: ours (each response's own tokens, a mean) and the authors' code's
(`(features * mask).mean(1)` after the shift: the rows that predict the response, over the pair's padded length
less one), each against D computed by hand from per-row SAE features; and the cache and the run must agree."""

import json
import os

import pytest
import torch

from fpo.model import ActivationCapture, load_model, load_tokenizer, run_body
from fpo.packing import collate
from fpo.pairs import TokenizedPair, load_pairs, tokenize_pairs
from fpo.precompute import precompute
from fpo.sae import SAESpec, load_saes
from fpo.step import PolicyStats
from fpo.train import train
from fpo_kernels import pack_topk, reference

LEN = dict(max_length=64, max_prompt_length=32)


def test_rows_and_factor_by_hand():
    """One pair, prompt 3 tokens, chosen 2, rejected 4, padded to T = 7 (off layout): ours pools rows 3-4 and
    7+3..7+6; the authors' code pools the rows before them, with D x (n / (T - 1))^2."""
    items = [TokenizedPair(0, (1, 2, 3), (4, 5), (6, 7, 8, 9), 0)]
    batch = collate(items, "off", 0)
    assert batch.pool_spans.tolist() == [[3, 5], [10, 14]] and batch.d_factor is None
    assert torch.equal(batch.pool_spans, batch.spans)
    batch = collate(items, "off", 0, pooling="authors")
    spans, factor = batch.pool_spans, batch.d_factor
    assert spans.tolist() == [[2, 4], [9, 13]] and batch.spans.tolist() == [[3, 5], [10, 14]]
    assert factor.tolist() == pytest.approx([(2 / 6) ** 2, (4 / 6) ** 2])
    packed = collate(items, "pack", 0, pooling="authors")
    spans, factor = packed.pool_spans, packed.d_factor
    assert (spans[:, 1] - spans[:, 0]).tolist() == [2, 4] and factor.tolist() == pytest.approx(
        [(2 / 6) ** 2, (4 / 6) ** 2]
    )
    assert all(packed.input_ids.reshape(-1)[a] == 3 for a in spans[:, 0].tolist())  # the prompt's last token
    with pytest.raises(ValueError, match="packing 'off' or 'pack'"):
        collate(items, "share-prompt", 0, pooling="authors")


@pytest.mark.parametrize("pooling", ["response", "authors"])
def test_d_equals_the_hand_computation(tiny, pooling):
    model = load_model(tiny["model"])
    tok = load_tokenizer(tiny["model"])
    [spec] = load_saes([(tiny["sae"], None, 1.0)], "cpu")
    layer, sae, k = spec.layer, spec.sae, 8
    items = tokenize_pairs(load_pairs(tiny["pairs"], max_pairs=2), tok, **LEN)
    P = len(items)
    batch = collate(items, "off", tok.pad_token_id, pooling=pooling)
    # by hand: per-row features of the layer's residual stream, pooled as each convention says
    cap = ActivationCapture(model, layer)
    with torch.no_grad():
        run_body(model, batch.input_ids, batch.attention_mask)
    feats = reference.sae_encode_ref(cap.pop().double(), sae)  # [2P, T, width]
    cap.remove()
    pooled, scale = [], []
    for s in range(2 * P):
        it = items[s % P]
        lp, n = len(it.prompt_ids), len((it.chosen_ids, it.rejected_ids)[s // P])
        T_pair = lp + max(len(it.chosen_ids), len(it.rejected_ids))
        if pooling == "response":
            pooled.append(feats[s, lp : lp + n].mean(0))
            scale.append(1.0)
        else:  # (features * mask).mean(1): a sum over the predicting rows / (T - 1)
            pooled.append(feats[s, lp - 1 : lp - 1 + n].sum(0) / (T_pair - 1))
            scale.append(n / (T_pair - 1))
    pooled = torch.stack(pooled)
    g = torch.Generator().manual_seed(0)
    ref_means = (pooled / torch.tensor(scale, dtype=torch.float64)[:, None]) * (
        1 + 0.3 * torch.rand(pooled.shape, generator=g, dtype=torch.float64)
    )
    ref_idx, ref_val = pack_topk(ref_means.float(), 32, torch.float32)  # what the cache holds: means
    ref_dense = torch.zeros_like(pooled)
    for s in range(2 * P):
        keep = ref_idx[s] >= 0
        ref_dense[s, ref_idx[s][keep].long()] = ref_val[s][keep].double() * scale[s]
    # D: the mean squared difference over the policy's top-k pooled features
    want = torch.stack([((pooled[s] - ref_dense[s])[pooled[s].topk(k).indices] ** 2).mean() for s in range(2 * P)])
    stats = PolicyStats(model, saes=[SAESpec(sae, layer, 1.0, "sae")], k=k)
    with torch.no_grad():
        got = stats(batch, ref_features=[(ref_idx, ref_val)]).d
    stats.remove_hooks()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


def test_authors_pooling_trains_on_its_own_cache_only(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kw = dict(sae=tiny["sae"], cache_k=32, progress=False, log=lambda *a: None, packing="pack", **LEN)
    precompute(tiny["model"], tiny["pairs"], str(tmp_path / "authors"), pooling="authors", **kw)
    precompute(tiny["model"], tiny["pairs"], str(tmp_path / "ours"), **kw)
    cfg = dict(
        method="fpo",
        model=tiny["model"],
        dataset=tiny["pairs"],
        sae=tiny["sae"],
        batch_size=4,
        micro_batch_size=2,
        max_steps=2,
        lr=1e-3,
        warmup_steps=0,
        k=16,
        log_every=1,
        progress=False,
        packing="pack",
        pooling="authors",
        **LEN,
    )
    out = train(dict(cfg, cache=str(tmp_path / "authors"), output_dir=str(tmp_path / "run")), log=lambda *a: None)
    assert out["last"]["d_chosen"] > 0
    with pytest.raises(ValueError, match="rebuild it with `fpo precompute --pooling authors`"):
        train(dict(cfg, cache=str(tmp_path / "ours"), output_dir=str(tmp_path / "run2")), log=lambda *a: None)
    with pytest.raises(ValueError, match="needs --packing off or pack"):
        train(dict(cfg, packing="share-prompt", cache=str(tmp_path / "authors"), output_dir=str(tmp_path / "run3")))
    assert json.load(open(os.path.join(tmp_path / "ours", "settings.json")))["pooling"] == "response"  # always recorded
