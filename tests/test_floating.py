"""Floating-IP backends: ip (fake runner, and real inside a network namespace), command,
loopback, and the ``ip -o addr show`` parser."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from fsha.config import FloatingIP, FloatingIPConfig
from fsha.floating import (
    COMMAND_NOT_HELD,
    HABETS,
    IPUTILS,
    CommandBackend,
    FloatingIPError,
    HeldAddress,
    IPBackend,
    LoopbackBackend,
    is_loopback,
    make_backend,
    parse_ip_addr,
)
from fsha.process import (
    ExecutableNotFound,
    ProcessFailed,
    ProcessResult,
    ProcessRunner,
    ProcessTimeout,
)

V4 = FloatingIP("198.18.0.10", 24, "eth0")
V4B = FloatingIP("198.18.1.10", 24, "eth1")
V6 = FloatingIP("2001:db8::10", 64, "eth0")


@dataclass
class Call:
    argv: tuple[str, ...]
    timeout: float
    env: Mapping[str, str] | None
    ok_codes: Collection[int]
    on_output: Callable[[int, bytes], None] | None
    use_pty: bool
    deferred: Deferred[ProcessResult] = field(default_factory=Deferred)
    cancelled: bool = False

    def result(self, code: int = 0, stdout: bytes = b"", stderr: bytes = b"") -> ProcessResult:
        return ProcessResult(self.argv, code, stdout, stderr, 0.001)

    def succeed(self, stdout: bytes = b"", code: int = 0) -> None:
        self.deferred.callback(self.result(code, stdout))

    def fail(self, code: int, stderr: bytes) -> None:
        self.deferred.errback(ProcessFailed(self.argv, code, stderr,
                                            self.result(code, stderr=stderr)))

    def output(self, data: bytes) -> None:
        assert self.on_output is not None
        self.on_output(1, data)


class FakeRunner:
    """Records every run(); each call's Deferred is completed by the test."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def run(self, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None,
            *, ok_codes: Collection[int] = (0,),
            on_output: Callable[[int, bytes], None] | None = None,
            use_pty: bool = False) -> Deferred[ProcessResult]:
        call = Call(tuple(argv), timeout, env, ok_codes, on_output, use_pty)

        def cancel(d: Deferred[ProcessResult]) -> None:
            call.cancelled = True

        call.deferred = Deferred(cancel)
        self.calls.append(call)
        return call.deferred

    def argvs(self) -> list[tuple[str, ...]]:
        return [c.argv for c in self.calls]

    def last(self, first: str) -> Call:
        return [c for c in self.calls if c.argv[0] == first][-1]

    def without(self, first: str) -> list[Call]:
        return [c for c in self.calls if c.argv[0] != first]


class LogCapture:
    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def of(self, namespace: str = "fsha.floating") -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == namespace]


def ip_backend(runner: FakeRunner, clock: Clock, count: int = 3,
               flavour: str | None = IPUTILS) -> IPBackend:
    backend = IPBackend(runner, clock, timeout=2.0, arping_count=count)  # type: ignore[arg-type]
    backend.arping_flavour = flavour
    return backend


# real `ip -o addr show` output captured on Linux 6.x / iproute2 6.1
SAMPLE = (
    "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
    "1: lo    inet6 ::1/128 scope host \\       valid_lft forever preferred_lft forever\n"
    "2: v1    inet 198.18.7.1 peer 198.18.7.2/32 scope global v1\\       valid_lft forever"
    " preferred_lft forever\n"
    "2: v1    inet6 fe80::dc68:6fff:fe62:a697/64 scope link \\       valid_lft forever"
    " preferred_lft forever\n"
    "3: v0    inet 198.18.5.1/24 scope global v0\\       valid_lft forever preferred_lft forever\n"
    "3: v0    inet 198.18.5.2/24 scope global secondary v0\\       valid_lft forever"
    " preferred_lft forever\n"
    "3: v0    inet 198.18.5.3/24 scope global secondary v0:x\\       valid_lft forever"
    " preferred_lft forever\n"
    "3: v0    inet6 2001:db8::1/64 scope global nodad \\       valid_lft forever"
    " preferred_lft forever\n"
    "3: v0    inet6 fe80::2419:c5ff:fe94:a599/64 scope link \\       valid_lft forever"
    " preferred_lft forever\n"
    "4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever"
    " preferred_lft forever\n"
    "4: eth0    inet6 fd00::2/64 scope global nodad \\       valid_lft forever"
    " preferred_lft forever\n"
)


class ParseTests(SynchronousTestCase):
    def test_sample(self) -> None:
        held = parse_ip_addr(SAMPLE)
        self.assertEqual(held, [
            HeldAddress("lo", "127.0.0.1", 8, 4),
            HeldAddress("lo", "::1", 128, 6),
            HeldAddress("v1", "198.18.7.1", 32, 4),
            HeldAddress("v1", "fe80::dc68:6fff:fe62:a697", 64, 6),
            HeldAddress("v0", "198.18.5.1", 24, 4),
            HeldAddress("v0", "198.18.5.2", 24, 4),
            HeldAddress("v0", "198.18.5.3", 24, 4, "v0:x"),
            HeldAddress("v0", "2001:db8::1", 64, 6),
            HeldAddress("v0", "fe80::2419:c5ff:fe94:a599", 64, 6),
            HeldAddress("eth0", "192.0.2.2", 24, 4),
            HeldAddress("eth0", "fd00::2", 64, 6),
        ])

    def test_garbage_lines_are_skipped(self) -> None:
        text = ("\n: x\n5: eth0 inet not-an-ip/24 scope global\n"
                "6: eth0 inet 10.0.0.1/99 scope\n7: eth0 inet6 10.0.0.1/24\n"
                "8: eth0 link/ether 00:11:22:33:44:55\n9: eth1 inet 10.1.1.1/16 scope global\n")
        self.assertEqual(parse_ip_addr(text), [HeldAddress("eth1", "10.1.1.1", 16, 4)])

    @settings(max_examples=200)
    @given(st.text())
    def test_never_raises(self, text: str) -> None:
        for held in parse_ip_addr(text):
            self.assertIn(held.version, (4, 6))

    @settings(max_examples=200)
    @given(st.lists(st.sampled_from(SAMPLE.splitlines()) | st.text(max_size=80)))
    def test_never_raises_on_mixed_lines(self, lines: list[str]) -> None:
        parse_ip_addr("\n".join(lines))


class IPBackendUpTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = FakeRunner()
        self.logs = LogCapture(self)

    def test_up_adds_then_resolves_on_first_arp(self) -> None:
        backend = ip_backend(self.runner, self.clock)
        d = backend.up("s1", [V4])
        self.assertEqual(self.runner.argvs(),
                         [("ip", "addr", "add", "198.18.0.10/24", "dev", "eth0")])
        add = self.runner.calls[0]
        self.assertEqual(add.timeout, 2.0)
        assert add.env is not None
        self.assertEqual(add.env["LC_ALL"], "C")
        self.assertNoResult(d)
        add.succeed()
        arping = self.runner.calls[1]
        self.assertEqual(arping.argv, ("arping", "-U", "-c", "3", "-I", "eth0", "198.18.0.10"))
        self.assertTrue(arping.use_pty)
        self.assertEqual(arping.timeout, 2.0 + 3 * 1.0)
        self.assertNoResult(d)  # the address is there, but no ARP went out yet
        arping.output(b"ARPING 198.18.0.10 from 198.18.0.10 eth0\r\n")
        self.assertIsNone(self.successResultOf(d))
        # arping keeps running in the background; its end is logged
        self.assertEqual(list(backend._arping_runs), ["198.18.0.10"])
        arping.succeed(b"Sent 3 probes (3 broadcast(s))\r\n")
        self.assertEqual(backend._arping_runs, {})
        self.assertEqual(backend.garp_failures, 0)
        texts = [e["log_format"] for e in self.logs.of()]
        self.assertTrue(any("gratuitous ARP(s) sent" in t for t in texts), texts)
        up_event = next(e for e in self.logs.of() if "floating IPs up" in e["log_format"])
        self.assertEqual(up_event["slot"], "s1")
        self.assertIsInstance(up_event["ms"], float)

    def test_already_held_is_fine(self) -> None:
        for stderr in (b"RTNETLINK answers: File exists\n",
                       b"Error: ipv4: Address already assigned.\n"):
            runner = FakeRunner()
            backend = ip_backend(runner, self.clock)
            d = backend.up("s1", [V4])
            runner.calls[0].fail(2, stderr)
            # still announced: the address may have been held without anyone knowing
            runner.last("arping").output(b"ARPING 198.18.0.10 from 198.18.0.10 eth0\r\n")
            self.assertIsNone(self.successResultOf(d))

    def test_add_failure_fails_up_without_arping(self) -> None:
        backend = ip_backend(self.runner, self.clock)
        d = backend.up("s1", [V4, V4B])
        self.runner.calls[0].fail(1, b'Cannot find device "eth0"\n')
        self.runner.calls[1].succeed()
        self.runner.last("arping").output(b"ARPING 198.18.1.10 from 198.18.1.10 eth1\r\n")
        failure = self.failureResultOf(d, FloatingIPError)
        error = failure.value
        self.assertEqual([ip for ip, _ in error.failures], [V4])
        self.assertIn("Cannot find device", error.failures[0][1])
        self.assertEqual(error.done, [V4B])
        self.assertEqual([c.argv[-1] for c in self.runner.calls if c.argv[0] == "arping"],
                         ["198.18.1.10"])

    def test_addresses_are_added_in_parallel(self) -> None:
        backend = ip_backend(self.runner, self.clock)
        backend.up("s1", [V4, V4B])
        self.assertEqual(self.runner.argvs(), [
            ("ip", "addr", "add", "198.18.0.10/24", "dev", "eth0"),
            ("ip", "addr", "add", "198.18.1.10/24", "dev", "eth1"),
        ])

    def test_ipv6_uses_nodad_and_no_arping(self) -> None:
        backend = ip_backend(self.runner, self.clock)
        d = backend.up("s1", [V6])
        self.assertEqual(self.runner.argvs(),
                         [("ip", "-6", "addr", "add", "2001:db8::10/64", "dev", "eth0", "nodad")])
        self.runner.calls[0].succeed()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.runner.calls), 1)

    def test_arping_count_zero_sends_nothing(self) -> None:
        backend = ip_backend(self.runner, self.clock, count=0)
        d = backend.up("s1", [V4])
        self.runner.calls[0].succeed()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.runner.calls), 1)

    def test_silent_arping_is_waited_for_at_most_the_timeout(self) -> None:
        backend = ip_backend(self.runner, self.clock)
        d = backend.up("s1", [V4])
        self.runner.calls[0].succeed()
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertIsNone(self.successResultOf(d))

    def test_failing_arping_is_logged_not_fatal(self) -> None:
        backend = ip_backend(self.runner, self.clock)
        d = backend.up("s1", [V4])
        self.runner.calls[0].succeed()
        self.runner.calls[1].fail(2, b"arping: socket: Operation not permitted\n")
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(backend.garp_failures, 1)
        errors = [e for e in self.logs.of() if "gratuitous ARP failed" in e["log_format"]]
        self.assertEqual(len(errors), 1)
        self.assertIn("Operation not permitted", errors[0]["error"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timed_out_arping_is_logged(self) -> None:
        backend = ip_backend(self.runner, self.clock)
        d = backend.up("s1", [V4])
        self.runner.calls[0].succeed()
        arping = self.runner.calls[1]
        arping.output(b"ARPING 198.18.0.10 from 198.18.0.10 eth0\r\n")
        self.successResultOf(d)
        arping.deferred.errback(ProcessTimeout(arping.argv, arping.timeout))
        self.assertEqual(backend.garp_failures, 1)

    def test_no_arping_installed(self) -> None:
        backend = ip_backend(self.runner, self.clock, flavour=None)
        d = backend.up("s1", [V4])
        self.runner.calls[0].succeed()
        probe = self.runner.calls[1]
        self.assertEqual(probe.argv, ("arping", "-V"))
        probe.deferred.errback(ExecutableNotFound(probe.argv, "not found in PATH (/usr/bin)"))
        self.assertIsNone(self.successResultOf(d))  # the address is held: not a failed up
        self.assertEqual(backend.garp_failures, 1)
        self.assertEqual(backend.arping_flavour, "")
        self.assertEqual(len(self.runner.calls), 2)
        texts = " ".join(e["log_format"] for e in self.logs.of())
        self.assertIn("no arping installed", texts)

    def test_second_up_replaces_running_arping(self) -> None:
        backend = ip_backend(self.runner, self.clock)
        backend.up("s1", [V4])
        self.runner.calls[0].succeed()
        first = self.runner.calls[1]
        backend.up("s1", [V4])
        self.runner.calls[2].fail(2, b"Error: ipv4: Address already assigned.\n")
        self.assertTrue(first.cancelled)
        self.assertEqual(backend._arping_runs["198.18.0.10"], self.runner.calls[3].deferred)


class ArpingDetectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = FakeRunner()

    def test_iputils(self) -> None:
        backend = ip_backend(self.runner, self.clock, flavour=None)
        d1 = backend.detect_arping()
        d2 = backend.detect_arping()  # asked while the first is running: one probe only
        self.assertEqual(len(self.runner.calls), 1)
        self.runner.calls[0].succeed(b"arping from iputils 20221126\n")
        self.assertEqual(self.successResultOf(d1), IPUTILS)
        self.assertEqual(self.successResultOf(d2), IPUTILS)
        self.assertEqual(self.successResultOf(backend.detect_arping()), IPUTILS)
        self.assertEqual(len(self.runner.calls), 1)

    def test_old_iputils(self) -> None:
        backend = ip_backend(self.runner, self.clock, flavour=None)
        d = backend.detect_arping()
        self.runner.calls[0].succeed(b"arping utility, iputils-s20180629\n")
        self.assertEqual(self.successResultOf(d), IPUTILS)

    def test_habets_syntax(self) -> None:
        backend = ip_backend(self.runner, self.clock, flavour=None)
        d = backend.detect_arping()
        # Habets' -V wants a VLAN argument: usage error, then --help names the author
        self.runner.calls[0].fail(1, b"arping: option requires an argument -- 'V'\n")
        self.assertEqual(self.runner.calls[1].argv, ("arping", "--help"))
        self.runner.calls[1].succeed(b"ARPing 2.23, by Thomas Habets <thomas@habets.se>\n")
        self.assertEqual(self.successResultOf(d), HABETS)
        self.assertEqual(backend.arping_argv(V4, HABETS),
                         ["arping", "-U", "-i", "eth0", "-S", "198.18.0.10", "-c", "3",
                          "198.18.0.10"])

    def test_unknown_assumes_iputils(self) -> None:
        backend = ip_backend(self.runner, self.clock, flavour=None)
        d = backend.detect_arping()
        self.runner.calls[0].succeed(b"something\n")
        self.runner.calls[1].succeed(b"else\n")
        self.assertEqual(self.successResultOf(d), IPUTILS)


class IPBackendDownTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = FakeRunner()
        self.logs = LogCapture(self)

    def test_down_deletes(self) -> None:
        backend = ip_backend(self.runner, self.clock)
        d = backend.down("s1", [V4, V6])
        self.assertEqual(self.runner.argvs(), [
            ("ip", "addr", "del", "198.18.0.10/24", "dev", "eth0"),
            ("ip", "-6", "addr", "del", "2001:db8::10/64", "dev", "eth0"),
        ])
        self.runner.calls[0].succeed()
        self.assertNoResult(d)
        self.runner.calls[1].succeed()
        self.assertIsNone(self.successResultOf(d))

    def test_not_held_is_fine(self) -> None:
        for stderr in (b"RTNETLINK answers: Cannot assign requested address\n",
                       b"Error: ipv4: Address not found.\n",
                       b"Error: ipv6: address not found.\n"):
            runner = FakeRunner()
            d = ip_backend(runner, self.clock).down("s1", [V4])
            runner.calls[0].fail(2, stderr)
            self.assertIsNone(self.successResultOf(d))

    def test_other_failure_is_reported(self) -> None:
        d = ip_backend(self.runner, self.clock).down("s1", [V4, V4B])
        self.runner.calls[0].succeed()
        self.runner.calls[1].deferred.errback(ProcessTimeout(self.runner.calls[1].argv, 2.0))
        error = self.failureResultOf(d, FloatingIPError).value
        self.assertEqual([ip for ip, _ in error.failures], [V4B])
        self.assertIn("still running after 2 s", error.failures[0][1])

    def test_down_stops_running_arping_first(self) -> None:
        backend = ip_backend(self.runner, self.clock)
        up = backend.up("s1", [V4])
        self.runner.calls[0].succeed()
        arping = self.runner.calls[1]
        arping.output(b"ARPING 198.18.0.10 from 198.18.0.10 eth0\r\n")
        self.successResultOf(up)
        d = backend.down("s1", [V4])
        self.assertTrue(arping.cancelled)
        self.assertTrue(any("gratuitous ARP stopped" in e["log_format"]
                            for e in self.logs.of()))
        self.assertEqual(self.runner.calls[2].argv,
                         ("ip", "addr", "del", "198.18.0.10/24", "dev", "eth0"))
        self.runner.calls[2].succeed()
        self.successResultOf(d)
        self.assertEqual(backend.garp_failures, 0)  # a stop is not a failure


class IPBackendCleanupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = FakeRunner()
        self.logs = LogCapture(self)

    def ip_calls(self) -> list[Call]:
        return self.runner.without("cat")  # the promote_secondaries check, tested below

    def test_removes_leftovers_where_they_are(self) -> None:
        backend = ip_backend(self.runner, self.clock)
        wanted = [FloatingIP("198.18.5.2", 24, "v0"),
                  FloatingIP("198.18.5.3", 32, "eth9"),  # held with another prefix and iface
                  FloatingIP("2001:DB8::0001", 64, "v0"),  # written differently
                  FloatingIP("198.18.99.1", 24, "v0")]  # not held
        d = backend.cleanup(wanted)
        calls = self.ip_calls()
        self.assertEqual([c.argv for c in calls], [("ip", "-o", "addr", "show")])
        calls[0].succeed(SAMPLE.encode())
        calls = self.ip_calls()
        self.assertEqual([c.argv for c in calls[1:]], [
            ("ip", "addr", "del", "198.18.5.2/24", "dev", "v0"),
            ("ip", "addr", "del", "198.18.5.3/24", "dev", "v0"),
            ("ip", "-6", "addr", "del", "2001:db8::1/64", "dev", "v0"),
        ])
        for call in calls[1:]:
            call.succeed()
        self.assertEqual(self.successResultOf(d), [
            FloatingIP("198.18.5.2", 24, "v0"), FloatingIP("198.18.5.3", 24, "v0"),
            FloatingIP("2001:db8::1", 64, "v0")])

    def test_nothing_left(self) -> None:
        d = ip_backend(self.runner, self.clock).cleanup([V4, V6])
        self.ip_calls()[0].succeed(SAMPLE.encode())
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(len(self.ip_calls()), 1)

    def test_listing_fails(self) -> None:
        d = ip_backend(self.runner, self.clock).cleanup([V4])
        self.ip_calls()[0].deferred.errback(
            ExecutableNotFound(("ip",), "not found in PATH (/usr/bin)"))
        error = self.failureResultOf(d, FloatingIPError).value
        self.assertIn("cannot list addresses", str(error))

    def test_delete_fails(self) -> None:
        d = ip_backend(self.runner, self.clock).cleanup(
            [FloatingIP("198.18.5.1", 24, "v0"), FloatingIP("198.18.5.2", 24, "v0")])
        self.ip_calls()[0].succeed(SAMPLE.encode())
        calls = self.ip_calls()
        calls[1].fail(2, b"RTNETLINK answers: Operation not permitted\n")
        calls[2].succeed()
        error = self.failureResultOf(d, FloatingIPError).value
        self.assertEqual(error.done, [FloatingIP("198.18.5.2", 24, "v0")])
        self.assertIn("Operation not permitted", error.failures[0][1])

    def test_cleanup_learns_arping_flavour(self) -> None:
        backend = ip_backend(self.runner, self.clock, flavour=None)
        backend.cleanup([V4])
        self.assertEqual([c.argv for c in self.ip_calls()],
                         [("arping", "-V"), ("ip", "-o", "addr", "show")])
        self.runner.calls[0].succeed(b"arping from iputils 20221126\n")
        self.assertEqual(backend.arping_flavour, IPUTILS)

    def test_promote_secondaries_warning(self) -> None:
        backend = ip_backend(self.runner, self.clock)
        backend.cleanup([V4, V4B, FloatingIP("198.18.0.11", 24, "eth0"), V6])
        cats = {c.argv[1]: c for c in self.runner.calls if c.argv[0] == "cat"}
        self.assertEqual(sorted(cats), ["/proc/sys/net/ipv4/conf/eth0/promote_secondaries",
                                        "/proc/sys/net/ipv4/conf/eth1/promote_secondaries"])
        cats["/proc/sys/net/ipv4/conf/eth0/promote_secondaries"].succeed(b"0\n")
        cats["/proc/sys/net/ipv4/conf/eth1/promote_secondaries"].succeed(b"1\n")
        warnings = [e for e in self.logs.of() if "promote_secondaries" in e["log_format"]]
        self.assertEqual([e["interface"] for e in warnings], ["eth0"])

    def test_wrap_prefixes_every_command(self) -> None:
        backend = IPBackend(self.runner, self.clock, timeout=1.0,  # type: ignore[arg-type]
                            arping_count=1, wrap=("ip", "netns", "exec", "ns1"))
        backend.down("s1", [V4])
        self.assertEqual(self.runner.argvs(), [
            ("ip", "netns", "exec", "ns1", "ip", "addr", "del", "198.18.0.10/24", "dev",
             "eth0")])


class CommandBackendTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = FakeRunner()
        self.backend = CommandBackend(self.runner, self.clock,  # type: ignore[arg-type]
                                      command=("/etc/fsha/vip", "--cloud"), timeout=7.0)

    def test_up_runs_one_address_after_the_other(self) -> None:
        d = self.backend.up("s1", [V4, V6])
        self.assertEqual(self.runner.argvs(), [
            ("/etc/fsha/vip", "--cloud", "up", "s1", "198.18.0.10/24", "eth0")])
        self.assertEqual(self.runner.calls[0].timeout, 7.0)
        self.runner.calls[0].succeed()
        self.assertEqual(self.runner.argvs()[1],
                         ("/etc/fsha/vip", "--cloud", "up", "s1", "2001:db8::10/64", "eth0"))
        self.assertNoResult(d)
        self.runner.calls[1].succeed()
        self.assertIsNone(self.successResultOf(d))

    def test_up_stops_at_first_failure(self) -> None:
        d = self.backend.up("s1", [V4, V6])
        self.runner.calls[0].fail(1, b"quota exceeded\n")
        error = self.failureResultOf(d, FloatingIPError).value
        self.assertEqual(len(self.runner.calls), 1)
        self.assertIn("quota exceeded", str(error))

    def test_down_tries_every_address(self) -> None:
        d = self.backend.down("s1", [V4, V6])
        self.runner.calls[0].deferred.errback(ProcessTimeout(self.runner.calls[0].argv, 7.0))
        self.runner.calls[1].succeed()
        self.assertEqual(self.runner.calls[1].argv[2:4], ("down", "s1"))
        error = self.failureResultOf(d, FloatingIPError).value
        self.assertEqual(error.done, [V6])
        self.assertEqual([ip for ip, _ in error.failures], [V4])

    def test_cleanup_contract(self) -> None:
        d = self.backend.cleanup([V4, V6])
        self.assertEqual(self.runner.calls[0].argv,
                         ("/etc/fsha/vip", "--cloud", "cleanup", "-", "198.18.0.10/24", "eth0"))
        self.assertEqual(tuple(self.runner.calls[0].ok_codes), (0, COMMAND_NOT_HELD))
        self.runner.calls[0].succeed(code=COMMAND_NOT_HELD)
        self.runner.calls[1].succeed(code=0)
        self.assertEqual(self.successResultOf(d), [V6])

    def test_needs_a_command(self) -> None:
        self.assertRaises(ValueError, CommandBackend, self.runner, self.clock, command=(),
                          timeout=1.0)


class CommandBackendRealTests(TestCase):
    """The command backend with the real runner and a real script."""

    timeout = 60

    @inlineCallbacks
    def test_real_script(self):  # type: ignore[no-untyped-def]
        tmp = tempfile.TemporaryDirectory(prefix="fsha-test-")
        self.addCleanup(tmp.cleanup)
        record = os.path.join(tmp.name, "record")
        script = os.path.join(tmp.name, "vip-script")
        with open(script, "w") as f:
            f.write('#!/bin/sh\n'
                    f'echo "$@" >> {record}\n'
                    '[ "$1" = cleanup ] && exit 3\n'
                    '[ "$4" = bad0 ] && { echo "no such NIC" >&2; exit 4; }\n'
                    'exit 0\n')
        os.chmod(script, stat.S_IRWXU)
        runner = ProcessRunner(reactor)
        self.addCleanup(runner.stop)
        config = FloatingIPConfig("command", (script,), 3, 10.0)
        backend = make_backend(config, reactor, runner)
        self.assertIsInstance(backend, CommandBackend)
        yield backend.up("s1", [V4])
        removed = yield backend.cleanup([V4])
        self.assertEqual(removed, [])
        with self.assertRaises(FloatingIPError) as cm:
            yield backend.down("s1", [FloatingIP("198.18.0.11", 24, "bad0")])
        self.assertIn("no such NIC", str(cm.exception))
        with open(record) as f:
            self.assertEqual(f.read().splitlines(), [
                "up s1 198.18.0.10/24 eth0", "cleanup - 198.18.0.10/24 eth0",
                "down s1 198.18.0.11/24 bad0"])


class LoopbackTests(SynchronousTestCase):
    def test_loopback_addresses(self) -> None:
        for address in ("127.0.0.1", "127.0.1.5", "127.255.255.254", "::1"):
            self.assertTrue(is_loopback(address), address)
        for address in ("128.0.0.1", "198.18.0.1", "::2", "::ffff:127.0.0.1", "nonsense"):
            self.assertFalse(is_loopback(address), address)

    def test_changes_nothing_for_loopback(self) -> None:
        backend = make_backend(FloatingIPConfig("loopback", (), 3, 1.0), Clock())
        self.assertIsInstance(backend, LoopbackBackend)
        ips = [FloatingIP("127.0.10.1", 32, "lo"), FloatingIP("::1", 128, "lo")]
        self.assertIsNone(self.successResultOf(backend.up("s1", ips)))
        self.assertIsNone(self.successResultOf(backend.down("s1", ips)))
        self.assertEqual(self.successResultOf(backend.cleanup(ips)), [])

    def test_refuses_other_addresses(self) -> None:
        backend = LoopbackBackend(Clock())
        ips = [FloatingIP("127.0.10.1", 32, "lo"), FloatingIP("198.18.0.1", 24, "eth0")]
        for d in (backend.up("s1", ips), backend.down("s1", ips), backend.cleanup(ips)):
            error = self.failureResultOf(d, FloatingIPError).value
            self.assertEqual([ip for ip, _ in error.failures], [ips[1]])
            self.assertIn("not a loopback address", str(error))


class MakeBackendTests(SynchronousTestCase):
    def test_ip(self) -> None:
        runner = FakeRunner()
        backend = make_backend(FloatingIPConfig("ip", (), 5, 2.5), Clock(), runner)  # type: ignore[arg-type]
        assert isinstance(backend, IPBackend)
        self.assertEqual((backend.name, backend.timeout, backend.arping_count), ("ip", 2.5, 5))
        self.assertIs(backend.runner, runner)

    def test_unknown(self) -> None:
        self.assertRaises(ValueError, make_backend, FloatingIPConfig("vrrp", (), 3, 1.0), Clock())


# -- real: inside a throwaway network namespace --------------------------------------------


def _netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "arping"):
        if shutil.which(tool) is None:
            return f"needs {tool!r} (Debian: iproute2, iputils-arping)"
    return None


class NetnsTests(TestCase):
    """The ip backend for real, in a namespace with a veth pair, addresses in 198.18/15."""

    timeout = 60

    def setUp(self) -> Deferred[Any]:
        reason = _netns_skip_reason()
        if reason:
            print(f"\nSKIP {self.id()}: {reason}")
            raise SkipTest(reason)
        self.runner = ProcessRunner(reactor)
        self.addCleanup(self.runner.stop)
        self.ns = f"fsha-test-{uuid.uuid4().hex[:10]}"
        return self._setup_ns()

    @inlineCallbacks
    def _setup_ns(self):  # type: ignore[no-untyped-def]
        yield self.sh("ip", "netns", "add", self.ns)
        self.addCleanup(self.sh, "ip", "netns", "del", self.ns)
        try:
            for argv in (("ip", "link", "set", "lo", "up"),
                         ("ip", "link", "add", "fsha0", "type", "veth", "peer", "name", "fsha1"),
                         ("ip", "link", "set", "fsha0", "up"),
                         ("ip", "link", "set", "fsha1", "up")):
                yield self.sh("ip", "netns", "exec", self.ns, *argv)
        except ProcessFailed as e:
            raise SkipTest(f"cannot build a veth pair in a namespace here: {e}") from None

    def sh(self, *argv: str) -> Deferred[ProcessResult]:
        return self.runner.run(argv, 10.0)

    @inlineCallbacks
    def held(self):  # type: ignore[no-untyped-def]
        result = yield self.sh("ip", "netns", "exec", self.ns, "ip", "-o", "addr", "show")
        return {(h.address, h.prefix, h.interface)
                for h in parse_ip_addr(result.stdout.decode())}

    @inlineCallbacks
    def test_up_cleanup_down(self):  # type: ignore[no-untyped-def]
        backend = IPBackend(self.runner, reactor, timeout=5.0, arping_count=2,
                            wrap=("ip", "netns", "exec", self.ns))
        vip = FloatingIP("198.18.200.1", 24, "fsha0")
        vip2 = FloatingIP("198.18.200.2", 24, "fsha0")
        vip6 = FloatingIP("2001:db8:fa::1", 64, "fsha0")
        leftover = FloatingIP("198.18.201.7", 24, "fsha1")

        # a previous incarnation left one address behind: cleanup removes it, only it
        yield self.sh("ip", "netns", "exec", self.ns, "ip", "addr", "add",
                      "198.18.201.7/24", "dev", "fsha1")
        removed = yield backend.cleanup([vip, leftover])
        self.assertEqual(removed, [leftover])
        self.assertNotIn(("198.18.201.7", 24, "fsha1"), (yield self.held()))
        self.assertEqual(backend.arping_flavour, IPUTILS if b"iputils" in (
            yield self.sh("arping", "-V")).stdout else HABETS)

        yield backend.up("s1", [vip, vip2, vip6])
        held = yield self.held()
        self.assertTrue({("198.18.200.1", 24, "fsha0"), ("198.18.200.2", 24, "fsha0"),
                         ("2001:db8:fa::1", 64, "fsha0")} <= held, held)
        self.assertEqual(set(backend._arping_runs), {"198.18.200.1", "198.18.200.2"})
        yield backend.up("s1", [vip])  # already held: fine

        yield backend.down("s1", [vip, vip2, vip6])
        self.assertEqual(backend._arping_runs, {})  # arping stopped with the address
        held = yield self.held()
        self.assertFalse({a for a, _, _ in held} & {"198.18.200.1", "198.18.200.2",
                                                   "2001:db8:fa::1"}, held)
        yield backend.down("s1", [vip])  # not held: fine
        self.assertEqual(backend.garp_failures, 0)

    @inlineCallbacks
    def test_arping_runs_to_completion(self):  # type: ignore[no-untyped-def]
        logs = LogCapture(self)
        backend = IPBackend(self.runner, reactor, timeout=5.0, arping_count=1,
                            wrap=("ip", "netns", "exec", self.ns))
        vip = FloatingIP("198.18.202.1", 24, "fsha0")
        yield backend.up("s1", [vip])
        run = backend._arping_runs.get(vip.address)
        if run is not None:  # still sending: wait for it (bounded by its own timeout)
            yield run
        self.assertEqual(backend.garp_failures, 0)
        sent = [e for e in logs.of() if "gratuitous ARP(s) sent" in e["log_format"]]
        self.assertEqual([(e["ip"], e["code"]) for e in sent], [(str(vip), 0)])
        yield backend.down("s1", [vip])

    @inlineCallbacks
    def test_missing_interface_fails_clearly(self):  # type: ignore[no-untyped-def]
        backend = IPBackend(self.runner, reactor, timeout=5.0, arping_count=1,
                            wrap=("ip", "netns", "exec", self.ns))
        with self.assertRaises(FloatingIPError) as cm:
            yield backend.up("s1", [FloatingIP("198.18.203.1", 24, "nosuch0")])
        self.assertIn("nosuch0", str(cm.exception))
