"""The offline reference cache: per-example reference log-prob statistics and top-K pooled SAE features.

Layout of a cache directory:
    meta.json                              written last, by rank 0, once every shard exists
    settings.json                          written first: what the cache is being built for (resume check)
    shard-<start>-<end>.safetensors        rows [start, end) of the tokenised dataset, in order
    shard-<start>-<end>.safetensors.sha256 its checksum, recorded when it was written (resume checks it)

Each shard holds, for its n rows: ids [n] int64, row_hash [n] int64 (hash of the row's token ids),
{chosen,rejected}_logp_sum / _logp_mean / _len [n] float32, and when an SAE is used
{chosen,rejected}_idx [n, K] int16 (width <= 32768) or int32 and {chosen,rejected}_val [n, K] float16
(or the value_dtype precompute was given).
A shard is written to a temporary name and renamed when complete, so a directory never holds half a shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fpo_kernels.sequence_stats import SequenceStats

from ._types import Device, Log, PathLike
from .files import atomic_write_text, sha256_of, temp_file

if TYPE_CHECKING:
    from .pairs import TokenizedPair

__all__ = [
    "ReferenceCache",
    "CacheMismatchError",
    "FORMAT_VERSION",
    "write_shard",
    "shard_name",
    "recorded_checksum",
    "shard_is_sound",
    "is_cache_file",
]

FORMAT_VERSION = 2  # 2: every SAE described in meta["saes"]; the cached feature count is "cache_k"


class CacheMismatchError(ValueError):
    pass


def shard_name(start: int, end: int) -> str:
    return f"shard-{start:09d}-{end:09d}.safetensors"


def write_shard(directory: str, start: int, end: int, tensors: dict, name: str | None = None) -> str:
    """Write a shard (shard_name(start, end), or `name`) under a temporary name, record its checksum beside it
    (<shard>.sha256), then rename: a resumed precompute checks every existing shard against the checksum recorded
    when it was written."""
    from safetensors.torch import save_file

    final = os.path.join(directory, name or shard_name(start, end))
    fd, tmp = temp_file(final)
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={"format": str(FORMAT_VERSION)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        atomic_write_text(final + ".sha256", sha256_of(tmp))
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):  # never half a shard on disk
            os.remove(tmp)
        raise
    return final


def is_cache_file(name: str) -> bool:
    """What precompute writes into a cache directory (and only that is ever removed from one)."""
    base = name.split(".tmp", 1)[0]  # a temporary of one of them: <name>.tmpXXXXXXXX
    return base in ("meta.json", "settings.json") or (
        base.startswith(("shard-", "protect-")) and base.endswith((".safetensors", ".safetensors.sha256"))
    )


def shard_is_sound(out: str, name: str, say: Log | None = None) -> bool:
    """A shard counts as done only if it matches the checksum recorded when it was written; one that does
    not (or has none) is removed, to be rebuilt."""
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return False
    want = recorded_checksum(out, name)
    if want is not None and sha256_of(path) == want:
        return True
    if say is not None:
        say(f"[fpo] {name} {'fails its recorded checksum' if want else 'has no recorded checksum'}: rebuilding it")
    os.remove(path)
    return False


def recorded_checksum(directory: str, name: str) -> str | None:
    """The checksum recorded in <shard>.sha256 when the shard was written; None if there is none."""
    path = os.path.join(directory, name + ".sha256")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def _is_shard_entry(x) -> bool:
    return (
        isinstance(x, dict)
        and isinstance(x.get("file"), str)
        and os.path.basename(x["file"]) == x["file"]
        and isinstance(x.get("bytes"), int)
        and isinstance(x.get("sha256"), str)
    )


def _check_meta(meta: dict, path: str):
    """meta.json's fields, each of the type precompute writes: a hand-edited or damaged one is a sentence, never a
    KeyError or TypeError deeper in."""
    fix = "rerun `fpo precompute` with the same arguments (--overwrite) to rebuild it"
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    problems = []
    if not is_int(meta.get("rows")) or meta["rows"] < 0:
        problems.append(f"rows is {meta.get('rows')!r}, not a count")
    if not all(_is_shard_entry(x) for x in meta.get("shards", [])):
        problems.append("a shard entry lacks its file, bytes or sha256")
    if meta.get("pooling") not in ("response", "authors"):
        problems.append(f"pooling is {meta.get('pooling')!r}")
    saes = meta.get("saes")
    if not isinstance(saes, list):
        problems.append(f"saes is {type(saes).__name__}, not a list")
    else:
        if saes and (not is_int(meta.get("cache_k")) or meta["cache_k"] < 1):
            problems.append(f"cache_k is {meta.get('cache_k')!r}, not a positive count")
        for e in saes:
            if not (
                isinstance(e, dict)
                and isinstance(e.get("key"), str)
                and isinstance(e.get("site"), str)
                and isinstance(e.get("fingerprint"), str)
                and is_int(e.get("width"))
                and (e.get("layer") is None or is_int(e.get("layer")))
            ):
                problems.append(f"SAE entry {e!r:.80} lacks its key, site, fingerprint, width or layer")
                break
    if problems:
        raise ValueError(f"cache {path}: meta.json is damaged or hand-edited ({'; '.join(problems)}): {fix}")


# settings a flag chooses and the cache records: a mismatch can be fixed either way
FLAG_SETTINGS = ("max_length", "max_prompt_length", "pooling")


class ReferenceCache:
    """Read a cache built by `fpo precompute`; look rows up by example id.

    The whole cache is loaded into (CPU) memory: at K = 256 it is about 2 KB per pair.
    `verify(...)` compares meta.json with what training uses and raises on the first mismatch;
    `lookup(ids, row_hash, device)` checks each row's token hash too."""

    def __init__(self, path: PathLike, check_checksums: bool = True):
        self.path = os.fspath(path)
        meta_path = os.path.join(self.path, "meta.json")
        if not os.path.exists(meta_path):
            if os.path.isdir(self.path) and any(n.startswith("shard-") for n in os.listdir(self.path)):
                raise ValueError(
                    f"cache {self.path} is incomplete (no meta.json): rerun `fpo precompute` with the "
                    "same arguments to finish it"
                )
            raise ValueError(f"cache {self.path} has no meta.json: build it with `fpo precompute`")
        try:
            with open(meta_path, encoding="utf-8") as f:
                self.meta = json.load(f)
            assert isinstance(self.meta, dict) and isinstance(self.meta.get("shards"), list)
        except (ValueError, AssertionError):  # invalid JSON or UTF-8, or not a cache's meta.json
            raise ValueError(
                f"cache {self.path}: meta.json is damaged or not a cache's (truncated or edited): "
                "rerun `fpo precompute` with the same arguments to rebuild it"
            ) from None
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            shown = f"{version!r} (a string, where precompute writes a number)" if isinstance(version, str) else version
            raise CacheMismatchError(
                f"cache {self.path} is in format {shown}, this version "
                f"of fpo reads format {FORMAT_VERSION}: rebuild it with `fpo precompute` "
                "(--overwrite to reuse the directory)"
            )
        _check_meta(self.meta, self.path)
        parts = [self._load_shard(shard, check_checksums) for shard in self.meta["shards"]]
        if not parts:
            raise ValueError(f"cache {self.path}: meta.json lists no shard: rebuild the cache")
        self.data = {k: torch.cat([d[k] for d in parts]) for k in parts[0]}
        ids = self.data["ids"]
        if len(ids) != self.meta["rows"]:
            raise ValueError(f"cache {self.path}: shards hold {len(ids)} rows, meta.json says {self.meta['rows']}")
        self._row_of = {int(i): r for r, i in enumerate(ids.tolist())}
        self.has_features = bool(self.meta.get("saes"))
        self.protect_entry = self._load_protect(check_checksums)
        self._check_contents()

    def _load_shard(self, shard: dict, check_checksums: bool) -> dict:
        from safetensors.torch import load_file

        p = os.path.join(self.path, shard["file"])
        if not os.path.exists(p):
            raise ValueError(f"cache shard {p} is missing")
        if os.path.getsize(p) != shard["bytes"]:
            raise ValueError(
                f"cache shard {p} is truncated or altered ({os.path.getsize(p)} bytes, "
                f"meta.json says {shard['bytes']}): rebuild the cache"
            )
        if check_checksums and sha256_of(p) != shard["sha256"]:
            raise ValueError(f"cache shard {p} is corrupted (checksum mismatch): rebuild the cache")
        try:
            return load_file(p)
        except Exception as e:
            raise ValueError(f"cache shard {p} could not be read ({e}): rebuild the cache") from e

    def _load_protect(self, check_checksums: bool) -> dict | None:
        """meta.json's "protect" entry, its shards read into data["chosen_protect"] / ["rejected_protect"]
        [rows, |P|] (the reference's pooled values of the protected features, by row); None without one."""
        self.protect_tokens: dict = {}
        entry = self.meta.get("protect")
        if entry is None:
            return None
        fix = "rerun `fpo precompute` with --protect FILE to rebuild the protected values"
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("features_key"), str)
            and isinstance(entry.get("ids"), list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in entry["ids"])
            and isinstance(entry.get("mean"), list)
            and len(entry["mean"]) == len(entry["ids"]) > 0
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in entry["mean"])
            and isinstance(entry.get("shards"), list)
            and all(_is_shard_entry(x) for x in entry["shards"])
        )
        if not ok:
            raise ValueError(f"cache {self.path}: meta.json's protect entry is damaged or hand-edited: {fix}")
        parts = [self._load_shard(x, check_checksums) for x in entry["shards"]]
        try:
            ids = torch.cat([t["ids"] for t in parts])
            values = {side: torch.cat([t[f"{side}_protect"] for t in parts]) for side in ("chosen", "rejected")}
        except (KeyError, RuntimeError):
            raise ValueError(
                f"cache {self.path}: the protected values' shards are not a protect cache's: {fix}"
            ) from None
        if not torch.equal(ids, self.data["ids"]) or any(
            v.shape != (len(ids), len(entry["ids"])) for v in values.values()
        ):
            raise ValueError(f"cache {self.path}: the protected values' rows do not match the cache's rows: {fix}")
        for side, v in values.items():
            self.data[f"{side}_protect"] = v.float()
        self.protect_tokens = {}
        if "token_scale" in entry:  # the per-token form's values: each row's tokens end to end, and their counts
            try:
                for side in ("chosen", "rejected"):
                    z = torch.cat([t[f"{side}_protect_z"] for t in parts]).float()
                    n = torch.cat([t[f"{side}_protect_n"] for t in parts]).long()
                    if n.shape != (len(ids),) or (n < 0).any() or int(n.sum()) != z.shape[0] or z.dim() != 2:
                        raise ValueError
                    if z.shape[1] != len(entry["ids"]) or not bool(z.isfinite().all()):
                        raise ValueError
                    self.protect_tokens[side] = (z, torch.cat([n.new_zeros(1), n.cumsum(0)]))
            except (KeyError, RuntimeError, ValueError):
                raise ValueError(
                    f"cache {self.path}: the protected features' per-token values are damaged: {fix}"
                ) from None
        return entry

    def protect_tokens_of(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, |P|] the reference's per-token protected pre-activations of cache rows (a pair each): the chosen
        responses' tokens end to end, then the rejected ones' (the [2P] order)."""
        if not self.protect_tokens:
            raise ValueError(f"cache {self.path} holds no per-token protected values: rerun `fpo precompute --protect`")
        out = []
        for side in ("chosen", "rejected"):
            z, off = self.protect_tokens[side]
            out += [z[off[r] : off[r + 1]] for r in rows.tolist()]
        return torch.cat(out)

    def _check_contents(self):
        """What training reads unchecked (the kernels skip their input checks in the loop): every feature index
        inside [-1, width) of its SAE, every value and log-prob finite. Checked once, at load: a crafted or
        damaged cache whose checksums were rewritten to match still stops here, naming the row."""
        ids = self.data["ids"]
        for name, t in self.data.items():
            if t.is_floating_point():
                bad = (~t.isfinite()).reshape(len(t), -1).any(1).nonzero().flatten()
                if bad.numel():
                    raise ValueError(
                        f"cache {self.path}: {name} of example id {int(ids[bad[0]])} is not finite: the "
                        "cache is damaged; rebuild it with `fpo precompute --overwrite`"
                    )
        for entry in self.saes if self.has_features else []:
            width = entry.get("width")
            for side in ("chosen", "rejected"):
                idx = self.data.get(f"{side}_idx{entry['key']}")
                if idx is None or width is None:
                    continue
                wide = idx.int()
                bad = ((wide < -1) | (wide >= width)).any(1).nonzero().flatten()
                if bad.numel():
                    raise ValueError(
                        f"cache {self.path}: {side}_idx{entry['key']} of example id {int(ids[bad[0]])} holds "
                        f"{int(wide[bad[0]][(wide[bad[0]] < -1) | (wide[bad[0]] >= width)][0])}, outside "
                        f"[-1, {width}) for SAE width {width}: the cache is damaged; rebuild it"
                    )

    def __len__(self):
        return len(self._row_of)

    def __contains__(self, example_id) -> bool:
        return int(example_id) in self._row_of

    @property
    def cache_k(self) -> int | None:
        """Features cached per response (the reference's top ones); None for a cache of log-probs only."""
        return self.meta.get("cache_k")

    @property
    def saes(self) -> list:
        """The SAEs whose features the cache holds: [{name, layer, site, fingerprint, width, activation, key,
        index_dtype, feature_scale}], key being the suffix of their tensors (chosen_idx<key>, ...)."""
        return self.meta["saes"]

    def find_sae(self, fingerprint: str, layer: int | None, name: str = "sae", site: str = "resid_post") -> dict:
        """The cache's entry for the SAE with this fingerprint at this layer and site, or an error naming it."""
        for entry in self.saes:
            if entry["fingerprint"] == fingerprint and entry["layer"] == layer and entry["site"] == site:
                return entry
        where = lambda e: f"layer {e['layer']}" + ("" if e["site"] == "resid_post" else f" ({e['site']})")  # noqa: E731
        held = ", ".join(f"'{e['name']}' at {where(e)}" for e in self.saes) or "none"
        raise CacheMismatchError(
            f"cache {self.path} has no features for SAE '{name}' at {where(dict(layer=layer, site=site))} (it holds: "
            f"{held}): rebuild it with `fpo precompute --sae` for every SAE the run uses"
        )

    def feature_scale(self, k: int, key: str = "") -> float:
        """The reference's mean squared top-k pooled feature value on this data, recorded by `fpo precompute`
        (for the SAE whose tensors carry `key`): what constraint_norm "ref" divides D by."""
        entry = next((e for e in self.saes if e["key"] == key), None)
        scale = entry.get("feature_scale") if entry else None
        if not scale:
            raise ValueError(
                f"cache {self.path} has no recorded feature scale (it was built without an SAE): "
                "build it with `fpo precompute --sae` to use constraint_norm 'ref'"
            )
        if not 1 <= k <= len(scale):
            raise ValueError(f"k ({k}) is outside the cache's 1..K ({len(scale)})")
        if not scale[k - 1] > 0:
            raise ValueError(
                f"cache {self.path}: the recorded feature scale at k={k} is {scale[k - 1]}; "
                "constraint_norm 'ref' needs a positive scale"
            )
        return scale[k - 1]

    def verify(self, **expected):
        """Raise CacheMismatchError naming the first field whose value differs from meta.json.
        Fields: model (fingerprint dict), tokenizer, dataset, max_length, max_prompt_length, pooling. A None
        expectation is not checked; the SAEs are looked up with find_sae."""
        for key, want in expected.items():
            if want is None:
                continue
            have = self.meta.get(key)
            if isinstance(want, dict) and isinstance(have, dict):
                for sub, w in want.items():
                    if have.get(sub) != w:
                        raise CacheMismatchError(
                            f"cache {self.path} was built for another {key}: {key}.{sub} is "
                            f"{have.get(sub)!r} in the cache, {w!r} now. Rebuild it with `fpo precompute`."
                        )
            elif have != want and key in FLAG_SETTINGS:
                flag = "--" + key.replace("_", "-")
                raise CacheMismatchError(
                    f"cache {self.path} was built with {key} {have!r}, this run uses {want!r}: pass {flag} {have} "
                    f"as the cache was built, or rebuild it with `fpo precompute {flag} {want}`"
                )
            elif have != want:
                raise CacheMismatchError(
                    f"cache {self.path} was built for another {key}: {have!r} in the cache, "
                    f"{want!r} now. Rebuild it with `fpo precompute`."
                )

    def check_rows(self, items: Sequence[TokenizedPair]) -> None:
        """Every tokenised pair (fpo.pairs.TokenizedPair) must have its row in the cache, built from the same
        token ids: checked once at start-up, so a mismatch stops a run before its first step."""
        missing = [it.id for it in items if int(it.id) not in self._row_of]
        if missing:
            raise CacheMismatchError(
                f"cache {self.path} lacks {len(missing)} of the dataset's examples (ids {missing[:5]}): "
                "it was built for another dataset or fewer pairs; rebuild it"
            )
        have = self.data["row_hash"][[self._row_of[int(it.id)] for it in items]].tolist()
        differ = [it.id for it, h in zip(items, have) if h != it.row_hash]
        if differ:
            raise CacheMismatchError(
                f"cache {self.path}: {len(differ)} examples (ids {differ[:5]}) were tokenised "
                "differently when it was built (other text, tokenizer, max_length, "
                "max_prompt_length or max_tokens truncation): rebuild it"
            )

    def reference(
        self, ids: torch.Tensor, row_hash: torch.Tensor | None = None, device: Device = "cpu"
    ) -> SequenceStats:
        """The reference side of P pairs in the [2P] layout the loss takes (chosen first): logp_sum, logp_mean,
        length [2P], each SAE's cached features (indices, values [2P, K]) under its key, and the protected
        features' values [2P, |P|] when the cache has them. On disk a row is a pair (chosen_* and rejected_*
        columns, looked up by example id); a batch's statistics are its 2P sequences."""
        rows = self.lookup(ids, row_hash, device)
        names = [k.removeprefix("chosen_") for k in rows if k.startswith("chosen_")]
        stats = SequenceStats.of({n: torch.cat([rows["chosen_" + n], rows["rejected_" + n]]) for n in names})
        if self.protect_tokens:
            at = torch.tensor([self._row_of[int(i)] for i in ids.tolist()], dtype=torch.long)
            stats = stats.replace(protect_tokens=self.protect_tokens_of(at).to(device, non_blocking=True))
        return stats

    def lookup(self, ids: torch.Tensor, row_hash: torch.Tensor | None = None, device: Device = "cpu") -> dict:
        """Rows for example ids [P] -> dict of tensors on device (chosen_* / rejected_*)."""
        found = []
        for i in ids.tolist():
            r = self._row_of.get(int(i))
            if r is None:
                raise CacheMismatchError(f"example id {i} is not in cache {self.path}: it was built for other rows")
            found.append(r)
        rows = torch.tensor(found, dtype=torch.long)
        if row_hash is not None:
            bad = (self.data["row_hash"][rows] != row_hash.cpu()).nonzero().flatten()
            if bad.numel():
                i = int(ids[bad[0]])
                raise CacheMismatchError(
                    f"cache row for example id {i} was built from a different tokenisation "
                    f"(other text, tokenizer or max lengths): rebuild the cache"
                )
        return {k: v[rows].to(device, non_blocking=True) for k, v in self.data.items() if k not in ("ids", "row_hash")}
