"""Takeover benchmark: a slot with 10,000 calls, rows written + recover issued.

Usage::

    python bench/takeover.py [--calls N] [--registrations N] [--trials N] [--keep DIR]

What runs: simulator A (``python -m fsha sim``) places ``--calls`` answered calls on the
slot's profile (half bridged pairs) and registers ``--registrations`` users, then is
crashed (``/crash``, like ``kill -9``); its core DB keeps the rows. For each trial a fresh
simulator B starts with the profile defined but not running, and
:meth:`fsha.takeover.SlotEffects.acquire` runs against it over a real ESL connection with
the real core-DB writer on its thread (floating IPs: the loopback backend). The rows are
handed to the sequence as replication would.

Figures (milliseconds, median over trials; every trial in ``trials``):

* ``rows_written_recover_issued_ms``: the ``recovery_rows`` + ``profiles`` steps, i.e. from
  the start of writing the rows (core UUID, DB write on its thread) to ``sofia profile P
  recover`` being sent (the profile started and confirmed first): the target (<= 1000 ms).
* ``rows_to_recovered_ms``: the same plus the ``recover`` step, until FreeSWITCH (here the
  simulator) has answered ``Recovered N session(s)``.
* ``acquire_ms``: the whole acquire (with the floating IPs, reading the rows,
  registrations).
* ``steps``: each step's duration.
* Where the time goes, measured apart in this process: ``db_write_only_ms`` (the writer
  alone into an empty core DB, same rows), ``sim_recover_inprocess_ms`` (the simulator's
  own recover of the same rows, its switch logic called directly: the simulator's cost,
  which real FreeSWITCH replaces with its own), ``replicated_rows_for_ms`` (decoding the
  rows from a :class:`~fsha.replication.state.ReplicatedState`, which the trials skip).

Prints progress on stderr and one JSON object on the last line of stdout.

``--freeswitch [--calls N] [--batch N]``: the same sequence against a real FreeSWITCH with
answered sipp calls instead (bench/takeover_realfs.py: time to the first call back, to all
calls back, calls lost).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

TARGET_MS = 1000.0
PROFILE = "slot1"
VIP = "127.0.10.77"


def _free_udp_port(host: str) -> int:
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port >= 20000:
            return port
    raise RuntimeError("no free UDP port")


class Sim:
    def __init__(self, workdir: Path, name: str, profile_args: list[str]) -> None:
        self.name = name
        (workdir / name).mkdir(exist_ok=True)
        self.db = workdir / name / "core.db"  # sofia_reg_<profile>.db beside it
        self.ready_path = workdir / f"{name}.ready"
        self.log = open(workdir / f"{name}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fsha", "sim", "--name", name, "--esl", "127.0.0.1:0",
             "--control", "127.0.0.1:0", "--ready-file", str(self.ready_path),
             "--db", str(self.db), "--heartbeat", "5", "--max-sessions", "200000",
             "--log-level", "warn", *profile_args],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"simulator {name} exited with {self.proc.returncode}")
            try:
                self.ready = json.loads(self.ready_path.read_text())
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"simulator {name} not ready in 30 s") from None
                time.sleep(0.02)

    def control(self, path: str, body: dict[str, Any], timeout: float = 600) -> Any:
        url = f"http://127.0.0.1:{self.ready['control']['port']}{path}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def crash(self) -> None:
        try:
            self.control("/crash", {}, timeout=10)
        except OSError:
            pass
        self.proc.wait(timeout=30)
        self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


def read_rows(db: Path) -> tuple[list[Any], list[Any]]:
    from fsha.fsdb import RecoveryRow, RegistrationRow

    with sqlite3.connect(db) as conn:
        conn.text_factory = bytes
        calls = [RecoveryRow(*(v.decode() for v in r[:5]), r[5]) for r in conn.execute(
            "select runtime_uuid, technology, profile_name, hostname, uuid, metadata "
            "from recovery")]
    regs = []
    for reg_db in sorted(db.parent.glob("sofia_reg_*.db")):  # one per profile
        with sqlite3.connect(reg_db) as conn:
            conn.text_factory = bytes
            regs += [RegistrationRow(*(v.decode() for v in r[:7]), int(r[7]),
                                     *(v.decode() for v in r[8:])) for r in conn.execute(
                "select call_id, sip_user, sip_host, presence_hosts, contact, status, rpid, "
                "expires, user_agent, profile_name, network_ip, network_port, sip_username, "
                "sip_realm from sip_registrations")]
    return calls, regs


class Records:
    def __init__(self, calls: list[Any], regs: list[Any]) -> None:
        self.calls, self.regs = calls, regs

    def rows_for(self, slot: Any, previous: Any, progress: Any = None
                 ) -> tuple[list[Any], list[Any]]:
        return self.calls, self.regs


def one_trial(workdir: Path, index: int, port: int) -> dict[str, Any]:
    """Start sim B, run the acquire against it in a fresh reactor-driven run."""
    b = Sim(workdir, f"simB{index}", ["--define-profile", f"{PROFILE}={VIP}:{port}"])
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--_trial", str(b.ready["esl"]["port"]), str(b.db),
             str(port), str(workdir / "rows.pickle")],
            capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"trial failed: {out.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        live = b.control("/api", {"command": "show channels count"})["output"]
        result["channels_live_on_b"] = int(live.strip().split()[0])
        return result
    finally:
        b.kill()


def trial_main(esl_port: int, db: str, port: int, rows_path: str) -> int:
    """Runs in a child process: a fresh reactor per trial."""
    import pickle

    from twisted.internet.defer import ensureDeferred
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.task import react

    from fsha.config import FloatingIP, NodeConfig, SlotConfig
    from fsha.eslclient import ESLClient
    from fsha.floating import LoopbackBackend
    from fsha.fsdb import CoreDBWriter, ThreadRunner
    from fsha.takeover import SlotEffects, TakeoverTimeouts

    with open(rows_path, "rb") as f:
        calls, regs = pickle.load(f)  # written by this script's parent, a moment ago
    async def run(reactor: Any) -> None:
        client = ESLClient(TCP4ClientEndpoint(reactor, "127.0.0.1", esl_port, timeout=5),
                           "ClueCon", reactor, request_timeout=60, heartbeat_timeout=None,
                           ping_interval=5)
        client.startService()
        await client.when_ready()
        runner = ThreadRunner(reactor)
        writer = CoreDBWriter(db, runner, busy_timeout=5, registration_db=lambda p: Path(
            db).parent / f"sofia_reg_{p}.db")
        slot = SlotConfig(PROFILE, 0, (FloatingIP(VIP, 32, "lo"),), (PROFILE,))
        previous = NodeConfig("simA", 0, 100, {}, None, None, None, None)  # type: ignore[arg-type]
        effects = SlotEffects(LoopbackBackend(reactor), reactor, esl=client, db=writer,
                              records=Records(calls, regs),
                              timeouts=TakeoverTimeouts(esl=30, db=60, confirm=10,
                                                        recover=300, registrations=120))
        await ensureDeferred(effects.acquire(slot, 2, previous))  # type: ignore[arg-type]
        report = effects.last_report
        assert report is not None
        steps = {s.name: s for s in report.steps}
        result = {
            "ok": report.ok,
            "acquire_ms": round(report.total_ms, 1),
            "rows_written_recover_issued_ms": round(sum(steps[n].ms for n in (
                "recovery_rows", "profiles")), 1),
            "rows_to_recovered_ms": round(sum(steps[n].ms for n in (
                "recovery_rows", "profiles", "recover")), 1),
            "steps": {s.name: round(s.ms, 1) for s in report.steps},
            "rows_written": report.count("recovery_rows", "written"),
            "recovered": report.count("recover", "recovered"),
            "registrations_restored": report.count("registrations", "written"),
            "warnings": report.warnings,
        }
        effects.stop()
        await writer.close()
        runner.stop()
        await client.stopService()
        print(json.dumps(result))

    react(lambda r: ensureDeferred(run(r)))
    return 0


def db_write_only(calls: list[Any], workdir: Path) -> float:
    from fsha.fsdb import CoreDBWriter, inline_runner
    from fsha.sim.coredb import CoreDB

    path = workdir / "write-only.db"
    CoreDB(str(path)).close()
    writer = CoreDBWriter(path, inline_runner)
    start = time.perf_counter()
    d = writer.write_recovery(calls, None)
    elapsed = (time.perf_counter() - start) * 1000
    failures: list[Any] = []
    d.addErrback(failures.append)
    writer.close()
    if failures:
        raise RuntimeError(str(failures[0]))
    return elapsed


def replicated_rows_for(calls: list[Any]) -> float:
    """The adapter from the replicated state: decode ``calls`` as records of a dead node."""
    from twisted.internet.task import Clock

    from fsha.config import FloatingIP, NodeConfig, SlotConfig
    from fsha.fsdb import CallRow, encode_call_row
    from fsha.replication.state import ReplicatedState
    from fsha.takeover import ReplicatedRecords
    from fsha.wire.stream import Change, Kind, Op

    state = ReplicatedState(Clock(), 1, 1)
    for seq, c in enumerate(calls, 1):
        value = encode_call_row(CallRow(c.runtime_uuid, c.technology, c.profile_name,
                                        c.hostname, c.uuid, c.metadata))
        state.apply(Change(0, 5, seq, 0, Kind.CALL, c.uuid, Op.PUT, value, 0))
    slot = SlotConfig(PROFILE, 0, (FloatingIP(VIP, 32, "lo"),), (PROFILE,))
    previous = NodeConfig("simA", 0, 100, {}, None, None, None, None)  # type: ignore[arg-type]
    start = time.perf_counter()
    rows, _ = ReplicatedRecords(state).rows_for(slot, previous)
    elapsed = (time.perf_counter() - start) * 1000
    if len(rows) != len(calls):
        raise RuntimeError(f"adapter: {len(rows)} of {len(calls)}")
    return elapsed


def sim_recover_inprocess(calls: list[Any], workdir: Path) -> float:
    from twisted.internet.task import Clock

    from fsha.fsdb import CoreDBWriter, inline_runner
    from fsha.sim.coredb import CoreDB
    from fsha.sim.switch import NullSipBinder, ProfileConfig, Switch

    path = workdir / "inprocess.db"
    db = CoreDB(str(path))
    CoreDBWriter(path, inline_runner).write_recovery(calls, None)
    switch = Switch(Clock(), db, name="bench", profiles=[ProfileConfig(PROFILE, VIP, 5060)],
                    heartbeat_interval=0, reg_check_interval=0, max_sessions=10**6,
                    sip_binder=NullSipBinder())
    switch.start()
    start = time.perf_counter()
    n = switch.recover_profile(PROFILE)
    elapsed = (time.perf_counter() - start) * 1000
    db.close()
    if n != len(calls):
        raise RuntimeError(f"in-process recover: {n} of {len(calls)}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_trial"]:
        return trial_main(int(argv[1]), argv[2], int(argv[3]), argv[4])
    if argv[:1] == ["--freeswitch"]:  # the real FreeSWITCH: bench/takeover_realfs.py
        sys.argv = [str(Path(__file__).with_name("takeover_realfs.py")), *argv[1:]]
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import takeover_realfs

        takeover_realfs.main()
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--registrations", type=int, default=0)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--keep", help="keep the work files in this directory")
    args = p.parse_args(argv)
    import pickle

    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fsha-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        port = _free_udp_port(VIP)
        a = Sim(workdir, "simA", ["--profile", f"{PROFILE}={VIP}:{port}"])
        try:
            start = time.perf_counter()
            placed = 0
            while placed < args.calls:
                n = min(2000, args.calls - placed)
                pairs = n // 4  # half of the calls in bridged pairs
                got = a.control("/calls", {"profile": PROFILE, "count": pairs, "bridge": True})
                placed += len(got["uuids"])
                rest = n - len(got["uuids"])
                if rest:
                    got = a.control("/calls", {"profile": PROFILE, "count": rest})
                    placed += len(got["uuids"])
            if args.registrations:
                a.control("/register", {"profile": PROFILE, "count": args.registrations,
                                        "start": 10000, "host": "example.com"})
            print(f"placed {placed} calls in {time.perf_counter() - start:.1f} s",
                  file=sys.stderr)
        finally:
            a.crash()
        calls, regs = read_rows(a.db)
        meta = sum(len(c.metadata) for c in calls)
        print(f"{len(calls)} recovery rows ({meta / 1e6:.1f} MB of metadata), "
              f"{len(regs)} registrations", file=sys.stderr)
        with open(workdir / "rows.pickle", "wb") as f:
            pickle.dump((calls, regs), f)
        trials = []
        for i in range(args.trials):
            r = one_trial(workdir, i, port)
            print(f"trial {i}: {r}", file=sys.stderr)
            trials.append(r)
        db_ms = db_write_only(calls, workdir)
        sim_ms = sim_recover_inprocess(calls, workdir)
        adapter_ms = replicated_rows_for(calls)
        median = statistics.median(t["rows_written_recover_issued_ms"] for t in trials)
        steps = {name: round(statistics.median(t["steps"][name] for t in trials), 1)
                 for name in trials[0]["steps"]}
        result = {
            "bench": "takeover",
            "calls": len(calls),
            "metadata_bytes": meta,
            "registrations": len(regs),
            "trials": trials,
            "rows_written_recover_issued_ms": round(median, 1),
            "rows_to_recovered_ms": round(statistics.median(
                t["rows_to_recovered_ms"] for t in trials), 1),
            "acquire_ms": round(statistics.median(t["acquire_ms"] for t in trials), 1),
            "steps_ms": steps,
            "all_recovered": all(t["recovered"] == len(calls)
                                 and t["channels_live_on_b"] == len(calls) for t in trials),
            "db_write_only_ms": round(db_ms, 1),
            "sim_recover_inprocess_ms": round(sim_ms, 1),
            "replicated_rows_for_ms": round(adapter_ms, 1),
            "target_ms": TARGET_MS,
            "meets_target": median <= TARGET_MS,
        }
        print(json.dumps(result))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
