"""Feature protection: a fixed set of SAE features held near the reference, whatever D's top-k selects.

`protected_features` pools the activations of the protected features only, over each response's tokens: a
[n, d] x [d, |P|] product of the response rows with the protected encoder columns (|P| is tens of features), so
nothing of size [tokens x width] exists. Its gradient differs from JumpReLU's in one way, by design: on a token
where a protected feature is off, JumpReLU passes no gradient, so a feature the policy pushed below its
threshold could never be pulled back. The `gate` says which off tokens pass the pre-activation's gradient when,
and only when, the loss asks the feature to rise (a straight-through gate on the restoring side): every off token
("restore"), only those whose pre-activation is positive, where a ReLU would fire ("near"), or none, as JumpReLU
("jumprelu"). The value is exact whatever the gate; a feature asked to fall moves only where it fires.

`protected_preactivations` is the per-token form: the protected features' pre-activations z = x W_P + b_P on every
response token, [n, |P|], differentiable everywhere (a feature below its threshold still has a gradient), for a
penalty against the reference's own per-token values.

`protection_penalty` turns the pooled values (or per-token pre-activations) into R(y): per feature the change
relative to a floored reference scale, one-sided where a direction says so, through a pseudo-Huber loss whose slope
is at most 1, so one sparse feature on one response cannot blow up a step; a weighted mean over the protected
features.

The products are a handful of columns: plain PyTorch (cuBLAS on a GPU) is the fast path; the oracle is
fpo_kernels.reference.protected_features_ref (the full encode, then the columns picked).
"""

from __future__ import annotations

import torch

from ._dispatch import compile_boundary, no_autocast
from .sae_weights import SAEWeights

__all__ = ["protected_features", "protected_preactivations", "protection_penalty", "DIRECTIONS", "GATES"]

# a protected feature may be held both ways, or only kept from rising or from falling
DIRECTIONS = {"both": 0, "no_increase": 1, "no_decrease": -1}
# the off tokens through which the loss may raise a protected feature (see the module's docstring)
GATES = ("restore", "near", "jumprelu")


def _rows_of(hidden, mask, spans):
    """(flat rows [N, d], response rows [n], their sequence [n], 1 / response length [S], S)."""
    if (mask is None) == (spans is None):
        raise ValueError(
            "pass either mask (padded hidden [B, T, d]) or spans (flat hidden rows [N, d]), not "
            + ("both" if mask is not None else "neither")
        )
    if spans is None:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [B, T, d] with mask, got {tuple(hidden.shape)}")
        B, T, _ = hidden.shape
        if not torch.is_tensor(mask) or tuple(mask.shape) != (B, T):
            raise ValueError(f"mask must have shape [B, T] = {[B, T]}, got {getattr(mask, 'shape', type(mask))}")
        keep = mask.to(hidden.device).bool()
        counts = keep.sum(1)
        rows = keep.reshape(-1).nonzero().flatten()
        seq = torch.div(rows, T, rounding_mode="floor")
        return hidden.reshape(B * T, -1), rows, seq, counts, B
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be flat rows [N, d] with spans, got {tuple(hidden.shape)}")
    if not torch.is_tensor(spans) or spans.dim() != 2 or spans.shape[1] != 2:
        raise ValueError(f"spans must be an [S, 2] tensor of (start, end) rows, got {getattr(spans, 'shape', None)}")
    if spans.dtype.is_floating_point or spans.dtype == torch.bool:
        raise ValueError(f"spans must be an integer tensor, got {spans.dtype}")
    s, e = spans[:, 0].long().cpu(), spans[:, 1].long().cpu()
    N = hidden.shape[0]
    bad = ((s < 0) | (e > N) | (e < s)).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"spans row {bad[0].item()} = {spans[bad[0]].tolist()} is outside the {N} hidden rows")
    counts = e - s
    seq = torch.repeat_interleave(torch.arange(len(s)), counts)
    rows = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts) + s[seq]
    dev = hidden.device
    return hidden, rows.to(dev), seq.to(dev), counts.to(dev), len(s)


class _ProtectedFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat, rows, seq, counts, S, W, bias, threshold, gate):
        dt = torch.float64 if flat.dtype == torch.float64 else torch.float32
        with no_autocast(flat):
            z = flat.detach()[rows].to(dt) @ W.to(dt).t() + bias.to(dt)  # [n, |P|] pre-activations
            on = z > threshold.to(dt)
            f = torch.where(on | z.isnan(), z, torch.zeros_like(z))  # a NaN stays NaN, never a silent 0
            inv_n = 1.0 / counts.clamp(min=1).to(dt)
            pooled = torch.zeros(S, W.shape[0], dtype=dt, device=flat.device).index_add_(0, seq, f) * inv_n[:, None]
        # the off tokens that may pass a rising gradient
        may_rise = ~on if gate == "restore" else (~on & (z > 0)) if gate == "near" else torch.zeros_like(on)
        ctx.save_for_backward(rows, seq, inv_n, on, may_rise, W)
        ctx.shape, ctx.dtype = flat.shape, flat.dtype
        return pooled.float() if dt == torch.float32 else pooled

    @staticmethod
    def backward(ctx, grad):
        rows, seq, inv_n, on, may_rise, W = ctx.saved_tensors
        with no_autocast(grad):
            g = (grad.to(inv_n.dtype) * inv_n[:, None])[seq]  # [n, |P|]: d pooled / d f on each row
            # where the feature is off, its pre-activation's gradient passes only to raise it, where the gate allows
            passes = on | (may_rise & (g < 0))
            dz = torch.where(passes, g, torch.zeros_like(g))
            dx = dz @ W.to(dz.dtype)  # [n, d]
            d_flat = torch.zeros(ctx.shape, dtype=dx.dtype, device=dx.device).index_add_(0, rows, dx)
        return d_flat.to(ctx.dtype), None, None, None, None, None, None, None, None


def _check(hidden, sae, feature_ids):
    if not isinstance(sae, SAEWeights):
        raise ValueError(f"sae must be an fpo_kernels.SAEWeights, got {type(sae).__name__}")
    if sae.activation == "topk":
        raise ValueError(
            "sae is a TopK SAE: a feature's activation depends on every other feature of its token, so a few "
            "protected features cannot be encoded alone; protect features of a JumpReLU, ReLU or BatchTopK SAE"
        )
    if not torch.is_tensor(hidden) or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point tensor, got {getattr(hidden, 'dtype', type(hidden))}")
    if hidden.shape[-1] != sae.d_in:
        raise ValueError(f"hidden has d={hidden.shape[-1]} but the SAE expects d_in={sae.d_in}")
    if sae.device != hidden.device:
        raise ValueError(f"sae is on {sae.device} but hidden is on {hidden.device}")
    if not torch.is_tensor(feature_ids) or feature_ids.dim() != 1 or feature_ids.numel() == 0:
        raise ValueError(f"feature_ids must be a non-empty 1-D tensor, got {getattr(feature_ids, 'shape', None)}")
    if feature_ids.dtype.is_floating_point or feature_ids.dtype == torch.bool:
        raise ValueError(f"feature_ids must be an integer tensor, got {feature_ids.dtype}")
    ids = feature_ids.long().cpu()
    if ((ids < 0) | (ids >= sae.width)).any():
        bad = ids[(ids < 0) | (ids >= sae.width)][0].item()
        raise ValueError(f"feature_ids holds {bad}, outside the SAE's width [0, {sae.width})")
    if ids.unique().numel() != ids.numel():
        raise ValueError("feature_ids holds an id twice")


@compile_boundary
def protected_features(
    hidden: torch.Tensor,
    sae: SAEWeights,
    feature_ids: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    spans: torch.Tensor | None = None,
    gate: str = "restore",
    check_inputs: bool = True,
) -> torch.Tensor:
    """The protected features' response-pooled activations, with a gradient that can restore a suppressed one.

    Args:
        hidden: the residual stream at the SAE's layer: [B, T, d] with `mask`, or flat rows [N, d] with `spans`.
        sae: a JumpReLU, ReLU or BatchTopK encoder (TopK is refused: its features are not separable).
        feature_ids: [P] distinct feature ids, the protected set.
        mask: padded layout, [B, T], 1 on response tokens.
        spans: flat layout, [S, 2] (start, end) response rows.
        gate: on a token where a feature is off, pass its pre-activation's gradient when the loss asks the
            feature to rise: on every such token ("restore"), only where the pre-activation is positive ("near"),
            or on none, as JumpReLU does ("jumprelu").
        check_inputs: False skips the checks that read values (for callers that validated their batch).

    Returns:
        [S, P] float32 (float64 for float64 hidden): the mean over each response's tokens of each protected
        feature's activation, exactly what `sae_pooled_features` gives for those columns.
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if check_inputs:
        _check(hidden, sae, feature_ids)
    flat, rows, seq, counts, S = _rows_of(hidden, mask, spans)
    if check_inputs and S and (counts == 0).any():
        raise ValueError(f"response {int((counts == 0).nonzero()[0])} has no token (an empty response is bad data)")
    ids = feature_ids.to(sae.device).long()
    return _ProtectedFeatures.apply(
        flat, rows, seq, counts, S, sae.W_enc_t[ids], sae.bias[ids], sae.threshold[ids], gate
    )


def protection_penalty(
    pooled: torch.Tensor,
    ref_pooled: torch.Tensor,
    scale: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    direction: torch.Tensor | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """R(y) per response: sum_i w_i rho(delta_i) / sum_i w_i over the protected features, with
    delta_i = (p_i - p_ref_i) / scale_i (kept to its positive part where direction_i is no_increase (1), to its
    negative part where no_decrease (-1)) and rho(x) = sqrt(1 + x^2) - 1: x^2 / 2 near 0, |x| - 1 far out, so
    its slope never exceeds 1.

    Args:
        pooled: [S, P] the policy's pooled protected features (`protected_features`).
        ref_pooled: [S, P] the reference's, for the same responses (the cache's exact values).
        scale: [P] > 0 per-feature scales (fpo.protection floors them at a fraction of the set's median).
        weights: [P] >= 0, not all 0; None for 1 each.
        direction: [P] integers in {-1, 0, 1} (DIRECTIONS); None for both ways.
        check_inputs: False skips the checks that read values (each a device sync on a GPU), for callers that
            checked scale and weights once.

    Returns:
        [S] float32.
    """
    if pooled.dim() != 2 or ref_pooled.shape != pooled.shape:
        raise ValueError(
            f"pooled and ref_pooled must both be [S, P]; got {tuple(pooled.shape)} and {tuple(ref_pooled.shape)}"
        )
    P = pooled.shape[1]
    if scale.shape != (P,) or (check_inputs and not bool((scale > 0).all())):
        raise ValueError(f"scale must be [{P}] and positive, got {tuple(scale.shape)}")
    dt = torch.float64 if pooled.dtype == torch.float64 else torch.float32
    delta = (pooled.to(dt) - ref_pooled.to(pooled.device, dt)) / scale.to(pooled.device, dt)
    if direction is not None:
        if direction.shape != (P,):
            raise ValueError(f"direction must be [{P}], got {tuple(direction.shape)}")
        d = direction.to(pooled.device)
        delta = torch.where(d > 0, delta.clamp(min=0), torch.where(d < 0, delta.clamp(max=0), delta))
    rho = torch.sqrt(1 + delta * delta) - 1
    if weights is None:
        return rho.mean(1)
    if weights.shape != (P,) or (check_inputs and (bool((weights < 0).any()) or not bool(weights.sum() > 0))):
        raise ValueError(f"weights must be [{P}], >= 0 and not all 0")
    w = weights.to(pooled.device, dt)
    return (rho * w).sum(1) / w.sum()


@compile_boundary
def protected_preactivations(
    hidden: torch.Tensor,
    sae: SAEWeights,
    feature_ids: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    spans: torch.Tensor | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """The protected features' pre-activations on every response token: the per-token form of protection.

    Args:
        hidden: the residual stream at the SAE's layer: [B, T, d] with `mask`, or flat rows [N, d] with `spans`.
        sae: a JumpReLU, ReLU or BatchTopK encoder (TopK is refused).
        feature_ids: [P] distinct feature ids, the protected set.
        mask: padded layout, [B, T], 1 on response tokens.
        spans: flat layout, [S, 2] (start, end) response rows.
        check_inputs: False skips the checks that read values.

    Returns:
        [n, P] float32 (float64 for float64 hidden): z = x W_enc[:, ids] + b (b_dec subtracted from x first where the
        SAE does so), one row per response token, the responses in order (row-major over the mask, or span by span).
        Plain autograd: the gradient is W_enc's columns on every token, whether the feature fires or not.
    """
    if check_inputs:
        _check(hidden, sae, feature_ids)
    flat, rows, _, counts, S = _rows_of(hidden, mask, spans)
    if check_inputs and S and (counts == 0).any():
        raise ValueError(f"response {int((counts == 0).nonzero()[0])} has no token (an empty response is bad data)")
    ids = feature_ids.to(sae.device).long()
    dt = torch.float64 if flat.dtype == torch.float64 else torch.float32
    with no_autocast(flat):
        return flat[rows].to(dt) @ sae.W_enc_t[ids].to(dt).t() + sae.bias[ids].to(dt)
