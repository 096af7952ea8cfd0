"""Cluster-wide limits with real processes: three ``twistd fsha`` nodes, their simulators
(``limit`` app with ``hash`` and ``hiredis`` backends) and a real redis-server.

Many calls each take a hash limit (``gw_out``) and a hiredis limit (``trunk``); some hang
up; the master is killed (fsha and its FreeSWITCH, ``kill -9``); the calls are recovered
on the new master. The cluster-wide usage must be exact on every node, in every node's
FreeSWITCH hash and in Redis, before and after, and nothing may leak or be released twice
when the recovered calls end.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from fsha.harness import HarnessError, LoopbackCluster, wait_for
from tests.redisserver import start_redis

CALLS = int(os.environ.get("FSHA_LIMIT_CALLS", "1000"))


class LimitsClusterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.redis = start_redis(self)
        extra = "\n".join([
            "[limits]", "poll_interval_ms = 200", "sweep_interval_ms = 2000",
            "retry_interval_ms = 200", 'hiredis_realms = ["default"]', "",
            "[redis]", f'address = "127.0.0.1:{self.redis.port}"', "timeout_ms = 1000",
            "reconnect_min_ms = 50", "reconnect_max_ms = 500", ""])
        self.cluster = LoopbackCluster(nodes=3, slots=1, interval_ms=20, dead_after_ms=100,
                                       extra_config=extra,
                                       sim_args=["--hiredis", f"127.0.0.1:{self.redis.port}"])
        self.addCleanup(self.cluster.close)
        try:
            self.cluster.start()
            self.cluster.wait_converged(timeout=60)
        except HarnessError:
            self.dump()
            raise

    def dump(self) -> None:
        for node in self.cluster.nodes:
            print(f"--- {node.name}\n{self.cluster.logs(node.name, 60)}")

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
            "limits": ["hash gw out 1000000", "hiredis default trunk 1000000"]}, timeout=120)
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
        self.assertEqual(self.redis_count(), live)
        for node in cluster.nodes:
            wait_for(f"{node.name}'s FreeSWITCH hash to hold the total",
                     lambda node=node: self.hash_select(node.name, "gw_out") == str(live),
                     timeout=30)

        def replicated() -> bool:
            digests = {st["replication"]["digest"] for st in cluster.statuses().values()}
            return len(digests) == 1
        wait_for("the replicated state to agree", replicated, timeout=60)

        cluster.kill(master, sim_too=True)
        new = wait_for("slot1 taken over", lambda: cluster.owner("slot1") not in
                       (None, master) and cluster.owner("slot1"), timeout=60)
        wait_for("the calls adopted and the dead master's usage superseded",
                 lambda: self.limits()[new]["adopted"] == live, timeout=60)
        wait_for("exact totals on every node after the failover",
                 lambda: self.totals_everywhere({"gw_out": live}), timeout=60)
        for name, lim in self.limits().items():
            self.assertEqual(lim["superseded"], [master], name)
            self.assertEqual(lim["hiredis_held"], {"default/trunk": live}, name)
        self.assertEqual(self.redis_count(), live, "recovered calls still hold their units")
        report = self.limits()[new]["last_reconciles"][-1]
        self.assertEqual((report["moved"], report["released"]), (live, 0))
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
        self.assertEqual(released, {"released": live})
        for node in cluster.running():
            wait_for(f"{node.name}'s FreeSWITCH hash back to 0",
                     lambda node=node: self.hash_select(node.name, "gw_out") == "0",
                     timeout=30)
        print(f"limits cluster scenario with {CALLS} calls: "
              f"{time.monotonic() - started:.1f} s")
