"""Issue 16's done-when on real FreeSWITCHes: a slot with N answered calls fails over on a
kill -9 of its master (fsha and its FreeSWITCH), the first time, every call recovered and
re-INVITEd, the first call back within 1 s of the takeover's start.

    python bench/cluster_realfs.py --calls 1000

Three ``twistd fsha`` nodes on loopback over three real FreeSWITCHes (/opt/freeswitch,
``conf/freeswitch/freeswitch.xml``; the loopback cluster of tests/freeswitch/realfs.py),
replication over mutual TLS. sipp places ``--calls`` calls to the slot at ``--rate`` per
second; each waits for the new master's re-INVITE, answers it, and ends with a BYE that
must be answered 200 (sipp's exit status 0: every call did). Once every node holds the
calls, fs1's fsha and FreeSWITCH are killed with -9. Reported, from the takeover's own
report: ``first_call_ms`` (acquire start to the first batch back), ``takeover_ms`` (the
whole acquire), ``recovered``, ``lost``, ``attempts`` (acquisitions of the slot after the
kill, in the whole cluster: 1 is the first time), ``kill_to_master_ms`` (kill to the
cluster agreeing on the new master, as polled here), sipp's result (``sipp_failed`` calls)
and the load average. One JSON line last. Loopback only; needs sipp.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_FIRST_CALL_MS = 1000.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--rate", type=int, default=50, help="sipp calls per second")
    p.add_argument("--dir", help="work folder, kept (default: a new temporary one)")
    args = p.parse_args()
    if not 1 <= args.calls <= 5000 or not 1 <= args.rate <= 500:
        p.error("1-5000 calls at 1-500 per second")

    from fsha.harness import HarnessError, wait_for
    from tests.freeswitch import sipp
    from tests.freeswitch.realfs import RealFreeSWITCHCluster, free_port, skip_reason

    reason = skip_reason() or (None if sipp.SIPP else "sipp is not installed")
    if reason:
        raise SystemExit(reason)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fsha-realfs-"))
    work.mkdir(parents=True, exist_ok=True)
    n = args.calls
    cluster = RealFreeSWITCHCluster(work, rtp_ports=4 * n)
    cluster.keep = args.dir is not None
    result: dict[str, Any] = {"bench": "cluster_realfs", "calls": n, "rate": args.rate}
    caller = None
    try:
        cluster.start(timeout=90)
        cluster.wait_converged(timeout=90)
        ip, port = cluster.slot_ip, cluster.sip_port
        setup = n / args.rate
        caller = sipp.start_calls(ip, port, n, work, reinvite_within=setup + 600,
                                  local_port=free_port("127.0.0.1", 2), rate=args.rate)
        master = cluster.fs["fs1"]

        def count() -> int:
            text = master.api("show calls count").strip()
            return int(text.split()[0]) if text.endswith("total.") else -1
        wait_for(f"{n} calls on fs1", lambda: count() == n, setup * 3 + 60, interval=0.5)
        wait_for("the calls replicated to every node", lambda: all(
            st["replication"]["slots"].get("slot1", {}).get("call", 0) == n
            for st in cluster.statuses().values()), 120, interval=0.5)
        result["load_before"] = [round(x, 2) for x in os.getloadavg()]
        killed = cluster.kill("fs1", sim_too=True)
        new = wait_for("slot1 to move", lambda: (cluster.owner("slot1") or "fs1") != "fs1"
                       and cluster.owner("slot1"), 120, interval=0.05)
        moved = time.time()
        statuses = cluster.statuses()
        attempts = [e for st in statuses.values() for e in st["events"]
                    if e["event"] == "takeover-acquire" and e["slot"] == "slot1"
                    and e["epoch"] > 1]
        ok = [e for e in attempts if e["ok"]]
        # every attempt in brief, and the rollbacks (calls_left: recovered, then left to
        # the next attempt when the lease or a better claim ended the first)
        result["attempt_log"] = [{k: e.get(k) for k in (
            "ok", "epoch", "first_call_ms", "calls_recovered", "total_ms", "error")}
            for e in attempts]
        result["rollbacks"] = [{k: e.get(k) for k in ("epoch", "calls_left", "warnings")}
                               for st in statuses.values() for e in st["events"]
                               if e["event"] == "takeover-rollback" and e["slot"] == "slot1"]
        report = ok[-1] if ok else {}
        code, err = sipp.finish_calls(caller, setup + 300)
        failed = re.search(r"Failed call\S*\s*\|\s*\d+\s*\|\s*(\d+)", err)
        result.update(
            new_master=new, attempts=len(attempts), ok=bool(ok),
            first_call_ms=report.get("first_call_ms"), takeover_ms=report.get("total_ms"),
            steps_ms=report.get("steps_ms"), written=report.get("calls_written"),
            recovered=report.get("calls_recovered"),
            lost=n - (report.get("calls_recovered") or 0),
            kill_to_master_ms=round((moved - killed) * 1000, 1),
            sipp_exit=code, sipp_failed=int(failed.group(1)) if failed else None,
            warnings=report.get("warnings"),
            load_after=[round(x, 2) for x in os.getloadavg()],
            target_first_call_ms=TARGET_FIRST_CALL_MS)
        if code != 0:
            result["sipp_stderr"] = err[-600:]
    except HarnessError as e:
        result["error"] = str(e)
    finally:
        if caller is not None and caller.poll() is None:
            caller.kill()
            caller.wait(30)
        cluster.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
