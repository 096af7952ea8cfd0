"""fsha.redisclient against a real redis-server: deadlines, reconnect, AUTH, the release
script (exactly once, whoever asks)."""

from __future__ import annotations

import os
import signal
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest

from fsha.harness import poll_until
from fsha.pki import create_ca, issue_cert
from fsha.redisclient import (
    RedisClient,
    RedisSettings,
    RedisTimeout,
    RedisUnavailable,
    read_password,
)
from tests.redisserver import (
    SKIP_MESSAGE,
    RedisServer,
    free_port,
    redis_server_path,
    start_redis,
)


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def settings(server: RedisServer, **kw: Any) -> RedisSettings:
    values: dict[str, Any] = {"host": server.host, "port": server.port, "timeout": 0.5,
                              "connect_timeout": 1.0, "reconnect_min": 0.05,
                              "reconnect_max": 0.2, "password": server.password}
    values.update(kw)
    return RedisSettings(**values)


class ClientTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = start_redis(self)

    def client(self, **kw: Any) -> RedisClient:
        c = RedisClient(settings(self.server, **kw), reactor)
        c.start()
        self.addCleanup(c.stop)
        return c

    @inlineCallbacks
    def test_commands_and_status(self) -> Generator[Any, Any, None]:
        c = self.client()
        yield poll_until(lambda: c.state == "up", "connected", clock=reactor)
        yield c.execute("SET", "k", "5")
        self.assertEqual((yield c.get("k")), "5")
        self.assertIsNone((yield c.get("nothing")))
        status = c.status()
        self.assertEqual(status["state"], "up")
        self.assertIsNone(status["last_error"])
        self.assertNotIn("password", status)

    @inlineCallbacks
    def test_down_fails_at_once_then_reconnects(self) -> Generator[Any, Any, None]:
        c = self.client()
        yield poll_until(lambda: c.state == "up", "connected", clock=reactor)
        self.server.kill()
        yield poll_until(lambda: c.state == "down", "down", clock=reactor)
        self.assertIn("down", c.status()["state"])
        yield self.assertFailure(c.get("k"), RedisUnavailable)
        self.server.start()
        yield poll_until(lambda: c.state == "up", "reconnected", clock=reactor)
        yield c.execute("SET", "k", "1")
        self.assertEqual(self.server.call("GET", "k"), "1")
        self.assertGreaterEqual(c.connects, 2)

    @inlineCallbacks
    def test_hung_server_times_out_and_recovers(self) -> Generator[Any, Any, None]:
        c = self.client(timeout=0.3)
        yield poll_until(lambda: c.state == "up", "connected", clock=reactor)
        assert self.server.proc is not None
        os.kill(self.server.proc.pid, signal.SIGSTOP)
        try:
            yield self.assertFailure(c.get("k"), RedisTimeout)
            self.assertEqual(c.timeouts >= 1 or c.failures >= 1, True)
        finally:
            os.kill(self.server.proc.pid, signal.SIGCONT)
        yield poll_until(lambda: c.state == "up", "usable again", clock=reactor)
        # the aborted connection is replaced; commands work again
        for _ in range(50):
            try:
                yield c.execute("SET", "after", "1")
                break
            except (RedisUnavailable, RedisTimeout):
                yield sleep(0.05)
        self.assertEqual(self.server.call("GET", "after"), "1")

    @inlineCallbacks
    def test_release_once_per_marker(self) -> Generator[Any, Any, None]:
        c = self.client()
        yield poll_until(lambda: c.state == "up", "connected", clock=reactor)
        self.server.call("SET", "gw1", "3")
        self.assertEqual((yield c.release("gw1", "m1")), ("released", "2"))
        self.assertEqual((yield c.release("gw1", "m1")), ("already", "2"))
        self.assertEqual((yield c.release("gw1", "m2")), ("released", "1"))
        self.assertEqual((yield c.release("absent", "m3")), ("missing", ""))
        self.assertIsNone(self.server.call("GET", "absent"))  # not created at -1
        self.server.call("SET", "zero", "0")
        self.assertEqual((yield c.release("zero", "m4")), ("clamped", "0"))
        self.assertEqual(self.server.call("GET", "zero"), "0")
        ttl = self.server.call("TTL", "m1")
        self.assertGreater(ttl, 0)

    @inlineCallbacks
    def test_release_survives_script_flush(self) -> Generator[Any, Any, None]:
        c = self.client()
        yield poll_until(lambda: c.state == "up", "connected", clock=reactor)
        self.server.call("SET", "gw", "2")
        self.server.call("SCRIPT", "FLUSH")
        self.assertEqual((yield c.release("gw", "m")), ("released", "1"))

    @inlineCallbacks
    def test_two_clients_release_each_counter_once(self) -> Generator[Any, Any, None]:
        a, b = self.client(), self.client()
        yield poll_until(lambda: a.state == b.state == "up", "both connected", clock=reactor)
        self.server.call("SET", "trunk", "100")
        markers = [f"rt/call{i}/default/trunk/1" for i in range(60)]
        results = yield defer.gatherResults(
            [a.release("trunk", m) for m in markers] + [b.release("trunk", m) for m in markers])
        outcomes = [r[0] for r in results]
        self.assertEqual(outcomes.count("released"), 60)
        self.assertEqual(outcomes.count("already"), 60)
        self.assertEqual(self.server.call("GET", "trunk"), "40")


class AuthTests(unittest.TestCase):
    timeout = 30

    @inlineCallbacks
    def test_password_and_wrong_password(self) -> Generator[Any, Any, None]:
        server = start_redis(self, password="s3cret-pw")
        good = RedisClient(settings(server), reactor)
        good.start()
        self.addCleanup(good.stop)
        yield poll_until(lambda: good.state == "up", "connected with AUTH", clock=reactor)
        yield good.execute("SET", "a", "1")
        bad = RedisClient(settings(server, password="wrong"), reactor)
        bad.start()
        self.addCleanup(bad.stop)
        yield poll_until(lambda: bad.last_error is not None and "auth" in bad.last_error.lower(),
                       "auth failure reported", clock=reactor)
        self.assertEqual(bad.state, "down")
        self.assertNotIn("wrong", repr(bad.status()))
        self.assertNotIn("s3cret", repr(good.status()))

    def test_read_password(self) -> None:
        path = Path(self.mktemp())
        path.write_text("  pw-1 \nignored\n")
        self.assertEqual(read_password(path), "pw-1")
        path.write_text("\n")
        self.assertRaises(ValueError, read_password, path)


class _TLSRedis(RedisServer):
    """The test server with a TLS port too (the plain port stays, for ``call``)."""

    def __init__(self, executable: str, directory: Path) -> None:
        super().__init__(executable)
        self.certs = directory
        self.tls_port = free_port()

    def _argv(self) -> list[str]:
        return [*super()._argv(), "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(self.certs / "redis.crt"),
                "--tls-key-file", str(self.certs / "redis.key"),
                "--tls-ca-cert-file", str(self.certs / "ca.crt"),
                "--tls-auth-clients", "no"]


class TLSTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        exe = redis_server_path()
        if exe is None:
            raise unittest.SkipTest(SKIP_MESSAGE)
        certs = Path(self.mktemp()).resolve()
        ca, ca_key = create_ca(certs, "redis-test")
        issue_cert(ca, ca_key, "redis-test", "redis", ["127.0.0.1"], certs / "redis.crt",
                   certs / "redis.key")
        other = certs / "other"
        create_ca(other, "other")
        self.ca, self.other_ca = ca, other / "ca.crt"
        self.server = _TLSRedis(exe, certs)
        self.addCleanup(self.server.cleanup)
        try:
            self.server.start()
        except RuntimeError as e:
            text = str(e).lower()
            if "bad directive" in text or "unrecognized" in text:  # built without TLS
                raise unittest.SkipTest(f"redis-server without TLS support: {e}") from None
            raise

    def client(self, **kw: Any) -> RedisClient:
        c = RedisClient(settings(self.server, port=self.server.tls_port, tls=True, **kw),
                        reactor)
        c.start()
        self.addCleanup(c.stop)
        return c

    @inlineCallbacks
    def test_verified_server(self) -> Generator[Any, Any, None]:
        c = self.client(ca=self.ca, server_name="redis")
        yield poll_until(lambda: c.state == "up", "TLS connection", clock=reactor)
        yield c.execute("SET", "over-tls", "1")
        self.assertEqual(self.server.call("GET", "over-tls"), "1")
        self.assertTrue(c.status()["tls"])

    @inlineCallbacks
    def test_unknown_ca_or_wrong_name_refused(self) -> Generator[Any, Any, None]:
        wrong_ca = self.client(ca=self.other_ca, server_name="redis")
        wrong_name = self.client(ca=self.ca, server_name="not-redis")
        yield poll_until(lambda: "certificate verify failed" in (wrong_ca.last_error or "")
                       and "not-redis" in (wrong_name.last_error or ""),
                       "both handshakes refused", clock=reactor)
        for c in (wrong_ca, wrong_name):
            self.assertEqual(c.state, "down")
            self.assertEqual(c.connects, 0)
            yield self.assertFailure(c.get("k"), RedisUnavailable)
        self.assertIn("certificate verify failed", wrong_ca.last_error or "")
        self.assertIn("not-redis", wrong_name.last_error or "")
