"""The heartbeat datagram: one fixed-layout, versioned, authenticated UDP payload.

Every node sends one of these to every peer on every network, many times a second, and
receives as many, so :meth:`HeartbeatCodec.decode` is a hot path. It checks the cheap
things first (length, magic, version, message type, cluster id), then the HMAC-SHA256 tag
in constant time, and only then builds a :class:`Heartbeat`. It raises nothing but
:class:`HeartbeatError`, whose ``reason`` is a short stable token meant for a drop counter.

Layout (version 4, big-endian, 108 bytes + the heard bitmap; ``docs/protocol/heartbeat.rst``
has the full specification and the golden vectors)::

    off size type  field
      0    2 bytes magic b"FH"
      2    1 u8    version (4)
      3    1 u8    message type  (MessageType)
      4    4 u32   cluster id    (cluster_id_for(cluster name))
      8    8 u64   incarnation
     16    8 u64   sequence
     24    8 u64   epoch
     32    2 u16   node id       (sender; never NO_NODE)
     34    2 u16   slot          (NO_SLOT = none)
     36    2 u16   subject node  (TAKEOVER/RELEASE: node whose slot is concerned; else NO_NODE)
     38    2 u16   flags         (Flags)
     40    1 u8    role          (Role)
     41    8 bytes config digest
     49    8 bytes view digest
     57    8 u64   echo sequence (the latest sequence heard from the echo node here)
     65    4 u32   echo delay    (microseconds between hearing it and sending this)
     69    2 u16   echo node     (NO_NODE = no echo)
     71    4 u32   echo bound    (microseconds after hearing the echoed sequence before which
                                  the sender will not judge the echo node dead)
     75    1 u8    heard length  (L, bytes of the bitmap that follows, 0..255)
     76    L bytes heard bitmap  (bit i % 8 of byte i // 8: the sender hears node i)
   76+L   32 bytes HMAC-SHA256(secret, bytes 0..75+L)

Version 3 (104 bytes + L) is version 4 without the echo bound (the heard length at 71);
version 2 (103 bytes) is version 3 without the heard length and bitmap (the tag over bytes
0..70 at offset 71); version 1 (89 bytes) is version 2 without the three echo fields (the
tag over bytes 0..56 at offset 57). All are still decoded, and encoded on request
(``version=1``, ``2`` or ``3``), so nodes of every version keep hearing each other during a
rolling upgrade. The echo fields give the sender of the echoed heartbeat a round-trip time
per network, as RTCP's LSR/DLSR do; the heard bitmap lets the receivers decide a node's
death by a quorum of ears rather than one (``fsha.quorum``); the echo bound lets a master's
lease follow the adaptive detectors of its peers (``fsha.detector``).

The first 57 bytes are ordered (compared with the order of the design notes) so that every
integer is naturally aligned without any padding byte, and the four fields the decoder
checks before the tag sit together in the first 8 bytes.

This module does no I/O.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from hmac import compare_digest
from typing import Final, NoReturn

__all__ = [
    "BODY_SIZE",
    "BODY_SIZE_V1",
    "BODY_SIZE_V2",
    "BODY_SIZE_V3",
    "DIGEST_SIZE",
    "MAGIC",
    "MAX_ECHO_DELAY_US",
    "MAX_HEARD_BYTES",
    "MIN_SECRET_SIZE",
    "NO_NODE",
    "NO_SLOT",
    "PREFIX_SIZE",
    "REASONS",
    "SIZE",
    "SIZE_V1",
    "SIZE_V2",
    "SIZE_V3",
    "TAG_SIZE",
    "VERSION",
    "VERSIONS",
    "EchoEncoder",
    "Flags",
    "Heartbeat",
    "HeartbeatCodec",
    "HeartbeatError",
    "MessageType",
    "Role",
    "cluster_id_for",
]

MAGIC: Final = b"FH"
VERSION: Final = 4
#: The versions this codec decodes (and encodes).
VERSIONS: Final = (1, 2, 3, 4)
NO_SLOT: Final = 0xFFFF
NO_NODE: Final = 0xFFFF
DIGEST_SIZE: Final = 8
TAG_SIZE: Final = 32
#: The shortest secret :class:`HeartbeatCodec` accepts, in bytes.
MIN_SECRET_SIZE: Final = 16

_BODY_V1: Final = struct.Struct(">2sBBIQQQHHHHB8s8s")
_BODY_V2: Final = struct.Struct(">2sBBIQQQHHHHB8s8sQIH")
_BODY_V3: Final = struct.Struct(">2sBBIQQQHHHHB8s8sQIHB")  # + the heard bitmap
_BODY: Final = struct.Struct(">2sBBIQQQHHHHB8s8sQIHIB")  # + the heard bitmap
#: The fixed part of every version's body (57 bytes, then the echo).
_HEAD: Final = struct.Struct(">2sBBIQQQHHHHB8s8s")
_ECHO: Final = struct.Struct(">QIH")
_ECHO_V4: Final = struct.Struct(">QIHI")
#: Bytes covered by the tag (version 4 or 3 with an empty bitmap; versions 2 and 1).
BODY_SIZE: Final = _BODY.size
BODY_SIZE_V3: Final = _BODY_V3.size
BODY_SIZE_V2: Final = _BODY_V2.size
BODY_SIZE_V1: Final = _BODY_V1.size
#: Size of a datagram (versions 4 and 3 with an empty bitmap: add its length; 2, 1).
SIZE: Final = BODY_SIZE + TAG_SIZE
SIZE_V3: Final = BODY_SIZE_V3 + TAG_SIZE
SIZE_V2: Final = BODY_SIZE_V2 + TAG_SIZE
SIZE_V1: Final = BODY_SIZE_V1 + TAG_SIZE
#: The longest heard bitmap: node ids 0..2039 (fsha.config.MAX_NODES).
MAX_HEARD_BYTES: Final = 0xFF
_SIZES: Final = {1: SIZE_V1, 2: SIZE_V2}
#: Magic, version, type and cluster id: what decode checks before the tag.
PREFIX_SIZE: Final = 8

_U16: Final = 0xFFFF
#: The largest echo delay (about 71 minutes); longer delays are sent as this.
MAX_ECHO_DELAY_US: Final = 0xFFFF_FFFF
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF

#: Every ``HeartbeatError.reason``, in the order decode checks them.
REASONS: Final = ("short", "magic", "version", "length", "type", "cluster", "tag", "field")


class HeartbeatError(Exception):
    """A datagram that is not a valid heartbeat for this cluster.

    ``reason`` is one of :data:`REASONS` (a stable token to use as a counter label);
    ``detail`` is a human-readable explanation.
    """

    reason: str
    detail: str

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class MessageType(enum.IntEnum):
    HEARTBEAT = 1
    TAKEOVER = 2
    RELEASE = 3


class Role(enum.IntEnum):
    STARTING = 0
    SLAVE = 1
    CLAIMING = 2
    MASTER = 3
    RELEASING = 4


class Flags(enum.IntFlag):
    FS_OK = 1
    MAINTENANCE = 2
    SEES_QUORUM = 4
    UNFIT = 8


_FLAGS_MASK: Final = int(Flags.FS_OK | Flags.MAINTENANCE | Flags.SEES_QUORUM | Flags.UNFIT)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One decoded (or to-be-encoded) datagram. See the module docstring for the fields."""

    type: MessageType
    cluster_id: int
    node_id: int
    incarnation: int
    sequence: int
    role: Role
    flags: Flags
    slot: int
    epoch: int
    subject: int
    config_digest: bytes
    view_digest: bytes
    # The echo (version 2): the latest sequence this sender heard from ``echo_node`` on the
    # network this datagram is sent on, and how long ago (microseconds).
    echo_node: int = NO_NODE
    echo_sequence: int = 0
    echo_delay_us: int = 0
    version: int = VERSION
    # Version 3: the node ids this sender hears (bit i = node i), see fsha.quorum. 0 in
    # versions 1 and 2, which do not say (check ``version``).
    heard: int = 0
    # Version 4, with an echo: microseconds after hearing ``echo_sequence`` before which
    # the sender will not judge ``echo_node`` dead (fsha.detector). 0 before version 4.
    echo_bound_us: int = 0


#: (echo node, echo sequence, echo delay, echo bound) -> datagram: see
#: :meth:`HeartbeatCodec.prepare`.
EchoEncoder = Callable[[int, int, int, int], bytes]


def cluster_id_for(name: str) -> int:
    """The cluster id of a cluster called ``name``.

    The first 4 bytes, read as a big-endian u32, of SHA-256 over the UTF-8 encoding of the
    name exactly as written in the config (no normalisation, no trimming).
    """
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big")


# Lookup tables so decode does no enum construction (which is slow) per datagram.
_TYPES: Final = {int(t): t for t in MessageType}
_ROLES: Final = {int(r): r for r in Role}
_FLAG_VALUES: Final = tuple(Flags(v) for v in range(_FLAGS_MASK + 1))


def _check_relations(msg_type: int, node_id: int, slot: int, subject: int,
                     echo_node: int = NO_NODE, echo_sequence: int = 0, echo_delay: int = 0,
                     echo_bound: int = 0) -> str | None:
    """The cross-field rules; returns a description of the first one broken, or None."""
    if node_id == NO_NODE:
        return f"node id {NO_NODE:#06x} is reserved for 'no node'"
    if echo_node == NO_NODE:
        if echo_sequence or echo_delay or echo_bound:
            return "an echo sequence, delay or bound without an echo node"
    elif echo_node == node_id:
        return "a node echoes its own heartbeat"
    if msg_type == MessageType.HEARTBEAT:
        if subject != NO_NODE:
            return f"a HEARTBEAT has subject {subject}, expected none ({NO_NODE:#06x})"
    else:
        if subject == NO_NODE:
            return "a TAKEOVER or RELEASE needs a subject node"
        if slot == NO_SLOT:
            return "a TAKEOVER or RELEASE needs a slot"
    return None


class HeartbeatCodec:
    """Encodes and decodes heartbeats of one cluster, authenticated with its secret.

    The HMAC-SHA256 key schedule is computed once here: the SHA-256 states after the
    inner and outer padded key blocks (RFC 2104) are kept and copied per datagram, which
    saves two compression rounds and the stdlib ``hmac`` wrapper on the hot path.
    """

    __slots__ = ("_cluster_id", "_inner", "_outer", "_prefixes", "_prefixes_v1",
                 "_prefixes_v2", "_prefixes_v3")

    def __init__(self, secret: bytes, cluster_id: int) -> None:
        if not isinstance(secret, bytes | bytearray):
            raise TypeError("the cluster secret must be bytes")
        if len(secret) < MIN_SECRET_SIZE:
            raise ValueError(
                f"the cluster secret is {len(secret)} bytes, at least {MIN_SECRET_SIZE} needed"
            )
        if not isinstance(cluster_id, int) or not 0 <= cluster_id <= _U32:
            raise ValueError(f"cluster id {cluster_id!r} is not a u32")
        self._cluster_id = cluster_id
        key = bytes(secret)
        block = hashlib.sha256().block_size
        if len(key) > block:
            key = hashlib.sha256(key).digest()
        key = key.ljust(block, b"\x00")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        # The only 8-byte prefixes a valid datagram for this cluster can start with, per
        # version.
        cid = cluster_id.to_bytes(4, "big")
        self._prefixes = frozenset(MAGIC + bytes((VERSION, t)) + cid for t in _TYPES)
        self._prefixes_v1 = frozenset(MAGIC + bytes((1, t)) + cid for t in _TYPES)
        self._prefixes_v2 = frozenset(MAGIC + bytes((2, t)) + cid for t in _TYPES)
        self._prefixes_v3 = frozenset(MAGIC + bytes((3, t)) + cid for t in _TYPES)

    @property
    def cluster_id(self) -> int:
        return self._cluster_id

    def _tag(self, body: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(body)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def encode(self, msg: Heartbeat) -> bytes:
        """The datagram for ``msg``; raises ValueError if a field is out of range."""
        return self.prepare(msg)(msg.echo_node, msg.echo_sequence, msg.echo_delay_us,
                                 msg.echo_bound_us)

    def prepare(self, msg: Heartbeat) -> EchoEncoder:
        """Validate ``msg`` once (ValueError if a field is out of range) and return a
        function of (echo node, echo sequence, echo delay, echo bound) giving its datagram
        with that echo (``msg``'s own echo fields are ignored): one copy per destination at
        the cost of a pack and a tag (the copies of one heartbeat differ only in their
        echo). The bound must be 0 before version 4."""
        msg_type = _TYPES.get(msg.type)
        if msg_type is None:
            raise ValueError(f"type {msg.type!r} is not a MessageType")
        if msg.cluster_id != self._cluster_id:
            raise ValueError(
                f"cluster id {msg.cluster_id!r} is not this codec's ({self._cluster_id})"
            )
        role = _ROLES.get(msg.role)
        if role is None:
            raise ValueError(f"role {msg.role!r} is not a Role")
        flags = msg.flags
        if not isinstance(flags, int) or flags < 0 or flags & ~_FLAGS_MASK:
            raise ValueError(f"flags {flags!r} has undefined bits")
        for name, value, top in (
            ("node id", msg.node_id, _U16),
            ("incarnation", msg.incarnation, _U64),
            ("sequence", msg.sequence, _U64),
            ("slot", msg.slot, _U16),
            ("epoch", msg.epoch, _U64),
            ("subject", msg.subject, _U16),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise ValueError(f"{name} {value!r} is out of range 0..{top}")
        for name, digest in (
            ("config digest", msg.config_digest),
            ("view digest", msg.view_digest),
        ):
            if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
                raise ValueError(f"{name} must be {DIGEST_SIZE} bytes, got {digest!r}")
        problem = _check_relations(msg_type, msg.node_id, msg.slot, msg.subject)
        if problem is not None:
            raise ValueError(problem)
        version = msg.version
        if version not in VERSIONS:
            raise ValueError(f"version {version!r} is not one of {VERSIONS}")
        heard = msg.heard
        if not isinstance(heard, int) or isinstance(heard, bool) or heard < 0:
            raise ValueError(f"heard {heard!r} is not a bit set of node ids")
        tail = b""
        if version >= 3:
            size = (heard.bit_length() + 7) // 8
            if size > MAX_HEARD_BYTES:
                raise ValueError(f"heard names node {heard.bit_length() - 1}, beyond the "
                                 f"{MAX_HEARD_BYTES * 8} a heartbeat can carry")
            tail = bytes((size,)) + heard.to_bytes(size, "little")
        elif heard:
            raise ValueError(f"a version {version} heartbeat has no heard bitmap")
        head = _HEAD.pack(
            MAGIC, version, msg_type, self._cluster_id, msg.incarnation, msg.sequence,
            msg.epoch, msg.node_id, msg.slot, msg.subject, int(flags), role,
            msg.config_digest, msg.view_digest,
        )
        node_id = msg.node_id
        tag = self._tag
        pack_echo = _ECHO.pack
        pack_echo_v4 = _ECHO_V4.pack

        def with_echo(echo_node: int, echo_sequence: int, echo_delay_us: int,
                      echo_bound_us: int = 0) -> bytes:
            # Once per destination: ranges are left to struct.pack (a ValueError below).
            if echo_node.__class__ is not int or echo_sequence.__class__ is not int \
                    or echo_delay_us.__class__ is not int \
                    or echo_bound_us.__class__ is not int:
                raise ValueError("the echo fields must be ints")
            if echo_node == NO_NODE:
                if echo_sequence or echo_delay_us or echo_bound_us:
                    raise ValueError("an echo sequence, delay or bound without an echo node")
                if version == 1:
                    body = head
                    return body + tag(body)
            elif echo_node == node_id:
                raise ValueError("a node echoes its own heartbeat")
            elif version == 1:
                raise ValueError("a version 1 heartbeat has no echo")
            try:
                if version >= 4:
                    echo = pack_echo_v4(echo_sequence, echo_delay_us, echo_node, echo_bound_us)
                elif echo_bound_us:
                    raise ValueError(f"a version {version} heartbeat has no echo bound")
                else:
                    echo = pack_echo(echo_sequence, echo_delay_us, echo_node)
            except struct.error:
                raise ValueError(f"echo out of range: node {echo_node}, sequence "
                                 f"{echo_sequence}, delay {echo_delay_us}, bound "
                                 f"{echo_bound_us}") from None
            body = head + echo + tail
            return body + tag(body)

        return with_echo

    def decode(self, data: bytes) -> Heartbeat:
        """The heartbeat in ``data``; raises only HeartbeatError."""
        if data.__class__ is not bytes:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise HeartbeatError("short", f"not a byte string: {type(data).__name__}")
            data = bytes(data)
        size = len(data)
        heard = echo_bound = 0
        if size >= SIZE and data[:PREFIX_SIZE] in self._prefixes \
                and size == SIZE + data[BODY_SIZE - 1]:
            body = data[:-TAG_SIZE]
            if not compare_digest(self._tag(body), data[-TAG_SIZE:]):
                raise HeartbeatError("tag", "the HMAC tag does not match")
            (
                _magic, version, msg_type, cluster_id, incarnation, sequence, epoch, node_id,
                slot, subject, flag_bits, role_value, config_digest, view_digest,
                echo_sequence, echo_delay, echo_node, echo_bound, heard_size,
            ) = _BODY.unpack_from(body)
            if heard_size:
                if body[-1] == 0:
                    raise HeartbeatError("field", "the heard bitmap ends with a zero byte")
                heard = int.from_bytes(body[BODY_SIZE:], "little")
        elif size >= SIZE_V3 and data[:PREFIX_SIZE] in self._prefixes_v3 \
                and size == SIZE_V3 + data[BODY_SIZE_V3 - 1]:
            body = data[:-TAG_SIZE]
            if not compare_digest(self._tag(body), data[-TAG_SIZE:]):
                raise HeartbeatError("tag", "the HMAC tag does not match")
            (
                _magic, version, msg_type, cluster_id, incarnation, sequence, epoch, node_id,
                slot, subject, flag_bits, role_value, config_digest, view_digest,
                echo_sequence, echo_delay, echo_node, heard_size,
            ) = _BODY_V3.unpack_from(body)
            if heard_size:
                if body[-1] == 0:
                    raise HeartbeatError("field", "the heard bitmap ends with a zero byte")
                heard = int.from_bytes(body[BODY_SIZE_V3:], "little")
        elif size == SIZE_V2 and data[:PREFIX_SIZE] in self._prefixes_v2:
            body = data[:BODY_SIZE_V2]
            if not compare_digest(self._tag(body), data[BODY_SIZE_V2:]):
                raise HeartbeatError("tag", "the HMAC tag does not match")
            (
                _magic, version, msg_type, cluster_id, incarnation, sequence, epoch, node_id,
                slot, subject, flag_bits, role_value, config_digest, view_digest,
                echo_sequence, echo_delay, echo_node,
            ) = _BODY_V2.unpack(body)
        elif size == SIZE_V1 and data[:PREFIX_SIZE] in self._prefixes_v1:
            body = data[:BODY_SIZE_V1]
            if not compare_digest(self._tag(body), data[BODY_SIZE_V1:]):
                raise HeartbeatError("tag", "the HMAC tag does not match")
            (
                _magic, version, msg_type, cluster_id, incarnation, sequence, epoch, node_id,
                slot, subject, flag_bits, role_value, config_digest, view_digest,
            ) = _BODY_V1.unpack(body)
            echo_sequence = echo_delay = 0
            echo_node = NO_NODE
        else:
            self._raise_prefix_error(data)
        role = _ROLES.get(role_value)
        if role is None:
            raise HeartbeatError("field", f"unknown role {role_value}")
        if flag_bits & ~_FLAGS_MASK:
            raise HeartbeatError("field", f"undefined flag bits {flag_bits:#06x}")
        problem = _check_relations(msg_type, node_id, slot, subject, echo_node, echo_sequence,
                                   echo_delay, echo_bound)
        if problem is not None:
            raise HeartbeatError("field", problem)
        return Heartbeat(
            _TYPES[msg_type],
            cluster_id,
            node_id,
            incarnation,
            sequence,
            role,
            _FLAG_VALUES[flag_bits],
            slot,
            epoch,
            subject,
            config_digest,
            view_digest,
            echo_node,
            echo_sequence,
            echo_delay,
            version,
            heard,
            echo_bound,
        )

    def _raise_prefix_error(self, data: bytes) -> NoReturn:
        """Explain why ``data`` failed the fast length/prefix check (slow path)."""
        if len(data) < PREFIX_SIZE:
            raise HeartbeatError("short", f"{len(data)} bytes, a heartbeat has {SIZE}")
        if data[:2] != MAGIC:
            raise HeartbeatError("magic", f"magic {data[:2].hex()}, expected {MAGIC.hex()}")
        if data[2] not in VERSIONS:
            raise HeartbeatError("version", f"version {data[2]}, only {VERSIONS} are known")
        if data[2] >= 3:
            least, body_size = (SIZE, BODY_SIZE) if data[2] == 4 else (SIZE_V3, BODY_SIZE_V3)
            if len(data) < least:
                raise HeartbeatError("length", f"{len(data)} bytes, a version {data[2]} "
                                     f"heartbeat has at least {least}")
            size = least + data[body_size - 1]
        else:
            size = _SIZES[data[2]]
        if len(data) != size:
            raise HeartbeatError(
                "length", f"{len(data)} bytes, a version {data[2]} heartbeat has {size}")
        if data[3] not in _TYPES:
            raise HeartbeatError("type", f"unknown message type {data[3]}")
        cluster_id = int.from_bytes(data[4:8], "big")
        raise HeartbeatError(
            "cluster", f"cluster id {cluster_id:#010x}, this cluster is {self._cluster_id:#010x}"
        )
