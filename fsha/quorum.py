"""Quorum decisions: when a master is dead for a claimant, and how long a master may hold.

Pure functions over what one node knows (no I/O, no clock: every call takes ``now``), and
:class:`QuorumTracker`, which gathers those facts from the heartbeats.
``docs/design.rst`` ("Quorum, leases and the timing argument") explains why these rules
never let two nodes hold a slot beyond the bounded overlap:

* **Death by a quorum of ears.** A claimant may treat a slot's master as dead only when a
  quorum of live, voting nodes (itself included) do not hear it. A node's own ears decide
  nothing alone: a one-way receive fault at one slave, or a partition where the master and
  one slave cannot hear each other while a third node hears both, moves no slot while a
  quorum still hears the master. A peer's latest heartbeat says whom it hears (the heard
  bitmap of version 3); a peer of an older version, which does not say, is taken to hear
  the master exactly when the claimant does (the rule before version 3).
* **Voters.** Only *live* peers count: heard within the dead-after time and proven live
  now (they echoed one of this node's sequences of this incarnation, so a captured
  heartbeat replayed after a restart counts for nothing). A node still in discovery
  (STARTING) does not vote "I do not hear it": it has not listened for a dead-after time.
* **The master's lease.** A master holds its slot only while a quorum (itself included)
  has *supported* it within the lease: a peer supports the master when it echoes one of
  the master's sequences while listing the master in its heard bitmap. The support time is
  when the master *sent* that sequence (on its own clock), a lower bound of when the peer
  last heard it; the peer cannot stop hearing it before a dead-after time after that. With
  ``lease < dead_after`` a master lets go before any quorum can have declared it dead.
  With the adaptive detector the dead-after time is each peer's own and changes: a peer of
  version 4 says in each echo how long after hearing that sequence it will not judge the
  master dead (its *promise*, ``fsha.detector``), and that support lasts until the send
  time plus the promise minus half an interval; a peer that says nothing is taken to
  promise the configured floor (``dead_after_min_ms``, else ``dead_after_ms``).
* **Agreement before a claim.** A claimant also needs a quorum of live voting nodes
  (itself included) that computed the same view (their view digest equals its own: the
  same owners, epochs and ranking, hence the same assignment). A node that never heard
  the master (restarted inside a partition) does not know the slot has one, but the nodes
  that hear the master see it as the owner and disagree. Two different views cannot both
  gather a quorum, so two claimants never both proceed on two views.
* **Config rollouts.** A node heard (authenticated, from its configured address) but
  running another config file is alive like any other: it votes, supports, its claims are
  respected, and it is ranked. While the files give the same views (same nodes, slots and
  priorities: a change of addresses or timings, say) takeovers proceed as usual; while
  they do not, views differ and claims wait for a quorum to agree (safe, not live).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fsha.detector import FailureDetector
from fsha.wire.heartbeat import Heartbeat, Role

NEVER = float("-inf")
FOREVER = float("inf")


@dataclass(frozen=True, slots=True)
class PeerView:
    """What one node knows of one peer, for the quorum decisions."""

    node_id: int
    # Heard within the dead-after time and proven live now (see the module docstring).
    live: bool
    # The peer's latest heard bitmap (bit i: it hears node i); None when its heartbeats do
    # not carry one (versions 1 and 2).
    hears: int | None = None
    # Past its discovery: its "I do not hear X" counts.
    voting: bool = True
    # Send time (this node's clock) of the newest sequence of ours the peer echoed while
    # listing us as heard; NEVER if none.
    support_at: float = NEVER
    # When the lease this peer's supports give ends (this node's clock): None, the
    # support time plus the configured lease.
    support_until: float | None = None

    def lease_end(self, lease: float) -> float:
        until = self.support_until
        return self.support_at + lease if until is None else until

    def hears_node(self, node_id: int, default: bool) -> bool:
        hears = self.hears
        if hears is None:
            return default
        return bool(hears >> node_id & 1)


def deaf_to(master: int, me_hears_master: bool, me_voting: bool,
            peers: Iterable[PeerView]) -> int:
    """How many live voting nodes, this one included, do not hear ``master``."""
    count = 0 if me_hears_master or not me_voting else 1
    for peer in peers:
        if peer.node_id != master and peer.live and peer.voting \
                and not peer.hears_node(master, me_hears_master):
            count += 1
    return count


def master_dead(master: int, me_hears_master: bool, me_voting: bool,
                peers: Iterable[PeerView], quorum: int) -> bool:
    """May a claimant treat ``master`` as dead: does a quorum of live voting nodes (the
    claimant included) no longer hear it?"""
    return deaf_to(master, me_hears_master, me_voting, peers) >= quorum


def lease_expires_at(peers: Iterable[PeerView], quorum: int, lease: float) -> float:
    """When this master's lease ends unless renewed: the (quorum - 1)-th latest end of the
    peers' supports (their support time plus ``lease``, or the end their promise gives).
    FOREVER when this node alone is a quorum; NEVER when too few peers ever supported
    it."""
    needed = quorum - 1
    if needed <= 0:
        return FOREVER
    times = sorted((p.lease_end(lease) for p in peers), reverse=True)
    if len(times) < needed:
        return NEVER
    return times[needed - 1]


def lease_holds(now: float, peers: Iterable[PeerView], quorum: int, lease: float) -> bool:
    """Does this master still hold its lease at ``now``?"""
    return now < lease_expires_at(peers, quorum, lease)


def live_count(peers: Iterable[PeerView]) -> int:
    """Nodes this one counts toward quorum: itself and its live peers (any config file)."""
    return 1 + sum(1 for p in peers if p.live)


def lease_for(interval: float, dead_after: float) -> float:
    """A master's lease: half a heartbeat interval shorter than the dead-after time, the
    margin for its release to take its addresses down and for timer lateness (see
    ``docs/design.rst``). The config keeps ``dead_after >= 2 * interval``, so the lease is
    at least 1.5 intervals."""
    return dead_after - interval / 2


def view_agreement(my_digest: bytes, digests: Iterable[bytes]) -> int:
    """How many nodes, this one included, computed the same view (owners, epochs,
    ranking): ``digests`` are the view digests of the live, voting peers."""
    return 1 + sum(1 for d in digests if d == my_digest)


class QuorumTracker:
    """What a node learns from heartbeats for the decisions above, per peer: whether it is
    live now, when it last supported this node's lease, whether it runs another config
    file. No I/O and no clock: every call takes ``now``. The liveness itself (heard within
    the dead-after time) is the failure detector's."""

    __slots__ = (
        "_dead_after",
        "_detector",
        "_floor",
        "_interval",
        "_me",
        "foreign",
        "support",
        "support_until",
        "verified",
    )

    def __init__(self, detector: FailureDetector, me: int, interval: float,
                 dead_after: float, floor: float | None = None) -> None:
        self._detector = detector
        self._me = me
        self._interval = interval
        self._dead_after = dead_after
        # What a peer that states no promise is taken to promise: the configured floor.
        self._floor = dead_after if floor is None else floor
        self.verified: dict[int, int] = {}  # peer -> its incarnation that echoed us
        self.support: dict[int, float] = {}  # peer -> our send time it last supported
        # peer -> when the lease its supports give ends (the latest of them)
        self.support_until: dict[int, float] = {}
        self.foreign: set[int] = set()  # peers heard running another config file

    def heard(self, hb: Heartbeat, sent_at: float | None, now: float,
              same_config: bool) -> bool:
        """Account a heartbeat of a peer, not a replay; ``sent_at`` is when we sent the
        sequence it echoes to us (None: no echo of ours, or one we do not remember).
        True when the peer became live now (first proof in its incarnation)."""
        node_id = hb.node_id
        if same_config:
            self.foreign.discard(node_id)
        else:
            self.foreign.add(node_id)
        if hb.version == 1:
            # It cannot echo: heard is the best it can show (the rule before version 2),
            # and it is taken to have heard us an interval ago.
            self.support[node_id] = now - self._interval
            self._supported(node_id, now - self._interval + lease_for(self._interval,
                                                                      self._floor))
            if self.verified.get(node_id) == hb.incarnation:
                return False
            self.verified[node_id] = hb.incarnation
            return True
        if sent_at is None or now - sent_at > self._dead_after:
            return False  # no echo of ours, or too old to say anything about now
        if hb.version < 3 or hb.heard >> self._me & 1:
            if sent_at > self.support.get(node_id, NEVER):
                self.support[node_id] = sent_at
            promise = hb.echo_bound_us / 1_000_000 if hb.version >= 4 else self._floor
            self._supported(node_id, sent_at + lease_for(self._interval, promise))
        if self.verified.get(node_id) == hb.incarnation:
            return False
        self.verified[node_id] = hb.incarnation
        return True

    def _supported(self, node_id: int, until: float) -> None:
        # Every promise made stays kept (fsha.detector), so the latest end counts even
        # when a newer support promises less.
        if until > self.support_until.get(node_id, NEVER):
            self.support_until[node_id] = until

    def forget(self, node_id: int) -> None:
        """The peer went down: it must show it is live again. (Its supports stay: they
        are bounds on when it last heard us, true whatever happened since.)"""
        self.verified.pop(node_id, None)

    def is_live(self, node_id: int) -> bool:
        peer = self._detector.peers[node_id]
        return peer.alive and self.verified.get(node_id) == peer.incarnation

    def heard_bits(self) -> int:
        """The heard bitmap of this node's heartbeats: its live peers."""
        bits = 0
        verified = self.verified
        for peer in self._detector.peers.values():
            if peer.alive and verified.get(peer.node_id) == peer.incarnation:
                bits |= 1 << peer.node_id
        return bits

    def views(self) -> list[PeerView]:
        verified, support = self.verified, self.support
        views = []
        for peer in self._detector.peers.values():
            hb = peer.latest
            views.append(PeerView(
                peer.node_id,
                live=peer.alive and verified.get(peer.node_id) == peer.incarnation,
                hears=hb.heard if hb is not None and hb.version >= 3 else None,
                voting=hb is not None and hb.role is not Role.STARTING,
                support_at=support.get(peer.node_id, NEVER),
                support_until=self.support_until.get(peer.node_id, NEVER)))
        return views
