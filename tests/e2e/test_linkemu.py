"""The userspace link emulator (tests/e2e/linkemu.py): its commands and impairments, and,
as root, real frames through real TAP cables between two namespaced hosts."""

from __future__ import annotations

import random
import socket
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from fsha.harness import HarnessError, wait_for
from tests.e2e.linkemu import Direction, Impairment, _apply, due_in, parse_command
from tests.e2e.netns import NetnsCluster, in_netns, unavailable_reason


class Commands(SynchronousTestCase):
    def test_a_full_command(self) -> None:
        link, direction, imp = parse_command(
            '{"link": "1A", "direction": "out", "loss": 0.05, "delay_ms": 20, "jitter_ms": 5}')
        self.assertEqual((link, direction), ("1A", "out"))
        self.assertEqual(imp, Impairment(0.05, 0.020, 0.005))

    def test_defaults_clear_the_impairment(self) -> None:
        _, direction, imp = parse_command('{"link": "2B"}')
        self.assertEqual(direction, "both")
        self.assertTrue(imp.none)

    def test_bad_commands_are_refused_with_a_reason(self) -> None:
        for line, why in [("nope", "not JSON"), ("[]", "link"), ('{"link": 3}', "link"),
                          ('{"link": "1A", "direction": "up"}', "direction"),
                          ('{"link": "1A", "loss": 1.5}', "loss"),
                          ('{"link": "1A", "delay_ms": -1}', "delay_ms"),
                          ('{"link": "1A", "jitter_ms": "5"}', "jitter_ms"),
                          ('{"link": "1A", "loss": true}', "loss")]:
            with self.assertRaises(ValueError) as e:
                parse_command(line)
            self.assertIn(why, str(e.exception), line)

    def test_apply_sets_the_directions_asked_for_and_reports_stats(self) -> None:
        out, into = Direction(3, 4, Impairment()), Direction(4, 3, Impairment())
        links = {"1A": (out, into)}
        self.assertEqual(_apply('{"link": "1A", "direction": "in", "loss": 0.5}', links), "ok")
        self.assertEqual((out.impairment.loss, into.impairment.loss), (0.0, 0.5))
        self.assertEqual(_apply('{"link": "1A", "delay_ms": 7}', links), "ok")
        self.assertEqual((out.impairment.delay, into.impairment.delay), (0.007, 0.007))
        self.assertTrue(_apply('{"link": "9Z"}', links).startswith("error: no link"))
        self.assertTrue(_apply("{", links).startswith("error: not JSON"))
        out.frames, out.dropped = 10, 2
        self.assertIn('"out": {"frames": 10, "dropped": 2}', _apply("stats", links))


class Impairments(SynchronousTestCase):
    def test_loss_drops_about_that_share(self) -> None:
        rng = random.Random(1)
        results = [due_in(Impairment(loss=0.05), rng) for _ in range(20_000)]
        dropped = results.count(None)
        self.assertTrue(800 < dropped < 1200, dropped)
        self.assertEqual({r for r in results if r is not None}, {0.0})

    def test_delay_plus_uniform_jitter_never_negative(self) -> None:
        rng = random.Random(2)
        delays = [due_in(Impairment(delay=0.020, jitter=0.020), rng) for _ in range(5_000)]
        self.assertNotIn(None, delays)
        self.assertTrue(all(0.0 <= d <= 0.040 for d in delays if d is not None))
        self.assertLess(min(d for d in delays if d is not None), 0.002)
        self.assertGreater(max(d for d in delays if d is not None), 0.038)

    def test_no_impairment_no_delay(self) -> None:
        self.assertEqual(due_in(Impairment(), random.Random(3)), 0.0)


class RealCables(SynchronousTestCase):
    """As root: UDP between two hosts across an emulated network."""

    def setUp(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            print(f"tests.e2e skipped: {reason}")
            raise SkipTest(reason)
        self.cluster = NetnsCluster(nodes=2, slots=1, emulated=("A",))
        self.addCleanup(self.cluster.close)
        self.cluster.build()  # namespaces and cables only: no fsha, no simulator

    def exchange(self, count: int, spacing: float = 0.002) -> list[float]:
        """Send ``count`` datagrams from host 1 to host 2 on network A; the one-way delays
        of those that arrived (within 0.5 s of the last send)."""
        c = self.cluster
        with in_netns(c.ns("fs2")):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with in_netns(c.ns("fs1")):
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(rx.close)
        self.addCleanup(tx.close)
        rx.bind((c.net_address("A", 2), 0))
        tx.bind((c.net_address("A", 1), 0))
        target = rx.getsockname()
        rx.settimeout(0.5)
        delays = []
        for k in range(count):
            tx.sendto(f"{k} {time.monotonic()!r}".encode(), target)
            time.sleep(spacing)
        while True:
            try:
                data = rx.recv(100)
            except TimeoutError:
                break
            delays.append(time.monotonic() - float(data.split()[1]))
        return delays

    def test_plain_delayed_and_lossy(self) -> None:
        c = self.cluster
        # The first datagrams also wait for ARP: warm the path up first.
        wait_for("the cable to carry a datagram", lambda: self.exchange(1), timeout=10)
        plain = self.exchange(50)
        self.assertEqual(len(plain), 50)
        c.impair("fs1", "A", delay_ms=50, direction="out")
        delayed = self.exchange(50)
        self.assertEqual(len(delayed), 50)
        self.assertGreaterEqual(min(delayed), 0.050, "never earlier than the delay")
        c.impair("fs1", "A", loss=1.0)
        self.assertEqual(self.exchange(20), [], "everything lost")
        c.impair("fs1", "A")
        self.assertEqual(len(self.exchange(20)), 20, "a plain cable again")
        stats = c.link_stats()
        # the 20 datagrams, and whatever else the host sent meanwhile (ARP, IPv6 ND)
        self.assertGreaterEqual(stats["1A"]["out"]["dropped"], 20)
        with self.assertRaises(HarnessError):
            c.impair("fs1", "B", loss=0.1)  # B is a veth pair: not emulated
