"""Replication's figures, typed: the ``replication`` and ``feeds`` sections of the JSON
status (each class's ``as_status()``) and the ``fsha_replication_*`` / ``fsha_feed_*``
metrics (``fsha.metrics``, which reads the attributes) are both made from these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FeedSlotStats", "FeedsStats", "LinkCounts", "PeerStats", "ReplicationStats",
           "SessionStats"]


@dataclass(frozen=True, slots=True)
class SessionStats:
    """One replication session with a peer (``fsha.replication.session.PeerSession``)."""

    lag_changes: int  # of this node's origin: written, not acknowledged by the peer
    lag_ms: float  # age of the oldest of those
    last_ack_lag_ms: float | None
    rtt_ms: float | None
    changes_sent: int
    changes_applied: int
    duplicates: int
    snapshots_sent: int
    snapshots_applied: int
    in_flight_changes: int
    in_flight_bytes: int
    paused: bool
    catching_up: list[int]  # origins the peer is still being brought up to date with

    def as_status(self) -> dict[str, Any]:
        return {
            "lag_changes": self.lag_changes, "lag_ms": self.lag_ms,
            "last_ack_lag_ms": self.last_ack_lag_ms, "rtt_ms": self.rtt_ms,
            "changes_sent": self.changes_sent, "changes_applied": self.changes_applied,
            "duplicates": self.duplicates, "snapshots_sent": self.snapshots_sent,
            "snapshots_applied": self.snapshots_applied,
            "in_flight_changes": self.in_flight_changes,
            "in_flight_bytes": self.in_flight_bytes, "paused": self.paused,
            "catching_up": list(self.catching_up)}


@dataclass(frozen=True, slots=True)
class PeerStats:
    """The link to one peer and, while it is up, its session."""

    up: bool
    dials: bool  # this node dials the peer (else the peer dials it)
    network: str | None
    address: str | None
    identity: dict[str, Any] | None  # the peer's TLS identity (status only, never a metric)
    up_for_s: float | None
    connects: int
    bytes_in: int
    bytes_out: int
    dial_failures: dict[str, int]  # by network or reason
    closed: dict[str, int]  # sessions dropped, by reason
    last_error: str
    last_end: dict[str, Any] | None
    session: SessionStats | None  # None: no session (what the peer has is unknown)

    def as_status(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "up": self.up, "dials": self.dials, "network": self.network,
            "address": self.address, "identity": self.identity, "up_for_s": self.up_for_s,
            "connects": self.connects, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "dial_failures": dict(self.dial_failures), "closed": dict(self.closed),
            "last_error": self.last_error, "last_end": self.last_end}
        if self.session is not None:
            result.update(self.session.as_status())
        else:
            result.update({"lag_changes": None, "lag_ms": None})
        return result


@dataclass(frozen=True, slots=True)
class LinkCounts:
    """Every link of the node together (``fsha.replication.link.LinkStats``)."""

    established: int
    refused: dict[str, int]  # by reason
    unexpected_inbound: int
    bytes_in: int
    bytes_out: int

    def as_status(self) -> dict[str, Any]:
        return {"established": self.established, "refused": dict(self.refused),
                "unexpected_inbound": self.unexpected_inbound, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out}


@dataclass(frozen=True, slots=True)
class ReplicationStats:
    """The replication service (``fsha.replication.service.ReplicationService``)."""

    node: str
    incarnation: int
    listening: list[str]
    digest: str
    records: int
    positions: dict[str, list[int]]  # origin name -> [incarnation, sequence]
    slots: dict[str, dict[str, int]]  # slot name -> record kind -> count
    links: LinkCounts
    peers: dict[str, PeerStats]  # by peer name
    # peers running another config: a link for control requests only (fsha config push)
    control_links: tuple[str, ...] = ()

    def as_status(self) -> dict[str, Any]:
        return {
            "node": self.node, "incarnation": self.incarnation,
            "listening": list(self.listening), "digest": self.digest,
            "records": self.records,
            "positions": {k: list(v) for k, v in self.positions.items()},
            "slots": {k: dict(v) for k, v in self.slots.items()},
            "links": self.links.as_status(),
            "peers": {name: p.as_status() for name, p in self.peers.items()},
            "control_links": list(self.control_links)}


@dataclass(frozen=True, slots=True)
class FeedSlotStats:
    """The feed of one slot this node masters."""

    calls: int
    registrations: int
    identity: dict[str, Any] | None  # the FreeSWITCH fed from: core_uuid, version
    last_sweep_ms_ago: float | None
    last_registration_sweep_ms_ago: float | None
    rows_rejected: int
    puts: int
    deletes: int
    errors: int
    last_error: str | None
    fed_for_s: float

    def as_status(self) -> dict[str, Any]:
        return {
            "calls": self.calls, "registrations": self.registrations,
            "identity": None if self.identity is None else dict(self.identity),
            "last_sweep_ms_ago": self.last_sweep_ms_ago,
            "last_registration_sweep_ms_ago": self.last_registration_sweep_ms_ago,
            "rows_rejected": self.rows_rejected, "puts": self.puts,
            "deletes": self.deletes, "errors": self.errors, "last_error": self.last_error,
            "fed_for_s": self.fed_for_s}


@dataclass(frozen=True, slots=True)
class FeedsStats:
    """The feeds of this node's FreeSWITCH (``fsha.replication.feeds.Feeds``)."""

    running: bool
    core_db: str | None
    registration_db: str | None
    calls_enabled: bool
    registration_table: bool  # sofia's sip_registrations table is there to read
    slots: dict[str, FeedSlotStats]  # by slot name
    rows_ignored: int
    ignored_profiles: list[str]
    events_ignored: int
    lookups: int
    lookup_misses: int
    pending_lookups: int
    sweeps: int
    registration_sweeps: int
    db_busy: bool
    errors: int
    last_error: str | None

    def as_status(self) -> dict[str, Any]:
        return {
            "running": self.running, "core_db": self.core_db,
            "registration_db": self.registration_db, "calls_enabled": self.calls_enabled,
            "registration_table": self.registration_table,
            "slots": {name: s.as_status() for name, s in self.slots.items()},
            "rows_ignored": self.rows_ignored, "ignored_profiles": list(self.ignored_profiles),
            "events_ignored": self.events_ignored, "lookups": self.lookups,
            "lookup_misses": self.lookup_misses, "pending_lookups": self.pending_lookups,
            "sweeps": self.sweeps, "registration_sweeps": self.registration_sweeps,
            "db_busy": self.db_busy, "errors": self.errors, "last_error": self.last_error}
