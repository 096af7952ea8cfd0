"""A real cluster on loopback: separate fsha and simulator processes, for the demo and tests.

Every node gets its own addresses in 127.0.0.0/8 (network A 127.0.1.N, network B 127.0.2.N,
its simulator's ESL on 127.0.3.N, floating IPs 127.0.10.S) and free ports, so several
clusters can run side by side. Everything runs as child processes of this one, and
``close()`` (or leaving the ``with`` block, also on Ctrl-C) ends every one of them.

This is driver code, not node code: it uses plain ``subprocess`` and blocking HTTP polls,
each with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from fsha import tomlout

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
FSHA = [sys.executable, "-m", "fsha"]
# The [tls] table of generated configs: the per-node files of fsha.pki, relative to the
# config's directory.
TLS_FILES = {"ca": "pki/ca.crt", "cert": "pki/{node}.crt", "key": "pki/{node}.key"}


class HarnessError(Exception):
    pass


def _free_port(kind: int, hosts: list[str]) -> int:
    """A port free on every one of ``hosts`` (each node binds its own address)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        if port < 20000:
            continue  # stay clear of ports conventionally used by services
        try:
            for host in hosts:
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise HarnessError("no free port found on " + ", ".join(hosts))


# The one way tests, the demo and the benchmarks wait: poll a condition until it holds, with
# a deadline. ``wait_for`` blocks (driver code: processes, namespaces); ``poll_until`` is its
# Deferred twin for code running in the reactor. Same semantics: the first true value is the
# result; OSError, ValueError and KeyError from the condition count as "not yet" (a process
# not answering yet) and the last one is quoted if time runs out.
_NOT_YET = (OSError, ValueError, KeyError)


class ConditionTimeout(HarnessError, AssertionError):
    """A condition did not hold in time: a failed expectation (an AssertionError to test
    runners), and a HarnessError to the demo and the benchmarks."""

    def __init__(self, what: str, timeout: float, last_error: Exception | None) -> None:
        extra = f" (last error: {last_error!r})" if last_error is not None else ""
        super().__init__(f"timed out after {timeout:.1f}s waiting for {what}{extra}")


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.01
             ) -> Any:
    """Poll ``check`` until it returns something true, and return that; ConditionTimeout
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except _NOT_YET as e:
            last_error = e
        if time.monotonic() > deadline:
            raise ConditionTimeout(what, timeout, last_error)
        time.sleep(interval)  # the poll interval of a condition wait


def poll_until(condition: Callable[[], Any], what: str, timeout: float = 30.0,
               interval: float = 0.01, *, clock: IReactorTime) -> Deferred[Any]:
    """``wait_for`` in the reactor: fires with ``condition()``'s first true value, polled
    every ``interval`` on ``clock`` (required: the test's reactor or ``Clock``), or fails
    with ConditionTimeout after ``timeout``."""
    end = clock.seconds() + timeout
    last_error: Exception | None = None
    next_poll: list[IDelayedCall] = []

    def cancel(_: Deferred[Any]) -> None:
        if next_poll and next_poll[0].active():
            next_poll[0].cancel()

    done: Deferred[Any] = Deferred(cancel)

    def poll() -> None:
        nonlocal last_error
        try:
            value = condition()
        except _NOT_YET as e:
            last_error, value = e, None
        except Exception:
            done.errback()
            return
        if value:
            done.callback(value)
        elif clock.seconds() > end:
            done.errback(ConditionTimeout(what, timeout, last_error))
        else:
            next_poll[:] = [clock.callLater(interval, poll)]

    poll()
    return done


@dataclass
class NodeProcesses:
    name: str
    index: int
    log_path: Path
    sim_log_path: Path
    fsha: subprocess.Popen[bytes] | None = None
    sim: subprocess.Popen[bytes] | None = None
    sim_ports: dict[str, Any] = field(default_factory=dict)
    status_url: str = ""
    down_since: float | None = None  # killed or stopped on purpose at this time


class LoopbackCluster:
    """``nodes`` nodes, ``slots`` slots, two networks, each node with its own simulator."""

    def __init__(self, nodes: int = 3, slots: int = 2, *, interval_ms: int = 20,
                 dead_after_ms: int = 100, workdir: Path | None = None,
                 keep: bool = False, json_logs: bool = False, extra_config: str = "",
                 sim_args: Sequence[str] = (), esl_timeout_ms: int = 1000) -> None:
        if not 1 <= slots <= nodes <= 200:
            raise ValueError("need 1 <= slots <= nodes <= 200")
        self.node_count, self.slot_count = nodes, slots
        self.interval_ms, self.dead_after_ms = interval_ms, dead_after_ms
        self.esl_timeout_ms = esl_timeout_ms  # each node's [node.esl] timeout_ms
        self.keep = keep or workdir is not None
        self.json_logs = json_logs
        self.extra_config = extra_config  # TOML appended to the config (e.g. [limits])
        self.sim_args = list(sim_args)  # more arguments of every `fsha sim`
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fsha-demo-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "cluster.toml"
        self.nodes = [NodeProcesses(f"fs{i}", i, self.dir / f"fs{i}.log",
                                    self.dir / f"fs{i}-sim.log") for i in range(1, nodes + 1)]
        self._closed = False
        # The slots' SIP port: free on every floating IP (not 5060: clusters may run side
        # by side, e.g. the tests and a demo).
        self.sip_port = _free_port(socket.SOCK_DGRAM,
                                   [f"127.0.10.{s}" for s in range(1, slots + 1)])

    # -- set-up ---------------------------------------------------------------------------

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def address(self, network: int, node: int) -> str:
        return f"127.0.{network}.{node}"

    def start(self, timeout: float = 30.0) -> None:
        """Start every simulator, write the config, start every node."""
        for node in self.nodes:
            self.start_sim(node)
        for node in self.nodes:
            self.wait_sim(node, timeout)
        self.write_config()
        for node in self.nodes:
            self.start_node(node)

    def db_path(self, node: NodeProcesses) -> Path:
        """The node's core DB, in its own db dir (each FreeSWITCH keeps its profiles'
        registration databases, ``sofia_reg_<profile>.db``, beside it)."""
        folder = self.dir / f"{node.name}-db"
        folder.mkdir(exist_ok=True)
        return folder / "core.db"

    def slot_profile(self, slot: int) -> tuple[str, str, int]:
        return f"slot{slot}", f"127.0.10.{slot}", self.sip_port

    def start_sim(self, node: NodeProcesses) -> None:
        ready = self.dir / f"{node.name}-sim.ready"
        ready.unlink(missing_ok=True)
        # A restarted simulator takes the ports of its first run: the config names them.
        # --profile-guard 0: all these "hosts" share one kernel, so a profile a releasing
        # node may not stop yet (FreeSWITCH's 10 s rule) would keep the floating IP's SIP
        # port from the next node; on real hosts the address itself moves.
        esl_port = node.sim_ports.get("esl", {}).get("port", 0)
        control_port = node.sim_ports.get("control", {}).get("port", 0)
        argv = [*FSHA, "sim", "--name", node.name,
                "--esl", f"{self.address(3, node.index)}:{esl_port}",
                "--password", "ClueCon", "--db", str(self.db_path(node)),
                "--control", f"{self.address(3, node.index)}:{control_port}",
                "--ready-file", str(ready), "--profile-guard", "0", *self.sim_args]
        for s in range(1, self.slot_count + 1):
            name, ip, port = self.slot_profile(s)
            argv += ["--define-profile", f"{name}={ip}:{port}"]
        with open(node.sim_log_path, "ab") as log:
            node.sim = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_sim(self, node: NodeProcesses, timeout: float) -> None:
        ready = self.dir / f"{node.name}-sim.ready"

        def read() -> dict[str, Any] | None:
            assert node.sim is not None
            if node.sim.poll() is not None:
                raise HarnessError(f"simulator of {node.name} exited with {node.sim.returncode}"
                                   f"; see {node.sim_log_path}")
            return json.loads(ready.read_text()) if ready.exists() else None
        node.sim_ports = wait_for(f"simulator of {node.name}", read, timeout)

    def write_config(self) -> None:
        secret = self.dir / "cluster.secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(24).hex().encode())
        a_hosts = [self.address(1, n.index) for n in self.nodes]
        b_hosts = [self.address(2, n.index) for n in self.nodes]
        port_a = _free_port(socket.SOCK_DGRAM, a_hosts)
        port_b = _free_port(socket.SOCK_DGRAM, b_hosts)
        stream_port = _free_port(socket.SOCK_STREAM, a_hosts)
        status_port = _free_port(socket.SOCK_STREAM, a_hosts)
        nodes = []
        for node in self.nodes:
            a, b = self.address(1, node.index), self.address(2, node.index)
            nodes.append({
                "name": node.name, "priority": 100 if node.index <= self.slot_count else 50,
                "address": {"A": a, "B": b}, "stream": f"{a}:{stream_port}",
                "status": f"{a}:{status_port}",
                "esl": {"host": node.sim_ports["esl"]["host"],
                        "port": int(node.sim_ports["esl"]["port"]), "password": "ClueCon",
                        "timeout_ms": self.esl_timeout_ms, "core_db": str(self.db_path(node))}})
            node.status_url = f"http://{a}:{status_port}/status"
        slots = []
        for s in range(1, self.slot_count + 1):
            name, ip, _ = self.slot_profile(s)
            slots.append({"name": name, "profiles": [name],
                          "ip": [{"address": f"{ip}/32", "interface": "lo"}]})
        text = tomlout.dumps({
            "cluster": {"name": "demo", "secret_file": str(secret),
                        "heartbeat_interval_ms": self.interval_ms,
                        "dead_after_ms": self.dead_after_ms, "quorum": "majority"},
            "floating_ip": {"backend": "loopback"},
            "state": {"dir": "state/{node}"},
            "tls": TLS_FILES,
            "network": [{"name": "A", "port": port_a}, {"name": "B", "port": port_b}],
            "node": nodes, "slot": slots,
        }, header="written by fsha.harness: a loopback cluster")
        # extra_config: TOML text from the caller, tables only ([limits], [redis]...)
        self.config_path.write_text(text + "\n" + self.extra_config)
        check = subprocess.run([*FSHA, "check-config", str(self.config_path)],
                               capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            raise HarnessError(f"generated config is invalid: {check.stderr.strip()}")
        from fsha.config import load_config
        from fsha.pki import ensure_cluster_pki

        ensure_cluster_pki(load_config(self.config_path))  # a throwaway cluster CA

    def start_node(self, node: NodeProcesses) -> None:
        logger = ["--logger=fsha.logs.json"] if self.json_logs else []
        argv = [*TWISTD, "-n", "--pidfile=", *logger, "fsha", "--config",
                str(self.config_path), "--node", node.name]
        with open(node.log_path, "ab") as log:
            node.fsha = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=self.dir)
        node.down_since = None

    # -- observation ----------------------------------------------------------------------

    def status(self, node: NodeProcesses, timeout: float = 1.0) -> dict[str, Any]:
        with urllib.request.urlopen(node.status_url, timeout=timeout) as response:
            return json.loads(response.read())

    def running(self) -> list[NodeProcesses]:
        return [n for n in self.nodes if n.fsha is not None and n.fsha.poll() is None]

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {n.name: self.status(n) for n in self.running()}

    def converged(self) -> dict[str, Any] | None:
        """The agreed view if every running node agrees and every slot is mastered."""
        statuses = self.statuses()
        for node in self.nodes:
            if node.fsha is not None and node.fsha.poll() is not None and node.down_since is None:
                raise HarnessError(f"{node.name} exited with {node.fsha.returncode}; "
                                   f"see {node.log_path}")
        if not statuses:
            return None
        views = {s["view_digest"] for s in statuses.values()}
        owners = {tuple((sl["name"], sl["owner"]) for sl in s["slots"])
                  for s in statuses.values()}
        if len(views) != 1 or len(owners) != 1:
            return None
        first = next(iter(statuses.values()))
        if any(sl["owner"] is None for sl in first["slots"]):
            return None
        if any(s["role"] not in ("master", "slave") for s in statuses.values()):
            return None
        return first

    def wait_converged(self, timeout: float = 30.0) -> dict[str, Any]:
        return wait_for("the cluster to agree on its roles", self.converged, timeout)

    def owner(self, slot: str) -> str | None:
        view = self.converged()
        if view is None:
            return None
        return next(s["owner"] for s in view["slots"] if s["name"] == slot)

    def node(self, name: str) -> NodeProcesses:
        return next(n for n in self.nodes if n.name == name)

    def sim_control(self, name: str, path: str, body: dict[str, Any] | None = None,
                    timeout: float = 30.0) -> dict[str, Any]:
        """Call the node's simulator control API (GET without a body, POST with one)."""
        ports = self.node(name).sim_ports["control"]
        url = f"http://{ports['host']}:{ports['port']}{path}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise HarnessError(f"simulator of {name}: {path}: {e.read().decode(errors='replace')}"
                               ) from None

    # -- faults -----------------------------------------------------------------------------

    def kill(self, name: str, sim_too: bool = False) -> float:
        """kill -9 the node's fsha (and its simulator); returns the time of the kill."""
        node = self.node(name)
        assert node.fsha is not None
        node.down_since = time.time()
        os.kill(node.fsha.pid, signal.SIGKILL)
        if sim_too and node.sim is not None:
            os.kill(node.sim.pid, signal.SIGKILL)
        node.fsha.wait(timeout=10)
        return node.down_since

    def restart(self, name: str) -> None:
        node = self.node(name)
        if node.sim is None or node.sim.poll() is not None:
            self.start_sim(node)
            self.wait_sim(node, 30)
        self.start_node(node)

    def stop(self, name: str, timeout: float = 10.0) -> None:
        node = self.node(name)
        if node.fsha is not None and node.fsha.poll() is None:
            node.down_since = time.time()
            node.fsha.send_signal(signal.SIGTERM)
            node.fsha.wait(timeout=timeout)

    # -- tear-down ------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        procs = [p for n in self.nodes for p in (n.fsha, n.sim) if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self, name: str, lines: int = 40) -> str:
        node = self.node(name)
        text = node.log_path.read_text(errors="replace") if node.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
