"""The frozen encoder side of a sparse autoencoder, laid out once for the kernels."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ._dispatch import is_fake

__all__ = ["SAEWeights"]


ACTIVATIONS = ("jumprelu", "relu", "topk", "batchtopk")


@dataclass(eq=False)
class SAEWeights:
    """Encoder of a sparse autoencoder: z = W_enc^T (h - b_dec) + b_enc, then its activation:
        jumprelu   f = z [z > theta]                     (Gemma Scope, sae-lens "jumprelu")
        relu       f = ReLU(z): a JumpReLU with theta 0  (sae-lens "standard")
        topk       f = ReLU(z) on each token's k largest pre-activations, 0 elsewhere (sae-lens "topk",
                   EleutherAI's sparsify); exactly k per token, ties as torch.topk breaks them
        batchtopk  f = z [z > theta] with one threshold for every feature: the inference form of sae-lens'
                   BatchTopK and Matryoshka-BatchTopK SAEs

    The SAE is frozen during FPO training: nothing here needs or carries gradients.

    Fields (all float32, on one device):
        W_enc_t   [m, d]  W_enc transposed and contiguous, so that one feature's column is one
                          contiguous row: the "reference" select mode and the backward gather rows.
        b_enc     [m]
        threshold [m]     the JumpReLU threshold, clamped at 0: sae-lens computes ReLU(z) * (z > theta),
                          which is z * (z > max(theta, 0)). A standard ReLU SAE has threshold 0.
        b_dec     [d] or None, subtracted from the input when apply_b_dec_to_input is true.
        bias      [m]     b_enc - b_dec @ W_enc (or b_enc): the kernels' single fused bias.
    """

    W_enc_t: torch.Tensor
    b_enc: torch.Tensor
    threshold: torch.Tensor
    b_dec: torch.Tensor | None = None
    apply_b_dec_to_input: bool = False
    name: str = "sae"
    activation: str = "jumprelu"
    k: int | None = None  # topk: features kept per token
    neuronpedia_id: str | None = None  # where its features are described: https://www.neuronpedia.org/<id>/<feature>
    bias: torch.Tensor = field(init=False)
    _cast: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        m, d = self.W_enc_t.shape if self.W_enc_t.dim() == 2 else (None, None)
        if m is None:
            raise ValueError(f"W_enc must be 2-D [d, m], got shape {tuple(self.W_enc_t.shape)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"sae activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "topk":
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= m:
                raise ValueError(f"a topk SAE needs k in [1, {m}] (its width), got {self.k!r}")
        elif self.k is not None:
            raise ValueError(f"k is for topk SAEs; this one is {self.activation}")
        for arg, t, n in (("b_enc", self.b_enc, m), ("threshold", self.threshold, m)):
            if t.shape != (n,):
                raise ValueError(f"{arg} must have shape [{n}] (the SAE width), got {tuple(t.shape)}")
        if self.b_dec is not None and self.b_dec.shape != (d,):
            raise ValueError(f"b_dec must have shape [{d}] (the SAE input size), got {tuple(self.b_dec.shape)}")
        if self.apply_b_dec_to_input and self.b_dec is None:
            raise ValueError("apply_b_dec_to_input=True needs b_dec")
        dev = self.W_enc_t.device
        for arg, other in (("b_enc", self.b_enc), ("threshold", self.threshold), ("b_dec", self.b_dec)):
            if other is not None and other.device != dev:
                raise ValueError(f"{arg} is on {other.device} but W_enc is on {dev}")
        with torch.no_grad():
            self.W_enc_t = self.W_enc_t.detach().float().contiguous()
            self.b_enc = self.b_enc.detach().float().contiguous()
            self.threshold = self.threshold.detach().float().clamp(min=0).contiguous()
            if self.b_dec is not None:
                self.b_dec = self.b_dec.detach().float().contiguous()
            bias = self.b_enc.clone()
            if self.apply_b_dec_to_input and self.b_dec is not None:  # checked above: the one implies the other
                bias -= self.W_enc_t.double() @ self.b_dec.double()
            self.bias = bias.float().contiguous()
        if is_fake(self.W_enc_t):  # fake tensors (memory planning) have no values to check
            return
        if not torch.isfinite(self.W_enc_t).all() or not torch.isfinite(self.bias).all():
            raise ValueError(f"SAE '{self.name}' has non-finite encoder weights or biases")
        if not torch.isfinite(self.threshold).all():
            raise ValueError(
                f"SAE '{self.name}' has non-finite thresholds (NaN or inf): those features could never "
                "fire, and D would be 0 whatever the policy does"
            )
        if not self.W_enc_t.any():
            raise ValueError(
                f"SAE '{self.name}' has an all-zero encoder (W_enc): no feature depends on the input, "
                "so D could never change; is this the right file?"
            )

    # ---- shape and device -------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc_t.shape[1]

    @property
    def width(self) -> int:
        return self.W_enc_t.shape[0]

    @property
    def device(self) -> torch.device:
        return self.W_enc_t.device

    @property
    def W_enc(self) -> torch.Tensor:
        """[d, m] view (not a copy) of the encoder matrix."""
        return self.W_enc_t.t()

    def to(self, device: str | torch.device) -> SAEWeights:
        """The same encoder on another device (self when it is already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return SAEWeights(
            self.W_enc_t.to(device),
            self.b_enc.to(device),
            self.threshold.to(device),
            None if self.b_dec is None else self.b_dec.to(device),
            self.apply_b_dec_to_input,
            self.name,
            self.activation,
            self.k,
        )

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """W_enc_t [m, d] in the dtype of the hidden states (tl.dot wants equal operand types); cached."""
        if dtype == torch.float32:
            return self.W_enc_t
        if dtype not in self._cast:
            self._cast[dtype] = self.W_enc_t.to(dtype).contiguous()
        return self._cast[dtype]

    def fingerprint(self) -> str:
        """sha256 over the encoder tensors, the activation and k: identifies the SAE a cache was built with."""
        h = hashlib.sha256()
        for t in (self.W_enc_t, self.b_enc, self.threshold, self.bias):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        if self.activation not in ("jumprelu", "relu") or self.k is not None:  # older caches: JumpReLU/ReLU only
            h.update(f"{self.activation}:{self.k}".encode())
        return h.hexdigest()[:16]

    # ---- constructors -----------------------------------------------------------------------
    @classmethod
    def from_tensors(
        cls,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        threshold: torch.Tensor | None = None,
        b_dec: torch.Tensor | None = None,
        apply_b_dec_to_input: bool = False,
        name: str = "sae",
        topk: int | None = None,
        activation: str | None = None,
    ) -> SAEWeights:
        """W_enc [d, m], b_enc [m], threshold [m] (None: a plain ReLU SAE), b_dec [d] or None; topk=k: a TopK SAE
        (its threshold, if any, is ignored); activation: "batchtopk" with a one-element or [m] threshold."""
        if not torch.is_tensor(W_enc) or W_enc.dim() != 2:
            raise ValueError("W_enc must be a 2-D tensor [d, m]")
        m = W_enc.shape[1]
        if activation is None:
            activation = "topk" if topk is not None else ("relu" if threshold is None else "jumprelu")
        if activation in ("topk", "relu") or threshold is None:
            threshold = torch.zeros(m, device=W_enc.device)
        elif activation == "batchtopk" and threshold.numel() == 1:
            threshold = threshold.reshape(()).expand(m).clone()
        return cls(
            W_enc.t(),
            b_enc,
            threshold,
            b_dec,
            bool(apply_b_dec_to_input),
            name,
            activation,
            topk if activation == "topk" else None,
        )

    @classmethod
    def from_sae_lens(cls, sae: Any, name: str | None = None) -> SAEWeights:
        """From a loaded sae-lens SAE: JumpReLU, standard (ReLU), TopK (a decoder-norm rescaling of the
        pre-activations is folded into the encoder), BatchTopK and Matryoshka-BatchTopK (their inference
        threshold)."""
        cfg = sae.cfg
        arch = cfg.architecture() if callable(getattr(cfg, "architecture", None)) else getattr(cfg, "architecture", "")
        if arch not in SAE_LENS_ARCHITECTURES:
            raise ValueError(f"sae: architecture '{arch}' is not supported (one of {SAE_LENS_ARCHITECTURES})")
        if getattr(cfg, "normalize_activations", "none") not in ("none", None):
            raise ValueError(f"sae: normalize_activations='{cfg.normalize_activations}' is not supported")
        meta = getattr(cfg, "metadata", None)
        if name is None:
            name = getattr(meta, "hook_name", None) or "sae"
        W, b_enc = sae.W_enc.detach(), sae.b_enc.detach()
        threshold, topk, activation = None, None, SAE_LENS_ARCHITECTURES[arch]
        if getattr(cfg, "rescale_acts_by_decoder_norm", False):  # hidden_pre * |W_dec_i|: fold into the encoder
            scale = sae.W_dec.detach().norm(dim=-1)
            W, b_enc = W * scale, b_enc * scale
        if activation == "topk":
            topk = int(cfg.k)
        elif activation in ("jumprelu", "batchtopk"):
            threshold = getattr(sae, "threshold", None)
            if threshold is None:
                threshold = getattr(sae, "topk_threshold", None)
            if threshold is None:
                raise ValueError(f"sae: a {arch} SAE without a threshold (save it for inference first)")
            threshold = threshold.detach()
        return cls.from_tensors(
            W,
            b_enc,
            threshold,
            sae.b_dec.detach(),
            bool(cfg.apply_b_dec_to_input),
            name,
            topk=topk,
            activation=activation,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> SAEWeights:
        """From disk: a sae-lens directory (cfg.json + sae_weights.safetensors; jumprelu, standard, topk,
        batchtopk, matryoshka_batchtopk), an EleutherAI sparsify directory (cfg.json with k + sae.safetensors:
        encoder.weight [m, d], encoder.bias, b_dec, subtracted from the input; its decoder-side normalize_decoder
        option does not change the encoder), a .safetensors file (keys W_enc, b_enc, threshold, b_dec), or a
        Gemma Scope params.npz (b_dec not applied to the input)."""
        path = os.fspath(path)
        apply_b_dec, activation, topk, rescale = None, None, None, False
        if os.path.isdir(path):
            if os.path.exists(os.path.join(path, "sae.safetensors")):
                return cls._from_sparsify(path, device)
            cfg_path = os.path.join(path, "cfg.json")
            weights = os.path.join(path, "sae_weights.safetensors")
            if not os.path.exists(weights):
                npz = os.path.join(path, "params.npz")
                if os.path.exists(npz):
                    return cls.from_file(npz, device)
                raise ValueError(
                    f"sae path {path} has none of sae_weights.safetensors (sae-lens), sae.safetensors "
                    "(sparsify) or params.npz (Gemma Scope)"
                )
            if os.path.exists(cfg_path):
                cfg = _read_cfg(cfg_path)
                arch = cfg.get("architecture", "jumprelu")
                if arch not in SAE_LENS_ARCHITECTURES:
                    raise ValueError(
                        f"sae: architecture '{arch}' in {cfg_path} is not supported (one of {SAE_LENS_ARCHITECTURES})"
                    )
                if cfg.get("normalize_activations", "none") not in ("none", None):
                    raise ValueError(f"sae: normalize_activations in {cfg_path} is not supported")
                activation = SAE_LENS_ARCHITECTURES[arch]
                if activation == "topk":
                    topk = _config_k(cfg, cfg_path)
                    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))
                apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
            path = weights
        if not os.path.exists(path):
            raise ValueError(f"sae path {path} does not exist")
        if path.endswith(".npz"):
            import numpy as np

            try:
                with np.load(path) as z:
                    sd = {k: torch.from_numpy(z[k].copy()) for k in z.files}
            except Exception as e:  # zipfile / pickle errors on a truncated file
                raise ValueError(f"sae file {path} could not be read ({e})") from e
            apply_b_dec = False if apply_b_dec is None else apply_b_dec  # Gemma Scope encodes h @ W_enc + b_enc
        else:
            sd = _load_safetensors(path)
            apply_b_dec = True if apply_b_dec is None else apply_b_dec
        missing = [k for k in ("W_enc", "b_enc") + (("W_dec",) if rescale else ()) if k not in sd]
        if missing:
            raise ValueError(f"sae file {path} lacks {missing}")
        if rescale:  # TopK on hidden_pre * |W_dec_i|: fold the decoder norms into the encoder
            scale = sd["W_dec"].float().norm(dim=-1)
            sd["W_enc"], sd["b_enc"] = sd["W_enc"].float() * scale, sd["b_enc"].float() * scale
        threshold = sd.get("threshold")
        if threshold is None and "topk_threshold" in sd:  # BatchTopK saved with its training threshold
            threshold, activation = sd["topk_threshold"].float(), activation or "batchtopk"
        if activation in ("jumprelu", "batchtopk") and threshold is None:
            raise ValueError(f"sae file {path}: a {activation} SAE without a threshold")
        name = os.path.basename(os.path.dirname(path)) or os.path.basename(path)
        return cls.from_tensors(
            sd["W_enc"].float(),
            sd["b_enc"].float(),
            threshold,
            sd.get("b_dec"),
            apply_b_dec and "b_dec" in sd,
            name,
            topk=topk,
            activation=activation,
        ).to(device)

    @classmethod
    def _from_sparsify(cls, path, device):
        cfg_path = os.path.join(path, "cfg.json")
        if not os.path.exists(cfg_path):
            raise ValueError(f"sae path {path}: a sparsify folder needs cfg.json (with k)")
        cfg = _read_cfg(cfg_path)
        k = _config_k(cfg, cfg_path)
        if cfg.get("activation", "topk") not in ("topk",):
            raise ValueError(f"sae: sparsify activation '{cfg['activation']}' in {cfg_path} is not supported (topk)")
        sd = _load_safetensors(os.path.join(path, "sae.safetensors"))
        missing = [k for k in ("encoder.weight", "encoder.bias", "b_dec") if k not in sd]
        if missing:
            raise ValueError(f"sae file {path}/sae.safetensors lacks {missing}")
        return cls.from_tensors(
            sd["encoder.weight"].float().t(),
            sd["encoder.bias"].float(),
            None,
            sd["b_dec"].float(),
            True,
            os.path.basename(os.path.normpath(path)),
            topk=k,
        ).to(device)


def _read_cfg(cfg_path) -> dict:
    """An SAE's cfg.json: a JSON object, or a ValueError naming the file."""
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"sae: {cfg_path} could not be read as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"sae: {cfg_path} must hold a JSON object of settings, got a {type(cfg).__name__}")
    return cfg


def _config_k(cfg: dict, cfg_path) -> int:
    """A TopK SAE's k from its cfg.json: a positive whole number (5.0 is 5; 5.9, true or "5" are refused)."""
    k = cfg.get("k")
    if k is None:
        raise ValueError(f"sae: a topk SAE's {cfg_path} has no k")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or k < 1:
        raise ValueError(f"sae: k in {cfg_path} must be a positive whole number, got {k!r}")
    return int(k)


# sae-lens architecture -> the activation we fuse
SAE_LENS_ARCHITECTURES = {
    "jumprelu": "jumprelu",
    "standard": "relu",
    "topk": "topk",
    "batchtopk": "batchtopk",
    "matryoshka_batchtopk": "batchtopk",
}


def _load_safetensors(path):
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:
        raise ValueError(f"sae file {path} could not be read ({e})") from e
