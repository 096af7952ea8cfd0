"""Recovery in batches (fsha.recovery, the takeover's ``recover`` step), with fakes and a
fake clock: the "FreeSWITCH" is the simulator's switch logic in-process (see
tests/test_takeover.py's Scenario)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from fsha.fsdb import RecoveryRow
from fsha.recovery import FIRST_BATCH, plan_batches
from fsha.takeover import FAILED, OK, WARNING, SlotEffects, TakeoverStepError
from tests.test_takeover import DEAD, PROFILE, SLOT, TIMEOUTS, Scenario, table


def batched(s: Scenario, batch: int) -> SlotEffects:
    s.effects = SlotEffects(s.floating, s.clock, esl=s.esl, db=s.writer, records=s.records,
                            timeouts=TIMEOUTS, recover_batch=batch)
    s.effects.add_report_listener(s.reports.append)
    return s.effects


def row(uuid: str, profile: str = PROFILE, peer: str | None = None) -> RecoveryRow:
    meta = f"<cdr><variables><uuid>{uuid}</uuid>"
    if peer is not None:
        meta += f"<bridge_to>{peer}</bridge_to>"
    return RecoveryRow("dead-runtime", "sofia", profile, "fs1", uuid, meta + "</variables></cdr>")


class PlanTests(SynchronousTestCase):
    def test_round_robin_over_profiles(self) -> None:
        rows = [row(f"a{i}", "p1") for i in range(5)] + [row(f"b{i}", "p2") for i in range(2)]
        plan = plan_batches(rows, ["p1", "p2"], 2, first=2)
        self.assertEqual([(b.profile, b.round, [r.uuid for r in b.rows]) for b in plan], [
            ("p1", 0, ["a0", "a1"]), ("p2", 0, ["b0", "b1"]),
            ("p1", 1, ["a2", "a3"]), ("p1", 2, ["a4"])])

    def test_a_bridged_pair_is_not_split(self) -> None:
        rows = [row("s1"), row("x", peer="y"), row("y", peer="x"), row("s2")]
        plan = plan_batches(rows, [PROFILE], 2, first=2)
        self.assertEqual([[r.uuid for r in b.rows] for b in plan],
                         [["s1", "x", "y"], ["s2"]])

    def test_the_first_batch_is_small(self) -> None:
        rows = [row(f"a{i}") for i in range(250)]
        plan = plan_batches(rows, [PROFILE], 100)
        self.assertEqual([len(b.rows) for b in plan], [FIRST_BATCH, 100, 100, 30])
        self.assertEqual([len(b.rows) for b in plan_batches(rows[:5], [PROFILE], 2)],
                         [2, 2, 1])

    def test_bad_batch(self) -> None:
        self.assertRaises(ValueError, plan_batches, [], [PROFILE], 0)

    @given(st.lists(st.tuples(st.sampled_from(["p1", "p2", "other"]), st.booleans()),
                    max_size=60),
           st.integers(min_value=1, max_value=9), st.integers(min_value=1, max_value=9))
    def test_every_row_once_in_order_and_bounded(self, spec: list[tuple[str, bool]],
                                                 batch: int, first: int) -> None:
        rows: list[RecoveryRow] = []
        for i, (profile, paired) in enumerate(spec):
            if paired:
                rows += [row(f"{i}a", profile, f"{i}b"), row(f"{i}b", profile, f"{i}a")]
            else:
                rows.append(row(str(i), profile))
        plan = plan_batches(rows, ["p1", "p2"], batch, first)
        for profile in ("p1", "p2"):
            planned = [r for b in plan if b.profile == profile for r in b.rows]
            self.assertEqual(planned, [r for r in rows if r.profile_name == profile])
        for b in plan:
            self.assertLessEqual(len(b.rows), batch + 1)
            self.assertTrue(all(r.profile_name == b.profile for r in b.rows))
        rounds = [b.round for b in plan]
        self.assertEqual(rounds, sorted(rounds))


class BatchedRecoverTests(SynchronousTestCase):
    def test_every_call_back_in_batches(self) -> None:
        s = Scenario(self, calls=8, regs=0)  # 4 single calls and 4 bridged pairs: 12 rows
        batched(s, 2)
        self.successResultOf(s.effects.acquire(SLOT, 2, DEAD))
        report = s.effects.last_report
        assert report is not None and report.ok, report
        step = report.step("recover")
        assert step is not None
        self.assertEqual(step.outcome, OK, step.error)
        self.assertEqual(step.counts["recovered"], 12)
        self.assertEqual(step.counts["batches_done"], step.counts["batches"])
        self.assertGreaterEqual(step.counts["batches"], 4)
        recovers = [c for c in s.esl.commands if c == f"sofia profile {PROFILE} recover"]
        self.assertEqual(len(recovers), step.counts["batches"])
        self.assertIn(report.count("recovery_rows", "written"), (2, 3))  # the first batch
        for uuid in s.uuids:
            self.assertIn(uuid, s.b.channels)
        # bridged pairs are bridged again (both legs came back in one recover)
        bridged = [ch for ch in s.b.channels.values() if ch.other_leg is not None]
        self.assertEqual(len(bridged), 8)
        # nothing of the dead runtime is left in the table
        self.assertEqual(s.foreign_rows(), 0)
        # and no copy of the dead master's rows is kept once the acquisition is complete
        acq = s.effects._acquisitions[SLOT.slot_id]
        self.assertEqual((acq.rows, acq.plan, acq.registrations), ([], [], []))

    def test_a_slow_recover_that_keeps_going_is_not_cut(self) -> None:
        # Each batch takes 1.5 s (its bound: TIMEOUTS.recover = 2 s); the 6 batches take
        # far longer than the step's own timeout, which counts from the last batch.
        s = Scenario(self, calls=6, regs=0)
        batched(s, 1)
        s.esl.rules[f"sofia profile {PROFILE} recover"] = ("delay", 1.5)
        d = s.effects.acquire(SLOT, 1, DEAD)
        progress = []
        for _ in range(100):
            progress.append(s.effects.claim_progress(SLOT))
            s.clock.advance(0.25)
        self.successResultOf(d)
        report = s.effects.last_report
        assert report is not None and report.ok
        step = report.step("recover")
        assert step is not None
        self.assertEqual((step.outcome, step.counts["recovered"]), (OK, len(s.calls)))
        self.assertGreater(step.ms, (TIMEOUTS.db + TIMEOUTS.recover + TIMEOUTS.esl) * 1000)
        self.assertIsNone(s.effects.claim_progress(SLOT))  # done
        moves = sorted({p for p in progress if p is not None})
        self.assertGreaterEqual(len(moves), 6)  # the node's claim timeout follows these

    def test_a_stall_after_calls_are_back_is_a_warning_not_a_rollback(self) -> None:
        s = Scenario(self, calls=6, regs=2)
        batched(s, 2)
        answers = iter([None])  # the first recover runs; every later one stalls

        original = s.esl.api

        def api(command: str, timeout: float | None = None) -> Deferred[str]:
            if command.endswith(" recover") and next(answers, "stall") == "stall":
                s.esl.commands.append(command)
                return s.esl._hang(command, timeout)
            return original(command, timeout)

        s.esl.api = api  # type: ignore[method-assign]
        d = s.effects.acquire(SLOT, 1, DEAD)
        s.clock.advance(TIMEOUTS.recover)
        self.successResultOf(d)  # completed: the node becomes master
        report = s.effects.last_report
        assert report is not None and report.ok
        step = report.step("recover")
        assert step is not None
        self.assertEqual(step.outcome, WARNING)
        self.assertIn("batch 2 of", step.error or "")
        self.assertIn("calls already up are kept", step.error or "")
        first = report.count("recovery_rows", "written")
        self.assertEqual(step.counts["recovered"], first)
        self.assertEqual(step.counts["not_recovered"], len(s.calls) - first)
        self.assertEqual(len(s.b.channels), first)  # still up
        self.assertEqual(report.step("registrations").outcome, OK)  # type: ignore[union-attr]
        self.assertEqual(s.floating.held, {"127.0.10.1"})

    def test_a_stall_before_any_call_is_back_fails(self) -> None:
        s = Scenario(self, calls=4, regs=0)
        batched(s, 2)
        s.esl.rules[f"sofia profile {PROFILE} recover"] = "timeout"
        d = s.effects.acquire(SLOT, 1, DEAD)
        s.clock.advance(TIMEOUTS.recover)
        failure = self.failureResultOf(d, TakeoverStepError)
        self.assertEqual(failure.value.step, "recover")
        report = s.effects.last_report
        assert report is not None
        self.assertEqual(report.step("recover").outcome, FAILED)  # type: ignore[union-attr]
        s.esl.rules.clear()
        self.successResultOf(s.effects.release(SLOT))
        self.assertEqual(s.foreign_rows(), 0)  # the written batch was rolled back

    def test_cancel_between_batches_rolls_back_only_the_unrecovered_rows(self) -> None:
        s = Scenario(self, calls=6, regs=0)
        batched(s, 2)
        s.esl.rules[f"sofia profile {PROFILE} recover"] = ("delay", 1.0)
        d = s.effects.acquire(SLOT, 1, DEAD)
        s.clock.advance(1.0)  # first batch back
        # only the first batch is back; a recovered batch's rows are let go
        self.assertIn(len(s.b.channels), range(1, 6))
        self.assertEqual(s.effects._acquisitions[SLOT.slot_id].plan[0].rows, ())
        d.cancel()  # the node lost the slot to a better claim
        self.failureResultOf(d, TakeoverStepError)
        s.esl.rules.clear()
        self.successResultOf(s.effects.release(SLOT))
        self.assertEqual(s.foreign_rows(), 0)
        # The rollback deleted only the unrecovered foreign rows; the calls already recovered
        # were hung up by the release (the slot is another node's now: its profile is too
        # young to stop, so its calls go with hupall), and FreeSWITCH deleted their rows.
        self.assertEqual(len(s.b.channels), 0)
        own = table(s.b_db, "select count(*) from recovery where runtime_uuid=?",
                    s.b.core_uuid)[0][0]
        self.assertEqual(own, 0)
