"""/metrics: the exposition parsed back with prometheus_client's own parsers."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from fsha.durable import DurableLoad, DurableStats
from fsha.fsevents import EventsStats
from fsha.health import SwitchStats
from fsha.limitservice import LimitStats
from fsha.metrics import (
    ClusterCollector,
    ESLRequestStats,
    SessionWatch,
    StatsSources,
    TakeoverStats,
    metrics_registry,
    metrics_resource,
)
from fsha.nodecontrol import ControlStats
from fsha.nodestats import (
    MemberStats,
    NetworkView,
    NodeStats,
    QuorumStats,
    SenderStats,
    SlotStats,
)
from fsha.redisclient import RedisStats
from fsha.replication.stats import (
    FeedSlotStats,
    FeedsStats,
    LinkCounts,
    PeerStats,
    ReplicationStats,
    SessionStats,
)
from fsha.takeover import FAILED, OK, SKIPPED, WARNING, StepResult, TakeoverReport
from fsha.takeover.effects import EffectsStats
from fsha.wire.esl import Event, Headers

from .fakecluster import SECRET, FakeCluster, make_config

NODE = NodeStats(
    cluster="prod", node="fs1", incarnation=1234, role="master", slot="slot1", epoch=7,
    uptime_s=12.5,
    quorum=QuorumStats(required=2, alive=3, ok=True, spec="majority", lease_ms=600.0,
                       lease_left_ms=None, claim_hold=None),
    config_digest="ab" * 16, view_digest="cd" * 16, heartbeat_interval_ms=50.0,
    dead_after_ms=200.0, dead_after_min_ms=200.0, ranking=["fs3"],
    nodes=[
        MemberStats(name="fs1", priority=100, rank=None, is_self=True, alive=True, live=True,
                    config="same", hears=["fs2"], role="master", slot="slot1", epoch=7,
                    incarnation=1234, flags=[], view_agrees=True, networks={}),
        MemberStats(name="fs2", priority=100, rank=None, is_self=False, alive=True,
                    live=True, config="same", hears=["fs1"], role="master", slot="slot2",
                    epoch=3, incarnation=99, flags=[], view_agrees=True, restarts=2,
                    heartbeat_version=2,
                    networks={"A": NetworkView(True, 12.0, 0.25),
                              "B": NetworkView(False, 4500.0, None)}),
        MemberStats(name="fs3", priority=50, rank=0, is_self=False, alive=False, live=False,
                    config="other", hears=None, role="unknown", slot=None, epoch=None,
                    incarnation=None, flags=[], view_agrees=False, restarts=0,
                    networks={"A": NetworkView(False, None, None),
                              "B": NetworkView(False, None, None)}),
    ],
    slots=[SlotStats("slot1", "fs1", 7, ["internal"], []),
           SlotStats("slot2", None, 3, ["external"], [])],
    networks=[SenderStats("A", 100, 0, ""), SenderStats("B", 90, 10, "unreachable")],
    received=555, drops={"tag": 4, "wrong-source": 1}, recent_drops={},
    events=[{"time": 1.0, "event": "role", "role": "master"}])


def _session(**kw: Any) -> SessionStats:
    base: dict[str, Any] = dict(
        lag_changes=0, lag_ms=0.0, last_ack_lag_ms=None, rtt_ms=None, changes_sent=0,
        changes_applied=0, duplicates=0, snapshots_sent=0, snapshots_applied=0,
        in_flight_changes=0, in_flight_bytes=0, paused=False, catching_up=[])
    return SessionStats(**{**base, **kw})


def _peer(**kw: Any) -> PeerStats:
    base: dict[str, Any] = dict(
        up=False, dials=True, network=None, address=None, identity=None, up_for_s=None,
        connects=0, bytes_in=0, bytes_out=0, dial_failures={}, closed={}, last_error="",
        last_end=None, session=None)
    return PeerStats(**{**base, **kw})


REPLICATION = ReplicationStats(
    node="fs1", incarnation=1234, listening=[], digest="ef" * 16, records=12,
    positions={}, slots={"slot1": {"call": 10, "registration": 2}},
    links=LinkCounts(established=5, refused={"bad-cert": 1}, unexpected_inbound=0,
                     bytes_in=1, bytes_out=2),
    peers={"fs2": _peer(up=True, bytes_in=1000, bytes_out=2000,
                        identity={"cn": "identity-of-fs2"}, closed={"gap": 1, "silent": 2},
                        dial_failures={"A": 3},
                        session=_session(lag_changes=3, lag_ms=25.0, rtt_ms=0.5,
                                         changes_sent=100, changes_applied=90,
                                         duplicates=4)),
           "fs3": _peer()})

FEEDS = FeedsStats(
    running=True, core_db=None, registration_db=None, calls_enabled=True,
    registration_table=True,
    slots={"slot1": FeedSlotStats(calls=10, registrations=2, identity=None,
                                  last_sweep_ms_ago=None, last_registration_sweep_ms_ago=None,
                                  rows_rejected=0, puts=0, deletes=0, errors=1,
                                  last_error=None, fed_for_s=1.0)},
    rows_ignored=0, ignored_profiles=[], events_ignored=0, lookups=0, lookup_misses=0,
    pending_lookups=0, sweeps=0, registration_sweeps=0, db_busy=False, errors=0,
    last_error=None)

SWITCH = SwitchStats(state="ready", ok=True, core_uuid="u-1", last_error=None, connections=3,
                     restarts=1, late_replies=0, malformed_core_uuids=2, busy=False,
                     probe=None)


def _sessions(count: int | None, most: int | None) -> SessionWatch:
    watch = SessionWatch()
    watch.sessions, watch.max_sessions = count, most
    return watch


SAMPLE = StatsSources(
    node=lambda: NODE, freeswitch=lambda: SWITCH, sessions=_sessions(42, 1000),
    replication=lambda: REPLICATION, feeds=lambda: FEEDS,
    takeover=lambda: EffectsStats(None, [0], [], False),
    fsevents=lambda: EventsStats(True, 9, 1, {"freeswitch-down": 2}, None, 9, []),
    control=lambda: ControlStats(3, {"401": 2, "421": 1}, 3))


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted labels: value}."""
    result: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return result


def scrape(sources: StatsSources, effects: Any = None) -> tuple[str, dict[str, Any]]:
    resource = metrics_resource(sources, effects)
    request = DummyRequest([b""])
    body = resource.render(request)
    text = body.decode() if isinstance(body, bytes) else b"".join(request.written).decode()
    return text, parse(text)


def one(samples: dict[str, Any], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


class FakeEffects:
    def __init__(self) -> None:
        self.listeners: list[Any] = []

    def add_report_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def publish(self, report: TakeoverReport) -> None:
        for listener in self.listeners:
            listener(report)


def report(action: str, slot: str, ok: bool, total_ms: float,
           steps: list[tuple[str, str, float]]) -> TakeoverReport:
    r = TakeoverReport(action, slot, 2, "fs1", 0.0, ok=ok, total_ms=total_ms)
    r.steps = [StepResult(name, outcome, ms) for name, outcome, ms in steps]
    return r


class CollectorTests(SynchronousTestCase):
    def test_values_from_a_status(self) -> None:
        text, m = scrape(SAMPLE)
        self.assertEqual(one(m, "fsha_node_info", cluster="prod", node="fs1",
                             incarnation="1234"), 1)
        self.assertEqual(one(m, "fsha_role", role="master"), 1)
        self.assertEqual(one(m, "fsha_role", role="slave"), 0)
        self.assertEqual(one(m, "fsha_epoch"), 7)
        self.assertEqual(one(m, "fsha_quorum_alive_nodes"), 3)
        self.assertEqual(one(m, "fsha_quorum_ok"), 1)
        self.assertEqual(one(m, "fsha_dead_after_seconds"), 0.2)
        # per peer, per network: liveness and age
        self.assertEqual(one(m, "fsha_peer_network_up", peer="fs2", network="A"), 1)
        self.assertEqual(one(m, "fsha_peer_network_up", peer="fs2", network="B"), 0)
        self.assertEqual(one(m, "fsha_peer_network_last_heard_seconds", peer="fs2",
                             network="B"), 4.5)
        self.assertNotIn((("network", "A"), ("peer", "fs3")),
                         m["fsha_peer_network_last_heard_seconds"])  # never heard: absent
        self.assertEqual(one(m, "fsha_peer_network_rtt_seconds", peer="fs2", network="A"),
                         0.00025)
        self.assertNotIn((("network", "B"), ("peer", "fs2")),
                         m["fsha_peer_network_rtt_seconds"])  # no sample: absent
        self.assertEqual(one(m, "fsha_peer_heartbeat_version", peer="fs2"), 2)
        self.assertEqual(one(m, "fsha_peer_restarts_total", peer="fs2"), 2)
        self.assertEqual(one(m, "fsha_replication_sessions_closed_total", peer="fs2",
                             reason="silent"), 2)
        self.assertEqual(one(m, "fsha_replication_dial_failures_total", peer="fs2",
                             reason="A"), 3)
        self.assertEqual(one(m, "fsha_replication_duplicate_changes_total", peer="fs2"), 4)
        self.assertEqual(one(m, "fsha_node_alive", node="fs3"), 0)
        self.assertEqual(one(m, "fsha_node_role", node="fs3", role="unknown"), 1)
        self.assertEqual(one(m, "fsha_node_role", node="fs2", role="master"), 1)
        self.assertEqual(one(m, "fsha_node_rank", node="fs3"), 0)
        self.assertNotIn((("node", "fs1"),), m["fsha_node_rank"])
        # drops by reason, datagrams per network
        self.assertEqual(one(m, "fsha_datagrams_dropped_total", reason="tag"), 4)
        self.assertEqual(one(m, "fsha_datagrams_dropped_total", reason="wrong-source"), 1)
        self.assertEqual(one(m, "fsha_heartbeat_send_errors_total", network="B"), 10)
        self.assertEqual(one(m, "fsha_heartbeats_received_total"), 555)
        # slots
        self.assertEqual(one(m, "fsha_slot_owner", slot="slot1", node="fs1"), 1)
        self.assertEqual(one(m, "fsha_slot_owned", slot="slot2"), 0)
        self.assertEqual(len(m["fsha_slot_owner"]), 1)
        self.assertEqual(one(m, "fsha_slot_epoch", slot="slot2"), 3)
        # FreeSWITCH
        self.assertEqual(one(m, "fsha_freeswitch_esl_state", state="ready"), 1)
        self.assertEqual(one(m, "fsha_freeswitch_esl_state", state="connecting"), 0)
        self.assertEqual(one(m, "fsha_freeswitch_up"), 1)
        self.assertEqual(one(m, "fsha_freeswitch_sessions"), 42)
        self.assertEqual(one(m, "fsha_freeswitch_restarts_total"), 1)
        self.assertEqual(one(m, "fsha_freeswitch_malformed_core_uuids_total"), 2)
        # control requests
        self.assertEqual(one(m, "fsha_control_requests_total", result="accepted"), 3)
        self.assertEqual(one(m, "fsha_control_requests_total", result="401"), 2)
        self.assertEqual(one(m, "fsha_control_requests_total", result="421"), 1)
        # replication
        self.assertEqual(one(m, "fsha_replication_enabled"), 1)
        self.assertEqual(one(m, "fsha_replication_records", slot="slot1", kind="call"), 10)
        self.assertEqual(one(m, "fsha_replication_lag_changes", peer="fs2"), 3)
        self.assertEqual(one(m, "fsha_replication_lag_seconds", peer="fs2"), 0.025)
        self.assertNotIn((("peer", "fs3"),), m["fsha_replication_lag_seconds"])
        self.assertEqual(one(m, "fsha_replication_peer_up", peer="fs3"), 0)
        self.assertEqual(one(m, "fsha_replication_links_refused_total", reason="bad-cert"), 1)
        self.assertEqual(one(m, "fsha_replication_sent_bytes_total", peer="fs2"), 2000)
        self.assertEqual(one(m, "fsha_feed_calls", slot="slot1"), 10)
        self.assertEqual(one(m, "fsha_takeover_pending_profile_stops"), 1)
        self.assertEqual(one(m, "fsha_fsevents_dropped_total", reason="freeswitch-down"), 2)
        self.assertEqual(one(m, "fsha_fsevents_sent_total"), 9)
        # never a digest, a core UUID or a replication identity
        for leaked in ("abababab", "efefefef", "u-1", "identity-of-fs2"):
            self.assertNotIn(leaked, text)

    def test_components_not_configured_have_no_samples(self) -> None:
        _, m = scrape(StatsSources(node=lambda: NODE))
        self.assertEqual(one(m, "fsha_replication_enabled"), 0)
        self.assertNotIn("fsha_replication_lag_changes", m)
        self.assertNotIn("fsha_freeswitch_up", m)
        self.assertNotIn("fsha_fsevents_sent_total", m)
        self.assertEqual(one(m, "fsha_role", role="master"), 1)

    def test_a_real_node_after_a_takeover(self) -> None:
        cluster = FakeCluster(make_config(nodes=3, slots=2))
        cluster.start_all()
        cluster.advance(cluster.config.discovery + 0.5)
        cluster.kill("fs1")
        cluster.advance(1.0)
        node = cluster.nodes["fs3"]
        text, m = scrape(StatsSources(node=node.stats))
        self.assertEqual(one(m, "fsha_role", role="master"), 1)
        self.assertEqual(one(m, "fsha_slot_owner", slot="slot1", node="fs3"), 1)
        self.assertEqual(one(m, "fsha_slot_epoch", slot="slot1"), 2)
        self.assertEqual(one(m, "fsha_node_alive", node="fs1"), 0)
        self.assertEqual(one(m, "fsha_peer_network_up", peer="fs1", network="A"), 0)
        self.assertGreaterEqual(one(m, "fsha_peer_network_last_heard_seconds", peer="fs1",
                                    network="B"), 0.9)
        self.assertEqual(one(m, "fsha_quorum_alive_nodes"), 2)
        self.assertGreater(one(m, "fsha_peer_network_rtt_seconds", peer="fs2", network="A"),
                           0)  # a real node's echoes, through the fake network
        self.assertNotIn(SECRET.decode(), text)
        # the status is the same object's: what /status says, /metrics says
        status = node.stats().as_status()
        self.assertEqual(status, node.status())
        self.assertEqual(one(m, "fsha_quorum_alive_nodes"), status["quorum"]["alive"])

    def test_takeover_histograms(self) -> None:
        effects = FakeEffects()
        resource = metrics_resource(StatsSources(node=lambda: NODE), effects)
        effects.publish(report("acquire", "slot1", True, 40.0, [
            ("self_check", OK, 2.0), ("fence", SKIPPED, 0.0), ("floating_ips", OK, 7.0),
            ("recover", WARNING, 30.0)]))
        effects.publish(report("acquire", "slot1", False, 1500.0, [
            ("self_check", OK, 3.0), ("floating_ips", FAILED, 1497.0)]))
        effects.publish(report("release", "slot2", True, 4.0, [("floating_ips", OK, 4.0)]))
        request = DummyRequest([b""])
        m = parse(resource.render(request).decode())
        self.assertEqual(one(m, "fsha_takeovers_total", action="acquire", slot="slot1",
                             result="ok"), 1)
        self.assertEqual(one(m, "fsha_takeovers_total", action="acquire", slot="slot1",
                             result="failed"), 1)
        self.assertEqual(one(m, "fsha_takeover_duration_seconds_count", action="acquire"), 2)
        self.assertAlmostEqual(one(m, "fsha_takeover_duration_seconds_sum", action="acquire"),
                               1.54)
        self.assertEqual(one(m, "fsha_takeover_duration_seconds_bucket", action="acquire",
                             le="0.05"), 1)
        self.assertEqual(one(m, "fsha_takeover_duration_seconds_bucket", action="acquire",
                             le="2.5"), 2)
        self.assertEqual(one(m, "fsha_takeover_duration_seconds_bucket", action="acquire",
                             le="+Inf"), 2)
        self.assertEqual(one(m, "fsha_takeover_step_duration_seconds_count",
                             action="acquire", step="floating_ips"), 2)
        self.assertEqual(one(m, "fsha_takeover_step_duration_seconds_bucket",
                             action="acquire", step="floating_ips", le="0.01"), 1)
        self.assertNotIn((("action", "acquire"), ("le", "+Inf"), ("step", "fence")),
                         m["fsha_takeover_step_duration_seconds_bucket"])
        self.assertEqual(one(m, "fsha_takeover_steps_total", action="acquire", step="fence",
                             outcome="skipped"), 1)
        self.assertEqual(one(m, "fsha_takeover_steps_total", action="acquire",
                             step="floating_ips", outcome="failed"), 1)
        self.assertEqual(one(m, "fsha_takeover_last_duration_seconds", action="release",
                             slot="slot2"), 0.004)

    def test_takeover_stats_from_real_slot_effects(self) -> None:
        from twisted.internet.task import Clock

        from fsha.floating import FloatingIPBackend
        from fsha.takeover import SlotEffects

        class Floating(FloatingIPBackend):  # type: ignore[misc]
            def __init__(self) -> None:
                pass

        effects = SlotEffects(Floating(), Clock())
        stats = TakeoverStats(effects)
        effects._publish(report("acquire", "slot1", True, 12.0, [("floating_ips", OK, 12.0)]))
        self.assertEqual(stats.count, {("acquire", "slot1", "ok"): 1})

    def test_session_count_from_freeswitch_heartbeat(self) -> None:
        watch = SessionWatch()
        self.assertEqual(watch.status(), {"sessions": None, "max_sessions": None})
        watch.heartbeat(Event(Headers([("Event-Name", "HEARTBEAT"), ("Session-Count", "17"),
                                       ("Max-Sessions", "2000")])))
        self.assertEqual(watch.status(), {"sessions": 17, "max_sessions": 2000})
        watch.heartbeat(Event(Headers([("Event-Name", "HEARTBEAT"),
                                       ("Session-Count", "lots")])))
        self.assertEqual(watch.status(), {"sessions": None, "max_sessions": None})

    def test_esl_request_latency(self) -> None:
        class Source:
            def __init__(self) -> None:
                self.listeners: list[Any] = []

            def add_request_listener(self, listener: Any) -> None:
                self.listeners.append(listener)

        source = Source()
        resource = metrics_resource(SAMPLE, None, source)
        (observe,) = source.listeners
        observe("api status", 0.0004, "ok")
        observe("api status", 0.003, "ok")
        observe("api status", 5.0, "timeout")
        observe("api sofia", 0.2, "ok")
        observe("api sofia", 0.1, "lost")
        request = DummyRequest([b""])
        text = resource.render(request).decode()
        samples = parse(text)
        name = "fsha_freeswitch_esl_request_duration_seconds"
        self.assertEqual(one(samples, name + "_count", command="api status"), 2)
        self.assertAlmostEqual(one(samples, name + "_sum", command="api status"), 0.0034)
        self.assertEqual(one(samples, name + "_bucket", command="api status", le="0.0005"), 1)
        self.assertEqual(one(samples, name + "_bucket", command="api status", le="0.005"), 2)
        self.assertEqual(one(samples, name + "_bucket", command="api sofia", le="+Inf"), 1)
        self.assertEqual(one(samples, "fsha_freeswitch_esl_requests_total",
                             command="api status", result="timeout"), 1)
        self.assertEqual(one(samples, "fsha_freeswitch_esl_requests_total",
                             command="api sofia", result="lost"), 1)

    def test_esl_command_labels_are_bounded(self) -> None:
        stats = ESLRequestStats()
        for i in range(200):
            stats.observe(f"api cmd{i}", 0.001, "ok")
        self.assertLessEqual(len(stats.latency), 65)
        self.assertEqual(stats.latency["other"].n, 200 - 64)

    def test_collector_alone_in_a_registry(self) -> None:
        registry = metrics_registry(SAMPLE)
        self.assertEqual(registry.get_sample_value("fsha_role", {"role": "master"}), 1.0)
        names = {f.name for f in ClusterCollector(SAMPLE).collect()}
        self.assertIn("fsha_peer_network_up", names)


class TypedStatsTests(SynchronousTestCase):
    """Each component's metrics and JSON status come from one typed object."""

    def test_durable_metrics_from_its_stats(self) -> None:
        stats = DurableStats(
            state="behind", written=(7, 90), position=(7, 100), lag_changes=10,
            written_at=1.0, dirty_since=None, pending=3, max_pending=100, flushes=5,
            resyncs=1, overflows=0, records_written=120, write_errors=2, last_error=None,
            load=DurableLoad("applied", None, {}, 42, {}, {}, 0))
        registry = metrics_registry(replace(SAMPLE, durable=lambda: stats))
        value = registry.get_sample_value
        self.assertEqual(value("fsha_durable_in_sync"), 0.0)
        self.assertEqual(value("fsha_durable_lag_changes"), 10.0)
        self.assertEqual(value("fsha_durable_writes_total"), 5.0)
        self.assertEqual(value("fsha_durable_resyncs_total"), 1.0)
        self.assertEqual(value("fsha_durable_write_errors_total"), 2.0)
        self.assertEqual(value("fsha_durable_loaded_records"), 42.0)
        # the JSON status is the same object's
        self.assertEqual(stats.as_status()["written"], [7, 90])
        self.assertEqual(stats.as_status()["load"]["records"], 42)

    def test_limit_metrics_from_their_stats(self) -> None:
        stats = LimitStats(
            totals={"gw_out": 7}, per_node={"fs1": {"gw_out": 4}, "fs2": {"gw_out": 3}},
            superseded=[], adopted=2, adopted_cluster=2, hiredis_held={},
            pending_releases=1, pending_releases_cluster=1, pending_retakes=0, retaken={},
            retake_errors=0, held_calls=0, held_calls_cluster=0,
            released={"released": 5, "already": 1}, release_errors=3, adopted_released=0,
            polls=10, poll_errors=4, last_poll=None, hash_realm="fsha_limit",
            hash_writes=0, hash_errors=0, rejected_records=0, reconciles_waiting=0,
            last_reconciles=[], last_error=None, redis=None)
        value = metrics_registry(replace(SAMPLE, limits=lambda: stats)).get_sample_value
        self.assertEqual(value("fsha_limit_usage", {"key": "gw_out"}), 7.0)
        self.assertEqual(value("fsha_limit_node_usage", {"node": "fs2", "key": "gw_out"}), 3.0)
        self.assertEqual(value("fsha_limit_adopted_calls"), 2.0)
        self.assertEqual(value("fsha_limit_pending_releases"), 1.0)
        self.assertEqual(value("fsha_limit_releases_total", {"outcome": "already"}), 1.0)
        self.assertEqual(value("fsha_limit_release_errors_total"), 3.0)
        self.assertEqual(value("fsha_limit_poll_errors_total"), 4.0)
        self.assertEqual(stats.as_status()["totals"], {"gw_out": 7})
        self.assertEqual(len(stats.as_status()), 27)  # every field, as /status always had

    def test_redis_metrics_from_its_stats(self) -> None:
        stats = RedisStats("10.0.0.5:6379", True, 0, "down", 1.0, "refused", 2, 1, 30, 4, 3)
        value = metrics_registry(replace(SAMPLE, redis=lambda: stats)).get_sample_value
        self.assertEqual(value("fsha_redis_up"), 0.0)
        self.assertEqual(value("fsha_redis_commands_total"), 30.0)
        self.assertEqual(value("fsha_redis_failures_total"), 4.0)
        self.assertEqual(value("fsha_redis_timeouts_total"), 3.0)
        self.assertEqual(value("fsha_redis_connects_total"), 2.0)
        self.assertEqual(stats.as_status()["address"], "10.0.0.5:6379")

    def test_no_durable_store_no_durable_metrics(self) -> None:
        registry = metrics_registry(SAMPLE)
        self.assertIsNone(registry.get_sample_value("fsha_durable_in_sync"))


class ResourceTests(SynchronousTestCase):
    def test_text_format_content_type(self) -> None:
        resource = metrics_resource(SAMPLE, None)
        request = DummyRequest([b""])
        body = resource.render(request)
        content_type = request.responseHeaders.getRawHeaders(b"content-type")[0]
        self.assertTrue(content_type.startswith(b"text/plain; version="), content_type)
        self.assertIn(b"fsha_role{role=\"master\"} 1.0", body)

    def test_openmetrics_when_asked(self) -> None:
        resource = metrics_resource(SAMPLE, None)
        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"accept", [b"application/openmetrics-text"])
        body = resource.render(request).decode()
        content_type = request.responseHeaders.getRawHeaders(b"content-type")[0]
        self.assertTrue(content_type.startswith(b"application/openmetrics-text"))
        families = {f.name: f for f in openmetrics_families(body)}
        self.assertEqual(families["fsha_node"].type, "info")
        self.assertEqual(families["fsha_datagrams_dropped"].type, "counter")

    def test_a_failing_status_is_a_500_and_a_log_line(self) -> None:
        def broken() -> NodeStats:
            raise RuntimeError("boom")

        request = DummyRequest([b""])
        body = metrics_resource(StatsSources(node=broken), None).render(request)
        self.assertEqual(request.responseCode, 500)
        self.assertIn(b"metrics unavailable", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
