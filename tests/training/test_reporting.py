"""What a run reports is what happened: the lr each step applied, the gradient norm before clipping, TRL's metric
names, progress lines that show the step they name, and numbers printed in significant digits."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from run_setup import QUIET, run_config

from fpo.config import config_from_dict
from fpo.train import Trainer, train

pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step")  # _watch_optimizer wraps it on purpose


def _history(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def _watch_optimizer(trainer, seen):
    """Record, at each optimizer step, the lr it applies and the norm of the gradients it applies them to."""
    real = trainer.optimizer.step

    def step(*a, **k):
        grads = [p.grad.double() for p in trainer.policy.parameters() if p.grad is not None]
        seen.append((trainer.optimizer.param_groups[0]["lr"], torch.cat([g.reshape(-1) for g in grads]).norm().item()))
        return real(*a, **k)

    trainer.optimizer.step = step


def test_the_logged_lr_is_the_lr_each_step_applied(tiny, tmp_path):
    """Warmup 3 at lr 3e-5, two steps a log line: each record carries its own step's lr (1e-5, 2e-5, 3e-5, 3e-5),
    read from the optimizer as it steps; it used to be read after the schedule moved, one step ahead, once a line."""
    cfg = run_config(tiny, None, tmp_path, lr=3e-5, warmup_steps=3, max_steps=4, log_every=2, batch_size=2)
    trainer, seen = Trainer(config_from_dict(cfg), **QUIET), []
    try:
        _watch_optimizer(trainer, seen)
        trainer.fit()
    finally:
        trainer.close()
    logged = [h["learning_rate"] for h in _history(tmp_path)]
    assert logged == pytest.approx([lr for lr, _ in seen], rel=1e-12)
    assert logged == pytest.approx([1e-5, 2e-5, 3e-5, 3e-5], rel=1e-9)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_grad_norm_is_the_norm_before_clipping(tiny, tmp_path, max_grad_norm):
    cfg = run_config(tiny, None, tmp_path, max_steps=2, max_grad_norm=max_grad_norm)
    trainer, seen = Trainer(config_from_dict(cfg), **QUIET), []
    try:
        _watch_optimizer(trainer, seen)
        trainer.fit()
    finally:
        trainer.close()
    logged = [h["grad_norm"] for h in _history(tmp_path)]
    applied = [norm for _, norm in seen]
    if max_grad_norm is None:
        assert logged == pytest.approx(applied, rel=1e-4)
    else:  # clipped: the optimizer sees the bound, the log the norm before it
        assert all(g > 10 * max_grad_norm for g in logged)
        assert applied == pytest.approx([max_grad_norm] * len(applied), rel=1e-3)


@pytest.mark.parametrize("method", ["simpo", "fpo"])
def test_metric_names_are_trls(tiny, tiny_cache, tmp_path, method):
    """An fpo run overlays a TRL run: TRL's names and meanings (rewards/*, logps/* summed, learning_rate,
    grad_norm, epoch); what only FPO has keeps its own name."""
    train(run_config(tiny, tiny_cache, tmp_path, method, max_steps=2, batch_size=4), **QUIET)
    trl = {
        "loss",
        "learning_rate",
        "grad_norm",
        "epoch",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    }
    for h in _history(tmp_path):
        assert trl <= set(h) and not {"lr", "accuracy", "margin", "reward_chosen"} & set(h)
        assert h["rewards/margins"] == pytest.approx(h["rewards/chosen"] - h["rewards/rejected"], abs=1e-6)
        assert h["logps/chosen"] < 0 and h["logps/rejected"] < 0  # summed over a response: well below a mean
        assert h["epoch"] == pytest.approx(h["step"] / (16 // 4))
        assert ("d_chosen" in h) == (method == "fpo")


def test_progress_lines_show_the_step_they_name(tiny, tmp_path, capsys):
    """Without a terminal (sbatch, nohup, | tee) each progress line carries its own step's metrics, the last
    step's included; they used to show the previous step's."""
    train(run_config(tiny, None, tmp_path, max_steps=3, progress=True), **QUIET)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("train simpo:")]
    hist = _history(tmp_path)
    assert len(lines) == len(hist) == 3
    for line, h in zip(lines, hist):
        assert f"{h['step']}/3 steps" in line and f"loss={h['loss']:.4g}" in line
        assert f"lr={h['learning_rate']:.3g}" in line


def test_a_warmup_longer_than_the_run_is_said(tiny, tmp_path):
    said = []
    train(run_config(tiny, None, tmp_path, max_steps=2, warmup_steps=150, lr=5e-7), log=said.append)
    [warning] = [s for s in said if "warmup_steps 150 exceeds the run's 2 steps" in s]
    assert "never reaches 5e-07" in warning and "--warmup-steps" in warning


def test_eval_prints_d_in_significant_digits(tiny, tiny_cache, tmp_path):
    """FPO's D of a policy that has barely moved is ~1e-6: printed to four decimals it read 0.0000."""
    run = tmp_path / "run"
    train(run_config(tiny, tiny_cache, run, "fpo", max_steps=1, lr=1e-6), **QUIET)
    out = tmp_path / "eval.json"
    r = subprocess.run(
        [sys.executable, "-m", "fpo.cli", "eval", "--model", str(run / "final"), "--dataset", tiny["pairs"]]
        + ["--cache", tiny_cache, "--sae", tiny["sae"], "--k", "16", "--max-length", "64"]
        + ["--max-prompt-length", "32", "--json", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())["d"]
    assert 0 < d < 1e-3
    assert re.search(rf"\b{re.escape(format(d, '.4g'))}\b", r.stdout), r.stdout
