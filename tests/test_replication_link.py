"""Tests for fsha.replication.link: mutual TLS in memory (twisted.test.iosim)."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase

from fsha import pki
from fsha.config import ClusterConfig, NodeConfig, load_config
from fsha.replication.link import (
    LinkFactory,
    LinkProtocol,
    LinkStats,
    PeerRejected,
    client_tls,
    node_at,
    server_tls,
)
from fsha.wire.stream import (
    Change,
    ControlRequest,
    Frame,
    Hello,
    Keepalive,
    Kind,
    Op,
    Position,
)
from tests.test_pki import write_config

ALPHA_IP = "127.0.1.1"  # alpha's address on network a
BETA_STREAM = "127.0.3.2"  # beta's stream host


class Recorder:
    def __init__(self) -> None:
        self.up: list[tuple[str, Hello]] = []
        self.frames: list[Frame] = []
        self.down: list[Failure] = []

    def link_up(self, link: LinkProtocol, peer: NodeConfig, hello: Hello) -> None:
        self.up.append((peer.name, hello))

    def frame_received(self, link: LinkProtocol, frame: Frame) -> None:
        self.frames.append(frame)

    def link_down(self, link: LinkProtocol, reason: Failure) -> None:
        self.down.append(reason)


@dataclasses.dataclass
class Side:
    handler: Recorder
    stats: LinkStats
    protocol: object  # the TLS protocol wrapping a LinkProtocol (or a plain protocol)

    @property
    def link(self) -> LinkProtocol:
        return self.protocol.wrappedProtocol  # type: ignore[attr-defined,no-any-return]


class LinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.config = load_config(write_config(self.dir))
        pki.ensure_cluster_pki(self.config)
        self.alpha = self.config.node("alpha")
        self.beta = self.config.node("beta")
        self.clock = Clock()

    def connect(self, *, client_ip: str = ALPHA_IP, server_ip: str = BETA_STREAM,
                client_config: ClusterConfig | None = None, client_tls_opts: object = None,
                client_protocol: Protocol | None = None,
                positions: tuple[Position, ...] = ()) -> tuple[Side, Side, IOPump]:
        """alpha (client, at client_ip) dials beta (server, at server_ip)."""
        cconfig = client_config or self.config
        server = Side(Recorder(), LinkStats(), None)
        server_factory = TLSMemoryBIOFactory(
            server_tls(self.config, self.beta), False,
            LinkFactory(self.config, self.beta, 11, server.handler, self.clock,
                        stats=server.stats), clock=self.clock)
        client = Side(Recorder(), LinkStats(), None)
        client_addr = IPv4Address("TCP", client_ip, 40000)
        server_addr = IPv4Address("TCP", server_ip, 7100)
        server.protocol = server_factory.buildProtocol(client_addr)
        if client_protocol is None:
            client_factory = TLSMemoryBIOFactory(
                client_tls_opts or client_tls(cconfig, self.alpha, self.beta), True,
                LinkFactory(cconfig, self.alpha, 7, client.handler, self.clock,
                            expected=self.beta, stats=client.stats,
                            positions=lambda: positions), clock=self.clock)
            client.protocol = client_factory.buildProtocol(server_addr)
        else:
            client.protocol = client_protocol
        pump = connect(
            server.protocol, FakeTransport(server.protocol, True, server_addr, client_addr),
            client.protocol, FakeTransport(client.protocol, False, client_addr, server_addr),
            greet=False, clock=self.clock)
        pump.flush()
        return client, server, pump

    def assertRefused(self, side: Side, reason: str) -> None:
        self.assertEqual(dict(side.stats.refused), {reason: 1})

    def assertNoLink(self, *sides: Side) -> None:
        for side in sides:
            self.assertEqual(side.handler.up, [])
            self.assertEqual(side.stats.established, 0)

    # -- positive ---------------------------------------------------------------------------

    def test_link_up_both_ways(self) -> None:
        pos = (Position(0, 7, 3),)
        client, server, pump = self.connect(positions=pos)
        self.assertEqual([name for name, _ in client.handler.up], ["beta"])
        self.assertEqual([name for name, _ in server.handler.up], ["alpha"])
        hello = server.handler.up[0][1]
        self.assertEqual((hello.node, hello.incarnation, hello.positions),
                         (self.alpha.node_id, 7, pos))
        self.assertEqual(client.handler.up[0][1].incarnation, 11)
        change = Change(0, 7, 4, 0, Kind.CALL, "u", Op.PUT, b"row", 0)
        client.link.send(change)
        server.link.send(Keepalive(5, 0))
        pump.flush()
        self.assertEqual(server.handler.frames, [change])
        self.assertEqual(client.handler.frames, [Keepalive(5, 0)])
        self.assertTrue(client.link.is_up)
        self.assertEqual(client.stats.bytes_out, server.stats.bytes_in)
        self.assertEqual((client.stats.established, server.stats.established), (1, 1))
        self.assertEqual(dict(server.stats.refused), {})
        # the handshake timeout was cancelled
        self.clock.advance(60)
        self.assertTrue(server.link.is_up)
        client.link.transport.loseConnection()  # type: ignore[union-attr]
        pump.flush()
        self.assertEqual(len(server.handler.down), 1)

    # -- negative ---------------------------------------------------------------------------

    def test_certificate_of_another_ca(self) -> None:
        # alpha's certificate from another CA (same cluster name); the client itself
        # trusts the right CA, so only the server has a reason to refuse
        other = load_config(write_config(Path(self.mktemp())))
        pki.ensure_cluster_pki(other)
        assert other.tls is not None and self.config.tls is not None
        foreign = ssl.PrivateCertificate.loadPEM(
            other.tls.cert_for("alpha").read_bytes() + other.tls.key_for("alpha").read_bytes())
        bad = ssl.optionsForClientTLS(
            "beta", trustRoot=ssl.Certificate.loadPEM(self.config.tls.ca.read_bytes()),
            clientCertificate=foreign)
        client, server, _ = self.connect(client_tls_opts=bad)
        self.assertEqual(dict(client.stats.refused), {})
        self.assertRefused(server, "tls")
        self.assertNoLink(client, server)

    def test_valid_certificate_of_another_node(self) -> None:
        # alpha's address, beta's (valid, same CA) certificate
        opts = client_tls(self.config, self.beta, self.beta)
        client, server, _ = self.connect(client_tls_opts=opts)
        self.assertRefused(server, "node")
        self.assertNoLink(client, server)

    def test_unknown_source_address(self) -> None:
        client, server, _ = self.connect(client_ip="127.0.1.99")
        self.assertRefused(server, "address")
        self.assertNoLink(client, server)

    def test_server_with_wrong_certificate(self) -> None:
        # alpha dials beta, but alpha's certificate answers: the client refuses
        server = Side(Recorder(), LinkStats(), None)
        client = Side(Recorder(), LinkStats(), None)
        client_addr = IPv4Address("TCP", ALPHA_IP, 40000)
        server_addr = IPv4Address("TCP", BETA_STREAM, 7100)
        server.protocol = TLSMemoryBIOFactory(
            server_tls(self.config, self.alpha), False,
            LinkFactory(self.config, self.alpha, 1, server.handler, self.clock,
                        stats=server.stats), clock=self.clock).buildProtocol(client_addr)
        client.protocol = TLSMemoryBIOFactory(
            client_tls(self.config, self.alpha, self.beta), True,
            LinkFactory(self.config, self.alpha, 1, client.handler, self.clock,
                        expected=self.beta, stats=client.stats),
            clock=self.clock).buildProtocol(server_addr)
        connect(server.protocol, FakeTransport(server.protocol, True, server_addr, client_addr),
                client.protocol, FakeTransport(client.protocol, False, client_addr, server_addr),
                greet=False, clock=self.clock).flush()
        self.assertRefused(client, "tls")
        self.assertNoLink(client, server)

    def test_expired_certificate(self) -> None:
        tls = self.config.tls
        assert tls is not None
        long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        pki.issue_cert(tls.ca, pki.ca_key_path(tls.ca), "prod", "alpha",
                       pki.node_ips(self.alpha), tls.cert_for("alpha"), tls.key_for("alpha"),
                       days=1, now=long_ago, overwrite=True)
        client, server, _ = self.connect()
        self.assertRefused(server, "tls")
        self.assertNoLink(client, server)

    def test_wrong_cluster(self) -> None:
        # a CA and certificates that chain correctly but name another cluster
        tls = self.config.tls
        assert tls is not None
        for path in tls.ca.parent.iterdir():
            path.unlink()
        pki.write_ca(tls.ca, pki.ca_key_path(tls.ca), "staging")
        for node in (self.alpha, self.beta):
            pki.issue_cert(tls.ca, pki.ca_key_path(tls.ca), "staging", node.name,
                           pki.node_ips(node), tls.cert_for(node.name), tls.key_for(node.name))
        client, server, _ = self.connect()
        self.assertEqual(client.stats.refused["cluster"], 1)
        self.assertNoLink(client, server)

    def test_plain_tcp(self) -> None:
        class Plain(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"GET / HTTP/1.0\r\n\r\n")  # type: ignore[union-attr]

        _, server, _ = self.connect(client_protocol=Plain())
        self.assertRefused(server, "tls")
        self.assertNoLink(server)

    def test_handshake_timeout(self) -> None:
        _, server, _ = self.connect(client_protocol=Protocol())  # says nothing
        self.assertEqual(dict(server.stats.refused), {})
        self.clock.advance(4.9)
        self.assertEqual(dict(server.stats.refused), {})
        self.clock.advance(0.1)
        self.assertRefused(server, "timeout")

    def test_config_digest_mismatch(self) -> None:
        text = (self.dir / "cluster.toml").read_text()
        other_dir = Path(self.mktemp())
        other_dir.mkdir()
        (other_dir / "cluster.toml").write_text(
            text.replace("[tls]", "[tls]").replace('secret_file = "secret"',
                                                   'secret_file = "secret"\n'
                                                   "heartbeat_interval_ms = 20"))
        (other_dir / "secret").write_bytes(b"0123456789abcdef0123")
        (other_dir / "pki").symlink_to((self.dir / "pki").resolve())
        other = load_config(other_dir / "cluster.toml")
        self.assertNotEqual(other.digest, self.config.digest)
        client, server, _ = self.connect(client_config=other)
        # whichever side reads the other's HELLO first refuses and drops the link
        self.assertGreaterEqual(server.stats.refused["hello"] + client.stats.refused["hello"], 1)
        self.assertEqual(set(server.stats.refused) | set(client.stats.refused), {"hello"})
        self.assertNoLink(client, server)

    def test_config_digest_mismatch_control_only(self) -> None:
        # a handler that takes control-only links (the replication service): the link
        # stays up for control frames, refuses replicated data, and is never "up"
        text = (self.dir / "cluster.toml").read_text()
        other_dir = Path(self.mktemp())
        other_dir.mkdir()
        (other_dir / "cluster.toml").write_text(
            text.replace('secret_file = "secret"',
                         'secret_file = "secret"\nheartbeat_interval_ms = 20'))
        (other_dir / "secret").write_bytes(b"0123456789abcdef0123")
        (other_dir / "pki").symlink_to((self.dir / "pki").resolve())
        other = load_config(other_dir / "cluster.toml")
        controls: list[str] = []
        Recorder.control_link_up = (  # type: ignore[attr-defined]
            lambda self, link, peer, hello: controls.append(peer.name))
        self.addCleanup(delattr, Recorder, "control_link_up")
        client, server, pump = self.connect(client_config=other)
        self.assertEqual(sorted(controls), ["alpha", "beta"])
        self.assertNoLink(client, server)
        self.assertEqual(dict(server.stats.refused), {})
        request = ControlRequest(1, "auth", "/control/config/show", b"{}")
        client.link.send(request)
        pump.flush()
        self.assertEqual(server.handler.frames, [request])
        client.link.send(Keepalive(5, 0))  # replicated-state frames are refused
        pump.flush()
        self.assertRefused(server, "hello")

    def test_node_at(self) -> None:
        self.assertEqual(node_at(self.config, "127.0.2.1"), self.alpha)
        self.assertEqual(node_at(self.config, BETA_STREAM), self.beta)
        self.assertIsNone(node_at(self.config, "127.0.9.9"))
        self.assertIsNone(node_at(self.config, "not-an-ip"))
        self.assertEqual(str(PeerRejected("node", "x")), "node: x")
