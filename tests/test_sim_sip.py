"""The SIP OPTIONS responder: responses without I/O, and binding real UDP sockets."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from fsha.sim.sip import SipParseError, SipResponder, UdpSipBinder, respond
from fsha.sim.switch import Profile

OPTIONS = (
    b"OPTIONS sip:127.0.1.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK776asdhds;rport\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKxyz\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: <sip:127.0.1.1:5060>\r\n"
    b"From: <sip:probe@10.0.0.1>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@10.0.0.1\r\n"
    b"CSeq: 63104 OPTIONS\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def parse_response(data: bytes) -> tuple[str, list[tuple[str, str]]]:
    text = data.decode()
    assert text.endswith("\r\n\r\n")
    lines = text[:-4].split("\r\n")
    return lines[0], [tuple(x.split(": ", 1)) for x in lines[1:]]  # type: ignore[misc]


class RespondTests(SynchronousTestCase):
    def test_options_200(self) -> None:
        out = respond(OPTIONS, node="fs1", standby=False, src=("10.0.0.1", 5070),
                      local=("127.0.1.1", 5060), to_tag="abc")
        assert out is not None
        status, headers = parse_response(out)
        self.assertEqual(status, "SIP/2.0 200 OK")
        h = dict(headers)
        self.assertEqual(
            [v for k, v in headers if k == "Via"],
            ["SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK776asdhds;rport=5070",
             "SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKxyz"],
        )
        self.assertEqual(h["From"], "<sip:probe@10.0.0.1>;tag=1928301774")
        self.assertEqual(h["To"], "<sip:127.0.1.1:5060>;tag=abc")
        self.assertEqual(h["Call-ID"], "a84b4c76e66710@10.0.0.1")
        self.assertEqual(h["CSeq"], "63104 OPTIONS")
        self.assertEqual(h["X-FSHA-Node"], "fs1")
        self.assertEqual(h["Content-Length"], "0")

    def test_received_added_when_source_differs(self) -> None:
        out = respond(OPTIONS, node="fs1", standby=False, src=("192.0.2.9", 4000),
                      local=("127.0.1.1", 5060))
        assert out is not None
        via = parse_response(out)[1][0][1]
        self.assertEqual(
            via, "SIP/2.0/UDP 10.0.0.1:5070;received=192.0.2.9;branch=z9hG4bK776asdhds;rport=4000"
        )

    def test_standby_503(self) -> None:
        out = respond(OPTIONS, node="fs1", standby=True, src=("10.0.0.1", 5070),
                      local=("127.0.1.1", 5060))
        assert out is not None
        self.assertEqual(parse_response(out)[0], "SIP/2.0 503 System Paused")

    def test_compact_headers_and_other_methods(self) -> None:
        req = (b"INVITE sip:x@y SIP/2.0\r\nv: SIP/2.0/UDP 1.2.3.4;branch=z9\r\nf: <sip:a@b>;tag=1"
               b"\r\nt: <sip:x@y>\r\ni: cid\r\nCSeq: 1 INVITE\r\n\r\n")
        out = respond(req, node="n", standby=False, src=("1.2.3.4", 5060), local=("1.1.1.1", 1))
        assert out is not None
        status, headers = parse_response(out)
        self.assertEqual(status, "SIP/2.0 501 Not Implemented")
        self.assertEqual(dict(headers)["Call-ID"], "cid")

    def test_no_answer_to_responses_and_ack(self) -> None:
        self.assertIsNone(respond(b"SIP/2.0 200 OK\r\n\r\n", node="n", standby=False,
                                  src=("1.2.3.4", 1), local=("1.1.1.1", 1)))
        ack = OPTIONS.replace(b"OPTIONS sip", b"ACK sip", 1)
        self.assertIsNone(respond(ack, node="n", standby=False, src=("1.2.3.4", 1),
                                  local=("1.1.1.1", 1)))

    def test_malformed(self) -> None:
        for bad in (b"", b"hello", b"OPTIONS sip:x SIP/2.0\r\n\r\n", b"\xff\xfe",
                    OPTIONS.replace(b"Call-ID", b"Call-Idx")):
            self.assertRaises(SipParseError, respond, bad, node="n", standby=False,
                              src=("1.2.3.4", 1), local=("1.1.1.1", 1))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=400))
    def test_arbitrary_bytes_only_raise_own_error(self, data: bytes) -> None:
        try:
            respond(data, node="n", standby=False, src=("1.2.3.4", 1), local=("1.1.1.1", 1))
        except SipParseError:
            pass

    @settings(max_examples=200, deadline=None)
    @given(st.integers(min_value=0, max_value=len(OPTIONS)), st.binary(max_size=20))
    def test_mutated_options_only_raise_own_error(self, pos: int, junk: bytes) -> None:
        data = OPTIONS[:pos] + junk + OPTIONS[pos:]
        try:
            respond(data, node="n", standby=False, src=("1.2.3.4", 1), local=("1.1.1.1", 1))
        except SipParseError:
            pass


class _Unreachable:
    def write(self, data: bytes, addr: object) -> None:
        raise OSError(101, "Network is unreachable")


class ResponderTests(SynchronousTestCase):
    def test_an_answer_that_cannot_leave_is_counted_not_raised(self) -> None:
        # the floating address left this host between the request and the answer
        responder = SipResponder(Profile("slot1", "127.0.1.1", 5060), lambda: "fs1",
                                 lambda: False)
        responder.transport = _Unreachable()  # type: ignore[assignment]
        responder.datagramReceived(OPTIONS, ("10.0.0.1", 5070))
        self.assertEqual((responder.answered, responder.dropped), (0, 1))


class BinderTests(SynchronousTestCase):
    def test_bind_failure_when_address_in_use(self) -> None:
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        busy = holder.getsockname()[1]
        binder = UdpSipBinder(reactor, node=lambda: "fs1")
        self.assertIsNone(binder.bind(Profile("p", "127.0.0.1", busy)))
        free = Profile("q", "127.0.0.1", 0)
        port = binder.bind(free)
        self.assertIsInstance(port, int)
        self.assertNotEqual(port, 0)
        free.bound_port = port
        # restart in the same reactor turn: the same address binds again
        binder.unbind(free)
        again = Profile("q", "127.0.0.1", port or 0)
        self.assertEqual(binder.bind(again), port)
        binder.unbind(again)
        self.assertEqual(binder.ports, {})
