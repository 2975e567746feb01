"""Feature protection end to end: the protected features' reference values added to a cache (against transformers'
hidden states and the float64 encoder, resumable, the rest of the cache untouched), the refusals, resume by
content, and a behavioural test: on a tiny model, the feature training moves most drifts at most half as much
under protection, in every seed, the other features within 1.5x."""

import json
import os
import shutil

import pytest
import tiny as t
import torch
from run_setup import LEN, QUIET, run_config

from fpo.config import TrainConfig
from fpo.feature_files import ProtectSet, read_protect_file, write_protect_file
from fpo.features import feature_report
from fpo.model import load_model, load_tokenizer
from fpo.pairs import load_pairs, tokenize_pairs
from fpo.precompute import precompute
from fpo.reference_cache import ReferenceCache
from fpo.sae import load_saes
from fpo.train import train
from fpo_kernels import reference


def _protect_file(tiny, path, ids, **kw):
    [spec] = load_saes([(tiny["sae"], None, 1.0)])
    n = len(ids)
    write_protect_file(path, ProtectSet(spec.sae.fingerprint(), tuple(ids), (1.0,) * n, ("both",) * n, **kw))
    return str(path)


def _cache(tiny, out, **kw):
    kw = {**QUIET, **kw}
    precompute(tiny["model"], tiny["pairs"], str(out), sae=tiny["sae"], cache_k=32, progress=False, **LEN, **kw)
    return str(out)


def test_precompute_adds_exact_values_and_keeps_the_rest(tiny, tmp_path):
    cache = _cache(tiny, tmp_path / "c", shard_rows=6)
    before = {n: open(os.path.join(cache, n), "rb").read() for n in os.listdir(cache) if n.startswith("shard-")}
    ids = [1, 5, 9, 150]
    protect = _protect_file(tiny, tmp_path / "p.json", ids)
    said = []
    _cache(tiny, tmp_path / "c", shard_rows=6, protect=protect, log=said.append)
    assert any("adding the protected features' values only" in s for s in said)
    after = {n: open(os.path.join(cache, n), "rb").read() for n in os.listdir(cache) if n.startswith("shard-")}
    assert after == before  # the rest of the cache is as it was
    rc = ReferenceCache(cache)
    assert rc.protect_entry["ids"] == ids and len(rc.protect_entry["shards"]) == 3
    # against transformers' hidden states and the float64 encoder, every response, zeros included
    [spec] = load_saes([(tiny["sae"], None, 1.0)])
    model = load_model(tiny["model"]).double()
    items = tokenize_pairs(load_pairs(tiny["pairs"]), load_tokenizer(tiny["model"]), **LEN)
    got = rc.reference(torch.tensor([it.id for it in items])).protect
    for p, it in enumerate(items):
        for side, response in enumerate((it.chosen_ids, it.rejected_ids)):
            x = torch.tensor([list(it.prompt_ids) + list(response)])
            with torch.no_grad():
                h = model(input_ids=x, output_hidden_states=True).hidden_states[t.SAE_LAYER + 1][0]
            want = reference.sae_encode_ref(h[len(it.prompt_ids) :], spec.sae).mean(0)[ids]
            torch.testing.assert_close(got[side * len(items) + p].double(), want, rtol=1e-4, atol=1e-5)
    assert (got == 0).any()  # a feature that does not fire is cached as 0, not left out

    # resume: a shard lost (a kill) is the only one computed again; a second run has nothing to do
    entry = rc.protect_entry
    lost = entry["shards"][1]["file"]
    os.remove(os.path.join(cache, lost))
    meta = json.load(open(os.path.join(cache, "meta.json")))
    del meta["protect"]
    json.dump(meta, open(os.path.join(cache, "meta.json"), "w"))
    said.clear()
    _cache(tiny, tmp_path / "c", shard_rows=6, protect=protect, log=said.append)
    assert any("resuming, 2 of 3 shards already complete" in s for s in said)
    assert ReferenceCache(cache).protect_entry["shards"] == entry["shards"]
    said.clear()
    _cache(tiny, tmp_path / "c", shard_rows=6, protect=protect, log=said.append)
    assert any("already holds" in s for s in said)

    # another set replaces this one, and its shards only
    other = _protect_file(tiny, tmp_path / "q.json", [2, 3])
    _cache(tiny, tmp_path / "c", shard_rows=6, protect=other)
    names = [n for n in os.listdir(cache) if n.startswith("protect-")]
    assert len(names) == 6 and all(read_protect_file(other).features_key in n for n in names)


def test_train_refuses_what_does_not_match(tiny, tmp_path):
    cache = _cache(tiny, tmp_path / "c")
    protect = _protect_file(tiny, tmp_path / "p.json", [1, 5])
    base = run_config(tiny, cache, tmp_path / "r", "simpo", protect=protect)
    with pytest.raises(ValueError, match="holds no protected features' reference values"):
        train(base, **QUIET)
    _cache(tiny, tmp_path / "c", protect=protect)
    other = _protect_file(tiny, tmp_path / "q.json", [1, 6])
    with pytest.raises(ValueError, match="another protected set"):
        train(dict(base, protect=other), **QUIET)
    with pytest.raises(ValueError, match="protect needs the SAE"):
        train(dict(base, sae=None), **QUIET)
    bad = tmp_path / "bad.json"
    for text, match in (
        ('{"features": [1, 1]}', "listed twice"),
        ('{"features": [{"id": 1, "direction": "up"}]}', "direction must be one of"),
        ('{"features": [500]}', "outside the SAE's width"),
        ('{"features": [{"id": 1, "weight": true}]}', "a weight is a number"),
        ('{"features": []}', "features is empty"),
        ('{"sae": "0123456789abcdef", "features": [1]}', "for another SAE"),
        ("1,2\n", "must be JSON"),
    ):
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            train(dict(base, protect=str(bad)), **QUIET)
    with pytest.raises(ValueError, match="not a regular file"):
        train(dict(base, protect="/dev/zero"), **QUIET)
    with pytest.raises(ValueError, match="protect_gate 'near' shapes the protection term's gradient"):
        train(dict(base, protect=None, sae=None, cache=None, protect_gate="near"), **QUIET)
    from fpo.train import Trainer

    trainer = Trainer(TrainConfig(**dict(base, protect_gate="jumprelu")), log=lambda *a: None)
    try:  # the gate reaches the op through the run's ProtectTerm
        assert trainer.protect.gate == "jumprelu" and trainer.policy.protect.gate == "jumprelu"
    finally:
        trainer.close()


def test_a_run_logs_the_term_and_resumes_only_with_the_same_file(tiny, tmp_path):
    protect = _protect_file(tiny, tmp_path / "p.json", [1, 5, 9])
    cache = _cache(tiny, tmp_path / "c", protect=protect)
    out = tmp_path / "r"
    base = run_config(tiny, cache, out, "simpo", protect=protect, save_every=1)
    train(base, **QUIET)
    rec = [json.loads(x) for x in open(out / "metrics.jsonl")]
    for key in ("protect_term", "protect_share", "protect_drift_chosen", "protect_drift_rejected"):
        assert key in rec[-1] and rec[-1][key] >= 0
    assert rec[-1]["protect_drift_chosen"] > 0
    saved = json.load(open(out / "final" / "run_config.json"))
    assert saved["inputs"]["protect"]["features"][0]["id"] == 1 and saved["config"]["protect"] == protect
    # the file rewritten under the same name: a resume is refused, naming the file
    _protect_file(tiny, tmp_path / "p.json", [1, 5, 9], note="edited")
    with pytest.raises(ValueError, match="protect file's content differs"):
        train(dict(base, max_steps=3, resume="latest"), **QUIET)
    _protect_file(tiny, tmp_path / "p.json", [1, 5, 9])
    train(dict(base, max_steps=3, resume="latest"), **QUIET)


def test_feature_weights_are_read_by_content_and_resumed_by_content(tiny, tiny_cache, tmp_path):
    [spec] = load_saes([(tiny["sae"], None, 1.0)])
    from fpo.feature_files import read_feature_weights

    for name, text in (
        ("w.txt", '{"3": 2}'),
        ("w.JSON", '{"3": 2}'),
        ("bom.csv", "\ufeff3,2\n"),
        ("plus.csv", "+3,2\n"),
    ):
        (tmp_path / name).write_text(text, encoding="utf-8")
        _, w, _ = read_feature_weights(str(tmp_path / name), [spec])
        assert w[3] == 2 and (w != 1).sum() == 1, name
    (tmp_path / "neg.csv").write_text("-1,5\n")
    with pytest.raises(ValueError, match="outside the SAE's width"):
        read_feature_weights(str(tmp_path / "neg.csv"), [spec])
    (tmp_path / "dup.json").write_text('{"3": 2, "3": 4}')
    with pytest.raises(ValueError, match="appears twice"):
        read_feature_weights(str(tmp_path / "dup.json"), [spec])
    (tmp_path / "big.json").write_text('{"3": 1e308}')
    with pytest.raises(ValueError, match="feature 3 has weight"):
        read_feature_weights(str(tmp_path / "big.json"), [spec])
    weights = tmp_path / "w.txt"
    base = run_config(tiny, tiny_cache, tmp_path / "r", "fpo", feature_weights=str(weights), save_every=1)
    train(base, **QUIET)
    weights.write_text('{"3": 5}')
    with pytest.raises(ValueError, match="feature-weights file's content differs"):
        train(dict(base, max_steps=3, resume="latest"), **QUIET)


def _heldout(tiny, path, start=16, n=12):
    with open(t.TRAIN_PAIRS) as f:
        rows = f.readlines()[start : start + n]
    with open(path, "w") as g:
        g.writelines(rows)
    return str(path)


def test_protection_holds_the_feature_training_moves_most_in_every_seed(tiny, tmp_path):
    """The feature a SimPO run moves most (found on a probe run with its own seed) drifts at most half as much on
    held-out pairs with protection, in each of 3 seeds; the other features' drift stays within 1.5x."""
    cache = _cache(tiny, tmp_path / "c")
    heldout = _heldout(tiny, tmp_path / "heldout.jsonl")
    # an lr at which one Adam step moves the feature little: Adam's steps have the lr's size whatever the loss's
    # scale, so where the term dominates (a large lambda, or a large lr) the feature swings about its reference
    run = dict(batch_size=4, micro_batch_size=4, max_steps=16, epochs=4, lr=3e-4, warmup_steps=0)
    feat = dict(sae=tiny["sae"], contexts=0, progress=False, rank_split=False, **LEN, **QUIET)
    probe = run_config(tiny, cache, tmp_path / "probe", "simpo", seed=100, **run)
    train(probe, **QUIET)
    ranked = feature_report([str(tmp_path / "probe" / "final")], tiny["model"], heldout, top=1, **feat)
    target = ranked["features"][0]["id"]
    protect = _protect_file(tiny, tmp_path / "p.json", [target])
    _cache(tiny, tmp_path / "c", protect=protect)
    finals = []
    for seed in (0, 1, 2):
        for on in (False, True):
            extra = dict(protect=protect, protect_coef=1.0) if on else {}
            out = tmp_path / f"s{seed}{'p' if on else ''}"
            train(run_config(tiny, cache, out, "simpo", seed=seed, **run, **extra), **QUIET)
            finals.append(str(out / "final"))
    report = feature_report(finals, tiny["model"], heldout, top=1, protect_file=protect, **feat)
    sae = report["saes"][0]
    prot = [c + r for c, r in zip(sae["protected"]["drift_chosen"], sae["protected"]["drift_rejected"])]
    others = [2 * total - p for total, p in zip(sae["drift_total"], prot)]  # drift_total is the two sides' mean
    for seed in range(3):
        off, on = 2 * seed, 2 * seed + 1
        assert prot[off] > 0
        assert prot[on] <= 0.5 * prot[off], f"seed {seed}: protected drift {prot[on]:.3g} vs {prot[off]:.3g}"
        assert others[on] <= 1.5 * others[off], f"seed {seed}: other features {others[on]:.3g} vs {others[off]:.3g}"
    shutil.rmtree(tmp_path / "probe", ignore_errors=True)


def test_one_sae_at_two_layers_is_named_by_its_layer(tiny, tmp_path):
    """The same SAE weights read at two blocks have one fingerprint: a file must say which by its layer."""
    from fpo.feature_files import read_feature_weights

    saes = load_saes([(tiny["sae"], 1, 1.0), (tiny["sae"], 2, 1.0)])
    fp = saes[0].sae.fingerprint()
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"sae": fp, "features": [3]}))
    with pytest.raises(ValueError, match=r'names 2 of the run\'s SAEs .*layers 1, 2\): add "layer"'):
        read_protect_file(str(f), saes)
    f.write_text(json.dumps({"sae": fp, "layer": 2, "features": [3]}))
    assert read_protect_file(str(f), saes).index_in(saes) == 1
    w = tmp_path / "w.json"
    w.write_text(json.dumps({"sae": fp, "layer": 1, "weights": {"3": 2}}))
    j, weights, _ = read_feature_weights(str(w), saes)
    assert j == 0 and weights[3] == 2


def test_protect_refuses_a_cache_pooled_otherwise(tiny, tmp_path):
    protect = _protect_file(tiny, tmp_path / "p.json", [1, 5])
    cache = _cache(tiny, tmp_path / "c", protect=protect)
    cfg = run_config(tiny, cache, tmp_path / "r", "simpo", protect=protect, pooling="authors", packing="pack")
    with pytest.raises(ValueError, match="pooled the reference's features with pooling 'response'"):
        train(cfg, **QUIET)


def test_protect_share_holds_the_term_at_its_share(tiny, tmp_path):
    """--protect-share 0.1: lambda adapted after every step; each step logs the lambda it ran at, the late steps'
    protection term is within 3x of 0.1 of the margin term (2 pairs a step are noisy; lambda 1 started it far
    above), and a resume goes on from the controller's state."""
    from fpo.alpha_control import phase_shares

    protect = _protect_file(tiny, tmp_path / "p.json", [1, 5, 9, 17, 40])
    cache = _cache(tiny, tmp_path / "c", protect=protect)
    out = tmp_path / "r"
    cfg = run_config(
        tiny, cache, out, "simpo", protect=protect, protect_share=0.1, batch_size=2, max_steps=30, epochs=10,
        lr=3e-4, save_every=15,
    )  # fmt: skip
    train(cfg, **QUIET)
    hist = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert all("protect_coef" in h for h in hist)
    as_constraint = [dict(h, constraint_abs=h["protect_term"], margin_abs=h["reward_margin_abs"]) for h in hist]
    shares = phase_shares(as_constraint)
    assert 0.1 / 3 < shares["late"] < 0.1 * 3 and shares["early"] > 3 * shares["late"], shares  # from lambda 1
    train(dict(cfg, resume=str(out / "checkpoint-000015"), max_steps=16), **QUIET)
    again = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert again[15]["protect_coef"] == pytest.approx(hist[15]["protect_coef"], rel=1e-6)
    with pytest.raises(ValueError, match="protect_share adapts the protection term's lambda"):
        train(dict(cfg, protect=None, sae=None, cache=None, output_dir=str(tmp_path / "x")), **QUIET)


def test_protect_trains_under_bf16_mixed(tiny, tmp_path):
    """The precision a GPU run takes (bf16 autocast over the body): the term and its metrics stay finite."""
    protect = _protect_file(tiny, tmp_path / "p.json", [1, 5, 9])
    cache = _cache(tiny, tmp_path / "c", protect=protect)
    out = tmp_path / "r"
    train(run_config(tiny, cache, out, "simpo", protect=protect, precision="bf16-mixed"), **QUIET)
    rec = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert all(r["protect_term"] >= 0 and r["protect_drift_chosen"] == r["protect_drift_chosen"] for r in rec)
    assert rec[-1]["protect_drift_chosen"] > 0


def test_the_token_form_caches_every_token_and_its_term_is_r_on_them(tiny, tmp_path):
    """The per-token form: the cache holds every response token's protected pre-activations (against transformers'
    hidden states and the float64 encoder, the [2P] order), with their spread as scales; a step's term is lambda x
    the mean over the pair's two responses of each response's token-mean of R, computed here in float64."""
    ids = [1, 5, 9, 150]
    protect = _protect_file(tiny, tmp_path / "p.json", ids)
    cache = _cache(tiny, tmp_path / "c", shard_rows=6, protect=protect)
    rc = ReferenceCache(cache)
    entry = rc.protect_entry
    assert len(entry["token_scale"]) == len(ids) and min(entry["token_scale"]) > 0
    [spec] = load_saes([(tiny["sae"], None, 1.0)])
    model = load_model(tiny["model"]).double()
    items = tokenize_pairs(load_pairs(tiny["pairs"]), load_tokenizer(tiny["model"]), **LEN)[:5]
    got = rc.reference(torch.tensor([it.id for it in items])).protect_tokens
    want = []
    for side in (0, 1):
        for it in items:
            response = (it.chosen_ids, it.rejected_ids)[side]
            x = torch.tensor([list(it.prompt_ids) + list(response)])
            with torch.no_grad():
                h = model(input_ids=x, output_hidden_states=True).hidden_states[t.SAE_LAYER + 1][0]
            rows = h[len(it.prompt_ids) :]
            want.append(
                reference.protected_preactivations_ref(
                    rows, torch.tensor([[0, len(rows)]]), spec.sae, torch.tensor(ids)
                )
            )
    torch.testing.assert_close(got.double(), torch.cat(want), rtol=1e-4, atol=1e-5)

    from fpo.step import compute_loss
    from fpo.train import Trainer

    base = run_config(tiny, cache, tmp_path / "r", "simpo", protect=protect, protect_form="token", protect_coef=2.0)
    trainer = Trainer(TrainConfig(**base), log=lambda *a: None)
    try:
        with torch.no_grad():  # move the policy off the reference, so that R is not 0
            for p in trainer.model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        batch = trainer.batching.collate(trainer.micro_batches(0)[0])
        ref = trainer.cache.reference(batch.ids, batch.row_hash)
        stats = trainer.policy(batch)
        plain, _ = compute_loss(trainer.loss_settings, stats, ref)
        total, metrics = compute_loss(trainer.loss_settings, stats, ref, trainer.protect)
        z, rz = stats.protect_tokens.double(), ref.protect_tokens.double()
        delta = (z - rz) / torch.tensor(entry["token_scale"], dtype=torch.float64)
        per_token = (torch.sqrt(1 + delta**2) - 1).mean(1)
        R = torch.stack([x.mean() for x in per_token.split(stats.length.long().tolist())])
        P = batch.num_pairs
        torch.testing.assert_close((total - plain).double(), 2.0 * (R[:P] + R[P:]) / 2, rtol=1e-5, atol=1e-7)
        assert (R > 0).all()
        torch.testing.assert_close(metrics["protect_term"], (total - plain).detach())
    finally:
        trainer.close()
    out = train(dict(base, output_dir=str(tmp_path / "r2")), **QUIET)
    assert out["last"]["protect_term"] > 0


def test_the_token_form_refuses_what_it_cannot_use(tiny, tmp_path):
    protect = _protect_file(tiny, tmp_path / "p.json", [1, 5])
    cache = _cache(tiny, tmp_path / "c", protect=protect)
    base = run_config(tiny, cache, tmp_path / "r", "simpo", protect=protect, protect_form="token")
    with pytest.raises(ValueError, match="protect_form 'token' is the protection term's form: pass --protect"):
        train(dict(base, protect=None, sae=None, cache=None), **QUIET)
    with pytest.raises(ValueError, match="leave --protect-gate out"):
        train(dict(base, protect_gate="near"), **QUIET)
    meta_path = os.path.join(cache, "meta.json")  # a cache whose protected values predate the per-token form
    meta = json.load(open(meta_path))
    del meta["protect"]["token_scale"]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match="not their per-token pre-activations"):
        train(base, **QUIET)
    train(dict(base, protect_form="pooled", output_dir=str(tmp_path / "pooled")), **QUIET)  # the pooled form reads it
    said = []  # precompute --protect sees it lacks them and computes the set again
    _cache(tiny, tmp_path / "c", protect=protect, log=said.append)
    assert not any("already holds" in s for s in said)
    assert "token_scale" in ReferenceCache(cache).protect_entry
