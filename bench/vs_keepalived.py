"""fsha and keepalived side by side on the same namespaced hosts (``bench/failover_netns.py
--vs-keepalived``).

Each round builds the same topology (tests/e2e/netns.py: 3 hosts, cluster networks A and
B, a client host probing the floating IP of slot1 with SIP OPTIONS every 10 ms) once per
system, in alternation, so both see the same load:

- ``fsha``: fsha with the ``ip`` backend, its simulators serving the slots (``--profiles
  hot_standby``: every simulator runs the slots' profiles all the time, as keepalived's
  do, and fsha's ``[takeover] profiles = "hot_standby"`` starts none at takeover);
- ``keepalived-0.01`` / ``keepalived-0.1``: keepalived (Debian's package) on every host,
  VRRPv3 unicast over network A (advert 0.01 s, its floor, and 0.1 s), priorities 150 / 100
  / 50, the floating IP on the client NIC; every host's simulator serves the profile all
  the time (bound to the floating IP with ``ip_nonlocal_bind``): keepalived's best case, it
  has nothing to start.

Idle: the master host (its fsha or keepalived and its simulator) is ``kill -9``ed; the
outage is the client's longest gap. Stress (scenario 6 with both cluster networks
impaired): 5 % loss and 20 +- 20 ms delay between any two hosts on A and on B and a CPU
hog per core, for ``--soak`` seconds, nobody killed: false takeovers (fsha: a ``claim`` by
another node than the slot's holder; keepalived: a backup "Entering MASTER STATE") and the
client's longest gap. The load average (1 min) is recorded beside every figure.

The impairment is set on each host's cable in the ``out`` direction only: a frame crosses
two cables (its sender's, then its receiver's), so impairing both directions would give
every path about 10 % loss and 40 +- 40 ms one way, a round trip of up to 160 ms. fsha's
lease (``dead_after - interval / 2``: 90 ms at 20/100, counted from the send time of a
heartbeat a quorum echoed) cannot be renewed over such round trips, so every master let
its slot go and claimed it again every ~150 ms (``lease-expired`` then a ``claim`` by the
same node: the 19 "false takeovers" of the first run; on a fake clock, the same with or
without the deadline tick and the drain). fsha's stress is counted from the nodes' whole
logs, by kind (``peer_down``, ``lease_expired``, ``reclaims``) beside the takeovers.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from fsha.harness import FSHA, HarnessError, wait_for
from tests.e2e.netns import NetnsCluster, outage

SYSTEMS = ("fsha", "keepalived-0.01", "keepalived-0.1")
VRID = 51


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"p50": round(statistics.median(values), 1),
            "p90": round(percentile(values, 0.9), 1),
            "p99": round(percentile(values, 0.99), 1), "max": round(max(values), 1)}


class KeepalivedCluster(NetnsCluster):
    """The NetnsCluster topology with keepalived in place of fsha."""

    def __init__(self, advert: float, **kw: Any) -> None:
        super().__init__(nodes=3, slots=1, **kw)
        self.advert = advert
        self.keepalived: dict[str, subprocess.Popen[bytes]] = {}

    def start_sim(self, node: Any) -> None:
        # the profile runs all the time on every host (hot standby: nothing to start)
        ready = self.dir / f"{node.name}-sim.ready"
        ready.unlink(missing_ok=True)
        name, ip, port = self.slot_profile(1)
        argv = ["ip", "netns", "exec", self.ns(node), *FSHA, "sim", "--name", node.name,
                "--esl", "127.0.0.1:0", "--control", "127.0.0.1:0",
                "--ready-file", str(ready), "--profile", f"{name}={ip}:{port}"]
        with open(node.sim_log_path, "ab") as log:
            node.sim = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def config_for(self, node: Any) -> str:
        me = self.net_address("A", node.index)
        peers = "\n".join(f"    {self.net_address('A', n.index)}" for n in self.nodes
                          if n is not node)
        priority = {1: 150, 2: 100}.get(node.index, 50)
        return f"""global_defs {{
  router_id {node.name}
  vrrp_version 3
  vrrp_garp_master_delay 0
  vrrp_garp_master_repeat 3
}}
vrrp_instance slot1 {{
  state BACKUP
  interface ethA
  virtual_router_id {VRID}
  priority {priority}
  advert_int {self.advert}
  unicast_src_ip {me}
  unicast_peer {{
{peers}
  }}
  virtual_ipaddress {{
    {self.floating_ip(1)}/24 dev ethC
  }}
}}
"""

    def start(self, timeout: float = 60.0) -> None:
        self.build()
        for node in self.nodes:
            self.start_sim(node)
        for node in self.nodes:
            self.wait_sim(node, timeout)
        for node in self.nodes:
            conf = self.dir / f"keepalived-{node.name}.conf"
            conf.write_text(self.config_for(node))
            argv = ["ip", "netns", "exec", self.ns(node), "keepalived", "--dont-fork",
                    "--log-console", "--log-detail", "--vrrp", "-f", str(conf),
                    "-p", str(self.dir / f"ka-{node.name}.pid"),
                    "-r", str(self.dir / f"ka-vrrp-{node.name}.pid")]
            with open(self.dir / f"keepalived-{node.name}.log", "ab") as log:
                self.keepalived[node.name] = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True)

    def holder(self) -> str | None:
        """The host that has the floating IP on its client NIC (one of them, if several)."""
        for node in self.nodes:
            out = subprocess.run(["ip", "-n", self.ns(node), "-o", "addr", "show", "dev",
                                  "ethC"], capture_output=True, text=True, timeout=10).stdout
            if f" {self.floating_ip(1)}/" in out:
                return node.name
        return None

    def kill_host(self, name: str) -> float:
        """kill -9 keepalived (its parent and VRRP child at once) and the simulator."""
        at = time.time()
        os.killpg(self.keepalived[name].pid, signal.SIGKILL)
        node = self.node(name)
        if node.sim is not None:
            os.kill(node.sim.pid, signal.SIGKILL)
        self.keepalived[name].wait(timeout=10)
        return at

    def masters_entered(self, name: str) -> int:
        path = self.dir / f"keepalived-{name}.log"
        return path.read_text(errors="replace").count("Entering MASTER STATE")

    def close(self) -> None:
        for p in self.keepalived.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        super().close()


def _serving(cluster: NetnsCluster, ip: str, node: str, probe: Any) -> None:
    wait_for(f"the client to reach {node}", lambda: probe.last_node(ip) == node, 30)
    wait_for("50 answers", lambda: len(probe.answers_for(ip)) >= 50, 20)


def idle_trial(system: str, interval_ms: int, dead_after_ms: int,
               dead_after_min_ms: int | None = None, hot_standby: bool = False
               ) -> dict[str, float]:
    load = os.getloadavg()[0]
    if system == "fsha":
        # the same trial as failover_netns.py's, with its phases (where the time goes)
        from bench.failover_netns import trial

        r = trial(interval_ms, dead_after_ms, dead_after_min_ms, hot_standby=hot_standby)
        return {"outage_ms": r["downtime_ms"], "load1": load,
                **{k: r[k] for k in PHASES if k in r}}
    advert = float(system.rpartition("-")[2])
    with KeepalivedCluster(advert) as ka:
        ka.start()
        wait_for("keepalived to elect fs1", lambda: ka.holder() == "fs1", 30)
        ip = ka.floating_ip(1)
        probe = ka.start_probe(duration=60)
        _serving(ka, ip, "fs1", probe)
        killed = ka.kill_host("fs1")
        wait_for("fs2 to answer", lambda: probe.last_node(ip) == "fs2", 30)
        wait_for("20 answers", lambda: len(probe.answers_for(ip, killed)) >= 20, 20)
        probe.stop()
        gap, _ = outage(probe.answers_for(ip), killed)
        return {"outage_ms": gap * 1000, "load1": load}


#: fsha's phases kept from each idle trial (bench/failover_netns.py)
PHASES = ("detection_ms", "agreement_ms", "acquire_ms", "first_answer_ms",
          "bound_before_kill_ms", "false_peer_down")


def stress_run(system: str, seconds: float, interval_ms: int, dead_after_ms: int,
               dead_after_min_ms: int | None = None, hot_standby: bool = False
               ) -> dict[str, float]:
    """Scenario 6 on both cluster networks: nobody killed; what moved, the longest gap."""
    impaired = ("A", "B")
    # FSHA_BENCH_KEEP=1: the soak's logs are kept (their folder is printed), to read what
    # moved and why
    keep = os.environ.get("FSHA_BENCH_KEEP") == "1"
    if system == "fsha":
        cluster: NetnsCluster = NetnsCluster(nodes=3, slots=2, interval_ms=interval_ms,
                                             dead_after_ms=dead_after_ms,
                                             dead_after_min_ms=dead_after_min_ms,
                                             emulated=impaired, hot_standby=hot_standby,
                                             keep=keep)
        if keep:
            print(f"stress fsha: logs kept in {cluster.dir}", flush=True)
    else:
        cluster = KeepalivedCluster(float(system.rpartition("-")[2]), emulated=impaired)
    with cluster:
        cluster.start(timeout=60)
        if isinstance(cluster, KeepalivedCluster):
            wait_for("keepalived to elect fs1", lambda: cluster.holder() == "fs1", 30)
            owner = "fs1"
        else:
            view = cluster.wait_converged(timeout=60)
            owner = {s["name"]: s["owner"] for s in view["slots"]}["slot1"]
        ip = cluster.floating_ip(1)
        probe = cluster.start_probe(duration=seconds + 60, slots=[1])
        _serving(cluster, ip, owner, probe)
        before = _moves(cluster)
        counted = fsha_counts(_fsha_logs(cluster)) if not isinstance(
            cluster, KeepalivedCluster) else {}
        for node in cluster.nodes:
            for net in impaired:
                # one impaired hop per path (see the module docstring)
                cluster.impair(node.name, net, loss=0.05, delay_ms=20, jitter_ms=20,
                               direction="out")
        start = time.time()
        hogs = cluster.cpu_hog(cluster.nodes[-1].name, seconds)
        loads = []

        def soaked() -> bool:
            loads.append(os.getloadavg()[0])
            return all(h.poll() is not None for h in hogs)
        wait_for("the soak to end", soaked, timeout=seconds + 60, interval=1.0)
        end = time.time()
        links = cluster.link_stats()
        for node in cluster.nodes:
            for net in impaired:
                cluster.impair(node.name, net)
        probe.stop()
        answers = [a for a in probe.answers_for(ip, start) if a["received"] <= end]
        gap, _ = outage(answers, start)
        expected = (end - start) / 0.01
        frames = sum(d["frames"] for link in links.values() for d in link.values())
        dropped = sum(d["dropped"] for link in links.values() for d in link.values())
        result = {"false_takeovers": float(_moves(cluster) - before),
                  "longest_gap_ms": gap * 1000,
                  "unanswered_pct": max(0.0, 100 * (1 - len(answers) / expected)),
                  "dropped_pct": 100 * dropped / frames if frames else 0.0,
                  "load1": statistics.mean(loads) if loads else os.getloadavg()[0]}
        if not isinstance(cluster, KeepalivedCluster):
            after = fsha_counts(_fsha_logs(cluster))
            result.update({k: float(after[k] - counted[k]) for k in after
                           if k != "takeovers"})
        return result


_CLAIM = re.compile(r"\] claiming slot \S+ with epoch \d+ \(previous master: (\S+)\)")


def fsha_counts(logs: dict[str, str]) -> dict[str, int]:
    """What fsha did, from every node's whole log (``logs``: node name to text; the status
    keeps only each node's last 100 events, a second or two of this stress): ``takeovers``
    (a claim of a slot whose previous master is another node), ``reclaims`` (a node claiming
    again the slot it let go itself: no other node took anything over), ``lease_expired``
    and ``peer_down`` (node-local verdicts). First claims (no previous master) are none of
    these."""
    counts = dict.fromkeys(("takeovers", "reclaims", "lease_expired", "peer_down"), 0)
    for node, text in logs.items():
        for line in text.splitlines():
            m = _CLAIM.search(line)
            if m:
                if m.group(1) == node:
                    counts["reclaims"] += 1
                elif m.group(1) != "none":
                    counts["takeovers"] += 1
            elif ": lease expired: " in line:
                counts["lease_expired"] += 1
            elif "] peer " in line and " is down: " in line:
                counts["peer_down"] += 1
    return counts


def _fsha_logs(cluster: NetnsCluster) -> dict[str, str]:
    return {n.name: n.log_path.read_text(errors="replace") if n.log_path.exists() else ""
            for n in cluster.nodes}


def _moves(cluster: NetnsCluster) -> int:
    if isinstance(cluster, KeepalivedCluster):
        # fs1 entering MASTER once at start is the election; any other entry is a move
        return sum(cluster.masters_entered(n.name) for n in cluster.nodes) - 1
    return fsha_counts(_fsha_logs(cluster))["takeovers"]


def run(rounds: int, soak: float, interval_ms: int, dead_after_ms: int,
        dead_after_min_ms: int | None = None, hot_standby: bool = False) -> dict[str, Any]:
    if subprocess.run(["sh", "-c", "command -v keepalived"], capture_output=True,
                      timeout=10).returncode != 0:
        return {"benchmark": "failover_netns_vs_keepalived",
                "skipped": "keepalived is not installed (Debian: keepalived)"}
    idle: dict[str, list[dict[str, float]]] = {s: [] for s in SYSTEMS}
    failures: dict[str, int] = dict.fromkeys(SYSTEMS, 0)
    for n in range(1, rounds + 1):
        for system in SYSTEMS:  # alternating: each round runs every system once
            try:
                r = idle_trial(system, interval_ms, dead_after_ms, dead_after_min_ms,
                               hot_standby)
            except (HarnessError, StopIteration) as e:
                failures[system] += 1
                print(f"round {n} {system}: FAILED: {e}", flush=True)
                continue
            idle[system].append(r)
            phases = ", ".join(f"{k} {r[k]:.1f}" for k in PHASES if k in r)
            print(f"round {n} {system}: outage {r['outage_ms']:.1f} ms, load {r['load1']:.2f}"
                  + (f", {phases}" if phases else ""), flush=True)
    stress: dict[str, dict[str, float]] = {}
    if soak > 0:
        for system in SYSTEMS:
            try:
                stress[system] = {k: round(v, 2) for k, v in
                                  stress_run(system, soak, interval_ms, dead_after_ms,
                                             dead_after_min_ms, hot_standby).items()}
            except (HarnessError, StopIteration) as e:
                print(f"stress {system}: FAILED: {e}", flush=True)
                continue
            print(f"stress {system}: {stress[system]}", flush=True)
    out: dict[str, Any] = {"benchmark": "failover_netns_vs_keepalived", "rounds": rounds,
                           "soak_s": soak, "heartbeat_interval_ms": interval_ms,
                           "dead_after_ms": dead_after_ms,
                           "dead_after_min_ms": dead_after_min_ms, "probe_interval_ms": 10,
                           "fsha_profiles": "hot_standby" if hot_standby else "classic",
                           "goal": {"idle_p50_ms": 50, "idle_p99_ms": 80,
                                    "stress_false_takeovers": 0}}
    for system in SYSTEMS:
        values = [r["outage_ms"] for r in idle[system]]
        loads = [r["load1"] for r in idle[system]]
        out[system] = {"idle_outage_ms": summary(values), "failed_trials": failures[system],
                       **{f"idle_{k}": summary([r[k] for r in idle[system] if k in r])
                          for k in PHASES if any(k in r for r in idle[system])},
                       "idle_load1": [round(min(loads), 2), round(max(loads), 2)]
                       if loads else None, "stress": stress.get(system)}
    return out


if __name__ == "__main__":  # pragma: no cover - run through failover_netns.py
    sys.exit("run bench/failover_netns.py --vs-keepalived")
