"""`fpo train --compile`: each decoder layer compiled (the SAE's hook traced with it), the fused ops outside;
losses and gradients equal eager's within rounding for every method, layout, checkpointing and LoRA; the first
step, compilation included, reported apart from the step times."""

import json

import pytest
import torch
from run_setup import QUIET, run_config

from fpo.config import config_from_dict
from fpo.train import Trainer, train


def _grads_after_one_step(cfg):
    """(the first step's metrics, the gradient of every trained parameter) of a run built from cfg."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = Trainer(config_from_dict(cfg), **QUIET)
    try:
        trainer.optimizer.step = lambda *a, **k: None  # keep the gradients and weights of step 1 to compare
        trainer.optimizer.zero_grad = lambda *a, **k: None
        metrics, _, _ = trainer.train_step(0)
        grads = {n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None}
        assert (counters["stats"]["unique_graphs"] > 0) == cfg.get("compile", False)  # compiled code ran, or none
        return {k: v.item() for k, v in metrics.items()}, grads
    finally:
        trainer.close()


@pytest.mark.parametrize(
    "method,extra",
    [
        ("fpo", {}),
        ("fpo", {"gradient_checkpointing": True, "packing": "off"}),
        ("dpo", {"packing": "off"}),
        ("simpo", {"packing": "pack", "gradient_checkpointing": True}),
        ("tdpo1", {}),
        ("fpo", {"precision": "bf16-mixed"}),  # the body under bf16 autocast, as a GPU run takes it
        ("simpo", {"precision": "bf16-pure"}),  # bf16 weights
        ("fpo", {"precision": "bf16-compensated", "packing": "pack"}),
        ("tdpo2", {"lora_r": 4}),
    ],
)
def test_compiled_step_equals_eager(tiny, tiny_cache, tmp_path, method, extra):
    cfg = run_config(tiny, tiny_cache, tmp_path / "eager", method, **extra)
    want_m, want_g = _grads_after_one_step(cfg)
    got_m, got_g = _grads_after_one_step(
        dict(cfg, output_dir=str(tmp_path / "compiled"), compile=True, compile_backend="aot_eager")
    )
    for k in want_m:
        assert got_m[k] == pytest.approx(want_m[k], rel=1e-5, abs=1e-6), k
    assert set(got_g) == set(want_g) and want_g
    for n, want in want_g.items():
        if want.dtype == torch.float32:
            torch.testing.assert_close(got_g[n], want, rtol=1e-4, atol=1e-6)
        else:  # bf16 gradients (bf16 weights): the traced graph rounds in other places, by a few bf16 ulps
            scale = want.float().abs().max().item()
            torch.testing.assert_close(got_g[n].float(), want.float(), rtol=1.6e-2, atol=1.6e-2 * scale)


def test_the_first_compiled_step_is_reported_apart(tiny, tmp_path):
    said = []
    train(run_config(tiny, None, tmp_path, max_steps=3, compile=True, compile_backend="aot_eager"), log=said.append)
    hist = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert hist[0]["step_time_s"] is None and hist[0]["first_step_s"] > 0
    assert all(h["step_time_s"] > 0 and "first_step_s" not in h for h in hist[1:])
    [line] = [s for s in said if s.startswith("[fpo] compile (aot_eager)")]
    assert "graph breaks in the compiled layers" in line
    # a step that compiled again (new shapes) is marked and said, never taken for an ordinary step
    assert hist[0]["recompiled"] == 0 and all(h["recompiled"] in (0, 1) for h in hist)
    again = [h["step"] for h in hist if h["recompiled"]]
    assert [s for s in said if "new graph(s)" in s] == [s for s in said if any(f"step {k} " in s for k in again)]


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("hook", ["blocks.2.hook_mlp_out", "blocks.2.hook_attn_out"])
def test_compile_refuses_an_sae_inside_the_layer(tiny, tiny_cache, tmp_path, checkpointing, hook):
    """An SAE on a branch's output (mlp_out, attn_out) is read by a hook on a module inside a compiled layer, which
    dynamo traces past (with or without checkpointing, with either backend): refused by name before any step."""
    import tiny as t

    sae = t.make_sae(str(tmp_path / "sae_branch"), hook_name=hook)
    cfg = run_config(
        tiny, tiny_cache, tmp_path, "fpo", compile=True, gradient_checkpointing=checkpointing, sae=sae,
        compile_backend="aot_eager",
    )  # fmt: skip
    with pytest.raises(ValueError, match="inside a compiled decoder layer"):
        Trainer(config_from_dict(cfg), **QUIET)


def test_compile_backend_without_compile_is_refused(tiny, tiny_cache, tmp_path):
    cfg = run_config(tiny, tiny_cache, tmp_path, "simpo", compile_backend="aot_eager")
    with pytest.raises(ValueError, match="add --compile"):
        Trainer(config_from_dict(cfg), **QUIET)


@pytest.mark.gpu
@pytest.mark.parametrize("method,extra", [("fpo", {}), ("simpo", {"gradient_checkpointing": True}), ("tdpo2", {})])
def test_inductor_compiled_step_equals_eager_on_cuda(tiny, tiny_cache, tmp_path, method, extra, monkeypatch):
    """The default backend, inductor, generating Triton kernels for the body on a GPU: equal within rounding."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = run_config(tiny, tiny_cache, tmp_path / "eager", method, device="cuda", precision="fp32", **extra)
    want_m, want_g = _grads_after_one_step(cfg)
    got_m, got_g = _grads_after_one_step(dict(cfg, output_dir=str(tmp_path / "compiled"), compile=True))
    for k in want_m:
        assert got_m[k] == pytest.approx(want_m[k], rel=1e-4, abs=1e-5), k
    assert set(got_g) == set(want_g) and want_g
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-3, atol=1e-5)


def test_a_compiled_run_resumes_eager_and_back(tiny, tmp_path):
    """Compiled and eager steps are equal within rounding, so a run may switch at a resume."""
    cfg = run_config(tiny, None, tmp_path, max_steps=2, save_every=1, compile=True, compile_backend="aot_eager")
    train(cfg, **QUIET)
    train(dict(cfg, compile=False, compile_backend="inductor", resume="latest", max_steps=3), **QUIET)
    train(dict(cfg, resume="latest", max_steps=4), **QUIET)
    hist = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
