"""The small files that aim training at chosen SAE features, read by content, never by their name's extension:

- a feature-weights file (`fpo train --feature-weights`): per-feature weights inside FPO's D, the paper's
  selective weighting. JSON ({id: w}, or {"sae": fingerprint, "weights": {id: w}}) or CSV (feature,weight rows,
  an optional header). A weight acts only on the features D's top-k selects.
- a protect file (`fpo train --protect`, `fpo precompute --protect`): a protected set of features of one SAE,
  each with a weight and a direction, enforced by a term of its own (fpo.protection). JSON:
  {"sae": fingerprint, "features": [{"id": 12, "weight": 1.0, "direction": "both"}, 40, ...]}.

Either is refused with a sentence naming the file and the entry: a file that is not a regular file or is larger
than MAX_BYTES, text that is not UTF-8, JSON with a duplicate key or a NaN, a boolean where a number belongs, an
id outside the SAE's width, a weight that is negative, not finite or above MAX_WEIGHT.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fpo_kernels.protect import DIRECTIONS

from ._types import PathLike
from .files import atomic_write_json

if TYPE_CHECKING:
    from .sae import SAESpec

__all__ = [
    "MAX_BYTES",
    "MAX_WEIGHT",
    "read_small_file",
    "read_feature_weights",
    "write_feature_weights",
    "ProtectSet",
    "read_protect_file",
    "write_protect_file",
]

MAX_BYTES = 16 << 20  # far above any real file of either kind (a weight for each of 1M features is ~20 MB CSV)
MAX_WEIGHT = 1e6  # beyond this a weight only overflows float32 sums; no use of either file needs more


def read_small_file(path: PathLike, what: str) -> str:
    """The UTF-8 text of a regular file of at most MAX_BYTES (a leading byte-order mark dropped): a FIFO, a
    device such as /dev/zero or a directory is refused before anything is read."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"{what} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise ValueError(f"{what} is {kind}: pass a JSON or CSV file")
    if st.st_size > MAX_BYTES:
        raise ValueError(f"{what} is {st.st_size} bytes, more than the {MAX_BYTES} such a file can need")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        return data.decode("utf-8-sig")
    except OSError as e:
        raise ValueError(f"{what} cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8 text (byte {e.start})") from None


def _strict_json(text: str, what: str):
    """JSON with duplicate keys and NaN / Infinity refused (Python's json takes both silently)."""

    def pairs(items):
        seen = set()
        for k, _ in items:
            if k in seen:
                raise ValueError(f"{what}: key {k!r} appears twice")
            seen.add(k)
        return dict(items)

    def constant(name):
        raise ValueError(f"{what}: {name} is not a number JSON allows; weights must be finite")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON ({e.msg}, line {e.lineno})") from None


def _looks_like_json(text: str) -> bool:
    return text.lstrip()[:1] in ("{", "[")


def _feature_id(value, what: str, width: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a feature id")
    try:
        i = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        i = None
    if i is None:
        raise ValueError(f"{what}: {value!r} is not a feature id")
    if not 0 <= i < width:
        raise ValueError(f"{what}: feature {i} is outside the SAE's width {width} [0, {width})")
    return i


def _weight(value, what: str, feature: int, *, from_text: bool = False) -> float:
    if isinstance(value, bool) or (not from_text and not isinstance(value, (int, float))):
        raise ValueError(f"{what}: feature {feature} has weight {value!r}; a weight is a number")
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: feature {feature} has weight {value!r}; a weight is a number") from None
    if not math.isfinite(w) or not 0 <= w <= MAX_WEIGHT:
        raise ValueError(
            f"{what}: feature {feature} has weight {value!r}; weights must be finite, in [0, {MAX_WEIGHT:g}]"
        )
    return w


def _sae_index(fingerprint, saes, what: str, layer=None) -> int:
    if fingerprint is not None:
        match = [j for j, s in enumerate(saes) if s.sae.fingerprint() == fingerprint]
        if layer is not None:
            match = [j for j in match if saes[j].layer == layer]
        if not match:
            held = ", ".join(f"'{s.name}' ({s.sae.fingerprint()}, layer {s.layer})" for s in saes) or "none"
            raise ValueError(f"{what} is for another SAE (fingerprint {fingerprint}); this run's SAEs: {held}")
        if len(match) > 1:  # one SAE's weights read at several layers: the fingerprint alone cannot tell
            layers = ", ".join(str(saes[j].layer) for j in match)
            raise ValueError(
                f"{what}: fingerprint {fingerprint} names {len(match)} of the run's SAEs (the same weights at layers "
                f'{layers}): add "layer": N to the file to say which'
            )
        return match[0]
    if len(saes) > 1:
        raise ValueError(
            f"{what} does not name its SAE and the run has {len(saes)}: write it as JSON "
            '{"sae": FINGERPRINT, ...} (`fpo features --json` lists each SAE\'s fingerprint)'
        )
    if not saes:
        raise ValueError(f"{what}: the run has no SAE (--sae) for it")
    return 0


def _layer(doc, what):
    layer = doc.get("layer")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise ValueError(f"{what}: layer must be the SAE's decoder block (an integer), got {layer!r}")
    return layer


# ------------------------------------------------------------------------------------------------
# feature weights in D
# ------------------------------------------------------------------------------------------------
def write_feature_weights(path: PathLike, sae_fingerprint: str, weights: dict[int, float], note: str = "") -> None:
    """A --feature-weights file (JSON): the SAE it is for, and {feature id: weight}; unlisted features weigh 1."""
    atomic_write_json(
        path, {"sae": sae_fingerprint, "note": note, "weights": {str(i): float(w) for i, w in sorted(weights.items())}}
    )


def read_feature_weights(path: PathLike, saes: Sequence[SAESpec]) -> tuple[int, torch.Tensor, str]:
    """(the index among `saes` the file is for, weights [width] float32, the SHA-256 of the file's bytes): JSON
    or CSV, told apart by content; unlisted features weigh 1; an id listed twice is refused."""
    what = f"feature_weights {path}"
    text = read_small_file(path, what)
    digest = hashlib.sha256(text.encode()).hexdigest()
    fingerprint, pairs, from_text, layer = None, [], False, None
    if _looks_like_json(text):
        doc = _strict_json(text, what)
        if not isinstance(doc, dict):
            raise ValueError(f'{what} must hold an object: {{feature id: weight}} or {{"sae": ..., "weights": ...}}')
        raw = doc["weights"] if "weights" in doc else doc
        fingerprint = doc.get("sae") if "weights" in doc else None
        layer = _layer(doc, what) if "weights" in doc else None
        if not isinstance(raw, dict):
            raise ValueError(f"{what}: weights must be an object of feature id -> weight")
        pairs = [(k, v, f"{what}: entry {k!r}") for k, v in raw.items()]
    else:
        from_text = True
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = [p.strip() for p in line.split(",")]
            if n == 1 and parts and not _is_int(parts[0]):
                continue  # a header: its first field is no number
            if len(parts) != 2:
                raise ValueError(f"{what} line {n}: a CSV row is feature,weight, got {line!r}")
            pairs.append((parts[0], parts[1], f"{what} line {n}"))
    j = _sae_index(fingerprint, saes, what, layer)
    width = saes[j].sae.width
    weights = torch.ones(width, dtype=torch.float32)
    seen = set()
    for key, value, where in pairs:
        i = _feature_id(key.strip() if isinstance(key, str) else key, where, width)
        if i in seen:
            raise ValueError(f"{where}: feature {i} is listed twice")
        seen.add(i)
        weights[i] = _weight(value, where, i, from_text=from_text)
    return j, weights, digest


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------
# protected sets
# ------------------------------------------------------------------------------------------------
DIRECTION_NAMES = tuple(DIRECTIONS)  # both, no_increase, no_decrease


@dataclass(frozen=True)
class ProtectSet:
    """Protected features of one SAE (by fingerprint): ids, a weight each (their share of R) and a direction
    each (both; no_increase: only a rise is penalised; no_decrease: only a fall)."""

    sae: str | None
    ids: tuple[int, ...]
    weights: tuple[float, ...]
    directions: tuple[str, ...]
    note: str = ""
    layer: int | None = None  # the SAE's block, where one SAE's weights are read at several

    def index_in(self, saes: Sequence[SAESpec]) -> int:
        """Which of the run's SAEs the set belongs to."""
        return _sae_index(self.sae, saes, "protect set", self.layer)

    @property
    def features_key(self) -> str:
        """What a cache's protected values depend on: the SAE and the ids (weights and directions only shape the
        loss, so a cache serves any of them)."""
        return hashlib.sha256(json.dumps([self.sae, list(self.ids)]).encode()).hexdigest()[:16]

    def as_dict(self) -> dict:
        return {
            "sae": self.sae,
            **({"layer": self.layer} if self.layer is not None else {}),
            "note": self.note,
            "features": [
                {"id": i, "weight": w, "direction": d} for i, w, d in zip(self.ids, self.weights, self.directions)
            ],
        }

    def direction_codes(self) -> torch.Tensor:
        return torch.tensor([DIRECTIONS[d] for d in self.directions], dtype=torch.int8)


def write_protect_file(path: PathLike, protect: ProtectSet) -> None:
    atomic_write_json(path, protect.as_dict())


def read_protect_file(path: PathLike, saes: Sequence[SAESpec] | None = None, width: int | None = None) -> ProtectSet:
    """A ProtectSet from a protect file. With `saes` (SAESpecs), its SAE must be one of them (a file that names
    none is taken for the only one); its ids are checked against that SAE's width (or `width`)."""
    what = f"protect {path}"
    text = read_small_file(path, what)
    if not _looks_like_json(text):
        raise ValueError(f'{what} must be JSON: {{"sae": FINGERPRINT, "features": [{{"id": 12}}, ...]}}')
    doc = _strict_json(text, what)
    if not isinstance(doc, dict) or not isinstance(doc.get("features"), list):
        raise ValueError(f'{what} must hold an object with a "features" list, e.g. {{"features": [12, 40]}}')
    unknown = sorted(set(doc) - {"sae", "layer", "features", "note"})
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; a protect file holds sae, layer, features and note")
    fingerprint = doc.get("sae")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise ValueError(f"{what}: sae must be the SAE's fingerprint (a string), got {fingerprint!r}")
    layer = _layer(doc, what)
    if saes is not None:
        j = _sae_index(fingerprint, saes, what, layer)
        width, fingerprint = saes[j].sae.width, saes[j].sae.fingerprint()
    width = width if width is not None else 2**31
    if not doc["features"]:
        raise ValueError(f"{what}: features is empty; list at least one feature to protect")
    ids, weights, directions = [], [], []
    for n, entry in enumerate(doc["features"]):
        where = f"{what}: features[{n}]"
        if isinstance(entry, dict):
            extra = sorted(set(entry) - {"id", "weight", "direction"})
            if extra or "id" not in entry:
                raise ValueError(f"{where} must be {{'id': ..., 'weight': ..., 'direction': ...}}, got {entry!r}")
            i = _feature_id(entry["id"], where, width)
            w = _weight(entry.get("weight", 1.0), where, i)
            d = entry.get("direction", "both")
            if d not in DIRECTION_NAMES:
                raise ValueError(f"{where}: direction must be one of {DIRECTION_NAMES}, got {d!r}")
        else:
            i, w, d = _feature_id(entry, where, width), 1.0, "both"
        if i in ids:
            raise ValueError(f"{where}: feature {i} is listed twice")
        ids.append(i)
        weights.append(w)
        directions.append(d)
    if not sum(weights) > 0:
        raise ValueError(f"{what}: every weight is 0, so nothing would be protected")
    note = doc.get("note", "")
    note = note if isinstance(note, str) else ""
    return ProtectSet(fingerprint, tuple(ids), tuple(weights), tuple(directions), note, layer)
