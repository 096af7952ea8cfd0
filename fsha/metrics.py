"""Prometheus metrics of one node, served at ``/metrics`` (see docs/monitoring.rst).

Nothing here runs per datagram or per ESL event: :class:`ClusterCollector` reads, at
scrape time, the typed stats of every component (``NodeStats``, ``SwitchStats``,
``ReplicationStats``, ``FeedsStats``, ``EffectsStats``, ``EventsStats``, ``ControlStats``,
``DurableStats``, ``LimitStats``, ``RedisStats``: each also makes its component's section
of the JSON status, so the two cannot disagree) and turns them into metric families. The
only state kept between scrapes is what no component keeps: the takeover histograms
(:class:`TakeoverStats`, fed by ``SlotEffects`` reports), the ESL request latencies
(:class:`ESLRequestStats`) and the FreeSWITCH session count (:class:`SessionWatch`, from
FreeSWITCH's own ``HEARTBEAT`` event, every 20 s by default).

The exposition is generated synchronously in the reactor thread (the stats callables are
not thread-safe; ``prometheus_client.twisted.MetricsResource`` would use a thread). No
secret is ever exported: only names, counters, states and durations.

Why about 650 lines: one function per component, each naming and documenting its
families (the names are checked against docs/monitoring.rst by tests/test_docs_names.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from fsha.configfetch import CatchUpStats
from fsha.durable import DurableStats
from fsha.fsevents import EventsStats
from fsha.health import SwitchStats
from fsha.limitservice import LimitStats
from fsha.nodecontrol import ControlStats
from fsha.nodestats import NodeStats
from fsha.redisclient import RedisStats
from fsha.replication.stats import FeedsStats, ReplicationStats
from fsha.takeover.effects import EffectsStats

# Takeover and step durations, seconds: from a fast bare IP move to a slow core DB write.
DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# ESL request round trips, seconds: a local FreeSWITCH answers in well under a millisecond;
# a busy one (or a sofia command) takes longer; the default request timeout is 5 s.
ESL_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Distinct ESL command labels kept; more (never expected) are counted as "other".
MAX_ESL_COMMANDS = 64
ROLES = ("starting", "slave", "claiming", "master", "releasing")
ESL_STATES = ("stopped", "connecting", "authenticating", "ready")

log = Logger()


class _Report(Protocol):
    action: str
    slot: str
    ok: bool
    total_ms: float
    steps: Any


class ReportSource(Protocol):
    """What :class:`TakeoverStats` listens to (``fsha.takeover.SlotEffects``)."""

    def add_report_listener(self, listener: Callable[[Any], object]) -> None: ...


class _Histogram:
    __slots__ = ("bounds", "counts", "n", "total")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        self.n += 1
        self.total += seconds
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1

    def buckets(self) -> list[tuple[str, float]]:
        result = [(_bound(b), float(c)) for b, c in zip(self.bounds, self.counts,
                                                         strict=True)]
        result.append(("+Inf", float(self.n)))
        return result


def _bound(value: float) -> str:
    return repr(float(value))


class TakeoverStats:
    """Counts and duration histograms of every finished takeover report.

    ``TakeoverStats(effects)`` registers itself with ``effects.add_report_listener``; or
    call :meth:`observe` with each ``TakeoverReport``. Bounded: one entry per
    (action, slot, result) and per (action, step); no per-report memory.
    """

    def __init__(self, source: ReportSource | None = None) -> None:
        self.count: dict[tuple[str, str, str], int] = {}
        self.total: dict[str, _Histogram] = {}
        self.steps: dict[tuple[str, str], _Histogram] = {}
        self.outcomes: dict[tuple[str, str, str], int] = {}
        self.last_seconds: dict[tuple[str, str], float] = {}
        if source is not None:
            source.add_report_listener(self.observe)

    def observe(self, report: _Report) -> None:
        action = str(report.action)
        key = (action, str(report.slot), "ok" if report.ok else "failed")
        self.count[key] = self.count.get(key, 0) + 1
        seconds = max(0.0, float(report.total_ms)) / 1000.0
        self.total.setdefault(action, _Histogram()).observe(seconds)
        self.last_seconds[(action, str(report.slot))] = seconds
        for step in report.steps:
            name, outcome = str(step.name), str(step.outcome).lower()
            okey = (action, name, outcome)
            self.outcomes[okey] = self.outcomes.get(okey, 0) + 1
            if outcome == "skipped":
                continue  # a step not run has no duration worth a bucket
            self.steps.setdefault((action, name), _Histogram()).observe(
                max(0.0, float(step.ms)) / 1000.0)

    def collect(self) -> Iterator[Metric]:
        takeovers = CounterMetricFamily(
            "fsha_takeovers", "Finished slot acquisitions, releases and rollbacks of this "
            "node, by result.", labels=["action", "slot", "result"])
        for (action, slot, result), n in sorted(self.count.items()):
            takeovers.add_metric([action, slot, result], n)
        yield takeovers
        total = HistogramMetricFamily(
            "fsha_takeover_duration_seconds", "Duration of a whole acquire/release/rollback "
            "of a slot on this node.", labels=["action"], unit="seconds")
        for action, h in sorted(self.total.items()):
            total.add_metric([action], h.buckets(), h.total)
        yield total
        last = GaugeMetricFamily(
            "fsha_takeover_last_duration_seconds", "Duration of the latest "
            "acquire/release/rollback of each slot on this node.", labels=["action", "slot"],
            unit="seconds")
        for (action, slot), seconds in sorted(self.last_seconds.items()):
            last.add_metric([action, slot], seconds)
        yield last
        steps = HistogramMetricFamily(
            "fsha_takeover_step_duration_seconds", "Duration of each step of a takeover "
            "(skipped steps are not observed).", labels=["action", "step"], unit="seconds")
        for (action, step), h in sorted(self.steps.items()):
            steps.add_metric([action, step], h.buckets(), h.total)
        yield steps
        outcomes = CounterMetricFamily(
            "fsha_takeover_steps", "Takeover steps by outcome (ok, warning, failed, skipped).",
            labels=["action", "step", "outcome"])
        for (action, step, outcome), n in sorted(self.outcomes.items()):
            outcomes.add_metric([action, step, outcome], n)
        yield outcomes


class RequestSource(Protocol):
    """What :class:`ESLRequestStats` listens to (``fsha.eslclient.ESLClient``)."""

    def add_request_listener(self, listener: Callable[[str, float, str], object]) -> None: ...


class ESLRequestStats:
    """Latency of the requests this node sends to its FreeSWITCH, per command.

    Fed by ``ESLClient.add_request_listener`` (one call per finished request, O(buckets)).
    Latencies are observed for answered requests only; timeouts and lost connections are
    counted by result. Bounded: at most :data:`MAX_ESL_COMMANDS` command labels.
    """

    def __init__(self, source: RequestSource | None = None) -> None:
        self.latency: dict[str, _Histogram] = {}
        self.results: dict[tuple[str, str], int] = {}
        if source is not None:
            source.add_request_listener(self.observe)

    def observe(self, command: str, seconds: float, result: str) -> None:
        if command not in self.latency and len(self.latency) >= MAX_ESL_COMMANDS:
            command = "other"
        key = (command, result)
        self.results[key] = self.results.get(key, 0) + 1
        hist = self.latency.get(command)
        if hist is None:
            hist = self.latency[command] = _Histogram(ESL_BUCKETS)
        if result == "ok":
            hist.observe(max(0.0, seconds))

    def collect(self) -> Iterator[Metric]:
        latency = HistogramMetricFamily(
            "fsha_freeswitch_esl_request_duration_seconds", "Round trip of the requests "
            "sent to the local FreeSWITCH over ESL (answered ones), per command.",
            labels=["command"], unit="seconds")
        for command, h in sorted(self.latency.items()):
            latency.add_metric([command], h.buckets(), h.total)
        yield latency
        results = CounterMetricFamily(
            "fsha_freeswitch_esl_requests", "Requests sent to the local FreeSWITCH over ESL, "
            "by command and result (ok, timeout, lost).", labels=["command", "result"])
        for (command, result), n in sorted(self.results.items()):
            results.add_metric([command, result], n)
        yield results


class _EventSource(Protocol):
    def add_event_listener(self, callback: Callable[[Any], object],
                           name: str | None = None) -> None: ...


class SessionWatch:
    """FreeSWITCH's session count, from its ``HEARTBEAT`` event (no extra API calls).

    ``SessionWatch(esl)`` listens to ``HEARTBEAT`` (the node's ESL client subscribes to it
    for its liveness watchdog). :meth:`status` is ``{"sessions": N, "max_sessions": M}``
    (None until the first heartbeat), merged into the ``freeswitch`` status section.
    """

    def __init__(self, esl: _EventSource | None = None) -> None:
        self.sessions: int | None = None
        self.max_sessions: int | None = None
        if esl is not None:
            esl.add_event_listener(self.heartbeat, "HEARTBEAT")

    def heartbeat(self, event: Any) -> None:
        self.sessions = _header_int(event.get("Session-Count"))
        self.max_sessions = _header_int(event.get("Max-Sessions"))

    def status(self) -> dict[str, int | None]:
        return {"sessions": self.sessions, "max_sessions": self.max_sessions}


def _header_int(value: str | None) -> int | None:
    """An integer header of a FreeSWITCH event (None: missing or not a number)."""
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


Sample = float | int | bool | None


class _Families:
    """Small helper: families created on first use; a None sample is left out (a figure
    not known yet: absent, not 0)."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def add(self, kind: str, name: str, doc: str, labels: Mapping[str, str] | None,
            value: Sample, unit: str = "") -> None:
        family = self._families.get(name)
        if family is None:
            label_names = list(labels) if labels else []
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = cls(name, doc, labels=label_names, unit=unit)
            self._families[name] = family
        if value is not None:
            family.add_metric(list(labels.values()) if labels else [], float(value))

    def gauge(self, name: str, doc: str, value: Sample, unit: str = "",
              **labels: str) -> None:
        self.add("gauge", name, doc, labels, value, unit)

    def counter(self, name: str, doc: str, value: Sample, **labels: str) -> None:
        self.add("counter", name, doc, labels, value)

    def declare(self, kind: str, name: str, doc: str, labels: Iterable[str],
                unit: str = "") -> None:
        """A family that appears (empty) even before it has a sample."""
        if name not in self._families:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            self._families[name] = cls(name, doc, labels=list(labels), unit=unit)

    def info(self, name: str, doc: str, value: dict[str, str]) -> None:
        family = InfoMetricFamily(name, doc)
        family.add_metric([], value)
        self._families[name] = family

    def families(self) -> Iterator[Metric]:
        yield from self._families.values()


@dataclass(frozen=True, slots=True)
class StatsSources:
    """Where the collector reads each component's typed stats, at scrape time (None: the
    component is not configured on this node)."""

    node: Callable[[], NodeStats]
    freeswitch: Callable[[], SwitchStats] | None = None
    sessions: SessionWatch | None = None
    replication: Callable[[], ReplicationStats] | None = None
    feeds: Callable[[], FeedsStats] | None = None
    takeover: Callable[[], EffectsStats] | None = None
    fsevents: Callable[[], EventsStats] | None = None
    control: Callable[[], ControlStats] | None = None
    durable: Callable[[], DurableStats] | None = None
    limits: Callable[[], LimitStats] | None = None
    redis: Callable[[], RedisStats] | None = None
    catchup: Callable[[], CatchUpStats] | None = None


class ClusterCollector:
    """A ``prometheus_client`` collector over the typed stats of a node's components."""

    def __init__(self, sources: StatsSources, stats: TakeoverStats | None = None,
                 esl: ESLRequestStats | None = None) -> None:
        self.sources = sources
        self.stats = stats
        self.esl = esl

    def collect(self) -> Iterator[Metric]:
        src = self.sources
        f = _Families()
        node = src.node()
        self._node(node, f)
        self._peers(node, f)
        if src.freeswitch is not None:
            self._freeswitch(src.freeswitch(), src.sessions, f)
        self._replication(src.replication() if src.replication is not None else None, f)
        if src.feeds is not None:
            self._feeds(src.feeds(), f)
        if src.takeover is not None:
            self._takeover(src.takeover(), f)
        if src.fsevents is not None:
            self._fsevents(src.fsevents(), f)
        if src.limits is not None:
            self._limits(src.limits(), f)
        if src.redis is not None:
            self._redis(src.redis(), f)
        if src.durable is not None:
            self._durable(src.durable(), f)
        if src.control is not None:
            self._control(src.control(), f)
        if src.catchup is not None:
            self._catchup(src.catchup(), f)
        yield from f.families()
        if self.stats is not None:
            yield from self.stats.collect()
        if self.esl is not None:
            yield from self.esl.collect()

    # -- sections ---------------------------------------------------------------------

    @staticmethod
    def _node(st: NodeStats, f: _Families) -> None:
        f.info("fsha_node", "This node: cluster and node name, incarnation.",
               {"cluster": st.cluster, "node": st.node, "incarnation": str(st.incarnation)})
        f.gauge("fsha_uptime_seconds", "Seconds since this node started.", st.uptime_s,
                unit="seconds")
        for r in ROLES:
            f.gauge("fsha_role", "This node's role (1 for the current one).",
                    r == st.role, role=r)
        f.gauge("fsha_epoch", "Epoch of the slot this node holds or claims (0: none).",
                st.epoch)
        quorum = st.quorum
        f.gauge("fsha_quorum_required", "Nodes this node must see alive (itself included) "
                "to take over.", quorum.required)
        f.gauge("fsha_quorum_alive_nodes", "Nodes this node counts toward quorum (heard and "
                "live now), itself included.", quorum.alive)
        f.gauge("fsha_quorum_ok", "1 if this node sees a quorum.", quorum.ok)
        f.declare("gauge", "fsha_lease_remaining_seconds", "How long this master's lease "
                  "runs without another quorum support (absent: no slot held, or quorum 1).",
                  [], unit="seconds")
        f.gauge("fsha_lease_remaining_seconds", "", _seconds(quorum.lease_left_ms))
        f.gauge("fsha_heartbeat_interval_seconds", "Configured heartbeat interval.",
                st.heartbeat_interval_ms / 1000, unit="seconds")
        f.gauge("fsha_dead_after_seconds", "Silence after which a peer is declared down.",
                st.dead_after_ms / 1000, unit="seconds")
        f.counter("fsha_heartbeats_received", "Datagrams received on every network (accepted "
                  "or dropped).", st.received)
        f.declare("counter", "fsha_datagrams_dropped", "Datagrams dropped, by reason.",
                  ["reason"])
        for reason, n in sorted(st.drops.items()):
            f.counter("fsha_datagrams_dropped", "", n, reason=reason)
        for net in st.networks:
            f.counter("fsha_heartbeats_sent", "Datagrams sent, per network.", net.sent,
                      network=net.name)
            f.counter("fsha_heartbeat_send_errors", "Datagrams that could not be sent "
                      "(e.g. NIC down), per network.", net.send_errors, network=net.name)
        for slot in st.slots:
            f.gauge("fsha_slot_owned", "1 if the slot has a master in this node's view.",
                    slot.owner is not None, slot=slot.name)
            f.declare("gauge", "fsha_slot_owner", "The slot's master in this node's view "
                      "(1 for the owner).", ["slot", "node"])
            if slot.owner is not None:
                f.gauge("fsha_slot_owner", "", 1, slot=slot.name, node=slot.owner)
            f.gauge("fsha_slot_epoch", "The slot's epoch in this node's view.", slot.epoch,
                    slot=slot.name)

    @staticmethod
    def _peers(st: NodeStats, f: _Families) -> None:
        for node in st.nodes:
            name = node.name
            for r in (*ROLES, "unknown"):
                f.gauge("fsha_node_role", "Each node's role as this node sees it (1 for the "
                        "current one; unknown: not heard).", r == node.role,
                        node=name, role=r)
            f.gauge("fsha_node_alive", "1 if the node is alive in this node's view.",
                    node.alive, node=name)
            f.declare("gauge", "fsha_node_rank", "Slave ranking position (0: primary "
                      "candidate); absent for masters.", ["node"])
            f.gauge("fsha_node_rank", "", node.rank, node=name)
            f.gauge("fsha_node_epoch", "Epoch each node announces for its slot.",
                    node.epoch, node=name)
            if node.is_self:
                continue
            f.gauge("fsha_peer_view_agrees", "1 if the peer computed the same roles.",
                    node.view_agrees, peer=name)
            f.gauge("fsha_peer_live", "1 if the peer is heard and has shown it is live now "
                    "(counts toward quorum).", node.live, peer=name)
            f.gauge("fsha_peer_same_config", "1 if the peer runs this node's config file "
                    "(0: a rollout under way).", node.config == "same", peer=name)
            f.counter("fsha_peer_restarts", "Restarts (new incarnations) of the peer seen.",
                      node.restarts, peer=name)
            for net, h in sorted(node.networks.items()):
                f.gauge("fsha_peer_network_up", "1 while the peer's heartbeats arrive on "
                        "this network.", h.up, peer=name, network=net)
                f.declare("gauge", "fsha_peer_network_last_heard_seconds",
                          "Age of the peer's latest heartbeat on this network (absent: "
                          "never heard).", ["peer", "network"], unit="seconds")
                f.gauge("fsha_peer_network_last_heard_seconds", "",
                        _seconds(h.last_heard_ms), peer=name, network=net)
                f.declare("gauge", "fsha_peer_network_rtt_seconds",
                          "Round trip to the peer on this network, smoothed, from heartbeat "
                          "echoes (absent: no sample yet).", ["peer", "network"],
                          unit="seconds")
                f.gauge("fsha_peer_network_rtt_seconds", "", _seconds(h.rtt_ms), peer=name,
                        network=net)
            f.declare("gauge", "fsha_peer_heartbeat_version", "Heartbeat protocol version "
                      "the peer was last heard speaking.", ["peer"])
            f.gauge("fsha_peer_heartbeat_version", "", node.heartbeat_version, peer=name)

    @staticmethod
    def _freeswitch(fs: SwitchStats, sessions: SessionWatch | None, f: _Families) -> None:
        for s in ESL_STATES:
            f.gauge("fsha_freeswitch_esl_state", "ESL connection state to the local "
                    "FreeSWITCH (1 for the current one).", s == fs.state, state=s)
        f.gauge("fsha_freeswitch_up", "1 while the local FreeSWITCH answers over ESL.", fs.ok)
        f.counter("fsha_freeswitch_esl_connections", "ESL connections made.", fs.connections)
        f.counter("fsha_freeswitch_restarts", "FreeSWITCH restarts seen (new Core-UUID).",
                  fs.restarts)
        f.counter("fsha_freeswitch_malformed_core_uuids", "Core-UUIDs received that are "
                  "not UUIDs (ignored, not taken as a restart).", fs.malformed_core_uuids)
        f.declare("gauge", "fsha_freeswitch_sessions", "Sessions in the local FreeSWITCH "
                  "(from its HEARTBEAT event).", [])
        f.declare("gauge", "fsha_freeswitch_max_sessions", "FreeSWITCH's max-sessions.", [])
        if sessions is not None:
            f.gauge("fsha_freeswitch_sessions", "", sessions.sessions)
            f.gauge("fsha_freeswitch_max_sessions", "", sessions.max_sessions)

    @staticmethod
    def _replication(rep: ReplicationStats | None, f: _Families) -> None:
        f.gauge("fsha_replication_enabled", "1 if replication is configured ([tls]).",
                rep is not None)
        if rep is None:
            return
        f.declare("gauge", "fsha_replication_records", "Replicated records held, per slot "
                  "and kind.", ["slot", "kind"])
        for slot, kinds in sorted(rep.slots.items()):
            for kind, n in sorted(kinds.items()):
                f.gauge("fsha_replication_records", "", n, slot=slot, kind=kind)
        f.counter("fsha_replication_links_established", "Replication links established.",
                  rep.links.established)
        f.declare("counter", "fsha_replication_links_refused", "Replication links refused, "
                  "by reason.", ["reason"])
        for reason, n in sorted(rep.links.refused.items()):
            f.counter("fsha_replication_links_refused", "", n, reason=reason)
        for peer, p in sorted(rep.peers.items()):
            session = p.session
            f.gauge("fsha_replication_peer_up", "1 while the replication session with the "
                    "peer is up.", p.up, peer=peer)
            f.declare("gauge", "fsha_replication_lag_changes", "Changes sent to the peer "
                      "and not yet acknowledged.", ["peer"])
            f.declare("gauge", "fsha_replication_lag_seconds", "Age of the oldest change "
                      "not yet acknowledged by the peer.", ["peer"], unit="seconds")
            f.declare("gauge", "fsha_replication_rtt_seconds", "Round-trip time of the "
                      "replication session.", ["peer"], unit="seconds")
            if session is not None:  # what the peer lacks is unknown without a session
                f.gauge("fsha_replication_lag_changes", "", session.lag_changes, peer=peer)
                f.gauge("fsha_replication_lag_seconds", "", session.lag_ms / 1000,
                        unit="seconds", peer=peer)
                f.gauge("fsha_replication_rtt_seconds", "", _seconds(session.rtt_ms),
                        unit="seconds", peer=peer)
            f.counter("fsha_replication_changes_sent", "Changes sent to the peer.",
                      session.changes_sent if session is not None else 0, peer=peer)
            f.counter("fsha_replication_changes_applied", "Changes from the peer applied.",
                      session.changes_applied if session is not None else 0, peer=peer)
            f.counter("fsha_replication_received_bytes", "Bytes received from the peer.",
                      p.bytes_in, peer=peer)
            f.counter("fsha_replication_sent_bytes", "Bytes sent to the peer.",
                      p.bytes_out, peer=peer)
            f.declare("counter", "fsha_replication_sessions_closed", "Replication sessions "
                      "with the peer dropped, by reason (a gap in the changes, silence, a "
                      "bad frame...).", ["peer", "reason"])
            for reason, n in sorted(p.closed.items()):
                f.counter("fsha_replication_sessions_closed", "", n, peer=peer, reason=reason)
            f.declare("counter", "fsha_replication_dial_failures", "Failed dials to the peer, "
                      "by network or reason.", ["peer", "reason"])
            for reason, n in sorted(p.dial_failures.items()):
                f.counter("fsha_replication_dial_failures", "", n, peer=peer, reason=reason)
            f.declare("counter", "fsha_replication_duplicate_changes", "Changes from the peer "
                      "already applied (dropped as duplicates).", ["peer"])
            if session is not None:
                f.counter("fsha_replication_duplicate_changes", "", session.duplicates,
                          peer=peer)

    @staticmethod
    def _feeds(feeds: FeedsStats, f: _Families) -> None:
        for slot, s in sorted(feeds.slots.items()):
            f.gauge("fsha_feed_calls", "Calls of a slot this node masters, fed to the peers.",
                    s.calls, slot=slot)
            f.gauge("fsha_feed_registrations", "Registrations of a slot this node masters, "
                    "fed to the peers.", s.registrations, slot=slot)
            f.counter("fsha_feed_errors", "Errors reading the local FreeSWITCH's state.",
                      s.errors, slot=slot)
            f.counter("fsha_feed_rows_rejected", "Rows not replicated (malformed).",
                      s.rows_rejected, slot=slot)

    @staticmethod
    def _takeover(tk: EffectsStats, f: _Families) -> None:
        f.gauge("fsha_takeover_global_standby", "1 while sofia global standby is on.",
                tk.global_standby)
        f.gauge("fsha_takeover_pending_profile_stops", "Slot profiles whose stop is being "
                "retried.", len(tk.pending_profile_stops))

    @staticmethod
    def _fsevents(ev: EventsStats, f: _Families) -> None:
        f.counter("fsha_fsevents_sent", "Cluster events fired into the local FreeSWITCH.",
                  ev.sent)
        f.gauge("fsha_fsevents_queued", "Cluster events waiting to be fired.", ev.queued)
        f.declare("counter", "fsha_fsevents_dropped", "Cluster events not delivered to "
                  "FreeSWITCH, by reason.", ["reason"])
        for reason, n in sorted(ev.dropped.items()):
            f.counter("fsha_fsevents_dropped", "", n, reason=reason)

    @staticmethod
    def _limits(lim: LimitStats, f: _Families) -> None:
        f.declare("gauge", "fsha_limit_usage", "Cluster-wide usage of a hash limit key "
                  "(realm_resource): every node's FreeSWITCH plus adopted calls.", ["key"])
        for key, n in sorted(lim.totals.items()):
            f.gauge("fsha_limit_usage", "", n, key=key)
        f.declare("gauge", "fsha_limit_node_usage", "A node's share of a hash limit key.",
                  ["node", "key"])
        for node, share in sorted(lim.per_node.items()):
            for key, n in sorted(share.items()):
                f.gauge("fsha_limit_node_usage", "", n, node=node, key=key)
        f.gauge("fsha_limit_adopted_calls", "Calls this node recovered from a dead master "
                "and releases itself at hangup.", lim.adopted)
        f.gauge("fsha_limit_pending_releases", "Hiredis units waiting to be released in "
                "Redis by this node.", lim.pending_releases)
        f.declare("counter", "fsha_limit_releases", "Hiredis units released in Redis, by "
                  "outcome (released, already: another node did it, missing, clamped).",
                  ["outcome"])
        for outcome, n in sorted(lim.released.items()):
            f.counter("fsha_limit_releases", "", n, outcome=outcome)
        f.counter("fsha_limit_release_errors", "Releases that failed (retried).",
                  lim.release_errors)
        f.counter("fsha_limit_poll_errors", "Failed polls of hash_dump limit.",
                  lim.poll_errors)

    @staticmethod
    def _redis(r: RedisStats, f: _Families) -> None:
        f.gauge("fsha_redis_up", "1 while the Redis connection is usable.", r.state == "up")
        f.counter("fsha_redis_commands", "Redis commands sent.", r.commands)
        f.counter("fsha_redis_failures", "Redis commands that failed (incl. not sent while "
                  "down).", r.failures)
        f.counter("fsha_redis_timeouts", "Redis commands past their deadline.", r.timeouts)
        f.counter("fsha_redis_connects", "Redis connections made.", r.connects)

    @staticmethod
    def _control(c: ControlStats, f: _Families) -> None:
        f.declare("counter", "fsha_control_requests", "Control requests (fsha maintenance, "
                  "switchover) judged: accepted, or refused by HTTP status.", ["result"])
        f.counter("fsha_control_requests", "", c.accepted, result="accepted")
        for code, n in c.refused.items():
            f.counter("fsha_control_requests", "", n, result=code)

    @staticmethod
    def _catchup(c: CatchUpStats, f: _Families) -> None:
        f.declare("counter", "fsha_config_catchup", "Newer config files from a peer "
                  "(fsha.configfetch): taken (written), or refused (never written).",
                  ["result"])
        f.counter("fsha_config_catchup", "", c.taken, result="taken")
        f.counter("fsha_config_catchup", "", c.refused, result="refused")

    @staticmethod
    def _durable(d: DurableStats, f: _Families) -> None:
        f.gauge("fsha_durable_in_sync", "1 while Redis holds this node's origin at its "
                "current position (durable store).", d.state == "in-sync")
        f.gauge("fsha_durable_lag_changes", "Changes of this node's origin not yet in Redis "
                "(absent while a full resync is due).", d.lag_changes)
        f.counter("fsha_durable_writes", "Writes of the durable store (incremental and full).",
                  d.flushes)
        f.counter("fsha_durable_resyncs", "Full resyncs of this node's origin into Redis.",
                  d.resyncs)
        f.counter("fsha_durable_write_errors", "Durable store writes that failed.",
                  d.write_errors)
        f.gauge("fsha_durable_loaded_records", "Records loaded from Redis at start.",
                d.load.records)

def metrics_registry(sources: StatsSources, effects: ReportSource | None = None,
                     esl: RequestSource | None = None) -> CollectorRegistry:
    """A registry of its own (never the process-global one) holding one collector."""
    registry = CollectorRegistry(auto_describe=False)
    stats = TakeoverStats(effects) if effects is not None else None
    requests = ESLRequestStats(esl) if esl is not None else None
    registry.register(ClusterCollector(sources, stats, requests))  # type: ignore[arg-type]
    return registry


class MetricsResource(Resource):
    """``GET /metrics``: the exposition format (OpenMetrics if the scraper asks for it)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept") or ""
        encoder, content_type = choose_encoder(accept)
        try:
            output = encoder(self.registry)
        except Exception:
            log.failure("generating /metrics failed")
            request.setResponseCode(500)
            request.setHeader("content-type", "text/plain; charset=utf-8")
            return b"metrics unavailable: see the node's log\n"
        request.setHeader("content-type", content_type)
        return output

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)


def metrics_resource(sources: StatsSources, effects: ReportSource | None,
                     esl: RequestSource | None = None) -> Resource:
    """The ``/metrics`` resource over ``sources`` (the typed stats of the node's
    components), ``effects`` (the ``SlotEffects`` whose takeover reports feed the
    histograms; None: no takeover histograms) and ``esl`` (the ESL client whose requests
    are timed)."""
    return MetricsResource(metrics_registry(sources, effects, esl))
