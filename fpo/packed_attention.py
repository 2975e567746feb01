"""The attention masks of the packed layouts (fpo.packing): per row, a query sees its own segment's earlier tokens,
the prompt and its own response, never the other response of a shared prompt, within the sliding window
measured in positions as in the unshared sequence; in the form the model's attention implementation takes."""

from __future__ import annotations

import torch

from ._types import Model

__all__ = ["attention_mask_for", "PACKED_ATTENTION"]

PACKED_ATTENTION = ("sdpa", "eager", "flex_attention")  # attention implementations that take our mask


def _mask_windows(config):
    """{layer kind: sliding window or None} for the kinds of attention layer a model has."""
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None)
    if not kinds:
        sliding = window is not None and getattr(config, "use_sliding_window", True) is not False
        kinds = ["sliding_attention" if sliding else "full_attention"]
    out = {}
    for kind in set(kinds):
        if kind == "full_attention":
            out[kind] = None
        elif kind == "sliding_attention":
            if not window:
                raise ValueError("the model has sliding_attention layers but no sliding_window in its config")
            out[kind] = int(window)
        else:
            raise ValueError(
                f"packing: attention layers of kind {kind!r} are not supported (full_attention and "
                "sliding_attention are); use --packing off"
            )
    return out


def _visible(segment, branch, position, window):
    """[R, L, L] bool, per row: query i may attend key j (same segment, j not after i, j in the prompt or in
    i's own response, and within the sliding window measured in positions, as in the unshared sequence)."""
    n = segment.shape[-1]
    order = torch.arange(n, device=segment.device)
    keep = (segment[:, :, None] == segment[:, None, :]) & (order[None, None, :] <= order[None, :, None])
    keep &= (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    if window is not None:
        keep &= (position[:, :, None] - position[:, None, :]) < window
    return keep


def _block_mask(segment, branch, position, window):
    from torch.nn.attention.flex_attention import create_block_mask

    R, n = segment.shape
    seg, br, pos = segment.reshape(-1), branch.reshape(-1), position.reshape(-1)  # flat: 1-D gathers compile everywhere

    def mask_mod(b, h, q, kv):
        i, j = b * n + q, b * n + kv
        keep = (seg[i] == seg[j]) & (kv <= q) & ((br[j] == 0) | (br[j] == br[i]))
        if window is not None:
            keep = keep & ((pos[i] - pos[j]) < window)
        return keep

    return create_block_mask(mask_mod, B=R, H=None, Q_LEN=n, KV_LEN=n, device=segment.device)


def attention_mask_for(model: Model, segment: torch.Tensor, branch: torch.Tensor, position_ids: torch.Tensor):
    """The attention mask a packed micro-batch (rows [R, L]; segment and branch flat or [R, L]) needs, in
    the form the model's attention implementation takes: an [R, 1, L, L] bool mask (sdpa), an additive
    float mask (eager), or a FlexAttention BlockMask (flex_attention); one per layer kind ({kind: mask})
    when the model mixes full and sliding-window layers. Any other implementation cannot take the mask:
    a ValueError naming it."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in PACKED_ATTENTION:
        raise ValueError(
            f"packing needs an attention implementation that takes a custom mask {PACKED_ATTENTION}; "
            f"the model uses {impl!r}: load it with attn_implementation='sdpa' (or eager / "
            "flex_attention), or train with --packing off"
        )
    position = position_ids
    segment = segment.to(position.device).reshape(position.shape)
    branch = branch.to(position.device).reshape(position.shape)
    masks = {}
    for kind, window in _mask_windows(model.config).items():
        if impl == "flex_attention":
            masks[kind] = _block_mask(segment, branch, position, window)
            continue
        keep = _visible(segment, branch, position, window)[:, None]
        if impl == "eager":
            dtype = next(model.parameters()).dtype
            keep = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)
        masks[kind] = keep
    return masks if len(masks) > 1 else next(iter(masks.values()))
