"""Floating IPs: the effects layer the takeover sequence calls to own or release a slot's IPs.

Three backends share one small interface (:class:`FloatingIPBackend`):

``ip``
    On Linux, the kernel is asked directly (:class:`NetlinkIPBackend`): each address is one
    rtnetlink request (what ``ip addr add|del`` sends) and each gratuitous ARP one datagram
    on a packet socket (what ``arping -U`` sends), the first one at once and the others
    ``ARP_INTERVAL`` apart, all from fsha's own process: tens of microseconds where a
    subprocess costs milliseconds. It needs CAP_NET_ADMIN and CAP_NET_RAW, checked at
    start-up. Where no rtnetlink socket can be opened, the subprocess path below is used.

    The subprocess path (:class:`IPBackend`):
    ``ip addr add A/P dev IF`` (IPv6: ``ip -6 addr add A/P dev IF nodad``); an address
    already held is fine. For IPv4 a gratuitous ARP follows (iputils ``arping -U -c N -I IF
    A``, or Habets' ``arping -U -i IF -S A -c N A``, detected once). ``up`` resolves when
    every address is configured and arping has printed its header, which it does right
    before its first probe; the rest of arping's run (one probe a second) continues in the
    background with its own timeout and its outcome is logged. ``down`` stops a running
    arping for the address, then ``ip addr del`` (an address not held is fine).
    ``cleanup`` parses ``ip -o addr show`` and deletes every configured floating address
    found on any interface, whatever its prefix. IPv6 gets no unsolicited neighbour
    advertisement from fsha: set ``net.ipv6.conf.IF.ndisc_notify=1`` to have the kernel send
    one when the address is added.

``command``
    An operator's program (clouds, special set-ups), run once per address, one address after
    the other, never through a shell::

        ARGV... up      SLOT ADDRESS/PREFIX INTERFACE   exit 0: held and announced
        ARGV... down    SLOT ADDRESS/PREFIX INTERFACE   exit 0: released (or was not held)
        ARGV... cleanup -    ADDRESS/PREFIX INTERFACE   exit 0: was held here, now released
                                                        exit 3: was not held here
    Any other exit status, or running longer than the configured timeout, is a failure (the
    program is then killed). Its stderr is logged.

``loopback``
    The demo on 127.0.0.0/8, which Linux already routes to ``lo``: nothing to change. Every
    address must be in 127.0.0.0/8 or be ::1, else the call fails.

Every step has the configured timeout. A failed ``up`` may have acquired some of the
addresses: the caller rolls back with ``down`` on all of them (``down`` of an address not held
succeeds).

Host set-up for the ``ip`` backend: ``net.ipv4.conf.IF.promote_secondaries=1`` (else deleting a
VIP that happens to be the primary address of its subnet deletes the other addresses of that
subnet too; ``cleanup`` warns), and optionally ``net.ipv4.ip_nonlocal_bind=1`` so sofia
profiles can be started on a VIP before it is held.

Why about 800 lines: the netlink backend is the subprocess backend with its two commands
replaced (it falls back to them where the kernel socket cannot be opened, and shares their
error rules, the pending-ARP bookkeeping and ``cleanup``'s parser); splitting them apart
would split one contract over two files.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    inlineCallbacks,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha import kernelnet
from fsha.config import FloatingIP, FloatingIPConfig
from fsha.process import (
    ExecutableNotFound,
    ProcessError,
    ProcessFailed,
    ProcessResult,
    ProcessRunner,
    ProcessTimeout,
)
from fsha.reactors import ProcessReactor

log = Logger(namespace="fsha.floating")

ARP_INTERVAL = 1.0  # arping's default interval between probes (both implementations)
COMMAND_NOT_HELD = 3  # `command` backend: cleanup exit status for "was not held here"

IPUTILS = "iputils"
HABETS = "habets"

# iproute2 >= 5.x prints the kernel's extended ack; older releases print strerror()
_ALREADY_HELD = ("file exists", "already assigned")
_NOT_HELD = ("cannot assign requested address", "address not found")


# -- command builders, shared with the synchronous path of fsha.localdrop (the guard) -----


def ip_argv(ip_command: str, action: str, ip: FloatingIP) -> list[str]:
    """``ip addr add|del`` of one floating address (IPv6 without duplicate detection)."""
    if _version(ip.address) == 6:
        argv = [ip_command, "-6", "addr", action, _cidr(ip), "dev", ip.interface]
        return [*argv, "nodad"] if action == "add" else argv
    return [ip_command, "addr", action, _cidr(ip), "dev", ip.interface]


def ip_says(stderr: bytes, fine: tuple[str, ...]) -> bool:
    """Does ``ip``'s complaint mean the wanted state holds (already held / not held)?"""
    text = stderr.decode("utf-8", "replace").lower()
    return any(t in text for t in fine)


def not_held(stderr: bytes) -> bool:
    """``ip addr del`` failed because the address was not configured (fine for a release)."""
    return ip_says(stderr, _NOT_HELD)


def command_argv(command: Sequence[str], action: str, slot: str, ip: FloatingIP) -> list[str]:
    """The ``command`` backend's ``ARGV... ACTION SLOT ADDRESS/PREFIX INTERFACE``."""
    return [*command, action, slot, _cidr(ip), ip.interface]


class FloatingIPError(Exception):
    """Some addresses could not be changed; ``failures`` pairs each with the reason."""

    def __init__(self, action: str, failures: Sequence[tuple[FloatingIP, str]],
                 done: Sequence[FloatingIP] = ()) -> None:
        lines = "; ".join(f"{ip.address}/{ip.prefix} dev {ip.interface}: {why}"
                          for ip, why in failures)
        super().__init__(f"floating IP {action} failed: {lines}")
        self.action = action
        self.failures = list(failures)
        self.done = list(done)  # what did succeed (e.g. cleanup: what was removed)


class FloatingIPBackend(Protocol):
    name: str

    def up(self, slot: str, ips: Sequence[FloatingIP]) -> Deferred[None]:
        """Own these addresses now (idempotent)."""

    def down(self, slot: str, ips: Sequence[FloatingIP]) -> Deferred[None]:
        """Release these addresses (idempotent)."""

    def cleanup(self, ips: Sequence[FloatingIP]) -> Deferred[list[FloatingIP]]:
        """At start-up: remove any of these left configured here; returns what was removed."""


def make_backend(config: FloatingIPConfig, reactor: ProcessReactor,
                 runner: ProcessRunner | None = None,
                 net: KernelNet | None = None) -> FloatingIPBackend:
    """The backend ``config.backend`` names, running its commands through ``runner``; the
    ``ip`` backend speaks netlink through ``net`` (default: the kernel's, where there is
    one) and runs ``ip``/``arping`` where it cannot."""
    if config.backend == "loopback":
        return LoopbackBackend(reactor)
    if config.backend not in ("ip", "command"):
        raise ValueError(f"unknown floating IP backend {config.backend!r}")
    if runner is None:
        runner = ProcessRunner(reactor)
    if config.backend == "ip":
        if net is None:
            why = kernelnet.supported()
            if why is None:
                net = kernelnet.LinuxNet(config.timeout)
            else:
                log.warn("floating IPs: {why}: running ip and arping instead of netlink",
                         why=why)
        if net is not None:
            return NetlinkIPBackend(net, runner, reactor, timeout=config.timeout,
                                    arping_count=config.arping_count)
        return IPBackend(runner, reactor, timeout=config.timeout,
                         arping_count=config.arping_count)
    return CommandBackend(runner, reactor, command=config.command, timeout=config.timeout)


def _cidr(ip: FloatingIP) -> str:
    return f"{ip.address}/{ip.prefix}"


def _version(address: str) -> int:
    return ipaddress.ip_address(address).version


def _ms(clock: IReactorTime, start: float) -> float:
    return (clock.seconds() - start) * 1000


def _reason(failure: Failure) -> str:
    return str(failure.value) or failure.type.__name__


def _gather(ips: Sequence[FloatingIP], ds: Sequence[Deferred[Any]]
            ) -> Deferred[tuple[list[tuple[FloatingIP, Any]], list[tuple[FloatingIP, str]]]]:
    """Wait for all; split into (ip, result) successes and (ip, reason) failures."""
    def split(results: list[tuple[bool, Any]]
              ) -> tuple[list[tuple[FloatingIP, Any]], list[tuple[FloatingIP, str]]]:
        ok: list[tuple[FloatingIP, Any]] = []
        failed: list[tuple[FloatingIP, str]] = []
        for ip, (success, value) in zip(ips, results, strict=True):
            if success:
                ok.append((ip, value))
            else:
                failed.append((ip, _reason(value)))
        return ok, failed
    return DeferredList(list(ds), consumeErrors=True).addCallback(split)


# -- loopback ---------------------------------------------------------------------------


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip in _LOOPBACK4 if ip.version == 4 else ip == _LOOPBACK6


_LOOPBACK4 = ipaddress.ip_network("127.0.0.0/8")
_LOOPBACK6 = ipaddress.ip_address("::1")


class LoopbackBackend:
    """The demo backend: 127/8 is routed to ``lo`` already, so nothing changes."""

    name = "loopback"

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock

    def _check(self, action: str, ips: Sequence[FloatingIP]) -> FloatingIPError | None:
        bad = [(ip, "not a loopback address (backend \"loopback\" accepts only 127.0.0.0/8"
                    " and ::1; use backend \"ip\" or \"command\")")
               for ip in ips if not is_loopback(ip.address)]
        return FloatingIPError(action, bad) if bad else None

    def up(self, slot: str, ips: Sequence[FloatingIP]) -> Deferred[None]:
        return self._noop("up", slot, ips)

    def down(self, slot: str, ips: Sequence[FloatingIP]) -> Deferred[None]:
        return self._noop("down", slot, ips)

    def cleanup(self, ips: Sequence[FloatingIP]) -> Deferred[list[FloatingIP]]:
        problem = self._check("cleanup", ips)
        if problem is not None:
            log.error("{error}", error=problem)
            return _fail(problem)
        log.info("floating IP cleanup (loopback): nothing to remove for {count} address(es)",
                 count=len(ips))
        return succeed([])

    def _noop(self, action: str, slot: str, ips: Sequence[FloatingIP]) -> Deferred[None]:
        problem = self._check(action, ips)
        if problem is not None:
            log.error("slot {slot}: {error}", slot=slot, error=problem)
            return _fail(problem)
        log.info("slot {slot}: floating IPs {action} (loopback, no change needed): {ips}",
                 slot=slot, action=action, ips=", ".join(_cidr(ip) for ip in ips))
        return succeed(None)


def _fail(e: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(e)
    return d


# -- ip -o addr show --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeldAddress:
    """One address line of ``ip -o addr show``."""

    interface: str
    address: str
    prefix: int
    version: int  # 4 or 6
    label: str = ""

    def floating(self) -> FloatingIP:
        return FloatingIP(self.address, self.prefix, self.interface)


def parse_ip_addr(text: str) -> list[HeldAddress]:
    """Parse ``ip -o addr show`` output; lines that are not address lines are skipped.

    Never raises on odd input (a line it does not understand is ignored).
    """
    held: list[HeldAddress] = []
    for line in text.splitlines():
        # -o joins a record's lines with "\"; everything after the first one is lifetimes
        tokens = line.split("\\", 1)[0].split()
        if len(tokens) < 4 or not tokens[0].endswith(":") or tokens[2] not in ("inet", "inet6"):
            continue
        interface = tokens[1]
        version = 4 if tokens[2] == "inet" else 6
        local = tokens[3]
        rest = tokens[4:]
        if "/" not in local and len(rest) >= 2 and rest[0] == "peer":
            # point-to-point: "inet 10.0.0.1 peer 10.0.0.2/32"; the prefix belongs to the peer
            prefix_text = rest[1].partition("/")[2] or ("32" if version == 4 else "128")
            address = local
        else:
            address, _, prefix_text = local.partition("/")
            prefix_text = prefix_text or ("32" if version == 4 else "128")
        try:
            ip = ipaddress.ip_address(address)
            prefix = int(prefix_text)
        except ValueError:
            continue
        if ip.version != version or not 0 <= prefix <= (32 if version == 4 else 128):
            continue
        label = ""
        if version == 4 and rest and rest[-1] != interface and rest[-1].startswith(interface):
            label = rest[-1]
        held.append(HeldAddress(interface, str(ip), prefix, version, label))
    return held


# -- ip ---------------------------------------------------------------------------------


class IPBackend:
    """Floating IPs with iproute2 and arping; see the module docstring."""

    name = "ip"

    def __init__(self, runner: ProcessRunner, clock: IReactorTime, *, timeout: float,
                 arping_count: int, ip: str = "ip", arping: str = "arping",
                 wrap: Sequence[str] = (), env: Mapping[str, str] | None = None) -> None:
        """``wrap`` prefixes every command (e.g. ``("ip", "netns", "exec", NS)``)."""
        self.runner = runner
        self.clock = clock
        self.timeout = timeout
        self.arping_count = arping_count
        self.ip = ip
        self.arping = arping
        self.wrap = tuple(wrap)
        # C locale: the error texts matched below are the untranslated ones
        self.env = dict(env) if env is not None else {**os.environ, "LC_ALL": "C"}
        self.arping_flavour: str | None = None  # IPUTILS, HABETS, or "" (none installed)
        self._detecting: list[Deferred[str]] | None = None
        self._arping_runs: dict[str, Deferred[ProcessResult]] = {}
        self.garp_failures = 0  # arping runs that failed or could not start (for status)

    # -- helpers --------------------------------------------------------------------------

    def _run(self, argv: Sequence[str], timeout: float | None = None, **kw: Any
             ) -> Deferred[ProcessResult]:
        return self.runner.run([*self.wrap, *argv], self.timeout if timeout is None else timeout,
                               self.env, **kw)

    def _ip_argv(self, action: str, ip: FloatingIP) -> list[str]:
        return ip_argv(self.ip, action, ip)

    def arping_argv(self, ip: FloatingIP, flavour: str) -> list[str]:
        count = str(self.arping_count)
        if flavour == HABETS:
            return [self.arping, "-U", "-i", ip.interface, "-S", ip.address, "-c", count,
                    ip.address]
        return [self.arping, "-U", "-c", count, "-I", ip.interface, ip.address]

    # -- arping flavour -------------------------------------------------------------------

    def detect_arping(self) -> Deferred[str]:
        """Which arping is installed: IPUTILS, HABETS, or "" if none. Asked once."""
        if self.arping_flavour is not None:
            return succeed(self.arping_flavour)
        d: Deferred[str] = Deferred()
        if self._detecting is not None:
            self._detecting.append(d)
            return d
        self._detecting = [d]
        self._detect().addCallback(self._detected)
        return d

    @inlineCallbacks
    def _detect(self) -> Any:
        output = b""
        for probe in ("-V", "--help"):
            try:
                result = yield self._run([self.arping, probe], ok_codes=range(256))
                output = result.stdout + result.stderr
            except ExecutableNotFound as e:
                log.error("cannot run {arping} ({error}): gratuitous ARP impossible; is "
                          "iputils-arping installed and may fsha run it?",
                          arping=self.arping, error=e.reason)
                return ""
            except ProcessError as e:
                output = (e.result.stdout + e.result.stderr) if getattr(e, "result", None) \
                    else b""
            if b"iputils" in output:
                return IPUTILS
            if b"Habets" in output:
                return HABETS
        log.warn("cannot tell which arping {arping} is ({output!r}); assuming iputils syntax",
                 arping=self.arping, output=output[:200])
        return IPUTILS

    def _detected(self, flavour: str) -> None:
        self.arping_flavour = flavour
        waiters, self._detecting = self._detecting or [], None
        if flavour:
            log.info("arping flavour: {flavour}", flavour=flavour)
        for d in waiters:
            d.callback(flavour)

    # -- up ---------------------------------------------------------------------------------

    def up(self, slot: str, ips: Sequence[FloatingIP]) -> Deferred[None]:
        start = self.clock.seconds()
        ds = [self._up_one(slot, ip) for ip in ips]

        def done(outcome: tuple[list[Any], list[tuple[FloatingIP, str]]]) -> None:
            ok, failed = outcome
            if failed:
                error = FloatingIPError("up", failed, [ip for ip, _ in ok])
                log.error("slot {slot}: {error} (after {ms:.1f} ms)", slot=slot, error=error,
                          ms=_ms(self.clock, start))
                raise error
            log.info("slot {slot}: floating IPs up in {ms:.1f} ms: {ips}", slot=slot,
                     ms=_ms(self.clock, start), ips=", ".join(_cidr(ip) for ip in ips))

        return _gather(ips, ds).addCallback(done)

    def _up_one(self, slot: str, ip: FloatingIP) -> Deferred[None]:
        start = self.clock.seconds()
        d = self._run(self._ip_argv("add", ip))

        def added(result: ProcessResult | None) -> Deferred[None] | None:
            log.info("slot {slot}: {ip} {how} in {ms:.1f} ms", slot=slot, ip=str(ip),
                     how="added" if result is not None else "already held",
                     ms=_ms(self.clock, start))
            if _version(ip.address) == 6:
                log.debug("slot {slot}: {ip}: IPv6, no gratuitous ARP (the kernel sends an "
                          "unsolicited NA if ndisc_notify=1)", slot=slot, ip=str(ip))
                return None
            if self.arping_count <= 0:
                return None
            return self._garp(slot, ip)

        return d.addErrback(self._tolerate, ip, "add", _ALREADY_HELD).addCallback(added)

    def _tolerate(self, failure: Failure, ip: FloatingIP, action: str,
                  fine: tuple[str, ...]) -> None:
        """Turn an expected ``ip`` complaint (already held / not held) into success."""
        failure.trap(ProcessFailed)
        if ip_says(failure.value.stderr, fine):
            return None
        raise failure.value

    def _garp(self, slot: str, ip: FloatingIP) -> Deferred[None]:
        """Start arping; fire once its first probe is out (or it ended, or timeout)."""
        first: Deferred[None] = Deferred()
        start = self.clock.seconds()

        def signal(why: str) -> None:
            if not first.called:
                if timer.active():
                    timer.cancel()
                log.debug("slot {slot}: {ip}: first gratuitous ARP {why} after {ms:.1f} ms",
                          slot=slot, ip=str(ip), why=why, ms=_ms(self.clock, start))
                first.callback(None)

        timer = self.clock.callLater(self.timeout, signal, "not confirmed (timeout)")

        def with_flavour(flavour: str) -> None:
            if not flavour:
                self.garp_failures += 1
                log.error("slot {slot}: {ip}: no arping installed, no gratuitous ARP sent: "
                          "clients may keep the old MAC for tens of seconds",
                          slot=slot, ip=str(ip))
                signal("impossible")
                return
            previous = self._arping_runs.pop(ip.address, None)
            if previous is not None:
                previous.cancel()

            def output(fd: int, data: bytes) -> None:
                if b"ARPING" in data:
                    signal("sent")

            # a pty makes arping line-buffer its header, printed just before the first probe;
            # exit 1 is "no reply", expected for unsolicited ARP by some versions
            run = self._run(self.arping_argv(ip, flavour),
                            timeout=self.timeout + self.arping_count * ARP_INTERVAL,
                            on_output=output, use_pty=True, ok_codes=(0, 1))
            self._arping_runs[ip.address] = run
            run.addBoth(self._arping_ended, slot, ip, run, start)
            run.addBoth(lambda _: signal("ended"))

        def start_failed(failure: Failure) -> None:
            self.garp_failures += 1
            log.failure("slot {slot}: {ip}: starting arping failed", failure, slot=slot,
                        ip=str(ip))
            signal("failed to start")

        self.detect_arping().addCallback(with_flavour).addErrback(start_failed)
        return first

    def _arping_ended(self, outcome: ProcessResult | Failure, slot: str, ip: FloatingIP,
                      run: Deferred[ProcessResult], start: float) -> None:
        if self._arping_runs.get(ip.address) is run:
            del self._arping_runs[ip.address]
        ms = _ms(self.clock, start)
        if isinstance(outcome, ProcessResult):
            log.info("slot {slot}: {ip}: {count} gratuitous ARP(s) sent in {ms:.0f} ms "
                     "(arping exit {code})", slot=slot, ip=str(ip), count=self.arping_count,
                     ms=ms, code=outcome.exit_code)
        elif outcome.check(CancelledError):
            log.info("slot {slot}: {ip}: gratuitous ARP stopped after {ms:.0f} ms "
                     "(address released)", slot=slot, ip=str(ip), ms=ms)
        else:
            self.garp_failures += 1
            log.error("slot {slot}: {ip}: gratuitous ARP failed after {ms:.0f} ms: {error}",
                      slot=slot, ip=str(ip), ms=ms, error=_reason(outcome))

    # -- down -------------------------------------------------------------------------------

    def down(self, slot: str, ips: Sequence[FloatingIP]) -> Deferred[None]:
        start = self.clock.seconds()
        ds = [self._down_one(ip) for ip in ips]

        def done(outcome: tuple[list[Any], list[tuple[FloatingIP, str]]]) -> None:
            ok, failed = outcome
            held = [ip for ip, was_held in ok if was_held]
            if failed:
                error = FloatingIPError("down", failed, [ip for ip, _ in ok])
                log.error("slot {slot}: {error} (after {ms:.1f} ms)", slot=slot, error=error,
                          ms=_ms(self.clock, start))
                raise error
            log.info("slot {slot}: floating IPs down in {ms:.1f} ms: {ips} "
                     "({held} were held)", slot=slot, ms=_ms(self.clock, start),
                     ips=", ".join(_cidr(ip) for ip in ips), held=len(held))

        return _gather(ips, ds).addCallback(done)

    def _down_one(self, ip: FloatingIP) -> Deferred[bool]:
        """Release one address; fires True if it was held, False if it was not."""
        run = self._arping_runs.pop(ip.address, None)
        if run is not None:
            run.cancel()  # never announce an address we are giving away
        d = self._run(self._ip_argv("del", ip))
        d.addCallback(lambda _: True)
        return d.addErrback(lambda f: self._tolerate(f, ip, "del", _NOT_HELD) or False)

    # -- cleanup ----------------------------------------------------------------------------

    def cleanup(self, ips: Sequence[FloatingIP]) -> Deferred[list[FloatingIP]]:
        start = self.clock.seconds()
        # learn the arping flavour now, so a takeover never waits for it
        if self.arping_count > 0 and any(_version(ip.address) == 4 for ip in ips):
            self.detect_arping().addErrback(
                lambda f: log.failure("arping detection failed", f))
        wanted = {ipaddress.ip_address(ip.address) for ip in ips}

        def listed(result: ProcessResult) -> Deferred[list[FloatingIP]]:
            found = [h.floating() for h in parse_ip_addr(result.stdout.decode("utf-8", "replace"))
                     if ipaddress.ip_address(h.address) in wanted]
            if not found:
                log.info("floating IP cleanup: none of {count} address(es) held here "
                         "({ms:.1f} ms)", count=len(ips), ms=_ms(self.clock, start))
                return succeed([])
            for ip in found:
                log.warn("floating IP cleanup: {ip} left over from a previous run: removing",
                         ip=str(ip))
            return _gather(found, [self._down_one(ip) for ip in found]).addCallback(
                removed, found)

        def removed(outcome: tuple[list[tuple[FloatingIP, Any]], list[tuple[FloatingIP, str]]],
                    found: list[FloatingIP]) -> list[FloatingIP]:
            ok, failed = outcome
            gone = [ip for ip, _ in ok]
            if failed:
                error = FloatingIPError("cleanup", failed, gone)
                log.error("{error} ({ms:.1f} ms)", error=error, ms=_ms(self.clock, start))
                raise error
            log.info("floating IP cleanup: removed {ips} in {ms:.1f} ms",
                     ips=", ".join(_cidr(ip) for ip in gone), ms=_ms(self.clock, start))
            return gone

        def list_failed(failure: Failure) -> Failure:
            failure.trap(ProcessError)
            error = FloatingIPError("cleanup", [(ip, f"cannot list addresses: {failure.value}")
                                               for ip in ips])
            log.error("{error}", error=error)
            return Failure(error)

        self._check_promote_secondaries(ips)
        d = self._run([self.ip, "-o", "addr", "show"])
        return d.addCallbacks(listed, list_failed)

    def _check_promote_secondaries(self, ips: Sequence[FloatingIP]) -> None:
        """Warn (once per interface, at start-up) if deleting a VIP may take others along.

        When the kernel deletes the primary IPv4 address of a subnet it also deletes every
        secondary one in that subnet unless ``promote_secondaries`` is set.
        """
        for interface in sorted({ip.interface for ip in ips if _version(ip.address) == 4}):
            path = f"/proc/sys/net/ipv4/conf/{interface}/promote_secondaries"

            def read(result: ProcessResult, interface: str = interface) -> None:
                if result.stdout.strip() == b"0":
                    log.warn("net.ipv4.conf.{interface}.promote_secondaries is 0: releasing a "
                             "floating IP that is the primary address of its subnet removes "
                             "every other address of that subnet on {interface}; set it to 1",
                             interface=interface)

            self._run(["cat", path]).addCallbacks(
                read, lambda f, path=path: log.debug("cannot read {path}: {error}", path=path,
                                                     error=_reason(f)))


# -- ip, through netlink ----------------------------------------------------------------


class KernelNet(Protocol):
    """What :class:`NetlinkIPBackend` asks of the kernel (:class:`fsha.kernelnet.LinuxNet`;
    a fake in the unit tests). Every call is synchronous and raises ``OSError`` (with
    ``errno``) when the kernel refuses."""

    def change(self, action: str, address: str, prefix: int, interface: str) -> None: ...

    def addresses(self) -> list[tuple[str, str, int, int, str]]: ...

    def garp(self, address: str, interface: str) -> bool: ...


class NetlinkIPBackend(IPBackend):
    """The ``ip`` backend without processes: rtnetlink and a packet socket (module
    docstring). ``up`` resolves once every address is added and its first gratuitous ARP
    is out, which happens before ``up`` returns; the other announcements follow
    ``ARP_INTERVAL`` apart on the reactor and stop when the address is released."""

    def __init__(self, net: KernelNet, runner: ProcessRunner, clock: IReactorTime, *,
                 timeout: float, arping_count: int) -> None:
        super().__init__(runner, clock, timeout=timeout, arping_count=arping_count)
        self.net = net
        self._announcing: dict[str, Any] = {}  # address -> the next announcement's call

    def _change(self, action: str, ip: FloatingIP) -> bool:
        """Add or delete; False when that state already held (EEXIST / EADDRNOTAVAIL)."""
        try:
            self.net.change(action, ip.address, ip.prefix, ip.interface)
        except OSError as e:
            fine = errno.EEXIST if action == "add" else errno.EADDRNOTAVAIL
            if e.errno == fine:
                return False
            raise
        return True

    def _up_one(self, slot: str, ip: FloatingIP) -> Deferred[None]:
        start = self.clock.seconds()
        try:
            added = self._change("add", ip)
        except OSError as e:
            return _fail(e)
        log.info("slot {slot}: {ip} {how} in {ms:.2f} ms (netlink)", slot=slot, ip=str(ip),
                 how="added" if added else "already held", ms=_ms(self.clock, start))
        if _version(ip.address) == 4 and self.arping_count > 0:
            self._cancel_announcements(ip.address)
            self._announce(slot, ip, self.arping_count, start)
        return succeed(None)

    def _announce(self, slot: str, ip: FloatingIP, left: int, start: float) -> None:
        """Send one gratuitous ARP now and schedule the next while ``left`` > 1."""
        self._announcing.pop(ip.address, None)
        try:
            sent = self.net.garp(ip.address, ip.interface)
        except OSError as e:
            self.garp_failures += 1
            log.error("slot {slot}: {ip}: gratuitous ARP failed: {error}", slot=slot,
                      ip=str(ip), error=e)
            return
        if not sent:
            log.info("slot {slot}: {ip}: {interface} has no Ethernet address: no ARP",
                     slot=slot, ip=str(ip), interface=ip.interface)
            return
        number = self.arping_count - left + 1
        if number == 1:
            log.debug("slot {slot}: {ip}: first gratuitous ARP sent after {ms:.2f} ms",
                      slot=slot, ip=str(ip), ms=_ms(self.clock, start))
        if left > 1:
            self._announcing[ip.address] = self.clock.callLater(
                ARP_INTERVAL, self._announce, slot, ip, left - 1, start)
        else:
            log.info("slot {slot}: {ip}: {count} gratuitous ARP(s) sent in {ms:.0f} ms",
                     slot=slot, ip=str(ip), count=self.arping_count,
                     ms=_ms(self.clock, start))

    def _cancel_announcements(self, address: str) -> None:
        call = self._announcing.pop(address, None)
        if call is not None and call.active():
            call.cancel()

    def _down_one(self, ip: FloatingIP) -> Deferred[bool]:
        self._cancel_announcements(ip.address)  # never announce an address we give away
        try:
            return succeed(self._change("del", ip))
        except OSError as e:
            return _fail(e)

    def cleanup(self, ips: Sequence[FloatingIP]) -> Deferred[list[FloatingIP]]:
        start = self.clock.seconds()
        wanted = {ipaddress.ip_address(ip.address) for ip in ips}
        self._check_promote_secondaries(ips)
        try:
            held = self.net.addresses()
        except OSError as e:
            error = FloatingIPError("cleanup", [(ip, f"cannot list addresses: {e}")
                                               for ip in ips])
            log.error("{error}", error=error)
            return _fail(error)
        found = [FloatingIP(address, prefix, interface)
                 for interface, address, prefix, _, _ in held
                 if ipaddress.ip_address(address) in wanted]
        if not found:
            log.info("floating IP cleanup: none of {count} address(es) held here "
                     "({ms:.2f} ms, netlink)", count=len(ips), ms=_ms(self.clock, start))
            return succeed([])
        gone: list[FloatingIP] = []
        failed: list[tuple[FloatingIP, str]] = []
        for ip in found:
            log.warn("floating IP cleanup: {ip} left over from a previous run: removing",
                     ip=str(ip))
            try:
                self._change("del", ip)
                gone.append(ip)
            except OSError as e:
                failed.append((ip, str(e)))
        if failed:
            error = FloatingIPError("cleanup", failed, gone)
            log.error("{error} ({ms:.2f} ms)", error=error, ms=_ms(self.clock, start))
            return _fail(error)
        log.info("floating IP cleanup: removed {ips} in {ms:.2f} ms (netlink)",
                 ips=", ".join(_cidr(ip) for ip in gone), ms=_ms(self.clock, start))
        return succeed(gone)

    def _check_promote_secondaries(self, ips: Sequence[FloatingIP]) -> None:
        for interface in sorted({ip.interface for ip in ips if _version(ip.address) == 4}):
            path = f"/proc/sys/net/ipv4/conf/{interface}/promote_secondaries"
            try:
                with open(path, "rb") as f:
                    value = f.read().strip()
            except OSError as e:
                log.debug("cannot read {path}: {error}", path=path, error=e)
                continue
            if value == b"0":
                log.warn("net.ipv4.conf.{interface}.promote_secondaries is 0: releasing a "
                         "floating IP that is the primary address of its subnet removes "
                         "every other address of that subnet on {interface}; set it to 1",
                         interface=interface)


# -- command ----------------------------------------------------------------------------


class CommandBackend:
    """An operator's program per address; see the module docstring for the contract."""

    name = "command"

    def __init__(self, runner: ProcessRunner, clock: IReactorTime, *,
                 command: Sequence[str], timeout: float,
                 env: Mapping[str, str] | None = None) -> None:
        if not command:
            raise ValueError("backend \"command\" needs the argv of a program")
        self.runner = runner
        self.clock = clock
        self.command = tuple(command)
        self.timeout = timeout
        self.env = dict(env) if env is not None else None

    def argv(self, action: str, slot: str, ip: FloatingIP) -> list[str]:
        return command_argv(self.command, action, slot, ip)

    @inlineCallbacks
    def _each(self, action: str, slot: str, ips: Sequence[FloatingIP], stop_early: bool,
              ok_codes: tuple[int, ...] = (0,),
              keep: Callable[[ProcessResult], bool] = lambda r: True) -> Any:
        start = self.clock.seconds()
        done: list[FloatingIP] = []
        failed: list[tuple[FloatingIP, str]] = []
        for ip in ips:
            step = self.clock.seconds()
            try:
                result = yield self.runner.run(self.argv(action, slot, ip), self.timeout,
                                               self.env, ok_codes=ok_codes)
            except (ProcessFailed, ProcessTimeout, ExecutableNotFound) as e:
                failed.append((ip, str(e)))
                log.error("slot {slot}: {command} {action} {ip}: {error}", slot=slot,
                          command=self.command[0], action=action, ip=str(ip), error=e)
                if stop_early:
                    break
                continue
            if keep(result):
                done.append(ip)
            if result.stderr:
                log.info("slot {slot}: {command} {action} {ip}: stderr: {stderr}", slot=slot,
                         command=self.command[0], action=action, ip=str(ip),
                         stderr=result.stderr.decode("utf-8", "replace").strip()[:500])
            log.info("slot {slot}: {command} {action} {ip}: exit {code} in {ms:.1f} ms",
                     slot=slot, command=self.command[0], action=action, ip=str(ip),
                     code=result.exit_code, ms=_ms(self.clock, step))
        if failed:
            raise FloatingIPError(action, failed, done)
        log.info("slot {slot}: floating IPs {action} (command) in {ms:.1f} ms", slot=slot,
                 action=action, ms=_ms(self.clock, start))
        return done

    def up(self, slot: str, ips: Sequence[FloatingIP]) -> Deferred[None]:
        return self._each("up", slot, ips, stop_early=True).addCallback(lambda _: None)

    def down(self, slot: str, ips: Sequence[FloatingIP]) -> Deferred[None]:
        return self._each("down", slot, ips, stop_early=False).addCallback(lambda _: None)

    def cleanup(self, ips: Sequence[FloatingIP]) -> Deferred[list[FloatingIP]]:
        d: Deferred[list[FloatingIP]] = self._each(
            "cleanup", "-", ips, stop_early=False, ok_codes=(0, COMMAND_NOT_HELD),
            keep=lambda r: r.exit_code == 0)
        return d
