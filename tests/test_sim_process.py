"""The simulator as a real process (``python -m fsha sim``) over real TCP and UDP on loopback.

Every wait is on a condition with a deadline; no fixed ports (port 0 everywhere, the actual
ports come from ``--ready-file``).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import redirect_stderr
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from fsha.harness import wait_for
from fsha.sim import cli
from fsha.wire.esl import Frame, FrameDecoder, decode_event_plain

DEADLINE = 15.0


class Sim:
    """One ``fsha sim`` subprocess."""

    def __init__(self, case: SynchronousTestCase, name: str, *args: str) -> None:
        self.dir = case.mktemp()
        os.makedirs(self.dir)
        self.ready_path = os.path.join(self.dir, "ready.json")
        self.db = os.path.join(self.dir, "core.db")
        self.log = open(os.path.join(self.dir, "sim.log"), "wb")
        case.addCleanup(self.log.close)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fsha", "sim", "--name", name, "--esl", "127.0.0.1:0",
             "--control", "127.0.0.1:0", "--db", self.db, "--ready-file", self.ready_path,
             *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        case.addCleanup(self.kill)
        self.ready: dict[str, Any] = wait_for(f"{name} ready file", self._read_ready, DEADLINE)

    def _read_ready(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"simulator exited with {self.proc.returncode}")
        try:
            with open(self.ready_path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE)

    def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        url = f"http://127.0.0.1:{self.ready['control']['port']}{path}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(req, timeout=DEADLINE) as resp:
            return json.loads(resp.read())

    def esl(self, case: SynchronousTestCase) -> ESL:
        conn = ESL(self.ready["esl"]["port"])
        case.addCleanup(conn.close)
        return conn

    def options(self, profile: str, timeout: float = DEADLINE) -> bytes:
        sip = self.ready["sip"][profile]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(("127.0.0.1", 0))
            s.settimeout(timeout)
            port = s.getsockname()[1]
            s.sendto(
                f"OPTIONS sip:{sip['ip']}:{sip['port']} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK1;rport\r\n"
                f"From: <sip:probe@127.0.0.1>;tag=1\r\nTo: <sip:{sip['ip']}>\r\n"
                f"Call-ID: probe-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n".encode(),
                (sip["ip"], sip["port"]),
            )
            return s.recvfrom(65535)[0]
        finally:
            s.close()


class ESL:
    """A raw-socket ESL client for tests (blocking, with deadlines)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, timeout: float = DEADLINE) -> Frame | None:
        """The next frame; None on EOF; socket.timeout if nothing within ``timeout``."""
        end = time.monotonic() + timeout
        while not self.frames:
            self.sock.settimeout(max(0.001, end - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                return None
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def expect(self, content_type: str) -> Frame:
        frame = self.read()
        assert frame is not None, "connection closed"
        assert frame.content_type == content_type, (frame.content_type, frame.headers.items())
        return frame

    def reply(self, content_type: str) -> Frame:
        """The next frame that is not an event: subscribed events (HEARTBEAT every
        ``--heartbeat`` seconds) may come before a reply, as from FreeSWITCH."""
        while True:
            frame = self.read()
            assert frame is not None, "connection closed"
            if frame.content_type != "text/event-plain":
                break
        assert frame.content_type == content_type, (frame.content_type, frame.headers.items())
        return frame

    def command(self, line: str) -> str:
        self.send(line.encode() + b"\n\n")
        return self.reply("command/reply").headers.get("Reply-Text") or ""

    def api(self, line: str) -> str:
        self.send(b"api " + line.encode() + b"\n\n")
        return self.reply("api/response").body.decode()

    def event(self, name: str) -> Any:
        while True:
            frame = self.expect("text/event-plain")
            ev = decode_event_plain(frame.body)
            if ev.get("Event-Name") == name:
                return ev


class ProcessTests(SynchronousTestCase):
    def test_esl_sip_control_hang_crash(self) -> None:
        sim = Sim(self, "fs1", "--password", "s3cret", "--profile", "slot1=127.0.7.1:0",
                  "--define-profile", "slot2=127.0.7.2:0", "--heartbeat", "0.2")
        self.assertEqual(sim.ready["pid"], sim.proc.pid)
        self.assertEqual(sim.ready["sip"]["slot1"]["state"], "running")
        self.assertEqual(sim.ready["sip"]["slot2"]["state"], "stopped")

        esl = sim.esl(self)
        self.assertEqual(esl.expect("auth/request").body, b"")
        self.assertEqual(esl.command("auth s3cret"), "+OK accepted")
        self.assertEqual(esl.api("global_getvar core_uuid"), sim.ready["core_uuid"])
        self.assertIn("slot1\tprofile", esl.api("sofia status"))
        self.assertEqual(esl.command("event plain CHANNEL_ANSWER HEARTBEAT"),
                         "+OK event listener enabled plain")
        hb = esl.event("HEARTBEAT")
        self.assertEqual(hb.get("Core-UUID"), sim.ready["core_uuid"])

        placed = sim.control("/calls", {"profile": "slot1", "count": 2, "bridge": True})
        self.assertEqual(len(placed["uuids"]), 4)
        answered = {esl.event("CHANNEL_ANSWER").get("Unique-ID") for _ in range(4)}
        self.assertEqual(answered, set(placed["uuids"]))
        rows = sqlite3.connect(sim.db).execute("select uuid, runtime_uuid from recovery")
        self.assertEqual({r[0]: r[1] for r in rows},
                         dict.fromkeys(placed["uuids"], sim.ready["core_uuid"]))

        reply = sim.options("slot1")
        self.assertTrue(reply.startswith(b"SIP/2.0 200 OK\r\n"), reply)
        self.assertIn(b"\r\nX-FSHA-Node: fs1\r\n", reply)
        self.assertIn(b"\r\nCall-ID: probe-1\r\n", reply)
        self.assertEqual(esl.api("sofia global standby on"), "+OK Global standby on")
        self.assertTrue(sim.options("slot1").startswith(b"SIP/2.0 503 System Paused\r\n"))

        # flood: a load source for benchmarks, paced by TCP backpressure
        self.assertEqual(sim.control("/flood", {"count": 5000})["connections"], 1)
        for _ in range(5000):
            self.assertEqual(esl.expect("text/event-plain").content_type, "text/event-plain")

        # hang: the api gets no answer while the socket stays open; unhang releases it
        self.assertEqual(esl.command("noevents"), "+OK no longer listening for events")
        sim.control("/hang", {})
        esl.send(b"api uuid_exists " + placed["uuids"][0].encode() + b"\n\n")
        self.assertRaises(socket.timeout, esl.read, 0.3)
        sim.control("/unhang", {})
        self.assertEqual(esl.expect("api/response").body, b"true")

        try:
            sim.control("/crash", {})
        except OSError:
            pass  # the process dies before answering
        wait_for("crash", lambda: sim.proc.poll() is not None, DEADLINE)
        self.assertEqual(sim.proc.returncode, -signal.SIGKILL)
        self.assertIsNone(esl.read())  # EOF
        # kill -9 leaves the rows behind, as FreeSWITCH does
        left = sqlite3.connect(sim.db).execute("select count(*) from recovery").fetchone()[0]
        self.assertEqual(left, 4)

    def test_recovery_end_to_end(self) -> None:
        """Two simulators sharing nothing; the dead one's rows are copied; recover works."""
        a = Sim(self, "fs1", "--profile", "slot1=127.0.8.1:0")
        b = Sim(self, "fs2", "--define-profile", "slot1=127.0.8.2:0",
                "--standby-profile", "slot1")
        placed = a.control("/calls", {"profile": "slot1", "count": 3, "bridge": True})["uuids"]
        placed += a.control("/calls", {"profile": "slot1", "count": 1})["uuids"]
        self.assertEqual(len(placed), 7)
        try:
            a.control("/crash", {})
        except OSError:
            pass
        wait_for("crash of fs1", lambda: a.proc.poll() is not None, DEADLINE)

        esl = b.esl(self)
        esl.expect("auth/request")
        self.assertEqual(esl.command("auth ClueCon"), "+OK accepted")
        self.assertEqual(esl.api("sofia profile slot1 recover"), "Invalid Profile [slot1]")
        self.assertEqual(esl.api("sofia profile slot1 start"),
                         "Reload XML [Success]\nslot1 started successfully\n")
        self.assertTrue(b.control("/status")["profiles"]["slot1"]["standby"])

        # copy the dead node's rows into the live simulator's DB while it runs
        src = sqlite3.connect(a.db)
        rows = src.execute("select runtime_uuid, technology, profile_name, hostname, uuid, "
                           "metadata from recovery").fetchall()
        src.close()
        self.assertEqual(len(rows), 7)
        dst = sqlite3.connect(b.db, timeout=DEADLINE, isolation_level=None)
        dst.executemany("insert into recovery values (?, ?, ?, ?, ?, ?)", rows)
        dst.close()

        self.assertEqual(esl.command("event plain CHANNEL_ANSWER"),
                         "+OK event listener enabled plain")
        self.assertEqual(esl.api("sofia profile slot1 recover"), "Recovered 7 session(s)\n")
        recovered = {esl.event("CHANNEL_ANSWER").get("Unique-ID") for _ in range(7)}
        self.assertEqual(recovered, set(placed))
        shown = json.loads(esl.api("show channels as json"))
        self.assertEqual({r["uuid"] for r in shown["rows"]}, set(placed))
        status = b.control("/status")
        self.assertFalse(status["profiles"]["slot1"]["standby"])
        runtime = {r[0] for r in sqlite3.connect(b.db).execute(
            "select runtime_uuid from recovery")}
        self.assertEqual(runtime, {b.ready["core_uuid"]})
        self.assertEqual(esl.api("sofia profile slot1 recover"), "No sessions to recover.\n")

    def test_sip_port_in_use_marks_profile_failed(self) -> None:
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.9.1", 0))
        busy = holder.getsockname()[1]
        sim = Sim(self, "fs1", "--profile", f"slot1=127.0.9.1:{busy}",
                  "--profile", "slot2=127.0.9.2:0")
        self.assertEqual(sim.ready["sip"]["slot1"]["state"], "failed")
        self.assertEqual(sim.ready["sip"]["slot2"]["state"], "running")
        esl = sim.esl(self)
        esl.expect("auth/request")
        esl.command("auth ClueCon")
        status = esl.api("sofia status")
        self.assertNotIn("slot1\tprofile", status)  # FreeSWITCH lists it no more
        self.assertIn("slot2\tprofile", status)
        self.assertEqual(esl.command("event plain FAILURE CUSTOM sofia::profile_start"),
                         "+OK event listener enabled plain")
        holder.close()
        self.assertEqual(esl.api("sofia profile slot1 start"),
                         "Reload XML [Success]\nslot1 started successfully\n")
        frame = esl.expect("text/event-plain")
        ev = decode_event_plain(frame.body)
        self.assertEqual((ev.get("Event-Subclass"), ev.get("profile_name")),
                         ("sofia::profile_start", "slot1"))
        self.assertIn("RUNNING (0)", esl.api("sofia status"))


class CliTests(SynchronousTestCase):
    def bad(self, *argv: str) -> str:
        err = io.StringIO()
        with redirect_stderr(err):
            self.assertEqual(cli.main(list(argv)), 2)
        text = err.getvalue()
        self.assertEqual(text.count("\n"), 1, text)
        self.assertTrue(text.startswith("fsha sim: error: "), text)
        return text

    def test_bad_arguments_exit_2_with_one_line(self) -> None:
        self.bad()
        self.assertIn("--esl", self.bad("--name", "a", "--esl", "nope"))
        self.assertIn("profile", self.bad("--name", "a", "--profile", "x"))
        self.assertIn("not an IP", self.bad("--name", "a", "--profile", "x=host:5060"))
        self.assertIn("twice", self.bad("--name", "a", "--profile", "x=127.0.0.1:1",
                                        "--define-profile", "x=127.0.0.1:2"))
        self.assertIn("standby", self.bad("--name", "a", "--standby-profile", "zz"))
        self.assertIn("--acl", self.bad("--name", "a", "--acl", "bogus"))
        self.bad("--name", "a", "--heartbeat", "soon")
        self.bad("--name", "a", "--bogus-option")

    def test_parse_ok(self) -> None:
        args = cli.parse(["--name", "a", "--profile", "p=127.0.0.1:0",
                          "--define-profile", "q=127.0.0.2:5060", "--standby-profile", "q"])
        self.assertEqual(args.profiles, {"p": ("127.0.0.1", 0, True),
                                         "q": ("127.0.0.2", 5060, False)})
        self.assertEqual(args.esl_addr, ("127.0.0.1", 8021))
