"""`fpo train --body-kernels liger`: liger-kernel's body kernels for the model's architecture, never its fused
linear cross-entropy; an architecture it does not cover, or liger-kernel missing, refused with a sentence. Liger's
RMSNorm and SwiGLU kernels do not run under Triton's interpreter (they pass a Python float where the interpreter
wants a tensor), so their equality with eager is checked on a GPU; its RoPE kernel does, and is checked here."""

import json
import sys

import pytest
import torch
from run_setup import QUIET, run_config

from fpo.model import apply_body_kernels, load_model, transformers_patches_undone

pytest.importorskip("liger_kernel")

# the Liger kernels run under the Triton interpreter on the CPU
pytestmark = pytest.mark.interpreter


@pytest.fixture
def restore_llama_rope():
    """liger-kernel patches transformers' Llama module itself (RoPE, and the RMSNorm and MLP classes every later
    model is built from): put everything back after the test."""
    from transformers.models.llama import modeling_llama  # noqa: F401  (loaded, so that it is restored)

    with transformers_patches_undone():
        yield


def test_liger_body_kernels_never_the_fused_cross_entropy(tiny, restore_llama_rope):
    model = load_model(tiny["model"])
    forward = type(model).forward
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    before = [m.forward for m in norms]
    applied = apply_body_kernels(model, "liger")
    assert {"rms_norm", "rope", "swiglu"} <= set(applied)
    assert type(model).forward is forward and model.forward.__func__ is forward  # the head is fpo's, not Liger's
    assert any(m.forward != f for m, f in zip(norms, before)) or any(
        "Liger" in type(m).__name__ for m in model.modules()
    )


def test_what_liger_does_not_cover_is_refused(tiny, monkeypatch, restore_llama_rope):
    model = load_model(tiny["model"])
    monkeypatch.setattr(model.config, "model_type", "some-new-arch")
    with pytest.raises(ValueError, match="liger-kernel has no kernels for 'some-new-arch' models"):
        apply_body_kernels(model, "liger")
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)
    with pytest.raises(ValueError, match="needs liger-kernel: pip install liger-kernel"):
        apply_body_kernels(model, "liger")


def _liger_rope_trains_as_eager(model_path):
    """Liger's RoPE kernel, patched in by apply_body_kernels: the logits and every gradient of a training forward
    and backward equal eager's. Run in a process of its own under TRITON_INTERPRET=1."""
    import fpo.model

    eager, liger = load_model(model_path), load_model(model_path)
    fpo.model.LIGER_BODY = {"rope": True, "rms_norm": False, "swiglu": False}
    assert apply_body_kernels(liger, "liger") == ["rope"]
    ids = torch.randint(0, eager.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, model in (("eager", eager), ("liger", liger)):
        logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        out[name] = logits.detach(), {n: p.grad for n, p in model.named_parameters()}
    from transformers.models.llama import modeling_llama

    assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")  # the kernel really ran
    torch.testing.assert_close(out["liger"][0], out["eager"][0], rtol=1e-5, atol=1e-5)
    for n, g in out["eager"][1].items():
        torch.testing.assert_close(out["liger"][1][n], g, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter: CPU only (the GPU test covers all)")
def test_liger_rope_under_the_interpreter_trains_as_eager(tiny):
    """In a fresh process: Triton decides whether a kernel is interpreted when its module is imported, and a test
    before this one may have imported liger-kernel's kernels for a GPU."""
    import os
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path[:0] = {[here, os.path.dirname(here)]!r}; "
        f"from test_body_kernels import _liger_rope_trains_as_eager as check; check({tiny['model']!r})"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["fpo", "simpo", "tdpo2"])
def test_liger_body_kernels_train_as_eager(tiny, tiny_cache, tmp_path, method, restore_llama_rope, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base = run_config(tiny, tiny_cache, tmp_path / "eager", method, max_steps=2, device="cuda", precision="fp32")
    from fpo.train import train

    train(base, **QUIET)
    train(dict(base, output_dir=str(tmp_path / "liger"), body_kernels="liger"), **QUIET)
    a = [json.loads(x)["loss"] for x in open(tmp_path / "eager" / "metrics.jsonl")]
    b = [json.loads(x)["loss"] for x in open(tmp_path / "liger" / "metrics.jsonl")]
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
    assert torch.cuda.is_available()


def test_body_kernels_and_compile_refuse_what_this_machine_lacks(tiny, tmp_path, monkeypatch):
    from fpo.config import config_from_dict
    from fpo.train import Trainer

    with pytest.raises(ValueError, match="Triton kernels for CUDA devices; this run is on cpu"):
        Trainer(config_from_dict(run_config(tiny, None, tmp_path / "a", device="cpu", body_kernels="liger")), **QUIET)
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="needs a compiler .* --compile-backend aot_eager"):
        Trainer(config_from_dict(run_config(tiny, None, tmp_path / "b", device="cpu", compile=True)), **QUIET)
