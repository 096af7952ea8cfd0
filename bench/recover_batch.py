"""Which recovery batch size is fastest on a real FreeSWITCH? (``[takeover] recover_batch``)

    python bench/recover_batch.py --calls 1000 --batches 25,50,100,200,1000

For each batch size: a fresh FreeSWITCH (/opt/freeswitch, loopback, bench/realfs.py), sipp
places ``--calls`` answer+park calls that accept re-INVITEs, FreeSWITCH is killed (-9) and
started again (a new runtime, the rows of the old one still in core.db); the rows are taken
out of the table and written back ``batch`` at a time, each batch followed by ``sofia
profile slot1 recover`` (what fsha's takeover does). Reported per batch size: time to the
first batch back, to the last recover's answer, to every channel listed, the slowest
single recover, ms per call, calls recovered, FreeSWITCH's ``SQLite is BUSY`` warnings.
Prints one JSON line last. Needs /opt/freeswitch and sipp; loopback only.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realfs import ESL, PROFILE, RealFS, Sipp, count_channels, wait, wait_rows

_RECOVERED = re.compile(r"Recovered (\d+) session")


def trial(base: Path, calls: int, batch: int, rate: int) -> dict[str, Any]:
    fs = RealFS(base / f"batch{batch}")
    fs.start()
    sipp = Sipp(fs.dir, calls, rate)
    try:
        wait_rows(fs, calls, 180 + 3 * calls / rate)
        fs.kill()
        rows = fs.rows()
        with sqlite3.connect(fs.core_db, timeout=30) as conn:
            conn.execute("delete from recovery")
        fs.start()
        esl = ESL()
        try:
            if count_channels(esl):
                raise RuntimeError("FreeSWITCH recovered calls by itself at start")
            busy_before = fs.busy_warnings()
            recovered = 0
            slowest = 0.0
            first = None
            t0 = time.monotonic()
            with sqlite3.connect(fs.core_db, timeout=30) as conn:
                for i in range(0, len(rows), batch):
                    with conn:
                        conn.executemany("insert into recovery values (?,?,?,?,?,?)",
                                         rows[i:i + batch])
                    t = time.monotonic()
                    out = esl.api(f"sofia profile {PROFILE} recover")
                    slowest = max(slowest, time.monotonic() - t)
                    m = _RECOVERED.search(out)
                    recovered += int(m.group(1)) if m else 0
                    if first is None and recovered:
                        first = time.monotonic() - t0
            returned = time.monotonic() - t0
            wait("every recovered channel listed", lambda: count_channels(esl) >= recovered,
                 120, 0.1)
            listed = time.monotonic() - t0
            result = {"batch": batch, "rows": len(rows), "recovered": recovered,
                      "first_batch_s": round(first or 0.0, 3),
                      "all_recovers_returned_s": round(returned, 3),
                      "all_listed_s": round(listed, 3),
                      "slowest_recover_s": round(slowest, 3),
                      "ms_per_call": round(returned * 1000 / max(1, recovered), 2),
                      "sqlite_busy": fs.busy_warnings() - busy_before}
        finally:
            esl.close()
        return result
    finally:
        sipp.stop()
        fs.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--batches", default="25,50,100,200,1000")
    p.add_argument("--rate", type=int, default=100, help="sipp calls per second")
    p.add_argument("--dir", help="work folder (default: a new temporary one)")
    args = p.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fsha-recover-"))
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        r = trial(base, args.calls, batch, args.rate)
        print(json.dumps(r), flush=True)
        results.append(r)
    best = min(results, key=lambda r: r["all_recovers_returned_s"])
    print(json.dumps({"bench": "recover_batch", "calls": args.calls, "results": results,
                      "fastest_batch": best["batch"]}))


if __name__ == "__main__":
    main()
