"""Takeovers on real FreeSWITCHes (loopback), with sipp as the caller.

Two FreeSWITCH processes share the slot's address (a 127.x address, the loopback
floating-IP backend): the master A binds the slot profile at boot; B's profile cannot bind
it (as a slave's profile on a host without the address) and sofia gives up. fsha's
:class:`~fsha.takeover.SlotEffects` takes the slot over on B from the rows read out of A's
own databases by the same readers the replication feeds use. Outcomes only: which calls
were recovered and re-INVITEd, whose BYE was answered, what ``sofia status`` lists.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from fsha.config import FloatingIP, SlotConfig
from fsha.eslclient import ESLClient
from fsha.floating import LoopbackBackend
from fsha.fsdb import (
    CoreDBReader,
    CoreDBWriter,
    RecoveryRow,
    RegistrationRow,
    ThreadRunner,
    inline_runner,
)
from fsha.takeover import NoRecords, SlotEffects, TakeoverTimeouts
from tests.freeswitch import sipp
from tests.freeswitch.realfs import RealFreeSWITCH, free_port, free_sip_port, skip_reason
from tests.freeswitch.realfs import wait_for as wait_blocking
from tests.test_takeover import DEAD, StaticRecords

pytestmark = pytest.mark.freeswitch

PROFILE = "slot1"
DEADLINE = 30.0


def poll(condition: Any, what: str, timeout: float = DEADLINE) -> Deferred[Any]:
    """Fires with ``condition()``'s first true value (polled), or fails after ``timeout``."""
    from fsha.harness import poll_until
    return poll_until(condition, what, timeout=timeout, interval=0.05, clock=reactor)


def read_rows(fs: RealFreeSWITCH) -> tuple[list[RecoveryRow], list[RegistrationRow]]:
    """A's rows, read as the replication feeds read them (the registrations from the
    profile's own database)."""
    db = CoreDBReader(fs.core_db, inline_runner,
                      registration_db=lambda p: fs.registration_db(p))
    try:
        box: list[Any] = []
        db.recovery_all([PROFILE]).addBoth(box.append)
        db.registrations([PROFILE]).addBoth(box.append)
    finally:
        db.close()
    calls, regs = box
    assert isinstance(calls, list) and isinstance(regs, list), box
    return calls, [RegistrationRow(
        r.call_id, r.sip_user, r.sip_host, r.presence_hosts, r.contact, r.status, r.rpid,
        r.expires, r.user_agent, r.profile_name, r.network_ip, r.network_port,
        r.sip_username, r.sip_realm) for r in regs]


def calls_count(fs: RealFreeSWITCH) -> int:
    text = fs.api("show calls count").strip()
    return int(text.split()[0]) if text.endswith("total.") else -1


class RealTakeoverTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        reason = skip_reason() or (None if sipp.SIPP else "sipp is not installed "
                                   "(apt-get install sip-tester)")
        if reason:
            raise SkipTest(reason)
        rng = random.Random()
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        self.ip = f"127.{rng.randint(100, 250)}.{rng.randint(1, 250)}.1"
        self.port = free_sip_port(self.ip)
        base = 30000 + 200 * rng.randint(0, 100)
        self.rtp = (base, base + 198)  # the same range on every node
        self.slot = SlotConfig(PROFILE, 0, (FloatingIP(self.ip, 32, "lo"),), (PROFILE,))

    def freeswitch(self, name: str) -> RealFreeSWITCH:
        fs = RealFreeSWITCH(self.work, name, slot_ip=self.ip, sip_port=self.port,
                            rtp=self.rtp, profile=PROFILE)
        self.addCleanup(fs.kill)
        fs.start()
        return fs

    @inlineCallbacks
    def effects_on(self, fs: RealFreeSWITCH, records: Any) -> Any:
        client = ESLClient(TCP4ClientEndpoint(reactor, "127.0.0.1", fs.esl_port, timeout=5),
                           "ClueCon", reactor, request_timeout=10.0, ping_interval=1.0,
                           heartbeat_timeout=None)
        client.startService()
        self.addCleanup(client.stopService)
        yield client.when_ready().addTimeout(DEADLINE, reactor)
        runner = ThreadRunner(reactor)
        self.addCleanup(runner.stop)
        writer = CoreDBWriter(fs.core_db, runner, registration_db=fs.registration_db)
        self.addCleanup(writer.close)
        effects = SlotEffects(LoopbackBackend(reactor), reactor, esl=client, db=writer,
                              records=records,
                              timeouts=TakeoverTimeouts(esl=5, db=10, confirm=10, recover=20,
                                                        registrations=10))
        return effects

    @inlineCallbacks
    def test_calls_and_registrations_survive_a_kill_9(self) -> Any:
        a = self.freeswitch("A")
        wait_blocking(a.profile_running, "A's slot profile RUNNING")
        b = self.freeswitch("B")
        users = [str(5000 + i) for i in range(5)]
        sipp.register(self.ip, self.port, users, self.work)
        n = 10
        caller = sipp.start_calls(self.ip, self.port, n, self.work, reinvite_within=90,
                                  local_port=free_port("127.0.0.1", 2))
        self.addCleanup(lambda: caller.poll() is None and caller.kill())
        wait_blocking(lambda: calls_count(a) == n, f"{n} calls answered on A")
        wait_blocking(lambda: len(read_rows(a)[0]) == n, f"{n} recovery rows on A")
        wait_blocking(b.bind_given_up, "B's slot profile given up (A holds the address)")
        self.assertFalse(b.profile_running())
        calls, regs = read_rows(a)
        self.assertEqual(sorted(r.sip_user for r in regs), users)
        a.kill(signal.SIGKILL)  # fsha and FreeSWITCH of the master die together

        effects = yield self.effects_on(b, StaticRecords(calls, regs))
        yield effects.acquire(self.slot, 2, DEAD)
        report = effects.last_report
        assert report is not None
        self.assertTrue(report.ok, report.as_dict())
        self.assertEqual(report.count("recovery_rows", "written"), n)
        self.assertEqual(report.count("recover", "recovered"), n)
        self.assertEqual(report.count("registrations", "written"), len(users))
        # restored registrations are B's own now: listed by sofia (issue 12, item 1)
        listing = b.api(f"sofia status profile {PROFILE} reg")
        self.assertIn(f"Total items returned: {len(users)}\n", listing)
        for user in users:
            self.assertIn(f"User:       \t{user}@", listing)
        # recovered calls carry the profile's name: a release can hang them up (hupall)
        uuid = calls[0].uuid
        self.assertEqual(b.api(f"uuid_getvar {uuid} sofia_profile_name").strip(), PROFILE)
        # every call got B's re-INVITE, no BYE from A, and the caller's BYE got B's 200
        code, err = yield deferLater(reactor, 0, sipp.finish_calls, caller, 60)
        self.assertEqual(code, 0, err)
        yield poll(lambda: calls_count(b) == 0, "the calls ended on B")

    @inlineCallbacks
    def test_young_profile_hand_over_and_switch_back_and_forth(self) -> Any:
        fs = self.freeswitch("C")
        wait_blocking(fs.profile_running, "the slot profile RUNNING")
        effects = yield self.effects_on(fs, NoRecords())
        yield effects.acquire(self.slot, 1, None)
        self.assertTrue(effects.last_report.ok, effects.last_report.as_dict())

        # hand-over of a profile younger than 10 s: refused stop -> standby, retry later
        yield effects.release(self.slot)
        step = effects.last_report.step("profiles")
        self.assertEqual(step.counts["too_young"], 1, step)
        self.assertTrue(effects.status()["global_standby"])
        # the slot comes back before the retry: standby off, the profile serves again
        yield effects.acquire(self.slot, 3, None)
        report = effects.last_report
        self.assertTrue(report.ok, report.as_dict())
        self.assertEqual(report.count("profiles", "standby_off"), 1)
        self.assertFalse(effects.status()["global_standby"])
        self.assertTrue(fs.profile_running())

        # given up again; this time the delayed stop runs (once the 10 s are over)...
        yield effects.release(self.slot)
        yield poll(lambda: not effects.status()["pending_profile_stops"]
                   and not fs.profile_running(), "the delayed stop", timeout=DEADLINE)
        yield poll(lambda: not effects.status()["global_standby"], "global standby off")
        # ... and the slot switches straight back: the start waits for the stop to be
        # complete (UNPUBLISH), then binds (issue 12, item 3: it failed to bind)
        stopping = PROFILE in effects.status()["profiles_stopping"]
        yield effects.acquire(self.slot, 5, None)
        report = effects.last_report
        self.assertTrue(report.ok, report.as_dict())
        self.assertTrue(fs.profile_running())
        self.assertEqual(report.count("profiles", "stops_waited"), int(stopping))
        self.assertEqual(report.step("profiles").outcome, "ok")  # UNPUBLISH came
        self.assertEqual(effects.status()["profiles_stopping"], [])

        # SIGTERM right after a hand-over of the (young) profile: the process waits for
        # the deferred stop; nothing is left running, standby is off (issue 12, item 2)
        yield effects.release(self.slot)
        self.assertEqual(effects.last_report.step("profiles").counts["too_young"], 1)
        yield effects.stop()
        self.assertEqual(effects.status()["pending_profile_stops"], [])
        self.assertFalse(effects.status()["global_standby"])
        self.assertFalse(fs.profile_running())

    @inlineCallbacks
    def test_failback_to_a_node_with_old_rows(self) -> Any:
        """A is killed with calls (its rows stay in its core DB), B takes them, A's
        FreeSWITCH comes back, the calls end on B, new calls come, B is killed and the slot
        fails back to A: only B's calls are recovered, never the ghosts of A's first run."""
        a = self.freeswitch("A")
        wait_blocking(a.profile_running, "A's slot profile RUNNING")
        b = self.freeswitch("B")
        first = sipp.start_calls(self.ip, self.port, 4, self.work / "first",
                                 reinvite_within=60, local_port=free_port("127.0.0.1", 2))
        self.addCleanup(lambda: first.poll() is None and first.kill())
        wait_blocking(lambda: len(read_rows(a)[0]) == 4, "4 recovery rows on A")
        wait_blocking(b.bind_given_up, "B's slot profile given up")
        calls, _ = read_rows(a)
        a.kill(signal.SIGKILL)
        on_b = yield self.effects_on(b, StaticRecords(calls, []))
        yield on_b.acquire(self.slot, 2, DEAD)
        self.assertEqual(on_b.last_report.count("recover", "recovered"), 4)
        code, err = yield deferLater(reactor, 0, sipp.finish_calls, first, 60)
        self.assertEqual(code, 0, err)  # re-INVITEd by B, ended there

        # A's FreeSWITCH is back (a new runtime); its profile cannot bind (B holds the
        # address); its core DB still has the rows of its first run: ghosts
        a2 = self.freeswitch("A")
        wait_blocking(a2.bind_given_up, "A's slot profile given up (B holds the address)")
        ghosts = len(read_rows(a2)[0])
        self.assertEqual(ghosts, 4)
        second = sipp.start_calls(self.ip, self.port, 3, self.work / "second",
                                  reinvite_within=60, local_port=free_port("127.0.0.1", 2))
        self.addCleanup(lambda: second.poll() is None and second.kill())
        # rows as FreeSWITCH rewrites them once each caller's ACK is in (with the dialog's
        # tags; a row read before it recovers a dialog the caller cannot match: 481)
        wait_blocking(lambda: [b"sip_to_tag" in r.metadata for r in read_rows(b)[0]]
                      == [True] * 3, "B's 3 new calls in its table, ACKed")
        calls, _ = read_rows(b)
        b.kill(signal.SIGKILL)
        on_a = yield self.effects_on(a2, StaticRecords(calls, []))
        yield on_a.acquire(self.slot, 3, DEAD)
        report = on_a.last_report
        self.assertTrue(report.ok, report.as_dict())
        self.assertEqual(report.count("recovery_rows", "purged"), ghosts)
        self.assertEqual(report.count("recover", "recovered"), 3)  # not 3 + the ghosts
        code, err = yield deferLater(reactor, 0, sipp.finish_calls, second, 60)
        self.assertEqual(code, 0, err)
        yield poll(lambda: calls_count(a2) == 0, "the calls ended on A")
