"""A node catching up with the cluster's config by itself: the seal, the pure plan on
fake clock values, and nodes (real stagers and files, a fake network of replication
links on a fake clock) that were down during a push, restarted with an old file, given a
bogus file, partitioned, or edited by hand."""

from __future__ import annotations

import json
import shutil
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fsha.config import ClusterConfig
from fsha.configcatchup import ANSWER_WAIT, POLL, REFUSED_RETRY, CatchUpPlan, Held, Take
from fsha.configfetch import OFFER_PATH, CatchUpStats, ConfigCatchUp
from fsha.configplan import file_epoch, file_id, parse_text, seal_state, sealed, with_epoch
from fsha.configstage import ConfigStager
from fsha.replication.relay import RelayError
from fsha.wire.control import ControlAuth
from tests.test_configpush import SECRET, Workspace, priority


def interval(text: str, value: int) -> str:
    """``text`` with the heartbeat interval changed (a restart-needed setting)."""
    head, sep, tail = text.partition("heartbeat_interval_ms = ")
    assert sep
    return head + sep + str(value) + tail[tail.index("\n"):]


class SealTests(SynchronousTestCase):
    def test_sealed_hand_edited_and_none(self) -> None:
        text = sealed("[cluster]\nname = \"x\"\n", 7, SECRET)
        self.assertEqual(file_epoch(text), 7)
        self.assertEqual(seal_state(text, SECRET), "sealed")
        self.assertEqual(seal_state(sealed(text, 8, SECRET), SECRET), "sealed")  # resealed
        self.assertEqual(seal_state(text.replace('"x"', '"y"'), SECRET), "hand-edited")
        self.assertEqual(seal_state(text.replace(": 7", ": 9", 1), SECRET), "hand-edited")
        self.assertEqual(seal_state(text, b"another secret"), "hand-edited")
        self.assertEqual(seal_state(with_epoch("[cluster]\n", 3), SECRET), "hand-edited")
        self.assertEqual(seal_state("[cluster]\n", SECRET), "none")
        self.assertNotEqual(file_id(text), file_id(sealed("[cluster]\nname = \"x\"\n", 8,
                                                          SECRET)))

    def test_a_push_writes_a_sealed_file(self) -> None:
        ws = Workspace(self)
        stager = ConfigStager(ws.config(), "fs2", SECRET, Clock(), lambda c: None,
                              lambda kind, **f: None)
        answer = stager.stage(1, priority(ws.text, "fs3", 300))
        stager.activate(1, bytes.fromhex(answer["digest"]))
        self.assertEqual(seal_state(ws.path.read_text(), SECRET), "sealed")


def held(epoch: int, file: str = "f", seal: str = "sealed") -> Held:
    return Held(epoch, "d" * 16, file * 16, seal)


class PlanTests(SynchronousTestCase):
    """The decisions alone, on clock values."""

    def test_asks_new_links_at_once_then_every_poll(self) -> None:
        plan = CatchUpPlan()
        plan.links({"fs1", "fs2"}, 0.0)
        self.assertEqual(plan.to_ask(0.0), ["fs1", "fs2"])
        plan.asking("fs1", 0.0)
        plan.asking("fs2", 0.0)
        self.assertEqual(plan.to_ask(1.0), [])  # in flight
        plan.answered("fs1", held(1), None, 0.1)
        plan.failed("fs2")
        self.assertEqual(plan.to_ask(POLL - 1), [])
        self.assertEqual(plan.to_ask(POLL), ["fs1", "fs2"])
        plan.links({"fs1"}, POLL)  # fs2's link went down: forgotten, asked at once later
        plan.links({"fs1", "fs2"}, POLL + 1)
        self.assertIn("fs2", plan.to_ask(POLL + 1))

    def test_waits_for_every_peer_then_takes_the_highest_whatever_the_order(self) -> None:
        for order in (("fs1", "fs2"), ("fs2", "fs1")):
            plan = CatchUpPlan()
            plan.links({"fs1", "fs2"}, 0.0)
            answers = {"fs1": (held(3, "a"), "three"), "fs2": (held(5, "b"), "five")}
            plan.answered(order[0], *answers[order[0]], 0.1)
            self.assertIsNone(plan.decide(held(1, "z"), 0.1))  # the other may be newer
            plan.answered(order[1], *answers[order[1]], 0.2)
            self.assertEqual(plan.decide(held(1, "z"), 0.2), Take("fs2", held(5, "b"), "five"))

    def test_a_silent_peer_is_waited_for_only_a_while(self) -> None:
        plan = CatchUpPlan()
        plan.links({"fs1", "fs2"}, 0.0)
        plan.answered("fs1", held(3, "a"), "three", 0.1)
        self.assertIsNone(plan.decide(held(1, "z"), 1.0))
        self.assertEqual(plan.waiting(1.0), ["fs2"])
        self.assertEqual(plan.decide(held(1, "z"), ANSWER_WAIT).peer, "fs1")

    def test_a_conflict_is_taken_by_nobody_a_lower_agreed_epoch_is(self) -> None:
        plan = CatchUpPlan()
        plan.links({"fs1", "fs2", "fs4"}, 0.0)
        plan.answered("fs1", held(6, "a"), "six a", 0.1)
        plan.answered("fs2", held(6, "b"), "six b", 0.1)
        self.assertIsNone(plan.decide(held(4, "z"), 0.1))  # fs4 not heard yet
        plan.answered("fs4", held(5, "c"), "five", 0.1)
        self.assertEqual(plan.decide(held(4, "z"), 0.2), Take("fs4", held(5, "c"), "five"))
        problems = plan.problems(held(5, "c"), 0.2)
        self.assertEqual(len(problems), 1)
        self.assertIn("config epoch 6 is held with different files: fs1 file aaaaaaaa; fs2 "
                      "file bbbbbbbb", problems[0])
        self.assertIsNone(plan.decide(held(5, "c"), 0.2))

    def test_a_refused_file_waits_and_does_not_block_a_good_one(self) -> None:
        plan = CatchUpPlan()
        plan.links({"evil", "fs1"}, 0.0)
        plan.answered("evil", held(10**17, "e"), "bogus", 0.1)
        plan.answered("fs1", held(2, "a"), "two", 0.1)
        bogus = plan.decide(held(1, "z"), 0.1)
        assert bogus is not None
        self.assertEqual(bogus.peer, "evil")
        plan.refuse(bogus, "its seal is wrong", 0.1)
        self.assertEqual(plan.decide(held(1, "z"), 0.2), Take("fs1", held(2, "a"), "two"))
        self.assertEqual(plan.refusals, 1)
        self.assertIn("refused (1x", plan.problems(held(2, "a"), 0.2)[0])
        self.assertEqual(plan.status(held(2, "a"), 0.2)["state"], "not taken")
        self.assertIsNone(plan.decide(held(2, "a"), REFUSED_RETRY))  # 0.1 s to go
        self.assertEqual(plan.decide(held(2, "a"), REFUSED_RETRY + 0.1), bogus)  # tried again

    def test_hand_edited_here_takes_nothing_there_is_not_taken(self) -> None:
        plan = CatchUpPlan()
        plan.links({"fs1", "fs3"}, 0.0)
        plan.answered("fs1", held(5, "a"), "five", 0.1)
        plan.answered("fs3", held(9, "h", "hand-edited"), None, 0.1)
        mine = held(4, "m", "hand-edited")
        self.assertIsNone(plan.decide(mine, 0.1))
        self.assertEqual(plan.status(mine, 0.1)["state"], "hand-edited")
        self.assertIn("edited after its push", plan.problems(mine, 0.1)[0])
        self.assertIn("the cluster holds epoch 5", plan.problems(mine, 0.1)[0])
        self.assertEqual(plan.decide(held(4, "m"), 0.1), Take("fs1", held(5, "a"), "five"))
        self.assertTrue(any("fs3 holds a config file edited by hand" in p
                            for p in plan.problems(held(4, "m"), 0.1)))

    def test_ahead_and_in_step(self) -> None:
        plan = CatchUpPlan()
        plan.links({"fs1"}, 0.0)
        plan.answered("fs1", held(5, "a"), None, 0.1)
        self.assertEqual(plan.status(held(9, "n"), 0.1)["state"], "ahead")
        self.assertEqual(plan.status(held(5, "a"), 0.1)["state"], "in step")
        self.assertEqual(plan.problems(held(5, "a"), 0.1), [])
        self.assertIn("another file at this node's epoch 5",
                      plan.problems(held(5, "x"), 0.1)[0])


class Net:
    """Replication links between in-memory nodes: a request reaches the peer's control
    endpoint check (signature, freshness, nonce) and its offer, one tick later."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.nodes: dict[str, Node] = {}
        self.cut: set[frozenset[str]] = set()

    def relay(self, me: str) -> Any:
        net = self

        class Relay:
            def links(self, peer: str) -> object | None:
                up = peer in net.nodes and net.nodes[peer].running and \
                    frozenset((me, peer)) not in net.cut
                return object() if up else None

            def request(self, peer: str, auth: str, path: str, body: bytes
                        ) -> defer.Deferred[tuple[int, bytes]]:
                d: defer.Deferred[tuple[int, bytes]] = defer.Deferred()

                def deliver() -> None:
                    if self.links(peer) is None:
                        d.errback(RelayError(f"the replication link to {peer} went down"))
                    else:
                        d.callback(net.nodes[peer].serve(auth, path, body))
                net.clock.callLater(0.01, deliver)
                return d
        return Relay()


class Node:
    def __init__(self, case: SynchronousTestCase, net: Net, name: str,
                 text: str | None = None) -> None:
        self.name = name
        self.net = net
        self.ws = Workspace(case)
        if text is not None:
            self.ws.path.write_text(text)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.applied: list[ClusterConfig] = []
        self.auth = ControlAuth(SECRET, "demo", name)
        net.nodes[name] = self
        self.start()

    def start(self) -> None:
        """A (re)start: the file as it is now."""
        self.stager = ConfigStager(self.ws.config(), self.name, SECRET, self.net.clock,
                                   self.applied.append,
                                   lambda kind, **f: self.events.append((kind, f)))
        self.catchup = ConfigCatchUp(self.stager, SECRET, "demo", self.net.relay(self.name),
                                     self.net.clock)
        self.catchup.startService()
        self.running = True

    def stop(self) -> None:
        self.catchup.stopService()
        self.running = False

    def serve(self, header: str, path: str, body: bytes) -> tuple[int, bytes]:
        verdict = self.auth.check(header, "POST", path, self.net.clock.seconds())
        assert path == OFFER_PATH and not hasattr(verdict, "code"), verdict
        return 200, json.dumps(self.catchup.offer(json.loads(body))).encode()

    def push(self, epoch: int, text: str) -> None:
        answer = self.stager.stage(epoch, text)
        self.stager.activate(epoch, bytes.fromhex(answer["digest"]))

    @property
    def epoch(self) -> int:
        return self.stager.epoch


class CatchUpTests(SynchronousTestCase):
    """Nodes with real stagers and files on a fake clock, linked by :class:`Net`."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.net = Net(self.clock)
        base = Workspace(self).text
        self.base = base
        self.nodes = {n: Node(self, self.net, n) for n in ("fs1", "fs2", "fs3")}
        for n in self.nodes.values():
            self.addCleanup(n.stop)

    def run_for(self, seconds: float) -> None:
        for _ in range(int(seconds * 100)):
            self.clock.advance(0.01)

    def test_down_during_a_push_it_catches_up_online_by_itself(self) -> None:
        fs1, fs2, fs3 = self.nodes.values()
        fs3.stop()
        new = priority(self.base, "fs3", 300)
        fs1.push(1, new)
        fs2.push(1, new)
        self.run_for(2)
        self.assertEqual(fs3.ws.path.read_text(), self.base)  # down: nothing
        fs3.start()  # with its old file
        self.assertEqual(fs3.epoch, 0)
        self.run_for(1)
        self.assertEqual(fs3.epoch, 1)
        self.assertEqual(fs3.ws.path.read_text(), fs1.ws.path.read_text())
        self.assertEqual(seal_state(fs3.ws.path.read_text(), SECRET), "sealed")
        self.assertEqual([c.node("fs3").priority for c in fs3.applied], [300])
        self.assertEqual(fs3.events[-1], ("config", {
            "digest": parse_text(new, fs3.ws.path).digest.hex(),
            "previous": parse_text(self.base, fs3.ws.path).digest.hex(), "epoch": 1,
            "source": "fs1"}))
        status = fs3.catchup.status()
        self.assertEqual((status["state"], status["taken"], status["problems"]),
                         ("in step", 1, []))
        self.run_for(POLL * 2)  # polls on: nothing more is taken
        self.assertEqual(fs3.catchup.taken, 1)

    def test_two_pushes_missed_and_peers_at_different_epochs(self) -> None:
        fs1, fs2, fs3 = self.nodes.values()
        fs3.stop()
        one, two = priority(self.base, "fs3", 300), priority(self.base, "fs2", 400)
        fs1.push(1, one)
        fs2.push(1, one)
        fs1.push(2, two)  # fs2 missed this one
        fs3.start()
        self.run_for(1)
        self.assertEqual((fs2.epoch, fs3.epoch), (2, 2))  # both from fs1, straight to 2
        self.assertEqual([e[1]["source"] for e in fs3.events if e[0] == "config"], ["fs1"])

    def test_restart_needed_written_not_run_and_said_loudly(self) -> None:
        fs1, fs2, fs3 = self.nodes.values()
        fs3.stop()
        # the others ran a rolling restart with another interval, then a push on top
        new = interval(self.base, 40)
        for node in (fs1, fs2):
            node.ws.path.write_text(new)
            node.stop()
            node.start()
            node.push(1, priority(new, "fs3", 300))
        fs3.start()
        self.run_for(1)
        self.assertEqual(fs3.epoch, 0)  # runs its old config
        self.assertEqual(fs3.applied, [])
        self.assertEqual(file_epoch(fs3.ws.path.read_text()), 1)  # the next restart is right
        status = fs3.catchup.status()
        self.assertEqual(status["state"], "restart needed")
        keys = status["pending"]["keys"]
        self.assertIn("cluster.heartbeat_interval", keys)
        self.assertIn(f"{', '.join(keys)} need(s) a restart; nothing restarts by itself",
                      status["problems"][0])
        self.assertEqual(fs3.events[-1][0], "config-pending")
        self.assertEqual(fs3.events[-1][1]["keys"], keys)
        # it offers the file it holds, and asks for nothing more
        self.assertEqual(fs3.catchup.offer({"epoch": 0})["epoch"], 1)
        self.run_for(POLL * 2)
        self.assertEqual(fs3.catchup.taken, 1)
        fs3.stop()
        fs3.start()  # the operator's restart: it runs the file
        self.assertEqual(fs3.epoch, 1)
        self.assertEqual(fs3.stager.running.heartbeat_interval, 0.04)

    def test_a_bogus_file_with_a_huge_epoch_is_refused_counted_never_written(self) -> None:
        fs1, fs2, fs3 = self.nodes.values()
        evil = sealed(priority(self.base, "fs1", 1), 10**17, b"not the cluster secret")
        fs2.stop()
        fs1.push(1, priority(self.base, "fs3", 300))
        fs1.catchup.offer = lambda body: {  # type: ignore[method-assign]
            "node": "fs1", "epoch": 10**17, "file": file_id(evil), "seal": "sealed",
            "digest": parse_text(evil, fs1.ws.path).digest.hex(), "text": evil}
        self.run_for(2)
        self.assertEqual(fs3.epoch, 0)
        self.assertEqual(fs3.ws.path.read_text(), self.base)
        status = fs3.catchup.status()
        self.assertEqual(status["refusals"], 1)
        self.assertIn("its seal is wrong", status["problems"][0])
        self.assertEqual(fs3.events[-1][0], "config-refused")
        self.run_for(POLL * 2)
        self.assertEqual(fs3.catchup.status()["refusals"], 1)  # not retried at once
        self.assertEqual(fs3.catchup.stats(), CatchUpStats(taken=0, refused=1))
        from fsha.metrics import StatsSources
        from tests.test_metrics import NODE, one, scrape

        _, m = scrape(StatsSources(node=lambda: NODE, catchup=fs3.catchup.stats))
        self.assertEqual(one(m, "fsha_config_catchup_total", result="refused"), 1)
        self.assertEqual(one(m, "fsha_config_catchup_total", result="taken"), 0)

    def test_a_sealed_file_that_is_not_what_was_announced_is_refused(self) -> None:
        fs1, fs2, fs3 = self.nodes.values()
        good = sealed(priority(self.base, "fs3", 300), 1, SECRET)
        other = sealed(priority(self.base, "fs3", 301), 1, SECRET)
        fs1.catchup.offer = lambda body: {  # type: ignore[method-assign]
            "node": "fs1", "epoch": 1, "file": file_id(good), "seal": "sealed",
            "digest": parse_text(good, fs1.ws.path).digest.hex(), "text": other}
        fs2.stop()
        self.run_for(2)
        self.assertEqual(fs3.ws.path.read_text(), self.base)
        self.assertIn("not the file announced", fs3.catchup.status()["refused"][0]["reason"])

    def test_partition_then_heal(self) -> None:
        fs1, fs2, fs3 = self.nodes.values()
        self.net.cut |= {frozenset(("fs1", "fs3")), frozenset(("fs2", "fs3"))}
        new = priority(self.base, "fs3", 300)
        fs1.push(1, new)
        fs2.push(1, new)
        self.run_for(POLL * 2)
        self.assertEqual(fs3.epoch, 0)
        self.net.cut.clear()
        self.run_for(2)
        self.assertEqual(fs3.epoch, 1)

    def test_a_push_on_each_side_of_a_partition_is_a_conflict_nobody_takes(self) -> None:
        fs1, fs2, fs3 = self.nodes.values()
        self.net.cut |= {frozenset(("fs1", "fs2")), frozenset(("fs1", "fs3"))}
        fs1.push(1, priority(self.base, "fs3", 300))
        fs2.push(1, priority(self.base, "fs2", 400))
        self.run_for(1)
        self.assertEqual(fs3.epoch, 1)  # from fs2, the only one it hears
        self.net.cut.clear()
        self.run_for(POLL + 1)
        self.assertEqual({n.epoch for n in self.nodes.values()}, {1})
        self.assertNotEqual(fs1.ws.path.read_text(), fs2.ws.path.read_text())  # kept
        self.assertEqual(fs1.catchup.status()["state"], "conflict")
        self.assertIn("another file at this node's epoch 1", fs1.catchup.status()["problems"][0])

    def test_a_file_edited_by_hand_is_neither_replaced_nor_offered(self) -> None:
        fs1, fs2, fs3 = self.nodes.values()
        fs3.stop()
        new = priority(self.base, "fs3", 300)
        fs1.push(1, new)
        fs2.push(1, new)
        # fs3's operator bumped the epoch by hand above the cluster's and edited a setting
        fs3.ws.path.write_text(with_epoch(priority(self.base, "fs1", 7), 5))
        fs3.start()
        self.run_for(POLL + 1)
        self.assertEqual(fs3.epoch, 5)
        self.assertEqual(file_epoch(fs3.ws.path.read_text()), 5)
        self.assertEqual((fs1.epoch, fs2.epoch), (1, 1))  # not taken from fs3 either
        self.assertIn("edited after its push", fs3.catchup.status()["problems"][0])
        self.assertTrue(any("fs3 holds a config file edited by hand" in p
                            for p in fs1.catchup.status()["problems"]))

    def test_a_sealed_file_above_the_cluster_wins(self) -> None:
        fs1, fs2, fs3 = self.nodes.values()
        for node in (fs1, fs2):
            node.stop()
        fs3.push(4, priority(self.base, "fs3", 300))  # pushed while the others were down
        for node in (fs1, fs2):
            node.start()
        self.run_for(1)
        self.assertEqual({n.epoch for n in self.nodes.values()}, {4})
        self.assertEqual(fs3.catchup.status()["state"], "ahead")  # as last heard
        self.run_for(POLL)
        self.assertEqual(fs3.catchup.status()["state"], "in step")

    def test_the_file_changed_on_disk_since_start_is_not_replaced(self) -> None:
        fs1, _fs2, fs3 = self.nodes.values()
        fs3.stop()
        fs1.push(1, priority(self.base, "fs3", 300))
        fs3.start()
        fs3.ws.path.write_text(priority(self.base, "fs2", 1))  # an edit, no restart yet
        self.run_for(2)
        self.assertEqual(fs3.ws.path.read_text(), priority(self.base, "fs2", 1))
        self.assertIn("changed since this node read it",
                      fs3.catchup.status()["refused"][0]["reason"])

    def test_a_restart_mid_fetch_leaves_the_old_file_and_asks_again(self) -> None:
        fs1, _fs2, fs3 = self.nodes.values()
        fs3.stop()
        fs1.push(1, priority(self.base, "fs3", 300))
        fs3.start()
        self.clock.advance(0.005)  # asked; the answer is on its way
        fs3.stop()
        self.run_for(1)
        self.assertEqual(fs3.ws.path.read_text(), self.base)
        fs3.start()
        self.run_for(1)
        self.assertEqual(fs3.epoch, 1)

    def test_offer_answers_the_text_only_above_the_asker(self) -> None:
        fs1 = self.nodes["fs1"]
        self.assertNotIn("text", fs1.catchup.offer({"epoch": 0}))  # epoch 0: nothing to give
        fs1.push(2, priority(self.base, "fs3", 300))
        self.assertIn("text", fs1.catchup.offer({"epoch": 1}))
        self.assertNotIn("text", fs1.catchup.offer({"epoch": 2}))
        with self.assertRaises(ValueError):
            fs1.catchup.offer({"epoch": "2"})




class StatusWordsTests(SynchronousTestCase):
    """``fsha status`` and ``--all`` (real node statuses from a FakeCluster) with the
    catch-up section of a node that caught up a restart-needed file."""

    def test_restart_needed_and_catching_up_in_words(self) -> None:
        from fsha.clusterview import render_all
        from fsha.status import problems, render
        from tests.fakecluster import FakeCluster, make_config

        cluster = FakeCluster(make_config(nodes=3, slots=2))
        cluster.start_all()
        cluster.advance(cluster.config.discovery + 0.5)
        views = {n: cluster.nodes[n].status() for n in ("fs1", "fs2", "fs3")}
        pending = {"state": "restart needed", "taken": 1, "refusals": 0, "held": 2,
                   "pending": {"epoch": 2, "digest": "b" * 16, "from": "fs1",
                               "keys": ["cluster.heartbeat_interval"], "age_s": 3.0},
                   "problems": ["config epoch 2 (digest bbbbbbbb, from fs1) is in the file "
                                "but this node still runs epoch 1: cluster.heartbeat_interval "
                                "need(s) a restart"]}
        views["fs3"]["config"] = {"epoch": 1, "digest": "a" * 16, "staged": None,
                                  "catch_up": pending}
        views["fs2"]["config"] = {"epoch": 1, "digest": "a" * 16, "staged": None,
                                  "catch_up": {"state": "behind", "problems": []}}
        self.assertIn("config: config epoch 2 (digest bbbbbbbb, from fs1) is in the file",
                      " ".join(problems(views["fs3"])))
        self.assertIn("epoch 2 in the file (RESTART NEEDED)", render(views["fs3"]))
        self.assertIn(", CATCHING UP", render(views["fs2"]))
        text = render_all(["fs1", "fs2", "fs3"], views)  # type: ignore[arg-type]
        self.assertIn("epoch 1 (file: 2, restart needed)", text)
        self.assertIn("epoch 1 (catching up)", text)


class PushSealTests(SynchronousTestCase):
    """The push against files compared by their text (not only the digest) and seals."""

    def setUp(self) -> None:
        from tests.test_configpush import PushTests

        self.case = PushTests()
        self.case.setUp()
        self.addCleanup(shutil.rmtree, self.case.ws.dir, True)

    def restart_all(self, text: str) -> None:
        for name, node in self.case.nodes.items():
            node.path.write_text(text)
            node.stager = ConfigStager(parse_text(text, node.path), name, SECRET,
                                       self.case.clock, lambda c: None,
                                       lambda *a, **k: None)
        self.case.ws.path.write_text(text)

    def test_a_notify_only_change_is_pushed(self) -> None:
        # [notify] is not in the config digest: the push compares the files themselves
        base = self.case.ws.text + '\n[notify]\ncommand = ["/bin/true"]\n'
        self.restart_all(base)
        code, data = self.case.run_push(base.replace("/bin/true", "/bin/false"))
        self.assertEqual(code, 0, data)
        self.assertEqual(self.case.epochs(), {"fs1": 1, "fs2": 1, "fs3": 1})
        self.assertIn('command = ["/bin/false"]', self.case.nodes["fs3"].path.read_text())

    def test_the_same_file_pushed_again_seals_files_whose_seal_is_wrong(self) -> None:
        # e.g. after a change of the cluster secret: every file's seal is wrong
        text = with_epoch(self.case.ws.text, 3)
        self.restart_all(text)
        code, data = self.case.run_push(self.case.ws.text)
        self.assertEqual(code, 0, data)
        self.assertTrue(any("no valid seal" in line for line in data["lines"]), data)
        self.assertEqual(self.case.epochs(), {"fs1": 4, "fs2": 4, "fs3": 4})
        self.assertEqual(seal_state(self.case.nodes["fs1"].path.read_text(), SECRET),
                         "sealed")
        code, data = self.case.run_push(self.case.ws.text)
        self.assertIn("nothing to push", data["result"])
