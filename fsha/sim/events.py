"""FreeSWITCH-shaped events, as the simulator fires them (no I/O).

An event is a name, an optional CUSTOM subclass, an ordered list of headers (duplicates
allowed, as on ``CHANNEL_HANGUP_COMPLETE``) and an optional body. The core headers are the
ones FreeSWITCH stamps on every event in ``switch_event_prep_for_delivery``; CUSTOM events
start with ``Event-Subclass``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from fsha.sim.calls import Channel

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class IClock(Protocol):
    """The part of ``IReactorTime`` the simulator's logic uses."""

    def seconds(self) -> float: ...


@dataclass(slots=True)
class SimEvent:
    """One event: ``headers`` in wire order, ``body`` raw bytes (``b""`` if none).

    ``cache`` holds encoded forms (per format) so that N subscribers encode once.
    """

    name: str
    subclass: str | None
    headers: list[tuple[str, str]]
    body: bytes = b""
    cache: dict[str, bytes] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def getall(self, name: str) -> list[str]:
        lname = name.lower()
        return [value for key, value in self.headers if key.lower() == lname]


def format_date_local(epoch: float) -> str:
    """``Event-Date-Local``: ``YYYY-MM-DD HH:MM:SS`` in local time."""
    t = time.localtime(epoch)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    )


def format_date_gmt(epoch: float) -> str:
    """``Event-Date-GMT``: RFC 1123 style, ``Mon, 02 Jan 2006 15:04:05 GMT`` (C locale)."""
    t = time.gmtime(epoch)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def usec(epoch: float | None) -> str:
    """FreeSWITCH time stamps: microseconds since the epoch as a decimal string, 0 if unset."""
    if epoch is None:
        return "0"
    return str(int(epoch * 1_000_000))


class EventFactory:
    """Stamps core headers: identity of this switch run, date, calling site, sequence."""

    def __init__(
        self,
        clock: IClock,
        *,
        core_uuid: str,
        hostname: str,
        switchname: str,
        ipv4: str,
        ipv6: str = "::1",
    ) -> None:
        self.clock = clock
        self.core_uuid = core_uuid
        self.hostname = hostname
        self.switchname = switchname
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.sequence = 0

    def core_headers(
        self,
        name: str,
        calling: tuple[str, str, int],
        subclass: str | None = None,
    ) -> list[tuple[str, str]]:
        self.sequence += 1
        now = self.clock.seconds()
        headers: list[tuple[str, str]] = []
        if subclass is not None:
            headers.append(("Event-Subclass", subclass))
        headers += [
            ("Event-Name", name),
            ("Core-UUID", self.core_uuid),
            ("FreeSWITCH-Hostname", self.hostname),
            ("FreeSWITCH-Switchname", self.switchname),
            ("FreeSWITCH-IPv4", self.ipv4),
            ("FreeSWITCH-IPv6", self.ipv6),
            ("Event-Date-Local", format_date_local(now)),
            ("Event-Date-GMT", format_date_gmt(now)),
            ("Event-Date-Timestamp", usec(now)),
            ("Event-Calling-File", calling[0]),
            ("Event-Calling-Function", calling[1]),
            ("Event-Calling-Line-Number", str(calling[2])),
            ("Event-Sequence", str(self.sequence)),
        ]
        return headers

    def make(
        self,
        name: str,
        calling: tuple[str, str, int],
        extra: Iterable[tuple[str, str]] = (),
        *,
        subclass: str | None = None,
        body: bytes = b"",
    ) -> SimEvent:
        headers = self.core_headers(name, calling, subclass)
        headers.extend(extra)
        return SimEvent(name, subclass, headers, body)

    def custom(
        self,
        subclass: str,
        calling: tuple[str, str, int],
        extra: Iterable[tuple[str, str]] = (),
    ) -> SimEvent:
        return self.make("CUSTOM", calling, extra, subclass=subclass)

    def channel(
        self,
        name: str,
        calling: tuple[str, str, int],
        channel: Channel,
        extra: Iterable[tuple[str, str]] = (),
        other: Channel | None = None,
    ) -> SimEvent:
        """A channel event: core headers, then the channel's own headers, then ``extra``."""
        headers = self.core_headers(name, calling)
        headers.extend(channel.event_headers(other))
        headers.extend(extra)
        return SimEvent(name, None, headers)


# Where FreeSWITCH fires each event from (file, function, line), for Event-Calling-*.
CALLING: dict[str, tuple[str, str, int]] = {
    "CHANNEL_CREATE": ("switch_core_state_machine.c", "switch_core_session_run", 626),
    "CHANNEL_ANSWER": ("switch_channel.c", "switch_channel_perform_mark_answered", 3890),
    "CHANNEL_BRIDGE": ("switch_ivr_bridge.c", "audio_bridge_on_exchange_media", 1190),
    "CHANNEL_UNBRIDGE": ("switch_ivr_bridge.c", "audio_bridge_on_exchange_media", 1260),
    "CHANNEL_HANGUP": ("switch_channel.c", "switch_channel_perform_hangup", 3540),
    "CHANNEL_HANGUP_COMPLETE": (
        "switch_core_state_machine.c",
        "switch_core_session_reporting_state",
        946,
    ),
    "CHANNEL_DESTROY": ("switch_core_session.c", "switch_core_session_perform_destroy", 1741),
    "CHANNEL_EXECUTE": ("switch_core_session.c", "switch_core_session_exec", 2841),
    "CHANNEL_EXECUTE_COMPLETE": ("switch_core_session.c", "switch_core_session_exec", 2866),
    "HEARTBEAT": ("switch_core.c", "send_heartbeat", 95),
    "BACKGROUND_JOB": ("mod_event_socket.c", "api_exec", 1575),
    "sofia::register": ("sofia_reg.c", "sofia_reg_handle_register_token", 2004),
    "sofia::unregister": ("sofia_reg.c", "sofia_reg_handle_register_token", 1742),
    "sofia::expire": ("sofia_reg.c", "sofia_reg_del_callback", 640),
    "sofia::profile_start": ("sofia.c", "sofia_profile_thread_run", 3412),
    "sofia::recovery_recovered": ("mod_sofia.c", "sofia_function", 4418),
    "limit::usage": ("switch_limit.c", "switch_limit_fire_event", 70),
    "FAILURE": ("sofia.c", "sofia_profile_thread_run", 3380),
    "UNPUBLISH": ("sofia.c", "sofia_profile_thread_run", 3543),
    "RELOADXML": ("switch_xml.c", "switch_xml_open_root", 2410),
    "SENDEVENT": ("mod_event_socket.c", "parse_command", 2033),
}
