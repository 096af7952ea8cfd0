"""The simulated switch (no I/O of its own): profiles, channels, registrations, recovery.

Time comes from an injected clock (``IReactorTime``); the core DB and the SIP sockets are
behind small interfaces (:class:`~fsha.sim.coredb.CoreDB`, :class:`SipBinder`). Events go to
listeners registered with :meth:`Switch.add_listener` (the ESL server, tests). The ``api``
commands are rendered by :class:`fsha.sim.api.SwitchApi` (FreeSWITCH's exact texts).

Why about 900 lines: ``Switch`` is the one owner of the
simulated core's state, and its channel, profile and recovery operations change that state
together (a hangup touches channels, the core DB, limits and events); split further, each
part would reach into the others' attributes. What stands alone is apart: the ``api``
texts (:mod:`fsha.sim.api`), the registrar (:mod:`fsha.sim.registrar`), the limit
backends (:mod:`fsha.sim.limits`), the CDRs (:mod:`fsha.sim.cdr`).
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from fsha.sim.api import VERSION, ApiResult, SwitchApi, uptime_text
from fsha.sim.calls import HANGUP_CAUSES, Channel, SimError
from fsha.sim.cdr import CDRError, build_cdr, parse_cdr
from fsha.sim.coredb import CoreDB
from fsha.sim.events import CALLING, EventFactory, SimEvent
from fsha.sim.limits import HiredisBackend, LimitError, Limits, LimitSpec
from fsha.sim.registrar import Registrar

log = Logger()

RESTART_GUARD_SECONDS = 10
#: mod_sofia retries a profile that failed to bind every 5 s ("ATTEMPT 1 (RETRY IN 5 SEC)")
BIND_RETRY_SECONDS = 5.0

Listener = Callable[[SimEvent], None]


@dataclass(slots=True)
class ProfileConfig:
    """A sofia profile as defined in the configuration."""

    name: str
    ip: str
    port: int
    autostart: bool = True
    standby: bool = False


@dataclass(slots=True)
class Profile:
    name: str
    ip: str
    port: int  # configured port (0: any)
    state: str = "stopped"  # "stopped" | "running" | "stopping" | "failed"
    standby: bool = False
    started_at: float = 0.0
    bound_port: int | None = None  # actual port while running (and stopping)
    start_wanted: float | None = None  # a start asked while stopping (retried, as sofia)

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def url(self) -> str:
        port = self.bound_port if self.bound_port is not None else self.port
        return f"sip:mod_sofia@{self.ip}:{port}"


class SipBinder(Protocol):
    """Binds a profile's SIP socket. ``bind`` returns the bound port or None on failure."""

    def bind(self, profile: Profile) -> int | None: ...

    def unbind(self, profile: Profile) -> None: ...


class NullSipBinder:
    """No sockets: every bind succeeds on the configured port (tests without I/O)."""

    def __init__(self, fail: Iterable[str] = ()) -> None:
        self.fail = set(fail)
        self.bound: dict[str, int] = {}

    def bind(self, profile: Profile) -> int | None:
        if profile.name in self.fail:
            return None
        self.bound[profile.name] = profile.port
        return profile.port

    def unbind(self, profile: Profile) -> None:
        self.bound.pop(profile.name, None)


@dataclass(slots=True)
class CallOutcome:
    """What ``place_call_async`` did: the uuids (A leg first); ``refused`` by a limit."""

    uuids: list[str]
    refused: bool = False


class Switch:
    """One run of the simulated FreeSWITCH (a fresh core UUID per instance)."""

    def __init__(
        self,
        clock: IReactorTime,
        db: CoreDB,
        *,
        name: str,
        profiles: Iterable[ProfileConfig] = (),
        hostname: str | None = None,
        switchname: str | None = None,
        ipv4: str = "127.0.0.1",
        heartbeat_interval: float = 20.0,
        reg_check_interval: float = 5.0,
        max_sessions: int = 1000,
        profile_guard: int = RESTART_GUARD_SECONDS,
        recover_ms_per_call: float = 0.0,
        sip_binder: SipBinder | None = None,
        core_uuid: str | None = None,
        rtp_ports: tuple[int, int] = (10000, 60000),
        on_shutdown: Callable[[], None] | None = None,
        hiredis: HiredisBackend | None = None,
        stop_delay: float = 0.0,
    ) -> None:
        self.clock = clock
        self.db = db
        self.name = name
        self.hostname = hostname or name
        self.switchname = switchname or name
        self.ipv4 = ipv4
        self.core_uuid = core_uuid or str(uuidlib.uuid4())
        self.heartbeat_interval = heartbeat_interval
        self.reg_check_interval = reg_check_interval
        self.max_sessions = max_sessions
        self.profile_guard = profile_guard  # FreeSWITCH: 10 s
        # `sofia profile P stop` is asynchronous in FreeSWITCH: the profile leaves `sofia
        # status` at once, its socket is released later (UNPUBLISH then); 0: at once
        self.stop_delay = stop_delay
        # A real recover costs 5-10 ms a call (docs/benchmarks.rst); 0: instantaneous.
        self.recover_ms_per_call = recover_ms_per_call
        self.binder: SipBinder = sip_binder or NullSipBinder()
        self.on_shutdown = on_shutdown
        self.events = EventFactory(
            clock,
            core_uuid=self.core_uuid,
            hostname=self.hostname,
            switchname=self.switchname,
            ipv4=ipv4,
        )
        self.configs: dict[str, ProfileConfig] = {}
        self.profiles: dict[str, Profile] = {}
        for cfg in profiles:
            self.define_profile(cfg)
        self.channels: dict[str, Channel] = {}
        self.hashes: dict[str, dict[str, str]] = {}
        self.limits = Limits(clock, hiredis=hiredis, on_usage=self._fire_limit_usage,
                             on_execute=self._limit_executed)
        self._app_uuids: dict[str, str] = {}  # channel -> Application-UUID of its limit app
        self.listeners: list[Listener] = []
        self.started_at = clock.seconds()
        self.sessions_since_startup = 0
        self.sessions_peak = 0
        self.ready = False
        self._rtp_lo, self._rtp_hi = rtp_ports
        self._rtp_next = self._rtp_lo
        self._rtp_used: set[int] = set()
        self._heartbeat: LoopingCall | None = None
        self._reg_check: LoopingCall | None = None
        self._api = SwitchApi(self)
        self.registrar = Registrar(clock, db, self.events, self.fire, self.hostname,
                                   self.running_profile)
        # REGISTER and its kin, as the switch's own operations (the control API, tests)
        self.register = self.registrar.register
        self.unregister = self.registrar.unregister
        self.check_expired_registrations = self.registrar.check_expired_registrations

    # -- life cycle ----------------------------------------------------------------------

    def define_profile(self, cfg: ProfileConfig) -> None:
        self.configs[cfg.name] = cfg
        self.profiles.setdefault(cfg.name, Profile(cfg.name, cfg.ip, cfg.port))

    def start(self) -> None:
        """Boot: start the profiles marked autostart, then the periodic tasks."""
        self.started_at = self.clock.seconds()
        for cfg in self.configs.values():
            if cfg.autostart:
                self.start_profile(cfg.name)
        self.ready = True
        if self.heartbeat_interval > 0:
            self._heartbeat = LoopingCall(self.send_heartbeat)
            self._heartbeat.clock = self.clock
            self._heartbeat.start(self.heartbeat_interval, now=False).addErrback(
                lambda f: log.failure("heartbeat loop failed", f)
            )
        if self.reg_check_interval > 0:
            self._reg_check = LoopingCall(self.check_expired_registrations)
            self._reg_check.clock = self.clock
            self._reg_check.start(self.reg_check_interval, now=False).addErrback(
                lambda f: log.failure("registration expiry loop failed", f)
            )

    def stop(self) -> None:
        self.ready = False
        for loop in (self._heartbeat, self._reg_check):
            if loop is not None and loop.running:
                loop.stop()
        for profile in self.profiles.values():
            if profile.running:
                self.binder.unbind(profile)

    # -- events --------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    def fire(self, event: SimEvent) -> None:
        for listener in tuple(self.listeners):
            try:
                listener(event)
            except Exception:
                log.failure("event listener failed on {name}", name=event.name)

    def _channel_event(
        self,
        name: str,
        ch: Channel,
        extra: Iterable[tuple[str, str]] = (),
        pre: Iterable[tuple[str, str]] = (),
    ) -> None:
        headers = self.events.core_headers(name, CALLING[name])
        headers.extend(pre)
        other = self.channels.get(ch.other_leg) if ch.other_leg else None
        headers.extend(ch.event_headers(other))
        headers.extend(extra)
        self.fire(SimEvent(name, None, headers))

    def send_heartbeat(self) -> None:
        up = self.clock.seconds() - self.started_at
        count = len(self.channels)
        self.fire(
            self.events.make(
                "HEARTBEAT",
                CALLING["HEARTBEAT"],
                [
                    ("Event-Info", "System Ready" if self.ready else "System Not Ready"),
                    ("Up-Time", uptime_text(up)),
                    ("FreeSWITCH-Version", VERSION),
                    ("Uptime-msec", str(int(up * 1000))),
                    ("Session-Count", str(count)),
                    ("Max-Sessions", str(self.max_sessions)),
                    ("Session-Per-Sec", "30"),
                    ("Session-Per-Sec-Last", "0"),
                    ("Session-Per-Sec-Max", "0"),
                    ("Session-Per-Sec-FiveMin", "0"),
                    ("Session-Since-Startup", str(self.sessions_since_startup)),
                    ("Session-Peak-Max", str(self.sessions_peak)),
                    ("Session-Peak-FiveMin", str(self.sessions_peak)),
                    ("Idle-CPU", "99.000000"),
                ],
            )
        )

    # -- profiles ------------------------------------------------------------------------

    def start_profile(self, name: str) -> bool:
        """Start a defined profile; False if it is not defined. Bind failure -> FAILURE
        (the profile is then absent from ``sofia status``, as in FreeSWITCH). A profile
        still stopping starts once its stop is done, at sofia's next bind retry."""
        cfg = self.configs.get(name)
        if cfg is None:
            return False
        profile = self.profiles[name]
        if profile.running:
            return True
        if profile.state == "stopping":
            if profile.start_wanted is None:
                profile.start_wanted = self.clock.seconds()
            return True
        port = self.binder.bind(profile)
        if port is None:
            profile.state = "failed"
            profile.bound_port = None
            log.error("sofia profile {profile} failed to bind {ip}:{port}",
                      profile=name, ip=profile.ip, port=profile.port)
            self.fire(
                self.events.make(
                    "FAILURE",
                    CALLING["FAILURE"],
                    [
                        ("module_name", "mod_sofia"),
                        ("profile_name", name),
                        ("profile_uri", profile.url),
                        ("failure_message", "Profile failed to start."),
                        ("file", "sofia.c"),
                        ("line", str(CALLING["FAILURE"][2])),
                    ],
                )
            )
            return True
        profile.state = "running"
        profile.bound_port = port
        profile.started_at = self.clock.seconds()
        profile.standby = cfg.standby
        self.db.open_profile(name)  # "Started Profile P [sofia_reg_P]"
        self.fire(
            self.events.custom(
                "sofia::profile_start",
                CALLING["sofia::profile_start"],
                [("module_name", "mod_sofia"), ("profile_name", name),
                 ("profile_uri", profile.url)],
            )
        )
        return True

    def stop_profile(self, name: str) -> None:
        """Hang up the profile's calls; the profile leaves ``sofia status`` at once and
        releases its socket after ``stop_delay`` (then UNPUBLISH, as sofia's profile
        thread ends)."""
        profile = self.profiles[name]
        for ch in [c for c in self.channels.values() if c.profile == name]:
            if ch.uuid in self.channels:
                self.hangup(ch.uuid, "MANAGER_REQUEST")
        if not profile.running:
            profile.state = "stopped"
            profile.bound_port = None
            return
        if self.stop_delay > 0:
            profile.state = "stopping"
            self.clock.callLater(self.stop_delay, self._stopped, profile)
        else:
            self._stopped(profile)

    def _stopped(self, profile: Profile) -> None:
        url = profile.url
        port = profile.bound_port if profile.bound_port is not None else profile.port
        self.binder.unbind(profile)
        profile.state = "stopped"
        profile.bound_port = None
        self.fire(self.events.make("UNPUBLISH", CALLING["UNPUBLISH"], [
            ("service", "_sip._udp,_sip._tcp,_sip._sctp"), ("port", str(port)),
            ("module_name", "mod_sofia"), ("profile_name", profile.name),
            ("profile_uri", url)]))
        wanted, profile.start_wanted = profile.start_wanted, None
        if wanted is not None:
            waited = self.clock.seconds() - wanted
            retries = int(waited // BIND_RETRY_SECONDS) + 1
            delay = max(0.0, retries * BIND_RETRY_SECONDS - waited)
            self.clock.callLater(delay, self.start_profile, profile.name)

    def running_profile(self, name: str) -> Profile:
        profile = self.profiles.get(name)
        if profile is None or not profile.running:
            raise SimError(f"profile {name!r} is not running")
        return profile

    def profile_calls(self, name: str) -> int:
        return sum(1 for c in self.channels.values() if c.profile == name)

    # -- channels ------------------------------------------------------------------------

    def _alloc_rtp_port(self) -> int:
        span = (self._rtp_hi - self._rtp_lo) // 2
        for _ in range(span):
            port = self._rtp_next
            self._rtp_next += 2
            if self._rtp_next >= self._rtp_hi:
                self._rtp_next = self._rtp_lo
            if port not in self._rtp_used:
                self._rtp_used.add(port)
                return port
        raise SimError("no free RTP port")

    def new_channel(
        self,
        profile_name: str,
        *,
        direction: str = "inbound",
        caller: str = "1000",
        caller_name: str | None = None,
        dest: str = "2000",
        remote_ip: str = "127.0.0.1",
        remote_port: int = 5060,
        uuid: str | None = None,
        variables: dict[str, str] | None = None,
    ) -> Channel:
        """Create a channel (CHANNEL_CREATE). Raises SimError on a bad profile or uuid."""
        profile = self.running_profile(profile_name)
        if uuid is None:
            uuid = str(uuidlib.uuid4())
        elif uuid in self.channels:
            raise SimError(f"uuid {uuid} already exists")
        if len(self.channels) >= self.max_sessions:
            raise SimError("max sessions reached")
        now = self.clock.seconds()
        local_port = profile.bound_port if profile.bound_port is not None else profile.port
        if direction == "inbound":
            chan_name = f"sofia/{profile_name}/{caller}@{remote_ip}"
        else:
            chan_name = f"sofia/{profile_name}/{dest}@{remote_ip}"
        ch = Channel(
            uuid=uuid,
            profile=profile_name,
            direction=direction,
            name=chan_name,
            cid_name=caller_name if caller_name is not None else caller,
            cid_num=caller,
            dest=dest,
            network_addr=remote_ip,
            created=now,
        )
        media_port = self._alloc_rtp_port()
        call_id = f"{uuidlib.uuid4().hex}@{remote_ip}"
        ch.variables.update(
            {
                "direction": direction,
                "uuid": uuid,
                "session_id": str(self.sessions_since_startup + 1),
                "sip_from_user": caller,
                "sip_from_uri": f"{caller}@{remote_ip}",
                "sip_from_host": remote_ip,
                "channel_name": chan_name,
                "sip_call_id": call_id,
                "sip_local_network_addr": profile.ip,
                "sip_network_ip": remote_ip,
                "sip_network_port": str(remote_port),
                "sip_received_ip": remote_ip,
                "sip_received_port": str(remote_port),
                "sip_via_protocol": "udp",
                "sip_req_user": dest,
                "sip_req_uri": f"{dest}@{profile.ip}:{local_port}",
                "sip_req_host": profile.ip,
                "sip_to_user": dest,
                "sip_to_uri": f"{dest}@{profile.ip}",
                "sip_to_host": profile.ip,
                "sip_contact_user": caller,
                "sip_contact_port": str(remote_port),
                "sip_contact_uri": f"{caller}@{remote_ip}:{remote_port}",
                "sip_contact_host": remote_ip,
                "sofia_profile_name": profile_name,
                "sofia_profile_url": profile.url,
                "recovery_profile_name": profile_name,
                "sip_profile_name": profile_name,
                "local_media_ip": profile.ip,
                "local_media_port": str(media_port),
                "remote_media_ip": remote_ip,
                "remote_media_port": str(20000 + (media_port % 10000)),
                "read_codec": "PCMU",
                "read_rate": "8000",
                "write_codec": "PCMU",
                "write_rate": "8000",
                "caller_id_name": ch.cid_name,
                "caller_id_number": caller,
                "start_epoch": str(int(now)),
                "start_uepoch": str(int(now * 1_000_000)),
            }
        )
        if variables:
            ch.variables.update(variables)
        self.channels[uuid] = ch
        self.sessions_since_startup += 1
        self.sessions_peak = max(self.sessions_peak, len(self.channels))
        self._channel_event("CHANNEL_CREATE", ch)
        return ch

    def _track(self, ch: Channel) -> None:
        self.db.track(
            self.core_uuid,
            ch.variables.get("recovery_profile_name", ch.profile),
            self.hostname,
            ch.uuid,
            build_cdr(ch, self.core_uuid, self.switchname),
        )

    def answer(self, uuid: str) -> None:
        """CHANNEL_ANSWER, and the recovery row (track-calls=true)."""
        ch = self._get(uuid)
        if ch.answered is not None:
            return
        now = self.clock.seconds()
        ch.answered = now
        ch.state = "CS_EXECUTE"
        ch.callstate = "ACTIVE"
        ch.answer_state = "answered"
        ch.variables["endpoint_disposition"] = "ANSWER"
        ch.variables["answer_epoch"] = str(int(now))
        ch.variables["answer_uepoch"] = str(int(now * 1_000_000))
        ch.app_log.append(("answer", "", now))
        if not ch.application:
            ch.application, ch.application_data = "answer", ""
        self._channel_event("CHANNEL_ANSWER", ch)
        self._track(ch)

    def bridge(self, a_uuid: str, b_uuid: str) -> None:
        """Bridge two answered channels: CHANNEL_BRIDGE on the A leg, rows updated."""
        a, b = self._get(a_uuid), self._get(b_uuid)
        now = self.clock.seconds()
        for x, y in ((a, b), (b, a)):
            x.other_leg = y.uuid
            x.bridged = now
            x.call_uuid = a.uuid
            x.variables["bridge_to"] = y.uuid
            x.variables["signal_bond"] = y.uuid
            x.variables["last_bridge_to"] = y.uuid
            x.variables["bridge_channel"] = y.name
            x.variables["bridge_uuid"] = y.uuid
        a.application, a.application_data = "bridge", f"sofia/{b.profile}/{b.dest}"
        a.app_log.append(("bridge", a.application_data, now))
        b.variables["originator"] = a.uuid
        self._channel_event(
            "CHANNEL_BRIDGE",
            a,
            [("Bridge-A-Unique-ID", a.uuid), ("Bridge-B-Unique-ID", b.uuid)],
        )
        for ch in (a, b):
            if ch.answered is not None:
                self.db.update_metadata(
                    ch.uuid, build_cdr(ch, self.core_uuid, self.switchname), self.core_uuid
                )

    def hangup(self, uuid: str, cause: str = "NORMAL_CLEARING") -> None:
        """CHANNEL_HANGUP, row deleted, CHANNEL_HANGUP_COMPLETE, CHANNEL_DESTROY.

        A bridged partner hangs up too (NORMAL_CLEARING), as after a BYE.
        """
        ch = self.channels.get(uuid)
        if ch is None or ch.hangup_cause is not None:
            return
        now = self.clock.seconds()
        other = self.channels.get(ch.other_leg) if ch.other_leg else None
        if other is not None:
            self._channel_event(
                "CHANNEL_UNBRIDGE",
                ch,
                [("Bridge-A-Unique-ID", ch.uuid), ("Bridge-B-Unique-ID", other.uuid)],
            )
        ch.hangup_cause = cause
        ch.hangup_time = now
        ch.callstate = "HANGUP"
        ch.answer_state = "hangup"
        ch.variables["hangup_cause"] = cause
        ch.variables["hangup_cause_q850"] = str(HANGUP_CAUSES.get(cause, 16))
        ch.variables["end_epoch"] = str(int(now))
        ch.variables["end_uepoch"] = str(int(now * 1_000_000))
        self._channel_event("CHANNEL_HANGUP", ch)
        self._app_uuids.pop(uuid, None)
        if self.limits.release_call(uuid):
            # switch_limit.c's state hook: released, then limit_backend unset
            ch.variables.pop("limit_backend", None)
        if ch.answered is not None:
            self.db.untrack(ch.uuid, self.core_uuid)
        ch.state = "CS_REPORTING"
        self._channel_event("CHANNEL_HANGUP_COMPLETE", ch, pre=[("Hangup-Cause", cause)])
        ch.state = "CS_DESTROY"
        self._channel_event("CHANNEL_DESTROY", ch)
        del self.channels[uuid]
        port = ch.variables.get("local_media_port", "")
        if port.isdigit():
            self._rtp_used.discard(int(port))
        if other is not None:
            other.other_leg = None
            self.hangup(other.uuid, "NORMAL_CLEARING")

    def _get(self, uuid: str) -> Channel:
        ch = self.channels.get(uuid)
        if ch is None:
            raise SimError(f"no such channel {uuid}")
        return ch

    def place_call(
        self,
        profile: str,
        *,
        caller: str = "1000",
        dest: str = "2000",
        answer: bool = True,
        bridge: bool = False,
        remote_ip: str = "127.0.0.1",
        limits: Sequence[LimitSpec] = (),
        exceeded_cause: str = "CALL_REJECTED",
    ) -> list[str]:
        """An inbound call on ``profile``, answered, optionally bridged to an outbound leg
        on the same profile. Returns the uuids (A leg first).

        ``limits``: ``hash`` limits only (they are synchronous; ``place_call_async`` takes
        hiredis ones too). A refused call returns ``[]`` (see ``place_call_async``)."""
        if limits:
            if any(spec.backend != "hash" for spec in limits):
                raise SimError("hiredis limits need place_call_async")
            box: list[Any] = []
            self.place_call_async(
                profile, caller=caller, dest=dest, answer=answer, bridge=bridge,
                remote_ip=remote_ip, limits=limits, exceeded_cause=exceeded_cause,
            ).addBoth(box.append)  # fmt: skip
            if not box or not isinstance(box[0], CallOutcome):
                raise SimError(f"limited call failed: {box[0] if box else 'pending'}")
            return [] if box[0].refused else box[0].uuids
        return self._connect_call(
            self.new_channel(profile, caller=caller, dest=dest, remote_ip=remote_ip),
            answer=answer, bridge=bridge, caller=caller, dest=dest, remote_ip=remote_ip,
        )  # fmt: skip

    def place_call_async(
        self,
        profile: str,
        *,
        caller: str = "1000",
        dest: str = "2000",
        answer: bool = True,
        bridge: bool = False,
        remote_ip: str = "127.0.0.1",
        limits: Sequence[LimitSpec] = (),
        exceeded_cause: str = "CALL_REJECTED",
    ) -> defer.Deferred[CallOutcome]:
        """``place_call`` whose dialplan runs ``limit`` for each of ``limits`` first (the
        ``limit ... !<exceeded_cause>`` form): CHANNEL_CREATE, the limits in order (hash
        at once, hiredis after Redis replies), then answer/bridge; at the first refusal the
        call is hung up with ``exceeded_cause`` (``refused``, ``uuids`` = [A leg])."""
        a = self.new_channel(profile, caller=caller, dest=dest, remote_ip=remote_ip)

        def limited(ok: bool) -> CallOutcome:
            if a.uuid not in self.channels:  # hung up meanwhile
                return CallOutcome([a.uuid], refused=not ok)
            if not ok:
                self.hangup(a.uuid, exceeded_cause)
                return CallOutcome([a.uuid], refused=True)
            uuids = self._connect_call(
                a, answer=answer, bridge=bridge, caller=caller, dest=dest, remote_ip=remote_ip
            )
            return CallOutcome(uuids, refused=False)

        self._log_limit_apps(a, limits)
        return self.limits.apply(
            a.uuid, a.variables, limits, lambda: a.uuid in self.channels
        ).addCallback(limited)

    def _log_limit_apps(self, ch: Channel, specs: Sequence[LimitSpec]) -> None:
        """The ``limit`` apps in the channel's app log, as the XML CDR lists every executed
        application with its (expanded) argument; fsha reads hiredis holdings from it."""
        now = self.clock.seconds()
        for spec in specs:
            ch.app_log.append(("limit", _limit_app_data(spec), now))

    def _limit_executed(self, uuid: str, spec: LimitSpec, phase: str) -> None:
        """``switch_core_session_exec`` around the ``limit`` app: CHANNEL_EXECUTE before,
        CHANNEL_EXECUTE_COMPLETE after (the channel's variables as the app left them, then
        ``Application``, ``Application-Data`` (expanded), ``Application-Response``
        (``_none_``: limit sets no response) and ``Application-UUID``)."""
        ch = self.channels.get(uuid)
        if ch is None:
            self._app_uuids.pop(uuid, None)
            return
        data = [("Application", "limit"), ("Application-Data", _limit_app_data(spec))]
        if phase == "start":
            app_uuid = self._app_uuids[uuid] = str(uuidlib.uuid4())
            self._channel_event("CHANNEL_EXECUTE", ch, [*data, ("Application-UUID", app_uuid)])
            return
        app_uuid = self._app_uuids.pop(uuid, None) or str(uuidlib.uuid4())
        self._channel_event("CHANNEL_EXECUTE_COMPLETE", ch, [
            *data, ("Application-Response", "_none_"), ("Application-UUID", app_uuid)])

    def _connect_call(
        self,
        a: Channel,
        *,
        answer: bool,
        bridge: bool,
        caller: str,
        dest: str,
        remote_ip: str,
    ) -> list[str]:
        profile = a.profile
        uuids = [a.uuid]
        if answer:
            self.answer(a.uuid)
            if bridge:
                b = self.new_channel(
                    profile,
                    direction="outbound",
                    caller=caller,
                    dest=dest,
                    remote_ip=remote_ip,
                    variables={"originator": a.uuid},
                )
                self.answer(b.uuid)
                self.bridge(a.uuid, b.uuid)
                uuids.append(b.uuid)
        return uuids

    # -- recovery ------------------------------------------------------------------------

    def recover_profile(self, name: str) -> int:
        """``sofia_glue_profile_recover``: take the rows of other runtimes for ``name``,
        make them live channels with the same UUIDs, track them again under this core
        UUID; clears the profile's standby. Returns how many were recovered."""
        self.running_profile(name)
        return self._recover_rows(name, self.db.take_for_recovery(self.core_uuid, name))

    def recover_profile_slowly(self, name: str) -> defer.Deferred[int]:
        """:meth:`recover_profile` costing ``recover_ms_per_call`` per row: the rows are
        taken now (as FreeSWITCH selects them at the start) and the calls come up once
        the time is over. Only the caller waits (the ESL server blocks just the issuing
        connection, as FreeSWITCH runs an api on that connection's own thread); the
        reactor and every other connection go on."""
        self.running_profile(name)
        rows = self.db.take_for_recovery(self.core_uuid, name)
        delay = len(rows) * self.recover_ms_per_call / 1000
        return deferLater(self.clock, delay, self._recover_rows, name, rows)

    def _recover_rows(self, name: str, rows: Sequence[Any]) -> int:
        profile = self.profiles.get(name)
        if profile is None or not profile.running:
            log.warn("recovery of {n} row(s) of {profile} dropped: profile not running",
                     n=len(rows), profile=name)
            return 0
        recovered: list[Channel] = []
        with self.db.batch():
            for row in rows:
                try:
                    info = parse_cdr(row.metadata)
                except CDRError as e:
                    log.warn("recovery row {uuid} skipped: {error}", uuid=row.uuid, error=str(e))
                    continue
                if info.uuid in self.channels:
                    log.warn("recovery row {uuid} skipped: channel exists", uuid=info.uuid)
                    continue
                variables = dict(info.variables)
                variables["recovery_profile_name"] = name
                variables.pop("hangup_cause", None)
                ip = info.network_addr or variables.get("sip_network_ip", "127.0.0.1")
                try:
                    ch = self.new_channel(
                        name,
                        direction=info.direction if info.direction == "outbound" else "inbound",
                        caller=info.cid_num or "0000000000",
                        caller_name=info.cid_name,
                        dest=info.dest,
                        remote_ip=ip,
                        uuid=info.uuid,
                        variables=variables,
                    )
                except SimError as e:
                    log.warn("recovery row {uuid} skipped: {error}", uuid=row.uuid, error=str(e))
                    continue
                if info.chan_name:
                    ch.name = info.chan_name
                    ch.variables["channel_name"] = info.chan_name
                port = variables.get("local_media_port", "")
                if port.isdigit():
                    self._rtp_used.add(int(port))
                ch.recovered = True
                ch.application = info.application
                ch.application_data = info.application_data
                self.answer(ch.uuid)
                recovered.append(ch)
            # re-bridge pairs that were both recovered
            for ch in recovered:
                peer_uuid = ch.variables.get("bridge_to") or ch.variables.get("signal_bond")
                peer = self.channels.get(peer_uuid) if peer_uuid else None
                if (
                    peer is not None
                    and peer.recovered
                    and ch.other_leg is None
                    and peer.other_leg is None
                    and ch.direction == "inbound"
                ):
                    self.bridge(ch.uuid, peer.uuid)
        profile.standby = False
        return len(recovered)

    # -- ESL helpers ---------------------------------------------------------------------

    def sendevent(self, name: str, headers: list[tuple[str, str]], body: bytes) -> str:
        """``sendevent NAME``: fire a client-made event; returns its Event-UUID."""
        subclass = None
        extra: list[tuple[str, str]] = []
        event_uuid = None
        for key, value in headers:
            lk = key.lower()
            if lk == "event-name":
                continue
            if lk == "event-subclass":
                subclass = value
                continue
            if lk == "event-uuid":
                event_uuid = value
            if lk == "content-length":
                continue
            extra.append((key, value))
        if event_uuid is None:
            event_uuid = str(uuidlib.uuid4())
            extra.append(("Event-UUID", event_uuid))
        ev = self.events.make(
            name.upper(), CALLING["SENDEVENT"], extra, subclass=subclass, body=body
        )
        self.fire(ev)
        return event_uuid

    def sendmsg(self, uuid: str, headers: list[tuple[str, str]]) -> bool:
        """``sendmsg UUID``: False if there is no such session."""
        ch = self.channels.get(uuid)
        if ch is None:
            return False
        h = {k.lower(): v for k, v in headers}
        command = h.get("call-command", "").lower()
        if command == "hangup":
            self.hangup(uuid, h.get("hangup-cause", "NORMAL_CLEARING") or "NORMAL_CLEARING")
        elif command == "execute":
            app = h.get("execute-app-name", "")
            arg = h.get("execute-app-arg", "")
            if app == "hangup":
                self.hangup(uuid, arg or "NORMAL_CLEARING")
            elif app == "answer":
                self.answer(uuid)
            elif app:
                ch.application, ch.application_data = app, arg
                ch.app_log.append((app, arg, self.clock.seconds()))
        return True

    def _limits_of(self, variables: dict[str, str]) -> tuple[list[LimitSpec], str]:
        """``limit`` apps in ``execute_on_answer``/``execute_on_originate`` (the only app
        the simulator runs there): ``limit <backend> <realm> <res> [<max>[/<s>]] [!CAUSE]``."""
        specs: list[LimitSpec] = []
        cause = "CALL_REJECTED"
        for var in ("execute_on_originate", "execute_on_answer"):
            app, _, data = variables.get(var, "").strip().partition(" ")
            if app != "limit":
                continue
            words = data.split()
            if len(words) > 4 and words[4].startswith("!"):
                cause = words[4][1:] or cause
                words = words[:4]
            try:
                specs.append(LimitSpec.parse(" ".join(words)))
            except LimitError as e:
                log.warn("originate: {var} ignored: {error}", var=var, error=str(e))
        return specs, cause

    def _run_answered_limits(self, ch: Channel, specs: list[LimitSpec], cause: str) -> None:
        def done(ok: bool) -> None:
            if ch.uuid not in self.channels:
                return
            if not ok:
                self.hangup(ch.uuid, cause)
                return
            self.db.update_metadata(
                ch.uuid, build_cdr(ch, self.core_uuid, self.switchname), self.core_uuid
            )

        self._log_limit_apps(ch, specs)
        self.limits.apply(ch.uuid, ch.variables, specs, lambda: ch.uuid in self.channels)\
            .addCallback(done)\
            .addErrback(lambda f: log.failure("originate: limits of {uuid} failed", f,
                                              uuid=ch.uuid))

    def _fire_limit_usage(self, headers: list[tuple[str, str]]) -> None:
        self.fire(self.events.custom("limit::usage", CALLING["limit::usage"], headers))

    def sample_event(self, name: str = "CHANNEL_ANSWER") -> SimEvent:
        """A realistic channel event of an answered, bridged call that is not in the
        channel table (a load source for benchmarks; fires nothing)."""
        if name not in CALLING or not name.startswith("CHANNEL_"):
            raise SimError(f"no sample for event {name!r}")
        now = self.clock.seconds()
        a = Channel(str(uuidlib.uuid4()), "internal", "inbound", "sofia/internal/1000@127.0.0.1",
                    "1000", "1000", "2000", "127.0.0.1", now, state="CS_EXECUTE",
                    callstate="ACTIVE", answer_state="answered", answered=now)
        b = Channel(str(uuidlib.uuid4()), "internal", "outbound", "sofia/internal/2000@127.0.0.1",
                    "1000", "1000", "2000", "127.0.0.1", now, state="CS_EXECUTE",
                    callstate="ACTIVE", answer_state="answered", answered=now)
        a.variables.update({"direction": "inbound", "uuid": a.uuid, "bridge_to": b.uuid,
                            "sip_call_id": f"{uuidlib.uuid4().hex}@127.0.0.1",
                            "recovery_profile_name": "internal", "local_media_port": "16384",
                            "sip_from_user": "1000", "sip_to_user": "2000",
                            "endpoint_disposition": "ANSWER"})
        headers = self.events.core_headers(name, CALLING[name])
        headers.extend(a.event_headers(b))
        return SimEvent(name, None, headers)

    # -- API (fsha.sim.api renders the commands) ------------------------------------------

    def api(self, line: str) -> ApiResult:
        """Run ``CMD ARGS``. ``found`` False: no such API (``-ERR CMD Command not found!``)."""
        return self._api.api(line)

    def global_vars(self) -> dict[str, str]:
        """What ``global_getvar`` answers (FreeSWITCH's core variables)."""
        return self._api.global_vars()

    # -- views for the control interface -------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "core_uuid": self.core_uuid,
            "hostname": self.hostname,
            "calls": len(self.channels),
            "profiles": {
                p.name: {
                    "state": p.state,
                    "ip": p.ip,
                    "port": p.bound_port if p.bound_port is not None else p.port,
                    "standby": p.standby,
                }
                for p in self.profiles.values()
            },
        }


def _limit_app_data(spec: LimitSpec) -> str:
    """The ``limit`` application's (expanded) argument for ``spec``."""
    arg = f"{spec.backend} {spec.realm} {spec.resource}"
    if spec.max >= 0:
        arg += f" {spec.max}" + (f"/{spec.interval}" if spec.interval else "")
    return arg

