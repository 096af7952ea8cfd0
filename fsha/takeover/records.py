"""Where the dead master's rows come from: the replicated state (or nothing)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from fsha.config import NodeConfig, SlotConfig
from fsha.fsdb import (
    RecordValueError,
    RecoveryRow,
    RegistrationRow,
    decode_call_row,
    decode_registration,
)
from fsha.wire.stream import Kind

log = Logger(namespace="fsha.takeover")

#: replicated records decoded per reactor turn by a takeover (ReplicatedRecords): ~10 ms
RECORDS_CHUNK = 1000


class SlotRecords(Protocol):
    """The replicated rows a successor of ``previous`` needs for ``slot``."""

    def rows_for(self, slot: SlotConfig, previous: NodeConfig | None,
                 progress: Callable[[], None] | None = None
                 ) -> (tuple[list[RecoveryRow], list[RegistrationRow]]
                       | Deferred[tuple[list[RecoveryRow], list[RegistrationRow]]]):
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
        held = {(r.kind, r.key) for r in live}
        live.extend(r for r in self.state.retired(origin)
                    if r.slot == slot.slot_id and (r.kind, r.key) not in held)
        return live

    def _decode(self, records: Sequence[Any], previous: NodeConfig,
                calls: list[RecoveryRow], regs: list[RegistrationRow]) -> None:
        for record in records:
            try:
                if record.kind is Kind.CALL:
                    calls.append(decode_call_row(record.value))
                elif record.kind is Kind.REGISTRATION:
                    regs.append(decode_registration(record.value))
            except RecordValueError as e:
                self.rejected += 1
                log.warn("replicated {kind} record {key} of {node} skipped: {error}",
                         kind=record.kind.name, key=record.key, node=previous.name,
                         error=str(e))

    def rows_for(self, slot: SlotConfig, previous: NodeConfig | None,
                 progress: Callable[[], None] | None = None
                 ) -> (tuple[list[RecoveryRow], list[RegistrationRow]]
                       | Deferred[tuple[list[RecoveryRow], list[RegistrationRow]]]):
        if previous is None:
            return [], []
        records = self._records(slot, previous)
        calls: list[RecoveryRow] = []
        regs: list[RegistrationRow] = []
        if self.clock is None:
            self._decode(records, previous, calls, regs)
            return calls, regs
        return self._paced(records, previous, calls, regs, progress)

    @inlineCallbacks
    def _paced(self, records: list[Any], previous: NodeConfig, calls: list[RecoveryRow],
               regs: list[RegistrationRow], progress: Callable[[], None] | None
               ) -> Generator[Any, Any, tuple[list[RecoveryRow], list[RegistrationRow]]]:
        assert self.clock is not None
        for start in range(0, len(records), self.chunk):
            self._decode(records[start:start + self.chunk], previous, calls, regs)
            if progress is not None:
                progress()
            if start + self.chunk < len(records):
                # the reactor's turn: timers (heartbeats, the detector) and sockets
                yield deferLater(self.clock, 0, lambda: None)
        return calls, regs
