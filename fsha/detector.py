"""Failure detector: who is alive, on which network, and which incarnation; and the
round-trip time to each peer on each network (:class:`RoundTrips`).

No I/O and no clock of its own: every call takes ``now`` (seconds). A peer is alive while
any network's deadline for it lies ahead; each network's state is kept so an operator sees
"network B to fs2 is down" long before it matters.

The deadline adapts (``docs/design.rst``, "The adaptive failure detector"): each arrival on
a network sets that network's deadline to the arrival time plus a *bound* that follows the
silences observed between arrivals from that peer on that network (:class:`Arrivals`: the
largest one held for :data:`HOLD` seconds, and the mean plus :data:`SIGMAS` standard
deviations), plus one interval, kept between the configured floor and ceiling
(``dead_after_min_ms`` and ``dead_after_ms``). A clean link is judged at the floor; a
jittery link, or a peer whose process stalls now and then, at the silence it has shown.
Deadlines never move earlier: the bound a node advertises to a peer in the echo of its
heartbeat (``docs/protocol/heartbeat.rst``, version 4) is a promise the peer's lease
counts on (``fsha.quorum``).
"""

from __future__ import annotations

import enum
import math
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


#: Arrivals a link must show before its bound may drop below the ceiling.
WARMUP = 16
#: Seconds a silence is remembered at least (and at most twice as long): a stall seen
#: once keeps the bound up for this long.
HOLD = 30.0
#: Standard deviations above the mean silence the bound covers (phi-accrual's threshold
#: for a normal distribution: 4 sigmas is phi of about 4.5).
SIGMAS = 4.0
#: Weight of a new silence in the running mean and variance.
GAIN = 1 / 16
#: Intervals the bound leaves beyond the largest recent round trip: a master's lease
#: lasts the bound its peers promise minus half an interval from its own send time, and
#: the support renewing it arrives a round trip later, a lost one an interval after that
#: (fsha.quorum). A bound under a round trip would make healthy masters let go.
RTT_INTERVALS = 3.0


@dataclass(slots=True)
class Arrivals:
    """The silences between arrivals from one peer on one network, and the bound they give.

    Silences longer than the ceiling are outages (a cable pulled, the peer dead), not
    the link's behaviour: they are not counted. So are the silences across a restart of
    the peer."""

    last: float = NEVER
    samples: int = 0
    mean: float = 0.0
    var: float = 0.0
    peak: float = 0.0  # the largest silence since peak_since
    old_peak: float = 0.0  # the largest of the window before
    peak_since: float = NEVER
    rtt_peak: float = 0.0  # the largest round trip since rtt_since
    old_rtt_peak: float = 0.0
    rtt_since: float = NEVER

    def round_trip(self, rtt: float, now: float) -> None:
        if now - self.rtt_since >= HOLD:
            self.old_rtt_peak, self.rtt_peak, self.rtt_since = self.rtt_peak, 0.0, now
        if rtt > self.rtt_peak:
            self.rtt_peak = rtt

    def add(self, now: float, ceiling: float) -> None:
        last, self.last = self.last, now
        if last == NEVER:
            return
        gap = now - last
        if gap > ceiling or gap < 0.0:
            return
        if now - self.peak_since >= HOLD:
            self.old_peak, self.peak, self.peak_since = self.peak, 0.0, now
        if gap > self.peak:
            self.peak = gap
        if self.samples == 0:
            self.mean = gap
        else:
            delta = gap - self.mean
            self.mean += GAIN * delta
            self.var = (1 - GAIN) * (self.var + GAIN * delta * delta)
        self.samples += 1

    def restart(self) -> None:
        """The peer restarted: the silence before its first datagram is no silence of
        its link (the statistics of the link stay)."""
        self.last = NEVER

    def bound(self, interval: float, floor: float, ceiling: float) -> float:
        """How long a silence on this link may last before it is judged: the ceiling while
        the link is new, else the largest recent silence or the mean plus SIGMAS deviations,
        whichever is more, plus one interval, and at least the largest recent round trip
        plus RTT_INTERVALS intervals, between the floor and the ceiling."""
        if self.samples < WARMUP:
            return ceiling
        expected = max(self.peak, self.old_peak, self.mean + SIGMAS * math.sqrt(self.var))
        rtt = max(self.rtt_peak, self.old_rtt_peak)
        return min(ceiling, max(floor, expected + interval, rtt + RTT_INTERVALS * interval))


@dataclass(slots=True)
class PeerState:
    node_id: int
    networks: int
    incarnation: int = -1
    sequence: int = -1  # highest applied sequence of this incarnation
    heard: list[float] = field(default_factory=list)  # per network: when last heard
    net_sequence: list[int] = field(default_factory=list)  # per network: highest seen
    # per network: when its silence is judged (never earlier than promised, see above)
    deadline: list[float] = field(default_factory=list)
    arrivals: list[Arrivals] = field(default_factory=list)  # per network
    latest: Heartbeat | None = None
    alive: bool = False
    changed_at: float = NEVER  # when `alive` last flipped
    restarts: int = 0

    def __post_init__(self) -> None:
        self.heard = [NEVER] * self.networks
        self.net_sequence = [-1] * self.networks
        self.deadline = [NEVER] * self.networks
        self.arrivals = [Arrivals() for _ in range(self.networks)]

    def last_heard(self) -> float:
        return max(self.heard)

    def dies_at(self) -> float:
        """When this peer is judged dead if no network hears it again."""
        return max(self.deadline)


@dataclass(frozen=True, slots=True)
class Transition:
    node_id: int
    alive: bool


class FailureDetector:
    """``dead_after`` is the ceiling of the bound, ``floor`` its floor (None: the
    ceiling, a fixed dead-after time), ``interval`` the peers' heartbeat interval."""

    def __init__(self, node_ids: list[int], networks: int, dead_after: float,
                 floor: float | None = None, interval: float = 0.0) -> None:
        self.dead_after = dead_after
        self.floor = dead_after if floor is None else min(floor, dead_after)
        self.interval = interval
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
                peer.arrivals[i].restart()
        if hb.sequence <= peer.net_sequence[network]:
            return Verdict.REPLAY
        peer.net_sequence[network] = hb.sequence
        peer.heard[network] = now
        # A silence that made the peer dead counts too (when shorter than the ceiling): a
        # peer judged dead for a stall must not be judged dead again for the next one.
        arrivals = peer.arrivals[network]
        arrivals.add(now, self.dead_after)
        due = now + arrivals.bound(self.interval, self.floor, self.dead_after)
        if due > peer.deadline[network]:
            peer.deadline[network] = due
        if hb.sequence <= peer.sequence:
            return Verdict.DUPLICATE
        peer.sequence = hb.sequence
        peer.latest = hb
        if not peer.alive:
            peer.alive = True
            peer.changed_at = now
        return verdict

    def check(self, now: float) -> list[Transition]:
        """Mark peers dead whose every network is past its deadline."""
        changes: list[Transition] = []
        for peer in self.peers.values():
            if peer.alive and max(peer.deadline) < now:
                peer.alive = False
                peer.changed_at = now
                changes.append(Transition(peer.node_id, False))
        return changes

    def suspects(self, now: float) -> bool:
        """Would :meth:`check` declare anyone dead now? (Changes nothing.)"""
        return any(p.alive and max(p.deadline) < now for p in self.peers.values())

    def next_deadline(self) -> float | None:
        """When the first live peer is judged dead if it stays silent (None: no live
        peer)."""
        times = [max(p.deadline) for p in self.peers.values() if p.alive]
        return min(times) if times else None

    def network_up(self, node_id: int, network: int, now: float) -> bool:
        return now < self.peers[node_id].deadline[network]

    def promise(self, node_id: int, network: int) -> float:
        """The bound this node promises ``node_id`` in the echo of its latest sequence
        heard on ``network`` (seconds after hearing it): this node will not judge it dead
        before then (its deadline there never moves earlier). 0 before it was heard."""
        peer = self.peers[node_id]
        heard = peer.heard[network]
        return 0.0 if heard == NEVER else max(0.0, peer.deadline[network] - heard)

    def bound(self, node_id: int, network: int) -> float:
        """The current bound of ``node_id``'s silences on ``network`` (seconds)."""
        return self.peers[node_id].arrivals[network].bound(
            self.interval, self.floor, self.dead_after)

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
        if peer.net_sequence[network] < 0 or now >= peer.deadline[network]:
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
        self._detector.peers[node_id].arrivals[network].round_trip(rtt, now)
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
