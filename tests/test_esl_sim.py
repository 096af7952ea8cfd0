"""The ESL client against the simulator as a real process over real TCP on loopback.

The simulator is killed with SIGKILL and restarted on the same port (a crashed and
restarted FreeSWITCH: new Core-UUID), then hung (sockets open, nothing answered). Every
wait is on a condition or an event with a deadline; ports come from ``--ready-file``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from fsha.eslclient import ConnectionState, ESLClient, ESLConnectionLost, ESLNotConnected
from fsha.fsapi import ChannelEvent, ChannelEventKind, EventRouter, FSApi
from fsha.harness import poll_until

reactor: Any = _reactor

DEADLINE = 15.0


class Sim:
    """One ``python -m fsha sim`` process."""

    def __init__(self, case: TestCase, name: str, esl: str = "127.0.0.1:0") -> None:
        self.dir = case.mktemp()
        os.makedirs(self.dir)
        self.ready_path = os.path.join(self.dir, "ready.json")
        self.log = open(os.path.join(self.dir, "sim.log"), "wb")
        case.addCleanup(self.log.close)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fsha", "sim", "--name", name, "--esl", esl,
             "--control", "127.0.0.1:0", "--ready-file", self.ready_path,
             "--profile", "internal=127.0.0.1:0", "--heartbeat", "0.5"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        case.addCleanup(self.kill)
        self.ready: dict[str, Any] = {}

    def read_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"simulator exited with {self.proc.returncode}")
        try:
            with open(self.ready_path, encoding="utf-8") as f:
                self.ready = json.load(f)
            return True
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE)

    def control(self, path: str, body: dict[str, Any]) -> Any:
        url = f"http://127.0.0.1:{self.ready['control']['port']}{path}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=DEADLINE) as resp:
            return json.loads(resp.read())


def state_becomes(client: ESLClient, wanted: ConnectionState) -> Deferred[None]:
    d: Deferred[None] = Deferred()

    def listener(old: ConnectionState, new: ConnectionState) -> None:
        if new is wanted and not d.called:
            d.callback(None)

    client.add_state_listener(listener)
    return d.addTimeout(DEADLINE, reactor)


class ClientAgainstSimulatorTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_kill_restart_and_hang(self) -> Any:
        sim1 = Sim(self, "fs1")
        yield poll_until(sim1.read_ready, "simulator ready file", clock=reactor)
        port = sim1.ready["esl"]["port"]
        client = ESLClient.tcp(
            reactor,
            "127.0.0.1",
            port,
            "ClueCon",
            connect_timeout=2.0,
            ping_interval=0.2,
            ping_timeout=1.0,
            heartbeat_timeout=5.0,
            setup_timeout=2.0,
            retry_initial=0.05,
            retry_max=0.5,
        )
        restarts: list[tuple[str, str]] = []
        client.add_restart_listener(lambda old, new: restarts.append((old, new)))
        answered: dict[str, ChannelEvent] = {}

        def on_channel(ev: ChannelEvent) -> None:
            if ev.kind is ChannelEventKind.ANSWER:
                answered[ev.uuid] = ev

        router = EventRouter(client, on_channel=on_channel)
        client.startService()
        self.addCleanup(client.stopService)
        yield client.when_ready().addTimeout(DEADLINE, reactor)
        yield router.subscribed
        api = FSApi(client)

        status = yield api.status()
        self.assertTrue(status.ready)
        core1 = yield api.core_uuid()
        self.assertEqual(core1, sim1.ready["core_uuid"])
        self.assertEqual(client.core_uuid, core1)
        out = yield client.bgapi("status", timeout=DEADLINE)
        self.assertTrue(out.startswith("UP "), out)

        uuids = sim1.control("/calls", {"profile": "internal"})["uuids"]
        yield poll_until(lambda: uuids[0] in answered, "CHANNEL_ANSWER event", clock=reactor)
        self.assertEqual(answered[uuids[0]].core_uuid, core1)
        self.assertTrue((yield api.uuid_exists(uuids[0])))

        # FreeSWITCH crashes: every request fails, the client keeps trying to reconnect
        # (hung first, so that the request below is certainly still pending at the kill)
        sim1.control("/hang", {})
        lost = state_becomes(client, ConnectionState.CONNECTING)
        pending = client.api("status")
        sim1.kill()
        yield lost
        self.assertFalse(client.is_healthy)
        yield self.assertFailure(pending, ESLConnectionLost)
        yield self.assertFailure(client.api("status"), ESLNotConnected)

        # ... and comes back on the same port with a new Core-UUID: a restart
        sim2 = Sim(self, "fs1", esl=f"127.0.0.1:{port}")
        yield poll_until(sim2.read_ready, "second simulator ready file", clock=reactor)
        yield client.when_ready().addTimeout(DEADLINE, reactor)
        core2 = sim2.ready["core_uuid"]
        self.assertNotEqual(core1, core2)
        yield poll_until(lambda: restarts, "restart detected", clock=reactor)
        self.assertEqual(restarts, [(core1, core2)])
        # subscriptions were re-applied on the new connection
        uuids = sim2.control("/calls", {"profile": "internal"})["uuids"]
        yield poll_until(lambda: uuids[0] in answered, "CHANNEL_ANSWER after the restart",
                         clock=reactor)

        # FreeSWITCH hangs: the socket stays open but nothing is answered
        lost = state_becomes(client, ConnectionState.CONNECTING)
        sim2.control("/hang", {})
        yield lost
        self.assertFalse(client.is_healthy)
        self.assertIsNotNone(client.last_error)
        sim2.control("/unhang", {})
        yield client.when_ready().addTimeout(DEADLINE, reactor)
        self.assertEqual(client.core_uuid, core2)
        self.assertEqual(len(restarts), 1)
        yield client.stopService()
