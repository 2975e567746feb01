"""Preference pairs: loading (local json/jsonl/parquet or a saved dataset), tokenisation with response
masks, and batching chosen and rejected together.

Formats: prompt / chosen / rejected as strings or chat message lists (UltraFeedback-binarized style, where
chosen may hold the whole conversation), and Anthropic HH-RLHF transcripts ('\\n\\nHuman: ...
\\n\\nAssistant: ...'), which become chat turns so that chat templates apply.

Truncation policy (documented, as in the CLI help): a prompt longer than max_prompt_length keeps its LAST
max_prompt_length tokens (the end of a conversation is what the response answers); the response then keeps
its FIRST max_length - len(prompt) tokens. max_prompt_length < max_length is required, so every kept
response has at least one token. A text far longer than what it keeps is cut before it is tokenised
(see _bounded), with the same kept tokens.

Rows that cannot be used (a missing column, an empty chosen or rejected response) are bad rows: an error
naming the row, or skipped with a report (bad_rows="skip"). Pairs whose chosen and rejected responses are
identical carry no preference: they are always dropped and reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._types import Log, Tokenizer

__all__ = [
    "Pair",
    "TokenizedPair",
    "load_pairs",
    "tokenize_pairs",
    "prompt_ids",
    "BadRowError",
    "dataset_fingerprint",
    "tokenizer_fingerprint",
]


class BadRowError(ValueError):
    pass


@dataclass(frozen=True)
class Pair:
    id: int  # row index in the source dataset: the key of the reference cache
    prompt: object  # str, or a list of chat messages ending before the assistant turn
    chosen: str
    rejected: str


@dataclass(frozen=True)
class TokenizedPair:
    id: int
    prompt_ids: tuple
    chosen_ids: tuple  # response tokens only
    rejected_ids: tuple
    row_hash: int  # hash of the token ids: ties a cache row to this exact tokenisation

    @property
    def lengths(self):
        return len(self.prompt_ids) + len(self.chosen_ids), len(self.prompt_ids) + len(self.rejected_ids)


def _read_json(path: str, ext: str) -> list:
    """Rows of a .jsonl file (one object per line) or a .json file (a list of objects, or columns), with
    an error naming the line of any malformed row."""
    try:
        return _read_json_rows(path, ext)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"dataset {path} is not UTF-8 text (byte {e.object[e.start : e.start + 1]!r} at offset "
            f"{e.start}): JSON datasets are read as UTF-8 (a UTF-8 byte-order mark is accepted); convert "
            "it, e.g. iconv -f UTF-16 -t UTF-8"
        ) from None


def _read_json_rows(path: str, ext: str) -> list:
    rows = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark (Windows tools) is skipped
        if ext == ".jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"dataset {path} line {n} is not valid JSON ({e.msg} at column {e.colno})"
                    ) from None
                if not isinstance(rec, dict):
                    raise ValueError(f"dataset {path} line {n} is not a JSON object")
                rows.append(rec)
        else:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"dataset {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
            if isinstance(data, dict):  # columns: {"prompt": [...], "chosen": [...], ...}
                if not all(isinstance(v, list) for v in data.values()) or len({len(v) for v in data.values()}) > 1:
                    raise ValueError(f"dataset {path}: a JSON object must map column names to equal-length lists")
                data = [dict(zip(data, vals)) for vals in zip(*data.values())]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise ValueError(f"dataset {path} must hold a list of objects (or one object of columns)")
            rows = data
    return rows


DATA_EXTENSIONS = (".json", ".jsonl", ".parquet")


def pick_split(path, splits, split=None) -> str:
    """The split to read from a dataset with these splits: the one asked for, else 'train', else the only one;
    several splits and none named train is ambiguous (it used to read the first, e.g. test_prefs)."""
    splits = list(splits)
    if split is not None:
        if split not in splits:
            raise ValueError(f"dataset {path} has no split {split!r}; its splits: {splits}")
        return split
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise ValueError(f"dataset {path} has several splits and none named train: {splits}; pass --split NAME")


def _load_dataset(path: str, split=None):
    if not os.path.exists(path):
        raise ValueError(f"dataset {path} does not exist (a local .json/.jsonl/.parquet file or a saved dataset)")
    ext = os.path.splitext(path)[1].lower()
    if os.path.isfile(path) and split is not None:
        raise ValueError(
            f"dataset {path} is one file, with no splits: --split is for a saved DatasetDict or a "
            "folder of one file per split (train.jsonl, test.jsonl, ...)"
        )
    if os.path.isfile(path) and ext in (".json", ".jsonl"):
        return _read_json(path, ext)
    import datasets

    datasets.disable_progress_bars()
    if os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "dataset_info.json"))
        or os.path.exists(os.path.join(path, "dataset_dict.json"))
    ):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[pick_split(path, ds, split)]
        elif split is not None:
            raise ValueError(f"dataset {path} is a single saved split: --split is for a DatasetDict")
        return ds
    if os.path.isdir(path):  # a folder of one data file per split: train.jsonl, test_prefs.parquet, ...
        files: dict[str, str] = {}
        for n in sorted(os.listdir(path)):
            stem, ext = os.path.splitext(n)
            if ext.lower() not in DATA_EXTENSIONS:
                continue
            if stem in files:  # train.jsonl and train.parquet: which one is the split is not ours to guess
                raise ValueError(
                    f"dataset {path} holds two files for split {stem!r} ({files[stem]}, {n}): keep one, or pass "
                    "the file itself as --dataset"
                )
            files[stem] = n
        if not files:
            raise ValueError(f"dataset {path} is a folder with no saved dataset and no .json/.jsonl/.parquet files")
        return _load_dataset(os.path.join(path, files[pick_split(path, files, split)]))
    if ext != ".parquet":
        raise ValueError(
            f"dataset {path}: unsupported file type {ext!r} (use .json, .jsonl, .parquet or a saved dataset)"
        )
    try:
        return datasets.load_dataset("parquet", data_files=path, split="train")
    except Exception as e:
        raise ValueError(
            f"dataset {path} could not be read as parquet ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def _check_text(text, row, col):
    """Text a tokenizer can take: a string of valid Unicode (a lone surrogate, as a broken JSON escape leaves,
    cannot be encoded)."""
    if not isinstance(text, str):
        raise BadRowError(f"row {row}: column '{col}' holds a {type(text).__name__} where text belongs")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRowError(
            f"row {row}: column '{col}' holds a character that is not valid Unicode ({e.reason} at position {e.start})"
        ) from None
    return text


def _check_messages(messages, row, col):
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise BadRowError(f"row {row}: column '{col}' is a list but not chat messages")
    for m in messages:
        _check_text(m["content"], row, f"{col}' message '{m['role']}")
    return messages


def _as_response(value, row, col):
    """A response given as a string, or as a chat message list whose last message is the assistant's."""
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict) or "content" not in value[-1]:
            raise BadRowError(f"row {row}: column '{col}' is a list but not chat messages")
        value = _check_messages(value, row, col)[-1]["content"]
    if not isinstance(value, str):
        raise BadRowError(f"row {row}: column '{col}' must be a string or chat messages, got {type(value).__name__}")
    _check_text(value, row, col)
    if not value.strip():
        raise BadRowError(f"row {row}: column '{col}' is an empty response")
    return value


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _is_transcript(text) -> bool:
    return isinstance(text, str) and text.lstrip("\n").startswith("Human:") and "\n\nAssistant:" in text


def _hh_messages(text: str) -> list[dict]:
    """'\\n\\nHuman: ... \\n\\nAssistant: ...' -> chat messages; a trailing empty 'Assistant:' (the turn to
    answer) is dropped."""
    text = "\n\n" + text.lstrip("\n")
    parts = _HH_TURN.split(text)[1:]  # [speaker, content, speaker, content, ...]
    msgs = [
        {"role": "user" if who == "Human" else "assistant", "content": body.strip()}
        for who, body in zip(parts[::2], parts[1::2])
    ]
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    return msgs


def _from_transcripts(rec, row):
    """Anthropic HH-RLHF style rows as chat turns: prompt/chosen/rejected transcripts, or chosen and
    rejected holding the whole conversation (the shared part up to the last 'Assistant:' is the prompt)."""
    chosen, rejected, prompt = rec.get("chosen"), rec.get("rejected"), rec.get("prompt")
    if prompt is None and _is_transcript(chosen) and _is_transcript(rejected):
        cut = chosen.rfind("\n\nAssistant:") + len("\n\nAssistant:")
        head = chosen[:cut]
        if not rejected.startswith(head):
            raise BadRowError(f"row {row}: chosen and rejected transcripts differ before their last assistant turn")
        return dict(rec, prompt=_hh_messages(head), chosen=chosen[cut:].strip(), rejected=rejected[cut:].strip())
    if _is_transcript(prompt):
        return dict(
            rec,
            prompt=_hh_messages(prompt),
            **{k: rec[k].strip() for k in ("chosen", "rejected") if isinstance(rec.get(k), str)},
        )
    return rec


def _as_prompt(rec, row):
    prompt = rec.get("prompt")
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if (
        isinstance(chosen, list)
        and isinstance(rejected, list)
        and len(chosen) >= 2
        and len(rejected) >= 2
        and chosen[:-1] != rejected[:-1]
    ):
        # one prompt is trained for both: a rejected answer to another conversation would be trained as this one's
        raise BadRowError(
            f"row {row}: the chosen and rejected conversations differ before their last message "
            "(different prompts); a pair must answer one prompt"
        )
    if prompt is None and isinstance(chosen, list) and len(chosen) >= 2:
        prompt = chosen[:-1]  # UltraFeedback-binarized style: the conversation before the assistant's answer
    if prompt is None:
        raise BadRowError(f"row {row}: missing column 'prompt'")
    if isinstance(prompt, list):
        _check_messages(prompt, row, "prompt")
    elif not isinstance(prompt, str):
        raise BadRowError(f"row {row}: column 'prompt' must be a string or chat messages")
    else:
        _check_text(prompt, row, "prompt")
    return prompt


def load_pairs(
    path: str, max_pairs: int | None = None, bad_rows: str = "error", log: Log = print, split: str | None = None
) -> list[Pair]:
    """Read preference pairs; columns prompt / chosen / rejected as strings or chat message lists. split: for a
    saved DatasetDict or a folder of one file per split (default: train, or the only split)."""
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    ds = _load_dataset(os.fspath(path), split)
    if len(ds) == 0:
        raise ValueError(f"dataset {path} is empty")
    pairs: list = []
    skipped: list = []
    identical: list = []
    for row, rec in enumerate(ds):
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
        try:
            for col in ("chosen", "rejected"):
                if rec.get(col) is None:
                    raise BadRowError(f"row {row}: missing column '{col}'")
            rec = _from_transcripts(rec, row)
            pair = Pair(
                row,
                _as_prompt(rec, row),
                _as_response(rec["chosen"], row, "chosen"),
                _as_response(rec["rejected"], row, "rejected"),
            )
        except BadRowError as e:
            if bad_rows == "error":
                raise BadRowError(f"{path}: {e} (pass bad_rows='skip' / --bad-rows skip to skip such rows)") from None
            skipped.append(row)
            continue
        if pair.chosen == pair.rejected:
            identical.append(row)
            continue
        pairs.append(pair)
    if identical:
        log(
            f"[fpo] {path}: dropped {len(identical)} pairs whose chosen and rejected are identical "
            f"(rows {identical[:10]})"
        )
    if skipped:
        log(f"[fpo] {path}: skipped {len(skipped)} bad rows {skipped[:10]}")
    if not pairs:
        raise ValueError(f"dataset {path} has no usable pairs")
    return pairs


# Bounded tokenisation: a text far longer than the tokens kept from it is cut before it is tokenised (a 20 MB
# response would otherwise be tokenised whole, in gigabytes). The cut keeps CHARS_PER_TOKEN characters per kept
# token plus a margin, and is taken only when what it keeps still tokenises to TOKEN_MARGIN tokens more than are
# kept: the kept tokens then lie well away from the cut, where they are the whole text's own tokens. Otherwise (a
# text of unusually long tokens) the whole text is tokenised, as before.
CHARS_PER_TOKEN = 32
TOKEN_MARGIN = 16


def _bounded(tok, text: str, keep: int, tail: bool):
    """(text, None), or (the part of it that yields the same `keep` first (last, with tail) tokens, that part's
    token ids without special tokens) when the text is far longer than what is kept."""
    budget = (keep + TOKEN_MARGIN) * CHARS_PER_TOKEN
    if len(text) <= budget:
        return text, None
    part = text[-budget:] if tail else text[:budget]
    ids = tok(part, add_special_tokens=False)["input_ids"]
    return (part, ids) if len(ids) >= keep + TOKEN_MARGIN else (text, None)


def prompt_ids(tok: Tokenizer, prompt: Any, keep: int | None = None) -> list[int]:
    """The prompt's token ids (chat template applied when the tokenizer has one); with keep, only its last keep
    tokens are guaranteed, and a message far longer than that is cut first."""
    if keep is not None:
        if isinstance(prompt, str):
            prompt = _bounded(tok, prompt, keep, tail=True)[0]
        else:
            prompt = [dict(m, content=_bounded(tok, m["content"], keep, tail=True)[0]) for m in prompt]
    if getattr(tok, "chat_template", None):
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return tok(text, add_special_tokens=True)["input_ids"]


def _response_ids(tok, text, keep: int | None = None):
    """The response's token ids and the end-of-turn token; with keep, only the first keep are guaranteed."""
    ids = None
    if keep is not None:
        text, ids = _bounded(tok, text, keep, tail=False)  # a cut text's ids come with it: not tokenised twice
    if ids is None:
        ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        ids = ids + [tok.eos_token_id]  # the end-of-turn token is part of what the model must produce
    return ids


def _hash_ids(*seqs) -> int:
    h = hashlib.blake2b(digest_size=8)
    for s in seqs:
        h.update(torch.tensor(s, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return int.from_bytes(h.digest(), "little", signed=True)


def tokenize_pairs(
    pairs: Sequence[Pair],
    tok: Tokenizer,
    max_length: int = 512,
    max_prompt_length: int = 256,
    max_tokens: int | None = None,
    log: Log | None = None,
) -> list[TokenizedPair]:
    """Token ids of each pair under the truncation rule (module docstring). With a token budget per
    micro-batch (max_tokens), the rule runs with max_length capped at max_tokens // 2, so that every pair
    fits one micro-batch in every layout (padded included) and is never split; the pairs this cuts further
    are reported through log."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length}): "
            "otherwise a prompt could leave no room for the response"
        )
    cap = max_length if max_tokens is None else min(max_length, max_tokens // 2)
    if cap <= max_prompt_length:
        raise ValueError(f"max_tokens ({max_tokens}) must exceed 2 x max_prompt_length ({2 * max_prompt_length})")
    out, cut = [], []
    for p in pairs:
        prompt = prompt_ids(tok, p.prompt, max_prompt_length)[-max_prompt_length:]
        room = max_length - len(prompt)
        chosen = _response_ids(tok, p.chosen, room)[:room]
        rejected = _response_ids(tok, p.rejected, room)[:room]
        if len(prompt) + max(len(chosen), len(rejected)) > cap:
            cut.append(p.id)
            chosen, rejected = chosen[: cap - len(prompt)], rejected[: cap - len(prompt)]
        if not chosen or not rejected:
            raise BadRowError(f"row {p.id}: a response tokenises to nothing")
        out.append(
            TokenizedPair(p.id, tuple(prompt), tuple(chosen), tuple(rejected), _hash_ids(prompt, chosen, rejected))
        )
    if cut and log is not None:
        log(
            f"[fpo] max_tokens {max_tokens}: {len(cut)} pairs truncated to {cap} tokens per sequence so that each "
            f"fits one micro-batch (rows {cut[:10]})"
        )
    return out


def dataset_fingerprint(items: list[TokenizedPair]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.id}:{it.row_hash};".encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    h = hashlib.sha256()
    h.update(str(len(tok)).encode())
    h.update(str(getattr(tok, "chat_template", "") or "").encode())
    probe = "Hello world! The quick brown fox, 123 résumé <|im_end|>"
    h.update(str(tok(probe, add_special_tokens=True)["input_ids"]).encode())
    h.update(str((tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)).encode())
    return h.hexdigest()[:16]
