"""The cluster node's figures, typed: the node's part of the JSON status (each class's
``as_status()``, the top-level keys of ``/status``) and the node's metrics (``fsha.metrics``
reads the attributes) are both made from these (``fsha.node.ClusterNode.stats``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "MemberStats",
    "NetworkView",
    "NodeStats",
    "QuorumStats",
    "SenderStats",
    "SlotStats",
]


@dataclass(frozen=True, slots=True)
class NetworkView:
    """A peer on one heartbeat network, as this node hears it."""

    up: bool
    last_heard_ms: float | None  # None: never heard
    rtt_ms: float | None  # None: no echo yet
    bound_ms: float = 0.0  # the silence judged death there now (fsha.detector)

    def as_status(self) -> dict[str, Any]:
        return {"up": self.up, "last_heard_ms": self.last_heard_ms, "rtt_ms": self.rtt_ms,
                "bound_ms": self.bound_ms}


@dataclass(frozen=True, slots=True)
class MemberStats:
    """One configured node (this one or a peer) in this node's view.

    For a peer not heard (not alive), what it announces (``role`` is ``unknown``,
    ``slot``, ``epoch``, ``hears``, ``flags``) is empty; ``restarts`` and
    ``heartbeat_version`` are a peer's only (None on this node's own entry, and absent
    from its status)."""

    name: str
    priority: int
    rank: int | None  # slave ranking position (None: a master)
    is_self: bool
    alive: bool
    live: bool  # heard and proven live now: counts toward quorum
    config: str  # "same" or "other" (a rollout under way)
    hears: list[str] | None
    role: str
    slot: str | None
    epoch: int | None
    incarnation: int | None
    flags: list[str]
    view_agrees: bool
    networks: dict[str, NetworkView]
    restarts: int | None = None
    heartbeat_version: int | None = None

    def as_status(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "name": self.name, "priority": self.priority, "rank": self.rank,
            "self": self.is_self, "alive": self.alive, "live": self.live,
            "config": self.config,
            "hears": None if self.hears is None else list(self.hears),
            "role": self.role, "slot": self.slot, "epoch": self.epoch,
            "incarnation": self.incarnation, "flags": list(self.flags),
            "view_agrees": self.view_agrees}
        if not self.is_self:
            result["restarts"] = self.restarts
            result["heartbeat_version"] = self.heartbeat_version
        result["networks"] = {name: n.as_status() for name, n in self.networks.items()}
        return result


@dataclass(frozen=True, slots=True)
class SlotStats:
    """A slot in this node's view."""

    name: str
    owner: str | None
    epoch: int
    profiles: list[str]
    ips: list[str]

    def as_status(self) -> dict[str, Any]:
        return {"name": self.name, "owner": self.owner, "epoch": self.epoch,
                "profiles": list(self.profiles), "ips": list(self.ips)}


@dataclass(frozen=True, slots=True)
class SenderStats:
    """This node's heartbeat sender on one network."""

    name: str
    sent: int
    send_errors: int
    last_error: str

    def as_status(self) -> dict[str, Any]:
        return {"name": self.name, "sent": self.sent, "send_errors": self.send_errors,
                "last_error": self.last_error}


@dataclass(frozen=True, slots=True)
class QuorumStats:
    required: int
    alive: int  # nodes counted toward quorum, this one included
    ok: bool
    spec: str
    lease_ms: float
    lease_left_ms: float | None  # None: no slot held, or no lease
    claim_hold: str | None  # why an assigned claim waits (None: it does not)

    def as_status(self) -> dict[str, Any]:
        return {"required": self.required, "alive": self.alive, "ok": self.ok,
                "spec": self.spec, "lease_ms": self.lease_ms,
                "lease_left_ms": self.lease_left_ms, "claim_hold": self.claim_hold}


@dataclass(frozen=True, slots=True)
class NodeStats:
    """The node: its role, quorum, peers, slots and heartbeat counters."""

    cluster: str
    node: str
    incarnation: int
    role: str
    slot: str | None
    epoch: int
    uptime_s: float
    quorum: QuorumStats
    config_digest: str
    view_digest: str
    heartbeat_interval_ms: float
    dead_after_ms: float
    dead_after_min_ms: float  # the detector's floor (dead_after_ms when it is fixed)
    ranking: list[str]
    nodes: list[MemberStats]
    slots: list[SlotStats]
    networks: list[SenderStats]
    received: int
    drops: dict[str, int]  # datagrams dropped, by reason
    recent_drops: dict[str, Any]
    events: list[dict[str, Any]]

    def as_status(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster, "node": self.node, "incarnation": self.incarnation,
            "role": self.role, "slot": self.slot, "epoch": self.epoch,
            "uptime_s": self.uptime_s, "quorum": self.quorum.as_status(),
            "config_digest": self.config_digest, "view_digest": self.view_digest,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "dead_after_ms": self.dead_after_ms,
            "dead_after_min_ms": self.dead_after_min_ms, "ranking": list(self.ranking),
            "nodes": [n.as_status() for n in self.nodes],
            "slots": [s.as_status() for s in self.slots],
            "networks": [n.as_status() for n in self.networks],
            "received": self.received, "drops": dict(self.drops),
            "recent_drops": self.recent_drops, "events": list(self.events)}
