"""The FreeSWITCH Event Socket (ESL) wire format: framing, events and commands.

Both directions of an inbound Event Socket connection are here, without any I/O:

* :class:`FrameDecoder` turns what FreeSWITCH sends (greeting, command replies, api
  responses, events, log lines, disconnect notices) into :class:`Frame` objects, and
  :func:`encode_frame` produces those bytes (the simulator's server side);
* :class:`CommandDecoder` turns what a client sends into :class:`Command` objects, and
  :func:`encode_command` produces those bytes (the client side);
* :func:`decode_event_plain` / :func:`decode_event_json` turn the body of a
  ``text/event-plain`` / ``text/event-json`` frame into an :class:`Event`, and
  :func:`encode_event_plain` / :func:`encode_event_json` produce such bodies.

Framing (``docs/protocol/esl.rst`` has the byte-by-byte description): a message is a block
of ``Name: value`` lines ended by an empty line, followed by exactly ``Content-Length``
*bytes* of body when that header is present. FreeSWITCH writes LF; both decoders also
accept CRLF. Header order is never relied upon; names are looked up case-insensitively and
duplicates are kept (:class:`Headers`).

Text: header names and values are decoded from UTF-8 with ``surrogateescape``, so bytes
that are not valid UTF-8 survive a decode/encode round trip unchanged (FreeSWITCH does not
validate UTF-8). Encoders use the same error handler.

Every decoder raises only :class:`ESLProtocolError`, whatever bytes it is given; sizes are
bounded (``max_header_bytes`` / ``max_body_bytes``) so a peer cannot make us buffer without
limit. Encoders raise :class:`ESLCommandError` (a :class:`ValueError`) for arguments that
would break the framing, e.g. a CR or LF inside a command line (command injection).

``decode_event_plain`` is the hot path (one call per event). It has a fast path that
percent-decodes the whole header block with a handful of C-level passes and checks that the
block is well formed in the process; anything unusual falls back to a line-by-line decoder
that gives the same result for every well-formed block.

Why about 900 lines: one wire format, both directions (frames, commands, events,
their decoders and encoders, the event hot path), as every codec in ``fsha/wire/`` is one
module.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

__all__ = [
    "CT_API_RESPONSE",
    "CT_AUTH_REQUEST",
    "CT_COMMAND_REPLY",
    "CT_DISCONNECT_NOTICE",
    "CT_EVENT_JSON",
    "CT_EVENT_PLAIN",
    "CT_EVENT_XML",
    "CT_LOG_DATA",
    "CT_RUDE_REJECTION",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_HEADER_BYTES",
    "Command",
    "CommandDecoder",
    "ESLCommandError",
    "ESLProtocolError",
    "Event",
    "Frame",
    "FrameDecoder",
    "Headers",
    "decode_event_json",
    "decode_event_plain",
    "encode_command",
    "encode_event_json",
    "encode_event_plain",
    "encode_frame",
    "split_array",
    "url_decode",
    "url_encode",
]

DEFAULT_MAX_HEADER_BYTES: Final = 64 * 1024
DEFAULT_MAX_BODY_BYTES: Final = 32 * 1024 * 1024

# Content types FreeSWITCH sends (facts sheet section 1.3).
CT_AUTH_REQUEST: Final = "auth/request"
CT_COMMAND_REPLY: Final = "command/reply"
CT_API_RESPONSE: Final = "api/response"
CT_EVENT_PLAIN: Final = "text/event-plain"
CT_EVENT_JSON: Final = "text/event-json"
CT_EVENT_XML: Final = "text/event-xml"
CT_LOG_DATA: Final = "log/data"
CT_DISCONNECT_NOTICE: Final = "text/disconnect-notice"
CT_RUDE_REJECTION: Final = "text/rude-rejection"

_ENC: Final = "utf-8"
_ERRORS: Final = "surrogateescape"


class ESLProtocolError(Exception):
    """The peer sent bytes that are not a valid Event Socket message (or too many of them)."""


class ESLCommandError(ValueError):
    """A command, header or frame cannot be encoded safely (e.g. CR/LF in an argument)."""


def _to_bytes(text: str) -> bytes:
    """UTF-8, with the bytes a decoder kept as surrogate escapes restored."""
    try:
        return text.encode(_ENC, _ERRORS)
    except UnicodeEncodeError as e:
        raise ESLCommandError(f"text that cannot be encoded: {e.reason}") from None


# ---------------------------------------------------------------------------------------
# Headers


class Headers:
    """An ordered, case-insensitive multimap of header names to string values.

    Duplicates are kept in wire order; :meth:`get` returns the first value of a name.
    Built once by a decoder and not meant to be mutated afterwards.
    """

    __slots__ = ("_index", "_names", "_values")

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        names: list[str] = []
        values: list[str] = []
        for name, value in pairs:
            names.append(name)
            values.append(value)
        self._names = names
        self._values = values
        self._index: dict[str, str] | None = None

    @classmethod
    def _from_lists(cls, names: list[str], values: list[str]) -> Headers:
        self = cls.__new__(cls)
        self._names = names
        self._values = values
        self._index = None
        return self

    def _lower_index(self) -> dict[str, str]:
        index = self._index
        if index is None:
            names = self._names
            lowered = "\x00".join(names).lower().split("\x00") if names else []
            if len(lowered) != len(names):
                # A name holding NUL itself (a decoded %00): lower them one by one.
                lowered = [n.lower() for n in names]
            # reversed so that the first occurrence of a name wins
            index = dict(zip(reversed(lowered), reversed(self._values), strict=True))
            self._index = index
        return index

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name`` (any case), or ``default``."""
        index = self._index
        if index is None:
            # Fast path for the first headers (Event-Name, Event-Subclass, Content-Type are
            # near the top): an exact match with no other spelling of the name before it.
            names = self._names
            lname = name.lower()
            for i in range(min(4, len(names))):
                n = names[i]
                if n == name or n.lower() == lname:
                    return self._values[i]
            # Callers ask with FreeSWITCH's own spelling: a C-level scan for it costs a
            # fraction of building the case-insensitive index (a header spelt two ways in
            # one event, which FreeSWITCH never sends, would then answer the exact one).
            try:
                return self._values[names.index(name)]
            except ValueError:
                pass
            index = self._lower_index()
            return index.get(lname, default)
        return index.get(name.lower(), default)

    def getall(self, name: str) -> list[str]:
        """Every value of ``name`` (any case), in wire order."""
        key = name.lower()
        return [v for n, v in zip(self._names, self._values, strict=True) if n.lower() == key]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return name in self._names or name.lower() in self._lower_index()

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def items(self) -> list[tuple[str, str]]:
        """All (name, value) pairs in wire order, duplicates included."""
        return list(zip(self._names, self._values, strict=True))

    def names(self) -> list[str]:
        return list(self._names)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return zip(self._names, self._values, strict=True)

    def __len__(self) -> int:
        return len(self._names)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self._names == other._names and self._values == other._values
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({self.items()!r})"


# ---------------------------------------------------------------------------------------
# Frames (what FreeSWITCH sends)


class Frame:
    """One message from FreeSWITCH: its outer headers and its body (``b""`` if none)."""

    __slots__ = ("body", "headers")

    def __init__(self, headers: Headers, body: bytes = b"") -> None:
        self.headers = headers
        self.body = body

    @property
    def content_type(self) -> str:
        # outer Headers are shared between identical frames: the index is built once
        return self.headers._lower_index().get("content-type") or ""

    @property
    def reply_text(self) -> str:
        """``Reply-Text`` of a ``command/reply`` (``""`` if absent)."""
        return self.headers._lower_index().get("reply-text") or ""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Frame):
            return self.headers == other.headers and self.body == other.body
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Frame({self.headers.items()!r}, {self.body!r})"


def _parse_header_lines(block: bytes, what: str) -> Headers:
    """Outer headers / command headers: ``Name: value`` lines, LF or CRLF, taken literally.

    A line is split at its first colon; spaces after the colon are dropped (as FreeSWITCH's
    own reader does). A non-empty line without a colon is an error.
    """
    names: list[str] = []
    values: list[str] = []
    for raw in block.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name:
            raise ESLProtocolError(f"malformed {what} header line {bytes(line[:80])!r}")
        if b"\x00" in name:
            # FreeSWITCH's C reader would cut the name there: not a peer worth parsing.
            raise ESLProtocolError(f"NUL byte in {what} header name {bytes(name[:80])!r}")
        names.append(name.decode(_ENC, _ERRORS))
        values.append(value.lstrip(b" ").decode(_ENC, _ERRORS))
    return Headers._from_lists(names, values)


def _content_length(headers: Headers, max_body: int) -> int:
    value = headers.get("Content-Length")
    if value is None:
        return 0
    if not value.isascii() or not value.isdigit():
        raise ESLProtocolError(f"bad Content-Length {value[:40]!r}")
    length = int(value)
    if length > max_body:
        raise ESLProtocolError(f"Content-Length {length} exceeds the limit of {max_body} bytes")
    return length


_BLOCK_CACHE_SIZE: Final = 256


class _BlockReader:
    """Shared incremental machinery: header block, then Content-Length bytes of body."""

    def __init__(self, max_header_bytes: int, max_body_bytes: int, what: str) -> None:
        if max_header_bytes < 1 or max_body_bytes < 0:
            raise ValueError("size limits must be positive")
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes
        self._what = what
        self._buf = b""
        self._scan = 0  # where to resume searching for the end of the header block
        # Set while waiting for a body: the parsed block and the body length.
        self._pending: tuple[bytes, Headers] | None = None
        self._need = 0
        self._chunks: list[bytes] = []
        self._have = 0
        self._failed: ESLProtocolError | None = None
        # Header blocks repeat (an event's is "Content-Length: N" + its Content-Type): parsed
        # Headers are immutable, so identical blocks share one parse.
        self._cache: dict[bytes, tuple[Headers, int]] = {}

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a message."""
        return len(self._buf) + self._have

    def _parse(self, block: bytes) -> Headers:
        return _parse_header_lines(block, self._what)

    # True: emit Frame(headers, body); False: emit (header block, headers, body) tuples.
    _frames = False

    def _blocks(self, data: bytes) -> list[Any]:
        """Feed bytes; return a Frame, or a (header block, headers, body) tuple, for each
        complete message."""
        if self._failed is not None:
            raise self._failed
        try:
            return self._run(data)
        except ESLProtocolError as e:
            self._failed = e
            self._buf = b""
            self._chunks = []
            raise

    def _run(self, data: bytes) -> list[Any]:
        out: list[Any] = []
        frames = self._frames
        if self._pending is not None:
            # Waiting for a body: collect chunks without re-joining every time.
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return out
            buf = b"".join(self._chunks)
            self._chunks = []
            self._have = 0
            block, headers = self._pending
            self._pending = None
            need = self._need
            out.append(Frame(headers, buf[:need]) if frames else (block, headers, buf[:need]))
            pos = need
        else:
            buf = self._buf + data if self._buf else data
            pos = 0
        scan = self._scan
        self._scan = 0
        end = len(buf)
        max_header = self._max_header
        find = buf.find
        cache = self._cache
        while pos < end:
            # Skip empty lines between messages (never sent by FreeSWITCH; tolerated).
            c = buf[pos]
            if c == 10:
                pos += 1
                continue
            if c == 13:
                if pos + 1 >= end:
                    break
                if buf[pos + 1] == 10:
                    pos += 2
                    continue
            start = pos if pos >= scan else scan
            scan = 0
            lf = find(b"\n\n", start)
            crlf = find(b"\n\r\n", start, end if lf < 0 else lf + 2)
            if crlf >= 0:
                hend, bstart = crlf, crlf + 3
            elif lf >= 0:
                hend, bstart = lf, lf + 2
            else:
                if end - pos > max_header:
                    raise ESLProtocolError(
                        f"{self._what} header block exceeds {max_header} bytes"
                    )
                scan = max(pos, end - 2)
                break
            if hend - pos > max_header:
                raise ESLProtocolError(f"{self._what} header block exceeds {max_header} bytes")
            block = buf[pos : hend + 1]
            cached = cache.get(block)
            if cached is None:
                headers = self._parse(block)
                need = _content_length(headers, self._max_body)
                if len(cache) >= _BLOCK_CACHE_SIZE:
                    cache.clear()
                cache[block] = (headers, need)
            else:
                headers, need = cached
            if need == 0:
                out.append(Frame(headers, b"") if frames else (block, headers, b""))
                pos = bstart
                continue
            if end - bstart >= need:
                body = buf[bstart : bstart + need]
                out.append(Frame(headers, body) if frames else (block, headers, body))
                pos = bstart + need
                continue
            # Body incomplete: park the headers and collect the rest of the body.
            self._pending = (block, headers)
            self._need = need
            rest = buf[bstart:]
            self._chunks = [rest]
            self._have = len(rest)
            self._buf = b""
            return out
        self._buf = buf[pos:] if pos < end else b""
        self._scan = scan - pos if scan else 0
        if self._scan < 0:
            self._scan = 0
        return out


class FrameDecoder:
    """Incremental decoder of what FreeSWITCH sends on an Event Socket.

    ``feed(data)`` returns the frames completed by ``data`` (possibly none). After a
    :class:`ESLProtocolError` the decoder stays failed: the stream cannot be resynchronised,
    and the connection must be dropped.
    """

    def __init__(
        self,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self._reader = _FrameReader(max_header_bytes, max_body_bytes, "frame")

    @property
    def buffered(self) -> int:
        return self._reader.buffered

    def feed(self, data: bytes) -> list[Frame]:
        return self._reader._blocks(bytes(data))


class _FrameReader(_BlockReader):
    _frames = True


# ---------------------------------------------------------------------------------------
# Commands (what a client sends)


class Command:
    """One client command: the command line, the headers after it, and the body."""

    __slots__ = ("body", "headers", "line")

    def __init__(self, line: str, headers: Headers | None = None, body: bytes = b"") -> None:
        self.line = line
        self.headers = headers if headers is not None else Headers()
        self.body = body

    @property
    def name(self) -> str:
        """The command word, e.g. ``"api"``."""
        return self.line.split(" ", 1)[0]

    @property
    def args(self) -> str:
        """Everything after the command word (``""`` if nothing)."""
        parts = self.line.split(" ", 1)
        return parts[1] if len(parts) > 1 else ""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Command):
            return (self.line, self.headers, self.body) == (other.line, other.headers, other.body)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Command({self.line!r}, {self.headers.items()!r}, {self.body!r})"


class CommandDecoder:
    """Incremental decoder of client commands (server side), LF or CRLF.

    The first line of a block is the command line; the following ``Name: value`` lines are
    its headers (``Job-UUID`` for bgapi, the event headers of sendevent, the
    ``call-command`` headers of sendmsg); a ``Content-Length`` header announces a body.
    """

    def __init__(
        self,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self._reader = _CommandReader(max_header_bytes, max_body_bytes, "command")

    @property
    def buffered(self) -> int:
        return self._reader.buffered

    def feed(self, data: bytes) -> list[Command]:
        out: list[Command] = []
        for block, headers, body in self._reader._blocks(bytes(data)):
            nl = block.find(b"\n")
            first = block[:nl] if nl >= 0 else block
            if first.endswith(b"\r"):
                first = first[:-1]
            out.append(Command(first.decode(_ENC, _ERRORS), headers, body))
        return out


class _CommandReader(_BlockReader):
    """Like frames, except that the first line of each block is the command, not a header."""

    def _parse(self, block: bytes) -> Headers:
        nl = block.find(b"\n")
        if nl < 0:
            return Headers()
        return _parse_header_lines(block[nl + 1 :], self._what)


# ---------------------------------------------------------------------------------------
# URL encoding (FreeSWITCH's switch_url_encode / switch_url_decode)

_UNSAFE: Final = frozenset(b'\r\n #%&+:;<=>?@[\\]^`{|}"')
_HEXDIGITS_UPPER: Final = frozenset(b"0123456789ABCDEF")
_HEXDIGITS: Final = frozenset(b"0123456789ABCDEFabcdef")
_ENCODED_BYTE: Final = tuple(
    f"%{b:02X}" if (b < 0x20 or b > 0x7E or b in _UNSAFE) else chr(b) for b in range(256)
)
# bytes.translate(None, _SAFE_BYTES) deletes every byte that never needs encoding.
_SAFE_BYTES: Final = bytes(
    b for b in range(256) if not (b < 0x20 or b > 0x7E or b in _UNSAFE)
)


def url_encode(value: str, double_encode: bool = False) -> str:
    """Percent-encode a header value exactly as FreeSWITCH does for event-plain.

    Bytes below 0x20 or above 0x7E and ``\\r\\n #%&+:;<=>?@[\\]^`{|}"`` become ``%XX``
    (uppercase); space is ``%20``. Like ``switch_url_encode``, a ``%`` already followed by
    two *uppercase* hex digits is passed through unencoded (so such a value does not survive
    a round trip; FreeSWITCH has the same property), unless ``double_encode`` is true.
    """
    raw = _to_bytes(value)
    if not raw.translate(None, _SAFE_BYTES):
        return value
    enc = _ENCODED_BYTE
    if double_encode or 0x25 not in raw:
        return "".join([enc[b] for b in raw])
    out: list[str] = []
    n = len(raw)
    for i, b in enumerate(raw):
        if (
            b == 0x25
            and i + 2 < n
            and raw[i + 1] in _HEXDIGITS_UPPER
            and raw[i + 2] in _HEXDIGITS_UPPER
        ):
            out.append("%")
        else:
            out.append(enc[b])
    return "".join(out)


def _pct_decode(raw: bytes) -> bytes:
    """``%XX`` (either case) becomes that byte; anything else, ``+`` included, is literal."""
    if 0x25 not in raw:
        return raw
    pieces = raw.split(b"%")
    out = [pieces[0]]
    hexd = _HEXDIGITS
    for piece in pieces[1:]:
        if len(piece) >= 2 and piece[0] in hexd and piece[1] in hexd:
            out.append(bytes((int(piece[:2], 16),)))
            out.append(piece[2:])
        else:
            out.append(b"%")
            out.append(piece)
    return b"".join(out)


def url_decode(value: str) -> str:
    """Inverse of :func:`url_encode`: ``%XX`` becomes a byte; ``+`` stays ``+``."""
    if "%" not in value:
        return value
    return _pct_decode(value.encode(_ENC, _ERRORS)).decode(_ENC, _ERRORS)


# ---------------------------------------------------------------------------------------
# Events


class Event:
    """A decoded FreeSWITCH event: its headers, its body, its name and subclass."""

    __slots__ = ("body", "headers", "name")

    def __init__(self, headers: Headers, body: bytes = b"") -> None:
        names = headers._names
        if names and names[0] == "Event-Name":
            name: str | None = headers._values[0]
        else:
            name = headers.get("Event-Name")
        if not name:
            raise ESLProtocolError("event without Event-Name")
        self.headers = headers
        self.body = body
        self.name = name

    @property
    def subclass(self) -> str | None:
        return self.headers.get("Event-Subclass")

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Event):
            return self.headers == other.headers and self.body == other.body
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Event({self.name!r}, {len(self.headers)} headers, body={len(self.body)} bytes)"


def split_array(value: str) -> list[str]:
    """Split a FreeSWITCH array value ``ARRAY::a|:b`` into ``["a", "b"]``.

    A value that is not an array is returned as a one-element list.
    """
    if value.startswith("ARRAY::"):
        return value[7:].split("|:")
    return [value]


# Fast path of decode_event_plain. Bytes kept by the structure check: the separators and
# every byte that would make the bulk percent-decoding differ from the line-by-line one.
_SIG_DELETE: Final = bytes(b for b in range(256) if b not in b": \n%=\r\x01")
# ':', ' ' and '\n' -> 0x01 (field separator); '%' -> '=' (for binascii.a2b_qp)
_FAST_TABLE: Final = bytes(
    1 if b in (0x3A, 0x20, 0x0A) else 0x3D if b == 0x25 else b for b in range(256)
)
_SIG_CACHE: dict[int, bytes] = {}


def _plain_head_fast(block: bytes) -> tuple[list[str], list[str]] | None:
    """Decode an encoded header block in bulk, or None. ``block`` is the header lines
    followed by the blank line (it ends with ``\n\n`` and contains no other).

    Succeeds only if every line is exactly ``name: value`` with no other ':' or ' ' (true of
    everything FreeSWITCH encodes: ':' and ' ' are always %-encoded in values), there is no
    raw '=', CR or 0x01 byte, and every '%' starts a valid escape. Then one translate pass
    turns ':', ' ' and LF into 0x01 and '%' into '=', binascii.a2b_qp decodes the escapes in
    C, and one split yields [name, "", value] for every line.
    """
    sig = block.translate(None, _SIG_DELETE)
    npct = sig.count(b"%")
    if npct:
        sig = sig.replace(b"%", b"")
    n = len(sig) // 3
    expected = _SIG_CACHE.get(n)
    if expected is None:
        expected = b": \n" * n + b"\n"
        if n < 1024:
            _SIG_CACHE[n] = expected
    if sig != expected:
        return None
    h = block.translate(_FAST_TABLE)
    if npct:
        decoded = binascii.a2b_qp(h)
        if len(decoded) != len(h) - 2 * npct:
            return None  # a '%' that does not start a valid escape
    else:
        decoded = h
    parts = decoded.decode(_ENC, _ERRORS).split("\x01")
    # [name, between ':' and ' ', value] per line, then two empty strings (the blank line).
    # The middle must be empty (": " adjacent); a value that decoded to contain 0x01 would
    # change the count.
    if len(parts) != 3 * n + 2 or any(parts[1::3]):
        return None
    return parts[0:-2:3], parts[2::3]


def _plain_head_slow(head: bytes) -> tuple[list[str], list[str]]:
    """Line-by-line decoder of an event-plain header block; handles everything."""
    names: list[str] = []
    values: list[str] = []
    for raw in head.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name:
            raise ESLProtocolError(f"malformed event header line {bytes(line[:80])!r}")
        if value.startswith(b" "):
            value = value[1:]
        names.append(_pct_decode(name).decode(_ENC, _ERRORS))
        values.append(_pct_decode(value).decode(_ENC, _ERRORS))
    return names, values


def decode_event_plain(body: bytes) -> Event:
    """Decode the body of a ``text/event-plain`` frame.

    ``Name: value`` lines with percent-encoded values (names are percent-decoded too;
    FreeSWITCH never puts ``%`` in one), a blank line, and, if the last header is a
    ``Content-Length``, exactly that many bytes of raw event body.
    """
    body = bytes(body)
    fast = None
    if body.endswith(b"\n\n"):
        # Most events have no body: then the whole of it is the header block, and the fast
        # path's structure check proves there is no other blank line (no find needed).
        fast = _plain_head_fast(body)
        rest_at = len(body)
    if fast is None:
        hend = body.find(b"\n\n")
        if hend < 0:
            if not body.endswith(b"\n"):
                raise ESLProtocolError("event-plain body without an end of headers")
            hend = len(body) - 1
            rest_at = len(body)
            fast = _plain_head_fast(body + b"\n")
        else:
            rest_at = hend + 2
            fast = _plain_head_fast(body[:rest_at])
    names, values = fast if fast is not None else _plain_head_slow(body[: hend + 1])
    event_body = b""
    if names and len(names[-1]) == 14 and names[-1].lower() == "content-length":
        clen = values[-1]
        if not clen.isascii() or not clen.isdigit():
            raise ESLProtocolError(f"bad inner Content-Length {clen[:40]!r}")
        n = int(clen)
        if len(body) - rest_at != n:
            raise ESLProtocolError(
                f"inner Content-Length {n} but {len(body) - rest_at} bytes of event body"
            )
        event_body = body[rest_at:]
    elif rest_at < len(body):
        raise ESLProtocolError("event-plain data after the headers without a Content-Length")
    return Event(Headers._from_lists(names, values), event_body)


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as its (name, value) pairs, duplicates and order kept."""

    __slots__ = ()


# One decoder for every event: json.loads(..., object_pairs_hook=...) builds a new decoder
# and scanner on every call, which costs as much as the parse itself.
_JSON_DECODER: Final = json.JSONDecoder(object_pairs_hook=_Pairs, strict=False)


def _json_value(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, _Pairs):
        return json.dumps(dict(value))
    if isinstance(value, list):
        return "ARRAY::" + "|:".join(_json_value(v) for v in value)
    return json.dumps(value)


def decode_event_json(body: bytes) -> Event:
    """Decode the body of a ``text/event-json`` frame.

    One JSON object of string fields (duplicates kept, in order); ``_body`` is the event
    body (re-encoded to the bytes that were sent); arrays become ``ARRAY::a|:b`` as in
    event-plain. Bytes are not required to be valid UTF-8.
    """
    try:
        text = bytes(body).decode(_ENC, _ERRORS)
        pairs = _JSON_DECODER.decode(text)
    except (ValueError, RecursionError) as e:
        raise ESLProtocolError(f"event-json body is not JSON: {e}") from None
    if type(pairs) is not _Pairs:
        raise ESLProtocolError("event-json body is not a JSON object")
    if not pairs:
        raise ESLProtocolError("event without Event-Name")
    names_t, values_t = zip(*pairs, strict=True)
    names: list[str] = list(names_t)
    values: list[object] = list(values_t)
    event_body = b""
    if "_body" in names:
        i = names.index("_body")
        value = values[i]
        if not isinstance(value, str):
            raise ESLProtocolError("event-json _body is not a string")
        try:
            event_body = value.encode(_ENC, _ERRORS)
        except UnicodeEncodeError:
            raise ESLProtocolError("event-json _body is not encodable") from None
        while "_body" in names:
            i = names.index("_body")
            del names[i]
            del values[i]
    if set(map(type, values)) - {str}:
        try:
            values = [_json_value(v) for v in values]
        except (ValueError, RecursionError):
            raise ESLProtocolError("event-json field with an unusable value") from None
    return Event(Headers._from_lists(names, values), event_body)  # type: ignore[arg-type]


def encode_event_plain(headers: Sequence[tuple[str, str]], body: bytes = b"") -> bytes:
    """The body of a ``text/event-plain`` frame, as FreeSWITCH's switch_event_serialize.

    Values are URL-encoded; if ``body`` is not empty an inner ``Content-Length`` is added as
    the last header and the raw body follows the blank line. A ``Content-Length`` given in
    ``headers`` is dropped (it is recomputed).
    """
    lines: list[str] = []
    for name, value in headers:
        _check_name(name)
        if name.lower() == "content-length":
            continue
        lines.append(f"{name}: {url_encode(value)}\n")
    if body:
        lines.append(f"Content-Length: {len(body)}\n\n")
        return _to_bytes("".join(lines)) + bytes(body)
    lines.append("\n")
    return _to_bytes("".join(lines))


def encode_event_json(headers: Sequence[tuple[str, str]], body: bytes = b"") -> bytes:
    """The body of a ``text/event-json`` frame (duplicates kept; ``_body`` last)."""
    fields: list[str] = []
    dumps = json.dumps
    for name, value in headers:
        if name == "_body" or name.lower() == "content-length":
            continue
        fields.append(f"{dumps(name, ensure_ascii=False)}:{dumps(value, ensure_ascii=False)}")
    if body:
        text = bytes(body).decode(_ENC, _ERRORS)
        fields.append(f'"Content-Length":"{len(body)}"')
        fields.append(f'"_body":{dumps(text, ensure_ascii=False)}')
    return _to_bytes("{" + ",".join(fields) + "}")


# ---------------------------------------------------------------------------------------
# Encoders for frames and commands

_BAD_NAME = re.compile(r"[\r\n:]")


def _check_name(name: str) -> None:
    if not name or _BAD_NAME.search(name) or name != name.strip():
        raise ESLCommandError(f"invalid header name {name!r}")


def _check_value(value: str, what: str) -> None:
    if "\n" in value or "\r" in value:
        raise ESLCommandError(f"CR or LF in {what} {value[:80]!r}")


def _header_block(headers: Sequence[tuple[str, str]], body: bytes) -> list[str]:
    lines: list[str] = []
    has_length = False
    for name, value in headers:
        _check_name(name)
        _check_value(value, f"header {name}")
        if name.lower() == "content-length":
            if value.strip() != str(len(body)):
                raise ESLCommandError(
                    f"Content-Length {value!r} does not match a body of {len(body)} bytes"
                )
            has_length = True
        lines.append(f"{name}: {value}\n")
    if body and not has_length:
        lines.append(f"Content-Length: {len(body)}\n")
    return lines


def encode_frame(headers: Sequence[tuple[str, str]], body: bytes = b"") -> bytes:
    """A frame as FreeSWITCH writes it: header lines, Content-Length if body, LF, body.

    A ``Content-Length`` given in ``headers`` keeps its position (events put it first);
    otherwise it is appended after the given headers when there is a body.
    """
    lines = _header_block(headers, body)
    lines.append("\n")
    return _to_bytes("".join(lines)) + bytes(body)


def encode_command(
    line: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    """A client command: the line, its headers, Content-Length if body, LF, body.

    CR or LF in the line or in a header value would inject a second command and is
    rejected with :class:`ESLCommandError`; multi-line payloads go in ``body``.
    """
    if not line or not line.strip():
        raise ESLCommandError("empty command line")
    _check_value(line, "command line")
    lines = [line, "\n", *_header_block(headers, body), "\n"]
    return _to_bytes("".join(lines)) + bytes(body)
