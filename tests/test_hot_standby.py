"""Hot standby profiles (``[takeover] profiles = "hot_standby"``) without I/O: the egress
fence (fsha.egress), the takeover's acquire and release (fsha.takeover), the guard's drop and
start-up reconciliation (fsha.localdrop). The real thing, on a real FreeSWITCH in network
namespaces, is tests/freeswitch/test_hot_standby_real.py."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from fsha.egress import (
    FenceStatus,
    MemoryEgressFence,
    NftEgressFence,
    fence_status,
    ruleset,
)
from fsha.localdrop import GuardSettings
from fsha.process import ProcessFailed, ProcessResult
from fsha.takeover import FAILED, OK, SlotEffects

from .test_guard import effects as local_effects
from .test_guard import settings as guard_settings
from .test_takeover import DEAD, PROFILE, SLOT, TIMEOUTS, Scenario, table

# What `nft -j list table inet fsha_egress` printed (nftables 1.0.6, Debian 12) for the
# fence of two IPv4 addresses and one IPv6 address, after 3 packets were dropped.
LISTING = json.dumps({"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5",
                  "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "fsha_egress", "handle": 2}},
    {"chain": {"family": "inet", "table": "fsha_egress", "name": "output", "handle": 1,
               "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}},
    {"rule": {"family": "inet", "table": "fsha_egress", "chain": "output", "handle": 3,
              "expr": [
                  {"match": {"op": "==", "left": {"payload": {"protocol": "ip",
                                                              "field": "saddr"}},
                             "right": {"set": ["198.18.0.101", "198.18.0.102"]}}},
                  {"match": {"op": "!=", "left": {"fib": {"result": "type",
                                                          "flags": ["saddr"]}},
                             "right": "local"}},
                  {"counter": {"packets": 3, "bytes": 1200}}, {"drop": None}]}},
    {"rule": {"family": "inet", "table": "fsha_egress", "chain": "output", "handle": 4,
              "expr": [
                  {"match": {"op": "==", "left": {"payload": {"protocol": "ip6",
                                                              "field": "saddr"}},
                             "right": "2001:db8::1"}},
                  {"match": {"op": "!=", "left": {"fib": {"result": "type",
                                                          "flags": ["saddr"]}},
                             "right": "local"}},
                  {"counter": {"packets": 0, "bytes": 0}}, {"drop": None}]}}]})


class FenceTests(SynchronousTestCase):
    def test_ruleset_replaces_the_table_in_one_transaction(self) -> None:
        text = ruleset(["198.18.0.102", "2001:db8::1", "198.18.0.101"])
        self.assertEqual(text, (
            "table inet fsha_egress; delete table inet fsha_egress; table inet fsha_egress "
            "{ chain output { type filter hook output priority 0; policy accept; "
            "ip saddr { 198.18.0.101, 198.18.0.102 } fib saddr type != local counter drop; "
            "ip6 saddr { 2001:db8::1 } fib saddr type != local counter drop; }; }"))

    def test_status_of_a_listing(self) -> None:
        status = fence_status(LISTING, ["198.18.0.101", "198.18.0.102", "2001:db8::1"])
        self.assertEqual(status, FenceStatus(True, ("198.18.0.101", "198.18.0.102",
                                                    "2001:db8::1"), (), 3, None))
        status = fence_status(LISTING, ["198.18.0.101", "198.18.0.103"])
        self.assertFalse(status.ok)
        self.assertEqual(status.missing, ("198.18.0.103",))
        self.assertEqual(status.problem, "no drop rule for 198.18.0.103")

    def test_a_rule_that_does_not_drop_or_ignores_locality_fences_nothing(self) -> None:
        data = json.loads(LISTING)
        rule = data["nftables"][3]["rule"]
        rule["expr"] = [*rule["expr"][:-1], {"accept": None}]
        self.assertFalse(fence_status(json.dumps(data), ["198.18.0.101"]).ok)
        data = json.loads(LISTING)
        data["nftables"][3]["rule"]["expr"].pop(1)  # no fib: would drop the master's own
        self.assertFalse(fence_status(json.dumps(data), ["198.18.0.101"]).ok)
        data = json.loads(LISTING)
        data["nftables"][2]["chain"]["hook"] = "input"
        self.assertFalse(fence_status(json.dumps(data), ["198.18.0.101"]).ok)

    def test_unreadable_listing(self) -> None:
        status = fence_status("not json", ["198.18.0.101"])
        self.assertFalse(status.ok)
        self.assertIn("unreadable listing", status.problem or "")

    def test_nft_fence_installs_then_reads_back(self) -> None:
        runs: list[tuple[str, ...]] = []

        class Runner:
            def run(self, argv: Any, timeout: float, **kw: Any) -> Deferred[ProcessResult]:
                runs.append(tuple(argv))
                out = LISTING.encode() if "-j" in argv else b""
                return succeed(ProcessResult(tuple(argv), 0, out, b"", 0.01))

        fence = NftEgressFence(Runner(), ["198.18.0.101"], 5.0)  # type: ignore[arg-type]
        status = self.successResultOf(fence.install())
        self.assertTrue(status.ok)
        self.assertEqual(runs, [("nft", ruleset(["198.18.0.101"])),
                                ("nft", "-j", "list", "table", "inet", "fsha_egress")])

    def test_nft_failure_is_a_status_not_an_error(self) -> None:
        class Runner:
            def run(self, argv: Any, timeout: float, **kw: Any) -> Deferred[ProcessResult]:
                return fail(ProcessFailed(argv, 1, b"Error: No such file or directory\n"))

        fence = NftEgressFence(Runner(), ["198.18.0.101"], 5.0)  # type: ignore[arg-type]
        status = self.successResultOf(fence.check())
        self.assertFalse(status.ok)
        self.assertEqual(status.missing, ("198.18.0.101",))
        self.assertIn("nft:", status.problem or "")


class ScriptedFence:
    """An egress fence whose ``check`` answers what ``answer()`` returns."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def install(self) -> Deferred[FenceStatus]:
        return self.check()

    def check(self) -> Deferred[FenceStatus]:
        return self.answer()  # type: ignore[no-any-return]


def hot_scenario(case: SynchronousTestCase, fence: Any = None,
                 calls: int = 4) -> Scenario:
    """The takeover scenario (a dead master's rows, successor B) with B's profile running
    from boot and B's effects in hot standby mode."""
    s = Scenario(case, calls=calls, regs=2)
    s.b.api(f"sofia profile {PROFILE} start")
    s.clock.advance(1)
    s.fence = fence if fence is not None else MemoryEgressFence((SLOT.ips[0].address,), True)
    s.effects = SlotEffects(s.floating, s.clock, esl=s.esl, db=s.writer, records=s.records,
                            timeouts=TIMEOUTS, hot_standby=True, egress=s.fence)
    s.effects.add_report_listener(s.reports.append)
    s.esl.commands.clear()
    return s


class HotStandbyTakeoverTests(SynchronousTestCase):
    def test_needs_a_fence(self) -> None:
        s = Scenario(self, calls=0, regs=0)
        with self.assertRaises(ValueError):
            SlotEffects(s.floating, s.clock, esl=s.esl, hot_standby=True)

    def test_acquire_checks_the_fence_and_starts_no_profile(self) -> None:
        s = hot_scenario(self)
        self.successResultOf(s.effects.acquire(SLOT, 2, DEAD))
        report = s.effects.last_report
        assert report is not None
        self.assertTrue(report.ok, report.as_dict())
        self.assertEqual([st.name for st in report.steps],
                         ["self_check", "fence", "floating_ips", "profiles", "records",
                          "recovery_rows", "egress", "recover", "registrations"])
        self.assertEqual(report.count("egress", "fenced"), 1)
        self.assertEqual(report.count("profiles", "already_running"), 1)
        self.assertEqual(report.count("recover", "recovered"), 6)
        sofia = [c for c in s.esl.commands if c.startswith("sofia")]
        self.assertEqual(sofia, ["sofia status", "sofia profile slot1 recover"])
        for uuid in s.uuids:
            self.assertEqual(s.b.api(f"uuid_exists {uuid}").body, "true")

    def test_a_profile_not_running_is_started_with_a_warning(self) -> None:
        s = hot_scenario(self)
        s.clock.advance(10)  # FreeSWITCH refuses to stop a profile younger than 10 s
        self.assertIn("stopping", s.b.api(f"sofia profile {PROFILE} stop").body)
        s.clock.advance(30)
        s.esl.commands.clear()
        d = s.effects.acquire(SLOT, 2, DEAD)
        s.clock.advance(1)
        self.successResultOf(d)
        report = s.effects.last_report
        assert report is not None
        profiles = report.step("profiles")
        assert profiles is not None
        self.assertEqual(profiles.outcome, "warning", report.as_dict())
        self.assertIn("not running, started now: slot1", profiles.error or "")
        self.assertIn("sofia profile slot1 start", s.esl.commands)

    def test_no_fence_no_takeover(self) -> None:
        s = hot_scenario(self, MemoryEgressFence((SLOT.ips[0].address,), False,
                                                 broken="flushed"))
        failure = self.failureResultOf(s.effects.acquire(SLOT, 2, DEAD))
        self.assertIn("egress", str(failure.value))
        report = s.effects.last_report
        assert report is not None
        egress = report.step("egress")
        assert egress is not None
        self.assertEqual(egress.outcome, FAILED)
        self.assertIn("no egress fence for 127.0.10.1: flushed", egress.error or "")
        self.assertNotIn("sofia profile slot1 recover", s.esl.commands,
                         "no call was recovered")
        # the node rolls back what it did: the address down, the rows written deleted
        self.successResultOf(s.effects.release(SLOT))
        self.assertEqual(s.floating.calls, [("up", "slot1"), ("down", "slot1")])
        self.assertEqual(s.foreign_rows(), 0)
        rollback = s.effects.last_report
        assert rollback is not None
        self.assertEqual((rollback.action, rollback.count("rollback", "rows_deleted")),
                         ("rollback", 6))

    def test_the_fence_is_read_once_beside_the_first_steps(self) -> None:
        answer: Deferred[FenceStatus] = Deferred()
        s = hot_scenario(self, ScriptedFence(lambda: answer))
        d = s.effects.acquire(SLOT, 2, DEAD)
        self.assertNoResult(d)
        # every step before it went on while nft ran; no call recovered before its answer
        self.assertIn("sofia status", s.esl.commands)
        self.assertNotIn("sofia profile slot1 recover", s.esl.commands)
        answer.callback(FenceStatus(True, (SLOT.ips[0].address,)))
        self.successResultOf(d)
        self.assertIn("sofia profile slot1 recover", s.esl.commands)

    def test_a_failed_read_is_a_failed_step(self) -> None:
        s = hot_scenario(self, ScriptedFence(lambda: fail(OSError("nft vanished"))))
        self.failureResultOf(s.effects.acquire(SLOT, 2, DEAD))
        report = s.effects.last_report
        assert report is not None
        self.assertIn("reading it failed: nft vanished",
                      report.step("egress").error or "")  # type: ignore[union-attr]

    def test_release_hangs_up_the_calls_and_keeps_the_profile(self) -> None:
        s = hot_scenario(self)
        self.successResultOf(s.effects.acquire(SLOT, 2, DEAD))
        s.esl.commands.clear()
        log: list[str] = []
        down = s.floating.down

        def recorded_down(slot: str, ips: Any) -> Deferred[None]:
            log.append("down")
            return down(slot, ips)

        s.floating.down = recorded_down  # type: ignore[method-assign]
        api = s.esl.api

        def recorded_api(command: str, timeout: float | None = None) -> Deferred[str]:
            log.append(command)
            return api(command, timeout)

        s.esl.api = recorded_api  # type: ignore[method-assign]
        self.successResultOf(s.effects.release(SLOT))
        report = s.effects.last_report
        assert report is not None
        self.assertTrue(report.ok, report.as_dict())
        self.assertEqual(log, ["down", "sofia status",
                               "hupall MANAGER_REQUEST sofia_profile_name slot1"])
        self.assertEqual(report.count("profiles", "calls"), 6)
        for uuid in s.uuids:
            self.assertEqual(s.b.api(f"uuid_exists {uuid}").body, "false")
        status = s.b.api("sofia status").body
        self.assertIn("RUNNING", status, "the profile keeps running")
        self.assertEqual(table(s.b_db, "select count(*) from recovery")[0][0], 0)
        # taken again at once: nothing to wait for (no stop, no 10 s guard, no UNPUBLISH)
        self.successResultOf(s.effects.acquire(SLOT, 3, None))
        again = s.effects.last_report
        assert again is not None
        self.assertEqual(again.count("profiles", "already_running"), 1)

    def test_classic_release_still_stops(self) -> None:
        s = Scenario(self, calls=1, regs=0)
        d = s.effects.acquire(SLOT, 2, DEAD)
        s.clock.advance(1)
        self.successResultOf(d)
        s.clock.advance(11)
        s.esl.commands.clear()
        self.successResultOf(s.effects.release(SLOT))
        self.assertIn("sofia profile slot1 stop", s.esl.commands)
        self.assertFalse(any(c.startswith("hupall") for c in s.esl.commands))
        report = s.effects.last_report
        assert report is not None
        self.assertEqual(report.step("profiles").outcome, OK)  # type: ignore[union-attr]


def hot_settings() -> GuardSettings:
    s = guard_settings()
    return GuardSettings(s.node, s.lease, s.backend, s.command, s.floating_timeout,
                         s.esl_host, s.esl_port, s.esl_password, s.esl_timeout, s.slots,
                         s.grace, True)


class HotStandbyGuardTests(SynchronousTestCase):
    def effects(self) -> Any:
        fx, runner = local_effects({"hupall MANAGER_REQUEST sofia_profile_name slot1":
                                    "+OK hangup all channels matching [sofia_profile_name]"
                                    "=[slot1] cause: MANAGER_REQUEST\n"})
        fx.settings = hot_settings()
        return fx, runner

    def test_drop_hangs_up_after_the_addresses_and_stops_nothing(self) -> None:
        fx, runner = self.effects()
        report = fx.drop_slot(fx.settings.slot(0))
        self.assertEqual(runner.calls, [
            ["ip", "addr", "del", "198.18.0.101/24", "dev", "ethC"],
            ["esl", "sofia status"],
            ["esl", "hupall MANAGER_REQUEST sofia_profile_name slot1"]])
        profiles = report["profiles"]
        self.assertEqual((profiles["stopped"], profiles["hung_up"], profiles["calls"]),
                         ([], ["slot1"], 2))

    def test_reconcile_hangs_up_every_running_slot_profile(self) -> None:
        fx, runner = self.effects()
        report = fx.reconcile()
        self.assertIn(["esl", "hupall MANAGER_REQUEST sofia_profile_name slot1"],
                      runner.calls)
        self.assertFalse(any(c[0] == "esl" and c[1].endswith(" stop") for c in runner.calls))
        self.assertEqual(report["profiles"]["not_running"], ["slot2"])

    def test_a_refused_hupall_is_a_problem(self) -> None:
        fx, _ = local_effects({"hupall MANAGER_REQUEST sofia_profile_name slot1":
                               "-ERR no such thing\n"})
        fx.settings = hot_settings()
        report = fx.drop_slot(fx.settings.slot(0))
        self.assertEqual(report["profiles"]["failed"], {"slot1": "-ERR no such thing"})

    def test_settings_carry_the_mode(self) -> None:
        s = hot_settings()
        self.assertEqual(GuardSettings.from_json(json.loads(json.dumps(s.as_json()))), s)
        old = s.as_json()
        del old["hot_standby"]  # a guard message of an older fsha
        self.assertFalse(GuardSettings.from_json(old).hot_standby)


class ReportWordsTests(SynchronousTestCase):
    def test_released_in_words(self) -> None:
        from fsha.guard import released

        self.assertEqual(released({"stopped": ["slot1"]}), "stopped: slot1")
        self.assertEqual(released({"stopped": [], "hung_up": ["slot1", "slot2"]}),
                         "kept running, calls hung up: slot1,slot2")
        self.assertEqual(released({"stopped": []}), "stopped: none")


