"""The Event Socket client (fsha.eslclient) against StringTransport and a fake clock."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from fsha.eslclient import (
    ConnectionState,
    ESLClient,
    ESLCommandFailed,
    ESLConnectionLost,
    ESLNotConnected,
    ESLProtocol,
    ESLTimeout,
)
from fsha.wire.esl import (
    Command,
    CommandDecoder,
    ESLCommandError,
    Event,
    encode_event_json,
    encode_event_plain,
    encode_frame,
)

CORE1 = "11111111-1111-4111-8111-111111111111"
CORE2 = "22222222-2222-4222-8222-222222222222"


class Conn:
    """One fake FreeSWITCH connection: read what the client wrote, send it frames."""

    def __init__(self, proto: Any, transport: StringTransport) -> None:
        self.proto = proto
        self.transport = transport
        self.decoder = CommandDecoder()
        self.closed = False

    def commands(self) -> list[Command]:
        data = self.transport.value()
        self.transport.clear()
        return self.decoder.feed(data)

    def lines(self) -> list[str]:
        return [c.line for c in self.commands()]

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def reply(self, text: str, *extra: tuple[str, str]) -> None:
        self.send(encode_frame([("Content-Type", "command/reply"), ("Reply-Text", text), *extra]))

    def api_reply(self, body: str) -> None:
        self.send(encode_frame([("Content-Type", "api/response")], body.encode()))

    def event(self, pairs: list[tuple[str, str]], body: bytes = b"", fmt: str = "plain") -> None:
        pairs = [*pairs] if any(n == "Core-UUID" for n, _ in pairs) else [*pairs,
                                                                          ("Core-UUID", CORE1)]
        if fmt == "plain":
            payload = encode_event_plain(pairs, body)
        else:
            payload = encode_event_json(pairs, body)
        self.send(
            encode_frame(
                [("Content-Length", str(len(payload))), ("Content-Type", f"text/event-{fmt}")],
                payload,
            )
        )

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.proto.connectionLost(Failure(ConnectionDone("closed")))

    @property
    def dropped(self) -> bool:
        return bool(self.transport.disconnecting)


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    def __init__(self) -> None:
        self.conns: list[Conn] = []
        self.refuse = False
        self.attempts = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        self.attempts += 1
        if self.refuse:
            return fail(ConnectionRefusedError("refused"))
        proto = factory.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        self.conns.append(Conn(proto, transport))
        return succeed(proto)


class ClientTestBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.states: list[tuple[ConnectionState, ConnectionState]] = []
        self.restarts: list[tuple[str, str]] = []

    def make(self, **kw: Any) -> ESLClient:
        kw.setdefault("events", ["CHANNEL_CREATE", "sofia::register"])
        client = ESLClient(
            self.endpoint, "ClueCon", self.clock, rng=random.Random(7), **kw
        )
        client.add_state_listener(lambda old, new: self.states.append((old, new)))
        client.add_restart_listener(lambda old, new: self.restarts.append((old, new)))
        self.addCleanup(self.stop, client)
        return client

    def stop(self, client: ESLClient) -> None:
        if client.running:
            d = client.stopService()
            for c in self.endpoint.conns:
                if c.dropped:
                    c.close()
            self.successResultOf(d)

    def handshake(self, conn: Conn, core: str = CORE1, event_fmt: str = "plain",
                  filters: list[str] | None = None) -> None:
        conn.send(b"Content-Type: auth/request\n\n")
        self.assertEqual(conn.lines(), ["auth ClueCon"])
        conn.reply("+OK accepted")
        self.assertEqual(
            conn.lines(),
            [f"event {event_fmt} BACKGROUND_JOB HEARTBEAT CHANNEL_CREATE CUSTOM sofia::register"],
        )
        conn.reply(f"+OK event listener enabled {event_fmt}")
        for f in filters or []:
            self.assertEqual(conn.lines(), [f])
            conn.reply("+OK filter added. [x]=[y]")
        self.assertEqual(conn.lines(), ["api global_getvar core_uuid"])
        conn.api_reply(core)

    def ready_client(self, **kw: Any) -> tuple[ESLClient, Conn]:
        client = self.make(**kw)
        client.startService()
        conn = self.endpoint.conns[-1]
        self.handshake(conn, event_fmt=kw.get("event_format", "plain"))
        self.assertTrue(client.is_healthy)
        return client, conn


class SetupTests(ClientTestBase):
    def test_handshake_to_ready(self) -> None:
        client = self.make()
        ready = client.when_ready()
        self.assertFalse(client.is_healthy)
        client.startService()
        self.assertEqual(client.state, ConnectionState.AUTHENTICATING)
        self.assertNoResult(ready)
        self.handshake(self.endpoint.conns[0])
        self.assertIsNone(self.successResultOf(ready))
        self.assertEqual(client.state, ConnectionState.READY)
        self.assertTrue(client.is_healthy)
        self.assertEqual(client.core_uuid, CORE1)
        self.assertEqual(
            [new for _, new in self.states],
            [ConnectionState.CONNECTING, ConnectionState.AUTHENTICATING, ConnectionState.READY],
        )

    def test_auth_refused_backs_off(self) -> None:
        client = self.make(retry_initial=0.1, retry_max=5.0)
        client.startService()
        delays = []
        for _ in range(4):
            conn = self.endpoint.conns[-1]
            conn.send(b"Content-Type: auth/request\n\n")
            conn.lines()
            conn.reply("-ERR invalid")
            self.assertTrue(conn.dropped)
            self.assertIn("authentication refused: -ERR invalid", client.last_error or "")
            conn.close()
            self.assertEqual(client.state, ConnectionState.CONNECTING)
            n = len(self.endpoint.conns)
            waited = 0.0
            while len(self.endpoint.conns) == n:
                self.clock.advance(0.05)
                waited += 0.05
                self.assertLess(waited, 30)
            delays.append(waited)
        # exponential: each wait longer than the one before
        self.assertEqual(delays, sorted(delays))
        self.assertGreater(delays[-1], 2 * delays[0])
        self.assertFalse(client.is_healthy)

    def test_no_greeting_times_out(self) -> None:
        client = self.make(setup_timeout=3.0)
        client.startService()
        conn = self.endpoint.conns[0]
        self.clock.advance(2.9)
        self.assertFalse(conn.dropped)
        self.clock.advance(0.2)
        self.assertTrue(conn.dropped)
        self.assertIn("greeting", client.last_error or "")

    def test_refused_connection_retries(self) -> None:
        self.endpoint.refuse = True
        client = self.make()
        client.startService()
        self.assertEqual(self.endpoint.attempts, 1)
        self.clock.pump([0.1] * 100)
        self.assertGreater(self.endpoint.attempts, 3)
        self.assertEqual(client.state, ConnectionState.CONNECTING)
        self.endpoint.refuse = False
        self.clock.pump([0.1] * 60)
        self.handshake(self.endpoint.conns[0])
        self.assertTrue(client.is_healthy)

    def test_rude_rejection(self) -> None:
        client = self.make()
        client.startService()
        conn = self.endpoint.conns[0]
        conn.send(b"Content-Type: text/rude-rejection\nContent-Length: 24\n\n"
                  b"Access Denied, go away.\n")
        conn.close()
        self.assertIn("rejected by ACL: Access Denied", client.last_error or "")
        self.assertEqual(client.state, ConnectionState.CONNECTING)

    def test_stop(self) -> None:
        client, conn = self.ready_client()
        d = client.stopService()
        self.assertTrue(conn.transport.disconnecting)
        conn.close()
        self.successResultOf(d)
        self.assertEqual(client.state, ConnectionState.STOPPED)
        self.clock.advance(60)
        self.assertEqual(len(self.endpoint.conns), 1)
        self.assertIsInstance(self.failureResultOf(client.api("status")).value, ESLNotConnected)


class RequestTests(ClientTestBase):
    def test_api_fifo_with_interleaved_events(self) -> None:
        client, conn = self.ready_client()
        seen: list[Event] = []
        client.add_event_listener(seen.append, "CHANNEL_CREATE")
        a = client.api("status")
        b = client.api("global_getvar hostname")
        self.assertEqual(conn.lines(), ["api status", "api global_getvar hostname"])
        conn.event([("Event-Name", "CHANNEL_CREATE"), ("Unique-ID", "u1")])
        conn.api_reply("UP 0 years\n")
        conn.event([("Event-Name", "CHANNEL_CREATE"), ("Unique-ID", "u2")])
        self.assertEqual(self.successResultOf(a), "UP 0 years\n")
        self.assertNoResult(b)
        conn.api_reply("fs1")
        self.assertEqual(self.successResultOf(b), "fs1")
        self.assertEqual([e.headers["Unique-ID"] for e in seen], ["u1", "u2"])

    def test_api_errors_are_returned_as_text(self) -> None:
        client, conn = self.ready_client()
        d = client.api("bogus")
        conn.api_reply("-ERR bogus Command not found!\n")
        self.assertEqual(self.successResultOf(d), "-ERR bogus Command not found!\n")

    def test_injection_rejected_nothing_sent(self) -> None:
        client, conn = self.ready_client()
        f = self.failureResultOf(client.api("status\n\nauth x"))
        self.assertIsInstance(f.value, ESLCommandError)
        self.assertEqual(conn.transport.value(), b"")
        self.assertTrue(client.is_healthy)

    def test_not_connected(self) -> None:
        client = self.make()
        self.assertIsInstance(self.failureResultOf(client.api("status")).value, ESLNotConnected)
        client.startService()
        self.assertIsInstance(self.failureResultOf(client.bgapi("status")).value,
                              ESLNotConnected)

    def test_timeout_poisons_connection_and_reconnects(self) -> None:
        client, conn = self.ready_client(request_timeout=5.0)
        slow = client.api("status")
        queued = client.api("uptime", timeout=30)
        self.clock.advance(5.0)
        self.assertIsInstance(self.failureResultOf(slow).value, ESLTimeout)
        self.assertTrue(conn.dropped)
        conn.close()
        self.assertIsInstance(self.failureResultOf(queued).value, ESLConnectionLost)
        self.assertEqual(client.state, ConnectionState.CONNECTING)
        self.assertFalse(client.is_healthy)
        self.clock.advance(1.0)
        self.assertEqual(len(self.endpoint.conns), 2)
        self.handshake(self.endpoint.conns[1])
        self.assertTrue(client.is_healthy)
        self.assertEqual(self.restarts, [])  # same Core-UUID: a reconnect, not a restart

    def test_connection_loss_fails_everything(self) -> None:
        client, conn = self.ready_client()
        a = client.api("status")
        job = client.bgapi("status", job_uuid="job-1")
        conn.close()
        self.assertIsInstance(self.failureResultOf(a).value, ESLConnectionLost)
        self.assertIsInstance(self.failureResultOf(job).value, ESLConnectionLost)

    def test_unexpected_reply_drops(self) -> None:
        _client, conn = self.ready_client()
        conn.api_reply("surprise")
        self.assertTrue(conn.dropped)

    def test_garbage_drops(self) -> None:
        _client, conn = self.ready_client()
        conn.send(b"Content-Length: nope\n\n")
        self.assertTrue(conn.dropped)
        self.assertIn("protocol error", conn.proto.closing_reason)

    def test_bad_event_is_dropped_not_the_connection(self) -> None:
        client, conn = self.ready_client()
        conn.send(b"Content-Length: 8\nContent-Type: text/event-plain\n\nno-name\n")
        self.assertFalse(conn.dropped)
        self.assertTrue(client.is_healthy)

    def test_bgapi(self) -> None:
        client, conn = self.ready_client()
        job = client.bgapi("originate x y", job_uuid="J-1")
        [cmd] = conn.commands()
        self.assertEqual(cmd.line, "bgapi originate x y")
        self.assertEqual(cmd.headers["Job-UUID"], "J-1")
        conn.reply("+OK Job-UUID: J-1", ("Job-UUID", "J-1"))
        self.assertNoResult(job)
        conn.event([("Event-Name", "BACKGROUND_JOB"), ("Job-UUID", "OTHER")], b"nope")
        self.assertNoResult(job)
        conn.event([("Event-Name", "BACKGROUND_JOB"), ("Job-UUID", "J-1")], b"+OK abc\n")
        self.assertEqual(self.successResultOf(job), "+OK abc\n")

    def test_bgapi_generates_job_uuid_and_times_out_without_dropping(self) -> None:
        client, conn = self.ready_client(bgapi_timeout=30.0, ping_interval=0)
        job = client.bgapi("fsctl shutdown elegant")
        [cmd] = conn.commands()
        self.assertEqual(len(cmd.headers["Job-UUID"]), 36)
        conn.reply("+OK Job-UUID: " + cmd.headers["Job-UUID"])
        self.clock.advance(30)
        self.assertIsInstance(self.failureResultOf(job).value, ESLTimeout)
        self.assertFalse(conn.dropped)

    def test_bgapi_refused(self) -> None:
        client, conn = self.ready_client()
        job = client.bgapi("status")
        conn.commands()
        conn.reply("-ERR no")
        self.assertIsInstance(self.failureResultOf(job).value, ESLCommandFailed)

    def test_sendmsg_execute_sendevent_linger(self) -> None:
        client, conn = self.ready_client()
        d1 = client.execute("U1", "playback", "/tmp/a.wav")
        d2 = client.execute("U1", "set", "multi=line1\nline2")
        d3 = client.sendevent("CUSTOM", [("Event-Subclass", "fsha::x"), ("A", "b")], b"body")
        d4 = client.linger(5)
        d5 = client.nolinger()
        c1, c2, c3, c4, c5 = conn.commands()
        self.assertEqual(c1.line, "sendmsg U1")
        self.assertEqual(c1.headers.items(), [("call-command", "execute"),
                                              ("execute-app-name", "playback"),
                                              ("execute-app-arg", "/tmp/a.wav")])
        self.assertEqual(c2.body, b"multi=line1\nline2")
        self.assertEqual(c2.headers["content-type"], "text/plain")
        self.assertNotIn("execute-app-arg", c2.headers)
        self.assertEqual((c3.line, c3.headers["A"], c3.body), ("sendevent CUSTOM", "b", b"body"))
        self.assertEqual((c4.line, c5.line), ("linger 5", "nolinger"))
        conn.reply("+OK")
        conn.reply("-ERR invalid session id [U1]")
        conn.reply("+OK 3f0c1d2e-aaaa-bbbb-cccc-000000000000")
        conn.reply("-ERR not controlling a session")
        conn.reply("-ERR not controlling a session")
        self.assertEqual(self.successResultOf(d1), "+OK")
        err = self.failureResultOf(d2, ESLCommandFailed).value
        self.assertEqual(err.reply, "-ERR invalid session id [U1]")
        self.assertEqual(self.successResultOf(d3), "3f0c1d2e-aaaa-bbbb-cccc-000000000000")
        self.failureResultOf(d4, ESLCommandFailed)
        self.failureResultOf(d5, ESLCommandFailed)
        self.assertTrue(client.is_healthy)

    def test_cancelled_request_keeps_fifo_in_step(self) -> None:
        client, conn = self.ready_client()
        a = client.api("a")
        b = client.api("b")
        a.cancel()
        self.failureResultOf(a)
        conn.api_reply("A")
        conn.api_reply("B")
        self.assertEqual(self.successResultOf(b), "B")


class RequestTimingTests(ClientTestBase):
    """Every finished request is reported once: command label, round trip, result."""

    def test_answered_timed_out_and_lost_requests(self) -> None:
        seen: list[tuple[str, float, str]] = []
        client = self.make(request_timeout=5.0)
        client.add_request_listener(lambda *a: seen.append(a))
        client.startService()
        conn = self.endpoint.conns[-1]
        self.clock.advance(0.25)
        self.handshake(conn)  # auth, event, global_getvar: answered at once
        self.assertEqual([(c, r) for c, _, r in seen],
                         [("auth", "ok"), ("event", "ok"), ("api global_getvar", "ok")])
        seen.clear()
        d = client.api("sofia profile slot1 recover")
        self.clock.advance(0.125)
        conn.api_reply("Recovered 3 session(s)\n")
        self.successResultOf(d)
        self.assertEqual(seen, [("api sofia", 0.125, "ok")])
        seen.clear()
        slow = client.api("status")
        queued = client.api("uptime", timeout=30)
        self.clock.advance(5.0)
        self.failureResultOf(slow)
        conn.close()
        self.failureResultOf(queued)
        # the timed-out request is a timeout (once), the one behind it was lost
        self.assertEqual(seen, [("api status", 5.0, "timeout"), ("api uptime", 5.0, "lost")])

    def test_labels_never_carry_arguments(self) -> None:
        from fsha.eslprotocol import request_label

        self.assertEqual(request_label("auth ***"), "auth")
        self.assertEqual(request_label("api hash insert/fsha_reg/1000@x/slot1"), "api hash")
        self.assertEqual(request_label("bgapi originate {a=b}sofia/x &park"), "bgapi originate")
        self.assertEqual(request_label("sendevent CUSTOM"), "sendevent")
        self.assertEqual(request_label("api"), "api")

    def test_a_failing_listener_does_not_break_the_request(self) -> None:
        client, conn = self.ready_client()

        def boom(*_: Any) -> None:
            raise RuntimeError("listener bug")

        client.add_request_listener(boom)
        d = client.api("status")
        conn.api_reply("UP\n")
        self.assertEqual(self.successResultOf(d), "UP\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class SubscriptionTests(ClientTestBase):
    def test_subscribe_and_filters_reapplied_on_reconnect(self) -> None:
        client, conn = self.ready_client()
        d = client.subscribe("CHANNEL_ANSWER", "sofia::expire", "CHANNEL_CREATE")
        self.assertEqual(conn.lines(), ["event plain CHANNEL_ANSWER CUSTOM sofia::expire"])
        conn.reply("+OK event listener enabled plain")
        self.successResultOf(d)
        f = client.add_filter("Unique-ID", "U1")
        self.assertEqual(conn.lines(), ["filter Event-Name BACKGROUND_JOB"])
        conn.reply("+OK filter added. [Event-Name]=[BACKGROUND_JOB]")
        self.assertEqual(conn.lines(), ["filter Event-Name HEARTBEAT"])
        conn.reply("+OK filter added. [Event-Name]=[HEARTBEAT]")
        self.assertEqual(conn.lines(), ["filter Unique-ID U1"])
        conn.reply("+OK filter added. [Unique-ID]=[U1]")
        self.successResultOf(f)
        g = client.add_filter("Unique-ID", "U2")
        self.assertEqual(conn.lines(), ["filter Unique-ID U2"])
        conn.reply("+OK filter added. [Unique-ID]=[U2]")
        self.successResultOf(g)
        r = client.remove_filter("Unique-ID", "U2")
        self.assertEqual(conn.lines(), ["filter delete Unique-ID U2"])
        conn.reply("+OK filter deleted. [Unique-ID][U2]")
        self.successResultOf(r)

        conn.close()
        self.clock.advance(1)
        conn2 = self.endpoint.conns[1]
        conn2.send(b"Content-Type: auth/request\n\n")
        self.assertEqual(conn2.lines(), ["auth ClueCon"])
        conn2.reply("+OK accepted")
        self.assertEqual(conn2.lines(), [
            "event plain BACKGROUND_JOB HEARTBEAT CHANNEL_CREATE CHANNEL_ANSWER "
            "CUSTOM sofia::register sofia::expire"])
        conn2.reply("+OK event listener enabled plain")
        for expected in ("filter Event-Name BACKGROUND_JOB", "filter Event-Name HEARTBEAT",
                         "filter Unique-ID U1"):
            self.assertEqual(conn2.lines(), [expected])
            conn2.reply("+OK filter added.")
        self.assertEqual(conn2.lines(), ["api global_getvar core_uuid"])
        conn2.api_reply(CORE1)
        self.assertTrue(client.is_healthy)

    def test_subscription_during_setup_is_caught_up(self) -> None:
        client = self.make()
        client.startService()
        conn = self.endpoint.conns[0]
        conn.send(b"Content-Type: auth/request\n\n")
        self.assertEqual(conn.lines(), ["auth ClueCon"])
        conn.reply("+OK accepted")
        conn.lines()  # the event command, already sent
        self.successResultOf(client.subscribe("CHANNEL_HANGUP"))  # recorded, not sent yet
        self.successResultOf(client.add_filter("Unique-ID", "U1"))
        self.assertEqual(conn.lines(), [])
        conn.reply("+OK event listener enabled plain")
        self.assertEqual(conn.lines(), ["api global_getvar core_uuid"])
        conn.api_reply(CORE1)
        self.assertTrue(client.is_healthy)
        self.assertEqual(conn.lines(), ["event plain CHANNEL_HANGUP"])
        conn.reply("+OK event listener enabled plain")
        for expected in ("filter Event-Name BACKGROUND_JOB", "filter Event-Name HEARTBEAT",
                         "filter Unique-ID U1"):
            self.assertEqual(conn.lines(), [expected])
            conn.reply("+OK filter added.")
        self.assertEqual(conn.lines(), [])

    def test_custom_listener_and_json(self) -> None:
        client, conn = self.ready_client(event_format="json")
        regs: list[Event] = []
        every: list[str] = []
        customs: list[str | None] = []
        client.add_event_listener(regs.append, "sofia::register")
        client.add_event_listener(lambda e: customs.append(e.subclass), "CUSTOM")
        client.add_event_listener(lambda e: every.append(e.name))
        conn.event([("Event-Subclass", "sofia::register"), ("Event-Name", "CUSTOM"),
                    ("from-user", "1000")], fmt="json")
        conn.event([("Event-Name", "HEARTBEAT")], fmt="json")
        self.assertEqual([e.headers["from-user"] for e in regs], ["1000"])
        self.assertEqual(every, ["CUSTOM", "HEARTBEAT"])
        self.assertEqual(customs, ["sofia::register"])

    def test_listener_exception_does_not_break_connection(self) -> None:
        client, conn = self.ready_client()

        def boom(event: Event) -> None:
            raise RuntimeError("listener bug")

        got: list[str] = []
        client.add_event_listener(boom, "CHANNEL_CREATE")
        client.add_event_listener(lambda e: got.append(e.name), "CHANNEL_CREATE")
        conn.event([("Event-Name", "CHANNEL_CREATE")])
        self.assertEqual(got, ["CHANNEL_CREATE"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(client.is_healthy)


class BusyIsNotHungTests(ClientTestBase):
    """With ``hung_timeout``: a late answer is a busy FreeSWITCH, not a dead connection."""

    def test_a_timed_out_request_keeps_its_place_and_its_late_reply_is_discarded(self) -> None:
        client, conn = self.ready_client(request_timeout=1.0, hung_timeout=30.0)
        long = client.api("sofia profile p recover", timeout=10.0)
        event = client.sendevent("CUSTOM", [("Event-Subclass", "fsha::takeover-step")])
        conn.commands()
        self.clock.advance(1.0)  # the sendevent queued behind the recover times out...
        self.assertIsInstance(self.failureResultOf(event).value, ESLTimeout)
        self.assertFalse(conn.dropped)  # ...without tearing the connection down
        self.assertTrue(client.is_healthy)
        self.clock.advance(5.0)
        conn.api_reply("Recovered 100 session(s)\n")
        self.assertEqual(self.successResultOf(long), "Recovered 100 session(s)\n")
        conn.reply("+OK 1234")  # the sendevent's late reply: discarded
        self.assertEqual(client.late_reply_count, 1)
        after = client.api("status")
        conn.commands()
        conn.api_reply("UP 0 years\n")
        self.assertEqual(self.successResultOf(after), "UP 0 years\n")  # not the +OK

    def test_no_answer_for_hung_timeout_drops_the_connection(self) -> None:
        client, conn = self.ready_client(request_timeout=1.0, hung_timeout=5.0)
        d = client.api("status")
        self.clock.advance(1.0)
        self.assertIsInstance(self.failureResultOf(d).value, ESLTimeout)
        self.clock.advance(3.9)
        self.assertFalse(conn.dropped)
        self.clock.advance(0.1)
        self.assertTrue(conn.dropped)
        conn.close()
        self.assertFalse(client.is_healthy)
        self.assertIn("FreeSWITCH hung", client.last_error or "")

    def test_late_pings_are_busy_then_hung(self) -> None:
        client, conn = self.ready_client(ping_interval=0.5, ping_timeout=1.0, hung_timeout=4.0)
        self.clock.advance(0.5)
        self.assertEqual(conn.lines(), ["api global_getvar core_uuid"])
        self.clock.advance(2.0)  # late, still healthy: no other ping is queued behind it
        self.assertEqual(conn.lines(), [])
        self.assertAlmostEqual(client.ping_waiting() or 0.0, 2.0)
        self.assertTrue(client.is_healthy)
        conn.api_reply(CORE1)
        self.assertEqual(client.late_reply_count, 1)
        self.clock.advance(0.5)
        self.assertEqual(conn.lines(), ["api global_getvar core_uuid"])
        conn.api_reply(CORE1)
        self.assertIsNone(client.ping_waiting())
        self.assertAlmostEqual(client.last_ping_seconds or 0.0, 0.0)
        self.clock.advance(0.5)
        self.assertEqual(conn.lines(), ["api global_getvar core_uuid"])
        for _ in range(38):
            self.clock.advance(0.1)
        self.assertFalse(conn.dropped)
        for _ in range(4):  # nothing answered for 4 s: hung
            self.clock.advance(0.1)
        self.assertTrue(conn.dropped)


class WatchdogTests(ClientTestBase):
    def test_ping_when_idle_and_hang_detected(self) -> None:
        client, conn = self.ready_client(ping_interval=2.0, ping_timeout=1.5)
        self.clock.advance(2.0)
        self.assertEqual(conn.lines(), ["api global_getvar core_uuid"])
        conn.api_reply(CORE1)
        self.assertTrue(client.is_healthy)
        self.clock.advance(2.0)
        self.assertEqual(conn.lines(), ["api global_getvar core_uuid"])
        # FreeSWITCH hangs: the socket stays open but nothing answers
        self.clock.advance(1.5)
        self.assertTrue(conn.dropped)
        conn.close()
        self.assertFalse(client.is_healthy)
        self.assertIn(ConnectionState.CONNECTING, [new for _, new in self.states[-1:]])

    def test_no_ping_while_a_request_is_pending(self) -> None:
        client, conn = self.ready_client(ping_interval=2.0, request_timeout=10.0)
        d = client.api("sofia status")
        conn.commands()
        self.clock.advance(6.0)
        self.assertEqual(conn.lines(), [])
        conn.api_reply("ok")
        self.successResultOf(d)

    def test_heartbeat_timeout(self) -> None:
        client, conn = self.ready_client(ping_interval=5.0, heartbeat_timeout=30.0)
        for _ in range(10):  # HEARTBEAT every 20 s keeps it alive
            for _ in range(4):
                self.clock.advance(5.0)
                if conn.commands():
                    conn.api_reply(CORE1)
            conn.event([("Event-Name", "HEARTBEAT")])
        self.assertFalse(conn.dropped)
        for _ in range(7):
            self.clock.advance(5.0)
            if conn.commands():
                conn.api_reply(CORE1)
        self.assertTrue(conn.dropped)
        self.assertIn("HEARTBEAT", client.last_error or "")

    def test_core_uuid_change_is_a_restart(self) -> None:
        client, conn = self.ready_client()
        conn.close()
        self.clock.advance(1)
        self.handshake(self.endpoint.conns[1], core=CORE2)
        self.assertEqual(self.restarts, [(CORE1, CORE2)])
        self.assertEqual(client.core_uuid, CORE2)
        # seen on an event too
        self.endpoint.conns[1].event([("Event-Name", "HEARTBEAT"), ("Core-UUID", CORE1)])
        self.assertEqual(self.restarts, [(CORE1, CORE2), (CORE2, CORE1)])

    def test_malformed_core_uuid_is_counted_not_a_restart(self) -> None:
        client, conn = self.ready_client()
        for bad in ("not-a-uuid", "1" * 36, CORE2 + "x", CORE2[:-1], "\x00"):
            conn.event([("Event-Name", "HEARTBEAT"), ("Core-UUID", bad)])
        self.assertEqual(self.restarts, [])
        self.assertEqual((client.core_uuid, client.restarts), (CORE1, 0))
        self.assertEqual(client.malformed_core_uuids, 5)
        conn.event([("Event-Name", "HEARTBEAT"), ("Core-UUID", CORE2)])
        self.assertEqual(self.restarts, [(CORE1, CORE2)], "a real change still counts")


class ProtocolTests(SynchronousTestCase):
    def test_disconnect_notice_reason(self) -> None:
        clock = Clock()
        proto = ESLProtocol(clock)
        tr = StringTransport()
        proto.makeConnection(tr)
        d = proto.request("api status")
        proto.dataReceived(b"Content-Type: text/disconnect-notice\nContent-Length: 23\n\n"
                           b"Disconnected, goodbye.\n")
        proto.connectionLost(Failure(ConnectionDone()))
        f = self.failureResultOf(d, ESLConnectionLost)
        self.assertIn("disconnect notice: Disconnected, goodbye.", str(f.value))
        self.failureResultOf(proto.greeting, ESLConnectionLost)
