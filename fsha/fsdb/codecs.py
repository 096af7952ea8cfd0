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
    "RecordValueError",
    "decode_call_row",
    "decode_registration",
    "encode_call_row",
    "encode_registration",
]

_U16: Final = struct.Struct(">H")
CALL_VALUE_VERSION: Final = 2  # metadata compressed (zlib); 1: raw, still decoded
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
    return RecoveryRow(fields[0], fields[1], fields[2], fields[3], fields[4], metadata)


def encode_registration(row: RegistrationRow) -> bytes:
    obj = {c: getattr(row, c) for c in REGISTRATION_COLUMNS}
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


def decode_registration(value: bytes) -> RegistrationRow:
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
