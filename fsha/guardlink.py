"""fsha's side of its guard (:mod:`fsha.guard`): start it, renew its lease, hear its drops.

:class:`GuardLink` is a service of the node's tree. It starts the guard process (stdin and
stdout a pipe to fsha, stderr fsha's own, so the guard's log lines land where fsha's do, also
after fsha is gone) and sends it the settings (``HELLO``). At every heartbeat tick (a tick
listener of :class:`fsha.node.ClusterNode`) while the node claims, masters or releases a
slot, it renews the lease: ``HOLD slot lease deadline`` (``lease``: a number of its own, new
for every claim, since a claim that failed is tried again with the same epoch) with the
deadline ``lease`` ahead on
``CLOCK_MONOTONIC`` (shared by every process of the host), and at once when a claim begins;
``FREE`` once the node is a slave again. A ``DROPPED`` from the guard makes the node let the
slot go (:meth:`fsha.node.ClusterNode.resources_lost`).

A guard that dies is started again (after 0.1 s, doubling up to 5 s); one that died
:data:`MAX_DEATHS` times within :data:`DEATH_WINDOW` seconds is given up: :attr:`ok` turns
false, which makes the node unhealthy (it releases its slot and is no takeover candidate:
without the guard nothing would stop its FreeSWITCH serving a slot if fsha died).
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from fsha.latch import Latch
from fsha.localdrop import GuardSettings, report_problems
from fsha.reactors import ProcessReactor
from fsha.wire.guard import (
    Dropped,
    Free,
    GuardProtocolError,
    Hello,
    Hold,
    LineBuffer,
    Ready,
    Reconcile,
    Reconciled,
    decode,
    encode,
)
from fsha.wire.heartbeat import NO_SLOT, Role

MAX_DEATHS = 5
DEATH_WINDOW = 60.0
RESTART_MIN, RESTART_MAX = 0.1, 5.0
MAX_PENDING = 1 << 20  # bytes for the guard that its pipe would not take yet
STOP_WAIT = 5.0  # the longest fsha waits for its guard to leave at stop
HOLDING = (Role.CLAIMING, Role.MASTER, Role.RELEASING)

Spawner = Callable[[protocol.ProcessProtocol, Sequence[str]], Any]


guard_log = Logger(namespace="fsha.guard")  # the guard's own lines, relayed
_LEVELS = ("debug", "info", "warn", "error", "critical")


class _GuardProtocol(protocol.ProcessProtocol):
    def __init__(self, link: GuardLink) -> None:
        self.link = link
        self.lines = LineBuffer()
        self.err = b""
        self.ended = False
        self._ended_waiters: list[defer.Deferred[None]] = []

    def outReceived(self, data: bytes) -> None:
        try:
            for line in self.lines.feed(data):
                try:
                    self.link._received(self, decode(line))
                except GuardProtocolError as e:
                    self.link.log.error("guard said something unreadable ({error}): "
                                        "{line!r}", error=str(e), line=line[:200])
        except GuardProtocolError as e:
            self.link.log.error("guard output unreadable: {error}", error=str(e))

    def errReceived(self, data: bytes) -> None:
        """The guard's log lines (``LEVEL text``) when fsha logs to a file: logged here,
        in fsha's log (fsha.guard.FsharLogObserver)."""
        self.err += data
        *lines, self.err = self.err.split(b"\n")
        for raw in lines:
            level, _, text = raw.decode("utf-8", "replace").partition(" ")
            guard_log.emit(LogLevel.levelWithName(level) if level in _LEVELS
                           else LogLevel.info, "{text}", text=text)

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        waiters, self._ended_waiters = self._ended_waiters, []
        for d in waiters:
            d.callback(None)
        self.link._ended(self, reason)

    def wait_ended(self) -> defer.Deferred[None]:
        if self.ended:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._ended_waiters.append(d)
        return d


class _GuardStdin:
    """The spawned guard with its stdin written directly (see ``_spawn_process``)."""

    def __init__(self, process: Any, fd: int) -> None:
        self.process = process
        self.pid = process.pid
        self.fd: int | None = fd
        self.pending = b""

    def write(self, data: bytes) -> None:
        if self.fd is None:
            return
        # What a full pipe did not take goes first next time (a large HELLO; a guard that
        # reads nothing for long is stuck, and its death is noticed by processEnded).
        self.pending += data
        try:
            while self.pending:
                n = os.write(self.fd, self.pending[:65536])
                self.pending = self.pending[n:]
        except BlockingIOError:
            if len(self.pending) > MAX_PENDING:
                raise RuntimeError("the guard reads nothing: its pipe is full") from None

    def closeStdin(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class GuardedNode(Protocol):
    """What the guard link uses of :class:`fsha.node.ClusterNode`."""

    @property
    def role(self) -> Role: ...

    @property
    def slot(self) -> int: ...

    def add_tick_listener(self, callback: Callable[[], object]) -> None: ...

    def add_role_listener(self, callback: Callable[[Role, Role, Any], object]) -> None: ...

    def record_event(self, kind: str, **fields: Any) -> None: ...

    def resources_lost(self, slot: int, epoch: int, reason: str) -> bool: ...

    def health_changed(self, ok: bool) -> None: ...


class GuardLink(service.Service):
    """See the module docstring. ``node``: a :class:`fsha.node.ClusterNode`."""

    log = Logger()

    def __init__(self, settings: GuardSettings, node: GuardedNode, reactor: ProcessReactor, *,
                 spawn: Spawner | None = None, argv: Sequence[str] | None = None,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns,
                 given_up: Latch | None = None) -> None:
        """``given_up``: set when the guard is given up (its health, fsha.health, reads the
        same latch: FreeSWITCH is then unusable)."""
        self.settings = settings
        self.given_up = given_up if given_up is not None else Latch()
        self.node = node
        self.reactor = reactor
        self.argv = list(argv) if argv is not None else [sys.executable, "-m", "fsha.guard"]
        # the guard sends its log lines through its stderr to be logged here (to the
        # file fsha logs to: fsha.guard.FsharLogObserver)
        self.logs_piped = "--logfile" in self.argv
        self.spawn = spawn or self._spawn_process
        self.monotonic_ns = monotonic_ns
        self.lease_ns = int(settings.lease * 1e9)
        self.state = "stopped"  # starting, ready, restarting, failed, stopped
        self.pid: int | None = None
        self.restarts = 0
        self.deaths: deque[float] = deque(maxlen=MAX_DEATHS)
        self.renewals = 0
        self.last_drop: dict[str, Any] | None = None
        self.last_reconcile: dict[str, Any] | None = None
        self._proto: _GuardProtocol | None = None
        self._process: Any = None
        self._ready_waiters: list[defer.Deferred[None]] = []
        self._reconciles: dict[int, defer.Deferred[dict[str, Any]]] = {}
        self._request = 0
        self._restart_call: IDelayedCall | None = None
        self._stopping = False
        # (slot, epoch, lease number) of the claim under lease; a new number for every claim
        self._held: tuple[int, int, int] | None = None
        self._lease_numbers = 0
        self.setName("guard")
        node.add_tick_listener(self.tick)
        node.add_role_listener(self.role_changed)

    # -- the process ------------------------------------------------------------------------

    def _spawn_process(self, proto: protocol.ProcessProtocol, argv: Sequence[str]) -> Any:
        # The guard's stdin is a pipe of our own, written with os.write at once: a renewal
        # must not wait in a transport's buffer for the next reactor iteration (a busy one
        # would eat into the lease it carries).
        read, write = os.pipe()
        try:
            process = self.reactor.spawnProcess(proto, argv[0], list(argv),
                                                env=dict(os.environ),
                                                childFDs={0: read, 1: "r",
                                                          2: "r" if self.logs_piped else 2})
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
        os.set_blocking(write, False)
        return _GuardStdin(process, write)

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._start()

    def _start(self) -> None:
        self._restart_call = None
        self.state = "starting"
        proto = self._proto = _GuardProtocol(self)
        try:
            self._process = self.spawn(proto, self.argv)
        except Exception:
            self.log.failure("cannot start the guard")
            self._proto = None
            self._died()
            return
        self.pid = getattr(self._process, "pid", None)
        self._write(Hello(self.settings.as_json()))
        self.tick()  # a restarted guard takes over the lease at once

    def update_settings(self, settings: GuardSettings) -> None:
        """New slots' addresses and profiles (an online config change,
        :mod:`fsha.slotchange`): sent at once (the guard takes a second ``HELLO`` as its
        new settings and keeps its leases), and to every guard started later."""
        self.settings = settings
        self._write(Hello(settings.as_json()))

    def _write(self, message: Any) -> None:
        process = self._process
        if process is None or self._proto is None or self._proto.ended:
            return
        try:
            process.write(encode(message))
        except Exception:
            self.log.failure("writing to the guard failed")

    def _received(self, proto: _GuardProtocol, message: Any) -> None:
        if proto is not self._proto:
            return
        if isinstance(message, Ready):
            self.state, self.pid = "ready", message.pid
            self.log.info("guard ready (pid {pid}, lease {lease_ms:.0f} ms)", pid=message.pid,
                          lease_ms=self.settings.lease * 1000)
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                d.callback(None)
        elif isinstance(message, Dropped):
            self._dropped(message)
        elif isinstance(message, Reconciled):
            self.last_reconcile = message.report
            d = self._reconciles.pop(message.request, None)
            if d is not None:
                d.callback(message.report)
        else:
            self.log.error("guard sent an unexpected {kind}", kind=type(message).__name__)

    def _dropped(self, message: Dropped) -> None:
        report = message.report
        held = self._held
        if held is None or held[0] != message.slot or held[2] != message.lease:
            return  # about an earlier claim: this one is another lease
        slot_id, epoch, _ = held
        slot = self.settings.slot(slot_id).name
        reason = str(report.get("reason", "lease expired"))
        if not report.get("repeat"):
            self.last_drop = {"slot": slot, "epoch": epoch, "reason": reason,
                              "time": round(self.reactor.seconds(), 3),
                              "ips_removed": report.get("ips", {}).get("removed", []),
                              "profiles_stopped":
                                  report.get("profiles", {}).get("stopped", []),
                              "calls_hung_up":
                                  report.get("profiles", {}).get("calls", 0)
                                  + report.get("profiles", {}).get("calls_killed", 0),
                              "problems": report_problems(report)}
            self.node.record_event("guard-dropped", **self.last_drop)
            self.log.warn("the guard dropped slot {slot} (epoch {epoch}): {reason}",
                          slot=slot, epoch=epoch, reason=reason)
        self._held = None
        self.node.resources_lost(slot_id, epoch, f"the guard dropped the slot ({reason})")

    def _ended(self, proto: _GuardProtocol, reason: Failure) -> None:
        if proto is not self._proto:
            return
        if self._process is not None:
            try:
                self._process.closeStdin()
            except Exception:
                self.log.failure("closing the pipe to an exited guard failed")
        self._proto = self._process = None
        for d in list(self._reconciles.values()):
            d.errback(RuntimeError("the guard exited"))
        self._reconciles.clear()
        if self._stopping:
            self.state = "stopped"
            return
        code = reason.value.exitCode if isinstance(reason.value, error.ProcessTerminated) \
            else 0
        signal = getattr(reason.value, "signal", None)
        self.log.error("the guard (pid {pid}) exited (code {code}, signal {signal}): "
                       "starting it again", pid=self.pid, code=code, signal=signal)
        self.node.record_event("guard-exited", pid=self.pid, code=code, signal=signal)
        self._died()

    def _died(self) -> None:
        now = self.reactor.seconds()
        self.deaths.append(now)
        if len(self.deaths) == MAX_DEATHS and now - self.deaths[0] < DEATH_WINDOW:
            self.state = "failed"
            self.given_up.set()
            self.log.critical("the guard died {n} times within {s:.0f} s: given up; this node "
                              "is unhealthy (no slot, no takeover) until fsha restarts",
                              n=MAX_DEATHS, s=DEATH_WINDOW)
            self.node.record_event("guard-failed")
            self.node.health_changed(False)
            return
        self.state = "restarting"
        self.restarts += 1
        delay = min(RESTART_MAX, RESTART_MIN * 2 ** (len(self.deaths) - 1))
        self._restart_call = self.reactor.callLater(delay, self._start)

    @property
    def ok(self) -> bool:
        """False once the guard was given up (see the module docstring)."""
        return self.state != "failed"

    def when_ready(self) -> defer.Deferred[None]:
        if self.state == "ready":
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._ready_waiters.append(d)
        return d

    # -- the lease --------------------------------------------------------------------------

    def tick(self) -> None:
        """Renew the lease if the node holds a slot (each heartbeat tick, and at once)."""
        node = self.node
        if node.role not in HOLDING or node.slot == NO_SLOT:
            return
        held = self._held
        if held is None or held[:2] != (node.slot, node.epoch):
            self._lease_numbers += 1
            held = self._held = (node.slot, node.epoch, self._lease_numbers)
        if self._process is None:
            return
        self.renewals += 1
        self._write(Hold(node.slot, held[2], self.monotonic_ns() + self.lease_ns))

    def role_changed(self, old: Role, new: Role, slot: Any) -> None:
        if new is Role.CLAIMING:
            self._held = None  # a new claim, a new lease (even with the same epoch)
            self.tick()  # before any address goes up
        elif new is Role.SLAVE and slot is not None and old in HOLDING:
            self._held = None
            self._write(Free(slot.slot_id))

    # -- start-up reconciliation -----------------------------------------------------------

    def reconcile(self, timeout: float) -> defer.Deferred[dict[str, Any]]:
        """Ask the guard to make this host match a node holding nothing (no slot address,
        no slot profile, none of their calls); fires with its report."""
        self._request += 1
        request = self._request
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()

        def ask(_: object) -> defer.Deferred[dict[str, Any]]:
            self._reconciles[request] = d
            self._write(Reconcile(request))
            return d

        result = self.when_ready().addCallback(ask)
        result.addTimeout(timeout, self.reactor)

        def forget(outcome: object) -> object:
            self._reconciles.pop(request, None)
            return outcome
        return result.addBoth(forget)

    # -- stop -------------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        proto, process = self._proto, self._process
        if proto is None or process is None or proto.ended:
            self.state = "stopped"
            return defer.succeed(None)
        if self.node.role in HOLDING:
            self.log.warn("stopping with slot {slot} still held: the guard drops it",
                          slot=self.node.slot)
        try:
            process.closeStdin()  # end of file: the guard drops what is held, then leaves
        except Exception:
            self.log.failure("closing the guard's stdin failed")
        d = proto.wait_ended()
        d.addTimeout(STOP_WAIT, self.reactor)
        d.addErrback(lambda f: self.log.warn("the guard did not leave within {s:g} s",
                                             s=STOP_WAIT))
        return d

    # -- reporting --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        held = self._held
        return {"enabled": True, "state": self.state, "ok": self.ok, "pid": self.pid,
                "lease_ms": round(self.settings.lease * 1000, 3), "restarts": self.restarts,
                "renewals": self.renewals,
                "holding": None if held is None else {
                    "slot": self.settings.slot(held[0]).name, "epoch": held[1],
                    "lease": held[2]},
                "last_drop": self.last_drop, "last_reconcile": self.last_reconcile}
