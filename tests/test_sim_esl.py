"""The simulator's ESL server over StringTransport: golden bytes of every reply type."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from fsha.sim.coredb import CoreDB
from fsha.sim.esl_server import ESLServerFactory, ESLServerProtocol, event_frame
from fsha.sim.events import SimEvent
from fsha.sim.switch import ProfileConfig, Switch
from fsha.wire.esl import FrameDecoder, decode_event_json, decode_event_plain

DISCONNECT = (
    b"Content-Type: text/disconnect-notice\nContent-Length: 67\n\n"
    b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
)


def reply(text: str) -> bytes:
    return f"Content-Type: command/reply\nReply-Text: {text}\n\n".encode()


class Harness:
    def __init__(self, acl: tuple[str, ...] = (), max_queue: int = 100_000,
                 peer: str = "127.0.0.1") -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.switch = Switch(
            self.clock,
            CoreDB(":memory:"),
            name="fs1",
            profiles=[ProfileConfig("internal", "127.0.1.1", 5060)],
            heartbeat_interval=20,
        )
        self.switch.start()
        self.factory = ESLServerFactory(
            self.switch, "ClueCon", self.clock, acl=acl, max_queue=max_queue
        )

    def connect(self, peer: str = "127.0.0.1") -> tuple[ESLServerProtocol, StringTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", peer, 40000))
        assert isinstance(proto, ESLServerProtocol)
        tr = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        proto.makeConnection(tr)
        return proto, tr

    def authed(self) -> tuple[ESLServerProtocol, StringTransport]:
        proto, tr = self.connect()
        proto.dataReceived(b"auth ClueCon\n\n")
        tr.clear()
        return proto, tr


def frames(data: bytes) -> list:
    return FrameDecoder().feed(data)


class GreetingAuthTests(SynchronousTestCase):
    def test_greeting_and_auth(self) -> None:
        h = Harness()
        proto, tr = h.connect()
        self.assertEqual(tr.value(), b"Content-Type: auth/request\n\n")
        tr.clear()
        proto.dataReceived(b"api status\n\n")
        self.assertEqual(tr.value(), reply("-ERR command not found"))
        tr.clear()
        proto.dataReceived(b"auth ClueCon\r\n\r\n")
        self.assertEqual(tr.value(), reply("+OK accepted"))
        self.assertFalse(tr.disconnecting)

    def test_bad_password_closes(self) -> None:
        h = Harness()
        proto, tr = h.connect()
        tr.clear()
        proto.dataReceived(b"auth wrong\n\nauth ClueCon\n\n")
        self.assertEqual(tr.value(), reply("-ERR invalid") + DISCONNECT)
        self.assertTrue(tr.disconnecting)

    def test_acl_rude_rejection(self) -> None:
        h = Harness(acl=("127.0.0.0/8",))
        _, ok = h.connect("127.0.0.5")
        self.assertEqual(ok.value(), b"Content-Type: auth/request\n\n")
        _, tr = h.connect("10.1.2.3")
        self.assertEqual(
            tr.value(),
            b"Content-Type: text/rude-rejection\nContent-Length: 24\n\n"
            b"Access Denied, go away.\n" + DISCONNECT,
        )
        self.assertTrue(tr.disconnecting)

    def test_exit(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"exit\n\napi status\n\n")
        self.assertEqual(tr.value(), reply("+OK bye") + DISCONNECT)
        self.assertTrue(tr.disconnecting)

    def test_unknown_command(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"frobnicate\n\n")
        self.assertEqual(tr.value(), reply("-ERR command not found"))

    def test_garbage_disconnects_without_crash(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"api status\nContent-Length: banana\n\n")
        self.assertTrue(tr.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(h.factory.connections, set())
        self.assertNotIn(proto.on_event, h.switch.listeners)


class ApiTests(SynchronousTestCase):
    def test_api_golden(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"api global_getvar core_uuid\n\n")
        body = h.switch.core_uuid.encode()
        self.assertEqual(
            tr.value(),
            b"Content-Type: api/response\nContent-Length: %d\n\n%s" % (len(body), body),
        )

    def test_api_errors_golden(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"api nosuch thing\n\napi global_getvar unset\n\napi \n\n")
        self.assertEqual(
            tr.value(),
            b"Content-Type: api/response\nContent-Length: 31\n\n-ERR nosuch Command not found!\n"
            b"Content-Type: api/response\nContent-Length: 14\n\n-ERR no reply\n"
            b"Content-Type: api/response\nContent-Length: 14\n\n-ERR no reply\n",
        )

    def test_invalid_profile_has_no_err(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"api sofia profile nosuch stop\n\n")
        self.assertEqual(
            tr.value(),
            b"Content-Type: api/response\nContent-Length: 24\n\nInvalid Profile [nosuch]",
        )

    def test_replies_in_command_order(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        data = b"".join(b"api hash insert/r/k%d/v%d\n\napi hash select/r/k%d\n\n" % (i, i, i)
                        for i in range(50))
        # arbitrary chunking
        for i in range(0, len(data), 7):
            proto.dataReceived(data[i : i + 7])
        bodies = [f.body for f in frames(tr.value())]
        self.assertEqual(bodies, [x for i in range(50) for x in (b"+OK\n", b"v%d" % i)])

    def test_bgapi_and_background_job(self) -> None:
        h = Harness()
        sub, subtr = h.authed()
        sub.dataReceived(b"event plain BACKGROUND_JOB\n\n")
        subtr.clear()
        _other, othertr = h.authed()  # not subscribed
        proto, tr = h.authed()
        proto.dataReceived(b"bgapi global_getvar core_uuid\nJob-UUID: job-1\n\n")
        self.assertEqual(
            tr.value(),
            b"Content-Type: command/reply\nReply-Text: +OK Job-UUID: job-1\nJob-UUID: job-1\n\n",
        )
        (frame,) = frames(subtr.value())
        self.assertEqual(frame.content_type, "text/event-plain")
        ev = decode_event_plain(frame.body)
        self.assertEqual(ev.get("Event-Name"), "BACKGROUND_JOB")
        self.assertEqual(ev.get("Job-UUID"), "job-1")
        self.assertEqual(ev.get("Job-Command"), "global_getvar")
        self.assertEqual(ev.get("Job-Command-Arg"), "core_uuid")
        self.assertEqual(ev.body, h.switch.core_uuid.encode())
        self.assertEqual(othertr.value(), b"")

    def test_bgapi_generates_job_uuid(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"bgapi status\n\n")
        (frame,) = frames(tr.value())
        job = frame.headers.get("Job-UUID")
        self.assertEqual(frame.headers.get("Reply-Text"), f"+OK Job-UUID: {job}")
        self.assertEqual(len(job or ""), 36)


class EventTests(SynchronousTestCase):
    def test_subscribe_replies(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(
            b"event plain CHANNEL_CREATE\n\nevent json HEARTBEAT\n\nevent xml ALL\n\n"
            b"event plain NOSUCH\n\nnixevent HEARTBEAT\n\nnixevent BOGUS\n\nnoevents\n\n"
        )
        self.assertEqual(
            tr.value(),
            reply("+OK event listener enabled plain")
            + reply("+OK event listener enabled json")
            + reply("+OK event listener enabled xml")
            + reply("-ERR no keywords supplied")
            + reply("+OK events nixed")
            + reply("-ERR no keywords supplied")
            + reply("+OK no longer listening for events"),
        )

    def test_plain_event_framing(self) -> None:
        ev = SimEvent("CUSTOM", "x::y", [("Event-Subclass", "x::y"), ("Event-Name", "CUSTOM"),
                                         ("A", "b c+d")], b"line1\n\nline2")
        self.assertEqual(
            event_frame(ev, "plain"),
            b"Content-Length: 89\nContent-Type: text/event-plain\n\n"
            b"Event-Subclass: x%3A%3Ay\nEvent-Name: CUSTOM\nA: b%20c%2Bd\n"
            b"Content-Length: 12\n\nline1\n\nline2",
        )
        js = event_frame(ev, "json")
        self.assertTrue(js.startswith(b"Content-Length: "))
        head, _, body = js.partition(b"\n\n")
        self.assertEqual(head.split(b"\n")[1], b"Content-Type: text/event-json")
        self.assertEqual(
            json.loads(body),
            {"Event-Subclass": "x::y", "Event-Name": "CUSTOM", "A": "b c+d",
             "Content-Length": "12", "_body": "line1\n\nline2"},
        )
        xml = event_frame(ev, "xml")
        self.assertIn(b"Content-Type: text/event-xml", xml)
        self.assertIn(b"<A>b%20c%2Bd</A>", xml)

    def test_channel_events_delivered_and_decodable(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"event plain CHANNEL_CREATE CHANNEL_HANGUP_COMPLETE\n\n")
        tr.clear()
        (u,) = h.switch.place_call("internal")
        h.switch.hangup(u)
        evs = [decode_event_plain(f.body) for f in frames(tr.value())]
        self.assertEqual([e.get("Event-Name") for e in evs],
                         ["CHANNEL_CREATE", "CHANNEL_HANGUP_COMPLETE"])
        self.assertEqual(evs[1].headers.getall("Hangup-Cause"),
                         ["NORMAL_CLEARING", "NORMAL_CLEARING"])
        self.assertEqual(evs[0].get("Unique-ID"), u)

    def test_json_events(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"event json CHANNEL_ANSWER\n\n")
        tr.clear()
        (u,) = h.switch.place_call("internal")
        (frame,) = frames(tr.value())
        self.assertEqual(frame.content_type, "text/event-json")
        ev = decode_event_json(frame.body)
        self.assertEqual((ev.get("Event-Name"), ev.get("Unique-ID")), ("CHANNEL_ANSWER", u))

    def test_custom_subclasses(self) -> None:
        h = Harness()
        only, otr = h.authed()
        only.dataReceived(b"event plain CUSTOM sofia::register\n\n")
        bare, btr = h.authed()
        bare.dataReceived(b"event plain CUSTOM\n\n")
        every, etr = h.authed()
        every.dataReceived(b"event plain ALL\n\n")
        for tr in (otr, btr, etr):
            tr.clear()
        reg = h.switch.register("internal", "1001")
        h.switch.unregister("internal", reg.call_id)
        names = [decode_event_plain(f.body).get("Event-Subclass") for f in frames(otr.value())]
        self.assertEqual(names, ["sofia::register"])
        self.assertEqual(btr.value(), b"")
        first = frames(etr.value())[0].body
        self.assertTrue(first.startswith(b"Event-Subclass: sofia%3A%3Aregister\n"))
        self.assertEqual(len(frames(etr.value())), 2)

    def test_filters(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"event plain ALL\n\nfilter Event-Name CHANNEL_CREATE\n\n")
        self.assertEqual(
            tr.value(),
            reply("+OK event listener enabled plain")
            + reply("+OK filter added. [Event-Name]=[CHANNEL_CREATE]"),
        )
        tr.clear()
        h.switch.place_call("internal")
        h.switch.send_heartbeat()
        self.assertEqual([decode_event_plain(f.body).get("Event-Name")
                          for f in frames(tr.value())], ["CHANNEL_CREATE"])
        tr.clear()
        # add a second positive and a negative one (a "-" value)
        proto.dataReceived(b"filter Event-Name HEARTBEAT\n\nfilter Channel-State -CS_INIT\n\n")
        tr.clear()
        h.switch.place_call("internal")  # CREATE has CS_INIT: negative wins
        h.switch.send_heartbeat()
        self.assertEqual([decode_event_plain(f.body).get("Event-Name")
                          for f in frames(tr.value())], ["HEARTBEAT"])
        tr.clear()
        proto.dataReceived(b"filter delete Event-Name HEARTBEAT\n\n")
        self.assertEqual(tr.value(), reply("+OK filter deleted. [Event-Name][HEARTBEAT]"))
        tr.clear()
        proto.dataReceived(b"filter delete all\n\nfilter Event-Name -HEARTBEAT\n\n")
        tr.clear()
        # only negative filters: nothing passes
        h.switch.place_call("internal")
        h.switch.send_heartbeat()
        self.assertEqual(tr.value(), b"")
        proto.dataReceived(b"filter Unique-ID /^[0-9a-f-]+$/\n\n")
        tr.clear()
        h.switch.place_call("internal")
        self.assertEqual(len(frames(tr.value())), 2)  # CREATE + ANSWER (regex positive)

    def test_sendevent(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"event plain CUSTOM my::thing\n\n")
        tr.clear()
        proto.dataReceived(
            b"sendevent CUSTOM\nEvent-Subclass: my::thing\nFoo: bar\nContent-Length: 5\n\nhello"
        )
        got = frames(tr.value())
        reply_frame, event = got  # the reply first: events wait for the command
        ev = decode_event_plain(event.body)
        self.assertEqual(reply_frame.headers.get("Reply-Text"), f"+OK {ev.get('Event-UUID')}")
        self.assertEqual((ev.get("Foo"), ev.body), ("bar", b"hello"))
        self.assertEqual(ev.get("Core-UUID"), h.switch.core_uuid)

    def test_sendmsg(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        (u,) = h.switch.place_call("internal")
        proto.dataReceived(b"sendmsg nosuch\ncall-command: hangup\n\n")
        self.assertEqual(tr.value(), reply("-ERR invalid session id [nosuch]"))
        tr.clear()
        proto.dataReceived(
            f"sendmsg {u}\ncall-command: execute\nexecute-app-name: playback\n"
            f"execute-app-arg: /tmp/x.wav\n\n".encode()
        )
        self.assertEqual(tr.value(), reply("+OK"))
        self.assertEqual(h.switch.channels[u].application, "playback")
        proto.dataReceived(f"sendmsg {u}\ncall-command: hangup\nhangup-cause: USER_BUSY\n\n"
                           .encode())
        self.assertNotIn(u, h.switch.channels)

    def test_myevents_linger(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"linger\n\nnolinger\n\nmyevents nosuch\n\n")
        self.assertEqual(
            tr.value(),
            reply("-ERR not controlling a session") * 2 + reply("-ERR invalid uuid"),
        )
        (a,) = h.switch.place_call("internal")
        (b,) = h.switch.place_call("internal")
        tr.clear()
        proto.dataReceived(f"myevents {a}\n\nlinger 5\n\n".encode())
        self.assertEqual(tr.value(),
                         reply("+OK Events Enabled") + reply("+OK will linger 5 seconds"))
        tr.clear()
        h.switch.hangup(b)
        self.assertEqual(tr.value(), b"")  # not my call
        h.switch.hangup(a)
        got = frames(tr.value())
        self.assertEqual(
            [decode_event_plain(f.body).get("Event-Name") for f in got[:-1]],
            ["CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY"],
        )
        self.assertEqual(got[-1].content_type, "text/disconnect-notice")
        self.assertEqual(got[-1].headers.get("Content-Disposition"), "linger")
        self.assertFalse(tr.disconnecting)
        h.clock.advance(5)
        self.assertTrue(tr.disconnecting)

    def test_myevents_without_linger_closes(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        (a,) = h.switch.place_call("internal")
        proto.dataReceived(f"myevents {a}\n\nnolinger\n\n".encode())
        h.switch.hangup(a)
        self.assertTrue(tr.disconnecting)
        last = frames(tr.value())[-1]
        self.assertEqual(last.headers.get("Content-Disposition"), "disconnect")

    def test_log_nolog(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"nolog\n\nlog info\n\nlog 7\n\nlog bogus\n\nnolog\n\n")
        self.assertEqual(
            tr.value(),
            reply("-ERR not loging") + reply("+OK log level info [6]")
            + reply("+OK log level 7 [7]") + reply("-ERR invalid log level")
            + reply("+OK no longer logging"),
        )


class BackpressureHangTests(SynchronousTestCase):
    def test_bounded_queue_and_kill_after_lost_events(self) -> None:
        h = Harness(max_queue=10)
        proto, tr = h.authed()
        proto.dataReceived(b"event plain HEARTBEAT\n\n")
        tr.clear()
        proto.pauseProducing()  # as the transport does when its buffer is full
        for _ in range(10):
            h.switch.send_heartbeat()
        self.assertEqual(len(proto.queue), 10)
        self.assertEqual(tr.value(), b"")
        for _ in range(499):
            h.switch.send_heartbeat()
        self.assertFalse(tr.disconnecting)
        proto.resumeProducing()
        self.assertEqual(len(frames(tr.value())), 10)
        proto.pauseProducing()
        for _ in range(10 + 500):
            h.switch.send_heartbeat()
        self.assertTrue(tr.disconnecting)

    def test_hang_and_unhang(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"event plain HEARTBEAT\n\n")
        tr.clear()
        h.factory.hang()
        self.assertEqual(tr.producerState, "paused")
        proto.dataReceived(b"api status\n\n")
        h.switch.send_heartbeat()
        _late, late_tr = h.connect()
        self.assertEqual(late_tr.value(), b"")  # no greeting while hung
        self.assertEqual(tr.value(), b"")
        self.assertFalse(tr.disconnecting)
        h.factory.unhang()
        self.assertEqual(tr.producerState, "producing")
        got = frames(tr.value())
        self.assertEqual([f.content_type for f in got], ["api/response", "text/event-plain"])
        self.assertEqual(late_tr.value(), b"Content-Type: auth/request\n\n")


class OrderingRobustnessTests(SynchronousTestCase):
    def test_events_fired_by_a_command_follow_its_reply(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        (u,) = h.switch.place_call("internal")
        proto.dataReceived(b"event plain CHANNEL_HANGUP\n\n")
        tr.clear()
        proto.dataReceived(f"api uuid_kill {u}\n\n".encode())
        got = frames(tr.value())
        self.assertEqual([f.content_type for f in got], ["api/response", "text/event-plain"])
        self.assertEqual(got[0].body, b"+OK\n")

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300), st.booleans())
    def test_arbitrary_bytes_never_crash(self, data: bytes, authed: bool) -> None:
        h = Harness()
        proto, tr = h.authed() if authed else h.connect()
        proto.dataReceived(data)
        # whatever happened, what was written is whole frames
        FrameDecoder().feed(tr.value())
        if tr.disconnecting:
            proto.connectionLost(None)
            self.assertNotIn(proto.on_event, h.switch.listeners)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.text(alphabet="Ab-_:% =\r\x00\x01", max_size=12), min_size=1,
                    max_size=5),
           st.sampled_from(["api status\n", "sendevent CUSTOM\n", "auth ClueCon\n", ""]),
           st.booleans())
    def test_header_shaped_commands_never_crash(self, lines: list[str], first: str,
                                                authed: bool) -> None:
        """A NUL in a command header name is the codec's protocol error: the connection
        is closed, the switch unharmed (it used to escape as ValueError)."""
        h = Harness()
        proto, tr = h.authed() if authed else h.connect()
        proto.dataReceived((first + "\n".join(lines) + "\n\n").encode("latin-1"))
        FrameDecoder().feed(tr.value())

    def test_nul_in_a_command_header_name_closes(self) -> None:
        h = Harness()
        proto, tr = h.authed()
        proto.dataReceived(b"sendevent CUSTOM\nA\x00b: 1\n\n")
        self.assertTrue(tr.disconnecting)

    def test_flood_is_paced_by_backpressure_and_never_dropped(self) -> None:
        h = Harness(max_queue=10)
        proto, tr = h.authed()
        quiet, qtr = h.authed()
        proto.dataReceived(b"event plain CHANNEL_ANSWER\n\n")
        tr.clear()
        ev = h.switch.sample_event("CHANNEL_ANSWER")
        self.assertFalse(quiet.flood(ev, 10))
        proto.pauseProducing()
        self.assertTrue(proto.flood(ev, 1000))
        self.assertEqual(tr.value(), b"")
        proto.resumeProducing()
        got = frames(tr.value())
        self.assertEqual(len(got), 1000)
        self.assertEqual(decode_event_plain(got[0].body).get("Event-Name"), "CHANNEL_ANSWER")
        self.assertFalse(tr.disconnecting)
        self.assertEqual(qtr.value(), b"")
