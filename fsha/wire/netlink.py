"""The few rtnetlink and ARP messages fsha sends to move a floating IP, as bytes.

No I/O: the messages the ``ip`` backend sends to the kernel itself (``fsha.floating``'s
netlink path) instead of running ``ip addr`` and ``arping`` once per address. Specified in
``docs/protocol/netlink.rst`` with golden vectors (``tests/test_netlink_codec.py``).

- :func:`addr_request` is what ``ip addr add|del A/P dev IF`` sends (``RTM_NEWADDR`` with
  ``NLM_F_CREATE|NLM_F_EXCL``, or ``RTM_DELADDR``; ``IFA_LOCAL`` and ``IFA_ADDRESS`` both the
  address; IPv6 adds go without duplicate address detection, ``IFA_F_NODAD``), byte for byte
  what iproute2 sends but for the sequence number.
- :func:`dump_request` / :func:`parse_messages` list the addresses held on the host
  (``RTM_GETADDR`` dump), as ``ip -o addr show`` does.
- :func:`garp` is the payload of one gratuitous ARP (an ARP request whose sender and target
  addresses are both the floating IP, as ``arping -U`` sends it), for an ``AF_PACKET``
  datagram socket that adds the Ethernet header (broadcast destination).

Host byte order is little-endian on every platform fsha supports (netlink uses the host's
order; addresses are in network order).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass

AF_INET = 2
AF_INET6 = 10

NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22

NLM_F_REQUEST = 0x001
NLM_F_MULTI = 0x002
NLM_F_ACK = 0x004
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_CAPPED = 0x100  # in an NLMSG_ERROR: only the request's header is quoted
NLM_F_ACK_TLVS = 0x200  # in an NLMSG_ERROR: extended-ack attributes follow

IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3
IFA_F_NODAD = 0x02
NLMSGERR_ATTR_MSG = 1

# socket options of SOL_NETLINK (270)
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # errors quote only the request's header, not its payload
NETLINK_EXT_ACK = 11  # errors carry the kernel's message ("Invalid prefix length" ...)

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
BROADCAST_MAC = b"\xff" * 6

_NLMSGHDR = struct.Struct("<IHHII")  # length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("<BBBBI")  # family, prefix length, flags, scope, interface index
_RTATTR = struct.Struct("<HH")  # length, type
_ERRNO = struct.Struct("<i")


class NetlinkDecodeError(ValueError):
    """A message from the kernel that is not what this module understands."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, value: bytes) -> bytes:
    length = _RTATTR.size + len(value)
    return _RTATTR.pack(length, kind) + value + b"\0" * (_align(length) - length)


def _message(kind: int, flags: int, sequence: int, payload: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), kind, flags, sequence, 0) + payload


def addr_request(action: str, address: str, prefix: int, index: int, sequence: int) -> bytes:
    """``ip addr add|del ADDRESS/PREFIX dev <index>`` as one netlink request (ack wanted)."""
    ip = ipaddress.ip_address(address)
    family = AF_INET if ip.version == 4 else AF_INET6
    if not 0 <= prefix <= (32 if ip.version == 4 else 128):
        raise ValueError(f"prefix /{prefix} out of range for {address}")
    packed = ip.packed
    if action == "add":
        kind, flags = RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    elif action == "del":
        kind, flags = RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK
    else:
        raise ValueError(f"unknown address action {action!r}")
    ifa_flags = IFA_F_NODAD if ip.version == 6 and action == "add" else 0
    payload = _IFADDRMSG.pack(family, prefix, ifa_flags, 0, index)
    payload += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
    return _message(kind, flags, sequence, payload)


def dump_request(sequence: int) -> bytes:
    """Every address of every interface, both families (``RTM_GETADDR`` dump)."""
    return _message(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, sequence,
                    _IFADDRMSG.pack(0, 0, 0, 0, 0))


@dataclass(frozen=True, slots=True)
class Ack:
    """An ``NLMSG_ERROR``: ``error`` 0 is success, else a positive errno."""

    sequence: int
    error: int
    message: str = ""  # the kernel's extended-ack text, if it sent one


@dataclass(frozen=True, slots=True)
class AddressEntry:
    """One ``RTM_NEWADDR`` of a dump."""

    sequence: int
    index: int
    address: str
    prefix: int
    version: int
    label: str = ""


@dataclass(frozen=True, slots=True)
class Done:
    sequence: int


Message = Ack | AddressEntry | Done


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > len(data):
            raise NetlinkDecodeError(f"attribute of length {length} at {offset} overruns "
                                     f"{len(data)} bytes")
        yield kind & 0x3FFF, data[offset + _RTATTR.size:offset + length]
        offset += _align(length)


def _ack(sequence: int, flags: int, body: bytes) -> Ack:
    if len(body) < _ERRNO.size + _NLMSGHDR.size:
        raise NetlinkDecodeError(f"error message of {len(body)} bytes is too short")
    (errno,) = _ERRNO.unpack_from(body)
    text = ""
    if flags & NLM_F_ACK_TLVS:
        # the request is quoted whole, or only its header (NLM_F_CAPPED, always for a
        # success); the TLVs follow it
        quoted = _NLMSGHDR.unpack_from(body, _ERRNO.size)[0]
        capped = errno == 0 or flags & NLM_F_CAPPED or quoted < _NLMSGHDR.size
        start = _ERRNO.size + (_NLMSGHDR.size if capped else _align(quoted))
        for kind, value in _attrs(body[start:]):
            if kind == NLMSGERR_ATTR_MSG:
                text = value.rstrip(b"\0").decode("utf-8", "replace")
    return Ack(sequence, -errno, text)


def _address(sequence: int, body: bytes) -> AddressEntry | None:
    if len(body) < _IFADDRMSG.size:
        raise NetlinkDecodeError(f"address message of {len(body)} bytes is too short")
    family, prefix, _, _, index = _IFADDRMSG.unpack_from(body)
    if family not in (AF_INET, AF_INET6):
        return None
    values = dict(_attrs(body[_IFADDRMSG.size:]))
    # IPv4: IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on a
    # point-to-point link); IPv6 sends IFA_ADDRESS only, unless there is a peer
    raw = values.get(IFA_LOCAL) or values.get(IFA_ADDRESS)
    size = 4 if family == AF_INET else 16
    if raw is None or len(raw) != size:
        return None
    ip = ipaddress.ip_address(raw)
    label = values.get(IFA_LABEL, b"").rstrip(b"\0").decode("utf-8", "replace")
    return AddressEntry(sequence, index, str(ip), prefix, ip.version, label)


def parse_messages(data: bytes) -> list[Message]:
    """The messages of one datagram from the kernel (types other than the three kinds
    fsha asks for are skipped)."""
    out: list[Message] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, flags, sequence, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise NetlinkDecodeError(f"message of length {length} at {offset} overruns "
                                     f"{len(data)} bytes")
        body = data[offset + _NLMSGHDR.size:offset + length]
        if kind == NLMSG_ERROR:
            out.append(_ack(sequence, flags, body))
        elif kind == NLMSG_DONE:
            out.append(Done(sequence))
        elif kind == RTM_NEWADDR:
            entry = _address(sequence, body)
            if entry is not None:
                out.append(entry)
        offset += _align(length)
    return out


def garp(mac: bytes, address: str) -> bytes:
    """One gratuitous ARP for ``address`` from ``mac``: the 28-byte ARP request whose sender
    and target protocol addresses are both ``address`` (target hardware address broadcast,
    as iputils ``arping -U`` sends it)."""
    if len(mac) != 6:
        raise ValueError(f"an Ethernet address has 6 bytes, not {len(mac)}")
    ip = ipaddress.ip_address(address)
    if ip.version != 4:
        raise ValueError(f"ARP is IPv4 only, not {address}")
    return struct.pack("!HHBBH", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST) + \
        mac + ip.packed + BROADCAST_MAC + ip.packed
