"""The per-sequence statistics of P preference pairs: what a step computes for the policy, what a reference cache
holds for the reference, and what `preference_loss` takes (TRL's named loss inputs, as one typed record)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as _pytree

__all__ = ["SequenceStats"]

_TENSORS = ("logp_sum", "logp_mean", "length", "d", "kl", "ref_logp_sum", "protect", "protect_tokens")
_DICT_NAMES = {"len": "length"}  # the names of the dict form (the ops' and the cache's columns), where they differ


@dataclass(frozen=True)
class SequenceStats:
    """Per-sequence statistics of P pairs in the [2P] layout, chosen first (rows p and P + p are pair p). A field
    a method does not need is None.

    logp_sum      [2P] each response's summed log-prob
    logp_mean     [2P] its per-token mean
    length        [2P] its tokens
    d             [2P] FPO's SAE constraint D (each SAE's weight x its D / its scale, summed over SAEs)
    kl            [2P] TDPO's sequence KL(reference || policy)
    ref_logp_sum  [2P] the reference's summed log-probs, when they come from the same pass as kl
    d_each        [n_saes, 2P] each SAE's own D, unscaled
    protect       [2P, |P|] the protected features' pooled values
    protect_tokens [n, |P|] their pre-activations on every response token, the responses end to end in [2P] order
    features      {cache key: (indices [2P, K], values [2P, K])}: the reference's cached top-K features per SAE
    """

    logp_sum: torch.Tensor | None = None
    logp_mean: torch.Tensor | None = None
    length: torch.Tensor | None = None
    d: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    ref_logp_sum: torch.Tensor | None = None
    d_each: torch.Tensor | None = None
    protect: torch.Tensor | None = None
    protect_tokens: torch.Tensor | None = None
    features: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def of(cls, stats: SequenceStats | Mapping) -> SequenceStats:
        """A SequenceStats as it is, or one from the dict form: the field names ("len" for length) and each
        SAE's cached features as "idx<key>" and "val<key>". An unknown name is a ValueError naming it."""
        if isinstance(stats, SequenceStats):
            return stats
        if not isinstance(stats, Mapping):
            raise TypeError(f"stats: a SequenceStats or a dict of [2P] tensors, got {type(stats).__name__}")
        kw: dict = {}
        idx, val = {}, {}
        for name, t in stats.items():
            name = _DICT_NAMES.get(name, name)
            if name in _TENSORS or name == "d_each":
                kw[name] = t
            elif name.startswith("idx"):
                idx[name[3:]] = t
            elif name.startswith("val"):
                val[name[3:]] = t
            else:
                raise ValueError(
                    f"stats: unknown statistic {name!r}; known: {_TENSORS + ('d_each',)}, idx<key>, val<key>"
                )
        if set(idx) != set(val):
            raise ValueError(
                f"stats: cached features need both idx<key> and val<key>; got {sorted(idx)} and {sorted(val)}"
            )
        return cls(**kw, features={k: (idx[k], val[k]) for k in idx})

    def as_dict(self) -> dict:
        """The dict form (see `of`): the fields that are set."""
        out = {("len" if n == "length" else n): getattr(self, n) for n in _TENSORS + ("d_each",)}
        out = {k: v for k, v in out.items() if v is not None}
        for key, (i, v) in self.features.items():
            out["idx" + key], out["val" + key] = i, v
        return out

    def get(self, name: str) -> torch.Tensor:
        """A statistic by its field name; a ValueError naming it when it is not set."""
        t = getattr(self, name, None) if name in _TENSORS + ("d_each",) else None
        if t is None:
            raise ValueError(f"the statistics have no {name!r}")
        return t

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [P], rejected [P]) halves of a [2P] statistic."""
        t = self.get(name)
        if t.shape[0] % 2:
            raise ValueError(f"{name} must be [2P], chosen first; got {tuple(t.shape)}")
        P = t.shape[0] // 2
        return t[:P], t[P:]

    def replace(self, **changes: torch.Tensor | None) -> SequenceStats:
        """A copy with the named fields changed (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


if hasattr(_pytree, "register_dataclass"):  # DDP, FSDP and torch.compile find the tensors inside
    _pytree.register_dataclass(SequenceStats)
