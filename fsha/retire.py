"""Retiring a previous master's replicated records once its slot is served elsewhere.

After a takeover the dead (or handed-over) master's ``CALL``, ``REGISTRATION`` and
``IDENTITY`` records of the slot are of no more use: the new master recovered the calls
(they keep their UUIDs) and restored the registrations into its own FreeSWITCH, and its
feeds replicate both under its own origin, so a later takeover reads them from there.
Nothing else ever removes them (their origin is gone), so without this they would stay in
every node's replicated state and in ``fsha status`` after the calls end (issue 12).

:class:`SupersededRecords` runs on every node. Every ``interval`` seconds it looks at the
cluster view (which node is ``MASTER`` of which slot, from the heartbeats; the same on
every node): once one node has been master of slot S for ``grace`` seconds in a row, the
records of S of every *other* origin are dropped: on this node's own origin by replicated
deletes (:meth:`fsha.replication.feeds.Feeds.forget_slot`, when it does not feed S), on
other origins locally (:meth:`~fsha.replication.state.ReplicatedState.drop_superseded`).
The grace covers the new master's first sweeps (its copies of the recovered calls and
restored registrations are replicated by then) and the limits' reconciliation of the dead
master's calls after the takeover; a new master that dies within it leaves the old records
to its own successor. Limit usage records (``Kind.LIMIT`` and others) are left alone.

Registrations do not wait for the grace: every pass hands the cluster view to
:meth:`~fsha.replication.state.ReplicatedState.set_owners`, and from then on each
registration the slot's master replicates supersedes the other origins' copy of it at once
(100,000 of them would otherwise sit twice on every node for the grace). Without
``[limits]`` the same holds for calls (:data:`~fsha.replication.state.
EARLY_SUPERSEDED_NO_LIMITS`): only the limits' reconciliation reads a dead master's calls
after its takeover, so without it nothing needs their second copy for the grace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from fsha.wire.stream import Kind

__all__ = ["RETIRED_KINDS", "SupersededRecords"]

log = Logger(namespace="fsha.retire")

#: What a new master replicates again itself.
RETIRED_KINDS = (Kind.CALL, Kind.REGISTRATION, Kind.IDENTITY)


class SupersededRecords(service.Service):
    """See the module docstring. ``masters()``: slot id -> node id of its ``MASTER`` now
    (the cluster view); ``forget_own(slot_id)``: delete this node's own records of a slot
    it no longer feeds (returns how many, or raises ``RuntimeError`` while it feeds it)."""

    def __init__(self, state: Any, masters: Callable[[], dict[int, int]],
                 clock: IReactorTime, *, forget_own: Callable[[int], int] | None = None,
                 interval: float = 5.0, grace: float = 60.0,
                 freed: Callable[[], object] | None = None) -> None:
        self.state = state  # fsha.replication.state.ReplicatedState
        self.masters = masters
        self.clock = clock
        self.forget_own = forget_own
        self.interval = interval
        self.grace = grace
        self._since: dict[int, tuple[int, float]] = {}  # slot -> (master, first seen)
        self._last: dict[int, float] = {}  # slot -> last pass that looked (one per grace)
        self._loop: LoopingCall | None = None
        self.dropped = 0  # records retired so far (status)
        self.freed = freed  # called after a pass that dropped many records (memory trim)
        self._superseded_seen = 0
        self._settle = 0  # quiet passes left to trim after a wave of drops

    def start(self) -> None:
        if self._loop is None:
            self._loop = LoopingCall(self.check)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False).addErrback(
                lambda f: log.failure("retiring superseded records failed", f))

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.stop()
        return defer.succeed(None)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check(self) -> int:
        """One pass; returns how many records were retired."""
        now = self.clock.seconds()
        masters = self.masters()
        # the masters' own copies supersede other origins' registrations at once
        self.state.set_owners(masters)
        for slot in [s for s in self._since if s not in masters]:
            del self._since[slot]
            self._last.pop(slot, None)
        total = 0
        for slot, master in masters.items():
            seen = self._since.get(slot)
            if seen is None or seen[0] != master:
                self._since[slot] = (master, now)
                continue
            if now - seen[1] < self.grace or now - self._last.get(slot, -self.grace) < \
                    self.grace:
                continue  # a scan of the slot's records at most once per grace
            self._last[slot] = now
            total += self._retire(slot, master)
        self.dropped += total
        superseded = getattr(self.state, "superseded", 0)
        dropped = total + superseded - self._superseded_seen
        if dropped >= 1000:
            # a wave of drops (a new master's feeds superseding 100,000 records): trimmed
            # during it, and on the two quiet passes after it (the trimmer runs at most
            # every 10 s, so one of them does), as its last trim ran before its end
            self._settle = 2
            if self.freed is not None:
                self.freed()
        elif dropped == 0 and self._settle:
            self._settle -= 1
            if self.freed is not None:
                self.freed()
        self._superseded_seen = superseded
        return total

    def _retire(self, slot: int, master: int) -> int:
        n = 0
        holders = {r.origin for kind in RETIRED_KINDS
                   for r in self.state.records(slot=slot, kind=kind)}
        holders.update(p.origin for p in self.state.positions()
                       if any(r.slot == slot and r.kind in RETIRED_KINDS
                              for r in self.state.retired(p.origin)))
        for origin in sorted(holders - {master}):
            if origin == self.state.node:
                if self.forget_own is not None:
                    try:
                        n += self.forget_own(slot)
                    except RuntimeError:
                        pass  # still fed here (a release in progress): next pass
                continue
            dropped = self.state.drop_superseded(origin, slot, RETIRED_KINDS)
            if dropped:
                log.info("slot {slot}: {n} records of node {origin} retired (node {master} "
                         "masters the slot)", slot=slot, n=dropped, origin=origin,
                         master=master)
            n += dropped
        return n

    def status(self) -> dict[str, Any]:
        return {"retired": self.dropped, "grace_s": self.grace}
