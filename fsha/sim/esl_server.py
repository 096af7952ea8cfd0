"""The simulator's Event Socket server, inbound mode (``mod_event_socket``).

Exact greeting, replies, error texts and event framing of the facts sheet (sections 1-2),
using the project's codec (:mod:`fsha.wire.esl`) for every byte. Each connection has a
bounded event queue (100,000 by default, as FreeSWITCH); after 500 consecutive lost events
the connection is killed. The factory can be *hung*: commands are no longer read or
answered and events no longer written, but sockets stay open (a hung FreeSWITCH).

Why about 650 lines: every command of ``mod_event_socket``'s server side, with its
exact reply text.
"""

from __future__ import annotations

import ipaddress
import re
import uuid as uuidlib
from collections import deque
from collections.abc import Iterable, Sequence
from xml.sax.saxutils import escape as xml_escape

from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from fsha.sim.events import CALLING, SimEvent
from fsha.sim.switch import Switch
from fsha.wire.esl import (
    Command,
    CommandDecoder,
    ESLProtocolError,
    encode_event_json,
    encode_event_plain,
    encode_frame,
    url_encode,
)

log = Logger()

DISCONNECT_BODY = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
RUDE_BODY = b"Access Denied, go away.\n"
GREETING = encode_frame([("Content-Type", "auth/request")])
MAX_LOST_EVENTS = 500
DEFAULT_MAX_QUEUE = 100_000

# switch_event_types_t names (switch_event.c EVENT_NAMES)
EVENT_NAMES: frozenset[str] = frozenset(
    """CUSTOM CLONE CHANNEL_CREATE CHANNEL_DESTROY CHANNEL_STATE CHANNEL_CALLSTATE
    CHANNEL_ANSWER CHANNEL_HANGUP CHANNEL_HANGUP_COMPLETE CHANNEL_EXECUTE
    CHANNEL_EXECUTE_COMPLETE CHANNEL_HOLD CHANNEL_UNHOLD CHANNEL_BRIDGE CHANNEL_UNBRIDGE
    CHANNEL_PROGRESS CHANNEL_PROGRESS_MEDIA CHANNEL_OUTGOING CHANNEL_PARK CHANNEL_UNPARK
    CHANNEL_APPLICATION CHANNEL_ORIGINATE CHANNEL_UUID API LOG INBOUND_CHAN OUTBOUND_CHAN
    STARTUP SHUTDOWN PUBLISH UNPUBLISH TALK NOTALK SESSION_CRASH MODULE_LOAD MODULE_UNLOAD
    DTMF MESSAGE PRESENCE_IN NOTIFY_IN PRESENCE_OUT PRESENCE_PROBE MESSAGE_WAITING
    MESSAGE_QUERY ROSTER CODEC BACKGROUND_JOB DETECTED_SPEECH DETECTED_TONE PRIVATE_COMMAND
    HEARTBEAT TRAP ADD_SCHEDULE DEL_SCHEDULE EXE_SCHEDULE RE_SCHEDULE RELOADXML NOTIFY
    PHONE_FEATURE PHONE_FEATURE_SUBSCRIBE SEND_MESSAGE RECV_MESSAGE REQUEST_PARAMS
    CHANNEL_DATA GENERAL COMMAND SESSION_HEARTBEAT CLIENT_DISCONNECTED SERVER_DISCONNECTED
    SEND_INFO RECV_INFO RECV_RTCP_MESSAGE SEND_RTCP_MESSAGE CALL_SECURE NAT RECORD_START
    RECORD_STOP PLAYBACK_START PLAYBACK_STOP CALL_UPDATE FAILURE SOCKET_DATA
    MEDIA_BUG_START MEDIA_BUG_STOP CONFERENCE_DATA_QUERY CONFERENCE_DATA CALL_SETUP_REQ
    CALL_SETUP_RESULT CALL_DETAIL DEVICE_STATE TEXT SHUTDOWN_REQUESTED ALL""".split()
)
LOG_LEVELS: dict[str, int] = {
    "console": 0, "alert": 1, "crit": 2, "err": 3, "error": 3, "warning": 4, "notice": 5,
    "info": 6, "debug": 7,
}  # fmt: skip
_LOG_NAMES = {0: "CONSOLE", 1: "ALERT", 2: "CRIT", 3: "ERR", 4: "WARNING", 5: "NOTICE",
              6: "INFO", 7: "DEBUG"}  # fmt: skip


def reply_frame(text: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    return encode_frame([("Content-Type", "command/reply"), ("Reply-Text", text), *extra])


def api_frame(body: str) -> bytes:
    return encode_frame([("Content-Type", "api/response")], body.encode("utf-8", "surrogateescape"))


def disconnect_frame(extra: Sequence[tuple[str, str]] = ()) -> bytes:
    return encode_frame(
        [
            ("Content-Type", "text/disconnect-notice"),
            *extra,
            ("Content-Length", str(len(DISCONNECT_BODY))),
        ],
        DISCONNECT_BODY,
    )


def rude_rejection_frame() -> bytes:
    return encode_frame(
        [("Content-Type", "text/rude-rejection"), ("Content-Length", str(len(RUDE_BODY)))],
        RUDE_BODY,
    )


def encode_event_xml(headers: Sequence[tuple[str, str]], body: bytes = b"") -> bytes:
    """``switch_event_xmlize``: ``<event><headers><Name>value</Name>...</headers>``,
    URL-encoded values, ``<body>`` when there is one."""
    parts = ["<event>\n  <headers>\n"]
    for name, value in headers:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
            continue
        parts.append(f"    <{name}>{xml_escape(url_encode(value))}</{name}>\n")
    if body:
        parts.append(f"    <Content-Length>{len(body)}</Content-Length>\n")
    parts.append("  </headers>\n")
    if body:
        parts.append("  <body>" + xml_escape(body.decode("utf-8", "replace")) + "</body>\n")
    parts.append("</event>")
    return "".join(parts).encode("utf-8")


def event_frame(event: SimEvent, fmt: str) -> bytes:
    """The whole ``text/event-FMT`` frame for ``event``; cached on the event."""
    cached = event.cache.get(fmt)
    if cached is not None:
        return cached
    if fmt == "json":
        body = encode_event_json(event.headers, event.body)
    elif fmt == "xml":
        body = encode_event_xml(event.headers, event.body)
    else:
        body = encode_event_plain(event.headers, event.body)
    frame = (
        f"Content-Length: {len(body)}\nContent-Type: text/event-{fmt}\n\n".encode("ascii") + body
    )
    event.cache[fmt] = frame
    return frame


def _filter_match(event: SimEvent, pattern: str, value: str) -> bool:
    if pattern.startswith("/"):
        expr = pattern[1:-1] if pattern.endswith("/") and len(pattern) > 1 else pattern[1:]
        try:
            return re.search(expr, value) is not None
        except re.error:
            return False
    return pattern.lower() == value.lower()


@implementer(IPushProducer)
class ESLServerProtocol(Protocol):
    """One inbound Event Socket connection."""

    factory: ESLServerFactory

    def __init__(self) -> None:
        self.decoder = CommandDecoder()
        self.authed = False
        self.closing = False
        self.fmt = "plain"
        self.all_events = False
        self.event_names: set[str] = set()
        self.custom: set[str] = set()
        self.filters: list[tuple[str, str]] = []
        self.session_uuid: str | None = None
        self.linger: float | None = None  # None: no linger; -1: forever
        self.log_level: int | None = None
        self.queue: deque[bytes] = deque()
        self.lost = 0
        self.paused = False  # transport asked us to stop producing
        self.pending: deque[Command] = deque()
        self._linger_call: IDelayedCall | None = None
        self._subscribed = False
        self._greeted = False
        self.in_command = False
        self.awaiting = False  # an api waits for its output (limit_usage hiredis ...)
        self.flood_frame = b""
        self.flood_left = 0

    # -- connection ----------------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        peer: IAddress = self.transport.getPeer()
        if not self.factory.allowed(getattr(peer, "host", "")):
            log.info("esl: rude rejection of {peer}", peer=peer)
            self.transport.write(rude_rejection_frame() + disconnect_frame())
            self.closing = True
            self.transport.loseConnection()
            return
        self.factory.connections.add(self)
        self.transport.registerProducer(self, True)
        self.factory.switch.add_listener(self.on_event)
        self._subscribed = True
        if self.factory.hung:
            self.transport.pauseProducing()
        else:
            self._greeted = True
            self.transport.write(GREETING)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closing = True
        self.factory.connections.discard(self)
        if self._subscribed:
            self.factory.switch.remove_listener(self.on_event)
            self._subscribed = False
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self.queue.clear()

    def close(self, notice: Sequence[tuple[str, str]] | None = ()) -> None:
        """Send a disconnect notice (unless ``notice`` is None) and close."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        if notice is not None:
            self.transport.write(disconnect_frame(notice))
        self.transport.loseConnection()

    # -- hang / unhang -------------------------------------------------------------------

    def hang(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def unhang(self) -> None:
        if self.transport is None or self.closing:
            return
        if not self._greeted:
            self._greeted = True
            self.transport.write(GREETING)
        self.transport.resumeProducing()
        self._run_pending()
        self._flush()

    # -- IPushProducer (the transport's backpressure) ------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._flush()

    def stopProducing(self) -> None:
        self.paused = True
        self.queue.clear()

    # -- commands ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            commands = self.decoder.feed(data)
        except ESLProtocolError as e:
            log.warn("esl: protocol error from {peer}: {error}",
                     peer=self.transport.getPeer() if self.transport else None, error=str(e))
            self.close(notice=None)
            return
        self.pending.extend(commands)
        self._run_pending()

    def _run_pending(self) -> None:
        while self.pending and not self.closing and not self.factory.hung and not self.awaiting:
            cmd = self.pending.popleft()
            # As in FreeSWITCH, a command runs on the connection's only thread: events
            # fired meanwhile (by an api, a bgapi's BACKGROUND_JOB) follow its reply.
            self.in_command = True
            try:
                self.handle(cmd)
            except Exception:
                log.failure("esl: command {line!r} failed", line=cmd.line[:200])
                self.write(reply_frame("-ERR command failed"))
            finally:
                self.in_command = self.awaiting
            self._flush()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(data)

    def handle(self, cmd: Command) -> None:
        line = cmd.line.strip()
        word, _, rest = line.partition(" ")
        word = word.lower()
        rest = rest.strip()
        if word in ("exit", "...", "bye"):
            self.write(reply_frame("+OK bye"))
            self.close()
            return
        if not self.authed:
            if word == "auth":
                if rest == self.factory.password:
                    self.authed = True
                    self.write(reply_frame("+OK accepted"))
                else:
                    self.write(reply_frame("-ERR invalid"))
                    self.close()
                return
            self.write(reply_frame("-ERR command not found"))
            return
        handler = getattr(self, "cmd_" + word, None)
        if handler is None or word == "auth":
            self.write(reply_frame("-ERR command not found"))
            return
        handler(rest, cmd)

    def cmd_api(self, rest: str, cmd: Command) -> None:
        if not rest:
            self.write(api_frame("-ERR no reply\n"))
            return
        res = self.factory.switch.api(rest)
        if res.pending is None:
            self.write(api_frame(res.body))
            return
        # like the connection's thread blocked in the api: later commands and events wait
        self.awaiting = True

        def failed(f: Failure) -> str:
            log.failure("esl: api {line!r} failed", f, line=rest[:200])
            return ""

        def reply(text: str) -> None:
            self.awaiting = self.in_command = False
            self.write(api_frame(text or "-ERR no reply\n"))
            self._flush()
            self._run_pending()

        res.pending.addErrback(failed).addCallback(reply).addErrback(
            lambda f: log.failure("esl: api reply failed", f)
        )

    def cmd_bgapi(self, rest: str, cmd: Command) -> None:
        job = cmd.headers.get("Job-UUID") or str(uuidlib.uuid4())
        self.write(reply_frame(f"+OK Job-UUID: {job}", [("Job-UUID", job)]))
        switch = self.factory.switch
        command, _, args = rest.partition(" ")
        extra = [("Job-UUID", job), ("Job-Command", command)]
        if args:
            extra.append(("Job-Command-Arg", args))

        def fire(result: str) -> None:
            switch.fire(
                switch.events.make(
                    "BACKGROUND_JOB",
                    CALLING["BACKGROUND_JOB"],
                    extra,
                    body=result.encode("utf-8", "surrogateescape"),
                )
            )

        res = switch.api(rest) if rest else None
        if res is None or res.pending is None:
            fire(res.body if res is not None else "-ERR no reply\n")
            return
        res.pending.addCallback(lambda text: fire(text or "-ERR no reply\n")).addErrback(
            lambda f: log.failure("esl: bgapi {line!r} failed", f, line=rest[:200])
        )

    def _set_events(self, words: Iterable[str], on: bool) -> int:
        count = 0
        custom = False
        for w in words:
            if custom:
                (self.custom.add if on else self.custom.discard)(w)
                continue
            name = w.upper()
            if name not in EVENT_NAMES:
                continue
            count += 1
            if name == "ALL":
                self.all_events = on
                if not on:
                    self.event_names.clear()
                    self.custom.clear()
                continue
            if on:
                self.event_names.add(name)
            else:
                self.event_names.discard(name)
            if name == "CUSTOM":
                custom = True
        return count

    def cmd_event(self, rest: str, cmd: Command) -> None:
        words = rest.split()
        fmt = "plain"
        if words and words[0].lower() in ("plain", "json", "xml"):
            fmt = words.pop(0).lower()
        if not self._set_events(words, True):
            self.write(reply_frame("-ERR no keywords supplied"))
            return
        self.fmt = fmt
        self.write(reply_frame(f"+OK event listener enabled {fmt}"))

    def cmd_nixevent(self, rest: str, cmd: Command) -> None:
        if not self._set_events(rest.split(), False):
            self.write(reply_frame("-ERR no keywords supplied"))
            return
        self.write(reply_frame("+OK events nixed"))

    def cmd_noevents(self, rest: str, cmd: Command) -> None:
        self.all_events = False
        self.event_names.clear()
        self.custom.clear()
        self.write(reply_frame("+OK no longer listening for events"))

    def cmd_filter(self, rest: str, cmd: Command) -> None:
        name, _, value = rest.partition(" ")
        value = value.strip()
        if name.lower() == "delete" and value:
            hname, _, hval = value.partition(" ")
            hval = hval.strip()
            if hname.lower() == "all":
                self.filters.clear()
            else:
                self.filters = [
                    (n, v)
                    for n, v in self.filters
                    if not (n.lower() == hname.lower() and (not hval or v == hval))
                ]
            self.write(reply_frame(f"+OK filter deleted. [{hname}][{hval}]"))
            return
        if not name or not value:
            self.write(reply_frame("-ERR invalid syntax"))
            return
        self.filters.append((name, value))
        self.write(reply_frame(f"+OK filter added. [{name}]=[{value}]"))

    def cmd_sendevent(self, rest: str, cmd: Command) -> None:
        name = rest.split(" ", 1)[0].upper() if rest else "MESSAGE"
        if name not in EVENT_NAMES or name == "ALL":
            self.write(reply_frame("-ERR invalid event"))
            return
        event_uuid = self.factory.switch.sendevent(name, cmd.headers.items(), cmd.body)
        self.write(reply_frame(f"+OK {event_uuid}"))

    def cmd_sendmsg(self, rest: str, cmd: Command) -> None:
        target = rest.split(" ", 1)[0] if rest else (self.session_uuid or "")
        if not target:
            target = cmd.headers.get("Unique-ID") or ""
        if self.factory.switch.sendmsg(target, cmd.headers.items()):
            self.write(reply_frame("+OK"))
        else:
            self.write(reply_frame(f"-ERR invalid session id [{target}]"))

    def cmd_myevents(self, rest: str, cmd: Command) -> None:
        words = rest.split()
        fmt = "plain"
        if words and words[0].lower() in ("plain", "json", "xml"):
            fmt = words.pop(0).lower()
        target = words[0] if words else ""
        if not target or target not in self.factory.switch.channels:
            self.write(reply_frame("-ERR invalid uuid"))
            return
        self.session_uuid = target
        self.fmt = fmt
        self.all_events = True
        self.write(reply_frame("+OK Events Enabled"))

    def cmd_linger(self, rest: str, cmd: Command) -> None:
        if self.session_uuid is None:
            self.write(reply_frame("-ERR not controlling a session"))
            return
        if rest.isdigit() and int(rest) > 0:
            self.linger = float(int(rest))
            self.write(reply_frame(f"+OK will linger {int(rest)} seconds"))
        else:
            self.linger = -1
            self.write(reply_frame("+OK will linger"))

    def cmd_nolinger(self, rest: str, cmd: Command) -> None:
        if self.session_uuid is None:
            self.write(reply_frame("-ERR not controlling a session"))
            return
        self.linger = None
        self.write(reply_frame("+OK will not linger"))

    def cmd_log(self, rest: str, cmd: Command) -> None:
        word = rest.split(" ", 1)[0].lower() if rest else "debug"
        if word.isdigit():
            level = min(int(word), 7)
        elif word in LOG_LEVELS:
            level = LOG_LEVELS[word]
        else:
            self.write(reply_frame("-ERR invalid log level"))
            return
        self.log_level = level
        shown = rest.split(" ", 1)[0] if rest else _LOG_NAMES[level]
        self.write(reply_frame(f"+OK log level {shown} [{level}]"))

    def cmd_nolog(self, rest: str, cmd: Command) -> None:
        if self.log_level is None:
            self.write(reply_frame("-ERR not loging"))
            return
        self.log_level = None
        self.write(reply_frame("+OK no longer logging"))

    # -- events --------------------------------------------------------------------------

    def wants(self, event: SimEvent) -> bool:
        if not self.authed:
            return False
        if self.all_events:
            send = True
        elif event.name in self.event_names:
            send = event.name != "CUSTOM" or event.subclass is None or event.subclass in self.custom
        else:
            return False
        if send and self.session_uuid is not None:
            uid = event.get("Unique-ID")
            if uid != self.session_uuid and event.name != "BACKGROUND_JOB":
                return False
        if self.filters:
            send = False
            for hname, raw in self.filters:
                hval = event.get(hname)
                if hval is None:
                    continue
                pos = True
                comp = raw
                while comp and comp[0] in "+- ":
                    if comp[0] == "+":
                        pos = True
                    elif comp[0] == "-":
                        pos = False
                    comp = comp[1:]
                if send and pos:
                    continue
                if not comp:
                    continue
                if _filter_match(event, comp, hval):
                    if pos:
                        send = True
                    else:
                        return False
        return send

    def on_event(self, event: SimEvent) -> None:
        if self.closing:
            return
        if self.wants(event):
            self.enqueue(event_frame(event, self.fmt))
        if (
            self.session_uuid is not None
            and event.name == "CHANNEL_DESTROY"
            and event.get("Unique-ID") == self.session_uuid
        ):
            self._session_gone(event)

    def enqueue(self, frame: bytes) -> None:
        if not self.queue and not self.paused and not self.in_command and not self.factory.hung:
            self.lost = 0
            self.write(frame)
            return
        if len(self.queue) >= self.factory.max_queue:
            self.lost += 1
            if self.lost >= MAX_LOST_EVENTS:
                log.error("esl: killed listener because of lost events")
                self.queue.clear()
                self.close(notice=None)
            return
        self.lost = 0
        self.queue.append(frame)

    def _flush(self) -> None:
        while self.queue and not self.paused and not self.factory.hung and not self.closing:
            self.write(self.queue.popleft())
        while (
            self.flood_left
            and not self.queue
            and not self.paused
            and not self.factory.hung
            and not self.closing
        ):
            n = min(self.flood_left, 64)
            self.flood_left -= n
            self.write(self.flood_frame * n)

    def flood(self, event: SimEvent, count: int) -> bool:
        """Write ``count`` copies of ``event`` if this connection wants it, as fast as the
        transport takes them (paced by backpressure, never dropped): a load source for
        benchmarks. Returns whether the connection takes part."""
        if self.closing or not self.wants(event):
            return False
        self.flood_frame = event_frame(event, self.fmt)
        self.flood_left += count
        if not self.in_command:
            self._flush()
        return True

    def _session_gone(self, event: SimEvent) -> None:
        name = event.get("Channel-Name") or ""
        uid = self.session_uuid or ""
        if self.linger is None:
            self.close([("Controlled-Session-UUID", uid), ("Content-Disposition", "disconnect"),
                        ("Channel-Name", name)])
            return
        notice = [("Controlled-Session-UUID", uid), ("Content-Disposition", "linger"),
                  ("Channel-Name", name)]
        if self.linger < 0:
            self.write(disconnect_frame(notice))
            return
        self.write(disconnect_frame([*notice, ("Linger-Time", str(int(self.linger)))]))
        self._linger_call = self.factory.clock.callLater(self.linger, self.close, None)


class ESLServerFactory(Factory):
    """Shared state of the Event Socket server."""

    protocol = ESLServerProtocol
    noisy = False

    def __init__(
        self,
        switch: Switch,
        password: str,
        clock: IReactorTime,
        *,
        acl: Iterable[str] = (),
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        self.switch = switch
        self.password = password
        self.clock = clock
        self.acl = [ipaddress.ip_network(a, strict=False) for a in acl]
        self.max_queue = max_queue
        self.hung = False
        self.connections: set[ESLServerProtocol] = set()

    def allowed(self, host: str) -> bool:
        if not self.acl:
            return True
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in self.acl)

    def hang(self) -> None:
        """Stop answering: no command read or answered, no event written; sockets open."""
        self.hung = True
        for conn in list(self.connections):
            conn.hang()

    def unhang(self) -> None:
        self.hung = False
        for conn in list(self.connections):
            conn.unhang()
