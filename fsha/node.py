"""One cluster node: heartbeats in and out, the view, and this node's role.

``ClusterNode`` knows nothing of sockets: transports hand it datagrams
(``datagram_received``) and give it one send function per network. Time comes from an
injected clock. The node's own role is an Automat state machine (``RoleMachine``); what to
do with a slot (floating IPs, FreeSWITCH) is behind ``SlotActions``, so the whole node runs
in tests with a fake clock and fake effects, and for real under twistd.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from automat import MethodicalMachine
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha.config import ClusterConfig, NodeConfig, SlotConfig
from fsha.detector import FailureDetector, RoundTrips
from fsha.roles import Member, Roles, compute_roles
from fsha.wire.heartbeat import (
    NO_NODE,
    NO_SLOT,
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
EventListener = Callable[[dict[str, Any]], object]

# A claim that failed makes the node unfit for this long, so the next candidate proceeds.
UNFIT_INTERVALS = 40
# Announcements go out as a burst: now and at these fractions of an interval later.
BURST_DELAYS = (0.0, 0.25, 0.5)
RECENT_EVENTS = 100


class SlotActions(Protocol):
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


class RoleMachine:
    """This node's role: starting -> slave <-> claiming -> master -> releasing -> slave."""

    _machine = MethodicalMachine()

    def __init__(self, node: ClusterNode) -> None:
        self._node = node

    @_machine.state(initial=True)
    def starting(self) -> None:
        "Listening for the cluster before taking any part in it."

    @_machine.state()
    def slave(self) -> None:
        "Ranked and ready to take over."

    @_machine.state()
    def claiming(self) -> None:
        "Taking a slot over: announced, acquiring its resources."

    @_machine.state()
    def master(self) -> None:
        "Serving a slot."

    @_machine.state()
    def releasing(self) -> None:
        "Giving a slot up."

    @_machine.input()
    def discovered(self) -> None:
        "The discovery window is over."

    @_machine.input()
    def assigned(self, slot: SlotConfig, epoch: int, previous: NodeConfig | None,
                 handed_over: bool, claimers: tuple[NodeConfig, ...] = ()) -> None:
        "The role engine gives this node an orphan slot (its previous master may have let it go)."

    @_machine.input()
    def acquired(self) -> None:
        "The slot's resources are ours."

    @_machine.input()
    def acquire_failed(self, reason: str) -> None:
        "Acquiring failed (and was rolled back)."

    @_machine.input()
    def lost(self, reason: str) -> None:
        "Another node holds the slot by a better claim, or we must let it go."

    @_machine.input()
    def released(self) -> None:
        "The slot's resources are released."

    @_machine.output()
    def _enter_slave(self) -> None:
        self._node._set_role(Role.SLAVE, NO_SLOT, 0)

    @_machine.output()
    def _begin_claim(self, slot: SlotConfig, epoch: int, previous: NodeConfig | None,
                     handed_over: bool, claimers: tuple[NodeConfig, ...] = ()) -> None:
        self._node._begin_claim(slot, epoch, previous, handed_over, claimers)

    @_machine.output()
    def _become_master(self) -> None:
        self._node._become_master()

    @_machine.output()
    def _claim_aborted(self, reason: str) -> None:
        self._node._claim_aborted(reason)

    @_machine.output()
    def _begin_release(self, reason: str) -> None:
        self._node._begin_release(reason)

    starting.upon(discovered, enter=slave, outputs=[_enter_slave])
    slave.upon(assigned, enter=claiming, outputs=[_begin_claim])
    claiming.upon(acquired, enter=master, outputs=[_become_master])
    claiming.upon(acquire_failed, enter=slave, outputs=[_claim_aborted])
    claiming.upon(lost, enter=releasing, outputs=[_begin_release])
    master.upon(lost, enter=releasing, outputs=[_begin_release])
    releasing.upon(released, enter=slave, outputs=[_enter_slave])


class ClusterNode:
    log = Logger()

    def __init__(self, config: ClusterConfig, me: NodeConfig, secret: bytes,
                 clock: IReactorTime, actions: SlotActions, health: HealthSource,
                 incarnation: int | None = None, claim_timeout: float | None = None
                 ) -> None:
        self.config = config
        self.me = me
        self.clock = clock
        self.actions = actions
        self.health = health
        self.incarnation = time.time_ns() if incarnation is None else incarnation
        self.codec = HeartbeatCodec(secret, cluster_id_for(config.name))
        self.detector = FailureDetector([n.node_id for n in config.nodes if n is not me],
                                        len(config.networks), config.dead_after)
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
        self.sequence = 0
        self.role = Role.STARTING
        self.slot = NO_SLOT
        self.epoch = 0
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
        self.received = 0
        self.events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
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
        self._role_listeners: list[RoleListener] = []
        self._event_listeners: list[EventListener] = []
        self._claim: defer.Deferred[None] | None = None
        self._evaluating = False
        self.running = False
        self.stopping = False
        self._stopped_release: defer.Deferred[None] | None = None
        self._had_quorum = False
        self._quorum_since = 0.0
        # False while something this node needs before a cold-start claim is not settled
        # (the durable store's load, bounded by the store): see fsha.durable.
        self.cold_start_gate: Callable[[], bool] | None = None

    # -- wiring ---------------------------------------------------------------------------

    def attach(self, network_name: str, send: SendFunction) -> None:
        net = next(n for n in self.config.networks if n.name == network_name)
        self.links.append(NetworkLink(net.index, net.name, net.port, send))
        self.links.sort(key=lambda link: link.index)

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
        if self.role in (Role.MASTER, Role.CLAIMING):
            d: defer.Deferred[None] = defer.Deferred()
            self._stopped_release = d
            self.log.info("stopping: handing slot {slot} over",
                          slot=self.config.slots[self.slot].name)
            self._machine.lost("node stopping")
        elif self.role is Role.RELEASING and self._stopped_release is None:
            self._stopped_release = d = defer.Deferred()
        else:
            d = defer.succeed(None)

        def halt(_: object) -> None:
            self.running = False
            if self._ticker.running:
                self._ticker.stop()
            for call in self._pending:
                if call.active():
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
            return
        node_id = hb.node_id
        if node_id >= len(self.config.nodes):
            self.drops["unknown-node"] += 1
            return
        if node_id == self.me.node_id:
            self.drops["self"] += 1
            return
        if self._sources[network].get(source[0]) != node_id:
            self.drops["wrong-source"] += 1
            return
        if hb.config_digest != self.config.digest:
            self.drops["config-mismatch"] += 1
            return
        peer = self.detector.peers[node_id]
        was_alive = peer.alive
        now = self.clock.seconds()
        verdict = self.detector.observe(network, hb, now)
        if verdict.dropped:
            self.drops[verdict.value] += 1
            return
        self.peer_versions[node_id] = hb.version
        if hb.echo_node == self.me.node_id:
            self.round_trips.echoed(node_id, network, hb.echo_sequence, hb.echo_delay_us, now)
        if not verdict.applied:
            return
        key = (hb.role, hb.flags, hb.slot, hb.epoch, hb.incarnation)
        if key == self._state_keys.get(node_id) and was_alive \
                and hb.type is MessageType.HEARTBEAT:
            return  # nothing the role engine cares about changed: the common case
        self._state_keys[node_id] = key
        self._peer_changed(hb, was_alive, verdict.value)

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
        if hb.type is not MessageType.HEARTBEAT:
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
        for change in self.detector.check(now):
            name = self.config.nodes[change.node_id].name
            self._state_keys.pop(change.node_id, None)
            self.round_trips.forget(change.node_id)
            self._event("peer-down", peer=name)
            self.log.warn("peer {peer} is down: no heartbeat on any network for {ms:.0f} ms",
                          peer=name, ms=self.config.dead_after * 1000)
        self._evaluate()
        self._send(MessageType.HEARTBEAT)

    # -- operator commands --------------------------------------------------------------

    def set_maintenance(self, on: bool) -> None:
        """Drain (on) or return (off) this node: in maintenance it holds no slot and is no
        takeover candidate; a master hands its slot over first."""
        if on == self.maintenance:
            return
        self.maintenance = on
        self._event("maintenance", on=on)
        self.log.info("maintenance {state} by operator", state="on" if on else "off")
        if on and self.role in (Role.MASTER, Role.CLAIMING):
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

    def health_changed(self, ok: bool) -> None:
        """The local FreeSWITCH came up or went away: re-evaluate and tell peers now."""
        self._event("freeswitch", ok=ok)
        if self.running:
            self._evaluate()
            self._send(MessageType.HEARTBEAT)

    def _quorum_after(self, dead: int) -> bool:
        """Quorum counting only peers heard well after ``dead`` was last heard.

        Peers cut off together with the dead master are declared dead one by one (their
        last heartbeats are up to an interval apart), so for a moment a minority would
        still count some of them. Those were last heard within an interval of the master;
        peers on this side of a partition have been heard since.
        """
        peer = self.detector.peers.get(dead)
        if peer is None or peer.alive:  # ourselves, or a master that let the slot go
            return self.sees_quorum()
        after = peer.last_heard() + self.config.heartbeat_interval
        fresh = 1 + sum(1 for p in self.detector.peers.values()
                        if p.alive and p.last_heard() > after)
        return fresh >= self.config.quorum

    def _anyone_starting(self) -> bool:
        return any(p.alive and p.latest is not None and p.latest.role is Role.STARTING
                   for p in self.detector.peers.values())

    def alive_count(self) -> int:
        return 1 + sum(1 for p in self.detector.peers.values() if p.alive)

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
            return
        if self.role is Role.SLAVE and me in roles.assignments and quorum:
            if now - self._quorum_since < self.config.discovery:
                # Back from isolation: peers not heard again yet still look dead, and their
                # slots orphaned. Listen first, as at start-up.
                return
            slot_id, epoch = roles.assignments[me]
            previous = self.last_holder.get(slot_id)
            if previous is not None and not self._quorum_after(previous):
                return  # a dead master's slot: see _quorum_after
            handed_over = previous is not None and self.released_by.get(slot_id) == previous
            claimer = self.claimers.get(slot_id)
            claimers = (self.config.nodes[claimer[0]],) \
                if claimer is not None and claimer[0] != me else ()
            if previous is None and epoch == 1 and (
                    self._anyone_starting()
                    or (self.cold_start_gate is not None and not self.cold_start_gate())):
                # A slot never owned (cluster cold start): wait until every live node has
                # finished discovery, so all rank the same slaves and claims do not collide.
                # A dead master's slot (known epoch) is taken over at once. The durable
                # store (if any) may still name the slot's master before the restart.
                return
            self._machine.assigned(self.config.slots[slot_id], epoch,
                                   self.config.nodes[previous] if previous is not None else None,
                                   handed_over, claimers)

    # -- outputs of the role machine --------------------------------------------------------

    def add_role_listener(self, callback: RoleListener) -> None:
        """``callback(old_role, new_role, slot)`` after every change of this node's role;
        ``slot`` is the slot concerned (the one held, claimed or released), if any."""
        self._role_listeners.append(callback)

    def _set_role(self, role: Role, slot: int, epoch: int) -> None:
        old, old_slot = self.role, self.slot
        self.role, self.slot, self.epoch = role, slot, epoch
        if old is not role:
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
        self._set_role(Role.CLAIMING, slot.slot_id, epoch)
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
        self._set_role(Role.MASTER, self.slot, self.epoch)
        self.known_epochs[self.slot] = max(self.known_epochs.get(self.slot, 0), self.epoch)
        self.last_holder[self.slot] = self.me.node_id
        self.claimers.pop(self.slot, None)
        self.log.info("master of slot {slot} (epoch {epoch}) after {ms:.1f} ms",
                      slot=slot.name, epoch=self.epoch, ms=took,
                      takeover=f"{slot.name}/{self.epoch}")
        self._event("master", slot=slot.name, epoch=self.epoch, claim_ms=round(took, 1))
        self._announce(MessageType.HEARTBEAT)

    def _claim_aborted(self, reason: str) -> None:
        slot = self.config.slots[self.slot].name if self.slot != NO_SLOT else None
        self.unfit_until = self.clock.seconds() + UNFIT_INTERVALS * self.config.heartbeat_interval
        self._event("claim-aborted", slot=slot, reason=reason)
        self._set_role(Role.SLAVE, NO_SLOT, 0)
        self._announce(MessageType.HEARTBEAT)

    def _begin_release(self, reason: str) -> None:
        slot = self.config.slots[self.slot]
        self.log.warn("releasing slot {slot}: {reason}", slot=slot.name, reason=reason,
                      takeover=f"{slot.name}/{self.epoch}")
        self._event("release", slot=slot.name, epoch=self.epoch, reason=reason)
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.cancel()  # stop acquiring before releasing
        self._set_role(Role.RELEASING, self.slot, self.epoch)
        self._release_resources(slot, reason).addBoth(lambda _: self._released(slot))

    def _released(self, slot: SlotConfig) -> None:
        self._announce(MessageType.RELEASE, burst=not self.stopping)
        self._machine.released()
        waiter, self._stopped_release = self._stopped_release, None
        if waiter is not None:
            waiter.callback(None)
        self._evaluate()

    def _release_resources(self, slot: SlotConfig, reason: str) -> defer.Deferred[None]:
        d = defer.maybeDeferred(self.actions.release, slot)
        d.addErrback(lambda f: self.log.failure(
            "releasing slot {slot} ({reason}) failed", f, slot=slot.name, reason=reason))
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
              state: tuple[Role, int, int] | None = None) -> None:
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
        fields = dict(
            type=kind, cluster_id=self.codec.cluster_id, node_id=self.me.node_id,
            incarnation=self.incarnation, sequence=self.sequence, role=role,
            flags=self.flags(), slot=slot, epoch=epoch, subject=subject,
            config_digest=self.config.digest, view_digest=self.roles.digest)
        versions = self.peer_versions
        old_data: bytes | None = None  # version 1, for peers that only speak it
        for link in self.links:
            # Each network's copy echoes one peer heard there (peers take turns).
            echo = self.round_trips.echo_for(link.index, now,
                                             lambda n: versions[n] >= HEARTBEAT_VERSION)
            if echo is None:
                data = self.codec.encode(Heartbeat(**fields))
            else:
                data = self.codec.encode(Heartbeat(
                    **fields, echo_node=echo[0], echo_sequence=echo[1],
                    echo_delay_us=echo[2]))
            for node_id, address in self._peer_addresses[link.index]:
                payload = data
                if versions[node_id] < HEARTBEAT_VERSION:
                    if old_data is None:
                        old_data = self.codec.encode(Heartbeat(**fields, version=1))
                    payload = old_data
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

    def status(self) -> dict[str, Any]:
        now = self.clock.seconds()
        roles = self.roles
        nodes = []
        for node in self.config.nodes:
            entry: dict[str, Any] = {"name": node.name, "priority": node.priority,
                                     "rank": roles.rank_of(node.node_id)}
            if node is self.me:
                entry.update(self=True, alive=True, role=self.role.name.lower(),
                             slot=self._slot_name(self.slot), epoch=self.epoch,
                             incarnation=self.incarnation, flags=_flag_names(self.flags()),
                             view_agrees=True, networks={})
            else:
                peer = self.detector.peers[node.node_id]
                hb = peer.latest
                entry.update(
                    self=False, alive=peer.alive,
                    role=hb.role.name.lower() if hb and peer.alive else "unknown",
                    slot=self._slot_name(hb.slot) if hb and peer.alive else None,
                    epoch=hb.epoch if hb and peer.alive else None,
                    incarnation=peer.incarnation if peer.incarnation >= 0 else None,
                    flags=_flag_names(hb.flags) if hb and peer.alive else [],
                    view_agrees=bool(hb and peer.alive and hb.view_digest == roles.digest),
                    restarts=peer.restarts,
                    heartbeat_version=self.peer_versions[node.node_id]
                    if peer.incarnation >= 0 else None,
                    networks={net.name: {
                        "up": self.detector.network_up(node.node_id, net.index, now),
                        "last_heard_ms": _ms_since(now, peer.heard[net.index]),
                        "rtt_ms": _ms(self.round_trips.smoothed[node.node_id][net.index])}
                        for net in self.config.networks})
            nodes.append(entry)
        slots = [{"name": s.name, "owner": self._name(roles.owners[s.slot_id])
                  if s.slot_id in roles.owners else None,
                  "epoch": roles.epochs.get(s.slot_id, self.known_epochs.get(s.slot_id, 0)),
                  "profiles": list(s.profiles), "ips": [str(ip) for ip in s.ips]}
                 for s in self.config.slots]
        return {
            "cluster": self.config.name, "node": self.me.name,
            "incarnation": self.incarnation, "role": self.role.name.lower(),
            "slot": self._slot_name(self.slot), "epoch": self.epoch,
            "uptime_s": round(now - self.started_at, 3),
            "quorum": {"required": self.config.quorum, "alive": self.alive_count(),
                       "ok": self.sees_quorum(), "spec": self.config.quorum_spec},
            "config_digest": self.config.digest.hex(), "view_digest": roles.digest.hex(),
            "heartbeat_interval_ms": round(self.config.heartbeat_interval * 1000, 3),
            "dead_after_ms": round(self.config.dead_after * 1000, 3),
            "ranking": [self._name(n) for n in roles.ranking],
            "nodes": nodes, "slots": slots,
            "networks": [{"name": link.name, "sent": link.sent,
                          "send_errors": link.send_errors, "last_error": link.last_error}
                         for link in self.links],
            "received": self.received, "drops": dict(self.drops),
            "events": list(self.events),
        }

    def _slot_name(self, slot: int) -> str | None:
        return self.config.slots[slot].name if slot < len(self.config.slots) else None


def _ms_since(now: float, then: float) -> float | None:
    return None if then == float("-inf") else round((now - then) * 1000, 1)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _flag_names(flags: Flags) -> list[str]:
    return [f.name.lower() for f in Flags if f.name and flags & f]
