"""Progress for long work: a tqdm bar on a terminal; plain lines, about every tenth of the way, when
stdout is a file or a pipe (a log never fills with carriage-return bars)."""

from __future__ import annotations

import sys
import time

__all__ = ["progress_bar"]


class _Lines:
    """The part of tqdm's interface fpo uses, printed as whole lines."""

    def __init__(self, total, initial=0, desc="", unit="it", stream=None):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.stream = stream or sys.stdout
        self.postfix = ""
        self.t0 = time.time()
        self._next = initial + max(1, total // 10)

    def update(self, n=1):
        self.n += n
        if self.n >= self._next or self.n >= self.total:
            self._next = self.n + max(1, self.total // 10)
            rate = (self.n) / max(time.time() - self.t0, 1e-9)
            print(
                f"{self.desc}: {self.n}/{self.total} {self.unit}s ({rate:.2f} {self.unit}/s){self.postfix}",
                file=self.stream,
                flush=True,
            )

    def set_postfix(self, **kw):
        self.postfix = " " + ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self):
        pass


def progress_bar(total: int, initial: int = 0, desc: str = "", unit: str = "it"):
    """tqdm on a terminal, plain lines otherwise."""
    if sys.stdout.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit)
    return _Lines(total, initial, desc, unit)
