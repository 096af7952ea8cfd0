"""The per-profile SIP UDP responder: ``OPTIONS`` answered ``200 OK`` (or ``503 System
Paused`` in standby) with a header naming the simulator's node.

:func:`respond` is the codec-like part (bytes in, bytes out, no I/O; raises only
:class:`SipParseError`); :class:`SipResponder` is the thin Twisted protocol and
:class:`UdpSipBinder` binds one per running profile.
"""

from __future__ import annotations

import socket
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorSocket
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from fsha.sim.switch import Profile

log = Logger()

MAX_DATAGRAM = 65535
ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, MESSAGE, INFO, UPDATE, REGISTER, REFER, NOTIFY"
_COMPACT = {
    "v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact", "l": "content-length",
}


class SipParseError(ValueError):
    """The datagram is not a SIP request the responder can answer."""


@dataclass(slots=True)
class SipRequest:
    method: str
    uri: str
    headers: list[tuple[str, str]]  # (lower-case long name, value), in order

    def get(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def getall(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


def parse_request(data: bytes) -> SipRequest:
    """Parse a SIP request's start line and headers (the body is ignored)."""
    if len(data) > MAX_DATAGRAM:
        raise SipParseError("datagram too large")
    head, _, _ = data.partition(b"\r\n\r\n")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise SipParseError("not UTF-8") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "SIP/2.0" or not parts[0].isalpha():
        raise SipParseError("not a SIP request line")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # folded continuation
            key, value = headers[-1]
            headers[-1] = (key, value + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise SipParseError("malformed header line")
        key = name.strip().lower()
        key = _COMPACT.get(key, key)
        if key == "via":
            headers.extend(("via", v.strip()) for v in value.split(",") if v.strip())
        else:
            headers.append((key, value.strip()))
    for required in ("via", "from", "to", "call-id", "cseq"):
        if not any(k == required for k, _ in headers):
            raise SipParseError(f"missing {required} header")
    return SipRequest(parts[0].upper(), parts[1], headers)


def _fix_via(via: str, src: tuple[str, int]) -> str:
    """RFC 3581/3261: add ``received`` and fill an empty ``rport`` on the top Via."""
    params = via.split(";")
    out = [params[0]]
    has_received = False
    for p in params[1:]:
        if p.strip().lower() == "rport":
            out.append(f"rport={src[1]}")
        else:
            if p.strip().lower().startswith("received="):
                has_received = True
            out.append(p)
    sent_by = params[0].split()[-1] if params[0].split() else ""
    host = sent_by.rsplit(":", 1)[0] if sent_by.count(":") == 1 else sent_by
    if not has_received and host != src[0]:
        out.insert(1, f"received={src[0]}")
    return ";".join(out)


def respond(
    data: bytes,
    *,
    node: str,
    standby: bool,
    src: tuple[str, int],
    local: tuple[str, int],
    to_tag: str | None = None,
) -> bytes | None:
    """The response to one datagram, or None for a datagram that gets no answer (a SIP
    response, an ``ACK``). Raises :class:`SipParseError` on a malformed request."""
    if data.startswith(b"SIP/2.0 "):
        return None
    req = parse_request(data)
    if req.method == "ACK":
        return None
    if standby:
        status = "503 System Paused"
    elif req.method == "OPTIONS":
        status = "200 OK"
    else:
        status = "501 Not Implemented"
    vias = req.getall("via")
    lines = [f"SIP/2.0 {status}"]
    lines.append(f"Via: {_fix_via(vias[0], src)}")
    lines.extend(f"Via: {v}" for v in vias[1:])
    lines.append(f"From: {req.get('from')}")
    to = req.get("to") or ""
    if ";tag=" not in to.replace(" ", "").lower():
        to += f";tag={to_tag or uuidlib.uuid4().hex[:13]}"
    lines.append(f"To: {to}")
    lines.append(f"Call-ID: {req.get('call-id')}")
    lines.append(f"CSeq: {req.get('cseq')}")
    lines.append(f"Contact: <sip:{local[0]}:{local[1]}>")
    lines.append("User-Agent: FreeSWITCH-mod_sofia/1.10.12-release+fsha-sim~64bit")
    lines.append(f"Allow: {ALLOW}")
    lines.append("Accept: application/sdp")
    lines.append("Supported: timer, path, replaces")
    lines.append(f"X-FSHA-Node: {node}")
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


class SipResponder(DatagramProtocol):
    """Answers datagrams on one profile's socket; malformed ones are counted and dropped."""

    noisy = False

    def __init__(self, profile: Profile, node: Callable[[], str], paused: Callable[[], bool]):
        self.profile = profile
        self.node = node
        self.paused = paused
        self.answered = 0
        self.dropped = 0

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if self.paused():
            return
        try:
            port = self.profile.bound_port or self.profile.port
            out = respond(
                datagram,
                node=self.node(),
                standby=self.profile.standby,
                src=(addr[0], addr[1]),
                local=(self.profile.ip, port),
            )
        except SipParseError as e:
            self.dropped += 1
            log.debug("sip {profile}: dropped datagram from {addr}: {error}",
                      profile=self.profile.name, addr=addr, error=str(e))
            return
        if out is not None and self.transport is not None:
            try:
                self.transport.write(out, addr)
            except OSError as e:
                # the floating address just left this host (a release): the answer is
                # lost, as a real FreeSWITCH's would be; counted, never an unhandled error
                self.dropped += 1
                log.debug("sip {profile}: cannot answer {addr}: {error}",
                          profile=self.profile.name, addr=addr, error=str(e))
                return
            self.answered += 1


class UdpSipBinder:
    """Binds a :class:`SipResponder` per profile; a failed bind returns None."""

    def __init__(
        self,
        reactor: IReactorSocket,
        node: Callable[[], str],
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        self.reactor = reactor
        self.node = node
        self.paused = paused
        self.ports: dict[str, IListeningPort] = {}
        self.responders: dict[str, SipResponder] = {}

    def bind(self, profile: Profile) -> int | None:
        self.unbind(profile)
        responder = SipResponder(profile, self.node, self.paused)
        # Bind our own socket and hand it to the reactor: a failed bind is then closed at
        # once (listenUDP leaves the socket of a failed bind open until collected).
        family = socket.AF_INET6 if ":" in profile.ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((profile.ip, profile.port))
            sock.setblocking(False)
            port = self.reactor.adoptDatagramPort(sock.fileno(), family, responder)
        except (OSError, CannotListenError) as e:
            log.error("sip {profile}: cannot bind {ip}:{port}: {error}",
                      profile=profile.name, ip=profile.ip, port=profile.port, error=str(e))
            return None
        finally:
            sock.close()  # the reactor works on its own duplicate
        self.ports[profile.name] = port
        self.responders[profile.name] = responder
        return int(port.getHost().port)

    def unbind(self, profile: Profile) -> None:
        port = self.ports.pop(profile.name, None)
        self.responders.pop(profile.name, None)
        if port is not None:
            _close_now(port)


def _close_now(port: IListeningPort) -> None:
    """Close a UDP port synchronously, so that a restart can bind the same address in the
    same reactor turn (``stopListening`` closes the socket one turn later)."""
    stop_reading = getattr(port, "stopReading", None)
    lost = getattr(port, "connectionLost", None)
    if stop_reading is not None and lost is not None and getattr(port, "connected", False):
        stop_reading()
        lost(None)
        return
    d = port.stopListening()
    if d is not None:
        d.addErrback(lambda f: log.failure("sip unbind failed", f))
