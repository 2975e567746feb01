"""Offline reference precompute and the cache: fidelity to an online reference, resume, ranks, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import DIST_DRIVER

import fpo.reference_cache as cache_mod
from fpo.model import ActivationCapture, load_model, load_tokenizer
from fpo.packing import collate
from fpo.pairs import BadRowError, load_pairs, tokenize_pairs
from fpo.precompute import precompute
from fpo.reference_cache import CacheMismatchError, ReferenceCache
from fpo_kernels import SAEWeights, reference

KW = dict(cache_k=32, max_length=64, max_prompt_length=32, shard_rows=5, micro_batch_size=3, progress=False)


def _tensors(path):
    c = ReferenceCache(path)
    return {k: v.clone() for k, v in c.data.items()}


def test_cache_matches_online_reference(tiny, tmp_path):
    out = str(tmp_path / "c")
    precompute(tiny["model"], tiny["pairs"], out, sae=tiny["sae"], **KW)
    c = ReferenceCache(out)
    assert len(c) == 16 and c.saes[0]["layer"] == 2 and c.saes[0]["index_dtype"] == "int16"
    tok = load_tokenizer(tiny["model"])
    model = load_model(tiny["model"]).eval()
    sae = SAEWeights.from_file(tiny["sae"])
    items = tokenize_pairs(load_pairs(tiny["pairs"]), tok, 64, 32)[:4]
    batch = collate(items, "off", tok.pad_token_id)
    cap = ActivationCapture(model, 2)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
        resid = cap.pop()
    cap.remove()
    # log-probs from full logits, written out plainly
    logp = torch.log_softmax(logits, -1)[:, :-1].gather(2, batch.input_ids[:, 1:, None]).squeeze(2)
    tgt = batch.response_mask[:, 1:]
    sums = (logp * tgt).sum(1)
    ref = c.lookup(batch.ids, batch.row_hash)
    assert torch.allclose(ref["chosen_logp_sum"].double(), sums[:4], rtol=1e-4, atol=1e-3)
    assert torch.allclose(ref["rejected_logp_mean"].double(), sums[4:] / tgt[4:].sum(1), rtol=1e-4, atol=1e-4)
    # top-K features: exact indices of the dense pooled features, values within fp16 rounding
    pooled = reference.sae_pooled_features_ref(resid, batch.response_mask, sae)
    top = pooled.topk(32, dim=1)
    got_idx = torch.cat([ref["chosen_idx"], ref["rejected_idx"]]).long()
    got_val = torch.cat([ref["chosen_val"], ref["rejected_val"]]).float()
    assert torch.allclose(got_val, top.values.float(), rtol=1e-3, atol=1e-6)
    assert torch.allclose(pooled.gather(1, got_idx).float(), top.values.float(), rtol=1e-5, atol=1e-6)


def test_killed_run_resumes_to_the_same_cache(tiny, tmp_path, monkeypatch):
    full = str(tmp_path / "full")
    precompute(tiny["model"], tiny["pairs"], full, sae=tiny["sae"], **KW)
    part = str(tmp_path / "part")
    real = cache_mod.write_shard
    calls = {"n": 0}

    def dying_write(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    import fpo.precompute as pre

    monkeypatch.setattr(pre, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        precompute(tiny["model"], tiny["pairs"], part, sae=tiny["sae"], **KW)
    names = sorted(os.listdir(part))
    assert "meta.json" not in names and sum(n.startswith("shard-") and n.endswith(".safetensors") for n in names) == 2
    assert not any(".tmp" in n for n in names)  # only complete shards
    with pytest.raises(ValueError, match="incomplete"):
        ReferenceCache(part)
    monkeypatch.setattr(pre, "write_shard", real)
    precompute(tiny["model"], tiny["pairs"], part, sae=tiny["sae"], **KW)
    a, b = _tensors(full), _tensors(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.dist
def test_two_ranks_make_the_same_cache_as_one(tiny, tmp_path):
    one = str(tmp_path / "one")
    precompute(tiny["model"], tiny["pairs"], one, sae=tiny["sae"], **KW)
    two = str(tmp_path / "two")
    args = dict(
        kind="precompute",
        model=tiny["model"],
        dataset=tiny["pairs"],
        out=two,
        sae=tiny["sae"],
        **{k: v for k, v in KW.items() if k != "progress"},
    )
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29611",
            DIST_DRIVER,
            json.dumps(args),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _tensors(one), _tensors(two)
    assert all(torch.equal(a[k], b[k]) for k in a)
    shards = lambda p: sorted(n for n in os.listdir(p) if n.startswith("shard-"))
    assert shards(one) == shards(two)


@pytest.mark.parametrize("width,dtype", [(32768, torch.int16), (32769, torch.int32)])
def test_index_packing_both_sides_of_int16(tiny, tmp_path, width, dtype):
    import tiny as t

    sae = t.make_sae(str(tmp_path / f"sae{width}"), width=width)
    out = str(tmp_path / "c")
    precompute(tiny["model"], tiny["pairs"], out, sae=sae, max_pairs=3, **KW)
    c = ReferenceCache(out)
    assert c.data["chosen_idx"].dtype == dtype and c.saes[0]["width"] == width
    assert int(c.data["chosen_idx"].long().max()) < width


# ---- bad input -------------------------------------------------------------------------------
def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "row,match",
    [
        ({"prompt": "hi", "chosen": "a"}, "row 1: missing column 'rejected'"),
        ({"prompt": "hi", "chosen": "  ", "rejected": "b"}, "row 1: column 'chosen' is an empty response"),
        ({"chosen": "a", "rejected": "b"}, "row 1: missing column 'prompt'"),
        ({"prompt": "hi", "chosen": 3, "rejected": "b"}, "row 1: column 'chosen' must be"),
    ],
)
def test_bad_rows_are_named(tmp_path, row, match):
    path = _write(
        tmp_path / "d.jsonl",
        [{"prompt": "p", "chosen": "x", "rejected": "y"}, row, {"prompt": "q", "chosen": "u", "rejected": "v"}],
    )
    with pytest.raises(BadRowError, match=match):
        load_pairs(path)
    kept = load_pairs(path, bad_rows="skip", log=lambda *a: None)
    assert [p.id for p in kept] == [0, 2]


def test_chat_message_columns_and_identical_pairs(tmp_path, tiny):
    conv = [{"role": "user", "content": "What is 2+2?"}]
    path = _write(
        tmp_path / "chat.jsonl",
        [
            {
                "chosen": conv + [{"role": "assistant", "content": "4"}],
                "rejected": conv + [{"role": "assistant", "content": "5"}],
            },
            {"prompt": "same", "chosen": "x", "rejected": "x"},
        ],
    )
    msgs = []
    pairs = load_pairs(path, log=msgs.append)
    assert len(pairs) == 1 and pairs[0].prompt == conv and pairs[0].chosen == "4"
    assert "identical" in msgs[0]
    tok = load_tokenizer(tiny["model"])
    it = tokenize_pairs(pairs, tok, max_length=64, max_prompt_length=32)[0]
    assert tok.decode(list(it.prompt_ids)).rstrip().endswith("assistant")  # the chat template's generation prompt
    assert it.chosen_ids[-1] == tok.eos_token_id


def test_truncation_policy(tiny, tmp_path):
    tok = load_tokenizer(tiny["model"])
    path = _write(tmp_path / "long.jsonl", [{"prompt": "word " * 200, "chosen": "yes " * 100, "rejected": "no"}])
    it = tokenize_pairs(load_pairs(path), tok, max_length=48, max_prompt_length=20)[0]
    assert len(it.prompt_ids) == 20 and len(it.prompt_ids) + len(it.chosen_ids) == 48
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_pairs(load_pairs(path), tok, max_length=20, max_prompt_length=20)


def test_truncated_and_corrupted_shards(tiny, tmp_path):
    out = str(tmp_path / "c")
    precompute(tiny["model"], tiny["pairs"], out, sae=tiny["sae"], **KW)
    shard = os.path.join(
        out, sorted(n for n in os.listdir(out) if n.startswith("shard-") and n.endswith(".safetensors"))[1]
    )
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[:-7])
    with pytest.raises(ValueError, match="truncated"):
        ReferenceCache(out)
    with open(shard, "wb") as f:
        f.write(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(ValueError, match="corrupted"):
        ReferenceCache(out)


def test_cache_for_another_setup_is_refused(tiny, tmp_path):
    out = str(tmp_path / "c")
    precompute(tiny["model"], tiny["pairs"], out, sae=tiny["sae"], **KW)
    c = ReferenceCache(out)
    sae = SAEWeights.from_file(tiny["sae"])
    assert c.find_sae(sae.fingerprint(), 2)["key"] == ""
    import tiny as t

    other_sae = SAEWeights.from_file(t.make_sae(str(tmp_path / "s2"), seed=5))
    with pytest.raises(CacheMismatchError, match="no features for SAE 'other' at layer 2"):
        c.find_sae(other_sae.fingerprint(), 2, "other")
    with pytest.raises(CacheMismatchError, match="no features for SAE 'sae' at layer 1"):
        c.find_sae(sae.fingerprint(), 1)
    with pytest.raises(CacheMismatchError, match="another tokenizer"):
        c.verify(tokenizer="0000")
    with pytest.raises(CacheMismatchError, match=r"another model: model\.config"):
        c.verify(model={"config": "abc"})
    # a dataset with other text for the same row ids
    rows = [json.loads(line) for line in open(tiny["pairs"])]
    rows[3]["chosen"] = "something else entirely"
    other = _write(tmp_path / "other.jsonl", rows)
    tok = load_tokenizer(tiny["model"])
    items = tokenize_pairs(load_pairs(other), tok, 64, 32)
    batch = collate(items[2:5], "off", tok.pad_token_id)
    with pytest.raises(CacheMismatchError, match="example id 3"):
        c.lookup(batch.ids, batch.row_hash)
    # a cache in the format of 0.1.0 is refused with the command that rebuilds it
    meta = json.load(open(os.path.join(out, "meta.json")))
    old_dir = tmp_path / "format1"
    old_dir.mkdir()
    (old_dir / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(
        CacheMismatchError, match="format 1, this version of fpo reads format 2: rebuild it with `fpo precompute`"
    ):
        ReferenceCache(str(old_dir))
    # the same directory asked to hold a cache with other settings
    with pytest.raises(ValueError, match="other settings"):
        precompute(tiny["model"], tiny["pairs"], out, sae=tiny["sae"], **{**KW, "cache_k": 16})


def test_sae_that_does_not_fit_the_model(tiny, tmp_path):
    from safetensors.torch import save_file

    os.makedirs(tmp_path / "s", exist_ok=True)
    save_file({"W_enc": torch.randn(32, 10), "b_enc": torch.zeros(10)}, str(tmp_path / "s" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="d_in=32"):
        precompute(tiny["model"], tiny["pairs"], str(tmp_path / "c"), sae=str(tmp_path / "s"), sae_layer=1, **KW)
    with pytest.raises(ValueError, match="sae_layer 9 is outside"):
        precompute(tiny["model"], tiny["pairs"], str(tmp_path / "c2"), sae=tiny["sae"], sae_layer=9, **KW)
