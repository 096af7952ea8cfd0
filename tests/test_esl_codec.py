"""Golden frames and properties of the Event Socket codec (fsha.wire.esl).

The fixtures are written from the facts sheet (shared/brief/freeswitch.md sections 1-3),
byte by byte, as FreeSWITCH's mod_event_socket writes them.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fsha.wire import esl
from fsha.wire.esl import (
    Command,
    CommandDecoder,
    ESLCommandError,
    ESLProtocolError,
    Frame,
    FrameDecoder,
    Headers,
    decode_event_json,
    decode_event_plain,
    encode_command,
    encode_event_json,
    encode_event_plain,
    encode_frame,
    split_array,
    url_decode,
    url_encode,
)

# Bytes that make header blocks interesting: NUL, separators, line ends, escapes.
HOSTILE_BYTES = "Ab-_:% =\r\x00\x01\xe9"


def probe_headers(headers: Headers) -> None:
    """Use decoded headers the way callers do (lookups build the case-insensitive index)."""
    headers.get("Content-Type")
    headers.get("content-length")
    for name in headers.names():
        headers.get(name.upper())
        _ = name in headers


CORE_UUID = "0f6d1e2a-9b3c-4d5e-8f70-1a2b3c4d5e6f"
CALL_UUID = "7c0e9a52-3d1f-4b6a-9e8d-2f4a6b8c0d1e"
JOB_UUID = "5b8f0c3e-2a4d-4e6f-8a1b-3c5d7e9f1a2b"

GREETING = b"Content-Type: auth/request\n\n"
AUTH_OK = b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n"
AUTH_FAIL = b"Content-Type: command/reply\nReply-Text: -ERR invalid\n\n"
EVENT_OK = b"Content-Type: command/reply\nReply-Text: +OK event listener enabled plain\n\n"
API_NO_REPLY = b"Content-Type: api/response\nContent-Length: 14\n\n-ERR no reply\n"
API_NOT_FOUND = (
    b"Content-Type: api/response\nContent-Length: 30\n\n-ERR bogus Command not found!\n"
)
API_INVALID_PROFILE = b"Content-Type: api/response\nContent-Length: 23\n\nInvalid Profile [slot1]"
BGAPI_OK = (
    b"Content-Type: command/reply\nReply-Text: +OK Job-UUID: "
    + JOB_UUID.encode()
    + b"\nJob-UUID: "
    + JOB_UUID.encode()
    + b"\n\n"
)
DISCONNECT_MSG = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
DISCONNECT = (
    b"Content-Type: text/disconnect-notice\nContent-Length: 67\n\n" + DISCONNECT_MSG
)
RUDE = b"Content-Type: text/rude-rejection\nContent-Length: 24\n\nAccess Denied, go away.\n"
LOG_TEXT = b"2024-05-01 12:00:00.000000 [NOTICE] sofia.c:1234 Ready\n"
LOG_DATA = (
    b"Content-Type: log/data\nContent-Length: "
    + str(len(LOG_TEXT)).encode()
    + b"\nLog-Level: 5\nText-Channel: 3\nLog-File: sofia.c\nLog-Func: sofia_glue\n"
    b"Log-Line: 1234\nUser-Data: \n\n"
    + LOG_TEXT
)

# CHANNEL_HANGUP_COMPLETE as event-plain: Event-Name first, URL-encoded values, a
# duplicate Hangup-Cause, an array value, a literal '+' (%2B), a non-ASCII name (UTF-8).
HANGUP_PLAIN_BODY = (
    b"Event-Name: CHANNEL_HANGUP_COMPLETE\n"
    b"Core-UUID: " + CORE_UUID.encode() + b"\n"
    b"FreeSWITCH-Hostname: fs1\n"
    b"Event-Date-Local: 2024-05-01%2012%3A00%3A00\n"
    b"Event-Date-Timestamp: 1714557600123456\n"
    b"Unique-ID: " + CALL_UUID.encode() + b"\n"
    b"Hangup-Cause: NORMAL_CLEARING\n"
    b"Caller-Caller-ID-Name: Jos%C3%A9%20Garc%C3%ADa\n"
    b"Caller-Caller-ID-Number: %2B15551234567\n"
    b"variable_sip_full_from: %22Alice%22%20%3Csip%3A1000%40198.18.0.11%3E%3Btag%3Dab%2Bc\n"
    b"variable_codecs: ARRAY%3A%3APCMU%7C%3APCMA\n"
    b"Hangup-Cause: NORMAL_CLEARING\n"
    b"\n"
)
HANGUP_PLAIN_FRAME = (
    b"Content-Length: "
    + str(len(HANGUP_PLAIN_BODY)).encode()
    + b"\nContent-Type: text/event-plain\n\n"
    + HANGUP_PLAIN_BODY
)
HANGUP_EXPECTED = [
    ("Event-Name", "CHANNEL_HANGUP_COMPLETE"),
    ("Core-UUID", CORE_UUID),
    ("FreeSWITCH-Hostname", "fs1"),
    ("Event-Date-Local", "2024-05-01 12:00:00"),
    ("Event-Date-Timestamp", "1714557600123456"),
    ("Unique-ID", CALL_UUID),
    ("Hangup-Cause", "NORMAL_CLEARING"),
    ("Caller-Caller-ID-Name", "José García"),
    ("Caller-Caller-ID-Number", "+15551234567"),
    ("variable_sip_full_from", '"Alice" <sip:1000@198.18.0.11>;tag=ab+c'),
    ("variable_codecs", "ARRAY::PCMU|:PCMA"),
    ("Hangup-Cause", "NORMAL_CLEARING"),
]

# BACKGROUND_JOB: the output is the event body; it contains a blank line and text that
# looks like headers, and follows the inner Content-Length (the last header).
JOB_OUTPUT = b"+OK Job done\n\nEvent-Name: NOT_A_HEADER\nContent-Length: 99\n"
JOB_PLAIN_BODY = (
    b"Event-Name: BACKGROUND_JOB\n"
    b"Core-UUID: " + CORE_UUID.encode() + b"\n"
    b"Job-UUID: " + JOB_UUID.encode() + b"\n"
    b"Job-Command: status\n"
    b"Content-Length: " + str(len(JOB_OUTPUT)).encode() + b"\n\n" + JOB_OUTPUT
)

# CUSTOM events start with Event-Subclass.
REGISTER_PLAIN_BODY = (
    b"Event-Subclass: sofia%3A%3Aregister\n"
    b"Event-Name: CUSTOM\n"
    b"Core-UUID: " + CORE_UUID.encode() + b"\n"
    b"profile-name: slot1\n"
    b"from-user: 1000\n"
    b"from-host: 198.18.0.11\n"
    b"contact: %22Alice%22%20%3Csip%3A1000%40198.18.0.50%3A5060%3E\n"
    b"expires: 3600\n"
    b"network-ip: 198.18.0.50\n"
    b"network-port: 5060\n"
    b"\n"
)


def frames_of(data: bytes, **kw: int) -> list[Frame]:
    dec = FrameDecoder(**kw)
    out = dec.feed(data)
    return out


class GoldenFrameTests(SynchronousTestCase):
    def test_greeting(self) -> None:
        [f] = frames_of(GREETING)
        self.assertEqual(f.content_type, "auth/request")
        self.assertEqual(f.body, b"")
        self.assertEqual(encode_frame([("Content-Type", "auth/request")]), GREETING)

    def test_command_replies(self) -> None:
        frames = frames_of(AUTH_OK + AUTH_FAIL + EVENT_OK)
        self.assertEqual([f.content_type for f in frames], ["command/reply"] * 3)
        self.assertEqual(
            [f.reply_text for f in frames],
            ["+OK accepted", "-ERR invalid", "+OK event listener enabled plain"],
        )
        self.assertEqual(
            encode_frame([("Content-Type", "command/reply"), ("Reply-Text", "+OK accepted")]),
            AUTH_OK,
        )

    def test_api_responses(self) -> None:
        a, b, c = frames_of(API_NO_REPLY + API_NOT_FOUND + API_INVALID_PROFILE)
        self.assertEqual(a.content_type, "api/response")
        self.assertEqual(a.body, b"-ERR no reply\n")
        self.assertEqual(b.body, b"-ERR bogus Command not found!\n")
        self.assertEqual(c.body, b"Invalid Profile [slot1]")
        # api/response puts Content-Type first; encode_frame appends Content-Length.
        self.assertEqual(
            encode_frame([("Content-Type", "api/response")], b"-ERR no reply\n"), API_NO_REPLY
        )

    def test_bgapi_reply_has_job_uuid_header(self) -> None:
        [f] = frames_of(BGAPI_OK)
        self.assertEqual(f.reply_text, "+OK Job-UUID: " + JOB_UUID)
        self.assertEqual(f.headers.get("job-uuid"), JOB_UUID)

    def test_event_plain_frame(self) -> None:
        [f] = frames_of(HANGUP_PLAIN_FRAME)
        self.assertEqual(f.content_type, "text/event-plain")
        # events put Content-Length first
        self.assertEqual(f.headers.items()[0][0], "Content-Length")
        ev = decode_event_plain(f.body)
        self.assertEqual(ev.name, "CHANNEL_HANGUP_COMPLETE")
        self.assertIsNone(ev.subclass)
        self.assertEqual(ev.headers.items(), HANGUP_EXPECTED)
        self.assertEqual(ev.headers.getall("hangup-cause"), ["NORMAL_CLEARING"] * 2)
        self.assertEqual(split_array(ev.headers["variable_codecs"]), ["PCMU", "PCMA"])
        self.assertEqual(ev.body, b"")
        self.assertIsNotNone(esl._plain_head_fast(HANGUP_PLAIN_BODY))
        # and the encoder produces exactly these bytes
        self.assertEqual(encode_event_plain(HANGUP_EXPECTED), HANGUP_PLAIN_BODY)
        frame = encode_frame(
            [("Content-Length", str(len(HANGUP_PLAIN_BODY))), ("Content-Type", "text/event-plain")],
            HANGUP_PLAIN_BODY,
        )
        self.assertEqual(frame, HANGUP_PLAIN_FRAME)

    def test_event_plain_with_body(self) -> None:
        ev = decode_event_plain(JOB_PLAIN_BODY)
        self.assertEqual(ev.name, "BACKGROUND_JOB")
        self.assertEqual(ev.headers["Job-UUID"], JOB_UUID)
        self.assertEqual(ev.body, JOB_OUTPUT)
        self.assertNotIn("NOT_A_HEADER", [v for _, v in ev.headers.items()])
        self.assertEqual(ev.headers.items()[-1], ("Content-Length", str(len(JOB_OUTPUT))))
        self.assertEqual(
            encode_event_plain(
                [
                    ("Event-Name", "BACKGROUND_JOB"),
                    ("Core-UUID", CORE_UUID),
                    ("Job-UUID", JOB_UUID),
                    ("Job-Command", "status"),
                ],
                JOB_OUTPUT,
            ),
            JOB_PLAIN_BODY,
        )

    def test_custom_event_subclass_first(self) -> None:
        ev = decode_event_plain(REGISTER_PLAIN_BODY)
        self.assertEqual(ev.headers.items()[0], ("Event-Subclass", "sofia::register"))
        self.assertEqual(ev.name, "CUSTOM")
        self.assertEqual(ev.subclass, "sofia::register")
        self.assertEqual(ev.headers["contact"], '"Alice" <sip:1000@198.18.0.50:5060>')

    def test_event_json(self) -> None:
        body = (
            '{"Event-Name":"BACKGROUND_JOB","Core-UUID":"' + CORE_UUID + '",'
            '"Job-UUID":"' + JOB_UUID + '","Caller-Caller-ID-Name":"José",'
            '"variable_codecs":["PCMU","PCMA"],"Hangup-Cause":"A","Hangup-Cause":"B",'
            '"Content-Length":"7","_body":"+OK\\n\\nx"}'
        ).encode()
        frame = encode_frame(
            [("Content-Length", str(len(body))), ("Content-Type", "text/event-json")], body
        )
        [f] = frames_of(frame)
        self.assertEqual(f.content_type, "text/event-json")
        ev = decode_event_json(f.body)
        self.assertEqual(ev.name, "BACKGROUND_JOB")
        self.assertEqual(ev.body, b"+OK\n\nx")
        self.assertEqual(ev.headers["caller-caller-id-name"], "José")
        self.assertEqual(ev.headers["variable_codecs"], "ARRAY::PCMU|:PCMA")
        self.assertEqual(ev.headers.getall("Hangup-Cause"), ["A", "B"])
        self.assertEqual(ev.headers["Content-Length"], "7")
        self.assertNotIn("_body", ev.headers)

    def test_event_json_odd_values(self) -> None:
        ev = decode_event_json(b'{"Event-Name":"X","n":3,"o":{"a":"b"},"t":true,"z":null}')
        self.assertEqual(ev.headers.items(), [("Event-Name", "X"), ("n", "3"),
                                              ("o", '{"a": "b"}'), ("t", "true"), ("z", "null")])

    def test_event_json_invalid_utf8_survives(self) -> None:
        body = b'{"Event-Name":"CUSTOM","x":"caf\xe9","_body":"\xff\xfe"}'
        ev = decode_event_json(body)
        self.assertEqual(ev.body, b"\xff\xfe")
        self.assertEqual(ev.headers["x"].encode("utf-8", "surrogateescape"), b"caf\xe9")

    def test_event_json_encoder_round_trip(self) -> None:
        enc = encode_event_json(HANGUP_EXPECTED, b"body\nmore")
        obj = json.loads(enc)
        self.assertEqual(obj["_body"], "body\nmore")
        self.assertEqual(obj["Content-Length"], "9")
        ev = decode_event_json(enc)
        self.assertEqual(ev.headers.items(), [*HANGUP_EXPECTED, ("Content-Length", "9")])
        self.assertEqual(ev.body, b"body\nmore")

    def test_event_xml_is_framed(self) -> None:
        xml = (
            b"<event>\n  <headers>\n    <Event-Name>HEARTBEAT</Event-Name>\n"
            b"  </headers>\n</event>"
        )
        data = encode_frame(
            [("Content-Length", str(len(xml))), ("Content-Type", "text/event-xml")], xml
        )
        [f] = frames_of(data)
        self.assertEqual((f.content_type, f.body), ("text/event-xml", xml))

    def test_log_data(self) -> None:
        [f] = frames_of(LOG_DATA)
        self.assertEqual(f.content_type, "log/data")
        self.assertEqual(f.body, LOG_TEXT)
        self.assertEqual(f.headers["Log-Level"], "5")
        self.assertEqual(f.headers["User-Data"], "")

    def test_disconnect_notice(self) -> None:
        [f] = frames_of(DISCONNECT)
        self.assertEqual(f.content_type, "text/disconnect-notice")
        self.assertEqual(f.body, DISCONNECT_MSG)

    def test_rude_rejection_then_disconnect(self) -> None:
        a, b = frames_of(RUDE + DISCONNECT)
        self.assertEqual(a.content_type, "text/rude-rejection")
        self.assertEqual(a.body, b"Access Denied, go away.\n")
        self.assertEqual(b.content_type, "text/disconnect-notice")

    def test_content_length_counts_bytes(self) -> None:
        body = "Résumé ☎\n".encode()
        data = encode_frame([("Content-Type", "api/response")], body) + AUTH_OK
        self.assertIn(b"Content-Length: " + str(len(body)).encode(), data)
        a, b = frames_of(data)
        self.assertEqual(a.body, body)
        self.assertEqual(b.reply_text, "+OK accepted")

    def test_crlf_accepted(self) -> None:
        data = b"Content-Type: api/response\r\nContent-Length: 3\r\n\r\n+OK" + GREETING
        a, b = frames_of(data)
        self.assertEqual(
            a.headers.items(), [("Content-Type", "api/response"), ("Content-Length", "3")]
        )
        self.assertEqual(a.body, b"+OK")
        self.assertEqual(b.content_type, "auth/request")

    def test_header_order_irrelevant_and_case_insensitive(self) -> None:
        [f] = frames_of(b"content-length: 2\nREPLY-TEXT: x\ncontent-type: api/response\n\nok")
        self.assertEqual(f.content_type, "api/response")
        self.assertEqual(f.body, b"ok")
        self.assertEqual(f.reply_text, "x")

    def test_byte_at_a_time(self) -> None:
        stream = GREETING + AUTH_OK + HANGUP_PLAIN_FRAME + API_NO_REPLY + LOG_DATA + DISCONNECT
        whole = frames_of(stream)
        dec = FrameDecoder()
        got: list[Frame] = []
        for i in range(len(stream)):
            got.extend(dec.feed(stream[i : i + 1]))
        self.assertEqual(got, whole)
        self.assertEqual(len(whole), 6)
        self.assertEqual(dec.buffered, 0)


class LimitTests(SynchronousTestCase):
    def test_header_block_too_big_without_end(self) -> None:
        dec = FrameDecoder(max_header_bytes=100)
        self.assertEqual(dec.feed(b"X-A: " + b"a" * 90), [])
        with self.assertRaises(ESLProtocolError):
            dec.feed(b"a" * 20)
        # stays failed: the stream cannot be resynchronised
        with self.assertRaises(ESLProtocolError):
            dec.feed(GREETING)

    def test_header_block_too_big_complete(self) -> None:
        with self.assertRaises(ESLProtocolError):
            frames_of(b"X-A: " + b"a" * 200 + b"\n\n", max_header_bytes=100)

    def test_body_too_big(self) -> None:
        with self.assertRaises(ESLProtocolError) as cm:
            frames_of(b"Content-Length: 1001\n\n", max_body_bytes=1000)
        self.assertIn("1001", str(cm.exception))

    def test_bad_content_length(self) -> None:
        for bad in (b"-1", b"abc", b"1e3", b"", b"\xd9\xa3"):
            with self.assertRaises(ESLProtocolError):
                frames_of(b"Content-Length: " + bad + b"\n\n")

    def test_header_line_without_colon(self) -> None:
        with self.assertRaises(ESLProtocolError):
            frames_of(b"Content-Type api/response\n\n")

    def test_body_collected_in_chunks(self) -> None:
        dec = FrameDecoder()
        body = b"x" * 100_000
        head = encode_frame([("Content-Type", "api/response")], body)
        got: list[Frame] = []
        for i in range(0, len(head), 4096):
            got.extend(dec.feed(head[i : i + 4096]))
        self.assertEqual(got, [Frame(Headers([("Content-Type", "api/response"),
                                              ("Content-Length", "100000")]), body)])


class EventDecodeErrorTests(SynchronousTestCase):
    def test_inner_length_mismatch(self) -> None:
        with self.assertRaises(ESLProtocolError):
            decode_event_plain(b"Event-Name: X\nContent-Length: 5\n\nabc")
        with self.assertRaises(ESLProtocolError):
            decode_event_plain(b"Event-Name: X\nContent-Length: 2\n\nabc")

    def test_trailing_data_without_length(self) -> None:
        with self.assertRaises(ESLProtocolError):
            decode_event_plain(b"Event-Name: X\n\nstray")

    def test_missing_event_name(self) -> None:
        with self.assertRaises(ESLProtocolError):
            decode_event_plain(b"Core-UUID: x\n\n")
        with self.assertRaises(ESLProtocolError):
            decode_event_json(b'{"Core-UUID":"x"}')

    def test_json_not_object(self) -> None:
        for bad in (b"[]", b"3", b"{", b"{}", b'{"Event-Name":"X","_body":3}', b"[[1,2]]",
                    b'[["Event-Name","X"]]', b'{"Event-Name":"X","_body":"\\ud800"}'):
            with self.assertRaises(ESLProtocolError):
                decode_event_json(bad)

    def test_no_final_blank_line_tolerated(self) -> None:
        self.assertEqual(decode_event_plain(b"Event-Name: X\n").name, "X")

    def test_odd_lines_use_slow_path(self) -> None:
        # raw '=', a value without the space after ':', a bad escape, CRLF: all decoded
        ev = decode_event_plain(b"Event-Name: X\r\nA:b=c\nB: 50%\nC: %zz%41\n\n")
        self.assertEqual(
            ev.headers.items(), [("Event-Name", "X"), ("A", "b=c"), ("B", "50%"), ("C", "%zzA")]
        )


class UrlCodingTests(SynchronousTestCase):
    def test_golden(self) -> None:
        cases = [
            ("2024-05-01 12:00:00", "2024-05-01%2012%3A00%3A00"),
            ("+1 555", "%2B1%20555"),
            ("a&b=c;d<e>f?g@h[i\\j]k^l`m{n|o}p\"q#r%s", (
                "a%26b%3Dc%3Bd%3Ce%3Ef%3Fg%40h%5Bi%5Cj%5Dk%5El%60m%7Bn%7Co%7Dp%22q%23r%25s")),
            ("\r\n\t\x7f", "%0D%0A%09%7F"),
            ("é", "%C3%A9"),
            ("~!$'()*,-./_", "~!$'()*,-./_"),
            # a '%' already followed by two uppercase hex digits is passed through
            ("100%AB", "100%AB"),
            ("100%ab", "100%25ab"),
            ("50%", "50%25"),
            ("%4", "%254"),
        ]
        for plain, encoded in cases:
            self.assertEqual(url_encode(plain), encoded, plain)
        self.assertEqual(url_encode("100%AB", double_encode=True), "100%25AB")

    def test_decode_never_turns_plus_into_space(self) -> None:
        self.assertEqual(url_decode("a+b%2Bc"), "a+b+c")
        self.assertEqual(url_decode("%3a%3A"), "::")
        self.assertEqual(url_decode("%zz%4"), "%zz%4")
        self.assertEqual(url_decode("%C3%A9"), "é")
        self.assertEqual(url_decode("%E9").encode("utf-8", "surrogateescape"), b"\xe9")


class CommandTests(SynchronousTestCase):
    def test_encode(self) -> None:
        self.assertEqual(encode_command("api status"), b"api status\n\n")
        self.assertEqual(
            encode_command("bgapi status", [("Job-UUID", JOB_UUID)]),
            b"bgapi status\nJob-UUID: " + JOB_UUID.encode() + b"\n\n",
        )
        self.assertEqual(
            encode_command(
                "sendmsg " + CALL_UUID,
                [("call-command", "execute"), ("execute-app-name", "playback")],
                b"line1\nline2",
            ),
            b"sendmsg " + CALL_UUID.encode() + b"\ncall-command: execute\n"
            b"execute-app-name: playback\nContent-Length: 11\n\nline1\nline2",
        )

    def test_injection_rejected(self) -> None:
        for line in ("api status\n\nexit", "api x\rexit", "", "   "):
            with self.assertRaises(ESLCommandError):
                encode_command(line)
        with self.assertRaises(ESLCommandError):
            encode_command("sendevent CUSTOM", [("X", "a\nauth y")])
        with self.assertRaises(ESLCommandError):
            encode_command("sendevent CUSTOM", [("X\nY", "a")])
        with self.assertRaises(ESLCommandError):
            encode_command("sendevent CUSTOM", [("Content-Length", "3")], b"ab")
        self.assertTrue(issubclass(ESLCommandError, ValueError))
        for bad in ("api \ud800", "api \udc80\ud800"):
            with self.assertRaises(ESLCommandError):
                encode_command(bad)
        with self.assertRaises(ESLCommandError):
            encode_frame([("Reply-Text", "\ud800")])
        # a byte kept as a surrogate escape by a decoder goes back out unchanged
        self.assertEqual(encode_command("api x \udce9"), b"api x \xe9\n\n")

    def test_decode(self) -> None:
        data = (
            b"auth ClueCon\n\n"
            b"\r\n"  # stray empty line between commands is tolerated
            b"api status\r\n\r\n"
            b"bgapi sofia status\nJob-UUID: " + JOB_UUID.encode() + b"\n\n"
            b"sendevent CUSTOM\nEvent-Subclass: fsha::test\nContent-Length: 4\n\nab\n\n"
            b"exit\n\n"
        )
        cmds = CommandDecoder().feed(data)
        self.assertEqual([c.line for c in cmds],
                         ["auth ClueCon", "api status", "bgapi sofia status", "sendevent CUSTOM",
                          "exit"])
        self.assertEqual(cmds[1].name, "api")
        self.assertEqual(cmds[1].args, "status")
        self.assertEqual(cmds[2].headers["Job-UUID"], JOB_UUID)
        self.assertEqual(cmds[3].body, b"ab\n\n")
        self.assertEqual(cmds[3].headers["event-subclass"], "fsha::test")
        self.assertEqual(cmds[4].args, "")

    def test_round_trip(self) -> None:
        raw = encode_command("sendevent CUSTOM", [("Event-Subclass", "x::y"), ("A", "b: c")],
                             b"body")
        [cmd] = CommandDecoder().feed(raw)
        self.assertEqual(cmd, Command("sendevent CUSTOM",
                                      Headers([("Event-Subclass", "x::y"), ("A", "b: c"),
                                               ("Content-Length", "4")]), b"body"))


class HeadersTests(SynchronousTestCase):
    def test_multimap(self) -> None:
        h = Headers([("A", "1"), ("b", "2"), ("a", "3")])
        self.assertEqual(h.get("a"), "1")
        self.assertEqual(h.get("A"), "1")
        self.assertEqual(h.get("B"), "2")
        self.assertIsNone(h.get("c"))
        self.assertEqual(h.get("c", "d"), "d")
        self.assertEqual(h.getall("A"), ["1", "3"])
        self.assertIn("a", h)
        self.assertNotIn("c", h)
        self.assertEqual(h.items(), [("A", "1"), ("b", "2"), ("a", "3")])
        self.assertEqual(len(h), 3)
        with self.assertRaises(KeyError):
            h["zz"]


# ---------------------------------------------------------------------------------------
# Properties

names_st = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters=":%"),
    min_size=1,
    max_size=12,
)
values_st = st.text(max_size=30)
pairs_st = st.lists(st.tuples(names_st, values_st), max_size=8)


@st.composite
def frames_st(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["reply", "api", "event", "json", "log"]))
    if kind == "reply":
        # lone surrogates cannot be sent as header text (the encoder refuses them)
        text = draw(st.text(alphabet=st.characters(blacklist_characters="\r\n",
                                                   blacklist_categories=("Cs",)), max_size=20))
        return encode_frame([("Content-Type", "command/reply"), ("Reply-Text", text)])
    if kind == "api":
        return encode_frame([("Content-Type", "api/response")], draw(st.binary(max_size=40)))
    if kind == "log":
        return encode_frame([("Content-Type", "log/data"), ("Log-Level", "7")],
                            draw(st.binary(max_size=40)))
    pairs = [("Event-Name", "CUSTOM"), *draw(pairs_st)]
    body = draw(st.binary(max_size=30))
    ev = encode_event_plain(pairs, body) if kind == "event" else encode_event_json(pairs, body)
    ct = "text/event-plain" if kind == "event" else "text/event-json"
    return encode_frame([("Content-Length", str(len(ev))), ("Content-Type", ct)], ev)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(frames_st(), min_size=1, max_size=6), st.lists(st.integers(0, 10_000)))
    def test_chunking_is_irrelevant(self, frames: list[bytes], cuts: list[int]) -> None:
        data = b"".join(frames)
        whole = FrameDecoder().feed(data)
        self.assertEqual(len(whole), len(frames))
        dec = FrameDecoder()
        got: list[Frame] = []
        for chunk in chunked(data, cuts):
            got.extend(dec.feed(chunk))
        self.assertEqual(got, whole)
        for f in got:
            if f.content_type == "text/event-plain":
                decode_event_plain(f.body)
            elif f.content_type == "text/event-json":
                decode_event_json(f.body)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.text(alphabet=st.characters(blacklist_characters="\r\n",
                                                              blacklist_categories=("Cs",)),
                                      min_size=1, max_size=20).filter(str.strip),
                              pairs_st, st.binary(max_size=20)), min_size=1, max_size=4),
           st.lists(st.integers(0, 10_000)))
    def test_commands_round_trip_any_chunking(
        self, cmds: list[tuple[str, list[tuple[str, str]], bytes]], cuts: list[int]
    ) -> None:
        clean = [(line, [(n, v.replace("\r", "").replace("\n", "")) for n, v in hs], body)
                 for line, hs, body in cmds]
        data = b"".join(encode_command(line, hs, body) for line, hs, body in clean)
        dec = CommandDecoder()
        got: list[Command] = []
        for chunk in chunked(data, cuts):
            got.extend(dec.feed(chunk))
        self.assertEqual(len(got), len(clean))
        for cmd, (line, hs, body) in zip(got, clean, strict=True):
            self.assertEqual(cmd.line, line.lstrip("\r\n"))
            self.assertEqual(cmd.body, body)
            expected = [(n, v.lstrip(" ")) for n, v in hs]
            if body:
                expected.append(("Content-Length", str(len(body))))
            self.assertEqual(cmd.headers.items(), expected)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=5))
    def test_arbitrary_bytes_only_protocol_error(self, data: bytes, cuts: list[int]) -> None:
        for make in (lambda: FrameDecoder(max_header_bytes=64, max_body_bytes=64),
                     lambda: CommandDecoder(max_header_bytes=64, max_body_bytes=64)):
            dec = make()
            try:
                for chunk in chunked(data, cuts):
                    dec.feed(chunk)
            except ESLProtocolError:
                pass
        for fn in (decode_event_plain, decode_event_json):
            try:
                fn(data)
            except ESLProtocolError:
                pass

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.text(alphabet=HOSTILE_BYTES, max_size=12), min_size=1, max_size=6),
           st.sampled_from(["Content-Type: text/event-plain\n", "api x\n", ""]),
           st.lists(st.integers(0, 200), max_size=4))
    def test_header_shaped_bytes_only_protocol_error(self, lines: list[str], first: str,
                                                     cuts: list[int]) -> None:
        """Header-shaped input (NUL, colons, CR, '%' in names): the decoders, and the
        headers they return, raise nothing but ESLProtocolError (a NUL in a header name
        used to escape as ValueError)."""
        data = (first + "\n".join(lines) + "\n\n").encode("latin-1")
        for make in (FrameDecoder, CommandDecoder):
            dec = make()
            try:
                for chunk in chunked(data, cuts):
                    for message in dec.feed(chunk):
                        probe_headers(message.headers)
            except ESLProtocolError:
                pass
        for fn in (decode_event_plain, decode_event_json):
            try:
                probe_headers(fn(data).headers)
            except ESLProtocolError:
                pass
        try:
            probe_headers(decode_event_json(json.dumps(
                {"Event-Name": "X", **{line: "v" for line in lines}}).encode()).headers)
        except ESLProtocolError:
            pass

    def test_nul_in_a_header_name(self) -> None:
        for decoder, data in ((FrameDecoder(), b"Content-Type: y\nA\x00b: 1\n\n"),
                              (CommandDecoder(), b"api x\nA\x00b: 1\n\n")):
            with self.assertRaises(ESLProtocolError) as caught:
                decoder.feed(data)
            self.assertIn("NUL", str(caught.exception))
        # inside an event body a name may decode to NUL (%00): kept, and looked up fine
        event = decode_event_plain(b"Event-Name: X\nA%00b: 1\n\n")
        self.assertEqual(event.headers.get("a\x00B"), "1")
        self.assertEqual(event.headers.get("event-name"), "X")
        event = decode_event_json(b'{"Event-Name": "X", "A\\u0000b": "1"}')
        self.assertEqual((event.headers.get("EVENT-NAME"), event.headers.get("a\x00b")),
                         ("X", "1"))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.text(alphabet="Ab-_:%= \r\x01", min_size=1, max_size=5),
                              st.text(alphabet="ab%3A0D:= \r\x01+é", max_size=8)), max_size=6))
    def test_event_plain_hostile_lines(self, lines: list[tuple[str, str]]) -> None:
        raw = b"Event-Name: X\n" + b"".join(
            (n + ": " + v + "\n").encode() for n, v in lines
        ) + b"\n"
        try:
            ev = decode_event_plain(raw)
        except ESLProtocolError:
            return
        self.assertEqual(ev.name, "X")
        # the bulk fast path, when it accepts a block, agrees with the line-by-line one
        fast = esl._plain_head_fast(raw)
        if fast is not None:
            self.assertEqual(fast, esl._plain_head_slow(raw[:-1]))

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.tuples(names_st.filter(lambda n: "=" not in n), st.text(max_size=20)),
                 min_size=1, max_size=6),
        st.lists(
            st.tuples(
                st.integers(0, 10_000),
                st.sampled_from([":", " ", "%", "%zz", "=", "\r", "%01", "%00", "%%41", "%4",
                                 "%3a", "\x01", ": ", "%C3%A9", "\xe9"]),
            ),
            max_size=2,
        ),
    )
    def test_event_plain_fast_path_agrees(
        self, pairs: list[tuple[str, str]], corruptions: list[tuple[int, str]]
    ) -> None:
        lines = "".join(f"{n}: {url_encode(v)}\n" for n, v in pairs)
        for at, text in corruptions:
            at %= len(lines)
            lines = lines[:at] + text + lines[at:]
        raw = b"Event-Name: X\n" + lines.encode("utf-8", "surrogateescape") + b"\n"
        fast = esl._plain_head_fast(raw)
        try:
            slow = esl._plain_head_slow(raw[:-1])
        except ESLProtocolError:
            self.assertIsNone(fast)
            return
        if fast is not None:
            self.assertEqual(fast, slow)
        if not corruptions and not any("\x01" in v for _, v in pairs):
            # what FreeSWITCH writes takes the fast path (0x01 in a value is the exception)
            self.assertIsNotNone(fast)
            self.assertEqual(slow[1][1:], [url_decode(url_encode(v)) for _, v in pairs])

    @settings(max_examples=300, deadline=None)
    @given(st.text())
    def test_url_round_trip(self, s: str) -> None:
        self.assertEqual(url_decode(url_encode(s, double_encode=True)), s)
        enc = url_encode(s)
        self.assertNotIn("\n", enc)
        self.assertNotIn(":", enc)
        self.assertNotIn(" ", enc)
        if not any(
            s[i] == "%" and all(c in "0123456789ABCDEF" for c in s[i + 1 : i + 3])
            and i + 2 < len(s)
            for i in range(len(s))
        ):
            self.assertEqual(url_decode(enc), s)

    @settings(max_examples=200, deadline=None)
    @given(pairs_st, st.binary(max_size=50))
    def test_event_round_trip(self, pairs: list[tuple[str, str]], body: bytes) -> None:
        pairs = [("Event-Name", "CUSTOM"),
                 *[(n, v) for n, v in pairs if n.lower() not in ("content-length", "_body")]]
        # values FreeSWITCH would not double-encode are the ones that survive
        pairs = [(n, v.replace("%", "%25")) for n, v in pairs]
        pairs = [(n, url_decode(url_encode(v))) for n, v in pairs]
        expected = pairs + ([("Content-Length", str(len(body)))] if body else [])
        ev = decode_event_plain(encode_event_plain(pairs, body))
        self.assertEqual((ev.headers.items(), ev.body), (expected, body))
        jv = decode_event_json(encode_event_json(pairs, body))
        self.assertEqual((jv.headers.items(), jv.body), (expected, body))
