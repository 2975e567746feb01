"""The `fpo` command end to end on the tiny model: precompute -> train (YAML + flags) -> eval."""

import json
import os
import subprocess
import sys

import pytest


def _fpo(*args, check=True):
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-m", "fpo.cli", *args], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_precompute_train_eval(tiny, tmp_path):
    cache = str(tmp_path / "cache")
    r = _fpo(
        "precompute",
        "--model",
        tiny["model"],
        "--dataset",
        tiny["pairs"],
        "--sae",
        tiny["sae"],
        "--out",
        cache,
        "--cache-k",
        "32",
        "--max-length",
        "64",
        "--max-prompt-length",
        "32",
        "--no-progress",
    )
    assert "bytes per pair" in r.stdout and "dense fp32 pooled cache would need" in r.stdout
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"method: fpo\nmodel: {tiny['model']}\ndataset: {tiny['pairs']}\ncache: {cache}\nsae: {tiny['sae']}\n"
        f"max_length: 64\nmax_prompt_length: 32\nbatch_size: 4\nmicro_batch_size: 2\nlr: 1e-4\n"
        f"warmup_steps: 0\nlog_every: 1\noutput_dir: {tmp_path / 'run'}\nprogress: false\n"
    )
    _fpo("train", "--config", str(cfg), "--max-steps", "2", "--select", "reference", "--k", "8")
    hist = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [h["step"] for h in hist] == [1, 2]
    out = tmp_path / "eval.json"
    r = _fpo(
        "eval",
        "--model",
        str(tmp_path / "run" / "final"),
        "--dataset",
        tiny["pairs"],
        "--cache",
        cache,
        "--sae",
        tiny["sae"],
        "--reference-model",
        tiny["model"],
        "--max-length",
        "64",
        "--max-prompt-length",
        "32",
        "--max-pairs",
        "4",
        "--k",
        "8",
        "--json",
        str(out),
    )
    res = json.loads(out.read_text())
    assert res["pairs"] == 4 and 0 <= res["accuracy_logp"] <= 1 and res["kl"] >= 0 and res["d"] >= 0
    assert "accuracy_logp" in r.stdout


def test_cli_errors_are_one_clear_line(tiny, tmp_path):
    r = _fpo("train", "--method", "fpo", "--model", tiny["model"], "--dataset", tiny["pairs"], check=False)
    assert r.returncode != 0 and "needs a reference cache" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: simpo\nmodel: m\ndataset: d\nlearning_rate: 1\n")
    r = _fpo("train", "--config", str(bad), check=False)
    assert "unknown config keys ['learning_rate']" in r.stderr


def test_bench_subcommand_runs_from_anywhere(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run(
        [sys.executable, "-m", "fpo.cli", "bench", "step", "--steps", "1", "--methods", "fpo,simpo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fpo/simpo step_ms" in r.stdout


def test_help_shows_ranges_and_protect_flags_need_an_output(tmp_path):
    from fpo.cli import build_parser, main

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "range (0, inf]" in " ".join(text.split())  # --lr
    with pytest.raises(SystemExit, match="--protect and --protect-weight say what"):
        main(["features", "--model", "m", "--reference", "r", "--dataset", "d", "--sae", "s", "--protect", "3"])


def test_batch_pairs_is_micro_batch_size_with_a_warning(capsys):
    """0.2's --batch-pairs / batch_pairs is the one key micro_batch_size: the old names still work, with a warning,
    and both names at once are refused."""
    from fpo.cli import build_parser
    from fpo.config import EvalConfig, config_from_dict, renamed_keys

    args = build_parser().parse_args(["eval", "--model", "m", "--dataset", "d", "--batch-pairs", "7"])
    assert args.micro_batch_size == 7
    assert "--batch-pairs is now --micro-batch-size" in capsys.readouterr().err
    text = build_parser()._subparsers._group_actions[0].choices["precompute"].format_help()
    assert "--micro-batch-size" in text and "--batch-pairs" not in text
    with pytest.warns(FutureWarning, match="batch_pairs is now called micro_batch_size"):
        assert EvalConfig(model="m", dataset="d", **renamed_keys({"batch_pairs": 3})).micro_batch_size == 3
    with pytest.warns(FutureWarning):
        assert (
            config_from_dict({"model": "m", "dataset": "d", "method": "simpo", "batch_pairs": 5}).micro_batch_size == 5
        )
    with pytest.raises(ValueError, match="one key"):
        renamed_keys({"batch_pairs": 3, "micro_batch_size": 2})
