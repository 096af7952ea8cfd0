"""Operator commands: maintenance and switchover, the signed endpoint, planned-move order."""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from fsha.cli.control import (
    Failed,
    get_status,
    maintenance_done,
    maintenance_seen,
    post,
    switchover_done,
    wait_until,
)
from fsha.nodecontrol import ControlResource, StatusSite
from fsha.status import status_site_root
from fsha.wire.control import ControlAuth, sign
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
        self.name = self.cluster.config.name
        self.resource = ControlResource(self.node, ControlAuth(SECRET, self.name, "fs1"),
                                        self.cluster.clock)

    def post(self, path: str, body: object, node: str | None = "fs1",
             auth: str | None = None, method: bytes = b"POST") -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = DummyRequest(path.strip("/").split("/"))
        request.method = method
        request.path = path.encode()
        request.content = io.BytesIO(data)
        if auth is None and node is not None:
            auth = sign(SECRET, self.name, node, method.decode(), path, data,
                        self.cluster.clock.seconds())
        if auth is not None:
            request.requestHeaders.setRawHeaders(b"authorization", [auth])
        out = self.resource.render(request)
        return request.responseCode or 200, json.loads(out)

    def test_signature_required(self) -> None:
        for node, auth, code, text in (
                (None, None, 401, "missing signature"),
                (None, "Bearer " + "0" * 64, 401, "static bearer tokens are no longer"),
                ("fs2", None, 421, "this request is for fs2, it reached fs1")):
            got, body = self.post("/control/maintenance", {"on": True}, node, auth)
            self.assertEqual(got, code)
            self.assertIn(text, body["error"])
        self.assertFalse(self.node.maintenance, "a refused request changes nothing")
        self.assertEqual(self.resource.status(), {"accepted": 0, "refused": {"401": 2,
                                                                             "421": 1},
                                                  "nonces": 0})

    def test_body_must_match_its_signature(self) -> None:
        auth = sign(SECRET, self.name, "fs1", "POST", "/control/maintenance", b'{"on": false}',
                    self.cluster.clock.seconds())
        code, body = self.post("/control/maintenance", {"on": True}, auth=auth)
        self.assertEqual((code, body), (400, {"error": "the body does not match its signature"}))
        self.assertFalse(self.node.maintenance)

    def test_only_post(self) -> None:
        for method in (b"HEAD", b"GET", b"PUT"):
            code, _ = self.post("/control/maintenance", {"on": True}, method=method)
            self.assertEqual(code, 405, method)
        self.assertFalse(self.node.maintenance)

    def test_commands_and_errors(self) -> None:
        self.assertEqual(self.post("/control/maintenance", b"{nope")[0], 400)
        self.assertEqual(self.post("/control/maintenance", {"on": "yes"})[0], 409)
        self.assertEqual(self.post("/control/reboot", {})[0], 404)
        code, body = self.post("/control/switchover", {"slot": "slot2"})
        self.assertEqual(code, 409)
        self.assertIn("its master is fs2", body["error"])
        code, body = self.post("/control/switchover", {"slot": "slot1", "to": None})
        self.assertEqual((code, body), (200, {"slot": "slot1", "from": "fs1", "to": "fs3"}))
        self.cluster.advance(0.2)
        self.assertEqual(self.cluster.masters()["slot1"], "fs3")
        code, body = self.post("/control/maintenance", {"on": True})
        self.assertEqual((code, body), (200, {"node": "fs1", "maintenance": True,
                                              "role": "slave", "held": None}))

    def test_maintenance_of_a_master_says_what_it_held(self) -> None:
        code, body = self.post("/control/maintenance", {"on": True})
        self.assertEqual((code, body["held"]), (200, "slot1"))
        self.assertNotIn("warning", body, "fs3 takes it over")

    def test_maintenance_with_nobody_to_take_over_warns(self) -> None:
        self.cluster.nodes["fs3"].set_maintenance(True)
        self.cluster.advance(0.2)
        code, body = self.post("/control/maintenance", {"on": True})
        self.assertEqual((code, body["held"]), (200, "slot1"))
        self.assertEqual(body["warning"], "no slave is ready to take slot1 over (none "
                                          "ranked): slot1 has no master until one is")


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


def _exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh loopback connection; everything the server says until it
    closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def _status_line(response: bytes) -> int:
    return int(response.split(b"\r\n", 1)[0].split()[1])


class LoopbackHTTPTests(TestCase):
    """The status site on a real loopback socket: early refusals, bounded bodies."""

    def setUp(self) -> None:
        self.cluster = formed()
        self.node = self.cluster.nodes["fs1"]
        self.cluster_name = self.cluster.config.name
        # the wall clock: requests are signed with the real time here
        control = ControlResource(self.node, ControlAuth(SECRET, self.cluster_name, "fs1"),
                                  reactor)
        site = StatusSite(status_site_root(self.node.status, control), control)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"

    def head(self, path: str, auth: str) -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                "Content-Type: application/json\r\n").encode()

    def run_blocking(self, f: Any, *args: Any) -> Deferred[Any]:
        return deferToThread(f, *args).addTimeout(30, reactor)

    @inlineCallbacks
    def test_head_and_get_are_405_not_500(self) -> Generator[Any, Any, None]:
        for method in ("HEAD", "GET"):
            response = yield self.run_blocking(
                _exchange, self.port.getHost().port,
                f"{method} /control/maintenance HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            self.assertEqual(_status_line(response), 405, response)
            self.assertIn(b"allow: post", response.lower())
        status = yield self.run_blocking(get_status, self.url, 10.0)
        self.assertEqual(status["node"], "fs1", "the status itself is served")

    @inlineCallbacks
    def test_unauthenticated_huge_body_refused_before_it_is_sent(
            self) -> Generator[Any, Any, None]:
        # 400 MiB announced, not a byte of it sent: the answer comes from the headers alone
        data = (self.head("/control/maintenance", "Bearer " + "0" * 64)
                + b"Content-Length: 419430400\r\nExpect: 100-continue\r\n\r\n")
        response = yield self.run_blocking(_exchange, self.port.getHost().port, data)
        self.assertEqual(_status_line(response), 401, response)
        self.assertIn(b"static bearer tokens are no longer accepted", response)
        self.assertNotIn(b"100 Continue", response)
        self.assertFalse(self.node.maintenance)

    @inlineCallbacks
    def test_encoded_control_path_is_gated_too(self) -> Generator[Any, Any, None]:
        data = (self.head("/%63ontrol/maintenance", "Bearer x")
                + b"Content-Length: 419430400\r\n\r\n")
        response = yield self.run_blocking(_exchange, self.port.getHost().port, data)
        self.assertEqual(_status_line(response), 401, response)

    @inlineCallbacks
    def test_authenticated_bodies_are_bounded(self) -> Generator[Any, Any, None]:
        port = self.port.getHost().port
        auth = sign(SECRET, self.cluster_name, "fs1", "POST", "/control/maintenance", b"",
                    time.time())
        announced = self.head("/control/maintenance", auth) + \
            b"Content-Length: 419430400\r\n\r\n"
        response = yield self.run_blocking(_exchange, port, announced)
        self.assertEqual(_status_line(response), 413, response)
        # chunked: no length announced, cut at the bound (20 KiB sent, 16 KiB allowed)
        auth = sign(SECRET, self.cluster_name, "fs1", "POST", "/control/maintenance", b"",
                    time.time())
        chunk = b"2000\r\n" + b" " * 0x2000 + b"\r\n"
        chunked = self.head("/control/maintenance", auth) + \
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 2 + b"1000\r\n" + b" " * 0x1000
        response = yield self.run_blocking(_exchange, port, chunked)
        self.assertEqual(_status_line(response), 413, response)
        self.assertFalse(self.node.maintenance)

    @inlineCallbacks
    def test_signed_request_once_for_its_node_only(self) -> Generator[Any, Any, None]:
        body = json.dumps({"on": True}).encode()
        port = self.port.getHost().port

        def request(node: str) -> bytes:
            auth = sign(SECRET, self.cluster_name, node, "POST", "/control/maintenance", body,
                        time.time())
            return (self.head("/control/maintenance", auth)
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body)

        misdirected = yield self.run_blocking(_exchange, port, request("fs2"))
        self.assertEqual(_status_line(misdirected), 421, misdirected)
        self.assertIn(b"this request is for fs2, it reached fs1", misdirected)
        self.assertFalse(self.node.maintenance, "a request for fs2 never drains fs1")
        good = request("fs1")
        response = yield self.run_blocking(_exchange, port, good)
        self.assertEqual(_status_line(response), 200, response)
        self.assertTrue(self.node.maintenance)
        self.node.set_maintenance(False)
        replayed = yield self.run_blocking(_exchange, port, good)
        self.assertEqual(_status_line(replayed), 401, replayed)
        self.assertIn(b"replayed request", replayed)
        self.assertFalse(self.node.maintenance)
        # the command's own client, end to end
        code, answer = yield self.run_blocking(
            post, self.url, "/control/maintenance", SECRET, self.cluster_name, "fs1",
            {"on": True}, 10.0)
        self.assertEqual((code, answer["node"], answer["maintenance"]), (200, "fs1", True))


class WaitConditionTests(SynchronousTestCase):
    """What --wait waits for, judged on real nodes' status documents (FakeCluster)."""

    def test_maintenance_on_waits_for_the_slot_to_move(self) -> None:
        cluster = formed()
        fs1 = cluster.nodes["fs1"]
        cluster.actions["fs1"].hang_release = True
        fs1.set_maintenance(True)
        cluster.advance(0.1)
        self.assertIsNone(maintenance_done(fs1.status(), "fs1", True, "slot1"))
        self.assertIn("fs1 is releasing of slot1", maintenance_seen(fs1.status(), "fs1",
                                                                   "slot1"))
        cluster.actions["fs1"].pending_releases.pop().callback(None)
        cluster.advance(0.1)
        self.assertEqual(maintenance_done(fs1.status(), "fs1", True, "slot1"),
                         "fs1 is in maintenance and holds no slot; slot1 is mastered by fs3 "
                         "(epoch 2)")
        self.assertIsNone(maintenance_done(fs1.status(), "fs1", False, None))
        fs1.set_maintenance(False)
        cluster.advance(0.2)
        self.assertEqual(maintenance_done(fs1.status(), "fs1", False, None),
                         "fs1 is back as a slave, ranked 1")

    def test_maintenance_on_with_no_spare_never_done(self) -> None:
        cluster = formed(nodes=2, slots=2)
        fs1 = cluster.nodes["fs1"]
        fs1.set_maintenance(True)
        cluster.advance(0.5)
        self.assertIsNone(maintenance_done(fs1.status(), "fs1", True, "slot1"))
        self.assertIn("slot1 has no master", maintenance_seen(fs1.status(), "fs1", "slot1"))

    def test_switchover_done_when_the_successor_masters(self) -> None:
        cluster = formed()
        fs1 = cluster.nodes["fs1"]
        cluster.actions["fs1"].hang_release = True
        fs1.switchover("slot1")
        cluster.advance(0.1)
        self.assertIsNone(switchover_done(fs1.status(), "slot1", "fs3"))
        cluster.actions["fs1"].pending_releases.pop().callback(None)
        cluster.advance(0.1)
        self.assertEqual(switchover_done(fs1.status(), "slot1", "fs3"),
                         "slot1 is mastered by fs3 (epoch 2); fs1 holds it no more")

    def test_timeout_says_what_was_seen(self) -> None:
        with self.assertRaises(Failed) as caught:
            wait_until(lambda: {"x": 1}, lambda s: None, lambda s: "fs1 is releasing", 0)
        self.assertEqual(str(caught.exception),
                         "timed out after 0 s; last seen: fs1 is releasing")


class UnplannedReleaseTests(SynchronousTestCase):
    def test_a_dead_freeswitch_release_is_not_waited_for(self) -> None:
        cluster = formed()
        cluster.actions["fs1"].hang_release = True  # stopping profiles on a hung switch
        cluster.health["fs1"].ok = False
        cluster.nodes["fs1"].health_changed(False)
        cluster.advance(0.1)
        self.assertEqual(cluster.nodes["fs1"].role, Role.RELEASING)
        self.assertEqual(cluster.masters()["slot1"], "fs3", "taken over at once, as before")
        self.assertEqual(cluster.actions["fs3"].fenced, [False])
