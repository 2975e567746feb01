"""Test setup: without a GPU, kernels run through the Triton interpreter (set before triton is imported)."""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# the kernels are decorated when fpo_kernels is first imported, as TRITON_INTERPRET says then: import it here, so
# that a test run under no_interpreter importing it first cannot leave compiled-only kernels for the others
import fpo_kernels  # noqa: E402,F401

DEVICE = "cuda" if _HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed():
    # fresh random inputs every run; the seed is printed on failure, and FPO_TEST_SEED=<seed> replays it
    seed = int(os.environ.get("FPO_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    print(f"torch seed {seed}")  # shown with a failure's captured output
    yield seed


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of a tiny model, a second tiny model (other weights), a tiny SAE and 16 pairs, built once."""
    import tiny as t

    root = tmp_path_factory.mktemp("tiny")
    return {
        "model": t.make_model(str(root / "model")),
        "model_b": t.make_model(str(root / "model_b"), seed=1),
        "sae": t.make_sae(str(root / "sae")),
        "pairs": t.make_pairs(str(root / "pairs.jsonl")),
        "root": root,
    }


@pytest.fixture(scope="module")
def tiny_cache(tiny, tmp_path_factory):
    """A reference cache of the tiny model, SAE and pairs (cache_k 32, 64 tokens a sequence), one per module."""
    from fpo.precompute import precompute

    out = str(tmp_path_factory.mktemp("cache") / "c")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")  # set up before the tests' no_interpreter: the plain-PyTorch path, fast
        precompute(
            tiny["model"],
            tiny["pairs"],
            out,
            sae=tiny["sae"],
            cache_k=32,
            progress=False,
            max_length=64,
            max_prompt_length=32,
            log=lambda *a: None,
        )
    return out


@pytest.fixture
def no_interpreter(monkeypatch):
    """CPU tensors take the plain-PyTorch path (the kernels are tested on their own): fast model tests."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
