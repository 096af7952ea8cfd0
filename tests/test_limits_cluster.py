"""Cluster-wide limits with real processes: three ``twistd fsha`` nodes, their simulators
(``limit`` app with ``hash`` and ``hiredis`` backends) and a real redis-server.

Many calls each take a hash limit (``gw_out``) and a hiredis limit (``trunk``); some hang
up; some more are still ringing (not answered: no recovery row); the master is killed
(fsha and its FreeSWITCH, ``kill -9``); the answered calls are recovered on the new master.
The cluster-wide usage must be exact on every node, in every node's FreeSWITCH hash and in
Redis, before and after (the ringing calls' units released, once), and nothing may leak or
be released twice when the recovered calls end.

A hand-over (``SIGTERM`` of the master): its FreeSWITCH gives the units back when the
profile stops, the successor takes the recovered calls' units again: Redis equals the live
calls, and 0 once they end.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from fsha.harness import LoopbackCluster, wait_for
from tests.redisserver import dump_logs, redis_config, start_cluster, start_redis

CALLS = int(os.environ.get("FSHA_LIMIT_CALLS", "1000"))
RINGING = 50
HANDOVER_CALLS = 200
LIMITS = ["hash gw out 1000000", "hiredis default trunk 1000000"]


class LimitsClusterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.redis = start_redis(self)
        extra = "\n".join([
            "[limits]", "poll_interval_ms = 200", "sweep_interval_ms = 2000",
            "retry_interval_ms = 200", 'hiredis_realms = ["default"]', "",
            redis_config(self.redis)])
        self.cluster = start_cluster(self, extra,
                                     sim_args=["--hiredis", f"127.0.0.1:{self.redis.port}"])

    def dump(self) -> None:
        dump_logs(self.cluster)

    def limits(self) -> dict[str, dict[str, Any]]:
        return {name: st["limits"] for name, st in self.cluster.statuses().items()}

    def totals_everywhere(self, want: dict[str, int]) -> bool:
        return all(lim["totals"] == want for lim in self.limits().values())

    def hash_select(self, node: str, key: str) -> str:
        out = self.cluster.sim_control(node, "/api",
                                       {"command": f"hash select/fsha_limit/{key}"})
        return str(out["output"]).strip()

    def redis_count(self) -> int:
        value = self.redis.call("GET", "trunk")
        return int(value) if value is not None else 0

    def test_counters_exact_after_calls_and_a_failover(self) -> None:
        cluster = self.cluster
        try:
            self._scenario(cluster)
        except AssertionError:
            self.dump()
            raise

    def _scenario(self, cluster: LoopbackCluster) -> None:
        master = cluster.owner("slot1")
        assert master is not None
        started = time.monotonic()
        placed = cluster.sim_control(master, "/calls", {
            "profile": "slot1", "count": CALLS,
            "limits": LIMITS}, timeout=120)
        self.assertEqual(placed["refused"], 0)
        uuids = placed["uuids"]
        self.assertEqual(self.redis_count(), CALLS)
        wait_for("every node to count the calls", lambda: self.totals_everywhere(
            {"gw_out": CALLS}), timeout=60)
        hung = CALLS // 4
        cluster.sim_control(master, "/hangup", {"uuids": uuids[:hung]})
        live = CALLS - hung
        wait_for("the hangups counted everywhere",
                 lambda: self.totals_everywhere({"gw_out": live}), timeout=60)
        # the simulator gives a hung-up call's hiredis units back after the hangup, as
        # mod_hiredis does: not necessarily before fsha has counted the hangup
        wait_for("Redis to count the hangups", lambda: self.redis_count() == live, timeout=30)
        for node in cluster.nodes:
            wait_for(f"{node.name}'s FreeSWITCH hash to hold the total",
                     lambda node=node: self.hash_select(node.name, "gw_out") == str(live),
                     timeout=30)

        # calls still ringing: they took their units, they have no recovery row
        ringing = cluster.sim_control(master, "/calls", {
            "profile": "slot1", "count": RINGING, "answer": False, "limits": LIMITS},
            timeout=60)
        self.assertEqual(ringing["refused"], 0)
        self.assertEqual(self.redis_count(), live + RINGING)
        wait_for("every node to know what the calls hold, ringing or not", lambda: all(
            lim["held_calls_cluster"] == live + RINGING for lim in self.limits().values()),
            timeout=60)

        def replicated() -> bool:
            digests = {st["replication"]["digest"] for st in cluster.statuses().values()}
            return len(digests) == 1
        wait_for("the replicated state to agree", replicated, timeout=60)

        cluster.kill(master, sim_too=True)
        new = wait_for("slot1 taken over", lambda: cluster.owner("slot1") not in
                       (None, master) and cluster.owner("slot1"), timeout=60)
        wait_for("the calls adopted and the dead master's usage superseded",
                 lambda: self.limits()[new]["adopted"] == live, timeout=60)
        wait_for("the ringing calls' units released",
                 lambda: self.limits()[new]["pending_releases"] == 0
                 and self.redis_count() == live, timeout=60)
        wait_for("exact totals on every node after the failover",
                 lambda: self.totals_everywhere({"gw_out": live}), timeout=60)
        for name, lim in self.limits().items():
            self.assertEqual(lim["superseded"], [master], name)
            self.assertEqual(lim["hiredis_held"], {"default/trunk": live}, name)
        self.assertEqual(self.redis_count(), live, "recovered calls still hold their units")
        report = self.limits()[new]["last_reconciles"][-1]
        self.assertEqual((report["moved"], report["released"], report["hiredis_releases"]),
                         (live, RINGING, RINGING))
        self.assertEqual(self.limits()[new]["released"], {"released": RINGING})
        for node in cluster.running():
            wait_for(f"{node.name}'s FreeSWITCH hash after the failover",
                     lambda node=node: self.hash_select(node.name, "gw_out") == str(live),
                     timeout=30)

        # the recovered calls end: FreeSWITCH releases nothing for them, fsha does, once
        cluster.sim_control(new, "/hangup", {"all": True})
        wait_for("the adopted calls released",
                 lambda: self.limits()[new]["adopted"] == 0
                 and self.limits()[new]["pending_releases"] == 0, timeout=60)
        wait_for("no usage left anywhere", lambda: self.totals_everywhere({}), timeout=60)
        self.assertEqual(self.redis_count(), 0)
        released = self.limits()[new]["released"]
        self.assertEqual(released, {"released": live + RINGING})
        for node in cluster.running():
            wait_for(f"{node.name}'s FreeSWITCH hash back to 0",
                     lambda node=node: self.hash_select(node.name, "gw_out") == "0",
                     timeout=30)
        print(f"limits cluster scenario with {CALLS} calls: "
              f"{time.monotonic() - started:.1f} s")

    def test_handover_keeps_redis_exact(self) -> None:
        try:
            self._handover(self.cluster)
        except AssertionError:
            self.dump()
            raise

    def _handover(self, cluster: LoopbackCluster) -> None:
        master = cluster.owner("slot1")
        assert master is not None
        placed = cluster.sim_control(master, "/calls", {
            "profile": "slot1", "count": HANDOVER_CALLS, "limits": LIMITS}, timeout=120)
        self.assertEqual(placed["refused"], 0)
        ringing = cluster.sim_control(master, "/calls", {
            "profile": "slot1", "count": 10, "answer": False, "limits": LIMITS}, timeout=60)
        self.assertEqual(ringing["refused"], 0)
        self.assertEqual(self.redis_count(), HANDOVER_CALLS + 10)

        def replicated() -> bool:
            digests = {st["replication"]["digest"] for st in cluster.statuses().values()}
            return len(digests) == 1
        wait_for("the replicated state to agree", replicated, timeout=60)
        cluster.stop(master, timeout=60)  # SIGTERM: a clean hand-over
        new = wait_for("slot1 handed over", lambda: cluster.owner("slot1") not in
                       (None, master) and cluster.owner("slot1"), timeout=60)
        wait_for("the recovered calls adopted and their units taken again",
                 lambda: self.limits()[new]["adopted"] == HANDOVER_CALLS
                 and self.limits()[new]["pending_retakes"] == 0
                 and self.limits()[new]["pending_releases_cluster"] == 0, timeout=60)
        report = self.limits()[new]["last_reconciles"][-1]
        self.assertTrue(report["handover"], report)
        self.assertEqual((report["moved"], report["hiredis_retakes"]),
                         (HANDOVER_CALLS, HANDOVER_CALLS))
        # the old FreeSWITCH gave back every unit (ringing calls too: its DECRs follow the
        # profile's stop, they may come after the retakes); fsha took back those of the
        # calls that live on
        wait_for("Redis to hold the live calls' units",
                 lambda: self.redis_count() == HANDOVER_CALLS, timeout=30)
        self.assertEqual(self.limits()[new]["retaken"], {"retaken": HANDOVER_CALLS})
        # the stopped master's usage left the totals (its last changes reached the peers)
        wait_for("exact totals after the hand-over",
                 lambda: self.totals_everywhere({"gw_out": HANDOVER_CALLS}), timeout=60)
        cluster.sim_control(new, "/hangup", {"all": True})
        wait_for("the adopted calls released",
                 lambda: self.limits()[new]["adopted"] == 0
                 and self.limits()[new]["pending_releases"] == 0, timeout=60)
        self.assertEqual(self.redis_count(), 0)
        self.assertEqual(self.limits()[new]["released"], {"released": HANDOVER_CALLS})
        wait_for("no usage left anywhere", lambda: self.totals_everywhere({}), timeout=60)
