"""fsha over real FreeSWITCHes on real (namespaced) hosts: FreeSWITCH busy, hung, killed.

:class:`~tests.e2e.netns.NetnsCluster` (3 node hosts, 1 slot, the ``ip`` floating-IP
backend: the address really moves) with a real FreeSWITCH per host instead of the
simulator, each started from ``conf/freeswitch/freeswitch.xml`` inside its namespace (ESL on
the host's own 127.0.0.1). ``net.ipv4.ip_nonlocal_bind`` is off on the hosts, so a slot
profile binds only where fsha put the address (every profile fails to bind at boot). sipp
places calls from the client host. One scenario, in order:

1. **Busy is not dead**: the master's FreeSWITCH is stopped (SIGSTOP) until fsha's probe
   is overdue (busy), then continued, well before ``hung_after_ms``: no failover, no
   takeover anywhere, the calls stay.
2. **Hung**: SIGSTOP again, for good: the master gives the slot up, a slave takes it with
   every call (re-INVITE from the new master, no BYE from the old one). When the old
   FreeSWITCH is continued, the stop fsha retried stops its profile and its copies of the
   calls; their BYEs cannot leave (the address is gone): sipp sees none.
3. **Killed alone**: new calls, then the new master's FreeSWITCH is killed (fsha stays): it
   gives the slot up and another node takes it with every call.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from fsha.harness import NodeProcesses, wait_for
from tests.e2e.netns import CLIENT_ADDRESS, NetnsCluster, run, unavailable_reason
from tests.freeswitch import sipp
from tests.freeswitch.realfs import RealFreeSWITCH, calls_count, every_row_acked, skip_reason

pytestmark = pytest.mark.freeswitch


class RealNetnsCluster(NetnsCluster):
    """:class:`NetnsCluster` with a real FreeSWITCH per node host."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(3, 1, interval_ms=50, dead_after_ms=300, workdir=workdir)
        base = 30000 + 200 * random.randint(0, 100)
        self.rtp = (base, base + 198)
        self.fs: dict[str, RealFreeSWITCH] = {}

    def build(self) -> None:
        super().build()
        for node in self.nodes:  # a profile binds only where its address is
            run(["ip", "netns", "exec", self.ns(node), "sysctl", "-q", "-w",
                 "net.ipv4.ip_nonlocal_bind=0"])

    def db_path(self, node: NodeProcesses) -> Path:
        return self.fs[node.name].core_db

    def start_sim(self, node: NodeProcesses) -> None:
        name, ip, port = self.slot_profile(1)
        fs = self.fs.get(node.name) or RealFreeSWITCH(
            self.dir, f"{node.name}-freeswitch", slot_ip=ip, sip_port=port, rtp=self.rtp,
            profile=name, netns=self.ns(node))
        self.fs[node.name] = fs
        fs.start()
        node.sim = fs.proc

    def wait_sim(self, node: NodeProcesses, timeout: float) -> None:
        fs = self.fs[node.name]
        wait_for(f"{node.name}'s slot profile to give up (no address yet)", fs.bind_given_up,
                 timeout)
        node.sim_ports = {"esl": {"host": "127.0.0.1", "port": fs.esl_port}}


def acquires(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in status["events"] if e["event"] == "takeover-acquire"]


class RealNetnsTests(SynchronousTestCase):
    def test_busy_hung_and_killed_freeswitch(self) -> None:
        reason = (skip_reason() or unavailable_reason()
                  or (None if sipp.SIPP else "sipp is not installed"))
        if reason:
            raise SkipTest(reason)
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        cluster = RealNetnsCluster(work)
        self.addCleanup(cluster.close)
        cluster.start(timeout=60)
        view = cluster.wait_converged(timeout=60)
        self.assertEqual({s["name"]: s["owner"] for s in view["slots"]}, {"slot1": "fs1"})
        _, ip, port = cluster.slot_profile(1)
        n = 10

        def place(tag: str) -> Any:
            caller = sipp.start_calls(ip, port, n, work / tag, reinvite_within=120,
                                      local_port=5062 + len(tag), local_ip=CLIENT_ADDRESS,
                                      netns=cluster.client_ns)
            self.addCleanup(lambda: caller.poll() is None and caller.kill())
            return caller

        def replicated(owner: str) -> None:
            wait_for(f"{n} calls on {owner}", lambda: calls_count(cluster.fs[owner]) == n, 30)
            # a row is rewritten when the caller's ACK is in; killed before the feed read
            # that, the master leaves a dialog the caller cannot match (481 to its BYE)
            wait_for("every row rewritten at the ACK",
                     lambda: every_row_acked(cluster.fs[owner]), 30)

            def caught_up() -> bool:
                # the owner's feed publishes the n calls and has no lookup left (it follows
                # a row until its ACK rewrite), and every peer has all it sent (per-slot
                # counts would include records of ended calls of another origin)
                statuses = cluster.statuses()
                mine = statuses[owner]
                if (mine["feeds"]["slots"].get("slot1", {}).get("calls") != n
                        or mine["feeds"]["pending_lookups"]):
                    return False
                sent = mine["replication"]["positions"].get(owner)
                return sent is not None and all(
                    st["replication"]["positions"].get(owner) == sent
                    for name, st in statuses.items() if name != owner)
            wait_for("the calls replicated to every node", caught_up, 60)

        def moved_from(old: str, epoch: int) -> tuple[str, dict[str, Any]]:
            new = wait_for("slot1 to move", lambda: (cluster.owner("slot1") or old) != old
                           and cluster.owner("slot1"), 60)
            report = wait_for("the takeover report", lambda: [
                e for e in acquires(cluster.status(cluster.node(new)))
                if e["ok"] and e["epoch"] > epoch], 30)[-1]
            return new, report

        first = place("first")
        replicated("fs1")
        fs1 = cluster.fs["fs1"]
        before = {name: len(acquires(st)) for name, st in cluster.statuses().items()}

        # 1. busy, not hung: stopped until fsha's probe is overdue, continued long before
        # hung_after_ms (5 s): nothing moves
        cluster.stop_sim("fs1")
        wait_for("fs1's probe overdue (busy)", lambda: cluster.status(
            cluster.node("fs1"))["freeswitch"]["busy"], 10)
        cluster.cont_sim("fs1")
        wait_for("fs1's probe answered again", lambda: not cluster.status(
            cluster.node("fs1"))["freeswitch"]["busy"] and calls_count(fs1) == n, 30)
        statuses = cluster.statuses()
        self.assertEqual({name: len(acquires(st)) for name, st in statuses.items()}, before)
        self.assertEqual(statuses["fs1"]["role"], "master")
        self.assertEqual(cluster.holders(1), ["fs1"])
        epoch = statuses["fs1"]["epoch"]

        # 2. hung: the slot moves with every call; the old FreeSWITCH, continued, stops
        # its profile (fsha retried the stop) and no BYE of it reaches the callers
        cluster.stop_sim("fs1")
        new, report = moved_from("fs1", epoch)
        self.assertEqual((report["calls_written"], report["calls_recovered"]), (n, n), report)
        self.assertIn("first_call_ms", report)
        self.assertEqual(cluster.holders(1), [new])
        cluster.cont_sim("fs1")
        wait_for("fs1's slot profile stopped once FreeSWITCH answers again",
                 lambda: not fs1.profile_running() and calls_count(fs1) == 0, 30)
        code, err = sipp.finish_calls(first, 90)
        self.assertEqual(code, 0, err)  # re-INVITEd by the new master, BYE answered 200

        # 3. FreeSWITCH killed alone (fsha stays): the slot moves on with its calls
        second = place("second")
        replicated(new)
        epoch = report["epoch"]
        cluster.kill_sim(new)
        third, report = moved_from(new, epoch)
        self.assertEqual((report["calls_written"], report["calls_recovered"]), (n, n), report)
        code, err = sipp.finish_calls(second, 90)
        self.assertEqual(code, 0, err)
        wait_for("the calls ended on the last master",
                 lambda: calls_count(cluster.fs[third]) == 0, 30)
