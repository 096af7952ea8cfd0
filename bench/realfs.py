"""A real FreeSWITCH (/opt/freeswitch) and sipp on loopback, for the recovery benchmarks.

Driver code for bench/ only (blocking sockets and subprocesses, every wait with a deadline).
One FreeSWITCH per work folder, with its own conf/db/log folders, one sofia profile
``slot1`` with ``track-calls=true`` whose dialplan answers and parks every call, its event
socket on 127.0.20.1:18021; sipp places answer+park calls from 127.0.20.2 that accept the
recovery re-INVITEs (``uac_reinvite.xml``). Loopback only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FREESWITCH = Path("/opt/freeswitch/bin/freeswitch")
MODULES = Path("/opt/freeswitch/lib/freeswitch/mod")
IP = "127.0.20.1"
CALLER_IP = "127.0.20.2"
SIP_PORT = 25080
ESL_PORT = 18021
PROFILE = "slot1"
HERE = Path(__file__).resolve().parent

CONF = """<?xml version="1.0"?>
<document type="freeswitch/xml">
  <section name="configuration">
    <configuration name="switch.conf"><settings>
      <param name="max-sessions" value="10000"/>
      <param name="sessions-per-second" value="2000"/>
      <param name="loglevel" value="warning"/>
      <param name="rtp-start-port" value="20000"/><param name="rtp-end-port" value="40000"/>
    </settings></configuration>
    <configuration name="modules.conf"><modules>
      <load module="mod_logfile"/><load module="mod_event_socket"/>
      <load module="mod_commands"/><load module="mod_dptools"/>
      <load module="mod_dialplan_xml"/><load module="mod_sofia"/>
    </modules></configuration>
    <configuration name="logfile.conf"><settings/><profiles><profile name="default">
      <settings><param name="logfile" value="{log}/fs.log"/></settings>
      <mappings><map name="all" value="warning,err,crit,alert"/></mappings>
    </profile></profiles></configuration>
    <configuration name="event_socket.conf"><settings>
      <param name="listen-ip" value="{ip}"/><param name="listen-port" value="{esl}"/>
      <param name="password" value="ClueCon"/>
    </settings></configuration>
    <configuration name="sofia.conf"><global_settings/><profiles>
      <profile name="{profile}"><settings>
        <param name="sip-ip" value="{ip}"/><param name="sip-port" value="{sip}"/>
        <param name="rtp-ip" value="{ip}"/><param name="ext-rtp-ip" value="{ip}"/>
        <param name="ext-sip-ip" value="{ip}"/>
        <param name="context" value="public"/><param name="dialplan" value="XML"/>
        <param name="track-calls" value="true"/><param name="auth-calls" value="false"/>
        <param name="inbound-codec-prefs" value="PCMU"/>
        <param name="outbound-codec-prefs" value="PCMU"/>
        <param name="auto-restart" value="false"/>
      </settings></profile>
    </profiles></configuration>
  </section>
  <section name="dialplan"><context name="public"><extension name="park">
    <condition field="destination_number" expression=".*">
      <action application="answer"/><action application="park"/>
    </condition>
  </extension></context></section>
</document>
"""


def wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class ESL:
    """A blocking inbound event-socket client: ``api`` only, no events."""

    def __init__(self, host: str = IP, port: int = ESL_PORT, timeout: float = 120.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self._frame()  # auth/request
        self.sock.sendall(b"auth ClueCon\n\n")
        headers, _ = self._frame()
        if not headers.get("Reply-Text", "").startswith("+OK"):
            raise OSError(f"ESL auth refused: {headers}")

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("ESL connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _frame(self) -> tuple[dict[str, str], bytes]:
        while b"\n\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("ESL connection closed")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\n\n", 1)
        headers = dict(line.split(": ", 1) for line in head.decode().splitlines() if ": " in line)
        body = self._read(int(headers["Content-Length"])) if "Content-Length" in headers else b""
        return headers, body

    def api(self, command: str) -> str:
        self.sock.sendall(f"api {command}\n\n".encode())
        while True:
            headers, body = self._frame()
            if headers.get("Content-Type") == "api/response":
                return body.decode("utf-8", "replace")

    def close(self) -> None:
        self.sock.close()


class RealFS:
    """One FreeSWITCH in ``folder`` (created empty)."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.proc: subprocess.Popen[bytes] | None = None
        for sub in ("conf", "log", "db", "run", "temp", "storage", "cache"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / "conf" / "freeswitch.xml").write_text(CONF.format(
            log=folder / "log", ip=IP, esl=ESL_PORT, sip=SIP_PORT, profile=PROFILE))

    @property
    def core_db(self) -> Path:
        return self.dir / "db" / "core.db"

    def start(self, timeout: float = 60.0) -> None:
        d = self.dir
        argv = [str(FREESWITCH), "-nc", "-nf", "-nonat", "-nonatmap", "-nocal", "-np",
                "-conf", str(d / "conf"), "-log", str(d / "log"), "-db", str(d / "db"),
                "-run", str(d / "run"), "-temp", str(d / "temp"), "-storage",
                str(d / "storage"), "-cache", str(d / "cache"), "-mod", str(MODULES)]
        with open(d / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

        def running() -> bool:
            esl = ESL(timeout=5)
            try:
                return f"{PROFILE}\tprofile" in esl.api("sofia status").replace("  ", "") \
                    or "RUNNING" in esl.api("sofia status")
            finally:
                esl.close()
        wait("FreeSWITCH and its profile", running, timeout, 0.2)

    def kill(self) -> None:
        """kill -9 (a crash: the recovery rows stay in core.db)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None
        wait("the ports to be free", _esl_port_free, 30, 0.1)

    def rows(self) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.core_db, timeout=30) as conn:
            return conn.execute("select runtime_uuid, technology, profile_name, hostname, "
                                "uuid, metadata from recovery").fetchall()

    def busy_warnings(self) -> int:
        log = self.dir / "log" / "fs.log"
        return log.read_text(errors="replace").count("SQLite is BUSY") if log.exists() else 0


def _esl_port_free() -> bool:
    with socket.socket() as s:
        try:
            s.bind((IP, ESL_PORT))
        except OSError:
            return False
    return True


class Sipp:
    """sipp placing ``calls`` answer+park calls at ``rate`` per second, each accepting
    re-INVITEs until the end."""

    def __init__(self, folder: Path, calls: int, rate: int) -> None:
        if shutil.which("sipp") is None:
            raise RuntimeError("sipp is not installed (Debian: sip-tester)")
        self.log = folder / "sipp.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ["sipp", "-sf", str(HERE / "uac_reinvite.xml"), "-i", CALLER_IP, "-p", "25090",
                 "-s", "1000", f"{IP}:{SIP_PORT}", "-m", str(calls), "-r", str(rate),
                 "-l", str(calls), "-max_socket", str(calls + 100), "-nostdin",
                 "-timeout_error", "-recv_timeout", "600000"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def wait_rows(fs: RealFS, calls: int, timeout: float) -> int:
    """Wait until ``fs`` has a recovery row per call (or the count stopped moving for 10 s
    at 95 % or more: a call sipp gave up on under load); the count."""
    seen = {"n": -1, "since": time.monotonic()}

    def done() -> int | None:
        n = len(fs.rows())
        now = time.monotonic()
        if n != seen["n"]:
            seen["n"], seen["since"] = n, now
        if n >= calls or (n >= 0.95 * calls and now - seen["since"] > 10):
            return n
        return None
    n: int = wait(f"{calls} recovery rows", done, timeout, 0.5)
    time.sleep(1.0)  # the last rows' updates (ACK) are written asynchronously
    return n


def count_channels(esl: ESL) -> int:
    out = esl.api("show channels count").strip()
    return int(out.split()[0]) if out and out.split()[0].isdigit() else 0
