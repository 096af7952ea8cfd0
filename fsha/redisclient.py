"""The node's Redis connection (txredisapi), made safe for a cluster manager.

txredisapi waits forever for a connection and for a reply; a cluster manager must not. So:

- every command has a deadline (``[redis] timeout_ms``): past it the command fails with
  :class:`RedisTimeout`; txredisapi's own reply timeout (the same value) aborts a connection
  whose server stopped answering, and the connection is made again;
- while the client is not connected a command fails at once with :class:`RedisUnavailable`
  (nothing queues behind a dead server; callers retry later);
- the connection is made again with exponential backoff (``reconnect_min_ms`` ..
  ``reconnect_max_ms``); a refused AUTH is retried at the longest backoff;
- TLS (``[redis] tls = true``) verifies the server's certificate against ``ca`` and its name
  against ``server_name`` (default: the host);
- the password comes from ``password_file`` (read by :func:`read_password`; it is never
  logged nor shown in the status).

:attr:`RedisClient.state` is ``up`` or ``down``; :meth:`RedisClient.status` gives the state,
since when, the last error and counters, for ``fsha status`` (``redis: down since ...``).

:meth:`RedisClient.release` runs :data:`RELEASE_SCRIPT`: decrement a counter once per
marker, whoever asks and however often (``SET marker NX EX ttl``, then ``DECR`` only if the
marker was new; a counter that does not exist is not created at -1, and one that would go
below 0 is set to 0 and reported). :meth:`RedisClient.retake` runs :data:`RETAKE_SCRIPT`, its
mirror after a hand-over: increment once per marker.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

import txredisapi
from twisted.application import service
from twisted.internet import defer, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha.reactors import NetReactor

__all__ = [
    "RELEASE_SCRIPT",
    "RETAKE_SCRIPT",
    "RedisClient",
    "RedisError",
    "RedisSettings",
    "RedisTimeout",
    "RedisUnavailable",
    "read_password",
]

log = Logger(namespace="fsha.redis")

#: KEYS[1] counter, KEYS[2] marker; ARGV[1] marker TTL (s), ARGV[2] marker value.
#: Returns {outcome, counter after}: released | already | missing | clamped.
RELEASE_SCRIPT: Final = """
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'EX', tonumber(ARGV[1])) then
  return {'already', redis.call('GET', KEYS[1]) or ''}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'missing', ''}
end
local v = redis.call('DECR', KEYS[1])
if v < 0 then
  redis.call('SET', KEYS[1], '0')
  return {'clamped', '0'}
end
return {'released', tostring(v)}
"""
RELEASE_SHA: Final = hashlib.sha1(RELEASE_SCRIPT.encode()).hexdigest()

#: KEYS[1] counter, KEYS[2] marker; ARGV[1] marker TTL (s), ARGV[2] marker value.
#: Returns {outcome, counter after}: retaken | already.
RETAKE_SCRIPT: Final = """
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'EX', tonumber(ARGV[1])) then
  return {'already', redis.call('GET', KEYS[1]) or ''}
end
return {'retaken', tostring(redis.call('INCR', KEYS[1]))}
"""
RETAKE_SHA: Final = hashlib.sha1(RETAKE_SCRIPT.encode()).hexdigest()


class RedisError(Exception):
    """A Redis command that failed (the server said no, or no answer)."""


class RedisUnavailable(RedisError):
    """Not connected to Redis: the command was not sent."""


class RedisTimeout(RedisError):
    """No answer within the command's deadline."""


@dataclass(frozen=True, slots=True)
class RedisSettings:
    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca: Path | None = None
    server_name: str | None = None
    timeout: float = 1.0
    connect_timeout: float = 2.0
    reconnect_min: float = 0.5
    reconnect_max: float = 10.0
    marker_ttl: int = 7 * 86400


def read_password(path: Path) -> str:
    """The first line of ``path``, stripped (raises OSError / ValueError)."""
    text = path.read_text(encoding="utf-8").strip().splitlines()
    if not text or not text[0].strip():
        raise ValueError(f"{path} is empty")
    return text[0].strip()


class _ReportingEndpoint:
    """An endpoint that tells the client why a connection attempt failed (txredisapi's
    reconnecting service keeps that to itself)."""

    def __init__(self, wrapped: Any, owner: RedisClient) -> None:
        self.wrapped = wrapped
        self.owner = owner

    def connect(self, factory: Any) -> Deferred[Any]:
        d = self.wrapped.connect(factory)

        def failed(f: Failure) -> Failure:
            if not f.check(defer.CancelledError):
                self.owner._set_down(f"cannot connect: {f.getErrorMessage()}")
            return f

        return d.addErrback(failed)


class _Protocol(txredisapi.RedisProtocol):  # type: ignore[misc]
    """Keeps why the connection was lost (a TLS verification error, a reset...)."""

    def connectionLost(self, why: Failure) -> None:
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.lost_reason = why.getErrorMessage()
        super().connectionLost(why)


class _Factory(txredisapi.RedisFactory):  # type: ignore[misc]
    """txredisapi's pool factory (one connection) that reports its connection's life."""

    protocol = _Protocol
    lost_reason: str | None = None

    def __init__(self, owner: RedisClient, settings: RedisSettings) -> None:
        super().__init__(None, settings.db or None, 1, isLazy=True,
                         password=settings.password, replyTimeout=settings.timeout,
                         convertNumbers=False, username=settings.username)
        self.owner = owner
        self.deferred.addErrback(lambda f: None)  # errors are reported to the owner
        self.initialDelay = settings.reconnect_min
        self.maxDelay = settings.reconnect_max

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn not in self.pool:
            return
        # Usable once the server answers (with TLS, the handshake is over by then: a
        # certificate that does not verify never counts as connected).
        d = conn.execute_command("PING")

        def answered(reply: Any) -> None:
            if isinstance(reply, Exception):
                raise reply
            if conn.connected and conn in self.pool:
                self.owner._connected(self)

        def failed(f: Failure) -> None:
            if self.owner._factory is self:
                reason = self.lost_reason or f.getErrorMessage()
                self.owner._set_down(f"no answer to PING: {reason}")

        d.addCallbacks(answered, failed).addErrback(failed)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        self.owner._disconnected(self, f"connection lost: {self.lost_reason}"
                                 if self.lost_reason else "connection lost")

    def connectionError(self, why: str) -> None:
        super().connectionError(why)
        self.owner._connection_error(self, why)


class RedisClient(service.Service):
    """One Redis connection with deadlines, reconnect, TLS and AUTH (module doc).

    ``clock`` is used for the deadlines and state times; the connection itself runs on
    ``reactor`` (txredisapi schedules its own timers on the global reactor, so the two
    are the same outside tests of this class's pure parts).
    """

    def __init__(self, settings: RedisSettings, reactor: NetReactor,
                 clock: IReactorTime | None = None) -> None:
        self.settings = settings
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.state = "down"
        self.since = self.clock.seconds()
        self.last_error: str | None = "not connected yet"
        self.connects = 0
        self.disconnects = 0
        self.commands = 0
        self.failures = 0
        self.timeouts = 0
        self._factory: _Factory | None = None
        self._running = False
        self._restart: Any = None
        self._up_listeners: list[Callable[[], object]] = []

    # -- life cycle -------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def add_up_listener(self, listener: Callable[[], object]) -> None:
        """Called every time the connection becomes usable (retry what waited)."""
        self._up_listeners.append(listener)

    def _endpoint(self) -> Any:
        s = self.settings
        endpoint = HostnameEndpoint(self.reactor, s.host, s.port, timeout=s.connect_timeout)
        if s.tls:
            assert s.ca is not None
            trust = ssl.Certificate.loadPEM(s.ca.read_bytes())
            options = ssl.optionsForClientTLS(s.server_name or s.host, trustRoot=trust)
            endpoint = wrapClientTLS(options, endpoint)
        return _ReportingEndpoint(endpoint, self)

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._connect()

    def _connect(self) -> None:
        self._restart = None
        if not self._running:
            return
        factory = _Factory(self, self.settings)
        self._factory = factory
        try:
            factory.startConnecting(self._endpoint())
        except Exception as e:  # e.g. an unreadable CA file
            self._connection_error(factory, f"cannot connect: {e}")

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.stop()

    def stop(self) -> Deferred[None]:
        self._running = False
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        factory, self._factory = self._factory, None
        self._set_down("stopped")
        if factory is None:
            return defer.succeed(None)
        d = factory.disconnect()
        d.addTimeout(self.settings.timeout + 1.0, self.clock)
        d.addErrback(lambda f: log.warn("closing the Redis connection: {error}",
                                        error=f.getErrorMessage()))
        return d.addCallback(lambda _: None)

    # -- connection events ------------------------------------------------------------------

    def _connected(self, factory: _Factory) -> None:
        if factory is not self._factory:
            return
        self.connects += 1
        was = self.state
        self.state, self.since, self.last_error = "up", self.clock.seconds(), None
        if was != "up":
            log.info("Redis {address}: connected", address=self.address)
        for listener in list(self._up_listeners):
            try:
                listener()
            except Exception:
                log.failure("Redis up listener failed")

    def _disconnected(self, factory: _Factory, why: str) -> None:
        if factory is not self._factory or factory.size:
            return
        self.disconnects += 1
        self._set_down(why)

    def _set_down(self, why: str) -> None:
        if self.state != "down":
            self.state, self.since = "down", self.clock.seconds()
            log.warn("Redis {address}: down ({why})", address=self.address, why=why)
        self.last_error = why

    def _connection_error(self, factory: _Factory, why: str) -> None:
        if factory is not self._factory:
            return
        # txredisapi gives up on a refused AUTH/SELECT: start again, at the longest backoff
        self._set_down(why.replace("Redis error: ", ""))
        if self._running and factory.stopped and self._restart is None:
            factory.disconnect().addErrback(lambda f: None)
            self._restart = self.clock.callLater(self.settings.reconnect_max, self._connect)

    # -- commands ---------------------------------------------------------------------------

    def execute(self, *args: Any, timeout: float | None = None) -> Deferred[Any]:
        """Send one command; fails with :class:`RedisUnavailable` at once when not
        connected, :class:`RedisTimeout` past the deadline, :class:`RedisError` if Redis
        answers an error."""
        factory = self._factory
        if self.state != "up" or factory is None or not factory.size:
            self.failures += 1
            return defer.fail(RedisUnavailable(
                f"Redis {self.address} is down" + (f": {self.last_error}"
                                                   if self.last_error else "")))
        self.commands += 1
        return self._bounded(factory.handler.execute_command(*args), timeout)

    def _bounded(self, inner: Deferred[Any], timeout: float | None) -> Deferred[Any]:
        timeout = self.settings.timeout if timeout is None else timeout
        outer: Deferred[Any] = Deferred(lambda _: inner.cancel())

        def expire() -> None:
            self.timeouts += 1
            if not outer.called:
                outer.errback(RedisTimeout(
                    f"Redis {self.address}: no answer within {timeout:g} s"))
            inner.cancel()

        timer = self.clock.callLater(timeout, expire)

        def done(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if outer.called:
                return
            if isinstance(result, Failure):
                self.failures += 1
                if result.check(txredisapi.TimeoutError):
                    outer.errback(RedisTimeout(result.getErrorMessage()))
                elif result.check(txredisapi.ConnectionError):
                    outer.errback(RedisUnavailable(result.getErrorMessage()))
                elif result.check(defer.CancelledError):
                    outer.errback(result)
                else:
                    outer.errback(RedisError(result.getErrorMessage()))
            elif isinstance(result, Exception):  # txredisapi returns some errors as values
                self.failures += 1
                outer.errback(RedisError(str(result)))
            else:
                outer.callback(result)

        inner.addBoth(done)
        return outer

    def get(self, key: str) -> Deferred[str | None]:
        return self.execute("GET", key).addCallback(_text)

    def release(self, counter: str, marker: str, value: str = "1") -> Deferred[tuple[str, str]]:
        """Run :data:`RELEASE_SCRIPT`; fires with (outcome, counter value after)."""
        return self._marked(RELEASE_SCRIPT, RELEASE_SHA, counter, marker, value)

    def retake(self, counter: str, marker: str, value: str = "1") -> Deferred[tuple[str, str]]:
        """Run :data:`RETAKE_SCRIPT`; fires with (outcome, counter value after)."""
        return self._marked(RETAKE_SCRIPT, RETAKE_SHA, counter, marker, value)

    def _marked(self, script: str, sha: str, counter: str, marker: str, value: str
                ) -> Deferred[tuple[str, str]]:
        args = (2, counter, marker, str(self.settings.marker_ttl), value)
        d = self.execute("EVALSHA", sha, *args)

        def noscript(f: Failure) -> Deferred[Any] | Failure:
            if f.check(RedisError) and "NOSCRIPT" in f.getErrorMessage():
                return self.execute("EVAL", script, *args)
            return f

        d.addErrback(noscript)

        def outcome(reply: Any) -> tuple[str, str]:
            if not isinstance(reply, list) or len(reply) != 2:
                raise RedisError(f"unexpected release reply {reply!r}")
            return _text(reply[0]) or "", _text(reply[1]) or ""

        return d.addCallback(outcome)

    # -- status -----------------------------------------------------------------------------

    def stats(self) -> RedisStats:
        s = self.settings
        return RedisStats(self.address, s.tls, s.db, self.state, self.since, self.last_error,
                          self.connects, self.disconnects, self.commands, self.failures,
                          self.timeouts)

    def status(self) -> dict[str, Any]:
        return self.stats().as_status()


@dataclass(frozen=True, slots=True)
class RedisStats:
    """The Redis connection's figures: its JSON status (:meth:`as_status`) and its
    metrics (``fsha.metrics``) are both made from this."""

    address: str
    tls: bool
    db: int
    state: str  # up, down
    since: float | None
    last_error: str | None
    connects: int
    disconnects: int
    commands: int
    failures: int
    timeouts: int

    def as_status(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
