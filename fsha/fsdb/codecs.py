"""The replicated values of the rows (``Kind.CALL``, ``Kind.REGISTRATION`` records).

The formats are specified, with golden vectors, in ``docs/protocol/records.rst``; the
master's feeds encode, every takeover and the limits decode. Pure functions, no I/O.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, Final

from fsha.fsdb.rows import REGISTRATION_COLUMNS, RecoveryRow, RegistrationRow

__all__ = [
    "CALL_VALUE_VERSION",
    "MAX_METADATA_BYTES",
    "REGISTRATION_VALUE_VERSION",
    "PackedCallRow",
    "RecordValueError",
    "decode_call_row",
    "decode_call_row_packed",
    "decode_registration",
    "encode_call_row",
    "encode_registration",
    "encode_registration_v1",
]

_U16: Final = struct.Struct(">H")
CALL_VALUE_VERSION: Final = 2  # metadata compressed (zlib); 1: raw, still decoded
REGISTRATION_VALUE_VERSION: Final = 2  # binary; 1: JSON, still decoded
MAX_METADATA_BYTES: Final = 16 * 1024 * 1024  # a bound on an inflated metadata value
_ZLIB_LEVEL: Final = 1  # ~4x on XML CDRs at a fraction of the cost of the default level


class RecordValueError(ValueError):
    """A replicated value that is not a valid encoding."""


def encode_call_row(row: RecoveryRow) -> bytes:
    parts = [bytes((CALL_VALUE_VERSION,))]
    for text in (row.runtime_uuid, row.technology, row.profile_name, row.hostname, row.uuid):
        raw = text.encode("utf-8", "surrogateescape")
        if len(raw) > 0xFFFF:
            raise RecordValueError("recovery column longer than 65535 bytes")
        parts.append(_U16.pack(len(raw)))
        parts.append(raw)
    parts.append(zlib.compress(row.metadata, _ZLIB_LEVEL))
    return b"".join(parts)


def decode_call_row(value: bytes) -> RecoveryRow:
    """Inverse of :func:`encode_call_row` (versions 1 and 2); raises
    :class:`RecordValueError` on bad bytes."""
    fields, pos = _call_head(value)
    return RecoveryRow(fields[0], fields[1], fields[2], fields[3], fields[4],
                       _call_metadata(value, pos))


class PackedCallRow:
    """A ``recovery`` row whose metadata stays compressed in its replicated value until it
    is read (:attr:`metadata` inflates it each time): a takeover holds 10,000 calls until
    each batch is written, 34 MB inflated, about a quarter of that packed (and the value
    is the replicated state's own bytes object, not a copy). Compares equal to the
    :class:`RecoveryRow` it stands for."""

    __slots__ = ("_at", "_value", "hostname", "profile_name", "runtime_uuid", "technology",
                 "uuid")

    def __init__(self, fields: list[str], value: bytes, at: int) -> None:
        self.runtime_uuid, self.technology, self.profile_name, self.hostname, self.uuid = \
            fields
        self._value = value
        self._at = at

    @property
    def metadata(self) -> bytes:
        return _call_metadata(self._value, self._at)

    def unpacked(self) -> RecoveryRow:
        return RecoveryRow(self.runtime_uuid, self.technology, self.profile_name,
                           self.hostname, self.uuid, self.metadata)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedCallRow):
            other = other.unpacked()
        return self.unpacked() == other if isinstance(other, RecoveryRow) else NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PackedCallRow({self.uuid!r}, {self.profile_name!r}, {len(self._value)} B)"


def decode_call_row_packed(value: bytes) -> RecoveryRow | PackedCallRow:
    """As :func:`decode_call_row`, the metadata checked (inflated once) but kept packed
    (version 2; a version 1 value is decoded whole)."""
    fields, pos = _call_head(value)
    metadata = _call_metadata(value, pos)  # a bad value is refused now, not when written
    if value[0] == 1:
        return RecoveryRow(fields[0], fields[1], fields[2], fields[3], fields[4], metadata)
    return PackedCallRow(fields, value, pos)


def call_profile(value: bytes) -> str:
    """The sofia profile of a replicated call value, read without inflating its metadata;
    raises :class:`RecordValueError` on bad bytes."""
    return _call_head(value)[0][2]


def _call_head(value: bytes) -> tuple[list[str], int]:
    """The five text columns and where the metadata begins."""
    if not value or value[0] not in (1, 2):
        raise RecordValueError("not a version 1 or 2 call record")
    pos = 1
    fields: list[str] = []
    for _ in range(5):
        if pos + 2 > len(value):
            raise RecordValueError("call record truncated")
        (n,) = _U16.unpack_from(value, pos)
        pos += 2
        if pos + n > len(value):
            raise RecordValueError("call record truncated")
        fields.append(value[pos:pos + n].decode("utf-8", "surrogateescape"))
        pos += n
    return fields, pos


def _call_metadata(value: bytes, pos: int) -> bytes:
    metadata = bytes(value[pos:])
    if value[0] == 2:
        inflate = zlib.decompressobj()
        try:
            metadata = inflate.decompress(metadata, MAX_METADATA_BYTES)
        except zlib.error as e:
            raise RecordValueError(f"call record metadata does not inflate: {e}") from None
        if inflate.unconsumed_tail or not inflate.eof:
            raise RecordValueError("call record metadata truncated or larger than "
                                   f"{MAX_METADATA_BYTES} bytes")
    return metadata


#: The text columns of a version 2 registration value, in this order (all but expires).
_REG_TEXT: Final = tuple(c for c in REGISTRATION_COLUMNS if c != "expires")
_REG_EXPIRES: Final = struct.Struct(">Q")


def encode_registration(row: RegistrationRow) -> bytes:
    """Version 2: binary, about half the size of version 1's JSON (100,000 of them sit on
    every node)."""
    parts = [bytes((REGISTRATION_VALUE_VERSION,)), _REG_EXPIRES.pack(max(0, row.expires))]
    for c in _REG_TEXT:
        raw = getattr(row, c).encode("utf-8", "surrogateescape")
        if len(raw) > 0xFFFF:
            raise RecordValueError(f"registration {c} longer than 65535 bytes")
        parts.append(_U16.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def decode_registration(value: bytes) -> RegistrationRow:
    """Inverse of :func:`encode_registration`; also decodes version 1 (JSON, ``{``)."""
    if value[:1] == b"{":
        return _decode_registration_json(value)
    if value[:1] != bytes((REGISTRATION_VALUE_VERSION,)) or len(value) < 9:
        raise RecordValueError("not a version 1 or 2 registration record")
    (expires,) = _REG_EXPIRES.unpack_from(value, 1)
    pos = 9
    texts: list[str] = []
    for c in _REG_TEXT:
        if pos + 2 > len(value):
            raise RecordValueError("registration record truncated")
        (n,) = _U16.unpack_from(value, pos)
        pos += 2
        if pos + n > len(value):
            raise RecordValueError(f"registration record truncated in {c}")
        texts.append(value[pos:pos + n].decode("utf-8", "surrogateescape"))
        pos += n
    if pos != len(value):
        raise RecordValueError("registration record has trailing bytes")
    return RegistrationRow(*texts[:7], expires, *texts[7:])  # type: ignore[arg-type]


def encode_registration_v1(row: RegistrationRow) -> bytes:
    """Version 1 (JSON): what nodes before version 2 write (tests, the docs' vectors)."""
    obj = {c: getattr(row, c) for c in REGISTRATION_COLUMNS}
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


def _decode_registration_json(value: bytes) -> RegistrationRow:
    try:
        obj = json.loads(value)
    except ValueError as e:
        raise RecordValueError(f"registration record is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RecordValueError("registration record is not a JSON object")
    args: dict[str, Any] = {}
    for c in REGISTRATION_COLUMNS:
        v = obj.get(c)
        want: type = int if c == "expires" else str
        if not isinstance(v, want) or isinstance(v, bool):
            raise RecordValueError(f"registration record: {c} missing or not {want.__name__}")
        args[c] = v
    return RegistrationRow(**args)
