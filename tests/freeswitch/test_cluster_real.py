"""fsha processes (``twistd fsha``) over real FreeSWITCHes: a kill -9 of the master.

The loopback cluster of :mod:`fsha.harness` (3 nodes, 1 slot, replication over mutual TLS,
the loopback floating-IP backend) with a real FreeSWITCH per node instead of the
simulator, each started from ``conf/freeswitch/freeswitch.xml``. The first node's
FreeSWITCH binds the slot profile at boot; the others' fail to bind it and give up, as on
hosts without the address. sipp registers users and places calls; the master's fsha and
FreeSWITCH are killed with -9; the new master must recover every call (the caller answers
its re-INVITE and its BYE gets a 200) and list every registration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from fsha.harness import wait_for
from tests.freeswitch import sipp
from tests.freeswitch.realfs import (
    RealFreeSWITCHCluster,
    calls_count,
    every_row_acked,
    free_port,
    skip_reason,
)

pytestmark = pytest.mark.freeswitch




class RealClusterTests(SynchronousTestCase):
    def test_kill_9_of_the_master(self) -> None:
        reason = skip_reason() or (None if sipp.SIPP else "sipp is not installed")
        if reason:
            raise SkipTest(reason)
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        n = 100  # issue 16's done-when, CI-sized (bench/cluster_realfs.py: 1,000)
        cluster = RealFreeSWITCHCluster(work, rtp_ports=4 * n)
        self.addCleanup(cluster.close)
        cluster.start(timeout=60)
        view = cluster.wait_converged(timeout=60)
        owners = {s["name"]: s["owner"] for s in view["slots"]}
        self.assertEqual(owners, {"slot1": "fs1"})
        ip, port = cluster.slot_ip, cluster.sip_port
        users = [str(7000 + i) for i in range(5)]
        sipp.register(ip, port, users, work)
        caller = sipp.start_calls(ip, port, n, work, reinvite_within=120,
                                  local_port=free_port("127.0.0.1", 2))
        self.addCleanup(lambda: caller.poll() is None and caller.kill())
        master = cluster.fs["fs1"]
        wait_for(f"{n} calls on fs1", lambda: calls_count(master) == n, 30)

        def held(calls: int, registrations: int) -> bool:
            return all(st["replication"]["slots"].get("slot1", {}).get("call", 0) == calls
                       and st["replication"]["slots"]["slot1"].get("registration", 0)
                       == registrations for st in cluster.statuses().values())
        # the registrations are read from fs1's sofia_reg_slot1.db (issue 12, item 1)
        wait_for("the calls and registrations replicated to every node",
                 lambda: held(n, len(users)), 60)
        # FreeSWITCH rewrites each row once the caller's ACK is in (the dialog's tags), with
        # no event: a master killed before that rewrite is replicated leaves a row whose
        # recovered dialog the caller cannot match (481). Kill once every row is rewritten,
        # a sweep of the master's feed began after that (it replicates changed rows), and
        # every node holds the same state.
        wait_for("every row rewritten at the ACK", lambda: every_row_acked(master), 30)
        swept = cluster.status(cluster.node("fs1"))["feeds"]["sweeps"]
        wait_for("two sweeps of fs1's feed", lambda: cluster.status(
            cluster.node("fs1"))["feeds"]["sweeps"] >= swept + 2, 30)
        wait_for("one replicated state on every node", lambda: len(
            {st["replication"]["digest"] for st in cluster.statuses().values()}) == 1, 30)

        cluster.kill("fs1", sim_too=True)
        new = wait_for("slot1 to move", lambda: (cluster.owner("slot1") or "fs1") != "fs1"
                       and cluster.owner("slot1"), 60)
        events = cluster.status(cluster.node(new))["events"]
        reports: list[dict[str, Any]] = [e for e in events if e["event"] == "takeover-acquire"
                                         and e["ok"] and e["slot"] == "slot1"]
        self.assertTrue(reports, events)
        report = reports[-1]
        # the first time: one acquisition of slot1 in the whole cluster since the kill
        attempts = [e for st in cluster.statuses().values() for e in st["events"]
                    if e["event"] == "takeover-acquire" and e["slot"] == "slot1"
                    and e["epoch"] > 1]
        self.assertEqual(len(attempts), 1, attempts)
        self.assertIn("first_call_ms", report)
        self.assertEqual((report["calls_written"], report["calls_recovered"],
                          report["registrations_restored"]), (n, n, len(users)))
        listing = cluster.fs[new].api("sofia status profile slot1 reg")
        self.assertIn(f"Total items returned: {len(users)}\n", listing)
        code, err = sipp.finish_calls(caller, 90)
        self.assertEqual(code, 0, err)  # every call re-INVITEd, its BYE answered 200
        wait_for("the calls ended on the new master",
                 lambda: calls_count(cluster.fs[new]) == 0, 30)
