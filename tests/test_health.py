"""Busy is not dead (fsha.health): a fake FreeSWITCH on two connections, a fake clock."""

from __future__ import annotations

from typing import Any

from fsha.config import parse_config
from fsha.eslclient import ESLClient
from fsha.health import PROBE_INTERVAL, SwitchHealth, esl_clients
from tests.test_config import DEMO, demo_raw
from tests.test_esl_client import CORE1, ClientTestBase, Conn


class SwitchHealthTests(ClientTestBase):
    def two(self) -> tuple[SwitchHealth, ESLClient, Conn, ESLClient, Conn]:
        main, main_conn = self.ready_client(request_timeout=1.0, hung_timeout=15.0)
        probe, probe_conn = self.ready_client(ping_interval=PROBE_INTERVAL, ping_timeout=1.0,
                                              hung_timeout=5.0)
        return SwitchHealth(main, probe), main, main_conn, probe, probe_conn

    unanswered = 0

    def tick(self, conn: Conn, seconds: float, answer: bool = True) -> None:
        """``seconds`` in 0.1 s steps; the probe's pings answered at once if ``answer``
        (with the ones left unanswered before, late)."""
        for _ in range(round(seconds / 0.1)):
            self.clock.advance(0.1)
            self.unanswered += len(conn.commands())
            while answer and self.unanswered:
                self.unanswered -= 1
                conn.api_reply(CORE1)

    def test_a_long_command_on_the_main_connection_is_not_a_dead_switch(self) -> None:
        health, main, main_conn, _probe, probe_conn = self.two()
        recover = main.api("sofia profile slot1 recover", timeout=10.0)
        step = main.sendevent("CUSTOM", [("Event-Subclass", "fsha::takeover-step")])
        main_conn.commands()
        self.tick(probe_conn, 9.0)  # the recover runs for 9 s; the probe keeps answering
        self.failureResultOf(step)  # queued behind it: timed out alone
        self.assertTrue(health.is_ok())
        self.assertFalse(health.busy())
        self.assertFalse(main_conn.dropped)
        main_conn.api_reply("Recovered 800 session(s)\n")
        self.successResultOf(recover)
        main_conn.reply("+OK late")  # the sendevent's late reply, discarded
        self.assertEqual(health.status()["late_replies"], 1)
        self.assertTrue(health.is_ok())

    def test_slow_answers_are_busy_and_healthy_then_hung(self) -> None:
        health, _main, _main_conn, probe, probe_conn = self.two()
        self.tick(probe_conn, 1.0)
        # FreeSWITCH slows down: the probe's answers come 3 s late (grace: 5 s)
        for _ in range(3):
            self.tick(probe_conn, 3.0, answer=False)
            self.assertTrue(health.busy())
            self.assertTrue(health.is_ok())
            self.assertGreater(health.status()["probe"]["waiting_ms"], 1000)
            self.tick(probe_conn, 0.5)  # the late answer, then prompt ones
            self.assertFalse(health.busy())
        self.assertFalse(probe_conn.dropped, probe._proto and probe._proto.closing_reason)
        # then nothing answers any more: hung after the grace
        self.tick(probe_conn, 4.5, answer=False)
        self.assertTrue(health.is_ok())
        self.tick(probe_conn, 1.0, answer=False)
        self.assertTrue(probe_conn.dropped)
        probe_conn.close()
        self.assertFalse(health.is_ok())
        self.assertIn("FreeSWITCH hung", health.status()["probe"]["last_error"])


class StuckCommandTests(ClientTestBase):
    two = SwitchHealthTests.two
    tick = SwitchHealthTests.tick
    unanswered = 0

    def test_a_stuck_command_drops_the_main_connection_not_the_slot(self) -> None:
        health, main, main_conn, _probe, probe_conn = self.two()
        stuck = main.api("sofia profile slot1 recover", timeout=10.0)
        main_conn.commands()
        self.tick(probe_conn, 15.5)  # unanswered past the main grace; the probe answers
        self.failureResultOf(stuck)
        self.assertTrue(main_conn.dropped)
        main_conn.close()
        self.assertFalse(main.is_healthy)
        self.assertTrue(health.is_ok())  # FreeSWITCH is alive: the probe says so
        probe_conn.close()  # and now it is gone
        self.assertFalse(health.is_ok())


class ClientsFromConfigTests(ClientTestBase):
    def test_grace_of_each_connection(self) -> None:
        config = parse_config(demo_raw(), DEMO)
        me = config.nodes[0]
        reactor: Any = self.clock
        main, probe = esl_clients(config, me, reactor, ping_interval=0.5)
        self.assertEqual(probe.ping_interval, PROBE_INTERVAL)
        self.assertEqual(probe.hung_timeout, me.esl.hung_after)
        self.assertIsNone(probe.heartbeat_timeout)
        # the main connection's grace covers one recover batch
        self.assertEqual(main.hung_timeout,
                         config.takeover.recover_timeout + me.esl.hung_after)
