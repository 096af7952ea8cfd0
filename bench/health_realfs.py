"""Busy is not dead, on a real FreeSWITCH: the health probe while 1,000 calls are set up.

    python bench/health_realfs.py --calls 1000 --rate 100

A real FreeSWITCH (bench/realfs.py) gets ``--calls`` answer+park calls from sipp at
``--rate`` per second, and meanwhile a long command runs again and again on the main
connection (``show channels`` of every call). The node's two ESL clients as ``fsha.health``
builds them (main: commands; probe: ``global_getvar core_uuid`` every 0.5 s, 1 s timeout,
hung after 5 s) watch it. Reported: the probe's round trips (p50, max), answers later than
the timeout, whether FreeSWITCH was ever taken for down, and the main connection's drops.
One JSON line last. Loopback only; needs sipp.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realfs import ESL_PORT, IP, RealFS, Sipp


def watch(seconds: float, calls: int, rate: int, folder: Path) -> dict[str, Any]:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.task import LoopingCall, deferLater

    from fsha.eslclient import ConnectionState, ESLClient
    from fsha.health import PROBE_INTERVAL, SwitchHealth

    main = ESLClient.tcp(reactor, IP, ESL_PORT, "ClueCon", request_timeout=1.0,
                         ping_interval=0.5, ping_timeout=1.0, hung_timeout=15.0)
    probe = ESLClient.tcp(reactor, IP, ESL_PORT, "ClueCon", request_timeout=1.0,
                          ping_interval=PROBE_INTERVAL, ping_timeout=1.0,
                          heartbeat_timeout=None, hung_timeout=5.0)
    health = SwitchHealth(main, probe)
    pings: list[float] = []
    downs: list[float] = []
    busy_samples = [0, 0]
    out: dict[str, Any] = {}

    def state(old: ConnectionState, new: ConnectionState) -> None:
        if old is ConnectionState.READY and new is ConnectionState.CONNECTING:
            downs.append(time.monotonic())  # dropped (not our own stop at the end)

    main.add_state_listener(state)
    probe.add_state_listener(state)

    def sample() -> None:
        last = probe.last_ping_seconds
        if last is not None and (not pings or pings[-1] != last):
            pings.append(last)
        busy_samples[0] += 1
        busy_samples[1] += int(health.busy())

    async def run() -> None:
        main.startService()
        probe.startService()
        await main.when_ready()
        await probe.when_ready()
        sipp = Sipp(folder, calls, rate)
        loop = LoopingCall(sample)
        loop.clock = reactor
        loop.start(0.1)
        long_commands = 0
        end = reactor.seconds() + seconds
        try:
            while reactor.seconds() < end:
                try:  # a long listing on the main connection, again and again
                    await main.api("show channels", timeout=30)
                    long_commands += 1
                except Exception:
                    pass
                await deferLater(reactor, 0.2, lambda: None)
        finally:
            loop.stop()
            sipp.stop()
            out["long_commands"] = long_commands
            out["ok_at_end"] = health.is_ok()
            await probe.stopService()
            await main.stopService()

    d = Deferred.fromCoroutine(run())
    d.addErrback(lambda f: out.setdefault("failure", f.getErrorMessage()))
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    ordered = sorted(pings)
    out.update(
        pings=len(pings),
        ping_p50_ms=round(statistics.median(ordered) * 1000, 1) if ordered else None,
        ping_max_ms=round(ordered[-1] * 1000, 1) if ordered else None,
        probe_late_replies=probe.late_reply_count, main_late_replies=main.late_reply_count,
        busy_fraction=round(busy_samples[1] / max(1, busy_samples[0]), 3),
        taken_down=len(downs))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--rate", type=int, default=100)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--dir")
    args = p.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fsha-health-"))
    fs = RealFS(base / "fs")
    fs.start()
    try:
        result = watch(args.seconds, args.calls, args.rate, fs.dir)
        rows = len(fs.rows())
    finally:
        fs.kill()
    print(json.dumps({"bench": "health_realfs", "calls": args.calls, "rate": args.rate,
                      "calls_answered": rows, **result}))


if __name__ == "__main__":
    main()
