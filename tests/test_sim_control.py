"""The control interface's JSON API, rendered in-process (no sockets)."""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from fsha.sim.control import ControlResource
from fsha.sim.coredb import CoreDB
from fsha.sim.esl_server import ESLServerFactory
from fsha.sim.switch import ProfileConfig, Switch


class ControlTests(SynchronousTestCase):
    def setUp(self) -> None:
        clock = Clock()
        clock.advance(1_700_000_000)
        self.switch = Switch(clock, CoreDB(":memory:"), name="fs1",
                             profiles=[ProfileConfig("internal", "127.0.1.1", 5060)])
        self.switch.start()
        self.esl = ESLServerFactory(self.switch, "ClueCon", clock)
        self.crashed: list[bool] = []
        self.sip_paused: list[bool] = []
        self.resource = ControlResource(self.switch, self.esl,
                                        crash=lambda: self.crashed.append(True),
                                        sip_pause=self.sip_paused.append)

    def call(self, method: str, path: str, body: bytes | None = None,
             args: dict[bytes, list[bytes]] | None = None) -> tuple[int, Any]:
        req = DummyRequest([p.encode() for p in path.strip("/").split("/")])
        req.method = method.encode()
        req.content = io.BytesIO(body or b"")
        if args:
            req.args = args
        out = self.resource.render(req)
        return req.responseCode or 200, json.loads(out)

    def post(self, path: str, obj: Any) -> tuple[int, Any]:
        return self.call("POST", path, json.dumps(obj).encode())

    def test_calls_hangup_and_listing(self) -> None:
        code, res = self.post("/calls", {"profile": "internal", "count": 3, "bridge": True})
        self.assertEqual((code, len(res["uuids"])), (200, 6))
        code, res2 = self.call("GET", "/calls")
        self.assertEqual(len(res2["calls"]), 6)
        self.assertEqual(self.call("GET", "/status")[1]["calls"], 6)
        code, res3 = self.post("/hangup", {"uuids": [res["uuids"][0]]})
        self.assertEqual(res3, {"hungup": 1})
        self.assertEqual(len(self.switch.channels), 4)  # the partner hung up too
        self.assertEqual(self.post("/hangup", {"all": True})[1], {"hungup": 2})
        self.assertEqual(self.switch.db.recovery_rows(), [])

    def test_registrations(self) -> None:
        _code, res = self.post("/register", {"profile": "internal", "count": 3, "start": 2000})
        self.assertEqual(len(res["call_ids"]), 3)
        regs = self.call("GET", "/registrations", args={b"profile": [b"internal"]})[1]
        self.assertEqual(sorted(r["sip_user"] for r in regs["registrations"]),
                         ["2000", "2001", "2002"])
        res = self.post("/unregister", {"profile": "internal", "call_ids": res["call_ids"][:2]})
        self.assertEqual(res[1], {"unregistered": 2})

    def test_api_hang_crash(self) -> None:
        self.assertEqual(self.post("/api", {"command": "reloadxml"})[1],
                         {"output": "+OK [Success]\n", "found": True})
        self.assertEqual(self.post("/hang", {"sip": True})[1]["hung"], True)
        self.assertTrue(self.esl.hung)
        self.assertEqual(self.sip_paused, [True])
        self.post("/unhang", {})
        self.assertFalse(self.esl.hung)
        self.assertEqual(self.sip_paused, [True, False])
        self.post("/crash", {})
        self.assertEqual(self.crashed, [True])

    def test_errors(self) -> None:
        self.assertEqual(self.post("/calls", {"profile": "nosuch"})[0], 400)
        self.assertEqual(self.post("/calls", {"profile": "internal", "count": -1})[0], 400)
        self.assertEqual(self.post("/calls", {"profile": "internal", "count": True})[0], 400)
        self.assertEqual(self.call("POST", "/calls", b"{not json")[0], 400)
        self.assertEqual(self.call("POST", "/calls", b"[1]")[0], 400)
        self.assertEqual(self.post("/hangup", {"uuids": "x"})[0], 400)
        self.assertEqual(self.post("/api", {"command": "status\napi x"})[0], 400)
        self.assertEqual(self.post("/nosuch", {})[0], 404)
        self.assertEqual(self.call("GET", "/nosuch")[0], 404)
        self.assertEqual(self.post("/flood", {"event": "HEARTBEAT"})[0], 400)
        self.assertEqual(self.switch.channels, {})
