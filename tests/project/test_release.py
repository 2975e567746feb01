"""What a release needs: ruff and mypy clean, a typed public API, and a wheel and an sdist that build, hold what
they should, and install into an environment with only the core dependencies."""

import inspect
import os
import subprocess
import sys
import zipfile

import pytest
from helpers import ROOT

import fpo_kernels
import fpo_kernels.losses


def _run(*cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)


def test_ruff_lint_and_format_are_clean():
    ruff = [sys.executable, "-m", "ruff"]
    r = _run(*ruff, "check", ".")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run(*ruff, "format", "--check", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_is_clean_on_both_packages():
    r = _run(sys.executable, "-m", "mypy")  # files and settings: pyproject's [tool.mypy]
    assert r.returncode == 0, r.stdout + r.stderr


def _public_callables():
    for name in fpo_kernels.__all__ + [f"losses.{n}" for n in fpo_kernels.losses.__all__]:
        obj = fpo_kernels.losses if name.startswith("losses.") else fpo_kernels
        obj = getattr(obj, name.removeprefix("losses."))
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if callable(member) and (not attr.startswith("_") or attr == "__init__"):
                    yield f"{name}.{attr}", member
                elif isinstance(member, classmethod) and not attr.startswith("_"):
                    yield f"{name}.{attr}", member.__func__
        elif callable(obj):
            yield name, obj


def test_public_api_is_annotated_and_documented():
    missing = []
    for name, fn in _public_callables():
        sig = inspect.signature(fn)
        for p in sig.parameters.values():
            if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty:
                missing.append(f"{name}({p.name})")
        if sig.return_annotation is inspect.Signature.empty:
            missing.append(f"{name} -> ?")
        if not fn.__name__.startswith("_") and not (fn.__doc__ or "").strip():
            missing.append(f"{name}: no docstring")
    assert not missing, missing
    assert os.path.exists(os.path.join(os.path.dirname(fpo_kernels.__file__), "py.typed"))


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    r = _run(sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheel = next(p for p in out.iterdir() if p.suffix == ".whl")
    sdist = next(p for p in out.iterdir() if p.name.endswith(".tar.gz"))
    return wheel, sdist


def test_wheel_and_sdist_hold_what_they_should(dists):
    import tarfile

    wheel, sdist = dists
    assert wheel.name.startswith(f"fpo_kernels-{fpo_kernels.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert any(n.endswith(".dist-info/licenses/NOTICE") for n in names)
    assert "fpo_kernels/py.typed" in names
    assert not [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "assets", "docs", "scripts")]
    assert wheel.stat().st_size < 1_000_000  # the code only: the demo's 25 MB of assets stay in the sdist
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    members = tarfile.open(sdist).getnames()
    for want in ("LICENSE", "NOTICE", "CHANGELOG.md", "assets/sae-smollm2-135m-layer15/cfg.json", "mkdocs.yml"):
        assert any(m.endswith("/" + want) for m in members), want


@pytest.mark.slow
def test_wheel_installs_with_the_core_dependencies_only(dists, tmp_path):
    """A fresh environment with torch, triton, numpy and safetensors: the ops and a drop-in loss work on CPU
    tensors, and every command that needs the train extra says so in one sentence."""
    import numpy
    import safetensors
    import torch
    import triton

    wheel, _ = dists
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    py = str(env_dir / "bin" / "python")
    pins = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"triton=={triton.__version__}",
        f"numpy=={numpy.__version__}",
        f"safetensors=={safetensors.__version__}",
    ]
    r = subprocess.run([py, "-m", "pip", "install", "-q", str(wheel), *pins], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    script = """
import torch, fpo_kernels
from fpo_kernels import FusedLinearSimPOLoss, SAEWeights, pack_topk, sae_feature_mse, sae_pooled_features
sae = SAEWeights.from_tensors(torch.randn(16, 64), torch.zeros(64), torch.full((64,), 0.1))
h, mask = torch.randn(2, 8, 16, requires_grad=True), torch.ones(2, 8, dtype=torch.bool)
idx, val = pack_topk(sae_pooled_features(h, sae, mask=mask), K=32)
sae_feature_mse(h + 0.1, sae, idx, val, mask=mask, k=8).sum().backward()
labels = torch.randint(0, 50, (4, 8)); labels[:, :3] = -100
loss, _ = FusedLinearSimPOLoss()(torch.randn(50, 16, requires_grad=True), torch.randn(4, 8, 16), labels)
print(fpo_kernels.__version__, float(loss) == float(loss), h.grad.abs().sum() > 0)
"""
    r = subprocess.run([py, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.split() == [fpo_kernels.__version__, "True", "tensor(True)"], r.stderr
    fpo = str(env_dir / "bin" / "fpo")
    for argv in (
        ["train", "--method", "simpo", "--model", "m", "--dataset", "d.jsonl"],
        ["precompute", "--model", "m", "--dataset", "d.jsonl", "--out", "c"],
        ["eval", "--model", "m", "--dataset", "d.jsonl"],
    ):
        r = subprocess.run([fpo, *argv], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode != 0 and "Traceback" not in r.stderr, (argv, r.stderr)
        assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
        assert "needs the train extra" in r.stderr and "pip install 'fpo-kernels[train]'" in r.stderr, r.stderr
    # the demo's pairs and SAE are not in the wheel: it says where they are before it needs the extra
    r = subprocess.run([fpo, "demo"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "they ship with the source, in assets/, not in the wheel" in r.stderr, r.stderr
