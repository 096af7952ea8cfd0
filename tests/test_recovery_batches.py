"""Recovery in batches (fsha.recovery, the takeover's ``recover`` step), with fakes and a
fake clock: the "FreeSWITCH" is the simulator's switch logic in-process (see
tests/test_takeover.py's Scenario)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from fsha.fsdb import RecoveryRow, encode_call_row, encode_registration
from fsha.recovery import FIRST_BATCH, plan_batches
from fsha.replication.state import ReplicatedState
from fsha.takeover import FAILED, OK, WARNING, SlotEffects, TakeoverStepError
from fsha.takeover.records import ReplicatedRecords
from fsha.wire.stream import Change, Kind, Op
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


class CancelledAfterRecoveryTests(SynchronousTestCase):
    """Issue 16: a takeover whose lease (or a better claim) ends it after calls were
    recovered. The lease wins (the addresses go, the profile stops serving), the calls end
    here with the addresses already down (a BYE can only leave from an address this host
    holds), and the previous master's replicated records stay, so the next attempt
    recovers the same calls."""

    def replicated(self, s: Scenario) -> tuple[ReplicatedState, ReplicatedRecords]:
        state = ReplicatedState(s.clock, 2, 1)
        values = [(Kind.CALL, r.uuid, encode_call_row(r)) for r in s.calls]
        values += [(Kind.REGISTRATION, r.call_id, encode_registration(r)) for r in s.regs]
        for seq, (kind, key, value) in enumerate(values, 1):
            state.apply(Change(DEAD.node_id, 7, seq, SLOT.slot_id, kind, key, Op.PUT, value,
                               0))
        records = ReplicatedRecords(state)
        s.records = records  # type: ignore[assignment]
        return state, records

    def hangups(self, s: Scenario) -> list[tuple[str, frozenset[str]]]:
        """Every channel hung up on B, with the addresses B held at that moment."""
        seen: list[tuple[str, frozenset[str]]] = []

        def listener(event: Any) -> None:
            if event.name == "CHANNEL_HANGUP":
                seen.append((event.get("Unique-ID"), frozenset(s.floating.held)))
        s.b.add_listener(listener)
        return seen

    def test_the_calls_end_silently_and_the_next_attempt_recovers_them(self) -> None:
        s = Scenario(self, calls=6, regs=3)
        state, records = self.replicated(s)
        held_before = sorted((r.kind, r.key) for r in state.records(origin=DEAD.node_id))
        effects = batched(s, 2)
        effects.records = records
        hangups = self.hangups(s)
        s.esl.rules[f"sofia profile {PROFILE} recover"] = ("delay", 1.0)
        d = effects.acquire(SLOT, 1, DEAD)
        s.clock.advance(1.0)  # the first batch is back: the calls are live here
        first = len(s.b.channels)
        self.assertIn(first, range(1, len(s.calls)))
        d.cancel()  # the lease ran out: the node lets go
        self.failureResultOf(d, TakeoverStepError)
        s.esl.rules.clear()
        self.successResultOf(effects.release(SLOT))
        rollback = effects.last_report
        assert rollback is not None
        self.assertEqual(rollback.action, "rollback")
        self.assertEqual([st.name for st in rollback.steps],
                         ["floating_ips", "profiles", "rollback"])
        step = rollback.step("rollback")
        assert step is not None
        self.assertEqual((step.outcome, step.counts["calls_left"]), (WARNING, first))
        self.assertIn("no BYE leaves", step.error or "")
        self.assertEqual(rollback.as_event()["calls_left"], first)
        # every recovered call ended after the address was gone: no BYE could leave
        self.assertEqual(len(s.b.channels), 0)
        self.assertGreaterEqual(len(hangups), first)
        self.assertEqual([uuid for uuid, held in hangups if held], [])
        # the previous master's records are untouched, every one of them
        self.assertEqual(sorted((r.kind, r.key) for r in state.records(origin=DEAD.node_id)),
                         held_before)
        # the next attempt (here this node's own) recovers the same calls, all of them
        d = effects.acquire(SLOT, 2, DEAD)
        for _ in range(100):
            if d.called:
                break
            s.clock.advance(0.1)
        self.successResultOf(d)
        again = effects.last_report
        assert again is not None and again.ok, again
        self.assertEqual(again.count("recover", "recovered"), len(s.calls))
        for uuid in s.uuids:
            self.assertIn(uuid, s.b.channels)
        self.assertEqual(len(s.b_registrations()), len(s.regs))

    def test_a_rollback_before_any_call_is_back_leaves_nothing_behind(self) -> None:
        # no call was live here: the plain rollback, no calls_left
        s = Scenario(self, calls=4, regs=0)
        effects = batched(s, 2)
        s.esl.rules[f"sofia profile {PROFILE} recover"] = "hang"
        d = effects.acquire(SLOT, 1, DEAD)
        s.clock.advance(0.5)
        d.cancel()
        self.failureResultOf(d, TakeoverStepError)
        s.esl.rules.clear()
        self.successResultOf(effects.release(SLOT))
        rollback = effects.last_report
        assert rollback is not None
        step = rollback.step("rollback")
        assert step is not None
        self.assertEqual(step.outcome, OK)
        self.assertNotIn("calls_left", step.counts)
        self.assertNotIn("calls_left", rollback.as_event())
        self.assertEqual(s.foreign_rows(), 0)


class LeaseLostAfterRecoveryTests(SynchronousTestCase):
    def make(self) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """5 real nodes (FakeCluster), in-process switches, the dead master's rows read
        from its own core DB (tests/test_takeover.py's NodeTakeoverTests, 5 nodes)."""
        from fsha.fsdb import CoreDBWriter, inline_runner
        from fsha.takeover import TakeoverTimeouts
        from tests.fakecluster import FakeCluster, make_config
        from tests.test_takeover import (
            DeadMasterRecords,
            FakeFloating,
            SwitchESL,
            db_in_own_folder,
            make_switch,
            reg_db,
        )

        config = make_config(nodes=5, slots=1)
        cluster = FakeCluster(config)
        workdir = Path(self.mktemp())
        workdir.mkdir(parents=True)
        paths = {n.name: db_in_own_folder(workdir, n.name) for n in config.nodes}
        records = DeadMasterRecords(paths)
        switches: dict[str, Any] = {}
        esls: dict[str, Any] = {}
        for node in config.nodes:
            switch = make_switch(cluster.clock, paths[node.name], node.name, autostart=False)
            self.addCleanup(switch.db.close)
            switches[node.name] = switch
            esls[node.name] = SwitchESL(switch)
            writer = CoreDBWriter(paths[node.name], inline_runner,
                                  registration_db=lambda p, n=node.name: reg_db(paths[n], p))
            self.addCleanup(writer.close)
            cluster.actions[node.name] = SlotEffects(  # type: ignore[assignment]
                FakeFloating(), cluster.clock, esl=esls[node.name], db=writer,
                records=records, timeouts=TakeoverTimeouts.from_config(config, node),
                recover_batch=1)
        return cluster, switches, esls

    def test_the_next_candidate_recovers_every_call(self) -> None:
        # The first candidate's lease runs out (cut off from its peers) after its first
        # batch is back; another node takes the slot over and recovers every call.
        cluster, switches, esls = self.make()
        seen: dict[str, list[frozenset[str]]] = {}
        for name, effects in cluster.actions.items():
            esls[name].rules["sofia profile slot1 recover"] = ("delay", 0.3)
            seen[name] = []

            def hangup(event: Any, name: str = name, floating: Any = effects.floating
                       ) -> None:
                if event.name == "CHANNEL_HANGUP":
                    seen[name].append(frozenset(floating.held))
            switches[name].add_listener(hangup)
        cluster.start_all()
        cluster.advance(2.0)
        self.assertEqual(cluster.masters(), {"slot1": "fs1"})
        uuids = []
        for i in range(5):
            uuids += switches["fs1"].place_call(PROFILE, caller=str(100 + i))
        switches["fs1"].stop()
        cluster.kill("fs1")
        others = ["fs2", "fs3", "fs4", "fs5"]
        first = None
        for _ in range(400):
            cluster.advance(0.05, step=0.005)
            first = next((n for n in others if switches[n].channels), None)
            if first is not None:
                break
        assert first is not None, "no candidate recovered a call"
        rest = {n for n in others if n != first}
        cluster.partition({first}, rest)  # its lease runs out within dead-after
        cluster.advance(6.0, step=0.005)
        winner = cluster.masters()["slot1"]
        self.assertIn(winner, rest)
        for uuid in uuids:
            self.assertEqual(switches[winner].api(f"uuid_exists {uuid}").body, "true")
        won = cluster.actions[winner].last_report
        self.assertEqual((won.action, won.ok, won.previous, won.count("recover", "recovered")),
                         ("acquire", True, "fs1", 5))
        reports = list(cluster.actions[first].reports)
        self.assertEqual([r.action for r in reports[:2]], ["acquire", "rollback"])
        left = reports[1].count("rollback", "calls_left")
        self.assertIn(left, range(1, 5))
        # the first candidate's calls ended only once its address was down
        self.assertEqual(len(switches[first].channels), 0)
        self.assertGreaterEqual(len(seen[first]), left)
        self.assertEqual([h for h in seen[first] if h], [])
