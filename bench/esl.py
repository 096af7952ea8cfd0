"""ESL benchmark: events per second through the Event Socket codec, side by side.

Usage::

    python bench/esl.py [--events N] [--rounds R] [--chunk BYTES]

Measures, in one process and one thread, how many realistic CHANNEL events (~1.5 KB of
event-plain, the same events as JSON) per second of process CPU time go

* through fsha's codec: ``FrameDecoder.feed`` on a stream cut into ``--chunk`` byte reads,
  then ``decode_event_plain`` / ``decode_event_json`` for every frame (every header name
  and value decoded, ready to look up);
* through fsha's client protocol (``ESLProtocol.dataReceived`` to the event callback);
* through the parser of established Python ESL clients, if installed (bench only; not
  dependencies of fsha): ``greenswitch`` (its own socket-reading loop
  ``ESLProtocol.receive_events`` over an in-memory file) and ``genesis`` (its
  ``ESLReaderFSM``, fed header blocks and bodies the way its reader loop does, without the
  asyncio overhead). Neither of them decodes ``text/event-json`` bodies into headers, so
  the side by side comparison is for event-plain.

Every parser's output is checked (Event-Name, Unique-ID, a decoded value) before it is
timed. The figure for each is the median of ``--rounds`` rounds. The last line of stdout
is one JSON object with the figures, the ratio to the best other client, and the targets
(>= 100,000 events/s through the codec on one core, >= 2x the best other client).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from fsha.wire.esl import (
    FrameDecoder,
    decode_event_json,
    decode_event_plain,
    encode_event_json,
    encode_event_plain,
    encode_frame,
)

TARGET_EPS = 100_000
TARGET_RATIO = 2.0


def channel_event(name: str, call_uuid: str, seq: int) -> list[tuple[str, str]]:
    """A CHANNEL_* event with the core, channel and caller headers FreeSWITCH sends."""
    return [
        ("Event-Name", name),
        ("Core-UUID", "6f2b1c0e-1b1a-4c7e-9a55-3d2b6b1f0a11"),
        ("FreeSWITCH-Hostname", "fs1.example.net"),
        ("FreeSWITCH-Switchname", "fs1.example.net"),
        ("FreeSWITCH-IPv4", "198.18.0.11"),
        ("Event-Date-Local", "2024-05-01 12:00:00"),
        ("Event-Date-GMT", "Wed, 01 May 2024 10:00:00 GMT"),
        ("Event-Date-Timestamp", str(1714557600000000 + seq)),
        ("Event-Calling-File", "switch_channel.c"),
        ("Event-Calling-Function", "switch_channel_perform_mark_answered"),
        ("Event-Sequence", str(48213 + seq)),
        ("Channel-State", "CS_EXECUTE"),
        ("Channel-Call-State", "ACTIVE"),
        ("Channel-State-Number", "4"),
        ("Channel-Name", "sofia/slot1/1000@198.18.0.11"),
        ("Unique-ID", call_uuid),
        ("Call-Direction", "inbound"),
        ("Channel-Presence-ID", "1000@198.18.0.11"),
        ("Channel-Call-UUID", call_uuid),
        ("Answer-State", "answered"),
        ("Caller-Direction", "inbound"),
        ("Caller-Username", "1000"),
        ("Caller-Dialplan", "XML"),
        ("Caller-Caller-ID-Name", "Alice Example"),
        ("Caller-Caller-ID-Number", "+15551000"),
        ("Caller-Network-Addr", "198.18.0.50"),
        ("Caller-Destination-Number", "2000"),
        ("Caller-Unique-ID", call_uuid),
        ("Caller-Context", "default"),
        ("Caller-Channel-Name", "sofia/slot1/1000@198.18.0.11"),
        ("Caller-Profile-Index", "1"),
        ("Caller-Channel-Created-Time", "1714557598000000"),
        ("Caller-Channel-Answered-Time", "1714557600000000"),
        ("variable_uuid", call_uuid),
        ("variable_sip_from_user", "1000"),
        ("variable_sip_full_from", '"Alice Example" <sip:1000@198.18.0.11>;tag=8aF3kq9Zp'),
        ("variable_sip_full_to", "<sip:2000@198.18.0.11>"),
        ("variable_sip_call_id", "5f1e2d3c4b5a69788796a5b4c3d2e1f0@198.18.0.50"),
        ("variable_recovery_profile_name", "slot1"),
    ]


def build_stream(n: int) -> tuple[bytes, bytes, int, list[str]]:
    """n events as a plain stream and as a JSON stream; the plain body size; the uuids."""
    kinds = ["CHANNEL_CREATE", "CHANNEL_ANSWER", "CHANNEL_BRIDGE", "CHANNEL_HANGUP"]
    plain_frames: list[bytes] = []
    json_frames: list[bytes] = []
    uuids: list[str] = []
    sizes: list[int] = []
    for i in range(n):
        call_uuid = str(uuid.UUID(int=i + 1))
        uuids.append(call_uuid)
        pairs = channel_event(kinds[i % 4], call_uuid, i)
        p = encode_event_plain(pairs)
        j = encode_event_json(pairs)
        sizes.append(len(p))
        plain_frames.append(
            encode_frame([("Content-Length", str(len(p))), ("Content-Type", "text/event-plain")], p)
        )
        json_frames.append(
            encode_frame([("Content-Length", str(len(j))), ("Content-Type", "text/event-json")], j)
        )
    return b"".join(plain_frames), b"".join(json_frames), sum(sizes) // n, uuids


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# -- the parsers -------------------------------------------------------------------------


def fsha_plain(parts: list[bytes]) -> list[tuple[str, str, str]]:
    dec = FrameDecoder()
    out = []
    for part in parts:
        for frame in dec.feed(part):
            ev = decode_event_plain(frame.body)
            out.append((ev.name, ev.headers.get("Unique-ID") or "", ""))
    return out


def fsha_plain_count(parts: list[bytes]) -> int:
    dec = FrameDecoder()
    n = 0
    for part in parts:
        for frame in dec.feed(part):
            decode_event_plain(frame.body)
            n += 1
    return n


def fsha_json_count(parts: list[bytes]) -> int:
    dec = FrameDecoder()
    n = 0
    for part in parts:
        for frame in dec.feed(part):
            decode_event_json(frame.body)
            n += 1
    return n


def fsha_protocol_count(parts: list[bytes]) -> int:
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from fsha.eslclient import ESLProtocol

    count = [0]

    def on_event(event: object) -> None:
        count[0] += 1

    proto = ESLProtocol(Clock(), on_event)
    proto.makeConnection(StringTransport())
    for part in parts:
        proto.dataReceived(part)
    return count[0]


def greenswitch_runner() -> Callable[[bytes], list[Any]] | None:
    try:
        import greenswitch.esl as gs
    except Exception:
        return None

    class _Sock:
        def close(self) -> None:
            pass

    def run(stream: bytes) -> list[Any]:
        proto = gs.ESLProtocol()
        proto.sock = _Sock()
        proto.sock_file = io.BufferedReader(io.BytesIO(stream), 65536)  # type: ignore[arg-type]
        proto.connected = True
        proto.receive_events()
        q = proto._esl_event_queue
        events = []
        while not q.empty():
            events.append(q.get_nowait())
        return events

    return run


def genesis_runner() -> Callable[[bytes], list[Any]] | None:
    try:
        from genesis.protocol.reader_fsm import ESLReaderFSM
    except Exception:
        return None

    def run(stream: bytes) -> list[Any]:
        reader = io.BufferedReader(io.BytesIO(stream), 65536)  # type: ignore[arg-type]
        fsm = ESLReaderFSM()
        events: list[Any] = []
        while True:
            # genesis' _read_header_block: readline until the block ends with a blank line
            buffer = ""
            while True:
                line = reader.readline()
                if not line:
                    return events
                buffer += line.decode("utf-8")
                if buffer.endswith("\n\n") or buffer.endswith("\r\n\r\n"):
                    break
            got, length = fsm.process_headers(buffer)
            events.extend(got)
            if length > 0:
                events.extend(fsm.process_body(reader.read(length)))

    return run


# -- end to end -------------------------------------------------------------------------


def end_to_end(n: int, fmt: str, deadline: float = 120.0) -> dict[str, Any]:
    """Events/s from a simulator process to ESLClient listeners over loopback TCP.

    The simulator writes ``n`` copies of a realistic CHANNEL_ANSWER as fast as TCP takes
    them (``POST /flood``). Wall rate is limited by the slower of the two processes; the
    client's own CPU per event is reported separately. Runs the global reactor (once).
    """
    import os
    import subprocess
    import tempfile
    import urllib.request

    from twisted.internet import reactor as _reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint

    from fsha.eslclient import ESLClient

    reactor: Any = _reactor
    tmp = tempfile.mkdtemp(prefix="fsha-bench-esl-")
    ready_path = os.path.join(tmp, "ready.json")
    log = open(os.path.join(tmp, "sim.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fsha", "sim", "--name", "bench", "--esl", "127.0.0.1:0",
         "--control", "127.0.0.1:0", "--ready-file", ready_path, "--heartbeat", "0",
         "--profile", "internal=127.0.0.1:0", "--log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    out: dict[str, Any] = {}
    try:
        end = time.monotonic() + 30
        ready: dict[str, Any] | None = None
        while ready is None:
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"simulator did not start (log in {tmp})")
            try:
                with open(ready_path, encoding="utf-8") as f:
                    ready = json.load(f)
            except (OSError, ValueError):
                time.sleep(0.05)  # waiting for another process to start; not a test
        client = ESLClient(
            TCP4ClientEndpoint(reactor, "127.0.0.1", ready["esl"]["port"], timeout=5),
            "ClueCon", reactor, events=["CHANNEL_ANSWER"], event_format=fmt,
            ping_interval=0, heartbeat_timeout=None,
        )
        got = [0]
        marks: dict[str, float] = {}

        def on_event(event: object) -> None:
            got[0] += 1
            if got[0] == n:
                marks["wall"] = time.perf_counter() - marks["t0"]
                marks["cpu"] = time.process_time() - marks["c0"]
                reactor.stop()

        def flood(_: object) -> None:
            marks["t0"] = time.perf_counter()
            marks["c0"] = time.process_time()
            url = f"http://127.0.0.1:{ready['control']['port']}/flood"
            body = json.dumps({"count": n, "event": "CHANNEL_ANSWER"}).encode()
            req = urllib.request.Request(url, data=body, method="POST")
            with urllib.request.urlopen(req, timeout=30) as resp:
                if json.loads(resp.read()).get("connections") != 1:
                    raise RuntimeError("the simulator did not flood this connection")

        def failed(failure: Any) -> None:
            out["error"] = str(failure.value)
            reactor.stop()

        client.add_event_listener(on_event, "CHANNEL_ANSWER")
        client.startService()
        client.when_ready().addCallback(flood).addErrback(failed)
        reactor.callLater(deadline, lambda: (out.setdefault("error", "deadline"),
                                             reactor.stop()))
        reactor.run()
        if "wall" in marks:
            out["events"] = n
            out["event_frame_bytes"] = _sim_sample_size(fmt)
            out["wall_eps"] = round(n / marks["wall"])
            out["client_cpu_eps"] = round(n / marks["cpu"]) if marks["cpu"] > 0 else None
        else:
            out.setdefault("error", f"received {got[0]} of {n} events")
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()
    return out


def _sim_sample_size(fmt: str) -> int | None:
    try:
        from twisted.internet.task import Clock

        from fsha.sim.coredb import CoreDB
        from fsha.sim.esl_server import event_frame
        from fsha.sim.switch import Switch

        sample = Switch(Clock(), CoreDB(":memory:"), name="bench").sample_event("CHANNEL_ANSWER")
        return len(event_frame(sample, fmt))
    except Exception:
        return None


# -- timing ------------------------------------------------------------------------------


def cpu_rate(fn: Callable[[], object], n: int) -> float:
    t0 = time.process_time()
    fn()
    dt = time.process_time() - t0
    return n / dt if dt > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--chunk", type=int, default=65536, help="bytes per read")
    ap.add_argument("--e2e", type=int, default=50_000, metavar="N",
                    help="events for the end-to-end run from a simulator process (0: skip)")
    args = ap.parse_args(argv)
    n = args.events
    plain, js, body_size, uuids = build_stream(n)
    plain_parts = chunks(plain, args.chunk)
    json_parts = chunks(js, args.chunk)
    print(f"{n} events, event-plain body {body_size} bytes, stream {len(plain)} bytes",
          file=sys.stderr)

    # correctness first: every parser must see the same events
    got = fsha_plain(plain_parts)
    assert len(got) == n and [u for _, u, _ in got] == uuids, "fsha plain parse"
    assert fsha_json_count(json_parts) == n
    sample = decode_event_json(FrameDecoder().feed(js[: len(js) // n * 2])[0].body)
    assert (sample.headers.get("variable_sip_full_from") or "").startswith('"Alice Example"')
    assert fsha_protocol_count(plain_parts) == n

    contenders: dict[str, Callable[[], object]] = {
        "fsha_codec_plain": lambda: fsha_plain_count(plain_parts),
        "fsha_codec_json": lambda: fsha_json_count(json_parts),
        "fsha_protocol_plain": lambda: fsha_protocol_count(plain_parts),
    }
    others: list[str] = []
    for name, make in (("greenswitch", greenswitch_runner), ("genesis", genesis_runner)):
        runner = make()
        if runner is None:
            print(f"{name}: not installed", file=sys.stderr)
            continue
        events = runner(plain)
        assert len(events) == n, f"{name} parsed {len(events)} events"
        first = events[1]
        headers = getattr(first, "headers", first)
        assert headers["Unique-ID"] == uuids[1], f"{name} Unique-ID"
        assert headers["Caller-Caller-ID-Number"] == "+15551000", f"{name} decoding"
        contenders[f"{name}_plain"] = lambda r=runner: r(plain)
        others.append(f"{name}_plain")

    # Interleaved rounds: every contender runs once per round, so a busy shared machine
    # disturbs them alike; ratios are taken within a round.
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    ratios: list[float] = []
    for r in range(args.rounds):
        for k, fn in contenders.items():
            rates[k].append(cpu_rate(fn, n))
        if others:
            best_other = max(rates[o][-1] for o in others)
            ratios.append(rates["fsha_codec_plain"][-1] / best_other)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()),
              file=sys.stderr)

    result: dict[str, Any] = {
        "bench": "esl",
        "python": platform.python_version(),
        "events": n,
        "event_plain_bytes": body_size,
        "chunk_bytes": args.chunk,
        "rounds": args.rounds,
        "unit": "events per second of process CPU time (median of rounds; best in *_best)",
    }
    for k, v in rates.items():
        result[f"{k}_eps"] = round(statistics.median(v))
        result[f"{k}_eps_best"] = round(max(v))
    for name in ("greenswitch", "genesis"):
        result.setdefault(f"{name}_plain_eps", None)
    best = max(others, key=lambda o: statistics.median(rates[o])) if others else None
    result["best_other"] = best.removesuffix("_plain") if best else None
    ratio = statistics.median(ratios) if ratios else None
    result["ratio_vs_best_other"] = round(ratio, 2) if ratio is not None else None
    result["target_eps"] = TARGET_EPS
    result["target_ratio"] = TARGET_RATIO
    result["meets_eps_target"] = result["fsha_codec_plain_eps"] >= TARGET_EPS
    result["meets_ratio_target"] = ratio is not None and ratio >= TARGET_RATIO
    if args.e2e > 0:
        try:
            result["e2e_plain"] = end_to_end(args.e2e, "plain")
        except Exception as e:  # the codec figures stand on their own
            result["e2e_plain"] = {"error": repr(e)}
        print(f"end to end: {result['e2e_plain']}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
