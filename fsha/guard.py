"""The guard: a dead man's switch fsha runs beside itself.

A master's fsha can stop without its host noticing: ``kill -9`` (its FreeSWITCH runs on),
a ``SIGSTOP``, a reactor stuck for seconds. Its peers then take the slot over after
``dead_after``, while this host still holds the floating IPs and its FreeSWITCH still serves
the slot's profile and calls: two masters. The guard is a small separate process (``python
-m fsha.guard``, started by fsha with its stdin and stdout as a pipe, :mod:`fsha.guardlink`)
that does not share fsha's reactor. While fsha claims, masters or releases a slot it renews
a *lease* to the guard every heartbeat tick (``HOLD``, :mod:`fsha.wire.guard`). When the lease
runs out, or at once when the pipe closes (fsha died), the guard drops the slot itself
(:mod:`fsha.localdrop`): the floating IPs down first, then the slot's sofia profiles
stopped (which hangs up their calls; with the address gone, no BYE leaves from it), and
tells fsha (``DROPPED``), so a fsha that comes back releases the slot rather than believing
it still holds it.

The lease ends no later than the peers may declare this node dead: ``dead_after`` by
default; the successor's address comes up only after its claim, self-check and ``ip addr
add`` (docs/design.rst, "Leases and the guard").

:class:`GuardCore` is the decision logic, pure (explicit ``now``, monotonic seconds);
:func:`serve` is the process around it: ``select`` on stdin until the next deadline.
``SIGTERM``/``SIGINT`` are ignored: at a ``systemctl stop`` or a Ctrl-C the whole group gets
them, and the guard must outlive fsha's hand-over; it leaves when its stdin closes (after
dropping whatever is still held).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from twisted.logger import (
    Logger,
    formatEventAsClassicLogText,
    globalLogBeginner,
    textFileLogObserver,
)

from fsha.localdrop import GuardSettings, LocalEffects, report_problems
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

log = Logger(namespace="fsha.guard")

# A profile FreeSWITCH refused to stop (started < 10 s ago) is tried again this many times.
STOP_RETRIES = 3


def default_lease(heartbeat_interval: float, dead_after: float) -> float:
    """``dead_after`` itself (the detection floor, ``dead_after_min_ms``, when the detector
    adapts): the guard starts dropping when the peers may first declare this node dead,
    before any of them can have the address up (docs/design.rst)."""
    return dead_after


@dataclass(slots=True)
class Lease:
    number: int  # fsha's lease number: one per claim
    deadline: float  # monotonic seconds
    renewed: float  # when the last renewal arrived (monotonic seconds)
    graced: bool = False  # extended once already for a fsha that runs but is late


@dataclass(frozen=True, slots=True)
class Drop:
    """Give ``slot`` up now (``reason`` in words); ``retry``: only its profiles again."""

    slot: int
    lease: int
    reason: str
    retry: bool = False
    attempt: int = 0


class GuardCore:
    """Which slots to drop, and when. Pure: every call takes ``now`` (monotonic seconds)."""

    def __init__(self, max_lease: float, grace: float = 0.0) -> None:
        self.max_lease = max_lease
        # A fsha that is running (not stopped, not gone) but late gets this much more, once
        # (dead_after by default): a busy reactor is not a dead one (docs/design.rst).
        self.grace = grace
        self.leases: dict[int, Lease] = {}
        self.dropped: dict[int, int] = {}  # slot -> lease number the guard dropped
        self.retries: dict[int, tuple[float, int, int]] = {}  # slot -> (at, lease, attempt)
        self.closed = False  # fsha's end of the pipe is gone
        self.closed_at: float | None = None

    def hold(self, slot: int, lease: int, deadline: float, now: float) -> bool:
        """fsha renews (or takes, with a new number) the lease of ``slot``; False: that lease
        was already dropped here (fsha must be told again, and it is not taken back: the
        guard never brings a slot back; a new claim comes with a new lease number)."""
        if self.closed:
            return False
        if self.dropped.get(slot) == lease:
            return False
        self.dropped.pop(slot, None)
        self.retries.pop(slot, None)  # a new claim: its profiles are fsha's again
        self.leases[slot] = Lease(lease, min(deadline, now + self.max_lease), now)
        return True

    def free(self, slot: int) -> None:
        """fsha released ``slot`` itself."""
        self.leases.pop(slot, None)
        self.retries.pop(slot, None)

    def close(self, now: float) -> None:
        """fsha is gone: every lease ends now."""
        if not self.closed:
            self.closed, self.closed_at = True, now

    def due(self, now: float, fsha_running: bool = False) -> list[Drop]:
        """What to drop now. ``fsha_running``: fsha's process is running or sleeping (not
        stopped, not gone): a lease that just ran out is extended once by ``grace``."""
        drops = []
        for slot, lease in sorted(self.leases.items()):
            if not self.closed and lease.deadline <= now and fsha_running \
                    and not lease.graced and self.grace > 0:
                lease.graced = True
                lease.deadline += self.grace
            if self.closed or lease.deadline <= now:
                del self.leases[slot]
                self.dropped[slot] = lease.number
                reason = ("fsha is gone (its end of the pipe closed)" if self.closed
                          else f"lease expired {(now - lease.deadline) * 1000:.0f} ms ago, "
                               f"last renewal {(now - lease.renewed) * 1000:.0f} ms ago "
                               "(fsha paused, hung or dead)")
                drops.append(Drop(slot, lease.number, reason))
        for slot, (at, number, attempt) in sorted(self.retries.items()):
            if at <= now:
                del self.retries[slot]
                drops.append(Drop(slot, number, "profile stop retried", True, attempt))
        return drops

    def retry_later(self, drop: Drop, wait: float, now: float) -> bool:
        """The profiles of ``drop`` could not be stopped yet: try again in ``wait`` s."""
        attempt = drop.attempt + 1
        if attempt > STOP_RETRIES or drop.slot in self.leases:
            return False
        self.retries[drop.slot] = (now + wait, drop.lease, attempt)
        return True

    def next_wakeup(self) -> float | None:
        times = [lease.deadline for lease in self.leases.values()]
        times += [at for at, _, _ in self.retries.values()]
        return min(times) if times else None

    @property
    def finished(self) -> bool:
        """Nothing left to do and nobody to serve: the process may exit."""
        return self.closed and not self.leases and not self.retries

    def status(self, now: float) -> dict[str, Any]:
        return {"leases": {str(s): {"lease": lease.number,
                                    "remaining_ms": round((lease.deadline - now) * 1000, 1)}
                           for s, lease in self.leases.items()},
                "dropped": {str(s): e for s, e in self.dropped.items()}}


def _monotonic_ns_to_s(ns: int) -> float:
    return ns / 1e9


class GuardProcess:
    """The guard's loop around :class:`GuardCore` (stdin in, stdout out)."""

    def __init__(self, read_fd: int, out: BinaryIO,
                 effects_for: Callable[[GuardSettings], LocalEffects] = LocalEffects,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.read_fd = read_fd
        self.out = out
        self.effects_for = effects_for
        self.clock = clock
        self.sleep = sleep
        self.core: GuardCore | None = None
        self.settings: GuardSettings | None = None
        self.effects: LocalEffects | None = None
        self.lines = LineBuffer()
        self.out_broken = False
        self.fsha_pid = os.getppid()  # fsha started us

    def send(self, message: Any) -> None:
        if self.out_broken:
            return
        try:
            self.out.write(encode(message))
            self.out.flush()
        except OSError:  # fsha is gone: what matters now is the drop, not telling it
            self.out_broken = True

    def run(self) -> int:
        while True:
            now = self.clock()
            core = self.core
            if core is not None:
                for drop in core.due(now, self.fsha_running(core, now)):
                    try:
                        self.act(drop)
                    except Exception:  # a bug: keep guarding the other slots
                        log.failure("guard: dropping slot {slot} failed", slot=drop.slot)
                if core.finished:
                    return 0
                wakeup = core.next_wakeup()
            else:
                wakeup = None
            if core is not None and core.closed:
                if wakeup is not None:  # only delayed profile stops are left
                    self.sleep(max(0.0, wakeup - self.clock()))
                continue
            timeout = None if wakeup is None else max(0.0, wakeup - self.clock())
            ready, _, _ = select.select([self.read_fd], [], [], timeout)
            if not ready:
                continue
            try:
                data = os.read(self.read_fd, 65536)
            except OSError as e:
                log.error("guard: reading from fsha failed ({error}): taken as fsha gone",
                          error=str(e))
                data = b""
            if not data:
                if self.core is None:
                    return 0  # fsha went away before it said anything: nothing held
                log.info("guard of {node}: fsha's pipe closed", node=self._node())
                self.core.close(self.clock())
                continue
            try:
                for line in self.lines.feed(data):
                    self.handle(line)
            except GuardProtocolError as e:
                log.error("guard: bad message from fsha: {error}", error=str(e))
            except ValueError as e:
                log.error("guard: {error}; exiting", error=str(e))
                return 2

    def fsha_running(self, core: GuardCore, now: float) -> bool:
        """Only asked when a lease has run out: is fsha (our parent) running or sleeping,
        rather than stopped (SIGSTOP) or gone?"""
        if core.closed or not any(lease.deadline <= now and not lease.graced
                                  for lease in core.leases.values()):
            return False
        return process_running(self.fsha_pid)

    def _node(self) -> str:
        return self.settings.node if self.settings is not None else "?"

    def handle(self, line: bytes) -> None:
        message = decode(line)
        now = self.clock()
        if isinstance(message, Hello):
            self.settings = GuardSettings.from_json(message.settings)
            self.effects = self.effects_for(self.settings)
            if self.core is None:
                self.core = GuardCore(self.settings.lease)
            self.core.max_lease = self.settings.lease
            self.core.grace = self.settings.grace
            log.info("guard of {node} ready (pid {pid}, lease {lease_ms:.0f} ms, "
                     "{slots} slot(s), backend {backend})", node=self.settings.node,
                     pid=os.getpid(), lease_ms=self.settings.lease * 1000,
                     slots=len(self.settings.slots), backend=self.settings.backend)
            self.send(Ready(os.getpid()))
            return
        if self.core is None or self.settings is None:
            raise GuardProtocolError(f"{type(message).__name__} before HELLO")
        if isinstance(message, Hold):
            try:
                self.settings.slot(message.slot)
            except KeyError:
                raise GuardProtocolError(f"HOLD of unknown slot {message.slot}") from None
            taken = self.core.hold(message.slot, message.lease,
                                   _monotonic_ns_to_s(message.deadline_ns), now)
            if not taken and not self.core.closed:
                # fsha renewed a lease the guard already acted on (it was paused): tell again
                self.send(Dropped(message.slot, message.lease,
                                  {"reason": "already dropped by the guard", "repeat": True}))
        elif isinstance(message, Free):
            self.core.free(message.slot)
        elif isinstance(message, Reconcile):
            assert self.effects is not None
            report = self.effects.reconcile()
            problems = report_problems(report)
            log.info("guard of {node}: start-up reconciliation in {ms} ms: removed {ips}, "
                     "profiles {profiles}{problems}", node=self.settings.node, ms=report["ms"],
                     ips=report["ips"]["removed"] or "no address",
                     profiles=released(report["profiles"]),
                     problems=("; problems: " + "; ".join(problems)) if problems else "")
            self.send(Reconciled(message.request, report))
        else:
            raise GuardProtocolError(f"unexpected {type(message).__name__} from fsha")

    def act(self, drop: Drop) -> None:
        assert self.settings is not None and self.effects is not None and self.core is not None
        slot = self.settings.slot(drop.slot)
        if drop.retry:
            report: dict[str, Any] = {"slot": slot.name,
                                      "profiles": self.effects.stop_profiles(slot.profiles)}
        else:
            log.warn("guard of {node}: dropping slot {slot} (lease {lease}): {reason}",
                     node=self.settings.node, slot=slot.name, lease=drop.lease,
                     reason=drop.reason)
            report = self.effects.drop_slot(slot)
        report["reason"] = drop.reason
        profiles = report["profiles"]
        retry_in = profiles.get("retry_in")
        if retry_in is not None and self.core.retry_later(drop, retry_in, self.clock()):
            report["retry_in"] = retry_in
        problems = report_problems(report)
        log.warn("guard of {node}: slot {slot}: {what} in {ms} ms: addresses removed {ips}, "
                 "profiles {stopped} ({calls} call(s)), calls hung up one by one "
                 "{killed}{retry}{problems}",
                 node=self.settings.node, slot=slot.name,
                 what="profile stop retried" if drop.retry else "dropped",
                 ms=report.get("ms", profiles.get("ms")),
                 ips=report.get("ips", {}).get("removed", []) or "none",
                 stopped=released(profiles), calls=profiles["calls"],
                 killed=profiles["calls_killed"],
                 retry=(f"; profiles {','.join(profiles['too_young'])} too young to stop, "
                        f"retried in {retry_in:g} s") if retry_in is not None else "",
                 problems=("; problems: " + "; ".join(problems)) if problems else "")
        if not drop.retry:
            self.send(Dropped(drop.slot, drop.lease, report))


def released(profiles: dict[str, Any]) -> str:
    """What a drop did to the profiles, in words (classic: stopped; hot standby: their
    calls hung up, the profiles kept running)."""
    if profiles.get("hung_up"):
        return "kept running, calls hung up: " + ",".join(profiles["hung_up"])
    return "stopped: " + (",".join(profiles["stopped"]) or "none")


def process_running(pid: int) -> bool:
    """Linux: the process exists and is neither stopped nor traced nor a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state not in (b"T", b"t", b"Z", b"X", b"")


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda num, frame: log.info(
            "guard: signal {num} ignored: leaving when fsha's pipe closes", num=num))


class AppendingLogObserver:
    """Log lines appended to ``path``, the file opened for each line: fsha's own log
    (twistd ``--logfile``), which twistd may rotate (rename) under the guard; the guard
    logs a few lines per slot event, so reopening costs nothing that matters. ``json``:
    the lines as :func:`fsha.logs.render_json` writes them (``--logger=fsha.logs.json``)."""

    def __init__(self, path: str, json: bool = False) -> None:
        self.path = path
        self.json = json

    def __call__(self, event: dict[str, Any]) -> None:
        from fsha.logs import render_json

        if self.json:
            line = render_json(event)
        else:
            text = formatEventAsClassicLogText(event)
            if not text:
                return
            line = text
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError:
            sys.stderr.write(line)  # the file went away: at least not lost on purpose


def log_observer(argv: list[str]) -> Any:
    """``--logfile PATH`` [``--log-format json``]: fsha's log file; else standard error."""
    path = argv[argv.index("--logfile") + 1] if "--logfile" in argv[:-1] else None
    as_json = "--log-format" in argv[:-1] and argv[argv.index("--log-format") + 1] == "json"
    if path:
        return AppendingLogObserver(path, as_json)
    return textFileLogObserver(sys.stderr)


def serve(argv: list[str] | None = None) -> int:
    """``python -m fsha.guard [--logfile PATH [--log-format json]]``: the guard process
    (stdin/stdout: the pipe to fsha; its log lines to fsha's log file, else stderr)."""
    args = sys.argv[1:] if argv is None else argv
    globalLogBeginner.beginLoggingTo([log_observer(args)], redirectStandardIO=False)
    _ignore_stop_signals()
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    return GuardProcess(sys.stdin.fileno(), out).run()


if __name__ == "__main__":
    raise SystemExit(serve())
