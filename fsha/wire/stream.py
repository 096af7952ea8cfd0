"""The replication stream: binary, versioned, length-prefixed frames over a TLS link.

Every frame is a 6-byte header followed by ``length`` payload bytes (big-endian)::

    off size type  field
      0    4 u32   length   (payload bytes after the header; at most the maximum size)
      4    1 u8    version  (1)
      5    1 u8    type     (FrameType)
      6    n       payload  (layout per type)

Payloads (``docs/protocol/stream.rst`` has every byte and the golden vectors)::

    HELLO           u16 node, u64 incarnation, 8s config digest, u16 count, count x POSITION
    SNAPSHOT_BEGIN  u16 origin, u64 incarnation, u64 sequence
    SNAPSHOT_ITEM   u16 slot, u8 kind, u64 expires_ms, u16 key length, key, value (rest)
    SNAPSHOT_END    u16 origin, u64 incarnation, u64 sequence, u32 item count
    CHANGE          u16 origin, u64 incarnation, u64 sequence, u16 slot, u8 kind, u8 op,
                    u64 expires_ms, u16 key length, key, value (rest)
    ACK             u16 count, count x POSITION
    KEEPALIVE       u64 sent, u64 echo
    CONTROL_REQUEST u32 id, u16 auth length, auth, u16 path length, path, body (rest)
    CONTROL_ANSWER  u32 id, u16 status, body (rest)
    POSITION        u16 origin, u64 incarnation, u64 sequence   (18 bytes)

:class:`StreamDecoder` is incremental (``feed(bytes) -> list[Frame]``), rejects a frame whose
announced length exceeds the maximum as soon as the length field arrives (before buffering
its payload), and raises nothing but :class:`StreamError`. Decoding CHANGE frames is the hot
path: one ``unpack_from`` on the receive buffer, one copy of the value, no enum construction.

This module does no I/O.

Why about 620 lines: one codec for every frame type of one format (encoders, decoders and
their checks side by side), so a change of the format is made and reviewed in one place.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DIGEST_SIZE",
    "HEADER_SIZE",
    "MAX_KEY_SIZE",
    "MAX_PAYLOAD_SIZE",
    "NO_NODE",
    "NO_SLOT",
    "REASONS",
    "VERSION",
    "Ack",
    "Change",
    "ControlAnswer",
    "ControlRequest",
    "Frame",
    "FrameType",
    "Hello",
    "Keepalive",
    "Kind",
    "Op",
    "Position",
    "SnapshotBegin",
    "SnapshotEnd",
    "SnapshotItem",
    "StreamDecoder",
    "StreamError",
    "encode",
]

VERSION: Final = 1
HEADER_SIZE: Final = 6
#: The default (and largest) payload size of one frame, in bytes.
MAX_PAYLOAD_SIZE: Final = 1 << 20
#: The longest key, in UTF-8 bytes.
MAX_KEY_SIZE: Final = 1024
DIGEST_SIZE: Final = 8
NO_NODE: Final = 0xFFFF
NO_SLOT: Final = 0xFFFF
#: Every ``StreamError.reason``.
REASONS: Final = ("oversize", "version", "type", "length", "field")

_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF

_HEADER: Final = struct.Struct(">IBB")
_HELLO: Final = struct.Struct(">HQ8sH")
_POSITION: Final = struct.Struct(">HQQ")
_SNAP_BEGIN: Final = struct.Struct(">HQQ")
_SNAP_ITEM: Final = struct.Struct(">HBQH")
_SNAP_END: Final = struct.Struct(">HQQI")
_CHANGE: Final = struct.Struct(">HQQHBBQH")
_ACK: Final = struct.Struct(">H")
_KEEPALIVE: Final = struct.Struct(">QQ")
_CONTROL_REQUEST: Final = struct.Struct(">IH")
_CONTROL_ANSWER: Final = struct.Struct(">IH")
_U16_LEN: Final = struct.Struct(">H")


class StreamError(Exception):
    """Bytes that are not a valid frame stream.

    ``reason`` is one of :data:`REASONS` (a stable counter label), ``detail`` explains, and
    ``frames`` holds the valid frames decoded from the same ``feed`` call before the bad one,
    so a caller loses nothing that arrived intact.
    """

    reason: str
    detail: str
    frames: list[Frame]

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.frames = []

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class FrameType(enum.IntEnum):
    HELLO = 1
    SNAPSHOT_BEGIN = 2
    SNAPSHOT_ITEM = 3
    SNAPSHOT_END = 4
    CHANGE = 5
    ACK = 6
    KEEPALIVE = 7
    CONTROL_REQUEST = 8
    CONTROL_ANSWER = 9


class Kind(enum.IntEnum):
    """What a replicated record is."""

    CALL = 1  # a row of FreeSWITCH's recovery table
    REGISTRATION = 2  # a sofia registration
    IDENTITY = 3  # a master's FreeSWITCH runtime identity (core UUID, profiles, version)
    LIMIT = 4  # call-limit usage


class Op(enum.IntEnum):
    PUT = 1
    DELETE = 2


@dataclass(frozen=True, slots=True)
class Position:
    """How far a node has applied ``origin``'s log: the last (incarnation, sequence)."""

    origin: int
    incarnation: int
    sequence: int


@dataclass(frozen=True, slots=True)
class Hello:
    node: int
    incarnation: int
    config_digest: bytes
    positions: tuple[Position, ...]


@dataclass(frozen=True, slots=True)
class SnapshotBegin:
    origin: int
    incarnation: int
    sequence: int  # the origin's position the snapshot reflects


@dataclass(frozen=True, slots=True)
class SnapshotItem:
    slot: int
    kind: Kind
    key: str
    value: bytes
    expires_ms: int  # Unix time in milliseconds; 0 = never


@dataclass(frozen=True, slots=True)
class SnapshotEnd:
    origin: int
    incarnation: int
    sequence: int
    count: int  # SNAPSHOT_ITEM frames between begin and end


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of an origin's log: put or delete the record (slot, kind, key)."""

    origin: int
    incarnation: int
    sequence: int
    slot: int
    kind: Kind
    key: str
    op: Op
    value: bytes  # empty for DELETE
    expires_ms: int  # Unix time in milliseconds; 0 = never (always 0 for DELETE)


@dataclass(frozen=True, slots=True)
class Ack:
    positions: tuple[Position, ...]


@dataclass(frozen=True, slots=True)
class Keepalive:
    sent: int  # the sender's clock, milliseconds, opaque to the receiver
    echo: int  # the last ``sent`` received from the peer, 0 if none


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """A signed control request relayed to the peer (``fsha config push`` through this
    node): the peer checks ``auth`` as its control endpoint would (fsha.wire.control)."""

    id: int  # the sender's request number, echoed by the answer
    auth: str  # the Authorization header, signed for the peer (ASCII)
    path: str  # e.g. /control/config/stage (ASCII)
    body: bytes  # the JSON body the signature covers


@dataclass(frozen=True, slots=True)
class ControlAnswer:
    id: int  # the request's
    status: int  # the HTTP status the control endpoint would have answered
    body: bytes  # its JSON body


Frame = (Hello | SnapshotBegin | SnapshotItem | SnapshotEnd | Change | Ack | Keepalive
         | ControlRequest | ControlAnswer)

_KINDS: Final = {int(k): k for k in Kind}
_OPS: Final = {int(o): o for o in Op}
_TYPES: Final = frozenset(int(t) for t in FrameType)


# -- encoding -------------------------------------------------------------------------------


def _check_int(name: str, value: object, top: int, low: int = 0) -> None:
    if value.__class__ is not int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{name} {value!r} is not an integer")
    if not low <= value <= top:  # type: ignore[operator]
        raise ValueError(f"{name} {value!r} is out of range {low}..{top}")


def _check_node(name: str, value: int) -> None:
    _check_int(name, value, _U16)
    if value == NO_NODE:
        raise ValueError(f"{name} {NO_NODE:#06x} is reserved for 'no node'")


def _key_bytes(key: object) -> bytes:
    if not isinstance(key, str):
        raise ValueError(f"key {key!r} is not a string")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"key {key!r} is not encodable as UTF-8") from None
    if not 1 <= len(raw) <= MAX_KEY_SIZE:
        raise ValueError(f"key is {len(raw)} bytes, must be 1..{MAX_KEY_SIZE}")
    return raw


def _record_checks(slot: int, kind: object, value: object, expires_ms: int) -> None:
    _check_int("slot", slot, _U16)
    if kind not in _KINDS:
        raise ValueError(f"kind {kind!r} is not a Kind")
    if not isinstance(value, bytes):
        raise ValueError(f"value must be bytes, not {type(value).__name__}")
    _check_int("expires_ms", expires_ms, _U64)


def _frame(frame_type: int, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_SIZE}")
    return _HEADER.pack(len(payload), VERSION, frame_type) + payload


def _positions(positions: object) -> bytes:
    if not isinstance(positions, tuple):
        raise ValueError("positions must be a tuple of Position")
    if len(positions) > _U16:
        raise ValueError(f"{len(positions)} positions, at most {_U16}")
    seen: set[int] = set()
    out = []
    for p in positions:
        if not isinstance(p, Position):
            raise ValueError(f"{p!r} is not a Position")
        _check_node("origin", p.origin)
        _check_int("incarnation", p.incarnation, _U64)
        _check_int("sequence", p.sequence, _U64)
        if p.origin in seen:
            raise ValueError(f"origin {p.origin} appears twice")
        seen.add(p.origin)
        out.append(_POSITION.pack(p.origin, p.incarnation, p.sequence))
    return b"".join(out)


def _encode_hello(f: Hello) -> bytes:
    _check_node("node", f.node)
    _check_int("incarnation", f.incarnation, _U64, 1)
    if not isinstance(f.config_digest, bytes) or len(f.config_digest) != DIGEST_SIZE:
        raise ValueError(f"config digest must be {DIGEST_SIZE} bytes")
    body = _positions(f.positions)
    return _frame(FrameType.HELLO, _HELLO.pack(f.node, f.incarnation, f.config_digest,
                                               len(f.positions)) + body)


def _encode_snapshot_begin(f: SnapshotBegin) -> bytes:
    _check_node("origin", f.origin)
    _check_int("incarnation", f.incarnation, _U64, 1)
    _check_int("sequence", f.sequence, _U64)
    return _frame(FrameType.SNAPSHOT_BEGIN,
                  _SNAP_BEGIN.pack(f.origin, f.incarnation, f.sequence))


def _encode_snapshot_item(f: SnapshotItem) -> bytes:
    _record_checks(f.slot, f.kind, f.value, f.expires_ms)
    key = _key_bytes(f.key)
    return _frame(FrameType.SNAPSHOT_ITEM,
                  _SNAP_ITEM.pack(f.slot, f.kind, f.expires_ms, len(key)) + key + f.value)


def _encode_snapshot_end(f: SnapshotEnd) -> bytes:
    _check_node("origin", f.origin)
    _check_int("incarnation", f.incarnation, _U64, 1)
    _check_int("sequence", f.sequence, _U64)
    _check_int("count", f.count, _U32)
    return _frame(FrameType.SNAPSHOT_END,
                  _SNAP_END.pack(f.origin, f.incarnation, f.sequence, f.count))


def _encode_change(f: Change) -> bytes:
    _check_node("origin", f.origin)
    _check_int("incarnation", f.incarnation, _U64, 1)
    _check_int("sequence", f.sequence, _U64, 1)
    _record_checks(f.slot, f.kind, f.value, f.expires_ms)
    if f.op not in _OPS:
        raise ValueError(f"op {f.op!r} is not an Op")
    if f.op == Op.DELETE and (f.value or f.expires_ms):
        raise ValueError("a DELETE has no value and no expiry")
    key = _key_bytes(f.key)
    return _frame(FrameType.CHANGE,
                  _CHANGE.pack(f.origin, f.incarnation, f.sequence, f.slot, f.kind, f.op,
                               f.expires_ms, len(key)) + key + f.value)


def _encode_ack(f: Ack) -> bytes:
    body = _positions(f.positions)
    return _frame(FrameType.ACK, _ACK.pack(len(f.positions)) + body)


def _encode_keepalive(f: Keepalive) -> bytes:
    _check_int("sent", f.sent, _U64)
    _check_int("echo", f.echo, _U64)
    return _frame(FrameType.KEEPALIVE, _KEEPALIVE.pack(f.sent, f.echo))


def _ascii(name: str, value: object) -> bytes:
    if not isinstance(value, str) or not value.isascii():
        raise ValueError(f"{name} must be an ASCII string")
    raw = value.encode("ascii")
    if len(raw) > _U16:
        raise ValueError(f"{name} is {len(raw)} bytes, at most {_U16}")
    return raw


def _encode_control_request(f: ControlRequest) -> bytes:
    _check_int("id", f.id, _U32)
    auth, path = _ascii("auth", f.auth), _ascii("path", f.path)
    if not isinstance(f.body, bytes):
        raise ValueError("body must be bytes")
    return _frame(FrameType.CONTROL_REQUEST,
                  _CONTROL_REQUEST.pack(f.id, len(auth)) + auth
                  + _U16_LEN.pack(len(path)) + path + f.body)


def _encode_control_answer(f: ControlAnswer) -> bytes:
    _check_int("id", f.id, _U32)
    _check_int("status", f.status, 999, 100)
    if not isinstance(f.body, bytes):
        raise ValueError("body must be bytes")
    return _frame(FrameType.CONTROL_ANSWER, _CONTROL_ANSWER.pack(f.id, f.status) + f.body)


_ENCODERS: Final[dict[type, Callable[..., bytes]]] = {
    ControlRequest: _encode_control_request,
    ControlAnswer: _encode_control_answer,
    Hello: _encode_hello,
    SnapshotBegin: _encode_snapshot_begin,
    SnapshotItem: _encode_snapshot_item,
    SnapshotEnd: _encode_snapshot_end,
    Change: _encode_change,
    Ack: _encode_ack,
    Keepalive: _encode_keepalive,
}


def encode(frame: Frame) -> bytes:
    """The bytes of ``frame`` (header included); raises ValueError for an invalid field."""
    encoder = _ENCODERS.get(type(frame))
    if encoder is None:
        raise ValueError(f"{frame!r} is not a frame")
    return encoder(frame)


# -- decoding -------------------------------------------------------------------------------


def _bad(detail: str) -> StreamError:
    return StreamError("field", detail)


def _decode_positions(buf: bytearray, pos: int, end: int, count: int) -> tuple[Position, ...]:
    if end - pos != count * _POSITION.size:
        raise StreamError("length", f"{count} positions need {count * _POSITION.size} bytes, "
                                    f"got {end - pos}")
    result = []
    seen = set()
    for origin, incarnation, sequence in _POSITION.iter_unpack(buf[pos:end]):
        if origin == NO_NODE:
            raise _bad(f"origin {NO_NODE:#06x} is reserved for 'no node'")
        if origin in seen:
            raise _bad(f"origin {origin} appears twice")
        seen.add(origin)
        result.append(Position(origin, incarnation, sequence))
    return tuple(result)


def _decode_key(buf: bytearray, pos: int, key_len: int, end: int) -> str:
    if not 1 <= key_len <= MAX_KEY_SIZE:
        raise _bad(f"key length {key_len}, must be 1..{MAX_KEY_SIZE}")
    if pos + key_len > end:
        raise StreamError("length", f"key of {key_len} bytes overruns the frame")
    try:
        return buf[pos:pos + key_len].decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("key is not valid UTF-8") from None


def _fixed(name: str, st: struct.Struct, size: int) -> None:
    if size != st.size:
        raise StreamError("length", f"{name} payload is {size} bytes, expected {st.size}")


def _decode(frame_type: int, buf: bytearray, pos: int, end: int) -> Frame:
    size = end - pos
    if frame_type == FrameType.CHANGE:
        if size < _CHANGE.size:
            raise StreamError("length", f"CHANGE payload is {size} bytes, at least "
                                        f"{_CHANGE.size} needed")
        (origin, incarnation, sequence, slot, kind_value, op_value, expires,
         key_len) = _CHANGE.unpack_from(buf, pos)
        kind = _KINDS.get(kind_value)
        op = _OPS.get(op_value)
        if kind is None or op is None:
            raise _bad(f"unknown kind {kind_value}" if kind is None else f"unknown op {op_value}")
        if origin == NO_NODE:
            raise _bad(f"origin {NO_NODE:#06x} is reserved for 'no node'")
        if not incarnation or not sequence:
            raise _bad("a CHANGE needs a non-zero incarnation and sequence")
        start = pos + _CHANGE.size
        key = _decode_key(buf, start, key_len, end)
        value = bytes(buf[start + key_len:end])
        if op is Op.DELETE and (value or expires):
            raise _bad("a DELETE has no value and no expiry")
        return Change(origin, incarnation, sequence, slot, kind, key, op, value, expires)
    if frame_type == FrameType.SNAPSHOT_ITEM:
        if size < _SNAP_ITEM.size:
            raise StreamError("length", f"SNAPSHOT_ITEM payload is {size} bytes, at least "
                                        f"{_SNAP_ITEM.size} needed")
        slot, kind_value, expires, key_len = _SNAP_ITEM.unpack_from(buf, pos)
        kind = _KINDS.get(kind_value)
        if kind is None:
            raise _bad(f"unknown kind {kind_value}")
        start = pos + _SNAP_ITEM.size
        key = _decode_key(buf, start, key_len, end)
        return SnapshotItem(slot, kind, key, bytes(buf[start + key_len:end]), expires)
    if frame_type == FrameType.ACK:
        if size < _ACK.size:
            raise StreamError("length", f"ACK payload is {size} bytes, at least 2 needed")
        (count,) = _ACK.unpack_from(buf, pos)
        return Ack(_decode_positions(buf, pos + _ACK.size, end, count))
    if frame_type == FrameType.KEEPALIVE:
        _fixed("KEEPALIVE", _KEEPALIVE, size)
        return Keepalive(*_KEEPALIVE.unpack_from(buf, pos))
    if frame_type == FrameType.HELLO:
        if size < _HELLO.size:
            raise StreamError("length", f"HELLO payload is {size} bytes, at least "
                                        f"{_HELLO.size} needed")
        node, incarnation, digest, count = _HELLO.unpack_from(buf, pos)
        if node == NO_NODE:
            raise _bad(f"node {NO_NODE:#06x} is reserved for 'no node'")
        if not incarnation:
            raise _bad("a HELLO needs a non-zero incarnation")
        return Hello(node, incarnation, digest,
                     _decode_positions(buf, pos + _HELLO.size, end, count))
    if frame_type in (FrameType.SNAPSHOT_BEGIN, FrameType.SNAPSHOT_END):
        if frame_type == FrameType.SNAPSHOT_BEGIN:
            _fixed("SNAPSHOT_BEGIN", _SNAP_BEGIN, size)
            origin, incarnation, sequence = _SNAP_BEGIN.unpack_from(buf, pos)
            frame: Frame = SnapshotBegin(origin, incarnation, sequence)
        else:
            _fixed("SNAPSHOT_END", _SNAP_END, size)
            origin, incarnation, sequence, count = _SNAP_END.unpack_from(buf, pos)
            frame = SnapshotEnd(origin, incarnation, sequence, count)
        if origin == NO_NODE:
            raise _bad(f"origin {NO_NODE:#06x} is reserved for 'no node'")
        if not incarnation:
            raise _bad("a snapshot needs a non-zero incarnation")
        return frame
    if frame_type == FrameType.CONTROL_REQUEST:
        return _decode_control_request(buf, pos, end)
    if frame_type == FrameType.CONTROL_ANSWER:
        if size < _CONTROL_ANSWER.size:
            raise StreamError("length", f"CONTROL_ANSWER payload is {size} bytes, at least "
                                        f"{_CONTROL_ANSWER.size} needed")
        request_id, status = _CONTROL_ANSWER.unpack_from(buf, pos)
        if not 100 <= status <= 999:
            raise _bad(f"status {status} is not an HTTP status")
        return ControlAnswer(request_id, status, bytes(buf[pos + _CONTROL_ANSWER.size:end]))
    raise StreamError("type", f"unknown frame type {frame_type}")


def _decode_control_request(buf: bytearray, pos: int, end: int) -> ControlRequest:
    if end - pos < _CONTROL_REQUEST.size:
        raise StreamError("length", f"CONTROL_REQUEST payload is {end - pos} bytes, at "
                                    f"least {_CONTROL_REQUEST.size + 2} needed")
    request_id, auth_len = _CONTROL_REQUEST.unpack_from(buf, pos)
    start = pos + _CONTROL_REQUEST.size
    if start + auth_len + 2 > end:
        raise StreamError("length", f"auth of {auth_len} bytes overruns the frame")
    auth = bytes(buf[start:start + auth_len])
    (path_len,) = _U16_LEN.unpack_from(buf, start + auth_len)
    start += auth_len + 2
    if start + path_len > end:
        raise StreamError("length", f"path of {path_len} bytes overruns the frame")
    path = bytes(buf[start:start + path_len])
    if not auth.isascii() or not path.isascii():
        raise _bad("auth and path must be ASCII")
    return ControlRequest(request_id, auth.decode("ascii"), path.decode("ascii"),
                          bytes(buf[start + path_len:end]))


class StreamDecoder:
    """Turns the bytes of one stream, in chunks of any size, into frames.

    After a :class:`StreamError` the stream is unusable (framing is lost): every later
    ``feed`` raises the same error. ``max_payload`` may be lowered, never raised above
    :data:`MAX_PAYLOAD_SIZE`.
    """

    __slots__ = ("_buf", "_error", "_max")

    def __init__(self, max_payload: int = MAX_PAYLOAD_SIZE) -> None:
        if not 0 < max_payload <= MAX_PAYLOAD_SIZE:
            raise ValueError(f"max_payload must be 1..{MAX_PAYLOAD_SIZE}")
        self._max = max_payload
        self._buf = bytearray()
        self._error: StreamError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet part of a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """The frames completed by ``data``; raises only StreamError."""
        if self._error is not None:
            raise StreamError(self._error.reason, self._error.detail)
        if not isinstance(data, bytes | bytearray | memoryview):
            self._error = StreamError("field", f"not a byte string: {type(data).__name__}")
            raise self._error
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        n = len(buf)
        limit = self._max
        unpack = _HEADER.unpack_from
        try:
            while n - pos >= HEADER_SIZE:
                length, version, frame_type = unpack(buf, pos)
                if length > limit:
                    raise StreamError("oversize", f"frame of {length} bytes, at most {limit}")
                if version != VERSION:
                    raise StreamError("version", f"version {version}, only {VERSION} is known")
                if frame_type not in _TYPES:
                    raise StreamError("type", f"unknown frame type {frame_type}")
                end = pos + HEADER_SIZE + length
                if end > n:
                    break
                frames.append(_decode(frame_type, buf, pos + HEADER_SIZE, end))
                pos = end
            else:
                # A partial header: reject an oversize length as soon as it is known.
                if n - pos >= 4:
                    length = int.from_bytes(buf[pos:pos + 4], "big")
                    if length > limit:
                        raise StreamError("oversize",
                                          f"frame of {length} bytes, at most {limit}")
                if n - pos >= 5 and buf[pos + 4] != VERSION:
                    raise StreamError("version",
                                      f"version {buf[pos + 4]}, only {VERSION} is known")
        except StreamError as e:
            e.frames = frames
            self._fail(e)
            raise
        except Exception as e:  # a decoder bug must not escape as anything else
            error = StreamError("field", f"undecodable frame: {e!r}")
            error.frames = frames
            self._fail(error)
            raise error from e
        if pos:
            del buf[:pos]
        return frames

    def _fail(self, error: StreamError) -> None:
        self._error = error
        self._buf = bytearray()
