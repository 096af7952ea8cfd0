"""The node's side of cluster-wide limits: polling, totals, adoption, reconciliation.

:class:`LimitService` runs on every node with a ``[limits]`` section (logic and record
formats: :mod:`fsha.limitbook`):

- every ``poll_interval``: ``hash_dump limit`` of the local FreeSWITCH -> this node's
  ``u/`` records (only changes are written); then the cluster totals are computed from every
  node's records and each changed total is written into the local FreeSWITCH with
  ``hash insert/<hash_realm>/<realm>_<resource>/<total>`` (a dialplan reads it with
  ``${hash(select/fsha_limit/<realm>_<resource>)}``);
- after this node took a slot over (a ``takeover-acquire`` report), :meth:`reconcile`: the
  dead master's calls holding limits are looked up here (``uuid_exists``); those alive are
  adopted (``a/`` records, counted in the totals, released by this node when they hang up),
  the others released; the dead master's own usage is superseded (``s/`` record). The whole
  step is bounded (``reconcile_timeout``) and never fatal: the takeover is done before it
  starts, and a failed attempt is retried every ``retry_interval``;
- hiredis units to release become ``p/`` records first (replicated: a successor of this
  node finishes them), then are released in Redis by the exactly-once script and deleted.
  Redis down: they wait (status shows them) and go when it is back;
- adopted calls: ``CHANNEL_HANGUP_COMPLETE`` (and a sweep every ``sweep_interval`` with
  ``uuid_exists``, for missed events and a FreeSWITCH restart) releases them;
- the local FreeSWITCH's calls that take hiredis units (``CHANNEL_EXECUTE_COMPLETE`` of the
  ``limit`` app, answered or still ringing) get an ``h/`` record until they hang up, so a
  successor can release the units of a call that was not recovered (a ringing call has no
  recovery row);
- after a hand-over (the previous FreeSWITCH gave the units back when it stopped the
  profile) the adopted calls' hiredis units are taken again (``t/`` records, then the
  exactly-once ``INCR`` script), before any release.

Why about 800 lines: the node's side of limits is one service (polling, totals,
adoption, reconciliation, releases, its life) over one limit book, whose parts share
the book, the timers and the jobs in flight; its logic and record formats are apart in
``fsha.limitbook``.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, fields
from typing import Any, Protocol

from automat import MethodicalMachine
from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha.config import ClusterConfig, LimitsConfig, NodeConfig, SlotConfig
from fsha.fsapi import FSApi, parse_uuid_exists
from fsha.fsdb import RecordValueError, decode_call_row
from fsha.limitbook import (
    ADOPT_PREFIX,
    HELD_PREFIX,
    PENDING_PREFIX,
    RETAKE_PREFIX,
    SUPERSEDE_PREFIX,
    USAGE_PREFIX,
    Adoption,
    CallHolding,
    Holdings,
    LimitBook,
    dead_master_calls,
    encode_adoption,
    encode_pending,
    held_unit,
    parse_hash_dump,
    plan_reconcile,
    release_markers,
)
from fsha.redisclient import RedisClient, RedisError
from fsha.replication.state import ReplicatedState
from fsha.wire.esl import Event
from fsha.wire.stream import NO_SLOT, Change, Kind

__all__ = ["LimitService"]

log = Logger(namespace="fsha.limits")

HANGUP_EVENT = "CHANNEL_HANGUP_COMPLETE"
EXECUTE_EVENT = "CHANNEL_EXECUTE_COMPLETE"  # Application: limit -> the units a call took
WINDOW = 64  # ESL commands in flight at once
RELEASE_WINDOW = 64  # Redis releases in flight at once
GONE_TTL = 120.0  # seconds a hung-up UUID is remembered (an adoption racing its hangup)


class LimitESL(Protocol):
    core_uuid: str | None

    def api(self, command: str, timeout: float | None = None) -> Deferred[str]: ...

    def add_event_listener(self, callback: Callable[[Event], object],
                           name: str | None = None) -> None: ...

    def subscribe(self, *names: str) -> Deferred[None]: ...


class LimitLife:
    """The limit service's life: idle -> running -> stopped (and running again on a new
    start). The machine owns it: ``start``/``stop`` in a state where they do not apply are
    explicit no-ops, so the service feeds them without checking first. What is in flight
    (a poll, a sweep, a reconciliation, releases) is a one-job guard of its own, not a
    state; the three timers are armed while running and cancelled on the way out."""

    _machine = MethodicalMachine()

    def __init__(self, service: LimitService) -> None:
        self._service = service

    @_machine.state(initial=True, serialized="idle")
    def idle(self) -> None:
        "Never started."

    @_machine.state(serialized="running")
    def running(self) -> None:
        "Polling, sweeping, reconciling, releasing."

    @_machine.state(serialized="stopped")
    def stopped(self) -> None:
        "Its usage and adoptions have left the cluster totals."

    @_machine.input()
    def start(self) -> None:
        "The service starts."

    @_machine.input()
    def stop(self) -> None:
        "The service stops."

    @_machine.output()
    def _begin(self) -> None:
        self._service._begin()

    @_machine.output()
    def _withdraw(self) -> None:
        self._service._withdraw()

    @_machine.output()
    def _disarm(self) -> None:
        self._service._disarm()

    @_machine.serializer()
    def name(self, state: str) -> str:
        return state

    idle.upon(start, enter=running, outputs=[_begin])
    stopped.upon(start, enter=running, outputs=[_begin])
    running.upon(start, enter=running, outputs=[])
    running.upon(stop, enter=stopped, outputs=[_withdraw, _disarm])
    idle.upon(stop, enter=idle, outputs=[])
    stopped.upon(stop, enter=stopped, outputs=[])


class LimitService(service.Service):
    """See the module doc. ``publish`` streams this node's changes to its peers."""

    def __init__(self, esl: LimitESL, state: ReplicatedState, config: ClusterConfig,
                 me: NodeConfig, clock: IReactorTime, limits: LimitsConfig, *,
                 redis: RedisClient | None = None,
                 publish: Callable[[Change], object] | None = None,
                 api_timeout: float = 2.0,
                 peer_fs_ok: Callable[[int], bool | None] | None = None) -> None:
        """``peer_fs_ok(node_id)``: a peer's last FS_OK flag (``ClusterNode.peer_fs_ok``;
        None: not known), so a hand-over from a node whose FreeSWITCH is gone is
        reconciled as a death."""
        self.esl = esl
        self.api = FSApi(esl, api_timeout)
        self.state = state
        self.config = config
        self.me = me
        self.clock = clock
        self.limits = limits
        self.redis = redis
        self.publish = publish
        self.api_timeout = api_timeout
        self.prefix = config.redis.key_prefix if config.redis is not None else "fsha:"
        self.book = LimitBook(self._incarnation_of)
        state.add_listener(Kind.LIMIT, self.book.listener)
        self._names = {n.node_id: n.name for n in config.nodes}
        self._profile_slot = {p: s.slot_id for s in config.slots for p in s.profiles}
        # a peer's FreeSWITCH usable, from its heartbeats (the node's): a master that gave
        # its slot up because its FreeSWITCH stopped answering did not stop the profile,
        # so that FreeSWITCH gave nothing back
        self.peer_fs_ok = peer_fs_ok
        self._life = LimitLife(self)
        # armed while running only (LimitLife's outputs and their own callbacks)
        self._poll_timer: IDelayedCall | None = None
        self._sweep_timer: IDelayedCall | None = None
        self._retry_timer: IDelayedCall | None = None
        # one job in flight each (not states: see LimitLife)
        self._polling = False
        self._sweeping = False
        self._releasing = False
        self._pushed: dict[str, int] = {}  # totals written into the local FreeSWITCH
        self._gone: dict[str, tuple[float, int]] = {}  # hung-up UUIDs -> (when, serial)
        self._gone_order: deque[tuple[float, str]] = deque()  # the same, oldest first
        self._hangups = 0  # serial of the hangups seen
        self._todo: dict[tuple[int, str], Any] = {}  # (slot, previous) -> reconcile wanted
        self._reconciling = False
        # status counters
        self.polls = 0
        self.poll_errors = 0
        self.last_poll: float | None = None
        self.last_error: str | None = None
        self.hash_writes = 0
        self.hash_errors = 0
        self.released: dict[str, int] = {}  # outcome -> count
        self.errors: Counter[str] = Counter()  # "release" / "retake" -> failures (retried)
        self.adopted_released = 0
        self.retaken: dict[str, int] = {}  # retake outcome -> count
        self.held_events = 0  # limit apps seen taking a hiredis unit
        self.reports: list[dict[str, Any]] = []

    # -- life cycle -------------------------------------------------------------------------

    def _incarnation_of(self, node: int) -> int | None:
        p = self.state.position(node)
        return None if p is None else p.incarnation

    @property
    def life(self) -> str:
        """idle, running or stopped (:class:`LimitLife`)."""
        return self._life.name()

    @property
    def _running(self) -> bool:
        return self._life.name() == "running"

    def start(self) -> None:
        self._life.start()

    def stop(self) -> None:
        """Stop; this node's usage and adoptions leave the cluster totals (its slot was
        handed over before: the successor adopts the calls it recovers). Its pending
        releases and supersede records stay: a successor finishes the former, and the
        latter keep dead nodes from counting again."""
        self._life.stop()

    def _begin(self) -> None:
        self.esl.add_event_listener(self._on_hangup, HANGUP_EVENT)
        events = [HANGUP_EVENT]
        if self.limits.hiredis_realms:
            # Every application's completion, with all the channel's variables: only worth
            # its cost where there are hiredis units of ringing calls to follow.
            self.esl.add_event_listener(self._on_execute, EXECUTE_EVENT)
            events.append(EXECUTE_EVENT)
        self.esl.subscribe(*events).addErrback(
            lambda f: log.warn("limits: subscribing to hangups failed: {error}",
                               error=f.getErrorMessage()))
        add_restart = getattr(self.esl, "add_restart_listener", None)
        if add_restart is not None:
            add_restart(lambda old, new: self._pushed.clear())
        if self.redis is not None:
            self.redis.add_up_listener(self.kick_releases)
        self._poll_timer = self.clock.callLater(0, self._poll)
        self._sweep_timer = self.clock.callLater(self.limits.sweep_interval, self._sweep)

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.stop()
        return defer.succeed(None)

    def _withdraw(self) -> None:
        for key in list(self._own(self.book.usage)):
            self._delete(NO_SLOT, USAGE_PREFIX + key)
        for uuid in list(self._own(self.book.adopted)):
            self._delete(self._adoption_slot(uuid), ADOPT_PREFIX + uuid)
        # handed over: the profile stop hung these calls up, FreeSWITCH released them
        for uuid, h in list(self._own(self.book.held).items()):
            self._delete(h.slot, HELD_PREFIX + uuid)

    def _disarm(self) -> None:
        for timer in (self._poll_timer, self._sweep_timer, self._retry_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._poll_timer = self._sweep_timer = self._retry_timer = None

    # -- writing records --------------------------------------------------------------------

    def _put(self, slot: int, key: str, value: bytes) -> None:
        change = self.state.put(slot, Kind.LIMIT, key, value)
        if self.publish is not None:
            self.publish(change)

    def _delete(self, slot: int, key: str) -> None:
        change = self.state.delete(slot, Kind.LIMIT, key)
        if change is not None and self.publish is not None:
            self.publish(change)

    def _own(self, table: dict[int, dict[Any, Any]]) -> dict[Any, Any]:
        return table.get(self.me.node_id, {})

    # -- polling and totals -----------------------------------------------------------------

    def _schedule_poll(self) -> None:
        if self._running:
            self._poll_timer = self.clock.callLater(self.limits.poll_interval, self._poll)

    def _poll(self) -> None:
        self._poll_timer = None
        if self._polling:
            return self._schedule_poll()
        self._polling = True
        d = self.poll_once()

        def done(result: object) -> None:
            self._polling = False
            if isinstance(result, Failure):
                log.failure("limits poll failed", result)
            self._schedule_poll()

        d.addBoth(done)

    @inlineCallbacks
    def poll_once(self) -> Generator[Any, Any, None]:
        """``hash_dump limit`` -> own usage records; then totals -> the local hash."""
        try:
            output = yield self.esl.api("hash_dump limit", timeout=self.api_timeout)
        except Exception as e:
            self.poll_errors += 1
            self.last_error = f"hash_dump limit: {e}"
        else:
            if not self._running:  # stopped meanwhile: its usage has left the totals
                return
            self.polls += 1
            self.last_poll = self.clock.seconds()
            self._write_usage(parse_hash_dump(output))
        yield self.push_totals()

    def _write_usage(self, usage: dict[str, int]) -> None:
        current = self._own(self.book.usage)
        for key, n in usage.items():
            if current.get(key) != n and len(key) + 2 <= 1024:
                self._put(NO_SLOT, USAGE_PREFIX + key, str(n).encode())
        for key in [k for k in current if k not in usage]:
            self._delete(NO_SLOT, USAGE_PREFIX + key)

    @inlineCallbacks
    def push_totals(self) -> Generator[Any, Any, None]:
        realm = self.limits.hash_realm
        if realm is None:
            return
        totals = self.book.totals()
        changes = {k: n for k, n in totals.items() if self._pushed.get(k) != n}
        changes.update({k: 0 for k in self._pushed if k not in totals and self._pushed[k]})
        items = [(k, n) for k, n in changes.items() if _hash_token(k)]
        for i in range(0, len(items), WINDOW):
            chunk = items[i:i + WINDOW]
            results = yield DeferredList(
                [self.api.hash_insert(realm, k, str(n)) for k, n in chunk], consumeErrors=True)
            for (k, n), (ok, result) in zip(chunk, results, strict=True):
                if ok:
                    self._pushed[k] = n
                    self.hash_writes += 1
                else:
                    self.hash_errors += 1
                    self.last_error = f"hash insert {realm}/{k}: {result.getErrorMessage()}"

    # -- takeover ---------------------------------------------------------------------------

    def takeover_done(self, report: Any) -> None:
        """A :class:`fsha.takeover.TakeoverReport` listener: reconcile after an acquire of
        a slot that had a previous master."""
        if report.action != "acquire" or not report.ok or report.previous is None:
            return
        try:
            slot = self.config.slot(report.slot)
            previous = self.config.node(report.previous)
        except KeyError:
            return
        if previous.node_id == self.me.node_id:
            return
        handover = bool(getattr(report, "handover", False))
        supersede = not handover
        if handover and self.peer_fs_ok is not None and \
                self.peer_fs_ok(previous.node_id) is False:
            handover = False  # released like a dead master's; not superseded: it lives
        epoch = getattr(report, "epoch", 0)
        self._todo[(slot.slot_id, previous.name)] = (
            slot, previous, handover, epoch if isinstance(epoch, int) else 0, supersede)
        self._run_reconciles()

    def _run_reconciles(self) -> None:
        if self._reconciling or not self._todo or not self._running:
            return
        key = next(iter(self._todo))
        slot, previous, handover, epoch, supersede = self._todo[key]
        self._reconciling = True
        d = self.reconcile(slot, previous, handover=handover, epoch=epoch,
                           supersede=supersede)
        d.addTimeout(self.limits.reconcile_timeout, self.clock)

        def done(result: object) -> None:
            self._reconciling = False
            if isinstance(result, Failure):
                error = ("timed out" if result.check(defer.TimeoutError)
                         else result.getErrorMessage())
                self.last_error = f"reconcile of {previous.name}: {error}"
                log.warn("limits: reconciling {node}'s slot {slot} failed ({error}); "
                         "retried in {s:g} s", node=previous.name, slot=slot.name,
                         error=error, s=self.limits.retry_interval)
                self._schedule_retry()
            else:
                self._todo.pop(key, None)
                self._run_reconciles()

        d.addBoth(done).addErrback(lambda f: log.failure("limits reconcile bookkeeping", f))

    def _schedule_retry(self) -> None:
        if self._retry_timer is None and self._running:
            self._retry_timer = self.clock.callLater(self.limits.retry_interval, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        self._run_reconciles()
        self.kick_releases()

    def _dead_calls(self, slot: SlotConfig, previous: NodeConfig, adopted: bool = True
                    ) -> tuple[list[CallHolding], int]:
        origin = previous.node_id
        live = list(self.state.records(origin=origin, slot=slot.slot_id, kind=Kind.CALL))
        held = {r.key for r in live}
        retired = [r for r in self.state.retired(origin)
                   if r.slot == slot.slot_id and r.kind is Kind.CALL and r.key not in held]
        rows: list[tuple[int, str, str, bytes]] = []
        rejected = 0
        for record in live + retired:
            try:
                row = decode_call_row(record.value)
            except RecordValueError:
                rejected += 1
                continue
            rows.append((record.slot, row.uuid, row.runtime_uuid, row.metadata))
        adoptions = dict(self.book.adopted.get(origin, {})) if adopted else {}
        held = {u: h for u, h in self.book.held.get(origin, {}).items()
                if h.slot == slot.slot_id}
        calls, bad = dead_master_calls(rows, adoptions, held)
        theirs = set() if adopted else set(self.book.adopted.get(origin, {}))
        return [c for c in calls if c.slot == slot.slot_id and c.uuid not in theirs], \
            rejected + bad

    @inlineCallbacks
    def reconcile(self, slot: SlotConfig, previous: NodeConfig, *, handover: bool = False,
                  epoch: int = 0, supersede: bool | None = None
                  ) -> Generator[Any, Any, dict[str, Any]]:
        """See the module doc. Returns the report (also kept for the status). ``epoch``
        (the takeover's) makes this adoption's markers its own: a call handed over to this
        FreeSWITCH, away and back again is taken and released again, under new markers."""
        start = self.clock.seconds()
        first_hangup = self._hangups + 1
        if supersede is None:
            supersede = not handover
        # a master whose FreeSWITCH stopped answering lives on: the calls it had adopted
        # stay its own to release (its sweep does it when they are gone)
        calls, rejected = self._dead_calls(slot, previous,
                                           adopted=handover or supersede)
        incarnation = self._incarnation_of(previous.node_id)
        own_runtime = self.esl.core_uuid
        if own_runtime is None:
            own_runtime = yield self.api.core_uuid()
        alive: dict[str, bool] = {}
        queried = [c.uuid for c in calls]
        for i in range(0, len(queried), WINDOW):
            chunk = queried[i:i + WINDOW]
            results = yield defer.gatherResults(
                [self.esl.api(f"uuid_exists {u}", timeout=self.api_timeout)
                 .addCallback(lambda out: parse_uuid_exists("uuid_exists", out))
                 for u in chunk], consumeErrors=True)
            alive.update(zip(chunk, results, strict=True))
        now = self.clock.seconds()
        self._expire_gone(now)
        realms = self.limits.hiredis_realms
        # a call that hung up here while its lookup was in flight is gone (one that hung
        # up here before, e.g. a hand-over back and forth, may be alive again)
        plan = plan_reconcile(calls, lambda u: alive.get(u, False) and
                              self._gone.get(u, (0.0, -1))[1] < first_hangup,
                              hiredis_realms=() if handover else realms, prefix=self.prefix)
        # one reactor turn: the totals never count a call twice nor miss it
        retakes = 0
        holder = f"{own_runtime}.{epoch}"  # the markers' runtime part for these adoptions
        for call in plan.moved:
            self._put(call.slot, ADOPT_PREFIX + call.uuid, encode_adoption(
                Adoption(call.uuid, holder, previous.name, call.holdings)))
            if handover:  # the previous FreeSWITCH gave the units back at the profile stop
                for r in release_markers(self.prefix, holder, call.uuid,
                                         call.holdings, what="retaken"):
                    if r.realm in realms:
                        self._put(NO_SLOT, RETAKE_PREFIX + r.marker,
                                  encode_pending(r.realm, r.key))
                        retakes += 1
        for r in plan.releases:
            self._put(NO_SLOT, PENDING_PREFIX + r.marker, encode_pending(r.realm, r.key))
        # what the previous master had not finished (on a hand-over it may still finish
        # it itself: the markers make it happen once whoever does it)
        inherited = 0
        for prefix, table in ((RETAKE_PREFIX, self.book.retakes),
                              (PENDING_PREFIX, self.book.pending)):
            own = self._own(table)
            for marker, (realm, key) in list(table.get(previous.node_id, {}).items()):
                if marker not in own:
                    self._put(NO_SLOT, prefix + marker, encode_pending(realm, key))
                    inherited += 1
        if supersede:
            if incarnation is not None:
                self._put(NO_SLOT, SUPERSEDE_PREFIX + str(previous.node_id),
                          str(incarnation).encode())
        report = {"slot": slot.name, "previous": previous.name, "handover": handover,
                  "time": now, "ms": round((now - start) * 1000, 1), **plan.counts(),
                  "rejected": plan.rejected + rejected, "inherited_releases": inherited,
                  "hiredis_retakes": retakes}
        self.reports = [*self.reports[-9:], report]
        log.info("limits: slot {slot} from {node}: {moved} call(s) adopted, {released} "
                 "released ({hiredis} hiredis unit(s) to release, {unmanaged} in other "
                 "realms)", slot=slot.name, node=previous.name, moved=len(plan.moved),
                 released=len(plan.released), hiredis=len(plan.releases) + inherited,
                 unmanaged=plan.unmanaged)
        if retakes:
            log.info("limits: hand-over of slot {slot}: {n} hiredis unit(s) of the adopted "
                     "calls to take again", slot=slot.name, n=retakes)
        self.kick_releases()
        return report

    # -- adopted calls ----------------------------------------------------------------------

    def _expire_gone(self, now: float) -> None:
        # Hangups arrive in time order: forgetting the old ones is O(1) per hangup.
        order, gone = self._gone_order, self._gone
        while order and now - order[0][0] > GONE_TTL:
            at, uuid = order.popleft()
            entry = gone.get(uuid)
            if entry is not None and entry[0] == at:
                del gone[uuid]

    def _on_hangup(self, event: Event) -> None:
        uuid = event.headers.get("Unique-ID")
        if not uuid:
            return
        held = self._own(self.book.held).get(uuid)
        if held is not None:  # FreeSWITCH released them itself
            self._delete(held.slot, HELD_PREFIX + uuid)
        if uuid in self._own(self.book.adopted):
            self._release_adopted([uuid])
        else:
            self._hangups += 1
            now = self.clock.seconds()
            self._gone[uuid] = (now, self._hangups)
            self._gone_order.append((now, uuid))
            self._expire_gone(now)

    def _on_execute(self, event: Event) -> None:
        """``CHANNEL_EXECUTE_COMPLETE``: a ``limit hiredis`` that took a unit -> the call's
        ``h/`` record. Every application's completion comes here: the first test is the
        cheap one."""
        headers = event.headers
        if headers.get("Application") != "limit":
            return
        uuid = headers.get("Unique-ID")
        if not uuid or uuid in self._gone or uuid in self._own(self.book.adopted):
            return  # (an adopted call's units are in its adoption)
        unit = held_unit(headers.get("Application-Data") or "",
                         headers.get("variable_limit_backend"),
                         headers.get("variable_hiredis_limit_exceeded"),
                         headers.get("variable_hiredis_raw_response"))
        if unit is None:
            return
        name = headers.get("Channel-Name") or ""
        parts = name.split("/", 2)
        slot = self._profile_slot.get(parts[1]) if len(parts) == 3 else None
        profile = headers.get("variable_sofia_profile_name")
        if slot is None and profile:
            slot = self._profile_slot.get(profile)
        runtime = headers.get("Core-UUID") or self.esl.core_uuid
        if slot is None or not runtime:
            return  # not a call of a slot's profile: no successor will look for it
        self.held_events += 1
        current = self._own(self.book.held).get(uuid)
        units = current.holdings.hiredis if current is not None else ()
        record = Adoption(uuid, runtime, self.me.name, Holdings(frozenset(), (*units, unit)))
        self._put(slot, HELD_PREFIX + uuid, encode_adoption(record))

    def _release_adopted(self, uuids: Iterable[str]) -> None:
        own = self._own(self.book.adopted)
        realms = set(self.limits.hiredis_realms)
        n = 0
        for uuid in uuids:
            a = own.get(uuid)
            if a is None:
                continue
            for r in release_markers(self.prefix, a.runtime, uuid, a.holdings):
                if r.realm in realms:
                    self._put(NO_SLOT, PENDING_PREFIX + r.marker, encode_pending(r.realm, r.key))
            slot = self._adoption_slot(uuid)
            self._delete(slot, ADOPT_PREFIX + uuid)
            n += 1
        if n:
            self.adopted_released += n
            self.kick_releases()

    def config_changed(self, config: ClusterConfig) -> None:
        """An online change of the slots (fsha config push): an added profile's calls
        count for its slot from now on."""
        self.config = config
        self._profile_slot = {p: s.slot_id for s in config.slots for p in s.profiles}

    def _adoption_slot(self, uuid: str) -> int:
        for s in self.config.slots:
            if self.state.get(self.me.node_id, s.slot_id, Kind.LIMIT, ADOPT_PREFIX + uuid):
                return s.slot_id
        return NO_SLOT

    def _sweep(self) -> None:
        self._sweep_timer = None
        if not self._sweeping and (self._own(self.book.adopted) or self._own(self.book.held)):
            self._sweeping = True
            d = self.sweep_once()

            def done(result: object) -> None:
                self._sweeping = False
                if isinstance(result, Failure):
                    self.last_error = f"adopted calls sweep: {result.getErrorMessage()}"
                    log.warn("limits: sweep of adopted calls failed: {error}",
                             error=result.getErrorMessage())

            d.addBoth(done)
        if self._running:
            self._sweep_timer = self.clock.callLater(self.limits.sweep_interval, self._sweep)

    @inlineCallbacks
    def sweep_once(self) -> Generator[Any, Any, int]:
        """Release adopted calls that no longer exist here, and forget the ``h/`` records
        of calls gone (FreeSWITCH released those itself); returns how many calls."""
        # a held call with a recovery row here is alive (the row goes at its hangup)
        ringing = [u for u, h in self._own(self.book.held).items()
                   if self.state.get(self.me.node_id, h.slot, Kind.CALL, u) is None]
        uuids = list(dict.fromkeys([*self._own(self.book.adopted), *ringing]))
        gone: list[str] = []
        for i in range(0, len(uuids), WINDOW):
            chunk = uuids[i:i + WINDOW]
            results = yield defer.gatherResults(
                [self.esl.api(f"uuid_exists {u}", timeout=self.api_timeout)
                 .addCallback(lambda out: parse_uuid_exists("uuid_exists", out))
                 for u in chunk], consumeErrors=True)
            gone.extend(u for u, exists in zip(chunk, results, strict=True) if not exists)
        for uuid in gone:
            held = self._own(self.book.held).get(uuid)
            if held is not None:
                self._delete(held.slot, HELD_PREFIX + uuid)
        self._release_adopted(gone)
        return len(gone)

    # -- Redis releases ---------------------------------------------------------------------

    def kick_releases(self) -> None:
        """Take again the pending retakes (``t/``), then release the pending hiredis units
        (``p/``), of this node, now."""
        if self._releasing or not self._running or not (
                self._own(self.book.pending) or self._own(self.book.retakes)):
            return
        if self.redis is None:
            return
        self._releasing = True
        d = self._release_pending()

        def done(result: object) -> None:
            self._releasing = False
            if isinstance(result, Failure):
                log.failure("limits release loop failed", result)
            if self._own(self.book.pending) or self._own(self.book.retakes):
                self._schedule_retry()

        d.addBoth(done)

    @inlineCallbacks
    def _release_pending(self) -> Generator[Any, Any, None]:
        redis = self.redis
        assert redis is not None
        # retakes first: a unit released before it was taken again could be clamped at 0
        done = yield self._drain("retake", lambda: self.book.retakes, redis.retake,
                                 RETAKE_PREFIX, self.retaken)
        if done:
            yield self._drain("release", lambda: self.book.pending, redis.release,
                              PENDING_PREFIX, self.released)

    @inlineCallbacks
    def _drain(self, what: str, table: Callable[[], dict[int, dict[str, tuple[str, str]]]],
               send: Callable[[str, str], Deferred[tuple[str, str]]], prefix: str,
               outcomes: dict[str, int]) -> Generator[Any, Any, bool]:
        """Send this node's ``table`` records (marker -> (realm, key)) to Redis, a window at a
        time, deleting each one Redis answered. True once none is left; False when one
        failed (retried later: Redis back, or the retry timer) or Redis went down."""
        redis = self.redis
        assert redis is not None
        while self._running and redis.state == "up":
            batch = list(self._own(table()).items())[:RELEASE_WINDOW]
            if not batch:
                return True
            results = yield DeferredList([send(key, marker) for marker, (_realm, key) in batch],
                                         consumeErrors=True)
            failed = 0
            for (marker, (realm, key)), (ok, result) in zip(batch, results, strict=True):
                if ok:
                    outcome, _value = result
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    if outcome in ("missing", "clamped"):
                        log.warn("limits: {what} of {realm} {key}: {outcome} (counter "
                                 "drifted)", what=what, realm=realm, key=key, outcome=outcome)
                    self._delete(NO_SLOT, prefix + marker)
                else:
                    failed += 1
                    self.errors[what] += 1
                    self.last_error = f"redis {what}: {result.getErrorMessage()}"
                    if not result.check(RedisError):
                        log.failure("limits: {what} failed", result, what=what)
            if failed:
                return False
        return False

    @property
    def release_errors(self) -> int:
        return self.errors["release"]

    @property
    def retake_errors(self) -> int:
        return self.errors["retake"]

    # -- status -----------------------------------------------------------------------------

    def stats(self) -> LimitStats:
        book = self.book
        names = self._names
        counted = set(book.counted_origins())
        return LimitStats(
            totals=dict(sorted(book.totals().items())),
            per_node={names.get(o, str(o)): share for o, share in book.per_origin().items()},
            superseded=sorted(names.get(o, str(o)) for o in book.superseded()),
            adopted=len(self._own(book.adopted)),
            adopted_cluster=sum(len(v) for o, v in book.adopted.items() if o in counted),
            hiredis_held={f"{r}/{k}": n for (r, k), n in sorted(book.hiredis_held().items())},
            pending_releases=len(self._own(book.pending)),
            pending_releases_cluster=sum(len(v) for v in book.pending.values()),
            pending_retakes=len(self._own(book.retakes)),
            retaken=dict(self.retaken), retake_errors=self.retake_errors,
            held_calls=len(self._own(book.held)),
            held_calls_cluster=sum(len(v) for v in book.held.values()),
            released=dict(self.released), release_errors=self.release_errors,
            adopted_released=self.adopted_released, polls=self.polls,
            poll_errors=self.poll_errors, last_poll=self.last_poll,
            hash_realm=self.limits.hash_realm, hash_writes=self.hash_writes,
            hash_errors=self.hash_errors, rejected_records=book.rejected,
            reconciles_waiting=len(self._todo), last_reconciles=list(self.reports),
            last_error=self.last_error,
            redis=self.redis.status() if self.redis is not None else None)

    def status(self) -> dict[str, Any]:
        return self.stats().as_status()


@dataclass(frozen=True, slots=True)
class LimitStats:
    """This node's view of the cluster-wide limits: the JSON status (:meth:`as_status`)
    and the metrics (``fsha.metrics``) are both made from this."""

    totals: dict[str, int]  # realm_resource -> cluster-wide usage
    per_node: dict[str, dict[str, int]]  # node -> its share
    superseded: list[str]
    adopted: int
    adopted_cluster: int
    hiredis_held: dict[str, int]
    pending_releases: int
    pending_releases_cluster: int
    pending_retakes: int
    retaken: dict[str, int]
    retake_errors: int
    held_calls: int
    held_calls_cluster: int
    released: dict[str, int]  # outcome -> count
    release_errors: int
    adopted_released: int
    polls: int
    poll_errors: int
    last_poll: float | None
    hash_realm: str
    hash_writes: int
    hash_errors: int
    rejected_records: int
    reconciles_waiting: int
    last_reconciles: list[dict[str, Any]]
    last_error: str | None
    redis: dict[str, Any] | None

    def as_status(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _hash_token(value: str) -> bool:
    return bool(value) and "/" not in value and not any(ch.isspace() for ch in value)
