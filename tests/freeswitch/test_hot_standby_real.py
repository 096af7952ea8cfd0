"""Hot standby profiles on real FreeSWITCHes in network namespaces: the caller's view.

Three node hosts, one slot (198.18.0.101:5060), ``[takeover] profiles = "hot_standby"``:
every FreeSWITCH runs the slot's profile from boot. sipp on the client host places calls
that carry RTP (a tone from the slot); tcpdump on the client's NIC records everything that
arrives from the slot address, with the sending host's MAC. The master's fsha is then
killed with -9 (its FreeSWITCH runs on, holding the calls) or stopped with SIGSTOP: its
guard takes the address down and hangs up the calls with ``hupall`` (mod_sofia sends a BYE
for each), the profile keeps running; the next node takes over and recovers the calls.

What must hold, from the capture and sipp: no BYE ever reaches the caller; after the new
master's first packet, nothing from the slot address comes from the old host; the only
requests from the slot address after the fault are the recovery re-INVITEs and their ACKs
(no OPTIONS, NOTIFY, REGISTER of a standby profile); every call's media comes back; every
call ends with the caller's BYE answered 200 (sipp exits 0). The old FreeSWITCH ends with no
call and its profile still running. Outcomes only: the gaps themselves are measured by
``bench/failover_netns.py --freeswitch real``.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from typing import Any

import pytest
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from fsha.harness import wait_for
from tests.e2e.netns import run, unavailable_reason
from tests.freeswitch import sipp
from tests.freeswitch.netns_real import (
    RealNetnsCluster,
    media_gaps,
    read_pcap,
    senders,
    sip_requests,
    wait_calls,
)
from tests.freeswitch.realfs import skip_reason

pytestmark = pytest.mark.freeswitch

CALLS = 10


def prerequisites() -> str | None:
    reason = skip_reason() or unavailable_reason()
    if reason:
        return reason
    for tool, package in (("sipp", "sip-tester"), ("tcpdump", "tcpdump"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: {package})"
    return None


class HotStandbyRealTests(SynchronousTestCase):
    def setUp(self) -> None:
        reason = prerequisites()
        if reason:
            raise SkipTest(reason)

    def failover(self, fault: str) -> None:
        cluster = RealNetnsCluster(hot_standby=True)
        self.addCleanup(cluster.close)
        try:
            self.scenario(cluster, fault)
        except BaseException:
            print(cluster.all_logs(80))
            raise

    def scenario(self, cluster: RealNetnsCluster, fault: str) -> None:
        cluster.start(timeout=90)
        view = cluster.wait_converged(timeout=60)
        master = {s["name"]: s["owner"] for s in view["slots"]}["slot1"]
        _, ip, _ = cluster.slot_profile(1)
        for name, fs in cluster.fs.items():
            self.assertTrue(fs.profile_running(), f"{name}: the standby profile runs")
            listing = run(["ip", "netns", "exec", cluster.ns(name), "nft", "list", "table",
                           "inet", "fsha_egress"]).stdout
            self.assertIn(f"ip saddr {ip} fib saddr type != local counter", listing)
        pcap = cluster.start_capture("client", f"udp and host {ip}")
        caller = cluster.start_calls(CALLS, reinvite_within=120)
        self.addCleanup(lambda: caller.poll() is None and os.killpg(caller.pid, signal.SIGKILL))
        old = cluster.fs[master]
        wait_calls(old, CALLS, 60)

        def replicated() -> bool:
            return all(st["replication"]["slots"].get("slot1", {}).get("call", 0) == CALLS
                       for st in cluster.statuses().values())
        wait_for("the calls replicated to every node", replicated, 60)

        def flowing() -> bool:
            # a second of RTP on every call: each was ACKed and its recovery row rewritten
            # (FreeSWITCH updates it after the ACK, asynchronously) well before the fault
            ports: dict[int, int] = {}
            for p in read_pcap(pcap):
                if p.src == ip and p.sport != 5060:
                    ports[p.sport] = ports.get(p.sport, 0) + 1
            return sum(1 for n in ports.values() if n >= 50) >= CALLS
        wait_for("RTP on every call", flowing, 60, interval=0.2)
        wait_for("the calls replicated to every node", replicated, 60)
        mac = {n.name: cluster.mac(n.name) for n in cluster.nodes}
        if fault == "kill":
            at = cluster.kill(master)  # fsha only: its FreeSWITCH keeps the calls
        else:
            node = cluster.node(master)
            assert node.fsha is not None
            at = time.time()
            os.kill(node.fsha.pid, signal.SIGSTOP)
            self.addCleanup(lambda: node.fsha is not None and node.fsha.poll() is None
                            and node.fsha.kill())
        others = [n.name for n in cluster.nodes if n.name != master]

        def moved() -> str | None:
            # asked of the others: a stopped fsha answers nothing
            owners = {sl["owner"] for name in others
                      for sl in cluster.status(cluster.node(name))["slots"]
                      if sl["name"] == "slot1"}
            owner = owners.pop() if len(owners) == 1 else None
            return owner if owner not in (None, master) else None
        new = wait_for("slot1 to move", moved, 60)
        wait_for("the old FreeSWITCH to hang up its calls", lambda: old.calls() == 0, 30)
        self.assertTrue(old.profile_running(), "hot standby: the old profile keeps running")

        def acquired() -> dict[str, Any] | None:
            events = cluster.status(cluster.node(new))["events"]
            done = [e for e in events if e["event"] == "takeover-acquire"]
            return done[-1] if done else None
        report: dict[str, Any] = wait_for("the takeover's report", acquired, 60)
        self.assertTrue(report["ok"], report)
        self.assertEqual((report["calls_written"], report["calls_recovered"]),
                         (CALLS, CALLS), report)
        self.assertIn("egress", report["steps_ms"])
        code, err = sipp.finish_calls(caller, 120)
        self.assertEqual(code, 0, err)  # every call re-INVITEd, its BYE answered 200
        wait_calls(cluster.fs[new], 0, 30)
        cluster.stop_captures()

        packets = read_pcap(pcap)
        requests = sip_requests(packets, ip)
        self.assertEqual([(r[1], r[2]) for r in requests if r[1] == "BYE"], [],
                         "a BYE from the slot address reached the caller")
        after = [r for r in requests if r[0].time > at]
        self.assertEqual({m for _, m, _ in after}, {"INVITE", "ACK"},
                         "only re-INVITEs (and their ACKs) from the slot after the fault")
        self.assertEqual(len({c for _, m, c in after if m == "INVITE"}), CALLS)
        self.assertTrue(all(p.src_mac == mac[new] for p, _, _ in after))
        first_new = min(p.time for p in packets if p.src_mac == mac[new])
        self.assertEqual(senders(packets, ip, first_new).get(mac[master], 0), 0,
                         "the old master sent from the slot address after the new one")
        gaps = media_gaps(packets, ip, at)
        self.assertEqual(len(gaps), CALLS, gaps)
        self.assertTrue(all(math.isfinite(g) for g in gaps.values()), gaps)

    def test_kill_9_of_the_masters_fsha(self) -> None:
        self.failover("kill")

    def test_sigstop_of_the_masters_fsha(self) -> None:
        self.failover("stop")

