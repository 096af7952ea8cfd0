"""One Event Socket connection (:class:`ESLProtocol`): framing, a FIFO of pending
requests with their timeouts, events out; and the errors the client raises. The
self-healing client around it is :mod:`fsha.eslclient` (its docstring describes both)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha.wire.esl import (
    CT_API_RESPONSE,
    CT_AUTH_REQUEST,
    CT_COMMAND_REPLY,
    CT_DISCONNECT_NOTICE,
    CT_EVENT_JSON,
    CT_EVENT_PLAIN,
    CT_RUDE_REJECTION,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    ESLCommandError,
    ESLProtocolError,
    Event,
    Frame,
    FrameDecoder,
    decode_event_json,
    decode_event_plain,
    encode_command,
)

__all__ = [
    "REQUEST_RESULTS",
    "ESLAuthError",
    "ESLCommandFailed",
    "ESLConnectionLost",
    "ESLError",
    "ESLNotConnected",
    "ESLProtocol",
    "ESLTimeout",
    "EventCallback",
    "RequestObserver",
    "request_label",
]

log = Logger(namespace="fsha.esl")  # as the client's: operators filter on it

EventCallback = Callable[[Event], object]


class ESLError(Exception):
    """Base class of the Event Socket client's errors."""


class ESLConnectionLost(ESLError):
    """The connection closed (or was dropped) before the request was answered."""


class ESLNotConnected(ESLError):
    """The client has no ready connection to FreeSWITCH."""


class ESLTimeout(ESLError):
    """No answer in time. For a FIFO request, the connection has been dropped."""


class ESLAuthError(ESLError):
    """FreeSWITCH refused the password (or the ACL refused us)."""


class ESLCommandFailed(ESLError):
    """A ``command/reply`` whose ``Reply-Text`` starts with ``-ERR``."""

    def __init__(self, command: str, reply: str) -> None:
        super().__init__(f"{command!r} failed: {reply}")
        self.command = command
        self.reply = reply


def _log_failure(failure: Failure, what: str) -> None:
    log.failure("Unexpected error in {what}", failure=failure, what=what)


#: ``on_request(command, seconds, result)``: one finished request; ``result`` is one of
#: :data:`REQUEST_RESULTS`, ``seconds`` the time from sending to the reply (or the failure).
RequestObserver = Callable[[str, float, str], object]
REQUEST_RESULTS = ("ok", "timeout", "lost")
def request_label(line: str) -> str:
    """The command of a request line, as a low-cardinality label: the verb, and for
    ``api``/``bgapi`` the API command too (``api status``, ``bgapi originate``), never its
    arguments (they may hold a password or a UUID)."""
    words = line.split(" ", 2)
    verb = words[0]
    if verb in ("api", "bgapi") and len(words) > 1:
        return verb + " " + words[1][:40]
    return verb[:40]


class _Pending:
    __slots__ = ("deferred", "line", "sent_at", "timer")

    def __init__(self, deferred: Deferred[Frame], line: str, timer: IDelayedCall | None,
                 sent_at: float = 0.0) -> None:
        self.deferred = deferred
        self.line = line
        self.timer = timer
        self.sent_at = sent_at


class ESLProtocol(Protocol):
    """One Event Socket connection: framing, a FIFO of pending requests, events out.

    ``greeting`` fires with the ``auth/request`` frame. :meth:`request` sends one command
    and returns a Deferred of its reply frame (``command/reply`` or ``api/response``).
    Events go to ``on_event``; a broken stream or a timed-out request aborts the connection.
    """

    def __init__(
        self,
        clock: IReactorTime,
        on_event: EventCallback | None = None,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.clock = clock
        self.on_event = on_event
        self.on_connected: Callable[[ESLProtocol], object] | None = None
        self.on_lost: Callable[[ESLProtocol, Failure], object] | None = None
        self.on_request: RequestObserver | None = None
        self._decoder = FrameDecoder(max_header_bytes, max_body_bytes)
        self._pending: deque[_Pending] = deque()
        self.greeting: Deferred[Frame] = Deferred()
        self.connected_ok = False
        self.closing_reason: str | None = None
        self.last_frame_at = 0.0
        self.frames_received = 0
        self.events_dropped = 0
        self.hung_timeout: float | None = None  # see the module docstring
        self.late_replies = 0  # replies that came after their request timed out

    # -- Twisted callbacks ---------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_ok = True
        self.last_frame_at = self.clock.seconds()
        if self.on_connected is not None:
            try:
                self.on_connected(self)
            except Exception:
                log.failure("on_connected callback failed")
                self.drop("connection setup crashed")

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ESLProtocolError as e:
            self.drop(f"protocol error: {e}")
            return
        if not frames:
            return
        self.last_frame_at = self.clock.seconds()
        self.frames_received += len(frames)
        for frame in frames:
            if not self.connected_ok:
                return
            self._frame(frame)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_ok = False
        why = self.closing_reason or reason.getErrorMessage()
        pending, self._pending = self._pending, deque()
        for p in pending:
            if p.timer is not None and p.timer.active():
                p.timer.cancel()
            self._observe(p, "lost")
            if not p.deferred.called:
                p.deferred.errback(ESLConnectionLost(f"{p.line!r}: connection lost ({why})"))
        if not self.greeting.called:
            self.greeting.errback(ESLConnectionLost(f"no greeting: connection lost ({why})"))
        if self.on_lost is not None:
            try:
                self.on_lost(self, reason)
            except Exception:
                log.failure("on_lost callback failed")

    # -- frames --------------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        ct = frame.content_type
        if ct == CT_EVENT_PLAIN or ct == CT_EVENT_JSON:
            try:
                event = (
                    decode_event_plain(frame.body)
                    if ct == CT_EVENT_PLAIN
                    else decode_event_json(frame.body)
                )
            except ESLProtocolError as e:
                # The framing is intact: drop this event, keep the connection.
                self.events_dropped += 1
                log.warn("Dropped an undecodable {ct} event: {error}", ct=ct, error=str(e))
                return
            if self.on_event is not None:
                try:
                    self.on_event(event)
                except Exception:
                    log.failure("Event handler failed on {name}", name=event.name)
            return
        if ct == CT_COMMAND_REPLY or ct == CT_API_RESPONSE:
            if not self._pending:
                self.drop(f"unexpected {ct} with no request pending")
                return
            p = self._pending.popleft()
            if p.timer is not None and p.timer.active():
                p.timer.cancel()
            if p.deferred.called:  # timed out (or cancelled) before: late, discarded
                self.late_replies += 1
                return
            self._observe(p, "ok")
            p.deferred.callback(frame)
            return
        if ct == CT_AUTH_REQUEST:
            if self.greeting.called:
                self.drop("second auth/request greeting")
            else:
                self.greeting.callback(frame)
            return
        if ct == CT_DISCONNECT_NOTICE:
            self.closing_reason = "disconnect notice: " + _first_line(frame.body)
            log.info("FreeSWITCH sent a disconnect notice: {text}", text=_first_line(frame.body))
            return
        if ct == CT_RUDE_REJECTION:
            self.closing_reason = "rejected by ACL: " + _first_line(frame.body)
            log.error("FreeSWITCH refused this client: {text}", text=_first_line(frame.body))
            return
        # log/data, text/event-xml and anything unknown: not used by fsha.
        log.debug("Ignoring an ESL frame of type {ct}", ct=ct)

    # -- requests ------------------------------------------------------------------------

    def request(
        self,
        line: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout: float = 5.0,
    ) -> Deferred[Frame]:
        """Send a command; the Deferred fires with its reply frame.

        Errbacks: :class:`ESLCommandError` (unsafe arguments, nothing sent),
        :class:`ESLNotConnected`, :class:`ESLTimeout` (and the connection is dropped),
        :class:`ESLConnectionLost`.
        """
        try:
            data = encode_command(line, headers, body)
        except ESLCommandError as e:
            return fail(e)
        if not self.connected_ok or self.transport is None:
            return fail(ESLNotConnected(f"{line!r}: not connected"))
        d: Deferred[Frame] = Deferred()
        p = _Pending(d, _describe(line), None, self.clock.seconds())
        p.timer = self.clock.callLater(timeout, self._timed_out, p, timeout)
        self._pending.append(p)
        self.transport.write(data)
        return d

    def _observe(self, p: _Pending, result: str) -> None:
        if self.on_request is None or p.sent_at < 0:
            return
        seconds = self.clock.seconds() - p.sent_at
        p.sent_at = -1.0  # observed once: a timed-out request is not counted lost too
        try:
            self.on_request(request_label(p.line), seconds, result)
        except Exception:
            log.failure("request observer failed")

    def _timed_out(self, p: _Pending, timeout: float) -> None:
        p.timer = None
        self._observe(p, "timeout")
        if not p.deferred.called:
            p.deferred.errback(ESLTimeout(f"{p.line!r}: no reply in {timeout:g} s"))
        hung = self.hung_timeout
        if hung is not None and hung > timeout:
            # Busy is not hung: the request keeps its place in the FIFO and its late reply
            # is discarded when it comes; only a reply missing for `hung` seconds is.
            p.timer = self.clock.callLater(hung - timeout, self._hung, p, hung)
            return
        # The reply may still come: it would answer the next request. Poisoned.
        self.drop(f"request {p.line!r} timed out after {timeout:g} s")

    def _hung(self, p: _Pending, hung: float) -> None:
        p.timer = None
        self.drop(f"request {p.line!r} unanswered for {hung:g} s: FreeSWITCH hung")

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    def drop(self, reason: str) -> None:
        """Abort the connection (pending requests fail with ESLConnectionLost)."""
        if not self.connected_ok:
            return
        log.warn("Dropping the ESL connection: {reason}", reason=reason)
        self.closing_reason = reason
        self.connected_ok = False
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


def _first_line(body: bytes) -> str:
    return body.split(b"\n", 1)[0].decode("utf-8", "replace")[:200]


def _describe(line: str) -> str:
    # never log a password
    return "auth ***" if line.startswith("auth ") else line[:200]
