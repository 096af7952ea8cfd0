"""``fsha demo``: a live cluster on loopback whose master dies and whose calls survive.

Starts N real fsha nodes (``twistd -n fsha``) and their FreeSWITCH simulators as separate
processes on 127.0.0.0/8, waits for the cluster to form, places calls and registrations on
every master's FreeSWITCH, waits until every node holds their replicated records, injects a
failure on the master of the first slot and shows the takeover as a timeline: detected,
announced, IPs up, calls recovered, registrations restored, master. Then the failed node
comes back and rejoins as a slave. The last line printed is a JSON summary. Every process it
started is ended on exit, also on Ctrl-C.

Failures: ``kill`` (kill -9 of fsha and its FreeSWITCH: a dead host) and ``kill-fs`` (kill -9
of FreeSWITCH only: fsha sees it go and releases the slot at once). A *hung* FreeSWITCH
(its event socket stops answering; fsha's watchdog notices and releases) cannot be shown on
loopback: all "hosts" share one kernel, so the hung process keeps the floating IP's SIP port
bound and no other node's profile can bind it, whereas on real hosts the released address
leaves the old host. That case runs in the network-namespace harness.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from fsha.harness import HarnessError, LoopbackCluster, wait_for
from fsha.status import render

FAILURES = ("kill", "kill-fs")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _event(events: list[dict[str, Any]], since: float, **match: Any) -> dict[str, Any] | None:
    for e in events:
        if e["time"] >= since - 0.001 and all(e.get(k) == v for k, v in match.items()):
            return e
    return None


def _ms(event: dict[str, Any] | None, since: float) -> float | None:
    return None if event is None else round((event["time"] - since) * 1000, 1)


def run_demo(nodes: int, slots: int, calls: int, registrations: int, failure: str,
             interval_ms: int, dead_after_ms: int, keep: bool) -> dict[str, Any]:
    with LoopbackCluster(nodes, slots, interval_ms=interval_ms, dead_after_ms=dead_after_ms,
                         keep=keep) as cluster:
        _say(f"== starting {nodes} nodes ({slots} slots, {nodes - slots} spare), each with its "
             f"FreeSWITCH simulator, in {cluster.dir}")
        started = time.time()
        cluster.start()
        view = cluster.wait_converged(timeout=60)
        _say(f"== cluster formed in {(time.time() - started) * 1000:.0f} ms")

        owners = {s["name"]: s["owner"] for s in view["slots"]}
        for slot, owner in owners.items():
            if calls:
                cluster.sim_control(owner, "/calls", {"profile": slot, "count": calls,
                                                      "answer": True})
            if registrations:
                cluster.sim_control(owner, "/register", {"profile": slot,
                                                         "count": registrations})
        _say(f"== placed {calls} answered calls and {registrations} registrations on each "
             "master's FreeSWITCH; waiting until every node holds them")

        def replicated() -> bool:
            for status in cluster.statuses().values():
                held = status["replication"]["slots"]
                for slot in owners:
                    counts = held.get(slot, {})
                    if counts.get("call", 0) != calls or \
                            counts.get("registration", 0) != registrations:
                        return False
            return True
        wait_for("replication of the calls to every node", replicated, timeout=60)
        _say()
        _say(render(cluster.status(cluster.node(owners[next(iter(owners))]))))

        slot = next(iter(owners))
        victim = owners[slot]
        victim_node = cluster.node(victim)
        _say(f"\n== failure: {failure} on {victim}, master of {slot}")
        if failure == "kill":
            failed_at = cluster.kill(victim, sim_too=True)
        else:
            assert victim_node.sim is not None
            failed_at = time.time()
            victim_node.sim.kill()
            victim_node.sim.wait(timeout=10)

        new_owner = wait_for(f"{slot} to be taken over",
                             lambda: cluster.owner(slot) not in (None, victim)
                             and cluster.owner(slot), timeout=60)
        status = cluster.status(cluster.node(new_owner))
        events = status["events"]
        detected = (_event(events, failed_at, event="peer-down", peer=victim)
                    or _event(events, failed_at, event="peer-release", peer=victim))
        claimed = _event(events, failed_at, event="claim", slot=slot)
        report = _event(events, failed_at, event="takeover-acquire", slot=slot) or {}
        master = _event(events, failed_at, event="master", slot=slot)
        detection_ms, master_ms = _ms(detected, failed_at), _ms(master, failed_at)
        why = ("no heartbeat on any network" if detected and detected["event"] == "peer-down"
               else "it announced the release of its slot")
        steps = report.get("steps_ms", {})
        _say(f"   +{0:7.1f} ms  {failure}: {victim}")
        _say(f"   +{detection_ms:7.1f} ms  {new_owner}: {victim} is gone ({why})")
        _say(f"   +{_ms(claimed, failed_at):7.1f} ms  {new_owner}: primary candidate with quorum: "
             f"announces takeover of {slot}, epoch {status['epoch']}")
        _say(f"   {'':>10}     floating IPs up in {steps.get('floating_ips', 0):.1f} ms; "
             f"{report.get('calls_written', 0)} recovery rows written in "
             f"{steps.get('recovery_rows', 0):.1f} ms")
        _say(f"   {'':>10}     sofia profile {slot} recover: {report.get('calls_recovered', 0)} "
             f"calls recovered in {steps.get('recover', 0):.1f} ms")
        _say(f"   {'':>10}     {report.get('registrations_restored', 0)} registrations "
             f"restored in {steps.get('registrations', 0):.1f} ms")
        _say(f"   +{master_ms:7.1f} ms  {new_owner}: master of {slot}")
        live = cluster.sim_control(new_owner, "/calls")
        live_calls = len(live["calls"]) if isinstance(live, dict) else len(live)
        _say(f"   {new_owner}'s FreeSWITCH now carries {live_calls} live calls")
        _say()
        _say(render(status))

        _say(f"\n== bringing {victim} back: it must rejoin as a slave, never preempting")
        cluster.restart(victim)

        def rejoined() -> bool:
            statuses = cluster.statuses()
            return (len(statuses) == nodes and cluster.converged() is not None
                    and victim in statuses[new_owner]["ranking"])
        wait_for(f"{victim} to rejoin as a ranked slave", rejoined, timeout=60)
        final = cluster.statuses()
        _say(render(final[new_owner]))
        assert detection_ms is not None and master_ms is not None
        return {
            "slots": slots, "nodes": nodes, "failure": failure, "killed": victim,
            "slot": slot, "new_owner": new_owner, "detection_ms": detection_ms,
            "takeover_ms": round(master_ms - detection_ms, 1), "failover_ms": master_ms,
            "calls_before": calls, "calls_recovered": report.get("calls_recovered", 0),
            "registrations_before": registrations,
            "registrations_restored": report.get("registrations_restored", 0),
            "live_calls_on_new_master": live_calls,
            "rejoined_as": final[victim]["role"], "owner_after_rejoin": cluster.owner(slot),
            "heartbeat_interval_ms": interval_ms, "dead_after_ms": dead_after_ms,
        }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fsha demo", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="nodes (default 3)")
    parser.add_argument("--slots", type=int, default=2, help="slots (default 2)")
    parser.add_argument("--calls", type=int, default=100,
                        help="answered calls per master (default 100)")
    parser.add_argument("--registrations", type=int, default=50,
                        help="registrations per master (default 50)")
    parser.add_argument("--failure", choices=FAILURES, default="kill",
                        help="what happens to the master (default: kill)")
    parser.add_argument("--interval-ms", type=int, default=20, help="heartbeat interval")
    parser.add_argument("--dead-after-ms", type=int, default=100, help="dead-after time")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (config, PKI, logs, core DBs)")
    args = parser.parse_args(argv)
    if not 1 <= args.slots < args.nodes <= 50:
        print("fsha demo: need 1 <= slots < nodes <= 50 (at least one spare)", file=sys.stderr)
        return 2
    if not 0 <= args.calls <= 20_000 or not 0 <= args.registrations <= 100_000:
        print("fsha demo: --calls 0-20000, --registrations 0-100000", file=sys.stderr)
        return 2
    try:
        summary = run_demo(args.nodes, args.slots, args.calls, args.registrations,
                           args.failure, args.interval_ms, args.dead_after_ms, args.keep)
    except HarnessError as e:
        print(f"fsha demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fsha demo: interrupted; every process it started has been stopped",
              file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0
