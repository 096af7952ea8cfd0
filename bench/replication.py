"""Replication benchmark: one master streaming to 3 peers over real mutual TLS on loopback.

    .venv/bin/python bench/replication.py [--changes 100000] [--rate 5000] [--seconds 5]

The master runs in this process; each peer is a separate process (this script with
``--peer NAME``), all on 127.0.x.y with free ports and a throwaway PKI in a temp dir.

Figures:
- ``throughput_changes_per_s``: the master writes ``--changes`` changes (200-byte values) as
  fast as it can; changes / seconds until all 3 peers acknowledged the last one.
- ``lag_*_ms`` at ``--rate`` changes/s for ``--seconds``: one-way lag measured by each peer
  (apply time minus the master's write time carried in the value; same host, same clock),
  and the master's view (ACK time minus write time: a round trip).
- ``memory_per_call_record_bytes``: tracemalloc'd bytes a receiving node holds per call
  record with a ~2 KB XML value (record, log entry, index, value), and that minus the value.

The last line printed is one JSON object with the figures and the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsha import tomlout  # after the path above
from fsha.harness import TLS_FILES

NAMES = ("alpha", "beta", "gamma", "delta")
TARGET_THROUGHPUT = 20_000
TARGET_P99_MS = 20.0
DEADLINE = 120.0


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_cluster(directory: Path) -> Path:
    nodes = []
    for i, name in enumerate(NAMES):
        a, b = f"127.0.1.{i + 1}", f"127.0.2.{i + 1}"
        nodes.append({"name": name, "address": {"a": a, "b": b},
                      "stream": f"{a}:{free_port(a)}", "status": f"{a}:{free_port(a)}",
                      "esl": {"password": "ClueCon"}})
    path = directory / "cluster.toml"
    path.write_text(tomlout.dumps({
        "cluster": {"name": "bench", "secret_file": "secret"},
        "tls": TLS_FILES,
        "network": [{"name": net, "port": free_port(f"127.0.{third}.1")}
                    for net, third in (("a", 1), ("b", 2))],
        "node": nodes,
        "slot": [{"name": "s1", "profiles": ["internal"],
                  "ip": [{"address": "127.0.9.1/32", "interface": "lo"}]}]}))
    (directory / "secret").write_bytes(b"0123456789abcdef0123")
    return path


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- a peer process -------------------------------------------------------------------------


def run_peer(config_path: str, name: str) -> int:
    from twisted.internet import reactor, stdio
    from twisted.internet.protocol import Protocol

    from fsha.config import load_config
    from fsha.replication.service import ReplicationService
    from fsha.replication.state import ApplyResult
    from fsha.wire.stream import Change

    config = load_config(config_path)
    svc = ReplicationService(config, config.node(name), reactor, incarnation=time.time_ns(),
                             log_limit=200_000)
    lags: list[float] = []
    measuring = [False]
    apply = svc.state.apply

    def timed_apply(change: Change) -> ApplyResult:
        result = apply(change)
        if measuring[0] and change.value[:1] == b"T":
            lags.append(time.time() - float(change.value[1:21]))
        return result

    svc.state.apply = timed_apply  # type: ignore[method-assign]

    class Control(Protocol):
        def dataReceived(self, data: bytes) -> None:
            for line in data.split(b"\n"):
                if line == b"measure":
                    lags.clear()
                    measuring[0] = True
                elif line == b"stop-measure":
                    measuring[0] = False

        def connectionLost(self, reason: object = None) -> None:
            d = svc.stopService()
            d.addBoth(lambda _: reactor.stop())

    svc.startService()
    stdio.StandardIO(Control())
    reactor.callLater(DEADLINE * 3, reactor.stop)  # never outlive a lost master
    reactor.run()
    ms = [x * 1000 for x in lags]
    print(json.dumps({"peer": name, "samples": len(ms), "p50_ms": percentile(ms, 0.5),
                      "p99_ms": percentile(ms, 0.99), "max_ms": max(ms) if ms else None,
                      "records": len(svc.state), "digest": svc.state.digest().hex(),
                      "cpu_s": round(time.process_time(), 3)}),
          flush=True)
    return 0


# -- memory per record (in this process, no sockets) ----------------------------------------


def memory_per_record(count: int = 10_000) -> dict[str, float]:
    from twisted.internet.task import Clock

    from fsha.replication.state import ReplicatedState
    from fsha.wire import stream
    from fsha.wire.stream import Kind, StreamDecoder

    clock = Clock()
    clock.advance(time.time())
    master = ReplicatedState(clock, 0, 1)
    xml = (b"<?xml version=\"1.0\"?><call><variables>" + b"<v>x</v>" * 240
           + b"</variables></call>")
    assert 1900 < len(xml) < 2100
    data = b"".join(stream.encode(master.put(0, Kind.CALL, f"c0ffee00-0000-4000-8000-{i:012d}",
                                             xml))
                    for i in range(count))
    decoder = StreamDecoder()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    receiver = ReplicatedState(clock, 1, 1)
    for offset in range(0, len(data), 65536):  # as TLS would deliver it
        for frame in decoder.feed(data[offset:offset + 65536]):
            receiver.apply(frame)  # type: ignore[arg-type]
    del frame
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per = (after - before) / count
    return {"memory_per_call_record_bytes": round(per),
            "memory_per_call_record_overhead_bytes": round(per - len(xml) - 33),
            "call_record_value_bytes": len(xml)}


# -- the master -----------------------------------------------------------------------------


def run_master(args: argparse.Namespace) -> dict[str, Any]:
    from twisted.internet import defer, reactor, task

    from fsha import pki
    from fsha.config import load_config
    from fsha.replication.service import ReplicationService
    from fsha.wire.stream import Kind

    tmp = Path(tempfile.mkdtemp(prefix="fsha-bench-repl-"))
    config_path = write_cluster(tmp)
    config = load_config(config_path)
    pki.ensure_cluster_pki(config)
    peers = [subprocess.Popen([sys.executable, __file__, "--peer", name, "--config",
                               str(config_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=False)
             for name in NAMES[1:]]
    ack_lags: list[float] = []
    measuring = [False]

    def on_lag(peer: int, seconds: float) -> None:
        if measuring[0]:
            ack_lags.append(seconds * 1000)

    master = ReplicationService(config, config.node("alpha"), reactor,
                                incarnation=time.time_ns(), log_limit=max(200_000, args.changes),
                                on_lag=on_lag)
    result: dict[str, Any] = {}

    def acked_all() -> bool:  # cheap enough to poll every millisecond
        sessions = [p.session for p in master._peers.values()]
        return all(s is not None and not s.closed and s.lag()[0] == 0 for s in sessions)

    def wait(cond: Any, what: str, timeout: float = DEADLINE) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        start = time.monotonic()

        def check() -> None:
            if cond():
                loop.stop()
                d.callback(None)
            elif time.monotonic() - start > timeout:
                loop.stop()
                d.errback(RuntimeError(f"timed out: {what}"))

        loop = task.LoopingCall(check)
        loop.start(0.001)
        return d

    @defer.inlineCallbacks
    def main(_: Any) -> Any:
        master.startService()
        try:
            yield wait(lambda: all(p["up"] for p in master.status()["peers"].values()),
                       "links up", 60)
            # -- throughput
            value = b"v" * 200
            n = args.changes
            chunk = 2000
            start = time.perf_counter()
            cpu0 = time.process_time()
            for base in range(0, n, chunk):
                for i in range(base, min(n, base + chunk)):
                    master.put(0, Kind.REGISTRATION, f"user{i % 5000}@bench", value, 0)
                yield task.deferLater(reactor, 0, lambda: None)
            yield wait(acked_all, "throughput run acknowledged")
            elapsed = time.perf_counter() - start
            result["throughput_changes"] = n
            result["throughput_seconds"] = round(elapsed, 3)
            result["throughput_changes_per_s"] = round(n / elapsed)
            result["master_cpu_us_per_change"] = round((time.process_time() - cpu0) / n * 1e6, 1)
            # -- lag at a fixed rate
            for p in peers:
                p.stdin.write(b"measure\n")  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
            yield task.deferLater(reactor, 0.2, lambda: None)
            measuring[0] = True
            tick = 0.005
            per_tick = max(1, round(args.rate * tick))
            written = [0]
            t0 = time.perf_counter()

            def write_tick() -> None:
                # catch up with the schedule (the reactor's timer granularity varies)
                due = int((time.perf_counter() - t0) * args.rate)
                while written[0] < due:
                    i = written[0]
                    stamp = b"T%020.9f" % time.time()
                    master.put(0, Kind.CALL, f"call-{i % 10000}", stamp + b"x" * 180, 0)
                    written[0] += 1

            loop = task.LoopingCall(write_tick)
            loop.clock = reactor
            done = loop.start(tick / 2 if per_tick else tick)
            yield task.deferLater(reactor, args.seconds, lambda: None)
            loop.stop()
            yield done
            rate = written[0] / (time.perf_counter() - t0)
            yield wait(acked_all, "rate run acknowledged")
            measuring[0] = False
            result["rate_target_changes_per_s"] = args.rate
            result["rate_achieved_changes_per_s"] = round(rate)
            result["ack_lag_p50_ms"] = round(percentile(ack_lags, 0.5), 3)
            result["ack_lag_p99_ms"] = round(percentile(ack_lags, 0.99), 3)
            result["ack_lag_samples"] = len(ack_lags)
            result["master_digest"] = master.state.digest().hex()
        finally:
            yield master.stopService()

    try:
        task.react(lambda r: main(None).addBoth(lambda x: x), [])
    except SystemExit as e:
        if e.code:
            for p in peers:
                p.kill()
            raise
    finally:
        outputs = []
        for p in peers:
            try:
                out, _ = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            lines = out.decode().strip().splitlines()
            if lines:
                outputs.append(json.loads(lines[-1]))
        result["peers"] = outputs
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--peer")
    parser.add_argument("--config")
    args = parser.parse_args()
    if args.peer:
        return run_peer(args.config, args.peer)
    result: dict[str, Any] = {"bench": "replication", "peers_count": 3,
                              "transport": "mutual TLS over loopback, master and 3 peers in "
                                           "separate processes",
                              "cpus": os.cpu_count()}
    result.update(run_master(args))
    peers = result.get("peers", [])
    one_way = [p for p in peers if p.get("samples")]
    result["lag_p50_ms"] = round(max(p["p50_ms"] for p in one_way), 3) if one_way else None
    result["lag_p99_ms"] = round(max(p["p99_ms"] for p in one_way), 3) if one_way else None
    total = result.get("throughput_changes", 0) + result.get("rate_achieved_changes_per_s", 0) \
        * args.seconds
    if peers and total:
        result["peer_cpu_us_per_change"] = round(
            max(p["cpu_s"] for p in peers) / total * 1e6, 1)  # start-up included
    result["peers_converged"] = bool(peers) and all(
        p["digest"] == result.get("master_digest") for p in peers)
    result.update(memory_per_record())
    result["target"] = {"throughput_changes_per_s": TARGET_THROUGHPUT,
                        "lag_p99_ms_at_rate": TARGET_P99_MS, "rate": 5000}
    result["meets_target"] = bool(
        result.get("throughput_changes_per_s", 0) >= TARGET_THROUGHPUT
        and result["lag_p99_ms"] is not None and result["lag_p99_ms"] <= TARGET_P99_MS)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
