"""An in-memory cluster: real ClusterNodes, a fake clock, a fake network, fake effects.

Datagrams are delivered through ``clock.callLater`` (a small latency), so nothing is
re-entrant and every step is deterministic. Networks can be cut per node, links blocked
one way (``block``) or both (``partition``, ``unblock``), nodes killed (silently: no
release), paused (like SIGSTOP: no timer runs, datagrams wait in the socket buffer) and
restarted (new incarnation).
"""

from __future__ import annotations

import copy
import random
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

from fsha.config import ClusterConfig, NodeConfig, SlotConfig, parse_config
from fsha.node import Address, ClusterNode
from fsha.wire.heartbeat import Role

DEMO = Path(__file__).resolve().parent.parent / "conf" / "demo.toml"
SECRET = b"fake-cluster-secret-0123456789"
LATENCY = 0.001
#: One impaired cable (tests/e2e/linkemu.py's model of scenario 6): 5 % loss, 0-40 ms.
HOP_LOSS = 0.05
HOP_JITTER = 0.040


def make_config(nodes: int = 3, slots: int = 2, **cluster: Any) -> ClusterConfig:
    raw = tomllib.loads(DEMO.read_text())
    template = raw["node"][0]
    raw["node"] = []
    for i in range(1, nodes + 1):
        node = copy.deepcopy(template)
        node.update(name=f"fs{i}", priority=100 if i <= slots else 50,
                    address={"A": f"127.0.1.{i}", "B": f"127.0.2.{i}"},
                    stream=f"127.0.1.{i}:17410", status=f"127.0.1.{i}:17420")
        node["esl"]["host"] = f"127.0.3.{i}"
        raw["node"].append(node)
    raw["slot"] = [{"name": f"slot{i}", "profiles": [f"slot{i}"],
                    "ip": [{"address": f"127.0.10.{i}/32", "interface": "lo"}]}
                   for i in range(1, slots + 1)]
    raw["cluster"].update(cluster)
    return parse_config(raw, DEMO)


class FakeActions:
    """Records acquire/release; acquire can be made to fail or to hang."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.fenced: list[bool] = []  # the fence= argument of every acquire
        self.claimers: list[list[str]] = []  # the claimers= argument of every acquire
        self.held: set[str] = set()
        self.fail_acquire = False
        self.hang_acquire = False
        self.pending: list[defer.Deferred[None]] = []
        self.hang_release = False  # release waits until a test fires its Deferred
        self.pending_releases: list[defer.Deferred[None]] = []

    def acquire(self, slot: SlotConfig, epoch: int, previous: NodeConfig | None, *,
                fence: bool = True, claimers: Sequence[NodeConfig] = ()
                ) -> defer.Deferred[None]:
        self.calls.append(("acquire", slot.name, epoch))
        self.fenced.append(fence)
        self.claimers.append([c.name for c in claimers])
        if self.fail_acquire:
            return defer.fail(RuntimeError("floating IP refused"))
        if self.hang_acquire:
            d: defer.Deferred[None] = defer.Deferred()
            self.pending.append(d)
            return d
        self.held.add(slot.name)
        return defer.succeed(None)

    def release(self, slot: SlotConfig) -> defer.Deferred[None]:
        self.calls.append(("release", slot.name, 0))
        if self.hang_release:
            d: defer.Deferred[None] = defer.Deferred()
            d.addCallback(lambda _: self.held.discard(slot.name))
            self.pending_releases.append(d)
            return d
        self.held.discard(slot.name)
        return defer.succeed(None)


class FakeHealth:
    def __init__(self) -> None:
        self.ok = True

    def is_ok(self) -> bool:
        return self.ok


class FakeCluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.clock = Clock()
        self.clock.advance(1_000_000)  # a plausible epoch-ish time
        self.nodes: dict[str, ClusterNode] = {}
        self.actions: dict[str, FakeActions] = {}
        self.health: dict[str, FakeHealth] = {}
        self.dead: set[str] = set()
        self.paused: dict[str, list[tuple[int, str, bytes, Address]]] = {}
        # what a resumed node's socket still holds until its reactor reads it
        self.buffered: dict[str, list[tuple[int, str, bytes, Address]]] = {}
        self.cut: set[tuple[str, str]] = set()  # (node, network) pairs that are down
        self.blocked: set[tuple[str, str]] = set()  # (from, to) node pairs that cannot talk
        self.loss: dict[str, float] = {}
        self.latency: dict[str, float] = {}  # per network name; LATENCY otherwise
        # impaired cables every datagram crosses (HOP_LOSS, HOP_JITTER each), drawn from
        # hop_rng so a seeded run repeats exactly
        self.hops = 0
        self.hop_rng = random.Random(1)
        self.delivered = 0
        self._incarnation = 1000
        self._by_address: dict[tuple[int, str], tuple[str, int]] = {}
        for node in config.nodes:
            for net in config.networks:
                self._by_address[(net.index, node.addresses[net.name])] = (node.name, net.index)
        for node in config.nodes:
            self.actions[node.name] = FakeActions()
            self.health[node.name] = FakeHealth()

    def start(self, name: str, config: ClusterConfig | None = None) -> ClusterNode:
        """Start (or restart) ``name``, with the cluster's config or another file's (a
        rollout: same nodes and addresses, another digest)."""
        config = config or self.config
        me = config.node(name)
        # A starting node clears what an earlier incarnation left (start-up clean-up).
        held = getattr(self.actions[name], "held", None)  # FakeActions (not real effects)
        if held is not None:
            held.clear()
        self._incarnation += 1
        node = ClusterNode(config, me, SECRET, self.clock, self.actions[name],
                           self.health[name], incarnation=self._incarnation,
                           first_sequence=self._incarnation * 7919 % 1_000_003 * 1000)
        for net in self.config.networks:
            node.attach(net.name, self._sender(name, net.index, net.name))
        node.add_drain(lambda: self._flush(name, node))
        self.nodes[name] = node
        self.dead.discard(name)
        self.paused.pop(name, None)
        node.start()
        return node

    def start_all(self) -> None:
        for node in self.config.nodes:
            self.start(node.name)

    def _sender(self, name: str, index: int, network: str) -> Any:
        source = (self.config.node(name).addresses[network], self.config.networks[index].port)

        def send(data: bytes, address: Address) -> None:
            if (name, network) in self.cut:
                raise OSError("Network is unreachable")
            target = self._by_address.get((index, address[0]))
            if target is None or (name, target[0]) in self.blocked:
                return
            delay = self.latency.get(network, LATENCY)
            for _ in range(self.hops):
                if self.hop_rng.random() < HOP_LOSS:
                    return
                delay += self.hop_rng.uniform(0.0, HOP_JITTER)
            self.clock.callLater(delay, self._deliver, target[0], index, network, data, source)
        return send

    def _deliver(self, target: str, index: int, network: str, data: bytes,
                 source: Address) -> None:
        if target in self.dead or target not in self.nodes or (target, network) in self.cut:
            return
        queue = self.paused.get(target)
        if queue is not None:
            if len(queue) < 1000:  # a socket buffer: full, the rest is lost
                queue.append((index, network, data, source))
            return
        self.delivered += 1
        self.nodes[target].datagram_received(index, data, source)

    def partition(self, *sides: set[str]) -> None:
        """Block every pair of nodes on different sides, in both directions."""
        for a in sides:
            for b in sides:
                if a is not b:
                    self.blocked.update((x, y) for x in a for y in b)

    def block(self, sender: str, receiver: str) -> None:
        """One way: ``receiver`` no longer hears ``sender`` (``sender`` still hears it)."""
        self.blocked.add((sender, receiver))

    def unblock(self, a: str, b: str) -> None:
        self.blocked.discard((a, b))
        self.blocked.discard((b, a))

    def pause(self, name: str) -> None:
        """Like SIGSTOP: the node runs nothing until :meth:`resume`."""
        node = self.nodes[name]
        self.paused[name] = []
        node.running = False
        if node._ticker.running:
            node._ticker.stop()

    def resume(self, name: str) -> None:
        """Like SIGCONT: the late timer runs first, then the datagrams that waited (unless
        the timer reads them itself: the node's drain)."""
        node = self.nodes[name]
        self.buffered[name] = self.paused.pop(name)
        node.running = True
        node._ticker.start(self.config.heartbeat_interval, now=True).addErrback(
            lambda f: node.log.failure("heartbeat loop failed", f))
        self._flush(name, node)

    def stall(self, name: str, seconds: float) -> None:
        """The node's process is not scheduled for ``seconds`` (a loaded host): the same
        as a pause and a resume, with the rest of the cluster running meanwhile."""
        self.pause(name)
        self.advance(seconds)
        self.resume(name)

    def _flush(self, name: str, node: ClusterNode) -> None:
        """Deliver what waited in ``name``'s socket buffer (the reactor reading it)."""
        queue = self.buffered.pop(name, [])
        for index, _network, data, source in queue:
            if self.nodes.get(name) is not node:
                return
            self.delivered += 1
            node.datagram_received(index, data, source)

    def kill(self, name: str) -> None:
        """Like kill -9: the node stops without releasing anything."""
        node = self.nodes[name]
        self.dead.add(name)
        node.running = False
        if node._ticker.running:
            node._ticker.stop()

    def advance(self, seconds: float, step: float = 0.001) -> None:
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(min(step, end - self.clock.seconds()))

    def live(self) -> list[ClusterNode]:
        return [n for name, n in self.nodes.items() if name not in self.dead]

    def holders(self) -> dict[str, set[str]]:
        """slot name -> the running (not killed, not paused) nodes holding its resources."""
        result: dict[str, set[str]] = {}
        for name in self.nodes:
            if name in self.dead or name in self.paused:
                continue
            for slot in getattr(self.actions[name], "held", ()):
                result.setdefault(slot, set()).add(name)
        return result

    def masters(self) -> dict[str, str]:
        """slot name -> node name, from the nodes' own states."""
        result: dict[str, str] = {}
        for node in self.live():
            if node.role is Role.MASTER and node.me.name not in self.paused:
                slot = self.config.slots[node.slot].name
                assert slot not in result, f"two masters of {slot}"
                result[slot] = node.me.name
        return result

    def roles_of(self) -> dict[str, str]:
        return {n.me.name: n.role.name.lower() for n in self.live()}


def impairable_cluster(config: ClusterConfig, seed: int = 1) -> FakeCluster:
    """``config``'s cluster converged on clean links (0.5 ms), seeded so that setting
    ``hops`` later impairs every path of every network reproducibly."""
    c = FakeCluster(config)
    c.hop_rng = random.Random(seed)
    c.latency = {net.name: 0.0005 for net in config.networks}
    c.start_all()
    c.advance(3.0)
    assert c.masters() == {"slot1": "fs1", "slot2": "fs2"}, c.roles_of()
    return c
