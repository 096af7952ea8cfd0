"""The slots a master feeds, and writing their records into the replicated state.

Shared by the call feed, the registration feed and the identity refresh
(``fsha.replication.feeds`` puts them together): which slots are fed (:class:`SlotFeed`,
with their counters), which slot a profile belongs to, and :meth:`FedSlots.put` /
:meth:`FedSlots.delete`, which write this node's own records and hand every change to
``publish`` (the replication links).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha.config import ClusterConfig, SlotConfig
from fsha.eslclient import ConnectionState
from fsha.replication.state import ReplicatedState
from fsha.wire.esl import Event, Headers
from fsha.wire.stream import Change, Kind

__all__ = ["FedSlots", "FeedsESL", "SlotFeed", "exact"]

log = Logger(namespace="fsha.replication.feeds")
_T = TypeVar("_T")


class FeedsESL(Protocol):
    """What the feeds use of :class:`fsha.eslclient.ESLClient`."""

    core_uuid: str | None

    @property
    def is_healthy(self) -> bool: ...

    def add_event_listener(self, callback: Callable[[Event], object],
                           name: str | None = None) -> None: ...

    def remove_event_listener(self, callback: Callable[[Event], object],
                              name: str | None = None) -> None: ...

    def subscribe(self, *names: str) -> Deferred[None]: ...

    def api(self, command: str, timeout: float | None = None) -> Deferred[str]: ...

    def add_state_listener(self, callback: Callable[[ConnectionState, ConnectionState],
                                                    object]) -> None: ...

    def add_restart_listener(self, callback: Callable[[str, str], object]) -> None: ...


class SlotFeed:
    """One fed slot: counters for the status."""

    __slots__ = ("calls", "deletes", "errors", "identity", "last_error",
                 "last_registration_sweep", "last_sweep", "puts", "registrations",
                 "rows_rejected", "since", "slot")

    def __init__(self, slot: SlotConfig, since: float) -> None:
        self.slot = slot
        self.since = since
        self.calls = 0
        self.registrations = 0
        self.puts = 0
        self.deletes = 0
        self.rows_rejected = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_sweep: float | None = None
        self.last_registration_sweep: float | None = None
        self.identity: Any = None  # fsha.replication.identity.Identity


def exact(headers: Headers, name: str, fallback: bool = True) -> str | None:
    """Header ``name`` spelt as FreeSWITCH spells it, found without building the headers'
    case-insensitive index (that costs more than decoding a 150-header event); then, if
    ``fallback``, any spelling."""
    try:
        return headers._values[headers._names.index(name)]
    except ValueError:
        return headers.get(name) if fallback else None


class FedSlots:
    """The fed slots and this node's records of them; see the module docstring."""

    def __init__(self, state: ReplicatedState, config: ClusterConfig, clock: IReactorTime,
                 publish: Callable[[Change], object] | None, apply_slice: int) -> None:
        self.state = state
        self.clock = clock
        self.publish = publish
        self.apply_slice = max(1, apply_slice)
        self.profile_slot: dict[str, SlotConfig] = {
            p: s for s in config.slots for p in s.profiles}
        self.fed: dict[int, SlotFeed] = {}
        self.running = False
        #: Bumped by every event that writes a record: a sweep that began before leaves
        #: such a record alone.
        self.gen = 0
        self.events_ignored = 0
        self.errors = 0
        self.last_error: str | None = None

    def next_gen(self) -> int:
        self.gen += 1
        return self.gen

    def fed_slot_of(self, profile: str | None) -> SlotFeed | None:
        """The fed slot of a profile; counts profiles of no slot as ignored."""
        if profile is None:
            return None
        slot = self.profile_slot.get(profile)
        if slot is None:
            self.events_ignored += 1
            return None
        return self.fed.get(slot.slot_id)

    def feed_of_profile(self, profile: str) -> SlotFeed | None:
        """The fed slot of a profile (nothing counted)."""
        slot = self.profile_slot.get(profile)
        return None if slot is None else self.fed.get(slot.slot_id)

    def profiles(self) -> list[str]:
        return [p for f in self.fed.values() for p in f.slot.profiles]

    # -- writing ----------------------------------------------------------------------------

    def emit(self, change: Change) -> None:
        if self.publish is not None:
            try:
                self.publish(change)
            except Exception:
                log.failure("Publishing a change failed")

    def put(self, feed: SlotFeed, kind: Kind, key: str, value: bytes,
            expires_ms: int = 0) -> bool:
        try:
            change = self.state.put(feed.slot.slot_id, kind, key, value, expires_ms)
        except ValueError as e:
            feed.rows_rejected += 1
            log.warn("Cannot replicate {kind} {key} of slot {slot}: {error}", kind=kind.name,
                     key=key[:200], slot=feed.slot.name, error=str(e))
            return False
        feed.puts += 1
        self.emit(change)
        return True

    def delete(self, slot_id: int, kind: Kind, key: str) -> None:
        change = self.state.delete(slot_id, kind, key)
        if change is None:
            return
        feed = self.fed.get(slot_id)
        if feed is not None:
            feed.deletes += 1
        self.emit(change)

    def own_value(self, slot_id: int, kind: Kind, key: str) -> bytes | None:
        record = self.state.get(self.state.node, slot_id, kind, key)
        return None if record is None else record.value

    # -- errors -----------------------------------------------------------------------------

    def error(self, message: str) -> None:
        repeated = message == self.last_error
        self.errors += 1
        self.last_error = message
        for feed in self.fed.values():
            feed.errors += 1
            feed.last_error = message
        if repeated:
            log.debug("Feeds: {error} (again)", error=message)
        else:
            log.warn("Feeds: {error}", error=message)

    def failed(self, failure: Failure, what: str) -> None:
        self.errors += 1
        self.last_error = f"{what}: {failure.getErrorMessage()}"
        log.failure("Feeds: unexpected error in {what}", failure=failure, what=what)

    # -- applying many rows -----------------------------------------------------------------

    def sliced(self, items: Sequence[_T], apply: Callable[[_T], None]) -> Deferred[None]:
        """``apply`` each item, ``apply_slice`` items per reactor turn, so that applying a
        sweep of 100k rows never blocks the reactor (heartbeats) for long."""
        d: Deferred[None] = Deferred()
        pos = 0
        n = self.apply_slice

        def step() -> None:
            nonlocal pos
            try:
                if self.running:
                    end = min(pos + n, len(items))
                    for i in range(pos, end):
                        apply(items[i])
                    pos = end
                if pos >= len(items) or not self.running:
                    d.callback(None)
                else:
                    self.clock.callLater(0, step)
            except Exception:
                d.errback()
        step()
        return d
