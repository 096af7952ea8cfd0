"""Tests for fsha.wire.stream: golden vectors, round trips, chunking and fuzzing."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fsha.wire import stream
from fsha.wire.stream import (
    Ack,
    Change,
    ControlAnswer,
    ControlRequest,
    Frame,
    Hello,
    Keepalive,
    Kind,
    Op,
    Position,
    SnapshotBegin,
    SnapshotEnd,
    SnapshotItem,
    StreamDecoder,
    StreamError,
    encode,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol" / "stream.rst"
UUID = "c0ffee00-0000-4000-8000-000000000001"

VECTORS: dict[str, Frame] = {
    "hello": Hello(node=2, incarnation=0x0000018C5A3B2C10,
                   config_digest=bytes.fromhex("a1b2c3d4e5f60718"),
                   positions=(Position(0, 0x0000018C5A3B0001, 42), Position(1, 7, 0))),
    "snapshot-begin": SnapshotBegin(origin=1, incarnation=7, sequence=1000),
    "snapshot-item": SnapshotItem(slot=0, kind=Kind.REGISTRATION, key="1000@pbx.example",
                                  value=b"sip:1000@198.18.0.9", expires_ms=1_700_000_000_000),
    "snapshot-end": SnapshotEnd(origin=1, incarnation=7, sequence=1000, count=1),
    "change-put": Change(origin=1, incarnation=7, sequence=1001, slot=3, kind=Kind.CALL,
                         key=UUID, op=Op.PUT, value=b"<xml/>", expires_ms=0),
    "change-delete": Change(origin=1, incarnation=7, sequence=1002, slot=3, kind=Kind.CALL,
                            key=UUID, op=Op.DELETE, value=b"", expires_ms=0),
    "ack": Ack(positions=(Position(1, 7, 1002),)),
    "keepalive": Keepalive(sent=123456789, echo=987654321),
    "control-request": ControlRequest(id=5, auth="FSHA v2 mac=ab",
                                      path="/control/config/abort", body=b'{"epoch":6}'),
    "control-answer": ControlAnswer(id=5, status=200, body=b'{"dropped":6}'),
    # config catch-up (fsha.configfetch): the same frames, the offer request and answer
    "control-request-offer": ControlRequest(
        id=6, auth="FSHA v2 mac=ab", path="/control/config/offer",
        body=b'{"epoch":1,"file":"0ca64f0f9758530d"}'),
    "control-answer-offer": ControlAnswer(
        id=6, status=200, body=b'{"node":"fs1","epoch":1,"digest":"a1b2c3d4e5f60718",'
                               b'"file":"0ca64f0f9758530d","seal":"sealed"}'),
}


def doc_vectors() -> dict[str, bytes]:
    """The golden vectors of docs/protocol/stream.rst: caption -> bytes."""
    text = DOC.read_text()
    result: dict[str, bytes] = {}
    for match in re.finditer(r":caption: vector (\S+)\n\n((?:   .*\n?)+)", text):
        hexes = [line.split("|")[0] for line in match.group(2).splitlines()]
        result[match.group(1)] = bytes.fromhex("".join(hexes))
    return result


def decode_one(data: bytes) -> Frame:
    frames = StreamDecoder().feed(data)
    assert len(frames) == 1, frames
    return frames[0]


class GoldenVectorTests(SynchronousTestCase):
    def test_doc_has_every_vector(self) -> None:
        self.assertEqual(sorted(doc_vectors()), sorted(VECTORS))

    def test_encode_matches_doc(self) -> None:
        documented = doc_vectors()
        for name, frame in VECTORS.items():
            self.assertEqual(encode(frame).hex(" "), documented[name].hex(" "), name)

    def test_decode_doc(self) -> None:
        for name, data in doc_vectors().items():
            self.assertEqual(decode_one(data), VECTORS[name], name)

    def test_keepalive_by_hand(self) -> None:
        # written out independently of the codec: length 16, version 1, type 7, two u64
        expected = bytes.fromhex("00000010 01 07 00000000075bcd15 000000003ade68b1")
        self.assertEqual(encode(VECTORS["keepalive"]), expected)

    def test_change_layout_by_hand(self) -> None:
        key = UUID.encode()
        payload = struct.pack(">HQQHBBQH", 1, 7, 1001, 3, 1, 1, 0, len(key)) + key + b"<xml/>"
        self.assertEqual(encode(VECTORS["change-put"]),
                         struct.pack(">IBB", len(payload), 1, 5) + payload)

    def test_control_request_by_hand(self) -> None:
        # u32 id, u16 + auth, u16 + path, body: written out without the codec
        payload = (struct.pack(">IH", 5, 14) + b"FSHA v2 mac=ab" + struct.pack(">H", 21)
                   + b"/control/config/abort" + b'{"epoch":6}')
        self.assertEqual(encode(VECTORS["control-request"]),
                         struct.pack(">IBB", len(payload), 1, 8) + payload)

    def test_control_frames_refuse_bad_fields(self) -> None:
        for bad in (ControlRequest(1, "é", "/p", b""), ControlRequest(1, "a", "/p", "x"),  # type: ignore[arg-type]
                    ControlAnswer(1, 99, b""), ControlAnswer(1 << 32, 200, b"")):
            with self.assertRaises(ValueError):
                encode(bad)
        # a path length running past the frame, and a non-ASCII auth
        overrun = struct.pack(">IH", 5, 1) + b"A" + struct.pack(">H", 50) + b"/x"
        with self.assertRaises(StreamError) as e:
            decode_one(struct.pack(">IBB", len(overrun), 1, 8) + overrun)
        self.assertEqual(e.exception.reason, "length")
        latin = struct.pack(">IH", 5, 1) + b"\xe9" + struct.pack(">H", 1) + b"/"
        with self.assertRaises(StreamError) as e:
            decode_one(struct.pack(">IBB", len(latin), 1, 8) + latin)
        self.assertEqual(e.exception.reason, "field")

    def test_decoded_enums(self) -> None:
        frame = decode_one(encode(VECTORS["change-put"]))
        assert isinstance(frame, Change)
        self.assertIs(frame.kind, Kind.CALL)
        self.assertIs(frame.op, Op.PUT)


# -- strategies -----------------------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
nonzero64 = st.integers(1, 0xFFFF_FFFF_FFFF_FFFF)
node = st.integers(0, 0xFFFE)
kinds = st.sampled_from(list(Kind))
keys = st.text(min_size=1, max_size=40).filter(
    lambda k: 1 <= len(k.encode("utf-8", "surrogatepass")) <= stream.MAX_KEY_SIZE
).filter(lambda k: not any(0xD800 <= ord(c) <= 0xDFFF for c in k))
values = st.binary(max_size=200)


@st.composite
def positions(draw: st.DrawFn) -> tuple[Position, ...]:
    origins = draw(st.lists(node, unique=True, max_size=6))
    return tuple(Position(o, draw(u64), draw(u64)) for o in origins)


@st.composite
def changes(draw: st.DrawFn) -> Change:
    op = draw(st.sampled_from(list(Op)))
    return Change(draw(node), draw(nonzero64), draw(nonzero64), draw(u16), draw(kinds),
                  draw(keys), op, draw(values) if op is Op.PUT else b"",
                  draw(u64) if op is Op.PUT else 0)


frames = st.one_of(
    st.builds(Hello, node, nonzero64, st.binary(min_size=8, max_size=8), positions()),
    st.builds(SnapshotBegin, node, nonzero64, u64),
    st.builds(SnapshotItem, u16, kinds, keys, values, u64),
    st.builds(SnapshotEnd, node, nonzero64, u64, u32),
    changes(),
    st.builds(Ack, positions()),
    st.builds(Keepalive, u64, u64),
    st.builds(ControlRequest, u32, st.text(st.characters(max_codepoint=127), max_size=60),
              st.text(st.characters(max_codepoint=127), max_size=40), values),
    st.builds(ControlAnswer, u32, st.integers(100, 999), values),
)


class RoundTripTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(frames)
    def test_round_trip(self, frame: Frame) -> None:
        self.assertEqual(decode_one(encode(frame)), frame)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(frames, max_size=12), st.data())
    def test_any_chunking(self, sent: list[Frame], data: st.DataObject) -> None:
        blob = b"".join(encode(f) for f in sent)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=20)))
        decoder = StreamDecoder()
        received: list[Frame] = []
        start = 0
        for cut in [*cuts, len(blob)]:
            received += decoder.feed(blob[start:cut])
            start = cut
        self.assertEqual(received, sent)
        self.assertEqual(decoder.buffered, 0)

    def test_byte_by_byte(self) -> None:
        blob = b"".join(encode(f) for f in VECTORS.values())
        decoder = StreamDecoder()
        received: list[Frame] = []
        for i in range(len(blob)):
            received += decoder.feed(blob[i:i + 1])
        self.assertEqual(received, list(VECTORS.values()))

    def test_memoryview_and_bytearray(self) -> None:
        blob = encode(VECTORS["change-put"])
        self.assertEqual(StreamDecoder().feed(memoryview(blob)), [VECTORS["change-put"]])
        self.assertEqual(StreamDecoder().feed(bytearray(blob)), [VECTORS["change-put"]])


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=64), max_size=8))
    def test_arbitrary_bytes(self, chunks: list[bytes]) -> None:
        decoder = StreamDecoder(max_payload=4096)
        for chunk in chunks:
            try:
                decoder.feed(chunk)
            except StreamError as e:
                self.assertIn(e.reason, stream.REASONS)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(frames, min_size=1, max_size=4), st.data())
    def test_mutations(self, sent: list[Frame], data: st.DataObject) -> None:
        blob = bytearray(b"".join(encode(f) for f in sent))
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            cut = data.draw(st.integers(0, len(blob)))
            del blob[cut:cut + data.draw(st.integers(0, 8))]
        try:
            StreamDecoder().feed(bytes(blob))
        except StreamError as e:
            self.assertIn(e.reason, stream.REASONS)
            for frame in e.frames:  # what was delivered is well formed
                self.assertEqual(decode_one(encode(frame)), frame)

    def test_not_bytes(self) -> None:
        with self.assertRaises(StreamError):
            StreamDecoder().feed("text")  # type: ignore[arg-type]


def header(length: int, version: int = 1, frame_type: int = 5) -> bytes:
    return struct.pack(">IBB", length, version, frame_type)


class ErrorTests(SynchronousTestCase):
    def assertReason(self, data: bytes, reason: str, max_payload: int = 1 << 20) -> StreamError:
        with self.assertRaises(StreamError) as ctx:
            StreamDecoder(max_payload).feed(data)
        self.assertEqual(ctx.exception.reason, reason, str(ctx.exception))
        return ctx.exception

    def test_oversize_rejected_from_length_alone(self) -> None:
        decoder = StreamDecoder(max_payload=1000)
        self.assertEqual(decoder.feed(b"\x00\x00"), [])
        with self.assertRaises(StreamError) as ctx:
            decoder.feed(b"\x03\xe9")  # 1001: the payload never needs to arrive
        self.assertEqual(ctx.exception.reason, "oversize")
        self.assertEqual(decoder.buffered, 0)

    def test_max_size_accepted(self) -> None:
        limit = 200
        key = b"k"
        value = b"v" * (limit - 32 - len(key))
        payload = struct.pack(">HQQHBBQH", 0, 1, 1, 0, 1, 1, 0, 1) + key + value
        self.assertEqual(len(payload), limit)
        frame = StreamDecoder(limit).feed(header(limit) + payload)[0]
        assert isinstance(frame, Change)
        self.assertEqual(frame.value, value)
        self.assertReason(header(limit + 1) + payload + b"v", "oversize", limit)

    def test_encoder_refuses_oversize(self) -> None:
        big = Change(0, 1, 1, 0, Kind.CALL, "k", Op.PUT, b"x" * stream.MAX_PAYLOAD_SIZE, 0)
        self.assertRaises(ValueError, encode, big)

    def test_version_and_type(self) -> None:
        self.assertReason(header(0, version=2)[:5], "version")
        self.assertReason(header(0, frame_type=0), "type")
        self.assertReason(header(0, frame_type=10), "type")

    def test_lengths(self) -> None:
        self.assertReason(header(15, frame_type=7) + bytes(15), "length")
        self.assertReason(header(17, frame_type=7) + bytes(17), "length")
        self.assertReason(header(31) + bytes(31), "length")
        self.assertReason(header(1, frame_type=6) + bytes(1), "length")
        # ACK announcing 2 positions, carrying 1
        self.assertReason(header(20, frame_type=6) + b"\x00\x02" + bytes(18), "length")
        # key longer than the frame
        payload = struct.pack(">HQQHBBQH", 0, 1, 1, 0, 1, 1, 0, 10) + b"abc"
        self.assertReason(header(len(payload)) + payload, "length")

    def test_fields(self) -> None:
        def change(origin: int = 0, inc: int = 1, seq: int = 1, kind: int = 1, op: int = 1,
                   expires: int = 0, key: bytes = b"k", value: bytes = b"") -> bytes:
            p = struct.pack(">HQQHBBQH", origin, inc, seq, 0, kind, op, expires, len(key))
            p += key + value
            return header(len(p)) + p

        self.assertEqual(len(StreamDecoder().feed(change())), 1)
        for bad in (change(origin=0xFFFF), change(inc=0), change(seq=0), change(kind=0),
                    change(kind=5), change(op=3), change(op=2, value=b"x"),
                    change(op=2, expires=5), change(key=b""), change(key=b"\xff\xfe"),
                    change(key=b"k" * 1025)):
            self.assertReason(bad, "field")
        dup = header(38, frame_type=6) + b"\x00\x02" + struct.pack(">HQQ", 1, 1, 1) * 2
        self.assertReason(dup, "field")

    def test_errors_are_sticky_and_keep_earlier_frames(self) -> None:
        decoder = StreamDecoder()
        good = encode(VECTORS["keepalive"])
        with self.assertRaises(StreamError) as ctx:
            decoder.feed(good + header(0, version=9))
        self.assertEqual(ctx.exception.frames, [VECTORS["keepalive"]])
        with self.assertRaises(StreamError) as ctx:
            decoder.feed(good)
        self.assertEqual(ctx.exception.reason, "version")
        self.assertEqual(ctx.exception.frames, [])

    def test_encoder_validation(self) -> None:
        bad: list[object] = [
            Change(0xFFFF, 1, 1, 0, Kind.CALL, "k", Op.PUT, b"", 0),
            Change(0, 0, 1, 0, Kind.CALL, "k", Op.PUT, b"", 0),
            Change(0, 1, 0, 0, Kind.CALL, "k", Op.PUT, b"", 0),
            Change(0, 1, 1, 0x10000, Kind.CALL, "k", Op.PUT, b"", 0),
            Change(0, 1, 1, 0, 9, "k", Op.PUT, b"", 0),  # type: ignore[arg-type]
            Change(0, 1, 1, 0, Kind.CALL, "k", 7, b"", 0),  # type: ignore[arg-type]
            Change(0, 1, 1, 0, Kind.CALL, "", Op.PUT, b"", 0),
            Change(0, 1, 1, 0, Kind.CALL, "k" * 1025, Op.PUT, b"", 0),
            Change(0, 1, 1, 0, Kind.CALL, "\ud800", Op.PUT, b"", 0),
            Change(0, 1, 1, 0, Kind.CALL, "k", Op.DELETE, b"v", 0),
            Change(0, 1, 1, 0, Kind.CALL, "k", Op.PUT, "v", 0),  # type: ignore[arg-type]
            Change(0, True, 1, 0, Kind.CALL, "k", Op.PUT, b"", 0),
            Hello(0, 1, b"short", ()),
            Hello(0, 1, bytes(8), (Position(1, 1, 1), Position(1, 2, 2))),
            Hello(0, 1, bytes(8), [Position(1, 1, 1)]),  # type: ignore[arg-type]
            Keepalive(-1, 0),
            SnapshotEnd(0, 1, 1, 1 << 32),
            "not a frame",
        ]
        for frame in bad:
            self.assertRaises(ValueError, encode, frame)  # type: ignore[arg-type]
