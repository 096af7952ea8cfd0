"""Dropped datagrams over a recent window, by reason and source address (pure, explicit
``now``): what ``fsha status --all`` shows, so an alert tells who sends them and whether
they still come, not a count since start."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

BUCKET = 10.0  # seconds per bucket
WINDOW = 300.0  # seconds kept
SOURCES = 64  # distinct (reason, source) pairs kept per bucket; the rest counted as "other"


class DropWindow:
    def __init__(self, bucket: float = BUCKET, window: float = WINDOW) -> None:
        self.bucket = bucket
        self.window = window
        self._buckets: deque[tuple[float, Counter[tuple[str, str]]]] = deque()

    def add(self, reason: str, source: str, now: float) -> None:
        start = now - now % self.bucket
        if not self._buckets or self._buckets[-1][0] != start:
            self._buckets.append((start, Counter()))
            while self._buckets and self._buckets[0][0] <= now - self.window - self.bucket:
                self._buckets.popleft()
        counts = self._buckets[-1][1]
        key = (reason, source)
        if key not in counts and len(counts) >= SOURCES:
            key = (reason, "other")
        counts[key] += 1

    def recent(self, now: float) -> dict[str, Any]:
        """``{"window_s": W, "by_reason": {reason: {source: n}}}`` over the last W s."""
        total: Counter[tuple[str, str]] = Counter()
        for start, counts in self._buckets:
            if start > now - self.window - self.bucket:
                total.update(counts)
        by_reason: dict[str, dict[str, int]] = {}
        for (reason, source), n in sorted(total.items()):
            by_reason.setdefault(reason, {})[source] = n
        return {"window_s": self.window, "by_reason": by_reason}
