"""The ``ip`` backend's netlink path (fake kernel; and the real one in a namespace)."""

from __future__ import annotations

import errno
import os
import select
import shutil
import socket
import subprocess
import uuid

from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from fsha import kernelnet
from fsha.config import FloatingIP, FloatingIPConfig
from fsha.floating import FloatingIPError, IPBackend, NetlinkIPBackend, make_backend
from fsha.wire import netlink
from tests.test_floating import FakeRunner, LogCapture

V4 = FloatingIP("198.18.0.10", 24, "eth0")
V4B = FloatingIP("198.18.1.10", 24, "eth1")
V6 = FloatingIP("2001:db8::10", 64, "eth0")


class FakeNet:
    """A kernel with interfaces eth0 and eth1 (Ethernet) and lo (no ARP)."""

    def __init__(self) -> None:
        self.held: set[tuple[str, str, int]] = set()  # (interface, address, prefix)
        self.garps: list[tuple[str, str]] = []
        self.calls: list[str] = []
        self.fail_next: OSError | None = None

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e

    def change(self, action: str, address: str, prefix: int, interface: str) -> None:
        self.calls.append(f"{action} {address}/{prefix} {interface}")
        self._maybe_fail()
        if interface not in ("eth0", "eth1", "lo"):
            raise kernelnet.KernelError(errno.ENODEV, f"interface {interface!r}")
        key = (interface, address, prefix)
        if action == "add":
            if key in self.held:
                raise kernelnet.KernelError(errno.EEXIST, "add")
            self.held.add(key)
        else:
            if key not in self.held:
                raise kernelnet.KernelError(errno.EADDRNOTAVAIL, "del")
            self.held.remove(key)

    def addresses(self) -> list[tuple[str, str, int, int, str]]:
        self.calls.append("list")
        self._maybe_fail()
        return [(i, a, p, 6 if ":" in a else 4, "") for i, a, p in sorted(self.held)]

    def garp(self, address: str, interface: str) -> bool:
        self._maybe_fail()
        if interface == "lo":
            return False
        self.garps.append((address, interface))
        return True


def backend(count: int = 3) -> tuple[NetlinkIPBackend, FakeNet, Clock]:
    net, clock = FakeNet(), Clock()
    b = NetlinkIPBackend(net, FakeRunner(), clock, timeout=2.0,  # type: ignore[arg-type]
                         arping_count=count)
    return b, net, clock


class UpTests(SynchronousTestCase):
    def test_up_adds_and_announces_at_once_then_each_second(self) -> None:
        b, net, clock = backend(3)
        self.successResultOf(b.up("s1", [V4, V4B, V6]))
        self.assertEqual(net.held, {("eth0", "198.18.0.10", 24), ("eth1", "198.18.1.10", 24),
                                    ("eth0", "2001:db8::10", 64)})
        # the first announcement of each IPv4 address is out before up() fired; none for v6
        self.assertEqual(net.garps, [("198.18.0.10", "eth0"), ("198.18.1.10", "eth1")])
        clock.advance(0.999)
        self.assertEqual(len(net.garps), 2)
        clock.advance(0.001)
        self.assertEqual(len(net.garps), 4)
        clock.advance(1.0)
        self.assertEqual(len(net.garps), 6)
        clock.advance(10.0)
        self.assertEqual(len(net.garps), 6)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(b.garp_failures, 0)
        self.assertFalse(b.runner.calls)  # type: ignore[attr-defined]

    def test_already_held_is_fine_and_announces_again(self) -> None:
        b, net, _clock = backend(1)
        net.held.add(("eth0", "198.18.0.10", 24))
        self.successResultOf(b.up("s1", [V4]))
        self.assertEqual(net.garps, [("198.18.0.10", "eth0")])

    def test_no_arp_count_no_announcement(self) -> None:
        b, net, clock = backend(0)
        self.successResultOf(b.up("s1", [V4]))
        self.assertEqual(net.garps, [])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_interface_without_arp(self) -> None:
        b, net, clock = backend(3)
        self.successResultOf(b.up("s1", [FloatingIP("198.18.5.1", 32, "lo")]))
        self.assertEqual((net.garps, clock.getDelayedCalls()), ([], []))
        self.assertEqual(b.garp_failures, 0)

    def test_failure_names_the_address_and_keeps_what_was_done(self) -> None:
        b, _net, _clock = backend(1)
        bad = FloatingIP("198.18.9.9", 24, "nosuch0")
        error = self.failureResultOf(b.up("s1", [V4, bad]), FloatingIPError).value
        self.assertEqual([ip for ip, _ in error.failures], [bad])
        self.assertIn("nosuch0", str(error))
        self.assertIn("No such device", str(error))
        self.assertEqual(error.done, [V4])

    def test_garp_failure_is_counted_not_fatal(self) -> None:
        b, net, clock = backend(2)
        real_garp = net.garp

        def failing(address: str, interface: str) -> bool:
            raise PermissionError(errno.EPERM, "Operation not permitted")

        net.garp = failing  # type: ignore[method-assign]
        self.successResultOf(b.up("s1", [V4]))
        self.assertEqual(b.garp_failures, 1)
        self.assertEqual(clock.getDelayedCalls(), [])  # no more tries after a failure
        net.garp = real_garp  # type: ignore[method-assign]


class DownTests(SynchronousTestCase):
    def test_down_stops_the_announcements(self) -> None:
        b, net, clock = backend(5)
        self.successResultOf(b.up("s1", [V4]))
        clock.advance(1.0)
        self.successResultOf(b.down("s1", [V4]))
        self.assertEqual(net.held, set())
        clock.advance(10.0)
        self.assertEqual(len(net.garps), 2)  # never announce an address given away

    def test_not_held_is_fine(self) -> None:
        b, _net, _ = backend()
        self.successResultOf(b.down("s1", [V4, V6]))

    def test_other_errors_fail(self) -> None:
        b, net, _ = backend()
        net.held.add(("eth0", "198.18.0.10", 24))
        net.fail_next = PermissionError(errno.EPERM, "Operation not permitted")
        error = self.failureResultOf(b.down("s1", [V4]), FloatingIPError).value
        self.assertIn("not permitted", str(error))


class CleanupTests(SynchronousTestCase):
    def test_removes_only_configured_addresses_whatever_their_prefix(self) -> None:
        b, net, _ = backend()
        net.held |= {("eth0", "198.18.0.10", 16), ("eth0", "198.18.0.200", 24)}
        removed = self.successResultOf(b.cleanup([V4, V4B]))
        self.assertEqual(removed, [FloatingIP("198.18.0.10", 16, "eth0")])
        self.assertEqual(net.held, {("eth0", "198.18.0.200", 24)})

    def test_nothing_held(self) -> None:
        b, _net, _ = backend()
        self.assertEqual(self.successResultOf(b.cleanup([V4])), [])

    def test_list_failure(self) -> None:
        b, net, _ = backend()
        net.fail_next = OSError(errno.EPERM, "nope")
        error = self.failureResultOf(b.cleanup([V4]), FloatingIPError).value
        self.assertIn("cannot list addresses", str(error))


class MakeBackendTests(SynchronousTestCase):
    def test_ip_speaks_netlink_when_it_can(self) -> None:
        net = FakeNet()
        b = make_backend(FloatingIPConfig("ip", (), 2, 1.5), Clock(), FakeRunner(),  # type: ignore[arg-type]
                         net=net)
        assert isinstance(b, NetlinkIPBackend)
        self.assertIs(b.net, net)
        self.assertEqual((b.name, b.timeout, b.arping_count), ("ip", 1.5, 2))

    def test_subprocess_fallback(self) -> None:
        original = kernelnet.supported
        kernelnet.supported = lambda: "not Linux (test)"  # type: ignore[assignment]
        self.addCleanup(setattr, kernelnet, "supported", original)
        logs = LogCapture(self)
        b = make_backend(FloatingIPConfig("ip", (), 2, 1.5), Clock(), FakeRunner())  # type: ignore[arg-type]
        self.assertIs(type(b), IPBackend)
        self.assertTrue(any("running ip and arping instead" in e["log_format"]
                            for e in logs.of()))


# -- the real kernel, inside a throwaway namespace ----------------------------------------


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs 'ip' (Debian: iproute2)"
    return kernelnet.supported()


class NetnsTests(SynchronousTestCase):
    """The netlink backend in a namespace with a veth pair: the addresses really change and
    the announcements really leave (read on the other end of the cable)."""

    def setUp(self) -> None:
        reason = _skip_reason()
        if reason:
            raise SkipTest(reason)
        from tests.e2e.netns import in_netns

        self.in_netns = in_netns
        self.ns = f"fsha-nl-{uuid.uuid4().hex[:10]}"
        self.ip("netns", "add", self.ns)
        self.addCleanup(self.ip, "netns", "del", self.ns)
        for args in (("link", "set", "lo", "up"),
                     ("link", "add", "fsha0", "type", "veth", "peer", "name", "fsha1"),
                     ("link", "set", "fsha0", "up"), ("link", "set", "fsha1", "up")):
            self.ip("-n", self.ns, *args)

    def ip(self, *args: str) -> str:
        return subprocess.run(["ip", *args], check=True, capture_output=True, text=True,
                              timeout=10).stdout

    def held(self) -> set[tuple[str, int]]:
        out = set()
        for line in self.ip("-n", self.ns, "-o", "addr", "show", "dev", "fsha0").splitlines():
            address, _, prefix = line.split()[3].partition("/")
            out.add((address, int(prefix)))
        return out

    def test_addresses_and_announcements_for_real(self) -> None:
        clock = Clock()
        vip, vip6 = FloatingIP("198.18.200.1", 24, "fsha0"), FloatingIP("2001:db8:fa::1", 64,
                                                                         "fsha0")
        leftover = FloatingIP("198.18.200.2", 16, "fsha0")
        self.ip("-n", self.ns, "addr", "add", "198.18.200.2/16", "dev", "fsha0")
        with self.in_netns(self.ns):
            b = NetlinkIPBackend(kernelnet.LinuxNet(2.0), FakeRunner(), clock,  # type: ignore[arg-type]
                                 timeout=2.0, arping_count=2)
            listener = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM,
                                     socket.htons(netlink.ETH_P_ARP))
            self.addCleanup(listener.close)
            listener.bind(("fsha1", netlink.ETH_P_ARP))
            self.assertEqual(self.successResultOf(b.cleanup([vip, leftover])), [leftover])
            self.successResultOf(b.up("s1", [vip, vip6]))
            self.successResultOf(b.up("s1", [vip]))  # already held: fine
        self.assertTrue({("198.18.200.1", 24), ("2001:db8:fa::1", 64)} <= self.held())
        self.assertNotIn(("198.18.200.2", 16), self.held())

        with self.in_netns(self.ns):
            mac = _mac("fsha0")
        # the first announcement of each up() arrived before up() returned; arping_count 2
        # means one more per up, one second later on the backend's clock
        frames = _read_frames(listener, 2)
        self.assertEqual(frames, [netlink.garp(mac, "198.18.200.1")] * 2)
        with self.in_netns(self.ns):
            clock.advance(1.0)
        self.assertEqual(_read_frames(listener, 1), [netlink.garp(mac, "198.18.200.1")])
        with self.in_netns(self.ns):
            self.successResultOf(b.down("s1", [vip, vip6]))
            self.successResultOf(b.down("s1", [vip]))  # not held: fine
            error = self.failureResultOf(b.up("s1", [FloatingIP("198.18.203.1", 24,
                                                                "nosuch0")]),
                                         FloatingIPError).value
        self.assertIn("nosuch0", str(error))
        self.assertEqual(self.held() & {("198.18.200.1", 24), ("2001:db8:fa::1", 64)}, set())
        self.assertEqual(b.garp_failures, 0)
        self.assertEqual(clock.getDelayedCalls(), [])


def _mac(interface: str) -> bytes:
    with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0) as s:
        s.bind((interface, 0))
        return s.getsockname()[4]


def _read_frames(listener: socket.socket, n: int, timeout: float = 5.0) -> list[bytes]:
    """The next ``n`` ARP payloads on ``listener`` (a bounded wait for each)."""
    frames: list[bytes] = []
    while len(frames) < n:
        ready, _, _ = select.select([listener], [], [], timeout)
        if not ready:
            break
        data = listener.recv(2048)
        frames.append(data[:28])
    return frames
