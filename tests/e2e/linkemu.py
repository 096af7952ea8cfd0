"""Impairable cables: loss, delay and jitter per link, in userspace (netem's job).

``tc qdisc ... netem`` is the usual tool, but kernels built without ``sch_netem`` (such as
this project's CI machines) cannot do it. So a cable the harness may impair is not a veth
pair but two TAP devices, one in the node host (``ethA``) and one in the switch
(``i1A``, on the bridge), and this process carries every frame between them, dropping or
holding it as told. With no impairment a frame is forwarded at once.

Run by :class:`tests.e2e.netns.NetnsCluster` (standard library only)::

    python linkemu.py --seed 7 --max-seconds 3600 LINK ...

where each ``LINK`` is ``NAME:HOST_NS:HOST_DEV:SWITCH_NS:SWITCH_DEV`` (namespace names
under ``/run/netns``). It creates the devices, prints ``ready``, then reads commands on
stdin, one JSON object a line, and answers each with one line (``ok`` or ``error: ...``)::

    {"link": "1A", "direction": "both", "loss": 0.05, "delay_ms": 20, "jitter_ms": 20}

The line ``stats`` is answered with the frames carried and dropped so far, per link and
direction, as one JSON object.

``direction``: ``out`` (host to switch), ``in`` (switch to host) or ``both``. Like netem,
the delay of each frame is ``delay_ms`` plus a uniform ``[-jitter_ms, +jitter_ms]``
(clamped at 0), and frames leave in order of their due time, so jitter reorders them.
``loss`` is the probability (0-1) that a frame is dropped. It stops by itself after
``--max-seconds``, when stdin closes (its driver is gone) or on SIGTERM; its devices vanish
with it.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import sys
import time
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
MAX_FRAME = 65536
MAX_QUEUED = 20_000  # frames held at once, all links: beyond it new frames are dropped

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Impairment:
    loss: float = 0.0
    delay: float = 0.0  # seconds
    jitter: float = 0.0

    @property
    def none(self) -> bool:
        return self.loss == 0.0 and self.delay == 0.0 and self.jitter == 0.0


@dataclass
class Direction:
    source: int  # fd frames are read from
    target: int  # fd they are written to
    impairment: Impairment
    frames: int = 0
    dropped: int = 0


def parse_command(line: str) -> tuple[str, str, Impairment]:
    """(link, direction, impairment) of one command; ValueError if it is not one."""
    try:
        cmd = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(cmd, dict) or not isinstance(cmd.get("link"), str):
        raise ValueError("need an object with a \"link\"")
    direction = cmd.get("direction", "both")
    if direction not in ("in", "out", "both"):
        raise ValueError("direction must be in, out or both")
    loss, delay, jitter = (cmd.get(k, 0) for k in ("loss", "delay_ms", "jitter_ms"))
    for name, value, top in (("loss", loss, 1), ("delay_ms", delay, 10_000),
                             ("jitter_ms", jitter, 10_000)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 <= value <= top:
            raise ValueError(f"{name} must be a number in [0, {top}]")
    return cmd["link"], direction, Impairment(float(loss), delay / 1000, jitter / 1000)


def due_in(impairment: Impairment, rng: random.Random) -> float | None:
    """Seconds until a frame leaves (None: dropped)."""
    if impairment.loss and rng.random() < impairment.loss:
        return None
    delay = impairment.delay
    if impairment.jitter:
        delay += rng.uniform(-impairment.jitter, impairment.jitter)
    return max(0.0, delay)


def open_tap(netns: str, name: str) -> int:
    """Create TAP device ``name`` in namespace ``netns``; returns its fd (non-blocking)."""
    with open("/proc/thread-self/ns/net", "rb") as back, \
            open(f"/run/netns/{netns}", "rb") as to:
        if _libc.setns(to.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        finally:
            if _libc.setns(back.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    return fd


def run(links: list[str], seed: int, max_seconds: float) -> int:
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    rng = random.Random(seed)
    directions: dict[int, Direction] = {}  # by source fd
    by_link: dict[str, tuple[Direction, Direction]] = {}
    for spec in links:
        name, host_ns, host_dev, switch_ns, switch_dev = spec.split(":")
        host, switch = open_tap(host_ns, host_dev), open_tap(switch_ns, switch_dev)
        out, into = Direction(host, switch, Impairment()), Direction(switch, host, Impairment())
        directions[host], directions[switch] = out, into
        by_link[name] = (out, into)
    print("ready", flush=True)
    queue: list[tuple[float, int, int, bytes]] = []  # (due, order, target fd, frame)
    order = 0
    end = time.monotonic() + max_seconds
    stdin = sys.stdin.fileno()
    watched = [stdin, *directions]
    pending_input = b""
    while not stopping and time.monotonic() < end:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, target, frame = heapq.heappop(queue)
            _write(target, frame)
        wait = min(1.0, end - now, queue[0][0] - now if queue else 1.0)
        try:
            ready, _, _ = select.select(watched, [], [], max(0.0, wait))
        except InterruptedError:
            continue
        for fd in ready:
            if fd == stdin:
                data = os.read(stdin, 4096)
                if not data:
                    return 0  # the driver is gone
                pending_input += data
                while b"\n" in pending_input:
                    line, _, pending_input = pending_input.partition(b"\n")
                    print(_apply(line.decode(errors="replace"), by_link), flush=True)
                continue
            d = directions[fd]
            for _ in range(64):  # bounded per wake-up: other links get their turn
                try:
                    frame = os.read(fd, MAX_FRAME)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break  # e.g. the device is down
                d.frames += 1
                if d.impairment.none and not queue:
                    _write(d.target, frame)
                    continue
                delay = due_in(d.impairment, rng)
                if delay is None or len(queue) >= MAX_QUEUED:
                    d.dropped += 1
                    continue
                order += 1
                heapq.heappush(queue, (time.monotonic() + delay, order, d.target, frame))
    return 0


def _write(fd: int, frame: bytes) -> None:
    try:
        os.write(fd, frame)
    except OSError:
        pass  # the other side is down: the frame is lost, as on a cable


def _apply(line: str, by_link: dict[str, tuple[Direction, Direction]]) -> str:
    if line.strip() == "stats":
        return json.dumps({name: {"out": {"frames": out.frames, "dropped": out.dropped},
                                  "in": {"frames": into.frames, "dropped": into.dropped}}
                           for name, (out, into) in by_link.items()})
    try:
        link, direction, impairment = parse_command(line)
    except ValueError as e:
        return f"error: {e}"
    if link not in by_link:
        return f"error: no link {link!r}"
    out, into = by_link[link]
    for d in ((out, into) if direction == "both" else (out,) if direction == "out" else (into,)):
        d.impairment = impairment
    return "ok"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Impairable cables between network namespaces.")
    p.add_argument("links", nargs="+", metavar="NAME:HOST_NS:HOST_DEV:SWITCH_NS:SWITCH_DEV")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=3600.0)
    args = p.parse_args(argv)
    if not 0 < args.max_seconds <= 86400:
        p.error("--max-seconds must be in (0, 86400]")
    return run(args.links, args.seed, args.max_seconds)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
