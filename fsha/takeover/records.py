"""Where the dead master's rows come from: the replicated state (or nothing)."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Any, Protocol, overload

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from fsha.config import NodeConfig, SlotConfig
from fsha.fsdb import (
    RecordValueError,
    RecoveryRow,
    RegistrationRow,
    decode_registration,
)
from fsha.fsdb.codecs import decode_call_row_packed
from fsha.wire.stream import Kind

log = Logger(namespace="fsha.takeover")

#: replicated records decoded per reactor turn by a takeover (ReplicatedRecords): ~10 ms
RECORDS_CHUNK = 1000


class EncodedRegistrations(Sequence[RegistrationRow]):
    """Registration rows kept as their replicated values, decoded when read (a page at a
    time by the restore).

    A takeover of a big slot holds 100,000 registrations until they are written: decoded,
    that is some 95 MB of small objects, and the allocator keeps their arenas after they
    are freed (the new master's own records take the same arenas meanwhile), so the
    node's resident size stayed 100 MB up after the takeover. The values here are the
    replicated state's own bytes objects (no copy); the profile and the expiry of each
    are kept beside them (a few bytes) for :meth:`select`.
    """

    __slots__ = ("_expires", "_profile", "_profiles", "_values")

    def __init__(self) -> None:
        self._values: list[bytes] = []
        self._expires = array("q")
        self._profile = array("H")  # index into _profiles
        self._profiles: list[str] = []

    def append(self, value: bytes, row: RegistrationRow) -> None:
        """``row``: ``value`` decoded (by the caller, which checked it)."""
        self._values.append(value)
        self._expires.append(max(0, min(row.expires, 2**63 - 1)))
        try:
            index = self._profiles.index(row.profile_name)
        except ValueError:
            index = len(self._profiles)
            self._profiles.append(row.profile_name)
        self._profile.append(index)

    def __len__(self) -> int:
        return len(self._values)

    @overload
    def __getitem__(self, index: int) -> RegistrationRow: ...

    @overload
    def __getitem__(self, index: slice) -> list[RegistrationRow]: ...

    def __getitem__(self, index: int | slice) -> RegistrationRow | list[RegistrationRow]:
        if isinstance(index, slice):
            return [decode_registration(v) for v in self._values[index]]
        return decode_registration(self._values[index])

    def __iter__(self) -> Iterator[RegistrationRow]:
        for value in self._values:
            yield decode_registration(value)

    def __delitem__(self, index: slice) -> None:
        """Let the first rows go (``del rows[:n]``: those written)."""
        del self._values[index], self._expires[index], self._profile[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, EncodedRegistrations)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def select(self, profiles: Iterable[str], now: float) -> EncodedRegistrations:
        """The rows of these profiles that have not expired at ``now`` (no decoding)."""
        wanted = {i for i, p in enumerate(self._profiles) if p in set(profiles)}
        out = EncodedRegistrations()
        out._profiles = list(self._profiles)
        for value, expires, profile in zip(self._values, self._expires, self._profile,
                                           strict=True):
            if profile in wanted and (expires == 0 or expires > now):
                out._values.append(value)
                out._expires.append(expires)
                out._profile.append(profile)
        return out


class SlotRecords(Protocol):
    """The replicated rows a successor of ``previous`` needs for ``slot``."""

    def rows_for(self, slot: SlotConfig, previous: NodeConfig | None,
                 progress: Callable[[], None] | None = None
                 ) -> (tuple[list[RecoveryRow], Sequence[RegistrationRow]]
                       | Deferred[tuple[list[RecoveryRow], Sequence[RegistrationRow]]]):
        """The rows, or a Deferred of them; ``progress`` is called after each part read
        (the ``records`` step's timeout counts from it)."""
        ...


class NoRecords:
    """No replication (yet): a takeover brings up the slot with no calls to recover."""

    def rows_for(self, slot: SlotConfig, previous: NodeConfig | None,
                 progress: Callable[[], None] | None = None
                 ) -> tuple[list[RecoveryRow], list[RegistrationRow]]:
        return [], []


class ReplicatedRecords:
    """:class:`SlotRecords` from a :class:`fsha.replication.state.ReplicatedState`.

    The records of origin ``previous`` for the slot: ``Kind.CALL`` values decoded with
    :func:`fsha.fsdb.decode_call_row`, ``Kind.REGISTRATION`` with
    :func:`~fsha.fsdb.decode_registration`; plus the records its previous
    incarnation left (retired) that the current one does not hold. A value that does not
    decode is skipped and counted (``rejected``).

    With a ``clock``, the values are decoded ``chunk`` records per reactor turn (a
    Deferred of the rows): decoding 10,000 calls and 100,000 registrations at once blocks
    the reactor for seconds, longer than the failure detector's ``dead_after``, so the
    claiming node's heartbeats stop and its peers (or it, reading late) end the claim.
    """

    def __init__(self, state: Any, clock: IReactorTime | None = None,
                 chunk: int = RECORDS_CHUNK) -> None:
        self.state = state  # fsha.replication.state.ReplicatedState
        self.clock = clock
        self.chunk = max(1, chunk)
        self.rejected = 0

    def _records(self, slot: SlotConfig, previous: NodeConfig) -> list[Any]:
        origin = previous.node_id
        live = list(self.state.records(origin=origin, slot=slot.slot_id))
        retired = [r for r in self.state.retired(origin) if r.slot == slot.slot_id]
        if retired:  # a set of 110,000 keys only when there is something to tell apart
            held = {(r.kind, r.key) for r in live}
            live.extend(r for r in retired if (r.kind, r.key) not in held)
        return live

    def _decode(self, records: Sequence[Any], previous: NodeConfig,
                calls: list[RecoveryRow], regs: EncodedRegistrations) -> None:
        for record in records:
            try:
                if record.kind is Kind.CALL:
                    # packed: each batch's metadata is inflated when it is written
                    calls.append(decode_call_row_packed(record.value))  # type: ignore[arg-type]
                elif record.kind is Kind.REGISTRATION:
                    regs.append(record.value, decode_registration(record.value))
            except RecordValueError as e:
                self.rejected += 1
                log.warn("replicated {kind} record {key} of {node} skipped: {error}",
                         kind=record.kind.name, key=record.key, node=previous.name,
                         error=str(e))

    def rows_for(self, slot: SlotConfig, previous: NodeConfig | None,
                 progress: Callable[[], None] | None = None
                 ) -> (tuple[list[RecoveryRow], Sequence[RegistrationRow]]
                       | Deferred[tuple[list[RecoveryRow], Sequence[RegistrationRow]]]):
        if previous is None:
            return [], []
        records = self._records(slot, previous)
        calls: list[RecoveryRow] = []
        regs = EncodedRegistrations()
        if self.clock is None:
            self._decode(records, previous, calls, regs)
            return calls, regs
        return self._paced(records, previous, calls, regs, progress)

    @inlineCallbacks
    def _paced(self, records: list[Any], previous: NodeConfig, calls: list[RecoveryRow],
               regs: EncodedRegistrations, progress: Callable[[], None] | None
               ) -> Generator[Any, Any, tuple[list[RecoveryRow], EncodedRegistrations]]:
        assert self.clock is not None
        for start in range(0, len(records), self.chunk):
            self._decode(records[start:start + self.chunk], previous, calls, regs)
            if progress is not None:
                progress()
            if start + self.chunk < len(records):
                # the reactor's turn: timers (heartbeats, the detector) and sockets
                yield deferLater(self.clock, 0, lambda: None)
        return calls, regs
