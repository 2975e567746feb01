"""The training tests run the model through plain PyTorch on the CPU (the kernels are tested on their own, in
tests/kernels, under the Triton interpreter): fast model tests. A test marked `interpreter` keeps the interpreter,
for the few that check a kernel inside the training path."""

import pytest


@pytest.fixture(autouse=True)
def _plain_pytorch_unless_marked(request, monkeypatch):
    if request.node.get_closest_marker("interpreter") is None:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
