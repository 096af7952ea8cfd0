"""Tests for fsha.wire.heartbeat: golden vectors, every error, boundaries, properties."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fsha.wire.heartbeat import (
    BODY_SIZE,
    BODY_SIZE_V1,
    BODY_SIZE_V2,
    BODY_SIZE_V3,
    NO_NODE,
    NO_SLOT,
    REASONS,
    SIZE,
    SIZE_V1,
    SIZE_V2,
    SIZE_V3,
    VERSION,
    Flags,
    Heartbeat,
    HeartbeatCodec,
    HeartbeatError,
    MessageType,
    Role,
    cluster_id_for,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol" / "heartbeat.rst"

SECRET = b"fsha-golden-vector-secret-000001"
CLUSTER = 0x2A97516C  # cluster_id_for("demo"), checked below
FQ = Flags.FS_OK | Flags.SEES_QUORUM
CFG = bytes.fromhex("0011223344556677")
VIEW = bytes.fromhex("8899aabbccddeeff")

# name -> (message, datagram). The same hex is in docs/protocol/heartbeat.rst. The first
# four are version 1 datagrams (still decoded, and sent to version 1 peers).
GOLDEN: dict[str, tuple[Heartbeat, str]] = {
    "heartbeat-slave": (
        Heartbeat(
            MessageType.HEARTBEAT, CLUSTER, 2, 1700000000000, 42, Role.SLAVE, FQ,
            NO_SLOT, 0, NO_NODE, CFG, VIEW, version=1,
        ),
        "4648 0101 2a97 516c 0000 018b cfe5 6800"
        "0000 0000 0000 002a 0000 0000 0000 0000"
        "0002 ffff ffff 0005 0100 1122 3344 5566"
        "7788 99aa bbcc ddee ff99 a8b1 1c8a dcd8"
        "2414 ae60 9b6a df80 d1b8 277c 4a55 cdd5"
        "dedf 1da6 605b 6c8a 05",
    ),
    "heartbeat-master": (
        Heartbeat(
            MessageType.HEARTBEAT, CLUSTER, 1, 1699999000000, 1000, Role.MASTER, FQ,
            0, 7, NO_NODE, CFG, VIEW, version=1,
        ),
        "4648 0101 2a97 516c 0000 018b cfd6 25c0"
        "0000 0000 0000 03e8 0000 0000 0000 0007"
        "0001 0000 ffff 0005 0300 1122 3344 5566"
        "7788 99aa bbcc ddee ff5f 8792 dd18 a808"
        "7208 37e9 4f2a 7ba3 6a15 fd73 1b32 0638"
        "edf1 6cf3 313b a468 ff",
    ),
    "takeover": (
        Heartbeat(
            MessageType.TAKEOVER, CLUSTER, 3, 1700000005000, 77, Role.CLAIMING, FQ,
            1, 8, 2, CFG, bytes.fromhex("0102030405060708"), version=1,
        ),
        "4648 0102 2a97 516c 0000 018b cfe5 7b88"
        "0000 0000 0000 004d 0000 0000 0000 0008"
        "0003 0001 0002 0005 0200 1122 3344 5566"
        "7701 0203 0405 0607 0831 03df f0e3 290a"
        "1bd7 c2de af09 c4e4 6163 2faa e024 8883"
        "f493 11e5 4ec7 3d27 62",
    ),
    "release": (
        Heartbeat(
            MessageType.RELEASE, CLUSTER, 1, 1699999000000, 1001, Role.RELEASING,
            FQ | Flags.MAINTENANCE, 0, 7, 1, CFG, VIEW, version=1,
        ),
        "4648 0103 2a97 516c 0000 018b cfd6 25c0"
        "0000 0000 0000 03e9 0000 0000 0000 0007"
        "0001 0000 0001 0007 0400 1122 3344 5566"
        "7788 99aa bbcc ddee fffb 74f0 fb00 c80b"
        "6edc 300c 0ae1 9a40 f3bd 80ac b19c 8c98"
        "ef08 3685 cbdd a918 08",
    ),
    "heartbeat-slave-v2": (
        Heartbeat(
            MessageType.HEARTBEAT, CLUSTER, 2, 1700000000000, 43, Role.SLAVE, FQ,
            NO_SLOT, 0, NO_NODE, CFG, VIEW, echo_node=1, echo_sequence=1000,
            echo_delay_us=1234, version=2,
        ),
        "4648 0201 2a97 516c 0000 018b cfe5 6800"
        "0000 0000 0000 002b 0000 0000 0000 0000"
        "0002 ffff ffff 0005 0100 1122 3344 5566"
        "7788 99aa bbcc ddee ff00 0000 0000 0003"
        "e800 0004 d200 01c3 b930 3c2d 78c8 8557"
        "7bf9 73d4 b6a0 bcee 479c d030 cbfb 1641"
        "4ae1 dcbb f675 5d",
    ),
    "takeover-v2": (
        Heartbeat(
            MessageType.TAKEOVER, CLUSTER, 3, 1700000005000, 78, Role.CLAIMING, FQ,
            1, 8, 2, CFG, bytes.fromhex("0102030405060708"), version=2,
        ),
        "4648 0202 2a97 516c 0000 018b cfe5 7b88"
        "0000 0000 0000 004e 0000 0000 0000 0008"
        "0003 0001 0002 0005 0200 1122 3344 5566"
        "7701 0203 0405 0607 0800 0000 0000 0000"
        "0000 0000 00ff ffc9 d56e bed1 0dc9 0d11"
        "26da 3765 1643 8743 f7cc a007 9ed4 bb06"
        "a8f2 2c35 5834 73",
    ),
    "heartbeat-slave-v3": (
        Heartbeat(
            MessageType.HEARTBEAT, CLUSTER, 2, 1700000000000, 44, Role.SLAVE, FQ,
            NO_SLOT, 0, NO_NODE, CFG, VIEW, echo_node=1, echo_sequence=1000,
            echo_delay_us=1234, heard=0b1011, version=3,
        ),
        "4648 0301 2a97 516c 0000 018b cfe5 6800"
        "0000 0000 0000 002c 0000 0000 0000 0000"
        "0002 ffff ffff 0005 0100 1122 3344 5566"
        "7788 99aa bbcc ddee ff00 0000 0000 0003"
        "e800 0004 d200 0101 0b42 c8bf 3816 8e20"
        "63fd f299 ecae 9eb6 a55d 5fb8 8fd1 d493"
        "423a 20db 2e5e 1989 bd",
    ),
    "takeover-v3": (
        Heartbeat(
            MessageType.TAKEOVER, CLUSTER, 3, 1700000005000, 79, Role.CLAIMING, FQ,
            1, 8, 2, CFG, bytes.fromhex("0102030405060708"), heard=0b1_0001_0011,
            version=3,
        ),
        "4648 0302 2a97 516c 0000 018b cfe5 7b88"
        "0000 0000 0000 004f 0000 0000 0000 0008"
        "0003 0001 0002 0005 0200 1122 3344 5566"
        "7701 0203 0405 0607 0800 0000 0000 0000"
        "0000 0000 00ff ff02 1301 2f37 0ed6 4514"
        "2054 361e b7d3 cc4c a4ac 9539 c047 1485"
        "abe5 ab10 1851 7faf 2ab2",
    ),
    "heartbeat-slave-v4": (
        Heartbeat(
            MessageType.HEARTBEAT, CLUSTER, 2, 1700000000000, 45, Role.SLAVE, FQ,
            NO_SLOT, 0, NO_NODE, CFG, VIEW, echo_node=1, echo_sequence=1000,
            echo_delay_us=1234, heard=0b1011, echo_bound_us=25_000,
        ),
        "4648 0401 2a97 516c 0000 018b cfe5 6800"
        "0000 0000 0000 002d 0000 0000 0000 0000"
        "0002 ffff ffff 0005 0100 1122 3344 5566"
        "7788 99aa bbcc ddee ff00 0000 0000 0003"
        "e800 0004 d200 0100 0061 a801 0b08 d217"
        "85aa 053c 7394 32ba dbf5 2365 f4f3 6167"
        "8979 28df b4ac 812e a79e 7273 7b",
    ),
    "takeover-v4": (
        Heartbeat(
            MessageType.TAKEOVER, CLUSTER, 3, 1700000005000, 80, Role.CLAIMING, FQ,
            1, 8, 2, CFG, bytes.fromhex("0102030405060708"), heard=0b1_0001_0011,
        ),
        "4648 0402 2a97 516c 0000 018b cfe5 7b88"
        "0000 0000 0000 0050 0000 0000 0000 0008"
        "0003 0001 0002 0005 0200 1122 3344 5566"
        "7701 0203 0405 0607 0800 0000 0000 0000"
        "0000 0000 00ff ff00 0000 0002 1301 c66d"
        "dd11 b128 6d80 d1d6 0e70 da2b 58d9 5454"
        "903b 426e 3b32 e1ef f010 d9fa 75a5",
    ),
}  # fmt: skip


def golden_bytes(name: str) -> bytes:
    return bytes.fromhex(GOLDEN[name][1])


def codec() -> HeartbeatCodec:
    return HeartbeatCodec(SECRET, CLUSTER)


# An independent reference encoder, written from the spec table rather than the module's
# struct, used to forge datagrams with a valid tag (for the "field" errors).
def reference_body(
    *,
    magic: bytes = b"FH",
    version: int = VERSION,
    type_: int = 1,
    cluster: int = CLUSTER,
    incarnation: int = 5,
    sequence: int = 6,
    epoch: int = 0,
    node: int = 1,
    slot: int = NO_SLOT,
    subject: int = NO_NODE,
    flags: int = 1,
    role: int = 1,
    config: bytes = CFG,
    view: bytes = VIEW,
    echo_sequence: int = 0,
    echo_delay: int = 0,
    echo_node: int = NO_NODE,
    echo_bound: int = 0,
    heard: bytes = b"",
) -> bytes:
    body = (
        magic
        + struct.pack(">BBI", version, type_, cluster)
        + struct.pack(">QQQ", incarnation, sequence, epoch)
        + struct.pack(">HHHH", node, slot, subject, flags)
        + struct.pack(">B", role)
        + config
        + view
    )
    if version >= 2:
        body += struct.pack(">QIH", echo_sequence, echo_delay, echo_node)
    if version >= 4:
        body += struct.pack(">I", echo_bound)
    if version >= 3:
        body += struct.pack(">B", len(heard)) + heard
    return body


def signed(body: bytes, secret: bytes = SECRET) -> bytes:
    return body + hmac.new(secret, body, hashlib.sha256).digest()


def parse_doc_vectors(text: str) -> dict[str, bytes]:
    """The ``.. golden-vector: NAME`` literal blocks of the rst spec, as bytes."""
    vectors: dict[str, bytes] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"\.\. golden-vector: (\S+)\s*", line)
        if m is None:
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip() in ("", "::"):
            j += 1
        hex_lines = []
        while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
            hex_lines.append(lines[j])
            j += 1
        vectors[m.group(1)] = bytes.fromhex("".join(hex_lines))
    return vectors


# Hypothesis strategies
u16 = st.integers(0, 0xFFFF)
u64 = st.integers(0, 2**64 - 1)
digests = st.binary(min_size=8, max_size=8)


@st.composite
def heartbeats(draw: st.DrawFn) -> Heartbeat:
    msg_type = draw(st.sampled_from(MessageType))
    if msg_type is MessageType.HEARTBEAT:
        slot = draw(u16)
        subject = NO_NODE
    else:
        slot = draw(st.integers(0, NO_SLOT - 1))
        subject = draw(st.integers(0, NO_NODE - 1))
    node_id = draw(st.integers(0, NO_NODE - 1))
    version = draw(st.sampled_from((1, 2, 3, 4)))
    echo_node, echo_sequence, echo_delay, echo_bound = NO_NODE, 0, 0, 0
    heard = draw(st.integers(0, 2**2040 - 1) | st.integers(0, 2**64)) if version >= 3 else 0
    if version >= 2 and draw(st.booleans()):
        echo_node = draw(st.integers(0, NO_NODE - 1).filter(lambda n: n != node_id))
        echo_sequence = draw(u64)
        echo_delay = draw(st.integers(0, 2**32 - 1))
        if version >= 4:
            echo_bound = draw(st.integers(0, 2**32 - 1))
    return Heartbeat(
        type=msg_type,
        cluster_id=CLUSTER,
        node_id=node_id,
        incarnation=draw(u64),
        sequence=draw(u64),
        role=draw(st.sampled_from(Role)),
        flags=Flags(draw(st.integers(0, 15))),
        slot=slot,
        epoch=draw(u64),
        subject=subject,
        config_digest=draw(digests),
        view_digest=draw(digests),
        echo_node=echo_node,
        echo_sequence=echo_sequence,
        echo_delay_us=echo_delay,
        version=version,
        heard=heard,
        echo_bound_us=echo_bound,
    )


def size_of(msg: Heartbeat) -> int:
    if msg.version == 4:
        return SIZE + (msg.heard.bit_length() + 7) // 8
    if msg.version == 3:
        return SIZE_V3 + (msg.heard.bit_length() + 7) // 8
    return SIZE_V2 if msg.version == 2 else SIZE_V1


class GoldenVectorTests(SynchronousTestCase):
    def test_cluster_id_for(self) -> None:
        self.assertEqual(cluster_id_for("demo"), CLUSTER)
        # SHA-256("prod-eu") starts with these 4 bytes: the id is their big-endian value.
        first4 = hashlib.sha256(b"prod-eu").digest()[:4]
        self.assertEqual(cluster_id_for("prod-eu"), struct.unpack(">I", first4)[0])
        self.assertEqual(cluster_id_for("é"), int(hashlib.sha256(b"\xc3\xa9").hexdigest()[:8], 16))
        self.assertNotEqual(cluster_id_for("demo"), cluster_id_for("Demo"))

    def test_encode(self) -> None:
        c = codec()
        for name, (msg, _) in GOLDEN.items():
            self.assertEqual(c.encode(msg).hex(), golden_bytes(name).hex(), name)

    def test_decode(self) -> None:
        c = codec()
        for name, (msg, _) in GOLDEN.items():
            got = c.decode(golden_bytes(name))
            self.assertEqual(got, msg, name)
            self.assertIs(type(got.type), MessageType)
            self.assertIs(type(got.role), Role)
            self.assertIs(type(got.flags), Flags)

    def test_size_and_tag_construction(self) -> None:
        """108 bytes + the bitmap (version 3: 104 + the bitmap, 2: 103, 1: 89); the tag
        is plain HMAC-SHA256 (stdlib) over the bytes before it."""
        self.assertEqual((SIZE, BODY_SIZE, SIZE_V3, BODY_SIZE_V3, SIZE_V2, BODY_SIZE_V2,
                          SIZE_V1, BODY_SIZE_V1), (108, 76, 104, 72, 103, 71, 89, 57))
        for name, (msg, _) in GOLDEN.items():
            data = golden_bytes(name)
            body = size_of(msg) - 32
            self.assertEqual(len(data), body + 32)
            self.assertEqual(data[2], msg.version)
            self.assertEqual(data[body:],
                             hmac.new(SECRET, data[:body], hashlib.sha256).digest())

    def test_layout_matches_reference(self) -> None:
        """The module's layout equals the reference encoder written from the spec table."""
        msg, _ = GOLDEN["takeover"]
        body = reference_body(
            version=1, type_=2, incarnation=msg.incarnation, sequence=msg.sequence, epoch=msg.epoch,
            node=msg.node_id, slot=msg.slot, subject=msg.subject, flags=int(msg.flags),
            role=int(msg.role), config=msg.config_digest, view=msg.view_digest,
        )  # fmt: skip
        self.assertEqual(signed(body), golden_bytes("takeover"))
        msg, _ = GOLDEN["heartbeat-slave-v2"]
        body = reference_body(
            incarnation=msg.incarnation, sequence=msg.sequence, node=msg.node_id,
            flags=int(msg.flags), role=int(msg.role), echo_sequence=msg.echo_sequence,
            echo_delay=msg.echo_delay_us, echo_node=msg.echo_node, version=2,
        )  # fmt: skip
        self.assertEqual(signed(body), golden_bytes("heartbeat-slave-v2"))
        msg, _ = GOLDEN["heartbeat-slave-v3"]
        body = reference_body(
            incarnation=msg.incarnation, sequence=msg.sequence, node=msg.node_id,
            flags=int(msg.flags), role=int(msg.role), echo_sequence=msg.echo_sequence,
            echo_delay=msg.echo_delay_us, echo_node=msg.echo_node, heard=bytes([0b1011]),
            version=3,
        )  # fmt: skip
        self.assertEqual(signed(body), golden_bytes("heartbeat-slave-v3"))
        msg, _ = GOLDEN["takeover-v3"]
        body = reference_body(
            type_=2, incarnation=msg.incarnation, sequence=msg.sequence, epoch=msg.epoch,
            node=msg.node_id, slot=msg.slot, subject=msg.subject, flags=int(msg.flags),
            role=int(msg.role), view=msg.view_digest, heard=bytes([0b0001_0011, 0b1]),
            version=3,
        )  # fmt: skip
        self.assertEqual(signed(body), golden_bytes("takeover-v3"))
        msg, _ = GOLDEN["heartbeat-slave-v4"]
        body = reference_body(
            incarnation=msg.incarnation, sequence=msg.sequence, node=msg.node_id,
            flags=int(msg.flags), role=int(msg.role), echo_sequence=msg.echo_sequence,
            echo_delay=msg.echo_delay_us, echo_node=msg.echo_node, echo_bound=25_000,
            heard=bytes([0b1011]), version=4,
        )  # fmt: skip
        self.assertEqual(signed(body), golden_bytes("heartbeat-slave-v4"))
        msg, _ = GOLDEN["takeover-v4"]
        body = reference_body(
            type_=2, incarnation=msg.incarnation, sequence=msg.sequence, epoch=msg.epoch,
            node=msg.node_id, slot=msg.slot, subject=msg.subject, flags=int(msg.flags),
            role=int(msg.role), view=msg.view_digest, heard=bytes([0b0001_0011, 0b1]),
            version=4,
        )  # fmt: skip
        self.assertEqual(signed(body), golden_bytes("takeover-v4"))

    def test_doc_has_same_vectors(self) -> None:
        doc = parse_doc_vectors(DOC.read_text(encoding="utf-8"))
        self.assertEqual(sorted(doc), sorted(GOLDEN))
        for name in GOLDEN:
            self.assertEqual(doc[name].hex(), golden_bytes(name).hex(), name)

    def test_doc_secret_and_cluster(self) -> None:
        """The doc states the same secret and cluster the vectors were made with."""
        text = DOC.read_text(encoding="utf-8")
        self.assertIn(f"``{SECRET.decode()}``", text)
        self.assertIn(f"{CLUSTER:#010x}", text)


class DecodeErrorTests(SynchronousTestCase):
    def assertReason(self, data: bytes, reason: str, c: HeartbeatCodec | None = None) -> None:
        c = c or codec()
        err = self.assertRaises(HeartbeatError, c.decode, data)
        self.assertEqual(err.reason, reason, str(err))
        self.assertIn(reason, REASONS)
        self.assertTrue(str(err).startswith(reason + ": "))

    def test_short(self) -> None:
        good = golden_bytes("heartbeat-slave")
        for n in range(8):
            self.assertReason(good[:n], "short")

    def test_magic(self) -> None:
        good = golden_bytes("heartbeat-slave")
        self.assertReason(b"XH" + good[2:], "magic")
        self.assertReason(b"HF" + good[2:], "magic")
        self.assertReason(b"GET / HTTP/1.0\r\n\r\n", "magic")

    def test_version(self) -> None:
        good = golden_bytes("heartbeat-slave-v2")
        self.assertReason(good[:2] + b"\x05" + good[3:], "version")
        self.assertReason(good[:2] + b"\x00" + good[3:], "version")
        # A future version of another size is reported as a version, not a length, problem.
        self.assertReason(good[:2] + b"\x05" + good[3:] + b"\x00" * 20, "version")
        # Each known version has its own size.
        v1 = golden_bytes("heartbeat-slave")
        self.assertReason(v1[:2] + b"\x02" + v1[3:], "length")
        self.assertReason(good[:2] + b"\x01" + good[3:], "length")
        # Version 3's size is its fixed part plus the heard length at byte 71.
        v3 = golden_bytes("heartbeat-slave-v3")
        self.assertReason(good[:2] + b"\x03" + good[3:], "length")  # heard length 0xd2
        self.assertReason(v3[:71] + b"\x02" + v3[72:], "length")
        self.assertReason(v3[:2] + b"\x03" + v3[3:70], "length")  # not even the fixed part
        # Version 4's is its fixed part plus the heard length at byte 75.
        v4 = golden_bytes("heartbeat-slave-v4")
        self.assertReason(v3[:2] + b"\x04" + v3[3:], "length")
        self.assertReason(v4[:2] + b"\x03" + v4[3:], "length")
        self.assertReason(v4[:75] + b"\x02" + v4[76:], "length")
        self.assertReason(v4[:2] + b"\x04" + v4[3:74], "length")

    def test_heard_bitmap_canonical(self) -> None:
        """A bitmap ending with a zero byte is refused: one encoding per heartbeat."""
        v3 = golden_bytes("heartbeat-slave-v3")
        body = v3[:71] + b"\x02" + v3[72:73] + b"\x00"
        self.assertReason(signed(body), "field")

    def test_length(self) -> None:
        v2 = golden_bytes("takeover-v2")
        self.assertReason(v2[:-1], "length")
        self.assertReason(v2[:89], "length")
        self.assertReason(v2 + b"\x00", "length")
        good = golden_bytes("heartbeat-slave")
        self.assertReason(good[:-1], "length")
        self.assertReason(good[:8], "length")
        self.assertReason(good + b"\x00", "length")
        self.assertReason(good + b"\x00" * 65000, "length")

    def test_type(self) -> None:
        good = golden_bytes("heartbeat-slave")
        for t in (0, 4, 255):
            self.assertReason(good[:3] + bytes([t]) + good[4:], "type")

    def test_cluster(self) -> None:
        good = golden_bytes("heartbeat-slave")
        self.assertReason(good, "cluster", HeartbeatCodec(SECRET, CLUSTER ^ 1))
        self.assertReason(good, "cluster", HeartbeatCodec(SECRET, cluster_id_for("other")))

    def test_tag(self) -> None:
        good = golden_bytes("heartbeat-slave")
        self.assertReason(good, "tag", HeartbeatCodec(b"another-secret-of-32-bytes-0001!", CLUSTER))
        self.assertReason(good[:-1] + bytes([good[-1] ^ 1]), "tag")
        self.assertReason(good[:57] + b"\x00" * 32, "tag")
        # A changed field with the old tag.
        self.assertReason(good[:40] + b"\x03" + good[41:], "tag")
        # A changed type that is still valid is caught by the tag.
        self.assertReason(good[:3] + b"\x02" + good[4:], "tag")

    def test_field(self) -> None:
        cases = {
            "role 5": reference_body(role=5),
            "role 255": reference_body(role=255),
            "flag 0x10": reference_body(flags=0x10),
            "flag 0x8001": reference_body(flags=0x8001),
            "node NO_NODE": reference_body(node=NO_NODE),
            "heartbeat with subject": reference_body(subject=3),
            "takeover without subject": reference_body(type_=2, slot=0),
            "takeover without slot": reference_body(type_=2, subject=1),
            "release without subject": reference_body(type_=3, slot=0),
            "release without slot": reference_body(type_=3, subject=1),
            "echo sequence without echo node": reference_body(echo_sequence=5),
            "echo delay without echo node": reference_body(echo_delay=5),
            "echo of itself": reference_body(node=1, echo_node=1, echo_sequence=5),
            "echo bound without echo node": reference_body(echo_bound=5),
        }
        for name, body in cases.items():
            err = self.assertRaises(HeartbeatError, codec().decode, signed(body))
            self.assertEqual(err.reason, "field", name)
        # ... and the reference body itself is fine, so the cases above test one thing each.
        self.assertEqual(codec().decode(signed(reference_body())).node_id, 1)
        ok = codec().decode(signed(reference_body(type_=3, slot=0, subject=1)))
        self.assertEqual(ok.type, MessageType.RELEASE)
        echo = codec().decode(signed(reference_body(echo_node=0, echo_sequence=2**64 - 1,
                                                    echo_delay=2**32 - 1)))
        self.assertEqual((echo.echo_node, echo.echo_sequence, echo.echo_delay_us),
                         (0, 2**64 - 1, 2**32 - 1))
        v1 = codec().decode(signed(reference_body(version=1)))
        self.assertEqual((v1.version, v1.echo_node), (1, NO_NODE))

    def test_not_bytes(self) -> None:
        self.assertReason("FH", "short")  # type: ignore[arg-type]
        self.assertReason(None, "short")  # type: ignore[arg-type]
        self.assertReason(1000, "short")  # type: ignore[arg-type]

    def test_bytes_like(self) -> None:
        good = golden_bytes("release")
        msg = GOLDEN["release"][0]
        self.assertEqual(codec().decode(bytearray(good)), msg)  # type: ignore[arg-type]
        self.assertEqual(codec().decode(memoryview(good)), msg)  # type: ignore[arg-type]
        good = golden_bytes("heartbeat-slave-v2")
        self.assertEqual(codec().decode(bytearray(good)),  # type: ignore[arg-type]
                         GOLDEN["heartbeat-slave-v2"][0])

    def test_reasons_cover_checks(self) -> None:
        self.assertEqual(
            REASONS, ("short", "magic", "version", "length", "type", "cluster", "tag", "field")
        )


class EncodeErrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = GOLDEN["heartbeat-master"][0]

    def bad(self, **changes: object) -> None:
        msg = dataclasses.replace(self.base, **changes)  # type: ignore[arg-type]
        self.assertRaises(ValueError, codec().encode, msg)

    def test_out_of_range(self) -> None:
        for field, top in (
            ("node_id", 0xFFFF),
            ("slot", 0xFFFF),
            ("incarnation", 2**64 - 1),
            ("sequence", 2**64 - 1),
            ("epoch", 2**64 - 1),
        ):
            self.bad(**{field: -1})
            self.bad(**{field: top + 1})
            self.bad(**{field: "1"})
        self.bad(subject=0x10000)
        self.bad(subject=-1)
        v2 = dict(version=2, echo_node=2, echo_sequence=1, echo_delay_us=1)
        codec().encode(dataclasses.replace(self.base, **v2))  # type: ignore[arg-type]
        self.bad(**{**v2, "echo_node": 0x10000})
        self.bad(**{**v2, "echo_sequence": 2**64})
        self.bad(**{**v2, "echo_delay_us": 2**32})
        self.bad(**{**v2, "echo_delay_us": -1})

    def test_enums(self) -> None:
        self.bad(type=0)
        self.bad(type=4)
        self.bad(role=5)
        self.bad(role=-1)
        self.bad(flags=16)
        self.bad(flags=-1)

    def test_digests(self) -> None:
        self.bad(config_digest=b"\x00" * 7)
        self.bad(view_digest=b"\x00" * 9)
        self.bad(view_digest="01234567")

    def test_cluster(self) -> None:
        self.bad(cluster_id=CLUSTER + 1)

    def test_relations(self) -> None:
        self.bad(node_id=NO_NODE)
        self.bad(subject=1)  # a HEARTBEAT has no subject
        self.bad(type=MessageType.TAKEOVER)  # ... a TAKEOVER needs one
        self.bad(type=MessageType.RELEASE, subject=1, slot=NO_SLOT)
        self.bad(version=2, echo_node=self.base.node_id, echo_sequence=1)  # itself
        self.bad(version=2, echo_sequence=1)  # no echo node
        self.bad(version=1, echo_node=2, echo_sequence=1)  # version 1 has no echo
        self.bad(version=5)
        self.bad(version=0)
        self.bad(echo_bound_us=1)  # no echo node
        self.bad(version=3, echo_node=2, echo_sequence=1, echo_bound_us=1)  # from version 4
        self.bad(echo_node=2, echo_sequence=1, echo_bound_us=2**32)
        self.bad(version=2, heard=1)  # only versions 3 and 4 carry a bitmap
        self.bad(version=3, heard=-1)
        self.bad(version=3, heard=1 << 2040)  # beyond 255 bytes
        codec().encode(dataclasses.replace(self.base, version=3, heard=(1 << 2040) - 1))

    def test_plain_ints_accepted(self) -> None:
        """Plain ints in enum-typed fields encode like the enum members."""
        msg = dataclasses.replace(self.base, type=1, role=3, flags=5)  # type: ignore[arg-type]
        self.assertEqual(codec().encode(msg), golden_bytes("heartbeat-master"))


class BoundaryTests(SynchronousTestCase):
    def roundtrip(self, msg: Heartbeat) -> None:
        data = codec().encode(msg)
        self.assertEqual(len(data), size_of(msg))
        self.assertEqual(codec().decode(data), msg)

    def test_maximum_values(self) -> None:
        top = 2**64 - 1
        self.roundtrip(
            Heartbeat(
                MessageType.TAKEOVER, CLUSTER, NO_NODE - 1, top, top, Role.RELEASING,
                Flags(15), NO_SLOT - 1, top, NO_NODE - 1, b"\xff" * 8, b"\xff" * 8,
                version=3,
            )
        )  # fmt: skip
        self.roundtrip(
            Heartbeat(
                MessageType.HEARTBEAT, CLUSTER, NO_NODE - 1, top, top, Role.MASTER,
                Flags(15), NO_SLOT, top, NO_NODE, b"\xff" * 8, b"\xff" * 8,
            )
        )  # fmt: skip
        self.roundtrip(
            Heartbeat(
                MessageType.HEARTBEAT, CLUSTER, NO_NODE - 1, top, top, Role.MASTER,
                Flags(15), NO_SLOT, top, NO_NODE, b"\xff" * 8, b"\xff" * 8,
                echo_node=NO_NODE - 2, echo_sequence=top, echo_delay_us=2**32 - 1,
            )
        )  # fmt: skip
        self.roundtrip(
            Heartbeat(
                MessageType.HEARTBEAT, CLUSTER, NO_NODE - 1, top, top, Role.MASTER,
                Flags(15), NO_SLOT, top, NO_NODE, b"\xff" * 8, b"\xff" * 8,
                echo_node=NO_NODE - 2, echo_sequence=top, echo_delay_us=2**32 - 1,
                echo_bound_us=2**32 - 1, heard=(1 << 2040) - 1,
            )
        )  # fmt: skip

    def test_minimum_values(self) -> None:
        self.roundtrip(
            Heartbeat(
                MessageType.HEARTBEAT, CLUSTER, 0, 0, 0, Role.STARTING, Flags(0),
                0, 0, NO_NODE, b"\x00" * 8, b"\x00" * 8,
            )
        )  # fmt: skip
        self.roundtrip(
            Heartbeat(
                MessageType.RELEASE, CLUSTER, 0, 0, 0, Role.STARTING, Flags(0),
                0, 0, 0, b"\x00" * 8, b"\x00" * 8,
            )
        )  # fmt: skip

    def test_cluster_id_extremes(self) -> None:
        for cid in (0, 0xFFFFFFFF):
            c = HeartbeatCodec(SECRET, cid)
            msg = dataclasses.replace(GOLDEN["takeover"][0], cluster_id=cid)
            self.assertEqual(c.decode(c.encode(msg)), msg)
            err = self.assertRaises(HeartbeatError, codec().decode, c.encode(msg))
            self.assertEqual(err.reason, "cluster")

    def test_codec_arguments(self) -> None:
        self.assertRaises(ValueError, HeartbeatCodec, b"", CLUSTER)
        self.assertRaises(ValueError, HeartbeatCodec, b"x" * 15, CLUSTER)
        self.assertRaises(TypeError, HeartbeatCodec, "x" * 32, CLUSTER)
        self.assertRaises(ValueError, HeartbeatCodec, SECRET, -1)
        self.assertRaises(ValueError, HeartbeatCodec, SECRET, 2**32)
        self.assertEqual(HeartbeatCodec(b"x" * 16, CLUSTER).cluster_id, CLUSTER)

    def test_long_secret(self) -> None:
        """Secrets longer than a SHA-256 block are hashed first, as RFC 2104 says."""
        for n in (16, 63, 64, 65, 200):
            secret = bytes((i * 7) & 0xFF for i in range(n))
            c = HeartbeatCodec(secret, CLUSTER)
            data = c.encode(GOLDEN["heartbeat-slave"][0])
            self.assertEqual(data[57:], hmac.new(secret, data[:57], hashlib.sha256).digest(), n)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(heartbeats())
    def test_roundtrip(self, msg: Heartbeat) -> None:
        data = codec().encode(msg)
        self.assertEqual(len(data), size_of(msg))
        self.assertEqual(codec().decode(data), msg)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=16, max_size=300), heartbeats())
    def test_tag_is_stdlib_hmac(self, secret: bytes, msg: Heartbeat) -> None:
        data = HeartbeatCodec(secret, CLUSTER).encode(msg)
        body = size_of(msg) - 32
        self.assertEqual(data[body:], hmac.new(secret, data[:body], hashlib.sha256).digest())

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        self.assertRaises(HeartbeatError, codec().decode, data)

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(MessageType), st.sampled_from((1, 2, 3, 4)), st.data())
    def test_arbitrary_bytes_valid_prefix(self, msg_type: MessageType, version: int,
                                          data: st.DataObject) -> None:
        """Bytes that pass every cheap check still fail, on the tag."""
        size = {4: SIZE, 3: SIZE_V3, 2: SIZE_V2, 1: SIZE_V1}[version]
        rest = data.draw(st.binary(min_size=size - 8, max_size=size - 8))
        if version >= 3:  # a heard length that matches what follows
            body = BODY_SIZE if version == 4 else BODY_SIZE_V3
            heard = data.draw(st.binary(max_size=20))
            rest = rest[:body - 9] + bytes([len(heard)]) + heard + rest[body - 8:]
        prefix = b"FH" + bytes([version, msg_type]) + CLUSTER.to_bytes(4, "big")
        err = self.assertRaises(HeartbeatError, codec().decode, prefix + rest)
        self.assertEqual(err.reason, "tag")

    @settings(max_examples=200, deadline=None)
    @given(heartbeats(), st.integers(0, SIZE - 1), st.integers(1, 255))
    def test_single_byte_mutation(self, msg: Heartbeat, pos: int, xor: int) -> None:
        data = bytearray(codec().encode(msg))
        pos %= len(data)
        data[pos] ^= xor
        err = self.assertRaises(HeartbeatError, codec().decode, bytes(data))
        if (pos, msg.version) in ((BODY_SIZE - 1, 4), (BODY_SIZE_V3 - 1, 3)):
            self.assertEqual(err.reason, "length")  # the heard length
        elif pos >= 8:
            self.assertEqual(err.reason, "tag")
        else:
            # a version byte turned into the other known version gives the wrong length
            self.assertIn(err.reason, ("magic", "version", "length", "type", "cluster", "tag"))

    @settings(max_examples=200, deadline=None)
    @given(heartbeats(), st.integers(0, SIZE - 1), st.binary(min_size=1, max_size=40))
    def test_truncate_or_extend(self, msg: Heartbeat, cut: int, extra: bytes) -> None:
        data = codec().encode(msg)
        cut %= len(data)
        self.assertRaises(HeartbeatError, codec().decode, data[:cut])
        err = self.assertRaises(HeartbeatError, codec().decode, data + extra)
        self.assertEqual(err.reason, "length")

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(MessageType), st.sampled_from((1, 2, 3, 4)), st.data())
    def test_signed_arbitrary_body(self, msg_type: MessageType, version: int,
                                   draw: st.DataObject) -> None:
        """A correctly tagged body with arbitrary fields is either refused as "field" or
        decodes to a message that encodes back to exactly the same bytes (one encoding)."""
        size = {4: BODY_SIZE - 1, 3: BODY_SIZE_V3 - 1, 2: BODY_SIZE_V2,
                1: BODY_SIZE_V1}[version] - 8
        rest = draw.draw(st.binary(min_size=size, max_size=size))
        if version >= 3:
            heard = draw.draw(st.binary(max_size=20))
            rest += bytes([len(heard)]) + heard
        body = b"FH" + bytes([version, msg_type]) + CLUSTER.to_bytes(4, "big") + rest
        data = signed(body)
        try:
            msg = codec().decode(data)
        except HeartbeatError as e:
            self.assertEqual(e.reason, "field")
        else:
            self.assertEqual(codec().encode(msg), data)
