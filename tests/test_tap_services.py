"""fsha.tap: children stop one after the other, last added first; the whole tree of one
node built, started and stopped in process on a memory reactor."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from fsha import tomlout
from fsha.config import load_config
from fsha.harness import TLS_FILES
from fsha.pki import ensure_cluster_pki
from fsha.tap import SERVICE_ORDER, NodeService, Options, OrderedServices, build_service


class _Child(service.Service):
    def __init__(self, name: str, log: list[str]) -> None:
        self.setName(name)
        self.log = log
        self.stopping: defer.Deferred[None] | None = None

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.log.append(f"stop {self.name}")
        self.stopping = defer.Deferred()
        return self.stopping


class OrderedServicesTests(SynchronousTestCase):
    def test_each_child_stops_after_the_previous_one_finished(self) -> None:
        log: list[str] = []
        top = OrderedServices()
        children = [_Child(n, log) for n in ("esl", "replication", "node")]
        for c in children:
            c.setServiceParent(top)
        top.startService()
        done = top.stopService()
        self.assertEqual(log, ["stop node"])  # the hand-over still has ESL and replication
        children[2].stopping.callback(None)  # type: ignore[union-attr]
        self.assertEqual(log, ["stop node", "stop replication"])
        children[1].stopping.errback(RuntimeError("boom"))  # type: ignore[union-attr]
        self.assertEqual(log, ["stop node", "stop replication", "stop esl"])
        self.assertNoResult(done)
        children[0].stopping.callback(None)  # type: ignore[union-attr]
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class _UDPPort:
    """What ``listenUDP`` returns here: records the datagrams the node sends."""

    def __init__(self, protocol: DatagramProtocol, interface: str, port: int) -> None:
        self.protocol, self.interface, self.port = protocol, interface, port
        self.sent: list[tuple[bytes, Any]] = []
        self.listening = True
        protocol.makeConnection(self)  # type: ignore[arg-type]

    def write(self, data: bytes, address: Any) -> None:
        self.sent.append((data, address))

    def stopListening(self) -> None:
        self.listening = False
        self.protocol.doStop()


class _Reactor(MemoryReactorClock):
    """MemoryReactorClock plus UDP: every network call recorded, none made."""

    def __init__(self) -> None:
        super().__init__()
        self.udp: list[_UDPPort] = []

    def listenUDP(self, port: int, protocol: DatagramProtocol, interface: str = "",
                  maxPacketSize: int = 8192) -> _UDPPort:
        self.udp.append(_UDPPort(protocol, interface, port))
        return self.udp[-1]


def _options(directory: Path, *, limits: bool = False, redis: bool = False,
             guard: bool = False) -> Options:
    directory.mkdir(parents=True)
    secret = directory / "secret"
    secret.write_bytes(b"0123456789abcdef0123")
    doc: dict[str, Any] = {
        "cluster": {"name": "tap", "secret_file": str(secret), "quorum": "majority"},
        "floating_ip": {"backend": "loopback"},
        "guard": {"enabled": False},  # its process is not spawned in process
        "tls": TLS_FILES,
        "network": [{"name": "A", "port": 9000}, {"name": "B", "port": 9001}],
        "node": [{"name": f"fs{i}", "address": {"A": f"127.0.1.{i}", "B": f"127.0.2.{i}"},
                  "stream": f"127.0.1.{i}:9100", "status": f"127.0.1.{i}:9200",
                  "esl": {"password": "ClueCon"}} for i in (1, 2, 3)],
        "slot": [{"name": "s1", "profiles": ["internal"],
                  "ip": [{"address": "127.0.9.1/32", "interface": "lo"}]}],
    }
    if limits:
        doc["limits"] = {}
    if redis:
        doc["redis"] = {"address": "127.0.0.1:6379", "durable_state": True}
    if guard:
        del doc["guard"]
    path = directory / "cluster.toml"
    path.write_text(tomlout.dumps(doc))
    config = load_config(path)
    ensure_cluster_pki(config)
    # What postOptions sets, without its start-up checks (they bind the real ports).
    options = Options()
    options.cluster, options.me = config, config.node("fs1")
    options.secret, options.redis_password = config.read_secret(), None
    return options


class BuildServiceTests(SynchronousTestCase):
    """The whole service tree of one node, built and run in process on a memory reactor."""

    def setUp(self) -> None:
        self.reactor = _Reactor()
        self.addCleanup(gc.unfreeze)  # build_service freezes what it built

    def test_the_tree_starts_listens_connects_and_stops_in_order(self) -> None:
        top = build_service(_options(Path(self.mktemp()).resolve(), limits=True),
                            self.reactor)
        # The start order is SERVICE_ORDER's (no Redis, no guard configured here); services
        # stop in reverse, each once the previous one's stop has finished.
        names = ["esl", "esl-probe", "fsevents", "heartbeat-A", "heartbeat-B", "replication",
                 "feeds", "superseded", "limits", "status",
                 "config-catch-up", "node"]
        self.assertEqual([s.name for s in top], names)
        order = [name for name, _ in SERVICE_ORDER]
        self.assertEqual(sorted(names, key=lambda n: order.index(n.partition("-")[0]
                                                                 if n.startswith("heartbeat")
                                                                 else n)), names)
        stopped: list[str] = []
        for child in top:
            def stop(child: Any = child, real: Any = child.stopService) -> Any:
                stopped.append(child.name)
                return real()
            child.stopService = stop  # type: ignore[method-assign]
        top.startService()
        self.assertTrue(all(s.running for s in top))
        self.assertEqual(sorted((p.interface, p.port) for p in self.reactor.udp),
                         [("127.0.1.1", 9000), ("127.0.2.1", 9001)])
        self.assertEqual([(port, iface) for port, _, _, _, iface in self.reactor.sslServers],
                         [(9100, "127.0.1.1"), (9100, "127.0.2.1")])  # replication: TLS
        self.assertEqual([(port, iface) for port, _, _, iface in self.reactor.tcpServers],
                         [(9200, "127.0.1.1")])  # status
        # ESL (command and probe connections) dial FreeSWITCH; replication dials its peers
        self.reactor.advance(0.1)
        dialled = sorted((host, port) for host, port, *_ in self.reactor.tcpClients)
        self.assertEqual(dialled.count(("127.0.0.1", 8021)), 2)
        node = next(s for s in top if isinstance(s, NodeService)).node
        self.assertTrue(node.running)
        sent = sum(len(p.sent) for p in self.reactor.udp)
        self.reactor.advance(node.config.heartbeat_interval)
        self.assertGreater(sum(len(p.sent) for p in self.reactor.udp), sent, "heartbeats")
        done = top.stopService()
        self.reactor.advance(1.0)
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(stopped, names[::-1])
        self.assertFalse(any(s.running for s in top))
        self.assertFalse(node.running)
        self.assertEqual([p.listening for p in self.reactor.udp], [False, False])

    def test_every_configured_part_in_the_order(self) -> None:
        """With Redis, the durable store and the guard (not started: its process)."""
        top = build_service(_options(Path(self.mktemp()).resolve(), limits=True, redis=True,
                                     guard=True), self.reactor)
        self.assertEqual([s.name for s in top], [
            "esl", "esl-probe", "fsevents", "heartbeat-A", "heartbeat-B", "replication",
            "feeds", "superseded", "redis", "limits", "durable", "status", "config-catch-up",
            "guard", "node"])
        node = next(s for s in top if isinstance(s, NodeService)).node
        durable = next(s for s in top if s.name == "durable")
        guard = next(s for s in top if s.name == "guard")
        # the latches both sides were built with: no back reference set afterwards
        self.assertIs(node.cold_start_gate, durable.loaded)  # type: ignore[attr-defined]
        self.assertIs(node.health.guard_given_up, guard.given_up)  # type: ignore[attr-defined]
        self.assertEqual(len({name for name, _ in SERVICE_ORDER}), len(SERVICE_ORDER))
