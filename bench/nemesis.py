"""Randomized nemesis on namespaced hosts (tests/e2e/nemesis.py): minutes of random
partitions (symmetric, one-way, nontransitive), isolated nodes, kill -9 and restarts,
SIGSTOP/SIGCONT and config rollout steps on a 3-node, 2-slot cluster, with a checker
sampling ``ip addr`` on every host. Prints the faults injected, the longest stretch and
the total time with a floating IP on two running hosts (goal: 0 beyond one heartbeat
interval), and the time the cluster took to settle once healed; one JSON object last.

    sudo .venv/bin/python bench/nemesis.py --seconds 120
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsha.harness import HarnessError
from tests.e2e.nemesis import run_nemesis
from tests.e2e.netns import NetnsCluster, unavailable_reason


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--interval-ms", type=int, default=20)
    p.add_argument("--dead-after-ms", type=int, default=100)
    args = p.parse_args(argv)
    if not 5 <= args.seconds <= 3600:
        p.error("--seconds must be 5..3600")
    reason = unavailable_reason()
    if reason:
        print(json.dumps({"benchmark": "nemesis", "skipped": reason}))
        return 1
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    with NetnsCluster(nodes=3, slots=2, interval_ms=args.interval_ms,
                      dead_after_ms=args.dead_after_ms) as cluster:
        try:
            cluster.start(timeout=60)
            cluster.wait_converged(timeout=60)
            figures = run_nemesis(cluster, args.seconds, seed)
        except HarnessError:
            print(cluster.all_logs(), file=sys.stderr)
            raise
    for when, what in figures.pop("log"):
        print(f"{when:.3f} {what}")
    bound_ms = args.interval_ms + 100  # one interval + the sampler's resolution
    summary = {"benchmark": "nemesis", **figures,
               "heartbeat_interval_ms": args.interval_ms,
               "dead_after_ms": args.dead_after_ms, "bound_ms": bound_ms,
               "holds": figures["worst_two_holders_ms"] <= bound_ms}
    print(json.dumps(summary))
    return 0 if summary["holds"] else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
