"""Event Socket client: one self-healing inbound connection to the local FreeSWITCH.

Two layers, both driven by an injected clock:

* :class:`ESLProtocol` (:mod:`fsha.eslprotocol`) is one TCP connection. It decodes frames with
  :class:`fsha.wire.esl.FrameDecoder`, keeps a FIFO of pending requests (FreeSWITCH answers
  strictly in command order, events are only ever interleaved between whole frames), gives
  every request its own timeout, and hands events to a callback. Without ``hung_timeout``
  a timed-out request *poisons* the connection (it is aborted; every pending request then
  fails with a typed error). With it, a timed-out request fails at its timeout but keeps
  its place in the FIFO, so its late reply is recognised and discarded (a FreeSWITCH busy
  with a long command on this connection answers late, not wrongly); only a request left
  unanswered for ``hung_timeout`` means FreeSWITCH is hung, and aborts the connection.

* :class:`ESLClient` is a :class:`~twisted.application.service.Service` that keeps such a
  connection alive with :class:`~twisted.application.internet.ClientService` (exponential
  backoff with jitter), authenticates, re-applies the event subscriptions and filters on
  every connection, resolves ``bgapi`` jobs through ``BACKGROUND_JOB`` events (always
  subscribed), watches liveness (``HEARTBEAT`` events plus a periodic cheap ``api`` while
  the connection is idle), detects a FreeSWITCH restart by a ``Core-UUID`` change, and
  exposes an observable :class:`ConnectionState` (``is_healthy`` feeds the node's "local
  FreeSWITCH ok" flag).

Requests made while the client is not ready fail at once with :class:`ESLNotConnected`:
the caller decides whether to retry, nothing is queued behind a dead FreeSWITCH.

Why about 750 lines: the client's connection setup, watchdog, requests and
subscriptions share one connection state and are read together; the connection itself
(:class:`ESLProtocol`, its request FIFO and the errors) is :mod:`fsha.eslprotocol`.
"""

from __future__ import annotations

import enum
import random
import re
import uuid
from collections.abc import Callable, Generator, Sequence
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha.eslprotocol import (
    ESLAuthError,
    ESLCommandFailed,
    ESLConnectionLost,
    ESLError,
    ESLNotConnected,
    ESLProtocol,
    ESLTimeout,
    EventCallback,
    RequestObserver,
    _describe,
    _log_failure,
)
from fsha.reactors import NetReactor
from fsha.wire.esl import (
    CT_COMMAND_REPLY,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    ESLCommandError,
    Event,
    Frame,
)

__all__ = [
    "ConnectionState",
    "ESLAuthError",
    "ESLClient",
    "ESLCommandFailed",
    "ESLConnectionLost",
    "ESLError",
    "ESLNotConnected",
    "ESLProtocol",
    "ESLTimeout",
    "EventCallback",
]

log = Logger(namespace="fsha.esl")


class ConnectionState(enum.Enum):
    STOPPED = "stopped"  # service not running
    CONNECTING = "connecting"  # no connection; connecting or waiting to retry
    AUTHENTICATING = "authenticating"  # connected; greeting, auth, subscriptions
    READY = "ready"  # authenticated, subscribed, answering


# FreeSWITCH's Core-UUID is a canonical UUID; anything else (a corrupt event, a header an
# originator set) must not count as a restart, which drops every call's bookkeeping.
_CORE_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


class _ESLFactory(Factory):
    def __init__(self, client: ESLClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> ESLProtocol:
        return self.client._build_protocol()


def _custom_split(names: Sequence[str]) -> tuple[list[str], list[str]]:
    events: list[str] = []
    custom: list[str] = []
    for n in names:
        (custom if "::" in n else events).append(n)
    return events, custom


class ESLClient(Service):
    """A supervised Event Socket connection to one FreeSWITCH (see the module docstring).

    ``events`` / ``subscribe()`` take event names (``CHANNEL_CREATE``, ``HEARTBEAT``,
    ``ALL``) and CUSTOM subclasses (anything containing ``::``, e.g. ``sofia::register``).
    ``BACKGROUND_JOB`` is always subscribed (bgapi results), and ``HEARTBEAT`` too when
    ``heartbeat_timeout`` is set.
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        password: str,
        clock: IReactorTime,
        *,
        events: Sequence[str] = (),
        event_format: str = "plain",
        request_timeout: float = 5.0,
        setup_timeout: float = 5.0,
        bgapi_timeout: float = 120.0,
        ping_interval: float = 2.0,
        ping_timeout: float = 2.0,
        heartbeat_timeout: float | None = 60.0,
        hung_timeout: float | None = None,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        retry_factor: float = 2.0,
        rng: random.Random | None = None,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        ping_command: str = "global_getvar core_uuid",
    ) -> None:
        if event_format not in ("plain", "json"):
            raise ValueError("event_format must be 'plain' or 'json'")
        if "\n" in password or "\r" in password or not password:
            raise ValueError("invalid ESL password")
        self.endpoint = endpoint
        self.clock = clock
        self._password = password
        self.event_format = event_format
        self.request_timeout = request_timeout
        self.setup_timeout = setup_timeout
        self.bgapi_timeout = bgapi_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.hung_timeout = hung_timeout
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes
        self._rng = rng if rng is not None else random.Random()
        base = backoffPolicy(
            initialDelay=retry_initial,
            maxDelay=retry_max,
            factor=retry_factor,
            jitter=lambda: self._rng.random() * retry_initial,
        )
        # A connection that is accepted but fails its setup (bad password, hung
        # FreeSWITCH) counts as a failed attempt too, so it backs off as well.
        self._setup_failures = 0
        self._retry_policy = lambda attempt: base(attempt + self._setup_failures)

        self._events: list[str] = ["BACKGROUND_JOB"]
        if heartbeat_timeout is not None:
            self._events.append("HEARTBEAT")
        for name in events:
            self._add_event_name(name)
        self._filters: list[tuple[str, str]] = []

        self.state = ConnectionState.STOPPED
        self.core_uuid: str | None = None
        self.last_error: str | None = None
        self.connections = 0
        self.restarts = 0
        self.malformed_core_uuids = 0  # Core-UUIDs seen that are not UUIDs (ignored)
        self._proto: ESLProtocol | None = None
        self._service: ClientService | None = None
        self._jobs: dict[str, tuple[Deferred[str], IDelayedCall]] = {}
        self._event_listeners: dict[str | None, list[EventCallback]] = {}
        self._state_listeners: list[Callable[[ConnectionState, ConnectionState], object]] = []
        self._restart_listeners: list[Callable[[str, str], object]] = []
        self._request_listeners: list[RequestObserver] = []
        self._ready_waiters: list[Deferred[None]] = []
        self._watchdog: IDelayedCall | None = None
        self._last_heartbeat = 0.0
        self.late_replies = 0  # answers that came after their request's timeout (busy)
        self.last_ping_seconds: float | None = None  # round trip of the last answered ping
        self.ping_sent_at: float | None = None  # the ping waiting for its answer, if any
        # the api command of the liveness ping; its answer, and when it came, are kept
        # (``last_pong``: fsha.health reads FreeSWITCH's readiness from a ``status`` ping)
        self.ping_command = ping_command
        self.last_pong: tuple[float, str] | None = None

    @classmethod
    def tcp(
        cls,
        reactor: NetReactor,
        host: str,
        port: int,
        password: str,
        *,
        connect_timeout: float = 5.0,
        **kwargs: Any,
    ) -> ESLClient:
        """A client of ``host:port`` over TCP (the usual ``127.0.0.1:8021``), the reactor
        as its clock, and a timeout on every connection attempt."""
        from twisted.internet.endpoints import HostnameEndpoint

        endpoint = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
        return cls(endpoint, password, reactor, **kwargs)

    # -- observation ---------------------------------------------------------------------

    @property
    def is_healthy(self) -> bool:
        """True while the connection is ready and answering (the "local FS ok" flag)."""
        return self.state is ConnectionState.READY

    @property
    def late_reply_count(self) -> int:
        """Answers that came after their request's timeout (with ``hung_timeout``): a busy
        FreeSWITCH, not a hung one."""
        proto = self._proto
        return self.late_replies + (proto.late_replies if proto is not None else 0)

    def ping_waiting(self) -> float | None:
        """How long the current ping has waited for its answer (None: none waiting)."""
        proto = self._proto
        if self.ping_sent_at is None or proto is None or not proto.pending_requests:
            return None  # (a ping that timed out and was answered late since: none)
        return self.clock.seconds() - self.ping_sent_at

    def add_state_listener(
        self, callback: Callable[[ConnectionState, ConnectionState], object]
    ) -> None:
        """``callback(old, new)`` on every state change."""
        self._state_listeners.append(callback)

    def add_restart_listener(self, callback: Callable[[str, str], object]) -> None:
        """``callback(old_core_uuid, new_core_uuid)`` when FreeSWITCH has restarted."""
        self._restart_listeners.append(callback)

    def add_event_listener(self, callback: EventCallback, name: str | None = None) -> None:
        """``callback(event)`` for events named ``name`` (an Event-Name, or a CUSTOM
        subclass such as ``sofia::register``), or for every event if ``name`` is None.
        Subscribing to the event at FreeSWITCH is separate: see :meth:`subscribe`."""
        self._event_listeners.setdefault(name, []).append(callback)

    def remove_event_listener(self, callback: EventCallback, name: str | None = None) -> None:
        callbacks = self._event_listeners.get(name, [])
        if callback in callbacks:
            callbacks.remove(callback)

    def when_ready(self) -> Deferred[None]:
        """Fires (with None) as soon as the client is READY."""
        if self.state is ConnectionState.READY:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready_waiters.append(d)
        return d

    def _set_state(self, new: ConnectionState) -> None:
        old = self.state
        if old is new:
            return
        self.state = new
        log.info("ESL connection {old} -> {new}", old=old.value, new=new.value)
        for cb in list(self._state_listeners):
            try:
                cb(old, new)
            except Exception:
                log.failure("ESL state listener failed")
        if new is ConnectionState.READY:
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                d.callback(None)

    # -- service -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._set_state(ConnectionState.CONNECTING)
        self._service = ClientService(
            self.endpoint, _ESLFactory(self), retryPolicy=self._retry_policy, clock=self.clock
        )
        self._service.startService()
        self._schedule_watchdog()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        service, self._service = self._service, None
        d: Deferred[None] = service.stopService() if service is not None else succeed(None)

        def stopped(result: object) -> None:
            self._set_state(ConnectionState.STOPPED)
            waiters, self._ready_waiters = self._ready_waiters, []
            for w in waiters:
                w.errback(ESLNotConnected("ESL client stopped"))

        d.addCallback(stopped)
        d.addErrback(_log_failure, "stopping the ESL client")
        return d

    def _build_protocol(self) -> ESLProtocol:
        proto = ESLProtocol(self.clock, self._on_event, self._max_header, self._max_body)
        proto.hung_timeout = self.hung_timeout
        proto.on_connected = self._setup
        proto.on_lost = self._on_lost
        proto.on_request = self._on_request
        return proto

    def add_request_listener(self, listener: RequestObserver) -> None:
        """Call ``listener(command, seconds, result)`` for every finished request (see
        :data:`RequestObserver`); used for the request latency metrics."""
        self._request_listeners.append(listener)

    def _on_request(self, command: str, seconds: float, result: str) -> None:
        for listener in self._request_listeners:
            try:
                listener(command, seconds, result)
            except Exception:
                log.failure("request listener failed")

    # -- connection setup ----------------------------------------------------------------

    def _setup(self, proto: ESLProtocol) -> None:
        if not self.running:
            proto.greeting.addErrback(lambda _: None)
            proto.drop("service stopped")
            return
        self._proto = proto
        self.connections += 1
        self._set_state(ConnectionState.AUTHENTICATING)
        timer = self.clock.callLater(self.setup_timeout, self._greeting_timeout, proto)
        self._run_setup(proto, timer).addErrback(_log_failure, "ESL connection setup")

    @inlineCallbacks
    def _run_setup(self, proto: ESLProtocol, timer: IDelayedCall
                   ) -> Generator[Deferred[Any], Any, None]:
        """Greeting, auth, subscriptions and filters, the core's UUID: then READY. Each
        request has ``setup_timeout``; the greeting has its timer. Any failure drops the
        connection (ClientService reconnects)."""
        try:
            yield proto.greeting
            if timer.active():
                timer.cancel()
            auth: Frame = yield proto.request("auth " + self._password,
                                              timeout=self.setup_timeout)
            if not auth.reply_text.startswith("+OK"):
                raise ESLAuthError(f"authentication refused: {auth.reply_text}")
            sent_events = list(self._events)
            sent_filters = self._effective_filters()
            _check_reply((yield proto.request(self._event_command(),
                                              timeout=self.setup_timeout)), "event")
            for header, value in sent_filters:
                _check_reply((yield proto.request(f"filter {header} {value}",
                                                  timeout=self.setup_timeout)), "filter")
            core: Frame = yield proto.request("api global_getvar core_uuid",
                                              timeout=self.setup_timeout)
            if not proto.connected_ok:
                raise ESLConnectionLost("connection lost during setup")
            self._note_core_uuid(core.body.decode("utf-8", "replace").strip())
            self._setup_failures = 0
            self.last_error = None
            self._last_heartbeat = self.clock.seconds()
            self._set_state(ConnectionState.READY)
            self._catch_up(sent_events, sent_filters)
        except Exception:
            failure = Failure()
            if timer.active():
                timer.cancel()
            self._setup_failures += 1
            error = failure.value
            if isinstance(error, ESLError):
                self.last_error = str(error)
                log.warn("ESL connection setup failed: {error}", error=str(error))
            else:
                self.last_error = repr(error)
                log.failure("ESL connection setup failed", failure=failure)
            proto.drop(f"setup failed: {self.last_error}")

    def _catch_up(self, events: list[str], filters: list[tuple[str, str]]) -> None:
        """Apply what subscribe()/add_filter() recorded while the setup was in flight."""
        new_events = [e for e in self._events if e not in events]
        new_filters = [f for f in self._effective_filters() if f not in filters]
        if not new_events and not new_filters:
            return
        d: Deferred[Any] = succeed(None)
        if new_events:
            words = ["event", self.event_format, *_custom_split(new_events)[0]]
            custom = _custom_split(new_events)[1]
            if custom:
                words += ["CUSTOM", *custom]
            d.addCallback(lambda _: self._checked(" ".join(words)))
        for h, v in new_filters:
            d.addCallback(lambda _, h=h, v=v: self._checked(f"filter {h} {v}"))
        d.addErrback(self._catch_up_failed)

    def _catch_up_failed(self, failure: Failure) -> None:
        if failure.check(ESLError):
            log.warn("Could not apply a late subscription: {error}", error=str(failure.value))
        else:
            log.failure("Applying a late subscription failed", failure=failure)

    def _greeting_timeout(self, proto: ESLProtocol) -> None:
        if not proto.greeting.called:
            proto.greeting.errback(
                ESLTimeout(f"no auth/request greeting in {self.setup_timeout:g} s")
            )

    def _event_command(self) -> str:
        events, custom = _custom_split(self._events)
        words = ["event", self.event_format, *events]
        if custom:
            words.append("CUSTOM")
            words.extend(custom)
        return " ".join(words)

    def _effective_filters(self) -> list[tuple[str, str]]:
        if not self._filters:
            return []
        # A positive filter hides everything it does not match, including the events
        # this client depends on itself.
        own = [("Event-Name", "BACKGROUND_JOB")]
        if self.heartbeat_timeout is not None:
            own.append(("Event-Name", "HEARTBEAT"))
        return [*own, *[f for f in self._filters if f not in own]]

    def _on_lost(self, proto: ESLProtocol, reason: Failure) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        why = proto.closing_reason or reason.getErrorMessage()
        self.late_replies += proto.late_replies
        self.ping_sent_at = None
        self.last_pong = None  # an answer of a lost connection says nothing of now
        if self.last_error is None or self.state is ConnectionState.READY:
            self.last_error = f"connection lost: {why}"
        jobs, self._jobs = self._jobs, {}
        for job_uuid, (d, timer) in jobs.items():
            if timer.active():
                timer.cancel()
            if not d.called:
                d.errback(ESLConnectionLost(f"bgapi job {job_uuid}: connection lost ({why})"))
        if self.running:
            self._set_state(ConnectionState.CONNECTING)

    def _note_core_uuid(self, value: str | None) -> None:
        if not value or value.startswith("-ERR"):
            return
        old = self.core_uuid
        if old == value:
            return
        if _CORE_UUID.fullmatch(value) is None:
            self.malformed_core_uuids += 1
            log.warn("ignored a Core-UUID that is not a UUID: {value!r} ({count} so far)",
                     value=value[:80], count=self.malformed_core_uuids)
            return
        self.core_uuid = value
        if old is None:
            log.info("FreeSWITCH Core-UUID is {uuid}", uuid=value)
            return
        self.restarts += 1
        log.warn("FreeSWITCH restarted: Core-UUID {old} -> {new}", old=old, new=value)
        for cb in list(self._restart_listeners):
            try:
                cb(old, value)
            except Exception:
                log.failure("ESL restart listener failed")

    # -- events --------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        name = event.name
        core = event.headers.get("Core-UUID")
        if core is not None and core != self.core_uuid:
            self._note_core_uuid(core)
        if name == "BACKGROUND_JOB":
            self._job_done(event)
        elif name == "HEARTBEAT":
            self._last_heartbeat = self.clock.seconds()
        listeners = self._event_listeners
        if not listeners:
            return
        if name == "CUSTOM":
            for cb in listeners.get(event.subclass, ()):
                _call_listener(cb, event)
        for cb in listeners.get(name, ()):
            _call_listener(cb, event)
        for cb in listeners.get(None, ()):
            _call_listener(cb, event)

    def _job_done(self, event: Event) -> None:
        job_uuid = event.headers.get("Job-UUID")
        if job_uuid is None:
            return
        entry = self._jobs.pop(job_uuid, None)
        if entry is None:
            return
        d, timer = entry
        if timer.active():
            timer.cancel()
        d.callback(event.body.decode("utf-8", "surrogateescape"))

    # -- watchdog ------------------------------------------------------------------------

    def _schedule_watchdog(self) -> None:
        if self.ping_interval > 0 and self.running:
            self._watchdog = self.clock.callLater(self.ping_interval, self._watchdog_tick)

    def _watchdog_tick(self) -> None:
        self._watchdog = None
        try:
            self._check_liveness()
        finally:
            self._schedule_watchdog()

    def _check_liveness(self) -> None:
        proto = self._proto
        if proto is None or self.state is not ConnectionState.READY:
            return
        now = self.clock.seconds()
        if (
            self.heartbeat_timeout is not None
            and now - self._last_heartbeat > self.heartbeat_timeout
        ):
            self.last_error = f"no HEARTBEAT event for {now - self._last_heartbeat:.1f} s"
            proto.drop(self.last_error)
            return
        if proto.pending_requests:
            return  # the oldest request's own timeout (and hung_timeout) covers liveness
        # nothing pending: a ping that timed out was answered late since (discarded)
        self.ping_sent_at = sent = now
        d = proto.request(f"api {self.ping_command}", timeout=self.ping_timeout)

        def pong(frame: Frame) -> None:
            self.ping_sent_at = None
            answered = self.clock.seconds()
            self.last_ping_seconds = answered - sent
            body = frame.body.decode("utf-8", "replace")
            self.last_pong = (answered, body)
            if self.ping_command == "global_getvar core_uuid":
                self._note_core_uuid(body.strip())

        def lost(failure: Failure) -> None:
            failure.trap(ESLError)
            if failure.check(ESLTimeout):
                self.last_error = f"FreeSWITCH did not answer a ping in {self.ping_timeout:g} s"
            else:
                self.ping_sent_at = None

        d.addCallbacks(pong, lost)
        d.addErrback(_log_failure, "ESL ping")

    # -- requests ------------------------------------------------------------------------

    def _ready_proto(self, what: str) -> ESLProtocol:
        proto = self._proto
        if proto is None or not proto.connected_ok or self.state is not ConnectionState.READY:
            raise ESLNotConnected(f"{what}: no ready connection to FreeSWITCH")
        return proto

    def command(
        self,
        line: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout: float | None = None,
    ) -> Deferred[Frame]:
        """Send any command; the Deferred fires with the raw reply frame."""
        try:
            proto = self._ready_proto(_describe(line))
        except ESLNotConnected as e:
            return fail(e)
        wait = self.request_timeout if timeout is None else timeout
        return proto.request(line, headers, body, wait)

    def _checked(
        self,
        line: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout: float | None = None,
    ) -> Deferred[str]:
        return self.command(line, headers, body, timeout).addCallback(_check_reply, line)

    def api(self, command: str, timeout: float | None = None) -> Deferred[str]:
        """``api COMMAND``: the output text. ``-ERR ...`` outputs are returned, not raised
        (many commands answer errors without ``-ERR``; :mod:`fsha.fsapi` parses them)."""
        return self.command("api " + command, timeout=timeout).addCallback(_body_text)

    def bgapi(
        self, command: str, timeout: float | None = None, job_uuid: str | None = None
    ) -> Deferred[str]:
        """``bgapi COMMAND`` with a client-chosen Job-UUID; fires with the job's output
        (the body of its ``BACKGROUND_JOB`` event). The job timeout does not drop the
        connection (no request is left in the FIFO)."""
        job = job_uuid or str(uuid.uuid4())
        if job in self._jobs:
            return fail(ValueError(f"job {job} is already pending"))
        try:
            self._ready_proto("bgapi " + command)
        except ESLNotConnected as e:
            return fail(e)
        wait = self.bgapi_timeout if timeout is None else timeout
        result: Deferred[str] = Deferred()
        timer = self.clock.callLater(wait, self._job_timed_out, job, command, wait)
        self._jobs[job] = (result, timer)

        def accepted(reply: str) -> None:
            # "+OK Job-UUID: U": nothing more to do, the event will resolve the job.
            if job not in reply:
                log.warn("bgapi reply {reply!r} does not name job {job}", reply=reply, job=job)

        def refused(failure: Failure) -> None:
            entry = self._jobs.pop(job, None)
            if entry is not None:
                if entry[1].active():
                    entry[1].cancel()
                if not entry[0].called:
                    entry[0].errback(failure)

        d = self._checked("bgapi " + command, [("Job-UUID", job)])
        d.addCallbacks(accepted, refused)
        d.addErrback(_log_failure, "bgapi")
        return result

    def _job_timed_out(self, job: str, command: str, wait: float) -> None:
        entry = self._jobs.pop(job, None)
        if entry is not None and not entry[0].called:
            entry[0].errback(ESLTimeout(f"bgapi {command!r} job {job}: no result in {wait:g} s"))

    def sendmsg(
        self,
        call_uuid: str,
        headers: Sequence[tuple[str, str]],
        body: bytes = b"",
        timeout: float | None = None,
    ) -> Deferred[str]:
        """``sendmsg UUID`` with ``call-command`` headers; fires with the Reply-Text."""
        return self._checked("sendmsg " + call_uuid, headers, body, timeout)

    def execute(
        self, call_uuid: str, app: str, arg: str = "", timeout: float | None = None
    ) -> Deferred[str]:
        """Run a dialplan application on a call (sendmsg call-command: execute).
        A multi-line argument is sent as the body, never inside a header."""
        headers = [("call-command", "execute"), ("execute-app-name", app)]
        body = b""
        if "\n" in arg or "\r" in arg:
            headers.append(("content-type", "text/plain"))
            body = arg.encode("utf-8")
        elif arg:
            headers.append(("execute-app-arg", arg))
        return self.sendmsg(call_uuid, headers, body, timeout)

    def sendevent(
        self,
        name: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout: float | None = None,
    ) -> Deferred[str]:
        """``sendevent NAME``: fires with the new event's UUID (from ``+OK <uuid>``)."""
        d = self._checked("sendevent " + name, headers, body, timeout)
        return d.addCallback(lambda reply: reply[3:].strip())

    def linger(self, seconds: int | None = None, timeout: float | None = None) -> Deferred[str]:
        line = "linger" if seconds is None else f"linger {int(seconds)}"
        return self._checked(line, timeout=timeout)

    def nolinger(self, timeout: float | None = None) -> Deferred[str]:
        return self._checked("nolinger", timeout=timeout)

    # -- subscriptions -------------------------------------------------------------------

    def _add_event_name(self, name: str) -> bool:
        if not name or any(c.isspace() for c in name):
            raise ESLCommandError(f"invalid event name {name!r}")
        if name in self._events:
            return False
        self._events.append(name)
        return True

    def subscribe(self, *names: str) -> Deferred[None]:
        """Add events to the subscription (kept for every future connection too)."""
        new = [n for n in names if self._add_event_name(n)]
        proto = self._proto
        if not new or proto is None or self.state is not ConnectionState.READY:
            return succeed(None)
        events, custom = _custom_split(new)
        words = ["event", self.event_format, *events]
        if custom:
            words += ["CUSTOM", *custom]
        return self._checked(" ".join(words)).addCallback(lambda _: None)

    def add_filter(self, header: str, value: str) -> Deferred[None]:
        """``filter HEADER VALUE`` now and on every future connection."""
        if any(c.isspace() for c in header) or not header:
            return fail(ESLCommandError(f"invalid filter header {header!r}"))
        if (header, value) in self._filters:
            return succeed(None)
        before = self._effective_filters()
        self._filters.append((header, value))
        if self.state is not ConnectionState.READY:
            return succeed(None)
        todo = [f for f in self._effective_filters() if f not in before]
        d: Deferred[Any] = succeed(None)
        for h, v in todo:
            d.addCallback(lambda _, h=h, v=v: self._checked(f"filter {h} {v}"))
        return d.addCallback(lambda _: None)

    def remove_filter(self, header: str, value: str) -> Deferred[None]:
        """``filter delete HEADER VALUE`` now, and forget it for future connections."""
        if (header, value) not in self._filters:
            return succeed(None)
        self._filters.remove((header, value))
        if self.state is not ConnectionState.READY:
            return succeed(None)
        return self._checked(f"filter delete {header} {value}").addCallback(lambda _: None)

    @property
    def subscriptions(self) -> list[str]:
        return list(self._events)

    @property
    def filters(self) -> list[tuple[str, str]]:
        return list(self._filters)


def _call_listener(cb: EventCallback, event: Event) -> None:
    try:
        cb(event)
    except Exception:
        log.failure("ESL event listener failed on {name}", name=event.name)


def _check_reply(frame: Frame, line: str) -> str:
    reply = frame.reply_text
    if reply.startswith("-ERR") or (frame.content_type == CT_COMMAND_REPLY and not reply):
        raise ESLCommandFailed(_describe(line), reply)
    return reply


def _body_text(frame: Frame) -> str:
    return frame.body.decode("utf-8", "surrogateescape")
