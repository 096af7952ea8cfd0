"""LimitService with a real redis-server: two nodes reconciling the same dead master, Redis
killed in the middle of the releases, Redis hung (SIGSTOP) during a takeover."""

from __future__ import annotations

import os
import signal
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial import unittest

from fsha.config import LimitsConfig
from fsha.fsdb import RecoveryRow, encode_call_row
from fsha.harness import poll_until
from fsha.limitservice import LimitService
from fsha.redisclient import RedisClient
from fsha.replication.state import ReplicatedState
from fsha.wire.stream import Change, Kind
from tests.redisserver import RedisServer, start_redis
from tests.test_limits import CONFIG, Call, FakeFS, _Report, cdr
from tests.test_redisclient import settings

LIMITS = LimitsConfig(60.0, "fsha_limit", ("default",), 60.0, 5.0, 0.1)


class Node:
    """One node: a fake FreeSWITCH, a replicated state, a LimitService, a Redis client."""

    def __init__(self, index: int, server: RedisServer, peers: list[Node],
                 redis_timeout: float) -> None:
        self.config = CONFIG.nodes[index]
        self.fs = FakeFS(f"runtime-{index}")
        self.state = ReplicatedState(reactor, self.config.node_id, 1)
        self.peers = peers
        self.redis = RedisClient(settings(server, timeout=redis_timeout), reactor)
        self.svc = LimitService(self.fs, self.state, CONFIG, self.config, reactor, LIMITS,
                                redis=self.redis, publish=self.publish)
        peers.append(self)

    def publish(self, change: Change) -> None:
        for peer in self.peers:
            if peer is not self:
                peer.state.apply(change)

    def start(self) -> None:
        self.redis.start()
        self.svc.start()

    def stop(self) -> Deferred[None]:
        self.svc.stop()
        return self.redis.stop()


class ServiceRedisTests(unittest.TestCase):
    timeout = 120

    # Redis command deadline: generous, as a release answered after its deadline is retried
    # and then counts as "already" (a loaded machine answers late; the exact counts below
    # would be off). A test that wants timeouts sets its own (``redis_timeout`` attribute).
    redis_timeout = 5.0

    def setUp(self) -> None:
        self.server = start_redis(self)
        self.nodes: list[Node] = []
        timeout = getattr(getattr(self, self._testMethodName), "redis_timeout",
                          self.redis_timeout)
        self.dead, self.a, self.b = (Node(i, self.server, self.nodes, timeout)
                                     for i in range(3))
        for n in (self.a, self.b):
            n.start()
            self.addCleanup(n.stop)

    def dead_master_calls(self, count: int, units: int = 1) -> None:
        """``count`` calls on the dead master (slot 0), each holding ``units`` units of
        the hiredis key ``trunk`` and the hash key ``gw_out``; Redis counts them."""
        for i in range(count):
            row = RecoveryRow(self.dead.fs.core_uuid or "", "sofia",
                              CONFIG.slots[0].profiles[0], "h", f"call-{i}",
                              cdr(["gw_out"], ["default trunk 100000"] * units))
            self.dead.publish(self.dead.state.put(0, Kind.CALL, f"call-{i}",
                                                  encode_call_row(row)))
        self.server.call("SET", "trunk", str(count * units))

    def report(self) -> _Report:
        return _Report("acquire", CONFIG.slots[0].name, self.dead.config.name)

    @inlineCallbacks
    def test_two_nodes_reconcile_the_same_dead_master(self) -> Generator[Any, Any, None]:
        self.dead_master_calls(150, units=2)
        yield poll_until(lambda: self.a.redis.state == self.b.redis.state == "up", "connected",
                         clock=reactor)
        self.a.svc.takeover_done(self.report())
        self.b.svc.takeover_done(self.report())
        yield poll_until(lambda: not self.a.svc.status()["pending_releases"]
                       and not self.b.svc.status()["pending_releases"], "releases done",
                       timeout=30, clock=reactor)
        self.assertEqual(self.server.call("GET", "trunk"), "0")
        released = [n.svc.released for n in (self.a, self.b)]
        self.assertEqual(sum(r.get("released", 0) for r in released), 300)
        self.assertEqual(sum(r.get("already", 0) for r in released), 300)
        self.assertEqual(sum(r.get("clamped", 0) + r.get("missing", 0) for r in released), 0)
        for n in (self.a, self.b):
            self.assertEqual(n.svc.book.totals(), {})

    @inlineCallbacks
    def test_handover_retakes_once_then_releases(self) -> Generator[Any, Any, None]:
        """A hand-over: the old FreeSWITCH gave the units back (counter 0), the calls live
        on, recovered, on ``a``: it takes them again (once, even when asked twice), then
        releases them when they end."""
        self.dead_master_calls(100, units=2)
        self.server.call("SET", "trunk", "0")
        for i in range(100):
            self.a.fs.calls[f"call-{i}"] = Call(f"call-{i}", frozenset(), (), recovered=True)
        yield poll_until(lambda: self.a.redis.state == "up", "connected", clock=reactor)
        report = _Report("acquire", CONFIG.slots[0].name, self.dead.config.name,
                         handover=True, epoch=7)
        self.a.svc.takeover_done(report)
        yield poll_until(lambda: not self.a.svc.status()["pending_retakes"], "retakes done",
                       timeout=30, clock=reactor)
        self.a.svc.takeover_done(report)  # again: every marker is there
        yield poll_until(lambda: self.a.svc.retaken.get("already") == 200, "second pass",
                       timeout=30, clock=reactor)
        self.assertEqual(self.server.call("GET", "trunk"), "200")
        self.assertEqual(self.a.svc.retaken, {"retaken": 200, "already": 200})
        for i in range(100):
            self.a.fs.hangup(f"call-{i}")
        yield poll_until(lambda: not self.a.svc.status()["pending_releases"], "releases done",
                       timeout=30, clock=reactor)
        self.assertEqual(self.server.call("GET", "trunk"), "0")
        self.assertEqual(self.a.svc.released, {"released": 200})

    @inlineCallbacks
    def test_redis_killed_in_the_middle(self) -> Generator[Any, Any, None]:
        self.dead_master_calls(400)
        yield poll_until(lambda: self.a.redis.state == "up", "connected", clock=reactor)
        self.server.call("SAVE")
        calls = [0]
        release = self.a.redis.release

        def counting(counter: str, marker: str, value: str = "1") -> Deferred[Any]:
            calls[0] += 1
            if calls[0] == 100:  # a quarter done: Redis crashes (the SAVE keeps the counts)
                self.server.call("SAVE")
                self.server.kill()
            return release(counter, marker, value)

        self.a.redis.release = counting  # type: ignore[method-assign]
        self.a.svc.takeover_done(self.report())
        # the takeover's bookkeeping is done whatever Redis does: the releases wait
        self.assertEqual(self.a.svc.book.totals(), {})
        yield poll_until(lambda: self.a.redis.state == "down", "Redis down", clock=reactor)
        self.assertGreater(self.a.svc.status()["pending_releases"], 0)
        self.assertIn("down", self.a.svc.status()["redis"]["state"])
        self.server.start()
        yield poll_until(lambda: not self.a.svc.status()["pending_releases"],
                       "releases finished after Redis came back", timeout=30, clock=reactor)
        self.assertEqual(self.server.call("GET", "trunk"), "0")
        outcomes = self.a.svc.released
        self.assertEqual(outcomes.get("clamped", 0) + outcomes.get("missing", 0), 0)
        self.assertGreater(self.a.svc.release_errors, 0)  # some were cut off, then retried
        self.assertGreater(calls[0], 400)
        self.assertGreaterEqual(self.a.redis.connects, 2)

    @inlineCallbacks
    def test_hung_redis_never_blocks_the_takeover(self) -> Generator[Any, Any, None]:
        self.dead_master_calls(50)
        yield poll_until(lambda: self.a.redis.state == "up", "connected", clock=reactor)
        assert self.server.proc is not None
        os.kill(self.server.proc.pid, signal.SIGSTOP)
        try:
            d = self.a.svc.reconcile(CONFIG.slots[0], self.dead.config)
            self.assertTrue(d.called)  # no Redis round trip in the reconciliation itself
            self.assertEqual((yield d)["released"], 50)
            yield poll_until(lambda: self.a.svc.release_errors > 0, "releases timing out",
                             clock=reactor)
            self.assertEqual(self.a.svc.status()["pending_releases"], 50)
        finally:
            os.kill(self.server.proc.pid, signal.SIGCONT)
        yield poll_until(lambda: not self.a.svc.status()["pending_releases"], "released",
                       timeout=30, clock=reactor)
        self.assertEqual(self.server.call("GET", "trunk"), "0")

    test_hung_redis_never_blocks_the_takeover.redis_timeout = 0.3  # type: ignore[attr-defined]
