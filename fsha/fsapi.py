"""The small typed layer the rest of fsha uses to talk to its FreeSWITCH.

* Typed events: :class:`ChannelEvent` (create, answer, bridge, unbridge, hangup,
  hangup-complete), :class:`RegistrationEvent` (``sofia::register``, ``sofia::unregister``,
  ``sofia::expire``) and :class:`HeartbeatEvent`, built by :func:`parse_event` from a
  decoded :class:`fsha.wire.esl.Event`; :class:`EventRouter` subscribes an
  :class:`fsha.eslclient.ESLClient` to them and calls typed callbacks.
* API calls of the facts sheet (section 3) with their real outputs parsed: :class:`FSApi`.
  Outputs are parsed by pure functions (``parse_*``) so they are tested without a socket.
  Several sofia commands report errors without ``-ERR`` (``Invalid Profile [P]``); they
  are turned into typed exceptions here, never silently taken as success.

Why about 600 lines: one typed event parser and one output parser per API command
of the facts sheet.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred

from fsha.wire.esl import Event

__all__ = [
    "ApiRunner",
    "ChannelEvent",
    "ChannelEventKind",
    "EventRouter",
    "FSApi",
    "FSApiError",
    "HeartbeatEvent",
    "ProfileNotFound",
    "ProfileTooYoung",
    "RegistrationEvent",
    "RegistrationKind",
    "SofiaStatusEntry",
    "Status",
    "parse_event",
    "parse_fsctl_recover",
    "parse_hash_delete",
    "parse_hash_select",
    "parse_ok",
    "parse_profile_command",
    "parse_profile_recover",
    "parse_sofia_recover",
    "parse_sofia_status",
    "parse_status",
    "parse_uuid_exists",
    "parse_var",
]


# ---------------------------------------------------------------------------------------
# Errors


class FSApiError(Exception):
    """A FreeSWITCH API command answered with an error or an output we do not recognise."""

    def __init__(self, command: str, output: str, message: str | None = None) -> None:
        super().__init__(message or f"{command!r}: {output.strip()[:300]!r}")
        self.command = command
        self.output = output


class ProfileNotFound(FSApiError):
    """``Invalid Profile [P]``: no such sofia profile (note: no ``-ERR`` in the output)."""


class ProfileTooYoung(FSApiError):
    """A profile stop/restart refused because it started less than 10 seconds ago."""


# ---------------------------------------------------------------------------------------
# Typed events


class ChannelEventKind(enum.Enum):
    CREATE = "CHANNEL_CREATE"
    ANSWER = "CHANNEL_ANSWER"
    BRIDGE = "CHANNEL_BRIDGE"
    UNBRIDGE = "CHANNEL_UNBRIDGE"
    HANGUP = "CHANNEL_HANGUP"
    HANGUP_COMPLETE = "CHANNEL_HANGUP_COMPLETE"


_CHANNEL_KINDS = {k.value: k for k in ChannelEventKind}


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ChannelEvent:
    kind: ChannelEventKind
    uuid: str
    core_uuid: str | None
    direction: str | None
    channel_name: str | None
    caller_id_name: str | None
    caller_id_number: str | None
    destination_number: str | None
    profile: str | None  # sofia profile (recovery profile name if set)
    other_leg_uuid: str | None  # bridge partner (BRIDGE / UNBRIDGE)
    hangup_cause: str | None
    timestamp_us: int | None  # Event-Date-Timestamp, microseconds since the epoch
    event: Event


class RegistrationKind(enum.Enum):
    REGISTER = "sofia::register"
    UNREGISTER = "sofia::unregister"
    EXPIRE = "sofia::expire"


_REG_KINDS = {k.value: k for k in RegistrationKind}


@dataclass(frozen=True, slots=True)
class RegistrationEvent:
    kind: RegistrationKind
    profile: str | None
    user: str | None
    host: str | None
    contact: str | None
    call_id: str | None
    expires: int | None
    network_ip: str | None
    network_port: int | None
    user_agent: str | None
    username: str | None
    realm: str | None
    refresh: bool  # update-reg: true (a re-REGISTER of a known binding)
    event: Event


@dataclass(frozen=True, slots=True)
class HeartbeatEvent:
    core_uuid: str | None
    uptime_msec: int | None
    session_count: int | None
    max_sessions: int | None
    idle_cpu: float | None
    event: Event


TypedEvent = ChannelEvent | RegistrationEvent | HeartbeatEvent


def parse_event(event: Event) -> TypedEvent | None:
    """The typed form of a channel, registration or HEARTBEAT event; None for others
    (and for a channel event without Unique-ID, which cannot be tracked)."""
    name = event.name
    h = event.headers
    kind = _CHANNEL_KINDS.get(name)
    if kind is not None:
        uuid = h.get("Unique-ID")
        if not uuid:
            return None
        other = h.get("Other-Leg-Unique-ID") or h.get("Bridge-B-Unique-ID")
        if other == uuid:
            other = h.get("Bridge-A-Unique-ID")
        return ChannelEvent(
            kind=kind,
            uuid=uuid,
            core_uuid=h.get("Core-UUID"),
            direction=h.get("Call-Direction"),
            channel_name=h.get("Channel-Name"),
            caller_id_name=h.get("Caller-Caller-ID-Name"),
            caller_id_number=h.get("Caller-Caller-ID-Number"),
            destination_number=h.get("Caller-Destination-Number"),
            profile=h.get("variable_recovery_profile_name") or h.get("variable_sofia_profile_name"),
            other_leg_uuid=other,
            hangup_cause=h.get("Hangup-Cause"),
            timestamp_us=_int(h.get("Event-Date-Timestamp")),
            event=event,
        )
    if name == "CUSTOM":
        reg = _REG_KINDS.get(event.subclass or "")
        if reg is None:
            return None
        if reg is RegistrationKind.EXPIRE:
            user, host = h.get("user"), h.get("host")
        else:
            user = h.get("from-user") or h.get("to-user") or h.get("username")
            host = h.get("from-host") or h.get("to-host") or h.get("realm")
        return RegistrationEvent(
            kind=reg,
            profile=h.get("profile-name"),
            user=user,
            host=host,
            contact=h.get("contact"),
            call_id=h.get("call-id"),
            expires=_int(h.get("expires")),
            network_ip=h.get("network-ip"),
            network_port=_int(h.get("network-port")),
            user_agent=h.get("user-agent"),
            username=h.get("username"),
            realm=h.get("realm"),
            refresh=(h.get("update-reg") or "").lower() == "true",
            event=event,
        )
    if name == "HEARTBEAT":
        return HeartbeatEvent(
            core_uuid=h.get("Core-UUID"),
            uptime_msec=_int(h.get("Uptime-msec")),
            session_count=_int(h.get("Session-Count")),
            max_sessions=_int(h.get("Max-Sessions")),
            idle_cpu=_float(h.get("Idle-CPU")),
            event=event,
        )
    return None


class _EventSource(Protocol):
    def add_event_listener(
        self, callback: Callable[[Event], object], name: str | None = None
    ) -> None: ...

    def subscribe(self, *names: str) -> Deferred[None]: ...


class EventRouter:
    """Subscribe a client to the typed events and call typed callbacks.

    ``on_channel(ChannelEvent)``, ``on_registration(RegistrationEvent)``,
    ``on_heartbeat(HeartbeatEvent)``; any may be None (then that family is not subscribed).
    """

    def __init__(
        self,
        client: _EventSource,
        on_channel: Callable[[ChannelEvent], object] | None = None,
        on_registration: Callable[[RegistrationEvent], object] | None = None,
        on_heartbeat: Callable[[HeartbeatEvent], object] | None = None,
    ) -> None:
        self._on_channel = on_channel
        self._on_registration = on_registration
        self._on_heartbeat = on_heartbeat
        names: list[str] = []
        if on_channel is not None:
            names += [k.value for k in ChannelEventKind]
        if on_registration is not None:
            names += [k.value for k in RegistrationKind]
        if on_heartbeat is not None:
            names.append("HEARTBEAT")
        for name in names:
            client.add_event_listener(self._dispatch, name)
        self.subscribed: Deferred[None] = client.subscribe(*names)

    def _dispatch(self, event: Event) -> None:
        typed = parse_event(event)
        if isinstance(typed, ChannelEvent):
            if self._on_channel is not None:
                self._on_channel(typed)
        elif isinstance(typed, RegistrationEvent):
            if self._on_registration is not None:
                self._on_registration(typed)
        elif isinstance(typed, HeartbeatEvent) and self._on_heartbeat is not None:
            self._on_heartbeat(typed)


# ---------------------------------------------------------------------------------------
# API output parsers (pure)

_NO_REPLY = "-ERR no reply"


def _is_err(output: str) -> bool:
    return output.lstrip().startswith("-ERR")


def parse_ok(command: str, output: str) -> str:
    """Outputs that must start with ``+OK`` (hash insert, reloadxml, ...)."""
    if not output.lstrip().startswith("+OK"):
        raise FSApiError(command, output)
    return output.strip()


def parse_var(command: str, output: str) -> str | None:
    """``global_getvar``/``hash select``: the value, or None when unset (``-ERR no reply``)."""
    text = output.rstrip("\n")
    if text.strip() == _NO_REPLY or text == "":
        return None
    if _is_err(text):
        raise FSApiError(command, output)
    return text


parse_hash_select = parse_var


def parse_hash_delete(command: str, output: str) -> bool:
    """True if deleted, False if there was no such key (``-ERR Not found``)."""
    text = output.strip()
    if text.startswith("+OK"):
        return True
    if text == "-ERR Not found":
        return False
    raise FSApiError(command, output)


def parse_uuid_exists(command: str, output: str) -> bool:
    text = output.strip()
    if text == "true":
        return True
    if text == "false":
        return False
    raise FSApiError(command, output)


_INVALID_PROFILE = re.compile(r"^Invalid Profile \[(.*)\]\s*$", re.M)
# FreeSWITCH says "10 seconds"; the number is matched, not assumed.
_TOO_YOUNG = re.compile(r"must be up for at least \d+ seconds")


def _check_profile(command: str, output: str) -> None:
    if _INVALID_PROFILE.search(output):
        raise ProfileNotFound(command, output)
    if _TOO_YOUNG.search(output):
        raise ProfileTooYoung(command, output)
    if _is_err(output):
        raise FSApiError(command, output)


def parse_profile_command(command: str, output: str, profile: str, action: str) -> str:
    """``sofia profile P start|stop|restart`` → the output, or a typed error.

    ``start`` answers ``Reload XML [Success]`` then ``P started successfully`` (also when
    it already runs: it does not prove the port is bound); ``stop`` / ``restart`` answer
    ``stopping: P`` / ``restarting: P``.
    """
    _check_profile(command, output)
    if action == "start":
        ok = f"{profile} started successfully" in output
    elif action == "stop":
        ok = f"stopping: {profile}" in output
    elif action == "restart":
        ok = f"restarting: {profile}" in output
    else:
        raise ValueError(f"unknown profile action {action!r}")
    if not ok:
        raise FSApiError(command, output)
    return output


_RECOVERED_SESSIONS = re.compile(r"Recovered (\d+) session\(s\)")
_RECOVERED_CALLS = re.compile(r"Recovered (\d+) call\(s\)")
_FSCTL_RECOVERED = re.compile(r"^\+OK (\d+) session\(s\) recovered in total")


def parse_profile_recover(command: str, output: str) -> int:
    """``sofia profile P recover`` → number of sessions recovered."""
    _check_profile(command, output)
    m = _RECOVERED_SESSIONS.search(output)
    if m:
        return int(m.group(1))
    if "No sessions to recover." in output:
        return 0
    raise FSApiError(command, output)


def parse_sofia_recover(command: str, output: str) -> int:
    """``sofia recover`` → number of calls recovered."""
    m = _RECOVERED_CALLS.search(output)
    if m:
        return int(m.group(1))
    if "No calls to recover." in output:
        return 0
    raise FSApiError(command, output)


def parse_fsctl_recover(command: str, output: str) -> int:
    m = _FSCTL_RECOVERED.match(output.lstrip())
    if m:
        return int(m.group(1))
    raise FSApiError(command, output)


@dataclass(frozen=True, slots=True)
class Status:
    up: bool
    uptime_seconds: float | None
    version: str | None
    ready: bool
    sessions: int | None  # current sessions
    sessions_since_startup: int | None
    max_sessions: int | None
    raw: str


_UPTIME_UNITS = {
    "year": 365 * 86400.0,
    "day": 86400.0,
    "hour": 3600.0,
    "minute": 60.0,
    "second": 1.0,
    "millisecond": 1e-3,
    "microsecond": 1e-6,
}
_UPTIME_PART = re.compile(r"(\d+) (year|day|hour|minute|second|millisecond|microsecond)s?\b")
_VERSION = re.compile(r"^FreeSWITCH \(Version (.*)\) is (ready|not ready)\s*$", re.M)
_SINCE = re.compile(r"^(\d+) session\(s\) since startup", re.M)
_CURRENT = re.compile(r"^(\d+) session\(s\) - peak", re.M)
_MAX = re.compile(r"^(\d+) session\(s\) max", re.M)


def parse_status(command: str, output: str) -> Status:
    """``status``: ``UP 0 years, 0 days, ...`` then ``FreeSWITCH (Version X) is ready``."""
    if _is_err(output) or not output.strip():
        raise FSApiError(command, output)
    first = output.lstrip().split("\n", 1)[0]
    up = first.startswith("UP ")
    uptime: float | None = None
    if up:
        parts = _UPTIME_PART.findall(first)
        if parts:
            uptime = sum(int(n) * _UPTIME_UNITS[unit] for n, unit in parts)
    v = _VERSION.search(output)
    if not up and v is None:
        raise FSApiError(command, output, f"unrecognised status output {first[:80]!r}")

    def grab(rx: re.Pattern[str]) -> int | None:
        m = rx.search(output)
        return int(m.group(1)) if m else None

    return Status(
        up=up,
        uptime_seconds=uptime,
        version=v.group(1) if v else None,
        ready=bool(v and v.group(2) == "ready"),
        sessions=grab(_CURRENT),
        sessions_since_startup=grab(_SINCE),
        max_sessions=grab(_MAX),
        raw=output,
    )


@dataclass(frozen=True, slots=True)
class SofiaStatusEntry:
    """One line of ``sofia status``: a profile, alias or gateway."""

    name: str
    type: str  # "profile", "alias", "gateway"
    data: str  # the profile's SIP URL, the aliased profile, the gateway's registrar
    state: str  # "RUNNING (3)", "RUNNING (3) (TLS)", "ALIASED", "NOREG", ...
    sessions: int | None  # the "(N)" of a profile line

    @property
    def running(self) -> bool:
        return self.type == "profile" and self.state.startswith("RUNNING")


_SOFIA_STATE_SESSIONS = re.compile(r"^\w+ \((\d+)\)")


def parse_sofia_status(command: str, output: str) -> list[SofiaStatusEntry]:
    """``sofia status``: one ``NAME\\tTYPE\\t  DATA\\tSTATE`` line per running profile (and
    its TLS line), alias and gateway, between ``====`` rules, then a ``N profiles M aliases``
    total. A profile that failed to bind is not listed at all."""
    if _is_err(output) or "=====" not in output:
        raise FSApiError(command, output)
    entries: list[SofiaStatusEntry] = []
    for line in output.split("\n"):
        parts = line.split("\t")
        if len(parts) < 4 or parts[0].strip() == "Name":
            continue
        name, kind, data = parts[0].strip(), parts[1].strip(), parts[2].strip()
        state = "\t".join(parts[3:]).strip()
        m = _SOFIA_STATE_SESSIONS.match(state)
        entries.append(SofiaStatusEntry(name, kind, data, state,
                                        int(m.group(1)) if m else None))
    return entries


# ---------------------------------------------------------------------------------------
# API calls


class ApiRunner(Protocol):
    """What :class:`FSApi` needs: :class:`fsha.eslclient.ESLClient` provides it."""

    def api(self, command: str, timeout: float | None = None) -> Deferred[str]: ...

    def bgapi(
        self, command: str, timeout: float | None = None, job_uuid: str | None = None
    ) -> Deferred[str]: ...


_TOKEN = re.compile(r"^[^\s/]+$")


def _token(value: str, what: str) -> str:
    """One command argument: no whitespace (it would split), no '/' (hash separators)."""
    if not _TOKEN.match(value):
        raise ValueError(f"invalid {what} {value!r}")
    return value


class FSApi:
    """FreeSWITCH API calls with parsed results (Deferreds)."""

    def __init__(self, runner: ApiRunner, timeout: float | None = None) -> None:
        self.runner = runner
        self.timeout = timeout

    def _call(
        self, command: str, parse: Callable[[str, str], object], timeout: float | None = None
    ) -> Deferred:  # type: ignore[type-arg]
        d = self.runner.api(command, timeout=self.timeout if timeout is None else timeout)
        return d.addCallback(lambda out: parse(command, out))

    def status(self) -> Deferred[Status]:
        return self._call("status", parse_status)

    def global_getvar(self, name: str) -> Deferred[str | None]:
        return self._call("global_getvar " + _token(name, "variable name"), parse_var)

    def core_uuid(self) -> Deferred[str]:
        def need(command: str, output: str) -> str:
            value = parse_var(command, output)
            if value is None:
                raise FSApiError(command, output, "core_uuid is not set")
            return value.strip()

        return self._call("global_getvar core_uuid", need)

    def sofia_profile(self, profile: str, action: str) -> Deferred[str]:
        """``sofia profile P start|stop|restart``."""
        if action not in ("start", "stop", "restart"):
            raise ValueError(f"unknown profile action {action!r}")
        p = _token(profile, "profile name")
        return self._call(
            f"sofia profile {p} {action}",
            lambda c, o: parse_profile_command(c, o, p, action),
        )

    def sofia_profile_recover(self, profile: str, timeout: float | None = None) -> Deferred[int]:
        p = _token(profile, "profile name")
        return self._call(f"sofia profile {p} recover", parse_profile_recover, timeout)

    def sofia_status(self, timeout: float | None = None) -> Deferred[list[SofiaStatusEntry]]:
        return self._call("sofia status", parse_sofia_status, timeout)

    def sofia_recover(self, timeout: float | None = None) -> Deferred[int]:
        """Unscoped ``sofia recover``: on a shared core DB it steals every node's calls
        (facts sheet section 4); fsha uses :meth:`sofia_profile_recover`."""
        return self._call("sofia recover", parse_sofia_recover, timeout)

    def fsctl_recover(self, timeout: float | None = None) -> Deferred[int]:
        return self._call("fsctl recover", parse_fsctl_recover, timeout)

    def sofia_global_standby(self, on: bool) -> Deferred[str]:
        """``sofia global standby on|off`` (new out-of-dialog requests get 503)."""

        def check(command: str, output: str) -> str:
            if _is_err(output):
                raise FSApiError(command, output)
            return output.strip()

        return self._call("sofia global standby " + ("on" if on else "off"), check)

    def hupall(self, cause: str, variable: str, value: str) -> Deferred[str]:
        """``hupall CAUSE VAR VALUE``: hang up every channel whose VAR is VALUE (e.g. the
        calls of one profile, ``sofia_profile_name P``) without touching the profile."""
        c, v, x = (_token(cause, "hangup cause"), _token(variable, "variable"),
                   _token(value, "value"))

        def check(command: str, output: str) -> str:
            if _is_err(output):
                raise FSApiError(command, output)
            return output.strip()

        return self._call(f"hupall {c} {v} {x}", check)

    def hash_insert(self, realm: str, key: str, value: str) -> Deferred[str]:
        r, k = _token(realm, "hash realm"), _token(key, "hash key")
        if "\n" in value or "\r" in value:
            raise ValueError("hash value with CR/LF")
        return self._call(f"hash insert/{r}/{k}/{value}", parse_ok)

    def hash_select(self, realm: str, key: str) -> Deferred[str | None]:
        r, k = _token(realm, "hash realm"), _token(key, "hash key")
        return self._call(f"hash select/{r}/{k}", parse_hash_select)

    def hash_delete(self, realm: str, key: str) -> Deferred[bool]:
        r, k = _token(realm, "hash realm"), _token(key, "hash key")
        return self._call(f"hash delete/{r}/{k}", parse_hash_delete)

    def reloadxml(self) -> Deferred[str]:
        return self._call("reloadxml", parse_ok)

    def uuid_exists(self, call_uuid: str) -> Deferred[bool]:
        return self._call("uuid_exists " + _token(call_uuid, "uuid"), parse_uuid_exists)
