"""``fsha config push``: the diff and plan, the epoch rules, a node's stager on a fake
clock, the relay over replication links, and the push's decisions (partial partition, a
node down, racing pushes, a push from a host whose file is old) with fake nodes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fsha.cli import config as cli
from fsha.config import ClusterConfig, config_digest, load_config
from fsha.configplan import (
    STAGE_TTL,
    diff,
    file_epoch,
    moves,
    parse_text,
    with_epoch,
)
from fsha.configstage import ConfigStager, Refused
from fsha.replication.relay import ControlRelay, RelayError
from fsha.wire.stream import ControlAnswer, ControlRequest

DEMO = Path(__file__).resolve().parent.parent / "conf" / "demo.toml"
SECRET = b"config-push-secret-0123456789abcdef"


def priority(text: str, node: str, value: int) -> str:
    """``text`` with ``node``'s priority set to ``value`` (demo.toml's layout)."""
    head, sep, tail = text.partition(f'name = "{node}"\npriority = ')
    assert sep, node
    return head + sep + str(value) + tail[tail.index("\n"):]


class Workspace:
    """A config file, its secret, and the node's view of it, in a temporary directory."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fsha-push-"))
        case.addCleanup(shutil.rmtree, self.dir, True)
        self.text = DEMO.read_text()
        (self.dir / "demo.secret").write_bytes(SECRET)
        os.chmod(self.dir / "demo.secret", 0o600)
        self.path = self.dir / "cluster.toml"
        self.path.write_text(self.text)

    def config(self) -> ClusterConfig:
        return load_config(self.path)


class EpochLineTests(SynchronousTestCase):
    def test_epoch_line(self) -> None:
        self.assertEqual(file_epoch("[cluster]\n"), 0)
        text = with_epoch("[cluster]\n", 7, "pushed")
        self.assertEqual(text, "# fsha-config-epoch: 7  pushed\n[cluster]\n")
        self.assertEqual(file_epoch(text), 7)
        again = with_epoch(text, 8)
        self.assertEqual(again, "# fsha-config-epoch: 8\n[cluster]\n")
        # only a first line counts: a pasted line further down is a comment
        self.assertEqual(file_epoch("# x\n# fsha-config-epoch: 9\n"), 0)


class DiffTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.old = parse_text(DEMO.read_text(), DEMO)

    def test_priority_is_online(self) -> None:
        new = parse_text(priority(DEMO.read_text(), "fs3", 300), DEMO)
        changes = diff(self.old, new)
        self.assertEqual([(c.key, c.old, c.new, c.online) for c in changes],
                         [("node.fs3.priority", "50", "300", True)])
        self.assertNotEqual(self.old.digest, new.digest)

    def test_own_port_needs_a_restart_of_that_node(self) -> None:
        text = DEMO.read_text().replace('status = "127.0.1.2:17420"',
                                        'status = "127.0.1.2:17421"')
        (change,) = diff(self.old, parse_text(text, DEMO))
        self.assertFalse(change.online)
        self.assertEqual(change.key, "node.fs2.status.port")
        self.assertIn("restart fs2", change.why)

    def test_shape_timings_and_slots_need_restarts(self) -> None:
        text = DEMO.read_text().replace("dead_after_ms = 200", "dead_after_ms = 300") \
            .replace("127.0.10.2/32", "127.0.10.9/32")
        text += ('\n[[node]]\nname = "fs4"\naddress = { A = "127.0.1.4", B = "127.0.2.4" }\n'
                 'stream = "127.0.1.4:17410"\nstatus = "127.0.1.4:17420"\n'
                 'esl = { host = "127.0.3.4", port = 18021, password = "x" }\n')
        changes = {c.key: c for c in diff(self.old, parse_text(text, DEMO))}
        self.assertEqual([k for k, c in changes.items() if c.online], ["slot.slot2.ip"])
        self.assertIn("rolling restart", changes["node (list)"].why)
        self.assertIn("cluster.dead_after", changes)
        # a password is never printed, only that it changed
        self.assertTrue(changes["node.fs4.esl.password"].new.startswith("sha256:"))

    def test_notify_online_only_when_there_before_and_after(self) -> None:
        notify = '\n[notify]\ncommand = ["/bin/true"]\n'
        with_notify = parse_text(DEMO.read_text() + notify, DEMO)
        self.assertFalse(any(c.online for c in diff(self.old, with_notify)))
        changed = parse_text(DEMO.read_text() + notify + "timeout_ms = 500\n", DEMO)
        (change,) = diff(with_notify, changed)
        self.assertTrue(change.online, change)
        self.assertEqual(with_notify.digest, changed.digest)  # not in the digest


def status_of(config: ClusterConfig, roles: dict[str, tuple[str, str | None]]) -> dict[str, Any]:
    """A node's status as the role engine's input: name -> (role, slot)."""
    return {"nodes": [{"name": n.name, "alive": True, "self": n.name == "fs1",
                       "role": roles[n.name][0], "slot": roles[n.name][1], "epoch": 1,
                       "incarnation": n.node_id + 1,
                       "flags": ["fs_ok", "sees_quorum"]} for n in config.nodes],
            "slots": [{"name": s.name, "epoch": 1} for s in config.slots]}


class MovesTests(SynchronousTestCase):
    def test_ranking_and_candidate_change_computed_by_the_role_engine(self) -> None:
        text = DEMO.read_text() + ('\n[[node]]\nname = "fs4"\npriority = 60\n'
                                   'address = { A = "127.0.1.4", B = "127.0.2.4" }\n'
                                   'stream = "127.0.1.4:17410"\nstatus = "127.0.1.4:17420"\n'
                                   'esl = { host = "127.0.3.4", port = 18021, password = "x" }'
                                   '\n')
        old = parse_text(text, DEMO)
        new = parse_text(priority(text, "fs3", 300), DEMO)
        status = status_of(old, {"fs1": ("master", "slot1"), "fs2": ("master", "slot2"),
                                 "fs3": ("slave", None), "fs4": ("slave", None)})
        lines = moves(old, new, status)
        self.assertEqual(lines[0], "priority of fs3: 50 -> 300")
        self.assertIn("ranking of the slaves: fs4, fs3 -> fs3, fs4", lines)
        self.assertIn("primary candidate (takes the next slot whose master fails): fs4 -> "
                      "fs3", lines)
        self.assertTrue(lines[-1].startswith("no slot changes master"))

    def test_an_orphaned_slot_goes_to_the_new_first(self) -> None:
        old = parse_text(DEMO.read_text(), DEMO)
        new = parse_text(priority(DEMO.read_text(), "fs3", 300), DEMO)
        status = status_of(old, {"fs1": ("master", "slot1"), "fs2": ("slave", None),
                                 "fs3": ("slave", None)})
        lines = moves(old, new, status)
        self.assertIn("orphaned slot slot2 goes to fs3 (was fs2)", lines)

    def test_no_priority_change_nothing_moves(self) -> None:
        old = parse_text(DEMO.read_text(), DEMO)
        self.assertEqual(moves(old, old, None), [])


class StagerTests(SynchronousTestCase):
    """One node's side, on a fake clock."""

    def setUp(self) -> None:
        self.ws = Workspace(self)
        self.clock = Clock()
        self.applied: list[ClusterConfig] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.stager = self.make()

    def make(self) -> ConfigStager:
        return ConfigStager(self.ws.config(), "fs2", SECRET, self.clock, self.applied.append,
                            lambda kind, **fields: self.events.append((kind, fields)))

    def test_stage_then_activate_writes_the_file_and_applies(self) -> None:
        new_text = priority(self.ws.text, "fs3", 300)
        answer = self.stager.stage(1, new_text)
        self.assertEqual(answer["changes"], ["node.fs3.priority: 50 -> 300"])
        self.assertEqual(self.ws.path.read_text(), self.ws.text)  # staged: not written yet
        self.assertEqual(self.stager.status()["staged"]["epoch"], 1)
        self.stager.activate(1, bytes.fromhex(answer["digest"]))
        written = self.ws.path.read_text()
        self.assertEqual(file_epoch(written), 1)
        self.assertEqual(self.ws.config().node("fs3").priority, 300)  # a restart reads it
        self.assertEqual([c.node("fs3").priority for c in self.applied], [300])
        self.assertEqual(self.events[0][0], "config")
        self.assertEqual(self.events[0][1]["epoch"], 1)
        self.assertEqual(self.stager.status()["epoch"], 1)
        self.assertIsNone(self.stager.status()["staged"])
        self.assertEqual([p.name for p in self.ws.dir.iterdir() if "fsha-push" in p.name], [])
        # a restarted node reads its epoch from the file
        self.assertEqual(self.make().epoch, 1)

    def test_restart_needed_refused_and_old_config_kept(self) -> None:
        text = self.ws.text.replace('status = "127.0.1.2:17420"', 'status = "127.0.1.2:1"')
        with self.assertRaises(Refused) as e:
            self.stager.stage(1, text)
        self.assertIn("node.fs2.status.port", e.exception.reasons[0])
        self.assertIn("restart fs2", e.exception.reasons[0])
        self.assertIsNone(self.stager.staged)
        self.assertEqual(self.ws.path.read_text(), self.ws.text)

    def test_invalid_for_this_node_refused(self) -> None:
        with self.assertRaises(Refused) as e:
            self.stager.stage(1, "[cluster]\n")
        self.assertTrue(any("missing" in r for r in e.exception.reasons))
        other = self.ws.dir / "other.secret"
        other.write_bytes(b"another-secret-of-32-bytes-xxxxxxxxx")
        text = self.ws.text.replace('secret_file = "demo.secret"', 'secret_file = "other.secret"')
        with self.assertRaises(Refused) as e:
            self.stager.stage(1, text)
        self.assertIn("another secret", e.exception.reasons[0])
        with_tls = self.ws.text + ('\n[tls]\nca = "ca.crt"\ncert = "{node}.crt"\n'
                                   'key = "{node}.key"\n')
        with self.assertRaises(Refused) as e:
            self.stager.stage(1, with_tls)
        self.assertIn("tls.ca", e.exception.reasons[0])

    def test_epoch_not_above_refused(self) -> None:
        self.ws.path.write_text(with_epoch(self.ws.text, 5))
        stager = self.make()
        with self.assertRaises(Refused) as e:
            stager.stage(5, priority(self.ws.text, "fs3", 300))
        self.assertIn("not above the epoch this node runs (5", e.exception.reasons[0])
        stager.stage(6, priority(self.ws.text, "fs3", 300))

    def test_two_pushes_race(self) -> None:
        a, b = priority(self.ws.text, "fs3", 300), priority(self.ws.text, "fs3", 10)
        first = self.stager.stage(1, a)
        with self.assertRaises(Refused) as e:
            self.stager.stage(1, b)
        self.assertIn("staged already by another push", e.exception.reasons[0])
        # the loser's abort does not drop the winner's staged copy
        self.stager.abort(1, parse_text(b, self.ws.path).digest)
        self.assertIsNotNone(self.stager.staged)
        self.stager.stage(1, a)  # the same push again: fine
        # a push with a higher epoch replaces it (the newest wins the next round)
        self.stager.stage(2, b)
        with self.assertRaises(Refused):
            self.stager.activate(1, bytes.fromhex(first["digest"]))
        self.assertEqual(self.applied, [])

    def test_staged_copy_dropped_after_the_ttl(self) -> None:
        answer = self.stager.stage(1, priority(self.ws.text, "fs3", 300))
        self.clock.advance(STAGE_TTL)
        self.assertIsNone(self.stager.status()["staged"])
        with self.assertRaises(Refused) as e:
            self.stager.activate(1, bytes.fromhex(answer["digest"]))
        self.assertIn("nothing staged", e.exception.reasons[0])
        self.assertEqual(self.ws.path.read_text(), self.ws.text)
        # and a racing push may now stage
        self.stager.stage(1, priority(self.ws.text, "fs3", 10))

    def test_unwritable_file_keeps_the_old_config(self) -> None:
        answer = self.stager.stage(1, priority(self.ws.text, "fs3", 300))
        # the temporary file's name taken by a directory: the write fails (even as root)
        blocker = self.ws.dir / f".cluster.toml.fsha-push.{os.getpid()}"
        blocker.mkdir()
        self.addCleanup(blocker.rmdir)
        with self.assertRaises(Refused) as e:
            self.stager.activate(1, bytes.fromhex(answer["digest"]))
        self.assertIn("cannot write", e.exception.reasons[0])
        self.assertEqual(self.applied, [])
        self.assertEqual(self.stager.epoch, 0)


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, frame: Any) -> None:
        self.sent.append(frame)


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.link = FakeLink()
        self.relay = ControlRelay(lambda name: self.link if name == "fs2" else None,
                                  self.clock)

    def test_request_answered(self) -> None:
        d = self.relay.request("fs2", "auth", "/control/config/show", b"{}")
        (frame,) = self.link.sent
        self.assertEqual((frame.auth, frame.path, frame.body),
                         ("auth", "/control/config/show", b"{}"))
        self.relay.frame("fs3", self.link, ControlAnswer(frame.id, 200, b"{}"))  # wrong peer
        self.assertNoResult(d)
        self.relay.frame("fs2", self.link, ControlAnswer(frame.id, 200, b'{"a": 1}'))
        self.assertEqual(self.successResultOf(d), (200, b'{"a": 1}'))

    def test_no_link_timeout_and_link_down(self) -> None:
        self.failureResultOf(self.relay.request("fs3", "a", "/p", b""), RelayError)
        d = self.relay.request("fs2", "a", "/p", b"")
        self.clock.advance(10)
        self.assertIn("did not answer", str(self.failureResultOf(d, RelayError).value))
        d = self.relay.request("fs2", "a", "/p", b"")
        self.relay.link_closed("fs2")
        self.assertIn("went down", str(self.failureResultOf(d, RelayError).value))
        self.assertEqual(self.relay.status()["pending"], 0)

    def test_serves_requests_with_its_handler(self) -> None:
        self.relay.frame("fs1", self.link, ControlRequest(3, "a", "/p", b""))
        self.assertEqual(self.link.sent[-1].status, 404)  # no control endpoint yet
        self.relay.handler = lambda f: ControlAnswer(f.id, 200, b"{}")
        self.relay.frame("fs1", self.link, ControlRequest(4, "a", "/p", b""))
        self.assertEqual((self.link.sent[-1].id, self.link.sent[-1].status), (4, 200))


class FakeNode:
    """A node as the push sees it: its stager, reachable or not."""

    def __init__(self, name: str, ws: Workspace, clock: Clock, text: str) -> None:
        self.name = name
        self.path = ws.dir / f"{name}.toml"
        self.path.write_text(text)
        self.stager = ConfigStager(load_config(self.path), name, SECRET, clock,
                                   lambda c: None, lambda *a, **k: None)
        self.reachable = True
        self.fail_activate = False
        self.calls: list[str] = []


class FakePush(cli.Push):
    def __init__(self, config: ClusterConfig, nodes: dict[str, FakeNode]) -> None:
        super().__init__(config, SECRET, 1.0)
        self.nodes = nodes

    def call(self, target: cli.Target, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        node = self.nodes[target.name]
        if not node.reachable or (path.endswith("activate") and node.fail_activate):
            raise OSError("connection refused")
        command = path.rsplit("/", 1)[1]
        node.calls.append(command)
        try:
            if command == "show":
                return 200, node.stager.show()
            if command == "stage":
                return 200, node.stager.stage(body["epoch"], body["text"])
            digest = bytes.fromhex(body["digest"])
            return 200, getattr(node.stager, command)(body["epoch"], digest)
        except Refused as e:
            return 409, {"error": "; ".join(e.reasons), "reasons": e.reasons}


class PushTests(SynchronousTestCase):
    """The push's decisions, against three fake nodes on one fake clock."""

    def setUp(self) -> None:
        self.ws = Workspace(self)
        self.clock = Clock()
        self.nodes = {n: FakeNode(n, self.ws, self.clock, self.ws.text)
                      for n in ("fs1", "fs2", "fs3")}
        self.new = priority(self.ws.text, "fs3", 300)

    def run_push(self, text: str, dry_run: bool = False,
                 alive: dict[str, bool] | None = None,
                 owners: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        push = FakePush(self.ws.config(), self.nodes)
        targets = []
        for name, node in self.nodes.items():
            status = {"nodes": [{"name": n, "alive": (alive or {}).get(n, True),
                                 "self": n == name, "role": "slave", "slot": None,
                                 "epoch": 0, "flags": ["fs_ok", "sees_quorum"]}
                                for n in self.nodes],
                      "slots": [{"name": s, "owner": o} for s, o in (owners or {}).items()]}
            targets.append(cli.Target(name, "direct", status if node.reachable else None))
        push.via = targets[0]
        for t in targets:
            code, answer = push.safe_call(t, "/control/config/show", {})
            if code == 200:
                t.epoch, t.digest, t.text, t.path = (answer["epoch"], answer["digest"],
                                                     answer["text"], answer["path"])
            else:
                t.error = answer["error"]
        report = cli.Report(as_json=True)
        report.line = lambda text: report.data["lines"].append(text)  # type: ignore[method-assign]
        report.end = lambda code, result: (report.data.update(result=result), code)[1]  # type: ignore[method-assign]
        code = cli.run(push, targets, text, "new.toml", dry_run, report)
        return code, report.data

    def epochs(self) -> dict[str, int]:
        return {n: node.stager.epoch for n, node in self.nodes.items()}

    def test_push_activates_everywhere(self) -> None:
        code, data = self.run_push(self.new, dry_run=True)
        self.assertEqual(code, 0, data)
        self.assertEqual(self.epochs(), {"fs1": 0, "fs2": 0, "fs3": 0})  # dry run
        self.assertIn("  node.fs3.priority: 50 -> 300   (online)", data["lines"])
        code, data = self.run_push(self.new)
        self.assertEqual(code, 0, data)
        self.assertEqual(self.epochs(), {"fs1": 1, "fs2": 1, "fs3": 1})
        self.assertEqual(file_epoch(self.nodes["fs2"].path.read_text()), 1)
        code, data = self.run_push(self.new)  # again: nothing to do
        self.assertEqual(code, 0)
        self.assertIn("nothing to push", data["result"])

    def test_a_slot_change_activates_its_master_after_the_others(self) -> None:
        order: list[str] = []
        for node in self.nodes.values():
            node.stager.apply = lambda c, name=node.name: order.append(name)  # type: ignore[misc]
        text = self.ws.text.replace("127.0.10.2/32", "127.0.10.9/32")
        code, data = self.run_push(text, dry_run=True, owners={"slot1": "fs1", "slot2": "fs2"})
        self.assertEqual(code, 0, data)
        self.assertIn("  slot.slot2.ip: [127.0.10.2/32 dev lo] -> [127.0.10.9/32 dev lo]   "
                      "(online)", data["lines"])
        self.assertIn("  slot2: 127.0.10.9/32 added on fs2, 127.0.10.2/32 removed",
                      data["lines"])
        code, data = self.run_push(text, owners={"slot1": "fs1", "slot2": "fs2"})
        self.assertEqual(code, 0, data)
        # fs1 relays (--via): last; fs2 masters slot2: after the slaves
        self.assertEqual(order, ["fs3", "fs2", "fs1"])

    def test_restart_needed_sends_nothing(self) -> None:
        text = self.ws.text.replace("dead_after_ms = 200", "dead_after_ms = 300")
        code, data = self.run_push(text)
        self.assertEqual(code, 1)
        self.assertIn("need a restart", data["result"])
        self.assertTrue(all(node.calls == ["show"] for node in self.nodes.values()))

    def test_partial_partition_alive_but_unreachable_stops_the_push(self) -> None:
        self.nodes["fs3"].reachable = False
        code, data = self.run_push(self.new)
        self.assertEqual(code, 1)
        self.assertIn("fs3 is alive for fs1, fs2 but cannot be asked", data["result"])
        self.assertEqual(self.epochs(), {"fs1": 0, "fs2": 0, "fs3": 0})
        self.assertNotIn("stage", self.nodes["fs1"].calls)

    def test_node_down_is_skipped_and_catches_up_at_the_next_push(self) -> None:
        self.nodes["fs3"].reachable = False
        code, _ = self.run_push(self.new, alive={"fs3": False})
        self.assertEqual(code, 0)
        self.assertEqual(self.epochs(), {"fs1": 1, "fs2": 1, "fs3": 0})
        # fs3 comes back with its old file (epoch 0); the same push brings only it up
        self.nodes["fs3"].reachable = True
        self.nodes["fs1"].calls.clear()
        code, data = self.run_push(self.new)
        self.assertEqual(code, 0, data)
        self.assertEqual(self.epochs(), {"fs1": 1, "fs2": 1, "fs3": 1})
        self.assertEqual(self.nodes["fs1"].calls, ["show"])
        self.assertIn("  fs1: runs epoch 1 digest", "\n".join(data["lines"]))

    def test_one_refusal_aborts_everywhere(self) -> None:
        # fs3 cannot take it: another secret in its file's directory... simulated by a
        # staged copy of a racing push
        self.nodes["fs3"].stager.stage(1, priority(self.ws.text, "fs3", 10))
        code, data = self.run_push(self.new)
        self.assertEqual(code, 1)
        self.assertIn("push aborted: 1 node(s) refused epoch 1", data["result"])
        self.assertIn("another push", "\n".join(data["lines"]))
        self.assertIsNone(self.nodes["fs1"].stager.staged)  # dropped by the abort
        self.assertIsNotNone(self.nodes["fs3"].stager.staged)  # the other push's: kept
        self.assertEqual(self.epochs(), {"fs1": 0, "fs2": 0, "fs3": 0})

    def test_activation_lost_on_one_node(self) -> None:
        self.nodes["fs2"].fail_activate = True
        code, data = self.run_push(self.new)
        self.assertEqual(code, 1)
        self.assertIn("not activated on fs2", data["result"])
        self.assertEqual(self.epochs(), {"fs1": 1, "fs2": 0, "fs3": 1})
        self.clock.advance(STAGE_TTL)
        self.assertIsNone(self.nodes["fs2"].stager.status()["staged"])
        self.nodes["fs2"].fail_activate = False
        code, data = self.run_push(self.new)
        self.assertEqual(code, 0, data)
        self.assertEqual(self.epochs(), {"fs1": 1, "fs2": 1, "fs3": 1})

    def test_push_from_a_host_whose_file_is_old(self) -> None:
        code, _ = self.run_push(self.new)
        self.assertEqual(code, 0)
        # this host's file (self.ws.path) still has fs3 at 50; the diff is against the
        # cluster's newest config, and the epoch above the cluster's
        newer = priority(self.new, "fs2", 90)
        code, data = self.run_push(newer, dry_run=True)
        self.assertEqual(code, 0, data)
        self.assertEqual([c["key"] for c in data["changes"]], ["node.fs2.priority"])
        self.assertEqual(data["epoch"], 2)
        self.assertEqual(data["base"]["epoch"], 1)

    def test_pushing_the_old_config_back_is_a_new_epoch(self) -> None:
        self.run_push(self.new)
        code, data = self.run_push(self.ws.text)
        self.assertEqual(code, 0, data)
        self.assertEqual(self.epochs(), {"fs1": 2, "fs2": 2, "fs3": 2})
        self.assertEqual(json.loads(json.dumps(data))["changes"][0]["new"], "50")


class NodeSideTests(SynchronousTestCase):
    """Nodes switching to a pushed config one after the other (FakeCluster: real nodes,
    one fake clock, a fake network)."""

    def test_switch_reranks_moves_no_slot_and_the_new_first_takes_over(self) -> None:
        from tests.fakecluster import FakeCluster, make_config

        old = make_config(nodes=3, slots=1)
        cluster = FakeCluster(old)
        cluster.start_all()
        cluster.advance(3)
        self.assertEqual(cluster.masters(), {"slot1": "fs1"})
        names = {n.node_id: n.name for n in old.nodes}
        self.assertEqual([names[n] for n in cluster.nodes["fs1"].roles.ranking],
                         ["fs2", "fs3"])
        new = dataclasses.replace(old, nodes=tuple(
            dataclasses.replace(n, priority=300) if n.name == "fs3" else n
            for n in old.nodes))
        object.__setattr__(new, "digest", config_digest(new))
        self.assertNotEqual(new.digest, old.digest)
        cluster.nodes["fs2"].replace_config(new)  # one node first: the window
        cluster.advance(0.5)
        self.assertEqual(cluster.masters(), {"slot1": "fs1"})
        fs1_view = {n["name"]: n["config"] for n in cluster.nodes["fs1"].status()["nodes"]}
        self.assertEqual(fs1_view["fs2"], "other")
        for name in ("fs1", "fs3"):
            cluster.nodes[name].replace_config(new)
        cluster.advance(0.5)
        self.assertEqual(cluster.masters(), {"slot1": "fs1"})
        views = {node.roles.digest for node in cluster.nodes.values()}
        self.assertEqual(len(views), 1)
        self.assertEqual([names[n] for n in cluster.nodes["fs1"].roles.ranking],
                         ["fs3", "fs2"])
        self.assertFalse(any(n["config"] == "other"
                             for n in cluster.nodes["fs1"].status()["nodes"]))
        cluster.kill("fs1")
        cluster.advance(3)
        self.assertEqual(cluster.masters(), {"slot1": "fs3"})
