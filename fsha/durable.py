"""The durable store: this node's replicated records in Redis, so a restarted cluster
starts warm (``[redis] durable_state = true``).

Each node writes its *own origin* (coalesced, one script per flush, a full resync when the
incremental path cannot be trusted) and, at start, loads the origins of nodes that are not
alive (``LoadMachine``), applied as replication snapshots only over older positions. The
keys, the write and load rules and their limits: ``docs/protocol/durable.rst``.

Why about 700 lines: writing and loading share one Redis layout, its keys and its
counters.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Final, Protocol

from automat import MethodicalMachine
from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha.latch import Latch
from fsha.redisclient import RedisClient, RedisError
from fsha.replication.state import ApplyResult, ReplicatedState
from fsha.wire.heartbeat import Role
from fsha.wire.stream import Kind, SnapshotBegin, SnapshotEnd, SnapshotItem

__all__ = [
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_MAX_PENDING",
    "DurableStore",
    "decode_field",
    "decode_value",
    "encode_field",
    "encode_value",
    "key_prefix",
]

log = Logger(namespace="fsha.durable")

DEFAULT_FLUSH_INTERVAL: Final = 0.2
DEFAULT_MAX_PENDING: Final = 5000  # dirty keys kept before falling back to a full resync
CHUNK_RECORDS: Final = 500  # records per HSET of a full resync
CHUNK_BYTES: Final = 1 << 20

#: KEYS meta, records; ARGV incarnation, sequence, written_ms, node, ndel, del fields...,
#: then field/value pairs. 'resync' when Redis holds another incarnation (or nothing).
WRITE_SCRIPT: Final = """
if redis.call('HGET', KEYS[1], 'incarnation') ~= ARGV[1] then return 'resync' end
local n = tonumber(ARGV[5])
for i = 6, 5 + n do redis.call('HDEL', KEYS[2], ARGV[i]) end
for i = 6 + n, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'sequence', ARGV[2], 'written_ms', ARGV[3], 'node', ARGV[4])
return 'ok'
"""
#: KEYS meta, records, scratch; ARGV incarnation, sequence, written_ms, node.
FINISH_SCRIPT: Final = """
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('RENAME', KEYS[3], KEYS[2])
else
  redis.call('DEL', KEYS[2])
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'incarnation', ARGV[1], 'sequence', ARGV[2],
           'written_ms', ARGV[3], 'node', ARGV[4])
return 'ok'
"""
SCAN_COUNT: Final = 1000  # fields per HSCAN page of a load
MAX_PAGES: Final = 100_000  # bound of one origin's HSCAN loop


class NodeView(Protocol):
    """What the store needs of :class:`fsha.node.ClusterNode`."""

    role: Role
    epoch: int
    known_epochs: dict[int, int]
    last_holder: dict[int, int]

    def add_role_listener(self, callback: Any) -> None: ...


def key_prefix(prefix: str, cluster: str) -> str:
    return f"{prefix}{{{cluster}}}:"


def encode_field(slot: int, kind: Kind, key: str) -> str:
    return f"{slot}/{int(kind)}/{key}"


def decode_field(field: str) -> tuple[int, Kind, str]:
    """Raises ValueError for a field this module did not write."""
    slot, kind, key = field.split("/", 2)
    return int(slot), Kind(int(kind)), key


def encode_value(expires_ms: int, value: bytes) -> bytes:
    return b"%d:" % expires_ms + value


def decode_value(data: bytes) -> tuple[int, bytes]:
    expires, sep, value = data.partition(b":")
    if not sep or not expires.isdigit():
        raise ValueError("not an expiry and a value")
    return int(expires), value


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")  # txredisapi decodes valid UTF-8: exact round trip


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _pairs(flat: Any) -> list[tuple[Any, Any]]:
    if not isinstance(flat, list) or len(flat) % 2:
        raise ValueError(f"not a list of pairs: {type(flat).__name__}")
    return list(zip(flat[0::2], flat[1::2], strict=True))


class _Loaded:
    __slots__ = ("incarnation", "items", "rejected", "sequence", "written_ms")

    def __init__(self, incarnation: int, sequence: int, written_ms: int,
                 items: list[SnapshotItem], rejected: int) -> None:
        self.incarnation, self.sequence, self.written_ms = incarnation, sequence, written_ms
        self.items, self.rejected = items, rejected


@dataclass(frozen=True, slots=True)
class DurableLoad:
    """What the load at start did (``state``: :class:`LoadMachine`'s)."""

    state: str
    error: str | None
    origins: dict[str, Any]
    records: int
    skipped: dict[str, str]
    slots: dict[str, Any]
    rejected: int


@dataclass(frozen=True, slots=True)
class DurableStats:
    """The durable store's figures: the JSON status (:meth:`as_status`) and the metrics
    (``fsha.metrics``) are both made from this."""

    state: str  # loading, dirty, behind, in-sync
    written: tuple[int, int] | None  # (incarnation, sequence) last written
    position: tuple[int, int] | None  # this node's origin now
    lag_changes: int | None  # None while a full resync is due
    written_at: float | None
    dirty_since: float | None
    pending: int
    max_pending: int
    flushes: int
    resyncs: int
    overflows: int
    records_written: int
    write_errors: int
    last_error: str | None
    load: DurableLoad

    def as_status(self) -> dict[str, Any]:
        return {
            "state": self.state, "written": list(self.written) if self.written else None,
            "position": list(self.position) if self.position else None,
            "lag_changes": self.lag_changes, "written_at": self.written_at,
            "dirty_since": self.dirty_since, "pending": self.pending,
            "max_pending": self.max_pending, "flushes": self.flushes,
            "resyncs": self.resyncs, "overflows": self.overflows,
            "records_written": self.records_written, "write_errors": self.write_errors,
            "last_error": self.last_error, "load": {
                "state": self.load.state, "error": self.load.error,
                "origins": self.load.origins, "records": self.load.records,
                "skipped": self.load.skipped, "slots": self.load.slots,
                "rejected": self.load.rejected},
        }


class LoadMachine:
    """The load's life: waiting (for Redis) -> loading -> loaded -> applied (once
    discovery is over), or failed (an error, or ``load_wait`` ran out while waiting or
    loading). Inputs that do not apply in a state are ignored, so the store feeds them
    as things happen without checking where the load is."""

    _machine = MethodicalMachine()

    def __init__(self, store: DurableStore) -> None:
        self._store = store

    @_machine.state(initial=True, serialized="waiting")
    def waiting(self) -> None:
        "Redis not up yet."

    @_machine.state(serialized="loading")
    def loading(self) -> None:
        "Reading the slot table and every other origin."

    @_machine.state(serialized="loaded")
    def loaded(self) -> None:
        "Read; applied once discovery is over (who is alive is known)."

    @_machine.state(serialized="applied")
    def applied(self) -> None:
        "Applied: writing this node's origin."

    @_machine.state(serialized="failed")
    def failed(self) -> None:
        "Nothing loaded; writing this node's origin."

    @_machine.input()
    def redis_up(self) -> None:
        "Redis answers (and the store runs)."

    @_machine.input()
    def read(self, origins: dict[int, _Loaded], slots: dict[int, tuple[int, int]]) -> None:
        "Every origin and the slot table are read."

    @_machine.input()
    def error(self, why: str) -> None:
        "The load failed, or ``load_wait`` ran out."

    @_machine.input()
    def discovered(self) -> None:
        "The node's discovery is over."

    @_machine.output()
    def _begin(self) -> None:
        self._store._begin_load()

    @_machine.output()
    def _keep(self, origins: dict[int, _Loaded], slots: dict[int, tuple[int, int]]) -> None:
        self._store._loaded, self._store._slot_table = origins, slots

    @_machine.output()
    def _apply(self) -> None:
        self._store._apply()

    @_machine.output()
    def _give_up(self, why: str) -> None:
        self._store._give_up(why)

    @_machine.serializer()
    def name(self, state: str) -> str:
        return state

    waiting.upon(redis_up, enter=loading, outputs=[_begin])
    waiting.upon(error, enter=failed, outputs=[_give_up])
    waiting.upon(read, enter=waiting, outputs=[])
    waiting.upon(discovered, enter=waiting, outputs=[])
    loading.upon(read, enter=loaded, outputs=[_keep])
    loading.upon(error, enter=failed, outputs=[_give_up])
    loading.upon(redis_up, enter=loading, outputs=[])
    loading.upon(discovered, enter=loading, outputs=[])
    loaded.upon(discovered, enter=applied, outputs=[_apply])
    for _done in (loaded, applied, failed):
        _done.upon(redis_up, enter=_done, outputs=[])
        _done.upon(error, enter=_done, outputs=[])  # too late to matter
        _done.upon(read, enter=_done, outputs=[])  # given up meanwhile: nothing applied
    for _done in (applied, failed):
        _done.upon(discovered, enter=_done, outputs=[])
    del _done


class DurableStore(service.Service):
    """This node's origin written to Redis; other origins loaded at start
    (docs/protocol/durable.rst)."""

    def __init__(self, redis: RedisClient, state: ReplicatedState, node: NodeView,
                 node_ids: list[int], alive: Callable[[int], bool], clock: IReactorTime, *,
                 prefix: str, flush_interval: float = DEFAULT_FLUSH_INTERVAL,
                 max_pending: int = DEFAULT_MAX_PENDING, load_wait: float | None = None,
                 names: dict[int, str] | None = None, loaded: Latch | None = None) -> None:
        """``alive(node_id) -> bool`` says whether a peer is heard now; ``node_ids`` are
        every configured node's id (this one included), ``names`` their names. ``loaded``
        is set when the load is over (applied or given up: :meth:`ready`); the node, given
        the same latch, holds its cold-start claims until then."""
        self.loaded = loaded if loaded is not None else Latch()
        self.redis = redis
        self.state = state
        self.node = node
        self.me = state.node
        self.others = [n for n in node_ids if n != self.me]
        self.names = names or {}
        self.node_name = self.names.get(self.me, str(self.me))
        self.alive = alive
        self.clock = clock
        self.prefix = prefix
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        settings = redis.settings
        self.load_wait = (load_wait if load_wait is not None else
                          max(5.0, settings.connect_timeout + 4 * settings.timeout))
        # writing
        self._dirty: set[tuple[int, Kind, str]] = set()
        self._full = True  # the first write of a run is a full resync (a new incarnation)
        self._behind_since: float | None = None
        self._slots: dict[int, str] = {}  # slot table entries to write
        self._timer: IDelayedCall | None = None
        self._busy = False
        self._writing = False  # after the load: see docs/protocol/durable.rst, "Loading"
        self.written: tuple[int, int] | None = None  # position last written
        self.written_at: float | None = None
        self.flushes = 0
        self.resyncs = 0
        self.overflows = 0
        self.write_errors = 0
        self.records_written = 0
        self.last_error: str | None = None
        # loading
        self._load_machine = LoadMachine(self)
        self._load_started: float | None = None
        self._load_timer: IDelayedCall | None = None
        self._loaded: dict[int, _Loaded] | None = None
        self._slot_table: dict[int, tuple[int, int]] = {}
        self.load_report: dict[str, Any] = {}
        self.load_error: str | None = None
        self._changed_while_loading: list[tuple[int, str]] = []
        self._running = False
        self._listening = False

    # -- life cycle -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._running = True
        if not self._listening:
            self._listening = True
            for kind in Kind:
                self.state.add_listener(kind, self._changed)
            self.node.add_role_listener(self._role_changed)
            self.redis.add_up_listener(self._redis_up)
        self._load_started = self.clock.seconds()
        self._load_timer = self.clock.callLater(self.load_wait, self._load_expired)
        self._try_load()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._running = False
        for timer in (self._timer, self._load_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._load_timer = None
        if not self._writing or self._busy or self.redis.state != "up":
            return defer.succeed(None)
        # a last write of what changed (bounded by the Redis deadlines): a stopped node's
        # origin then matches what its peers hold
        d = self._flush()
        d.addTimeout(3 * self.redis.settings.timeout, self.clock)
        d.addErrback(lambda f: log.warn("durable store: last write not done: {error}",
                                        error=f.getErrorMessage()))
        return d

    @property
    def load_state(self) -> str:
        """waiting, loading, loaded, applied or failed (:class:`LoadMachine`)."""
        return self._load_machine.name()

    def ready(self) -> bool:
        """True once a cold-start claim need not wait for the load any more."""
        return self.load_state in ("applied", "failed")

    # -- loading ----------------------------------------------------------------------------

    def _redis_up(self) -> None:
        self._try_load()
        self._schedule(0.0)

    def _try_load(self) -> None:
        if self._running and self.redis.state == "up":
            self._load_machine.redis_up()

    def _begin_load(self) -> None:
        d = self._load()
        d.addCallbacks(self._read, self._load_failed)
        d.addErrback(lambda f: log.failure("durable store: load bookkeeping failed", f))

    def _read(self, read: tuple[dict[int, _Loaded], dict[int, tuple[int, int]]]) -> None:
        self._load_machine.read(*read)
        if self.node.role is not Role.STARTING:
            self._load_machine.discovered()  # discovery was over before the load

    def _load_expired(self) -> None:
        self._load_timer = None
        self._load_machine.error(
            f"no load within {self.load_wait:g} s"
            + (f" ({self.redis.last_error})" if self.redis.state != "up"
               and self.redis.last_error else ""))

    def _load_failed(self, f: Failure) -> None:
        self._load_machine.error(f.getErrorMessage() if f.check(RedisError, ValueError)
                                 else repr(f.value))

    def _give_up(self, why: str) -> None:
        self.load_error = why
        self.loaded.set()
        log.warn("durable store: nothing loaded from Redis ({why}); starting without it",
                 why=why)
        self._start_writing()

    @inlineCallbacks
    def _load(self) -> Generator[Deferred[Any], Any,
                                 tuple[dict[int, _Loaded], dict[int, tuple[int, int]]]]:
        """Read the slot table and every other origin (the machine keeps them)."""
        p = self.prefix
        table = yield self.redis.execute("HGETALL", p + "slots")
        slots: dict[int, tuple[int, int]] = {}
        for field, value in _pairs(table or []):
            try:
                epoch, holder, rest = _text(value).split(":", 2)
                _, _, name = rest.partition(":")
                if name and self.names and self.names.get(int(holder)) != name:
                    log.warn("durable store: slot entry {field}={value} is of another "
                             "node list; skipped", field=_text(field), value=_text(value))
                    continue
                slots[int(_text(field))] = (int(epoch), int(holder))
            except ValueError:
                log.warn("durable store: slot entry {field}={value} skipped",
                         field=_text(field), value=_text(value))
        loaded: dict[int, _Loaded] = {}
        for origin in self.others:
            data = yield self._load_origin(origin)
            if data is not None:
                loaded[origin] = data
        return loaded, slots

    @inlineCallbacks
    def _load_origin(self, origin: int) -> Generator[Deferred[Any], Any, _Loaded | None]:
        """One origin, paged (HSCAN: no reply is larger than a page, each has the Redis
        deadline); its position is read before and after, and an origin that changed in
        between (its node is running after all) is not loaded."""
        meta_key = f"{self.prefix}origin:{origin}:meta"
        records_key = f"{self.prefix}origin:{origin}:records"
        before = yield self.redis.execute("HGETALL", meta_key)
        if not before:
            return None
        fields: dict[str, bytes] = {}
        cursor = "0"
        for _ in range(MAX_PAGES):
            reply = yield self.redis.execute("HSCAN", records_key, cursor, "COUNT",
                                             str(SCAN_COUNT))
            cursor = _text(reply[0])
            for field, value in _pairs(reply[1]):
                fields[_text(field)] = _bytes(value)
            if cursor == "0":
                break
        else:
            raise ValueError(f"origin {origin}: more than {MAX_PAGES} pages")
        after = yield self.redis.execute("HGETALL", meta_key)
        meta = {_text(k): _text(v) for k, v in _pairs(before)}
        if {_text(k): _text(v) for k, v in _pairs(after or [])} != meta:
            self._changed_while_loading.append((origin, "changed while loading"))
            return None
        writer = meta.get("node")
        want = self.names.get(origin)
        if want is not None and writer is not None and writer != want:
            self._changed_while_loading.append((origin, f"written by {writer}, not {want}"))
            return None
        items: list[SnapshotItem] = []
        rejected = 0
        for field, value in fields.items():
            try:
                slot, kind, key = decode_field(field)
                expires, data = decode_value(value)
            except ValueError:
                rejected += 1
                continue
            items.append(SnapshotItem(slot, kind, key, data, expires))
        return _Loaded(int(meta["incarnation"]), int(meta["sequence"]),
                       int(meta.get("written_ms", "0")), items, rejected)

    def _role_changed(self, old: Role, new: Role, slot: Any) -> None:
        if old is Role.STARTING:
            self._load_machine.discovered()  # apply before the first claim is evaluated
        if new is Role.MASTER and slot is not None:
            self._slots[slot.slot_id] = \
                f"{self.node.epoch}:{self.me}:{int(self.clock.seconds() * 1000)}:{self.node_name}"
            self._schedule(0.0)

    def _apply(self) -> None:
        """Apply what was loaded: only origins not alive, only over older positions."""
        self.loaded.set()  # as ready(): the machine is in "applied" already
        loaded, self._loaded = self._loaded or {}, None
        report: dict[str, Any] = {"origins": {}, "records": 0, "skipped": {},
                                  "slots": {}, "rejected": 0}
        for origin, why in self._changed_while_loading:
            report["skipped"][str(origin)] = why
        for origin, data in sorted(loaded.items()):
            report["rejected"] += data.rejected
            pos = self.state.position(origin)
            if self.alive(origin):
                report["skipped"][str(origin)] = "alive"
                continue
            if pos is not None and (pos.incarnation, pos.sequence) >= \
                    (data.incarnation, data.sequence):
                report["skipped"][str(origin)] = "newer here"
                continue
            begin = SnapshotBegin(origin, data.incarnation, data.sequence)
            end = SnapshotEnd(origin, data.incarnation, data.sequence, len(data.items))
            try:
                result = self.state.apply_snapshot(begin, data.items, end)
            except Exception as e:  # a snapshot that does not hold together: skip it
                report["skipped"][str(origin)] = f"invalid: {e}"
                continue
            if result is ApplyResult.APPLIED:
                count = sum(1 for _ in self.state.records(origin=origin))
                report["origins"][str(origin)] = {
                    "incarnation": data.incarnation, "sequence": data.sequence,
                    "records": count, "written_ms": data.written_ms}
                report["records"] += count
            else:
                report["skipped"][str(origin)] = result.value
        for slot, (epoch, holder) in sorted(self._slot_table.items()):
            if slot in self.node.known_epochs or slot in self.node.last_holder:
                continue  # heard of from the cluster itself: that is newer
            if holder == self.me or self.alive(holder):
                continue  # its master is back: it is no dead master to take over from
            self.node.known_epochs[slot] = epoch
            self.node.last_holder[slot] = holder
            report["slots"][str(slot)] = {"epoch": epoch, "master": holder}
        self.load_report = report
        if self._load_timer is not None and self._load_timer.active():
            self._load_timer.cancel()
        self._load_timer = None
        log.info("durable store: loaded {records} record(s) of {origins} origin(s) from "
                 "Redis; slots seeded: {slots}; skipped: {skipped}", records=report["records"],
                 origins=len(report["origins"]), slots=report["slots"] or "none",
                 skipped=report["skipped"] or "none")
        self._start_writing()

    # -- writing ----------------------------------------------------------------------------

    def _start_writing(self) -> None:
        if not self._writing:
            self._writing = True
            self._mark_full()
            self._schedule(0.0)

    def _mark_full(self) -> None:
        self._dirty.clear()
        self._full = True
        if self._behind_since is None:
            self._behind_since = self.clock.seconds()

    def _changed(self, op: str, origin: int, slot: int, kind: Kind, key: str,
                 value: bytes) -> None:
        if origin != self.me or self._full:
            return
        if self.redis.state != "up":
            self._mark_full()  # stop queueing: one full resync when Redis is back
            return
        dirty = self._dirty
        dirty.add((slot, kind, key))
        if len(dirty) > self.max_pending:
            self.overflows += 1
            self._mark_full()
        self._schedule(self.flush_interval)

    def _schedule(self, delay: float) -> None:
        if (not self._running or not self._writing or self._busy or self._timer is not None
                or not (self._full or self._dirty or self._slots)
                or self.redis.state != "up"):
            return
        self._timer = self.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._flush().addErrback(
            lambda f: log.failure("durable store: flush bookkeeping failed", f))

    def _flush(self) -> Deferred[None]:
        if self._busy:
            return defer.succeed(None)
        self._busy = True
        d = self._write_once()

        def done(result: object) -> None:
            self._busy = False
            if isinstance(result, Failure):
                self.write_errors += 1
                self.last_error = result.getErrorMessage()
                log.warn("durable store: write to Redis failed ({error}); full resync "
                         "when it answers", error=self.last_error)
                self._mark_full()
            self._schedule(self.flush_interval)
        d.addBoth(done)
        return d

    @inlineCallbacks
    def _write_once(self) -> Generator[Deferred[Any], Any, None]:
        if self.redis.state != "up":
            self._mark_full()
            return
        slots, self._slots = self._slots, {}
        if slots:
            try:
                yield self.redis.execute("HSET", self.prefix + "slots",
                                         *[x for s, v in slots.items() for x in (str(s), v)])
            except Exception:
                for s, v in slots.items():
                    self._slots.setdefault(s, v)
                raise
        if self._full:
            yield self._resync()
        elif self._dirty:
            yield self._incremental()

    def _keys(self) -> tuple[str, str, str]:
        base = f"{self.prefix}origin:{self.me}:"
        return base + "meta", base + "records", base + "resync"

    def _incremental(self) -> Deferred[None]:
        dirty, self._dirty = self._dirty, set()
        pos = self.state.position(self.me)
        assert pos is not None
        deletes: list[str] = []
        puts: list[Any] = []
        for slot, kind, key in dirty:
            record = self.state.get(self.me, slot, kind, key)
            field = encode_field(slot, kind, key)
            if record is None:
                deletes.append(field)
            else:
                puts += [field, encode_value(record.expires_ms, record.value)]
        meta, records, _ = self._keys()
        d = self.redis.execute("EVAL", WRITE_SCRIPT, 2, meta, records, str(pos.incarnation),
                               str(pos.sequence), str(int(self.clock.seconds() * 1000)),
                               self.node_name, str(len(deletes)), *deletes, *puts)

        def written(reply: Any) -> None:
            if _text(reply) == "resync":
                self._mark_full()
                self._schedule(0.0)
                return
            self.flushes += 1
            self.records_written += len(dirty)
            self._written(pos.incarnation, pos.sequence)
        return d.addCallback(written)

    @inlineCallbacks
    def _resync(self) -> Generator[Deferred[Any], Any, None]:
        # the origin at one position; later changes go to the dirty set meanwhile
        pos = self.state.position(self.me)
        assert pos is not None
        records = list(self.state.records(origin=self.me))
        self._full = False
        self._dirty.clear()
        meta, main, scratch = self._keys()
        yield self.redis.execute("DEL", scratch)
        chunk: list[Any] = []
        size = 0
        for i, record in enumerate(records):
            value = encode_value(record.expires_ms, record.value)
            chunk += [encode_field(record.slot, record.kind, record.key), value]
            size += len(value)
            if len(chunk) >= 2 * CHUNK_RECORDS or size >= CHUNK_BYTES or i == len(records) - 1:
                yield self.redis.execute("HSET", scratch, *chunk)
                chunk, size = [], 0
        yield self.redis.execute("EVAL", FINISH_SCRIPT, 3, meta, main, scratch,
                                 str(pos.incarnation), str(pos.sequence),
                                 str(int(self.clock.seconds() * 1000)), self.node_name)
        self.resyncs += 1
        self.flushes += 1
        self.records_written += len(records)
        if not self._full:
            self._behind_since = None
        self._written(pos.incarnation, pos.sequence)

    def _written(self, incarnation: int, sequence: int) -> None:
        self.written = (incarnation, sequence)
        self.written_at = self.clock.seconds()
        self.last_error = None

    # -- status -----------------------------------------------------------------------------

    def stats(self) -> DurableStats:
        pos = self.state.position(self.me)
        current = (pos.incarnation, pos.sequence) if pos is not None else None
        if not self._writing:
            state = "loading"
        elif self._full or self.written is None or self.written[0] != (current or (0,))[0]:
            state = "dirty"  # a full resync is due (Redis down, overflow, new run)
        elif current is not None and self.written < current:
            state = "behind"
        else:
            state = "in-sync"
        lag = None
        if current is not None and self.written is not None and \
                self.written[0] == current[0]:
            lag = current[1] - self.written[1]
        report = self.load_report
        return DurableStats(
            state=state, written=self.written, position=current, lag_changes=lag,
            written_at=self.written_at, dirty_since=self._behind_since,
            pending=len(self._dirty), max_pending=self.max_pending, flushes=self.flushes,
            resyncs=self.resyncs, overflows=self.overflows,
            records_written=self.records_written, write_errors=self.write_errors,
            last_error=self.last_error, load=DurableLoad(
                state=self.load_state, error=self.load_error,
                origins=report.get("origins", {}), records=report.get("records", 0),
                skipped=report.get("skipped", {}), slots=report.get("slots", {}),
                rejected=report.get("rejected", 0)))

    def status(self) -> dict[str, Any]:
        return self.stats().as_status()
