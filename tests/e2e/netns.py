"""Real hosts, real networks, real faults: a cluster in Linux network namespaces.

Layout (``P`` is a per-run prefix such as ``fe3k9q``; every name is unique per run)::

    P-sw       the "switch": one bridge per cluster network (brA, brB, ...) and one for
               the client network (brC); port ``iN<net>`` is node N's cable
    P-nN       node host N: ethA 198.18.1.N/24, ethB 198.18.2.N/24 (, ethD 198.18.3.N/24),
               ethC 198.18.0.N/24 (the client network, where floating IPs
               198.18.0.(100+S)/24 live); runs ``fsha sim`` and ``twistd -n fsha``
    P-cl       the client host: ethC 198.18.0.250/24; runs :mod:`tests.e2e.probe`

Only 198.18.0.0/15 is used, only inside these namespaces; the root namespace gets no address
and no route. Each node host has its own loopback, where its status API, its simulator's
ESL and control API listen (the test reads them by entering the namespace, see
:func:`in_netns`). All fsha ports are chosen at random in 20000-31999: the namespaces are new,
so nothing else listens there.

Tear-down is certain: :meth:`NetnsCluster.close` (context manager, ``addCleanup``) kills the
processes it started and every process left in its namespaces, then deletes the namespaces;
an ``atexit`` hook and SIGTERM/SIGHUP handlers do the same if the run is interrupted, and
:func:`reap_stale` removes namespaces of earlier runs whose process is gone (their owner pid
is recorded in ``/run/fsha-e2e``).

Driver code: plain ``subprocess`` with timeouts, and waits on conditions with deadlines.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsha import tomlout
from fsha.harness import (
    FSHA,
    TLS_FILES,
    TWISTD,
    HarnessError,
    LoopbackCluster,
    NodeProcesses,
    wait_for,
)

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
REGISTRY = Path("/run/fsha-e2e")  # one file per live run: prefix -> owner pid
CLIENT_ADDRESS = "198.18.0.250"
PROBE = Path(__file__).with_name("probe.py")
LINKEMU = Path(__file__).with_name("linkemu.py")
NETWORK_NAMES = ("A", "B", "D")  # cluster networks; "C" is the client network
SIP_PORT = 5060
CMD_TIMEOUT = 20.0

# One OPTIONS per sipp "call"; a 200 within TIMEOUT ms logs the answering node, else the
# call fails.
SIPP_OPTIONS = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="fsha e2e OPTIONS">
  <send>
    <![CDATA[
      OPTIONS sip:probe@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag[call_number]
      To: <sip:probe@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 OPTIONS
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" timeout="TIMEOUT">
    <action>
      <ereg regexp="[A-Za-z0-9_.-]+" search_in="hdr" header="X-FSHA-Node:"
            check_it="true" assign_to="node"/>
      <gettimeofday assign_to="sec,usec"/>
      <log message="answered [$sec] [$usec] [$node]"/>
    </action>
  </recv>
</scenario>
"""

_libc = ctypes.CDLL(None, use_errno=True)
_live: dict[str, NetnsCluster] = {}
_guard_installed = False


# -- prerequisites --------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why the e2e harness cannot run here, or None if it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the netns harness needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    for tool in ("ip", "arping", "sysctl"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed (Debian: iproute2, iputils-arping, procps)"
    try:
        run(["ip", "netns", "list"])
    except HarnessError as e:
        return f"'ip netns' does not work here: {e}"
    return None


def run(argv: list[str], timeout: float = CMD_TIMEOUT, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"{' '.join(argv)}: no result within {timeout:.0f}s") from None
    except OSError as e:
        raise HarnessError(f"{' '.join(argv)}: {e}") from None
    if check and done.returncode != 0:
        raise HarnessError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def _batch(lines: list[str], netns: str | None = None) -> None:
    """Many ``ip`` commands in one process (``ip -batch``), failing on the first error."""
    if not lines:
        return
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    try:
        done = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True,
                              text=True, timeout=CMD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"ip -batch in {netns}: no result within {CMD_TIMEOUT:.0f}s"
                           ) from None
    if done.returncode != 0:
        raise HarnessError(f"ip -batch in {netns}: {done.stderr.strip()}")


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block's socket calls in namespace ``name`` (this thread only).

    Sockets keep the namespace they were created in, so a connection opened in the block
    is one from inside that host. The thread's own namespace is restored on leaving."""
    with open("/proc/thread-self/ns/net", "rb") as back, open(NETNS_DIR / name, "rb") as to:
        if _libc.setns(to.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise HarnessError(f"setns({name}): {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(back.fileno(), CLONE_NEWNET) != 0:  # pragma: no cover
                os.write(2, b"fatal: cannot return to the original network namespace\n")
                os._exit(70)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_namespaces(prefix: str) -> list[str]:
    """Kill every process in the run's namespaces and delete them; returns those deleted."""
    if not NETNS_DIR.exists():
        return []
    names = sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix + "-"))
    for ns in names:
        pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)  # processes this run started there
            except (ProcessLookupError, ValueError):
                pass
    for ns in names:
        run(["ip", "netns", "del", ns], check=False)
    (REGISTRY / prefix).unlink(missing_ok=True)
    return names


def reap_stale() -> list[str]:
    """Delete the namespaces of earlier runs whose owner process is gone."""
    removed: list[str] = []
    if not REGISTRY.exists():
        return removed
    for entry in REGISTRY.iterdir():
        try:
            pid = int(entry.read_text().strip())
        except (OSError, ValueError):
            pid = -1
        if pid <= 0 or not _pid_alive(pid):
            removed += delete_namespaces(entry.name)
    return removed


def _close_all() -> None:
    for cluster in list(_live.values()):
        try:
            cluster.close()
        except Exception as e:
            print(f"netns harness: tear-down of {cluster.prefix} failed: {e}", file=sys.stderr)


def _install_guard() -> None:
    global _guard_installed
    if _guard_installed:
        return
    _guard_installed = True
    atexit.register(_close_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(signum)

        def handler(num: int, frame: Any, previous: Any = previous) -> None:
            _close_all()
            if callable(previous):
                previous(num, frame)
            else:
                raise SystemExit(128 + num)
        signal.signal(signum, handler)


# -- the cluster ----------------------------------------------------------------------------


@dataclass
class Probe:
    """A running client prober and its answers file."""

    process: subprocess.Popen[bytes]
    out: Path
    stop_file: Path
    targets: list[str]
    answers: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    _offset: int = 0

    def read(self) -> list[dict[str, Any]]:
        """Every answer so far (reads what the prober appended since the last call)."""
        if self.out.exists():
            with open(self.out, encoding="utf-8") as f:
                f.seek(self._offset)
                text = f.read()
            complete, _, _ = text.rpartition("\n")
            if complete:
                self._offset += len(complete.encode()) + 1
                for line in complete.split("\n"):
                    record = json.loads(line)
                    if "summary" in record:
                        self.summary = record["summary"]
                    elif "ip" in record:
                        self.answers.append(record)
        return self.answers

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        self.stop_file.touch()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.read()
        if self.summary is None:
            raise HarnessError(f"the prober ended without a summary (exit "
                               f"{self.process.returncode})")
        return self.summary

    def answers_for(self, ip: str, since: float = 0.0) -> list[dict[str, Any]]:
        return [a for a in self.read() if a["ip"] == ip and a["received"] >= since]

    def answers_to_probes_sent(self, ip: str, since: float) -> list[dict[str, Any]]:
        """The answers to probes sent at or after ``since`` (a probe sent just before a
        fault may still be answered, and received, after it by the old owner)."""
        return [a for a in self.read() if a["ip"] == ip and a["sent"] >= since]

    def last_node(self, ip: str) -> str | None:
        answers = self.answers_for(ip)
        return answers[-1]["node"] if answers else None


def outage(answers: list[dict[str, Any]], fault: float) -> tuple[float, dict[str, Any] | None]:
    """The client's downtime for a fault at ``fault``: the longest gap between consecutive
    answered probes, from the last answer before the fault to the end; and the first
    answer that ended it."""
    before = [a for a in answers if a["received"] <= fault]
    after = [a for a in answers if a["received"] > fault]
    previous = before[-1]["received"] if before else fault
    worst, ended_by = 0.0, None
    for a in after:
        gap = a["received"] - previous
        if gap > worst:
            worst, ended_by = gap, a
        previous = a["received"]
    return worst, ended_by


class NetnsCluster(LoopbackCluster):
    """``nodes`` node hosts serving ``slots`` slots over ``networks`` cluster networks."""

    def __init__(self, nodes: int = 3, slots: int = 2, *, networks: int = 2,
                 interval_ms: int = 20, dead_after_ms: int = 100, profile_guard: int = 0,
                 dead_after_min_ms: int | None = None, nice: int = 0,
                 arping_count: int = 3, workdir: Path | None = None,
                 keep: bool = False, emulated: tuple[str, ...] = (),
                 fence_command: list[str] | None = None, fence_timeout_ms: int = 10_000,
                 hot_standby: bool = False) -> None:
        if not 1 <= slots <= nodes <= 100:
            raise ValueError("need 1 <= slots <= nodes <= 100")
        if not 2 <= networks <= len(NETWORK_NAMES):
            raise ValueError(f"need 2..{len(NETWORK_NAMES)} cluster networks")
        self.node_count, self.slot_count = nodes, slots
        self.interval_ms, self.dead_after_ms = interval_ms, dead_after_ms
        self.dead_after_min_ms = dead_after_min_ms  # the adaptive detector's floor
        # fsha's scheduling niceness (systemd's Nice=): below 0, the node's reactor gets
        # the CPU before the simulators, the probe and the load of other jobs
        self.nice = nice
        self.networks = list(NETWORK_NAMES[:networks])
        self.profile_guard, self.arping_count = profile_guard, arping_count
        unknown = set(emulated) - set(self.networks)
        if unknown:
            raise ValueError(f"cannot emulate networks {sorted(unknown)}: not in the cluster")
        # Cables of these networks run through tests/e2e/linkemu.py (see impair()).
        self.emulated = tuple(emulated)
        self.fence_command, self.fence_timeout_ms = fence_command, fence_timeout_ms
        # [takeover] profiles = "hot_standby": every simulator runs the slots' profiles
        # from its start, bound non-locally (the namespaces allow it); fsha installs its
        # egress fence (nft) in each namespace
        self.hot_standby = hot_standby
        self.keep = keep or workdir is not None
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fsha-e2e-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "cluster.toml"
        self.nodes = [NodeProcesses(f"fs{i}", i, self.dir / f"fs{i}.log",
                                    self.dir / f"fs{i}-sim.log") for i in range(1, nodes + 1)]
        self._closed = False
        self._built = False
        self.sip_port = SIP_PORT
        self.prefix = "fe" + "".join(random.choices(string.ascii_lowercase + string.digits,
                                                    k=4))
        self.switch_ns, self.client_ns = f"{self.prefix}-sw", f"{self.prefix}-cl"
        self.probes: list[Probe] = []
        self.islands: set[tuple[str, int]] = set()
        self.linkemu: subprocess.Popen[str] | None = None
        self.helpers: list[subprocess.Popen[bytes]] = []  # CPU hogs, NIC flappers
        self.flapping: list[tuple[str, str]] = []
        self.stopped_sims: set[str] = set()

    # -- names and addresses -------------------------------------------------------------

    def ns(self, node: NodeProcesses | str) -> str:
        n = self.node(node) if isinstance(node, str) else node
        return f"{self.prefix}-n{n.index}"

    def net_address(self, network: str, index: int) -> str:
        third = 0 if network == "C" else NETWORK_NAMES.index(network) + 1
        return f"198.18.{third}.{index}"

    def floating_ip(self, slot: int) -> str:
        return f"198.18.0.{100 + slot}"

    def slot_profile(self, slot: int) -> tuple[str, str, int]:
        return f"slot{slot}", self.floating_ip(slot), self.sip_port

    def port_name(self, index: int, network: str) -> str:
        return f"i{index}{network}"  # the switch's side of node ``index``'s cable

    # -- building ------------------------------------------------------------------------

    def build(self) -> None:
        """Create the namespaces, bridges and cables (also registers the tear-down)."""
        _install_guard()
        reap_stale()  # namespaces left by runs that were killed (kill -9 skips every guard)
        _live[self.prefix] = self
        REGISTRY.mkdir(parents=True, exist_ok=True)
        (REGISTRY / self.prefix).write_text(f"{os.getpid()}\n")
        self._built = True
        all_ns = [self.switch_ns, self.client_ns] + [self.ns(n) for n in self.nodes]
        for ns in all_ns:
            run(["ip", "netns", "add", ns])
        bridges = [*self.networks, "C"]
        sw = [f"link add br{b} type bridge forward_delay 0 stp_state 0" for b in bridges]
        sw += [f"link set br{b} up" for b in bridges]
        sw.append("link set lo up")
        for node in self.nodes:
            for b in bridges:
                if b in self.emulated:
                    continue
                sw.append(f"link add {self.port_name(node.index, b)} type veth "
                          f"peer name eth{b} netns {self.ns(node)}")
                sw.append(f"link set {self.port_name(node.index, b)} master br{b} up")
        sw.append(f"link add icl type veth peer name ethC netns {self.client_ns}")
        sw.append("link set icl master brC up")
        _batch(sw, self.switch_ns)
        if self.emulated:
            self._start_linkemu()
        for node in self.nodes:
            ns = self.ns(node)
            run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                 "net.ipv4.ip_nonlocal_bind=1",
                 "net.ipv4.conf.all.promote_secondaries=1",
                 "net.ipv4.conf.default.promote_secondaries=1"])
            lines = ["link set lo up"]
            for b in bridges:
                lines.append(f"addr add {self.net_address(b, node.index)}/24 dev eth{b}")
                lines.append(f"link set eth{b} up")
            _batch(lines, ns)
            run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                 "net.ipv4.conf.ethC.promote_secondaries=1"])
        _batch(["link set lo up", f"addr add {CLIENT_ADDRESS}/24 dev ethC",
                "link set ethC up"], self.client_ns)

    def _start_linkemu(self) -> None:
        links = [f"{node.index}{net}:{self.ns(node)}:eth{net}:{self.switch_ns}:"
                 f"{self.port_name(node.index, net)}"
                 for net in self.emulated for node in self.nodes]
        argv = [sys.executable, str(LINKEMU), "--seed", str(random.randrange(1 << 30)),
                "--max-seconds", "3600", *links]
        with open(self.dir / "linkemu.err", "ab") as err:
            self.linkemu = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=err, text=True, bufsize=1,
                                            start_new_session=True)
        if self._linkemu_line(30.0) != "ready":
            raise HarnessError(f"the link emulator did not start; see {self.dir / 'linkemu.err'}")
        _batch([f"link set {self.port_name(node.index, net)} master br{net} up"
                for net in self.emulated for node in self.nodes], self.switch_ns)

    def _linkemu_line(self, timeout: float) -> str:
        import select

        emu = self.linkemu
        assert emu is not None and emu.stdout is not None
        ready, _, _ = select.select([emu.stdout], [], [], timeout)
        if not ready:
            raise HarnessError(f"the link emulator did not answer within {timeout:.0f}s")
        return emu.stdout.readline().strip()

    def start(self, timeout: float = 30.0) -> None:
        if not self._built:
            self.build()
        super().start(timeout)

    def start_sim(self, node: NodeProcesses) -> None:
        ready = self.dir / f"{node.name}-sim.ready"
        ready.unlink(missing_ok=True)
        esl_port = node.sim_ports.get("esl", {}).get("port", 0)
        control_port = node.sim_ports.get("control", {}).get("port", 0)
        argv = ["ip", "netns", "exec", self.ns(node), *FSHA, "sim", "--name", node.name,
                "--esl", f"127.0.0.1:{esl_port}", "--password", "ClueCon",
                "--db", str(self.db_path(node)),
                "--control", f"127.0.0.1:{control_port}", "--ready-file", str(ready),
                "--profile-guard", str(self.profile_guard)]
        for s in range(1, self.slot_count + 1):
            name, ip, port = self.slot_profile(s)
            argv += ["--profile" if self.hot_standby else "--define-profile",
                     f"{name}={ip}:{port}"]
        with open(node.sim_log_path, "ab") as log:
            node.sim = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def takeover_settings(self) -> dict[str, Any]:
        """The config's ``[takeover]`` section (empty: none)."""
        return {"profiles": "hot_standby"} if self.hot_standby else {}

    def write_config(self) -> None:
        secret = self.dir / "cluster.secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(24).hex().encode())
        # New namespaces: nothing listens anywhere yet, so any distinct ports are free. Below
        # the ephemeral range (32768-60999): polling a port nobody listens on yet (a node
        # restarting) must not end in a TCP self-connect, which a source port equal to
        # the destination port would give.
        hb_port, stream_port, status_port = random.sample(range(20000, 32000), 3)
        doc: dict[str, Any] = {
            "cluster": {"name": "e2e", "secret_file": str(secret),
                        "heartbeat_interval_ms": self.interval_ms,
                        "dead_after_ms": self.dead_after_ms, "quorum": "majority",
                        **({} if self.dead_after_min_ms is None
                           else {"dead_after_min_ms": self.dead_after_min_ms})},
            "state": {"dir": "state/{node}"},
            "floating_ip": {"backend": "ip", "arping_count": self.arping_count,
                            "timeout_ms": 5000}}
        takeover = self.takeover_settings()
        if takeover:
            doc["takeover"] = takeover
        if self.fence_command:
            doc["fencing"] = {"command": list(self.fence_command),
                              "timeout_ms": self.fence_timeout_ms, "required": True}
        doc["tls"] = TLS_FILES
        doc["network"] = [{"name": net, "port": hb_port} for net in self.networks]
        doc["node"] = []
        for node in self.nodes:
            doc["node"].append({
                "name": node.name, "priority": 100 if node.index <= self.slot_count else 50,
                "address": {net: self.net_address(net, node.index) for net in self.networks},
                "stream": f"{self.net_address('A', node.index)}:{stream_port}",
                "status": f"127.0.0.1:{status_port}",
                "esl": {"host": "127.0.0.1", "port": int(node.sim_ports["esl"]["port"]),
                        "password": "ClueCon", "timeout_ms": 1000,
                        "core_db": str(self.db_path(node))}})
            node.status_url = f"http://127.0.0.1:{status_port}/status"
        doc["slot"] = []
        for s in range(1, self.slot_count + 1):
            name, ip, _ = self.slot_profile(s)
            doc["slot"].append({"name": name, "profiles": [name],
                                "ip": [{"address": f"{ip}/24", "interface": "ethC"}]})
        self.config_path.write_text(tomlout.dumps(
            doc, header="written by tests.e2e.netns: a cluster of network namespaces"))
        check = subprocess.run([*FSHA, "check-config", str(self.config_path)],
                               capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            raise HarnessError(f"generated config is invalid: {check.stderr.strip()}")
        from fsha.config import load_config
        from fsha.pki import ensure_cluster_pki

        ensure_cluster_pki(load_config(self.config_path))

    def start_node(self, node: NodeProcesses) -> None:
        argv = ["ip", "netns", "exec", self.ns(node),
                *(["nice", "-n", str(self.nice)] if self.nice else []), *TWISTD, "-n",
                "--pidfile=", "fsha", "--config", str(self.config_path), "--node", node.name]
        with open(node.log_path, "ab") as log:
            node.fsha = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=self.dir)
        node.down_since = None

    # -- observation ---------------------------------------------------------------------

    def status(self, node: NodeProcesses, timeout: float = 1.0) -> dict[str, Any]:
        with in_netns(self.ns(node)):
            with urllib.request.urlopen(node.status_url, timeout=timeout) as response:
                return json.loads(response.read())

    def sim_control(self, name: str, path: str, body: dict[str, Any] | None = None,
                    timeout: float = 30.0) -> dict[str, Any]:
        node = self.node(name)
        ports = node.sim_ports["control"]
        url = f"http://127.0.0.1:{ports['port']}{path}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                         headers={"content-type": "application/json"})
        try:
            with in_netns(self.ns(node)):
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise HarnessError(f"simulator of {name}: {path}: {e.read().decode(errors='replace')}"
                               ) from None

    def held_addresses(self, name: str) -> list[str]:
        """The floating IPs configured on this host's client NIC right now."""
        out = run(["ip", "-n", self.ns(name), "-o", "-4", "addr", "show", "dev", "ethC"]).stdout
        floating = {self.floating_ip(s) for s in range(1, self.slot_count + 1)}
        return sorted(a for line in out.splitlines() for a in
                      [line.split()[3].split("/")[0]] if a in floating)

    def holders(self, slot: int) -> list[str]:
        ip = self.floating_ip(slot)
        return [n.name for n in self.nodes if ip in self.held_addresses(n.name)]

    def wait_status(self, name: str, what: str, check: Any, timeout: float = 30.0) -> Any:
        """Wait until ``check(status of name)`` is true; returns its value."""
        return wait_for(what, lambda: check(self.status(self.node(name))), timeout)

    # -- the client ----------------------------------------------------------------------

    def start_probe(self, duration: float = 60.0, interval: float = 0.01,
                    slots: list[int] | None = None) -> Probe:
        """Start probing the floating IPs (all slots by default) from the client host."""
        if not 0 < duration <= 600:
            raise ValueError("a probe run lasts at most 600 s")
        numbers = slots or list(range(1, self.slot_count + 1))
        targets = [self.floating_ip(s) for s in numbers]
        k = len(self.probes)
        out, stop_file = self.dir / f"probe{k}.jsonl", self.dir / f"probe{k}.stop"
        argv = ["ip", "netns", "exec", self.client_ns, sys.executable, str(PROBE),
                "--out", str(out), "--duration", str(duration), "--interval", str(interval),
                "--stop-file", str(stop_file), *(f"{t}:{self.sip_port}" for t in targets)]
        with open(self.dir / f"probe{k}.err", "ab") as err:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=err,
                                       start_new_session=True)
        probe = Probe(process, out, stop_file, targets)
        self.probes.append(probe)
        wait_for("the prober to start", lambda: out.exists() or process.poll() is not None,
                 timeout=30)
        if process.poll() is not None:
            raise HarnessError(f"the prober exited with {process.returncode}; see "
                               f"{self.dir / f'probe{k}.err'}")
        return probe

    # -- faults --------------------------------------------------------------------------

    def set_link(self, name: str, network: str, up: bool) -> None:
        """Pull (or plug back) node ``name``'s cable on ``network`` ("A", "B", ..., or "C"
        for the client network): the switch's port goes down, the host sees no carrier."""
        port = self.port_name(self.node(name).index, network)
        run(["ip", "-n", self.switch_ns, "link", "set", port, "up" if up else "down"])

    def cut(self, name: str, networks: list[str] | None = None) -> float:
        """Cut node ``name`` off ``networks`` (default: every cluster network); returns when."""
        at = time.time()
        for net in networks or self.networks:
            self.set_link(name, net, False)
        return at

    def mend(self, name: str, networks: list[str] | None = None) -> float:
        at = time.time()
        for net in networks or self.networks:
            self.set_link(name, net, True)
        return at

    def set_nic(self, name: str, network: str, up: bool) -> None:
        """The host's own NIC down/up (``ip link set ethX down`` inside the host)."""
        run(["ip", "-n", self.ns(name), "link", "set", f"eth{network}", "up" if up else "down"])

    def partition(self, minority: list[str], networks: list[str] | None = None) -> float:
        """Split the cluster networks: ``minority`` hosts keep talking among themselves (on an
        island bridge) and to nobody else. Returns the time of the split."""
        at = time.time()
        lines = []
        for net in networks or self.networks:
            island = f"br{net}x"
            if (net, 0) not in self.islands:
                lines += [f"link add {island} type bridge forward_delay 0 stp_state 0",
                          f"link set {island} up"]
                self.islands.add((net, 0))
            lines += [f"link set {self.port_name(self.node(n).index, net)} master {island}"
                      for n in minority]
        _batch(lines, self.switch_ns)
        return at

    def heal(self, networks: list[str] | None = None) -> float:
        """Put every host back on its network's main bridge."""
        at = time.time()
        _batch([f"link set {self.port_name(n.index, net)} master br{net}"
                for net in networks or self.networks for n in self.nodes], self.switch_ns)
        return at

    def kill_host(self, name: str) -> float:
        """kill -9 both fsha and the simulator of ``name``; returns the time of the kill."""
        return self.kill(name, sim_too=True)

    def impair(self, name: str, network: str, *, loss: float = 0.0, delay_ms: float = 0.0,
               jitter_ms: float = 0.0, direction: str = "both") -> None:
        """netem's loss, delay and jitter on node ``name``'s cable on ``network`` (one of the
        cluster's ``emulated`` networks): ``loss`` in 0-1, each frame delayed by
        ``delay_ms`` +- uniform ``jitter_ms``; ``direction`` out (from the host), in or
        both. All zero: a plain cable again. Gone with the cluster."""
        if network not in self.emulated or self.linkemu is None:
            raise HarnessError(f"network {network} is not emulated: build the cluster with "
                               f"emulated=({network!r},)")
        emu = self.linkemu
        assert emu.stdin is not None
        command = {"link": f"{self.node(name).index}{network}", "direction": direction,
                   "loss": loss, "delay_ms": delay_ms, "jitter_ms": jitter_ms}
        emu.stdin.write(json.dumps(command) + "\n")
        emu.stdin.flush()
        answer = self._linkemu_line(10.0)
        if answer != "ok":
            raise HarnessError(f"link emulator: {answer}")

    def link_stats(self) -> dict[str, Any]:
        """Frames each emulated cable carried and dropped, by link ("1A") and direction."""
        emu = self.linkemu
        if emu is None or emu.stdin is None:
            return {}
        emu.stdin.write("stats\n")
        emu.stdin.flush()
        return json.loads(self._linkemu_line(10.0))

    def cpu_hog(self, name: str, seconds: float, workers: int | None = None
                ) -> list[subprocess.Popen[bytes]]:
        """Busy loops inside host ``name`` (one per CPU by default), each ending by itself
        after ``seconds`` (at most 600) and killed at tear-down anyway."""
        if not 0 < seconds <= 600:
            raise ValueError("a CPU hog lasts at most 600 s")
        code = ("import sys, time\nend = time.monotonic() + float(sys.argv[1])\n"
                "while time.monotonic() < end:\n    sum(range(1000))\n")
        hogs = []
        for _ in range(workers or os.cpu_count() or 1):
            hogs.append(subprocess.Popen(["ip", "netns", "exec", self.ns(name), sys.executable,
                                          "-c", code, str(seconds)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, start_new_session=True))
        self.helpers += hogs
        return hogs

    def flap_nic(self, name: str, network: str, period_ms: int = 300, seconds: float = 10.0
                 ) -> subprocess.Popen[bytes]:
        """Host ``name``'s own NIC on ``network`` goes down, then up, then down... changing
        every ``period_ms`` for ``seconds`` (bounded), and is left up. Each change's time is
        a line in ``flap-<name><network>.log``. Wait for it with ``.wait()``."""
        if not 50 <= period_ms <= 10_000 or not 0 < seconds <= 600:
            raise ValueError("period 50-10000 ms, at most 600 s")
        dev, log = f"eth{network}", self.dir / f"flap-{name}{network}.log"
        code = (
            "import subprocess, sys, time\n"
            "dev, period, changes, log = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), "
            "sys.argv[4]\n"
            "start = time.monotonic()\n"
            "with open(log, 'a') as out:\n"
            "    try:\n"
            "        for k in range(changes):\n"
            "            time.sleep(max(0.0, start + k * period - time.monotonic()))\n"
            "            state = 'down' if k % 2 == 0 else 'up'\n"
            "            subprocess.run(['ip', 'link', 'set', dev, state], timeout=5)\n"
            "            out.write('%.6f %s\\n' % (time.time(), state))\n"
            "    finally:\n"
            "        subprocess.run(['ip', 'link', 'set', dev, 'up'], timeout=5)\n"
            "        out.write('%.6f up\\n' % time.time())\n")
        changes = int(seconds * 1000 / period_ms)
        flapper = subprocess.Popen(["ip", "netns", "exec", self.ns(name), sys.executable, "-c",
                                    code, dev, str(period_ms / 1000), str(changes), str(log)],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   start_new_session=True)
        self.helpers.append(flapper)
        self.flapping.append((name, network))
        return flapper

    def flap_log(self, name: str, network: str) -> list[tuple[float, str]]:
        path = self.dir / f"flap-{name}{network}.log"
        text = path.read_text() if path.exists() else ""
        return [(float(t), state) for t, state in (line.split() for line in text.splitlines())]

    def _signal_sim(self, name: str, sig: signal.Signals) -> float:
        """Send ``sig`` to the simulator of ``name``; when (wall clock) it was sent."""
        node = self.node(name)
        assert node.sim is not None
        at = time.time()
        os.kill(node.sim.pid, sig)
        return at

    def stop_sim(self, name: str) -> float:
        """Hang the simulator of ``name`` (SIGSTOP): its sockets stay open, nothing answers."""
        at = self._signal_sim(name, signal.SIGSTOP)
        self.stopped_sims.add(name)
        return at

    def cont_sim(self, name: str) -> float:
        at = self._signal_sim(name, signal.SIGCONT)
        self.stopped_sims.discard(name)
        return at

    def kill_sim(self, name: str) -> float:
        """kill -9 only the simulator (FreeSWITCH) of ``name``."""
        at = self._signal_sim(name, signal.SIGKILL)
        sim = self.node(name).sim
        assert sim is not None
        sim.wait(timeout=10)
        return at

    def kill_when(self, name: str, what: str, check: Any, timeout: float = 30.0,
                  sim_too: bool = True) -> tuple[float, dict[str, Any]]:
        """kill -9 ``name`` (and its simulator) the moment ``check(its status)`` is true,
        e.g. in the middle of a takeover; returns the kill time and the status seen."""
        seen = wait_for(what, lambda: (lambda st: st if check(st) else None)(
            self.status(self.node(name), timeout=0.5)), timeout, interval=0.005)
        return self.kill(name, sim_too=sim_too), seen

    def run_sipp(self, slot: int, calls: int, rate: int, timeout_ms: int = 200,
                 seconds: float = 120.0) -> dict[str, Any]:
        """An independent client: sipp (Debian sip-tester) sends ``calls`` OPTIONS to the
        slot's floating IP at ``rate``/s from the client host, each waiting ``timeout_ms``
        for its 200. Blocks; returns {"exit", "answers": [{"time", "node"}], "failed"}."""
        if not 0 < calls <= 100_000 or not 0 < rate <= 1000:
            raise ValueError("1-100000 calls at 1-1000/s")
        scenario = self.dir / "sipp-options.xml"
        scenario.write_text(SIPP_OPTIONS.replace("TIMEOUT", str(timeout_ms)))
        log = self.dir / f"sipp-{slot}.log"
        log.unlink(missing_ok=True)
        argv = ["ip", "netns", "exec", self.client_ns, "sipp", "-sf", str(scenario),
                "-m", str(calls), "-r", str(rate), "-l", str(rate), "-i", CLIENT_ADDRESS,
                "-p", "5070", "-nostdin", "-trace_logs", "-log_file", str(log),
                "-timeout", f"{int(seconds)}s", "-timeout_error",
                f"{self.floating_ip(slot)}:{self.sip_port}"]
        done = run(argv, timeout=seconds + 30, check=False)
        answers = []
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] == "answered":
                answers.append({"time": float(parts[1]) + float(parts[2]) / 1e6,
                                "node": parts[3]})
        return {"exit": done.returncode, "answers": answers, "calls": calls,
                "failed": calls - len(answers), "stderr": done.stderr[-2000:]}

    # -- tear-down -----------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        for probe in self.probes:
            if probe.process.poll() is None:
                probe.process.kill()
                probe.process.wait(timeout=10)
        for helper in self.helpers:  # CPU hogs, NIC flappers
            if helper.poll() is None:
                helper.kill()
                helper.wait(timeout=10)
        for name in list(self.stopped_sims):  # a stopped process would ignore SIGTERM
            try:
                self.cont_sim(name)
            except (ProcessLookupError, AssertionError):
                pass
        if self.linkemu is not None and self.linkemu.poll() is None:
            self.linkemu.terminate()
            try:
                self.linkemu.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.linkemu.kill()
                self.linkemu.wait(timeout=10)
        keep = self.keep
        self.keep = True  # the parent must not remove the logs before we are done
        try:
            super().close()
        finally:
            self.keep = keep
            if self._built:
                delete_namespaces(self.prefix)
            _live.pop(self.prefix, None)
            if not keep:
                shutil.rmtree(self.dir, ignore_errors=True)

    def all_logs(self, lines: int = 60) -> str:
        out = []
        for node in self.nodes:
            out.append(f"--- {node.name} fsha\n{self.logs(node.name, lines)}")
            text = node.sim_log_path.read_text(errors="replace") \
                if node.sim_log_path.exists() else ""
            out.append(f"--- {node.name} sim\n" + "\n".join(text.splitlines()[-lines // 3:]))
        return "\n".join(out)
