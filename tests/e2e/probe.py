"""The client host's SIP prober: ``OPTIONS`` to every floating IP every 10 ms, bounded.

Run inside the client namespace (``ip netns exec NS python probe.py ...``); it needs only the
standard library. Every answer is one JSON line on ``--out`` (flushed at once, so a test can
watch it live)::

    {"ip": "198.18.0.101", "sent": 1764.123, "received": 1764.124, "status": 200,
     "node": "fs2"}

Times are ``time.time()`` (comparable with fsha's event times, which use the same clock).
The run stops by itself after ``--duration`` seconds (at most ``MAX_DURATION``), on SIGTERM
or SIGINT, or when ``--stop-file`` exists; its last line is ``{"summary": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import time
from typing import Any

MAX_DURATION = 600.0  # hard bound on any run, whatever the caller asks
MAX_DATAGRAM = 65535


def options(target: tuple[str, int], local: tuple[str, int], call_id: str, seq: int) -> bytes:
    host, port = target
    lines = [
        f"OPTIONS sip:probe@{host}:{port} SIP/2.0",
        f"Via: SIP/2.0/UDP {local[0]}:{local[1]};branch=z9hG4bK{call_id.replace('-', '')};rport",
        "Max-Forwards: 70",
        f"From: <sip:probe@{local[0]}>;tag=p{os.getpid()}",
        f"To: <sip:probe@{host}>",
        f"Call-ID: {call_id}",
        f"CSeq: {seq} OPTIONS",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_answer(data: bytes) -> tuple[int, str | None, str | None]:
    """(status code, X-FSHA-Node, Call-ID) of a SIP response; (0, None, None) if not one."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").split("\r\n")
    first = head[0].split(" ")
    if len(first) < 2 or first[0] != "SIP/2.0" or not first[1].isdigit():
        return 0, None, None
    node = call_id = None
    for line in head[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        if key == "x-fsha-node":
            node = value.strip()
        elif key in ("call-id", "i"):
            call_id = value.strip()
    return int(first[1]), node, call_id


def run(targets: list[tuple[str, int]], out_path: str, duration: float, interval: float,
        stop_file: str | None) -> dict[str, Any]:
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    socks: dict[int, tuple[socket.socket, tuple[str, int]]] = {}
    for target in targets:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect(target)  # the source address is the one routing picks for the target
        socks[s.fileno()] = (s, target)
    pending: dict[str, float] = {}
    sent = answered = errors = 0
    start = time.monotonic()
    end = start + min(duration, MAX_DURATION)
    max_rounds = int(min(duration, MAX_DURATION) / interval) + 1
    out = open(out_path, "a", buffering=1, encoding="utf-8")
    try:
        out.write(json.dumps({"started": time.time(), "targets": [t[0] for t in targets]})
                  + "\n")
        next_round = start
        rounds = 0
        while not stopping and rounds < max_rounds and time.monotonic() < end:
            if stop_file and rounds % 10 == 0 and os.path.exists(stop_file):
                break
            rounds += 1
            for s, target in socks.values():
                call_id = f"{os.getpid()}-{rounds}-{target[0]}"
                try:
                    s.send(options(target, s.getsockname(), call_id, rounds))
                except OSError:
                    errors += 1  # e.g. no ARP answer yet: the host is unreachable
                    continue
                pending[call_id] = time.time()
                sent += 1
            next_round += interval
            while True:
                wait = next_round - time.monotonic()
                if wait <= 0:
                    break
                try:
                    ready, _, _ = select.select(list(socks), [], [], wait)
                except InterruptedError:
                    break
                for fd in ready:
                    s, target = socks[fd]
                    try:
                        data = s.recv(MAX_DATAGRAM)
                    except OSError:
                        errors += 1  # ICMP port unreachable: nobody serves it (yet)
                        continue
                    received = time.time()
                    code, node, call_id = parse_answer(data)
                    sent_at = pending.pop(call_id, None) if call_id else None
                    if code == 0 or sent_at is None:
                        continue
                    answered += 1
                    out.write(json.dumps({"ip": target[0], "sent": round(sent_at, 6),
                                          "received": round(received, 6), "status": code,
                                          "node": node}) + "\n")
            if len(pending) > 10_000:  # unanswered probes: forget the oldest
                for key in list(pending)[:5_000]:
                    del pending[key]
        summary = {"sent": sent, "answered": answered, "errors": errors, "rounds": rounds,
                   "ended": time.time()}
        out.write(json.dumps({"summary": summary}) + "\n")
        return summary
    finally:
        out.close()
        for s, _ in socks.values():
            s.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Probe floating IPs with SIP OPTIONS.")
    p.add_argument("targets", nargs="+", metavar="IP:PORT")
    p.add_argument("--out", required=True)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--stop-file")
    args = p.parse_args(argv)
    if not 0.001 <= args.interval <= 10 or not 0 < args.duration:
        p.error("--interval must be in [0.001, 10] and --duration > 0")
    targets = []
    for t in args.targets:
        host, _, port = t.rpartition(":")
        targets.append((host, int(port)))
    run(targets, args.out, args.duration, args.interval, args.stop_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
