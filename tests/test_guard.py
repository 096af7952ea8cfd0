"""The guard (fsha.guard, fsha.localdrop, fsha.guardlink, fsha.wire.guard) without processes:
pure logic with explicit time, fake effects, a fake process, a fake clock."""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Sequence
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from fsha.config import FloatingIP
from fsha.guard import STOP_RETRIES, Drop, GuardCore, GuardProcess, default_lease
from fsha.guardlink import MAX_DEATHS, GuardLink
from fsha.localdrop import (
    BlockingESL,
    CommandResult,
    ESLUnavailable,
    GuardSettings,
    LocalEffects,
    SlotSettings,
    report_problems,
)
from fsha.wire.esl import encode_frame
from fsha.wire.guard import (
    Dropped,
    Free,
    GuardProtocolError,
    Hello,
    Hold,
    LineBuffer,
    Ready,
    Reconcile,
    Reconciled,
    decode,
    encode,
)
from fsha.wire.heartbeat import Role

from .fakecluster import FakeCluster, make_config

VIP = FloatingIP("198.18.0.101", 24, "ethC")


def settings(backend: str = "ip", command: tuple[str, ...] = (), lease: float = 0.08
             ) -> GuardSettings:
    return GuardSettings("fs1", lease, backend, command, 5.0, "127.0.0.1", 8021, "ClueCon",
                         1.0, (SlotSettings(0, "slot1", (VIP,), ("slot1",)),
                               SlotSettings(1, "slot2", (FloatingIP("198.18.0.102", 24,
                                                                    "ethC"),), ("slot2",))))


# -- the pipe's codec ------------------------------------------------------------------------


class CodecTests(SynchronousTestCase):
    def test_every_message_round_trips(self) -> None:
        for message in (Hello(settings().as_json()), Hold(1, 7, 123456789012), Free(0),
                        Reconcile(3), Ready(4242), Dropped(1, 7, {"reason": "x"}),
                        Reconciled(3, {"ips": {"removed": []}})):
            line = encode(message)
            self.assertTrue(line.endswith(b"\n"))
            self.assertEqual(line.count(b"\n"), 1)
            self.assertEqual(decode(line), message)

    def test_golden_lines(self) -> None:
        self.assertEqual(encode(Hold(0, 3, 5_000_000_000)), b"HOLD 0 3 5000000000\n")
        self.assertEqual(encode(Free(2)), b"FREE 2\n")
        self.assertEqual(decode(b"DROPPED 0 3 {\"reason\":\"lease\"}\n"),
                         Dropped(0, 3, {"reason": "lease"}))

    def test_the_golden_lines_of_the_protocol_page(self) -> None:
        from pathlib import Path
        page = Path(__file__).resolve().parent.parent / "docs" / "protocol" / "guard.rst"
        golden = [line.strip().removesuffix("\\n").encode() + b"\n"
                  for line in page.read_text().split("Golden lines")[1].splitlines()[2:]
                  if line.strip()]
        self.assertEqual(golden, [encode(Hold(0, 3, 5_000_000_000)), encode(Free(2)),
                                  encode(Dropped(0, 3, {"reason": "lease"}))])

    def test_bad_lines_are_refused_with_the_codec_error(self) -> None:
        for line in (b"", b"HOLD 1 2", b"HOLD -1 2 3", b"HOLD a b c", b"FREE", b"NOPE 1",
                     b"HELLO [1]", b"HELLO {", b"DROPPED 1 2", b"\xff", b"READY 1 2"):
            with self.assertRaises(GuardProtocolError, msg=line):
                decode(line)

    @given(st.binary(max_size=200))
    def test_decode_raises_only_its_own_error(self, data: bytes) -> None:
        try:
            decode(data)
        except GuardProtocolError:
            pass

    def test_line_buffer_splits_and_bounds(self) -> None:
        buf = LineBuffer(max_line=10)
        self.assertEqual(buf.feed(b"FREE 1\nFR"), [b"FREE 1"])
        self.assertEqual(buf.feed(b"EE 2\n"), [b"FREE 2"])
        with self.assertRaises(GuardProtocolError):
            buf.feed(b"x" * 11)


# -- the decision logic ----------------------------------------------------------------------


class CoreTests(SynchronousTestCase):
    def test_default_lease_is_dead_after(self) -> None:
        self.assertAlmostEqual(default_lease(0.02, 0.1), 0.1)

    def test_a_renewed_lease_never_expires(self) -> None:
        core = GuardCore(0.08)
        for i in range(100):
            now = i * 0.02
            self.assertTrue(core.hold(0, 1, now + 0.08, now))
            self.assertEqual(core.due(now + 0.019), [])
        self.assertEqual(core.next_wakeup(), 99 * 0.02 + 0.08)

    def test_an_unrenewed_lease_expires_at_its_deadline(self) -> None:
        core = GuardCore(0.08)
        core.hold(0, 1, 1.08, 1.0)
        self.assertEqual(core.due(1.079), [])
        drops = core.due(1.08)
        self.assertEqual([(d.slot, d.lease, d.retry) for d in drops], [(0, 1, False)])
        self.assertIn("lease expired", drops[0].reason)
        self.assertEqual(core.due(5.0), [], "dropped once")
        self.assertEqual(core.dropped, {0: 1})

    def test_a_running_but_late_fsha_gets_one_grace_a_stopped_one_none(self) -> None:
        core = GuardCore(0.1, grace=0.02)
        core.hold(0, 1, 1.1, 1.0)
        self.assertEqual(core.due(1.1, fsha_running=True), [], "busy: one more interval")
        self.assertEqual(core.due(1.119, fsha_running=True), [])
        self.assertEqual(len(core.due(1.12, fsha_running=True)), 1, "but only once")
        core = GuardCore(0.1, grace=0.02)
        core.hold(0, 1, 1.1, 1.0)
        self.assertEqual(len(core.due(1.1, fsha_running=False)), 1, "stopped: at once")

    def test_process_running_tells_a_stopped_process(self) -> None:
        import signal
        import subprocess

        from fsha.guard import process_running
        self.assertTrue(process_running(os.getpid()))
        child = subprocess.Popen(["sleep", "30"])
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        os.kill(child.pid, signal.SIGSTOP)
        import time
        end = time.monotonic() + 10
        while process_running(child.pid) and time.monotonic() < end:
            time.sleep(0.01)  # the stop takes effect asynchronously: poll, bounded
        self.assertFalse(process_running(child.pid))
        self.assertFalse(process_running(2**22 + 12345))

    def test_a_deadline_beyond_the_lease_is_cut_to_the_lease(self) -> None:
        core = GuardCore(0.08)
        core.hold(0, 1, 1000.0, 1.0)
        self.assertEqual(core.next_wakeup(), 1.08)

    def test_end_of_file_drops_everything_at_once(self) -> None:
        core = GuardCore(0.08)
        core.hold(0, 1, 1.08, 1.0)
        core.hold(1, 4, 1.08, 1.0)
        core.close(1.01)
        drops = core.due(1.01)
        self.assertEqual([(d.slot, d.lease) for d in drops], [(0, 1), (1, 4)])
        self.assertIn("fsha is gone", drops[0].reason)
        self.assertTrue(core.finished)

    def test_free_disarms(self) -> None:
        core = GuardCore(0.08)
        core.hold(0, 1, 1.08, 1.0)
        core.free(0)
        self.assertEqual(core.due(10.0), [])
        core.close(10.0)
        self.assertEqual(core.due(10.0), [])
        self.assertTrue(core.finished)

    def test_a_renewal_of_a_dropped_epoch_is_refused_a_new_epoch_is_taken(self) -> None:
        core = GuardCore(0.08)
        core.hold(0, 1, 1.08, 1.0)
        core.due(2.0)  # fsha was paused: dropped
        self.assertFalse(core.hold(0, 1, 2.08, 2.0), "the guard never takes a slot back")
        self.assertEqual(core.leases, {})
        self.assertTrue(core.hold(0, 2, 3.08, 3.0), "a new claim is armed")
        self.assertEqual(core.dropped, {})

    def test_a_refused_profile_stop_is_retried_a_bounded_number_of_times(self) -> None:
        core = GuardCore(0.08)
        drop = Drop(0, 1, "lease expired")
        now = 1.0
        for _ in range(STOP_RETRIES):
            self.assertTrue(core.retry_later(drop, 10.5, now))
            self.assertEqual(core.due(now + 10.4), [])
            (drop,) = core.due(now + 10.5)
            self.assertTrue(drop.retry)
            now += 10.5
        self.assertFalse(core.retry_later(drop, 10.5, now))

    def test_a_new_claim_cancels_a_pending_retry(self) -> None:
        core = GuardCore(0.08)
        core.retry_later(Drop(0, 1, "x"), 10.0, 1.0)
        core.hold(0, 2, 1.08, 1.0)
        self.assertEqual(core.retries, {})

    def test_after_end_of_file_nothing_is_taken(self) -> None:
        core = GuardCore(0.08)
        core.close(1.0)
        self.assertFalse(core.hold(0, 1, 1.08, 1.0))
        self.assertEqual(core.due(1.0), [])


# -- the effects -----------------------------------------------------------------------------


class FakeRunner:
    def __init__(self, results: dict[str, CommandResult] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.results = results or {}

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        self.calls.append(list(argv))
        return self.results.get(" ".join(argv), CommandResult(0, b"", b""))


class FakeESL:
    """What BlockingESL offers, with canned outputs; ``log`` is shared with the runner's."""

    def __init__(self, outputs: dict[str, str], log: list[Any]) -> None:
        self.outputs = outputs
        self.log = log

    def __enter__(self) -> FakeESL:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def api(self, command: str) -> str:
        self.log.append(["esl", command])
        return self.outputs.get(command, "-ERR no reply\n")


SOFIA_STATUS = ("Name\tType\tData\tState\n=====\n"
                "slot1\tprofile\tsip:mod_sofia@198.18.0.101:5060\tRUNNING (2)\n=====\n")


def effects(outputs: dict[str, str] | None = None, results: dict[str, CommandResult] | None
            = None, backend: str = "ip", command: tuple[str, ...] = ()
            ) -> tuple[LocalEffects, FakeRunner]:
    runner = FakeRunner(results)
    out = {"sofia status": SOFIA_STATUS,
           "sofia profile slot1 stop": "Reload XML [Success]\nstopping: slot1"}
    out.update(outputs or {})
    return LocalEffects(settings(backend, command), runner,
                        lambda s: FakeESL(out, runner.calls)), runner  # type: ignore[arg-type]


class LocalEffectsTests(SynchronousTestCase):
    def test_drop_takes_the_addresses_down_before_stopping_the_profiles(self) -> None:
        fx, runner = effects()
        report = fx.drop_slot(settings().slot(0))
        self.assertEqual(runner.calls[0], ["ip", "addr", "del", "198.18.0.101/24", "dev", "ethC"])
        self.assertEqual(runner.calls[1:], [["esl", "sofia status"],
                                            ["esl", "sofia profile slot1 stop"]])
        self.assertEqual(report["ips"]["removed"], ["198.18.0.101/24 dev ethC"])
        self.assertEqual(report["profiles"]["stopped"], ["slot1"])
        self.assertEqual(report["profiles"]["calls"], 2)
        self.assertEqual(report_problems(report), [])

    def test_an_address_not_held_is_fine_another_failure_is_reported(self) -> None:
        argv = "ip addr del 198.18.0.101/24 dev ethC"
        fx, _ = effects(results={argv: CommandResult(
            2, b"", b"RTNETLINK answers: Cannot assign requested address\n")})
        self.assertEqual(fx.release_ips(settings().slot(0))["failed"], {})
        fx, _ = effects(results={argv: CommandResult(2, b"", b"Operation not permitted\n")})
        report = fx.drop_slot(settings().slot(0))
        self.assertIn("Operation not permitted",
                      report["ips"]["failed"]["198.18.0.101/24 dev ethC"])
        self.assertEqual(report["profiles"]["stopped"], ["slot1"],
                         "the profile is stopped even so: it must not serve the slot")
        self.assertEqual(len(report_problems(report)), 1)

    def test_command_backend_runs_the_operators_program(self) -> None:
        fx, runner = effects(backend="command", command=("/usr/local/bin/vip",))
        fx.drop_slot(settings().slot(0))
        self.assertEqual(runner.calls[0], ["/usr/local/bin/vip", "down", "slot1",
                                           "198.18.0.101/24", "ethC"])

    def test_loopback_backend_changes_no_address(self) -> None:
        fx, runner = effects(backend="loopback")
        report = fx.drop_slot(settings().slot(0))
        self.assertEqual([c for c in runner.calls if c[0] != "esl"], [])
        self.assertEqual(report["ips"]["removed"], [])

    def test_a_profile_too_young_to_stop_gets_its_calls_hung_up_and_a_retry(self) -> None:
        rows = {"row_count": 3, "rows": [
            {"uuid": "a1b2-c3", "name": "sofia/slot1/1000@x"},
            {"uuid": "d4e5-f6", "name": "sofia/slot1/1001@x"},
            {"uuid": "0a0b-0c", "name": "sofia/slot10/1002@x"}]}
        fx, runner = effects({
            "sofia profile slot1 stop": "Profile slot1 must be up for at least 10 seconds "
                                        "to stop/restart.\nPlease wait 7 seconds\n",
            "show channels as json": json.dumps(rows),
            "uuid_kill a1b2-c3 MANAGER_REQUEST": "+OK\n",
            "uuid_kill d4e5-f6 MANAGER_REQUEST": "+OK\n"})
        report = fx.stop_profiles(["slot1"])
        self.assertEqual(report["too_young"], ["slot1"])
        self.assertEqual(report["calls_killed"], 2)
        self.assertEqual(report["retry_in"], 7.5)
        self.assertNotIn(["esl", "uuid_kill 0a0b-0c MANAGER_REQUEST"], runner.calls,
                         "another profile's call is left alone")

    def test_freeswitch_unreachable_is_reported_not_raised(self) -> None:
        def refuse(s: GuardSettings) -> BlockingESL:
            raise ESLUnavailable("cannot connect to 127.0.0.1:8021: refused")
        fx = LocalEffects(settings(), FakeRunner(), refuse)
        report = fx.drop_slot(settings().slot(0))
        self.assertIn("refused", report["profiles"]["esl"])
        self.assertEqual(report_problems(report),
                         ["FreeSWITCH: cannot connect to 127.0.0.1:8021: refused"])

    def test_reconcile_removes_every_slot_address_found_and_stops_running_profiles(self
                                                                                   ) -> None:
        listing = (b"1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n"
                   b"3: ethC    inet 198.18.0.3/24 brd 198.18.0.255 scope global ethC\n"
                   b"3: ethC    inet 198.18.0.102/24 scope global secondary ethC\n")
        fx, runner = effects(results={"ip -o addr show": CommandResult(0, listing, b"")})
        report = fx.reconcile()
        self.assertEqual(report["ips"]["removed"], ["198.18.0.102/24 dev ethC"])
        self.assertIn(["ip", "addr", "del", "198.18.0.102/24", "dev", "ethC"], runner.calls)
        self.assertEqual(report["profiles"]["stopped"], ["slot1"])
        self.assertEqual(report["profiles"]["not_running"], ["slot2"])
        self.assertNotIn(["esl", "sofia profile slot2 stop"], runner.calls)

    def test_settings_survive_json_and_bad_ones_are_refused(self) -> None:
        s = settings("command", ("/bin/vip",))
        self.assertEqual(GuardSettings.from_json(json.loads(json.dumps(s.as_json()))), s)
        for bad in ({}, {**s.as_json(), "backend": "nope"},
                    {**s.as_json(), "slots": [{"id": "x"}]}):
            with self.assertRaises(ValueError):
                GuardSettings.from_json(bad)

    def test_settings_from_the_cluster_config(self) -> None:
        config = make_config(nodes=3, slots=2)
        s = GuardSettings.from_config(config, config.nodes[0], 0.08)
        self.assertEqual([x.name for x in s.slots], [x.name for x in config.slots])
        self.assertEqual(s.esl_port, config.nodes[0].esl.port)


class BlockingESLTests(SynchronousTestCase):
    def connect(self, server_says: bytes) -> tuple[BlockingESL, socket.socket]:
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        theirs.sendall(server_says)
        esl = BlockingESL("127.0.0.1", 8021, "pw", 1.0, connect=lambda *a, **k: ours)
        self.addCleanup(esl.close)
        return esl, theirs

    def test_auth_then_api(self) -> None:
        esl, theirs = self.connect(
            encode_frame([("Content-Type", "auth/request")])
            + encode_frame([("Content-Type", "command/reply"), ("Reply-Text", "+OK accepted")])
            + encode_frame([("Content-Type", "text/event-plain")], b"Event-Name: HEARTBEAT\n\n")
            + encode_frame([("Content-Type", "api/response")], b"+OK\n"))
        self.assertEqual(esl.api("uuid_kill x"), "+OK\n")
        sent = theirs.recv(1000)
        self.assertEqual(sent, b"auth pw\n\napi uuid_kill x\n\n")

    def test_a_refused_password_is_unavailable(self) -> None:
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        theirs.sendall(encode_frame([("Content-Type", "auth/request")])
                       + encode_frame([("Content-Type", "command/reply"),
                                       ("Reply-Text", "-ERR invalid")]))
        with self.assertRaises(ESLUnavailable):
            BlockingESL("h", 1, "pw", 1.0, connect=lambda *a, **k: ours)

    def test_silence_times_out(self) -> None:
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        with self.assertRaises(ESLUnavailable) as e:
            BlockingESL("h", 1, "pw", 0.05, connect=lambda *a, **k: ours)
        self.assertIn("timed out", str(e.exception))


# -- the guard process's loop, in process ----------------------------------------------------


class FakeEffects:
    def __init__(self, s: GuardSettings) -> None:
        self.settings = s
        self.drops: list[str] = []

    def drop_slot(self, slot: SlotSettings) -> dict[str, Any]:
        self.drops.append(slot.name)
        return {"slot": slot.name, "ips": {"removed": [], "failed": {}},
                "profiles": {"stopped": list(slot.profiles), "calls": 0, "calls_killed": 0,
                             "failed": {}, "too_young": [], "retry_in": None}, "ms": 1.0}

    def reconcile(self) -> dict[str, Any]:
        return {"ips": {"removed": [], "failed": {}},
                "profiles": {"stopped": [], "calls": 0, "calls_killed": 0, "failed": {},
                             "too_young": []}, "ms": 1.0}


class GuardProcessTests(SynchronousTestCase):
    def run_guard(self, lines: list[Any]) -> tuple[list[Any], list[FakeEffects]]:
        read, write = os.pipe()
        os.write(write, b"".join(encode(m) for m in lines))
        os.close(write)  # end of file right after: fsha is gone
        out = io.BytesIO()
        made: list[FakeEffects] = []

        def effects_for(s: GuardSettings) -> Any:
            made.append(FakeEffects(s))
            return made[-1]
        try:
            code = GuardProcess(read, out, effects_for).run()  # type: ignore[arg-type]
        finally:
            os.close(read)
        self.assertEqual(code, 0)
        return [decode(line) for line in out.getvalue().splitlines()], made

    def test_end_of_file_drops_the_held_slot_and_says_so(self) -> None:
        import time
        said, made = self.run_guard([Hello(settings().as_json()),
                                     Hold(1, 5, time.monotonic_ns() + 10**9), Reconcile(1)])
        self.assertIsInstance(said[0], Ready)
        self.assertIsInstance(said[1], Reconciled)
        self.assertEqual([(m.slot, m.lease) for m in said if isinstance(m, Dropped)], [(1, 5)])
        self.assertEqual(made[0].drops, ["slot2"])

    def test_a_freed_slot_is_not_dropped(self) -> None:
        import time
        said, made = self.run_guard([Hello(settings().as_json()),
                                     Hold(0, 5, time.monotonic_ns() + 10**9), Free(0)])
        self.assertEqual(made[0].drops, [])
        self.assertEqual([type(m) for m in said], [Ready])

    def test_end_of_file_before_hello_just_leaves(self) -> None:
        said, made = self.run_guard([])
        self.assertEqual((said, made), ([], []))


# -- fsha's side ----------------------------------------------------------------------------


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: list[Any] = []
        self.stdin_closed = False

    def write(self, data: bytes) -> None:
        self.written.extend(decode(line) for line in data.splitlines())

    def closeStdin(self) -> None:
        self.stdin_closed = True


class LinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = FakeCluster(make_config(nodes=3, slots=2))
        self.cluster.start_all()
        self.node = self.cluster.nodes["fs1"]
        self.clock = self.cluster.clock
        self.processes: list[tuple[Any, FakeProcess]] = []
        self.mono = [10**12]

        def spawn(proto: Any, argv: Sequence[str]) -> FakeProcess:
            p = FakeProcess(1000 + len(self.processes))
            self.processes.append((proto, p))
            return p
        config = self.cluster.config
        self.link = GuardLink(GuardSettings.from_config(config, config.nodes[0], 0.08),
                              self.node, self.clock, spawn=spawn,
                              monotonic_ns=lambda: self.mono[0])
        self.link.startService()

    def said(self, kind: type) -> list[Any]:
        return [m for m in self.processes[-1][1].written if isinstance(m, kind)]

    def reply(self, message: Any) -> None:
        self.processes[-1][0].outReceived(encode(message))

    def test_hello_then_ready(self) -> None:
        self.assertEqual(len(self.said(Hello)), 1)
        self.assertEqual(self.link.state, "starting")
        self.reply(Ready(1000))
        self.assertEqual(self.link.status()["state"], "ready")

    def test_the_lease_is_renewed_every_tick_only_while_a_slot_is_held(self) -> None:
        self.cluster.advance(self.cluster.config.discovery - 0.01)
        self.assertEqual(self.said(Hold), [], "a starting node holds nothing")
        self.cluster.advance(1.0)
        self.assertEqual(self.node.role, Role.MASTER)
        holds = self.said(Hold)
        ticks = int(1.0 / self.cluster.config.heartbeat_interval)
        self.assertGreaterEqual(len(holds), ticks - 2)
        self.assertTrue(all(h.slot == self.node.slot and h.lease == 1
                            for h in holds))
        self.assertEqual(holds[-1].deadline_ns, self.mono[0] + 80_000_000)
        self.assertEqual(self.link.status()["holding"], {"slot": "slot1", "epoch": 1,
                                                        "lease": 1})

    def test_a_claim_is_leased_before_its_addresses_go_up_and_freed_after_release(self
                                                                                  ) -> None:
        self.cluster.advance(1.0)
        written = self.processes[-1][1].written
        first_hold = next(i for i, m in enumerate(written) if isinstance(m, Hold))
        self.assertEqual(written[first_hold].lease, 1)
        self.node.set_maintenance(True)
        self.cluster.advance(0.1)
        self.assertEqual(self.node.role, Role.SLAVE)
        self.assertEqual(self.said(Free), [Free(0)])
        before = len(self.said(Hold))
        self.cluster.advance(0.5)
        self.assertEqual(len(self.said(Hold)), before, "no renewal once the slot is free")

    def test_a_drop_makes_the_node_release(self) -> None:
        self.cluster.advance(1.0)
        self.assertEqual(self.node.role, Role.MASTER)
        self.reply(Dropped(0, 1, {"reason": "lease expired 5 ms ago",
                                  "ips": {"removed": ["x"], "failed": {}},
                                  "profiles": {"stopped": ["slot1"], "calls": 3,
                                               "calls_killed": 0, "failed": {}}}))
        self.cluster.advance(1.0)
        self.assertEqual(self.node.role, Role.SLAVE)
        self.assertEqual(self.cluster.masters()["slot1"], "fs3")
        events = [e["event"] for e in self.node.events]
        self.assertIn("guard-dropped", events)
        self.assertIn("resources-lost", events)
        self.assertEqual(self.link.status()["last_drop"]["calls_hung_up"], 3)

    def test_every_claim_gets_a_new_lease_number_even_with_the_same_epoch(self) -> None:
        self.cluster.advance(1.0)
        self.reply(Dropped(0, 1, {"reason": "lease expired"}))
        self.cluster.advance(0.1)
        # the same slot claimed again (here by hand) at the same epoch: a new lease
        self.node.unfit_until = 0.0
        self.link.role_changed(Role.SLAVE, Role.CLAIMING, self.cluster.config.slots[0])
        machine = self.node._machine  # the role machine owns the role: poked by hand too
        machine.role, machine.slot, machine.epoch = Role.CLAIMING, 0, 1
        self.link.tick()
        self.assertEqual(self.said(Hold)[-1].lease, 2)
        self.assertEqual(self.link.status()["holding"], {"slot": "slot1", "epoch": 1,
                                                        "lease": 2})

    def test_a_drop_of_another_epoch_changes_nothing(self) -> None:
        self.cluster.advance(1.0)
        self.reply(Dropped(0, 9, {"reason": "old", "repeat": True}))
        self.assertEqual((self.node.role, self.node.slot), (Role.MASTER, 0))

    def test_a_dead_guard_is_restarted_and_given_the_lease_again(self) -> None:
        self.cluster.advance(1.0)
        proto, _ = self.processes[-1]
        proto.processEnded(Failure(error.ProcessTerminated(exitCode=1)))
        self.assertEqual(self.link.state, "restarting")
        self.clock.advance(0.1)
        self.assertEqual(len(self.processes), 2)
        self.assertEqual(len(self.said(Hello)), 1)
        self.assertEqual(len(self.said(Hold)), 1, "the lease at once, not at the next tick")
        self.assertTrue(self.link.ok)

    def test_a_guard_that_keeps_dying_is_given_up_and_the_node_lets_its_slot_go(self
                                                                                ) -> None:
        self.cluster.advance(1.0)
        for _ in range(MAX_DEATHS):
            self.processes[-1][0].processEnded(Failure(error.ProcessTerminated(exitCode=1)))
            self.clock.advance(6.0)
        self.assertEqual(self.link.state, "failed")
        self.assertFalse(self.link.ok)
        self.assertIn("guard-failed", [e["event"] for e in self.node.events])

    def test_stop_closes_the_pipe(self) -> None:
        d = self.link.stopService()
        proto, process = self.processes[-1]
        self.assertTrue(process.stdin_closed)
        self.assertNoResult(d)
        proto.processEnded(Failure(error.ProcessDone(0)))
        self.successResultOf(d)
        self.assertEqual(self.link.state, "stopped")

    def test_reconcile_asks_once_ready(self) -> None:
        d = self.link.reconcile(5.0)
        self.assertEqual(self.said(Reconcile), [])
        self.reply(Ready(1000))
        (ask,) = self.said(Reconcile)
        self.reply(Reconciled(ask.request, {"ips": {"removed": []}}))
        self.assertEqual(self.successResultOf(d), {"ips": {"removed": []}})

    def test_reconcile_times_out(self) -> None:
        d = self.link.reconcile(5.0)
        self.clock.advance(5.1)
        self.failureResultOf(d)


class NodeHookTests(SynchronousTestCase):
    def test_resources_lost_releases_only_the_held_slot_and_epoch(self) -> None:
        cluster = FakeCluster(make_config(nodes=3, slots=2))
        cluster.start_all()
        cluster.advance(1.0)
        node = cluster.nodes["fs1"]
        self.assertFalse(node.resources_lost(1, 1, "not mine"))
        self.assertFalse(node.resources_lost(0, 7, "another epoch"))
        self.assertTrue(node.resources_lost(0, 1, "the guard dropped the slot"))
        cluster.advance(0.01)
        self.assertEqual(cluster.actions["fs1"].held, set())
        cluster.advance(1.0)
        self.assertEqual(cluster.masters(), {"slot1": "fs3", "slot2": "fs2"},
                         "handed over to the next candidate, which recovers the calls")
        self.assertEqual(cluster.nodes["fs3"].epoch, 2)

    def test_a_claim_that_lost_its_lease_may_claim_again(self) -> None:
        cluster = FakeCluster(make_config(nodes=3, slots=2))
        cluster.start_all()
        cluster.actions["fs1"].hang_acquire = True
        cluster.advance(cluster.config.discovery + 0.1)
        node = cluster.nodes["fs1"]
        self.assertEqual(node.role, Role.CLAIMING)
        self.assertTrue(node.resources_lost(node.slot, node.epoch, "the guard dropped it"))
        self.assertLess(node.unfit_until, cluster.clock.seconds(), "not unfit")

    def test_tick_listeners_run_before_each_heartbeat(self) -> None:
        cluster = FakeCluster(make_config(nodes=3, slots=2))
        node = cluster.start("fs1")
        seen: list[int] = []
        sent = node.sequence
        node.add_tick_listener(lambda: seen.append(node.sequence))
        cluster.advance(0.5)
        self.assertGreater(len(seen), 5)
        # each listener call saw the sequence of the previous heartbeat, not of its own
        self.assertEqual(seen[0], sent)
        self.assertEqual(seen[-1] + 1, node.sequence)


class ConfigTests(SynchronousTestCase):
    def parse(self, guard: Any = None, **cluster: Any) -> Any:
        import tomllib

        from fsha.config import parse_config
        from tests.fakecluster import DEMO
        raw = tomllib.loads(DEMO.read_text())
        raw["cluster"].update(cluster)
        if guard is not None:
            raw["guard"] = guard
        return parse_config(raw, DEMO)

    def test_default_guard_is_on_with_a_lease_of_dead_after(self) -> None:
        config = self.parse(heartbeat_interval_ms=20, dead_after_ms=100)
        assert config.guard is not None
        self.assertTrue(config.guard.enabled)
        self.assertAlmostEqual(config.guard.lease, 0.1)

    def test_lease_and_enabled_can_be_set(self) -> None:
        config = self.parse({"enabled": False, "lease_ms": 60}, heartbeat_interval_ms=20,
                            dead_after_ms=100)
        self.assertEqual((config.guard.enabled, config.guard.lease), (False, 0.06))

    def test_a_lease_that_would_outlive_the_peers_patience_is_refused(self) -> None:
        from fsha.config import ConfigError
        for lease in (101, 150, 10):
            with self.assertRaises(ConfigError) as e:
                self.parse({"lease_ms": lease}, heartbeat_interval_ms=20, dead_after_ms=100)
            self.assertIn("guard.lease_ms", str(e.exception))
        with self.assertRaises(ConfigError) as e:
            self.parse({"lease": 10})
        self.assertIn("guard.lease: unknown key", str(e.exception))

    def test_the_guard_is_not_part_of_the_config_digest(self) -> None:
        self.assertEqual(self.parse().digest, self.parse({"enabled": False}).digest)


class ReconcileCommandTests(SynchronousTestCase):
    def test_a_stopped_freeswitch_serves_nothing_and_is_no_problem(self) -> None:
        from contextlib import redirect_stdout

        from fsha.localdrop import reconcile_main
        from tests.fakecluster import DEMO
        out = io.StringIO()
        with redirect_stdout(out):
            code = reconcile_main(["--config", str(DEMO), "--node", "fs1", "--json"])
        report = json.loads(out.getvalue())
        self.assertEqual(code, 0, report)
        self.assertIn("not running", report["profiles"]["freeswitch"])
        self.assertEqual(report["ips"]["removed"], [])

    def test_a_bad_config_exits_2(self) -> None:
        from contextlib import redirect_stderr

        from fsha.localdrop import reconcile_main
        err = io.StringIO()
        with redirect_stderr(err):
            code = reconcile_main(["--config", "/nonexistent/cluster.toml"])
        self.assertEqual(code, 2)
        self.assertIn("fsha reconcile:", err.getvalue())


class StatusTests(SynchronousTestCase):
    def status(self, guard: dict[str, Any]) -> dict[str, Any]:
        cluster = FakeCluster(make_config(nodes=3, slots=2))
        cluster.start_all()
        cluster.advance(cluster.config.discovery + 0.5)
        status = cluster.nodes["fs1"].status()
        status["guard"] = guard
        return status

    def test_the_guard_line_and_its_problems(self) -> None:
        from fsha.status import problems, render
        ready = {"enabled": True, "state": "ready", "pid": 42, "lease_ms": 80.0,
                 "restarts": 0, "holding": {"slot": "slot1", "epoch": 2},
                 "last_drop": {"slot": "slot1", "epoch": 1, "time": 1_000_000.0,
                               "reason": "fsha is gone"}}
        status = self.status(ready)
        self.assertEqual(problems(status), [])
        text = render(status)
        self.assertIn("guard: ready (pid 42, lease 80 ms), holding slot1/2; last drop "
                      "slot1/1 at ", text)
        self.assertIn("given up", problems(self.status({**ready, "state": "failed"}))[0])
        self.assertIn("disabled", problems(self.status({"enabled": False}))[0])


class StartUpReconciliationTests(SynchronousTestCase):
    """NodeService: the guard's start-up stops are profiles sofia frees asynchronously."""

    def test_profiles_stopped_at_start_up_make_a_claim_wait_for_their_unpublish(self) -> None:
        from twisted.internet import defer
        from twisted.internet.task import Clock

        from fsha.localdrop import GuardSettings
        from fsha.tap import NodeService

        config = make_config(3, 1)
        me = config.nodes[0]
        report = {"ms": 1.0, "ips": {"removed": [], "failed": {}, "backend": "loopback"},
                  "profiles": {"stopped": ["slot1"], "not_running": [], "too_young": [],
                               "calls": 0, "calls_killed": 0, "failed": {},
                               "retry_in": None}}
        events: list[tuple[str, dict[str, Any]]] = []
        stopped: list[str] = []
        started: list[bool] = []

        class Node:
            clock = Clock()

            def __init__(self) -> None:
                self.config = config

            def record_event(self, kind: str, **fields: Any) -> None:
                events.append((kind, fields))

            def start(self) -> None:
                started.append(True)

        class Floating:
            def cleanup(self, ips: Any) -> defer.Deferred[list[Any]]:
                return defer.succeed([])

        class Effects:
            def stop_issued(self, profile: str) -> None:
                stopped.append(profile)

        class Guard:
            settings = GuardSettings.from_config(config, me, 0.1)

            def reconcile(self, timeout: float) -> defer.Deferred[dict[str, Any]]:
                return defer.succeed(report)

        service = NodeService(Node(), Floating(), Effects(), 1.0, Guard())  # type: ignore[arg-type]
        service.startService()
        self.assertEqual(stopped, ["slot1"])
        self.assertEqual(started, [True])
        self.assertEqual(events[0][0], "reconciled")
