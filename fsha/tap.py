"""``twistd fsha``: options and the service tree of one cluster node.

    twistd -n fsha --config /etc/fsha/cluster.toml [--node fs1]

A config problem ends the process with status 2 and one line naming the file and key.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import sys
import time
from typing import Any

from twisted.application import internet, service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from fsha import startup
from fsha.config import (
    ClusterConfig,
    ConfigError,
    NodeConfig,
    check_tls_files,
    choose_node,
    load_config,
    read_redis_password,
    timing_warnings,
)
from fsha.configfetch import ConfigCatchUp
from fsha.configstage import ConfigStager
from fsha.durable import DurableStore, key_prefix
from fsha.egress import EgressFence, FenceStatus, NftEgressFence
from fsha.eslclient import ConnectionState
from fsha.floating import FloatingIPBackend, make_backend
from fsha.fsapi import FSApi
from fsha.fsdb import CoreDBWriter, RecordValueError, ThreadRunner, call_profile
from fsha.fsevents import ClusterEvents
from fsha.guard import default_lease
from fsha.guardlink import GuardLink
from fsha.health import SwitchHealth, esl_clients
from fsha.history import HistoryResource, StateDir, read_history
from fsha.latch import Latch
from fsha.limitservice import LimitService
from fsha.localdrop import GuardSettings, report_problems
from fsha.logs import logfile_argument
from fsha.memtrim import MemoryTrimmer
from fsha.metrics import SessionWatch, StatsSources, metrics_resource
from fsha.node import ClusterNode
from fsha.nodecontrol import ControlResource, StatusSite
from fsha.notify import Notifier
from fsha.process import ProcessRunner
from fsha.reactors import NetReactor, NodeReactor
from fsha.redisclient import RedisClient, RedisSettings
from fsha.replication.feeds import Feeds
from fsha.replication.service import ReplicationService
from fsha.retire import SupersededRecords
from fsha.slotchange import ProfileControl, SlotChanges
from fsha.status import status_site_root
from fsha.takeover import ReplicatedRecords, SlotEffects, TakeoverTimeouts
from fsha.transport import heartbeat_services
from fsha.wire.control import ControlAuth
from fsha.wire.heartbeat import NO_SLOT, Role
from fsha.wire.stream import Kind

DEFAULT_CONFIG = "/etc/fsha/cluster.toml"


class Options(usage.Options):
    synopsis = "[--config FILE] [--node NAME]"
    longdesc = ("Run one fsha cluster node beside its FreeSWITCH. Every node reads the same "
                "cluster config; the node is chosen by --node or by which configured "
                "addresses are local.")
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "the cluster config file (TOML)"],
        ["node", "n", None, "this node's name (default: the node whose addresses are local)"],
    ]

    def postOptions(self) -> None:
        try:
            self.cluster: ClusterConfig = load_config(self["config"])
            self.me: NodeConfig = choose_node(self.cluster, self["node"])
            self.secret: bytes = self.cluster.read_secret()
            check_tls_files(self.cluster, self.me)
            self.redis_password: str | None = read_redis_password(self.cluster)
            startup.check(self.cluster, self.me)
        except ConfigError as e:
            print(f"fsha: {e.problems[0]}", file=sys.stderr)
            raise SystemExit(2) from None
        except startup.StartupError as e:
            print(f"fsha: {e}", file=sys.stderr)
            raise SystemExit(2) from None


class NodeService(service.Service):
    """Clears leftovers of a previous run, then runs the node; hands over on stop."""

    log = Logger()

    def __init__(self, node: ClusterNode, floating: FloatingIPBackend,
                 effects: SlotEffects, stop_timeout: float,
                 guard: GuardLink | None = None, egress: EgressFence | None = None
                 ) -> None:
        self.node = node
        self.egress = egress
        self.floating = floating
        self.effects = effects
        self.stop_timeout = stop_timeout
        self.guard = guard

    def startService(self) -> None:
        super().startService()
        ips = [ip for slot in self.node.config.slots for ip in slot.ips]
        # Hot standby: the egress fence first, before the reconciliation hangs up stray
        # calls (their BYEs must not leave from an address this host gives up).
        d = self._install_egress() if self.egress is not None else defer.succeed(None)
        # A process killed with -9 leaves its floating IPs configured: remove them before
        # joining, so this (new) slave never answers for a slot it does not hold.
        d.addCallback(lambda _: self.floating.cleanup(ips))
        d.addTimeout(self.node.config.floating_ip.timeout * 2, self.node.clock)

        def removed(found: list[Any]) -> None:
            if found:
                self.log.warn("removed {count} floating address(es) left by a previous run: "
                              "{addresses}", count=len(found),
                              addresses=", ".join(str(ip) for ip in found))

        def failed(f: Any) -> None:
            self.log.failure("start-up cleanup of floating IPs failed; joining anyway", f)

        d.addCallbacks(removed, failed)
        if self.guard is not None:
            d.addCallback(lambda _: self._reconcile_switch())
        d.addCallback(lambda _: self.node.start())
        d.addErrback(lambda f: self.log.failure("node start failed", f))

    def _install_egress(self) -> defer.Deferred[None]:
        """Install the egress fence (fsha.egress). A failure is logged and the node joins
        anyway: its takeovers fail their ``egress`` step, so it never masters a slot."""
        assert self.egress is not None
        d = self.egress.install()
        d.addTimeout(self.node.config.floating_ip.timeout * 2, self.node.clock)

        def done(status: FenceStatus) -> None:
            if status.ok:
                self.log.info("egress fence in place for {addresses}",
                              addresses=", ".join(status.fenced))
            else:
                self.log.error("egress fence NOT in place ({problem}): this node will not "
                               "take a slot over", problem=status.problem)
            self.node.record_event("egress-fence", **status.as_dict())

        def failed(f: Any) -> None:
            self.log.failure("installing the egress fence failed; this node will not take "
                             "a slot over", f)

        return d.addCallbacks(done, failed)

    def _reconcile_switch(self) -> defer.Deferred[None]:
        """Before joining: the guard stops every slot profile still running in the local
        FreeSWITCH (this node holds no slot yet), which hangs up their stray calls, and
        removes any slot address (fsha.localdrop.LocalEffects.reconcile)."""
        guard = self.guard
        assert guard is not None
        s = guard.settings
        profiles = sum(len(slot.profiles) for slot in s.slots)
        ips = sum(len(slot.ips) for slot in s.slots)
        # the guard's start (a Python process), then every command with its own timeout
        timeout = 5.0 + s.floating_timeout * (ips + 1) + s.esl_timeout * (3 * profiles + 3)
        d = guard.reconcile(timeout)

        def done(report: dict[str, Any]) -> None:
            for profile in report["profiles"]["stopped"]:
                # sofia frees a stopped profile asynchronously: a claim's start must wait
                # for its UNPUBLISH, as after a stop of our own (fsha.takeover)
                self.effects.stop_issued(profile)
            stopped = report["profiles"]["stopped"] + report["profiles"]["too_young"]
            if stopped or report["ips"]["removed"]:
                self.log.warn("start-up reconciliation: FreeSWITCH served slot profile(s) "
                              "{profiles} ({calls} call(s) hung up), addresses {ips} "
                              "removed: left by a previous run",
                              profiles=", ".join(stopped) or "none",
                              calls=report["profiles"]["calls"]
                              + report["profiles"]["calls_killed"],
                              ips=", ".join(report["ips"]["removed"]) or "none")
            self.node.record_event("reconciled", profiles_stopped=stopped,
                                   ips_removed=report["ips"]["removed"],
                                   problems=report_problems(report))

        def failed(f: Any) -> None:
            self.log.failure("start-up reconciliation of FreeSWITCH failed; joining anyway",
                             f)

        return d.addCallbacks(done, failed)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        d = self.node.stop() if self.node.running else defer.succeed(None)
        d.addTimeout(self.stop_timeout, self.node.clock)
        d.addErrback(lambda f: self.log.failure("clean hand-over on stop failed", f))
        d.addBoth(lambda _: self.effects.stop())
        return d


def guard_log_args(argv: list[str]) -> list[str]:
    """Where the guard logs: fsha's own ``--logfile`` (twistd's, made absolute) in fsha's
    format, so a daemon's guard lines are not lost on a closed stderr; [] without one."""
    path = logfile_argument(argv)
    if path is None:
        return []
    as_json = "--logger=fsha.logs.json" in argv or any(
        a == "--logger" and b == "fsha.logs.json" for a, b in itertools.pairwise(argv))
    return ["--logfile", os.path.abspath(path), "--log-format", "json" if as_json else "text"]


def state_dir(config: ClusterConfig, me: NodeConfig) -> StateDir | None:
    """The node's state directory (history, maintenance); None, said once, if the default
    one cannot be used (an explicit one was checked at start: fsha.startup)."""
    path = config.state.dir_for(me.name, config.path.parent)
    try:
        return StateDir(path, me.name, config.state.history_max_bytes,
                        config.state.history_files)
    except OSError as e:
        _log.warn("no history and no maintenance kept across restarts: {path} cannot be "
                  "used ({error}); set [state] dir", path=str(path), error=e)
        return None


def redis_client(config: ClusterConfig, password: str | None, reactor: NetReactor
                 ) -> RedisClient | None:
    r = config.redis
    if r is None:
        return None
    return RedisClient(RedisSettings(
        r.host, r.port, r.db, r.username, password, r.tls, r.ca, r.server_name, r.timeout,
        r.connect_timeout, r.reconnect_min, r.reconnect_max, r.marker_ttl), reactor)


_log = Logger(namespace="fsha.tap")


#: The start order of one node's services (``build_service``), and why each is where it is.
#: They stop in reverse, each once the previous one's stop has finished
#: (:class:`OrderedServices`); a service not configured is left out. ``heartbeat``: one
#: service per network (``heartbeat-<network>``).
SERVICE_ORDER: tuple[tuple[str, str], ...] = (
    ("esl", "FreeSWITCH commands and events: stopped last, the hand-over on stop uses it"),
    ("esl-probe", "FreeSWITCH's health probe (busy is not dead), which also carries the "
                  "cluster events"),
    ("fsevents", "stopped after the node's hand-over, whose events it still sends, and "
                 "before the ESL client"),
    ("heartbeat", "the node's heartbeats: the hand-over on stop still announces the "
                  "release"),
    ("replication", "a hand-over on stop still reaches the peers"),
    ("feeds", "this node's FreeSWITCH into the replicated state, for the slots it masters"),
    ("superseded", "retires the records of a slot's previous masters"),
    ("redis", "before its users (limits, durable), stopped after their last write"),
    ("limits", "needs the replicated state and Redis; told after a takeover, never part of "
               "one, so a slow or dead Redis cannot delay a claim"),
    ("durable", "before the node, which waits for its load before a cold-start claim"),
    ("status", "/status, /metrics and the signed control requests"),
    ("config-catch-up", "asks the peers for a newer config epoch over the replication "
                        "links (fsha.configfetch)"),
    ("guard", "before the node; stopped after its hand-over (what is still held then is "
              "the guard's to drop)"),
    ("node", "joins last (after clearing a previous run's leftovers), hands over first"),
)


class OrderedServices(service.MultiService):
    """Stops its children one after the other, the last added first, each once the previous
    one's stop has finished (``MultiService`` stops them all at once: the ESL client and the
    replication links would go while the node's hand-over still needs them)."""

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        d: defer.Deferred[Any] = defer.succeed(None)
        for child in reversed(list(self)):
            def stop(_: object, child: Any = child) -> defer.Deferred[Any]:
                return defer.maybeDeferred(child.stopService).addErrback(
                    lambda f: _log.failure("stopping {name} failed", f,
                                          name=getattr(child, "name", None) or child))
            d.addCallback(stop)
        return d.addCallback(lambda _: None)


def makeService(options: Options) -> service.MultiService:
    """twistd's entry point: the node on the process's reactor (chosen by twistd)."""
    from twisted.internet import reactor

    from fsha import memprofile
    memprofile.install()  # only with FSHA_TRACEMALLOC set (benchmarks)
    return build_service(options, reactor)  # type: ignore[arg-type]


def build_service(options: Options, reactor: NodeReactor) -> service.MultiService:
    """The service tree of one node on ``reactor``, in :data:`SERVICE_ORDER`.

    Collaborators are constructor arguments; where two parts need each other, a
    :class:`~fsha.latch.Latch` made first is handed to both (the durable store's load and
    the node's cold-start claims; the guard and the FreeSWITCH health)."""
    config, me = options.cluster, options.me
    for line in timing_warnings(config):
        _log.warn("{warning}", warning=line)
    top = OrderedServices()
    top.setName(f"fsha-{me.name}")
    # Two connections: commands and events, and a probe that no long command delays
    # (fsha.health: busy is not dead).
    esl, probe = esl_clients(config, me, reactor,
                             ping_interval=max(0.5, 10 * config.heartbeat_interval))
    floating = make_backend(config.floating_ip, reactor)
    guard_config = config.guard
    guarded = guard_config is None or guard_config.enabled
    guard_given_up = Latch() if guarded else None
    health = SwitchHealth(esl, probe, guard_given_up=guard_given_up)
    replication: ReplicationService | None = None
    incarnation = time.time_ns()
    if config.tls is not None:
        replication = ReplicationService(config, me, reactor, incarnation=incarnation)
        replication.setName("replication")
    timeouts = TakeoverTimeouts.from_config(config, me)
    hot_standby = config.takeover.hot_standby
    egress: EgressFence | None = None
    if hot_standby:
        egress = NftEgressFence(ProcessRunner(reactor),
                                [ip.address for slot in config.slots for ip in slot.ips],
                                config.floating_ip.timeout)
    effects = SlotEffects(
        floating, reactor, esl=esl,
        db=CoreDBWriter(me.core_db, ThreadRunner(reactor),
                        registration_db=me.registration_db_for) if me.core_db else None,
        records=(ReplicatedRecords(replication.state, reactor) if replication is not None
                 else None),
        timeouts=timeouts, fencing=config.fencing, me=me,
        recover_batch=config.takeover.recover_batch, hot_standby=hot_standby, egress=egress,
        health=health)
    budget = max(timeouts.acquire_budget(slot, hot_standby) for slot in config.slots)
    # the node's SlotOwner: the effects, with a slot's addresses and profiles following an
    # online config change (fsha.slotchange)
    guard: GuardLink | None = None
    changes = SlotChanges(effects, floating, reactor, config,
                          timeout=config.floating_ip.timeout,
                          profiles=ProfileControl(FSApi(esl, me.esl.timeout), me.esl.timeout),
                          profile_timeout=me.esl.timeout + timeouts.confirm,
                          on_held=lambda: guard.update_settings(guard_settings())
                          if guard is not None else None,
                          record_event=lambda kind, **fields: node.record_event(kind,
                                                                                **fields))
    # [redis] durable_state: the node holds its cold-start claims until the load is over
    durable_state = (replication is not None and config.redis is not None
                     and config.redis.durable_state)
    durable_loaded = Latch() if durable_state else None
    node = ClusterNode(config, me, options.secret, reactor, changes, health,
                       incarnation=incarnation, claim_timeout=budget + 1.0,
                       cold_start_gate=durable_loaded)
    lease = guard_config.lease if guard_config is not None else default_lease(
        config.heartbeat_interval, config.detection_floor)

    def guard_settings() -> GuardSettings:
        """The config's slots, with what is still held of them (fsha.slotchange)."""
        base = GuardSettings.from_config(changes.config, me, lease)
        held = changes.guarded()
        return dataclasses.replace(base, slots=tuple(
            dataclasses.replace(s, ips=held[s.slot_id][0], profiles=held[s.slot_id][1])
            for s in base.slots))

    if guarded:
        guard = GuardLink(guard_settings(), node, reactor,
                          given_up=guard_given_up,
                          argv=[sys.executable, "-m", "fsha.guard", *guard_log_args(sys.argv)])
    effects.add_report_listener(
        lambda report: node.record_event("takeover-" + report.action, **report.as_event()))
    # a takeover of a big slot frees the rows it wrote: give the memory back
    trimmer = MemoryTrimmer(reactor)
    effects.add_report_listener(lambda report: trimmer.trim())

    def switch_state(old: ConnectionState, new: ConnectionState) -> None:
        # Tell the cluster at once rather than at the next tick.
        node.health_changed(health.is_ok())

    esl.add_state_listener(switch_state)
    probe.add_state_listener(switch_state)
    sessions = SessionWatch(esl)
    # On the probe: a takeover's step events must not wait behind its recover batches.
    cluster_events = ClusterEvents(probe, node, clock=reactor, send_timeout=me.esl.timeout)
    effects.add_step_listener(cluster_events.takeover_step)
    feeds: Feeds | None = None
    retire: SupersededRecords | None = None
    if replication is not None:
        feeds = Feeds(esl, replication.state, config, me, reactor, publish=replication.publish)

        def masters() -> dict[int, int]:
            # who serves which slot now, the same view on every node (heartbeats)
            return {m.slot: m.node_id for m in node.members()
                    if m.role is Role.MASTER and m.slot != NO_SLOT
                    and node.roles.owner_of(m.slot) == m.node_id}

        retire = SupersededRecords(replication.state, masters, reactor,
                                   forget_own=feeds.forget_slot, freed=trimmer.trim)
        node.add_role_listener(feeds.role_changed)
    redis = redis_client(config, getattr(options, "redis_password", None), reactor)
    limits: LimitService | None = None
    if config.limits is not None and replication is not None:
        limits = LimitService(esl, replication.state, config, me, reactor, config.limits,
                              redis=redis, publish=replication.publish,
                              api_timeout=me.esl.timeout, peer_fs_ok=node.peer_fs_ok)
        # after the takeover, never part of it: a slow or dead Redis cannot delay a claim
        effects.add_report_listener(limits.takeover_done)
    durable: DurableStore | None = None
    if redis is not None and replication is not None and config.redis is not None \
            and durable_state:
        peers = node.detector.peers
        durable = DurableStore(
            redis, replication.state, node, [n.node_id for n in config.nodes],
            lambda n: n in peers and peers[n].alive, reactor,
            prefix=key_prefix(config.redis.key_prefix, config.name),
            flush_interval=config.redis.durable_flush,
            names={n.node_id: n.name for n in config.nodes}, loaded=durable_loaded)

    notifier: Notifier | None = None

    def apply_config(new: ClusterConfig) -> dict[str, Any]:
        """An online change (fsha.configstage): only what fsha.configplan.diff allows
        (priorities, [notify], slots' addresses and profiles) differs: the config is
        swapped where it is read, and the slot this node masters follows it
        (fsha.slotchange)."""
        if feeds is not None:
            feeds.config_changed(new)
        if limits is not None:
            limits.config_changed(new)
        # the slot changes (and the guard) first: a slot appended may be claimed as soon
        # as the node runs the new config, and the guard must know it by then
        holding = (node.slot, node.epoch) if node.role is Role.MASTER else None
        begun = changes.config_changed(new, holding, node.resources_lost)
        node.replace_config(new)
        # more profiles, a longer claim
        node.claim_timeout = max(timeouts.acquire_budget(slot, hot_standby)
                                 for slot in new.slots) + 1.0
        if replication is not None:
            replication.config, replication.me = new, new.node(me.name)
            # after this request's answer is on its way (it may ride on such a link)
            reactor.callLater(0, replication.close_control_links)
        if notifier is not None and new.notify is not None:
            notifier.config = new.notify
        return begun

    def calls_on(slot_id: int, profile: str) -> int:
        """The replicated calls of ``profile`` in slot ``slot_id`` (a removed profile with
        calls is refused at stage: fsha.configplan.profile_refusals)."""
        if replication is None:
            return 0
        n = 0
        for record in replication.state.records(slot=slot_id, kind=Kind.CALL):
            try:
                n += call_profile(record.value) == profile
            except RecordValueError:
                pass
        return n

    stager = ConfigStager(config, me.name, options.secret, reactor, apply_config,
                          node.record_event, calls=calls_on)
    control = ControlResource(node, ControlAuth(options.secret, config.name, me.name), reactor,
                              stager, replication.relay if replication is not None else None)
    # a node behind the cluster's config epoch fetches it from a peer by itself
    catchup = ConfigCatchUp(stager, options.secret, config.name, replication.relay, reactor) \
        if replication is not None else None
    control.catchup = catchup

    def status() -> dict[str, Any]:
        result = node.status()
        result["control"] = control.status()
        result["freeswitch"] = {**health.status(), **sessions.status()}
        result["replication"] = replication.status() if replication is not None else None
        result["feeds"] = feeds.status() if feeds is not None else None
        if feeds is not None and retire is not None:
            result["feeds"]["superseded"] = retire.status()
        result["takeover"] = effects.status()
        result["fsevents"] = cluster_events.status()
        result["limits"] = limits.status() if limits is not None else None
        result["redis"] = redis.status() if redis is not None else None
        result["durable"] = durable.status() if durable is not None else None
        result["guard"] = guard.status() if guard is not None else {"enabled": False}
        result["history"] = state.status() if state is not None else None
        result["notify"] = notifier.status() if notifier is not None else None
        result["config"] = stager.status()
        result["config"]["slot_changes"] = changes.status()
        result["config"]["held"] = changes.held_status()
        if replication is not None:
            result["config"]["relay"] = replication.relay.status()
        result["config"]["catch_up"] = catchup.status() if catchup is not None else None
        return result

    state = state_dir(config, me)
    if config.notify is not None:
        notifier = Notifier(config.notify, config.name, me.name, reactor,
                            ProcessRunner(reactor))
        node.add_event_listener(notifier.event)
    if state is not None:
        node.add_event_listener(state.record)
        node.add_event_listener(lambda e: state.set_maintenance(bool(e["on"]))
                                if e["event"] == "maintenance" else None)
        # an online change (fsha config push) is the config a restart reads: remember it
        node.add_event_listener(lambda e: state.config_changed(e["digest"])
                                if e["event"] == "config" else None)
        previous = state.config_changed(config.digest.hex())
        if previous is not None:
            node.record_event("config", digest=config.digest.hex(), previous=previous)
        if state.maintenance():
            # kept across the restart, as Pacemaker's standby is
            _log.warn("maintenance on (kept from before the restart; fsha maintenance "
                      "{node} off ends it)", node=me.name)
            node.set_maintenance(True)
    root = status_site_root(status, control, history=(
        (lambda: read_history(state.path, limit=20)) if state is not None else lambda: None))
    if state is not None:
        root.putChild(b"history", HistoryResource(state.path))
    root.putChild(b"metrics", metrics_resource(StatsSources(
        node=node.stats, freeswitch=health.stats, sessions=sessions,
        replication=replication.stats if replication is not None else None,
        feeds=feeds.stats if feeds is not None else None,
        takeover=effects.stats, fsevents=cluster_events.stats, control=control.stats,
        catchup=catchup.stats if catchup is not None else None,
        durable=durable.stats if durable is not None else None,
        limits=limits.stats if limits is not None else None,
        redis=redis.stats if redis is not None else None), effects, esl))
    site = StatusSite(root, control)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # polled: no access log
    status_server = internet.TCPServer(me.status.port, site, interface=me.status.host,
                                       reactor=reactor)
    release_budget = max(timeouts.release_budget(slot) for slot in config.slots)
    node_service = NodeService(node, floating, effects, release_budget + 1.0, guard, egress)
    parts: dict[str, list[service.IService | None]] = {
        "esl": [esl], "esl-probe": [probe], "fsevents": [cluster_events],
        "heartbeat": list(heartbeat_services(node, reactor)), "replication": [replication],
        "feeds": [feeds], "superseded": [retire], "redis": [redis], "limits": [limits],
        "durable": [durable], "status": [status_server], "config-catch-up": [catchup],
        "guard": [guard],
        "node": [node_service]}
    for name, _why in SERVICE_ORDER:
        for part in parts.pop(name):
            if part is None:
                continue  # not configured
            if not part.name:
                part.setName(name)
            part.setServiceParent(top)
    assert not parts, f"not in SERVICE_ORDER: {sorted(parts)}"
    # What exists now lives as long as the process: keep the collector from re-scanning it
    # (a full collection over a large replicated state stalls the reactor for 100s of ms).
    gc.freeze()
    return top
