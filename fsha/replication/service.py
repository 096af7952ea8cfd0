"""The replication service of one node: its replicated state and one TLS link per peer.

Who dials whom
--------------
Every pair of nodes has one link. The node with the smaller node id dials the one with the
larger id; the larger one only accepts. An inbound link from a node this node must dial
itself is closed (counted as ``unexpected_inbound``), so two nodes never hold two links.

Where
-----
A node listens on its stream port (``node.stream.port``) on its stream host *and* on each of
its network addresses (one listener per distinct address; a wildcard stream host, 0.0.0.0 or
::, is a single listener covering them all). A dialling node tries the peer's address on
network 0, then network 1, ... (always the peer's stream port), and last the peer's stream
host if that is another address, binding its own address on the same network as the source,
because the accepting side identifies the dialler by its source address (and the
certificate must name both). A network that refuses, times out, or whose TLS handshake fails
is skipped for the next one; when every network failed, the dialler waits (exponential
backoff, ``backoff_initial`` doubling up to ``backoff_max``) and starts again from network 0.
A link that was up and drops is redialled from network 0 after ``backoff_initial``.

Local changes
-------------
The node writes through :meth:`ReplicationService.put` / :meth:`~ReplicationService.delete`
(not ``state.put`` directly: the service must see the change to stream it). Changes made
during one reactor turn are encoded once, as one batch, and offered to every peer's session.

Why about 610 lines: the links' whole lifecycle (listening, dialling per route, redialling,
sessions, control-only links) is one state per peer; split, each half would reach into
the other's peer records.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha import pki
from fsha.config import ClusterConfig, NodeConfig
from fsha.reactors import NetReactor
from fsha.replication.link import (
    HANDSHAKE_TIMEOUT,
    LinkFactory,
    LinkProtocol,
    LinkStats,
    client_tls,
    server_tls,
)
from fsha.replication.relay import ControlRelay
from fsha.replication.session import LiveBatch, PeerSession, SessionConfig, WriteTimes
from fsha.replication.state import (
    DEFAULT_LOG_LIMIT,
    EARLY_SUPERSEDED,
    EARLY_SUPERSEDED_NO_LIMITS,
    ReplicatedState,
)
from fsha.replication.stats import LinkCounts, PeerStats, ReplicationStats
from fsha.wire import stream
from fsha.wire.stream import NO_SLOT, Change, ControlAnswer, ControlRequest, Frame, Hello, Kind

__all__ = ["ReplicationService", "dial_routes", "listen_addresses"]

log = Logger()
#: Seconds a stopping node waits for a link to close cleanly before dropping it.
STOP_GRACE = 0.5


def _unspecified(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


def listen_addresses(me: NodeConfig) -> list[str]:
    """Where ``me`` accepts links (each on ``me.stream.port``)."""
    if _unspecified(me.stream.host):
        return [me.stream.host]
    result = [me.stream.host]
    for ip in me.addresses.values():
        if ip not in result:
            result.append(ip)
    return result


@dataclass(frozen=True, slots=True)
class Route:
    network: str  # a network name, or "stream" for the peer's stream host
    host: str  # the peer's address
    port: int
    source: str | None  # this node's address to bind (None: let the kernel choose)


def dial_routes(config: ClusterConfig, me: NodeConfig, peer: NodeConfig) -> list[Route]:
    """How ``me`` dials ``peer``, in order: network 0, 1, ..., then the stream host."""
    routes = [Route(net.name, peer.addresses[net.name], peer.stream.port,
                    me.addresses.get(net.name)) for net in config.networks]
    if not _unspecified(peer.stream.host) and \
            peer.stream.host not in {r.host for r in routes}:
        source = None if _unspecified(me.stream.host) else me.stream.host
        routes.append(Route("stream", peer.stream.host, peer.stream.port, source))
    return routes


class _Link(LinkProtocol):
    """A link that tells the service when its connection ends, up or not."""

    session: PeerSession | None = None

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        was_up = self.peer_hello is not None
        try:
            super().connectionLost(reason)
        finally:
            self.factory.closed(self, was_up, reason)  # type: ignore[attr-defined]


class _Factory(LinkFactory):
    noisy = False

    def __init__(self, owner: ReplicationService, peer: _Peer | None) -> None:
        super().__init__(owner.config, owner.me, owner.state.incarnation, owner,
                         owner.clock, expected=peer.node if peer else None, stats=owner.link_counts,
                         positions=owner.state.positions,
                         handshake_timeout=owner.handshake_timeout)
        self.owner = owner
        self.dialled = peer

    # The listening factory lives as long as the service: it reads the owner's config
    # (replaced by an online change, fsha config push) rather than keep its own.
    @property  # type: ignore[override]
    def config(self) -> ClusterConfig:
        return self.owner.config

    @config.setter
    def config(self, value: ClusterConfig) -> None:
        pass  # LinkFactory.__init__ sets it: the owner's is the one

    def buildProtocol(self, addr: object) -> _Link:
        link = _Link(self, self.expected)
        self.owner._connections.add(link)
        return link

    def closed(self, link: _Link, was_up: bool, reason: Failure) -> None:
        self.owner._connection_closed(link, self.dialled, was_up, reason)


REPORT_EVERY = 60.0  # seconds between two log lines about the same unreachable peer/network


@dataclass
class _Peer:
    node: NodeConfig
    dials: bool  # this node dials it
    routes: list[Route]
    link: _Link | None = None
    session: PeerSession | None = None
    route: int = 0  # the route being (or last) dialled
    network: str | None = None
    address: str | None = None
    identity: dict[str, Any] | None = None
    delay: float = 0.0
    call: IDelayedCall | None = None
    connecting: defer.Deferred[Any] | None = None
    connects: int = 0  # links that came up
    up_since: float | None = None
    dial_failures: Counter[str] = field(default_factory=Counter)
    closed: Counter[str] = field(default_factory=Counter)
    last_error: str = ""
    # network -> (reason last logged, when, failures since): the log's rate limit
    reported: dict[str, tuple[str, float, int]] = field(default_factory=dict)
    bytes_in: int = 0  # of links that ended
    last_end: dict[str, Any] | None = None  # how its last link ended (clean, reason, time)
    bytes_out: int = 0


class ReplicationService(service.Service):
    """Owns this node's :class:`ReplicatedState` and keeps a link to every peer.

    ``reactor`` provides IReactorTime, IReactorTCP and IReactorSSL. ``incarnation`` is this
    run's identity (the node's own: pass ``ClusterNode.incarnation``).
    """

    def __init__(self, config: ClusterConfig, me: NodeConfig, reactor: NetReactor, *,
                 incarnation: int | None = None, log_limit: int = DEFAULT_LOG_LIMIT,
                 session_config: SessionConfig | None = None, connect_timeout: float = 2.0,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, backoff_initial: float = 0.2,
                 backoff_max: float = 5.0, expire_interval: float = 1.0,
                 on_lag: Callable[[int, float], None] | None = None) -> None:
        self.config = config
        self.me = me
        self.reactor = reactor
        self.clock = reactor
        # without [limits] nothing reads a dead master's calls after its takeover
        early = EARLY_SUPERSEDED if config.limits is not None else EARLY_SUPERSEDED_NO_LIMITS
        self.state = ReplicatedState(reactor, me.node_id,
                                     time.time_ns() if incarnation is None else incarnation,
                                     log_limit=log_limit, early_superseded=early)
        self.session_config = session_config if session_config is not None else SessionConfig()
        # fsha config push's requests to the other nodes ride on the links
        self.relay = ControlRelay(self._link_named, reactor)
        # links to peers running another config: control frames only (fsha.replication.link)
        self._control_links: dict[str, _Link] = {}
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.link_counts = LinkStats()  # every link's, together
        self.unexpected_inbound = 0
        self._on_lag = on_lag
        self._times = WriteTimes(log_limit)
        self._pending: list[Change] = []
        self._pending_frames: list[bytes] = []
        self._flush_call: IDelayedCall | None = None
        self._ports: dict[str, IListeningPort] = {}
        self._connections: set[_Link] = set()
        self._lost: dict[_Link, defer.Deferred[None]] = {}
        self._expire = LoopingCall(self.state.expire)
        self._expire.clock = reactor
        self._expire_interval = expire_interval
        self._peers: dict[int, _Peer] = {
            n.node_id: _Peer(n, me.node_id < n.node_id, dial_routes(config, me, n))
            for n in config.nodes if n.node_id != me.node_id}

    # -- writing ----------------------------------------------------------------------------

    def put(self, slot: int, kind: Kind, key: str, value: bytes, expires_ms: int = 0
            ) -> Change:
        """Write a record of this node's origin and stream it to every peer."""
        change = self.state.put(slot, kind, key, value, expires_ms)
        self._written(change)
        return change

    def delete(self, slot: int, kind: Kind, key: str) -> Change | None:
        change = self.state.delete(slot, kind, key)
        if change is not None:
            self._written(change)
        return change

    def publish(self, change: Change) -> None:
        """Stream a change of this node's origin that was already written to :attr:`state`
        (e.g. by ``Feeds``, whose ``publish`` hook this is). Every local change must be
        published, in order; one that is not still reaches peers, pulled from the log."""
        if change.origin != self.me.node_id or change.incarnation != self.state.incarnation:
            raise ValueError(f"{change} is not a change of this node's current origin")
        self._written(change)

    def _written(self, change: Change) -> None:
        pending = self._pending
        if pending and change.sequence != pending[-1].sequence + 1:
            self._flush()  # a batch is always contiguous
            pending = self._pending
        self._times.add(change.sequence, self.clock.seconds())
        pending.append(change)
        state = self.state
        self._pending_frames.append(state.last_frame if state.last_change is change
                                    else stream.encode(change))
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if not self._pending:
            return
        batch = LiveBatch(self._pending, self._pending_frames)
        self._pending = []
        self._pending_frames = []
        for peer in self._peers.values():
            if peer.session is not None:
                try:
                    peer.session.offer(batch)
                except Exception:
                    log.failure("replication: sending to {peer} failed", peer=peer.node.name)
                    self._drop(peer, "error")

    # -- life -------------------------------------------------------------------------------

    def startService(self) -> None:
        """Listen (raises CannotListenError / PKIError at once) and dial the peers."""
        server = server_tls(self.config, self.me)
        for host in listen_addresses(self.me):
            self._ports[host] = self.reactor.listenSSL(self.me.stream.port,
                                                       _Factory(self, None), server,
                                                       interface=host)
        super().startService()
        log.info("replication: node {node} (incarnation {incarnation}) listening on "
                 "{addresses} port {port}", node=self.me.name,
                 incarnation=self.state.incarnation, addresses=", ".join(self._ports),
                 port=self.me.stream.port)
        d = self._expire.start(self._expire_interval, now=False)
        d.addErrback(lambda f: log.failure("replication: record expiry failed", f))
        for peer in self._peers.values():
            if peer.dials:
                peer.delay = self.backoff_initial
                self._dial(peer)

    def stopService(self) -> defer.Deferred[None]:
        """Stop dialling and listening, drop every link; fires when all are closed. What
        was written and not sent yet (a stopping node's last changes) goes first."""
        super().stopService()
        self._flush()
        if self._expire.running:
            self._expire.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        waits: list[defer.Deferred[Any]] = []
        for peer in self._peers.values():
            if peer.call is not None and peer.call.active():
                peer.call.cancel()
            peer.call = None
            if peer.connecting is not None:
                peer.connecting.cancel()
        for port in self._ports.values():
            waits.append(defer.maybeDeferred(port.stopListening))
        self._ports = {}
        for link in list(self._connections):
            d: defer.Deferred[None] = defer.Deferred()
            self._lost[link] = d
            waits.append(d)
            if link.transport is not None:
                # what was written goes out first (a stopping node's last changes); a peer
                # that does not close its side is dropped after STOP_GRACE
                if link.session is not None:
                    # loseConnection waits for a registered producer to unregister: without
                    # this, the link is aborted after STOP_GRACE, no TLS close_notify sent,
                    # and the peers cannot tell a clean stop from a crash
                    link.transport.unregisterProducer()
                link.transport.loseConnection()
                timer = self.clock.callLater(STOP_GRACE, link.close)
                d.addBoth(lambda r, t=timer: (t.cancel() if t.active() else None, r)[1])
            else:
                link.close()
        done = defer.DeferredList(waits, consumeErrors=True)
        done.addTimeout(self.connect_timeout + self.handshake_timeout, self.clock)

        def finished(_: object) -> None:
            log.info("replication: node {node} stopped", node=self.me.name)

        done.addCallback(finished)
        done.addErrback(lambda f: log.failure("replication: stopping did not finish", f))
        return done

    @property
    def ports(self) -> dict[str, IListeningPort]:
        """The listening ports by address."""
        return dict(self._ports)

    # -- dialling ---------------------------------------------------------------------------

    def _dial(self, peer: _Peer) -> None:
        peer.call = None
        if not self.running or peer.link is not None or peer.connecting is not None:
            return
        route = peer.routes[peer.route]
        ipv6 = ":" in route.host
        endpoint_type = TCP6ClientEndpoint if ipv6 else TCP4ClientEndpoint
        endpoint = endpoint_type(self.reactor, route.host, route.port,
                                 timeout=self.connect_timeout,
                                 bindAddress=(route.source, 0) if route.source else None)
        tls_endpoint = wrapClientTLS(client_tls(self.config, self.me, peer.node), endpoint)
        d = tls_endpoint.connect(_Factory(self, peer))
        peer.connecting = d

        def connected(_: object) -> None:
            peer.connecting = None  # now the link's own timeout and events take over

        def failed(f: Failure) -> None:
            peer.connecting = None
            if f.check(defer.CancelledError):
                return
            self._dial_failed(peer, f.getErrorMessage())

        d.addCallbacks(connected, failed)
        d.addErrback(lambda f: log.failure("replication: dialling {peer} failed",
                                           f, peer=peer.node.name))

    def _dial_failed(self, peer: _Peer, reason: str) -> None:
        route = peer.routes[peer.route]
        peer.dial_failures[route.network] += 1
        text = f"{route.network} {route.host}:{route.port}: {reason}"
        # A peer that stays away is retried on every network every few seconds: log a
        # reason once per network, then a summary at most every REPORT_EVERY seconds.
        now = self.clock.seconds()
        said, when, since = peer.reported.get(route.network, ("", -REPORT_EVERY, 0))
        if reason != said or now - when >= REPORT_EVERY:
            again = f" ({since} more failure(s) since {now - when:.0f} s)" \
                if reason == said and since else ""
            log.info("replication: cannot reach {peer} over {network} ({host}): "
                     "{reason}{again}", peer=peer.node.name, network=route.network,
                     host=route.host, reason=reason, again=again)
            peer.reported[route.network] = (reason, now, 0)
        else:
            peer.reported[route.network] = (said, when, since + 1)
        peer.last_error = text
        if not self.running:
            return
        peer.route += 1
        if peer.route < len(peer.routes):
            self._dial(peer)
            return
        peer.route = 0
        delay, peer.delay = peer.delay, min(self.backoff_max, peer.delay * 2)
        peer.call = self.clock.callLater(delay, self._dial, peer)

    # -- FrameHandler -----------------------------------------------------------------------

    def link_up(self, link: LinkProtocol, node: NodeConfig, hello: Hello) -> None:
        assert isinstance(link, _Link)
        peer = self._peers.get(node.node_id)
        if peer is None:  # cannot happen: the link checks the peer's identity
            link.close()
            return
        inbound = link.factory.dialled is None  # type: ignore[attr-defined]
        if inbound and peer.dials:
            self.unexpected_inbound += 1
            log.warn("replication: {peer} dialled this node, but this node dials it; "
                     "closing that link", peer=node.name)
            link.close()
            return
        if peer.link is not None and peer.link is not link:
            log.info("replication: a new link from {peer} replaces the previous one",
                     peer=node.name)
            old = peer.link
            self._detach(peer, "replaced")
            old.close()
        session = PeerSession(self.state, node.node_id, self.clock, link.write,
                              lambda reason: self._session_closed(link, reason),
                              config=self.session_config, write_times=self._times,
                              on_lag=self._on_lag)
        link.session = session
        peer.link = link
        peer.session = session
        peer.connects += 1
        peer.up_since = self.clock.seconds()
        peer.delay = self.backoff_initial
        peer.reported.clear()  # its next outage is logged afresh
        peer_ip = link._peer_ip()
        peer.address = peer_ip
        peer.network = next((net for net, ip in node.addresses.items() if ip == peer_ip),
                            "stream")
        peer.identity = self._identity(link)
        link.transport.registerProducer(session, True)  # type: ignore[union-attr]
        session.start(hello)

    def frame_received(self, link: LinkProtocol, frame: Frame) -> None:
        if isinstance(frame, ControlRequest | ControlAnswer):  # not replicated state
            if link.peer is not None:
                self.relay.frame(link.peer.name, link, frame)
            return
        session = link.session  # type: ignore[attr-defined]
        if session is not None:
            session.frame_received(frame)

    def link_down(self, link: LinkProtocol, reason: Failure) -> None:
        pass  # _connection_closed sees every end of a connection, up or not

    # -- link ends --------------------------------------------------------------------------

    def _identity(self, link: LinkProtocol) -> dict[str, Any] | None:
        try:
            cert = link.transport.getPeerCertificate()  # type: ignore[union-attr]
        except Exception:
            return None
        if cert is None:
            return None
        crypto = cert.to_cryptography()
        der = crypto.public_bytes(serialization.Encoding.DER)
        return {"name": pki.cert_common_name(crypto), "cluster": pki.cert_cluster(crypto),
                "sha256": hashlib.sha256(der).hexdigest(),
                "not_after": crypto.not_valid_after_utc.isoformat()}

    def _session_closed(self, link: _Link, reason: str) -> None:
        """The session closes its link (gap, silence...): drop it; the dialler redials."""
        peer = self._peer_of(link)
        if peer is not None:
            peer.closed[reason] += 1
        link.close()

    def _link_named(self, name: str) -> _Link | None:
        """The up link to the node called ``name`` (None: none up)."""
        return next((p.link for p in self._peers.values()
                     if p.node.name == name and p.link is not None),
                    self._control_links.get(name))

    def control_link_up(self, link: LinkProtocol, node: NodeConfig, hello: Hello) -> None:
        """A peer running another config: the link carries control requests only, until
        one of the two changes config (:meth:`close_control_links`)."""
        assert isinstance(link, _Link)
        old = self._control_links.get(node.name)
        self._control_links[node.name] = link
        if old is not None and old is not link:
            old.close()
        log.warn("replication: {peer} runs config digest {theirs}, this node {ours}: nothing "
                 "is replicated between them until their configs are equal (fsha config "
                 "push); the link carries control requests only", peer=node.name,
                 theirs=hello.config_digest.hex(), ours=self.config.digest.hex())

    def close_control_links(self) -> None:
        """This node changed config: links opened between two configs are closed (and
        redialled, to come up whole where the configs are now equal)."""
        for link in list(self._control_links.values()):
            if link.transport is not None:
                link.transport.loseConnection()  # after what is written (an answer)

    def _peer_of(self, link: _Link) -> _Peer | None:
        for peer in self._peers.values():
            if peer.link is link:
                return peer
        return None

    def _detach(self, peer: _Peer, why: str) -> None:
        self.relay.link_closed(peer.node.name)
        link, session = peer.link, peer.session
        if session is not None:
            session.stop()
        if link is not None:
            peer.bytes_in += link.bytes_in
            peer.bytes_out += link.bytes_out
            link.session = None
        peer.link = None
        peer.session = None
        peer.up_since = None

    def _drop(self, peer: _Peer, reason: str) -> None:
        link = peer.link
        peer.closed[reason] += 1
        if link is not None:
            link.close()

    def _connection_closed(self, link: _Link, dialled: _Peer | None, was_up: bool,
                           reason: Failure) -> None:
        self._connections.discard(link)
        if link.peer is not None and self._control_links.get(link.peer.name) is link:
            del self._control_links[link.peer.name]
            self.relay.link_closed(link.peer.name)
        lost = self._lost.pop(link, None)
        peer = self._peer_of(link)
        if peer is not None:
            self._detach(peer, "lost")
            # a peer that stops closes its links with TLS's close_notify (ConnectionDone);
            # a killed or vanished one does not: tells "stopped cleanly" from "crashed"
            peer.last_end = {"clean": bool(reason.check(error.ConnectionDone)),
                             "reason": reason.getErrorMessage(),
                             "time": round(self.clock.seconds(), 3)}
            if not reason.check(error.ConnectionDone):
                peer.last_error = reason.getErrorMessage()
        if lost is not None:
            lost.callback(None)
        if dialled is None or not self.running:
            return
        if dialled.link is not None or dialled.connecting is not None or \
                (dialled.call is not None and dialled.call.active()):
            return
        if was_up:
            dialled.route = 0
            dialled.call = self.clock.callLater(self.backoff_initial, self._dial, dialled)
        else:
            self._dial_failed(dialled, "link not established: " + reason.getErrorMessage())

    # -- status -----------------------------------------------------------------------------

    def stats(self) -> ReplicationStats:
        """Per peer: link, network, TLS identity, bytes, lag; per slot: record counts."""
        slots: dict[str, dict[str, int]] = {}
        for slot, kinds in sorted(self.state.counts().items()):
            name = ("none" if slot == NO_SLOT else self.config.slots[slot].name
                    if slot < len(self.config.slots) else str(slot))
            slots[name] = {kind.name.lower(): n for kind, n in sorted(kinds.items())}
        peers: dict[str, PeerStats] = {}
        now = self.clock.seconds()
        for peer in self._peers.values():
            link, session = peer.link, peer.session
            peers[peer.node.name] = PeerStats(
                up=session is not None and not session.closed,
                dials=peer.dials,
                network=peer.network if link is not None else None,
                address=peer.address if link is not None else None,
                identity=peer.identity if link is not None else None,
                up_for_s=None if peer.up_since is None else round(now - peer.up_since, 3),
                connects=peer.connects,
                bytes_in=peer.bytes_in + (link.bytes_in if link else 0),
                bytes_out=peer.bytes_out + (link.bytes_out if link else 0),
                dial_failures=dict(peer.dial_failures),
                closed=dict(peer.closed),
                last_error=peer.last_error,
                last_end=peer.last_end,
                session=session.stats() if session is not None else None)
        counts = self.link_counts
        return ReplicationStats(
            node=self.me.name,
            incarnation=self.state.incarnation,
            listening=[f"{host}:{self.me.stream.port}" for host in self._ports],
            digest=self.state.digest().hex(),
            records=len(self.state),
            positions={self.config.nodes[p.origin].name
                       if p.origin < len(self.config.nodes) else str(p.origin):
                       [p.incarnation, p.sequence] for p in self.state.positions()},
            slots=slots,
            links=LinkCounts(established=counts.established, refused=dict(counts.refused),
                             unexpected_inbound=self.unexpected_inbound,
                             bytes_in=counts.bytes_in, bytes_out=counts.bytes_out),
            peers=peers, control_links=tuple(sorted(self._control_links)))

    def status(self) -> dict[str, Any]:
        return self.stats().as_status()
