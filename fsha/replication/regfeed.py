"""The registration feed: sofia's registrations of the fed slots' profiles, as
``Kind.REGISTRATION`` records (``docs/protocol/records.rst``).

``sofia::register`` puts a record (expiring when the registration does), ``unregister``
and ``expire`` delete it, and a periodic sweep of each profile's ``sip_registrations``
table (in ``<db dir>/sofia_reg_PROFILE.db``), a page of rows per query, reconciles the
records with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from fsha.fsapi import RegistrationEvent, RegistrationKind, parse_event
from fsha.fsdb import (
    CoreDBReads,
    RecordValueError,
    RegistrationRow,
    encode_registration,
    registration_key,
    registration_prefix,
)
from fsha.replication.dbjobs import Job
from fsha.replication.feedslots import FedSlots, SlotFeed
from fsha.wire.esl import Event
from fsha.wire.stream import Kind

__all__ = ["REGISTRATION_EVENTS", "REG_EXPIRES_TOLERANCE", "RegistrationFeed"]

log = Logger(namespace="fsha.replication.feeds")

REGISTRATION_EVENTS: Final = tuple(k.value for k in RegistrationKind)
#: A registration's expiry read from the table and from the event may differ by this much
#: (seconds) without the sweep rewriting the record.
REG_EXPIRES_TOLERANCE: Final = 30
#: Rows per query of a sweep: what it holds at a time (rows of 1-2 KB as Python objects,
#: a fetched page and its decoded rows at once: 2,000 were 10 MB of small objects).
PAGE_SIZE: Final = 500


#: An index entry is one int: ``gen << 17 | mark << 16 | slot`` (slot ids are 16 bits on
#: the wire). 100,000 objects holding a binding hash and an expiry were 14 MB on a master;
#: whether a row changed is read from the record itself (:meth:`RegistrationFeed._same`),
#: and the sweep marks what it saw in the entry (``mark``: the sweep's parity) rather than
#: in a set of 100,000 keys of its own.
_SLOT_MASK: Final = 0xFFFF
_MARK: Final = 1 << 16
_GEN_SHIFT: Final = 17
#: where the expiry sits in a version 2 value (fsha.fsdb.codecs), and where the rest begins
_V2: Final = 2
_EXPIRES: Final = slice(1, 9)
_TEXTS: Final = 9


class RegistrationFeed:
    """``Kind.REGISTRATION`` records of the fed slots (a :class:`~fsha.replication.dbjobs.
    JobSource`: the sweep). ``db`` None: from events only. ``call_sweeps()``: how many call
    sweeps ran (a missing table is looked for again every 10th)."""

    def __init__(self, slots: FedSlots, db: CoreDBReads | None, *,
                 sweep_interval: float, call_sweeps: Callable[[], int],
                 where: str, page_size: int = PAGE_SIZE) -> None:
        self.slots = slots
        self.db = db
        self.sweep_interval = sweep_interval
        self.call_sweeps = call_sweeps
        self.where = where  # the database, for the log
        self._regs: dict[str, int] = {}  # key -> gen << 17 | mark << 16 | slot
        self._mark = 0  # what a sweep that saw an entry leaves in it (flips per sweep)
        self._marks_clean = True  # no sweep was abandoned since the last one completed
        self._small: dict[int, int] = {}  # the gen-0 entries, one int object per value
        self._deleted: dict[str, int] = {}  # key -> gen of an unregistration event
        self.page_size = max(1, page_size)
        self._sweep: _Sweep | None = None
        self.sweep_wanted = False
        self.next_sweep = 0.0
        self.table = True
        self.sweeps = 0

    def events(self) -> list[tuple[str, object]]:
        return [(n, self.on_event) for n in REGISTRATION_EVENTS]

    # -- the index --------------------------------------------------------------------------

    def _entry(self, slot_id: int, gen: int) -> int:
        entry = gen << _GEN_SHIFT | self._mark << 16 | slot_id
        return self._small.setdefault(entry, entry) if not gen else entry

    def reindex(self, feed: SlotFeed, key: str, value: bytes) -> None:
        self._regs[key] = self._entry(feed.slot.slot_id, 0)
        feed.registrations += 1

    def forget_slot(self, slot_id: int) -> None:
        for key in [k for k, e in self._regs.items() if e & _SLOT_MASK == slot_id]:
            del self._regs[key]

    def _same(self, slot_id: int, key: str, row: RegistrationRow) -> bool:
        """The record holds this row, expiring within :data:`REG_EXPIRES_TOLERANCE`."""
        stored = self.slots.own_value(slot_id, Kind.REGISTRATION, key)
        if stored is None or stored[:1] != bytes((_V2,)):
            return False
        try:
            value = encode_registration(row)
        except RecordValueError:
            return False
        return (stored[_TEXTS:] == value[_TEXTS:]
                and abs(int.from_bytes(stored[_EXPIRES], "big") - max(0, row.expires))
                <= REG_EXPIRES_TOLERANCE)

    def clear(self) -> None:
        self._deleted.clear()
        self._sweep = None

    def _start_marks(self) -> None:
        """A new sweep's mark: every entry carries the other one then (after an abandoned
        sweep some carry either: they are all set back first, once)."""
        if not self._marks_clean:
            regs, small = self._regs, self._small
            for key, entry in regs.items():
                if entry >> 16 & 1 != self._mark:
                    entry ^= _MARK
                    regs[key] = entry if entry >> _GEN_SHIFT else small.setdefault(entry,
                                                                                   entry)
        self._mark ^= 1
        self._marks_clean = False

    def _store(self, feed: SlotFeed, row: RegistrationRow, gen: int) -> None:
        key = row.key
        slot_id = feed.slot.slot_id
        entry = self._regs.get(key)
        if entry is not None and entry & _SLOT_MASK != slot_id:
            self._drop(key)
            entry = None
        try:
            value = encode_registration(row)
        except RecordValueError:
            feed.rows_rejected += 1
            return
        if not self.slots.put(feed, Kind.REGISTRATION, key, value, row.expires * 1000):
            return
        if entry is None:
            feed.registrations += 1
        self._regs[key] = self._entry(slot_id, gen)

    def _drop(self, key: str) -> None:
        entry = self._regs.pop(key, None)
        if entry is None:
            return
        slot_id = entry & _SLOT_MASK
        feed = self.slots.fed.get(slot_id)
        if feed is not None:
            feed.registrations -= 1
        self.slots.delete(slot_id, Kind.REGISTRATION, key)

    # -- events -----------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        slots = self.slots
        if not slots.fed:
            return
        reg = parse_event(event)
        if not isinstance(reg, RegistrationEvent):
            return
        feed = slots.fed_slot_of(reg.profile)
        if feed is None:
            return
        assert reg.profile is not None
        if not reg.user or not reg.host:
            slots.events_ignored += 1
            return
        if reg.kind is RegistrationKind.REGISTER and (reg.expires or 0) > 0:
            if not reg.call_id:
                slots.events_ignored += 1
                return
            h = event.headers
            stamp = h.get("Event-Date-Timestamp")
            now = int(stamp) / 1e6 if stamp and stamp.isdigit() else slots.clock.seconds()
            row = RegistrationRow(
                call_id=reg.call_id, sip_user=reg.user, sip_host=reg.host,
                presence_hosts=h.get("presence-hosts") or "", contact=reg.contact or "",
                status=h.get("status") or "", rpid=h.get("rpid") or "",
                expires=int(now) + (reg.expires or 0), user_agent=reg.user_agent or "",
                profile_name=reg.profile, network_ip=reg.network_ip or "",
                network_port=h.get("network-port") or "", sip_username=reg.username or "",
                sip_realm=reg.realm or "")
            self._store(feed, row, slots.next_gen())
            return
        # unregister, expire, or a register with expires 0 (a de-registration)
        gen = slots.next_gen()
        if reg.call_id:
            keys = [registration_key(reg.profile, reg.user, reg.host, reg.call_id)]
        else:
            prefix = registration_prefix(reg.profile, reg.user, reg.host)
            keys = [k for k in self._regs if k.startswith(prefix)]
        for key in keys:
            self._deleted[key] = gen
            self._drop(key)

    # -- the sweep --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        if now >= self.next_sweep:
            self.sweep_wanted = True

    def next_job(self, now: float) -> Job | float | None:
        if self.db is None:
            return None
        if self._sweep is None and self.sweep_wanted:
            self.sweep_wanted = False
            if self.table or self.call_sweeps() % 10 == 0:
                self._start_marks()
                self._sweep = _Sweep(self.slots, self._mark)
                self.next_sweep = now + self.sweep_interval
        if self._sweep is not None:
            return "registration sweep", self._page
        return None

    def _page(self) -> Deferred[None]:
        """One page of the sweep in progress (a DB job; lookups may run between pages)."""
        assert self.db is not None and self._sweep is not None
        sw = self._sweep
        slots = self.slots
        d = self.db.registration_page(sw.profiles[sw.index], sw.after, self.page_size)

        def apply(row: RegistrationRow) -> None:
            if row.expires and row.expires <= sw.now:
                return  # expired: sofia deletes it
            key = row.key
            entry = self._regs.get(key)
            if entry is not None:
                if entry >> 16 & 1 != sw.mark:  # seen by this sweep
                    entry ^= _MARK
                    self._regs[key] = (entry if entry >> _GEN_SHIFT
                                       else self._small.setdefault(entry, entry))
                if entry >> _GEN_SHIFT > sw.start_gen or self._same(
                        entry & _SLOT_MASK, key, row):
                    return
            if self._deleted.get(key, 0) > sw.start_gen:
                return  # unregistered after the sweep read the table
            feed = slots.feed_of_profile(row.profile_name)
            if feed is not None:
                self._store(feed, row, entry >> _GEN_SHIFT if entry is not None else 0)

        def got(page: tuple[list[RegistrationRow], int] | None) -> Deferred[None] | None:
            if self._sweep is not sw:
                return None  # abandoned (no slot fed any more)
            if page is None:
                sw.next_profile()
            else:
                sw.found = True
                rows, last = page
                sw.now = slots.clock.seconds()
                if len(rows) < self.page_size:
                    sw.next_profile()
                else:
                    sw.after = last
                if rows:
                    d = slots.sliced(rows, apply)
                    d.addCallback(lambda _: self._finish_if_done(sw))
                    return d
            return self._finish_if_done(sw)

        def failed(failure: object) -> object:
            if self._sweep is sw:
                self._sweep = None  # tried again at the next tick, not at once
            return failure

        d.addCallbacks(got, failed)
        return d

    def _finish_if_done(self, sw: _Sweep) -> Deferred[None] | None:
        if self._sweep is not sw or sw.index < len(sw.profiles):
            return None
        slots = self.slots
        if not sw.found:
            self._sweep = None
            if self.table:
                log.info("No sip_registrations table in {db}: registrations come from "
                         "events only", db=self.where)
            self.table = False
            return None
        self.table = True

        def drop(key: str) -> None:
            entry = self._regs.get(key)
            if entry is not None and entry >> _GEN_SHIFT <= sw.start_gen \
                    and entry >> 16 & 1 != sw.mark:
                self._drop(key)

        def done(_: object) -> None:
            if self._sweep is sw:
                self._sweep = None
                self._marks_clean = True
            deleted = self._deleted
            for key in [k for k, g in deleted.items() if g <= sw.start_gen]:
                del deleted[key]
            self.sweeps += 1
            for feed in slots.fed.values():
                feed.last_registration_sweep = sw.now

        unseen = [k for k, e in self._regs.items()
                  if e >> 16 & 1 != sw.mark and e & _SLOT_MASK in sw.slot_ids]
        d = slots.sliced(unseen, drop)
        d.addCallback(done)
        return d


class _Sweep:
    """A registration sweep in progress: which profile, from which rowid, what it saw."""

    __slots__ = ("after", "found", "index", "mark", "now", "profiles", "slot_ids",
                 "start_gen")

    def __init__(self, slots: FedSlots, mark: int) -> None:
        self.mark = mark  # what the entries seen (or written) during this sweep carry
        self.profiles = slots.profiles()
        self.slot_ids = set(slots.fed)
        self.start_gen = slots.gen
        self.index = 0
        self.after = 0
        self.found = False
        self.now = slots.clock.seconds()

    def next_profile(self) -> None:
        self.index += 1
        self.after = 0
