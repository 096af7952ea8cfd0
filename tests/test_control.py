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
