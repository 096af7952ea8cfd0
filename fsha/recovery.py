"""Recovering a slot's calls in batches: which rows go into the core DB before each
``sofia profile P recover`` (pure; the effects are in :mod:`fsha.takeover`).

Why batches
-----------
A real FreeSWITCH's ``sofia profile P recover`` costs more per call the more calls it
recovers at once (measured: 5 ms a call at 200 calls, 10 ms at 1,000; see
docs/benchmarks.rst), and it runs on the ESL connection's only thread: one recover of a
5,000-call slot would hold that connection for about a minute and bring the first call back
only at its end. The recovery table takes every row whose ``runtime_uuid`` is not the
running FreeSWITCH's and rewrites the recovered ones under its own runtime, so a recover
sees only the rows written since the previous one: writing the rows ``batch`` at a time and
recovering after each write brings the first calls back after one small batch, and bounds
every FreeSWITCH command by the batch size, whatever the slot's size.

Order: one batch of each profile in turn (round robin), so every profile of the slot gets
its first calls back in the first round. The first batch of each profile is smaller
(:data:`FIRST_BATCH` rows at most): a loaded FreeSWITCH was measured at 30 ms a call, so a
first batch of 100 would bring the first call back only after 3 s. A bridged pair (two rows
of one profile whose metadata name each other) is not split on purpose: FreeSWITCH
re-bridges a pair only when both legs come back in the same recover, so rows are kept in the
order the dead master wrote them (a pair's legs are adjacent there) and a batch boundary
that would separate two rows of one call's pair is moved by one row (see
:func:`plan_batches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fsha.config import TakeoverConfig
from fsha.fsdb import RecoveryRow

__all__ = ["DEFAULT_RECOVER_BATCH", "FIRST_BATCH", "Batch", "plan_batches"]

#: Rows per ``sofia profile P recover`` (``[takeover] recover_batch``); measured fastest on
#: a real FreeSWITCH (see docs/benchmarks.rst, "Recovery batch size").
DEFAULT_RECOVER_BATCH = TakeoverConfig().recover_batch
#: Rows of the first batch of each profile at most: the first calls back fast.
FIRST_BATCH = 20


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows of one profile to write, then recover with ``sofia profile PROFILE recover``."""

    profile: str
    rows: tuple[RecoveryRow, ...]
    round: int  # 0: the first batch of its profile


def _pair_mark(row: RecoveryRow) -> bytes:
    return row.uuid.encode()


def plan_batches(rows: Sequence[RecoveryRow], profiles: Sequence[str], batch: int,
                 first: int = FIRST_BATCH) -> list[Batch]:
    """The batches to recover ``rows`` in, ``batch`` rows at most (``first`` for the first
    batch of each profile; one more to keep a bridged pair together), the first batch of
    every profile first.

    Rows of a profile not in ``profiles`` are not planned (the caller filtered them)."""
    if batch < 1 or first < 1:
        raise ValueError("batch must be at least 1")
    per_profile: dict[str, list[RecoveryRow]] = {p: [] for p in profiles}
    for row in rows:
        bucket = per_profile.get(row.profile_name)
        if bucket is not None:
            bucket.append(row)
    chunks: dict[str, list[tuple[RecoveryRow, ...]]] = {}
    for profile, mine in per_profile.items():
        out: list[tuple[RecoveryRow, ...]] = []
        i = 0
        while i < len(mine):
            end = min(i + (min(first, batch) if not out else batch), len(mine))
            if end < len(mine) and _bridged(mine[end - 1], mine[end]):
                end += 1  # keep the pair in one recover (it is re-bridged only then)
            out.append(tuple(mine[i:end]))
            i = end
        chunks[profile] = out
    plan: list[Batch] = []
    rounds = max((len(c) for c in chunks.values()), default=0)
    for r in range(rounds):
        for profile in profiles:
            mine_chunks = chunks[profile]
            if r < len(mine_chunks):
                plan.append(Batch(profile, mine_chunks[r], r))
    return plan


def _bridged(a: RecoveryRow, b: RecoveryRow) -> bool:
    """Do the two rows' metadata name each other (a bridged pair)?"""
    ma, mb = _bytes(a.metadata), _bytes(b.metadata)
    return _pair_mark(b) in ma and _pair_mark(a) in mb


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
