"""What a master replicates, read from its own FreeSWITCH: calls, registrations, identity.

:class:`Feeds` runs on every node; the node calls :meth:`Feeds.start_slot` when it becomes
master of a slot and :meth:`Feeds.stop_slot` when it releases it. For every fed slot it
writes records of this node's origin into the replicated state and hands each change to
``publish`` (the replication links). It puts together one part per job:

- :mod:`~fsha.replication.feedslots`: the fed slots and writing their records;
- :mod:`~fsha.replication.dbjobs`: the database worker (one query at a time, deadlines);
- :mod:`~fsha.replication.callfeed`: ``Kind.CALL``, the ``recovery`` rows;
- :mod:`~fsha.replication.regfeed`: ``Kind.REGISTRATION``, sofia's registrations;
- :mod:`~fsha.replication.identity`: ``Kind.IDENTITY``, the FreeSWITCH runtime.

What each record holds, when it is written and deleted, and the value formats are in
``docs/protocol/records.rst``; the rows and their codecs in :mod:`fsha.fsdb`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.logger import Logger

from fsha.config import ClusterConfig, NodeConfig, SlotConfig
from fsha.eslclient import ConnectionState
from fsha.fsdb import CoreDBReader, CoreDBReads, RecordValueError, ThreadRunner
from fsha.replication.callfeed import RETRY_DELAYS, CallFeed
from fsha.replication.dbjobs import DBJobs
from fsha.replication.feedslots import FedSlots, FeedsESL, SlotFeed
from fsha.replication.identity import IdentityRefresh, decode_identity
from fsha.replication.regfeed import RegistrationFeed
from fsha.replication.state import ReplicatedState
from fsha.replication.stats import FeedSlotStats, FeedsStats
from fsha.wire.esl import Event
from fsha.wire.heartbeat import Role
from fsha.wire.stream import Change, Kind

__all__ = ["Feeds"]

log = Logger(namespace="fsha.replication.feeds")


class Feeds(service.Service):
    """Turns this node's FreeSWITCH into replicated records for the slots it masters.

    ``esl`` is the node's :class:`fsha.eslclient.ESLClient`; ``state`` the node's replicated
    state (records are written to its own origin); ``me`` this node's config (its
    ``core_db`` is the SQLite core DB; None disables the call feed and the registration
    sweep). ``clock`` must also provide ``IReactorFromThreads`` unless ``db`` is given.
    ``publish`` receives every change written (the replication links send it to peers).
    """

    def __init__(self, esl: FeedsESL, state: ReplicatedState, config: ClusterConfig,
                 me: NodeConfig, clock: IReactorTime, *, db: CoreDBReads | None = None,
                 publish: Callable[[Change], object] | None = None,
                 sweep_interval: float = 3.0, deep_sweep_every: int = 10,
                 registration_sweep_interval: float = 30.0, query_timeout: float = 5.0,
                 busy_timeout: float = 1.0, api_timeout: float = 5.0,
                 retry_delays: Sequence[float] = RETRY_DELAYS,
                 tombstone_ttl: float = 60.0, apply_slice: int = 500) -> None:
        if not retry_delays:
            raise ValueError("retry_delays must not be empty")
        if sweep_interval <= 0 or registration_sweep_interval <= 0 or deep_sweep_every < 1:
            raise ValueError("sweep intervals must be positive")
        self.esl = esl
        self.state = state
        self.config = config
        self.me = me
        self.clock = clock
        self.sweep_interval = sweep_interval
        self._runner: ThreadRunner | None = None
        if db is None and me.core_db is not None:
            if not IReactorFromThreads.providedBy(clock):
                raise ValueError("clock must be a reactor (IReactorFromThreads) to read the "
                                 "core DB in a thread; or pass db=")
            self._runner = ThreadRunner(clock, name="fsha-feeds-coredb")  # type: ignore[arg-type]
            db = CoreDBReader(me.core_db, self._runner, busy_timeout,
                              registration_db=me.registration_db_for
                              if me.registration_db is not None else None)
        self.db = db
        self.slots = FedSlots(state, config, clock, publish, apply_slice)
        self.jobs: DBJobs | None = None
        self.calls: CallFeed | None = None
        if db is not None:
            self.jobs = DBJobs(db, self.slots, clock, query_timeout)
            self.calls = CallFeed(self.slots, esl, db, self.jobs, retry_delays=retry_delays,
                                  tombstone_ttl=tombstone_ttl,
                                  deep_sweep_every=deep_sweep_every)
        self.registrations = RegistrationFeed(
            self.slots, db, sweep_interval=registration_sweep_interval,
            call_sweeps=lambda: self.calls.sweeps_done if self.calls is not None else 0,
            where=str(me.registration_db or me.core_db))
        if self.jobs is not None:
            self.jobs.sources = (self.calls, self.registrations)  # type: ignore[assignment]
        self.identity = IdentityRefresh(self.slots, esl, me.name, api_timeout)
        self._tick_timer: IDelayedCall | None = None
        self._listeners: list[tuple[Callable[[Event], object], str]] = []

    @property
    def _running(self) -> bool:
        return self.slots.running

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Listen to the ESL events; nothing is fed until :meth:`start_slot`."""
        if self.slots.running:
            return
        self.slots.running = True
        events = list(self.registrations.events())
        if self.calls is not None:
            events = self.calls.events() + events
        for name, callback in events:
            self.esl.add_event_listener(callback, name)  # type: ignore[arg-type]
            self._listeners.append((callback, name))  # type: ignore[arg-type]
        self.esl.add_state_listener(self._esl_state)
        self.esl.add_restart_listener(self._fs_restarted)
        d = self.esl.subscribe(*[name for _, name in self._listeners])
        d.addErrback(self.slots.failed, "subscribing to the feed events")

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.stop()

    def role_changed(self, old: Role, new: Role, slot: SlotConfig | None) -> None:
        """A node role listener: feed the slots this node masters."""
        if slot is None:
            return
        if new is Role.MASTER:
            self.start_slot(slot)
        elif old is Role.MASTER:
            self.stop_slot(slot)  # its records stay: the successor needs them

    def stop(self) -> Deferred[None]:
        """Stop feeding every slot and listening; fires when no query is running."""
        if not self.slots.running:
            return defer.succeed(None)
        self.slots.running = False
        for callback, name in self._listeners:
            self.esl.remove_event_listener(callback, name)
        self._listeners = []
        for slot_id in list(self.slots.fed):
            self.stop_slot(slot_id)
        self._cancel_tick()
        if self.calls is not None:
            self.calls.clear()
        if self.jobs is None:
            return defer.succeed(None)
        self.jobs.cancel_wake()
        d = self.jobs.when_idle()
        d.addTimeout(self.jobs.query_timeout, self.clock)
        d.addErrback(lambda f: f.trap(defer.TimeoutError))

        def finish(_: object) -> None:
            if self.db is not None:
                self.db.close()
            if self._runner is not None:
                self._runner.stop()
        d.addCallback(finish)
        d.addErrback(self.slots.failed, "stopping the feeds")
        return d

    def _cancel_tick(self) -> None:
        timer, self._tick_timer = self._tick_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _kick(self) -> None:
        if self.jobs is not None:
            self.jobs.kick()

    # -- which slots ------------------------------------------------------------------------

    def _slot(self, slot: SlotConfig | int | str) -> SlotConfig:
        if isinstance(slot, SlotConfig):
            return slot
        for s in self.config.slots:
            if s.slot_id == slot or s.name == slot:
                return s
        raise KeyError(f"no slot {slot!r}")

    def config_changed(self, config: ClusterConfig) -> None:
        """An online change of the slots' profiles (fsha config push): events of an added
        profile are fed from now on, those of a removed one no longer."""
        self.config = config
        self.slots.profile_slot = {p: s for s in config.slots for p in s.profiles}
        for feed in self.slots.fed.values():
            feed.slot = config.slots[feed.slot.slot_id]

    @property
    def fed_slots(self) -> list[str]:
        return [f.slot.name for f in self.slots.fed.values()]

    def start_slot(self, slot: SlotConfig | int | str) -> None:
        """This node became master of ``slot``: feed it (initial load at once)."""
        s = self._slot(slot)
        if not self.slots.running:
            raise RuntimeError("Feeds.start_slot before start()")
        if s.slot_id in self.slots.fed:
            return
        feed = SlotFeed(s, self.clock.seconds())
        self.slots.fed[s.slot_id] = feed
        self._reindex(feed)
        log.info("Feeding slot {slot} (profiles {profiles})", slot=s.name,
                 profiles=",".join(s.profiles))
        self._want_sweeps()
        self._schedule_tick()
        self._kick()
        self.identity.refresh()

    def stop_slot(self, slot: SlotConfig | int | str) -> None:
        """This node released ``slot``: stop feeding it. Its records stay in the state
        (a successor reads them); :meth:`forget_slot` deletes them."""
        s = self._slot(slot)
        feed = self.slots.fed.pop(s.slot_id, None)
        if feed is None:
            return
        if self.calls is not None:
            self.calls.forget_slot(s.slot_id)
        self.registrations.forget_slot(s.slot_id)
        log.info("Stopped feeding slot {slot}", slot=s.name)
        if not self.slots.fed:
            if self.calls is not None:
                self.calls.clear()
            self.registrations.clear()
            self._cancel_tick()

    def forget_slot(self, slot: SlotConfig | int | str) -> int:
        """Delete this node's records of a slot it no longer feeds; returns how many."""
        s = self._slot(slot)
        if s.slot_id in self.slots.fed:
            raise RuntimeError(f"slot {s.name} is still fed; stop_slot first")
        n = 0
        for record in list(self.state.records(origin=self.state.node, slot=s.slot_id)):
            change = self.state.delete(record.slot, record.kind, record.key)
            if change is not None:
                n += 1
                self.slots.emit(change)
        return n

    def _reindex(self, feed: SlotFeed) -> None:
        """Rebuild the index of a slot from this origin's records (a slot fed again)."""
        for record in self.state.records(origin=self.state.node, slot=feed.slot.slot_id):
            try:
                if record.kind is Kind.CALL and self.calls is not None:
                    self.calls.reindex(feed, record.key, record.value)
                elif record.kind is Kind.REGISTRATION:
                    self.registrations.reindex(feed, record.key, record.value)
                elif record.kind is Kind.IDENTITY:
                    feed.identity = decode_identity(record.value)
            except RecordValueError as e:
                log.warn("Unreadable own record {key} of slot {slot}: {error}",
                         key=record.key, slot=feed.slot.name, error=str(e))

    # -- sweeps -----------------------------------------------------------------------------

    def _want_sweeps(self) -> None:
        if self.calls is not None:
            self.calls.sweep_wanted = True
        self.registrations.sweep_wanted = True

    def _schedule_tick(self) -> None:
        if self._tick_timer is None or not self._tick_timer.active():
            self._tick_timer = self.clock.callLater(self.sweep_interval, self._tick)

    def _tick(self) -> None:
        self._tick_timer = None
        if not self.slots.running or not self.slots.fed:
            return
        now = self.clock.seconds()
        if self.calls is not None:
            self.calls.sweep_wanted = True
            self.calls.prune_tombstones(now)
        self.registrations.tick(now)
        if self.identity.outdated():
            self.identity.refresh()
        self._schedule_tick()
        self._kick()

    def sweep_now(self) -> None:
        """Reconcile calls and registrations with the table as soon as the DB is free
        (e.g. right after ``sofia profile P recover``)."""
        self._want_sweeps()
        self._kick()

    # -- ESL state --------------------------------------------------------------------------

    def _esl_state(self, old: ConnectionState, new: ConnectionState) -> None:
        if self.slots.running and self.slots.fed and new is ConnectionState.READY:
            # events may have been missed while disconnected
            self._want_sweeps()
            self._kick()
            self.identity.refresh()

    def _fs_restarted(self, old: str, new: str) -> None:
        if not self.slots.running:
            return
        log.info("FreeSWITCH restarted ({old} -> {new}); resweeping", old=old, new=new)
        if self.db is not None:
            self.db.reset()
        if self.slots.fed:
            self._want_sweeps()
            self._kick()
            self.identity.refresh()

    # -- status -----------------------------------------------------------------------------

    def stats(self) -> FeedsStats:
        now = self.clock.seconds()

        def ago(t: float | None) -> float | None:
            return None if t is None else round((now - t) * 1000, 1)

        slots: dict[str, FeedSlotStats] = {}
        for feed in self.slots.fed.values():
            ident = feed.identity
            slots[feed.slot.name] = FeedSlotStats(
                calls=feed.calls,
                registrations=feed.registrations,
                identity=None if ident is None else {
                    "core_uuid": ident.core_uuid, "version": ident.version},
                last_sweep_ms_ago=ago(feed.last_sweep),
                last_registration_sweep_ms_ago=ago(feed.last_registration_sweep),
                rows_rejected=feed.rows_rejected,
                puts=feed.puts,
                deletes=feed.deletes,
                errors=feed.errors,
                last_error=feed.last_error,
                fed_for_s=round(now - feed.since, 3))
        calls = self.calls
        return FeedsStats(
            running=self.slots.running,
            core_db=None if self.me.core_db is None else str(self.me.core_db),
            registration_db=self.me.registration_db,
            calls_enabled=self.db is not None,
            registration_table=self.registrations.table,
            slots=slots,
            rows_ignored=calls.rows_ignored if calls is not None else 0,
            ignored_profiles=list(calls.ignored_profiles) if calls is not None else [],
            events_ignored=self.slots.events_ignored,
            lookups=calls.lookups if calls is not None else 0,
            lookup_misses=calls.lookup_misses if calls is not None else 0,
            pending_lookups=calls.pending if calls is not None else 0,
            sweeps=calls.sweeps if calls is not None else 0,
            registration_sweeps=self.registrations.sweeps,
            db_busy=self.jobs.busy if self.jobs is not None else False,
            errors=self.slots.errors,
            last_error=self.slots.last_error)

    def status(self) -> dict[str, Any]:
        return self.stats().as_status()
