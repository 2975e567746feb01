"""Trustworthy runs: what a new user's mistakes and a hostile or broken disk must never do silently."""

import errno
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from fpo.config import TrainConfig
from fpo.model import load_tokenizer
from fpo.pairs import load_pairs, tokenize_pairs
from fpo.precompute import precompute
from fpo.reference_cache import ReferenceCache
from fpo.train import NonFiniteLossError, Trainer, train

pytestmark = pytest.mark.usefixtures("no_interpreter")
LEN = dict(max_length=64, max_prompt_length=32)
QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "c")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")  # set up before the tests' no_interpreter: the plain-PyTorch path, fast
        precompute(tiny["model"], tiny["pairs"], out, sae=tiny["sae"], cache_k=32, progress=False, **LEN)
    return out


def _cfg(tiny, cache, out, method="simpo", **kw):
    base = dict(
        method=method,
        model=tiny["model"],
        dataset=tiny["pairs"],
        cache=cache if method in ("fpo", "dpo") else None,
        sae=tiny["sae"] if method == "fpo" else None,
        batch_size=4,
        micro_batch_size=2,
        max_steps=2,
        lr=1e-3,
        warmup_steps=0,
        k=16,
        output_dir=str(out),
        log_every=1,
        progress=False,
        **LEN,
    )
    base.update(kw)
    return base


# ---- resume ---------------------------------------------------------------------------------------
class _Exploit:
    """Unpickling this runs a command: what a crafted trainer_state.pt could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_unpickles_code(tiny, tmp_path):
    train(_cfg(tiny, None, tmp_path / "run", save_every=2), **QUIET)
    state = tmp_path / "run" / "checkpoint-000002" / "trainer_state.pt"
    marker = tmp_path / "pwned"
    good = torch.load(state, weights_only=True)  # what we write loads safely
    assert "optimizer" in good and "rng" in good
    good["history"].append({"note": _Exploit(marker)})
    with open(state, "wb") as f:
        pickle.dump(good, f)
    with pytest.raises(ValueError, match="does not match the checksum"):  # the recorded checksum catches it first
        train(_cfg(tiny, None, tmp_path / "run", max_steps=4, resume="latest"), **QUIET)
    from fpo.run_dir import write_checksums

    write_checksums(str(state.parent))  # an attacker rewrites checksums.json too: the load is safe
    with pytest.raises(ValueError, match="safe set"):
        train(_cfg(tiny, None, tmp_path / "run", max_steps=4, resume="latest"), **QUIET)
    assert not marker.exists()


def test_a_run_never_continues_or_overwrites_another(tiny, cache, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny, cache, out, "fpo", save_every=2), **QUIET)
    final = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="holds another run"):  # a plain run into a finished run's directory
        train(_cfg(tiny, cache, out), **QUIET)
    assert (out / "metrics.jsonl").read_text() == final
    with pytest.raises(ValueError, match="method is 'simpo'.*'fpo'"):  # resuming another method's checkpoint
        train(_cfg(tiny, cache, out, resume="latest", max_steps=4), **QUIET)
    with pytest.raises(ValueError, match="lr is 0.01"):  # a changed learning rate is not ignored
        train(_cfg(tiny, cache, out, "fpo", resume="latest", max_steps=4, lr=1e-2), **QUIET)
    train(_cfg(tiny, cache, out, "fpo", resume="latest", max_steps=3, log_every=2), **QUIET)  # allowed changes
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    train(_cfg(tiny, cache, out, overwrite=True), **QUIET)  # asked: replaced
    assert json.loads((out / "summary.json").read_text())["method"] == "simpo"
    assert not any(n.startswith("checkpoint-") for n in os.listdir(out))


def test_a_diverged_model_is_never_checkpointed(tiny, tmp_path):
    """lr 1e10 leaves finite but huge weights whose next loss is NaN: no checkpoint may hold them."""
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="after step 1.*none \\(no checkpoint"):
        train(_cfg(tiny, None, out, lr=1e10, save_every=1, max_steps=3), **QUIET)
    assert not any(n.startswith("checkpoint-") for n in os.listdir(out))


def test_a_full_disk_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    import fpo.train as tr

    out = tmp_path / "run"
    real = tr.torch.save
    calls = {"n": 0}

    def save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(tr.torch, "save", save)
    with pytest.raises(RuntimeError, match="disk is full.*checkpoint-000001 is intact"):
        train(_cfg(tiny, None, out, save_every=1, max_steps=3), **QUIET)
    assert sorted(os.listdir(out)) == [".fpo.lock", "checkpoint-000001", "metrics.jsonl"]  # the lock: see below


# ---- precompute -----------------------------------------------------------------------------------
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


def test_dataset_and_cache_mismatch_is_found_at_start(tiny, cache, tmp_path):
    rows = [json.loads(line) for line in open(tiny["pairs"])]
    rows[5]["chosen"] = "Edited: " + rows[5]["chosen"]
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(**_cfg(tiny, cache, tmp_path / "run", "dpo", dataset=str(edited)))
    with pytest.raises(ValueError, match=r"ids \[5\]\) were tokenised differently"):
        Trainer(cfg, **QUIET)  # before any step


# ---- bad values and bad files -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,value",
    [
        ("max_grad_norm", -1.0),
        ("beta", -1.0),
        ("alpha", -5.0),
        ("max_steps", -3),
        ("max_steps", 0),
        ("gamma", float("nan")),
        ("lr", float("inf")),
        ("weight_decay", -0.1),
        ("k", 0),
        ("max_tokens", 0),
    ],
)
def test_config_values_out_of_range(key, value):
    with pytest.raises(ValueError, match=key):
        TrainConfig(method="simpo", model="m", dataset="d", **{key: value})


def test_k_above_the_cache_K_is_refused(tiny, cache, tmp_path):
    with pytest.raises(ValueError, match="exceeds the cache's cache_k"):
        Trainer(TrainConfig(**_cfg(tiny, cache, tmp_path / "run", "fpo", k=33)), **QUIET)


def test_bad_files_give_sentences(tiny, cache, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = open(tiny["pairs"]).read().splitlines()
    bad.write_text("\n".join(lines[:3] + ['{"prompt": "x", "chosen": "y"'] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match="line 4 is not valid JSON"):
        load_pairs(str(bad))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_pairs(str(tmp_path / "empty.jsonl"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        Trainer(TrainConfig(**_cfg(tiny, cache, blocker / "run")), **QUIET)


def test_eval_stops_at_bad_rows_like_train(tiny, tmp_path):
    from fpo.evaluate import evaluate

    rows = [json.loads(line) for line in open(tiny["pairs"])][:4]
    rows[2]["rejected"] = ""
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="row 2"):
        evaluate(tiny["model"], str(path), **LEN, **QUIET)
    said = []
    assert evaluate(tiny["model"], str(path), bad_rows="skip", log=said.append, **LEN)["pairs"] == 3
    assert any("skipped 1 bad rows" in s for s in said)


def test_hh_rlhf_transcripts_become_chat_turns(tiny, tmp_path):
    path = tmp_path / "hh.jsonl"
    rows = [
        {
            "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.",
            "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: Seven.",
        },
        {"prompt": "\n\nHuman: Name a colour.\n\nAssistant:", "chosen": " Blue.", "rejected": " No."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(str(path))
    assert pairs[0].prompt == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert (pairs[0].chosen, pairs[0].rejected) == ("6.", "Seven.")
    assert pairs[1].prompt == [{"role": "user", "content": "Name a colour."}] and pairs[1].chosen == "Blue."
    tok = load_tokenizer(tiny["model"])
    text = tok.decode(tokenize_pairs(pairs, tok, 128, 64)[0].prompt_ids)
    assert "Human:" not in text and text.count("<|im_start|>user") == 2 and text.rstrip().endswith("assistant")


# ---- the command line --------------------------------------------------------------------------------
def test_every_flag_has_help_choices_and_defaults():
    import argparse

    from fpo import cli

    subs = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in subs.choices.items():
        for action in parser._actions:
            if action.dest in ("help",) or name == "bench":
                continue
            assert action.help, (name, action.dest)
    train_help = subprocess.run(
        [sys.executable, "-m", "fpo.cli", "train", "--help"], capture_output=True, text=True
    ).stdout
    assert "{fpo,dpo,simpo,tdpo1,tdpo2}" in train_help and "{off,pack,share-prompt}" in train_help
    assert "(default 0.5)" in train_help and "by method" in train_help
    r = subprocess.run([sys.executable, "-m", "fpo.cli", "bench"], capture_output=True, text=True)
    assert r.returncode == 2 and "packing" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fpo.cli", "bench", "sae", "--help"], capture_output=True, text=True)
    assert r.stdout.startswith("usage: fpo bench sae")


# ---- second round: data never lost, nothing silently wrong --------------------------------------------
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


def test_one_process_per_run_directory_and_cache(tiny, cache, tmp_path):
    """A second run on a directory in use stops before touching it, naming the holder; the lock goes with the
    process (and with a run that fails to start)."""
    from fpo.locking import DirectoryLock

    out = tmp_path / "run"
    out.mkdir()
    held = DirectoryLock(str(out), "output_dir")  # what a running `fpo train` holds
    with pytest.raises(ValueError, match=f"in use by another process \\(pid {os.getpid()}\\)"):
        train(_cfg(tiny, cache, out), **QUIET)
    assert os.listdir(out) == [".fpo.lock"]
    held.release()
    with pytest.raises(ValueError, match="batch_size"):  # fails to start: leaves the directory free
        train(_cfg(tiny, cache, out, batch_size=3), **QUIET)
    train(_cfg(tiny, cache, out), **QUIET)
    c = tmp_path / "c"
    c.mkdir()
    held = DirectoryLock(str(c), "cache")
    with pytest.raises(ValueError, match="cache .* is in use by another process"):
        precompute(tiny["model"], tiny["pairs"], str(c), cache_k=8, progress=False, **LEN)
    held.release()


def test_temporary_files_never_follow_a_planted_link(tiny, cache, tmp_path):
    """Symlinks planted at the names temporaries used to have (metrics.jsonl.tmp, checkpoint-*.tmp, final) are
    never written through: the victim file outside the run is untouched."""
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    for name in ("metrics.jsonl.tmp", f"metrics.jsonl.tmp{os.getpid()}"):
        os.symlink(victim, out / name)
    os.symlink(victim_dir, out / "checkpoint-000002.tmp")
    train(_cfg(tiny, cache, out, save_every=2), **QUIET)
    assert victim.read_text() == "precious" and not os.listdir(victim_dir)
    assert (out / "checkpoint-000002" / "trainer_state.pt").exists()
    assert not [n for n in os.listdir(out) if ".tmp" in n]  # leftovers of the run's own names removed


def test_a_final_model_gets_the_soundness_check(tiny, cache, tmp_path, monkeypatch):
    """A last step that leaves non-finite weights stops with the error a checkpoint would get; no final model
    holds NaN weights."""
    import fpo.train as tr

    real = tr.Trainer.train_step

    def poisoned(self, step):
        out = real(self, step)
        if self.step == self.total_steps - 1:  # the last step corrupts one weight
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(tr.Trainer, "train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match="after step 2"):
        train(_cfg(tiny, cache, tmp_path / "run", max_steps=2, log_every=5), **QUIET)
    assert not (tmp_path / "run" / "final").exists()


def test_saes_that_can_never_fire_or_bad_configs_are_refused(tmp_path):
    from fpo_kernels import SAEWeights

    d, m = 8, 16
    W, b = torch.randn(d, m), torch.zeros(m)
    for bad in (float("nan"), float("inf")):
        theta = torch.rand(m)
        theta[3] = bad
        with pytest.raises(ValueError, match="non-finite thresholds"):
            SAEWeights.from_tensors(W, b, theta)
    with pytest.raises(ValueError, match="all-zero encoder"):
        SAEWeights.from_tensors(torch.zeros(d, m), b, torch.rand(m))
    from safetensors.torch import save_file

    folder = tmp_path / "sparsify"
    folder.mkdir()
    save_file(
        {"encoder.weight": torch.randn(m, d), "encoder.bias": torch.zeros(m), "b_dec": torch.zeros(d)},
        str(folder / "sae.safetensors"),
    )
    for k, msg in ((5.9, "positive whole number, got 5.9"), (True, "got True"), ("5", "got '5'"), (0, "got 0")):
        (folder / "cfg.json").write_text(json.dumps({"k": k}))
        with pytest.raises(ValueError, match=msg):
            SAEWeights.from_file(str(folder))
    (folder / "cfg.json").write_text(json.dumps({"k": 5.0}))
    assert SAEWeights.from_file(str(folder)).k == 5
    (folder / "cfg.json").write_text(json.dumps([{"k": 5}]))
    with pytest.raises(ValueError, match="must hold a JSON object"):
        SAEWeights.from_file(str(folder))


def test_rows_that_would_train_silently_wrong_are_refused(tmp_path):
    """Chat rows whose chosen and rejected conversations have different prompts (the rejected answer would be
    trained as an answer to the chosen's prompt), non-text chat content, and text that is not valid Unicode:
    each a BadRowError naming the row, or skipped and reported with --bad-rows skip."""
    from fpo.pairs import BadRowError

    user = lambda text: {"role": "user", "content": text}
    bot = lambda text: {"role": "assistant", "content": text}
    rows = [
        {"chosen": [user("What is 2+2?"), bot("4")], "rejected": [user("Name a colour."), bot("5")]},
        {"prompt": "Hi", "chosen": [user("Hi"), bot(7)], "rejected": "Hello"},
        {"prompt": "Hi \ud800 there", "chosen": "a", "rejected": "b"},
        {"chosen": [user("What is 2+2?"), bot("4")], "rejected": [user("What is 2+2?"), bot("5")]},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r, msg in (
        (0, "differ before their last message"),
        (1, "holds a int where text belongs"),
        (2, "not valid Unicode"),
    ):
        one = tmp_path / f"row{r}.jsonl"
        one.write_text(json.dumps(rows[r]) + "\n" + json.dumps(rows[3]) + "\n")
        with pytest.raises(BadRowError, match=f"row 0: .*{msg}"):
            load_pairs(str(one))
    said = []
    pairs = load_pairs(str(path), bad_rows="skip", log=said.append)
    assert [p.id for p in pairs] == [3] and any("3" in s and "skipped" in s for s in said)


def test_a_cache_from_other_weights_is_refused(tiny, cache, tmp_path):
    """Same architecture, other weights: the cache's reference is not this policy's start; refused by name."""
    from fpo.reference_cache import CacheMismatchError

    with pytest.raises(CacheMismatchError, match="model.weights_bf16"):
        train(_cfg(tiny, cache, tmp_path / "run", "fpo", model=tiny["model_b"]), **QUIET)


def test_a_corrupted_checkpoint_is_not_resumed(tiny, tmp_path):
    """Flipped bits in a checkpoint's weights (it used to resume and 'finish' at loss 1e34), or a file gone:
    resume stops, naming the file."""
    out = tmp_path / "run"
    train(_cfg(tiny, None, out, save_every=2, max_steps=2), **QUIET)
    ckpt = out / "checkpoint-000002"
    weights = next(ckpt.glob("model*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0x40
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{weights.name} does not match the checksum"):
        train(_cfg(tiny, None, out, max_steps=4, resume="latest"), **QUIET)
    weights.unlink()
    with pytest.raises(ValueError, match=f"lacks {weights.name}"):
        train(_cfg(tiny, None, out, max_steps=4, resume="latest"), **QUIET)


def test_two_first_time_conversions_at_once(tiny, tmp_path, monkeypatch):
    """Two processes converting the demo model for the first time each write their own temporary folder; the
    second to finish finds the first's model and leaves nothing behind (they used to share one folder)."""
    import threading

    import fpo.assets as assets
    import fpo.model as fm

    monkeypatch.setenv("FPO_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(assets, "_gguf_path", lambda: "unused.gguf")
    barrier, loading = threading.Barrier(2), threading.Lock()
    real_model, real_tok = fm.load_model, fm.load_tokenizer

    def load_model(path, dtype=None):
        with loading:  # transformers' loading is not thread-safe; the conversions' writes are
            model = real_model(tiny["model"])
        barrier.wait(timeout=60)  # both conversions are under way before either writes
        return model

    monkeypatch.setattr(fm, "load_model", load_model)
    monkeypatch.setattr(fm, "load_tokenizer", lambda path: real_tok(tiny["model"]))
    results, errors = [], []
    runs = [threading.Thread(target=lambda: _collect(assets.ensure_demo_model, results, errors)) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    out = results[0]
    assert os.path.exists(os.path.join(out, "config.json"))
    assert not [n for n in os.listdir(os.path.dirname(out)) if ".tmp" in n]


def _collect(fn, results, errors):
    try:
        results.append(fn(log=lambda *a: None))
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def test_more_mistakes_get_sentences(tiny, cache, tmp_path, monkeypatch):
    """A YAML config that is a list or carries a Python tag, a CUDA device that is not there, a trainer state
    missing keys, a full disk during precompute, `eval --json` into a new folder, and a run stopped before its
    first save: each a sentence that names the way out, never a traceback."""
    from fpo.cli import main

    for text, msg in (
        ("- method: simpo\n", "must hold a mapping"),
        ("method: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        with pytest.raises(SystemExit, match=msg):
            main(["train", "--config", str(cfg)])
    with pytest.raises(ValueError, match="cuda:99"):
        train(_cfg(tiny, cache, tmp_path / "dev", device="cuda:99"), **QUIET)
    out = tmp_path / "run"
    train(_cfg(tiny, None, out, save_every=2), **QUIET)
    ckpt = out / "checkpoint-000002"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    del state["scheduler"]
    torch.save(state, ckpt / "trainer_state.pt")
    from fpo.run_dir import write_checksums

    write_checksums(str(ckpt))
    with pytest.raises(ValueError, match="lacks its scheduler or RNG state"):
        train(_cfg(tiny, None, out, max_steps=4, resume="latest"), **QUIET)
    import safetensors.torch as st

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", full)
    c = tmp_path / "cache-full"
    with pytest.raises(RuntimeError, match="disk is full while writing shard-.*run the same command again"):
        precompute(tiny["model"], tiny["pairs"], str(c), cache_k=8, progress=False, **LEN)
    assert not [n for n in os.listdir(c) if ".tmp" in n]
    monkeypatch.undo()
    target = tmp_path / "new" / "folder" / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                tiny["model"],
                "--dataset",
                tiny["pairs"],
                "--max-pairs",
                "2",
                "--max-length",
                "48",
                "--max-prompt-length",
                "24",
                "--json",
                str(target),
            ]
        )
        == 0
    )
    assert json.loads(target.read_text())["pairs"] == 2
    stopped = tmp_path / "stopped"  # killed while saving its first checkpoint: metrics only
    stopped.mkdir()
    (stopped / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    with pytest.raises(ValueError, match="stopped before saving any checkpoint.*--overwrite"):
        train(_cfg(tiny, cache, stopped), **QUIET)
    with pytest.raises(ValueError, match="no checkpoint-\\* folder.*--overwrite"):
        train(_cfg(tiny, cache, stopped, resume="latest"), **QUIET)


def test_split_is_chosen_or_refused(tmp_path):
    """A DatasetDict or a folder of split files: --split picks one; without it train, or the only split; several
    and none named train stops with the list (it used to train on the first, test_prefs); a single file has none."""
    import datasets

    from fpo.pairs import load_pairs

    row = lambda tag: {"prompt": f"p {tag}", "chosen": f"c {tag}", "rejected": f"r {tag}"}
    dd = datasets.DatasetDict(
        {
            "test_prefs": datasets.Dataset.from_list([row("test")]),
            "train_prefs": datasets.Dataset.from_list([row("train"), row("train2")]),
        }
    )
    saved = tmp_path / "dd"
    dd.save_to_disk(str(saved))
    with pytest.raises(
        ValueError, match=r"several splits and none named train: \['test_prefs', 'train_prefs'\]; pass --split"
    ):
        load_pairs(str(saved))
    assert [p.prompt for p in load_pairs(str(saved), split="train_prefs")] == ["p train", "p train2"]
    with pytest.raises(ValueError, match="no split 'valid'.*test_prefs"):
        load_pairs(str(saved), split="valid")
    folder = tmp_path / "files"
    folder.mkdir()
    for name, tag in (("train", "train"), ("test", "test")):
        (folder / f"{name}.jsonl").write_text(json.dumps(row(tag)) + "\n")
    assert [p.prompt for p in load_pairs(str(folder))] == ["p train"]
    assert [p.prompt for p in load_pairs(str(folder), split="test")] == ["p test"]
    with pytest.raises(ValueError, match="one file, with no splits"):
        load_pairs(str(folder / "train.jsonl"), split="train")


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_lr_schedules(name):
    """Warmup: step s runs at (s + 1) / warmup of lr; then constant, or transformers' linear / cosine decay,
    taken one step ahead, so the last step's lr is not 0."""
    import math

    from fpo.train import make_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    warm, total = 3, 10
    sched = make_scheduler(opt, name, warm, total)
    got = []
    for _ in range(total):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for s, lr in enumerate(got):
        x = s + 1
        if x < warm:
            want = x / warm
        elif name == "constant":
            want = 1.0
        else:
            progress = (x - warm) / (total + 1 - warm)
            want = 1 - progress if name == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        assert lr == pytest.approx(want, abs=1e-9), (s, lr, want)
    assert got[-1] > 0


def test_huge_rows_are_tokenised_within_a_bound_and_exactly(tmp_path):
    """A text far longer than what is kept is cut before tokenisation (a 20 MB line used to take gigabytes),
    and the kept tokens equal those of tokenising the whole text: string and chat prompts (their last tokens),
    responses (their first), and a text of very long tokens, where the cut would not be safe and the whole
    text is tokenised instead."""
    import random

    from fpo import assets
    from fpo.pairs import CHARS_PER_TOKEN, TOKEN_MARGIN, Pair, _prompt_ids, _response_ids

    tok = load_tokenizer(assets.ensure_demo_model(log=lambda *a: None))
    rng = random.Random(0)
    words = ["alpha", "beta", "résumé", "42", "don't", "\n", "  ", "x" * 7, "—", "日本"]
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))
    long_a, long_b, long_c = text(60_000), text(60_000), text(60_000)  # ~400 KB each
    spaces = "word" + " " * 200_000 + "end"  # few, very long tokens
    pairs = [
        Pair(0, long_a, long_b, long_c),
        Pair(
            1,
            [
                {"role": "user", "content": long_c},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": long_a},
            ],
            long_b,
            "short",
        ),
        Pair(2, "Hi", spaces, long_a),
    ]
    seen = []

    class Recording:
        """The tokenizer, recording the longest text it is given."""

        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, text, **kw):
            seen.append(len(text))
            return tok(text, **kw)

        def apply_chat_template(self, msgs, **kw):
            seen.append(sum(len(m["content"]) for m in msgs))
            return tok.apply_chat_template(msgs, **kw)

    L, PL = 256, 96
    got = tokenize_pairs(pairs, Recording(), max_length=L, max_prompt_length=PL)
    for p, g in zip(pairs, got):  # the whole texts, tokenised whole
        prompt = _prompt_ids(tok, p.prompt)[-PL:]
        room = L - len(prompt)
        assert g.prompt_ids == tuple(prompt)
        assert g.chosen_ids == tuple(_response_ids(tok, p.chosen)[:room])
        assert g.rejected_ids == tuple(_response_ids(tok, p.rejected)[:room])
    bound = 2 * (L + TOKEN_MARGIN) * CHARS_PER_TOKEN + 10
    assert sorted(seen)[-2] < bound < len(long_a)  # only the text of long tokens went in whole
    assert max(seen) == len(spaces)


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


def test_a_crafted_cache_with_matching_checksums_is_refused(cache, tmp_path):
    """Checksums rewritten to match do not let an out-of-range feature index (which the kernels, unchecked in
    the training loop, would read out of bounds) or a non-finite value through: the load names the row."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fpo.files import sha256_of

    def crafted(name, change):
        d = tmp_path / name
        shutil.copytree(cache, d)
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


def test_damaged_meta_and_other_encodings(tiny, cache, tmp_path):
    """A truncated meta.json gets a sentence from training and is rebuilt by re-running precompute; a UTF-16
    dataset gets a sentence naming the fix; a UTF-8 file with a byte-order mark is read."""
    import shutil

    d = tmp_path / "cache"
    shutil.copytree(cache, d)
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
