"""The rows of FreeSWITCH's databases that fsha reads, replicates and writes back.

``recovery`` (the core DB): :class:`RecoveryRow`, one answered call of a profile with
``track-calls=true``. ``sip_registrations`` (sofia's per-profile database): the 14 columns
a successor needs, :class:`RegistrationRow`; the other columns are the restoring node's own
or derivable (``fsha.fsdb.writer``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from fsha.wire import stream

__all__ = [
    "REGISTRATION_COLUMNS",
    "SIP_REGISTRATIONS_COLUMNS",
    "CallRow",
    "CallSummary",
    "RecoveryRow",
    "RegistrationRow",
    "registration_key",
    "registration_prefix",
    "summary_of",
]


@dataclass(frozen=True, slots=True)
class RecoveryRow:
    """One row of FreeSWITCH's ``recovery`` table (``metadata``: the XML CDR, byte-exact)."""

    runtime_uuid: str
    technology: str
    profile_name: str
    hostname: str
    uuid: str
    metadata: bytes


#: The same row, as the call feed names it.
CallRow = RecoveryRow


@dataclass(frozen=True, slots=True)
class CallSummary:
    """The small columns of a ``recovery`` row and its metadata's size in bytes (what a
    sweep reads of every row)."""

    runtime_uuid: str
    technology: str
    profile_name: str
    hostname: str
    uuid: str
    size: int


def summary_of(row: RecoveryRow) -> CallSummary:
    return CallSummary(row.runtime_uuid, row.technology, row.profile_name, row.hostname,
                       row.uuid, len(row.metadata))


#: Every column of sofia's ``sip_registrations`` table, in FreeSWITCH's order (what a
#: restore writes; the simulator creates the same table).
SIP_REGISTRATIONS_COLUMNS: Final = (
    "call_id", "sip_user", "sip_host", "presence_hosts", "contact", "status", "ping_status",
    "ping_count", "ping_time", "force_ping", "rpid", "expires", "ping_expires", "user_agent",
    "server_user", "server_host", "profile_name", "hostname", "network_ip", "network_port",
    "sip_username", "sip_realm", "mwi_user", "mwi_host", "orig_server_host", "orig_hostname",
    "sub_host",
)  # fmt: skip


#: The ``sip_registrations`` columns a registration record carries, in this order.
REGISTRATION_COLUMNS: Final = (
    "call_id", "sip_user", "sip_host", "presence_hosts", "contact", "status", "rpid",
    "expires", "user_agent", "profile_name", "network_ip", "network_port", "sip_username",
    "sip_realm",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class RegistrationRow:
    """The ``sip_registrations`` columns a successor needs to restore a binding."""

    call_id: str
    sip_user: str
    sip_host: str
    presence_hosts: str
    contact: str
    status: str
    rpid: str
    expires: int  # Unix seconds; 0: never
    user_agent: str
    profile_name: str
    network_ip: str
    network_port: str
    sip_username: str
    sip_realm: str

    @property
    def key(self) -> str:
        """The replicated record's key (:func:`registration_key`)."""
        return registration_key(self.profile_name, self.sip_user, self.sip_host, self.call_id)

    @property
    def binding(self) -> bytes:
        """A 16-byte hash of every field but ``expires`` (what the feeds' index keeps).
        Computed on use, not stored: a takeover holds 100,000 rows at once."""
        fields = (self.call_id, self.sip_user, self.sip_host, self.presence_hosts,
                  self.contact, self.status, self.rpid, self.user_agent, self.profile_name,
                  self.network_ip, self.network_port, self.sip_username, self.sip_realm)
        return hashlib.blake2b("\x00".join(fields).encode("utf-8", "surrogateescape"),
                               digest_size=16).digest()


def registration_key(profile: str, user: str, host: str, call_id: str) -> str:
    """``PROFILE/USER@HOST/CALL-ID``; a key longer than the stream allows ends with a hash
    of the Call-ID instead (``#`` and 32 hex digits)."""
    key = f"{profile}/{user}@{host}/{call_id}"
    if len(key.encode("utf-8", "surrogateescape")) <= stream.MAX_KEY_SIZE:
        return key
    digest = hashlib.blake2b(call_id.encode("utf-8", "surrogateescape"),
                             digest_size=16).hexdigest()
    return f"{profile}/{user}@{host}/#{digest}"


def registration_prefix(profile: str, user: str, host: str) -> str:
    """What every key of ``user@host`` on ``profile`` starts with."""
    return f"{profile}/{user}@{host}/"
