"""A big slot fails over the first time (real processes on loopback, slow simulators).

Three ``twistd -n fsha`` nodes, one slot, simulators whose ``sofia profile P recover``
costs 3 ms a call (``--recover-ms-per-call``: a real FreeSWITCH costs 5-10 ms): recovering
the slot's calls in one command would take longer than one recover's bound
(``[takeover] recover_timeout_ms``); in batches, each recover is short, the probe keeps
answering, and the takeover succeeds the first time with every call recovered.
"""

from __future__ import annotations

import os
import signal
import time

from twisted.trial.unittest import SynchronousTestCase

from fsha.harness import HarnessError, LoopbackCluster, wait_for

CALLS = 2000
MS_PER_CALL = 3.0


class BigSlotTakeoverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = LoopbackCluster(
            # Detection is not under test here: a generous dead_after keeps a node that a
            # burst of call events stalls on this shared machine from being declared dead.
            nodes=3, slots=1, interval_ms=50, dead_after_ms=1000,
            extra_config="[takeover]\nrecover_batch = 100\nrecover_timeout_ms = 3000\n",
            sim_args=["--recover-ms-per-call", str(MS_PER_CALL),
                      "--max-sessions", str(4 * CALLS)])
        self.addCleanup(self.cluster.close)
        try:
            self.cluster.start()
            self.view = self.cluster.wait_converged(timeout=60)
        except HarnessError:
            self.dump()
            raise

    def dump(self) -> None:
        for node in self.cluster.nodes:
            print(f"--- {node.name}\n{self.cluster.logs(node.name)[-4000:]}")

    def test_first_time_every_call_recovered(self) -> None:
        # one recover of every call would take CALLS x 3 ms = 6 s: over its 3 s bound
        self.assertGreater(CALLS * MS_PER_CALL / 1000, 3.0)
        cluster = self.cluster
        master = {s["name"]: s["owner"] for s in self.view["slots"]}["slot1"]
        uuids: list[str] = []
        for _ in range(CALLS // 50):  # small requests: the simulator has one thread
            uuids += cluster.sim_control(master, "/calls", {"profile": "slot1", "count": 50,
                                                            "answer": True})["uuids"]
        self.assertEqual(len(uuids), CALLS)

        def replicated() -> bool:
            return all(st["replication"]["slots"].get("slot1", {}).get("call", 0) == CALLS
                       for st in cluster.statuses().values())
        wait_for(f"{CALLS} calls replicated to every node", replicated, 120, interval=0.2)
        epoch = {s["name"]: s["epoch"] for s in cluster.converged()["slots"]}["slot1"]  # type: ignore[index]

        cluster.kill(master, sim_too=True)
        try:
            new = wait_for("slot1 to have a new master",
                           lambda: (cluster.owner("slot1") or master) != master
                           and cluster.owner("slot1"), timeout=120, interval=0.1)
        except HarnessError:
            self.dump()
            raise
        events = cluster.status(cluster.node(new))["events"]
        acquires = [e for e in events if e["event"] == "takeover-acquire"]
        self.assertEqual(len(acquires), 1, acquires)  # the first time
        [report] = acquires
        self.assertTrue(report["ok"], report)
        self.assertEqual(report["epoch"], epoch + 1)
        self.assertEqual((report["calls_written"], report["calls_recovered"]), (CALLS, CALLS))
        self.assertNotIn("warnings", report)
        live = cluster.sim_control(new, "/calls")["calls"]
        self.assertEqual(sorted(c["uuid"] for c in live), sorted(uuids))
        # no node claimed the slot in between (a rollback would have)
        for name, st in cluster.statuses().items():
            claims = [e for e in st["events"] if e["event"] == "claim"]
            self.assertLessEqual(len(claims), 1, (name, claims))


class BusyIsNotDeadTests(SynchronousTestCase):
    """A master whose FreeSWITCH answers late keeps its slot; one that answers nothing for
    ``hung_after_ms`` gives it up (``fsha.health``; the simulator frozen with SIGSTOP)."""

    def setUp(self) -> None:
        self.cluster = LoopbackCluster(nodes=2, slots=1, interval_ms=50, dead_after_ms=1000)
        self.addCleanup(self.cluster.close)
        self.cluster.start()
        self.view = self.cluster.wait_converged(timeout=60)

    def freeze(self, name: str, seconds: float) -> None:
        sim = self.cluster.node(name).sim
        assert sim is not None
        os.kill(sim.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)  # the fault's own duration, not a wait for an outcome
        finally:
            os.kill(sim.pid, signal.SIGCONT)

    def test_late_answers_keep_the_slot_and_silence_releases_it(self) -> None:
        cluster = self.cluster
        master = {s["name"]: s["owner"] for s in self.view["slots"]}["slot1"]
        hung_after = 5.0  # [[node]] esl.hung_after_ms default (timeout_ms is 1 s here)
        self.freeze(master, hung_after / 2)  # answers come 2.5 s late: busy, not hung
        wait_for("the master to answer again",
                 lambda: cluster.status(cluster.node(master))["freeswitch"]["ok"], 30)
        events = [e["event"] for e in cluster.status(cluster.node(master))["events"]]
        self.assertNotIn("release", events)
        self.assertEqual(cluster.owner("slot1"), master)
        self.freeze(master, hung_after + 2.0)  # nothing answers for longer: hung

        def released() -> list[dict[str, object]]:
            return [e for e in cluster.status(cluster.node(master))["events"]
                    if e["event"] == "release"]
        [event] = wait_for("the master to give its slot up", released, 30)
        self.assertIn("not answering", str(event["reason"]))
