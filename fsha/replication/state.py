"""The replicated state every node holds: the records of every origin, and their logs.

Model
-----
Each node is the *origin* of the records it writes (a master writes its calls,
registrations, identity and limit usage). An origin numbers its writes: (incarnation,
sequence), sequence 1, 2, 3... within one incarnation (one run of the process). Every node
applies every origin's changes in that order, idempotently:

- the next sequence of the current incarnation is applied;
- an already applied sequence, or an older incarnation, is a duplicate and ignored;
- sequence 1 of a newer incarnation starts that incarnation: the origin's records of the
  previous incarnation are *retired* (kept readable for a takeover in progress, dropped after
  ``retain_retired`` seconds or by :meth:`ReplicatedState.forget_retired`) and the new
  incarnation starts empty;
- anything else is a gap: not applied; the link must resume or resynchronise.

Records live in one namespace per origin, keyed by (slot, kind, key). Only the origin orders
its own writes, so keeping each origin's records apart makes the merged state independent of
how the origins' streams interleave, with no clock shared between nodes. A record of origin
O is dropped when O deletes it, when its expiry passes on this node's (injected) clock,
when O starts a new incarnation (retired), or when another node masters its slot now and
holds its own copy (:meth:`ReplicatedState.set_owners`, :meth:`~ReplicatedState.
drop_superseded`; the origin's log is released then, or it would keep the values alive).

Every node keeps the last ``log_limit`` changes of each origin's current incarnation, so any
node can serve a peer that resumes from a position (:meth:`catch_up`); when the log no
longer reaches back, the peer gets a snapshot of the origin instead (:meth:`snapshot`,
:meth:`apply_snapshot`).

:meth:`digest` covers every live record and every origin's position, so two nodes holding
the same state have equal digests whatever order they received things in. It is maintained
incrementally (XOR of one BLAKE2b hash per record), so it costs nothing per change beyond
that hash and can be shown in the status at any time.

This module does no I/O; time comes from an injected ``IReactorTime``.

Why about 630 lines: applying, retiring, superseding, the logs and snapshots all keep
one per-origin table and its incremental digest consistent.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from twisted.internet.interfaces import IReactorTime

from fsha.wire import stream
from fsha.wire.stream import Change, Kind, Op, Position, SnapshotBegin, SnapshotEnd, SnapshotItem

__all__ = [
    "DEFAULT_LOG_LIMIT",
    "ApplyResult",
    "Record",
    "ReplicatedState",
    "SnapshotError",
]

#: Changes kept per origin for resuming peers.
DEFAULT_LOG_LIMIT: Final = 100_000
_RECORD_HASH: Final = struct.Struct(">HHBQ")
_POSITION: Final = struct.Struct(">HQQ")

#: What a slot's current master replicates again itself, so that its copy supersedes any
#: other origin's at once (:meth:`ReplicatedState.set_owners`): the bulk of a big slot.
#: Calls and identities wait for :mod:`fsha.retire` (the limits read a dead master's calls
#: after its takeover).
EARLY_SUPERSEDED: Final = frozenset((Kind.REGISTRATION,))
#: The same without ``[limits]``: then nothing reads a previous master's calls once the
#: slot has a new master (a takeover reads its previous master's records only, and the new
#: master is that from now on), so its copy of a call supersedes the others' at once too,
#: rather than a second copy of every call sitting on every node for the retire grace.
EARLY_SUPERSEDED_NO_LIMITS: Final = frozenset((Kind.REGISTRATION, Kind.CALL))
#: The expiry heap is rebuilt once it holds this many entries more than twice the records.
_HEAP_SLACK: Final = 4096

#: (op "put" | "delete", origin, slot, kind, key, value)
Listener = Callable[[str, int, int, Kind, str, bytes], object]


class ApplyResult(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # already applied, or of an older incarnation: ignored
    GAP = "gap"  # changes are missing before this one: not applied, resume or resync
    CONFLICT = "conflict"  # a change of this node's own origin that it did not write


class SnapshotError(Exception):
    """A snapshot whose begin, items and end do not agree."""


@dataclass(frozen=True, slots=True)
class Record:
    origin: int
    slot: int
    kind: Kind
    key: str
    value: bytes
    expires_ms: int  # Unix time in milliseconds; 0 = never

    def __lt__(self, other: Record) -> bool:
        """By expiry: the state's expiry heap holds the records themselves."""
        return self.expires_ms < other.expires_ms


#: One origin's records: (slot, kind) -> key -> record. Nested rather than keyed by a
#: (slot, kind, key) tuple: at 110,000 records the tuples alone would cost 7 MB a node.
_Table = dict[tuple[int, Kind], dict[str, Record]]
#: An entry of an origin's log: the record a PUT stored, or the (slot, kind, key) a DELETE
#: removed; the change is rebuilt from it when a peer needs it (:meth:`ReplicatedState.
#: catch_up`), so the log costs a reference per change, not a second object holding the
#: same value.
_Logged = Record | tuple[int, Kind, str]


class _Log:
    """The last ``limit`` changes of one origin, sliceable by index in O(slice length).

    A list with a moving start: appending past the limit drops (and releases) the oldest
    change; the list is compacted once half of it is released slots, so appends stay O(1)
    amortised and a slice near the end does not walk the whole log (as a deque would).
    """

    __slots__ = ("_items", "_limit", "_start")

    def __init__(self, limit: int) -> None:
        self._items: list[_Logged | None] = []
        self._start = 0
        self._limit = limit

    def __len__(self) -> int:
        return len(self._items) - self._start

    def append(self, entry: _Logged) -> None:
        items = self._items
        items.append(entry)
        if len(items) - self._start > self._limit:
            items[self._start] = None  # release the oldest change now
            self._start += 1
            if self._start >= 64 and self._start * 2 >= len(items):
                del items[:self._start]
                self._start = 0

    def clear(self) -> None:
        self._items = []
        self._start = 0

    def slice(self, start: int, stop: int | None = None) -> list[_Logged]:
        """Entries ``start`` (0 = the oldest held) up to ``stop`` (exclusive, None = all)."""
        base = self._start
        end = len(self._items) if stop is None else min(len(self._items), base + stop)
        return self._items[base + start:end]  # type: ignore[return-value]


class _Origin:
    """One origin's current incarnation: position, records and recent log."""

    __slots__ = ("incarnation", "log", "records", "retired", "retired_at", "sequence")

    def __init__(self, incarnation: int, log_limit: int) -> None:
        self.incarnation = incarnation
        self.sequence = 0
        self.records: _Table = {}
        self.log = _Log(log_limit)
        self.retired: _Table = {}  # records of the previous incarnation
        self.retired_at = 0.0

    @property
    def first_logged(self) -> int:
        """The sequence of the oldest change in the log (sequence + 1 if it is empty)."""
        return self.sequence - len(self.log) + 1


def _record_hash(record: Record) -> int:
    h = hashlib.blake2b(_RECORD_HASH.pack(record.origin, record.slot, record.kind,
                                          record.expires_ms), digest_size=16)
    key = record.key.encode("utf-8")
    h.update(len(key).to_bytes(2, "big"))
    h.update(key)
    h.update(record.value)
    return int.from_bytes(h.digest(), "big")


def _lookup(table: _Table, slot: int, kind: Kind, key: str) -> Record | None:
    group = table.get((slot, kind))
    return None if group is None else group.get(key)


def _pop(table: _Table, slot: int, kind: Kind, key: str) -> Record | None:
    group = table.get((slot, kind))
    if group is None:
        return None
    record = group.pop(key, None)
    if not group:
        del table[(slot, kind)]  # a dict never shrinks: an emptied big one goes whole
    return record


def _all(table: _Table) -> Iterator[Record]:
    for group in table.values():
        yield from group.values()


class ReplicatedState:
    """All origins' records and logs as this node knows them.

    ``node`` and ``incarnation`` are this node's own origin: :meth:`put` and :meth:`delete`
    write to it. Changes from peers go through :meth:`apply` / :meth:`apply_snapshot`.

    Memory (issue 16: 110,000 records on every node): a record is stored once, as a
    :class:`Record` in its origin's nested table; the log and the expiry heap refer to that
    same object, and a record's digest hash is computed again when it goes rather than kept.
    """

    def __init__(self, clock: IReactorTime, node: int, incarnation: int, *,
                 log_limit: int = DEFAULT_LOG_LIMIT, retain_retired: float = 300.0,
                 early_superseded: frozenset[Kind] = EARLY_SUPERSEDED) -> None:
        if log_limit < 1:
            raise ValueError("log_limit must be at least 1")
        if not 0 <= node < stream.NO_NODE:
            raise ValueError(f"node {node} is not a node id")
        if incarnation < 1:
            raise ValueError("incarnation must be at least 1")
        self._clock = clock
        self._node = node
        self._log_limit = log_limit
        self._retain = retain_retired
        self._origins: dict[int, _Origin] = {node: _Origin(incarnation, log_limit)}
        self._xor = 0
        self._size = 0  # live records of every origin
        self._counts: dict[int, dict[Kind, int]] = {}
        #: the records with an expiry (ordered by it); an entry whose record was replaced
        #: or dropped stays until due or until the heap is rebuilt
        self._expiry: list[Record] = []
        self._owners: dict[int, int] = {}  # slot -> origin of its master (set_owners)
        self._early = early_superseded  # kinds the owner's copy supersedes at once
        self.superseded = 0  # records dropped because the slot's master holds its own copy
        self.last_frame = b""
        self.last_change: Change | None = None
        self._listeners: dict[Kind, list[Listener]] = {}

    def add_listener(self, kind: Kind, listener: Listener) -> None:
        """Call ``listener(op, origin, slot, kind, key, value)`` (op ``"put"`` or
        ``"delete"``; value ``b""`` for a delete) whenever a record of ``kind`` is stored or
        dropped, whatever the cause (local write, peer change, snapshot, retirement,
        expiry). For indexes of small kinds: it runs inside the state's bookkeeping."""
        self._listeners.setdefault(kind, []).append(listener)

    # -- reading ----------------------------------------------------------------------------

    @property
    def node(self) -> int:
        return self._node

    @property
    def incarnation(self) -> int:
        return self._origins[self._node].incarnation

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def position(self, origin: int) -> Position | None:
        o = self._origins.get(origin)
        return None if o is None else Position(origin, o.incarnation, o.sequence)

    def positions(self) -> tuple[Position, ...]:
        """Every known origin's position, ordered by origin (what a HELLO or ACK carries)."""
        return tuple(Position(n, o.incarnation, o.sequence)
                     for n, o in sorted(self._origins.items()))

    def get(self, origin: int, slot: int, kind: Kind, key: str) -> Record | None:
        o = self._origins.get(origin)
        record = None if o is None else _lookup(o.records, slot, kind, key)
        if record is None:
            return None
        if record.expires_ms and record.expires_ms <= self._now_ms():
            return None
        return record

    def records(self, *, origin: int | None = None, slot: int | None = None,
                kind: Kind | None = None) -> Iterator[Record]:
        """Live records, optionally of one origin / slot / kind."""
        now = self._now_ms()
        origins = (self._origins.values() if origin is None
                   else [self._origins[origin]] if origin in self._origins else [])
        for o in origins:
            for (s, k), group in o.records.items():
                if (slot is not None and s != slot) or (kind is not None and k != kind):
                    continue
                for record in group.values():
                    if record.expires_ms and record.expires_ms <= now:
                        continue
                    yield record

    def retired(self, origin: int) -> list[Record]:
        """The records ``origin``'s previous incarnation left (e.g. for a takeover)."""
        o = self._origins.get(origin)
        return [] if o is None else list(_all(o.retired))

    def forget_retired(self, origin: int) -> None:
        o = self._origins.get(origin)
        if o is not None:
            o.retired = {}

    def drop_superseded(self, origin: int, slot: int, kinds: Iterable[Kind]) -> int:
        """Drop ``origin``'s records of ``slot`` of these kinds (live and retired) on this
        node, with no change written: another node masters the slot now and replicates its
        calls and registrations under its own origin (:mod:`fsha.retire`; every node does
        the same from the same cluster view). Never for this node's own origin, whose
        records go by replicated deletes. Returns how many live records went."""
        if origin == self._node:
            raise ValueError("this node's own records are deleted, not dropped")
        o = self._origins.get(origin)
        if o is None:
            return 0
        n = 0
        for kind in set(kinds):
            group = o.records.pop((slot, kind), None)
            if group is not None:
                for record in group.values():
                    self._forget(record)
                n += len(group)
            o.retired.pop((slot, kind), None)
        if n:
            self._release_log(o)
        return n

    def set_owners(self, owners: dict[int, int]) -> int:
        """Slot -> the origin of its master now (the cluster view, the same on every node).
        From then on a record of the early superseded kinds (:data:`EARLY_SUPERSEDED`, or
        :data:`EARLY_SUPERSEDED_NO_LIMITS`, as built) that the slot's owner holds
        supersedes the same record (slot, kind, key) of every other origin: dropped on this
        node at once, with no change written, live and retired (never this node's own
        records, which go by replicated deletes). After a takeover the new master's feeds
        replicate the slot's registrations again, so every node holds one copy of each
        rather than two until :mod:`fsha.retire` drops the dead master's. Returns how many
        records this call dropped (those the owner already held)."""
        n = 0
        for slot in [s for s in self._owners if s not in owners]:
            del self._owners[slot]
        for slot, origin in owners.items():
            if self._owners.get(slot) == origin:
                continue
            self._owners[slot] = origin
            o = self._origins.get(origin)
            if o is not None:
                for kind in self._early:
                    for key in list(o.records.get((slot, kind), ())):
                        n += self._supersede(origin, slot, kind, key)
        return n

    def _supersede(self, owner: int, slot: int, kind: Kind, key: str) -> int:
        n = 0
        for origin, o in self._origins.items():
            if origin == owner or origin == self._node:
                continue
            if self._remove(o, slot, kind, key):
                n += 1
                self._release_log(o)
            if o.retired:
                _pop(o.retired, slot, kind, key)
        self.superseded += n
        return n

    @staticmethod
    def _release_log(o: _Origin) -> None:
        """Forget an origin's log once some of its records were dropped: it would keep
        their values alive (for a dead master, forever). A peer behind on that origin then
        gets a snapshot of it instead of the changes."""
        if len(o.log):
            o.log.clear()

    def counts(self) -> dict[int, dict[Kind, int]]:
        """Records held per slot and kind (all origins; expired ones go at :meth:`expire`)."""
        return {slot: {kind: n for kind, n in kinds.items() if n}
                for slot, kinds in self._counts.items() if any(kinds.values())}

    def __len__(self) -> int:
        return self._size

    def digest(self) -> bytes:
        """16 bytes equal on two nodes holding the same records at the same positions."""
        h = hashlib.blake2b(self._xor.to_bytes(16, "big"), digest_size=16)
        for n, o in sorted(self._origins.items()):
            if o.sequence or o.records:  # an origin that never wrote anything is no state
                h.update(_POSITION.pack(n, o.incarnation, o.sequence))
        return h.digest()

    # -- record bookkeeping -----------------------------------------------------------------

    def _store(self, o: _Origin, record: Record) -> None:
        group = o.records.get((record.slot, record.kind))
        if group is None:
            group = o.records[(record.slot, record.kind)] = {}
        old = group.get(record.key)
        if old is not None:
            self._xor ^= _record_hash(old)
        else:
            kinds = self._counts.setdefault(record.slot, {})
            kinds[record.kind] = kinds.get(record.kind, 0) + 1
            self._size += 1
        self._xor ^= _record_hash(record)
        group[record.key] = record
        if record.kind in self._listeners:
            for listener in self._listeners[record.kind]:
                listener("put", record.origin, record.slot, record.kind, record.key,
                         record.value)
        if record.expires_ms:
            heap = self._expiry
            heapq.heappush(heap, record)
            if len(heap) > self._size + self._size // 4 + _HEAP_SLACK:
                # amortised (after a quarter as many pushes as records): the entries of
                # replaced records hold their old values
                self._rebuild_expiry()
        if record.kind in self._early and self._owners.get(record.slot) == record.origin:
            self._supersede(record.origin, record.slot, record.kind, record.key)

    def _rebuild_expiry(self) -> None:
        """Only the live records' expiries: a replaced or deleted record leaves its entry
        (and value) in the heap until it is due, days for a registration."""
        heap = [r for o in self._origins.values() for r in _all(o.records) if r.expires_ms]
        heapq.heapify(heap)
        self._expiry = heap

    def _forget(self, record: Record) -> None:
        """The bookkeeping of a record that is no longer held (already out of its table)."""
        self._xor ^= _record_hash(record)
        self._counts[record.slot][record.kind] -= 1
        self._size -= 1
        if record.kind in self._listeners:
            for listener in self._listeners[record.kind]:
                listener("delete", record.origin, record.slot, record.kind, record.key, b"")

    def _remove(self, o: _Origin, slot: int, kind: Kind, key: str) -> bool:
        record = _pop(o.records, slot, kind, key)
        if record is None:
            return False
        self._forget(record)
        return True

    def _new_incarnation(self, origin: int, o: _Origin | None, incarnation: int) -> _Origin:
        fresh = _Origin(incarnation, self._log_limit)
        if o is not None:
            fresh.retired = o.records  # the same objects, retired
            fresh.retired_at = self._clock.seconds()
            o.records = {}
            for record in _all(fresh.retired):
                self._forget(record)
        self._origins[origin] = fresh
        return fresh

    def _apply_record(self, o: _Origin, change: Change) -> _Logged:
        """Apply a change to ``o``'s records; returns what its log keeps of it."""
        if change.op is Op.DELETE:
            self._remove(o, change.slot, change.kind, change.key)
            return (change.slot, change.kind, change.key)
        record = Record(change.origin, change.slot, change.kind, change.key, change.value,
                        change.expires_ms)
        if change.expires_ms and change.expires_ms <= self._now_ms():
            self._remove(o, change.slot, change.kind, change.key)  # already expired
        else:
            self._store(o, record)
        return record

    def _change(self, origin: int, incarnation: int, sequence: int, entry: _Logged) -> Change:
        """The change a log entry stands for."""
        if isinstance(entry, Record):
            return Change(origin, incarnation, sequence, entry.slot, entry.kind, entry.key,
                          Op.PUT, entry.value, entry.expires_ms)
        slot, kind, key = entry
        return Change(origin, incarnation, sequence, slot, kind, key, Op.DELETE, b"", 0)

    # -- writing (this node's own origin) ---------------------------------------------------

    def _local(self, slot: int, kind: Kind, key: str, op: Op, value: bytes,
               expires_ms: int) -> Change:
        o = self._origins[self._node]
        change = Change(self._node, o.incarnation, o.sequence + 1, slot, kind, key, op, value,
                        expires_ms)
        #: the last local change and its frame, so a sender need not encode it again
        self.last_frame = stream.encode(change)  # validates every field; raises ValueError
        self.last_change = change
        o.sequence += 1
        o.log.append(self._apply_record(o, change))
        return change

    def put(self, slot: int, kind: Kind, key: str, value: bytes, expires_ms: int = 0
            ) -> Change:
        """Write a record of this node's origin; returns the change to send to peers."""
        return self._local(slot, kind, key, Op.PUT, value, expires_ms)

    def delete(self, slot: int, kind: Kind, key: str) -> Change | None:
        """Delete a record of this node's origin; None if there was none."""
        if _lookup(self._origins[self._node].records, slot, kind, key) is None:
            return None
        return self._local(slot, kind, key, Op.DELETE, b"", 0)

    # -- applying peers' changes ------------------------------------------------------------

    def apply(self, change: Change) -> ApplyResult:
        """Apply one change received from a peer (any origin, any order, any repetition)."""
        origin = change.origin
        o = self._origins.get(origin)
        if o is not None and change.incarnation == o.incarnation:
            if change.sequence <= o.sequence:
                return ApplyResult.DUPLICATE
            if origin == self._node:
                return ApplyResult.CONFLICT
            if change.sequence != o.sequence + 1:
                return ApplyResult.GAP
        elif o is not None and change.incarnation < o.incarnation:
            return ApplyResult.DUPLICATE
        else:  # unknown origin, or a newer incarnation
            if origin == self._node:
                return ApplyResult.CONFLICT
            if change.sequence != 1:
                return ApplyResult.GAP
            o = self._new_incarnation(origin, o, change.incarnation)
        o.sequence = change.sequence
        o.log.append(self._apply_record(o, change))
        return ApplyResult.APPLIED

    # -- resuming and snapshots -------------------------------------------------------------

    def catch_up(self, origin: int, peer: Position | None, limit: int | None = None
                 ) -> list[Change] | None:
        """The changes a peer at ``peer`` lacks of ``origin``; None: it needs a snapshot.

        An empty list means the peer has everything this node has of that origin (or more).
        ``limit`` caps the number of changes returned (the oldest first), so a sender can
        pull a bounded batch at a time; the cost is proportional to the batch, not the log.
        """
        o = self._origins.get(origin)
        if o is None:
            return []
        if peer is not None and peer.incarnation > o.incarnation:
            return []
        have = peer.sequence if peer is not None and peer.incarnation == o.incarnation else 0
        if have >= o.sequence:
            return []
        first = o.first_logged
        if have + 1 < first:
            return None
        start = have + 1 - first
        entries = o.log.slice(start, None if limit is None else start + limit)
        return [self._change(origin, o.incarnation, have + 1 + i, entry)
                for i, entry in enumerate(entries)]

    def observe_incarnation(self, origin: int, incarnation: int) -> bool:
        """A peer announced (in its HELLO) that ``origin`` now runs ``incarnation``.

        If that is newer than what this node holds, the origin's records are retired (as
        when sequence 1 of the new incarnation arrives) and its position becomes
        (incarnation, 0), so a node that restarted and wrote nothing yet does not leave its
        previous run's records live on its peers. Returns True if something changed.
        """
        if origin == self._node or not 0 <= origin < stream.NO_NODE or incarnation < 1:
            return False
        o = self._origins.get(origin)
        if o is not None and incarnation <= o.incarnation:
            return False
        self._new_incarnation(origin, o, incarnation)
        return True

    def snapshot(self, origin: int) -> tuple[SnapshotBegin, list[SnapshotItem], SnapshotEnd]:
        """The live records of ``origin`` and its position, as snapshot frames."""
        o = self._origins[origin]
        now = self._now_ms()
        items = [SnapshotItem(r.slot, r.kind, r.key, r.value, r.expires_ms)
                 for r in _all(o.records)
                 if not r.expires_ms or r.expires_ms > now]
        return (SnapshotBegin(origin, o.incarnation, o.sequence), items,
                SnapshotEnd(origin, o.incarnation, o.sequence, len(items)))

    def apply_snapshot(self, begin: SnapshotBegin, items: Iterable[SnapshotItem],
                       end: SnapshotEnd) -> ApplyResult:
        """Replace ``begin.origin``'s records with a snapshot; raises SnapshotError."""
        items = list(items)
        if (begin.origin, begin.incarnation, begin.sequence) != \
                (end.origin, end.incarnation, end.sequence):
            raise SnapshotError(f"snapshot begin {begin} and end {end} disagree")
        if end.count != len(items):
            raise SnapshotError(f"snapshot announces {end.count} items, carries {len(items)}")
        if len({(i.slot, i.kind, i.key) for i in items}) != len(items):
            raise SnapshotError("snapshot holds a record twice")
        origin = begin.origin
        if origin == self._node:
            return ApplyResult.CONFLICT
        o = self._origins.get(origin)
        if o is not None and (begin.incarnation, begin.sequence) <= (o.incarnation, o.sequence):
            return ApplyResult.DUPLICATE
        if o is None or begin.incarnation > o.incarnation:
            o = self._new_incarnation(origin, o, begin.incarnation)
        else:
            old, o.records = o.records, {}
            for record in _all(old):
                self._forget(record)
        o.sequence = begin.sequence
        o.log.clear()
        now = self._now_ms()
        for i in items:
            if not i.expires_ms or i.expires_ms > now:
                self._store(o, Record(origin, i.slot, i.kind, i.key, i.value, i.expires_ms))
        return ApplyResult.APPLIED

    # -- time -------------------------------------------------------------------------------

    def expire(self) -> int:
        """Drop records whose expiry has passed and stale retired records; returns how many
        live records were dropped. Call it periodically (e.g. every second)."""
        now = self._now_ms()
        dropped = 0
        heap = self._expiry
        while heap and heap[0].expires_ms <= now:
            record = heapq.heappop(heap)
            o = self._origins.get(record.origin)
            # the record itself, not one that replaced it (or a later incarnation's)
            if o is not None and _lookup(o.records, record.slot, record.kind,
                                         record.key) is record:
                self._remove(o, record.slot, record.kind, record.key)
                dropped += 1
        seconds = self._clock.seconds()
        for o in self._origins.values():
            if o.retired and seconds - o.retired_at >= self._retain:
                o.retired = {}
        if len(self._expiry) > len(self) + len(self) // 4 + _HEAP_SLACK:
            self._rebuild_expiry()  # records went by drops (a dead master's): their values too
        return dropped

    def next_expiry(self) -> float | None:
        """When (clock seconds) the earliest pending expiry falls, or None."""
        return self._expiry[0].expires_ms / 1000 if self._expiry else None
