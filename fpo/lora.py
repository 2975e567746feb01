"""LoRA adapters (peft) on the policy: the base model's weights stay frozen and only the adapters train.

peft injects its layers into the model in place, so everything that reads the model (the residual hook of the
SAE constraint, the model body, the lm head) sees the adapters with no change. TDPO's reference is the same
model with the adapters switched off: no second model. Checkpoints hold the adapters only, in peft's own
format (adapter_config.json + adapter_model.safetensors: they load with peft's AutoPeftModelForCausalLM);
merged weights are computed here from a state dict, in fp32, so small adapter updates are not rounded into a
bf16 base weight.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ._types import Model
from .distributed import local_shard

if TYPE_CHECKING:
    from .config import TrainConfig
    from .precision import Precision

__all__ = [
    "add_adapters",
    "adapter_weights",
    "load_adapter_weights",
    "merged_weights",
    "save_adapter_config",
    "describe_lora",
    "ADAPTER_WEIGHTS",
]

ADAPTER = "default"  # peft's adapter name
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names
_PEFT_PREFIX = "base_model.model."


def _peft():
    try:
        import peft
    except ImportError:
        raise ValueError(
            'lora_r: LoRA needs the peft package; pip install "fpo-kernels[lora]" (or pip install peft)'
        ) from None
    return peft


def add_adapters(
    model: Model, r: int, alpha: float, dropout: float, target_modules: str | list[str], dtype: torch.dtype
):
    """Inject LoRA adapters of rank r into `model` (in place) and return the PeftModel around it. Every base
    weight is frozen; the adapters are created in `dtype` (the precision policy's trained dtype)."""
    peft = _peft()
    # peft reads a string as one regular expression matched against whole module paths: a single module name
    # given once (--lora-target-modules q_proj) is a list of one, as when it is repeated
    if isinstance(target_modules, str):
        targets = target_modules if target_modules == "all-linear" else [target_modules]
    else:
        targets = list(target_modules)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM", bias="none"
    )
    try:
        with warnings.catch_warnings():  # peft asks transformers by a name it deprecated
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    except ValueError as e:  # peft: no module matched the names given
        raise ValueError(f"lora_target_modules {target_modules!r}: {str(e).splitlines()[0]}") from None
    if hasattr(model.get_output_embeddings(), "base_layer"):  # peft wrapped the lm head
        raise ValueError(
            f"lora_target_modules {target_modules!r} puts an adapter on the lm head: the fused log-prob op "
            "reads the head's weight directly and would not see it; leave the lm head out"
        )
    if hasattr(model.get_input_embeddings(), "base_layer") and getattr(model.config, "tie_word_embeddings", False):
        raise ValueError(
            f"lora_target_modules {target_modules!r} puts an adapter on the input embeddings, which this model "
            "ties to its lm head: the head would keep the base weight while a merged model's tied head took the "
            "adapter too, so the merge would not be the trained model; leave the embeddings out"
        )
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = p.data.to(dtype)
    return wrapped


# an adapter's tensors in the injected model's state dict: linear layers' lora_A.default.weight, embeddings'
# lora_embedding_A.default (a parameter of its own); peft's saved names drop the adapter name
_LINEAR = (".lora_A.", ".lora_B.")
_EMBEDDING = (".lora_embedding_A", ".lora_embedding_B")


def _is_adapter_key(key: str) -> bool:
    return any(f"{part}{ADAPTER}." in key for part in _LINEAR) or any(
        key.endswith(f"{part}.{ADAPTER}") for part in _EMBEDDING
    )


def _saved_name(key: str) -> str:
    return _PEFT_PREFIX + key.replace(f".{ADAPTER}.", ".").removesuffix(f".{ADAPTER}")


def _injected_name(saved: str) -> str:
    key = saved.removeprefix(_PEFT_PREFIX)
    for part in _LINEAR:
        key = key.replace(part, f"{part}{ADAPTER}.")
    return key + f".{ADAPTER}" if key.endswith(_EMBEDDING) else key


def adapter_weights(state_dict: dict) -> dict:
    """The adapters of a (full) state dict of the injected model, under peft's saved names: what
    adapter_model.safetensors holds (linear layers' and embeddings' adapters)."""
    return {_saved_name(k): v for k, v in state_dict.items() if _is_adapter_key(k)}


def load_adapter_weights(model: Model, weights: dict, where: str) -> None:
    """Load adapter_model.safetensors' tensors into the injected model; every adapter must be there."""
    renamed = {}
    for k, v in weights.items():
        if not k.startswith(_PEFT_PREFIX) or not (any(part in k for part in _LINEAR) or k.endswith(_EMBEDDING)):
            raise ValueError(f"resume: {where} holds {k!r}, not a LoRA adapter of this run")
        renamed[_injected_name(k)] = v
    want = {k for k in model.state_dict() if _is_adapter_key(k)}
    missing, extra = sorted(want - set(renamed)), sorted(set(renamed) - want)
    if missing or extra:
        raise ValueError(
            f"resume: the adapters in {where} do not match this run's (lora_r and lora_target_modules "
            f"must be the saved run's): missing {missing[:2]}, unexpected {extra[:2]}"
        )
    model.load_state_dict(renamed, strict=False)


def merged_weights(state_dict: dict, scale: float, dtype: torch.dtype = torch.float32) -> dict:
    """The plain model's state dict with every adapter merged: W + scale x B A for a linear layer, W + scale x
    (B A)^T for an embedding (peft's delta weights), computed in fp32 and returned in `dtype`. Names lose
    peft's ".base_layer"; adapter tensors are dropped."""
    out = {}
    for k, v in state_dict.items():
        if ".lora_" in k:
            continue
        if ".base_layer." in k:
            prefix, leaf = k.split(".base_layer.")
            if leaf == "weight" and f"{prefix}.lora_embedding_A.{ADAPTER}" in state_dict:
                a = state_dict[f"{prefix}.lora_embedding_A.{ADAPTER}"].float()  # [r, vocab]
                b = state_dict[f"{prefix}.lora_embedding_B.{ADAPTER}"].float()  # [dim, r]
                v = v.float() + scale * (b @ a).T
            elif leaf == "weight":
                a = state_dict[f"{prefix}.lora_A.{ADAPTER}.weight"].float()
                b = state_dict[f"{prefix}.lora_B.{ADAPTER}.weight"].float()
                v = v.float() + scale * (b @ a)
            k = f"{prefix}.{leaf}"
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def save_adapter_config(peft_model: Model, folder: str, base: str) -> None:
    """adapter_config.json, naming the base model by its absolute path when it is a local folder (so that
    AutoPeftModelForCausalLM finds it from anywhere)."""
    config = peft_model.peft_config[ADAPTER]
    saved = config.base_model_name_or_path
    config.base_model_name_or_path = os.path.abspath(base) if os.path.exists(base) else base
    try:
        config.save_pretrained(folder)
    finally:
        config.base_model_name_or_path = saved


def describe_lora(
    cfg: TrainConfig, trained: Sequence[torch.Tensor], all_params: Sequence[torch.Tensor], precision: Precision
) -> str:
    """The line a LoRA run logs once: the adapters' size against the model's (under FSDP: this rank's shards)."""
    n = sum(local_shard(p).numel() for p in trained)
    total = sum(local_shard(p).numel() for p in all_params)
    return (
        f"[fpo] LoRA r={cfg.lora_r}, alpha {cfg.lora_alpha_value:g} on {cfg.lora_target_modules}: "
        f"{n / 1e6:.2f}M trainable of {total / 1e6:.1f}M parameters ({n / total:.2%}); the base weights "
        f"are frozen in {str(precision.frozen_dtype).removeprefix('torch.')}"
    )
