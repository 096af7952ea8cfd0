"""Where a node's memory goes, for benchmarks (issue 16): off unless asked for.

With ``FSHA_TRACEMALLOC=DIR`` in its environment a node starts :mod:`tracemalloc` (one
frame per allocation: cheap enough for a 10,000-call bench, though it slows the node and
adds its own overhead to the resident size) and, on each ``SIGUSR2``, writes the top
allocation sites by line to ``DIR/tracemalloc-PID-N.txt``. bench/memory.py uses it with
``--profile DIR``. With ``FSHA_MEMSTATS=DIR`` instead, nothing is traced (so the resident
size is the real one) and each ``SIGUSR2`` writes the allocators' own statistics into the
same file name: CPython's (``sys._debugmallocstats``: arenas, pools, free blocks per size
class) and glibc's (``malloc_stats``: heap in use, per arena), which tell memory held in
live objects from memory kept free by an allocator (bench/memory.py ``--allocator-stats``).
Nothing here runs unless one of the variables is set.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

from twisted.logger import Logger

__all__ = ["ENV", "STATS_ENV", "install", "write_allocator_stats", "write_snapshot"]

log = Logger(namespace="fsha.memprofile")

ENV = "FSHA_TRACEMALLOC"
STATS_ENV = "FSHA_MEMSTATS"
TOP = 60  # lines per report


def write_snapshot(directory: Path, n: int) -> Path:
    """The top allocation sites now, by line and by file, into ``directory``."""
    snap = tracemalloc.take_snapshot().filter_traces(
        (tracemalloc.Filter(False, tracemalloc.__file__),))
    out = directory / f"tracemalloc-{os.getpid()}-{n}.txt"
    lines = []
    stats = snap.statistics("lineno")
    total = sum(s.size for s in stats)
    lines.append(f"total {total / 1048576:.1f} MiB in {sum(s.count for s in stats)} blocks")
    lines.extend(f"{s.size / 1048576:8.2f} MiB {s.count:9d} {s.traceback}"
                 for s in stats[:TOP])
    lines.append("-- by file")
    lines.extend(f"{s.size / 1048576:8.2f} MiB {s.count:9d} {s.traceback}"
                 for s in snap.statistics("filename")[:TOP // 2])
    part = out.with_suffix(".part")
    part.write_text("\n".join(lines) + "\n")
    part.rename(out)  # whole, for whoever waits for it
    return out


def write_allocator_stats(directory: Path, n: int) -> Path:
    """CPython's and glibc's allocator statistics now (both print to the C ``stderr``,
    which points at the file meanwhile), into ``directory``."""
    out = directory / f"tracemalloc-{os.getpid()}-{n}.txt"
    part = out.with_suffix(".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    saved = os.dup(2)
    try:
        sys.stderr.flush()
        os.dup2(fd, 2)
        sys._debugmallocstats()
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.malloc_stats()
            libc.fflush(None)
        except (OSError, AttributeError):
            os.write(2, b"(no glibc malloc_stats here)\n")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    part.rename(out)  # whole, for whoever waits for it
    return out


def install() -> bool:
    """Hook SIGUSR2 if ``FSHA_TRACEMALLOC`` (and start tracing) or ``FSHA_MEMSTATS`` names
    a directory."""
    traced = os.environ.get(ENV)
    where = traced or os.environ.get(STATS_ENV)
    if not where:
        return False
    directory = Path(where)
    directory.mkdir(parents=True, exist_ok=True)
    if traced:
        tracemalloc.start(1)
    write = write_snapshot if traced else write_allocator_stats
    count = [0]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        count[0] += 1
        try:
            path = write(directory, count[0])
        except OSError as e:
            log.warn("memory profile not written: {error}", error=str(e))
            return
        log.info("memory profile in {path}", path=str(path))

    signal.signal(signal.SIGUSR2, on_signal)
    return True
