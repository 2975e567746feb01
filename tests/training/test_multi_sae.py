"""Several SAEs at once on the demo model: the shipped JumpReLU SAE at layer 15 and a TopK SAE (sparsify format,
written by the test) at layer 8. One precompute caches both, each equal to its own single-SAE cache; a run with
both trains, and its D is the weighted sum of the separate constraints; bad input is refused by name."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fpo import assets
from fpo.config import TrainConfig
from fpo.model import load_model, load_tokenizer
from fpo.packing import collate
from fpo.pairs import load_pairs, tokenize_pairs
from fpo.precompute import precompute
from fpo.reference_cache import CacheMismatchError, ReferenceCache
from fpo.sae import SAESpec
from fpo.step import PolicyStats
from fpo.train import train
from fpo_kernels import SAEWeights

pytestmark = pytest.mark.slow
LEN = dict(max_length=96, max_prompt_length=48)
LAYER_B, WIDTH_B, K_B = 8, 384, 24


@pytest.fixture(scope="module")
def assets_dir(tmp_path_factory):
    """The demo model, a sparsify TopK SAE on its layer 8, six pairs, and caches: both SAEs in one, each alone."""
    import tiny as t
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("multi")
    model = assets.ensure_demo_model()
    d = load_model(model).config.hidden_size
    g = torch.Generator().manual_seed(1)
    topk = root / f"layers.{LAYER_B}"  # sparsify names each SAE's folder after its hookpoint
    topk.mkdir()
    save_file(
        {
            "encoder.weight": torch.randn(WIDTH_B, d, generator=g) / d**0.5,
            "encoder.bias": torch.randn(WIDTH_B, generator=g) * 0.1,
            "W_dec": torch.randn(WIDTH_B, d, generator=g),
            "b_dec": torch.randn(d, generator=g) * 0.1,
        },
        str(topk / "sae.safetensors"),
    )
    (topk / "cfg.json").write_text(json.dumps({"k": K_B, "num_latents": WIDTH_B, "d_in": d}))
    pairs = t.make_pairs(str(root / "pairs.jsonl"), n=6)
    out = {"model": model, "sae_a": assets.DEMO_SAE, "sae_b": str(topk), "pairs": pairs, "root": root}
    os.environ["TRITON_INTERPRET"], old = "0", os.environ.get("TRITON_INTERPRET")  # the kernels have own tests
    try:
        for name, saes in (("both", [assets.DEMO_SAE, str(topk)]), ("a", [assets.DEMO_SAE]), ("b", [str(topk)])):
            out["cache_" + name] = str(root / f"cache-{name}")
            precompute(
                model, pairs, out["cache_" + name], sae=saes, cache_k=32, micro_batch_size=3, progress=False, **LEN
            )
    finally:
        os.environ["TRITON_INTERPRET"] = old or "0"
    return out


def test_one_cache_holds_each_sae_as_its_own_cache_does(assets_dir):
    both, a, b = (ReferenceCache(assets_dir["cache_" + n]) for n in ("both", "a", "b"))
    entries = both.saes
    assert [(e["layer"], e["activation"]) for e in entries] == [(15, "jumprelu"), (LAYER_B, "topk")]
    assert [e["fingerprint"] for e in entries] == [a.saes[0]["fingerprint"], b.saes[0]["fingerprint"]]
    key = entries[1]["key"]
    assert key and entries[0]["key"] == ""
    for side in ("chosen", "rejected"):
        assert torch.equal(both.data[f"{side}_idx"], a.data[f"{side}_idx"])
        assert torch.equal(both.data[f"{side}_val"], a.data[f"{side}_val"])
        assert torch.equal(both.data[f"{side}_idx{key}"], b.data[f"{side}_idx"])
        assert torch.equal(both.data[f"{side}_val{key}"], b.data[f"{side}_val"])
    # each SAE's recorded feature scale (constraint_norm 'ref') is its own
    assert both.feature_scale(16, key) == pytest.approx(b.feature_scale(16))


def test_two_saes_train_and_d_is_the_weighted_sum(assets_dir, tmp_path):
    weights = (1.0, 0.5)
    cfg = dict(
        method="fpo",
        model=assets_dir["model"],
        dataset=assets_dir["pairs"],
        cache=assets_dir["cache_both"],
        sae=[assets_dir["sae_a"], assets_dir["sae_b"]],
        sae_weight=list(weights),
        batch_size=2,
        micro_batch_size=2,
        max_steps=3,
        lr=5e-4,
        warmup_steps=0,
        k=16,
        alpha=50.0,
        log_every=1,
        progress=False,
        **LEN,
    )
    out = train(cfg, output_dir=str(tmp_path / "both"), log=lambda *a: None)
    hist = [json.loads(line) for line in open(tmp_path / "both" / "metrics.jsonl")]
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert hist[-1]["d_chosen"] > 0

    # the trained policy's D with both SAEs = weight_a x D_a + weight_b x D_b, each against its own cache
    model = load_model(out["final"])
    tok = load_tokenizer(assets_dir["model"])
    items = tokenize_pairs(load_pairs(assets_dir["pairs"], max_pairs=3), tok, **LEN)
    batch = collate(items, "share-prompt", tok.pad_token_id)
    sae_a, sae_b = SAEWeights.from_file(assets_dir["sae_a"]), SAEWeights.from_file(assets_dir["sae_b"])

    def feats(cache, key=""):
        ref = ReferenceCache(cache).lookup(batch.ids)
        return (
            torch.cat([ref["chosen_idx" + key], ref["rejected_idx" + key]]),
            torch.cat([ref["chosen_val" + key], ref["rejected_val" + key]]),
        )

    key = ReferenceCache(assets_dir["cache_both"]).saes[1]["key"]

    def d_of(**kw):
        stats = PolicyStats(model, k=16, **{k: v for k, v in kw.items() if k != "refs"})
        try:
            with torch.no_grad():
                return stats(batch, ref_features=kw["refs"]).d
        finally:
            stats.remove_hooks()

    d = d_of(
        saes=[SAESpec(sae_a, 15, weights[0], "sae"), SAESpec(sae_b, LAYER_B, weights[1], "sae")],
        refs=[feats(assets_dir["cache_both"]), feats(assets_dir["cache_both"], key)],
    )
    parts = [
        d_of(saes=[SAESpec(sae_a, 15, 1.0, "sae")], refs=[feats(assets_dir["cache_a"])]),
        d_of(saes=[SAESpec(sae_b, LAYER_B, 1.0, "sae")], refs=[feats(assets_dir["cache_b"])]),
    ]
    assert parts[0].min() > 0 and parts[1].min() > 0
    assert torch.allclose(d, weights[0] * parts[0] + weights[1] * parts[1], rtol=1e-5, atol=1e-9)

    # fpo eval with both SAEs reports the same weighted sum, and each SAE's own d
    from fpo.evaluate import evaluate

    kw = dict(cache=assets_dir["cache_both"], k=16, device="cpu", max_pairs=3, log=lambda *a: None, **LEN)
    both = evaluate(
        out["final"],
        assets_dir["pairs"],
        sae=[assets_dir["sae_a"], assets_dir["sae_b"]],
        sae_weight=list(weights),
        **kw,
    )
    alone = [
        evaluate(out["final"], assets_dir["pairs"], sae=x, **kw)["d"]
        for x in (assets_dir["sae_a"], assets_dir["sae_b"])
    ]
    assert both["d"] == pytest.approx(weights[0] * alone[0] + weights[1] * alone[1], rel=1e-5)
    assert both[f"d[layers.{LAYER_B}@{LAYER_B}]"] == pytest.approx(alone[1], rel=1e-6)
    assert both["d"] == pytest.approx(float((weights[0] * parts[0] + weights[1] * parts[1]).mean()), rel=1e-4)

    # constraint_norm "ref": each SAE's D divided by its own recorded scale
    from fpo.train import Trainer

    trainer = Trainer(
        TrainConfig(**{**cfg, "constraint_norm": "ref", "output_dir": str(tmp_path / "ref")}), log=lambda *a: None
    )
    try:
        cache = ReferenceCache(assets_dir["cache_both"])
        assert [(x.weight, x.scale) for x in trainer.policy.saes] == [
            (weights[0], cache.feature_scale(16)),
            (weights[1], cache.feature_scale(16, key)),
        ]
        assert cache.feature_scale(16) != cache.feature_scale(16, key)
    finally:
        trainer.close()

    # the second SAE changes the run: the first SAE alone trains other weights
    alone = train(
        {**cfg, "cache": assets_dir["cache_a"], "sae": assets_dir["sae_a"], "sae_weight": None},
        output_dir=str(tmp_path / "a"),
        log=lambda *a: None,
    )
    w_both = load_model(out["final"]).model.layers[3].mlp.down_proj.weight
    w_alone = load_model(alone["final"]).model.layers[3].mlp.down_proj.weight
    assert not torch.equal(w_both, w_alone)


def test_bad_multi_sae_input(assets_dir, tmp_path):
    cfg = dict(
        method="fpo",
        model=assets_dir["model"],
        dataset=assets_dir["pairs"],
        batch_size=2,
        micro_batch_size=2,
        max_steps=1,
        k=16,
        progress=False,
        output_dir=str(tmp_path / "o"),
        **LEN,
    )
    # a cache without an SAE the run asks for
    with pytest.raises(CacheMismatchError, match=f"no features for SAE 'layers.{LAYER_B}' at layer {LAYER_B}"):
        train(cfg, cache=assets_dir["cache_a"], sae=[assets_dir["sae_a"], assets_dir["sae_b"]], log=lambda *a: None)
    # the same SAE twice on one layer: its cached features could not be told apart
    with pytest.raises(ValueError, match="two SAEs named 'layers.8' read layer 8"):
        precompute(
            assets_dir["model"],
            assets_dir["pairs"],
            str(tmp_path / "c"),
            sae=[assets_dir["sae_b"], assets_dir["sae_b"]],
            progress=False,
            **LEN,
        )
    with pytest.raises(ValueError, match="sae_weight gives 3 values for 2 SAEs"):
        train(
            cfg,
            cache=assets_dir["cache_both"],
            sae=[assets_dir["sae_a"], assets_dir["sae_b"]],
            sae_weight=[1.0, 1.0, 1.0],
            log=lambda *a: None,
        )
    with pytest.raises(ValueError, match="sae_layer gives 3 values for 2 SAEs"):  # as train says it
        precompute(
            assets_dir["model"],
            assets_dir["pairs"],
            str(tmp_path / "c"),
            sae=[assets_dir["sae_a"], assets_dir["sae_b"]],
            sae_layer=[3, 3, 3],
            progress=False,
            **LEN,
        )
    # eval refuses k above the cache's cache_k, as train does
    from fpo.evaluate import evaluate

    with pytest.raises(ValueError, match=r"k \(50\) exceeds the cache's cache_k \(32\)"):
        evaluate(
            assets_dir["model"],
            assets_dir["pairs"],
            cache=assets_dir["cache_both"],
            sae=assets_dir["sae_b"],
            k=50,
            device="cpu",
            log=lambda *a: None,
            **LEN,
        )
    # the command line: --sae repeats, --sae-layer once per --sae
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fpo.cli",
            "precompute",
            "--model",
            assets_dir["model"],
            "--dataset",
            assets_dir["pairs"],
            "--out",
            str(tmp_path / "c"),
            "--sae",
            assets_dir["sae_a"],
            "--sae",
            assets_dir["sae_b"],
            "--sae-layer",
            "3",
            "--sae-layer",
            "3",
            "--sae-layer",
            "3",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert r.returncode != 0 and "sae_layer gives 3 values for 2 SAEs" in r.stderr
    assert not os.path.exists(tmp_path / "c" / "meta.json")
