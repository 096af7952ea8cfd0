"""The golden vectors of docs/protocol/records.rst against fsha.fsdb.codecs and the
identity codec."""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from fsha.fsdb import (
    RecordValueError,
    RecoveryRow,
    RegistrationRow,
    decode_call_row,
    decode_registration,
    encode_call_row,
    encode_registration,
    encode_registration_v1,
)
from fsha.replication.identity import Identity, decode_identity, encode_identity

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol" / "records.rst"

CALL = RecoveryRow("rt-1", "sofia", "internal", "fs1", "u1", b"<cdr/>")
REGISTRATION = RegistrationRow(
    "c1", "1000", "example.com", "example.com", "<sip:1000@192.0.2.7:5060>",
    "Registered(UDP)", "unknown", 1700000000, "ua", "internal", "192.0.2.7", "5060", "1000",
    "example.com")
IDENTITY = Identity("fs1", "slot1", "c0re", "1.10.12", ("internal",))


def doc_blocks() -> dict[str, list[str]]:
    """caption -> the block's lines (indentation removed)."""
    text = DOC.read_text()
    return {m.group(1): [line[3:] for line in m.group(2).splitlines()]
            for m in re.finditer(r":caption: vector (\S+)\n\n((?:   .*\n?)+)", text)}


def hex_block(lines: list[str]) -> bytes:
    return bytes.fromhex("".join(line.split("|")[0] for line in lines))


class RecordVectorTests(SynchronousTestCase):
    def test_doc_has_every_vector(self) -> None:
        self.assertEqual(sorted(doc_blocks()),
                         ["call", "identity", "registration", "registration-v1"])

    def test_call(self) -> None:
        data = hex_block(doc_blocks()["call"])
        self.assertEqual(encode_call_row(CALL).hex(" "), data.hex(" "))
        self.assertEqual(decode_call_row(data), CALL)

    def test_registration(self) -> None:
        data = hex_block(doc_blocks()["registration"])
        self.assertEqual(encode_registration(REGISTRATION).hex(" "), data.hex(" "))
        self.assertEqual(decode_registration(data), REGISTRATION)

    def test_registration_v1_still_decoded(self) -> None:
        data = "".join(doc_blocks()["registration-v1"]).encode()
        self.assertEqual(encode_registration_v1(REGISTRATION), data)
        self.assertEqual(decode_registration(data), REGISTRATION)

    def test_registration_rejects_bad_bytes(self) -> None:
        good = encode_registration(REGISTRATION)
        for bad in (b"", b"\x03" + good[1:], good[:-1], good + b"x", good[:20]):
            with self.assertRaises(RecordValueError):
                decode_registration(bad)

    def test_identity(self) -> None:
        data = "".join(doc_blocks()["identity"]).encode()
        self.assertEqual(encode_identity(IDENTITY), data)
        self.assertEqual(decode_identity(data), IDENTITY)


class PackedCallRowTests(SynchronousTestCase):
    """A takeover keeps call rows packed (fsha.takeover.records): 10,000 inflated
    metadata documents were 34 MB of its working set."""

    def test_packed_row_stands_for_the_row(self) -> None:
        from fsha.fsdb import RecordValueError, RecoveryRow, encode_call_row
        from fsha.fsdb.codecs import PackedCallRow, decode_call_row_packed

        row = RecoveryRow("rt", "sofia", "slot1", "fs1", "u1", b"<cdr>" + b"x" * 4000)
        value = encode_call_row(row)
        packed = decode_call_row_packed(value)
        assert isinstance(packed, PackedCallRow)
        self.assertIs(packed._value, value)  # the replicated value itself, no copy
        self.assertEqual((packed.uuid, packed.profile_name, packed.runtime_uuid),
                         ("u1", "slot1", "rt"))
        self.assertEqual(packed.metadata, row.metadata)
        self.assertEqual(packed, row)
        self.assertEqual(packed.unpacked(), row)
        # a value that does not inflate is refused when decoded, not when written
        with self.assertRaises(RecordValueError):
            decode_call_row_packed(value[:-4])
        # version 1 (raw metadata) is decoded whole
        v1 = bytes((1,)) + value[1:value.index(b"u1") + 2] + row.metadata
        self.assertEqual(type(decode_call_row_packed(v1)), RecoveryRow)
        self.assertEqual(decode_call_row_packed(v1), row)
