"""Micro-batch layouts for preference pairs: data only (the attention masks they need are fpo.packed_attention's,
the body's forward over them fpo.model.body_hidden).

    off           padded [2P, T]: chosen sequences then rejected, each [prompt, response, padding]
    pack          one token stream [1, N]: [prompt, chosen] and [prompt, rejected] as separate segments
    share-prompt  one token stream [1, N]: each pair as [prompt, chosen, rejected]; chosen and rejected see
                  the prompt and their own earlier tokens, never each other; the rejected tokens' positions
                  continue from the prompt's end, exactly as in the unshared sequence

Every layout hands the model body input_ids (plus a 2-D padding mask, or position ids and the per-token
segment/branch ids the packed mask is built from) and hands the losses the same flat description:
pred_rows [n] (the hidden row predicting each response token; the last prompt token of a shared prompt
predicts two), labels [n], seq_ids [n] (chosen p -> p, rejected p -> P + p) and response spans [2P, 2]
over the flattened hidden rows. So the losses never see the layout.

Micro-batches by token budget (max_tokens): the pairs are placed first-fit in order of decreasing size
(ties by position), a deterministic function of the pairs, so runs stay reproducible and resumable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .pairs import TokenizedPair

__all__ = [
    "LAYOUTS",
    "POOLINGS",
    "MicroBatch",
    "pooling_rows",
    "pair_tokens",
    "micro_batch_tokens",
    "plan_micro_batches",
    "collate",
    "from_padded",
]

LAYOUTS = ("off", "pack", "share-prompt")
POOLINGS = ("response", "authors")  # the rows the FPO constraint pools over: see pooling_rows


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"packing must be one of {LAYOUTS}, got {layout!r}")


def _lengths(item):
    return len(item.prompt_ids), len(item.chosen_ids), len(item.rejected_ids)


def _units(item, layout):
    """The unit lengths one pair brings to a packed row: the pair itself (share-prompt), or its two
    [prompt, response] segments (pack)."""
    lp, lc, lr = _lengths(item)
    return [lp + lc + lr] if layout == "share-prompt" else [lp + lc, lp + lr]


def _rows_of(lengths, cap):
    """First-fit decreasing of units into rows of at most cap tokens (ties by position)."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r in range(len(rows)):
            if room[r] >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(cap - lengths[i])
    return [sorted(r) for r in rows]


def _place(lengths, attention_scale):
    """Rows of unit indices. attention_scale None: every unit in one row (a stream: FlexAttention skips the
    masked blocks). A length L0: dense masks (sdpa, eager) pay for every block, so a batch of R rows of L
    tokens costs about R (L + L^2 / L0) (linear layers, then attention; L0 = attention_length_scale of the
    model); the rows are first-fit decreasing into the capacity, among the longest unit times 1, 2, 4, ...
    and the whole stream, that costs least."""
    if attention_scale is None or len(lengths) < 2:
        return [list(range(len(lengths)))]
    total, cap, best = sum(lengths), max(lengths), None
    while True:
        rows = _rows_of(lengths, min(cap, total))
        L = max(sum(lengths[i] for i in r) for r in rows)
        cost = len(rows) * (L + L * L / attention_scale)
        if best is None or cost < best[0]:
            best = (cost, rows)
        if cap >= total:
            return best[1]
        cap *= 2


def pair_tokens(item: TokenizedPair, layout: str) -> int:
    """Tokens one pair occupies in a layout (for off: alone in its micro-batch, padding included)."""
    _check_layout(layout)
    lp, lc, lr = _lengths(item)
    return 2 * (lp + max(lc, lr)) if layout == "off" else sum(_units(item, layout))


def micro_batch_tokens(items: Sequence[TokenizedPair], layout: str, attention_scale: float | None = None) -> int:
    """Tokens through the model body for one micro-batch, padding included; attention_scale: how packed
    layouts are split into rows (_place; None: one stream)."""
    _check_layout(layout)
    if not items:
        return 0
    if layout == "off":
        return 2 * len(items) * max(lp + max(lc, lr) for lp, lc, lr in map(_lengths, items))
    lengths = [n for it in items for n in _units(it, layout)]
    rows = _place(lengths, attention_scale)
    return len(rows) * max(sum(lengths[i] for i in r) for r in rows)


def plan_micro_batches(
    items: Sequence[TokenizedPair], layout: str, max_tokens: int, attention_scale: float | None = None
) -> list[list]:
    """Split pairs into micro-batches of at most max_tokens tokens each (first-fit decreasing; a pair is
    never split, so a pair larger than the budget, which truncation rules out, would sit alone).
    Within a micro-batch the pairs keep their given order."""
    _check_layout(layout)
    order = sorted(range(len(items)), key=lambda i: (-pair_tokens(items[i], layout), i))
    bins: list = []
    for i in order:
        for members in bins:
            if micro_batch_tokens([items[j] for j in members] + [items[i]], layout, attention_scale) <= max_tokens:
                members.append(i)
                break
        else:
            bins.append([i])
    return [[items[j] for j in sorted(members)] for members in bins]


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of P pairs in a layout, as the model body and the losses take it; built by collate (or
    from_padded), never changed after. Every tensor is on the host (no device sync when the kernels read it).

    input_ids [R, L]; attention_mask [R, L] (off) or None; position_ids [R, L], segment [R*L] and branch [R*L]
    (0 prompt, 1 chosen, 2 rejected; padding its own segment; packed layouts) or None; pred_rows, labels,
    seq_ids [n] (rows of the flattened [R*L] hidden states); spans [2P, 2] (each response's own rows); num_seqs
    = 2P; ids, row_hash [P] (None from from_padded); tokens (through the body, padding included) and
    response_tokens; pool_spans [2P, 2], the rows the SAE constraint pools over, and d_factor [2P] or None,
    what D is multiplied by (the pooling: see pooling_rows)."""

    layout: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    segment: torch.Tensor | None
    branch: torch.Tensor | None
    pred_rows: torch.Tensor
    labels: torch.Tensor
    seq_ids: torch.Tensor
    spans: torch.Tensor
    num_seqs: int
    ids: torch.Tensor | None
    row_hash: torch.Tensor | None
    tokens: int
    response_tokens: int
    pool_spans: torch.Tensor
    d_factor: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.num_seqs // 2

    @property
    def response_mask(self) -> torch.Tensor:
        """[2P, T] bool, the response tokens of the padded layout (off): what the padded API of the ops takes."""
        if self.layout != "off":
            raise ValueError(f"response_mask is the padded layout's (off); this micro-batch is {self.layout!r}")
        n, T = self.input_ids.shape
        mask = torch.zeros(n, T, dtype=torch.bool)
        for s, (a, e) in enumerate(self.spans.tolist()):
            mask[s, a - s * T : e - s * T] = True
        return mask


@dataclass(frozen=True)
class Batching:
    """How a command cuts its pairs into forwards, made once from its config: the layout, the rows the SAE
    features are pooled over, pairs per forward or a token budget per forward, the pad id and the model's attention
    row scale. `split` cuts pairs into micro-batches, `collate` lays one out, `batches` does both."""

    layout: str
    pooling: str
    pad_id: int
    pairs: int = 4
    max_tokens: int | None = None
    row_scale: float | None = None

    @classmethod
    def of(cls, cfg, pad_id: int, row_scale, pairs: int | None = None) -> Batching:
        """From a command's config (packing, pooling, max_tokens and micro_batch_size, or `pairs`)."""
        return cls(cfg.packing, cfg.pooling, pad_id, pairs or cfg.micro_batch_size, cfg.max_tokens, row_scale)

    def split(self, items) -> list[list]:
        """Pairs in micro-batches: `pairs` at a time in order, or by the token budget (plan_micro_batches)."""
        if self.max_tokens is None:
            return [items[b : b + self.pairs] for b in range(0, len(items), self.pairs)]
        return plan_micro_batches(items, self.layout, self.max_tokens, self.row_scale)

    def collate(self, chunk) -> MicroBatch:
        return collate(chunk, self.layout, self.pad_id, self.row_scale, self.pooling)

    def batches(self, items):
        """(the micro-batch's pairs, its MicroBatch), for every micro-batch of `items`."""
        for chunk in self.split(items):
            yield chunk, self.collate(chunk)


def collate(
    items: Sequence[TokenizedPair],
    layout: str,
    pad_id: int,
    attention_scale: float | None = None,
    pooling: str = "response",
) -> MicroBatch:
    """P tokenised pairs -> one MicroBatch in the layout.

    attention_scale (packed layouts): None for one row [1, N] (FlexAttention skips the masked blocks), or
    the model's attention_length_scale: rows, padded, in the split that costs dense masks (sdpa, eager) least.
    pooling: the rows the SAE constraint pools over (pool_spans, d_factor; see pooling_rows)."""
    _check_layout(layout)
    if not items:
        raise ValueError("collate needs at least one pair")
    P = len(items)
    pred_rows, labels, seq_ids, spans = [], [], [], [None] * (2 * P)

    def response(seq, first_pred, start, tokens):
        """Rows predicting `tokens`, which sit at rows [start, start + len): the first from first_pred."""
        pred_rows.extend([first_pred] + list(range(start, start + len(tokens) - 1)))
        labels.extend(tokens)
        seq_ids.extend([seq] * len(tokens))
        spans[seq] = (start, start + len(tokens))

    if layout == "off":
        T = max(lp + max(lc, lr) for lp, lc, lr in map(_lengths, items))
        input_ids = torch.full((2 * P, T), pad_id, dtype=torch.long)
        attn = torch.zeros(2 * P, T, dtype=torch.long)
        for side, name in enumerate(("chosen_ids", "rejected_ids")):
            for p, it in enumerate(items):
                b = side * P + p
                seq = list(it.prompt_ids) + list(getattr(it, name))
                input_ids[b, : len(seq)] = torch.tensor(seq)
                attn[b, : len(seq)] = 1
                lp = len(it.prompt_ids)
                response(b, b * T + lp - 1, b * T + lp, list(getattr(it, name)))
        position_ids = segment = branch = None
    else:
        # units: (pair, sides) with sides the responses the unit holds after its prompt
        units = (
            [(p, (0, 1)) for p in range(P)]
            if layout == "share-prompt"
            else [(p, (side,)) for p in range(P) for side in (0, 1)]
        )
        lengths = [n for it in items for n in _units(it, layout)]
        rows = _place(lengths, attention_scale)
        L = max(sum(lengths[u] for u in r) for r in rows)
        ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
        pos = torch.zeros(len(rows), L, dtype=torch.long)
        seg = torch.empty(len(rows), L, dtype=torch.int32)
        br = torch.zeros(len(rows), L, dtype=torch.int8)
        for r, members in enumerate(rows):
            col = 0
            for u in members:
                p, sides = units[u]
                it = items[p]
                lp = len(it.prompt_ids)
                base = r * L + col
                ids[r, col : col + lp] = torch.tensor(it.prompt_ids)
                pos[r, col : col + lp] = torch.arange(lp)
                seg[r, col : col + lengths[u]] = u
                col += lp
                for side in sides:
                    resp = list((it.chosen_ids, it.rejected_ids)[side])
                    ids[r, col : col + len(resp)] = torch.tensor(resp)
                    pos[r, col : col + len(resp)] = torch.arange(lp, lp + len(resp))
                    br[r, col : col + len(resp)] = side + 1
                    response(side * P + p, base + lp - 1, r * L + col, resp)
                    col += len(resp)
            seg[r, col:] = -1 - r  # padding: a segment of its own (it attends to itself only)
            pos[r, col:] = torch.arange(L - col)
        input_ids, attn, position_ids = ids, None, pos
        segment, branch = seg.reshape(-1), br.reshape(-1)
    span_t = torch.tensor(spans, dtype=torch.long)
    pool_spans, d_factor = pooling_rows(layout, span_t, items, pooling)
    return MicroBatch(
        layout=layout,
        input_ids=input_ids,
        attention_mask=attn,
        position_ids=position_ids,
        segment=segment,
        branch=branch,
        pred_rows=torch.tensor(pred_rows, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        seq_ids=torch.tensor(seq_ids, dtype=torch.long),
        spans=span_t,
        num_seqs=2 * P,
        ids=torch.tensor([it.id for it in items], dtype=torch.long),
        row_hash=torch.tensor([it.row_hash for it in items], dtype=torch.long),
        tokens=input_ids.numel(),
        response_tokens=len(labels),
        pool_spans=pool_spans,
        d_factor=d_factor,
    )


def from_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> MicroBatch:
    """A micro-batch in the "off" layout from padded tensors a caller already has: input_ids,
    attention_mask, response_mask [2P, T] (chosen rows first, one contiguous response per row, after at
    least one prompt token). Run it where the tensors live on the host: on a GPU it is a device sync."""
    B, T = input_ids.shape
    if B % 2 or attention_mask.shape != (B, T) or response_mask.shape != (B, T):
        raise ValueError(
            f"input_ids, attention_mask and response_mask must be [2P, T]; got {tuple(input_ids.shape)}, "
            f"{tuple(attention_mask.shape)}, {tuple(response_mask.shape)}"
        )
    resp = response_mask.bool()
    n = resp.sum(1)
    pos = torch.arange(T, device=resp.device)
    first = torch.where(resp, pos, T).amin(1)
    if (n == 0).any() or (first == 0).any() or ((torch.where(resp, pos + 1, 0).amax(1) - first) != n).any():
        raise ValueError(
            "response_mask: every row needs one contiguous, non-empty response after at least one prompt token"
        )
    seq, t = resp.nonzero(as_tuple=True)
    spans = torch.stack([first, first + n], 1) + (torch.arange(B, device=resp.device) * T)[:, None]
    return MicroBatch(
        layout="off",
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=None,
        segment=None,
        branch=None,
        pred_rows=seq * T + t - 1,
        labels=input_ids[seq, t],
        seq_ids=seq,
        spans=spans,
        num_seqs=B,
        ids=None,
        row_hash=None,
        tokens=B * T,
        response_tokens=int(n.sum()),
        pool_spans=spans,
    )


def pooling_rows(
    layout: str, spans: torch.Tensor, items: Sequence[TokenizedPair], pooling: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pool_spans [2P, 2], d_factor [2P] or None) of a micro-batch whose response spans are `spans`: the rows the
    SAE constraint pools over, and what D is multiplied by.

    response (ours): each response's own token rows, a mean over them.
    authors (MikaStars39/FeatureAlignment: `(features * mask).mean(1)` over the shifted sequence): the rows that
    predict the response tokens, summed and divided by the pair's padded length less one, T - 1 with T =
    prompt + the longer response. That pooled vector is (n / (T - 1)) x the mean over the same rows, so its D is
    the mean's D x (n / (T - 1))^2 (top-k selection is unchanged by the positive factor); the cache holds the
    means, and the factor is applied to D. The predicting rows are contiguous in the off and pack layouts only."""
    if pooling == "response":
        return spans, None
    if pooling != "authors":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if layout == "share-prompt":
        raise ValueError(
            "pooling 'authors' needs packing 'off' or 'pack': with the prompt shared, the rows that "
            "predict the rejected response are not contiguous"
        )
    spans = spans - 1
    n = (spans[:, 1] - spans[:, 0]).double()
    T = torch.tensor(
        [len(it.prompt_ids) + max(len(it.chosen_ids), len(it.rejected_ids)) for it in items], dtype=torch.float64
    ).repeat(2)
    return spans, ((n / (T - 1)) ** 2).float()


_MOVED = {
    "attention_mask_for": "packed_attention",
    "PACKED_ATTENTION": "packed_attention",
    "body_hidden": "model",
    "attention_length_scale": "model",
}


def __getattr__(name):  # 0.2's names, now beside the model
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"fpo.packing.{name} is now fpo.{_MOVED[name]}.{name}", FutureWarning, stacklevel=2)
        return getattr(importlib.import_module(f"fpo.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'fpo.packing' has no attribute {name!r}")
