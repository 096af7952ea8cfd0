"""The mutually authenticated TLS link between two nodes, carrying the stream codec.

Both sides present a certificate of the cluster CA. OpenSSL verifies the chain (and the
validity dates) on both sides; then each side checks, itself, that the certificate belongs
to the node the config says is at the other end:

- the dialling side (client) verifies with service_identity that the server's certificate
  names the node it dialled (``DNS:<node>``, done by ``optionsForClientTLS``) and the IP it
  dialled (``IP:<address>``);
- the accepting side (server) finds which node the config puts at the client's source
  address and verifies with service_identity that the client's certificate names that node
  and that address (Twisted does not check the client's identity for you);
- both check that the certificate's organizationName is this cluster's name.

A refused peer is logged, counted in :class:`LinkStats` by reason, and disconnected. After
the handshake each side sends HELLO; the first frame received must be a HELLO from the node
the certificate names with this node's config digest. Later frames go to the
:class:`FrameHandler`.

The session logic (catch-up, snapshots, acks, backpressure, keepalives) is
``fsha/replication/session.py``; dialling and redialling ``fsha/replication/service.py``.
This module gives the authenticated, framed, timed-out transport they run on.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from fsha import pki
from fsha.config import ClusterConfig, NodeConfig
from fsha.wire import stream
from fsha.wire.stream import (
    ControlAnswer,
    ControlRequest,
    Frame,
    Hello,
    StreamDecoder,
    StreamError,
)

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "REFUSAL_REASONS",
    "FrameHandler",
    "LinkFactory",
    "LinkProtocol",
    "LinkStats",
    "PeerRejected",
    "check_peer",
    "client_tls",
    "server_tls",
]

#: Seconds from TCP connect to a received HELLO before the link is dropped.
HANDSHAKE_TIMEOUT: Final = 5.0
#: Every refusal reason counted by :class:`LinkStats`.
REFUSAL_REASONS: Final = ("tls", "cluster", "node", "address", "hello", "stream", "timeout")

log = Logger()


class PeerRejected(Exception):
    """A peer that is not who it must be; ``reason`` is one of :data:`REFUSAL_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass
class LinkStats:
    """Counters shared by every link of a node (exposed in the status)."""

    refused: Counter[str] = field(default_factory=Counter)
    established: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class FrameHandler(TypingProtocol):
    """What the session logic implements to use a link."""

    def link_up(self, link: LinkProtocol, peer: NodeConfig, hello: Hello) -> None: ...

    def frame_received(self, link: LinkProtocol, frame: Frame) -> None: ...

    def link_down(self, link: LinkProtocol, reason: Failure) -> None: ...


# -- TLS contexts ---------------------------------------------------------------------------


def _credentials(config: ClusterConfig, me: NodeConfig
                 ) -> tuple[ssl.Certificate, ssl.PrivateCertificate]:
    if config.tls is None:
        raise pki.PKIError(f"{config.path}: tls: missing: add a [tls] section (ca, cert, key)")
    ca_path = config.tls.ca
    cert_path, key_path = config.tls.cert_for(me.name), config.tls.key_for(me.name)
    pki.load_certificate(ca_path)  # clear errors naming the file
    pki.load_certificate(cert_path)
    pki.load_private_key(key_path)
    ca = ssl.Certificate.loadPEM(ca_path.read_bytes())
    mine = ssl.PrivateCertificate.loadPEM(cert_path.read_bytes() + b"\n" +
                                          key_path.read_bytes())
    return ca, mine


def server_tls(config: ClusterConfig, me: NodeConfig) -> IOpenSSLServerConnectionCreator:
    """Accepting side: present ``me``'s certificate, require one of the cluster CA."""
    ca, mine = _credentials(config, me)
    return ssl.CertificateOptions(
        privateKey=mine.privateKey.original, certificate=mine.original, verify=True,
        caCerts=[ca.original], requireCertificate=True,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


def client_tls(config: ClusterConfig, me: NodeConfig, peer: NodeConfig
               ) -> IOpenSSLClientConnectionCreator:
    """Dialling side: present ``me``'s certificate, require ``peer``'s, chained to the CA."""
    ca, mine = _credentials(config, me)
    return ssl.optionsForClientTLS(peer.name, trustRoot=ca, clientCertificate=mine)


# -- identity -------------------------------------------------------------------------------


def node_at(config: ClusterConfig, ip: str) -> NodeConfig | None:
    """The node the config puts at ``ip`` (a network address or its stream host)."""
    try:
        text = str(ipaddress.ip_address(ip))
    except ValueError:
        return None
    for node in config.nodes:
        if text in pki.node_ips(node):
            return node
    return None


def check_peer(config: ClusterConfig, connection: SSL.Connection, peer_ip: str,
               expected: NodeConfig | None) -> NodeConfig:
    """The node at the other end of a verified TLS ``connection``; raises PeerRejected.

    ``expected`` is the node dialled (client side) or None (server side: the node is the one
    the config puts at ``peer_ip``).
    """
    cert = connection.get_peer_certificate()
    if cert is None:
        raise PeerRejected("tls", "the peer presented no certificate")
    crypto_cert = cert.to_cryptography()
    cluster = pki.cert_cluster(crypto_cert)
    if cluster != config.name:
        raise PeerRejected("cluster", f"certificate of cluster {cluster!r}, "
                                      f"this is {config.name!r}")
    node = expected if expected is not None else node_at(config, peer_ip)
    if node is None:
        raise PeerRejected("address", f"no configured node has address {peer_ip}")
    try:
        verify_hostname(connection, node.name)
    except VerificationError:
        raise PeerRejected("node", f"certificate of {pki.cert_common_name(crypto_cert)!r} "
                                   f"from {peer_ip}, where the config has {node.name!r}") \
            from None
    try:
        verify_ip_address(connection, peer_ip)
    except VerificationError:
        raise PeerRejected("address", f"certificate of {node.name!r} does not name "
                                      f"{peer_ip}") from None
    if peer_ip not in pki.node_ips(node):
        raise PeerRejected("address", f"{peer_ip} is not an address of {node.name!r}")
    return node


# -- the protocol ---------------------------------------------------------------------------


@implementer(IHandshakeListener)
class LinkProtocol(Protocol):
    """One end of a link, wrapped by ``TLSMemoryBIOProtocol`` (``connectionMade`` is the
    TCP connection; ``handshakeCompleted`` the verified TLS session)."""

    def __init__(self, factory: LinkFactory, expected: NodeConfig | None) -> None:
        self.factory = factory
        self.expected = expected
        self.peer: NodeConfig | None = None
        self.peer_hello: Hello | None = None
        self.control_only = False  # a peer running another config: control frames only
        self._decoder = StreamDecoder()
        self._timeout: IDelayedCall | None = None
        self._verified = False
        self._closing = False
        #: Bytes of this link (the factory's LinkStats add up every link of the node).
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def is_up(self) -> bool:
        return self.peer_hello is not None and not self._closing

    def connectionMade(self) -> None:
        # Frames are small and latency matters: no Nagle delay (the sessions batch writes).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass
        self._timeout = self.factory.clock.callLater(self.factory.handshake_timeout,
                                                     self._timed_out)

    def _timed_out(self) -> None:
        self._timeout = None
        self._refuse(PeerRejected("timeout", "no verified HELLO within "
                                             f"{self.factory.handshake_timeout} s"))

    def _peer_ip(self) -> str:
        return str(getattr(self.transport.getPeer(), "host", ""))  # type: ignore[union-attr]

    def _refuse(self, error: PeerRejected) -> None:
        if self._closing:
            return
        self._closing = True
        self.factory.stats.refused[error.reason] += 1
        log.warn("replication link from {peer_ip} refused: {reason}: {detail}",
                 peer_ip=self._peer_ip(), reason=error.reason, detail=error.detail)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        connection = self.transport.getHandle()  # type: ignore[union-attr]
        try:
            self.peer = check_peer(self.factory.config, connection, self._peer_ip(),
                                   self.expected)
        except PeerRejected as e:
            self._refuse(e)
            return
        self._verified = True
        self.send(Hello(self.factory.me.node_id, self.factory.incarnation,
                        self.factory.config.digest, self.factory.positions()))

    def send(self, frame: Frame) -> None:
        self.write(stream.encode(frame))

    def write(self, data: bytes) -> None:
        """Send already encoded frames (one or several, whole)."""
        self.factory.stats.bytes_out += len(data)
        self.bytes_out += len(data)
        self.transport.write(data)  # type: ignore[union-attr]

    def close(self) -> None:
        """Drop the link now (unsent data is discarded: the peer resumes on reconnect)."""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._verified:  # cannot happen with TLS; refuse rather than trust
            self._refuse(PeerRejected("tls", "data before a verified handshake"))
            return
        self.factory.stats.bytes_in += len(data)
        self.bytes_in += len(data)
        try:
            frames = self._decoder.feed(data)
        except StreamError as e:
            for frame in e.frames:
                self._frame(frame)
            self._refuse(PeerRejected("stream", str(e)))
            return
        for frame in frames:
            if self._closing:
                return
            self._frame(frame)

    def _frame(self, frame: Frame) -> None:
        if self.peer_hello is None:
            assert self.peer is not None
            if not isinstance(frame, Hello):
                self._refuse(PeerRejected("hello", f"first frame is {type(frame).__name__}"))
            elif frame.node != self.peer.node_id:
                self._refuse(PeerRejected("hello", f"HELLO from node id {frame.node}, the "
                                                   f"certificate is {self.peer.name!r} "
                                                   f"(id {self.peer.node_id})"))
            elif frame.config_digest != self.factory.config.digest and getattr(
                    self.factory.handler, "control_link_up", None) is None:
                self._refuse(PeerRejected("hello", f"{self.peer.name!r} runs config digest "
                                                   f"{frame.config_digest.hex()}, this node "
                                                   f"{self.factory.config.digest.hex()}"))
            elif frame.config_digest != self.factory.config.digest:
                # Another config: no replicated state crosses (its slots and nodes may mean
                # something else), only signed control requests, so that fsha config push
                # can bring a node that is behind up to the cluster's config.
                self.peer_hello = frame
                self.control_only = True
                if self._timeout is not None and self._timeout.active():
                    self._timeout.cancel()
                self._timeout = None
                self.factory.handler.control_link_up(self, self.peer, frame)  # type: ignore[attr-defined]
            else:
                self.peer_hello = frame
                if self._timeout is not None and self._timeout.active():
                    self._timeout.cancel()
                self._timeout = None
                self.factory.stats.established += 1
                log.info("replication link to {peer} up ({peer_ip})", peer=self.peer.name,
                         peer_ip=self._peer_ip())
                self.factory.handler.link_up(self, self.peer, frame)
            return
        if isinstance(frame, Hello):
            self._refuse(PeerRejected("hello", "a second HELLO"))
            return
        if self.control_only and not isinstance(frame, ControlRequest | ControlAnswer):
            self._refuse(PeerRejected("hello", "replicated data on a link between two "
                                               "configs"))
            return
        self.factory.handler.frame_received(self, frame)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        if not self._verified and not self._closing:
            self._closing = True
            self.factory.stats.refused["tls"] += 1
            log.warn("replication link from {peer_ip} refused: TLS handshake failed: "
                     "{error}", peer_ip=self._peer_ip(), error=reason.getErrorMessage())
        if self.peer_hello is not None:
            log.info("replication link to {peer} down: {error}",
                     peer=self.peer.name if self.peer else "?",
                     error=reason.getErrorMessage())
            self.factory.handler.link_down(self, reason)
        self._closing = True


class LinkFactory(Factory):
    """Builds :class:`LinkProtocol` for one node; wrap it with ``TLSMemoryBIOFactory`` (or
    use ``SSL4ServerEndpoint`` / ``wrapClientTLS``) with :func:`server_tls` /
    :func:`client_tls`. ``expected`` is the node dialled (None when accepting)."""

    def __init__(self, config: ClusterConfig, me: NodeConfig, incarnation: int,
                 handler: FrameHandler, clock: IReactorTime, *,
                 expected: NodeConfig | None = None, stats: LinkStats | None = None,
                 positions: Callable[[], Iterable[stream.Position]] | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT
                 ) -> None:
        self.config = config
        self.me = me
        self.incarnation = incarnation
        self.handler = handler
        self.clock = clock
        self.expected = expected
        self.stats = stats if stats is not None else LinkStats()
        self.handshake_timeout = handshake_timeout
        self._positions = positions

    def positions(self) -> tuple[stream.Position, ...]:
        """What this node's HELLO carries (the replicated state's positions)."""
        return tuple(self._positions()) if self._positions is not None else ()

    def buildProtocol(self, addr: object) -> LinkProtocol:
        return LinkProtocol(self, self.expected)
