"""Failure detector: who is alive, on which network, and which incarnation.

No I/O and no clock of its own: every call takes ``now`` (seconds). A peer is alive while
any network heard it within ``dead_after``; each network's state is kept so an operator sees
"network B to fs2 is down" long before it matters.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fsha.wire.heartbeat import Heartbeat

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

    def network_up(self, node_id: int, network: int, now: float) -> bool:
        return now - self.peers[node_id].heard[network] < self.dead_after

    def alive_ids(self) -> list[int]:
        return [p.node_id for p in self.peers.values() if p.alive]
