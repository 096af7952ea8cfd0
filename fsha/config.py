"""The one cluster config file (TOML) that every node reads.

Loading is strict: every problem becomes one line ``FILE: KEY: what is wrong``, and all of
them are collected so an operator fixes a file in one pass. ``fsha check-config FILE`` prints
them and exits 2; the daemon refuses to start with the first one.

Why about 1,000 lines: every table of the file is checked here, one function per
table sharing one problem collector, so that all problems come out in one pass.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import stat
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIN_INTERVAL_MS = 5
MAX_INTERVAL_MS = 10_000
MIN_SECRET_BYTES = 16
MAX_NODES = 2040  # node ids 0..2039: what a heartbeat's heard bitmap (255 bytes) can name
MAX_SLOTS = 0xFFFE  # 0xFFFF is "no slot" on the wire
FLOATING_IP_BACKENDS = ("loopback", "ip", "command")
CLASSIC = "classic"
HOT_STANDBY = "hot_standby"
PROFILE_MODES = (CLASSIC, HOT_STANDBY)  # [takeover] profiles


class ConfigError(Exception):
    """A config file that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems[0] if problems else "invalid config")
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Network:
    name: str
    index: int
    port: int


@dataclass(frozen=True, slots=True)
class ESLConfig:
    host: str
    port: int
    password: str
    timeout: float
    hung_after: float = 5.0  # seconds without any answer: hung (fsha.health)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    node_id: int
    priority: int
    addresses: dict[str, str]  # network name -> this node's IP on that network
    stream: Endpoint
    status: Endpoint
    esl: ESLConfig
    core_db: Path | None
    #: Where a profile's ``sip_registrations`` live: a path with ``{profile}`` (FreeSWITCH's
    #: default ``<db dir>/sofia_reg_<profile>.db``); None without a core DB.
    registration_db: str | None = None

    def registration_db_for(self, profile: str) -> Path | None:
        """The SQLite file holding ``profile``'s registrations (None: not configured)."""
        if self.registration_db is None:
            return None
        return Path(self.registration_db.replace("{profile}", profile))


@dataclass(frozen=True, slots=True)
class FloatingIP:
    address: str
    prefix: int
    interface: str

    def __str__(self) -> str:
        return f"{self.address}/{self.prefix} dev {self.interface}"


@dataclass(frozen=True, slots=True)
class SlotConfig:
    name: str
    slot_id: int
    ips: tuple[FloatingIP, ...]
    profiles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TLSConfig:
    ca: Path
    cert: str  # path template; "{node}" is replaced by the node name
    key: str

    def cert_for(self, node: str) -> Path:
        return Path(self.cert.replace("{node}", node))

    def key_for(self, node: str) -> Path:
        return Path(self.key.replace("{node}", node))


@dataclass(frozen=True, slots=True)
class FloatingIPConfig:
    backend: str
    command: tuple[str, ...]
    arping_count: int
    timeout: float


@dataclass(frozen=True, slots=True)
class FencingConfig:
    """``[fencing]``: the command that makes sure a dead master is dead before a takeover.

    Run as ``COMMAND... fence NODE`` (no shell); exit 0 means NODE is fenced. ``required``:
    a failed fence aborts the takeover (else it is a warning and the takeover goes on).
    """

    command: tuple[str, ...]
    timeout: float  # seconds
    required: bool


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """``[guard]``: the dead man's switch fsha runs beside itself (:mod:`fsha.guard`).

    ``lease``: how long the guard keeps a slot after fsha's last renewal (renewed every
    heartbeat interval while this node claims, masters or releases a slot); by default
    ``dead_after`` (docs/design.rst, "Leases and the guard").
    """

    enabled: bool
    lease: float  # seconds


@dataclass(frozen=True, slots=True)
class TakeoverConfig:
    """``[takeover]``: how a slot's calls are recovered (see :mod:`fsha.recovery`)."""

    recover_batch: int = 100  # rows per `sofia profile P recover` (fsha.recovery default)
    recover_timeout: float = 10.0  # seconds one batch's recover may take (its stall bound)
    # "classic": a slot's profiles run only on its master (started at takeover, stopped at
    # release); "hot_standby": every node runs every slot's profiles from boot, bound
    # non-locally, and the master is whoever holds the addresses (fsha.egress,
    # docs/freeswitch.rst)
    profiles: str = "classic"

    @property
    def hot_standby(self) -> bool:
        return self.profiles == HOT_STANDBY


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """``[limits]``: cluster-wide call-limit usage (see :mod:`fsha.limitbook`)."""

    poll_interval: float  # seconds between two `hash_dump limit` of the local FreeSWITCH
    hash_realm: str | None  # realm of the `hash insert` of the totals; None: not written
    hiredis_realms: tuple[str, ...]  # mod_hiredis profiles whose counters live in [redis]
    sweep_interval: float  # seconds between two liveness checks of adopted calls
    reconcile_timeout: float  # bound of one reconciliation attempt after a takeover
    retry_interval: float  # seconds before a failed reconciliation / release is retried


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """``[redis]``: the Redis server (txredisapi) for hiredis limit counters."""

    host: str
    port: int
    db: int
    username: str | None
    password_file: Path | None
    tls: bool
    ca: Path | None
    server_name: str | None
    timeout: float  # seconds, every command
    connect_timeout: float
    reconnect_min: float
    reconnect_max: float
    key_prefix: str
    marker_ttl: int  # seconds a release marker is kept
    durable_state: bool = False  # this node's replicated records kept in Redis (fsha.durable)
    durable_flush: float = 0.2  # seconds between two writes of the durable store


@dataclass(frozen=True, slots=True)
class StateConfig:
    """``[state]``: where each node keeps what outlives a restart (:mod:`fsha.history`):
    its history (JSON lines, rotated by size) and its maintenance flag."""

    dir: str = "/var/lib/fsha/{node}"  # ``{node}``: the node's name
    history_max_bytes: int = 1_000_000  # one history file before it rotates
    history_files: int = 10  # files kept, the current one included
    explicit: bool = False  # the section is in the file (an unusable dir stops the start)

    def dir_for(self, node: str, base: Path) -> Path:
        return _resolve(base, self.dir.replace("{node}", node))


#: The node events ``[notify]`` runs its command for unless ``events`` names others.
NOTIFY_EVENTS = ("role", "master", "release", "release-failed", "claim-aborted",
                 "takeover-acquire", "takeover-release", "peer-down", "peer-takeover",
                 "maintenance", "switchover", "lease-expired", "resources-lost", "freeswitch",
                 "guard-dropped", "guard-failed", "config", "config-pending", "config-refused",
                 "slot-change")


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    """``[notify]``: a command run (no shell) on role changes, takeovers and faults
    (:mod:`fsha.notify`), as ``COMMAND... EVENT NODE SLOT EPOCH`` with ``FSHA_*`` variables."""

    command: tuple[str, ...]
    timeout: float  # seconds one run may take before it is killed
    events: tuple[str, ...] = NOTIFY_EVENTS
    max_running: int = 4  # runs at once; more wait in a bounded queue


@dataclass(frozen=True)
class ClusterConfig:
    path: Path
    name: str
    secret_file: Path
    heartbeat_interval: float  # seconds
    dead_after: float  # seconds: the longest silence before a peer is judged dead
    discovery: float  # seconds a starting node listens before it may claim anything
    quorum_spec: str  # as written: "majority", "none" or a number
    quorum: int  # nodes (self included) a node must see alive to take over
    networks: tuple[Network, ...]
    nodes: tuple[NodeConfig, ...]
    slots: tuple[SlotConfig, ...]
    floating_ip: FloatingIPConfig
    tls: TLSConfig | None
    digest: bytes = field(repr=False)  # 8 bytes: equal on every node reading the same file
    fencing: FencingConfig | None = None  # [fencing]; not in the digest
    limits: LimitsConfig | None = None  # [limits]; not in the digest
    redis: RedisConfig | None = None  # [redis]; not in the digest
    guard: GuardConfig | None = None  # [guard] (None: built from the defaults); not in the digest
    takeover: TakeoverConfig = TakeoverConfig()  # [takeover]; not in the digest
    state: StateConfig = StateConfig()  # [state]; not in the digest
    notify: NotifyConfig | None = None  # [notify]; not in the digest
    # cluster.dead_after_min_ms (seconds): the shortest silence judged death, the adaptive
    # detector's floor (fsha.detector); None: not set, dead_after is a fixed time
    dead_after_min: float | None = None

    @property
    def detection_floor(self) -> float:
        """The shortest silence after which a peer may be judged dead (seconds)."""
        return self.dead_after if self.dead_after_min is None else self.dead_after_min

    def node(self, name: str) -> NodeConfig:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def slot(self, name: str) -> SlotConfig:
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise KeyError(name)

    def esl_timeout_total(self) -> float:
        """The longest ESL request timeout of any node (bounds FreeSWITCH steps)."""
        return max(n.esl.timeout for n in self.nodes)

    def read_secret(self) -> bytes:
        """The shared HMAC secret; raises ConfigError naming the file if it is unusable."""
        return _read_secret(self.path, self.secret_file)


# -- loading ------------------------------------------------------------------------------


class _Checker:
    """Collects problems as ``FILE: KEY: message`` lines while walking the raw TOML."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.path}: {key}: {message}")

    def table(self, raw: Any, key: str, allowed: Iterable[str]) -> dict[str, Any] | None:
        if not isinstance(raw, dict):
            self.problem(key, f"must be a table, not {_kind(raw)}")
            return None
        allowed = tuple(allowed)
        for name in raw:
            if name not in allowed:
                self.problem(f"{key}.{name}" if key else name,
                             f"unknown key (allowed: {', '.join(allowed)})")
        return raw

    def get(self, raw: dict[str, Any], key: str, name: str, kind: type | tuple[type, ...],
            default: Any = ..., check: Callable[[Any], str | None] | None = None) -> Any:
        full = f"{key}.{name}" if key else name
        if name not in raw:
            if default is ...:
                self.problem(full, "missing")
                return None
            return default
        value = raw[name]
        # bool is an int subclass; a port of `true` is a mistake, not 1
        if (isinstance(value, bool) and bool not in _as_tuple(kind)) or not isinstance(value, kind):
            self.problem(full, f"must be {_kind_name(kind)}, not {_kind(value)}")
            return None
        if check is not None:
            message = check(value)
            if message:
                self.problem(full, message)
                return None
        return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(_kind(t()) if t is not str else "a string" for t in _as_tuple(kind))


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "must be a port number 1-65535"


def _port_or_zero(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number 0-65535"


def _ip(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r} is not an IP address"
    return None


def _nonempty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _endpoint(checker: _Checker, raw: dict[str, Any], key: str, name: str) -> Endpoint | None:
    text = checker.get(raw, key, name, str)
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or _ip(host) or _port(int(port)):
        checker.problem(f"{key}.{name}", f"{text!r} must be IP:PORT with a port 1-65535")
        return None
    return Endpoint(host, int(port))


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def load_config(path: str | os.PathLike[str]) -> ClusterConfig:
    """Read and validate a cluster config; raises ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: Path) -> ClusterConfig:
    c = _Checker(path)
    base = path.parent
    c.table(raw, "", ("cluster", "tls", "floating_ip", "fencing", "limits", "redis", "guard",
                      "network", "node", "slot", "takeover", "state", "notify"))

    cluster = c.table(raw.get("cluster", {}), "cluster",
                      ("name", "secret_file", "heartbeat_interval_ms", "dead_after_ms",
                       "dead_after_min_ms", "discovery_ms", "quorum")) or {}
    if "cluster" not in raw:
        c.problem("cluster", "missing")
    name = c.get(cluster, "cluster", "name", str, check=_nonempty) if "cluster" in raw else None
    secret = c.get(cluster, "cluster", "secret_file", str, check=_nonempty) \
        if "cluster" in raw else None
    interval_ms = c.get(cluster, "cluster", "heartbeat_interval_ms", int, 50,
                        check=lambda v: None if MIN_INTERVAL_MS <= v <= MAX_INTERVAL_MS else
                        f"must be {MIN_INTERVAL_MS}-{MAX_INTERVAL_MS}")
    dead_ms = c.get(cluster, "cluster", "dead_after_ms", int, None)
    if dead_ms is None and "dead_after_ms" not in cluster and interval_ms:
        dead_ms = interval_ms * 5
    if interval_ms and dead_ms is not None and dead_ms < 2 * interval_ms:
        c.problem("cluster.dead_after_ms",
                  f"{dead_ms} ms is shorter than two heartbeat intervals "
                  f"({2 * interval_ms} ms): one lost datagram would declare a node dead")
        dead_ms = None
    # The adaptive detector's floor (fsha.detector): judged dead after a silence between
    # this and dead_after_ms, following what each link has shown.
    floor_ms = c.get(cluster, "cluster", "dead_after_min_ms", int, None)
    if floor_ms is not None and interval_ms and dead_ms is not None \
            and not 2 * interval_ms <= floor_ms <= dead_ms:
        c.problem("cluster.dead_after_min_ms",
                  f"{floor_ms} ms must be at least two heartbeat intervals "
                  f"({2 * interval_ms} ms) and at most dead_after_ms ({dead_ms} ms)")
        floor_ms = None
    discovery_ms = c.get(cluster, "cluster", "discovery_ms", int, None,
                         check=lambda v: None if v >= 0 else "must be >= 0")
    if discovery_ms is None and dead_ms and interval_ms:
        discovery_ms = dead_ms + 2 * interval_ms
    elif discovery_ms is not None and dead_ms and discovery_ms < dead_ms:
        # A node in discovery casts no "dead" vote: the lease argument (docs/design.rst)
        # needs a restarted node to have listened for a dead-after time before it votes.
        c.problem("cluster.discovery_ms",
                  f"{discovery_ms} ms is shorter than dead_after_ms ({dead_ms} ms): a "
                  "starting node must listen at least that long")
        discovery_ms = None
    quorum_raw = c.get(cluster, "cluster", "quorum", (str, int), "majority")

    networks = _networks(c, raw.get("network"))
    nodes = _nodes(c, raw.get("node"), networks, base)
    slots = _slots(c, raw.get("slot"), nodes)
    floating = _floating_ip(c, raw.get("floating_ip", {}), base)
    tls = _tls(c, raw.get("tls"), base)
    fencing = _fencing(c, raw.get("fencing"), base)
    redis = _redis(c, raw.get("redis"), base)
    limits = _limits(c, raw.get("limits"))
    guard = _guard(c, raw.get("guard", {}), interval_ms, dead_ms,
                   dead_ms if floor_ms is None else floor_ms)
    takeover = _takeover(c, raw.get("takeover", {}))
    if takeover is not None and takeover.hot_standby and floating is not None \
            and floating.backend == "loopback":
        # the loopback backend never takes an address off the host: a released slot's
        # running profile would go on answering (and sending BYEs) from it
        c.problem("takeover.profiles", "\"hot_standby\" needs [floating_ip] backend \"ip\" "
                                       "or \"command\": with \"loopback\" the addresses "
                                       "never leave a host, so every node would serve the slot")
    state = _state(c, raw.get("state"))
    notify = _notify(c, raw.get("notify"), base)
    if "limits" in raw and "tls" not in raw:
        c.problem("limits", "needs [tls]: limit usage is replicated between the nodes")
    if redis is not None and redis.durable_state and "tls" not in raw:
        c.problem("redis.durable_state", "needs [tls]: the durable store keeps the replicated "
                                         "state")
    if limits is not None and limits.hiredis_realms and "redis" not in raw:
        c.problem("limits.hiredis_realms", "needs a [redis] section: the counters to release "
                                           "live there")

    quorum = 0
    quorum_spec = str(quorum_raw)
    if quorum_raw is not None and nodes:
        if quorum_raw == "majority":
            quorum = len(nodes) // 2 + 1
        elif quorum_raw == "none":
            quorum = 1
        elif isinstance(quorum_raw, int) and 1 <= quorum_raw <= len(nodes):
            quorum = quorum_raw
        else:
            c.problem("cluster.quorum",
                      f"{quorum_raw!r} must be \"majority\", \"none\" or a number "
                      f"from 1 to the number of nodes ({len(nodes)})")
    if nodes and slots and len(slots) > len(nodes):
        c.problem("slot", f"{len(slots)} slots but only {len(nodes)} nodes: "
                          "every slot needs a node to master it")

    if c.problems:
        raise ConfigError(c.problems)
    assert name is not None and secret is not None and interval_ms and dead_ms is not None
    assert discovery_ms is not None and floating is not None and takeover is not None
    config = ClusterConfig(
        path=path, name=name, secret_file=_resolve(base, secret),
        heartbeat_interval=interval_ms / 1000, dead_after=dead_ms / 1000,
        discovery=discovery_ms / 1000, quorum_spec=quorum_spec, quorum=quorum,
        networks=tuple(networks), nodes=tuple(nodes), slots=tuple(slots),
        floating_ip=floating, tls=tls, digest=b"", fencing=fencing, limits=limits,
        redis=redis, guard=guard, takeover=takeover, state=state or StateConfig(),
        notify=notify, dead_after_min=None if floor_ms is None else floor_ms / 1000)
    object.__setattr__(config, "digest", config_digest(config))
    return config


def _entries(c: _Checker, raw: Any, key: str) -> list[dict[str, Any]]:
    if raw is None:
        c.problem(key, f"missing: at least one [[{key}]] is needed")
        return []
    if not isinstance(raw, list) or not raw:
        c.problem(key, f"must be an array of tables ([[{key}]]), not {_kind(raw)}")
        return []
    return raw


def _label(entry: Any, key: str, index: int) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"{key}.{name}" if isinstance(name, str) and name else f"{key}[{index}]"


def _unique(c: _Checker, seen: dict[Any, str], value: Any, key: str, what: str) -> bool:
    if value in seen:
        c.problem(key, f"duplicate {what} {value} (also {seen[value]})")
        return False
    seen[value] = key
    return True


def _networks(c: _Checker, raw: Any) -> list[Network]:
    result: list[Network] = []
    names: dict[Any, str] = {}
    for i, entry in enumerate(_entries(c, raw, "network")):
        key = _label(entry, "network", i)
        t = c.table(entry, key, ("name", "port"))
        if t is None:
            continue
        name = c.get(t, key, "name", str, check=_nonempty)
        port = c.get(t, key, "port", int, check=_port)
        if name is not None and _unique(c, names, name, f"{key}.name", "network name") \
                and port is not None:
            result.append(Network(name, len(result), port))
    return result


def _nodes(c: _Checker, raw: Any, networks: list[Network], base: Path) -> list[NodeConfig]:
    result: list[NodeConfig] = []
    names: dict[Any, str] = {}
    addresses: dict[Any, str] = {}
    endpoints: dict[Any, str] = {}
    entries = _entries(c, raw, "node")
    if len(entries) > MAX_NODES:
        c.problem("node", f"at most {MAX_NODES} nodes")
        return result
    for i, entry in enumerate(entries):
        key = _label(entry, "node", i)
        t = c.table(entry, key, ("name", "priority", "address", "stream", "status", "esl"))
        if t is None:
            continue
        ok = True
        name = c.get(t, key, "name", str, check=_nonempty)
        ok &= name is not None and _unique(c, names, name, f"{key}.name", "node name")
        priority = c.get(t, key, "priority", int, 100)
        ok &= priority is not None
        addr_raw = c.get(t, key, "address", dict)
        node_addresses: dict[str, str] = {}
        if addr_raw is not None:
            for net_name, ip in addr_raw.items():
                akey = f"{key}.address.{net_name}"
                if net_name not in {n.name for n in networks}:
                    c.problem(akey, "names no configured [[network]]")
                    ok = False
                elif not isinstance(ip, str) or _ip(ip):
                    c.problem(akey, f"{ip!r} is not an IP address")
                    ok = False
                elif _unique(c, addresses, ip, akey, "address"):
                    node_addresses[net_name] = ip
                else:
                    ok = False
            for net in networks:
                if net.name not in addr_raw:
                    c.problem(f"{key}.address.{net.name}",
                              f"missing: every node needs an address on network {net.name}")
                    ok = False
        else:
            ok = False
        stream = _endpoint(c, t, key, "stream")
        status = _endpoint(c, t, key, "status")
        if status is not None and ipaddress.ip_address(status.host).is_unspecified:
            # The control API listens there too: never on every interface by accident.
            c.problem(f"{key}.status", f"{status.host!r} listens on every interface, the "
                      "control API with it: give this node's loopback or management address")
            status = None
        for ep, what in ((stream, "stream"), (status, "status")):
            # Peers reach a node at these; a loopback status address is per host, and
            # may repeat (each node has its own 127.0.0.1).
            if ep is None:
                ok = False
            elif not (what == "status" and ipaddress.ip_address(ep.host).is_loopback):
                ok &= _unique(c, endpoints, (ep.host, ep.port), f"{key}.{what}", "endpoint")
        esl, core_db, registration_db = _esl(c, t.get("esl"), f"{key}.esl", base)
        ok &= esl is not None
        if ok:
            result.append(NodeConfig(name, len(result), priority, node_addresses, stream,
                                     status, esl, core_db, registration_db))
    return result


#: sofia's default registration database (the profile's ``dbname``), in the core DB's folder.
DEFAULT_REGISTRATION_DB = "sofia_reg_{profile}.db"


def _esl(c: _Checker, raw: Any, key: str, base: Path
         ) -> tuple[ESLConfig | None, Path | None, str | None]:
    if raw is None:
        c.problem(key, "missing: how fsha reaches this node's FreeSWITCH event socket")
        return None, None, None
    t = c.table(raw, key, ("host", "port", "password", "timeout_ms", "hung_after_ms",
                           "core_db", "registration_db"))
    if t is None:
        return None, None, None
    host = c.get(t, key, "host", str, "127.0.0.1", check=_ip)
    port = c.get(t, key, "port", int, 8021, check=_port)
    password = c.get(t, key, "password", str, check=_nonempty)
    timeout = c.get(t, key, "timeout_ms", int, 2000,
                    check=lambda v: None if 10 <= v <= 600_000 else "must be 10-600000")
    hung = c.get(t, key, "hung_after_ms", int, max(5000, 2 * (timeout or 0)),
                 check=lambda v: None if 100 <= v <= 600_000 else "must be 100-600000")
    if hung is not None and timeout is not None and hung <= timeout:
        c.problem(f"{key}.hung_after_ms", f"{hung} ms must be longer than timeout_ms "
                                          f"({timeout} ms): a late answer is busy, not hung")
        hung = None
    core_db = c.get(t, key, "core_db", str, None, check=_nonempty)

    def pattern(v: str) -> str | None:
        if "{profile}" not in v:
            return "must contain {profile} (each sofia profile has its own database)"
        if v.replace("{profile}", "").strip("/") == "":
            return "must name a file"
        return None

    registration_db = c.get(t, key, "registration_db", str, None, check=pattern)
    if registration_db is not None and core_db is None:
        c.problem(f"{key}.registration_db", "needs core_db (registrations are restored "
                                            "only where calls are)")
    if None in (host, port, password, timeout, hung):
        return None, None, None
    assert hung is not None and timeout is not None
    core = _resolve(base, core_db) if core_db else None
    regs: str | None = None
    if core is not None:
        # relative patterns are relative to the core DB's folder (FreeSWITCH's db dir)
        regs = str(core.parent / (registration_db or DEFAULT_REGISTRATION_DB))
    return ESLConfig(host, port, password, timeout / 1000, hung / 1000), core, regs


def _slots(c: _Checker, raw: Any, nodes: list[NodeConfig]) -> list[SlotConfig]:
    result: list[SlotConfig] = []
    names: dict[Any, str] = {}
    ips: dict[Any, str] = {}
    profiles: dict[Any, str] = {}
    node_ips = {ip for n in nodes for ip in n.addresses.values()}
    entries = _entries(c, raw, "slot")
    if len(entries) > MAX_SLOTS:
        c.problem("slot", f"at most {MAX_SLOTS} slots")
        return result
    for i, entry in enumerate(entries):
        key = _label(entry, "slot", i)
        t = c.table(entry, key, ("name", "profiles", "ip"))
        if t is None:
            continue
        ok = True
        name = c.get(t, key, "name", str, check=_nonempty)
        ok &= name is not None and _unique(c, names, name, f"{key}.name", "slot name")
        prof = c.get(t, key, "profiles", list,
                     check=lambda v: None if v else "must name at least one sofia profile")
        slot_profiles: list[str] = []
        for j, p in enumerate(prof or []):
            pkey = f"{key}.profiles[{j}]"
            if not isinstance(p, str) or not p.strip() or any(ch.isspace() for ch in p):
                c.problem(pkey, f"{p!r} must be a sofia profile name without spaces")
                ok = False
            elif _unique(c, profiles, p, pkey, "profile (each slot needs its own profiles)"):
                slot_profiles.append(p)
            else:
                ok = False
        ok &= prof is not None
        slot_ips: list[FloatingIP] = []
        ip_raw = c.get(t, key, "ip", list,
                       check=lambda v: None if v else "must list at least one floating IP")
        for j, entry_ip in enumerate(ip_raw or []):
            ikey = f"{key}.ip[{j}]"
            ti = c.table(entry_ip, ikey, ("address", "interface"))
            if ti is None:
                ok = False
                continue
            addr = c.get(ti, ikey, "address", str)
            iface = c.get(ti, ikey, "interface", str, check=_nonempty)
            if addr is None or iface is None:
                ok = False
                continue
            try:
                iface_net = ipaddress.ip_interface(addr)
            except ValueError:
                c.problem(f"{ikey}.address", f"{addr!r} must be an address with prefix length,"
                                             " e.g. 198.18.10.1/24")
                ok = False
                continue
            if "/" not in addr:
                c.problem(f"{ikey}.address", f"{addr!r} needs a prefix length, e.g. {addr}/24")
                ok = False
                continue
            ip = str(iface_net.ip)
            if ip in node_ips:
                c.problem(f"{ikey}.address", f"{ip} is also a node address")
                ok = False
            elif _unique(c, ips, ip, f"{ikey}.address", "floating IP"):
                slot_ips.append(FloatingIP(ip, iface_net.network.prefixlen, iface))
            else:
                ok = False
        ok &= ip_raw is not None
        if ok:
            result.append(SlotConfig(name, len(result), tuple(slot_ips), tuple(slot_profiles)))
    return result


def _floating_ip(c: _Checker, raw: Any, base: Path) -> FloatingIPConfig | None:
    t = c.table(raw, "floating_ip", ("backend", "command", "arping_count", "timeout_ms"))
    if t is None:
        return None
    backend = c.get(t, "floating_ip", "backend", str, "ip",
                    check=lambda v: None if v in FLOATING_IP_BACKENDS else
                    f"{v!r} must be one of {', '.join(FLOATING_IP_BACKENDS)}")
    command = c.get(t, "floating_ip", "command", list, [])
    if command is not None and not all(isinstance(a, str) and a for a in command):
        c.problem("floating_ip.command", "must be an array of non-empty strings (argv)")
        command = None
    if backend == "command" and command == []:
        c.problem("floating_ip.command", "missing: backend \"command\" needs the argv to run")
    arping = c.get(t, "floating_ip", "arping_count", int, 3,
                   check=lambda v: None if 0 <= v <= 100 else "must be 0-100")
    timeout = c.get(t, "floating_ip", "timeout_ms", int, 5000,
                    check=lambda v: None if 10 <= v <= 600_000 else "must be 10-600000")
    if None in (backend, command, arping, timeout):
        return None
    argv = tuple(str(_resolve(base, command[0])) if command and "/" in command[0]
                 else a for a in command[:1]) + tuple(command[1:])
    return FloatingIPConfig(backend, argv, arping, timeout / 1000)


def _argv(command: list[str], base: Path) -> tuple[str, ...]:
    """A configured argv; a relative path in ``argv[0]`` is relative to the config file."""
    return tuple(str(_resolve(base, command[0])) if command and "/" in command[0]
                 else a for a in command[:1]) + tuple(command[1:])


def _fencing(c: _Checker, raw: Any, base: Path) -> FencingConfig | None:
    if raw is None:
        return None
    t = c.table(raw, "fencing", ("command", "timeout_ms", "required"))
    if t is None:
        return None
    command = c.get(t, "fencing", "command", list,
                    check=lambda v: None if v else "must not be empty: the argv to run")
    if command is not None and not all(isinstance(a, str) and a for a in command):
        c.problem("fencing.command", "must be an array of non-empty strings (argv)")
        command = None
    timeout = c.get(t, "fencing", "timeout_ms", int, 10_000,
                    check=lambda v: None if 10 <= v <= 600_000 else "must be 10-600000")
    required = c.get(t, "fencing", "required", bool, True)
    if command is None or timeout is None or required is None:
        return None
    return FencingConfig(_argv(command, base), timeout / 1000, required)


def _guard(c: _Checker, raw: Any, interval_ms: int | None, dead_ms: int | None,
           floor_ms: int | None) -> GuardConfig | None:
    t = c.table(raw, "guard", ("enabled", "lease_ms"))
    if t is None:
        return None
    enabled = c.get(t, "guard", "enabled", bool, True)
    lease_ms = c.get(t, "guard", "lease_ms", int, None)
    if not interval_ms or dead_ms is None or floor_ms is None or enabled is None:
        return None
    if lease_ms is None and "lease_ms" not in t:
        lease_ms = floor_ms  # see docs/design.rst, "Leases and the guard"
    elif lease_ms is not None and not interval_ms <= lease_ms <= floor_ms:
        key = "dead_after_ms" if floor_ms == dead_ms else "dead_after_min_ms"
        c.problem("guard.lease_ms", f"{lease_ms} ms must be at least one heartbeat interval "
                                    f"({interval_ms} ms) and at most the shortest silence the "
                                    f"peers judge death ({floor_ms} ms: cluster.{key}): the "
                                    "guard must drop a slot before the others may claim it")
        return None
    if lease_ms is None:
        return None
    return GuardConfig(enabled, lease_ms / 1000)


def _ms_range(lo: int, hi: int) -> Callable[[int], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be {lo}-{hi}"


def _takeover(c: _Checker, raw: Any) -> TakeoverConfig | None:
    t = c.table(raw, "takeover", ("recover_batch", "recover_timeout_ms", "profiles"))
    if t is None:
        return None
    default = TakeoverConfig()
    batch = c.get(t, "takeover", "recover_batch", int, default.recover_batch,
                  check=lambda v: None if 1 <= v <= 10_000 else "must be 1-10000")
    timeout = c.get(t, "takeover", "recover_timeout_ms", int,
                    round(default.recover_timeout * 1000), check=_ms_range(100, 600_000))
    profiles = c.get(t, "takeover", "profiles", str, default.profiles,
                     check=lambda v: None if v in PROFILE_MODES else
                     f"{v!r} must be one of {', '.join(PROFILE_MODES)}")
    if batch is None or timeout is None or profiles is None:
        return None
    return TakeoverConfig(batch, timeout / 1000, profiles)


def _state(c: _Checker, raw: Any) -> StateConfig | None:
    if raw is None:
        return None
    t = c.table(raw, "state", ("dir", "history_max_bytes", "history_files"))
    if t is None:
        return None
    default = StateConfig()
    folder = c.get(t, "state", "dir", str, default.dir, check=_nonempty)
    size = c.get(t, "state", "history_max_bytes", int, default.history_max_bytes,
                 check=lambda v: None if 10_000 <= v <= 1_000_000_000
                 else "must be 10000-1000000000")
    files = c.get(t, "state", "history_files", int, default.history_files,
                  check=lambda v: None if 1 <= v <= 1000 else "must be 1-1000")
    if folder is None or size is None or files is None:
        return None
    return StateConfig(folder, size, files, explicit=True)


def _notify(c: _Checker, raw: Any, base: Path) -> NotifyConfig | None:
    if raw is None:
        return None
    t = c.table(raw, "notify", ("command", "timeout_ms", "events", "max_running"))
    if t is None:
        return None
    command = c.get(t, "notify", "command", list,
                    check=lambda v: None if v else "must not be empty: the argv to run")
    if command is not None and not all(isinstance(a, str) and a for a in command):
        c.problem("notify.command", "must be an array of non-empty strings (argv, no shell)")
        command = None
    timeout = c.get(t, "notify", "timeout_ms", int, 10_000, check=_ms_range(10, 600_000))
    events = c.get(t, "notify", "events", list, list(NOTIFY_EVENTS))
    if events is not None:
        unknown = [e for e in events if e not in NOTIFY_EVENTS and e != "*"]
        if unknown:
            c.problem("notify.events", f"unknown event(s) {', '.join(map(str, unknown))} "
                                       f"(known: {', '.join(NOTIFY_EVENTS)}, or \"*\")")
            events = None
    running = c.get(t, "notify", "max_running", int, 4,
                    check=lambda v: None if 1 <= v <= 64 else "must be 1-64")
    if command is None or timeout is None or events is None or running is None:
        return None
    chosen = ("*",) if "*" in events else tuple(events)  # "*": every event of the node
    return NotifyConfig(_argv(command, base), timeout / 1000, chosen, running)


def _limits(c: _Checker, raw: Any) -> LimitsConfig | None:
    if raw is None:
        return None
    t = c.table(raw, "limits", ("poll_interval_ms", "hash_realm", "hiredis_realms",
                                "sweep_interval_ms", "reconcile_timeout_ms",
                                "retry_interval_ms"))
    if t is None:
        return None
    poll = c.get(t, "limits", "poll_interval_ms", int, 2000, check=_ms_range(50, 600_000))
    realm = c.get(t, "limits", "hash_realm", str, "fsha_limit",
                  check=lambda v: None if v == "" or (
                      "/" not in v and not any(ch.isspace() for ch in v))
                  else "must not contain '/' or spaces (\"\" disables it)")
    realms = c.get(t, "limits", "hiredis_realms", list, [])
    if realms is not None and not all(
            isinstance(r, str) and r and not any(ch.isspace() for ch in r) for r in realms):
        c.problem("limits.hiredis_realms", "must be an array of non-empty strings without "
                                           "spaces (mod_hiredis profile names)")
        realms = None
    sweep = c.get(t, "limits", "sweep_interval_ms", int, 10_000,
                  check=_ms_range(100, 3_600_000))
    reconcile = c.get(t, "limits", "reconcile_timeout_ms", int, 10_000,
                      check=_ms_range(100, 600_000))
    retry = c.get(t, "limits", "retry_interval_ms", int, 5000, check=_ms_range(50, 600_000))
    if None in (poll, realm, realms, sweep, reconcile, retry):
        return None
    return LimitsConfig(poll / 1000, realm or None, tuple(realms), sweep / 1000,
                        reconcile / 1000, retry / 1000)


def _redis(c: _Checker, raw: Any, base: Path) -> RedisConfig | None:
    if raw is None:
        return None
    t = c.table(raw, "redis", ("address", "db", "username", "password_file", "tls", "ca",
                               "server_name", "timeout_ms", "connect_timeout_ms",
                               "reconnect_min_ms", "reconnect_max_ms", "key_prefix",
                               "marker_ttl_s", "durable_state", "durable_flush_ms"))
    if t is None:
        return None
    address = c.get(t, "redis", "address", str, check=_nonempty)
    host = port = None
    if address is not None:
        h, sep, p = address.rpartition(":")
        h = h.strip("[]")
        if not sep or not h or not p.isdigit() or _port(int(p)) or any(
                ch.isspace() or ch == "/" for ch in h):
            c.problem("redis.address", f"{address!r} must be HOST:PORT with a port 1-65535")
        else:
            host, port = h, int(p)
    db = c.get(t, "redis", "db", int, 0, check=lambda v: None if 0 <= v <= 1_000_000 else
               "must be >= 0")
    username = c.get(t, "redis", "username", str, "")
    password_file = c.get(t, "redis", "password_file", str, "")
    tls = c.get(t, "redis", "tls", bool, False)
    ca = c.get(t, "redis", "ca", str, "")
    if tls and ca == "":
        c.problem("redis.ca", "missing: tls = true needs the CA that signed the server's "
                              "certificate (it is verified)")
        ca = None
    server_name = c.get(t, "redis", "server_name", str, "")
    timeout = c.get(t, "redis", "timeout_ms", int, 1000, check=_ms_range(10, 60_000))
    connect = c.get(t, "redis", "connect_timeout_ms", int, 2000, check=_ms_range(10, 60_000))
    rmin = c.get(t, "redis", "reconnect_min_ms", int, 500, check=_ms_range(10, 600_000))
    rmax = c.get(t, "redis", "reconnect_max_ms", int, 10_000, check=_ms_range(10, 600_000))
    if rmin is not None and rmax is not None and rmax < rmin:
        c.problem("redis.reconnect_max_ms", f"{rmax} is less than reconnect_min_ms ({rmin})")
        rmax = None
    prefix = c.get(t, "redis", "key_prefix", str, "fsha:",
                   check=lambda v: None if not any(ch.isspace() for ch in v)
                   else "must not contain spaces")
    ttl = c.get(t, "redis", "marker_ttl_s", int, 7 * 86400,
                check=lambda v: None if 60 <= v <= 366 * 86400 else "must be 60-31622400")
    durable = c.get(t, "redis", "durable_state", bool, False)
    flush = c.get(t, "redis", "durable_flush_ms", int, 200, check=_ms_range(10, 60_000))
    if None in (host, port, db, username, password_file, tls, ca, server_name, timeout,
                connect, rmin, rmax, prefix, ttl, durable, flush):
        return None
    assert host is not None and port is not None
    return RedisConfig(host, port, db, username or None,
                       _resolve(base, password_file) if password_file else None, tls,
                       _resolve(base, ca) if ca else None, server_name or None,
                       timeout / 1000, connect / 1000, rmin / 1000, rmax / 1000, prefix, ttl,
                       durable, flush / 1000)


def _tls(c: _Checker, raw: Any, base: Path) -> TLSConfig | None:
    if raw is None:
        return None
    t = c.table(raw, "tls", ("ca", "cert", "key"))
    if t is None:
        return None
    ca = c.get(t, "tls", "ca", str, check=_nonempty)
    cert = c.get(t, "tls", "cert", str, check=_nonempty)
    key = c.get(t, "tls", "key", str, check=_nonempty)
    for name, value in (("cert", cert), ("key", key)):
        if value is not None and "{node}" not in value:
            c.problem(f"tls.{name}", f"{value!r} must contain {{node}}: one file per node")
            return None
    if None in (ca, cert, key):
        return None
    assert ca is not None and cert is not None and key is not None
    return TLSConfig(_resolve(base, ca), str(_resolve(base, cert)), str(_resolve(base, key)))


def _read_secret(config_path: Path, secret_file: Path) -> bytes:
    where = f"{config_path}: cluster.secret_file"
    try:
        secret = secret_file.read_bytes().strip()
    except OSError as e:
        raise ConfigError([f"{where}: cannot read {secret_file}: {e.strerror or e}"]) from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError([f"{where}: {secret_file} holds {len(secret)} bytes; "
                           f"at least {MIN_SECRET_BYTES} are needed"])
    return secret


def read_redis_password(config: ClusterConfig) -> str | None:
    """The ``[redis] password_file``'s first line (None without one); also checks that the
    ``ca`` file is there. Raises ConfigError naming the file and key."""
    redis = config.redis
    if redis is None:
        return None
    if redis.ca is not None and not redis.ca.is_file():
        raise ConfigError([f"{config.path}: redis.ca: {redis.ca} does not exist"])
    if redis.password_file is None:
        return None
    where = f"{config.path}: redis.password_file"
    try:
        lines = redis.password_file.read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError([f"{where}: cannot read {redis.password_file}: {reason}"]) from None
    if not lines or not lines[0].strip():
        raise ConfigError([f"{where}: {redis.password_file} is empty"])
    return lines[0].strip()


def secret_file_warnings(config: ClusterConfig) -> list[str]:
    try:
        mode = config.secret_file.stat().st_mode
    except OSError:
        return []
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [f"{config.path}: cluster.secret_file: {config.secret_file} is readable by "
                f"group/others (mode {stat.S_IMODE(mode):04o}); chmod 600 it"]
    return []


def config_digest(config: ClusterConfig) -> bytes:
    """8 bytes that differ when two nodes read different cluster definitions.

    Covers everything the nodes must agree on; leaves out secrets and node-local paths.
    """
    canonical = {
        "name": config.name,
        "interval": config.heartbeat_interval, "dead_after": config.dead_after,
        "discovery": config.discovery, "quorum": config.quorum,
        # only when set: the digests of configs without it stay what they were
        **({} if config.dead_after_min is None else {"dead_after_min": config.dead_after_min}),
        "networks": [[n.name, n.port] for n in config.networks],
        "nodes": [[n.name, n.priority, sorted(n.addresses.items()), str(n.stream), str(n.status)]
                  for n in config.nodes],
        "slots": [[s.name, [str(ip) for ip in s.ips], list(s.profiles)] for s in config.slots],
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).digest()[:8]


# -- finding this node --------------------------------------------------------------------


def _is_local_address(ip: str) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True


def choose_node(config: ClusterConfig, name: str | None,
                is_local: Callable[[str], bool] = _is_local_address) -> NodeConfig:
    """The node this process is: by ``--node NAME`` or the one whose addresses are local."""
    if name is not None:
        try:
            return config.node(name)
        except KeyError:
            known = ", ".join(n.name for n in config.nodes)
            raise ConfigError([f"{config.path}: node: no node named {name!r} "
                               f"(configured: {known})"]) from None
    local = [n for n in config.nodes if all(is_local(ip) for ip in n.addresses.values())]
    if len(local) == 1:
        return local[0]
    if not local:
        raise ConfigError([f"{config.path}: node: none of the configured nodes has all its "
                           "addresses on this host; pass --node NAME"])
    names = ", ".join(n.name for n in local)
    raise ConfigError([f"{config.path}: node: several nodes have their addresses on this host "
                       f"({names}); pass --node NAME"])


def check_tls_files(config: ClusterConfig, me: NodeConfig) -> None:
    """The node's replication PKI must be there before it starts (one clear line if not)."""
    tls = config.tls
    if tls is None:
        return
    for key, path in (("tls.ca", tls.ca), ("tls.cert", tls.cert_for(me.name)),
                      ("tls.key", tls.key_for(me.name))):
        if not path.is_file():
            raise ConfigError([f"{config.path}: {key}: {path} does not exist (make it with "
                               f"fsha certs init / fsha certs issue {me.name} --config "
                               f"{config.path})"])


#: The silence a healthy node can show beyond one heartbeat interval on the machine class
#: fsha is measured on (2 cores, a loaded host: docs/benchmarks.rst "Detection margins"):
#: a process that is not scheduled for this long sends nothing meanwhile. At 5/25 ms
#: (margin 20 ms) healthy masters were declared dead on idle links; at 10/50 (40 ms) and
#: 20/100 (80 ms) never.
STALL_MARGIN_MS = 40


def timing_warnings(config: ClusterConfig) -> list[str]:
    """Timings the config accepts but the measurements say flap on a busy host. With the
    adaptive detector (dead_after_min_ms) the floor is what counts: a stall longer than
    the floor that a link has not shown in the last half minute is judged death."""
    interval_ms = round(config.heartbeat_interval * 1000)
    dead_ms = round(config.detection_floor * 1000)
    key = "dead_after_ms" if config.dead_after_min is None else "dead_after_min_ms"
    if dead_ms - interval_ms >= STALL_MARGIN_MS:
        return []
    return [f"{config.path}: cluster.{key}: {dead_ms} ms is only "
            f"{dead_ms - interval_ms} ms more than one heartbeat interval ({interval_ms} ms): "
            f"a node whose process is not scheduled for that long (a busy 2-core host "
            f"stalls {STALL_MARGIN_MS} ms) is declared dead and its slots move; "
            f"use {key} >= heartbeat_interval_ms + {STALL_MARGIN_MS}"]


def node_warnings(config: ClusterConfig) -> list[str]:
    """What works but will bite an operator later, one line per node."""
    return [f"{config.path}: node {n.name}: no esl.core_db: it can never recover the calls of "
            "a slot it takes over (calls drop at every takeover to it)"
            for n in config.nodes if n.core_db is None]


def plural(count: int, word: str, words: str | None = None) -> str:
    """``1 node``, ``3 nodes``."""
    return f"{count} {word if count == 1 else (words or word + 's')}"
