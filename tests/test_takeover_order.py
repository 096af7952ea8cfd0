"""The takeover's order (issue 15): the client's address answers first, the calls after.

On a fake clock, with the in-process switches of tests/test_takeover.py: the address and
the profile come before any row is read or written; a step after the address that fails
is rolled back silently (addresses down before anything else, the rows written deleted)
and leaves the dead master's records whole for the next candidate; the self-check reads
the health probe's last answer when it is recent enough (fsha.health), else asks.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from fsha.fsdb import CoreDBError, CoreDBWriter, inline_runner
from fsha.health import PROBE_COMMAND, SELF_CHECK_MAX_AGE, SwitchHealth, recent_answer
from fsha.takeover import FAILED, OK, SlotEffects
from tests.test_esl_client import ClientTestBase
from tests.test_takeover import (
    DEAD,
    PROFILE,
    SLOT,
    TIMEOUTS,
    FakeFloating,
    Scenario,
    SwitchESL,
    db_in_own_folder,
    make_switch,
    reg_db,
    table,
)

READY = ("UP 0 years, 0 days, 0 hours, 5 minutes, 1 second, 0 milliseconds, 0 microseconds\n"
         "FreeSWITCH (Version 1.10.12 git) is ready\n0 session(s) since startup\n")
NOT_READY = READY.replace("is ready", "is not ready")


def ordered(s: Scenario) -> list[str]:
    """Record, in order, what the sequence does to the outside world."""
    order: list[str] = []
    floating_do, api, rows_for = s.floating._do, s.esl.api, s.records.rows_for

    def do(action: str, slot: str, ips: Any) -> Deferred[None]:
        order.append(f"ip {action}")
        return floating_do(action, slot, ips)

    def api_logged(command: str, timeout: float | None = None) -> Deferred[str]:
        order.append(command)
        return api(command, timeout)

    def rows_logged(slot: Any, previous: Any, progress: Any = None) -> Any:
        order.append("records")
        return rows_for(slot, previous, progress)

    s.floating._do = do  # type: ignore[method-assign]
    s.esl.api = api_logged  # type: ignore[method-assign]
    s.records.rows_for = rows_logged  # type: ignore[method-assign]
    return order


class FakeHealth:
    def __init__(self, answer: tuple[float, str] | None) -> None:
        self.answer = answer
        self.asked: list[float] = []

    def recent_status(self, max_age: float) -> tuple[float, str] | None:
        self.asked.append(max_age)
        return self.answer


class OrderTests(SynchronousTestCase):
    def test_the_address_answers_before_any_row_is_read(self) -> None:
        s = Scenario(self, calls=4, regs=3)
        order = ordered(s)
        self.successResultOf(s.effects.acquire(SLOT, 2, DEAD))
        report = s.effects.last_report
        assert report is not None
        self.assertTrue(report.ok, report.as_dict())
        start = order.index(f"sofia profile {PROFILE} start")
        self.assertEqual(order[:start + 2], ["status", "ip up", f"sofia profile {PROFILE} start",
                                             "sofia status"])
        # then the calls: records, this FreeSWITCH's runtime, the rows, the recover
        self.assertEqual(order[start + 2:start + 4], ["records", "global_getvar core_uuid"])
        self.assertLess(order.index("global_getvar core_uuid"),
                        order.index(f"sofia profile {PROFILE} recover"))
        self.assertEqual(report.count("recover", "recovered"), 6)

    def test_a_failure_after_the_address_is_silent_and_leaves_the_records(self) -> None:
        s = Scenario(self, calls=4, regs=3)
        write = s.writer.write_recovery

        def broken(rows: Any, runtime: Any) -> Deferred[int]:
            return fail(CoreDBError("disk I/O error"))

        s.writer.write_recovery = broken  # type: ignore[method-assign]
        order = ordered(s)
        failure = self.failureResultOf(s.effects.acquire(SLOT, 1, DEAD))
        self.assertIn("recovery_rows", str(failure.value))
        acquire = s.effects.last_report
        assert acquire is not None
        self.assertEqual([(st.name, st.outcome) for st in acquire.steps][-3:],
                         [("profiles", OK), ("records", OK), ("recovery_rows", FAILED)])
        served = len(order)
        self.successResultOf(s.effects.release(SLOT))  # the node's rollback
        rollback = s.effects.last_report
        assert rollback is not None
        self.assertEqual(rollback.action, "rollback")
        after = order[served:]
        # silent: the address goes before FreeSWITCH is told anything (a stop refused in
        # the profile's first 10 s hangs up its calls: their BYEs cannot leave)
        self.assertEqual(after[0], "ip down")
        self.assertEqual(s.floating.held, set())
        self.assertTrue(any(c.startswith(f"sofia profile {PROFILE} stop") for c in after))
        self.assertEqual(s.foreign_rows(), 0)  # nothing of the dead master left here
        # the records are untouched: the next candidate recovers every call from them
        s.writer.write_recovery = write  # type: ignore[method-assign]
        c_db = db_in_own_folder(s.dir, "c")
        c = make_switch(s.clock, c_db, "fs3", autostart=False)
        self.addCleanup(c.db.close)
        writer = CoreDBWriter(c_db, inline_runner, registration_db=lambda p: reg_db(c_db, p))
        self.addCleanup(writer.close)
        nxt = SlotEffects(FakeFloating(), s.clock, esl=SwitchESL(c), db=writer,
                          records=s.records, timeouts=TIMEOUTS)
        self.successResultOf(nxt.acquire(SLOT, 2, DEAD))
        report = nxt.last_report
        assert report is not None
        self.assertTrue(report.ok, report.as_dict())
        self.assertEqual(report.count("recover", "recovered"), 6)
        self.assertEqual(report.count("registrations", "written"), 3)
        for uuid in s.uuids:
            self.assertEqual(c.api(f"uuid_exists {uuid}").body, "true")
            self.assertEqual(s.b.api(f"uuid_exists {uuid}").body, "false")

    def test_cancelled_while_reading_the_records_rolls_back_silently(self) -> None:
        # the node gives the claim up (lease lost, a better claim) after the address
        s = Scenario(self, calls=2, regs=1)
        rows = list(s.records.calls)
        s.records.hang = True
        order = ordered(s)
        d = s.effects.acquire(SLOT, 1, DEAD)
        self.assertEqual(order[-1], "records")
        d.cancel()
        self.failureResultOf(d)
        served = len(order)
        self.successResultOf(s.effects.release(SLOT))
        self.assertEqual(order[served], "ip down")
        rollback = s.effects.last_report
        assert rollback is not None
        self.assertEqual(rollback.action, "rollback")
        self.assertEqual(s.foreign_rows(), 0)
        self.assertEqual(table(s.b_db, "select count(*) from recovery")[0][0], 0)
        self.assertEqual(s.records.calls, rows)  # the next candidate's, untouched


class CachedSelfCheckTests(SynchronousTestCase):
    def scenario(self, answer: tuple[float, str] | None) -> tuple[Scenario, FakeHealth]:
        s = Scenario(self, calls=2, regs=0)
        health = FakeHealth(answer)
        s.effects.health = health
        return s, health

    def test_a_recent_probe_answer_is_the_self_check(self) -> None:
        s, health = self.scenario((0.3, READY))
        self.successResultOf(s.effects.acquire(SLOT, 1, DEAD))
        report = s.effects.last_report
        assert report is not None
        self.assertTrue(report.ok, report.as_dict())
        self.assertEqual(health.asked, [SELF_CHECK_MAX_AGE])
        self.assertNotIn("status", s.esl.commands)  # no round trip of its own
        self.assertEqual(report.count("self_check", "answer_age_ms"), 300)

    def test_a_recent_answer_saying_not_ready_fails_the_claim(self) -> None:
        s, _ = self.scenario((0.1, NOT_READY))
        failure = self.failureResultOf(s.effects.acquire(SLOT, 1, DEAD))
        self.assertIn("self_check", str(failure.value))
        self.assertEqual(s.floating.calls, [])  # nothing acquired
        self.assertNotIn("status", s.esl.commands)

    def test_no_recent_answer_asks_freeswitch(self) -> None:
        s, _ = self.scenario(None)
        self.successResultOf(s.effects.acquire(SLOT, 1, DEAD))
        self.assertEqual(s.esl.commands[0], "status")
        report = s.effects.last_report
        assert report is not None
        self.assertEqual(report.count("self_check", "answer_age_ms", -1), -1)


class RecentAnswerProperties(SynchronousTestCase):
    @given(sent=st.floats(0, 1e6), age=st.floats(-10, 10), max_age=st.floats(0, 5),
           usable=st.booleans(), answered=st.booleans())
    def test_an_answer_is_used_only_when_usable_and_young(
            self, sent: float, age: float, max_age: float, usable: bool,
            answered: bool) -> None:
        pong = (sent, READY) if answered else None
        now = sent + age
        got = recent_answer(pong, now, max_age, usable)
        if got is None:
            self.assertFalse(usable and answered and 0.0 <= now - sent <= max_age)
        else:
            self.assertTrue(usable and answered)
            self.assertLessEqual(got[0], max_age)
            self.assertGreaterEqual(got[0], 0.0)
            self.assertEqual(got[1], READY)


class SwitchHealthRecentStatusTests(ClientTestBase):
    def test_the_probe_pings_status_and_its_answer_ages(self) -> None:
        main, _main_conn = self.ready_client(request_timeout=1.0, hung_timeout=15.0)
        probe, conn = self.ready_client(ping_interval=0.5, ping_timeout=0.3, hung_timeout=5.0,
                                        ping_command=PROBE_COMMAND)
        health = SwitchHealth(main, probe)
        self.assertIsNone(health.recent_status(SELF_CHECK_MAX_AGE))  # nothing asked yet
        self.clock.advance(0.5)
        self.assertEqual(conn.lines(), ["api status"])
        self.clock.advance(0.01)
        conn.api_reply(READY)
        age, text = health.recent_status(SELF_CHECK_MAX_AGE) or (None, None)
        self.assertEqual((age, text), (0.0, READY))
        # FreeSWITCH stops answering: the answer grows old, then is no longer taken
        self.clock.advance(0.49)
        conn.lines()
        self.clock.advance(0.4)  # the ping is overdue (busy): not taken, however young
        self.assertTrue(health.busy())
        self.assertIsNone(health.recent_status(SELF_CHECK_MAX_AGE))
        conn.api_reply(READY)  # the late answer comes
        self.assertIsNotNone(health.recent_status(SELF_CHECK_MAX_AGE))
        self.clock.advance(SELF_CHECK_MAX_AGE + 0.01)
        conn.lines()
        self.assertIsNone(health.recent_status(SELF_CHECK_MAX_AGE))
        # a lost connection forgets its answers
        conn.api_reply(READY)
        self.assertIsNotNone(health.recent_status(SELF_CHECK_MAX_AGE))
        conn.close()
        self.assertIsNone(probe.last_pong)
        self.assertIsNone(health.recent_status(SELF_CHECK_MAX_AGE))


class HotStandbyOrderTests(SynchronousTestCase):
    def test_a_failure_after_the_address_hangs_up_nothing_that_can_leave(self) -> None:
        # hot standby: the address answers from floating_ips on; a failure at the rows is
        # rolled back with the address down before the hangup, the profile left running,
        # and the records whole
        from tests.test_hot_standby import hot_scenario

        s = hot_scenario(self)
        rows = list(s.records.calls)

        def broken(rows: Any, runtime: Any) -> Deferred[int]:
            return fail(CoreDBError("database is locked"))

        s.writer.write_recovery = broken  # type: ignore[method-assign]
        order = ordered(s)
        self.failureResultOf(s.effects.acquire(SLOT, 1, DEAD))
        acquire = s.effects.last_report
        assert acquire is not None
        self.assertEqual([st.name for st in acquire.steps][2:],
                         ["floating_ips", "profiles", "records", "recovery_rows"])
        self.assertEqual(acquire.count("profiles", "already_running"), 1)
        served = len(order)
        self.successResultOf(s.effects.release(SLOT))
        after = order[served:]
        self.assertEqual(after[0], "ip down")
        self.assertTrue(any(c.startswith("hupall") for c in after), after)
        self.assertFalse(any(c.startswith(f"sofia profile {PROFILE} stop") for c in after))
        self.assertEqual(s.foreign_rows(), 0)
        self.assertEqual(s.records.calls, rows)
