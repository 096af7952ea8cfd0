"""Tests for fsha.replication.service: real mutual TLS on loopback, several nodes in one
process (each with its own 127.0.x.y addresses), waiting on conditions with deadlines."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase

from fsha import pki
from fsha.config import ClusterConfig, load_config
from fsha.harness import poll_until
from fsha.replication.service import ReplicationService, dial_routes, listen_addresses
from fsha.replication.session import SessionConfig
from fsha.wire.stream import Kind

NAMES = ("alpha", "beta", "gamma")


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_cluster(directory: Path, nodes: int = 3) -> ClusterConfig:
    """A cluster of ``nodes`` nodes on two loopback networks, with its throwaway PKI."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ['[cluster]', 'name = "repl-test"', 'secret_file = "secret"', '',
             '[tls]', 'ca = "pki/ca.crt"', 'cert = "pki/{node}.crt"', 'key = "pki/{node}.key"',
             '']
    for net, third in (("a", 1), ("b", 2)):
        lines += ['[[network]]', f'name = "{net}"', f'port = {free_port(f"127.0.{third}.1")}',
                  '']
    for i in range(nodes):
        a, b = f"127.0.1.{i + 1}", f"127.0.2.{i + 1}"
        lines += ['[[node]]', f'name = "{NAMES[i]}"', f'address = {{ a = "{a}", b = "{b}" }}',
                  f'stream = "{a}:{free_port(a)}"', f'status = "{a}:{free_port(a)}"',
                  'esl = { password = "ClueCon" }', '']
    lines += ['[[slot]]', 'name = "s1"', 'profiles = ["internal"]',
              'ip = [{ address = "127.0.9.1/32", interface = "lo" }]']
    path = directory / "cluster.toml"
    path.write_text("\n".join(lines) + "\n")
    (directory / "secret").write_bytes(b"0123456789abcdef0123")
    config = load_config(path)
    pki.ensure_cluster_pki(config)
    return config


FAST = SessionConfig(keepalive_interval=0.5, silence_timeout=3.0)


class ServiceTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.config = write_cluster(Path(self.mktemp()))
        self.services: dict[str, ReplicationService] = {}

    def tearDown(self) -> defer.Deferred[Any]:
        return defer.DeferredList([defer.maybeDeferred(s.stopService)
                                   for s in self.services.values() if s.running])

    def start(self, name: str, incarnation: int, **kw: Any) -> ReplicationService:
        kw.setdefault("session_config", FAST)
        svc = ReplicationService(self.config, self.config.node(name), reactor,
                                 incarnation=incarnation, backoff_initial=0.05,
                                 backoff_max=0.5, **kw)
        svc.startService()
        self.services[name] = svc
        return svc

    def all_up(self) -> bool:
        return all(p["up"] for s in self.services.values() if s.running
                   for name, p in s.status()["peers"].items()
                   if self.services.get(name) is not None and self.services[name].running)

    def converged(self) -> bool:
        digests = {s.state.digest() for s in self.services.values() if s.running}
        return len(digests) == 1

    def test_listen_and_dial_plan(self) -> None:
        alpha, beta = self.config.node("alpha"), self.config.node("beta")
        self.assertEqual(listen_addresses(beta), ["127.0.1.2", "127.0.2.2"])
        routes = dial_routes(self.config, alpha, beta)
        self.assertEqual([(r.network, r.host, r.source) for r in routes],
                         [("a", "127.0.1.2", "127.0.1.1"), ("b", "127.0.2.2", "127.0.2.1")])
        self.assertEqual({r.port for r in routes}, {beta.stream.port})

    @defer.inlineCallbacks
    def test_three_nodes_replicate(self) -> Any:
        alpha = self.start("alpha", 101)
        beta = self.start("beta", 202)
        gamma = self.start("gamma", 303)
        yield poll_until(self.all_up, "every link up", clock=reactor)
        for i in range(200):
            alpha.put(0, Kind.CALL, f"call-{i}", b"<xml>" + b"r" * 500 + b"</xml>")
        for i in range(50):
            beta.put(0, Kind.REGISTRATION, f"{i}@pbx", b"sip:x", 0)
        # the way Feeds writes: to the state, then publish
        gamma.publish(gamma.state.put(0xFFFF, Kind.IDENTITY, "gamma", b"core-uuid"))
        alpha.delete(0, Kind.CALL, "call-7")
        self.assertRaises(ValueError, gamma.publish, alpha.state.last_change)
        # a change never published still reaches the peers (pulled from the log), and the
        # batch after it is not mistaken for a contiguous one
        beta.state.put(0, Kind.REGISTRATION, "unpublished@pbx", b"sip:y")
        beta.put(0, Kind.REGISTRATION, "after@pbx", b"sip:z")
        yield poll_until(self.converged, "the same state on every node", clock=reactor)
        self.assertEqual(len(gamma.state), 199 + 52 + 1)
        status = alpha.status()
        self.assertEqual(status["slots"], {"s1": {"call": 199, "registration": 52},
                                           "none": {"identity": 1}})
        self.assertEqual(status["digest"], gamma.state.digest().hex())
        peer = status["peers"]["beta"]
        self.assertTrue(peer["up"])
        self.assertTrue(peer["dials"])
        self.assertEqual(peer["network"], "a")
        self.assertEqual(peer["address"], "127.0.1.2")
        self.assertEqual(peer["identity"]["name"], "beta")
        self.assertEqual(peer["identity"]["cluster"], "repl-test")
        self.assertGreater(peer["bytes_out"], 200 * 500)
        self.assertGreater(peer["bytes_in"], 50 * 20)
        yield poll_until(lambda: alpha.status()["peers"]["gamma"]["lag_changes"] == 0,
                       "gamma acknowledging everything", clock=reactor)
        self.assertEqual(alpha.status()["peers"]["gamma"]["lag_ms"], 0.0)
        self.assertIsNotNone(alpha.status()["peers"]["gamma"]["last_ack_lag_ms"])
        self.assertFalse(gamma.status()["peers"]["alpha"]["dials"])
        self.assertEqual(status["links"]["refused"], {})
        self.assertEqual(status["links"]["unexpected_inbound"], 0)

    @defer.inlineCallbacks
    def test_second_network_when_the_first_fails(self) -> Any:
        beta = self.start("beta", 2)
        # beta is unreachable on network a: nothing listens there any more
        yield beta.ports["127.0.1.2"].stopListening()
        alpha = self.start("alpha", 1)
        yield poll_until(self.all_up, "alpha-beta up over network b", clock=reactor)
        peer = alpha.status()["peers"]["beta"]
        self.assertEqual((peer["network"], peer["address"]), ("b", "127.0.2.2"))
        self.assertEqual(peer["dial_failures"], {"a": 1})
        self.assertEqual(beta.status()["peers"]["alpha"]["network"], "b")
        alpha.put(0, Kind.CALL, "c", b"v")
        yield poll_until(self.converged, "beta has alpha's call", clock=reactor)

    @defer.inlineCallbacks
    def test_plain_tcp_is_refused_and_counted(self) -> Any:
        beta = self.start("beta", 2)
        port = self.config.node("beta").stream.port
        closed: defer.Deferred[None] = defer.Deferred()

        class Plain(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"GET / HTTP/1.0\r\n\r\n")  # type: ignore[union-attr]

            def connectionLost(self, reason: object = None) -> None:
                closed.callback(None)

        factory = ClientFactory.forProtocol(Plain)
        reactor.connectTCP("127.0.1.2", port, factory, bindAddress=("127.0.1.1", 0))
        yield closed
        yield poll_until(lambda: beta.status()["links"]["refused"].get("tls") == 1,
                       "the refusal counted", clock=reactor)

    @defer.inlineCallbacks
    def test_restarted_node_catches_up_exactly(self) -> Any:
        alpha = self.start("alpha", 11, log_limit=300)  # gamma's absence outlasts it
        beta = self.start("beta", 21)
        gamma = self.start("gamma", 31)
        yield poll_until(self.all_up, "every link up", clock=reactor)
        gamma.put(0, Kind.REGISTRATION, "gamma-user@pbx", b"contact")
        beta.put(0, Kind.LIMIT, "gw1", b"3")
        counter = iter(range(1_000_000))

        def write_some() -> None:  # alpha writes while things happen
            for _ in range(20):
                i = next(counter)
                alpha.put(0, Kind.CALL, f"call-{i % 300}", b"row-%d" % i)
                if i % 7 == 0:
                    alpha.delete(0, Kind.CALL, f"call-{(i + 13) % 300}")

        writer = LoopingCall(write_some)
        writer.clock = reactor
        writer.start(0.005)
        self.addCleanup(lambda: writer.stop() if writer.running else None)

        def written() -> int:
            position = alpha.state.position(0)
            return position.sequence if position is not None else 0

        # (counted in changes, not in time: a loaded machine runs the writer less often)
        yield poll_until(lambda: written() > 100, "alpha writing", clock=reactor)
        # gamma goes away mid-stream
        yield gamma.stopService()
        yield poll_until(lambda: not alpha.status()["peers"]["gamma"]["up"], "alpha sees gamma go",
                         clock=reactor)
        # more changes while gamma is away, until alpha's log no longer reaches back to an
        # empty node
        yield poll_until(lambda: alpha.state.catch_up(0, None, limit=1) is None,
                       "alpha's log to outgrow gamma's absence", clock=reactor)
        beta.put(0, Kind.LIMIT, "gw1", b"4")
        # a new run of gamma: new incarnation, empty state
        gamma2 = self.start("gamma", 32)
        yield poll_until(self.all_up, "gamma's links up again", clock=reactor)
        more = written() + 100
        yield poll_until(lambda: written() > more, "alpha writing while gamma catches up",
                         clock=reactor)
        writer.stop()
        yield poll_until(self.converged, "every node holding the same state", clock=reactor)
        # nothing missing, nothing duplicated, and gamma's previous run is retired
        self.assertEqual(sorted((r.key, r.value) for r in gamma2.state.records(origin=0)),
                         sorted((r.key, r.value) for r in alpha.state.records(origin=0)))
        self.assertEqual(list(alpha.state.records(origin=2)), [])
        self.assertEqual(len(alpha.state.retired(2)), 1)
        self.assertEqual(gamma2.state.position(0), alpha.state.position(0))
        self.assertEqual(beta.state.digest(), gamma2.state.digest())
        for name in ("alpha", "beta"):
            peer = self.services[name].status()["peers"]["gamma"]
            self.assertGreaterEqual(peer["connects"], 2, name)
        # alpha's log no longer reached back to an empty node: gamma got a snapshot
        self.assertGreater(alpha.state.position(0).sequence, 300)  # type: ignore[union-attr]
        self.assertGreaterEqual(gamma2.status()["peers"]["alpha"]["snapshots_applied"], 1)

    @defer.inlineCallbacks
    def test_stop_is_clean_and_peers_redial(self) -> Any:
        alpha = self.start("alpha", 1)
        beta = self.start("beta", 2)
        yield poll_until(self.all_up, "link up", clock=reactor)
        yield beta.stopService()
        self.assertEqual(beta.status()["listening"], [])
        self.assertFalse(beta.status()["peers"]["alpha"]["up"])
        yield poll_until(lambda: alpha.status()["peers"]["beta"]["dial_failures"].get("b", 0) >= 2,
                       "alpha redialling over both networks", clock=reactor)
        beta2 = self.start("beta", 3)
        yield poll_until(self.all_up, "link up again", clock=reactor)
        alpha.put(0, Kind.CALL, "after", b"v")
        yield poll_until(self.converged, "beta's new run has alpha's call", clock=reactor)
        self.assertEqual(len(beta2.state), 1)
