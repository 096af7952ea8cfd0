"""``fsha demo``: a live cluster on loopback that loses a master and recovers.

Starts N real fsha nodes (``twistd -n fsha``) and their FreeSWITCH simulators as separate
processes on 127.0.0.0/8, waits for the cluster to form, shows its status, ``kill -9``s the
master of the first slot, shows the takeover as a timeline, restarts the killed node and
shows it rejoin as a slave. The last line printed is a JSON summary. Every process it
started is ended on exit, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from fsha.harness import HarnessError, LoopbackCluster, wait_for
from fsha.status import render


def _say(text: str) -> None:
    print(text, flush=True)


def _event_ms(events: list[dict[str, Any]], since: float, **match: Any) -> float | None:
    for e in events:
        if e["time"] >= since - 0.001 and all(e.get(k) == v for k, v in match.items()):
            return round((e["time"] - since) * 1000, 1)
    return None


def run_demo(nodes: int, slots: int, interval_ms: int, dead_after_ms: int,
             keep: bool) -> dict[str, Any]:
    with LoopbackCluster(nodes, slots, interval_ms=interval_ms, dead_after_ms=dead_after_ms,
                         keep=keep) as cluster:
        _say(f"== starting {nodes} nodes ({slots} slots, {nodes - slots} spare) with their "
             f"FreeSWITCH simulators in {cluster.dir}")
        started = time.time()
        cluster.start()
        view = cluster.wait_converged(timeout=60)
        formed_ms = round((time.time() - started) * 1000)
        _say(f"== cluster formed in {formed_ms} ms (processes started, discovery, claims)\n")
        _say(render(view))

        slot = view["slots"][0]["name"]
        victim = view["slots"][0]["owner"]
        _say(f"\n== kill -9 {victim} (master of {slot}), fsha and its FreeSWITCH")
        killed_at = cluster.kill(victim, sim_too=True)
        new_owner = wait_for(f"{slot} to be taken over",
                             lambda: cluster.owner(slot) not in (None, victim)
                             and cluster.owner(slot), timeout=30)
        status = cluster.status(cluster.node(new_owner))
        events = status["events"]
        detection_ms = _event_ms(events, killed_at, event="peer-down", peer=victim)
        claim_ms = _event_ms(events, killed_at, event="claim", slot=slot)
        master_ms = _event_ms(events, killed_at, event="master", slot=slot)
        _say(f"   +{0:7.1f} ms  {victim} killed")
        _say(f"   +{detection_ms:7.1f} ms  {new_owner}: no heartbeat from {victim} on any "
             f"network for {dead_after_ms} ms: {victim} is dead")
        _say(f"   +{claim_ms:7.1f} ms  {new_owner}: primary candidate, quorum "
             f"{status['quorum']['alive']}/{status['quorum']['required']}: announces takeover "
             f"of {slot} (epoch {status['epoch']})")
        _say(f"   +{master_ms:7.1f} ms  {new_owner}: master of {slot}")
        _say("")
        _say(render(status))

        _say(f"\n== restarting {victim}: it must rejoin as a slave, never preempting")
        cluster.restart(victim)
        def rejoined() -> bool:
            statuses = cluster.statuses()
            return (len(statuses) == nodes and cluster.converged() is not None
                    and victim in statuses[new_owner]["ranking"])
        wait_for(f"{victim} to rejoin as a ranked slave", rejoined, timeout=60)
        final = cluster.statuses()
        rejoined_as = final[victim]["role"]
        _say(render(final[new_owner]))
        assert detection_ms is not None and master_ms is not None and claim_ms is not None
        return {
            "slots": slots, "nodes": nodes, "killed": victim, "slot": slot,
            "new_owner": new_owner, "detection_ms": detection_ms,
            "takeover_ms": round(master_ms - detection_ms, 1), "failover_ms": master_ms,
            "rejoined_as": rejoined_as,
            "owner_after_rejoin": cluster.owner(slot),
            "heartbeat_interval_ms": interval_ms, "dead_after_ms": dead_after_ms,
        }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fsha demo", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="nodes (default 3)")
    parser.add_argument("--slots", type=int, default=2, help="slots (default 2)")
    parser.add_argument("--interval-ms", type=int, default=20, help="heartbeat interval")
    parser.add_argument("--dead-after-ms", type=int, default=100, help="dead-after time")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (config, logs, core DBs)")
    args = parser.parse_args(argv)
    if not 1 <= args.slots < args.nodes <= 50:
        print("fsha demo: need 1 <= slots < nodes <= 50 (at least one spare)", file=sys.stderr)
        return 2
    try:
        summary = run_demo(args.nodes, args.slots, args.interval_ms, args.dead_after_ms,
                           args.keep)
    except HarnessError as e:
        print(f"fsha demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fsha demo: interrupted; every process it started has been stopped",
              file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0
