"""Issue 11, rows 4 and 5: the master's fsha dies or stops alone, its FreeSWITCH (simulator)
runs on. The guard beside fsha (fsha.guard) must take the slot's address down and stop the
slot's profile (hanging up its calls) before the others may claim it; a starting fsha must
clean up what a guard could not (both killed at once) before it joins.

Every host's ``ip addr`` is sampled while the fault runs: never two holders of one floating IP
for longer than one heartbeat interval. Same harness and rules as tests.e2e.test_scenarios.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from datetime import datetime
from typing import Any

from fsha.harness import wait_for
from tests.e2e.test_faults import FaultScenario

SAMPLE_SECONDS = 20.0  # a sampler stops by itself after this


class HolderSampler:
    """Samples which hosts hold a slot's floating IP, in a thread, until stopped (bounded)."""

    def __init__(self, cluster: Any, slot: int, seconds: float = SAMPLE_SECONDS) -> None:
        self.cluster, self.slot = cluster, slot
        self.samples: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + seconds
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline \
                and len(self.samples) < 100_000:
            at = time.time()
            self.samples.append((at, self.cluster.holders(self.slot)))

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """``two_holders_ms``: the longest run of consecutive samples seeing two or more
        holders (first to last such sample); ``round_ms``: the mean time of one round."""
        longest, start, count = 0.0, None, 0
        for at, holders in self.samples:
            if len(holders) > 1:
                count += 1
                start = at if start is None else start
                longest = max(longest, at - start)
            else:
                start = None
        span = self.samples[-1][0] - self.samples[0][0] if len(self.samples) > 1 else 0.0
        return {"samples": len(self.samples), "two_holder_samples": count,
                "two_holders_ms": round(longest * 1000, 1),
                "round_ms": round(span / max(1, len(self.samples) - 1) * 1000, 1)}


class AddressWatch:
    """``ip -ts monitor address`` in every host's namespace: the kernel's own account of
    when each host added and deleted a slot's floating IP, so the time two hosts held it is
    measured exactly (the sampler above only sees what its rounds catch). Bounded by
    ``timeout``; ``overlap()`` after ``stop()``."""

    def __init__(self, cluster: Any, slot: int, seconds: float = SAMPLE_SECONDS) -> None:
        self.ip = cluster.floating_ip(slot)
        self.initial = {n.name: n.name in cluster.holders(slot) for n in cluster.nodes}
        self.procs = {n.name: subprocess.Popen(
            ["timeout", str(int(seconds)), "ip", "-n", cluster.ns(n), "-ts", "-o", "monitor",
             "address"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True) for n in cluster.nodes}
        self.changes: list[tuple[float, str, bool]] = []

    def stop(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.terminate()
            out, _ = proc.communicate(timeout=10)
            for line in out.splitlines():
                if f" inet {self.ip}/" not in line or not line.startswith("["):
                    continue
                stamp, _, rest = line[1:].partition("] ")
                at = datetime.fromisoformat(stamp).timestamp()  # the host's local time
                self.changes.append((at, name, not rest.startswith("Deleted")))
        self.changes.sort()

    def overlap(self) -> dict[str, Any]:
        """The longest time two or more hosts held the address at once, and the changes."""
        held = dict(self.initial)
        longest, since = 0.0, None
        for at, name, added in self.changes:
            held[name] = added
            if sum(held.values()) > 1:
                since = at if since is None else since
            elif since is not None:
                longest, since = max(longest, at - since), None
        return {"two_holders_ms": round(longest * 1000, 1), "open": since is not None,
                "changes": [(round(at, 3), name, "add" if added else "del")
                            for at, name, added in self.changes]}


class GuardScenario(FaultScenario):
    def setUp(self) -> None:
        super().setUp()
        # A node whose reactor stalled past the lease while starting under load gave its
        # first claim up (and sits out a moment): wait for a candidate to be ranked.
        def settled() -> dict[str, Any] | None:
            view = self.cluster.converged()
            return view if view is not None and view["ranking"] else None
        self.view = wait_for("a converged view with a ranked candidate", settled, timeout=60)
        self.owners = {s["name"]: s["owner"] for s in self.view["slots"]}
        self.epochs = {s["name"]: s["epoch"] for s in self.view["slots"]}
        self.ranking = self.view["ranking"]

    def check_overlap(self, watch: AddressWatch, sampler: HolderSampler, master: str,
                      candidate: str, bound_ms: float) -> dict[str, Any]:
        """Never two holders of slot1's IP beyond ``bound_ms``: by the kernel's account of
        every host (exact) and by sampling ``ip addr`` on every host."""
        samples = sampler.stop()
        watch.stop()
        exact = watch.overlap()
        self.assertGreaterEqual(samples["samples"], 3)
        self.assertLessEqual(samples["two_holders_ms"], bound_ms,
                             f"two hosts held slot1's IP (sampled): {samples}")
        moves = [(name, kind) for _, name, kind in exact["changes"]]
        self.assertIn((master, "del"), moves, exact)
        self.assertIn((candidate, "add"), moves, exact)
        self.assertFalse(exact["open"], exact)
        self.assertLessEqual(exact["two_holders_ms"], bound_ms,
                             f"two hosts held slot1's IP: {exact}")
        gone = next(at for at, name, kind in exact["changes"] if (name, kind) == (master, "del"))
        up = next(at for at, name, kind in exact["changes"]
                  if (name, kind) == (candidate, "add"))
        return {**samples, "two_holders_ms": exact["two_holders_ms"],
                "old_del_before_new_add_ms": round((up - gone) * 1000, 1)}


class MasterFshaDiesAlone(GuardScenario):
    """Row 4: ``kill -9`` of the master's fsha only."""

    def sim_status(self, name: str) -> dict[str, Any]:
        return self.cluster.sim_control(name, "/status")

    def assert_switch_serves_nothing(self, name: str) -> None:
        def idle() -> bool:
            st = self.sim_status(name)
            return st["calls"] == 0 and all(p["state"] != "running"
                                            for p in st["profiles"].values())
        wait_for(f"{name}'s FreeSWITCH to serve no slot profile and no call", idle, timeout=10)

    def test_the_guard_drops_the_slot_with_and_without_a_restart(self) -> None:
        cluster = self.cluster
        master, candidate = self.owners["slot1"], self.ranking[0]
        interval_ms = cluster.interval_ms
        self.links_up()
        self.place_calls("slot1", 10)
        self.assertEqual(self.sim_status(master)["calls"], 10)
        watch = AddressWatch(cluster, 1)
        self.addCleanup(watch.stop)
        sampler = HolderSampler(cluster, 1)
        self.addCleanup(sampler.stop)
        wait_for("the sampler to see the master hold slot1",
                 lambda: sampler.samples and sampler.samples[-1][1] == [master], timeout=10)
        killed = cluster.kill(master)  # fsha alone: its simulator runs on
        wait_for("the candidate to master slot1", lambda: self.is_master(candidate, "slot1"),
                 timeout=30)
        self.assert_switch_serves_nothing(master)
        wait_for("only the candidate to hold slot1's IP",
                 lambda: cluster.holders(1) == [candidate], timeout=10)
        figures = self.check_overlap(watch, sampler, master, candidate, interval_ms)
        self.assertEqual(self.acquire_report(candidate, "slot1")["calls_recovered"], 10)
        self.assertEqual(self.sim_status(candidate)["calls"], 10)
        log = cluster.node(master).log_path.read_text(errors="replace")
        self.assertIn("fsha is gone", log, "the guard acted on its own")

        # The restart finds nothing to clean and rejoins as a slave.
        cluster.restart(master)
        wait_for(f"{master} to rejoin as a slave", lambda: cluster.status(
            cluster.node(master))["role"] == "slave", timeout=60)
        self.assertEqual(cluster.holders(1), [candidate])
        self.assert_switch_serves_nothing(master)
        self.passed({**figures, "killed_at": round(killed, 3)})

    def test_a_starting_fsha_cleans_up_what_no_guard_could(self) -> None:
        cluster = self.cluster
        master, candidate = self.owners["slot1"], self.ranking[0]
        self.links_up()
        self.place_calls("slot1", 5)
        guard_pid = cluster.status(cluster.node(master))["guard"]["pid"]
        # Both at once (SIGKILL to the whole unit, the OOM killer...): nothing on the host
        # acts, the address and the profile stay. The guard goes first so it sees no EOF.
        os.kill(guard_pid, signal.SIGKILL)
        cluster.kill(master)
        wait_for("the candidate to master slot1", lambda: self.is_master(candidate, "slot1"),
                 timeout=30)
        self.assertIn(master, cluster.holders(1), "no guard: the old host keeps the address")
        self.assertEqual(self.sim_status(master)["calls"], 5, "and its calls")
        cluster.restart(master)
        wait_for(f"{master} to rejoin as a slave", lambda: cluster.status(
            cluster.node(master))["role"] == "slave", timeout=60)
        self.assertEqual(cluster.holders(1), [candidate])
        self.assert_switch_serves_nothing(master)
        events = cluster.status(cluster.node(master))["events"]
        reconciled = [e for e in events if e["event"] == "reconciled"]
        self.assertEqual(reconciled[0]["profiles_stopped"], ["slot1"])
        joined = [e for e in events if e["event"] == "starting"]
        self.assertLessEqual(reconciled[0]["time"], joined[-1]["time"],
                             "reconciled before it joined")
        self.passed({"reconciled": reconciled[0]})


class MasterFshaPaused(GuardScenario):
    """Row 5: ``SIGSTOP`` of the master's fsha for 2 s, then ``SIGCONT``."""

    def test_the_lease_runs_out_before_anyone_claims(self) -> None:
        cluster = self.cluster
        master, candidate = self.owners["slot1"], self.ranking[0]
        interval_ms = cluster.interval_ms
        self.links_up()
        self.place_calls("slot1", 10)
        watch = AddressWatch(cluster, 1)
        self.addCleanup(watch.stop)
        sampler = HolderSampler(cluster, 1)
        self.addCleanup(sampler.stop)
        wait_for("the sampler to see the master hold slot1",
                 lambda: sampler.samples and sampler.samples[-1][1] == [master], timeout=10)
        fsha = cluster.node(master).fsha
        assert fsha is not None
        os.kill(fsha.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        self.addCleanup(lambda: fsha.poll() is None and os.kill(fsha.pid, signal.SIGCONT))
        wait_for("the candidate to master slot1", lambda: self.is_master(candidate, "slot1"),
                 timeout=30)
        wait_for("the paused master's FreeSWITCH to stop serving slot1", lambda: cluster.
                 sim_control(master, "/status")["profiles"]["slot1"]["state"] != "running",
                 timeout=10)
        self.assertEqual(cluster.sim_control(master, "/status")["calls"], 0)
        wait_for("2 s of pause", lambda: time.monotonic() - stopped >= 2.0, timeout=10)
        os.kill(fsha.pid, signal.SIGCONT)
        wait_for(f"{master} to come back as a slave", lambda: cluster.status(
            cluster.node(master))["role"] == "slave", timeout=30)
        figures = self.check_overlap(watch, sampler, master, candidate, interval_ms)
        self.assertEqual(cluster.holders(1), [candidate])
        self.assertTrue(self.is_master(candidate, "slot1"), "nothing moved back")
        self.assertEqual(self.acquire_report(candidate, "slot1")["calls_recovered"], 10)
        back = cluster.status(cluster.node(master))
        self.assertEqual(back["guard"]["last_drop"]["slot"], "slot1")
        self.assertIn("lease expired", back["guard"]["last_drop"]["reason"])
        self.passed(figures)
