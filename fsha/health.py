"""Is the local FreeSWITCH usable? Busy is not dead.

FreeSWITCH runs an ``api`` command on the connection's own thread: while a long command
(``sofia profile P recover`` of a big batch) runs, later requests on the same connection
wait behind it, and no events flow on it. A health check queued there would declare a busy
FreeSWITCH dead, and a master would give its slot (and its calls) up for nothing. So:

* The **probe** is a second ESL connection that carries nothing long: ``api status``
  every ``PROBE_INTERVAL`` seconds, each allowed the node's ESL ``timeout_ms``,
  (and the small ``fsha::*`` events of :mod:`fsha.fsevents`). FreeSWITCH serves it on its
  own thread, so a recover on the main connection never delays it. Its last answer (``is
  ready``) is a takeover's self-check (:meth:`SwitchHealth.recent_status`).
* **Busy**: an answer later than ``timeout_ms`` fails that request but is not fatal; the
  request keeps its place in the connection's FIFO and its late answer is discarded
  (:mod:`fsha.eslclient`, ``hung_timeout``). The probe is then *busy* (shown in the status).
* **Hung**: no answer at all for ``hung_after_ms`` (the bounded grace): the connection is
  dropped and FreeSWITCH counts as down; so does a refused or closed connection (dead) at
  once. Only then does a master give its slot up (fsha.node).

The main connection uses the same rule with a grace that also covers its longest command
(one recover batch, ``[takeover] recover_timeout_ms``), so a takeover step that waits behind
a recover (e.g. ``sendevent``) times out alone, without dropping the connection under the
recover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

from fsha.config import ClusterConfig, NodeConfig
from fsha.eslclient import ConnectionState, ESLClient
from fsha.latch import Signal
from fsha.reactors import NetReactor

__all__ = ["PROBE_COMMAND", "PROBE_INTERVAL", "SELF_CHECK_MAX_AGE", "ProbeStats",
           "SwitchHealth", "SwitchStats", "esl_clients", "recent_answer"]

#: Seconds between two probes of the local FreeSWITCH.
PROBE_INTERVAL = 0.5
#: The probe asks ``status`` (it says whether FreeSWITCH ``is ready``): a takeover's
#: self-check reads the last answer instead of a round trip of its own
#: (:meth:`SwitchHealth.recent_status`).
PROBE_COMMAND = "status"
#: The oldest probe answer a takeover's self-check takes (seconds): two probe intervals,
#: so one answer that came a little late still counts. Why an answer this old is as good
#: as a new one: docs/takeover.rst (``self_check``).
SELF_CHECK_MAX_AGE = 2 * PROBE_INTERVAL


def _endpoint(me: NodeConfig, reactor: NetReactor) -> Any:
    endpoint_type = TCP6ClientEndpoint if ":" in me.esl.host else TCP4ClientEndpoint
    return endpoint_type(reactor, me.esl.host, me.esl.port, timeout=me.esl.timeout)


def esl_clients(config: ClusterConfig, me: NodeConfig, reactor: NetReactor, ping_interval: float
                ) -> tuple[ESLClient, ESLClient]:
    """The node's main ESL client (commands, events) and its probe (see the module
    docstring)."""
    esl = me.esl
    main = ESLClient(_endpoint(me, reactor), esl.password, reactor, request_timeout=esl.timeout,
                     setup_timeout=esl.timeout, ping_interval=ping_interval,
                     ping_timeout=esl.timeout,
                     hung_timeout=max(esl.timeout, config.takeover.recover_timeout)
                     + esl.hung_after)
    main.setName("esl")
    probe = ESLClient(_endpoint(me, reactor), esl.password, reactor,
                      request_timeout=esl.timeout, setup_timeout=esl.timeout,
                      ping_interval=PROBE_INTERVAL, ping_timeout=esl.timeout,
                      heartbeat_timeout=None, hung_timeout=esl.hung_after,
                      ping_command=PROBE_COMMAND)
    probe.setName("esl-probe")
    return main, probe


class SwitchHealth:
    """The node's view of its FreeSWITCH; busy (still healthy) while a probe's answer is
    overdue.

    With a probe, the probe decides: FreeSWITCH is up while the probe is ready (and the
    main client runs). The main connection dropped because one command stayed unanswered
    for its grace, while the probe still gets answers, is a stuck command in a live
    FreeSWITCH: it reconnects, and the master keeps its slot and its calls. A dead
    FreeSWITCH closes both; a hung one stops answering the probe. Without a probe, the
    main connection decides. A guard that was given up (fsha.guardlink) makes FreeSWITCH
    unusable too: nothing would stop it serving a slot if fsha died."""

    def __init__(self, esl: ESLClient, probe: ESLClient | None = None,
                 guard_given_up: Signal | None = None) -> None:
        """``guard_given_up``: the latch fsha.guardlink.GuardLink sets when it gives the
        guard up."""
        self.esl = esl
        self.probe = probe
        self.guard_given_up = guard_given_up

    def is_ok(self) -> bool:
        if self.guard_given_up is not None and self.guard_given_up.is_set:
            return False
        if self.probe is None:
            return self.esl.is_healthy
        return self.probe.is_healthy and self.esl.state is not ConnectionState.STOPPED

    def busy(self) -> bool:
        """A probe answer is overdue (later than its timeout), not yet for the grace."""
        probe = self.probe
        if probe is None:
            return False
        waiting = probe.ping_waiting()
        return waiting is not None and waiting > probe.ping_timeout

    def recent_status(self, max_age: float) -> tuple[float, str] | None:
        """The probe's last ``status`` answer and its age in seconds, if it is at most
        ``max_age`` old and FreeSWITCH is usable now (:meth:`is_ok`, no probe answer
        overdue); None otherwise: ask again. The answer still has to say ``is ready``
        (the caller parses it)."""
        probe = self.probe
        if probe is None or probe.ping_command != PROBE_COMMAND:
            return None
        return recent_answer(probe.last_pong, probe.clock.seconds(), max_age,
                             self.is_ok() and not self.busy())

    def stats(self) -> SwitchStats:
        esl = self.esl
        probe = self.probe
        probe_stats: ProbeStats | None = None
        if probe is not None:
            waiting = probe.ping_waiting()
            last = probe.last_ping_seconds
            probe_stats = ProbeStats(
                state=probe.state.value, ok=probe.is_healthy, last_error=probe.last_error,
                connections=probe.connections, late_replies=probe.late_reply_count,
                last_ping_ms=round(last * 1000, 1) if last is not None else None,
                waiting_ms=round(waiting * 1000, 1) if waiting is not None else None)
        return SwitchStats(
            state=esl.state.value, ok=self.is_ok(), core_uuid=esl.core_uuid,
            last_error=esl.last_error, connections=esl.connections, restarts=esl.restarts,
            late_replies=esl.late_reply_count, malformed_core_uuids=esl.malformed_core_uuids,
            busy=self.busy(), probe=probe_stats)

    def status(self) -> dict[str, Any]:
        return self.stats().as_status()


def recent_answer(pong: tuple[float, str] | None, now: float, max_age: float,
                  usable: bool) -> tuple[float, str] | None:
    """The probe's answer ``pong`` (when it came, its text) and its age at ``now``, if
    FreeSWITCH is ``usable`` now and the answer is at most ``max_age`` old (None: ask
    again)."""
    if pong is None or not usable:
        return None
    age = now - pong[0]
    if not 0.0 <= age <= max_age:
        return None
    return age, pong[1]


@dataclass(frozen=True, slots=True)
class ProbeStats:
    """The probe connection's figures (``freeswitch.probe`` in the status)."""

    state: str
    ok: bool
    last_error: str | None
    connections: int
    late_replies: int
    last_ping_ms: float | None
    waiting_ms: float | None  # a probe answer overdue this long (None: none waiting)

    def as_status(self) -> dict[str, Any]:
        return {"state": self.state, "ok": self.ok, "last_error": self.last_error,
                "connections": self.connections, "late_replies": self.late_replies,
                "last_ping_ms": self.last_ping_ms, "waiting_ms": self.waiting_ms}


@dataclass(frozen=True, slots=True)
class SwitchStats:
    """The local FreeSWITCH as the node sees it: the ``freeswitch`` status section
    (:meth:`as_status`, plus the session count of ``fsha.metrics.SessionWatch``) and the
    ``fsha_freeswitch_*`` metrics are both made from this."""

    state: str  # the main ESL connection's (fsha.eslclient.ConnectionState value)
    ok: bool
    core_uuid: str | None
    last_error: str | None
    connections: int
    restarts: int
    late_replies: int
    malformed_core_uuids: int
    busy: bool
    probe: ProbeStats | None

    def as_status(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "state": self.state, "ok": self.ok, "core_uuid": self.core_uuid,
            "last_error": self.last_error, "connections": self.connections,
            "restarts": self.restarts, "late_replies": self.late_replies,
            "malformed_core_uuids": self.malformed_core_uuids, "busy": self.busy}
        if self.probe is not None:
            result["probe"] = self.probe.as_status()
        return result
