"""The kernel's network interfaces, spoken to directly: rtnetlink for addresses, a packet
socket for gratuitous ARP (the capabilities they need are checked by ``fsha.startup``).

This is the I/O half of the ``ip`` backend's netlink path (``fsha.floating``); the bytes are
built and parsed by ``fsha.wire.netlink``. Every call is one or two system calls that the
kernel completes before it returns (an rtnetlink request is processed inside ``sendto``,
its acknowledgement is queued by then), so the calls are synchronous: a few tens of
microseconds, against 2-5 ms for an ``ip`` or ``arping`` process. Each socket still has
the configured timeout, so a kernel that does not answer fails the step instead of
blocking the reactor for longer.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import sys
from itertools import count

from fsha.wire import netlink

_RECV = 65536
SIOCGIFHWADDR = 0x8927  # struct ifreq: name[16], then a sockaddr (family u16, data[14])


class KernelError(OSError):
    """The kernel refused a request: ``errno`` and its text (plus the kernel's own
    message, when it sent one)."""

    def __init__(self, code: int, what: str, message: str = "") -> None:
        text = f"{what}: {os.strerror(code)}"
        if message:
            text += f" ({message})"
        super().__init__(code, text)
        self.code = code

    def __str__(self) -> str:
        return str(self.args[1])


def supported() -> str | None:
    """Why the netlink path cannot be used here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    except (OSError, AttributeError) as e:
        return f"no rtnetlink socket: {e}"
    s.close()
    return None


def interface_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise KernelError(errno.ENODEV, f"interface {name!r}") from None


class LinuxNet:
    """Addresses and gratuitous ARP through the kernel's own interfaces."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._sequence = count(1)
        # One packet socket for the process's life: closing one waits for an RCU grace
        # period in the kernel (10-30 ms measured here), which a takeover must not pay.
        self._packet: socket.socket | None = None

    def _socket(self) -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        s.settimeout(self.timeout)
        for option in (netlink.NETLINK_CAP_ACK, netlink.NETLINK_EXT_ACK):
            try:
                s.setsockopt(netlink.SOL_NETLINK, option, 1)
            except OSError:
                pass  # older kernels: plain errno only
        s.bind((0, 0))
        return s

    def _exchange(self, request: bytes, sequence: int, what: str
                  ) -> list[netlink.AddressEntry]:
        """Send one request; read until its ack (or a dump's end). Raises KernelError."""
        entries: list[netlink.AddressEntry] = []
        with self._socket() as s:
            s.sendto(request, (0, 0))
            while True:
                try:
                    data = s.recv(_RECV)
                except TimeoutError:
                    raise KernelError(errno.ETIMEDOUT, what) from None
                for m in netlink.parse_messages(data):
                    if m.sequence != sequence:
                        continue  # not ours (cannot happen on a fresh socket; harmless)
                    if isinstance(m, netlink.Ack):
                        if m.error:
                            raise KernelError(m.error, what, m.message)
                        return entries
                    if isinstance(m, netlink.Done):
                        return entries
                    entries.append(m)

    def change(self, action: str, address: str, prefix: int, interface: str) -> None:
        """``add`` or ``del`` one address; KernelError(EEXIST) for an address already
        held, KernelError(EADDRNOTAVAIL) for deleting one that is not."""
        what = f"{action} {address}/{prefix} dev {interface}"
        index = interface_index(interface)
        sequence = next(self._sequence)
        self._exchange(netlink.addr_request(action, address, prefix, index, sequence),
                       sequence, what)

    def addresses(self) -> list[tuple[str, str, int, int, str]]:
        """Every address held here: (interface, address, prefix, version, label)."""
        sequence = next(self._sequence)
        out = []
        for e in self._exchange(netlink.dump_request(sequence), sequence, "list addresses"):
            try:
                name = socket.if_indextoname(e.index)
            except OSError:
                continue  # the interface went away while we listed
            out.append((name, e.address, e.prefix, e.version, e.label))
        return out

    def garp(self, address: str, interface: str) -> bool:
        """Send one gratuitous ARP for ``address`` out of ``interface``. False: the
        interface does not speak ARP (no Ethernet address: loopback, tunnels)."""
        if self._packet is None:
            # protocol 0 and never bound: it receives nothing
            self._packet = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
            self._packet.settimeout(self.timeout)
        s = self._packet
        try:
            answer = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR,
                                 struct.pack("16s16x", interface.encode()[:15]))
        except OSError as e:
            raise KernelError(e.errno or errno.ENODEV, f"interface {interface!r}") from None
        hatype = struct.unpack_from("H", answer, 16)[0]
        mac = answer[18:24]
        if hatype != netlink.ARPHRD_ETHER:
            return False
        s.sendto(netlink.garp(mac, address),
                 (interface, netlink.ETH_P_ARP, 0, 0, netlink.BROADCAST_MAC))
        return True
