"""`fpo features`: the per-feature numbers against sae-lens' own encoder on transformers' hidden states in
float64, the contexts against a plain search, several runs and SAEs, the weights file `fpo train` takes, and the
refusals."""

import json
import os

import pytest
import tiny as t
import torch
from run_setup import LEN, QUIET, run_config

from fpo.feature_files import read_feature_weights
from fpo.features import feature_report
from fpo.model import load_model, load_tokenizer
from fpo.pairs import load_pairs, tokenize_pairs
from fpo.sae import load_saes
from fpo.train import train
from fpo_kernels import SAEWeights

PAIRS = 5


def _sae_lens(sae: SAEWeights):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    cfg = JumpReLUSAEConfig(d_in=sae.d_in, d_sae=sae.width, dtype="float64", device="cpu")
    model = JumpReLUSAE(cfg)
    with torch.no_grad():
        model.W_enc.copy_(sae.W_enc.double())
        model.b_enc.copy_(sae.b_enc.double())
        model.threshold.copy_(sae.threshold.double())
        model.b_dec.copy_(sae.b_dec.double())
    return model


def _by_hand(model_dir, tiny, lens, layer):
    """[2, P, width]: sae-lens' encode of hidden_states[layer + 1] (float64), averaged over each response."""
    tok = load_tokenizer(tiny["model"])
    model = load_model(model_dir).double()
    items = tokenize_pairs(load_pairs(tiny["pairs"], max_pairs=PAIRS), tok, **LEN)
    out = torch.zeros(2, len(items), lens.cfg.d_sae, dtype=torch.float64)
    for p, it in enumerate(items):
        for side, response in enumerate((it.chosen_ids, it.rejected_ids)):
            ids = torch.tensor([list(it.prompt_ids) + list(response)])
            with torch.no_grad():
                h = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
                feats = lens.encode(h)
            out[side, p] = feats[len(it.prompt_ids) :].mean(0)
    return out, items, feats


def test_numbers_match_sae_lens_and_contexts_a_plain_search(tiny, tmp_path):
    run = t.make_model(str(tmp_path / "runs" / "moved" / "final"), seed=3)  # a policy with other weights
    report = feature_report(
        run,
        tiny["model"],
        tiny["pairs"],
        sae=tiny["sae"],
        max_pairs=PAIRS,
        top=6,
        contexts=2,
        micro_batch_size=2,
        rank_split=False,
        json=str(tmp_path / "f.json"),
        png=str(tmp_path / "f.png"),
        progress=False,
        **LEN,
        **QUIET,
    )
    [spec] = load_saes([(tiny["sae"], None, 1.0)])
    lens = _sae_lens(spec.sae)
    ref, items, _ = _by_hand(tiny["model"], tiny, lens, spec.layer)
    pol, _, _ = _by_hand(run, tiny, lens, spec.layer)
    drift = ((pol - ref) ** 2).mean((0, 1))  # over the 2P responses
    want_top = drift.topk(6).indices.tolist()
    assert report["runs"] == ["moved"] and [f["id"] for f in report["features"]] == want_top
    for f in report["features"]:
        i = f["id"]
        assert f["ref_chosen"] == pytest.approx(ref[0, :, i].mean().item(), rel=1e-4, abs=1e-7)
        assert f["ref_rejected"] == pytest.approx(ref[1, :, i].mean().item(), rel=1e-4, abs=1e-7)
        assert f["policy_chosen"][0] == pytest.approx(pol[0, :, i].mean().item(), rel=1e-4, abs=1e-7)
        assert f["policy_rejected"][0] == pytest.approx(pol[1, :, i].mean().item(), rel=1e-4, abs=1e-7)
        assert f["drift"][0] == pytest.approx(drift[i].item(), rel=1e-4, abs=1e-9)
    # contexts: the reference's strongest response tokens for the feature, found by a plain search
    model = load_model(tiny["model"]).double()
    best = []
    i = report["features"][0]["id"]
    for it in items:
        for side, response in enumerate((it.chosen_ids, it.rejected_ids)):
            ids = list(it.prompt_ids) + list(response)
            with torch.no_grad():
                h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[spec.layer + 1][0]
            acts = lens.encode(h)[len(it.prompt_ids) :, i]
            best += [(a, it.id, side) for a in acts.tolist() if a > 0]
    best.sort(reverse=True)
    got = report["features"][0]["contexts"]
    assert [c["activation"] for c in got] == pytest.approx([a for a, _, _ in best[:2]], rel=1e-4)
    assert [(c["pair"], c["response"]) for c in got] == [(p, ("chosen", "rejected")[s]) for _, p, s in best[:2]]
    assert all("«" in c["text"] and "»" in c["text"] for c in got)
    saved = json.loads((tmp_path / "f.json").read_text())
    assert set(saved["features"][0]) >= {"id", "ref_chosen", "ref_rejected", "policy_chosen", "policy_rejected"}
    assert {"drift", "contexts"} <= set(saved["features"][0]) and "versions" in saved and "settings" in saved
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_several_runs_lora_and_several_saes(tiny, tiny_cache, tmp_path):
    """A LoRA run and a full run side by side, two SAEs (the second at another layer), and a weights file
    that `fpo train --feature-weights` then takes and records."""
    lora = run_config(tiny, None, tmp_path / "lora", lora_r=4, lr=1e-2, max_steps=2)
    full = run_config(tiny, None, tmp_path / "full", lr=1e-3, max_steps=2)
    train(lora, **QUIET)
    train(full, **QUIET)
    sae_b = t.make_sae(str(tmp_path / "sae_b"), seed=1, layer=1)
    lines = []
    report = feature_report(
        [str(tmp_path / "lora" / "final"), str(tmp_path / "full" / "final")],
        tiny["model"],
        tiny["pairs"],
        sae=[tiny["sae"], sae_b],
        max_pairs=PAIRS,
        top=4,
        rank_by="full",
        rank_split=False,
        weights_out=str(tmp_path / "protect.json"),
        protect=3,
        progress=False,
        log=lines.append,
        **LEN,
    )
    assert report["runs"] == ["lora", "full"] and [s["layer"] for s in report["saes"]] == [2, 1]
    assert len(report["features"]) == 8 and all(len(f["drift"]) == 2 for f in report["features"])
    table = [x for line in lines for x in line.splitlines() if str(tmp_path) not in x]  # paths are as long as they are
    assert table and max(map(len, table)) <= 100
    first = [f for f in report["features"] if f["sae"] == report["saes"][0]["label"]]
    assert [f["drift"][1] for f in first] == sorted((f["drift"][1] for f in first), reverse=True)  # ranked by full
    [spec] = load_saes([(tiny["sae"], None, 1.0)])
    j, w, _ = read_feature_weights(str(tmp_path / "protect.json"), [spec])
    assert j == 0 and sorted(torch.nonzero(w != 1).flatten().tolist()) == sorted(f["id"] for f in first[:3])
    # fpo train takes a weights file, records it in the run's config, and weighs D by it: every feature at 0
    base = run_config(tiny, tiny_cache, tmp_path / "w0", "fpo", lr=1e-3, max_steps=2)
    train(base, **QUIET)
    zero = tmp_path / "zero.csv"
    zero.write_text("feature,weight\n" + "".join(f"{i},0\n" for i in range(spec.sae.width)))
    said = []
    train(dict(base, output_dir=str(tmp_path / "w1"), feature_weights=str(zero)), log=said.append)
    d0 = [json.loads(x)["d_chosen"] for x in open(tmp_path / "w0" / "metrics.jsonl")]
    d1 = [json.loads(x)["d_chosen"] for x in open(tmp_path / "w1" / "metrics.jsonl")]
    assert d0[-1] > 0 and d1 == [0.0, 0.0]
    assert any(f"{spec.sae.width} features of SAE" in s for s in said)
    # per weighted feature: on what share of the cached responses the weight can act at all
    assert any("in the reference's cached top-32 on" in s and "use --protect" in s for s in said)
    state = torch.load(tmp_path / "w1" / "final" / "trainer_state.pt", weights_only=True)
    assert state["config"]["feature_weights"] == str(zero)
    with pytest.raises(ValueError, match="method simpo has no D"):
        train(dict(run_config(tiny, None, tmp_path / "w2"), feature_weights=str(zero)), **QUIET)


def test_bad_weights_files_are_refused(tiny, tmp_path):
    [spec] = load_saes([(tiny["sae"], None, 1.0)])
    cases = {
        "outside.csv": ("feature,weight\n250,2\n", "outside the SAE's width 200"),
        "negative.csv": ("3,-1\n", r"finite, in \[0, "),
        "nan.json": ('{"3": NaN}', "weights must be finite"),
        "other.json": ('{"sae": "0123456789abcdef", "weights": {"3": 2}}', "for another SAE"),
        "text.json": ('{"weights": [1, 2]}', "must be an object"),
        "broken.json": ("{", "not valid JSON"),
    }
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=match):
            read_feature_weights(str(tmp_path / name), [spec])
    with pytest.raises(ValueError, match="cannot be read"):
        read_feature_weights(str(tmp_path / "missing.csv"), [spec])
    ok = tmp_path / "ok.csv"
    ok.write_text("feature,weight\n3,0\n7,2.5\n")
    _, w, _ = read_feature_weights(str(ok), [spec])
    assert w[3] == 0 and w[7] == 2.5 and w.sum() == spec.sae.width - 1 + 1.5


def test_features_refuses_what_it_cannot_compare(tiny, tmp_path):
    with pytest.raises(ValueError, match="sae is required"):
        feature_report(tiny["model_b"], tiny["model"], tiny["pairs"], max_pairs=2, progress=False, **LEN, **QUIET)
    with pytest.raises(ValueError, match="rank_by 'nope' is none of the runs"):
        feature_report(
            tiny["model_b"], tiny["model"], tiny["pairs"], sae=tiny["sae"], rank_by="nope", progress=False, **LEN
        )
    assert os.path.exists(tiny["model"])


def test_contexts_decode_whole_characters_and_never_drive_the_terminal(tiny):
    from fpo.features import _clean_numbers, _context, _headers

    tok = load_tokenizer(tiny["model"])
    text = "日本語のテキスト 😀 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for pos in range(len(ids)):
        got = _context(tok, ids, pos, 3)
        assert "\ufffd" not in got, (pos, got)
        assert got.replace("«", "").replace("»", "").replace(" ", "") in text.replace(" ", "")
    ids = tok("clear \x1b[2J screen", add_special_tokens=False)["input_ids"]
    got = _context(tok, ids, 1, 4)
    assert "\x1b" not in got and "\\x1b" in got
    assert len(set(_headers(["run-2026-01-a", "run-2026-01-b"]))) == 2
    assert _clean_numbers({"d": [float("nan"), 1.0, float("inf")]}) == {"d": [None, 1.0, None]}


def test_a_run_of_another_architecture_is_refused(tiny, tmp_path):
    other = t.make_model(str(tmp_path / "wide"), layers=2)
    with pytest.raises(ValueError, match="is not the architecture of --reference"):
        feature_report(
            other, tiny["model"], tiny["pairs"], sae=tiny["sae"], max_pairs=2, progress=False, **LEN, **QUIET
        )


def test_ranked_on_half_judged_on_the_other_with_intervals_and_seed_groups(tiny, tmp_path):
    """Signed and relative change per side with a bootstrap interval, firing frequencies, seed runs grouped, one
    summary line per SAE; features ranked on the even pairs and every number judged on the odd ones."""
    runs = [t.make_model(str(tmp_path / f"moved-s{k}" / "final"), seed=3 + k) for k in range(2)]
    report = feature_report(
        runs, tiny["model"], tiny["pairs"], sae=tiny["sae"], max_pairs=8, top=5, contexts=1, bootstrap=200,
        progress=False, **LEN, **QUIET,
    )  # fmt: skip
    assert report["ranked_on_pairs"] == 4 and report["judged_on_pairs"] == 4
    assert report["groups"] == [{"name": "moved", "runs": [0, 1]}]
    assert "features fire; total drift" in report["saes"][0]["summary"]
    for f in report["features"]:
        for side in ("chosen", "rejected"):
            for r in range(2):
                lo, hi = f[f"change_ci_{side}"][r]
                assert lo - 1e-9 <= f[f"change_{side}"][r] <= hi + 1e-9
                ref = f[f"ref_{side}"]
                rel = f[f"rel_change_{side}"][r]
                assert (rel is None) if ref == 0 else rel == pytest.approx(f[f"change_{side}"][r] / ref)
            assert f[f"policy_{side}"][0] == pytest.approx(f[f"ref_{side}"] + f[f"change_{side}"][0], abs=1e-9)
        assert all(0 <= x <= 1 for x in f["ref_freq"]) and len(f["policy_freq"]) == 2


def test_html_page_is_self_contained_and_says_what_the_json_says(tiny, tmp_path):
    """--html: one file, no external resource; its table and cards, read back with a parser, hold the JSON's
    numbers; each context's tokens carry the reference's and the run's activations."""
    from html.parser import HTMLParser

    from fpo.feature_page import fmt

    run = t.make_model(str(tmp_path / "moved" / "final"), seed=3)
    page, js = tmp_path / "f.html", tmp_path / "f.json"
    report = feature_report(
        run, tiny["model"], tiny["pairs"], sae=tiny["sae"], max_pairs=6, top=4, contexts=2, bootstrap=100,
        html=str(page), json=str(js), progress=False, **LEN, **QUIET,
    )  # fmt: skip
    text = page.read_text()
    assert (
        "http://" not in text.replace("https://www.neuronpedia.org", "")
        and "src=" not in text
        and "@import" not in text
    )

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.row, self.cell, self.in_main = [], None, None, False

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "table" and a.get("id") == "features":
                self.in_main = True
            elif tag == "tr" and self.in_main and a.get("id", "").startswith("row-"):
                self.row = []
            elif tag == "td" and self.row is not None:
                self.cell = ""

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

        def handle_endtag(self, tag):
            if tag == "td" and self.row is not None:
                self.row.append(self.cell)
                self.cell = None
            elif tag == "tr" and self.row is not None:
                self.rows.append(self.row)
                self.row = None
            elif tag == "table":
                self.in_main = False

    parser = Rows()
    parser.feed(text)
    saved = json.loads(js.read_text())
    assert len(parser.rows) == len(saved["features"]) == 4
    for row, f in zip(parser.rows, saved["features"]):
        assert row[1] == f"#{f['id']}"
        assert row[2] == fmt((f["ref_chosen"] + f["ref_rejected"]) / 2)
        assert row[3:6] == [fmt(f["drift"][0]), fmt(f["change_chosen"][0]), fmt(f["change_rejected"][0])]
        lo, hi = f["change_ci_chosen"][0]
        assert f"[{fmt(lo)}, {fmt(hi)}]" in text
    shaded = [c for f in report["features"] for c in f["contexts"]]
    assert shaded and all(len(c["token_acts"]["runs"]) == 1 for c in shaded)
    hit = shaded[0]
    assert hit["token_acts"]["reference"][hit["window_index"]] == pytest.approx(hit["activation"], rel=1e-4)


def test_more_protected_than_listed_is_refused_before_the_computation(tiny, tmp_path):
    with pytest.raises(ValueError, match="protect 5 is more than top 2"):
        feature_report(
            tiny["model_b"], tiny["model"], tiny["pairs"], sae=tiny["sae"], top=2, protect=5,
            protect_out=str(tmp_path / "p.json"), progress=False, **LEN, **QUIET,
        )  # fmt: skip
    with pytest.raises(ValueError, match="is a folder"):
        feature_report(
            tiny["model_b"], tiny["model"], tiny["pairs"], sae=tiny["sae"], png=str(tmp_path), progress=False,
            **LEN, **QUIET,
        )  # fmt: skip
