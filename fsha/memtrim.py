"""Giving freed memory back to the system after a big drop of records.

CPython hands objects over 512 bytes (call values, pages of rows) to the C allocator,
which keeps freed memory for reuse: after a takeover's 100,000 superseded records or a
page of rows, the process's resident size would stay at its peak. glibc's
``malloc_trim(0)`` returns the free pages; it walks the whole heap (tens of ms), so it
runs on a thread, at most once per ``min_interval`` seconds. Elsewhere than glibc it does
nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

__all__ = ["MemoryTrimmer"]

log = Logger(namespace="fsha.memtrim")


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        # by name: ctypes.util.find_library would run ldconfig in a subprocess
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


class MemoryTrimmer:
    """:meth:`trim` after a big free; see the module docstring."""

    def __init__(self, reactor: IReactorTime, min_interval: float = 10.0) -> None:
        self.reactor = reactor
        self.min_interval = min_interval
        self._trim = _malloc_trim()
        self._last: float | None = None
        self._busy = False
        self.trims = 0

    def trim(self) -> None:
        if self._trim is None or self._busy or not IReactorThreads.providedBy(self.reactor):
            return
        now = self.reactor.seconds()
        if self._last is not None and now - self._last < self.min_interval:
            return
        self._last = now
        self._busy = True
        trim = self._trim
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(),  # type: ignore[attr-defined]
                              trim, 0)

        def done(_: object) -> None:
            self._busy = False
            self.trims += 1

        d.addCallback(done)
        d.addErrback(lambda f: log.failure("malloc_trim failed", f))
        d.addBoth(lambda _: setattr(self, "_busy", False))
