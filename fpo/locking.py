"""One process at a time per run directory and per cache: an exclusive, non-blocking lock on DIR/.fpo.lock,
held for the process's lifetime (fcntl.flock: released by the kernel when the process ends, however it ends)."""

from __future__ import annotations

import fcntl
import os

__all__ = ["DirectoryLock", "LOCK_NAME"]

LOCK_NAME = ".fpo.lock"


class DirectoryLock:
    def __init__(self, directory: str, what: str):
        """Take the lock on `directory` (a run's output_dir, a cache); `what` names it in the error."""
        path = os.path.join(directory, LOCK_NAME)
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ValueError(f"{what} {directory}: cannot create its lock file {LOCK_NAME} ({e.strerror})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise ValueError(
                f"{what} {directory} is in use by another process (pid {holder}): wait for it to finish, "
                "or choose another directory"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
