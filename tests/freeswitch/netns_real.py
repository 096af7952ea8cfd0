"""Real FreeSWITCHes on the namespaced hosts of tests/e2e/netns.py, for hot standby profiles.

:class:`RealNetnsCluster` is :class:`tests.e2e.netns.NetnsCluster` (node hosts, a client
host, real ``ip addr`` + arping floating IPs) with a real FreeSWITCH per node host instead
of the simulator, each started from ``conf/freeswitch/freeswitch.xml`` (the slot profile on
the floating IP 198.18.0.101:5060; every host has ``net.ipv4.ip_nonlocal_bind=1``, so every
FreeSWITCH binds it at boot) with one change: the dialplan plays a tone after answering, so
every call carries RTP from the slot to the caller. ``hot_standby``: the cluster config says
``[takeover] profiles = "hot_standby"``; otherwise classic (fsha's start-up reconciliation
stops the profiles, a takeover starts them).

The client host runs sipp (calls that answer the recovery re-INVITE and end with their own
BYE), the OPTIONS prober of tests/e2e/probe.py and ``tcpdump`` on its NIC: :func:`read_pcap`
and :func:`sip_requests` / :func:`media_gaps` read what the caller really received.
Driver code for tests and bench/ only (blocking, every wait with a deadline).
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsha.harness import HarnessError, NodeProcesses, wait_for
from tests.e2e.netns import CLIENT_ADDRESS, NetnsCluster, in_netns, run
from tests.freeswitch import sipp
from tests.freeswitch.realfs import (
    BINARY,
    PREFIX,
    ESLError,
    RealFreeSWITCH,
)

RTP = (16384, 16583)  # the same range on every node: a recovered call keeps its port
SIPP_PORT = 5070
TONE = ('<action application="answer"/>\n'
        '          <action application="playback" data="tone_stream://%(1000,0,440);'
        'loops=-1"/>')


class NetnsFreeSWITCH(RealFreeSWITCH):
    """A :class:`RealFreeSWITCH` running inside network namespace ``netns``."""

    def __init__(self, workdir: Path, name: str, netns: str, **kw: Any) -> None:
        super().__init__(workdir, name, **kw)
        self.netns = netns
        conf = self.dir / "conf" / "freeswitch.xml"
        text = conf.read_text()
        park = '<action application="answer"/>\n          <action application="park"/>'
        if park not in text:
            raise AssertionError("conf/freeswitch/freeswitch.xml: answer+park not found")
        text = text.replace(park, TONE).replace(
            '<load module="mod_sofia"/>',
            '<load module="mod_sofia"/>\n        <load module="mod_tone_stream"/>')
        conf.write_text(text)

    def start(self) -> None:
        d = self.dir
        argv = ["ip", "netns", "exec", self.netns, str(BINARY), "-nc", "-nf", "-nonat",
                "-nonatmap", "-nocal", "-np", "-conf", str(d / "conf"), "-log", str(d / "log"),
                "-db", str(d / "db"), "-run", str(d / "run"), "-temp", str(d / "temp"),
                "-storage", str(d / "storage"), "-cache", str(d / "cache"),
                "-mod", str(PREFIX / "lib" / "freeswitch" / "mod")]
        self.out = open(d / "stdout.txt", "wb")
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise HarnessError(f"FreeSWITCH {self.name} exited with "
                                   f"{self.proc.returncode}: {self.log_text[-2000:]}")
            try:
                return "is ready" in self.api("status") and self.profile_running()
            except (OSError, ESLError):
                return False

        wait_for(f"FreeSWITCH {self.name} and its slot profile", ready, 60, interval=0.05)

    def api(self, command: str, timeout: float = 10.0) -> str:
        with in_netns(self.netns):
            return super().api(command, timeout)

    def calls(self) -> int:
        text = self.api("show calls count").strip()
        return int(text.split()[0]) if text.endswith("total.") else -1


class RealNetnsCluster(NetnsCluster):
    """:class:`NetnsCluster` with a real FreeSWITCH per node host (see the module doc)."""

    def __init__(self, *, hot_standby: bool, nodes: int = 3, interval_ms: int = 50,
                 dead_after_ms: int = 300, recover_batch: int | None = None, **kw: Any
                 ) -> None:
        super().__init__(nodes, 1, interval_ms=interval_ms, dead_after_ms=dead_after_ms,
                         hot_standby=hot_standby, **kw)
        self.recover_batch = recover_batch
        self.fs: dict[str, NetnsFreeSWITCH] = {}
        self.captures: list[subprocess.Popen[bytes]] = []

    def db_path(self, node: NodeProcesses) -> Path:
        return self.fs[node.name].core_db

    def start_sim(self, node: NodeProcesses) -> None:
        name, ip, port = self.slot_profile(1)
        fs = NetnsFreeSWITCH(self.dir, f"{node.name}-freeswitch", self.ns(node), slot_ip=ip,
                             sip_port=port, rtp=RTP, profile=name)
        self.fs[node.name] = fs
        fs.start()
        node.sim = fs.proc
        node.sim_ports = {"esl": {"host": "127.0.0.1", "port": fs.esl_port}}

    def wait_sim(self, node: NodeProcesses, timeout: float) -> None:
        pass  # start_sim waited for the profile

    def takeover_settings(self) -> dict[str, Any]:
        settings = super().takeover_settings()
        if self.recover_batch is not None:
            settings["recover_batch"] = self.recover_batch
        return settings

    # -- the client ----------------------------------------------------------------------

    def start_capture(self, name: str, expression: str) -> Path:
        """``tcpdump`` on the client host's NIC (link-level headers: the source MAC tells
        which host sent a packet), into ``name``.pcap; stopped at :meth:`stop_captures`."""
        if shutil.which("tcpdump") is None:
            raise HarnessError("tcpdump is not installed (Debian: tcpdump)")
        out = self.dir / f"{name}.pcap"
        err = open(self.dir / f"{name}.tcpdump.err", "wb")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.client_ns, "tcpdump", "-i", "ethC", "-n", "-U",
             "-s", "1600", "-B", "16384", "-w", str(out), expression],
            stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
            start_new_session=True)
        self.captures.append(proc)
        self.helpers.append(proc)
        wait_for("tcpdump to listen", lambda: b"listening on" in
                 (self.dir / f"{name}.tcpdump.err").read_bytes()
                 or proc.poll() is not None, 20)
        if proc.poll() is not None:
            raise HarnessError(f"tcpdump exited {proc.returncode}")
        return out

    def stop_captures(self) -> None:
        for proc in self.captures:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # flushes the file
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)

    def mac(self, name: str) -> bytes:
        """The MAC address of host ``name``'s client NIC."""
        text = run(["ip", "-n", self.ns(name), "-o", "link", "show", "ethC"]).stdout
        words = text.split()
        return bytes.fromhex(words[words.index("link/ether") + 1].replace(":", ""))

    def start_calls(self, calls: int, reinvite_within: float, rate: int = 50
                    ) -> subprocess.Popen[bytes]:
        """``calls`` sipp calls from the client host to the slot (see tests/freeswitch/
        sipp.py: each waits for the recovery re-INVITE, then ends with its own BYE)."""
        if not 0 < calls <= 2000:
            raise ValueError("1-2000 calls")
        _, ip, port = self.slot_profile(1)
        scenario = self.dir / "call.xml"
        scenario.write_text(sipp.CALL.replace("TIMEOUT_MS", str(int(reinvite_within * 1000))))
        return subprocess.Popen(
            ["ip", "netns", "exec", self.client_ns, "sipp", "-sf", str(scenario),
             "-s", "2000", "-i", CLIENT_ADDRESS, "-p", str(SIPP_PORT), "-m", str(calls),
             "-r", str(rate), "-l", str(calls), "-max_socket", str(calls + 100), "-nostdin",
             "-timeout", f"{int(reinvite_within + 60)}s", "-timeout_error",
             "-trace_err", f"{ip}:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.dir,
            start_new_session=True)

    def close(self) -> None:
        try:
            self.stop_captures()
        finally:
            for fs in self.fs.values():
                if fs.proc is not None and fs.proc.poll() is None:
                    os.killpg(fs.proc.pid, signal.SIGKILL)
                    fs.proc.wait(timeout=30)
            super().close()


# -- reading a capture --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Packet:
    time: float
    src_mac: bytes
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


def read_pcap(path: Path) -> list[Packet]:
    """The IPv4/UDP packets of a classic pcap file with Ethernet headers (tcpdump -w)."""
    data = path.read_bytes() if path.exists() else b""
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic == b"\xd4\xc3\xb2\xa1":
        endian, scale = "<", 1e-6
    elif magic == b"\x4d\x3c\xb2\xa1":
        endian, scale = "<", 1e-9
    elif magic == b"\xa1\xb2\xc3\xd4":
        endian, scale = ">", 1e-6
    else:
        raise ValueError(f"{path}: not a pcap file")
    packets: list[Packet] = []
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, incl, _ = struct.unpack(endian + "IIII", data[pos:pos + 16])
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 17 or len(ip) < ihl + 8:
            continue
        udp = ip[ihl:]
        sport, dport = struct.unpack("!HH", udp[:4])
        packets.append(Packet(sec + frac * scale, frame[6:12],
                              ".".join(str(b) for b in ip[12:16]), sport,
                              ".".join(str(b) for b in ip[16:20]), dport, udp[8:]))
    return packets


def sip_requests(packets: list[Packet], src: str) -> list[tuple[Packet, str, str]]:
    """Every SIP request ``src`` sent: (packet, method, Call-ID)."""
    found = []
    for p in packets:
        if p.src != src or p.sport != 5060:
            continue
        head = p.payload.split(b"\r\n", 1)[0].decode("latin-1")
        if head.startswith("SIP/2.0"):
            continue  # a response
        method = head.split(" ", 1)[0]
        call_id = ""
        for line in p.payload.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() in ("call-id", "i"):
                call_id = value.strip()
                break
        found.append((p, method, call_id))
    return found


def media_gaps(packets: list[Packet], src: str, fault: float, rtp: tuple[int, int] = RTP
               ) -> dict[int, float]:
    """Per call (the slot's RTP source port): the longest gap between two RTP packets the
    caller received from ``src``, from the last one before ``fault`` on (seconds). A call
    whose media never came back after the fault gets ``inf``."""
    by_port: dict[int, list[float]] = defaultdict(list)
    for p in packets:
        if p.src == src and rtp[0] <= p.sport <= rtp[1]:
            by_port[p.sport].append(p.time)
    gaps: dict[int, float] = {}
    for port, times in by_port.items():
        times.sort()
        before = [t for t in times if t <= fault]
        after = [t for t in times if t > fault]
        if not before:
            continue  # a call that started after the fault
        if not after:
            gaps[port] = float("inf")
            continue
        worst, last = 0.0, before[-1]
        for t in after:
            worst = max(worst, t - last)
            last = t
        gaps[port] = worst
    return gaps


def senders(packets: list[Packet], src: str, since: float) -> dict[bytes, int]:
    """Packets with source ``src`` received since ``since``, by sender MAC (which host)."""
    out: dict[bytes, int] = defaultdict(int)
    for p in packets:
        if p.src == src and p.time >= since:
            out[p.src_mac] += 1
    return dict(out)


def wait_calls(fs: NetnsFreeSWITCH, n: int, timeout: float) -> None:
    wait_for(f"{n} calls on {fs.name}", lambda: fs.calls() == n, timeout, interval=0.1)

