"""Files written whole or not at all, and their checksums: what every writer in fpo (caches, checkpoints,
metrics, summaries) and the benchmarks' result files use."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from ._types import PathLike

__all__ = ["sha256_of", "temp_file", "temp_dir", "atomic_write_text", "atomic_write_json"]


def sha256_of(path: PathLike) -> str:
    """The file's SHA-256, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


_UMASK = os.umask(0)
os.umask(_UMASK)


def temp_file(path: PathLike):
    """(fd, name) of a new empty file beside `path` under an unpredictable name (path.tmpXXXXXXXX), created
    with O_EXCL: a file or symlink planted at a guessable temporary name cannot redirect the write. Names
    holding ".tmp" are temporary everywhere in fpo (a killed run's are removed, never read)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, tmp


def temp_dir(path: PathLike):
    """A new directory beside `path` under an unpredictable name (path.tmpXXXXXXXX), as temp_file."""
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".tmp")
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


def atomic_write_text(path: PathLike, text: str) -> None:
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))
