"""Cluster events fired into the local FreeSWITCH as CUSTOM events (docs/monitoring.rst).

Every role change, takeover start/step/finish/abort/report, peer up/down/restart and network
degraded/restored becomes ``sendevent CUSTOM`` with ``Event-Subclass: fsha::<name>`` and
``FSHA-*`` headers, so ESL tooling and ``fs_cli`` (``/event custom fsha::role``) see the
cluster.

Best effort, never in the node's way: the node's event listener only appends to a bounded
queue; one ``sendevent`` at a time is sent from the reactor (never from inside the node's
transitions), each with a timeout. While FreeSWITCH is not ready the queue waits; an event
older than ``max_age`` when FreeSWITCH comes back is dropped (reason ``freeswitch-down``),
as is the oldest event when the queue is full (``queue-full``), one that ESL refused or
timed out (``send-failed``) and what is still queued at stop (``stopped``). Every drop is
counted (:meth:`ClusterEvents.status`, the ``fsha_fsevents_dropped_total`` metric) and
``FSHA-Sequence`` numbers the events of one node run, so a consumer sees the gaps.

Network degraded/restored is not a node event: :class:`ClusterEvents` looks at the failure
detector every heartbeat interval (a few comparisons per peer and network; nothing per
datagram) and reports a network that an alive peer has been silent on for the dead-after
time, and its return.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha.node import ClusterNode

# node event kind -> Event-Subclass (what is not listed here is not forwarded)
SUBCLASSES: dict[str, str] = {
    "starting": "fsha::starting",
    "role": "fsha::role",
    "claim": "fsha::takeover-start",
    "master": "fsha::takeover-finish",
    "claim-aborted": "fsha::takeover-abort",
    "release": "fsha::release",
    "takeover-acquire": "fsha::takeover-report",
    "takeover-release": "fsha::takeover-report",
    "takeover-rollback": "fsha::takeover-report",
    "peer-up": "fsha::peer-up",
    "peer-down": "fsha::peer-down",
    "peer-restarted": "fsha::peer-restarted",
    "peer-takeover": "fsha::peer-takeover",
    "peer-release": "fsha::peer-release",
    "maintenance": "fsha::maintenance",
    "switchover": "fsha::switchover",
    "network-degraded": "fsha::network-degraded",
    "network-restored": "fsha::network-restored",
}
#: Fired from the takeover sequence itself (:meth:`ClusterEvents.takeover_step`), not from a
#: node event.
SUBCLASS_TAKEOVER_STEP = "fsha::takeover-step"
MAX_VALUE = 1024  # characters of one header value (error texts can be long)
_UNSAFE = str.maketrans({"\r": " ", "\n": " ", "\0": " "})


class EventSender(Protocol):
    """What :class:`ClusterEvents` needs of ``fsha.eslclient.ESLClient``."""

    @property
    def is_healthy(self) -> bool: ...

    def sendevent(self, name: str, headers: Sequence[tuple[str, str]] = (),
                  body: bytes = b"", timeout: float | None = None
                  ) -> defer.Deferred[str]: ...

    def add_state_listener(self, callback: Callable[[Any, Any], object]) -> None: ...


@dataclass(slots=True)
class _Queued:
    at: float
    headers: list[tuple[str, str]]


def header_name(key: str) -> str:
    """``calls_written`` -> ``FSHA-Calls-Written``."""
    return "FSHA-" + "-".join(p.capitalize() for p in key.replace("-", "_").split("_") if p)


def header_value(value: Any) -> str | None:
    """The text of a header value (None: leave the header out); never a CR or LF."""
    if value is None:
        return None
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value) if math.isfinite(value) else str(value)
    elif isinstance(value, list | tuple):
        text = "; ".join(str(v) for v in value)
    else:
        text = str(value)
    return text.translate(_UNSAFE)[:MAX_VALUE]


def event_headers(subclass: str, common: Iterable[tuple[str, str]],
                  event: dict[str, Any]) -> list[tuple[str, str]]:
    """The headers of one CUSTOM event: subclass, common ones, then the event's fields."""
    headers = [("Event-Subclass", subclass), *common]
    for key, value in event.items():
        if key == "time":
            headers.append(("FSHA-Time", f"{float(value):.3f}"))
        elif key == "event":
            headers.append(("FSHA-Event", str(value)))
        elif isinstance(value, dict):  # steps_ms: one header per step
            prefix = "Step" if key == "steps_ms" else key
            suffix = "-Ms" if key == "steps_ms" else ""
            for sub, v in value.items():
                text = header_value(v)
                if text is not None:
                    headers.append((header_name(f"{prefix}_{sub}") + suffix, text))
        else:
            text = header_value(value)
            if text is not None:
                headers.append((header_name(key), text))
    return headers


class ClusterEvents(Service):
    """Fires the node's events into the local FreeSWITCH (see the module docstring).

    ``esl``: the node's ESL client; ``node``: the ClusterNode (its clock is used unless
    ``clock`` is given). ``max_queue`` events wait at most (the oldest is dropped);
    ``max_age`` seconds at most; each ``sendevent`` gets ``send_timeout`` seconds.
    Also a Twisted service (``startService``/``stopService`` call :meth:`start`/:meth:`stop`).
    """

    log = Logger()

    def __init__(self, esl: EventSender, node: ClusterNode, *,
                 clock: IReactorTime | None = None, max_queue: int = 256,
                 max_age: float = 30.0, send_timeout: float = 2.0,
                 check_interval: float | None = None) -> None:
        self.esl = esl
        self.node = node
        self.clock = clock if clock is not None else node.clock
        self.max_queue = max(1, max_queue)
        self.max_age = max_age
        self.send_timeout = send_timeout
        self.check_interval = (check_interval if check_interval is not None
                               else node.config.heartbeat_interval)
        self.queue: deque[_Queued] = deque()
        self.sent = 0
        self.sequence = 0
        self.dropped: Counter[str] = Counter()
        self.last_error: str | None = None
        self.accepting = False
        self._in_flight = False
        self._scheduled: IDelayedCall | None = None
        self._drain_waiters: list[defer.Deferred[None]] = []
        self._drain_timer: IDelayedCall | None = None
        self._role = node.role.name.lower()
        self._down: set[tuple[int, int]] = set()  # (peer id, network index) degraded
        self._checker = LoopingCall(self._check_networks)
        self._checker.clock = self.clock
        node.add_event_listener(self._node_event)
        esl.add_state_listener(self._esl_state)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self.accepting:
            return
        self.accepting = True
        self._role = self.node.role.name.lower()
        if self.check_interval > 0:
            self._checker.start(self.check_interval, now=False).addErrback(
                lambda f: self.log.failure("network check loop failed", f))
        self._kick()

    def stop(self) -> defer.Deferred[None]:
        """Stop taking events; fires once what is queued is sent (or after
        ``send_timeout``: the rest is dropped as ``stopped``)."""
        self.accepting = False
        if self._checker.running:
            self._checker.stop()
        if not self.queue and not self._in_flight:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._drain_waiters.append(d)
        if self._drain_timer is None:
            self._drain_timer = self.clock.callLater(self.send_timeout, self._drained)
        self._kick()
        return d

    def _drained(self) -> None:
        timer, self._drain_timer = self._drain_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self.queue:
            self.dropped["stopped"] += len(self.queue)
            self.queue.clear()
        waiters, self._drain_waiters = self._drain_waiters, []
        for d in waiters:
            d.callback(None)

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.stop()

    # -- taking events ------------------------------------------------------------------

    def _node_event(self, event: dict[str, Any]) -> None:
        if not self.accepting:
            return
        kind = event.get("event")
        subclass = SUBCLASSES.get(kind) if isinstance(kind, str) else None
        if subclass is None:
            return
        if "incarnation" in event:
            # FSHA-Incarnation is the firing node's; a peer's goes in FSHA-Peer-Incarnation
            event = dict(event)
            incarnation = event.pop("incarnation")
            if kind.startswith("peer-"):
                event["peer_incarnation"] = incarnation
        if kind == "role":
            event = {**event, "old_role": self._role}
            self._role = str(event.get("role"))
        elif kind == "peer-down":
            self._forget_peer(str(event.get("peer")))
        self.fire(subclass, event)

    def takeover_step(self, report: Any, step: Any) -> None:
        """One step of an acquire/release/rollback just ended (``SlotEffects``'
        ``add_step_listener``): ``fsha::takeover-step``, while the sequence goes on."""
        if not self.accepting:
            return
        fields: dict[str, Any] = {
            "event": "takeover-step", "action": report.action, "slot": report.slot,
            "epoch": report.epoch, "takeover": f"{report.slot}/{report.epoch}",
            "step": step.name, "outcome": step.outcome, "ms": round(step.ms, 1)}
        for key, value in step.counts.items():
            fields[f"count_{key}"] = value
        if step.error is not None:
            fields["error"] = step.error
        self.fire(SUBCLASS_TAKEOVER_STEP, fields)

    def fire(self, subclass: str, fields: dict[str, Any]) -> None:
        """Queue one event (``fields`` become ``FSHA-*`` headers); never raises."""
        try:
            self.sequence += 1
            node = self.node
            common = (("FSHA-Cluster", node.config.name), ("FSHA-Node", node.me.name),
                      ("FSHA-Incarnation", str(node.incarnation)),
                      ("FSHA-Sequence", str(self.sequence)))
            if "time" not in fields:
                fields = {"time": round(self.clock.seconds(), 3), **fields}
            item = _Queued(self.clock.seconds(), event_headers(subclass, common, fields))
        except Exception:
            self.dropped["invalid"] += 1
            self.log.failure("cluster event {subclass} could not be built", subclass=subclass)
            return
        if len(self.queue) >= self.max_queue:
            self.queue.popleft()
            self.dropped["queue-full"] += 1
        self.queue.append(item)
        self._kick()

    # -- sending ------------------------------------------------------------------------

    def _esl_state(self, old: Any, new: Any) -> None:
        if self.esl.is_healthy:
            self._kick()

    def _kick(self) -> None:
        if self._scheduled is None and not self._in_flight and self.queue:
            self._scheduled = self.clock.callLater(0, self._send_next)

    def _send_next(self) -> None:
        self._scheduled = None
        if self._in_flight:
            return
        now = self.clock.seconds()
        while self.queue and now - self.queue[0].at > self.max_age:
            self.queue.popleft()
            self.dropped["freeswitch-down"] += 1
        if not self.queue:
            self._idle()
            return
        if not self.esl.is_healthy:
            if self._drain_waiters:
                self._drained()  # stopping, and FreeSWITCH cannot take them now
            return  # the ESL state listener kicks when it is ready again
        item = self.queue.popleft()
        self._in_flight = True
        d = defer.maybeDeferred(self.esl.sendevent, "CUSTOM", item.headers,
                                timeout=self.send_timeout)
        d.addTimeout(self.send_timeout + 1.0, self.clock)  # even if ESL forgot its own
        d.addCallbacks(self._sent, self._failed)
        d.addErrback(lambda f: self.log.failure("cluster event bookkeeping failed", f))
        d.addBoth(self._next)

    def _sent(self, _: object) -> None:
        self.sent += 1

    def _failed(self, failure: Failure) -> None:
        self.dropped["send-failed"] += 1
        error = failure.getErrorMessage() or failure.type.__name__
        if error != self.last_error:  # once per distinct error, not once per event
            self.log.warn("cluster event not delivered to FreeSWITCH: {error}", error=error)
        self.last_error = error

    def _next(self, _: object) -> None:
        self._in_flight = False
        if self.queue:
            self._kick()
        else:
            self._idle()

    def _idle(self) -> None:
        if self._drain_waiters and not self.queue and not self._in_flight:
            self._drained()

    # -- network degraded ---------------------------------------------------------------

    def _forget_peer(self, name: str) -> None:
        for node in self.node.config.nodes:
            if node.name == name:
                self._down = {k for k in self._down if k[0] != node.node_id}

    def _check_networks(self) -> None:
        node = self.node
        if not node.running:
            return
        now = self.clock.seconds()
        detector, config = node.detector, node.config
        for peer in detector.peers.values():
            if not peer.alive:
                continue
            if now - peer.changed_at < config.dead_after:
                continue  # just came up: its other networks may not have been heard yet
            name = config.nodes[peer.node_id].name
            for net in config.networks:
                key = (peer.node_id, net.index)
                up = detector.network_up(peer.node_id, net.index, now)
                if not up and key not in self._down:
                    self._down.add(key)
                    heard = peer.heard[net.index]
                    silent = None if heard == float("-inf") else round((now - heard) * 1000)
                    self._emit_network("network-degraded", name, net.name, silent)
                elif up and key in self._down:
                    self._down.discard(key)
                    self._emit_network("network-restored", name, net.name, None)

    def _emit_network(self, kind: str, peer: str, network: str, silent_ms: int | None
                      ) -> None:
        if kind == "network-degraded":
            self.log.warn("network {network}: no heartbeat from {peer} for {ms} ms",
                          network=network, peer=peer, ms=silent_ms)
        else:
            self.log.info("network {network}: {peer} heard again", network=network, peer=peer)
        fields: dict[str, Any] = {"event": kind, "peer": peer, "network": network}
        if silent_ms is not None:
            fields["silent_ms"] = silent_ms
        self.fire(SUBCLASSES[kind], fields)

    # -- reporting ----------------------------------------------------------------------

    def degraded(self) -> list[tuple[str, str]]:
        """(peer, network) pairs currently reported degraded."""
        nodes, networks = self.node.config.nodes, self.node.config.networks
        return sorted((nodes[p].name, networks[n].name) for p, n in self._down)

    def stats(self) -> EventsStats:
        return EventsStats(running=self.accepting, sent=self.sent, queued=len(self.queue),
                           dropped=dict(self.dropped), last_error=self.last_error,
                           sequence=self.sequence,
                           degraded=[f"{peer}/{net}" for peer, net in self.degraded()])

    def status(self) -> dict[str, Any]:
        return self.stats().as_status()


@dataclass(frozen=True, slots=True)
class EventsStats:
    """The cluster events' figures: the ``fsevents`` status section (:meth:`as_status`)
    and the ``fsha_fsevents_*`` metrics (``fsha.metrics``) are both made from this."""

    running: bool
    sent: int
    queued: int
    dropped: dict[str, int]  # by reason
    last_error: str | None
    sequence: int
    degraded: list[str]  # peer/network pairs

    def as_status(self) -> dict[str, Any]:
        return {"running": self.running, "sent": self.sent, "queued": self.queued,
                "dropped": dict(self.dropped), "last_error": self.last_error,
                "sequence": self.sequence, "degraded": list(self.degraded)}
