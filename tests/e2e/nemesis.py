"""A randomized nemesis (Jepsen style) for a namespaced cluster, and its checker.

The nemesis injects random faults, one at a time, each healed before the next: symmetric
partitions, one-way losses (``ip rule ... blackhole`` inside the receiving host),
nontransitive partitions (one pair cut, the third node hearing both), a node cut off every
cluster network, ``kill -9`` of fsha and a restart, ``SIGSTOP``/``SIGCONT`` of fsha, and a
config rollout step (one node restarted with the other of two config files). Meanwhile a
:class:`HolderSampler` reads ``ip addr`` on every host and keeps the longest stretch
during which one floating IP was on two hosts whose fsha runs.

What a killed or frozen fsha leaves on its host (its addresses stay up) is the
out-of-process guard's and the start-up clean-up's concern (issue 11, rows 4-5), not this
one's: hosts whose fsha is dead, stopped or restarting (until its node has started: the
clean-up runs before that), and for a short grace after it runs again, are left out of
the check.

Used by ``tests/e2e/test_nemesis.py`` (a short run) and ``bench/nemesis.py`` (``tox -e
nemesis``: minutes, one JSON line).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fsha.harness import wait_for
from tests.e2e.netns import NetnsCluster, run

SAMPLER_LIMIT = 900.0  # every sampler stops by itself after this
RESUME_GRACE = 0.2  # a resumed fsha is checked again after this (its lease verdict)
FAULTS = ("partition", "one-way", "nontransitive", "isolate", "kill", "pause", "rollout")


class HolderSampler:
    """Reads the floating IPs held by every host, over and over, in a thread, and keeps
    the longest stretch during which one IP was on two checked hosts (a stretch starts at
    the sample before the first doubled one: the resolution is one sample)."""

    def __init__(self, cluster: NetnsCluster, excluded: Any = None) -> None:
        self.cluster = cluster
        self.excluded = excluded or (lambda: set())  # () -> names not to check now
        self.samples = 0
        self.worst = 0.0  # seconds
        self.two_holder_seconds = 0.0
        self.doubled: list[tuple[float, int, list[str]]] = []  # (when, slot, holders)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cluster = self.cluster
        since: dict[int, float] = {}
        previous = time.time()
        deadline = time.monotonic() + SAMPLER_LIMIT
        while not self._stop.is_set() and time.monotonic() < deadline:
            skip = set(self.excluded())
            try:
                held = {n.name: cluster.held_addresses(n.name) for n in cluster.nodes
                        if n.name not in skip}
            except Exception:  # the cluster is being torn down
                break
            if skip & set(self.excluded()) != skip:
                previous = time.time()
                continue  # a host changed state while sampled: not a clean sample
            now = time.time()
            self.samples += 1
            doubled_now = False
            for slot in range(1, cluster.slot_count + 1):
                ip = cluster.floating_ip(slot)
                holders = [name for name, ips in held.items() if ip in ips]
                if len(holders) > 1:
                    doubled_now = True
                    start = since.setdefault(slot, previous)
                    self.worst = max(self.worst, now - start)
                    self.doubled.append((now, slot, holders))
                else:
                    since.pop(slot, None)
            if doubled_now:
                self.two_holder_seconds += now - previous
            previous = now

    def stop(self) -> float:
        """Stop sampling; the worst stretch with two holders, in seconds."""
        self._stop.set()
        self._thread.join(timeout=10)
        return self.worst


def _move_local_rule(cluster: NetnsCluster, host: str) -> None:
    ns = cluster.ns(host)
    if run(["ip", "-n", ns, "rule", "show"]).stdout.startswith("0:"):
        run(["ip", "-n", ns, "rule", "add", "pref", "100", "table", "local"])
        run(["ip", "-n", ns, "rule", "del", "pref", "0"])


def drop_from(cluster: NetnsCluster, receiver: str, sender: str) -> None:
    """``receiver`` stops receiving anything ``sender`` sends on the cluster networks
    (``sender`` still hears ``receiver``): policy rules blackholing the sender's
    addresses, ahead of the ``local`` table (moved after them)."""
    _move_local_rule(cluster, receiver)
    index = cluster.node(sender).index
    for net in cluster.networks:
        run(["ip", "-n", cluster.ns(receiver), "rule", "add", "pref", "10", "from",
             cluster.net_address(net, index), "blackhole"])


def restore_from(cluster: NetnsCluster, receiver: str, sender: str) -> None:
    index = cluster.node(sender).index
    for net in cluster.networks:
        run(["ip", "-n", cluster.ns(receiver), "rule", "del", "pref", "10", "from",
             cluster.net_address(net, index), "blackhole"])


@dataclass
class Nemesis:
    """Random faults on ``cluster``, one at a time; see the module docstring."""

    cluster: NetnsCluster
    seed: int
    fault_seconds: tuple[float, float] = (0.5, 2.0)
    injected: Counter[str] = field(default_factory=Counter)
    paused: set[str] = field(default_factory=set)
    restarting: set[str] = field(default_factory=set)
    resumed_at: dict[str, float] = field(default_factory=dict)
    log: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        old = self.cluster.config_path
        self.configs = [old, old.with_name("cluster-rollout.toml")]
        self.configs[1].write_text(old.read_text().replace(
            'quorum = "majority"', 'quorum = "majority"\ndiscovery_ms = 150'))
        self.config_of = {n.name: 0 for n in self.cluster.nodes}

    def excluded(self) -> set[str]:
        """Hosts not to check now: fsha dead, stopped, or resumed a moment ago."""
        now = time.time()
        out = self.paused | self.restarting
        for node in self.cluster.nodes:
            if node.fsha is None or node.fsha.poll() is not None:
                out.add(node.name)
            if now - self.resumed_at.get(node.name, 0.0) < RESUME_GRACE:
                out.add(node.name)
        return out

    def names(self) -> list[str]:
        return [n.name for n in self.cluster.nodes]

    def step(self) -> str:
        """Inject one random fault, keep it a random while, heal it."""
        cluster, rng = self.cluster, self.rng
        kind = rng.choice(FAULTS)
        a, b = rng.sample(self.names(), 2)
        hold = rng.uniform(*self.fault_seconds)
        self.log.append((time.time(), f"{kind} {a} {b} {hold:.2f}s"))
        if kind == "partition":
            cluster.partition([a])
            time.sleep(hold)  # the fault's duration (sampled meanwhile)
            cluster.heal()
        elif kind == "one-way":
            drop_from(cluster, a, b)
            time.sleep(hold)
            restore_from(cluster, a, b)
        elif kind == "nontransitive":
            drop_from(cluster, a, b)
            drop_from(cluster, b, a)
            time.sleep(hold)
            restore_from(cluster, a, b)
            restore_from(cluster, b, a)
        elif kind == "isolate":
            cluster.cut(a)
            time.sleep(hold)
            cluster.mend(a)
        elif kind == "kill":
            cluster.kill(a)
            time.sleep(hold)
            self.restart(a)
        elif kind == "pause":
            node = cluster.node(a)
            assert node.fsha is not None
            self.paused.add(a)
            node.fsha.send_signal(signal.SIGSTOP)
            time.sleep(hold)
            node.fsha.send_signal(signal.SIGCONT)
            self.resumed_at[a] = time.time()
            self.paused.discard(a)
        elif kind == "rollout":
            self.config_of[a] = 1 - self.config_of[a]
            cluster.config_path = self.configs[self.config_of[a]]
            cluster.stop(a)
            self.restart(a)
            time.sleep(hold)
        self.injected[kind] += 1
        return kind

    def restart(self, name: str) -> None:
        """Start ``name``'s fsha again; it is checked once its node has started, that is
        after its start-up clean-up of what the previous run left."""
        self.restarting.add(name)
        try:
            self.cluster.restart(name)
            wait_for(f"{name} to start", lambda: any(
                e["event"] == "starting"
                for e in self.cluster.status(self.cluster.node(name))["events"]), timeout=30)
        finally:
            self.resumed_at[name] = time.time()
            self.restarting.discard(name)

    def settle(self, timeout: float = 30.0) -> dict[str, Any]:
        """Everything healed and running: the cluster must agree, every slot mastered,
        each floating IP on its master alone."""
        cluster = self.cluster
        cluster.heal()
        for node in cluster.nodes:
            if node.fsha is None or node.fsha.poll() is not None:
                cluster.restart(node.name)
        view = cluster.wait_converged(timeout=timeout)
        owners = {int(s["name"].removeprefix("slot")): s["owner"] for s in view["slots"]}
        wait_for("each floating IP on its master alone", lambda: all(
            cluster.holders(slot) == [owner] for slot, owner in owners.items()), timeout)
        return view


def run_nemesis(cluster: NetnsCluster, seconds: float, seed: int) -> dict[str, Any]:
    """Faults for ``seconds``, then settle; the figures (raises fsha.harness.HarnessError
    if the cluster does not settle)."""
    nemesis = Nemesis(cluster, seed)
    sampler = HolderSampler(cluster, nemesis.excluded)
    began = time.monotonic()
    try:
        while time.monotonic() - began < seconds:
            nemesis.step()
            time.sleep(nemesis.rng.uniform(0.2, 0.6))  # healed, briefly, between faults
        settled_at = time.monotonic()
        nemesis.settle()
        settle_s = time.monotonic() - settled_at
    finally:
        worst = sampler.stop()
    return {"seed": seed, "seconds": round(time.monotonic() - began, 1),
            "faults": dict(nemesis.injected), "samples": sampler.samples,
            "worst_two_holders_ms": round(worst * 1000, 1),
            "two_holder_seconds": round(sampler.two_holder_seconds, 3),
            "doubled": sampler.doubled[:5], "settle_s": round(settle_s, 1),
            "log": nemesis.log}

