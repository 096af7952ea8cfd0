"""Where a node's memory goes, for benchmarks (issue 16): off unless asked for.

With ``FSHA_TRACEMALLOC=DIR`` in its environment a node starts :mod:`tracemalloc` (one
frame per allocation: cheap enough for a 10,000-call bench, though it slows the node and
adds its own overhead to the resident size) and, on each ``SIGUSR2``, writes the top
allocation sites by line to ``DIR/tracemalloc-PID-N.txt``. bench/memory.py uses it with
``--profile DIR``. Nothing here runs unless the variable is set.
"""

from __future__ import annotations

import os
import signal
import tracemalloc
from pathlib import Path
from types import FrameType

from twisted.logger import Logger

__all__ = ["ENV", "install", "write_snapshot"]

log = Logger(namespace="fsha.memprofile")

ENV = "FSHA_TRACEMALLOC"
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


def install() -> bool:
    """Start tracing and hook SIGUSR2 if ``FSHA_TRACEMALLOC`` names a directory."""
    where = os.environ.get(ENV)
    if not where:
        return False
    directory = Path(where)
    directory.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(1)
    count = [0]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        count[0] += 1
        try:
            path = write_snapshot(directory, count[0])
        except OSError as e:
            log.warn("tracemalloc snapshot not written: {error}", error=str(e))
            return
        log.info("tracemalloc snapshot in {path}", path=str(path))

    signal.signal(signal.SIGUSR2, on_signal)
    return True
