"""Operator commands: maintenance and switchover, and the token-protected endpoint."""

from __future__ import annotations

import io
import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from fsha.control import ControlResource, control_token
from fsha.wire.heartbeat import Flags, Role

from .fakecluster import SECRET, FakeCluster, make_config


def formed(nodes: int = 3, slots: int = 2) -> FakeCluster:
    cluster = FakeCluster(make_config(nodes=nodes, slots=slots))
    cluster.start_all()
    cluster.advance(cluster.config.discovery + 0.5)
    return cluster


class MaintenanceTests(SynchronousTestCase):
    def test_master_drained_then_back_as_slave(self) -> None:
        cluster = formed()
        fs1 = cluster.nodes["fs1"]
        fs1.set_maintenance(True)
        cluster.advance(0.2)
        self.assertEqual(cluster.masters(), {"slot1": "fs3", "slot2": "fs2"})
        self.assertEqual(fs1.role, Role.SLAVE)
        self.assertIn(Flags.MAINTENANCE, fs1.flags())
        self.assertEqual(cluster.nodes["fs2"].roles.ranking, (), "not a candidate")
        fs1.set_maintenance(False)
        cluster.advance(0.2)
        self.assertEqual(cluster.nodes["fs2"].roles.ranking, (0,))
        self.assertEqual(cluster.masters(), {"slot1": "fs3", "slot2": "fs2"}, "no preemption")

    def test_slave_in_maintenance_does_not_take_over(self) -> None:
        cluster = formed(nodes=4, slots=2)
        cluster.nodes["fs3"].set_maintenance(True)
        cluster.kill("fs1")
        cluster.advance(1.0)
        self.assertEqual(cluster.masters(), {"slot1": "fs4", "slot2": "fs2"})


class SwitchoverTests(SynchronousTestCase):
    def test_planned_move_to_the_primary_candidate(self) -> None:
        cluster = formed()
        self.assertEqual(cluster.nodes["fs1"].switchover("slot1", to="fs3"), "fs3")
        cluster.advance(0.2)
        self.assertEqual(cluster.masters(), {"slot1": "fs3", "slot2": "fs2"})
        fs1 = cluster.nodes["fs1"]
        self.assertEqual(fs1.role, Role.SLAVE)
        self.assertEqual(cluster.nodes["fs3"].epoch, 2)
        self.assertEqual(cluster.actions["fs3"].fenced, [False], "a hand-over is not fenced")
        # it does not take the slot straight back, and is a candidate again later
        cluster.advance(3.0)
        self.assertEqual(cluster.masters(), {"slot1": "fs3", "slot2": "fs2"})
        self.assertEqual(cluster.nodes["fs2"].roles.ranking, (0,))

    def test_refusals_say_why(self) -> None:
        cluster = formed()
        fs1, fs3 = cluster.nodes["fs1"], cluster.nodes["fs3"]
        for node, slot, to, text in (
                (fs3, "slot1", None, "fs3 is not the master of slot1; its master is fs1"),
                (fs1, "slot9", None, "no slot named 'slot9'"),
                (fs1, "slot1", "fs2", "fs2 is not the primary candidate (ranking: fs3)")):
            with self.assertRaises(ValueError) as caught:
                node.switchover(slot, to)
            self.assertIn(text, str(caught.exception))
        cluster.health["fs3"].ok = False
        cluster.advance(0.2)
        with self.assertRaises(ValueError) as caught:
            fs1.switchover("slot1")
        self.assertIn("no slave is ready", str(caught.exception))
        self.assertEqual(cluster.masters(), {"slot1": "fs1", "slot2": "fs2"}, "nothing moved")


class EndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = formed()
        self.node = self.cluster.nodes["fs1"]
        self.resource = ControlResource(self.node, control_token(SECRET))

    def post(self, path: str, body: object, token: str | None = None) -> tuple[int, dict]:
        request = DummyRequest(path.strip("/").split("/"))
        request.method = b"POST"
        request.path = path.encode()
        request.content = io.BytesIO(body if isinstance(body, bytes) else
                                     json.dumps(body).encode())
        if token is not None:
            request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}"])
        data = self.resource.render(request)
        return request.responseCode or 200, json.loads(data)

    def test_token_required(self) -> None:
        for token in (None, "", control_token(b"another-cluster-secret!!"), "x" * 64):
            code, body = self.post("/control/maintenance", {"on": True}, token)
            self.assertEqual((code, body), (401, {"error": "bad or missing token"}))
        self.assertFalse(self.node.maintenance, "a refused request changes nothing")

    def test_commands_and_errors(self) -> None:
        token = control_token(SECRET)
        self.assertEqual(self.post("/control/maintenance", b"{nope", token)[0], 400)
        self.assertEqual(self.post("/control/maintenance", {"on": "yes"}, token)[0], 409)
        self.assertEqual(self.post("/control/reboot", {}, token)[0], 404)
        code, body = self.post("/control/switchover", {"slot": "slot2"}, token)
        self.assertEqual(code, 409)
        self.assertIn("its master is fs2", body["error"])
        code, body = self.post("/control/switchover", {"slot": "slot1", "to": None}, token)
        self.assertEqual((code, body), (200, {"slot": "slot1", "from": "fs1", "to": "fs3"}))
        self.cluster.advance(0.2)
        self.assertEqual(self.cluster.masters()["slot1"], "fs3")
        code, body = self.post("/control/maintenance", {"on": True}, token)
        self.assertEqual((code, body["maintenance"]), (200, True))


class PlannedMoveOrderTests(SynchronousTestCase):
    """A planned move releases on the old master before the new one claims."""

    def holders(self, cluster: FakeCluster, slot: str) -> set[str]:
        return {name for name, a in cluster.actions.items() if slot in a.held}

    def run_move(self, move: str) -> tuple[FakeCluster, list[set[str]]]:
        cluster = formed()
        self.assertEqual(cluster.masters(), {"slot1": "fs1", "slot2": "fs2"})
        fs1 = cluster.nodes["fs1"]
        cluster.actions["fs1"].hang_release = True
        if move == "switchover":
            fs1.switchover("slot1")
        elif move == "maintenance":
            fs1.set_maintenance(True)
        else:
            fs1.stop()
        samples: list[set[str]] = []
        for _ in range(1000):  # 1 s: five dead-after times of a release that hangs
            cluster.advance(0.001)
            samples.append(self.holders(cluster, "slot1"))
        self.assertEqual(fs1.role, Role.RELEASING)
        self.assertEqual([c for c in cluster.actions["fs3"].calls if c[0] == "acquire"], [],
                         f"{move}: fs3 claimed while fs1 was still releasing")
        self.assertNotIn("slot1", cluster.masters())
        cluster.actions["fs1"].pending_releases.pop().callback(None)
        samples.append(self.holders(cluster, "slot1"))
        for _ in range(200):
            cluster.advance(0.001)
            samples.append(self.holders(cluster, "slot1"))
        return cluster, samples

    def test_release_done_before_the_successor_claims(self) -> None:
        for move in ("switchover", "maintenance", "sigterm"):
            cluster, samples = self.run_move(move)
            self.assertEqual(cluster.masters()["slot1"], "fs3", move)
            self.assertTrue(all(len(s) <= 1 for s in samples),
                            f"{move}: two holders of slot1 at once")
            # the order, as the holders were sampled: fs1 alone, nobody, then fs3 alone
            order = [next(iter(s), None) for i, s in enumerate(samples)
                     if i == 0 or s != samples[i - 1]]
            self.assertEqual(order, ["fs1", None, "fs3"], move)
            self.assertEqual(cluster.actions["fs3"].fenced, [False],
                             f"{move}: a finished hand-over is not fenced")

    def test_master_dying_mid_release_is_fenced(self) -> None:
        cluster = formed()
        cluster.actions["fs1"].hang_release = True
        cluster.nodes["fs1"].switchover("slot1")
        cluster.advance(0.2)
        cluster.kill("fs1")  # its floating IP may still be up: not a hand-over
        cluster.advance(1.0)
        self.assertEqual(cluster.masters()["slot1"], "fs3")
        self.assertEqual(cluster.actions["fs3"].fenced, [True])
