"""The call feed: the ``recovery`` rows of the fed slots' profiles, as ``Kind.CALL`` records.

Channel events trigger lookups of a call's row (retried while FreeSWITCH has not written
it yet), hangups delete the record at once (with a tombstone), and a periodic sweep
reconciles the table with the records. The behaviour is specified in
``docs/protocol/records.rst`` (the call feed); the value format is :mod:`fsha.fsdb.codecs`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from fsha.fsdb import (
    LOOKUP_BATCH,
    CallRow,
    CallSummary,
    CoreDBReads,
    decode_call_row,
    encode_call_row,
    summary_of,
)
from fsha.replication.dbjobs import DBJobs, Job
from fsha.replication.feedslots import FedSlots, FeedsESL, SlotFeed, exact
from fsha.wire.esl import Event
from fsha.wire.stream import Kind

__all__ = [
    "ACK_POLL",
    "ACK_WAIT",
    "ANSWER_EVENTS",
    "ANSWER_FOLLOW_UP",
    "HANGUP_EVENTS",
    "RETRY_DELAYS",
    "UPDATE_EVENTS",
    "CallFeed",
    "awaits_ack",
]

#: Events after which a call's recovery row is (re)read: the row appears on answer.
ANSWER_EVENTS: Final = ("CHANNEL_ANSWER",)
#: Events after which the row's metadata changes (FreeSWITCH updates it asynchronously).
UPDATE_EVENTS: Final = ("CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE", "CALL_UPDATE", "CHANNEL_HOLD",
                        "CHANNEL_UNHOLD")
#: Events after which the row is gone (FreeSWITCH deletes it at hangup).
HANGUP_EVENTS: Final = ("CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY")
#: Delays (seconds) between lookups of a row that is not there (yet). Sum: 0.785 s.
RETRY_DELAYS: Final = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
#: After an answered call's row is found, it is read again from this long after (then on
#: the RETRY_DELAYS schedule until it changes): FreeSWITCH rewrites it when the ACK is in.
ANSWER_FOLLOW_UP: Final = 0.05
#: A row that still waits for the caller's ACK (its INVITE's From tag is there, the dialog's
#: To tag is not) is read every ACK_POLL seconds after the RETRY_DELAYS schedule, for at most
#: ACK_WAIT seconds after the answer: SIP gives up on a missing ACK after 64*T1 = 32 s, and
#: on a loaded host the ACK is written well after the schedule's 0.8 s.
ACK_POLL: Final = 0.5
ACK_WAIT: Final = 32.0
#: Full rows per query of a sweep (a row's metadata is 3-8 KB).
FETCH_PAGE: Final = 500


class _Call:
    __slots__ = ("gen", "slot", "summary")

    def __init__(self, slot: int, summary: CallSummary, gen: int) -> None:
        self.slot = slot
        self.summary = summary
        self.gen = gen


class _Fetch:
    """The full rows a sweep reads, a page per job."""

    __slots__ = ("pos", "start_gen", "uuids")

    def __init__(self, uuids: list[str], start_gen: int) -> None:
        self.uuids = uuids
        self.pos = 0
        self.start_gen = start_gen


def awaits_ack(metadata: bytes) -> bool:
    """True for a sofia row written at the answer, before the caller's ACK: mod_sofia sets
    ``sip_from_tag`` from the INVITE and ``sip_to_tag`` only when the ACK is in (then it
    rewrites the row). Recovered from such a row, the re-INVITE's dialog is unknown to the
    caller (its BYE then gets 481)."""
    return b"<sip_from_tag>" in metadata and b"<sip_to_tag>" not in metadata


class _Lookup:
    __slots__ = ("attempt", "baseline", "due", "followed", "since")

    def __init__(self, due: float, baseline: bytes | None) -> None:
        self.attempt = 0
        self.due = due
        self.baseline = baseline  # the value before an update event; None: any row will do
        self.followed = False  # the answer's row was found: this looks for its rewrite
        self.since = due  # when the follow began (bounds the wait for the ACK)


class CallFeed:
    """``Kind.CALL`` records of the fed slots (a :class:`~fsha.replication.dbjobs.
    JobSource`: lookups first, then a sweep)."""

    def __init__(self, slots: FedSlots, esl: FeedsESL, db: CoreDBReads, jobs: DBJobs, *,
                 retry_delays: Sequence[float], tombstone_ttl: float,
                 deep_sweep_every: int) -> None:
        self.slots = slots
        self.esl = esl
        self.db = db
        self.jobs = jobs
        self.retry_delays = tuple(retry_delays)
        self.tombstone_ttl = tombstone_ttl
        self.deep_sweep_every = deep_sweep_every
        self._calls: dict[str, _Call] = {}
        self._pending: dict[str, _Lookup] = {}
        self._gone: dict[str, float] = {}  # hung up: uuid -> when (insertion order)
        self._rejected: dict[str, CallSummary] = {}  # rows that cannot be replicated
        self._fetch: _Fetch | None = None  # the full rows a sweep still has to read
        self.sweep_wanted = False
        self.sweeps_done = 0
        # counters (status)
        self.lookups = 0
        self.lookup_misses = 0
        self.rows_ignored = 0
        self.ignored_profiles: tuple[str, ...] = ()
        self.sweeps = 0

    def events(self) -> list[tuple[str, object]]:
        return ([(n, self.on_answer) for n in ANSWER_EVENTS]
                + [(n, self.on_update) for n in UPDATE_EVENTS]
                + [(n, self.on_hangup) for n in HANGUP_EVENTS])

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- the index --------------------------------------------------------------------------

    def reindex(self, feed: SlotFeed, key: str, value: bytes) -> None:
        """A record of this origin found when the slot is fed again."""
        self._calls[key] = _Call(feed.slot.slot_id, summary_of(decode_call_row(value)), 0)
        feed.calls += 1

    def forget_slot(self, slot_id: int) -> None:
        for uuid in [u for u, c in self._calls.items() if c.slot == slot_id]:
            del self._calls[uuid]

    def clear(self) -> None:
        """No slot is fed any more."""
        self._fetch = None
        self._pending.clear()
        self._gone.clear()
        self._rejected.clear()

    def _store(self, feed: SlotFeed, row: CallRow, value: bytes, gen: int) -> None:
        uuid = row.uuid
        slot_id = feed.slot.slot_id
        entry = self._calls.get(uuid)
        if entry is not None and entry.slot != slot_id:
            self._drop(uuid)
            entry = None
        if self.slots.own_value(slot_id, Kind.CALL, uuid) == value:
            if entry is None:
                self._calls[uuid] = _Call(slot_id, summary_of(row), gen)
                feed.calls += 1
            else:
                entry.gen = gen
            return
        if not self.slots.put(feed, Kind.CALL, uuid, value):
            self._rejected[uuid] = summary_of(row)  # not retried until the row changes
            return
        self._rejected.pop(uuid, None)
        if entry is None:
            self._calls[uuid] = _Call(slot_id, summary_of(row), gen)
            feed.calls += 1
        else:
            entry.summary = summary_of(row)
            entry.gen = gen

    def _drop(self, uuid: str) -> None:
        entry = self._calls.pop(uuid, None)
        if entry is None:
            return
        feed = self.slots.fed.get(entry.slot)
        if feed is not None:
            feed.calls -= 1
        self.slots.delete(entry.slot, Kind.CALL, uuid)

    # -- channel events (hot path: a few dict operations per event) ----------------------------

    def on_answer(self, event: Event) -> None:
        if self.slots.fed:
            uuid = exact(event.headers, "Unique-ID")
            if uuid:
                self._gone.pop(uuid, None)  # answered (again, e.g. recovered): alive
                self._want(event, uuid, False)

    def on_update(self, event: Event) -> None:
        if not self.slots.fed:
            return
        h = event.headers
        uuid = exact(h, "Unique-ID")
        if uuid:
            self._want(event, uuid, True)
        if event.name in ("CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE"):
            for name in ("Bridge-A-Unique-ID", "Bridge-B-Unique-ID", "Other-Leg-Unique-ID"):
                other = exact(h, name, False)
                if other and other != uuid:
                    self._want(None, other, True)

    def _want(self, event: Event | None, uuid: str, update: bool) -> None:
        if uuid in self._gone:
            return
        if event is not None:
            # only a filter (the row decides), so an exact-case miss costs nothing more
            profile = exact(event.headers, "variable_recovery_profile_name", False)
            if profile is not None and self.slots.fed_slot_of(profile) is None:
                return
        baseline: bytes | None = None
        if update:
            entry = self._calls.get(uuid)
            if entry is not None:
                baseline = self.slots.own_value(entry.slot, Kind.CALL, uuid)
        pending = self._pending.get(uuid)
        now = self.slots.clock.seconds()
        if pending is None:
            self._pending[uuid] = _Lookup(now, baseline)
        else:
            pending.attempt = 0
            pending.due = now
            if baseline is not None:
                pending.baseline = baseline
        self.jobs.kick()

    def on_hangup(self, event: Event) -> None:
        if not self.slots.fed:
            return
        uuid = exact(event.headers, "Unique-ID")
        if not uuid:
            return
        self._pending.pop(uuid, None)
        self._rejected.pop(uuid, None)
        gone = self._gone
        gone.pop(uuid, None)
        gone[uuid] = self.slots.clock.seconds()
        if uuid in self._calls:
            self._drop(uuid)

    def prune_tombstones(self, now: float) -> None:
        cutoff = now - self.tombstone_ttl
        gone = self._gone
        while gone:
            uuid, when = next(iter(gone.items()))
            if when > cutoff:
                break
            del gone[uuid]

    # -- jobs -------------------------------------------------------------------------------

    def next_job(self, now: float) -> Job | float | None:
        due: list[str] = []
        soonest: float | None = None
        for uuid, p in self._pending.items():
            if p.due <= now:
                due.append(uuid)
                if len(due) >= LOOKUP_BATCH:
                    break
            elif soonest is None or p.due < soonest:
                soonest = p.due
        if due:
            return "lookup", lambda: self._lookup(due)
        if self._fetch is not None:
            return "sweep", self._fetch_page
        if self.sweep_wanted:
            self.sweep_wanted = False
            return "sweep", self._sweep
        return soonest

    # -- lookups ----------------------------------------------------------------------------

    def _lookup(self, uuids: list[str]) -> Deferred[None]:
        self.lookups += 1
        batch = {u: self._pending[u] for u in uuids}
        d = self.db.recovery_rows(uuids)
        d.addCallbacks(self._looked_up, self._lookup_failed, callbackArgs=(batch,),
                       errbackArgs=(batch,))
        return d

    def _lookup_failed(self, failure: Failure, batch: dict[str, _Lookup]) -> Failure:
        """A failed query counts as an attempt of each lookup (no hot retry loop)."""
        now = self.slots.clock.seconds()
        for uuid, lookup in batch.items():
            if self._pending.get(uuid) is lookup:
                lookup.attempt += 1
                if lookup.attempt >= len(self.retry_delays):
                    del self._pending[uuid]
                else:
                    lookup.due = now + self.retry_delays[lookup.attempt]
        return failure

    def _looked_up(self, rows: list[CallRow], batch: dict[str, _Lookup]) -> None:
        found = self._prefer_current(rows)
        now = self.slots.clock.seconds()
        for uuid, lookup in batch.items():
            if self._pending.get(uuid) is not lookup:
                continue  # hung up, or a newer event re-armed it (that lookup runs next)
            row = found.get(uuid)
            if row is not None:
                slot = self.slots.profile_slot.get(row.profile_name)
                if slot is None:
                    self.slots.events_ignored += 1
                    del self._pending[uuid]
                    continue
                feed = self.slots.fed.get(slot.slot_id)
                if feed is None:
                    del self._pending[uuid]  # a slot this node does not master
                    continue
                value = encode_call_row(row)
                if lookup.baseline is None or value != lookup.baseline:
                    del self._pending[uuid]
                    self._store(feed, row, value, self.slots.next_gen())
                    if not lookup.followed and lookup.baseline is None:
                        # FreeSWITCH rewrites the row once the caller's ACK is in (the
                        # dialog's tags, sip_to_tag...), with no event: look again soon,
                        # or a master dying now leaves a row whose re-INVITE the caller
                        # cannot match (its BYE then gets 481)
                        follow = _Lookup(now + ANSWER_FOLLOW_UP, value)
                        follow.followed = True
                        follow.since = now
                        self._pending[uuid] = follow
                    elif lookup.followed and awaits_ack(row.metadata):
                        follow = _Lookup(now + ACK_POLL, value)  # changed, still no ACK
                        follow.followed = True
                        follow.since = lookup.since
                        follow.attempt = len(self.retry_delays)
                        self._pending[uuid] = follow
                    continue
            lookup.attempt += 1
            if lookup.attempt >= len(self.retry_delays):
                if (row is not None and lookup.followed and awaits_ack(row.metadata)
                        and now - lookup.since < ACK_WAIT):
                    lookup.due = now + ACK_POLL
                    continue
                del self._pending[uuid]
                if row is None:
                    self.lookup_misses += 1
                continue
            lookup.due = now + self.retry_delays[lookup.attempt]

    def _prefer_current(self, rows: Iterable[CallRow]) -> dict[str, CallRow]:
        """One row per uuid: the current runtime's if there are several."""
        found: dict[str, CallRow] = {}
        mine = self.esl.core_uuid
        for row in rows:
            if row.uuid in found and found[row.uuid].runtime_uuid == mine:
                continue
            found[row.uuid] = row
        return found

    # -- the sweep --------------------------------------------------------------------------

    def _sweep(self) -> Deferred[None]:
        """Read every row's small columns; what must be fetched in full is fetched by
        later jobs, :data:`FETCH_PAGE` rows each (a master never holds 10,000 CDRs at
        once, and lookups run between pages)."""
        start_gen = self.slots.gen
        self.sweeps_done += 1
        deep = self.sweeps_done % self.deep_sweep_every == 0
        d = self.db.recovery_summaries()

        def summarised(summaries: list[CallSummary]) -> None:
            fetch, seen = self._reconcile(summaries, start_gen)
            self._fetch = _Fetch(list(seen) if deep else fetch, start_gen)
            if not self._fetch.uuids:
                self._swept()

        d.addCallback(summarised)
        return d

    def _fetch_page(self) -> Deferred[None]:
        f = self._fetch
        assert f is not None
        chunk = f.uuids[f.pos:f.pos + FETCH_PAGE]
        f.pos += len(chunk)
        d = self.db.recovery_rows(chunk)
        start_gen = f.start_gen

        def fetched(rows: list[CallRow]) -> Deferred[None]:
            found = self._prefer_current(rows)

            def apply(row: CallRow) -> None:
                uuid = row.uuid
                if uuid in self._gone or self._rejected.get(uuid) == summary_of(row):
                    return
                entry = self._calls.get(uuid)
                if entry is not None and entry.gen > start_gen:
                    return  # an event wrote it after the sweep began
                feed = self.slots.feed_of_profile(row.profile_name)
                if feed is not None:
                    self._store(feed, row, encode_call_row(row),
                                entry.gen if entry is not None else 0)
            return self.slots.sliced(list(found.values()), apply)

        def done(_: object) -> None:
            if self._fetch is f and f.pos >= len(f.uuids):
                self._swept()

        def failed(failure: Failure) -> Failure:
            if self._fetch is f:
                self._fetch = None  # the next sweep starts over
            return failure

        d.addCallback(fetched)
        d.addCallbacks(done, failed)
        return d

    def _swept(self) -> None:
        self._fetch = None
        now = self.slots.clock.seconds()
        self.sweeps += 1
        for feed in self.slots.fed.values():
            feed.last_sweep = now

    def _reconcile(self, summaries: list[CallSummary], start_gen: int
                   ) -> tuple[list[str], dict[str, CallSummary]]:
        """Delete records whose row is gone; return the uuids to fetch in full, and every
        fed row's summary."""
        seen: dict[str, CallSummary] = {}
        mine = self.esl.core_uuid
        ignored = 0
        ignored_profiles: set[str] = set()
        fetch: list[str] = []
        for s in summaries:
            slot = self.slots.profile_slot.get(s.profile_name)
            if slot is None:
                ignored += 1
                ignored_profiles.add(s.profile_name)
                continue
            if slot.slot_id not in self.slots.fed:
                continue
            if s.uuid in seen and seen[s.uuid].runtime_uuid == mine:
                continue
            seen[s.uuid] = s
        self.rows_ignored = ignored
        self.ignored_profiles = tuple(sorted(ignored_profiles))
        for uuid, entry in list(self._calls.items()):
            if uuid not in seen and entry.gen <= start_gen:
                self._drop(uuid)
        for uuid in [u for u in self._rejected if u not in seen]:
            del self._rejected[uuid]
        for uuid, s in seen.items():
            if uuid in self._gone or self._rejected.get(uuid) == s:
                continue
            entry = self._calls.get(uuid)
            if entry is None or (entry.summary != s and entry.gen <= start_gen):
                fetch.append(uuid)
        return fetch, seen
