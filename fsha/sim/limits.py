"""The ``limit`` application of the simulated switch: ``hash`` and ``hiredis`` backends.

Behaviour follows FreeSWITCH (``switch_limit.c``, ``mod_hash.c``, ``mod_hiredis.c``,
``mod_dptools.c``); the facts are in ``notes/limits-contract.md`` section A:

* a successful incr sets ``limit_backend`` (``hash,hiredis`` when both), and per backend
  ``limit_usage``/``limit_usage_<realm>_<resource>``/``limit_rate``/``limit_rate_<...>``
  (hash) or ``hiredis_raw_response`` (hiredis; ``hiredis_limit_exceeded=true`` on refusal);
* hash: in-process counters keyed ``<realm>_<resource>``; ``hash_dump limit`` prints
  ``L/<key>/<usage>/<rate>/<interval>/<last_check>``; a CUSTOM ``limit::usage`` event on
  each successful first incr of a key by a call;
* hiredis: ``realm`` is the hiredis profile (the simulator has one connection, whatever
  the realm); key ``<resource>`` (concurrency) or ``<resource>_<now // interval>`` (rate,
  ``EXPIRE`` on the first INCR); over max -> refused and, for concurrency, ``DECR`` at once;
  Redis unreachable or an error -> refused (mod_hiredis without ``ignore-connect-fail``);
* release at hangup only for what this process holds in the call's private list: a call
  recovered by ``sofia recover`` has the variables but releases nothing, and ``kill -9``
  releases nothing anywhere.

Every Redis command has a timeout; failures are logged, never raised into the switch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

BACKENDS = ("hash", "hiredis")
LIMIT_USAGE_USAGE = "USAGE: limit_usage <backend> <realm> <id>\n"
HASH_DUMP_USAGE = "Usage: all|limit|db [<realm>]\n"
DEFAULT_REDIS_TIMEOUT = 2.0
MAX_INT = 2**31 - 1


class LimitError(ValueError):
    """A limit specification that cannot be used."""


def _atoi(text: str) -> int:
    """C ``atoi``: leading sign and digits, 0 when none."""
    text = text.strip()
    sign, i = 1, 0
    if text[:1] in "+-" and text:
        sign, i = (-1 if text[0] == "-" else 1), 1
    j = i
    while j < len(text) and text[j].isdigit():
        j += 1
    return sign * int(text[i:j]) if j > i else 0


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One ``limit <backend> <realm> <resource> [<max>[/<interval>]]`` of a call."""

    backend: str
    realm: str
    resource: str
    max: int = -1  # -1: no maximum (a counter only)
    interval: int = 0  # > 0: a rate limit over this many seconds

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise LimitError(f"limit backend must be one of {', '.join(BACKENDS)}")
        for what, value in (("realm", self.realm), ("resource", self.resource)):
            if not isinstance(value, str) or not value or any(c.isspace() for c in value):
                raise LimitError(f"limit {what} must be a non-empty word")
        for what, value, lo in (("max", self.max, -1), ("interval", self.interval, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= MAX_INT:
                raise LimitError(f"limit {what} must be an integer in [{lo}, {MAX_INT}]")

    @classmethod
    def parse(cls, text: str) -> LimitSpec:
        """The ``limit`` application's argument: ``hash realm res 5``, ``hiredis p r 10/60``;
        max ``-`` (or omitted) means no maximum, a negative max is 0 (mod_dptools)."""
        argv = text.split()
        if len(argv) < 3 or len(argv) > 4:
            raise LimitError(
                "limit must be '<backend> <realm> <resource> [<max>[/<interval>]]', "
                f"got {text!r}"
            )
        backend, realm, resource = argv[:3]
        max_, interval = -1, 0
        if len(argv) == 4:
            arg = argv[3]
            if arg.startswith("-"):
                max_ = -1
            else:
                head, sep, tail = arg.partition("/")
                if not head.isdigit() or (sep and not tail.isdigit()):
                    raise LimitError(f"limit max must be N or N/SECONDS or '-', got {arg!r}")
                max_, interval = int(head), (int(tail) if sep else 0)
        return cls(backend, realm, resource, max_, interval)

    @classmethod
    def from_obj(cls, obj: Any) -> LimitSpec:
        """A spec from JSON: the ``limit`` argument string, or an object with ``backend``,
        ``realm``, ``resource`` and optional ``max`` (-1) and ``interval`` (0)."""
        if isinstance(obj, str):
            return cls.parse(obj)
        if not isinstance(obj, dict):
            raise LimitError("a limit must be a string or an object")
        unknown = set(obj) - {"backend", "realm", "resource", "max", "interval"}
        if unknown:
            raise LimitError(f"unknown limit key(s): {', '.join(sorted(unknown))}")
        try:
            return cls(
                obj["backend"], obj["realm"], obj["resource"],
                obj.get("max", -1), obj.get("interval", 0),
            )  # fmt: skip
        except KeyError as e:
            raise LimitError(f"limit needs {e.args[0]}") from None

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "realm": self.realm,
            "resource": self.resource,
            "max": self.max,
            "interval": self.interval,
        }


@dataclass(slots=True)
class HashItem:
    """``limit_hash_item_t``."""

    total_usage: int = 0
    rate_usage: int = 0
    interval: int = 0
    last_check: int = 0


@dataclass(frozen=True, slots=True)
class Holding:
    """What a call holds, as in the backend's per-channel private list."""

    backend: str
    realm: str
    resource: str
    key: str  # hash: realm_resource; hiredis: the Redis key
    interval: int = 0


class HashBackend:
    """``mod_hash``'s limit backend (in process)."""

    def __init__(self) -> None:
        self.items: dict[str, HashItem] = {}

    def incr(
        self, held: Iterable[Holding], spec: LimitSpec, now: int
    ) -> tuple[bool, HashItem, bool]:
        """``limit_incr_hash``: (allowed, item, counted). ``counted`` False when the call
        already holds the key (it is not counted twice)."""
        key = f"{spec.realm}_{spec.resource}"
        item = self.items.setdefault(key, HashItem())
        increment = not any(h.backend == "hash" and h.key == key for h in held)
        max_ = spec.max
        if spec.interval > 0:
            item.interval = spec.interval
            if item.last_check <= now - spec.interval:
                item.rate_usage = 1
                item.last_check = now
            else:
                item.rate_usage += 1
                if max_ >= 0 and item.rate_usage > max_:
                    return False, item, False
        elif max_ >= 0 and item.total_usage + int(increment) > max_:
            return False, item, False
        if increment:
            item.total_usage += 1
        return True, item, increment

    def release(self, key: str) -> None:
        """``limit_release_hash`` for one key of a call."""
        item = self.items.get(key)
        if item is None:
            return
        item.total_usage = max(0, item.total_usage - 1)
        if item.total_usage == 0 and item.rate_usage == 0:
            del self.items[key]

    def usage(self, realm: str, resource: str) -> tuple[int, int]:
        item = self.items.get(f"{realm}_{resource}")
        return (item.total_usage, item.rate_usage) if item else (0, 0)

    def dump(self) -> str:
        """The ``L/...`` lines of ``hash_dump limit``."""
        return "".join(
            f"L/{k}/{i.total_usage}/{i.rate_usage}/{i.interval}/{i.last_check}\n"
            for k, i in self.items.items()
        )


class RedisConnection(Protocol):
    """The part of a txredisapi connection the hiredis backend uses."""

    def incr(self, key: str, amount: int = 1) -> defer.Deferred[Any]: ...

    def decr(self, key: str, amount: int = 1) -> defer.Deferred[Any]: ...

    def expire(self, key: str, seconds: int) -> defer.Deferred[Any]: ...

    def get(self, key: str) -> defer.Deferred[Any]: ...

    def disconnect(self) -> defer.Deferred[Any]: ...


@dataclass(slots=True)
class RedisTarget:
    """``HOST:PORT[:PASSWORD]`` of the Redis the hiredis backend uses."""

    host: str
    port: int
    password: str | None = None

    @classmethod
    def parse(cls, text: str) -> RedisTarget:
        host, sep, rest = text.partition(":")
        port, _, password = rest.partition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise LimitError(f"hiredis must be HOST:PORT[:PASSWORD], got {text!r}")
        return cls(host, int(port), password or None)

    def public(self) -> dict[str, Any]:
        """For status views: never the password."""
        return {"host": self.host, "port": self.port, "auth": self.password is not None}


def _connect(target: RedisTarget, timeout: float) -> RedisConnection:
    import txredisapi  # imported here: only a simulator with a hiredis backend needs it

    conn: RedisConnection = txredisapi.lazyConnection(
        target.host,
        target.port,
        password=target.password,
        reconnect=True,
        connectTimeout=timeout,
        replyTimeout=timeout,
        convertNumbers=False,
    )
    return conn


class HiredisBackend:
    """``mod_hiredis``'s limit backend against a real Redis (txredisapi)."""

    def __init__(
        self,
        clock: IReactorTime,
        target: RedisTarget,
        *,
        timeout: float = DEFAULT_REDIS_TIMEOUT,
        connect: Callable[[RedisTarget, float], RedisConnection] = _connect,
    ) -> None:
        self.clock = clock
        self.target = target
        self.timeout = timeout
        self._connect = connect
        self._conn: RedisConnection | None = None
        self.errors = 0

    @property
    def conn(self) -> RedisConnection:
        if self._conn is None:
            self._conn = self._connect(self.target, self.timeout)
        return self._conn

    def _timed(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        return d.addTimeout(self.timeout, self.clock)

    def command(self, name: str, *args: Any) -> defer.Deferred[Any]:
        """One command with a timeout; a failure counts in ``errors`` and propagates."""
        try:
            d = self._timed(getattr(self.conn, name)(*args))
        except Exception:
            d = defer.fail()

        def failed(f: Any) -> Any:
            self.errors += 1
            return f

        return d.addErrback(failed)

    async def _quiet(self, name: str, key: str, *args: Any) -> None:
        """A follow-up command whose failure is only logged (as mod_hiredis does)."""
        try:
            await self.command(name, key, *args)
        except Exception as e:
            log.warn("sim hiredis: {command} {key} failed: {error}",
                     command=name.upper(), key=key, error=repr(e))

    @staticmethod
    def key(spec: LimitSpec, now: int) -> str:
        return f"{spec.resource}_{now // spec.interval}" if spec.interval else spec.resource

    async def incr(self, spec: LimitSpec, now: int) -> tuple[bool, str, bool, Holding | None]:
        """``hiredis_limit_incr``: (allowed, raw response or None, exceeded, holding)."""
        key = self.key(spec, now)
        try:
            reply = await self.command("incr", key)
        except Exception as e:
            log.warn("sim hiredis: INCR {key} failed: {error}", key=key, error=repr(e))
            return False, "", False, None
        response = str(reply)
        if spec.interval and response == "1":
            await self._quiet("expire", key, spec.interval)
        try:
            count = int(response)
        except ValueError:
            return False, response, False, None
        if spec.max > 0 and count > 0 and count > spec.max:
            if not spec.interval:
                await self._quiet("decr", key)
            return False, response, True, None
        holding = None
        if not spec.interval and count > 0:
            holding = Holding("hiredis", spec.realm, spec.resource, key)
        return True, response, False, holding

    def usage(self, resource: str) -> defer.Deferred[int]:
        """``hiredis_limit_usage``: GET resource, 0 when absent, -1 on error."""

        def done(reply: Any) -> int:
            return _atoi(str(reply)) if reply is not None else 0

        def failed(f: Any) -> int:
            log.warn("sim hiredis: GET {key} failed: {error}", key=resource,
                     error=f.getErrorMessage())
            return -1

        return self.command("get", resource).addCallbacks(done, failed)

    def close(self) -> defer.Deferred[Any]:
        conn, self._conn = self._conn, None
        if conn is None:
            return defer.succeed(None)
        return self._timed(conn.disconnect()).addErrback(lambda f: None)


UsageListener = Callable[[list[tuple[str, str]]], None]
ExecuteListener = Callable[[str, "LimitSpec", str], None]


@dataclass(slots=True)
class _Pending:
    deferreds: set[defer.Deferred[Any]] = field(default_factory=set)


class Limits:
    """The limit subsystem of one simulated switch: backends and per-call holdings."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        hiredis: HiredisBackend | None = None,
        on_usage: UsageListener | None = None,
        on_execute: ExecuteListener | None = None,
    ) -> None:
        self.clock = clock
        self.hash = HashBackend()
        self.hiredis = hiredis
        self.on_usage = on_usage
        # (uuid, spec, phase "start" | "complete"): the switch fires CHANNEL_EXECUTE and
        # CHANNEL_EXECUTE_COMPLETE around each ``limit`` (switch_core_session_exec)
        self.on_execute = on_execute
        self.held: dict[str, list[Holding]] = {}
        # calls with the core's release hook (a successful incr); not a recovered call
        self.hooked: set[str] = set()
        self.refused = 0
        self._pending = _Pending()

    def _now(self) -> int:
        return int(self.clock.seconds())

    def _track(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        self._pending.deferreds.add(d)

        def done(result: Any) -> Any:
            self._pending.deferreds.discard(d)
            return result

        return d.addBoth(done)

    def settle(self) -> defer.Deferred[Any]:
        """Fires when every Redis operation started so far has finished (tests)."""
        pending = list(self._pending.deferreds)
        return defer.DeferredList(pending, consumeErrors=True)

    # -- incr / release ------------------------------------------------------------------

    def apply(
        self,
        uuid: str,
        variables: dict[str, str],
        specs: Iterable[LimitSpec],
        alive: Callable[[], bool],
    ) -> defer.Deferred[bool]:
        """Run the ``limit`` applications of a call in order, setting its ``variables``;
        fires True when all passed, False at the first refusal. ``alive()`` says whether
        the channel still exists (a hiredis reply can come after a hangup: what was
        counted for a gone channel is released at once, as its hangup would have)."""
        d = defer.ensureDeferred(self._apply(uuid, variables, list(specs), alive))
        return self._track(d)

    async def _apply(
        self,
        uuid: str,
        variables: dict[str, str],
        specs: list[LimitSpec],
        alive: Callable[[], bool],
    ) -> bool:
        for spec in specs:
            if self.on_execute is not None:
                self.on_execute(uuid, spec, "start")
            if spec.backend == "hash":
                ok = self._incr_hash(uuid, variables, spec)
            else:
                ok = await self._incr_hiredis(uuid, variables, spec)
                if not alive():
                    self.release_call(uuid)
                    return False
            if ok:
                self.hooked.add(uuid)
                backends = variables.get("limit_backend")
                if not backends:
                    variables["limit_backend"] = spec.backend
                elif spec.backend not in backends:
                    variables["limit_backend"] = f"{backends},{spec.backend}"
            if self.on_execute is not None:
                self.on_execute(uuid, spec, "complete")
            if not ok:
                self.refused += 1
                return False
        return True

    def _incr_hash(self, uuid: str, variables: dict[str, str], spec: LimitSpec) -> bool:
        held = self.held.get(uuid, [])
        ok, item, counted = self.hash.incr(held, spec, self._now())
        if not ok:
            return False
        key = f"{spec.realm}_{spec.resource}"
        if counted:
            self.held.setdefault(uuid, []).append(
                Holding("hash", spec.realm, spec.resource, key, spec.interval)
            )
            if self.on_usage is not None:
                self.on_usage(
                    [
                        ("backend", "hash"),
                        ("realm", spec.realm),
                        ("key", spec.resource),
                        ("usage", str(item.total_usage)),
                        ("rate", str(item.rate_usage)),
                        ("max", str(spec.max)),
                        ("ratemax", str(spec.max if spec.max >= 0 else 0)),
                    ]
                )
        usage, rate = str(item.total_usage), str(item.rate_usage)
        variables["limit_usage"] = usage
        variables[f"limit_usage_{key}"] = usage
        variables["limit_rate"] = rate
        variables[f"limit_rate_{key}"] = rate
        return True

    async def _incr_hiredis(self, uuid: str, variables: dict[str, str], spec: LimitSpec) -> bool:
        if self.hiredis is None:
            # mod_hiredis without a profile for the realm: "Unable to locate profile"
            log.warn("sim hiredis: no hiredis configured, limit {realm} {resource} refused",
                     realm=spec.realm, resource=spec.resource)
            return False
        ok, response, exceeded, holding = await self.hiredis.incr(spec, self._now())
        if response or ok:
            variables["hiredis_raw_response"] = response
        if exceeded:
            variables["hiredis_limit_exceeded"] = "true"
        if ok and holding is not None:
            self.held.setdefault(uuid, []).append(holding)
        return ok

    def release_call(self, uuid: str) -> bool:
        """The hangup hook: release what this process holds for ``uuid`` (nothing for a
        recovered call). True when the call had the hook (its ``limit_backend`` goes)."""
        hooked = uuid in self.hooked
        self.hooked.discard(uuid)
        holdings = self.held.pop(uuid, [])
        for h in holdings:
            if h.backend == "hash":
                self.hash.release(h.key)
            elif self.hiredis is not None and not h.interval:
                key = h.key
                self._track(self.hiredis.command("decr", key)).addErrback(
                    lambda f, key=key: log.warn(
                        "sim hiredis: DECR {key} at hangup failed: {error}",
                        key=key, error=f.getErrorMessage(),
                    )
                )
        return hooked

    # -- APIs ----------------------------------------------------------------------------

    def api_limit_usage(self, args: str) -> str | defer.Deferred[str]:
        """``limit_usage <backend> <realm> <id> [rate]``: ``%d`` (no newline)."""
        argv = args.split()
        if len(argv) < 3:
            return LIMIT_USAGE_USAGE
        backend, realm, resource = argv[:3]
        rate = len(argv) > 3 and argv[3].lower() == "rate"
        if backend == "hash":
            count, rcount = self.hash.usage(realm, resource)
            return f"{count}/{rcount}" if rate else str(count)
        if backend == "hiredis":
            if self.hiredis is None:
                return "-1/0" if rate else "-1"
            d = self.hiredis.usage(resource)
            return self._track(d.addCallback(lambda n: f"{n}/0" if rate else str(n)))
        # "Limit subsystem %s not found!": switch_limit_usage returns 0
        return "0/0" if rate else "0"

    def api_hash_dump(self, args: str, db: dict[str, str]) -> str:
        """``hash_dump all|limit|db [<realm>]`` (the realm filters ``db`` lines only)."""
        argv = args.split()
        if not argv or argv[0] not in ("all", "limit", "db"):
            return HASH_DUMP_USAGE
        mode = {"limit": 1, "db": 2, "all": 3}[argv[0]]
        out = ""
        if mode & 1:
            out += self.hash.dump()
        if mode & 2:
            prefix = f"{argv[1]}_" if len(argv) == 2 else None
            out += "".join(
                f"D/{k}/{v}\n" for k, v in db.items() if prefix is None or prefix in k
            )
        return out

    def table(self) -> dict[str, Any]:
        """The control API's view (JSON)."""
        return {
            "hash": [
                {
                    "key": k,
                    "usage": i.total_usage,
                    "rate": i.rate_usage,
                    "interval": i.interval,
                    "last_check": i.last_check,
                }
                for k, i in self.hash.items.items()
            ],
            "calls": {
                uuid: [
                    {"backend": h.backend, "realm": h.realm, "resource": h.resource, "key": h.key}
                    for h in hs
                ]
                for uuid, hs in self.held.items()
            },
            "refused": self.refused,
            "hiredis": (
                None
                if self.hiredis is None
                else {**self.hiredis.target.public(), "errors": self.hiredis.errors}
            ),
        }
