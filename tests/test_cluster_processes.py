"""Real processes on loopback: three `twistd -n fsha` nodes, each with its simulator."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from fsha.harness import HarnessError, LoopbackCluster, wait_for
from fsha.status import render


class LoopbackClusterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = LoopbackCluster(nodes=3, slots=2, interval_ms=20, dead_after_ms=100,
                                       json_logs=True)
        self.addCleanup(self.cluster.close)
        try:
            self.cluster.start()
            self.view = self.cluster.wait_converged(timeout=60)
        except HarnessError:
            for node in self.cluster.nodes:
                print(f"--- {node.name}\n{self.cluster.logs(node.name)}")
            raise

    def test_converge_kill_master_rejoin(self) -> None:
        cluster = self.cluster
        owners = {s["name"]: s["owner"] for s in self.view["slots"]}
        self.assertEqual(sorted(owners), ["slot1", "slot2"])
        self.assertEqual(len(set(owners.values())), 2, "two different masters")
        [spare] = [n.name for n in cluster.nodes if n.name not in owners.values()]
        statuses = cluster.statuses()
        self.assertEqual(statuses[spare]["role"], "slave")
        for status in statuses.values():
            self.assertEqual(status["ranking"], [spare])
            self.assertTrue(status["quorum"]["ok"])
            self.assertTrue(all("fs_ok" in n["flags"] for n in status["nodes"]))
            self.assertEqual(status["drops"], {})

        def links_up() -> bool:
            return all(peer["up"] for st in cluster.statuses().values()
                       for peer in st["replication"]["peers"].values())
        wait_for("every replication link to be up", links_up, timeout=30)

        table = subprocess.run([sys.executable, "-m", "fsha", "status", "--config",
                                str(cluster.config_path), "--node", spare],
                               capture_output=True, text=True, timeout=60)
        self.assertEqual(table.returncode, 0, table.stderr)
        self.assertIn(f"seen from {spare} (slave)", table.stdout)
        self.assertIn("problems: none", table.stdout)
        self.assertRegex(table.stdout, r"replication: \d+ records")
        from prometheus_client.parser import text_string_to_metric_families
        with urllib.request.urlopen(cluster.node(spare).status_url.replace("/status",
                                                                         "/metrics"),
                                    timeout=10) as response:
            families = {f.name: f for f in text_string_to_metric_families(
                response.read().decode())}
        alive = {s.labels["node"]: s.value for s in families["fsha_node_alive"].samples}
        self.assertEqual(alive, {n.name: 1.0 for n in cluster.nodes})
        self.assertEqual([s.value for s in families["fsha_freeswitch_up"].samples], [1.0])
        for name in owners.values():
            # the link is made over whichever network answered first (A or B)
            self.assertRegex(table.stdout, rf"\n{name}\s+up\s+[AB]\s")

        victim = owners["slot1"]
        killed_at = cluster.kill(victim, sim_too=True)
        new_owner = wait_for("slot1 to be taken over",
                             lambda: cluster.owner("slot1") not in (None, victim)
                             and cluster.owner("slot1"), timeout=30)
        self.assertEqual(new_owner, spare, "the primary candidate takes over")
        after = cluster.status(cluster.node(spare))
        self.assertEqual(after["role"], "master")
        self.assertEqual(after["epoch"], self.epoch_of("slot1") + 1)
        down = [e for e in after["events"] if e["event"] == "peer-down" and e["peer"] == victim]
        self.assertTrue(down, after["events"])
        self.assertGreater(down[0]["time"], killed_at, "not declared dead before it died")
        victim_node = next(n for n in after["nodes"] if n["name"] == victim)
        self.assertFalse(victim_node["alive"])
        # the takeover is one story across the nodes' JSON logs, joined by its id
        story = f"slot1/{after['epoch']}"
        tellers = set()
        for node in cluster.nodes:
            for line in node.log_path.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("takeover") == story:
                    tellers.add(node.name)
        survivors = {n.name for n in cluster.nodes} - {victim}
        self.assertEqual(tellers, survivors)

        cluster.restart(victim)
        wait_for("the killed node to rejoin",
                 lambda: len(cluster.statuses()) == 3 and cluster.converged(), timeout=60)
        final = cluster.statuses()
        self.assertEqual(final[victim]["role"], "slave", "rejoins as a slave")
        self.assertEqual(cluster.owner("slot1"), spare, "no preemption")
        self.assertEqual(cluster.owner("slot2"), owners["slot2"])
        survivor = final[spare]
        self.assertTrue(any(e["event"] == "peer-up" and e["peer"] == victim
                            and e["time"] > killed_at for e in survivor["events"]))

    def test_stopped_master_hands_over_cleanly(self) -> None:
        cluster = self.cluster
        owners = {s["name"]: s["owner"] for s in self.view["slots"]}
        [spare] = [n.name for n in cluster.nodes if n.name not in owners.values()]
        cluster.stop(owners["slot2"])  # SIGTERM: release, announce, exit
        wait_for("slot2 to move", lambda: cluster.owner("slot2") == spare, timeout=30)
        status = cluster.status(cluster.node(spare))
        release = [e for e in status["events"] if e["event"] == "peer-release"]
        self.assertTrue(release, "the stopping master announced its release")
        # cleanly: the spare took the slot as handed over (no failure detection, no fence)
        claims = [e for e in status["events"] if e["event"] == "claim" and e["slot"] == "slot2"]
        self.assertEqual([c["handed_over"] for c in claims], [True], claims)

    def test_master_whose_freeswitch_dies_releases(self) -> None:
        cluster = self.cluster
        owners = {s["name"]: s["owner"] for s in self.view["slots"]}
        [spare] = [n.name for n in cluster.nodes if n.name not in owners.values()]
        victim = cluster.node(owners["slot1"])
        assert victim.sim is not None
        victim.sim.kill()  # FreeSWITCH dies; fsha on that host lives on
        victim.sim.wait(timeout=10)
        wait_for("slot1 to move", lambda: cluster.owner("slot1") == spare, timeout=30)
        status = cluster.status(victim)
        self.assertEqual(status["role"], "slave")
        self.assertNotIn("fs_ok", next(n for n in status["nodes"] if n["self"])["flags"])
        release = [e for e in status["events"] if e["event"] == "release"]
        self.assertEqual(release[-1]["reason"], "local FreeSWITCH is not answering")
        self.assertIn("its FreeSWITCH is not answering", render(status))

    def test_calls_replicate_and_are_recovered_after_a_kill(self) -> None:
        cluster = self.cluster
        owners = {s["name"]: s["owner"] for s in self.view["slots"]}
        [spare] = [n.name for n in cluster.nodes if n.name not in owners.values()]
        master = owners["slot1"]
        uuids = cluster.sim_control(master, "/calls", {"profile": "slot1", "count": 30,
                                                       "answer": True})["uuids"]
        cluster.sim_control(master, "/register", {"profile": "slot1", "count": 10})

        def held(calls: int, registrations: int) -> bool:
            return all(st["replication"]["slots"].get("slot1", {}).get("call", 0) == calls
                       and st["replication"]["slots"]["slot1"].get("registration", 0)
                       == registrations for st in cluster.statuses().values())
        wait_for("30 calls and 10 registrations on every node", lambda: held(30, 10), 30)
        cluster.sim_control(master, "/hangup", {"uuids": uuids[:5]})
        wait_for("the 5 hangups to reach every node", lambda: held(25, 10), 30)

        cluster.kill(master, sim_too=True)
        wait_for("slot1 to move", lambda: cluster.owner("slot1") == spare, timeout=60)
        events = cluster.status(cluster.node(spare))["events"]
        [report] = [e for e in events if e["event"] == "takeover-acquire" and e["ok"]
                    and e["slot"] == "slot1"]
        self.assertEqual((report["calls_written"], report["calls_recovered"],
                          report["registrations_restored"]), (25, 25, 10))
        live = cluster.sim_control(spare, "/calls")["calls"]
        self.assertEqual(sorted(c["uuid"] for c in live), sorted(uuids[5:]))

    def fsha(self, *argv: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fsha", *argv, "--config",
                               str(config or self.cluster.config_path)],
                              capture_output=True, text=True, timeout=90)

    def test_operator_switchover_and_maintenance(self) -> None:
        cluster = self.cluster
        owners = {s["name"]: s["owner"] for s in self.view["slots"]}
        [spare] = [n.name for n in cluster.nodes if n.name not in owners.values()]
        master = owners["slot1"]
        wrong = self.fsha("switchover", "slot1", "--to", owners["slot2"])
        self.assertEqual(wrong.returncode, 1)
        self.assertIn("is not the primary candidate", wrong.stderr)

        moved = self.fsha("switchover", "slot1", "--to", spare, "--wait", "30")
        self.assertEqual(moved.returncode, 0, moved.stderr)
        self.assertEqual(moved.stdout.splitlines()[0],
                         f"slot1: {master} is handing it over to {spare}")
        self.assertRegex(moved.stdout, rf"slot1 is mastered by {spare} \(epoch \d+\); "
                                       rf"{master} holds it no more \(after [\d.]+ s\)")
        self.assertEqual(cluster.owner("slot1"), spare)

        drained = self.fsha("maintenance", owners["slot2"], "on", "--wait", "30", "--json")
        self.assertEqual(drained.returncode, 0, drained.stderr)
        result = json.loads(drained.stdout)
        self.assertEqual((result["ok"], result["answer"]["node"], result["answer"]["held"]),
                         (True, owners["slot2"], "slot2"))
        self.assertIn(f"slot2 is mastered by {master}", result["wait"]["done"])
        status = cluster.status(cluster.node(owners["slot2"]))
        self.assertIn("maintenance", next(n for n in status["nodes"] if n["self"])["flags"])
        self.assertEqual((status["role"], cluster.owner("slot2")), ("slave", master))

        back = self.fsha("maintenance", owners["slot2"], "off", "--wait", "30")
        self.assertEqual(back.returncode, 0, back.stderr)
        self.assertRegex(back.stdout, rf"{owners['slot2']} is back as a slave, ranked \d")

    def test_control_acts_on_the_named_node_only(self) -> None:
        cluster = self.cluster
        fs1, fs2 = cluster.nodes[0], cluster.nodes[1]
        node = fs1
        url = node.status_url.replace("/status", "/control/maintenance")
        request = urllib.request.Request(url, data=b'{"on": true}', method="POST",
                                         headers={"authorization": "Bearer nope"})
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        self.assertEqual(caught.exception.code, 401)
        self.assertIn(b"static bearer tokens are no longer accepted", caught.exception.read())
        # As on a host whose config gives every node the same loopback status address:
        # from here, fs2's status address leads to fs1. The request names fs2: fs1 refuses.
        shared = cluster.config_path.with_name("shared-status.toml")
        text = cluster.config_path.read_text()
        fs1_status = fs1.status_url.removeprefix("http://").removesuffix("/status")
        fs2_status = fs2.status_url.removeprefix("http://").removesuffix("/status")
        shared.write_text(text.replace(f'status = "{fs2_status}"',
                                       f'status = "{fs1_status}"'))
        refused = self.fsha("maintenance", fs2.name, "on", "--wait", "10", config=shared)
        self.assertEqual(refused.returncode, 1, refused.stdout)
        self.assertIn(f"this request is for {fs2.name}, it reached {fs1.name}", refused.stderr)
        for n in (fs1, fs2):
            self.assertNotIn("maintenance", next(
                e for e in cluster.status(n)["nodes"] if e["self"])["flags"], n.name)
        refused = cluster.status(fs1)["control"]["refused"]
        self.assertGreaterEqual(refused.get("401", 0), 1, refused)  # the bearer token
        self.assertGreaterEqual(refused.get("421", 0), 1, refused)  # the request for fs2
        # the same for a switchover: its master is found from the status, and a master
        # whose address answers as another node is not sent anything
        master = cluster.node(cluster.owner("slot1"))
        other = next(n for n in cluster.nodes if n is not master)
        master_status = master.status_url.removeprefix("http://").removesuffix("/status")
        other_status = other.status_url.removeprefix("http://").removesuffix("/status")
        shared.write_text(text.replace(f'status = "{master_status}"',
                                       f'status = "{other_status}"'))
        refused = self.fsha("switchover", "slot1", config=shared)
        self.assertEqual(refused.returncode, 1, refused.stdout)
        self.assertIn(f"slot1's master is {master.name}, but {master.name}'s status address "
                      f"{other_status} answers as {other.name} from here", refused.stderr)
        self.assertEqual(cluster.owner("slot1"), master.name)
        # with the real addresses, the named node and only it is drained
        drained = self.fsha("maintenance", fs2.name, "on", "--wait", "30")
        self.assertEqual(drained.returncode, 0, drained.stderr)
        flags = {n.name: next(e for e in cluster.status(n)["nodes"] if e["self"])["flags"]
                 for n in (fs1, fs2)}
        self.assertIn("maintenance", flags[fs2.name])
        self.assertNotIn("maintenance", flags[fs1.name])

    def epoch_of(self, slot: str) -> int:
        return next(s["epoch"] for s in self.view["slots"] if s["name"] == slot)
