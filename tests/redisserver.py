"""A real ``redis-server`` for tests, on a free loopback port, in a scratch directory.

Usage in a trial TestCase::

    from tests.redisserver import start_redis

    def setUp(self):
        self.redis = start_redis(self)                 # skips if redis-server is missing
        self.redis = start_redis(self, password="pw")  # with --requirepass

``start_redis`` registers the cleanup (the server is stopped, its directory removed).
The server keeps nothing on disk (``--save '' --appendonly no``). ``RedisServer.call``
is a tiny blocking RESP client (loopback, with a timeout) for test setup and assertions:
``self.redis.call("GET", "key")``. ``kill()`` stops it like ``kill -9`` and ``start()``
brings it back on the same port (to test clients that reconnect).

Starting and waiting are blocking but bounded (``START_TIMEOUT``): fine in ``setUp``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from typing import Any

from twisted.trial.unittest import SkipTest

from fsha.harness import HarnessError, LoopbackCluster, wait_for

START_TIMEOUT = 10.0  # seconds to wait for the first PONG
CALL_TIMEOUT = 5.0  # seconds for one blocking command
SKIP_MESSAGE = (
    "redis-server is not installed (Debian: apt-get install redis-server; "
    "scripts/setup.sh installs it when run as root)"
)


class RedisError(Exception):
    """An error reply (``-ERR ...``) from the server."""


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _encode(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8")
        if kind == b"-":
            return RedisError(rest.decode("utf-8"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n).decode("utf-8", "surrogateescape")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise ConnectionError(f"unexpected reply line {line[:80]!r}")


class RedisServer:
    """One redis-server process. ``host``/``port``/``password`` are what clients need."""

    def __init__(self, executable: str, password: str | None = None) -> None:
        self.executable = executable
        self.password = password
        self.host = "127.0.0.1"
        self.port = 0
        self.dir = tempfile.mkdtemp(prefix="fsha-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def logfile(self) -> str:
        return os.path.join(self.dir, "redis.log")

    def _argv(self) -> list[str]:
        argv = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.dir,
            "--logfile", self.logfile,
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv

    def start(self) -> None:
        """Start (a free port the first time, the same port after ``kill``/``stop``) and
        wait for PONG. Retries a few ports if another process took the chosen one."""
        if self.proc is not None and self.proc.poll() is None:
            return
        keep_port = self.port != 0
        for _attempt in range(3):
            if not keep_port:
                self.port = free_port()
            self.proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=self.dir,
            )
            if self._wait_ready():
                return
            self._reap()
        raise RuntimeError(f"redis-server did not start; log tail:\n{self._log_tail()}")

    def _wait_ready(self) -> bool:
        """True once the server answers PONG; False if it exits or stays mute."""
        class Exited(Exception):
            pass

        def answers() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise Exited
            try:
                return self.call("PING", timeout=1.0) == "PONG"
            except RedisError:  # e.g. LOADING: not yet
                return False

        try:
            wait_for("redis-server to answer PING", answers, START_TIMEOUT, interval=0.05)
        except (Exited, HarnessError):
            return False
        return True

    def _log_tail(self) -> str:
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-20:])
        except OSError:
            return "(no log)"

    def _reap(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        """Stop at once (SIGKILL), like a crash. ``start()`` brings it back on the same port."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after 10 s)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def call(self, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        """One command on a fresh connection (AUTH first when a password is set).
        Returns the decoded reply; an error reply raises :class:`RedisError`."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            reader = _Reader(sock)
            if self.password is not None:
                sock.sendall(_encode(("AUTH", self.password)))
                r = reader.reply()
                if isinstance(r, RedisError):
                    raise r
            sock.sendall(_encode(args))
            r = reader.reply()
        if isinstance(r, RedisError):
            raise r
        return r


def start_redis(testcase: Any, password: str | None = None) -> RedisServer:
    """Start a redis-server for ``testcase`` (stopped in its cleanup); skip the test when
    redis-server is not installed."""
    exe = redis_server_path()
    if exe is None:
        raise SkipTest(SKIP_MESSAGE)
    server = RedisServer(exe, password=password)
    testcase.addCleanup(server.cleanup)
    server.start()
    return server


def redis_config(server: RedisServer, *lines: str) -> str:
    """A ``[redis]`` section for ``server``, plus ``lines``: quick reconnects, and a
    command deadline a loaded machine meets (a release answered after its deadline is
    retried and counted "already": the tests' exact counts would be off)."""
    return "\n".join([
        "[redis]", f'address = "127.0.0.1:{server.port}"', "timeout_ms = 10000",
        "reconnect_min_ms = 50", "reconnect_max_ms = 500", *lines, ""])


def start_cluster(testcase: Any, extra_config: str, **kwargs: Any) -> LoopbackCluster:
    """A converged 3-node, 1-slot LoopbackCluster with ``extra_config``; its nodes' logs are
    printed if it does not come up. Closed at the test's cleanup.

    It is patient (a node is dead after 1 s of silence, an ESL request after 10 s): these
    tests count calls and units across a failover, and a loaded machine that starves a
    node or its simulator for a while must not make a second, spurious one."""
    cluster = LoopbackCluster(nodes=3, slots=1, interval_ms=50, dead_after_ms=1000,
                              esl_timeout_ms=10_000, extra_config=extra_config, **kwargs)
    testcase.addCleanup(cluster.close)
    try:
        cluster.start()
        cluster.wait_converged(timeout=60)
    except HarnessError:
        dump_logs(cluster)
        raise
    return cluster


def dump_logs(cluster: LoopbackCluster) -> None:
    for node in cluster.nodes:
        print(f"--- {node.name}\n{cluster.logs(node.name, 60)}")
