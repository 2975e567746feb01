"""Bad values, bad files and odd data: every mistake a new user can make gets a sentence naming the argument and the
fix, never a traceback or a silently wrong run."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from run_setup import LEN, QUIET, run_config

from fpo.config import TrainConfig
from fpo.model import load_tokenizer
from fpo.pairs import load_pairs, tokenize_pairs
from fpo.precompute import precompute
from fpo.train import Trainer, train


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


def test_bad_files_give_sentences(tiny, tiny_cache, tmp_path):
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
        Trainer(TrainConfig(**run_config(tiny, tiny_cache, blocker / "run")), **QUIET)


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


def test_two_first_time_conversions_at_once(tiny, tmp_path, monkeypatch):
    """Two first-time conversions of the demo model at once: one converts, the other waits for it (a lock) and
    finds its model; nothing is left behind, and the model is converted once."""
    import threading

    import fpo.assets as assets
    import fpo.model as fm

    monkeypatch.setenv("FPO_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(assets, "_gguf_path", lambda: "unused.gguf")
    loading, calls = threading.Lock(), []
    real_model, real_tok = fm.load_model, fm.load_tokenizer

    def load_model(path, dtype=None):
        with loading:  # transformers' loading is not thread-safe
            calls.append(path)
            return real_model(tiny["model"])

    monkeypatch.setattr(fm, "load_model", load_model)
    monkeypatch.setattr(fm, "load_tokenizer", lambda path: real_tok(tiny["model"]))
    results, errors = [], []
    runs = [threading.Thread(target=lambda: _collect(assets.ensure_demo_model, results, errors)) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert len(calls) == 1  # the second found the first's model
    out = results[0]
    assert os.path.exists(os.path.join(out, "config.json"))
    assert not [n for n in os.listdir(os.path.dirname(out)) if ".tmp" in n]


def _collect(fn, results, errors):
    try:
        results.append(fn(log=lambda *a: None))
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def test_more_mistakes_get_sentences(tiny, tiny_cache, tmp_path, monkeypatch):
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
        train(run_config(tiny, tiny_cache, tmp_path / "dev", device="cuda:99"), **QUIET)
    out = tmp_path / "run"
    train(run_config(tiny, None, out, save_every=2), **QUIET)
    ckpt = out / "checkpoint-000002"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    del state["scheduler"]
    torch.save(state, ckpt / "trainer_state.pt")
    from fpo.run_dir import write_checksums

    write_checksums(str(ckpt))
    with pytest.raises(ValueError, match="lacks its scheduler or RNG state"):
        train(run_config(tiny, None, out, max_steps=4, resume="latest"), **QUIET)
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
        train(run_config(tiny, tiny_cache, stopped), **QUIET)
    with pytest.raises(ValueError, match="no checkpoint-\\* folder.*--overwrite"):
        train(run_config(tiny, tiny_cache, stopped, resume="latest"), **QUIET)


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


def test_huge_rows_are_tokenised_within_a_bound_and_exactly(tmp_path):
    """A text far longer than what is kept is cut before tokenisation (a 20 MB line used to take gigabytes),
    and the kept tokens equal those of tokenising the whole text: string and chat prompts (their last tokens),
    responses (their first), and a text of very long tokens, where the cut would not be safe and the whole
    text is tokenised instead."""
    import random

    from fpo import assets
    from fpo.pairs import CHARS_PER_TOKEN, TOKEN_MARGIN, Pair, _response_ids, prompt_ids

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
        prompt = prompt_ids(tok, p.prompt)[-PL:]
        room = L - len(prompt)
        assert g.prompt_ids == tuple(prompt)
        assert g.chosen_ids == tuple(_response_ids(tok, p.chosen)[:room])
        assert g.rejected_ids == tuple(_response_ids(tok, p.rejected)[:room])
    bound = 2 * (L + TOKEN_MARGIN) * CHARS_PER_TOKEN + 10
    assert sorted(seen)[-2] < bound < len(long_a)  # only the text of long tokens went in whole
    assert max(seen) == len(spaces)


def test_cache_k_above_the_sae_width_is_refused(tiny, tmp_path):
    """It was stored as asked: a meta.json of megabytes and hundreds of KB a pair of empty slots."""
    with pytest.raises(ValueError, match=r"cache_k 5000 exceeds the width 200 of SAE .*--cache-k 200 or less"):
        precompute(tiny["model"], tiny["pairs"], str(tmp_path / "c"), sae=tiny["sae"], cache_k=5000, **LEN, **QUIET)
    assert not os.path.exists(tmp_path / "c" / "meta.json")


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """A few hundred bytes of nested YAML aliases ("billion laughs") would expand to gigabytes: a config needs no
    aliases, so the first one is refused, in a sentence naming the file."""
    import time

    from fpo.config import load_config

    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    lines.append("model: *i")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    t0 = time.time()
    with pytest.raises(ValueError, match=r"bomb.yaml is not valid YAML config \(anchors and aliases"):
        load_config(str(bomb))
    assert time.time() - t0 < 5
    big = tmp_path / "big.yaml"
    big.write_text("model: " + "x" * (2 << 20))
    with pytest.raises(ValueError, match="larger than"):
        load_config(str(big))


def test_precompute_out_under_a_file_is_a_sentence(tiny, tmp_path):
    from fpo.precompute import precompute

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot be created"):
        precompute(tiny["model"], tiny["pairs"], str(tmp_path / "file" / "cache"), progress=False, **LEN, **QUIET)


def test_a_truncated_model_is_a_sentence_in_every_command(tiny, tmp_path):
    """An interrupted download or copy: half a model.safetensors is named as such by train, eval and precompute."""
    import shutil

    from fpo.evaluate import evaluate
    from fpo.precompute import precompute
    from fpo.train import train

    bad = tmp_path / "model"
    shutil.copytree(tiny["model"], bad)
    weights = bad / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    match = "truncated or damaged"
    with pytest.raises(ValueError, match=match):
        train(dict(run_config(tiny, None, tmp_path / "r"), model=str(bad)), **QUIET)
    with pytest.raises(ValueError, match=match):
        evaluate(str(bad), tiny["pairs"], **LEN, **QUIET)
    with pytest.raises(ValueError, match=match):
        precompute(str(bad), tiny["pairs"], str(tmp_path / "c"), progress=False, **LEN, **QUIET)


def test_an_sae_whose_hook_name_is_not_a_name_is_a_sentence(tiny, tmp_path):
    import shutil

    from fpo.sae import load_sae

    sae = tmp_path / "sae"
    shutil.copytree(tiny["sae"], sae)
    cfg = json.loads((sae / "cfg.json").read_text())
    cfg["hook_name"] = 12
    (sae / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hook_name is 12, not a name"):
        load_sae(str(sae))
