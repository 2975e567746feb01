"""Loading causal LMs and reading what FPO needs from them: the residual stream after a decoder block
(through a forward hook), the final hidden states from the model body (never full logits), the lm head
weight and the final logit softcap; the body's forward over a micro-batch of any layout (fpo.packing)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import typing
from typing import Any

import torch
from torch import nn

from ._types import Device, Log, Model, Tokenizer
from .packed_attention import attention_mask_for

if typing.TYPE_CHECKING:
    from .packing import MicroBatch

__all__ = [
    "load_model",
    "load_tokenizer",
    "decoder_layers",
    "lm_head",
    "final_softcap",
    "config_fingerprint",
    "model_fingerprint",
    "ActivationCapture",
    "compile_body",
    "apply_body_kernels",
    "transformers_patches_undone",
    "SITES",
    "run_body",
    "body_hidden",
    "attention_length_scale",
    "load_model_for_layout",
    "resolve_device",
]


def _gguf_split(path):
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    return path, None


def _strip_gguf_quantizer(model):
    # GGUF weights are dequantized on load; dropping the quantizer record makes the model a plain one
    # (trainable and savable with save_pretrained).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _quiet_library_bars():
    """transformers draws a bar for every load and save (a dozen in one demo, one long \\r line each in a
    log file); fpo draws its own for the long work."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(name_or_path: str) -> Tokenizer:
    from transformers import AutoTokenizer

    folder, gguf = _gguf_split(os.fspath(name_or_path))
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(folder)
    except OSError as e:
        raise ValueError(
            f"tokenizer '{name_or_path}' could not be loaded: a local folder, a .gguf file, "
            f"or a hub name on a machine that can reach the hub ({e})"
        ) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: Device = "cpu",
    attn_implementation: str | None = None,
) -> Model:
    """AutoModelForCausalLM from a local folder, a .gguf file (dequantized), or a hub name when online.
    attn_implementation: None (the model's default), "sdpa", "eager" or "flex_attention"."""
    from transformers import AutoModelForCausalLM

    _quiet_library_bars()
    folder, gguf = _gguf_split(os.fspath(name_or_path))
    kw: dict[str, Any] = dict(dtype=dtype)
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    try:
        if gguf:
            model = _strip_gguf_quantizer(AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, **kw))
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, **kw)
    except OSError as e:
        raise ValueError(
            f"model '{name_or_path}' could not be loaded: a local folder, a .gguf file, "
            f"or a hub name on a machine that can reach the hub ({e})"
        ) from e
    except ValueError as e:
        if attn_implementation is None:
            raise
        raise ValueError(
            f"attn_implementation={attn_implementation!r} is not available for '{name_or_path}': {e}"
        ) from e
    except Exception as e:  # safetensors' own error type: a truncated or damaged weights file
        if "safetensors" not in type(e).__module__:
            raise
        raise ValueError(
            f"model '{name_or_path}': its weights could not be read ({str(e).splitlines()[0][:160]}): the file is "
            "truncated or damaged (an interrupted download or copy); fetch or copy it again"
        ) from None
    model.config.use_cache = False
    return model.to(device)


def resolve_device(device: Device | None = None) -> torch.device:
    """The device a command runs on: the one asked for, checked, else cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was asked for, but this machine has no CUDA device (or this torch "
                "was built without CUDA): use --device cpu, or leave --device out"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"device {device!r}: fpo runs on cpu or cuda")
    return dev


def default_attention(device, packing: str):
    """The attention implementation a run uses when none is asked for: FlexAttention for packed layouts on
    CUDA (block-sparse: masked-out blocks are skipped), the model's own default otherwise (sdpa or eager,
    which take the packed layout's dense mask)."""
    if packing == "off" or torch.device(device).type != "cuda":
        return None
    try:
        from torch.nn.attention import flex_attention  # noqa: F401  (torch >= 2.5)
    except ImportError:
        return None
    return "flex_attention"


def load_model_for_layout(
    name_or_path: str,
    dtype: torch.dtype,
    device: Device,
    packing: str,
    attn_implementation: str | None = None,
    log: Log = print,
) -> Model:
    """load_model with the attention implementation a layout needs: the one asked for, else
    default_attention's choice, falling back to the model's own default where that is not available."""
    if attn_implementation is not None:
        return load_model(name_or_path, dtype, device, attn_implementation)
    choice = default_attention(device, packing)
    if choice is None:
        return load_model(name_or_path, dtype, device)
    try:
        return load_model(name_or_path, dtype, device, choice)
    except ValueError as e:
        log(f"[fpo] {choice} is not available for this model ({e}); using its default attention")
        return load_model(name_or_path, dtype, device)


def decoder_layers(model: Model) -> nn.ModuleList:
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"could not find the decoder layers of {type(model).__name__}")


def lm_head(model: Model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm head)")
    return head.weight, getattr(head, "bias", None)


def enable_activation_checkpointing(model):
    """Recompute each decoder layer in the backward (non-reentrant). transformers 5.2x renamed the method."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_body(model: Model, backend: str = "inductor", checkpoint: bool = False):
    """Regional compilation: torch.compile on each decoder layer (in place; nn.Module.compile), the way
    transformers and TRL compile a model for training. Identical layers reuse one compiled graph (their
    parameters are graph inputs), so compile time does not grow with depth; the embeddings, the final norm and
    fpo's fused ops outside the layers run as they are. Forward hooks on a layer (the SAE's activation capture)
    are traced with it.

    checkpoint: recompute each layer in the backward, inside the compiled region. transformers' own
    checkpointing calls the layer through torch.utils.checkpoint, which dynamo does not enter, so a compiled
    layer under it would run eagerly; here the layer's forward is checkpointed inside the compiled call instead,
    and dynamo is told not to replay the forward's Python side effects in the recomputation (transformers' output
    recorder; the SAE capture hooks sit on the layer, outside its forward)."""
    layers = decoder_layers(model)
    if checkpoint:
        import functools

        import torch._dynamo

        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        for layer in layers:
            forward = layer.forward

            @functools.wraps(forward)
            def recomputed(*args, _forward=forward, **kwargs):
                return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            layer.forward = recomputed
    for layer in layers:
        layer.compile(backend=backend)


# what `--body-kernels liger` switches on: the body's elementwise kernels, never Liger's fused linear
# cross-entropy (fpo's fused lm head replaces the head's logits)
LIGER_BODY = dict(rope=True, rms_norm=True, swiglu=True, geglu=True, layer_norm=True)
LIGER_HEAD = dict(cross_entropy=False, fused_linear_cross_entropy=False)


def apply_body_kernels(model: Model, kernels: str) -> list[str]:
    """Liger's RMSNorm, RoPE and SwiGLU / GeGLU kernels on the model's body (in place, the way liger-kernel
    patches a loaded model), never its fused linear cross-entropy. Returns the kernels applied. An architecture
    liger-kernel does not cover, or liger-kernel missing, is a ValueError saying so."""
    if kernels != "liger":
        raise ValueError(f"body_kernels must be 'liger' (or none), got {kernels!r}")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        raise ValueError("--body-kernels liger needs liger-kernel: pip install liger-kernel") from None
    import inspect

    model_type = getattr(model.config, "model_type", None)
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise ValueError(
            f"--body-kernels liger: liger-kernel has no kernels for {model_type!r} models (it covers "
            f"{', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)[:12])}, ...); train without --body-kernels"
        )
    takes = inspect.signature(apply).parameters
    body = {k: v for k, v in LIGER_BODY.items() if k in takes}
    apply(model=model, **body, **{k: v for k, v in LIGER_HEAD.items() if k in takes})
    return sorted(k for k, on in body.items() if on)


@contextlib.contextmanager
def transformers_patches_undone():
    """liger-kernel patches transformers' modeling modules themselves (RoPE, the norm and MLP classes): every
    model of that architecture built later in the process would carry its kernels. Puts each loaded modeling
    module back as it was on leaving."""
    saved = {name: dict(vars(m)) for name, m in list(sys.modules.items()) if name.startswith("transformers.models.")}
    try:
        yield
    finally:
        for name, before in saved.items():
            module = sys.modules.get(name)
            if module is None:
                continue
            for key in [k for k in vars(module) if k not in before]:
                delattr(module, key)
            for key, value in before.items():
                if getattr(module, key, None) is not value:
                    setattr(module, key, value)


def final_softcap(model: Model) -> float | None:
    c = getattr(model.config, "final_logit_softcapping", None)
    return float(c) if c else None


def config_fingerprint(model: Model) -> str:
    """Hash of the model config, less the keys that do not change the function (path, dtype, cache)."""
    cfg = model.config.to_dict()
    for k in (
        "_name_or_path",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "use_cache",
        "_attn_implementation_autoset",
    ):
        cfg.pop(k, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(model: Model, name: str) -> dict:
    """Name, a config hash and weights hashes (a strided sample of every tensor: cheap and content-bound).
    weights_bf16 hashes the sample rounded to bf16, so a model loaded in bf16 (a frozen reference) and the same
    checkpoint loaded in fp32 (the policy's master weights) agree; weights hashes it as loaded."""
    h, hb = hashlib.sha256(), hashlib.sha256()
    for pname, p in sorted(model.state_dict().items()):
        flat = p.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 4096)]
        for hasher, values in ((h, sample.float()), (hb, sample.to(torch.bfloat16).float())):
            hasher.update(pname.encode())
            hasher.update(values.cpu().numpy().tobytes())
    return {
        "name": name,
        "config": config_fingerprint(model),
        "weights": h.hexdigest()[:16],
        "weights_bf16": hb.hexdigest()[:16],
    }


SITES = ("resid_post", "resid_pre", "mlp_out", "attn_out")  # where in a decoder block an SAE reads


def _contribution_module(block, site):
    """The module whose output is what a block's MLP (mlp_out) or attention (attn_out) adds to the residual
    stream: the MLP or attention itself, or the norm after it where the architecture has one (Gemma-2 and -3
    normalise each branch's output before adding it, and TransformerLens' hook_mlp_out / hook_attn_out sit
    after that norm)."""
    if site == "mlp_out":
        names = ("post_feedforward_layernorm", "mlp", "feed_forward")
    elif hasattr(block, "pre_feedforward_layernorm"):  # Gemma-2/3: post_attention_layernorm normalises attn's output
        names = ("post_attention_layernorm", "self_attn", "attn")
    else:
        names = ("self_attn", "attn", "attention")
    for name in names:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"SAE site {site}: {type(block).__name__} has no {' / '.join(names[1:])} module to read; use an SAE of the "
        "residual stream (hook_resid_pre or hook_resid_post)"
    )


class ActivationCapture:
    """A forward hook keeping the activation an SAE reads at decoder block `layer`: the residual stream after
    the block (resid_post) or entering it (resid_pre: the embeddings for block 0), or what the block's MLP
    (mlp_out) or attention (attn_out) adds to the residual stream."""

    def __init__(self, model: Model, layer: int, site: str = "resid_post"):
        layers = decoder_layers(model)
        if not isinstance(layer, int) or not 0 <= layer < len(layers):
            raise ValueError(
                f"sae layer {layer} is outside the model's {len(layers)} decoder layers [0, {len(layers)})"
            )
        if site not in SITES:
            raise ValueError(f"SAE site must be one of {SITES}, got {site!r}")
        self.value = None
        block = layers[layer]
        if site == "resid_pre":
            self._h = block.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        elif site == "resid_post":
            self._h = block.register_forward_hook(self._hook)
        else:
            self._h = _contribution_module(block, site).register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.value = out[0] if isinstance(out, (tuple, list)) else out

    def _pre_hook(self, module, args, kwargs):
        self.value = args[0] if args else kwargs["hidden_states"]

    def pop(self):
        v, self.value = self.value, None
        if v is None:
            raise RuntimeError("the SAE layer's hook did not fire")
        return v

    def remove(self):
        self._h.remove()


def run_body(
    model: Model,
    input_ids: torch.Tensor,
    attention_mask: Any = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states [B, T, d] (after the final norm) from the model body: no logits.
    attention_mask: a [B, T] padding mask, or a prepared 4-D mask / BlockMask / {layer kind: mask} for a
    packed stream (fpo.packed_attention.attention_mask_for), with its position_ids [B, T]."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def body_hidden(model: Model, batch: MicroBatch, device: Device) -> torch.Tensor:
    """Final hidden states of a micro-batch as flat rows [R * L, d], in the layout's row order (what pred_rows
    and spans index)."""
    ids = batch.input_ids.to(device)
    if batch.layout == "off":
        assert batch.attention_mask is not None  # the padded layout has one
        hidden = run_body(model, ids, batch.attention_mask.to(device))
    else:
        assert batch.position_ids is not None  # the packed layouts have them
        pos = batch.position_ids.to(device)
        assert batch.segment is not None and batch.branch is not None  # so do their segment and branch ids
        hidden = run_body(model, ids, attention_mask_for(model, batch.segment, batch.branch, pos), pos)
    return hidden.reshape(-1, hidden.shape[-1])


def attention_length_scale(model: Model) -> float | None:
    """L0 such that a row of L tokens costs about L + L^2 / L0 in units of one token through the body's linear
    layers: (6 x body parameters) per token against (12 x hidden size x layers) per attended pair, forward and
    backward. None for FlexAttention, whose block sparsity makes one stream the cheapest layout."""
    if getattr(model.config, "_attn_implementation", None) == "flex_attention":
        return None
    layers = decoder_layers(model)
    body = sum(p.numel() for p in layers.parameters())
    return body / (2 * model.config.hidden_size * len(layers))
