"""Heartbeat benchmark: codec throughput on one core (and an optional long decoder fuzz).

Usage::

    python bench/heartbeat.py [--seconds S] [--fuzz-seconds N] [--seed SEED]

Prints progress on stderr and one JSON object on the last line of stdout, e.g.
``{"bench": "heartbeat", "decode_per_s": ..., "target_decode_per_s": 50000, ...}``.
Rates are datagrams per second of process CPU time in one thread (so a busy shared machine
disturbs them less than wall time would), median of several rounds. ``--fuzz-seconds``
adds a bounded random-bytes / mutation fuzz of ``decode``; the exit status is 1 if the
fuzz found a problem (an exception other than HeartbeatError, or a forged datagram that
decoded), 0 otherwise.

Each figure comes from one function taking its parameters and returning a dict, so more
figures (e.g. the per-node CPU of a simulated cluster) can be merged into the same object.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from fsha.wire.heartbeat import (
    NO_NODE,
    NO_SLOT,
    SIZE,
    Flags,
    Heartbeat,
    HeartbeatCodec,
    HeartbeatError,
    MessageType,
    Role,
    cluster_id_for,
)

TARGET_DECODE_PER_S = 50_000
SECRET = os.urandom(32)
CLUSTER = cluster_id_for("bench")


def sample_messages(count: int, cluster_id: int = CLUSTER) -> list[Heartbeat]:
    """``count`` realistic messages from different nodes (mostly heartbeats)."""
    rng = random.Random(1)
    out = []
    for i in range(count):
        node = i % 32
        if i % 16 == 15:
            msg_type, slot, subject = MessageType.TAKEOVER, node % 8, (node + 1) % 32
        else:
            slot = node if node < 8 else NO_SLOT
            msg_type, subject = MessageType.HEARTBEAT, NO_NODE
        out.append(
            Heartbeat(
                type=msg_type,
                cluster_id=cluster_id,
                node_id=node,
                incarnation=1_700_000_000_000 + node,
                sequence=1000 + i,
                role=Role.MASTER if slot != NO_SLOT else Role.SLAVE,
                flags=Flags.FS_OK | Flags.SEES_QUORUM,
                slot=slot,
                epoch=rng.randrange(1, 100) if slot != NO_SLOT else 0,
                subject=subject,
                config_digest=rng.randbytes(8),
                view_digest=rng.randbytes(8),
            )
        )
    return out


def _rate(
    op: Callable[[Any], object], items: Sequence[Any], seconds: float, rounds: int = 5
) -> float:
    """Median calls per CPU-second of ``op`` over ``items``, over ``rounds`` rounds."""
    per_round = seconds / rounds
    rates = []
    for _ in range(rounds):
        calls = 0
        start = time.process_time()
        deadline = start + per_round
        while True:
            for item in items:
                op(item)
            calls += len(items)
            now = time.process_time()
            if now >= deadline:
                break
        rates.append(calls / max(now - start, 1e-9))
    return statistics.median(rates)


def _rejecting(codec: HeartbeatCodec) -> Callable[[bytes], object]:
    def op(data: bytes) -> object:
        try:
            return codec.decode(data)
        except HeartbeatError as e:
            return e.reason

    return op


def bench_codec(seconds: float = 2.0) -> dict[str, Any]:
    """Encode, decode+verify, and the two common rejections, per CPU-second on one core."""
    codec = HeartbeatCodec(SECRET, CLUSTER)
    msgs = sample_messages(256)
    datagrams = [codec.encode(m) for m in msgs]
    assert all(codec.decode(d) == m for d, m in zip(datagrams, msgs, strict=True))
    bad_tag = [d[:-1] + bytes([d[-1] ^ 0x55]) for d in datagrams]
    other = HeartbeatCodec(SECRET, CLUSTER ^ 0x5A5A)
    foreign = [other.encode(m) for m in sample_messages(256, CLUSTER ^ 0x5A5A)]
    share = seconds / 4
    decode_per_s = _rate(codec.decode, datagrams, share)
    return {
        "decode_per_s": round(decode_per_s),
        "target_decode_per_s": TARGET_DECODE_PER_S,
        "decode_meets_target": decode_per_s >= TARGET_DECODE_PER_S,
        "encode_per_s": round(_rate(codec.encode, msgs, share)),
        "reject_bad_tag_per_s": round(_rate(_rejecting(codec), bad_tag, share)),
        "reject_foreign_cluster_per_s": round(_rate(_rejecting(codec), foreign, share)),
        "datagram_bytes": SIZE,
    }


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """One random corruption of a valid datagram."""
    kind = rng.randrange(6)
    buf = bytearray(data)
    if kind == 0:  # one byte changed
        buf[rng.randrange(len(buf))] ^= rng.randrange(1, 256)
    elif kind == 1:  # one bit flipped
        bit = rng.randrange(len(buf) * 8)
        buf[bit // 8] ^= 1 << (bit % 8)
    elif kind == 2:  # several bytes changed
        for _ in range(rng.randrange(2, 9)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 3:  # truncated
        del buf[rng.randrange(len(buf)) :]
    elif kind == 4:  # extended
        buf += rng.randbytes(rng.randrange(1, 200))
    else:  # a field range swapped in from elsewhere
        a, b = rng.randrange(len(buf)), rng.randrange(len(buf))
        n = rng.randrange(1, 9)
        buf[a : a + n] = data[b : b + n]
    return bytes(buf)


def fuzz_decode(seconds: float, seed: int) -> dict[str, Any]:
    """Random bytes, random bytes behind a valid prefix, mutations of valid datagrams, and
    random bodies with a correct tag (which reach the field checks).

    Bounded by ``seconds`` of wall time. A problem is any exception other than
    HeartbeatError, a forged datagram (not one of the valid ones, not signed here) that
    decoded, or a signed one that decoded but does not encode back to the same bytes.
    """
    rng = random.Random(seed)
    codec = HeartbeatCodec(SECRET, CLUSTER)
    valid = [codec.encode(m) for m in sample_messages(64)]
    valid_set = set(valid)
    prefixes = sorted({d[:8] for d in valid})
    reasons: Counter[str] = Counter()
    problems: list[dict[str, str]] = []
    cases = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(problems) < 10:
        for _ in range(1000):
            pick = rng.randrange(5)
            signed = pick == 4
            if signed:
                # (version 3: the heard length, byte 71, says what follows)
                heard = rng.randbytes(rng.randrange(0, 5))
                body = (rng.choice(prefixes) + rng.randbytes(SIZE - 8 - 32 - 1)
                        + bytes((len(heard),)) + heard)
                data = body + hmac.new(SECRET, body, hashlib.sha256).digest()
            elif pick == 0:
                data = rng.randbytes(rng.randrange(0, 300))
            elif pick == 1:
                data = rng.choice(prefixes) + rng.randbytes(SIZE - 8)
            else:
                data = _mutate(rng, rng.choice(valid))
            cases += 1
            try:
                msg = codec.decode(data)
            except HeartbeatError as e:
                reasons[e.reason] += 1
            except Exception as e:  # the point of the fuzz: record anything else
                problems.append({"input": data.hex(), "error": repr(e)})
            else:
                reasons["ok"] += 1
                if signed:
                    if codec.encode(msg) != data:
                        problems.append({"input": data.hex(), "error": "not canonical"})
                elif data not in valid_set:
                    problems.append({"input": data.hex(), "error": "forged datagram decoded"})
    return {
        "fuzz_seconds": seconds,
        "fuzz_seed": seed,
        "fuzz_cases": cases,
        "fuzz_reasons": dict(sorted(reasons.items())),
        "fuzz_problems": problems,
    }


TARGET_NODE_CPU_PERCENT = 5.0


def bench_cluster_cpu(nodes: int = 32, networks: int = 2, hz: int = 20,
                      seconds: float = 10.0) -> dict[str, Any]:
    """CPU of one real ClusterNode in a simulated ``nodes`` x ``networks`` x ``hz`` cluster.

    The measured node runs its real code on a fake clock: every tick it encodes one
    heartbeat and sends it with a real ``sendto`` to every peer on every network (into a
    loopback socket of this benchmark, whose receive buffer is allowed to fill), and every
    peer datagram reaches it through a real UDP socket (``recvfrom``) and
    ``datagram_received`` (decode, HMAC check, detector, state comparison). The peers'
    datagrams are encoded before the clock starts: their cost is theirs, not this node's.
    Result: CPU seconds used per simulated second, as a percentage of one core.
    """
    import socket
    import tomllib
    from pathlib import Path

    from twisted.internet.task import Clock

    from fsha.config import parse_config
    from fsha.node import ClusterNode

    interval = 1.0 / hz
    demo = tomllib.loads((Path(__file__).resolve().parent.parent / "conf" / "demo.toml")
                         .read_text())
    raw = dict(demo)
    raw["cluster"] = dict(demo["cluster"], heartbeat_interval_ms=int(interval * 1000),
                          dead_after_ms=int(interval * 5000))
    raw["network"] = [{"name": f"n{i}", "port": 17400 + i} for i in range(networks)]
    raw["node"] = [dict(demo["node"][0], name=f"fs{i + 1}",
                        address={f"n{j}": f"127.0.{j + 1}.{i + 1}" for j in range(networks)},
                        stream=f"127.0.{networks + 1}.{i + 1}:17410",
                        status=f"127.0.{networks + 1}.{i + 1}:17420")
                   for i in range(nodes)]
    raw["slot"] = [dict(demo["slot"][0], name="s1", profiles=["s1"])]
    config = parse_config(raw, Path("bench.toml"))
    secret = SECRET
    clock = Clock()
    clock.advance(1_000_000)

    class Healthy:
        def is_ok(self) -> bool:
            return True

    class NoEffects:  # the effects of a claim are not part of the heartbeat cost
        def acquire(self, *args: Any, **kwargs: Any) -> Any:
            from twisted.internet.defer import succeed
            return succeed(None)

        release = acquire

    me = config.nodes[0]
    node = ClusterNode(config, me, secret, clock, NoEffects(), Healthy(), incarnation=1)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.setblocking(False)
    sink_address = sink.getsockname()

    def send(data: bytes, address: tuple[str, int]) -> None:
        try:
            out.sendto(data, sink_address)  # one real syscall per datagram
        except BlockingIOError:
            pass

    for net in config.networks:
        node.attach(net.name, send)

    # The peers' datagrams for the whole run, one per peer per network per tick.
    ticks = int(seconds * hz)
    peer_codec = HeartbeatCodec(secret, cluster_id_for(config.name))
    inbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inbound.bind(("127.0.0.1", 0))
    inbound.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    inbound.setblocking(False)
    feeder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    per_tick = []
    for t in range(ticks):
        batch = []
        for peer in config.nodes[1:]:
            data = peer_codec.encode(Heartbeat(
                MessageType.HEARTBEAT, peer_codec.cluster_id, peer.node_id, 7, t + 1,
                Role.SLAVE, Flags.FS_OK | Flags.SEES_QUORUM, NO_SLOT, 0, NO_NODE,
                config.digest, bytes(8)))
            for net in config.networks:
                batch.append((net.index, data, (peer.addresses[net.name], net.port)))
        per_tick.append(batch)

    node.start()
    received = 0
    used = 0.0
    for batch in per_tick:
        for _, data, _ in batch:  # the kernel holds them, as it would for the node
            feeder.sendto(data, inbound.getsockname())
        start = time.process_time()
        for index, _, source in batch:
            try:
                data, _ = inbound.recvfrom(512)
            except BlockingIOError:
                continue
            node.datagram_received(index, data, source)
            received += 1
        clock.advance(interval)  # the node's tick: detector, roles, encode, sendto x peers
        used += time.process_time() - start
        while True:  # drain the sink outside the measurement (it is the peers' receive)
            try:
                sink.recv(512)
            except BlockingIOError:
                break
    for s in (sink, out, inbound, feeder):
        s.close()
    percent = 100.0 * used / seconds
    return {
        "cluster_nodes": nodes, "cluster_networks": networks, "cluster_hz": hz,
        "node_datagrams_in_per_s": round(received / seconds),
        "node_datagrams_out_per_s": round(sum(link.sent for link in node.links) / seconds),
        "node_drops": dict(node.drops),
        "node_cpu_percent_of_core": round(percent, 3),
        "target_node_cpu_percent": TARGET_NODE_CPU_PERCENT,
        "node_cpu_meets_target": percent <= TARGET_NODE_CPU_PERCENT,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="CPU seconds for the codec figures"
    )
    parser.add_argument(
        "--fuzz-seconds", type=float, default=0.0, help="also fuzz decode for N seconds"
    )
    parser.add_argument("--seed", type=int, default=None, help="fuzz seed (default: random)")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "bench": "heartbeat",
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print("heartbeat codec ...", file=sys.stderr)
    result.update(bench_codec(args.seconds))
    print("one node of a 32-node x 2-network cluster at 20 Hz ...", file=sys.stderr)
    result.update(bench_cluster_cpu())
    ok = result["decode_meets_target"] and result["node_cpu_meets_target"]
    if args.fuzz_seconds > 0:
        seed = args.seed if args.seed is not None else random.randrange(2**32)
        print(f"fuzzing decode for {args.fuzz_seconds}s, seed {seed} ...", file=sys.stderr)
        fuzz = fuzz_decode(args.fuzz_seconds, seed)
        ok = not fuzz["fuzz_problems"]
        result.update(fuzz)
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
