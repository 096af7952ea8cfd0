"""The replication session on one link: what each side serves the other, and at what pace.

A :class:`PeerSession` runs one direction-pair of a link between this node and one peer.
It does no I/O: frames come in through :meth:`PeerSession.frame_received`, bytes go out
through the ``write`` function it was given, the link is dropped through ``close``, and time
comes from an injected clock. The service glues it to a :class:`~fsha.replication.link.
LinkProtocol` and registers it as the link transport's push producer.

Why about 700 lines: serving and receiving share one set of positions, the flow control and
the snapshot hand-over of one link; the pieces that stand alone (the write times, the live
batches) are already classes of their own.

Serving (the sending half)
--------------------------
After both HELLOs, for every origin this node knows that the peer lacks, the session keeps a
*feed*: the position the peer has of that origin (from its HELLO, then advanced by what was
sent). A feed is pulled from the replicated state's change log in bounded batches
(``catch_up(origin, position, limit)``); when the log no longer reaches back, the origin is
sent as a snapshot (BEGIN, one ITEM per record, END) and the feed continues after it.

- This node's own origin is a *live* feed: it stays open and new local changes go out as the
  service offers them (:meth:`offer`, one encoded batch per reactor turn shared by every
  peer). Whenever the session cannot take a batch (paused, window full, not caught up) it
  simply does not; the changes stay in the state's log and are pulled when it can.
- Other origins' feeds end at the position this node had when the link came up: a node
  serves what it knows of a third node (e.g. a dead master's calls) to a peer that
  reconnects, but live changes travel only from their origin (each origin has a link to
  every node), which keeps the traffic linear in the number of peers.

There is no per-peer queue of changes, only a cursor into the shared log, so memory is
bounded by the log (``log_limit`` changes per origin) whatever the peer does. What may be
outstanding is bounded three ways: the transport's buffer (the session stops pulling when
the transport pauses it, ``IPushProducer``), the changes and bytes sent but not yet
acknowledged (``max_in_flight_changes`` / ``max_in_flight_bytes``), and the log itself: a
peer that falls further behind than the log is resynchronised by snapshot.

Receiving
---------
CHANGE frames are applied in order (:meth:`ReplicatedState.apply`): duplicates are counted
and ignored, a GAP or a CONFLICT (a change of this node's own origin it did not write)
closes the link; the peer resumes from the positions of the next HELLO. Snapshot items are
collected up to ``max_snapshot_bytes`` and applied at END. After applying, the session sends
one ACK per reactor turn with the state's positions.

Liveness
--------
A KEEPALIVE goes out when nothing was sent for ``keepalive_interval``; it carries this
node's clock and echoes the peer's last one, so each side measures the round trip. A link
on which nothing arrived for ``silence_timeout``, or whose changes in flight saw no ACK
progress for ``ack_timeout``, is closed (and redialled by the service).

Lag
---
Per peer, of this node's own origin: in changes (written minus acknowledged) and in ms (the
age of the oldest change the peer has not acknowledged, from :class:`WriteTimes`). Each ACK
also gives a sample of the replication delay: acknowledgement time minus write time of the
newest change it covers (``on_lag``).
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from fsha.replication.state import ApplyResult, ReplicatedState, SnapshotError
from fsha.replication.stats import SessionStats
from fsha.wire import stream
from fsha.wire.stream import (
    Ack,
    Change,
    Frame,
    Hello,
    Keepalive,
    Position,
    SnapshotBegin,
    SnapshotEnd,
    SnapshotItem,
)

__all__ = [
    "CLOSE_REASONS",
    "LiveBatch",
    "PeerSession",
    "SessionConfig",
    "WriteTimes",
]

log = Logger()

#: Every reason a session closes its link for (a counter label in the status).
CLOSE_REASONS: Final = ("gap", "conflict", "protocol", "snapshot", "silence", "ack-timeout")

_NOWHERE: Final = (0, 0)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Pacing and limits of a session (the defaults suit a LAN or loopback)."""

    keepalive_interval: float = 1.0  # seconds without sending before a KEEPALIVE
    silence_timeout: float = 4.0  # seconds without receiving anything before closing
    ack_timeout: float = 15.0  # seconds of changes in flight without ACK progress
    max_in_flight_changes: int = 8192  # CHANGE frames sent and not yet acknowledged
    max_in_flight_bytes: int = 8 << 20  # their bytes
    batch_changes: int = 512  # changes pulled from the log per write
    batch_bytes: int = 256 << 10  # snapshot bytes per write
    max_snapshot_bytes: int = 512 << 20  # the largest snapshot accepted from a peer

    def __post_init__(self) -> None:
        for name in ("keepalive_interval", "silence_timeout", "ack_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.silence_timeout <= self.keepalive_interval:
            raise ValueError("silence_timeout must exceed keepalive_interval")
        for name in ("max_in_flight_changes", "max_in_flight_bytes", "batch_changes",
                     "batch_bytes", "max_snapshot_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


class WriteTimes:
    """When each change of this node's origin was written (clock seconds), for the lag.

    Keeps the last ``limit`` sequences (as the state keeps its log) in a flat array of
    doubles: one append per change, no object per change.
    """

    __slots__ = ("_first", "_limit", "_times")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._times = array("d")
        self._first = 1  # the sequence of _times[0]

    def add(self, sequence: int, seconds: float) -> None:
        """Record ``sequence``'s write time; sequences are added in order, 1, 2, 3..."""
        times = self._times
        if sequence != self._first + len(times):
            # a jump (cannot happen with one state): start over from here
            times = self._times = array("d")
            self._first = sequence
        times.append(seconds)
        if len(times) >= 2 * self._limit:
            drop = len(times) - self._limit
            del times[:drop]
            self._first += drop

    def at(self, sequence: int) -> float | None:
        index = sequence - self._first
        if 0 <= index < len(self._times):
            return self._times[index]
        return None


class LiveBatch:
    """This node's new changes of one reactor turn, encoded once for every peer."""

    __slots__ = ("_data", "_frames", "changes", "first", "incarnation", "last")

    def __init__(self, changes: list[Change], frames: list[bytes] | None = None) -> None:
        """``frames``: the changes already encoded (as the state encodes them), if known."""
        self.changes = changes
        self.incarnation = changes[0].incarnation
        self.first = changes[0].sequence
        self.last = changes[-1].sequence
        self._frames = frames
        self._data: bytes | None = None

    @property
    def data(self) -> bytes:
        if self._data is None:
            frames = self._frames
            self._data = b"".join(frames if frames is not None
                                  else [stream.encode(c) for c in self.changes])
            self._frames = None
        return self._data


class _Feed:
    """What the peer has of one origin, and what is still to send it."""

    __slots__ = ("origin", "peer", "snapshot", "snapshot_index", "target")

    def __init__(self, origin: int, peer: Position, target: Position | None) -> None:
        self.origin = origin
        self.peer = peer  # the peer's position, counting what was sent
        self.target = target  # None: live (this node's origin); else stop once reached
        self.snapshot: tuple[SnapshotBegin, list[SnapshotItem], SnapshotEnd] | None = None
        self.snapshot_index = 0

    def done(self) -> bool:
        t = self.target
        return t is not None and self.snapshot is None and \
            (self.peer.incarnation, self.peer.sequence) >= (t.incarnation, t.sequence)


class _ReceivedSnapshot:
    __slots__ = ("begin", "items", "size")

    def __init__(self, begin: SnapshotBegin) -> None:
        self.begin = begin
        self.items: list[SnapshotItem] = []
        self.size = 0


@implementer(IPushProducer)
class PeerSession:
    """The replication session with one peer over one link.

    ``write`` sends bytes on the link, ``close(reason)`` drops it (the service redials);
    ``write_times`` gives the write time of this node's changes (lag in ms); ``on_lag``
    is called with (peer, seconds) for every ACK that advances this node's origin.
    """

    def __init__(self, state: ReplicatedState, peer: int, clock: IReactorTime,
                 write: Callable[[bytes], None], close: Callable[[str], None], *,
                 config: SessionConfig | None = None, write_times: WriteTimes | None = None,
                 on_lag: Callable[[int, float], None] | None = None) -> None:
        if peer == state.node:
            raise ValueError("a session is with another node")
        self.state = state
        self.peer = peer
        self.config = config if config is not None else SessionConfig()
        self._clock = clock
        self._write_fn = write
        self._close_fn = close
        self._write_times = write_times
        self._on_lag = on_lag
        self._feeds: list[_Feed] = []
        self._own: _Feed | None = None
        self._started = False
        self._closed = False
        self.close_reason: str | None = None
        self._paused = False
        self._pumping = False
        self._tick_call: IDelayedCall | None = None
        self._ack_call: IDelayedCall | None = None
        # in flight: cumulative CHANGE frames/bytes sent, and marks of what covers them
        self._marks: deque[tuple[int, int, int, int, int]] = deque()
        self._acked: dict[int, tuple[int, int]] = {}  # origin -> (incarnation, sequence)
        self.changes_sent = 0
        self.change_bytes_sent = 0
        self._changes_acked = 0
        self._bytes_acked = 0
        self._ack_progress_at = 0.0
        # receiving
        self._rx_snapshot: _ReceivedSnapshot | None = None
        self._peer_clock = 0  # the peer's last KEEPALIVE ``sent``, echoed back
        self._keepalive_sent = 0  # this node's last KEEPALIVE ``sent``
        self._answered_at = float("-inf")
        now = clock.seconds()
        self._last_rx = now
        self._last_tx = now
        # counters for the status
        self.frames_in = 0
        self.writes = 0
        self.applied = 0
        self.duplicates = 0
        self.snapshots_sent = 0
        self.snapshots_applied = 0
        self.rtt_ms: float | None = None
        self.last_lag_ms: float | None = None
        self._lag_seq = 0
        self.started_at: float | None = None

    # -- life -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self, hello: Hello) -> None:
        """Both HELLOs are exchanged: plan what the peer lacks and start serving it."""
        if self._started or self._closed:
            return
        if hello.node != self.peer:
            raise ValueError(f"HELLO of node {hello.node}, this session is with {self.peer}")
        self._started = True
        self.started_at = now = self._clock.seconds()
        self._last_rx = self._last_tx = self._ack_progress_at = now
        state = self.state
        me = state.node
        # The peer runs ``hello.incarnation`` now: what this node holds of an older run of
        # it is obsolete (kept as retired records for a takeover).
        state.observe_incarnation(self.peer, hello.incarnation)
        theirs = {p.origin: p for p in hello.positions}
        for p in hello.positions:
            self._acked[p.origin] = (p.incarnation, p.sequence)
        for mine in state.positions():
            origin = mine.origin
            if origin == self.peer:
                continue
            peer = theirs.get(origin) or Position(origin, 0, 0)
            have = (peer.incarnation, peer.sequence)
            if origin == me:
                if have > (mine.incarnation, mine.sequence):
                    self._protocol_close("conflict", "the peer claims changes of this node "
                                         f"it never wrote: {peer}, this node is at {mine}")
                    return
                self._own = _Feed(origin, peer, None)
                self._feeds.insert(0, self._own)
            elif have < (mine.incarnation, mine.sequence) and (mine.sequence or have[0]):
                # (an origin at sequence 0 is only worth an empty snapshot to a peer that
                # holds an older incarnation of it)
                self._feeds.append(_Feed(origin, peer, mine))
        self._schedule_tick()
        self._pump()

    def stop(self) -> None:
        """The link is gone: stop timers and sending (idempotent)."""
        self._closed = True
        for call in (self._tick_call, self._ack_call):
            if call is not None and call.active():
                call.cancel()
        self._tick_call = self._ack_call = None
        self._feeds = []
        self._own = None
        self._marks.clear()
        self._rx_snapshot = None

    def _protocol_close(self, reason: str, detail: str) -> None:
        if self._closed:
            return
        log.warn("replication session with node {peer} closed: {reason}: {detail}",
                 peer=self.peer, reason=reason, detail=detail)
        self.close_reason = reason
        self.stop()
        self._close_fn(reason)

    # -- IPushProducer ----------------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self.stop()

    # -- sending ----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self.writes += 1
        self._last_tx = self._clock.seconds()
        self._write_fn(data)

    def _send(self, frame: Frame) -> None:
        self._write(stream.encode(frame))

    @property
    def in_flight_changes(self) -> int:
        return self.changes_sent - self._changes_acked

    @property
    def in_flight_bytes(self) -> int:
        return self.change_bytes_sent - self._bytes_acked

    def _window(self) -> int:
        """How many more CHANGE frames may go out now."""
        if self.change_bytes_sent - self._bytes_acked >= self.config.max_in_flight_bytes:
            return 0
        return self.config.max_in_flight_changes - (self.changes_sent - self._changes_acked)

    def _sent_changes(self, origin: int, incarnation: int, sequence: int, count: int,
                      size: int) -> None:
        if self.changes_sent == self._changes_acked:
            self._ack_progress_at = self._clock.seconds()
        self.changes_sent += count
        self.change_bytes_sent += size
        self._marks.append((origin, incarnation, sequence, self.changes_sent,
                            self.change_bytes_sent))

    def offer(self, batch: LiveBatch) -> None:
        """New changes of this node's origin: send them now if the peer is caught up and
        the link can take them; otherwise they are pulled from the log later."""
        feed = self._own
        if feed is None or self._closed:
            return
        peer = feed.peer
        if (not self._paused and not self._pumping and feed.snapshot is None
                and peer.sequence == batch.first - 1 and peer.incarnation == batch.incarnation
                and self._window() >= len(batch.changes)):
            data = batch.data
            self._write(data)
            feed.peer = Position(feed.origin, batch.incarnation, batch.last)
            self._sent_changes(feed.origin, batch.incarnation, batch.last, len(batch.changes),
                               len(data))
        else:
            self._pump()

    def _pump(self) -> None:
        """Send what the feeds hold until paused, the window is full, or nothing is left."""
        if self._pumping or not self._started:
            return
        self._pumping = True
        try:
            while not self._paused and not self._closed and self._step():
                pass
        finally:
            self._pumping = False

    def _step(self) -> bool:
        """Write one batch of one feed; False when nothing could be written."""
        for feed in self._feeds:
            if feed.snapshot is not None:
                self._send_snapshot_part(feed)
                return True
            room = self._window()
            if room <= 0:
                continue
            changes = self.state.catch_up(feed.origin, feed.peer,
                                          min(room, self.config.batch_changes))
            if changes is None:
                self._begin_snapshot(feed)
                return True
            target = feed.target
            if changes and target is not None and changes[0].incarnation == target.incarnation \
                    and changes[-1].sequence > target.sequence:
                changes = changes[:max(1, target.sequence - changes[0].sequence + 1)]
            if not changes:
                mine = self.state.position(feed.origin)
                if mine is not None and mine.incarnation > feed.peer.incarnation > 0:
                    # a newer incarnation with nothing logged yet: an empty snapshot
                    # tells the peer (and retires its records of the older one)
                    self._begin_snapshot(feed)
                    return True
                if feed.done():
                    self._feeds.remove(feed)
                    return True
                continue
            data = b"".join([stream.encode(c) for c in changes])
            last = changes[-1]
            self._write(data)
            feed.peer = Position(feed.origin, last.incarnation, last.sequence)
            self._sent_changes(feed.origin, last.incarnation, last.sequence, len(changes),
                               len(data))
            if feed.done():
                self._feeds.remove(feed)
            return True
        return False

    def _begin_snapshot(self, feed: _Feed) -> None:
        begin, items, end = self.state.snapshot(feed.origin)
        feed.snapshot = (begin, items, end)
        feed.snapshot_index = 0
        (log.info if items else log.debug)(
            "replication: sending node {peer} a snapshot of origin {origin} "
            "({count} records at {incarnation}/{sequence})", peer=self.peer,
            origin=feed.origin, count=len(items), incarnation=begin.incarnation,
            sequence=begin.sequence)
        self._send(begin)

    def _send_snapshot_part(self, feed: _Feed) -> None:
        assert feed.snapshot is not None
        begin, items, end = feed.snapshot
        i = feed.snapshot_index
        parts: list[bytes] = []
        size = 0
        limit = self.config.batch_bytes
        encode = stream.encode
        while i < len(items) and size < limit:
            data = encode(items[i])
            parts.append(data)
            size += len(data)
            i += 1
        feed.snapshot_index = i
        if i >= len(items):
            parts.append(encode(end))
            feed.snapshot = None
            feed.peer = Position(feed.origin, begin.incarnation, begin.sequence)
            self.snapshots_sent += 1
            if feed.done():
                self._feeds.remove(feed)
        self._write(b"".join(parts))

    # -- receiving --------------------------------------------------------------------------

    def frame_received(self, frame: Frame) -> None:
        if self._closed:
            return
        self.frames_in += 1
        self._last_rx = self._clock.seconds()
        kind = type(frame)
        if kind is Change:
            self._change(frame)  # type: ignore[arg-type]
        elif kind is Ack:
            self._ack(frame)  # type: ignore[arg-type]
        elif kind is Keepalive:
            self._keepalive(frame)  # type: ignore[arg-type]
        elif kind is SnapshotItem:
            snap = self._rx_snapshot
            if snap is None:
                self._protocol_close("protocol", "SNAPSHOT_ITEM outside a snapshot")
                return
            snap.size += 13 + len(frame.key) + len(frame.value)  # type: ignore[union-attr]
            if snap.size > self.config.max_snapshot_bytes:
                self._protocol_close("snapshot", "snapshot larger than "
                                     f"{self.config.max_snapshot_bytes} bytes")
                return
            snap.items.append(frame)  # type: ignore[arg-type]
        elif kind is SnapshotBegin:
            if self._rx_snapshot is not None:
                self._protocol_close("protocol", "SNAPSHOT_BEGIN inside a snapshot")
            elif frame.origin == self.state.node:  # type: ignore[union-attr]
                self._protocol_close("conflict", "a snapshot of this node's own origin")
            else:
                self._rx_snapshot = _ReceivedSnapshot(frame)  # type: ignore[arg-type]
        elif kind is SnapshotEnd:
            self._snapshot_end(frame)  # type: ignore[arg-type]
        else:
            self._protocol_close("protocol", f"unexpected {kind.__name__}")

    def _change(self, change: Change) -> None:
        if self._rx_snapshot is not None:
            self._protocol_close("protocol", "CHANGE inside a snapshot")
            return
        result = self.state.apply(change)
        if result is ApplyResult.APPLIED:
            self.applied += 1
        elif result is ApplyResult.DUPLICATE:
            self.duplicates += 1
        elif result is ApplyResult.GAP:
            have = self.state.position(change.origin)
            self._protocol_close("gap", f"change {change.incarnation}/{change.sequence} of "
                                        f"origin {change.origin}, this node has {have}")
            return
        else:
            self._protocol_close("conflict", f"change {change.incarnation}/{change.sequence} "
                                             "of this node's own origin")
            return
        self._schedule_ack()

    def _snapshot_end(self, end: SnapshotEnd) -> None:
        snap = self._rx_snapshot
        if snap is None:
            self._protocol_close("protocol", "SNAPSHOT_END outside a snapshot")
            return
        self._rx_snapshot = None
        try:
            result = self.state.apply_snapshot(snap.begin, snap.items, end)
        except SnapshotError as e:
            self._protocol_close("snapshot", str(e))
            return
        if result is ApplyResult.CONFLICT:
            self._protocol_close("conflict", "a snapshot of this node's own origin")
            return
        if result is ApplyResult.APPLIED:
            self.snapshots_applied += 1
            log.info("replication: applied a snapshot of origin {origin} from node {peer} "
                     "({count} records at {incarnation}/{sequence})", origin=end.origin,
                     peer=self.peer, count=end.count, incarnation=end.incarnation,
                     sequence=end.sequence)
        self._schedule_ack()

    def _schedule_ack(self) -> None:
        if self._ack_call is None:
            self._ack_call = self._clock.callLater(0, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_call = None
        if not self._closed:
            self._send(Ack(self.state.positions()))

    def _ack(self, ack: Ack) -> None:
        acked = self._acked
        for p in ack.positions:
            acked[p.origin] = (p.incarnation, p.sequence)
        marks = self._marks
        progressed = False
        while marks:
            origin, incarnation, sequence, changes, size = marks[0]
            if acked.get(origin, _NOWHERE) < (incarnation, sequence):
                break
            marks.popleft()
            self._changes_acked = changes
            self._bytes_acked = size
            progressed = True
        now = self._clock.seconds()
        if progressed:
            self._ack_progress_at = now
        mine = acked.get(self.state.node)
        if mine is not None and mine[0] == self.state.incarnation and \
                self._write_times is not None:
            written = self._write_times.at(mine[1])
            if written is not None and mine[1] > self._lag_seq:
                self._lag_seq = mine[1]
                lag = max(0.0, now - written)
                self.last_lag_ms = lag * 1000
                if self._on_lag is not None:
                    self._on_lag(self.peer, lag)
        if progressed:
            self._pump()

    def _keepalive(self, frame: Keepalive) -> None:
        self._peer_clock = frame.sent
        if frame.echo and frame.echo == self._keepalive_sent:
            # the answer to this node's last KEEPALIVE: a round trip
            self.rtt_ms = max(0.0, self._clock.seconds() * 1000 - frame.echo)
        else:
            # the peer's own KEEPALIVE: answer at once so it can measure its round trip
            # (at most once per half interval: two crossing KEEPALIVEs must not ping-pong)
            now = self._clock.seconds()
            if now - self._answered_at >= self.config.keepalive_interval / 2:
                self._answered_at = now
                self._send_keepalive()

    def _send_keepalive(self) -> None:
        sent = max(1, int(self._clock.seconds() * 1000))
        self._keepalive_sent = sent
        self._send(Keepalive(sent, self._peer_clock))

    # -- time -------------------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        self._tick_call = self._clock.callLater(self.config.keepalive_interval / 2, self._tick)

    def _tick(self) -> None:
        self._tick_call = None
        if self._closed:
            return
        now = self._clock.seconds()
        config = self.config
        if now - self._last_rx >= config.silence_timeout:
            self._protocol_close("silence", f"nothing received for {now - self._last_rx:.3f} s")
            return
        if self.changes_sent != self._changes_acked and \
                now - self._ack_progress_at >= config.ack_timeout:
            self._protocol_close("ack-timeout", f"{self.in_flight_changes} changes "
                                                f"unacknowledged for "
                                                f"{now - self._ack_progress_at:.3f} s")
            return
        if now - self._last_tx >= config.keepalive_interval:
            self._send_keepalive()
        self._schedule_tick()

    # -- status -----------------------------------------------------------------------------

    def lag(self) -> tuple[int, float]:
        """This node's changes the peer has not acknowledged: (count, age of the oldest ms)."""
        state = self.state
        mine = state.position(state.node)
        assert mine is not None
        acked = self._acked.get(state.node, _NOWHERE)
        done = acked[1] if acked[0] == mine.incarnation else 0
        behind = max(0, mine.sequence - done)
        if not behind or self._write_times is None:
            return behind, 0.0
        written = self._write_times.at(done + 1)
        if written is None:
            return behind, 0.0
        return behind, max(0.0, (self._clock.seconds() - written) * 1000)

    def stats(self) -> SessionStats:
        changes, ms = self.lag()
        return SessionStats(
            lag_changes=changes, lag_ms=round(ms, 3),
            last_ack_lag_ms=None if self.last_lag_ms is None else round(self.last_lag_ms, 3),
            rtt_ms=None if self.rtt_ms is None else round(self.rtt_ms, 3),
            changes_sent=self.changes_sent, changes_applied=self.applied,
            duplicates=self.duplicates, snapshots_sent=self.snapshots_sent,
            snapshots_applied=self.snapshots_applied,
            in_flight_changes=self.in_flight_changes, in_flight_bytes=self.in_flight_bytes,
            paused=self._paused,
            catching_up=[f.origin for f in self._feeds
                         if f.snapshot is not None or f.target is not None
                         or f.peer != self.state.position(f.origin)])

    def status(self) -> dict[str, Any]:
        return self.stats().as_status()
