"""One cluster node: heartbeats in and out, the view, and this node's role.

``ClusterNode`` knows nothing of sockets: transports hand it datagrams
(``datagram_received``) and give it one send function per network. Time comes from an
injected clock. The node's own role is an Automat state machine (``fsha.rolemachine``); what to
do with a slot (floating IPs, FreeSWITCH) is behind ``SlotOwner``, so the whole node runs
in tests with a fake clock and fake effects, and for real under twistd.

Why about 1,000 lines: the datagram hot path, the role evaluation and the status
all read the same peer view; the decisions themselves are pure and apart
(``fsha.detector``, ``fsha.roles``, ``fsha.quorum``, ``fsha.claims``).
"""

from __future__ import annotations

import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha.claims import ClaimFacts, claim_hold, cold_start_wait
from fsha.config import ClusterConfig, NodeConfig, SlotConfig
from fsha.detector import FailureDetector, RoundTrips
from fsha.dropwindow import DropWindow
from fsha.latch import Signal
from fsha.nodestats import (
    MemberStats,
    NetworkView,
    NodeStats,
    QuorumStats,
    SenderStats,
    SlotStats,
)
from fsha.quorum import (
    NEVER,
    PeerView,
    QuorumTracker,
    lease_expires_at,
    lease_for,
    live_count,
)
from fsha.rolemachine import RoleMachine
from fsha.roles import Member, Roles, compute_roles
from fsha.wire.heartbeat import (
    MAX_ECHO_DELAY_US,
    NO_NODE,
    NO_SLOT,
    EchoEncoder,
    Flags,
    Heartbeat,
    HeartbeatCodec,
    HeartbeatError,
    MessageType,
    Role,
    cluster_id_for,
)
from fsha.wire.heartbeat import VERSION as HEARTBEAT_VERSION

Address = tuple[str, int]
SendFunction = Callable[[bytes, Address], None]
RoleListener = Callable[[Role, Role, SlotConfig | None], object]
TickListener = Callable[[], object]
EventListener = Callable[[dict[str, Any]], object]

# A claim that failed makes the node unfit for this long, so the next candidate proceeds.
UNFIT_INTERVALS = 40
# Announcements go out as a burst: now and at these fractions of an interval later.
BURST_DELAYS = (0.0, 0.25, 0.5)
RECENT_EVENTS = 100
#: A deadline tick runs this long after the exact dead-after moment (``check`` compares
#: strictly; float rounding must not make it find the peer alive and wait a whole tick).
DEADLINE_SLACK = 0.0005
# Roles whose heartbeats are answered at once (their lease counts on our echoes).
_HOLDING = (Role.MASTER, Role.CLAIMING)
# Sequences of an incarnation start below this, at random (see ClusterNode.sequence).
FIRST_SEQUENCE_RANGE = 1 << 62


class SlotOwner(Protocol):
    """The effects of owning a slot. Both calls must finish or fail within their timeout."""

    def acquire(self, slot: SlotConfig, epoch: int, previous: NodeConfig | None, *,
                fence: bool = True, claimers: Sequence[NodeConfig] = ()
                ) -> defer.Deferred[None]: ...

    def release(self, slot: SlotConfig) -> defer.Deferred[None]: ...


class HealthSource(Protocol):
    """Is the local FreeSWITCH usable? Feeds the FS_OK heartbeat flag."""

    def is_ok(self) -> bool: ...


@dataclass(slots=True)
class NetworkLink:
    index: int
    name: str
    port: int
    send: SendFunction
    sent: int = 0
    send_errors: int = 0
    last_error: str = ""


class ClusterNode:
    log = Logger()

    def __init__(self, config: ClusterConfig, me: NodeConfig, secret: bytes,
                 clock: IReactorTime, actions: SlotOwner, health: HealthSource,
                 incarnation: int | None = None, claim_timeout: float | None = None,
                 first_sequence: int | None = None,
                 cold_start_gate: Signal | None = None) -> None:
        """``cold_start_gate``: set once what this node needs before a cold-start claim is
        settled (the durable store's load, bounded by the store: fsha.durable); None:
        nothing to wait for."""
        self.config = config
        self.me = me
        self.clock = clock
        self.actions = actions
        self.health = health
        self.incarnation = time.time_ns() if incarnation is None else incarnation
        self.codec = HeartbeatCodec(secret, cluster_id_for(config.name))
        self.detector = FailureDetector([n.node_id for n in config.nodes if n is not me],
                                        len(config.networks), config.dead_after,
                                        floor=config.detection_floor,
                                        interval=config.heartbeat_interval)
        self.links: list[NetworkLink] = []
        # Where each peer must send from, per network (a datagram from elsewhere is dropped).
        self._sources = [{n.addresses[net.name]: n.node_id for n in config.nodes}
                         for net in config.networks]
        self._peer_addresses = [[(n.node_id, (n.addresses[net.name], net.port))
                                 for n in config.nodes if n is not me]
                                for net in config.networks]
        self.round_trips = RoundTrips(self.detector)
        # The heartbeat version each peer was last heard speaking: it is sent that version.
        self.peer_versions = [HEARTBEAT_VERSION] * len(config.nodes)
        self._state_keys: dict[int, tuple[Any, ...]] = {}
        # A random start per incarnation: an echo captured in an earlier incarnation cannot
        # match a sequence of this one by number (replay of a dead peer's heartbeats).
        self.sequence = secrets.randbelow(FIRST_SEQUENCE_RANGE) \
            if first_sequence is None else first_sequence
        # Who is live now, who supports our lease, who runs another config (fsha.quorum).
        self.quorum = QuorumTracker(self.detector, me.node_id, config.heartbeat_interval,
                                    config.dead_after, config.detection_floor)
        # The lease a support gives when its peer states no promise (fsha.quorum).
        self.lease = lease_for(config.heartbeat_interval, config.detection_floor)
        self._lease_call: IDelayedCall | None = None
        self._lease_verdict: IDelayedCall | None = None
        self._answered: dict[int, float] = {}  # peer -> when we last answered it at once
        self.claim_hold = ""  # why an assigned claim waits (status), "" when none
        self.maintenance = False
        self.unfit_until = 0.0
        self.known_epochs: dict[int, int] = {}
        self.last_holder: dict[int, int] = {}  # slot -> node that last mastered it
        # slot -> node that gave it up itself (hand-over, drain, FreeSWITCH gone): it need
        # not be fenced by its successor.
        self.released_by: dict[int, int] = {}
        # slot -> (node, epoch) of a peer last seen claiming it and not since seen to let it
        # go: if it died mid-takeover, its floating IPs and profiles may be up, so the next
        # candidate fences it as well as the previous master.
        self.claimers: dict[int, tuple[int, int]] = {}
        self.roles: Roles = compute_roles([], [], {})
        self.drops: Counter[str] = Counter()
        self.recent_drops = DropWindow()  # by reason and source, the last minutes
        self.received = 0
        self.events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self._announced: dict[int, tuple[Any, ...]] = {}  # peer -> its last announcement
        self.started_at = 0.0
        self.claim_started = 0.0
        # Each effect has its own timeout; this bounds the whole acquisition as well, and
        # must be at least the effects' own budget (or it would cut a sequence short).
        self.claim_timeout = claim_timeout if claim_timeout is not None else (
            2 * config.floating_ip.timeout + config.esl_timeout_total())
        self._machine = RoleMachine(self)
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = clock
        self._pending: list[IDelayedCall] = []
        self._drains: list[Callable[[], None]] = []
        self._deadline_call: IDelayedCall | None = None
        self._role_listeners: list[RoleListener] = []
        self._tick_listeners: list[TickListener] = []
        self._event_listeners: list[EventListener] = []
        self._claim: defer.Deferred[None] | None = None
        self._evaluating = False
        self.running = False
        self.stopping = False
        self._stopped_release: defer.Deferred[None] | None = None
        self._had_quorum = False
        self._quorum_since = 0.0
        self.cold_start_gate = cold_start_gate

    # The role machine owns these (see RoleMachine): read-only here.
    @property
    def role(self) -> Role:
        return self._machine.role

    @property
    def slot(self) -> int:
        return self._machine.slot

    @property
    def epoch(self) -> int:
        return self._machine.epoch

    # -- wiring ---------------------------------------------------------------------------

    def attach(self, network_name: str, send: SendFunction) -> None:
        net = next(n for n in self.config.networks if n.name == network_name)
        self.links.append(NetworkLink(net.index, net.name, net.port, send))
        self.links.sort(key=lambda link: link.index)

    def add_drain(self, drain: Callable[[], None]) -> None:
        """``drain()`` reads the datagrams already waiting on one network's socket
        (fsha.transport): the tick calls it before it declares a peer dead."""
        self._drains.append(drain)

    def start(self) -> None:
        self.running = True
        self.started_at = self.clock.seconds()
        self._event("starting", incarnation=self.incarnation)
        self.log.info("node {node} starting (incarnation {incarnation}); discovery for "
                      "{discovery:.3f}s", node=self.me.name, incarnation=self.incarnation,
                      discovery=self.config.discovery)
        self._ticker.start(self.config.heartbeat_interval, now=True).addErrback(
            lambda f: self.log.failure("heartbeat loop failed", f))

    def stop(self) -> defer.Deferred[None]:
        """Hand a held slot over cleanly (release, then announce it), then stop."""
        self.stopping = True
        # Leaving: never a candidate again (its last heartbeat, after the release, must not
        # rank it first for the slot it gave up).
        self.unfit_until = float("inf")
        if self.role in (Role.MASTER, Role.CLAIMING):
            d: defer.Deferred[None] = defer.Deferred()
            self._stopped_release = d
            self.log.info("stopping: handing slot {slot} over",
                          slot=self.config.slots[self.slot].name)
            if not self.roles.ranking:
                self.log.warn("stopping: no slave is ranked to take slot {slot} over; it has "
                              "no master until one is", slot=self.config.slots[self.slot].name)
            self._machine.lost("node stopping")
        elif self.role is Role.RELEASING and self._stopped_release is None:
            self._stopped_release = d = defer.Deferred()
        else:
            d = defer.succeed(None)

        def halt(_: object) -> None:
            self.running = False
            if self._ticker.running:
                self._ticker.stop()
            for call in (*self._pending, self._lease_call, self._lease_verdict):
                if call is not None and call.active():
                    call.cancel()
            self._pending.clear()
        d.addBoth(halt)
        return d

    # -- the hot path: one datagram ---------------------------------------------------------

    def datagram_received(self, network: int, data: bytes, source: Address) -> None:
        self.received += 1
        try:
            hb = self.codec.decode(data)
        except HeartbeatError as e:
            self.drops[e.reason] += 1
            self.recent_drops.add(e.reason, source[0], self.clock.seconds())
            return
        node_id = hb.node_id
        if node_id >= len(self.config.nodes):
            self.drops["unknown-node"] += 1
            self.recent_drops.add("unknown-node", source[0], self.clock.seconds())
            return
        if node_id == self.me.node_id:
            self.drops["self"] += 1
            return
        if self._sources[network].get(source[0]) != node_id:
            self.drops["wrong-source"] += 1
            self.recent_drops.add("wrong-source", source[0], self.clock.seconds())
            return
        peer = self.detector.peers[node_id]
        was_alive = peer.alive
        now = self.clock.seconds()
        verdict = self.detector.observe(network, hb, now)
        if verdict.dropped:
            self.drops[verdict.value] += 1
            self.recent_drops.add(verdict.value, source[0], now)
            return
        self.peer_versions[node_id] = hb.version
        sent_at = None
        if hb.echo_node == self.me.node_id:
            self.round_trips.echoed(node_id, network, hb.echo_sequence, hb.echo_delay_us, now)
            sent_at = self.round_trips.sent_at(hb.echo_sequence)
        foreign = hb.config_digest != self.config.digest  # alive all the same: fsha.quorum
        newly_live = self.quorum.heard(hb, sent_at, now, not foreign)
        if not verdict.applied:
            if newly_live:
                self._evaluate()
            return
        if hb.role in _HOLDING and hb.type is MessageType.HEARTBEAT:
            self._answer_holder(node_id, network, now)
        key = (hb.role, hb.flags, hb.slot, hb.epoch, hb.incarnation, hb.heard,
               hb.view_digest, foreign)
        if key == self._state_keys.get(node_id) and was_alive and not newly_live \
                and hb.type is MessageType.HEARTBEAT:
            return  # nothing the role engine cares about changed: the common case
        self._state_keys[node_id] = key
        self._peer_changed(hb, was_alive, verdict.value)

    def _answer_holder(self, node_id: int, network: int, now: float) -> None:
        """A master's (or claimant's) new heartbeat: echo it at once, on the network it
        came by, rather than at our next tick. Its lease counts from the send time of the
        sequences echoed, so an echo waiting for our tick would age it by up to an
        interval: answered at once, the lease tolerates stalls nearly as long as the
        dead-after time. At most one answer per peer per interval (two masters answering
        each other do not ping-pong)."""
        if not self.running or self.stopping or self.role is Role.STARTING:
            return
        if now - self._answered.get(node_id, NEVER) < self.config.heartbeat_interval * 0.9:
            return
        self._answered[node_id] = now
        self._send(MessageType.HEARTBEAT, only=(node_id, network))

    def _peer_changed(self, hb: Heartbeat, was_alive: bool, verdict: str) -> None:
        name = self.config.nodes[hb.node_id].name
        if not was_alive:
            self._event("peer-up", peer=name, incarnation=hb.incarnation)
            self.log.info("peer {peer} is up (incarnation {incarnation})",
                          peer=name, incarnation=hb.incarnation)
        elif verdict == "restarted":
            self.round_trips.forget(hb.node_id)
            self._event("peer-restarted", peer=name, incarnation=hb.incarnation)
            self.log.warn("peer {peer} restarted (new incarnation {incarnation})",
                          peer=name, incarnation=hb.incarnation)
        if hb.slot != NO_SLOT and hb.role in (Role.MASTER, Role.CLAIMING, Role.RELEASING):
            if hb.epoch > self.known_epochs.get(hb.slot, 0):
                self.known_epochs[hb.slot] = hb.epoch
            if hb.role is Role.MASTER:
                self.last_holder[hb.slot] = hb.node_id
                self.released_by.pop(hb.slot, None)
            elif hb.role is Role.RELEASING and self.last_holder.get(hb.slot) == hb.node_id:
                self.released_by[hb.slot] = hb.node_id
        self._track_claimers(hb)
        announced = (hb.type, hb.slot, hb.epoch, hb.incarnation)
        # an announcement comes in a burst of copies (_announce): told once, not per copy
        if hb.type is not MessageType.HEARTBEAT \
                and self._announced.get(hb.node_id) != announced:
            self._announced[hb.node_id] = announced
            slot = self.config.slots[hb.slot].name if hb.slot < len(self.config.slots) else "?"
            kind = "takeover" if hb.type is MessageType.TAKEOVER else "release"
            self._event(f"peer-{kind}", peer=name, slot=slot, epoch=hb.epoch,
                        subject=self._name(hb.subject))
            self.log.info("peer {peer} announces {kind} of slot {slot} (epoch {epoch})",
                          peer=name, kind=kind, slot=slot, epoch=hb.epoch,
                          takeover=f"{slot}/{hb.epoch}")
        self._evaluate()

    def _track_claimers(self, hb: Heartbeat) -> None:
        if hb.role is Role.CLAIMING and hb.slot != NO_SLOT:
            self.claimers[hb.slot] = (hb.node_id, hb.epoch)
        for slot, (node_id, epoch) in list(self.claimers.items()):
            if node_id == hb.node_id and hb.slot == slot \
                    and hb.role in (Role.CLAIMING, Role.RELEASING):
                continue  # still claiming, or rolling back: not done with the slot yet
            if node_id == hb.node_id or (hb.slot == slot and hb.role is Role.MASTER
                                         and hb.epoch >= epoch):
                del self.claimers[slot]  # it let the slot go, or the slot has a master

    # -- the periodic work ----------------------------------------------------------------

    def _tick(self) -> None:
        now = self.clock.seconds()
        if self._drains and self.detector.suspects(now):
            # After a stall of this process its timers run before its sockets are read:
            # read what has arrived before calling anyone silent (this node's own stall is
            # no evidence against a peer; it can only delay a verdict, never hasten one)
            for drain in self._drains:
                try:
                    drain()
                except Exception:
                    self.log.failure("reading waiting heartbeats failed")
            now = self.clock.seconds()
        for change in self.detector.check(now):
            name = self.config.nodes[change.node_id].name
            self._state_keys.pop(change.node_id, None)
            self.quorum.forget(change.node_id)
            self.round_trips.forget(change.node_id)
            latest = self.detector.peers[change.node_id].latest
            if latest is not None and latest.role is Role.RELEASING \
                    and latest.type is not MessageType.RELEASE:
                # It died releasing: its floating IPs may still be up. Not a hand-over:
                # its successor fences it.
                for slot in [s for s, n in self.released_by.items() if n == change.node_id]:
                    del self.released_by[slot]
            silent_ms = round((now - self.detector.peers[change.node_id].last_heard()) * 1000, 1)
            self._event("peer-down", peer=name, silent_ms=silent_ms)
            self.log.warn("peer {peer} is down: no heartbeat on any network for {ms:.0f} ms",
                          peer=name, ms=silent_ms)
        self._evaluate()
        # Before the heartbeat goes out: a lease renewed here (fsha.guardlink) is never
        # older than the last heartbeat the peers heard.
        for callback in self._tick_listeners:
            try:
                callback()
            except Exception:
                self.log.failure("tick listener failed")
        self._send(MessageType.HEARTBEAT)
        self._arm_deadline(now)

    def _arm_deadline(self, now: float) -> None:
        """Tick again right when a silent peer reaches dead-after, if that comes before the
        next tick: detection no longer waits for the tick's phase, and every voter declares
        the death within about a one-way latency of the others (they heard the last
        heartbeat together) instead of up to an interval apart; the claimant waits for a
        quorum of those votes. Never earlier than dead-after: ``check`` decides."""
        due = self.detector.next_deadline()
        if due is None:
            return
        delay = max(0.0, due - now + DEADLINE_SLACK)
        if delay >= self.config.heartbeat_interval:
            return
        call = self._deadline_call
        if call is not None and call.active():
            call.reset(delay)
        else:
            self._deadline_call = self.clock.callLater(delay, self._deadline)

    def _deadline(self) -> None:
        self._deadline_call = None
        if self._ticker.running and self.detector.suspects(self.clock.seconds()):
            self._tick()

    # -- operator commands --------------------------------------------------------------

    def set_maintenance(self, on: bool) -> None:
        """Drain (on) or return (off) this node: in maintenance it holds no slot and is no
        takeover candidate; a master hands its slot over first."""
        if on == self.maintenance:
            return
        self.maintenance = on
        self._event("maintenance", on=on)
        self.log.info("maintenance {state} by operator", state="on" if on else "off")
        if on:
            self._machine.lost("maintenance: drained by operator")
        if self.running:
            self._evaluate()
            self._send(MessageType.HEARTBEAT)

    def switchover(self, slot_name: str, to: str | None = None) -> str:
        """Hand a slot this node masters over to the primary candidate (planned move).

        Raises ValueError with an operator-readable reason when it cannot be done.
        """
        try:
            slot = self.config.slot(slot_name)
        except KeyError:
            raise ValueError(f"no slot named {slot_name!r}") from None
        if self.role is not Role.MASTER or self.slot != slot.slot_id:
            owner = self.roles.owner_of(slot.slot_id)
            raise ValueError(f"{self.me.name} is not the master of {slot_name}; its master "
                             f"is {self._name(owner) if owner is not None else 'nobody'}")
        ranking = self.roles.ranking
        if not ranking:
            raise ValueError("no slave is ready to take over (none ranked)")
        successor = self._name(ranking[0])
        if to is not None and to != successor:
            order = ", ".join(self._name(n) for n in ranking)
            raise ValueError(f"{to} is not the primary candidate (ranking: {order}); put the "
                             "nodes ranked before it in maintenance first")
        # Not a candidate for a while, or it would be assigned its own slot straight back.
        self.unfit_until = self.clock.seconds() + UNFIT_INTERVALS * self.config.heartbeat_interval
        self._event("switchover", slot=slot_name, to=successor)
        self._machine.lost(f"switchover to {successor} requested by operator")
        return successor

    def resources_lost(self, slot: int, epoch: int, reason: str) -> bool:
        """Something outside the node (its guard) released this slot's resources: stop
        believing it is held; the release that follows makes sure (it is idempotent) and
        announces it; a master is unfit for a while so the next candidate takes the slot (and
        its calls) over. False if the node no longer holds that slot at that epoch."""
        if self.role not in (Role.MASTER, Role.CLAIMING) or self.slot != slot \
                or self.epoch != epoch:
            return False
        self._event("resources-lost", slot=self.config.slots[slot].name, epoch=epoch,
                    reason=reason)
        if self.role is Role.MASTER:
            # Its calls were hung up here: the next candidate recovers them from the
            # replicated records, which this node cannot do for itself. Not a candidate for
            # a while. (A claim that lost its lease served no call yet: it may claim again.)
            self.unfit_until = (self.clock.seconds()
                                + UNFIT_INTERVALS * self.config.heartbeat_interval)
        self._machine.lost(reason)
        if self.running:
            self._evaluate()
        return True

    def health_changed(self, ok: bool) -> None:
        """The local FreeSWITCH came up or went away: re-evaluate and tell peers now."""
        self._event("freeswitch", ok=ok)
        if self.running:
            self._evaluate()
            self._send(MessageType.HEARTBEAT)

    # -- quorum (the decisions are fsha.quorum's) -------------------------------------------

    def peer_views(self) -> list[PeerView]:
        """What this node knows of each peer, for fsha.quorum."""
        return self.quorum.views()

    def lease_expires_at(self) -> float:
        return lease_expires_at(self.peer_views(), self.config.quorum, self.lease)

    def _claim_hold(self, slot_id: int, roles: Roles, now: float) -> str:
        """Why this node may not claim its assigned ``slot_id`` yet ("" when it may): the
        facts gathered here, the policy in :func:`fsha.claims.claim_hold`."""
        views = self.peer_views()
        previous = self.last_holder.get(slot_id)
        peers = self.detector.peers
        digests = [peers[v.node_id].latest.view_digest for v in views  # type: ignore[union-attr]
                   if v.live and v.voting]
        facts = ClaimFacts(
            me=self.me.node_id, previous=previous,
            previous_alive=previous is not None and previous in peers
            and peers[previous].alive,
            voting=now - self.started_at >= self.config.dead_after, views=views,
            peer_digests=digests, my_digest=roles.digest, quorum=self.config.quorum,
            lease=self.lease, now=now)
        return claim_hold(facts, {n.node_id: n.name for n in self.config.nodes})

    def _lease_expired(self, now: float) -> bool:
        """Has this master's lease run out? Asked twice: the first time it looks expired,
        the verdict waits for one turn of the reactor, which reads the datagrams that
        arrived before the next timed call runs: after a stall of this process the echoes
        renewing the lease may be waiting in the socket (they can only renew it up to the
        send times they echo, so waiting never extends a lease past its bound)."""
        if self._check_lease(now):
            self._lease_verdict = None
            return False
        verdict = self._lease_verdict
        if verdict is None:
            self._lease_verdict = self.clock.callLater(0, self._evaluate)
            return False
        if verdict.active():
            return False
        self._lease_verdict = None
        return True

    def _check_lease(self, now: float) -> bool:
        """Does this master (or claimant) still hold its lease? If so, make sure it is
        checked again right when it would end."""
        expires = self.lease_expires_at()
        if now >= expires:
            return False
        if expires - now < self.config.heartbeat_interval:  # before the next tick
            call = self._lease_call
            if call is not None and call.active():
                call.reset(expires - now)
            else:
                self._lease_call = self.clock.callLater(expires - now, self._evaluate)
        return True

    def _anyone_starting(self) -> bool:
        return any(p.alive and p.latest is not None and p.latest.role is Role.STARTING
                   for p in self.detector.peers.values())

    def alive_count(self) -> int:
        """This node and its live peers: heard and proven live now (fsha.quorum)."""
        return live_count(self.peer_views())

    def sees_quorum(self) -> bool:
        return self.alive_count() >= self.config.quorum

    def flags(self) -> Flags:
        flags = Flags(0)
        if self.health.is_ok():
            flags |= Flags.FS_OK
        if self.maintenance:
            flags |= Flags.MAINTENANCE
        if self.sees_quorum():
            flags |= Flags.SEES_QUORUM
        if self.clock.seconds() < self.unfit_until:
            flags |= Flags.UNFIT
        return flags

    def peer_fs_ok(self, node_id: int) -> bool | None:
        """The FS_OK flag of a peer's last heartbeat (None: never heard)."""
        peer = self.detector.peers.get(node_id)
        hb = peer.latest if peer is not None else None
        return None if hb is None else bool(hb.flags & Flags.FS_OK)

    def replace_config(self, config: ClusterConfig) -> None:
        """Run with ``config`` from now on: an online change (``fsha config push``) that
        :func:`fsha.configplan.diff` allowed (priorities, ``[notify]``, slots' addresses
        and profiles, slots appended): the same nodes and networks, and the slots kept
        where they were, so every id and address stays valid. Heartbeats carry the new
        digest from the next tick; the roles are recomputed at once (an appended slot is
        an orphan the role engine gives to a slave)."""
        self.config = config
        self.me = config.node(self.me.name)
        self._state_keys.clear()  # a peer's "foreign" flag is judged anew
        self._evaluate()

    def members(self) -> list[Member]:
        nodes = self.config.nodes
        result = [Member(self.me.node_id, self.me.name, self.me.priority, self.incarnation,
                         self.role, self.flags(), self.slot, self.epoch)]
        for peer in self.detector.peers.values():
            hb = peer.latest
            if peer.alive and hb is not None:
                node = nodes[peer.node_id]
                result.append(Member(node.node_id, node.name, node.priority, hb.incarnation,
                                     hb.role, hb.flags, hb.slot, hb.epoch))
        return result

    def _evaluate(self) -> None:
        """Recompute the roles and move this node's state machine accordingly."""
        if self._evaluating or not self.running or self.stopping:
            return
        self._evaluating = True
        try:
            # A transition can make another one due (released -> slave -> assigned):
            # settle, but boundedly.
            for _ in range(4):
                before = (self.role, self.slot)
                self._evaluate_once()
                if (self.role, self.slot) == before:
                    break
        finally:
            self._evaluating = False

    def _evaluate_once(self) -> None:
        self.roles = roles = compute_roles(self.members(), range(len(self.config.slots)),
                                           self.known_epochs)
        me = self.me.node_id
        # Whatever the role: when quorum came back (see the claim below).
        quorum = self.sees_quorum()
        now = self.clock.seconds()
        if quorum and not self._had_quorum:
            self._quorum_since = now
        self._had_quorum = quorum
        if self.role is Role.STARTING:
            if self.clock.seconds() - self.started_at >= self.config.discovery:
                self._machine.discovered()
                self.roles = roles = compute_roles(self.members(),
                                                   range(len(self.config.slots)),
                                                   self.known_epochs)
            else:
                return
        if self.role in (Role.CLAIMING, Role.MASTER):
            owner = roles.owner_of(self.slot)
            if owner != me:
                winner = self._name(owner if owner is not None else NO_NODE)
                self._machine.lost(f"{winner} holds slot by a better claim")
            elif self.role is Role.MASTER and not self.health.is_ok():
                # Its calls are gone with it: let the next candidate recover them now rather
                # than after the others' dead-after time.
                self._machine.lost("local FreeSWITCH is not answering")
            elif self._lease_expired(now):
                # No quorum has heard us lately: the others may soon declare us dead and
                # claim. Let go first (addresses down first, as every release does).
                self._event("lease-expired", slot=self._slot_name(self.slot))
                self._machine.lost(f"lease expired: no quorum heard this node within "
                                   f"{self.lease * 1000:.0f} ms")
            return
        if self.role is Role.SLAVE and me in roles.assignments and quorum:
            if now - self._quorum_since < self.config.discovery:
                # Back from isolation: peers not heard again yet still look dead, and their
                # slots orphaned. Listen first, as at start-up.
                return
            slot_id, epoch = roles.assignments[me]
            hold = self._claim_hold(slot_id, roles, now)
            if hold != self.claim_hold:
                self.claim_hold = hold
                if hold:
                    # A held claim is news when the master is heard elsewhere (a partial
                    # fault); waiting for agreement is part of every takeover.
                    log = self.log.info if "still heard" in hold else self.log.debug
                    log("not claiming slot {slot} yet: {reason}",
                        slot=self.config.slots[slot_id].name, reason=hold)
            if hold:
                return
            previous = self.last_holder.get(slot_id)
            handed_over = previous is not None and self.released_by.get(slot_id) == previous
            claimer = self.claimers.get(slot_id)
            claimers = (self.config.nodes[claimer[0]],) \
                if claimer is not None and claimer[0] != me else ()
            gate = self.cold_start_gate
            if cold_start_wait(previous, epoch, self._anyone_starting(),
                               gate is None or gate.is_set):
                return
            self._machine.assigned(self.config.slots[slot_id], epoch,
                                   self.config.nodes[previous] if previous is not None else None,
                                   handed_over, claimers)

    # -- outputs of the role machine --------------------------------------------------------

    def add_role_listener(self, callback: RoleListener) -> None:
        """``callback(old_role, new_role, slot)`` after every change of this node's role;
        ``slot`` is the slot concerned (the one held, claimed or released), if any."""
        self._role_listeners.append(callback)

    def add_tick_listener(self, callback: TickListener) -> None:
        """``callback()`` at every heartbeat tick, after the roles are evaluated and before
        the heartbeat is sent (the guard's lease renewal)."""
        self._tick_listeners.append(callback)

    def _role_changed(self, old: Role, old_slot: int) -> None:
        """The machine moved from ``old`` (about ``old_slot``): record it, tell listeners."""
        role, slot, epoch = self.role, self.slot, self.epoch
        self._event("role", role=role.name.lower(),
                    slot=self.config.slots[slot].name if slot != NO_SLOT else None,
                    epoch=epoch)
        concerned = slot if slot != NO_SLOT else old_slot
        slot_config = self.config.slots[concerned] if concerned != NO_SLOT else None
        for callback in list(self._role_listeners):
            try:
                callback(old, role, slot_config)
            except Exception:
                self.log.failure("role listener failed")

    def _begin_claim(self, slot: SlotConfig, epoch: int, previous: NodeConfig | None,
                     handed_over: bool = False, claimers: tuple[NodeConfig, ...] = ()) -> None:
        self.claim_started = self.clock.seconds()
        subject = previous.name if previous is not None else None
        self.log.info("claiming slot {slot} with epoch {epoch} (previous master: {previous})",
                      slot=slot.name, epoch=epoch, previous=subject or "none",
                      takeover=f"{slot.name}/{epoch}")
        self._event("claim", slot=slot.name, epoch=epoch, previous=subject,
                    handed_over=handed_over, dead_claimers=[c.name for c in claimers])
        self._announce(MessageType.TAKEOVER,
                       subject=previous.node_id if previous is not None else self.me.node_id)
        # A master that released the slot itself is alive and well: never fence it. A node
        # that died claiming the slot may hold its resources: fence it too.
        claim = self._claim = defer.maybeDeferred(self.actions.acquire, slot, epoch, previous,
                                                  fence=not handed_over, claimers=claimers)
        self._guard_claim(claim, slot)

        def done(result: object) -> None:
            if self._claim is not claim or self.role is not Role.CLAIMING:
                return  # overtaken (lost the slot meanwhile): release handled it
            self._claim = None
            if isinstance(result, Failure):
                reason = result.getErrorMessage() or result.type.__name__
                self.log.error("claim of slot {slot} failed: {reason}; rolling back",
                               slot=slot.name, reason=reason)
                self._release_resources(slot, "claim failed").addBoth(
                    lambda _: self._machine.acquire_failed(reason))
            else:
                self._machine.acquired()
        claim.addBoth(done).addErrback(
            lambda f: self.log.failure("claim bookkeeping failed", f))

    def _guard_claim(self, claim: defer.Deferred[None], slot: SlotConfig) -> None:
        """Give the claim up after ``claim_timeout`` without progress. The actions may
        report progress (``claim_progress(slot)``: the clock time of the last step or
        recovery batch done, see fsha.takeover), so a big slot recovered batch after batch
        is not cut by a fixed bound; without it the bound counts from the claim's start."""
        progress = getattr(self.actions, "claim_progress", None)
        started = self.clock.seconds()

        def check() -> None:
            if claim.called:
                return
            last = progress(slot) if progress is not None else None
            due = max(started, last or 0.0) + self.claim_timeout
            now = self.clock.seconds()
            if now < due:
                timer[0] = self.clock.callLater(due - now, check)
                return
            self.log.error("claim of slot {slot}: no progress for {seconds:g} s; giving up",
                           slot=slot.name, seconds=self.claim_timeout)
            claim.cancel()

        timer = [self.clock.callLater(self.claim_timeout, check)]

        def stop(result: object) -> object:
            if timer[0].active():
                timer[0].cancel()
            return result

        claim.addBoth(stop)

    def _become_master(self) -> None:
        took = (self.clock.seconds() - self.claim_started) * 1000
        slot = self.config.slots[self.slot]
        self.known_epochs[self.slot] = max(self.known_epochs.get(self.slot, 0), self.epoch)
        self.last_holder[self.slot] = self.me.node_id
        self.claimers.pop(self.slot, None)
        self.log.info("master of slot {slot} (epoch {epoch}) after {ms:.1f} ms",
                      slot=slot.name, epoch=self.epoch, ms=took,
                      takeover=f"{slot.name}/{self.epoch}")
        self._event("master", slot=slot.name, epoch=self.epoch, claim_ms=round(took, 1))
        self._announce(MessageType.HEARTBEAT)

    def _claim_aborted(self, slot_id: int, reason: str) -> None:
        slot = self.config.slots[slot_id].name if slot_id != NO_SLOT else None
        self.unfit_until = self.clock.seconds() + UNFIT_INTERVALS * self.config.heartbeat_interval
        self._event("claim-aborted", slot=slot, reason=reason)

    def _stop_claim(self, reason: str) -> SlotConfig:
        """A release begins: say so, and cancel an acquisition still running."""
        slot = self.config.slots[self.slot]
        self.log.warn("releasing slot {slot}: {reason}", slot=slot.name, reason=reason,
                      takeover=f"{slot.name}/{self.epoch}")
        self._event("release", slot=slot.name, epoch=self.epoch, reason=reason)
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.cancel()  # stop acquiring before releasing
        return slot

    def _release(self, slot: SlotConfig, reason: str) -> None:
        self._release_resources(slot, reason).addBoth(lambda _: self._released(slot))

    def _released(self, slot: SlotConfig) -> None:
        self._announce(MessageType.RELEASE, burst=not self.stopping)
        self._machine.released()
        # Successors wait for this (a slot being released is no orphan): tell them now.
        self._send(MessageType.HEARTBEAT)
        waiter, self._stopped_release = self._stopped_release, None
        if waiter is not None:
            waiter.callback(None)
        self._evaluate()

    def _release_resources(self, slot: SlotConfig, reason: str) -> defer.Deferred[None]:
        d = defer.maybeDeferred(self.actions.release, slot)

        def failed(f: Failure) -> None:
            self._event("release-failed", slot=slot.name, reason=reason,
                        error=f.getErrorMessage() or f.type.__name__)
            self.log.failure("releasing slot {slot} ({reason}) failed", f, slot=slot.name,
                             reason=reason)
        d.addErrback(failed)
        return d

    # -- sending --------------------------------------------------------------------------

    def _announce(self, kind: MessageType, subject: int | None = None, burst: bool = True
                  ) -> None:
        """Send now, and again a little later, so one lost datagram does not delay peers.

        Every copy carries the state of the moment of the announcement; a node that is
        stopping sends its copies at once, as it will not be there later.
        """
        state = (self.role, self.slot, self.epoch)
        for delay in BURST_DELAYS:
            if delay == 0.0 or not burst:
                self._send(kind, subject, state)
            else:
                call = self.clock.callLater(delay * self.config.heartbeat_interval,
                                            self._send_if_running, kind, subject, state)
                self._pending = [c for c in self._pending if c.active()]
                self._pending.append(call)

    def _send_if_running(self, kind: MessageType, subject: int | None,
                         state: tuple[Role, int, int]) -> None:
        # A copy sent after the state moved on would carry a newer sequence than the new
        # state's announcement and overwrite it at the receivers: send only if still true.
        if self.running and state == (self.role, self.slot, self.epoch):
            self._send(kind, subject, state)

    def _send(self, kind: MessageType, subject: int | None = None,
              state: tuple[Role, int, int] | None = None,
              only: tuple[int, int] | None = None) -> None:
        """Send ``kind`` with ``state`` (default: the current one) to every peer on every
        network, or only to ``only`` = (peer, network): an answer (see _answer_holder)."""
        role, slot, epoch = state if state is not None else (self.role, self.slot, self.epoch)
        if kind is MessageType.HEARTBEAT:
            subject = NO_NODE
        elif slot == NO_SLOT:
            return  # nothing to announce about
        elif subject is None:
            subject = self.me.node_id
        self.sequence += 1
        now = self.clock.seconds()
        self.round_trips.sent(self.sequence, now)
        heard = self.quorum.heard_bits()
        fields = dict(
            type=kind, cluster_id=self.codec.cluster_id, node_id=self.me.node_id,
            incarnation=self.incarnation, sequence=self.sequence, role=role,
            flags=self.flags(), slot=slot, epoch=epoch, subject=subject,
            config_digest=self.config.digest, view_digest=self.roles.digest)
        versions = self.peer_versions
        # One encoder per version spoken; every copy echoes its destination (fsha.quorum:
        # how a peer shows it is live now, and how a master keeps its lease).
        encoders: dict[int, EchoEncoder] = {}
        echo_to = self.round_trips.echo_to
        promise = self.detector.promise
        for link in self.links:
            if only is not None and link.index != only[1]:
                continue
            for node_id, address in self._peer_addresses[link.index]:
                if only is not None and node_id != only[0]:
                    continue
                version = versions[node_id]
                encode = encoders.get(version)
                if encode is None:
                    encode = encoders[version] = self.codec.prepare(Heartbeat(
                        **fields, version=version,
                        heard=heard if version >= 3 else 0))
                echo = echo_to(node_id, link.index, now) if version >= 2 else None
                if echo is None:
                    payload = encode(NO_NODE, 0, 0, 0)
                elif version >= 4:
                    # the promise (fsha.detector), rounded down: never more than is kept
                    payload = encode(node_id, echo[0], echo[1], min(
                        MAX_ECHO_DELAY_US, int(promise(node_id, link.index) * 1_000_000)))
                else:
                    payload = encode(node_id, echo[0], echo[1], 0)
                try:
                    link.send(payload, address)
                    link.sent += 1
                except OSError as e:
                    # A dead NIC must not stop the loop, nor the other networks.
                    link.send_errors += 1
                    if str(e) != link.last_error:
                        link.last_error = str(e)
                        self.log.warn("network {network}: cannot send to {address}: {error}",
                                      network=link.name, address=address[0], error=e)

    # -- reporting ------------------------------------------------------------------------

    def _name(self, node_id: int) -> str:
        return self.config.nodes[node_id].name if node_id < len(self.config.nodes) else "none"

    def record_event(self, kind: str, **fields: Any) -> None:
        """Add an event to this node's recent events (status, demo timeline)."""
        self._event(kind, **fields)

    def add_event_listener(self, callback: EventListener) -> None:
        """``callback(event)`` with every event added to :attr:`events` (the same dict:
        ``time``, ``event`` and its fields; do not modify it). Called synchronously from
        inside the node's transitions: a listener must be quick and must not call back
        into the node; an exception it raises is logged and ignored."""
        self._event_listeners.append(callback)

    def _event(self, kind: str, **fields: Any) -> None:
        event = {"time": round(self.clock.seconds(), 3), "event": kind, **fields}
        self.events.append(event)
        for callback in self._event_listeners:
            try:
                callback(event)
            except Exception:
                self.log.failure("event listener failed on {kind}", kind=kind)

    def stats(self) -> NodeStats:
        now = self.clock.seconds()
        roles = self.roles
        nodes = []
        for node in self.config.nodes:
            if node is self.me:
                nodes.append(MemberStats(
                    name=node.name, priority=node.priority, rank=roles.rank_of(node.node_id),
                    is_self=True, alive=True, live=True, config="same",
                    hears=sorted(self._name(n) for n in range(len(self.config.nodes))
                                 if self.quorum.heard_bits() >> n & 1),
                    role=self.role.name.lower(), slot=self._slot_name(self.slot),
                    epoch=self.epoch, incarnation=self.incarnation,
                    flags=_flag_names(self.flags()), view_agrees=True, networks={}))
                continue
            peer = self.detector.peers[node.node_id]
            hb = peer.latest
            heard = hb is not None and peer.alive
            nodes.append(MemberStats(
                name=node.name, priority=node.priority, rank=roles.rank_of(node.node_id),
                is_self=False, alive=peer.alive,
                # heard and proven live now: counts toward quorum (fsha.quorum)
                live=self.quorum.is_live(node.node_id),
                config="other" if node.node_id in self.quorum.foreign else "same",
                hears=sorted(self._name(n) for n in range(len(self.config.nodes))
                             if hb.heard >> n & 1)
                if hb is not None and hb.version >= 3 and peer.alive else None,
                role=hb.role.name.lower() if hb is not None and heard else "unknown",
                slot=self._slot_name(hb.slot) if hb is not None and heard else None,
                epoch=hb.epoch if hb is not None and heard else None,
                incarnation=peer.incarnation if peer.incarnation >= 0 else None,
                flags=_flag_names(hb.flags) if hb is not None and heard else [],
                view_agrees=bool(hb is not None and heard and hb.view_digest == roles.digest),
                restarts=peer.restarts,
                heartbeat_version=self.peer_versions[node.node_id]
                if peer.incarnation >= 0 else None,
                networks={net.name: NetworkView(
                    up=self.detector.network_up(node.node_id, net.index, now),
                    last_heard_ms=_ms_since(now, peer.heard[net.index]),
                    # the silence judged death there now (fsha.detector)
                    bound_ms=round(self.detector.bound(node.node_id, net.index) * 1000, 1),
                    rtt_ms=_ms(self.round_trips.smoothed[node.node_id][net.index]))
                    for net in self.config.networks}))
        slots = [SlotStats(name=s.name, owner=self._name(roles.owners[s.slot_id])
                           if s.slot_id in roles.owners else None,
                           epoch=roles.epochs.get(s.slot_id,
                                                  self.known_epochs.get(s.slot_id, 0)),
                           profiles=list(s.profiles), ips=[str(ip) for ip in s.ips])
                 for s in self.config.slots]
        return NodeStats(
            cluster=self.config.name, node=self.me.name,
            incarnation=self.incarnation, role=self.role.name.lower(),
            slot=self._slot_name(self.slot), epoch=self.epoch,
            uptime_s=round(now - self.started_at, 3),
            quorum=QuorumStats(required=self.config.quorum, alive=self.alive_count(),
                               ok=self.sees_quorum(), spec=self.config.quorum_spec,
                               lease_ms=round(self.lease * 1000, 3),
                               lease_left_ms=self._lease_left_ms(now),
                               claim_hold=self.claim_hold or None),
            config_digest=self.config.digest.hex(), view_digest=roles.digest.hex(),
            heartbeat_interval_ms=round(self.config.heartbeat_interval * 1000, 3),
            dead_after_ms=round(self.config.dead_after * 1000, 3),
            dead_after_min_ms=round(self.config.detection_floor * 1000, 3),
            ranking=[self._name(n) for n in roles.ranking],
            nodes=nodes, slots=slots,
            networks=[SenderStats(name=link.name, sent=link.sent,
                                send_errors=link.send_errors, last_error=link.last_error)
                      for link in self.links],
            received=self.received, drops=dict(self.drops),
            recent_drops=self.recent_drops.recent(now),
            events=list(self.events))

    def status(self) -> dict[str, Any]:
        return self.stats().as_status()

    def _lease_left_ms(self, now: float) -> float | None:
        """How long this master's lease still runs (None when it holds no slot)."""
        if self.role not in (Role.MASTER, Role.CLAIMING):
            return None
        expires = self.lease_expires_at()
        if expires == float("inf"):
            return None
        return round(max(0.0, expires - now) * 1000, 1)

    def _slot_name(self, slot: int) -> str | None:
        return self.config.slots[slot].name if slot < len(self.config.slots) else None


def _ms_since(now: float, then: float) -> float | None:
    return None if then == float("-inf") else round((now - then) * 1000, 1)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _flag_names(flags: Flags) -> list[str]:
    return [f.name.lower() for f in Flags if f.name and flags & f]
