"""Whole-cluster restart with the durable store (``[redis] durable_state = true``), with real
processes: three ``twistd fsha`` nodes, their simulators and a real redis-server.

Calls and registrations on the master; every process is killed (fsha and simulators,
``kill -9``: a power cut); two nodes, not the old master, start again. They load the old
master's origin and the slot table from Redis, take the slot over from the old master and
recover its calls and registrations.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from fsha.harness import HarnessError, wait_for
from fsha.status import render
from tests.redisserver import dump_logs, redis_config, start_cluster, start_redis

CALLS = 40
REGISTRATIONS = 10


class DurableClusterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.redis = start_redis(self)
        self.cluster = start_cluster(self, redis_config(
            self.redis, "durable_state = true", "durable_flush_ms = 50"))

    def dump(self) -> None:
        dump_logs(self.cluster)

    def test_a_restarted_cluster_recovers_the_calls_from_redis(self) -> None:
        try:
            self._scenario()
        except (AssertionError, HarnessError):
            self.dump()
            raise

    def _scenario(self) -> None:
        cluster = self.cluster
        started = time.monotonic()
        master = cluster.owner("slot1")
        assert master is not None
        uuids = cluster.sim_control(master, "/calls", {"profile": "slot1", "count": CALLS,
                                                       "answer": True})["uuids"]
        cluster.sim_control(master, "/register", {"profile": "slot1",
                                                  "count": REGISTRATIONS})
        cluster.sim_control(master, "/hangup", {"uuids": uuids[:5]})
        live = CALLS - 5

        def written() -> bool:
            st = cluster.status(cluster.node(master))
            slots = st["replication"]["slots"].get("slot1", {})
            return (slots.get("call") == live and slots.get("registration") == REGISTRATIONS
                    and st["durable"]["state"] == "in-sync")
        wait_for("the master's calls and registrations written to Redis", written, 30)

        # a power cut: every fsha and every simulator dies at once
        for node in cluster.nodes:
            cluster.kill(node.name, sim_too=True)
        for node in cluster.nodes:
            assert node.sim is not None
            node.sim.wait(timeout=10)
        survivors = [n.name for n in cluster.nodes if n.name != master]
        for name in survivors:
            cluster.restart(name)

        def taken_over() -> Any:
            owner = cluster.owner("slot1")
            return owner if owner in survivors else None
        new = wait_for("slot1 taken over by a restarted node", taken_over, timeout=60)
        status = cluster.status(cluster.node(new))
        load = status["durable"]["load"]
        self.assertEqual(load["state"], "applied")
        master_id = str(next(n.index - 1 for n in cluster.nodes if n.name == master))
        self.assertIn(master_id, load["origins"])
        self.assertEqual(load["slots"]["0"]["master"], int(master_id))
        [report] = [e for e in status["events"] if e["event"] == "takeover-acquire"
                    and e["ok"] and e["slot"] == "slot1"]
        claims = [e for e in status["events"] if e["event"] == "claim"
                  and e["slot"] == "slot1"]
        self.assertEqual(claims[-1]["previous"], master)
        self.assertGreater(claims[-1]["epoch"], load["slots"]["0"]["epoch"])
        self.assertEqual((report["calls_written"], report["calls_recovered"],
                          report["registrations_restored"]), (live, live, REGISTRATIONS))
        calls = cluster.sim_control(new, "/calls")["calls"]
        self.assertEqual(sorted(c["uuid"] for c in calls), sorted(uuids[5:]))
        # the new master's own origin now holds them, and is written in turn
        wait_for("the new master's origin in Redis", lambda: cluster.status(
            cluster.node(new))["durable"]["state"] == "in-sync", 30)
        text = render(cluster.status(cluster.node(new)))
        self.assertIn("durable state: in sync (sequence ", text)
        self.assertIn(f"slot 0 from node {master_id}", text)
        print(f"whole-cluster restart from the durable store: "
              f"{time.monotonic() - started:.1f} s")
