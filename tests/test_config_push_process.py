"""``fsha config push`` end to end: real ``twistd`` nodes on loopback (fsha.harness), the
push relayed over the replication links, a node down during a push that comes back with
its old file and catches up by itself (fsha.configfetch, over a control-only link)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from fsha.configplan import file_epoch
from fsha.harness import FSHA, LoopbackCluster, wait_for


def priority(text: str, node: str, value: int) -> str:
    head, sep, tail = text.partition(f'name = "{node}"\npriority = ')
    assert sep, node
    return head + sep + str(value) + tail[tail.index("\n"):]


class ConfigPushProcessTests(SynchronousTestCase):
    def push(self, cluster: LoopbackCluster, file: str, *extra: str
             ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FSHA, "config", "push", file, "--config",
                               str(cluster.config_path), "--via", "fs1", "--relay", *extra],
                              capture_output=True, text=True, timeout=120)

    def configs(self, cluster: LoopbackCluster) -> dict[str, tuple[int, str]]:
        return {name: (st["config"]["epoch"], st["config_digest"])
                for name, st in cluster.statuses().items()}

    def test_push_relayed_a_node_down_and_its_catch_up(self) -> None:
        with LoopbackCluster(nodes=3, slots=1, interval_ms=50, dead_after_ms=250) as c:
            c.start()
            c.wait_converged(60)
            original = c.config_path.read_text()
            first = c.dir / "first.toml"
            first.write_text(priority(original, "fs3", 300))
            dry = self.push(c, str(first), "--dry-run")
            self.assertEqual(dry.returncode, 0, dry.stderr + c.logs("fs1"))
            # fs2 and fs3 had equal priorities (ranked by start order): fs3 first after
            ranking = next(line for line in dry.stdout.splitlines() if "ranking of" in line)
            self.assertTrue(ranking.endswith("fs3, fs2"), ranking)
            self.assertIn("(via fs1) -> epoch 1", dry.stdout)
            self.assertEqual(file_epoch(c.config_path.read_text()), 0)

            done = self.push(c, str(first))
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            self.assertIn("config epoch 1 active on fs1, fs2, fs3", done.stdout)
            configs = self.configs(c)
            self.assertEqual({e for e, _ in configs.values()}, {1})
            self.assertEqual(len({d for _, d in configs.values()}), 1)
            self.assertEqual(file_epoch(c.config_path.read_text()), 1)
            wait_for("every node ranks fs3 first", lambda: all(
                st["ranking"] == ["fs3", "fs2"] for st in c.statuses().values()), 10)
            self.assertGreaterEqual(c.status(c.node("fs2"))["config"]["relay"]["served"], 3)
            self.assertEqual(c.owner("slot1"), "fs1")  # nothing moved
            epoch1_text = c.config_path.read_text()

            # fs3 down during a push: skipped, the others take it
            c.kill("fs3")
            wait_for("fs1 sees fs3 down", lambda: not next(
                n for n in c.status(c.node("fs1"))["nodes"] if n["name"] == "fs3")["alive"],
                10)
            second = c.dir / "second.toml"
            second.write_text(priority(first.read_text(), "fs2", 400))
            down = self.push(c, str(second))
            self.assertEqual(down.returncode, 0, down.stdout + down.stderr)
            self.assertIn("fs3: down", down.stdout)
            self.assertIn("config epoch 2 active on fs1, fs2", down.stdout)

            # it comes back with its old file (epoch 1) and catches up by itself, over a
            # link between two configs (control requests only), from fs1 or fs2
            c.config_path.write_text(epoch1_text)
            c.restart("fs3")
            try:
                wait_for("one config everywhere, links whole again", lambda: self._whole(c), 30)
            except AssertionError:
                for name, st in c.statuses().items():
                    print(name, st["config"], st["config_digest"],
                          st["replication"]["control_links"],
                          {p: v.get("up") for p, v in st["replication"]["peers"].items()})
                print(c.logs("fs3", 30))
                raise
            fs3 = c.status(c.node("fs3"))
            self.assertEqual(fs3["config"]["catch_up"]["taken"], 1)
            self.assertEqual(fs3["config"]["catch_up"]["problems"], [])
            self.assertEqual(file_epoch(c.config_path.read_text()), 2)
            self.assertIn("caught up with epoch 2 from", c.logs("fs3", 200))
            history = subprocess.run([*FSHA, "history", "--config", str(c.config_path),
                                      "--node", "fs3", "--json"],
                                     capture_output=True, text=True, timeout=60)
            events = [json.loads(line) for line in history.stdout.splitlines()
                      if line.startswith("{")]
            caught = [e for e in events if e.get("event") == "config" and e.get("source")]
            self.assertEqual([e["epoch"] for e in caught], [2], history.stdout[-2000:])
            again = self.push(c, str(second))
            self.assertEqual(again.returncode, 0, again.stdout + again.stderr)
            self.assertIn("nothing to push", again.stdout + again.stderr)

    def _whole(self, c: LoopbackCluster) -> Any:
        statuses = c.statuses()
        configs = {(st["config"]["epoch"], st["config_digest"]) for st in statuses.values()}
        links = all(not st["replication"]["control_links"] and all(
            p.get("up") for p in st["replication"]["peers"].values())
            for st in statuses.values())
        return len(configs) == 1 and next(iter(configs))[0] == 2 and links
