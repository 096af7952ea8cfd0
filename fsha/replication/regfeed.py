"""The registration feed: sofia's registrations of the fed slots' profiles, as
``Kind.REGISTRATION`` records (``docs/protocol/records.rst``).

``sofia::register`` puts a record (expiring when the registration does), ``unregister``
and ``expire`` delete it, and a periodic sweep of each profile's ``sip_registrations``
table (in ``<db dir>/sofia_reg_PROFILE.db``) reconciles the records with it.
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
    decode_registration,
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


class _Reg:
    """What the index keeps of a registration: the binding's hash and its expiry."""

    __slots__ = ("binding", "expires", "gen", "slot")

    def __init__(self, slot: int, row: RegistrationRow, gen: int) -> None:
        self.slot = slot
        self.binding = row.binding
        self.expires = row.expires
        self.gen = gen

    def same(self, row: RegistrationRow) -> bool:
        """The same binding, expiring within :data:`REG_EXPIRES_TOLERANCE` seconds."""
        return (self.binding == row.binding
                and abs(self.expires - row.expires) <= REG_EXPIRES_TOLERANCE)


class RegistrationFeed:
    """``Kind.REGISTRATION`` records of the fed slots (a :class:`~fsha.replication.dbjobs.
    JobSource`: the sweep). ``db`` None: from events only. ``call_sweeps()``: how many call
    sweeps ran (a missing table is looked for again every 10th)."""

    def __init__(self, slots: FedSlots, db: CoreDBReads | None, *,
                 sweep_interval: float, call_sweeps: Callable[[], int],
                 where: str) -> None:
        self.slots = slots
        self.db = db
        self.sweep_interval = sweep_interval
        self.call_sweeps = call_sweeps
        self.where = where  # the database, for the log
        self._regs: dict[str, _Reg] = {}
        self._deleted: dict[str, int] = {}  # key -> gen of an unregistration event
        self.sweep_wanted = False
        self.next_sweep = 0.0
        self.table = True
        self.sweeps = 0

    def events(self) -> list[tuple[str, object]]:
        return [(n, self.on_event) for n in REGISTRATION_EVENTS]

    # -- the index --------------------------------------------------------------------------

    def reindex(self, feed: SlotFeed, key: str, value: bytes) -> None:
        self._regs[key] = _Reg(feed.slot.slot_id, decode_registration(value), 0)
        feed.registrations += 1

    def forget_slot(self, slot_id: int) -> None:
        for key in [k for k, r in self._regs.items() if r.slot == slot_id]:
            del self._regs[key]

    def clear(self) -> None:
        self._deleted.clear()

    def _store(self, feed: SlotFeed, row: RegistrationRow, gen: int) -> None:
        key = row.key
        slot_id = feed.slot.slot_id
        entry = self._regs.get(key)
        if entry is not None and entry.slot != slot_id:
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
            self._regs[key] = _Reg(slot_id, row, gen)
            feed.registrations += 1
        else:
            entry.binding = row.binding
            entry.expires = row.expires
            entry.gen = gen

    def _drop(self, key: str) -> None:
        entry = self._regs.pop(key, None)
        if entry is None:
            return
        feed = self.slots.fed.get(entry.slot)
        if feed is not None:
            feed.registrations -= 1
        self.slots.delete(entry.slot, Kind.REGISTRATION, key)

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
        if self.sweep_wanted and self.db is not None:
            self.sweep_wanted = False
            if self.table or self.call_sweeps() % 10 == 0:
                return "registration sweep", self._sweep
        return None

    def _sweep(self) -> Deferred[None]:
        assert self.db is not None
        slots = self.slots
        start_gen = slots.gen
        self.next_sweep = slots.clock.seconds() + self.sweep_interval
        d = self.db.registrations(slots.profiles())

        def got(rows: list[RegistrationRow] | None) -> Deferred[None] | None:
            if rows is None:
                if self.table:
                    log.info("No sip_registrations table in {db}: registrations come from "
                             "events only", db=self.where)
                self.table = False
                return None
            self.table = True
            now = slots.clock.seconds()
            seen: set[str] = set()

            def apply(row: RegistrationRow) -> None:
                if row.expires and row.expires <= now:
                    return  # expired: sofia deletes it
                key = row.key
                seen.add(key)
                entry = self._regs.get(key)
                if entry is not None and (entry.gen > start_gen or entry.same(row)):
                    return
                if self._deleted.get(key, 0) > start_gen:
                    return  # unregistered after the sweep read the table
                feed = slots.feed_of_profile(row.profile_name)
                if feed is not None:
                    self._store(feed, row, entry.gen if entry is not None else 0)

            def drop(key: str) -> None:
                entry = self._regs.get(key)
                if entry is not None and entry.gen <= start_gen:
                    self._drop(key)

            def done(_: object) -> None:
                deleted = self._deleted
                for key in [k for k, g in deleted.items() if g <= start_gen]:
                    del deleted[key]
                self.sweeps += 1
                for feed in slots.fed.values():
                    feed.last_registration_sweep = now

            d = slots.sliced(rows, apply)
            d.addCallback(lambda _: slots.sliced(
                [k for k in self._regs if k not in seen], drop))
            d.addCallback(done)
            return d

        d.addCallback(got)
        return d
