"""Cluster events into FreeSWITCH: a fake ESL with a fake cluster, then the simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fsha.eslclient import ESLClient, ESLTimeout
from fsha.fsevents import ClusterEvents, event_headers, header_name
from fsha.harness import poll_until
from fsha.wire.esl import Event

from .fakecluster import FakeCluster, make_config

reactor: Any = _reactor
DEADLINE = 15.0


class FakeESL:
    """Records ``sendevent``; answers at once, or holds the reply (``hold``), or fails."""

    def __init__(self) -> None:
        self.is_healthy = True
        self.sent: list[tuple[str, list[tuple[str, str]], float | None]] = []
        self.hold = False
        self.fail: Exception | None = None
        self.held: list[defer.Deferred[str]] = []
        self.listeners: list[Any] = []

    def sendevent(self, name: str, headers: Any = (), body: bytes = b"",
                  timeout: float | None = None) -> defer.Deferred[str]:
        self.sent.append((name, list(headers), timeout))
        if self.fail is not None:
            return defer.fail(self.fail)
        if self.hold:
            d: defer.Deferred[str] = defer.Deferred()
            self.held.append(d)
            return d
        return defer.succeed(f"uuid-{len(self.sent)}")

    def add_state_listener(self, callback: Any) -> None:
        self.listeners.append(callback)

    def set_healthy(self, ok: bool) -> None:
        self.is_healthy = ok
        for callback in self.listeners:
            callback(None, None)

    def events(self) -> list[dict[str, str]]:
        return [dict(headers) for _, headers, _ in self.sent]

    def subclasses(self) -> list[str]:
        return [h["Event-Subclass"] for h in self.events()]


def formed(**kw: Any) -> tuple[FakeCluster, FakeESL, ClusterEvents]:
    """A formed 3-node, 2-slot cluster; events of fs3 (the slave) into a fake ESL."""
    cluster = FakeCluster(make_config(nodes=3, slots=2))
    cluster.start_all()
    esl = FakeESL()
    events = ClusterEvents(esl, cluster.nodes["fs3"], **kw)  # type: ignore[arg-type]
    events.start()
    cluster.advance(cluster.config.discovery + 0.5)
    return cluster, esl, events


class NodeEventListenerTests(SynchronousTestCase):
    def test_listener_sees_every_event_and_a_failing_one_is_logged(self) -> None:
        cluster = FakeCluster(make_config(nodes=3, slots=2))
        seen: list[dict[str, Any]] = []
        node = cluster.start("fs1")

        def broken(event: dict[str, Any]) -> None:
            raise RuntimeError("listener bug")

        node.add_event_listener(broken)
        node.add_event_listener(seen.append)
        cluster.start("fs2")
        cluster.advance(cluster.config.discovery + 0.5)
        self.assertEqual([e["event"] for e in seen], [e["event"] for e in node.events][1:])
        self.assertIn("role", [e["event"] for e in seen])
        self.assertEqual(seen[-1], node.events[-1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), len(seen))
        self.assertEqual(node.role.name, "MASTER")  # the node carried on


class ClusterEventsTests(SynchronousTestCase):
    def test_takeover_story_as_custom_events(self) -> None:
        cluster, esl, events = formed()
        self.assertEqual(esl.subclasses(), ["fsha::peer-up", "fsha::peer-up", "fsha::role",
                                            "fsha::peer-takeover", "fsha::peer-takeover"])
        up = esl.sent[0][1]
        self.assertEqual([v for k, v in up if k == "FSHA-Incarnation"],
                         [str(cluster.nodes["fs3"].incarnation)])  # the firing node's only
        self.assertIn(dict(up)["FSHA-Peer-Incarnation"],
                      {str(cluster.nodes[n].incarnation) for n in ("fs1", "fs2")})
        role = esl.events()[2]
        self.assertEqual((role["FSHA-Role"], role["FSHA-Old-Role"]), ("slave", "starting"))
        del esl.sent[:]
        cluster.kill("fs1")
        cluster.advance(1.0)
        self.assertEqual(esl.subclasses(), [
            "fsha::peer-down", "fsha::role", "fsha::takeover-start", "fsha::role",
            "fsha::takeover-finish"])
        name, headers, timeout = esl.sent[2]
        self.assertEqual((name, timeout), ("CUSTOM", events.send_timeout))
        self.assertEqual(headers[0], ("Event-Subclass", "fsha::takeover-start"))
        start = dict(headers)
        self.assertEqual(start["FSHA-Cluster"], "demo")
        self.assertEqual(start["FSHA-Node"], "fs3")
        self.assertEqual(start["FSHA-Incarnation"], str(cluster.nodes["fs3"].incarnation))
        self.assertEqual((start["FSHA-Slot"], start["FSHA-Epoch"], start["FSHA-Previous"]),
                         ("slot1", "2", "fs1"))
        self.assertEqual(start["FSHA-Event"], "claim")
        self.assertRegex(start["FSHA-Time"], r"^\d+\.\d{3}$")
        down, master = esl.events()[0], esl.events()[3]
        self.assertEqual(down["FSHA-Peer"], "fs1")
        self.assertEqual((master["FSHA-Role"], master["FSHA-Old-Role"], master["FSHA-Slot"]),
                         ("master", "claiming", "slot1"))
        self.assertIn("FSHA-Claim-Ms", esl.events()[4])
        sequences = [int(h["FSHA-Sequence"]) for h in esl.events()]
        self.assertEqual(sequences, list(range(sequences[0], sequences[0] + 5)))
        self.assertEqual(events.status()["dropped"], {})
        self.assertEqual(events.sent, 10)

    def test_takeover_report_headers(self) -> None:
        cluster, esl, _events = formed()
        cluster.nodes["fs3"].record_event(
            "takeover-acquire", action="acquire", slot="slot1", epoch=2, ok=False,
            total_ms=12.5, steps_ms={"self_check": 1.0, "floating_ips": 11.5},
            error="floating_ips: refused\nsecond line", warnings=["a", "b"])
        cluster.clock.advance(0)
        report = esl.events()[-1]
        self.assertEqual(report["Event-Subclass"], "fsha::takeover-report")
        self.assertEqual(report["FSHA-Action"], "acquire")
        self.assertEqual(report["FSHA-Ok"], "false")
        self.assertEqual(report["FSHA-Total-Ms"], "12.5")
        self.assertEqual(report["FSHA-Step-Floating-Ips-Ms"], "11.5")
        self.assertEqual(report["FSHA-Step-Self-Check-Ms"], "1.0")
        self.assertEqual(report["FSHA-Error"], "floating_ips: refused second line")
        self.assertEqual(report["FSHA-Warnings"], "a; b")

    def test_takeover_steps_are_fired_as_they_end(self) -> None:
        from twisted.internet.task import Clock

        from fsha.takeover import SlotEffects

        class SlowFloating:
            def __init__(self) -> None:
                self.pending: list[defer.Deferred[None]] = []

            def up(self, slot: str, ips: Any) -> defer.Deferred[None]:
                d: defer.Deferred[None] = defer.Deferred()
                self.pending.append(d)
                return d

            def down(self, slot: str, ips: Any) -> defer.Deferred[None]:
                return defer.succeed(None)

        cluster, esl, events = formed()
        del esl.sent[:]
        clock = Clock()
        floating = SlowFloating()
        effects = SlotEffects(floating, clock)  # type: ignore[arg-type]
        effects.add_step_listener(events.takeover_step)
        slot = cluster.config.slots[0]
        done = effects.acquire(slot, 5, cluster.config.nodes[0])
        cluster.clock.advance(0)
        # live: the skipped steps are out while the floating IPs are still coming up
        self.assertEqual(esl.subclasses(), ["fsha::takeover-step", "fsha::takeover-step"])
        first = esl.events()[0]
        self.assertEqual((first["FSHA-Step"], first["FSHA-Outcome"], first["FSHA-Action"]),
                         ("self_check", "skipped", "acquire"))
        self.assertEqual(first["FSHA-Takeover"], "slot1/5")
        self.assertEqual(first["FSHA-Error"], "no FreeSWITCH connection configured")
        self.assertNoResult(done)
        clock.advance(0.012)
        floating.pending[0].callback(None)
        cluster.clock.advance(0)
        self.successResultOf(done)
        ips = esl.events()[2]
        self.assertEqual((ips["FSHA-Step"], ips["FSHA-Outcome"], ips["FSHA-Ms"]),
                         ("floating_ips", "ok", "12.0"))
        self.assertEqual(ips["FSHA-Count-Ips"], str(len(slot.ips)))
        self.assertEqual(esl.events()[-1]["FSHA-Step"], "freeswitch")
        # a failed step carries its error; a stopped ClusterEvents fires nothing
        del esl.sent[:]
        floating.pending.clear()
        failing = effects.acquire(slot, 6, cluster.config.nodes[0])
        floating.pending[0].errback(RuntimeError("no such device"))
        cluster.clock.advance(0)
        self.failureResultOf(failing)
        self.flushLoggedErrors(RuntimeError)
        failed = [e for e in esl.events() if e.get("FSHA-Outcome") == "failed"]
        self.assertEqual([e["FSHA-Step"] for e in failed], ["floating_ips"])
        self.assertIn("no such device", failed[0]["FSHA-Error"])
        events.accepting = False
        before = len(esl.sent)
        events.takeover_step(effects.last_report, effects.last_report.steps[0])
        self.assertEqual(len(esl.sent), before)

    def test_network_degraded_and_restored(self) -> None:
        cluster, esl, events = formed()
        del esl.sent[:]
        cluster.cut.add(("fs2", "B"))
        cluster.advance(1.0)
        self.assertEqual(esl.subclasses(), ["fsha::network-degraded"])
        degraded = esl.events()[0]
        self.assertEqual((degraded["FSHA-Peer"], degraded["FSHA-Network"]), ("fs2", "B"))
        self.assertGreaterEqual(int(degraded["FSHA-Silent-Ms"]), 200)
        self.assertEqual(events.degraded(), [("fs2", "B")])
        self.assertEqual(events.status()["degraded"], ["fs2/B"])
        cluster.advance(2.0)
        self.assertEqual(len(esl.sent), 1)  # reported once, not at every check
        cluster.cut.discard(("fs2", "B"))
        cluster.advance(0.5)
        self.assertEqual(esl.subclasses()[-1], "fsha::network-restored")
        self.assertEqual(events.degraded(), [])

    def test_a_dead_peer_is_peer_down_not_two_degraded_networks(self) -> None:
        cluster, esl, _events = formed()
        del esl.sent[:]
        cluster.kill("fs2")
        cluster.advance(2.0)
        self.assertNotIn("fsha::network-degraded", esl.subclasses())
        self.assertIn("fsha::peer-down", esl.subclasses())

    def test_freeswitch_down_events_wait_then_stale_ones_are_dropped(self) -> None:
        cluster, esl, events = formed(max_age=5.0)
        del esl.sent[:]
        esl.set_healthy(False)
        cluster.kill("fs1")
        cluster.advance(1.0)
        self.assertEqual(esl.sent, [])
        self.assertEqual(events.status()["queued"], 5)
        self.assertEqual(cluster.nodes["fs3"].role.name, "MASTER")  # never in the way
        cluster.advance(4.5)
        cluster.kill("fs2")  # a fresh event, queued 4.5 s after the others
        cluster.advance(1.0)
        esl.set_healthy(True)
        cluster.clock.advance(0)
        # fs3, left alone, also lets its slot go (its lease: no quorum): the fresh events
        # are that release and fs2's death, and only they
        subclasses = esl.subclasses()
        self.assertIn("fsha::peer-down", subclasses)
        self.assertEqual(esl.events()[subclasses.index("fsha::peer-down")]["FSHA-Peer"], "fs2")
        self.assertEqual(events.status()["dropped"], {"freeswitch-down": 5})
        self.assertEqual(events.status()["queued"], 0)

    def test_queue_is_bounded_and_drops_are_visible(self) -> None:
        cluster, esl, events = formed(max_queue=2)
        del esl.sent[:]
        esl.set_healthy(False)
        cluster.kill("fs1")
        cluster.advance(1.0)
        self.assertEqual(len(events.queue), 2)
        esl.set_healthy(True)
        cluster.clock.advance(0)
        self.assertEqual(esl.subclasses(), ["fsha::role", "fsha::takeover-finish"])
        self.assertEqual(events.status()["dropped"], {"queue-full": 3})
        sequences = [int(h["FSHA-Sequence"]) for h in esl.events()]
        self.assertEqual(sequences[1] - sequences[0], 1)
        self.assertEqual(sequences[0], events.sequence - 1)

    def test_one_at_a_time_failures_and_timeouts_are_counted(self) -> None:
        cluster, esl, events = formed(send_timeout=2.0)
        del esl.sent[:]
        before = events.sent
        esl.hold = True
        cluster.kill("fs1")
        cluster.advance(1.0)
        self.assertEqual(len(esl.sent), 1)  # the others wait for its reply
        esl.held[0].errback(ESLTimeout("sendevent CUSTOM: no reply in 2.0s"))
        cluster.clock.advance(0)
        self.assertEqual(len(esl.sent), 2)
        esl.held[1].callback("uuid")  # (the ESL client's own timeout fires first in life)
        cluster.clock.advance(0)
        self.assertEqual(len(esl.sent), 3)
        cluster.advance(3.5)  # no reply at all: our own timeout frees the queue
        self.assertEqual(len(esl.sent), 4)
        esl.hold = False
        esl.fail = RuntimeError("-ERR invalid event")
        cluster.advance(3.5)
        self.assertEqual(len(esl.sent), 5)
        self.assertEqual(events.status()["dropped"], {"send-failed": 4})
        self.assertEqual(events.sent, before + 1)
        self.assertEqual(events.last_error, "-ERR invalid event")
        self.flushLoggedErrors()

    def test_stop_drains_then_gives_up(self) -> None:
        cluster, esl, events = formed(send_timeout=1.0)
        del esl.sent[:]
        esl.hold = True
        cluster.kill("fs1")
        cluster.advance(1.0)
        stopped = events.stop()
        self.assertNoResult(stopped)
        esl.held[0].callback("uuid")
        cluster.clock.advance(0)
        self.assertEqual(len(esl.sent), 2)
        cluster.clock.advance(1.0)  # the rest cannot be sent within the stop budget
        self.successResultOf(stopped)
        self.assertEqual(events.status()["dropped"]["stopped"], 3)
        self.assertFalse(events.status()["running"])
        before = len(esl.sent)
        cluster.kill("fs2")
        cluster.advance(2.0)
        esl.hold = False
        self.assertEqual(events.status()["queued"], 0)  # stopped: takes nothing more
        self.assertEqual(len(esl.sent), before)
        self.flushLoggedErrors()

    def test_stop_when_idle_or_freeswitch_down_is_immediate(self) -> None:
        cluster, esl, events = formed()
        self.successResultOf(events.stop())
        events.start()
        esl.set_healthy(False)
        cluster.kill("fs1")
        cluster.advance(1.0)
        d = events.stop()
        cluster.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(events.status()["dropped"], {"stopped": 5})

    def test_header_helpers(self) -> None:
        self.assertEqual(header_name("calls_written"), "FSHA-Calls-Written")
        self.assertEqual(header_name("old_role"), "FSHA-Old-Role")
        headers = event_headers("fsha::x", [("FSHA-Node", "fs1")],
                                {"time": 1.5, "event": "x", "reason": "a\r\nb",
                                 "slot": None, "on": True, "n": 3, "long": "y" * 5000})
        self.assertEqual(headers[:4], [("Event-Subclass", "fsha::x"), ("FSHA-Node", "fs1"),
                                       ("FSHA-Time", "1.500"), ("FSHA-Event", "x")])
        h = dict(headers)
        self.assertEqual(h["FSHA-Reason"], "a  b")
        self.assertNotIn("FSHA-Slot", h)
        self.assertEqual((h["FSHA-On"], h["FSHA-N"]), ("true", "3"))
        self.assertEqual(len(h["FSHA-Long"]), 1024)


class Sim:
    """One ``python -m fsha sim`` process on loopback, its ports from ``--ready-file``."""

    def __init__(self, case: TestCase) -> None:
        directory = case.mktemp()
        os.makedirs(directory)
        self.ready_path = os.path.join(directory, "ready.json")
        self.log = open(os.path.join(directory, "sim.log"), "wb")
        case.addCleanup(self.log.close)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fsha", "sim", "--name", "fs1", "--esl", "127.0.0.1:0",
             "--control", "127.0.0.1:0", "--ready-file", self.ready_path],
            stdout=self.log, stderr=subprocess.STDOUT)
        case.addCleanup(self.kill)
        self.ready: dict[str, Any] = {}

    def read_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"simulator exited with {self.proc.returncode}")
        try:
            with open(self.ready_path, encoding="utf-8") as f:
                self.ready = json.load(f)
            return True
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE)


class AgainstSimulatorTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_an_esl_subscriber_sees_the_role_event(self) -> Any:
        sim = Sim(self)
        yield poll_until(sim.read_ready, "simulator ready file", timeout=DEADLINE, clock=reactor)
        port = sim.ready["esl"]["port"]

        def client(**kw: Any) -> ESLClient:
            c = ESLClient.tcp(reactor, "127.0.0.1", port, "ClueCon", connect_timeout=2.0,
                              setup_timeout=5.0, heartbeat_timeout=None, **kw)
            c.startService()
            self.addCleanup(c.stopService)
            return c

        sender = client()
        subscriber = client(events=["fsha::role"])
        seen: list[Event] = []
        others: list[Event] = []
        subscriber.add_event_listener(seen.append, "fsha::role")
        subscriber.add_event_listener(
            lambda e: others.append(e) if e.subclass != "fsha::role" else None, "CUSTOM")
        yield defer.gatherResults([sender.when_ready(), subscriber.when_ready()]
                                  ).addTimeout(DEADLINE, reactor)

        cluster = FakeCluster(make_config(nodes=2, slots=1))
        cluster.start_all()
        events = ClusterEvents(sender, cluster.nodes["fs1"], clock=reactor)
        events.start()
        self.addCleanup(events.stop)
        cluster.advance(cluster.config.discovery + 0.5)  # fs1: slave, then master of slot1
        self.assertEqual(cluster.masters(), {"slot1": "fs1"})
        yield poll_until(lambda: len(seen) >= 3, "the fsha::role events at the subscriber",
                         timeout=DEADLINE, clock=reactor)
        roles = [(e.get("FSHA-Old-Role"), e.get("FSHA-Role")) for e in seen]
        self.assertEqual(roles, [("starting", "slave"), ("slave", "claiming"),
                                 ("claiming", "master")])
        master = seen[-1]
        self.assertEqual(master.name, "CUSTOM")
        self.assertEqual(master.subclass, "fsha::role")
        self.assertEqual((master.get("FSHA-Node"), master.get("FSHA-Slot"),
                          master.get("FSHA-Cluster")), ("fs1", "slot1", "demo"))
        self.assertEqual(others, [])  # subscribed to fsha::role only
        yield poll_until(lambda: events.status()["queued"] == 0 and events.sent >= 6,
                         "every event sent", timeout=DEADLINE, clock=reactor)
        self.assertEqual(events.status()["dropped"], {})
