"""fpo-kernels: fused Triton ops for FPO (feature-level constrained preference optimisation).

Depends on torch and triton (and safetensors/numpy to read SAE files). CUDA tensors run the Triton
kernels; CPU tensors run the plain-PyTorch references in fpo_kernels.reference, unless TRITON_INTERPRET=1.
One entry per op: padded inputs ([B, T, d] and a mask) or flat ones (rows [N, d] and spans, for packed
streams), chosen by the arguments passed.
"""

from importlib import metadata as _metadata

from .cache import index_dtype_for, pack_topk, unpack_topk  # noqa: F401  (index_dtype_for: the cache's index dtype)
from .kernels import pin_autotune
from .kl import fused_linear_kl, fused_linear_logprobs_kl
from .logprobs import fused_linear_logprobs
from .losses import LossSettings, preference_loss
from .preference import FusedLinearDPOLoss, FusedLinearFPOLoss, FusedLinearSimPOLoss, FusedLinearTDPOLoss
from .protect import protected_features, protected_preactivations, protection_penalty
from .sae_constraint import sae_feature_mse, sae_pooled_features
from .sae_weights import SAEWeights
from .sequence import prediction_rows, sequence_logprobs, sequence_logprobs_kl
from .sequence_stats import SequenceStats

__all__ = [
    "SAEWeights",
    "sae_pooled_features",
    "sae_feature_mse",
    "protected_features",
    "protected_preactivations",
    "protection_penalty",
    "fused_linear_logprobs",
    "fused_linear_kl",
    "fused_linear_logprobs_kl",
    "sequence_logprobs",
    "sequence_logprobs_kl",
    "prediction_rows",
    "SequenceStats",
    "preference_loss",
    "LossSettings",
    "pack_topk",
    "unpack_topk",
    "pin_autotune",
    "FusedLinearSimPOLoss",
    "FusedLinearDPOLoss",
    "FusedLinearTDPOLoss",
    "FusedLinearFPOLoss",
]
try:  # the one version is pyproject's, read from the installed package's metadata
    __version__ = _metadata.version("fpo-kernels")
except _metadata.PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
