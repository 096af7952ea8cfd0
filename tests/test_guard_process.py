"""The real guard process (``python -m fsha.guard``) against a real simulator (``fsha sim``)
on loopback, with the ``loopback`` floating-IP backend: the pipe as fsha drives it, the
drop at end of file and at lease expiry, FreeSWITCH's 10-second rule, the reconciliation.

Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from fsha.config import FloatingIP
from fsha.localdrop import GuardSettings, SlotSettings
from fsha.wire.guard import (
    Dropped,
    Hello,
    Hold,
    LineBuffer,
    Ready,
    Reconcile,
    Reconciled,
    decode,
    encode,
)

from .test_sim_process import DEADLINE, Sim


class Guard:
    """One guard subprocess; ``said`` collects what it wrote."""

    def __init__(self, case: SynchronousTestCase, settings: GuardSettings) -> None:
        self.log_path = os.path.join(case.mktemp() + ".log")
        self.log = open(self.log_path, "wb")
        case.addCleanup(self.log.close)
        self.proc = subprocess.Popen([sys.executable, "-m", "fsha.guard"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log)
        case.addCleanup(self.kill)
        self.lines = LineBuffer()
        self.said: list[Any] = []
        self.send(Hello(settings.as_json()))
        self.wait(Ready)

    def send(self, message: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode(message))
        self.proc.stdin.flush()

    def close(self) -> int:
        """fsha goes away: end of file on the guard's stdin; returns its exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=DEADLINE)

    def wait(self, kind: type, deadline: float = DEADLINE) -> Any:
        assert self.proc.stdout is not None
        end = time.monotonic() + deadline
        while True:
            for message in self.said:
                if isinstance(message, kind):
                    self.said.remove(message)
                    return message
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the guard said no {kind.__name__}; log:\n"
                                     + open(self.log_path, errors="replace").read())
            ready, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if ready:
                data = os.read(self.proc.stdout.fileno(), 65536)
                if not data:
                    raise AssertionError("the guard closed its stdout")
                self.said.extend(decode(line) for line in self.lines.feed(data))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE)


class GuardProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sim = Sim(self, "fs1", "--profile", "slot1=127.0.0.1:0",
                       "--define-profile", "slot2=127.0.0.1:0", *self.sim_args())

    def sim_args(self) -> list[str]:
        return ["--profile-guard", "0"]

    def settings(self, lease: float = 5.0) -> GuardSettings:
        esl = self.sim.ready["esl"]
        return GuardSettings("fs1", lease, "loopback", (), 1.0, "127.0.0.1", int(esl["port"]),
                             "ClueCon", 2.0, (
                                 SlotSettings(0, "slot1", (FloatingIP("127.0.10.1", 32, "lo"),),
                                              ("slot1",)),
                                 SlotSettings(1, "slot2", (FloatingIP("127.0.10.2", 32, "lo"),),
                                              ("slot2",))))

    def profile_state(self, name: str) -> str:
        return str(self.sim.control("/status")["profiles"][name]["state"])

    def place_calls(self, count: int) -> None:
        self.sim.control("/calls", {"profile": "slot1", "count": count, "answer": True})
        self.assertEqual(self.sim.control("/status")["calls"], count)

    def test_fsha_gone_drops_the_held_slot_at_once(self) -> None:
        self.place_calls(3)
        guard = Guard(self, self.settings(lease=30.0))
        guard.send(Hold(0, 4, time.monotonic_ns() + 30 * 10**9))
        self.assertEqual(guard.close(), 0, "the guard leaves once it has dropped the slot")
        self.assertEqual(self.profile_state("slot1"), "stopped")
        self.assertEqual(self.sim.control("/status")["calls"], 0)
        log = open(guard.log_path, errors="replace").read()
        self.assertIn("fsha is gone", log)
        self.assertIn("3 call(s)", log)

    def test_an_unrenewed_lease_drops_the_slot_and_a_late_renewal_is_told(self) -> None:
        self.place_calls(2)
        guard = Guard(self, self.settings(lease=0.2))
        guard.send(Hold(0, 4, time.monotonic_ns() + 200_000_000))
        dropped = guard.wait(Dropped)
        self.assertEqual((dropped.slot, dropped.lease), (0, 4))
        self.assertIn("lease expired", dropped.report["reason"])
        self.assertEqual(dropped.report["profiles"]["stopped"], ["slot1"])
        self.assertEqual(dropped.report["profiles"]["calls"], 2)
        self.assertEqual(self.profile_state("slot1"), "stopped")
        self.assertEqual(self.sim.control("/status")["calls"], 0)
        # fsha resumes (it was paused) and renews: the guard tells it again, takes nothing
        guard.send(Hold(0, 4, time.monotonic_ns() + 200_000_000))
        again = guard.wait(Dropped)
        self.assertTrue(again.report["repeat"])
        self.assertEqual(guard.close(), 0)

    def test_renewals_keep_the_slot(self) -> None:
        guard = Guard(self, self.settings(lease=0.3))
        end = time.monotonic() + 1.5
        while time.monotonic() < end:  # fsha's ticks: renew well within the lease
            guard.send(Hold(0, 4, time.monotonic_ns() + 300_000_000))
            time.sleep(0.05)  # this test plays fsha: it renews every 50 ms
        self.assertEqual(self.profile_state("slot1"), "running")
        self.assertEqual([m for m in guard.said if isinstance(m, Dropped)], [])
        guard.send(Hold(0, 4, time.monotonic_ns() + 300_000_000))
        self.assertEqual(guard.close(), 0)
        self.assertEqual(self.profile_state("slot1"), "stopped", "and drops it at the end")

    def test_reconcile_stops_every_slot_profile_running(self) -> None:
        self.place_calls(2)
        guard = Guard(self, self.settings())
        guard.send(Reconcile(7))
        done = guard.wait(Reconciled)
        self.assertEqual(done.request, 7)
        self.assertEqual(done.report["profiles"]["stopped"], ["slot1"])
        self.assertEqual(done.report["profiles"]["not_running"], ["slot2"])
        self.assertEqual(self.sim.control("/status")["calls"], 0)
        self.assertEqual(guard.close(), 0)


class YoungProfileTests(SynchronousTestCase):
    """FreeSWITCH refuses to stop a profile started less than 10 s ago (here 30 s)."""

    def test_the_calls_are_hung_up_and_the_stop_retried_later(self) -> None:
        self.sim = Sim(self, "fs1", "--profile", "slot1=127.0.0.1:0", "--profile-guard", "30")
        GuardProcessTests.place_calls(self, 3)  # type: ignore[arg-type]
        guard = Guard(self, GuardProcessTests.settings(self, lease=0.2))  # type: ignore[arg-type]
        guard.send(Hold(0, 4, time.monotonic_ns() + 200_000_000))
        dropped = guard.wait(Dropped)
        profiles = dropped.report["profiles"]
        self.assertEqual((profiles["too_young"], profiles["calls_killed"]), (["slot1"], 3))
        self.assertGreater(dropped.report["retry_in"], 0)
        self.assertEqual(self.sim.control("/status")["calls"], 0)
        self.assertEqual(self.sim.control("/status")["profiles"]["slot1"]["state"], "running",
                         "FreeSWITCH still refuses the stop: retried later")
