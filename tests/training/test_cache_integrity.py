"""The reference cache on disk: damaged, crafted, mismatched or foreign caches are found and refused; precompute
rebuilds what is broken and writes nothing when the cache is complete."""

import json
import os

import pytest
import torch
from run_setup import LEN, QUIET, run_config

from fpo.config import TrainConfig
from fpo.pairs import load_pairs
from fpo.precompute import precompute
from fpo.reference_cache import ReferenceCache
from fpo.train import Trainer, train


def test_precompute_rebuilds_a_corrupted_shard_and_cleans_leftovers(tiny, tmp_path):
    out = tmp_path / "c"
    kw = dict(sae=tiny["sae"], cache_k=16, shard_rows=5, progress=False, **LEN)
    precompute(tiny["model"], tiny["pairs"], str(out), **kw)
    want = ReferenceCache(str(out)).data
    shard = sorted(out.glob("shard-*.safetensors"))[1]
    raw = bytearray(shard.read_bytes())
    raw[-8:] = b"\x7f" * 8  # corrupt some values in place
    shard.write_bytes(bytes(raw))
    (out / "shard-000000099-000000100.safetensors.tmp123").write_bytes(b"half")  # a killed run's leftover
    said = []
    precompute(tiny["model"], tiny["pairs"], str(out), log=said.append, **kw)
    assert any("fails its recorded checksum" in s for s in said)
    assert not list(out.glob("*.tmp*"))
    got = ReferenceCache(str(out)).data
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_dataset_and_cache_mismatch_is_found_at_start(tiny, tiny_cache, tmp_path):
    rows = [json.loads(line) for line in open(tiny["pairs"])]
    rows[5]["chosen"] = "Edited: " + rows[5]["chosen"]
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(**run_config(tiny, tiny_cache, tmp_path / "run", "dpo", dataset=str(edited)))
    with pytest.raises(ValueError, match=r"ids \[5\]\) were tokenised differently"):
        Trainer(cfg, **QUIET)  # before any step


def test_k_above_the_cache_K_is_refused(tiny, tiny_cache, tmp_path):
    with pytest.raises(ValueError, match="exceeds the cache's cache_k"):
        Trainer(TrainConfig(**run_config(tiny, tiny_cache, tmp_path / "run", "fpo", k=33)), **QUIET)


def test_overwrite_only_removes_what_precompute_wrote(tiny, tmp_path):
    """A user's folder that is not a cache is refused even with --overwrite (it used to be deleted whole); a
    cache with other settings is replaced file by file, leaving everything else in its folder."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    (notes / "src").mkdir()
    with pytest.raises(ValueError, match="holds no cache.*todo.txt.*only ever replaces a cache"):
        precompute(tiny["model"], tiny["pairs"], str(notes), cache_k=8, overwrite=True, progress=False, **LEN)
    assert (notes / "todo.txt").read_text() == "mine" and (notes / "src").is_dir()
    out = tmp_path / "c"
    precompute(tiny["model"], tiny["pairs"], str(out), sae=tiny["sae"], cache_k=8, progress=False, **LEN)
    (out / "README.txt").write_text("what this cache is for")
    precompute(
        tiny["model"], tiny["pairs"], str(out), sae=tiny["sae"], cache_k=16, overwrite=True, progress=False, **LEN
    )
    assert (out / "README.txt").read_text() == "what this cache is for" and ReferenceCache(str(out)).cache_k == 16
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        precompute(tiny["model"], tiny["pairs"], str(tmp_path / "file"), cache_k=8, progress=False, **LEN)


def test_a_cache_from_other_weights_is_refused(tiny, tiny_cache, tmp_path):
    """Same architecture, other weights: the cache's reference is not this policy's start; refused by name."""
    from fpo.reference_cache import CacheMismatchError

    with pytest.raises(CacheMismatchError, match="model.weights_bf16"):
        train(run_config(tiny, tiny_cache, tmp_path / "run", "fpo", model=tiny["model_b"]), **QUIET)


def test_precompute_on_a_complete_cache_writes_nothing(tiny, tmp_path, monkeypatch):
    """Re-running precompute on a finished cache of the same settings (a read-only mount, say) only reads it;
    an incomplete cache in a folder that cannot be written to gets a sentence."""
    import errno as errno_

    import fpo.locking
    import fpo.precompute as pre

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = str(tmp_path / "cache")
    kw = dict(sae=tiny["sae"], cache_k=16, max_length=64, max_prompt_length=32, progress=False, shard_rows=8)
    precompute(tiny["model"], tiny["pairs"], out, log=lambda *a: None, **kw)
    before = {n: (tmp_path / "cache" / n).read_bytes() for n in os.listdir(out)}

    def read_only(*a, **k):
        raise OSError(errno_.EROFS, "Read-only file system")

    monkeypatch.setattr(fpo.locking.os, "open", read_only)
    monkeypatch.setattr(pre, "atomic_write_json", read_only)
    monkeypatch.setattr(pre, "write_shard", read_only)
    said = []
    summary = precompute(tiny["model"], tiny["pairs"], out, log=said.append, **kw)
    assert summary["rows"] == 16 and any("nothing to do" in s for s in said)
    assert {n: (tmp_path / "cache" / n).read_bytes() for n in os.listdir(out)} == before
    # a shard damaged (or missing): the cache is not complete, and the read-only folder is named
    shard = next(n for n in os.listdir(out) if n.endswith(".safetensors"))
    os.remove(os.path.join(out, shard))
    with pytest.raises(ValueError, match="cannot create its lock file .*Read-only"):
        precompute(tiny["model"], tiny["pairs"], out, log=lambda *a: None, **kw)


def test_a_crafted_cache_with_matching_checksums_is_refused(tiny_cache, tmp_path):
    """Checksums rewritten to match do not let an out-of-range feature index (which the kernels, unchecked in
    the training loop, would read out of bounds) or a non-finite value through: the load names the row."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fpo.files import sha256_of

    def crafted(name, change):
        d = tmp_path / name
        shutil.copytree(tiny_cache, d)
        meta = json.loads((d / "meta.json").read_text())
        shard = meta["shards"][0]
        data = load_file(str(d / shard["file"]))
        change(data)
        save_file(data, str(d / shard["file"]))
        shard.update(bytes=os.path.getsize(d / shard["file"]), sha256=sha256_of(str(d / shard["file"])))
        (d / "meta.json").write_text(json.dumps(meta))
        if (d / (shard["file"] + ".sha256")).exists():
            (d / (shard["file"] + ".sha256")).write_text(shard["sha256"])
        return str(d), int(data["ids"][1])

    def index(data):
        data["chosen_idx"][1, 3] = 9999  # the SAE is 200 wide

    def value(data):
        data["rejected_logp_mean"][1] = float("nan")

    path, row = crafted("index", index)
    with pytest.raises(ValueError, match=f"chosen_idx of example id {row} holds 9999, outside \\[-1, 200\\)"):
        ReferenceCache(path)
    path, row = crafted("value", value)
    with pytest.raises(ValueError, match=f"rejected_logp_mean of example id {row} is not finite"):
        ReferenceCache(path)


def test_damaged_meta_and_other_encodings(tiny, tiny_cache, tmp_path):
    """A truncated meta.json gets a sentence from training and is rebuilt by re-running precompute; a UTF-16
    dataset gets a sentence naming the fix; a UTF-8 file with a byte-order mark is read."""
    import shutil

    d = tmp_path / "cache"
    shutil.copytree(tiny_cache, d)
    (d / "meta.json").write_text('{"format_version": ')
    with pytest.raises(ValueError, match="meta.json is damaged"):
        ReferenceCache(str(d))
    os.environ["TRITON_INTERPRET"], old = "0", os.environ.get("TRITON_INTERPRET")
    try:
        precompute(
            tiny["model"],
            tiny["pairs"],
            str(d),
            sae=tiny["sae"],
            cache_k=32,
            progress=False,
            log=lambda *a: None,
            **LEN,
        )
    finally:
        os.environ["TRITON_INTERPRET"] = old or "0"
    assert len(ReferenceCache(str(d))) == 16
    row = {"prompt": "a", "chosen": "b", "rejected": "c"}
    (tmp_path / "u16.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-16")
    with pytest.raises(ValueError, match="is not UTF-8 text .*iconv"):
        load_pairs(str(tmp_path / "u16.jsonl"))
    (tmp_path / "bom.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8-sig")
    assert load_pairs(str(tmp_path / "bom.jsonl"))[0].chosen == "b"


def test_a_cache_of_other_lengths_names_the_flag(tiny, tiny_cache, tmp_path):
    """The cache knows the settings it was built with: the sentence gives the flag that matches it."""
    with pytest.raises(ValueError, match=r"max_length 64, this run uses 80: pass --max-length 64 as the cache"):
        train(run_config(tiny, tiny_cache, tmp_path, "fpo", max_length=80), **QUIET)


def test_a_hand_edited_meta_json_is_a_sentence(tiny_cache, tmp_path):
    """Each field of meta.json missing or of another type: a ValueError naming the cache and what is wrong, never a
    KeyError, TypeError or AttributeError from deeper in."""
    import shutil

    from fpo.reference_cache import ReferenceCache

    edits = {
        "cache_k missing": lambda m: m.pop("cache_k"),
        "cache_k a string": lambda m: m.update(cache_k="32"),
        "pooling missing": lambda m: m.pop("pooling"),
        "saes a string": lambda m: m.update(saes="sae"),
        "an SAE without its key": lambda m: m["saes"][0].pop("key"),
        "an SAE without its site": lambda m: m["saes"][0].pop("site"),
        "width a string": lambda m: m["saes"][0].update(width="200"),
        "a shard without bytes": lambda m: m["shards"][0].pop("bytes"),
        "rows missing": lambda m: m.pop("rows"),
        "format as a string": lambda m: m.update(format_version="2"),
    }
    for what, edit in edits.items():
        copy = tmp_path / what.replace(" ", "_")
        shutil.copytree(tiny_cache, copy)
        meta = json.loads((copy / "meta.json").read_text())
        edit(meta)
        (copy / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="meta.json is damaged or hand-edited|a string, where precompute"):
            ReferenceCache(str(copy))
