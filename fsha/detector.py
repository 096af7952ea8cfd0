"""Failure detector: who is alive, on which network, and which incarnation; and the
round-trip time to each peer on each network (:class:`RoundTrips`).

No I/O and no clock of its own: every call takes ``now`` (seconds). A peer is alive while
any network heard it within ``dead_after``; each network's state is kept so an operator sees
"network B to fs2 is down" long before it matters.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fsha.wire.heartbeat import MAX_ECHO_DELAY_US, Heartbeat

NEVER = float("-inf")


class Verdict(enum.Enum):
    """What the detector made of one verified datagram."""

    APPLIED = "applied"  # newest state of this peer: the caller should use it
    RESTARTED = "restarted"  # first datagram of a new incarnation (also applied)
    DUPLICATE = "duplicate"  # same heartbeat already applied via another network
    REPLAY = "replay"  # sequence not newer on this network: dropped
    OLD_INCARNATION = "old-incarnation"  # from a previous run of the peer: dropped

    @property
    def applied(self) -> bool:
        return self in (Verdict.APPLIED, Verdict.RESTARTED)

    @property
    def dropped(self) -> bool:
        return self in (Verdict.REPLAY, Verdict.OLD_INCARNATION)


@dataclass(slots=True)
class PeerState:
    node_id: int
    networks: int
    incarnation: int = -1
    sequence: int = -1  # highest applied sequence of this incarnation
    heard: list[float] = field(default_factory=list)  # per network: when last heard
    net_sequence: list[int] = field(default_factory=list)  # per network: highest seen
    latest: Heartbeat | None = None
    alive: bool = False
    changed_at: float = NEVER  # when `alive` last flipped
    restarts: int = 0

    def __post_init__(self) -> None:
        self.heard = [NEVER] * self.networks
        self.net_sequence = [-1] * self.networks

    def last_heard(self) -> float:
        return max(self.heard)


@dataclass(frozen=True, slots=True)
class Transition:
    node_id: int
    alive: bool


class FailureDetector:
    def __init__(self, node_ids: list[int], networks: int, dead_after: float) -> None:
        self.dead_after = dead_after
        self.networks = networks
        self.peers: dict[int, PeerState] = {n: PeerState(n, networks) for n in node_ids}

    def observe(self, network: int, hb: Heartbeat, now: float) -> Verdict:
        """Account one authenticated datagram from ``hb.node_id`` heard on ``network``."""
        peer = self.peers[hb.node_id]
        verdict = Verdict.APPLIED
        if hb.incarnation != peer.incarnation:
            if hb.incarnation < peer.incarnation:
                return Verdict.OLD_INCARNATION
            if peer.incarnation != -1:
                verdict = Verdict.RESTARTED
                peer.restarts += 1
            peer.incarnation = hb.incarnation
            peer.sequence = -1
            nets = peer.net_sequence
            for i in range(len(nets)):
                nets[i] = -1
        if hb.sequence <= peer.net_sequence[network]:
            return Verdict.REPLAY
        peer.net_sequence[network] = hb.sequence
        peer.heard[network] = now
        if hb.sequence <= peer.sequence:
            return Verdict.DUPLICATE
        peer.sequence = hb.sequence
        peer.latest = hb
        if not peer.alive:
            peer.alive = True
            peer.changed_at = now
        return verdict

    def check(self, now: float) -> list[Transition]:
        """Mark peers dead whose every network has been silent for ``dead_after``."""
        changes: list[Transition] = []
        deadline = now - self.dead_after
        for peer in self.peers.values():
            if peer.alive and max(peer.heard) < deadline:
                peer.alive = False
                peer.changed_at = now
                changes.append(Transition(peer.node_id, False))
        return changes

    def suspects(self, now: float) -> bool:
        """Would :meth:`check` declare anyone dead now? (Changes nothing.)"""
        deadline = now - self.dead_after
        return any(p.alive and max(p.heard) < deadline for p in self.peers.values())

    def network_up(self, node_id: int, network: int, now: float) -> bool:
        return now - self.peers[node_id].heard[network] < self.dead_after

    def alive_ids(self) -> list[int]:
        return [p.node_id for p in self.peers.values() if p.alive]


#: Send times of this many of our latest sequences are kept to match echoes against.
ECHO_HISTORY = 64
#: Weight of a new round-trip sample in the smoothed value (RFC 6298's alpha).
RTT_GAIN = 0.125


class RoundTrips:
    """Round-trip times per peer and network, from the echo fields of heartbeats.

    No I/O and no clock of its own. The sending side calls :meth:`sent` with each sequence
    it sends and :meth:`echo_to` for the echo of the copy it sends a peer on a network (each
    copy echoes its destination); the receiving side calls :meth:`echoed` when a peer's
    datagram echoes one of our sequences. See
    ``docs/protocol/heartbeat.rst`` ("Echo and round-trip time").
    """

    __slots__ = ("_detector", "_sent_at", "_sent_seq", "last", "samples", "smoothed")

    def __init__(self, detector: FailureDetector) -> None:
        self._detector = detector
        self._sent_at = [0.0] * ECHO_HISTORY
        self._sent_seq = [-1] * ECHO_HISTORY
        # node id -> per network: seconds, or None before the first sample
        self.last: dict[int, list[float | None]] = {
            n: [None] * detector.networks for n in detector.peers}
        self.smoothed: dict[int, list[float | None]] = {
            n: [None] * detector.networks for n in detector.peers}
        self.samples = 0

    def sent(self, sequence: int, now: float) -> None:
        i = sequence % ECHO_HISTORY
        self._sent_seq[i] = sequence
        self._sent_at[i] = now

    def echo_to(self, node_id: int, network: int, now: float) -> tuple[int, int] | None:
        """(its latest sequence heard on ``network``, microseconds since) for the datagram
        sent to ``node_id`` there: every copy echoes its destination; None when that peer
        was not heard there within the dead-after time."""
        peer = self._detector.peers[node_id]
        heard = peer.heard[network]
        if peer.net_sequence[network] < 0 or heard <= now - self._detector.dead_after:
            return None
        return peer.net_sequence[network], \
            max(0, min(MAX_ECHO_DELAY_US, round((now - heard) * 1_000_000)))

    def sent_at(self, sequence: int) -> float | None:
        """When we sent ``sequence`` (None: not one of our latest ECHO_HISTORY)."""
        i = sequence % ECHO_HISTORY
        return self._sent_at[i] if self._sent_seq[i] == sequence else None

    def echoed(self, node_id: int, network: int, sequence: int, delay_us: int, now: float
               ) -> float | None:
        """A datagram from ``node_id`` on ``network`` echoes our ``sequence``: the sample
        (seconds), or None if that sequence is not one we remember sending."""
        i = sequence % ECHO_HISTORY
        if self._sent_seq[i] != sequence:
            return None
        rtt = now - self._sent_at[i] - delay_us / 1_000_000
        if rtt < 0.0:
            rtt = 0.0  # clock granularity
        elif rtt > self._detector.dead_after:
            return None  # not a round trip worth the name: a stale or confused echo
        last = self.last.get(node_id)
        if last is None:
            return None
        last[network] = rtt
        smoothed = self.smoothed[node_id]
        old = smoothed[network]
        smoothed[network] = rtt if old is None else old + RTT_GAIN * (rtt - old)
        self.samples += 1
        return rtt

    def forget(self, node_id: int) -> None:
        """The peer restarted or went down: its old round trips say nothing now."""
        if node_id in self.last:
            self.last[node_id] = [None] * self._detector.networks
            self.smoothed[node_id] = [None] * self._detector.networks
