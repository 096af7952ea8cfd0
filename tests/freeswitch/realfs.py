"""A real FreeSWITCH for tests: started from the project's own configuration.

:class:`RealFreeSWITCH` runs ``/opt/freeswitch/bin/freeswitch`` (``FSHA_FREESWITCH`` to
change the prefix) with its own folders under a test's directory, from
``conf/freeswitch/freeswitch.xml`` with only its ``X-PRE-PROCESS set`` values changed (ESL
port, the slot's address and port, the RTP range; blind registration for sipp). Several
run side by side on loopback: each binds its Event Socket on 127.0.0.1 (its own port) and
its slot profile on a 127.x address. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from fsha.harness import LoopbackCluster, NodeProcesses
from fsha.harness import wait_for as wait_blocking

ROOT = Path(__file__).resolve().parents[2]
PREFIX = Path(os.environ.get("FSHA_FREESWITCH", "/opt/freeswitch"))
BINARY = PREFIX / "bin" / "freeswitch"
CONFIG = ROOT / "conf" / "freeswitch" / "freeswitch.xml"
PASSWORD = "ClueCon"
DEADLINE = 30.0
FOLDERS = ("conf", "log", "db", "run", "temp", "storage", "cache")


def skip_reason() -> str | None:
    """Why the real-FreeSWITCH tier cannot run here (None: it can)."""
    if not BINARY.exists():
        return (f"no FreeSWITCH at {BINARY} (install it: bash ../shared/freeswitch/"
                "install.sh, or scripts/setup.sh does when that folder exists)")
    if os.geteuid() != 0 and not os.access(BINARY, os.X_OK):
        return f"{BINARY} is not executable"
    return None


def wait_for(cond: Callable[[], Any], what: str, deadline: float = DEADLINE) -> Any:
    end = time.monotonic() + deadline
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            value = cond()
        except OSError as e:
            last, value = e, None
        if value:
            return value
        time.sleep(0.02)  # poll interval of a condition wait
    raise AssertionError(f"timed out after {deadline:g} s waiting for {what}"
                         + (f" (last error: {last})" if last else ""))


def free_port(host: str, kind: int = socket.SOCK_STREAM) -> int:
    for _ in range(200):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port >= 20000:
            return port
    raise AssertionError("no free port")


def free_sip_port(host: str) -> int:
    """A port free for both UDP and TCP on ``host`` (sofia binds both)."""
    for _ in range(200):
        port = free_port(host, socket.SOCK_DGRAM)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no free SIP port")


def render_config(values: dict[str, str]) -> str:
    """conf/freeswitch/freeswitch.xml with these ``X-PRE-PROCESS set`` values replaced."""
    text = CONFIG.read_text()
    for name, value in values.items():
        text, n = re.subn(rf'data="{re.escape(name)}=[^"]*"', f'data="{name}={value}"', text)
        if n != 1:
            raise AssertionError(f"{CONFIG} sets {name} {n} times, expected once")
    return text


class ESLError(Exception):
    pass


def api(port: int, command: str, timeout: float = 10.0) -> str:
    """One ``api`` command on a new connection (blocking): the body."""
    from fsha.wire.esl import FrameDecoder

    decoder = FrameDecoder()
    frames: list[Any] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        def read() -> Any:
            while not frames:
                data = sock.recv(65536)
                if not data:
                    raise ESLError("connection closed")
                frames.extend(decoder.feed(data))
            return frames.pop(0)

        read()  # auth/request
        sock.sendall(f"auth {PASSWORD}\n\n".encode())
        reply = read()
        if not (reply.headers.get("Reply-Text") or "").startswith("+OK"):
            raise ESLError(f"auth refused: {reply.headers.get('Reply-Text')}")
        sock.sendall(f"api {command}\n\n".encode())
        while True:
            frame = read()
            if frame.content_type == "api/response":
                return str(frame.body.decode("utf-8", "replace"))


class RealFreeSWITCH:
    """One FreeSWITCH process with its own folders (see the module docstring)."""

    def __init__(self, workdir: Path, name: str, *, slot_ip: str, sip_port: int,
                 rtp: tuple[int, int], profile: str = "slot1", netns: str | None = None
                 ) -> None:
        self.name = name
        self.netns = netns  # run inside this network namespace (its own 127.0.0.1)
        self.dir = workdir / name
        for f in FOLDERS:
            (self.dir / f).mkdir(parents=True, exist_ok=True)
        self.profile = profile
        self.slot_ip = slot_ip
        self.sip_port = sip_port
        self.esl_port = free_port("127.0.0.1")
        (self.dir / "conf" / "freeswitch.xml").write_text(render_config({
            "fsha_esl_port": str(self.esl_port), "fsha_esl_password": PASSWORD,
            "fsha_slot_profile": profile, "fsha_slot_ip": slot_ip,
            "fsha_slot_sip_port": str(sip_port), "fsha_rtp_start": str(rtp[0]),
            "fsha_rtp_end": str(rtp[1]), "fsha_blind_reg": "true"}))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def core_db(self) -> Path:
        return self.dir / "db" / "core.db"

    def registration_db(self, profile: str | None = None) -> Path:
        return self.dir / "db" / f"sofia_reg_{profile or self.profile}.db"

    @property
    def log_text(self) -> str:
        try:
            return (self.dir / "log" / "freeswitch.log").read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> None:
        d = self.dir
        argv = [str(BINARY), "-nc", "-nf", "-nonat", "-nonatmap", "-nocal", "-np",
                "-conf", str(d / "conf"), "-log", str(d / "log"), "-db", str(d / "db"),
                "-run", str(d / "run"), "-temp", str(d / "temp"),
                "-storage", str(d / "storage"), "-cache", str(d / "cache"),
                "-mod", str(PREFIX / "lib" / "freeswitch" / "mod")]
        self.out = open(d / "stdout.txt", "wb")
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]  # exec: the pid is FreeSWITCH's
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"FreeSWITCH {self.name} exited with "
                                     f"{self.proc.returncode}: {self.log_text[-2000:]}")
            try:
                return "is ready" in self.api("status")
            except (OSError, ESLError):
                return False

        wait_for(ready, f"FreeSWITCH {self.name} ready")

    def api(self, command: str, timeout: float = 10.0) -> str:
        if self.netns is None:
            return api(self.esl_port, command, timeout)
        from tests.e2e.netns import in_netns
        with in_netns(self.netns):
            return api(self.esl_port, command, timeout)

    def profile_running(self) -> bool:
        return any(line.split()[:1] == [self.profile] and "RUNNING" in line
                   for line in self.api("sofia status").splitlines())

    def bind_given_up(self) -> bool:
        """The slot profile failed to bind and sofia stopped retrying (its address:port is
        another FreeSWITCH's, as a slave's profile fails on a host without the address)."""
        return re.search(rf"Error Creating SIP UA for profile: {re.escape(self.profile)} "
                         r"\([^)]*\)\n", self.log_text) is not None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=DEADLINE)
        if self.proc is not None:
            self.out.close()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def recovery_metadata(db: Path) -> list[bytes]:
    """The metadata of every recovery row of a FreeSWITCH's core DB (read-only)."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        conn.text_factory = bytes
        return [row[0] for row in conn.execute("select metadata from recovery")]


def calls_count(fs: RealFreeSWITCH) -> int:
    """``show calls count`` of ``fs`` (-1 when it does not answer that)."""
    text = fs.api("show calls count").strip()
    return int(text.split()[0]) if text.endswith("total.") else -1


def every_row_acked(fs: RealFreeSWITCH) -> bool:
    """FreeSWITCH rewrites an answered call's recovery row when the caller's ACK is in
    (``sip_to_tag``); a row recovered before that is a dialog the caller cannot match."""
    return all(b"<sip_to_tag>" in m for m in recovery_metadata(fs.core_db))


class RealFreeSWITCHCluster(LoopbackCluster):
    """:class:`~fsha.harness.LoopbackCluster` with a real FreeSWITCH per node."""

    def __init__(self, workdir: Path, nodes: int = 3, rtp_ports: int = 200,
                 esl_timeout_ms: int = 1000, interval_ms: int = 50,
                 dead_after_ms: int = 300) -> None:
        rng = random.Random()
        self.slot_ip = f"127.{rng.randint(100, 250)}.{rng.randint(1, 250)}.1"
        base = 20000 + 2 * rng.randint(0, (20000 - rtp_ports) // 2)
        self.rtp = (base, base + rtp_ports - 2)  # RTP and RTCP: 2 ports a call
        self.fs: dict[str, RealFreeSWITCH] = {}
        super().__init__(nodes, 1, interval_ms=interval_ms, dead_after_ms=dead_after_ms,
                         workdir=workdir, esl_timeout_ms=esl_timeout_ms)
        self.sip_port = free_sip_port(self.slot_ip)

    def slot_profile(self, slot: int) -> tuple[str, str, int]:
        return f"slot{slot}", self.slot_ip, self.sip_port

    def db_path(self, node: NodeProcesses) -> Path:
        return self.fs[node.name].core_db

    def start_sim(self, node: NodeProcesses) -> None:
        fs = RealFreeSWITCH(self.dir, f"{node.name}-freeswitch", slot_ip=self.slot_ip,
                            sip_port=self.sip_port, rtp=self.rtp, profile="slot1")
        self.fs[node.name] = fs
        fs.start()
        if node.index == 1:  # the first to boot holds the slot's address:port
            wait_blocking("the slot profile on fs1", fs.profile_running, 30)
        node.sim = fs.proc

    def wait_sim(self, node: NodeProcesses, timeout: float) -> None:
        fs = self.fs[node.name]
        if node.index > 1:
            wait_blocking(f"{node.name}'s slot profile to give up", fs.bind_given_up, timeout)
        node.sim_ports = {"esl": {"host": "127.0.0.1", "port": fs.esl_port}}
