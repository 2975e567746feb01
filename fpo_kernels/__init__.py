"""fpo-kernels: fused Triton ops for FPO (feature-level constrained preference optimisation).

Depends on torch and triton (and safetensors/numpy to read SAE files). CUDA tensors run the Triton
kernels; CPU tensors run the plain-PyTorch references in fpo_kernels.reference, unless TRITON_INTERPRET=1.
"""
from ._dispatch import pin_autotune
from .cache import pack_topk, unpack_topk, index_dtype_for
from .logprobs import fused_linear_kl, fused_linear_logprobs, fused_linear_logprobs_kl
from .preference import FusedLinearDPOLoss, FusedLinearFPOLoss, FusedLinearSimPOLoss, FusedLinearTDPOLoss
from .sae_constraint import sae_feature_mse, sae_feature_mse_varlen, sae_pooled_features, sae_pooled_features_varlen
from .sae_weights import SAEWeights
from .sequence import (masked_mean, masked_sum, prediction_rows, sequence_logprobs, sequence_logprobs_kl,
                       sequence_logprobs_kl_varlen, sequence_logprobs_varlen)

__all__ = [
    "SAEWeights", "sae_pooled_features", "sae_feature_mse", "sae_pooled_features_varlen", "sae_feature_mse_varlen",
    "fused_linear_logprobs", "fused_linear_kl", "fused_linear_logprobs_kl",
    "pack_topk", "unpack_topk", "index_dtype_for", "masked_sum", "masked_mean", "sequence_logprobs",
    "sequence_logprobs_kl", "prediction_rows", "sequence_logprobs_varlen", "sequence_logprobs_kl_varlen", "pin_autotune",
    "FusedLinearSimPOLoss", "FusedLinearDPOLoss", "FusedLinearTDPOLoss", "FusedLinearFPOLoss",
]
__version__ = "0.1.0"
