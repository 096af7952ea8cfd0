"""The simulated switch's registrar: REGISTER, un-REGISTER and expiry, as mod_sofia keeps
them (rows in the core DB's ``sip_registrations``, ``sofia::register`` / ``unregister`` /
``expire`` events). :class:`fsha.sim.switch.Switch` owns one and hands it what it needs."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from fsha.sim.coredb import CoreDB
from fsha.sim.events import CALLING, EventFactory, SimEvent

__all__ = ["Registrar", "Registration"]


class _Profile(Protocol):
    @property
    def ip(self) -> str: ...


@dataclass(slots=True)
class Registration:
    profile: str
    user: str
    host: str
    contact: str
    call_id: str
    network_ip: str
    network_port: int
    expires_at: int
    user_agent: str
    extra: dict[str, str] = field(default_factory=dict)


class Registrar:
    """Registrations of one simulated switch (``hostname``'s rows of the core DB)."""

    def __init__(self, clock: IReactorTime, db: CoreDB, events: EventFactory,
                 fire: Callable[[SimEvent], None], hostname: str,
                 running_profile: Callable[[str], _Profile]) -> None:
        """``running_profile(name)`` raises if the profile is not running (no REGISTER
        reaches a stopped one)."""
        self.clock = clock
        self.db = db
        self.events = events
        self._fire = fire
        self.hostname = hostname
        self._running_profile = running_profile

    def register(
        self,
        profile: str,
        user: str,
        *,
        host: str | None = None,
        network_ip: str = "127.0.0.1",
        network_port: int = 5060,
        expires: int = 3600,
        call_id: str | None = None,
        user_agent: str = "fsha-sim-phone/1.0",
    ) -> Registration:
        """A REGISTER: row in sip_registrations and a sofia::register event
        (``update-reg: true`` when it refreshes an existing one)."""
        p = self._running_profile(profile)
        host = host or p.ip
        call_id = call_id or f"{uuidlib.uuid4().hex}@{network_ip}"
        now = int(self.clock.seconds())
        contact = f'"{user}" <sip:{user}@{network_ip}:{network_port}>'
        reg = Registration(
            profile, user, host, contact, call_id, network_ip, network_port, now + expires,
            user_agent,
        )
        existing = self.db.upsert_registration(
            {
                "call_id": call_id,
                "sip_user": user,
                "sip_host": host,
                "presence_hosts": host,
                "contact": contact,
                "status": "Registered(UDP)",
                "ping_status": "Reachable",
                "ping_count": 0,
                "ping_time": 0,
                "force_ping": 0,
                "rpid": "unknown",
                "expires": now + expires,
                "ping_expires": 0,
                "user_agent": user_agent,
                "server_user": user,
                "server_host": p.ip,
                "profile_name": profile,
                "hostname": self.hostname,
                "network_ip": network_ip,
                "network_port": str(network_port),
                "sip_username": user,
                "sip_realm": host,
                "mwi_user": user,
                "mwi_host": host,
                "orig_server_host": p.ip,
                "orig_hostname": self.hostname,
                "sub_host": host,
            }
        )
        headers = [
            ("profile-name", profile),
            ("from-user", user),
            ("from-host", host),
            ("presence-hosts", host),
            ("contact", contact),
            ("call-id", call_id),
            ("rpid", "unknown"),
            ("status", "Registered(UDP)"),
            ("expires", str(expires)),
            ("to-user", user),
            ("to-host", host),
            ("network-ip", network_ip),
            ("network-port", str(network_port)),
            ("username", user),
            ("realm", host),
            ("user-agent", user_agent),
        ]
        if existing:
            headers.append(("update-reg", "true"))
        self._fire(self.events.custom("sofia::register", CALLING["sofia::register"], headers))
        return reg

    def unregister(self, profile: str, call_id: str) -> bool:
        rows = self.db.take_registrations(call_id, profile)
        if not rows:
            return False
        for r in rows:
            self._fire(
                self.events.custom(
                    "sofia::unregister",
                    CALLING["sofia::unregister"],
                    [
                        ("profile-name", profile),
                        ("from-user", str(r["sip_user"])),
                        ("from-host", str(r["sip_host"])),
                        ("contact", str(r["contact"])),
                        ("call-id", call_id),
                        ("rpid", str(r["rpid"])),
                        ("expires", "0"),
                        ("to-user", str(r["sip_user"])),
                        ("to-host", str(r["sip_host"])),
                        ("network-ip", str(r["network_ip"])),
                        ("network-port", str(r["network_port"])),
                        ("username", str(r["sip_username"])),
                        ("realm", str(r["sip_realm"])),
                        ("user-agent", str(r["user_agent"])),
                    ],
                )
            )
        return True

    def check_expired_registrations(self) -> int:
        """sofia_reg_check_expire on this hostname's rows: delete, fire sofia::expire."""
        rows = self.db.take_expired(int(self.clock.seconds()), self.hostname)
        for r in rows:
            self._fire(
                self.events.custom(
                    "sofia::expire",
                    CALLING["sofia::expire"],
                    [
                        ("profile-name", str(r["profile_name"])),
                        ("call-id", str(r["call_id"])),
                        ("user", str(r["sip_user"])),
                        ("host", str(r["sip_host"])),
                        ("contact", str(r["contact"])),
                        ("expires", str(r["expires"])),
                        ("user-agent", str(r["user_agent"])),
                    ],
                )
            )
        return len(rows)
