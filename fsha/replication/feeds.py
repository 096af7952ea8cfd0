"""What a master replicates, read from its own FreeSWITCH: calls, registrations, identity.

:class:`Feeds` runs on every node; the node calls :meth:`Feeds.start_slot` when it becomes
master of a slot and :meth:`Feeds.stop_slot` when it releases it. For every slot it feeds,
it writes records of this node's origin into the :class:`~fsha.replication.state.
ReplicatedState` (and hands each resulting change to ``publish``, the replication links):

``Kind.CALL`` (key: the call UUID)
    One row of the local core DB's ``recovery`` table (written by FreeSWITCH for answered
    calls of profiles with ``track-calls=true``). The slot is the slot whose ``profiles``
    contains the row's ``profile_name``; rows of a profile of no slot are ignored and
    counted (``rows_ignored``). Channel events (``CHANNEL_ANSWER``, ``CHANNEL_BRIDGE``,
    ``CHANNEL_UNBRIDGE``, ``CALL_UPDATE``, ``CHANNEL_HOLD``, ``CHANNEL_UNHOLD``) trigger a
    lookup of the call's row. FreeSWITCH writes the row asynchronously, so a lookup that
    finds no row (or, after an update event, the row not yet changed) is retried on the
    schedule :data:`RETRY_DELAYS` (about 0.8 s in all), then given up (``lookup_misses``;
    the sweep will still find it). An answered call's row is read once more from
    :data:`ANSWER_FOLLOW_UP` after it was found, until it changes (same schedule): a real
    FreeSWITCH rewrites it when the caller's ACK is in (the dialog's tags), with no event,
    and a row replicated without them is recovered into a dialog the caller cannot match.
    ``CHANNEL_HANGUP`` / ``CHANNEL_HANGUP_COMPLETE`` /
    ``CHANNEL_DESTROY`` delete the record at once and leave a tombstone (``tombstone_ttl``
    seconds) so that a lookup or sweep that read the row before FreeSWITCH deleted it
    cannot bring the call back. A periodic *sweep* (every ``sweep_interval`` seconds)
    reconciles the table with the replicated set: it reads the small columns of every row
    and the byte length of its metadata, fetches the full rows that are missing or whose
    small columns or metadata size changed, and deletes records whose row is gone. Every
    ``deep_sweep_every``-th sweep compares the full values instead (catches a same-size
    metadata update whose event was missed). The
    table is mirrored whatever the ``runtime_uuid``: rows a previous runtime of this
    FreeSWITCH left stay replicated (they are recoverable calls) until they leave the table.

``Kind.REGISTRATION`` (key: :func:`registration_key`, ``PROFILE/USER@HOST/CALL-ID``)
    From ``sofia::register`` (put, expiring at the event time + ``expires`` seconds),
    ``sofia::unregister`` and ``sofia::expire`` (delete), plus an initial load and a
    periodic sweep (every ``registration_sweep_interval`` seconds) of the
    ``sip_registrations`` table of each of the slot's profiles: sofia keeps it in the
    profile's own database, ``<db dir>/sofia_reg_<profile>.db`` (the node's
    ``esl.registration_db``; a file or table not there yet only disables the sweep). The
    record expires (``expires_ms``) when the registration does.

``Kind.IDENTITY`` (key: :data:`IDENTITY_KEY`, one per slot)
    The master's FreeSWITCH runtime: core UUID (``global_getvar core_uuid``; it changes at
    every FreeSWITCH start), version (from ``status``), this node's name and the slot's
    profiles. Refreshed when a slot starts being fed, when the ESL connection becomes
    ready and when FreeSWITCH restarts.

Value encodings (stable; the takeover side decodes them with the functions below)
-------------------------------------------------------------------------------

Call (:func:`encode_call_row` / :func:`decode_call_row`)::

    u8  version (2; 1 is still decoded)
    5 x (u16 length, UTF-8 bytes)   runtime_uuid, technology, profile_name, hostname, uuid
    rest                            version 2: the metadata compressed with zlib (RFC 1950,
                                    level 1), byte-exact as stored in the table once
                                    inflated; version 1: the metadata itself

The metadata is an XML CDR of 3-8 KB that zlib shrinks about fourfold: every node holds
one such value per call of every master (issue 16: 10,000 calls per slot within 200 MB).
A value inflating to more than :data:`MAX_METADATA_BYTES` is rejected. Nodes older than
version 2 cannot decode a version 2 value: upgrade every node before any master runs it.

Registration (:func:`encode_registration` / :func:`decode_registration`): a compact JSON
object (sorted keys, no spaces) whose keys are the ``sip_registrations`` columns a
successor needs to restore the row, see :data:`REGISTRATION_COLUMNS`: ``call_id``,
``sip_user``, ``sip_host``, ``presence_hosts``, ``contact``, ``status``, ``rpid``,
``expires`` (integer, Unix seconds), ``user_agent``, ``profile_name``, ``network_ip``,
``network_port`` (string, as in the table), ``sip_username``, ``sip_realm``. These are the
columns both the events and the table carry. The others are the restoring node's own or
derivable: ``hostname`` / ``orig_hostname`` (its own hostname: sofia expires rows per
hostname), ``server_host`` / ``orig_server_host`` (the slot's profile address),
``server_user`` / ``mwi_user`` (``sip_user``), ``mwi_host`` / ``sub_host`` (``sip_host``),
``ping_status`` (``Reachable``), ``ping_count`` / ``ping_time`` / ``force_ping`` /
``ping_expires`` (0).

Identity (:func:`encode_identity` / :func:`decode_identity`): compact JSON
``{"core_uuid", "node", "profiles", "slot", "version"}``.

Threads and the core DB
-----------------------

The DB is opened read-only (``file:PATH?mode=ro`` URI, ``PRAGMA query_only``, a busy
timeout of ``busy_timeout`` seconds) on one dedicated worker thread (a Twisted
``ThreadPool`` of exactly one thread, queries via ``deferToThreadPool``). Measured on a
10,000-call (8 KB metadata) / 100,000-registration file: one indexed lookup costs
~0.015 ms (0.04 ms p50 including the thread round trip), but a whole-table sweep query
costs 30-65 ms (calls, small columns), ~110 ms (calls, full rows) and ~0.8 s
(registrations), and any query can wait up to the busy timeout behind FreeSWITCH's write
lock: so every query runs in the thread. At most one query is outstanding (lookups are
batched, up to :data:`LOOKUP_BATCH` UUIDs per query; a sweep runs when no lookup is due),
so the thread never queues work behind a slow query. Each query has a deadline
(``query_timeout``): past it the query is interrupted (``sqlite3.Connection.interrupt``),
counted as an error, and the connection reopened. A failed lookup counts as an attempt
(no hot retry loop). Applying a sweep's results in the reactor thread is done
``apply_slice`` rows per reactor turn (measured: longest turn ~30 ms for the first load
of 110,000 records, ~10 ms for a steady 10,000-call sweep; excluding Python's own
full garbage collections, which the node should tame with ``gc.freeze()`` after start-up).
Handling one channel event costs ~3 µs: headers are looked up by FreeSWITCH's exact
spelling first, which avoids building the case-insensitive index of a 150-header event
(~34 µs).

This module's logic is independent of threads: tests inject a :class:`CoreDB` whose runner
executes queries inline, and a fake clock.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import struct
import urllib.parse
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorCore,
    IReactorFromThreads,
    IReactorTime,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from fsha.config import ClusterConfig, NodeConfig, SlotConfig
from fsha.fsapi import (
    FSApiError,
    RegistrationEvent,
    RegistrationKind,
    parse_event,
    parse_status,
    parse_var,
)
from fsha.fsdb import RecoveryRow
from fsha.replication.state import ReplicatedState
from fsha.wire import stream
from fsha.wire.esl import Event, Headers
from fsha.wire.stream import Change, Kind

__all__ = [
    "ANSWER_EVENTS",
    "HANGUP_EVENTS",
    "IDENTITY_KEY",
    "LOOKUP_BATCH",
    "REGISTRATION_COLUMNS",
    "REGISTRATION_EVENTS",
    "RETRY_DELAYS",
    "UPDATE_EVENTS",
    "CallRow",
    "CallSummary",
    "CoreDB",
    "FeedValueError",
    "Feeds",
    "Identity",
    "RegistrationRow",
    "SQLiteCoreDB",
    "decode_call_row",
    "decode_identity",
    "decode_registration",
    "encode_call_row",
    "encode_identity",
    "encode_registration",
    "inline_runner",
    "registration_key",
    "thread_runner",
]

log = Logger(namespace="fsha.replication.feeds")

#: Events after which a call's recovery row is (re)read: the row appears on answer.
ANSWER_EVENTS: Final = ("CHANNEL_ANSWER",)
#: Events after which the row's metadata changes (FreeSWITCH updates it asynchronously).
UPDATE_EVENTS: Final = ("CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE", "CALL_UPDATE", "CHANNEL_HOLD",
                        "CHANNEL_UNHOLD")
#: Events after which the row is gone (FreeSWITCH deletes it at hangup).
HANGUP_EVENTS: Final = ("CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY")
REGISTRATION_EVENTS: Final = tuple(k.value for k in RegistrationKind)
#: Delays (seconds) between lookups of a row that is not there (yet). Sum: 0.785 s.
RETRY_DELAYS: Final = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
#: After an answered call's row is found, it is read again from this long after (then on
#: the RETRY_DELAYS schedule until it changes): FreeSWITCH rewrites it when the ACK is in.
ANSWER_FOLLOW_UP: Final = 0.05
#: UUIDs per lookup query (well under SQLite's 999 host parameters).
LOOKUP_BATCH: Final = 256
IDENTITY_KEY: Final = "identity"
#: A registration's expiry read from the table and from the event may differ by this much
#: (seconds) without the sweep rewriting the record.
REG_EXPIRES_TOLERANCE: Final = 30

_U16: Final = struct.Struct(">H")
_T = TypeVar("_T")
CALL_VALUE_VERSION: Final = 2  # metadata compressed (zlib); 1: raw, still decoded
MAX_METADATA_BYTES: Final = 16 * 1024 * 1024  # a bound on an inflated metadata value
_ZLIB_LEVEL: Final = 1  # ~4x on XML CDRs at a fraction of the cost of the default level


class FeedValueError(ValueError):
    """A replicated value that is not a valid encoding."""


# ---------------------------------------------------------------------------------------
# Values


# One row of the ``recovery`` table; the same type the takeover writes back.
CallRow = RecoveryRow


@dataclass(frozen=True, slots=True)
class CallSummary:
    """The small columns of a ``recovery`` row and its metadata's size in bytes (what a
    sweep reads of every row)."""

    runtime_uuid: str
    technology: str
    profile_name: str
    hostname: str
    uuid: str
    size: int


def encode_call_row(row: CallRow) -> bytes:
    parts = [bytes((CALL_VALUE_VERSION,))]
    for text in (row.runtime_uuid, row.technology, row.profile_name, row.hostname, row.uuid):
        raw = text.encode("utf-8", "surrogateescape")
        if len(raw) > 0xFFFF:
            raise FeedValueError("recovery column longer than 65535 bytes")
        parts.append(_U16.pack(len(raw)))
        parts.append(raw)
    parts.append(zlib.compress(row.metadata, _ZLIB_LEVEL))
    return b"".join(parts)


def decode_call_row(value: bytes) -> CallRow:
    """Inverse of :func:`encode_call_row` (versions 1 and 2); raises
    :class:`FeedValueError` on bad bytes."""
    if not value or value[0] not in (1, 2):
        raise FeedValueError("not a version 1 or 2 call record")
    pos = 1
    fields: list[str] = []
    for _ in range(5):
        if pos + 2 > len(value):
            raise FeedValueError("call record truncated")
        (n,) = _U16.unpack_from(value, pos)
        pos += 2
        if pos + n > len(value):
            raise FeedValueError("call record truncated")
        fields.append(value[pos:pos + n].decode("utf-8", "surrogateescape"))
        pos += n
    metadata = bytes(value[pos:])
    if value[0] == 2:
        inflate = zlib.decompressobj()
        try:
            metadata = inflate.decompress(metadata, MAX_METADATA_BYTES)
        except zlib.error as e:
            raise FeedValueError(f"call record metadata does not inflate: {e}") from None
        if inflate.unconsumed_tail or not inflate.eof:
            raise FeedValueError("call record metadata truncated or larger than "
                                 f"{MAX_METADATA_BYTES} bytes")
    return CallRow(fields[0], fields[1], fields[2], fields[3], fields[4], metadata)


#: The ``sip_registrations`` columns a registration record carries (see the module doc).
REGISTRATION_COLUMNS: Final = (
    "call_id", "sip_user", "sip_host", "presence_hosts", "contact", "status", "rpid",
    "expires", "user_agent", "profile_name", "network_ip", "network_port", "sip_username",
    "sip_realm",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class RegistrationRow:
    call_id: str
    sip_user: str
    sip_host: str
    presence_hosts: str
    contact: str
    status: str
    rpid: str
    expires: int  # Unix seconds
    user_agent: str
    profile_name: str
    network_ip: str
    network_port: str
    sip_username: str
    sip_realm: str
    # Derived once, where the row is built (the DB thread, for a sweep's 100k rows):
    key: str = field(init=False, compare=False, repr=False)
    #: A 16-byte hash of every field but ``expires`` (what the feeds' index keeps).
    binding: bytes = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", registration_key(
            self.profile_name, self.sip_user, self.sip_host, self.call_id))
        fields = (self.call_id, self.sip_user, self.sip_host, self.presence_hosts,
                  self.contact, self.status, self.rpid, self.user_agent, self.profile_name,
                  self.network_ip, self.network_port, self.sip_username, self.sip_realm)
        object.__setattr__(self, "binding", hashlib.blake2b(
            "\x00".join(fields).encode("utf-8", "surrogateescape"), digest_size=16).digest())


def registration_key(profile: str, user: str, host: str, call_id: str) -> str:
    """``PROFILE/USER@HOST/CALL-ID``; a key longer than the stream allows ends with a hash
    of the Call-ID instead (``#`` and 32 hex digits)."""
    key = f"{profile}/{user}@{host}/{call_id}"
    if len(key.encode("utf-8", "surrogateescape")) <= stream.MAX_KEY_SIZE:
        return key
    digest = hashlib.blake2b(call_id.encode("utf-8", "surrogateescape"),
                             digest_size=16).hexdigest()
    return f"{profile}/{user}@{host}/#{digest}"


def _registration_prefix(profile: str, user: str, host: str) -> str:
    return f"{profile}/{user}@{host}/"


def encode_registration(row: RegistrationRow) -> bytes:
    obj = {c: getattr(row, c) for c in REGISTRATION_COLUMNS}
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


def decode_registration(value: bytes) -> RegistrationRow:
    try:
        obj = json.loads(value)
    except ValueError as e:
        raise FeedValueError(f"registration record is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FeedValueError("registration record is not a JSON object")
    args: dict[str, Any] = {}
    for c in REGISTRATION_COLUMNS:
        v = obj.get(c)
        want: type = int if c == "expires" else str
        if not isinstance(v, want) or isinstance(v, bool):
            raise FeedValueError(f"registration record: {c} missing or not {want.__name__}")
        args[c] = v
    return RegistrationRow(**args)


@dataclass(frozen=True, slots=True)
class Identity:
    node: str
    slot: str
    core_uuid: str
    version: str
    profiles: tuple[str, ...]


def encode_identity(identity: Identity) -> bytes:
    obj = {"node": identity.node, "slot": identity.slot, "core_uuid": identity.core_uuid,
           "version": identity.version, "profiles": list(identity.profiles)}
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_identity(value: bytes) -> Identity:
    try:
        obj = json.loads(value)
    except ValueError as e:
        raise FeedValueError(f"identity record is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FeedValueError("identity record is not a JSON object")
    texts = [obj.get(k) for k in ("node", "slot", "core_uuid", "version")]
    profiles = obj.get("profiles")
    if not all(isinstance(t, str) for t in texts) or not isinstance(profiles, list) or \
            not all(isinstance(p, str) for p in profiles):
        raise FeedValueError("identity record has missing or mistyped fields")
    return Identity(*texts, tuple(profiles))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# The core DB, read-only


Runner = Callable[[Callable[[], Any]], "Deferred[Any]"]


def inline_runner(f: Callable[[], Any]) -> Deferred[Any]:
    """Run a query in the calling thread (tests; tiny local databases)."""
    return defer.maybeDeferred(f)


def thread_runner(reactor: IReactorFromThreads, pool: ThreadPool) -> Runner:
    """Run each query on ``pool`` (see the module doc: one dedicated thread)."""
    def run(f: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(reactor, pool, f)  # type: ignore[arg-type]
    return run


class CoreDB(Protocol):
    """What :class:`Feeds` reads of the core DB. Every method returns a Deferred."""

    def recovery_rows(self, uuids: Sequence[str]) -> Deferred[list[CallRow]]: ...

    def recovery_summaries(self) -> Deferred[list[CallSummary]]: ...

    def recovery_all(self, profiles: Sequence[str]) -> Deferred[list[CallRow]]: ...

    def registrations(self, profiles: Sequence[str]) -> Deferred[list[RegistrationRow] | None]:
        """The rows of these profiles, or None if the table does not exist."""
        ...

    def interrupt(self) -> None: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def _int(value: object) -> int:
    try:
        return int(_text(value) if isinstance(value, bytes) else value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


_CALL_COLUMNS: Final = "runtime_uuid, technology, profile_name, hostname, uuid, metadata"
_SUMMARY_COLUMNS: Final = ("runtime_uuid, technology, profile_name, hostname, uuid, "
                           "length(cast(metadata as blob))")


def _call_row(r: tuple[Any, ...]) -> CallRow:
    meta = r[5]
    if meta is None:
        meta = b""
    elif isinstance(meta, str):
        meta = meta.encode("utf-8", "surrogateescape")
    return CallRow(_text(r[0]), _text(r[1]), _text(r[2]), _text(r[3]), _text(r[4]), meta)


def _registration_row(r: tuple[Any, ...]) -> RegistrationRow:
    values: list[Any] = [_text(v) for v in r]
    values[7] = _int(r[7])
    return RegistrationRow(*values)


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


class SQLiteCoreDB:
    """The core DB (SQLite) opened read-only; queries go through ``run``.

    Only one query runs at a time (the caller, :class:`Feeds`, guarantees it); the
    connection is opened lazily by the first query, in the runner's thread, and reopened
    after an error. Text comes back as bytes (``text_factory``), so metadata stays
    byte-exact even if it is not valid UTF-8.
    """

    def __init__(self, path: str | Path, run: Runner, busy_timeout: float = 1.0, *,
                 registration_db: Callable[[str], str | Path | None] | None = None) -> None:
        self.path = str(path)
        self._run = run
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._stale = False
        # sofia keeps a profile's registrations in its own file (<db dir>/sofia_reg_P.db);
        # None: in the core DB (a database set up that way, old simulators)
        self._registration_db = registration_db
        self._reg_conns: dict[str, sqlite3.Connection] = {}

    def _open(self, path: str) -> sqlite3.Connection:
        uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=self._busy_timeout,
                               isolation_level=None, check_same_thread=False)
        try:
            conn.text_factory = bytes
            conn.execute("PRAGMA query_only=1")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _connection(self) -> sqlite3.Connection:
        if self._stale:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            for conn in self._reg_conns.values():
                conn.close()
            self._reg_conns.clear()
        self._stale = False
        if self._conn is None:
            self._conn = self._open(self.path)
        return self._conn

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        conn = self._connection()
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.Error:
            self._stale = True  # reopen on the next query
            raise

    def recovery_rows(self, uuids: Sequence[str]) -> Deferred[list[CallRow]]:
        uuids = list(uuids)

        def q() -> list[CallRow]:
            rows: list[CallRow] = []
            for i in range(0, len(uuids), LOOKUP_BATCH):
                chunk = uuids[i:i + LOOKUP_BATCH]
                rows.extend(_call_row(r) for r in self._query(
                    f"select {_CALL_COLUMNS} from recovery where uuid in "
                    f"({_placeholders(len(chunk))})", chunk))
            return rows
        return self._run(q)

    def recovery_summaries(self) -> Deferred[list[CallSummary]]:
        def q() -> list[CallSummary]:
            return [CallSummary(_text(r[0]), _text(r[1]), _text(r[2]), _text(r[3]),
                                _text(r[4]), _int(r[5]))
                    for r in self._query(f"select {_SUMMARY_COLUMNS} from recovery")]
        return self._run(q)

    def recovery_all(self, profiles: Sequence[str]) -> Deferred[list[CallRow]]:
        profiles = list(profiles)

        def q() -> list[CallRow]:
            if not profiles:
                return []
            return [_call_row(r) for r in self._query(
                f"select {_CALL_COLUMNS} from recovery where profile_name in "
                f"({_placeholders(len(profiles))})", profiles)]
        return self._run(q)

    def registrations(self, profiles: Sequence[str]) -> Deferred[list[RegistrationRow] | None]:
        profiles = list(profiles)
        sql = f"select {', '.join(REGISTRATION_COLUMNS)} from sip_registrations where "

        def in_core() -> list[RegistrationRow] | None:
            try:
                rows = self._query(sql + f"profile_name in ({_placeholders(len(profiles))})",
                                   profiles)
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):
                    self._stale = False
                    return None
                raise
            return [_registration_row(r) for r in rows]

        def per_profile(which: Callable[[str], str | Path | None]
                        ) -> list[RegistrationRow] | None:
            self._connection()  # reopens everything after an error or a restart
            result: list[RegistrationRow] = []
            found = False
            for profile in profiles:
                path = which(profile)
                if path is None:
                    continue
                conn = self._reg_conns.get(profile)
                try:
                    if conn is None:
                        conn = self._reg_conns[profile] = self._open(str(path))
                    rows = conn.execute(sql + "profile_name=?", (profile,)).fetchall()
                except sqlite3.OperationalError as e:
                    # not created yet (a profile never started here) or not sofia's file
                    if "no such table" in str(e) or "unable to open" in str(e):
                        bad = self._reg_conns.pop(profile, None)
                        if bad is not None:
                            bad.close()
                        continue
                    self._stale = True
                    raise
                except sqlite3.Error:
                    self._stale = True
                    raise
                found = True
                result.extend(_registration_row(r) for r in rows)
            return result if found else None

        def q() -> list[RegistrationRow] | None:
            if not profiles:
                return []
            if self._registration_db is None:
                return in_core()
            return per_profile(self._registration_db)
        return self._run(q)

    def interrupt(self) -> None:
        """Abort the running query (callable from any thread)."""
        for conn in [self._conn, *list(self._reg_conns.values())]:
            if conn is not None:
                conn.interrupt()
                self._stale = True

    def reset(self) -> None:
        """Reopen the connection before the next query (e.g. after a FreeSWITCH restart)."""
        self._stale = True

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        for c in self._reg_conns.values():
            c.close()
        self._reg_conns.clear()


# ---------------------------------------------------------------------------------------
# The feeds


class FeedsESL(Protocol):
    """What :class:`Feeds` uses of :class:`fsha.esl.ESLClient`."""

    core_uuid: str | None

    @property
    def is_healthy(self) -> bool: ...

    def add_event_listener(self, callback: Callable[[Event], object],
                           name: str | None = None) -> None: ...

    def remove_event_listener(self, callback: Callable[[Event], object],
                              name: str | None = None) -> None: ...

    def subscribe(self, *names: str) -> Deferred[None]: ...

    def api(self, command: str, timeout: float | None = None) -> Deferred[str]: ...

    def add_state_listener(self, callback: Callable[[Any, Any], object]) -> None: ...

    def add_restart_listener(self, callback: Callable[[str, str], object]) -> None: ...


class _SlotFeed:
    """One fed slot: counters for the status."""

    __slots__ = ("calls", "deletes", "errors", "identity", "last_error",
                 "last_registration_sweep", "last_sweep", "puts", "registrations",
                 "rows_rejected", "since", "slot")

    def __init__(self, slot: SlotConfig, since: float) -> None:
        self.slot = slot
        self.since = since
        self.calls = 0
        self.registrations = 0
        self.puts = 0
        self.deletes = 0
        self.rows_rejected = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_sweep: float | None = None
        self.last_registration_sweep: float | None = None
        self.identity: Identity | None = None


class _Call:
    __slots__ = ("gen", "slot", "summary")

    def __init__(self, slot: int, summary: CallSummary, gen: int) -> None:
        self.slot = slot
        self.summary = summary
        self.gen = gen


class _Reg:
    """What the index keeps of a registration: the binding's hash and its expiry."""

    __slots__ = ("binding", "expires", "gen", "slot")

    def __init__(self, slot: int, row: RegistrationRow, gen: int) -> None:
        self.slot = slot
        self.binding = row.binding
        self.expires = row.expires
        self.gen = gen

    def same(self, row: RegistrationRow) -> bool:
        """The same binding, expiring within :data:`REG_EXPIRES_TOLERANCE` seconds."""
        return (self.binding == row.binding
                and abs(self.expires - row.expires) <= REG_EXPIRES_TOLERANCE)


class _Lookup:
    __slots__ = ("attempt", "baseline", "due", "followed")

    def __init__(self, due: float, baseline: bytes | None) -> None:
        self.attempt = 0
        self.due = due
        self.baseline = baseline  # the value before an update event; None: any row will do
        self.followed = False  # the answer's row was found: this looks for its rewrite


def _exact(headers: Headers, name: str, fallback: bool = True) -> str | None:
    """Header ``name`` spelt as FreeSWITCH spells it, found without building the headers'
    case-insensitive index (that costs more than decoding a 150-header event); then, if
    ``fallback``, any spelling."""
    try:
        return headers._values[headers._names.index(name)]
    except ValueError:
        return headers.get(name) if fallback else None


def _summary(row: CallRow) -> CallSummary:
    return CallSummary(row.runtime_uuid, row.technology, row.profile_name, row.hostname,
                       row.uuid, len(row.metadata))


class Feeds:
    """Turns this node's FreeSWITCH into replicated records for the slots it masters.

    ``esl`` is the node's :class:`fsha.esl.ESLClient`; ``state`` the node's replicated
    state (records are written to its own origin); ``me`` this node's config (its
    ``core_db`` is the SQLite core DB; None disables the call feed and the registration
    sweep). ``clock`` must also provide ``IReactorFromThreads`` unless ``db`` is given.
    ``publish`` receives every change written (the replication links send it to peers).
    """

    def __init__(self, esl: FeedsESL, state: ReplicatedState, config: ClusterConfig,
                 me: NodeConfig, clock: IReactorTime, *, db: CoreDB | None = None,
                 publish: Callable[[Change], object] | None = None,
                 sweep_interval: float = 3.0, deep_sweep_every: int = 10,
                 registration_sweep_interval: float = 30.0, query_timeout: float = 5.0,
                 busy_timeout: float = 1.0, api_timeout: float = 5.0,
                 retry_delays: Sequence[float] = RETRY_DELAYS,
                 tombstone_ttl: float = 60.0, apply_slice: int = 500) -> None:
        if not retry_delays:
            raise ValueError("retry_delays must not be empty")
        if sweep_interval <= 0 or registration_sweep_interval <= 0 or deep_sweep_every < 1:
            raise ValueError("sweep intervals must be positive")
        self.esl = esl
        self.state = state
        self.config = config
        self.me = me
        self.clock = clock
        self.publish = publish
        self.sweep_interval = sweep_interval
        self.deep_sweep_every = deep_sweep_every
        self.registration_sweep_interval = registration_sweep_interval
        self.query_timeout = query_timeout
        self.api_timeout = api_timeout
        self.retry_delays = tuple(retry_delays)
        self.tombstone_ttl = tombstone_ttl
        self.apply_slice = max(1, apply_slice)
        self._pool: ThreadPool | None = None
        self._shutdown_trigger: object | None = None
        if db is None and me.core_db is not None:
            if not IReactorFromThreads.providedBy(clock):
                raise ValueError("clock must be a reactor (IReactorFromThreads) to read the "
                                 "core DB in a thread; or pass db=")
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="fsha-feeds-coredb")
            db = SQLiteCoreDB(me.core_db, thread_runner(clock, self._pool), busy_timeout,
                              registration_db=me.registration_db_for
                              if me.registration_db is not None else None)
        self.db = db
        self._profile_slot: dict[str, SlotConfig] = {
            p: s for s in config.slots for p in s.profiles}
        self._fed: dict[int, _SlotFeed] = {}
        self._running = False
        self._calls: dict[str, _Call] = {}
        self._regs: dict[str, _Reg] = {}
        self._pending: dict[str, _Lookup] = {}
        self._gone: dict[str, float] = {}
        self._rejected: dict[str, CallSummary] = {}  # rows that cannot be replicated
        self._reg_deleted: dict[str, int] = {}  # key -> gen of an unregistration event
        self._gen = 0
        self._busy = False
        self._query_timer: IDelayedCall | None = None
        self._interrupted = False
        self._kick_timer: IDelayedCall | None = None
        self._tick_timer: IDelayedCall | None = None
        self._sweep_wanted = False
        self._reg_sweep_wanted = False
        self._next_reg_sweep = 0.0
        self._sweeps_done = 0
        self._identity_busy = False
        self._idle_waiters: list[Deferred[None]] = []
        # counters (status)
        self.lookups = 0
        self.lookup_misses = 0
        self.events_ignored = 0
        self.rows_ignored = 0
        self.ignored_profiles: tuple[str, ...] = ()
        self.sweeps = 0
        self.registration_sweeps = 0
        self.errors = 0
        self.last_error: str | None = None
        self.registration_table = True
        self._listeners: list[tuple[Callable[[Event], object], str]] = []

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Listen to the ESL events; nothing is fed until :meth:`start_slot`."""
        if self._running:
            return
        self._running = True
        if self._pool is not None:
            self._pool.start()
            if IReactorCore.providedBy(self.clock):
                self._shutdown_trigger = self.clock.addSystemEventTrigger(  # type: ignore[attr-defined]
                    "during", "shutdown", self._stop_pool)
        for name in ANSWER_EVENTS:
            self._listen(self._on_answer, name)
        for name in UPDATE_EVENTS:
            self._listen(self._on_update, name)
        for name in HANGUP_EVENTS:
            self._listen(self._on_hangup, name)
        for name in REGISTRATION_EVENTS:
            self._listen(self._on_registration, name)
        names = [name for _, name in self._listeners]
        self.esl.add_state_listener(self._esl_state)
        self.esl.add_restart_listener(self._fs_restarted)
        d = self.esl.subscribe(*names)
        d.addErrback(self._failed, "subscribing to the feed events")

    def _listen(self, callback: Callable[[Event], object], name: str) -> None:
        self.esl.add_event_listener(callback, name)
        self._listeners.append((callback, name))

    def stop(self) -> Deferred[None]:
        """Stop feeding every slot and listening; fires when no query is running."""
        if not self._running:
            return defer.succeed(None)
        self._running = False
        for callback, name in self._listeners:
            self.esl.remove_event_listener(callback, name)
        self._listeners = []
        for slot_id in list(self._fed):
            self.stop_slot(slot_id)
        for attr in ("_kick_timer", "_tick_timer"):
            timer: IDelayedCall | None = getattr(self, attr)
            if timer is not None and timer.active():
                timer.cancel()
            setattr(self, attr, None)
        self._pending.clear()
        d = self._when_idle()
        d.addTimeout(self.query_timeout, self.clock)
        d.addErrback(lambda f: f.trap(defer.TimeoutError))

        def finish(_: object) -> None:
            if self.db is not None:
                self.db.close()
            self._stop_pool()
        d.addCallback(finish)
        d.addErrback(self._failed, "stopping the feeds")
        return d

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if self._shutdown_trigger is not None:
            trigger, self._shutdown_trigger = self._shutdown_trigger, None
            if IReactorCore.providedBy(self.clock):
                try:
                    self.clock.removeSystemEventTrigger(trigger)  # type: ignore[attr-defined]
                except (ValueError, KeyError):
                    pass
        if pool is not None and pool.started:
            pool.stop()

    def _when_idle(self) -> Deferred[None]:
        if not self._busy:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    # -- which slots ------------------------------------------------------------------------

    def _slot(self, slot: SlotConfig | int | str) -> SlotConfig:
        if isinstance(slot, SlotConfig):
            return slot
        for s in self.config.slots:
            if s.slot_id == slot or s.name == slot:
                return s
        raise KeyError(f"no slot {slot!r}")

    @property
    def fed_slots(self) -> list[str]:
        return [f.slot.name for f in self._fed.values()]

    def start_slot(self, slot: SlotConfig | int | str) -> None:
        """This node became master of ``slot``: feed it (initial load at once)."""
        s = self._slot(slot)
        if not self._running:
            raise RuntimeError("Feeds.start_slot before start()")
        if s.slot_id in self._fed:
            return
        feed = _SlotFeed(s, self.clock.seconds())
        self._fed[s.slot_id] = feed
        self._reindex(feed)
        log.info("Feeding slot {slot} (profiles {profiles})", slot=s.name,
                 profiles=",".join(s.profiles))
        self._sweep_wanted = True
        self._reg_sweep_wanted = True
        self._schedule_tick()
        self._kick()
        self._refresh_identity()

    def stop_slot(self, slot: SlotConfig | int | str) -> None:
        """This node released ``slot``: stop feeding it. Its records stay in the state
        (a successor reads them); :meth:`forget_slot` deletes them."""
        s = self._slot(slot)
        feed = self._fed.pop(s.slot_id, None)
        if feed is None:
            return
        for uuid in [u for u, c in self._calls.items() if c.slot == s.slot_id]:
            del self._calls[uuid]
        for key in [k for k, r in self._regs.items() if r.slot == s.slot_id]:
            del self._regs[key]
        log.info("Stopped feeding slot {slot}", slot=s.name)
        if not self._fed:
            self._pending.clear()
            self._gone.clear()
            self._rejected.clear()
            self._reg_deleted.clear()
            if self._tick_timer is not None and self._tick_timer.active():
                self._tick_timer.cancel()
            self._tick_timer = None

    def forget_slot(self, slot: SlotConfig | int | str) -> int:
        """Delete this node's records of a slot it no longer feeds; returns how many."""
        s = self._slot(slot)
        if s.slot_id in self._fed:
            raise RuntimeError(f"slot {s.name} is still fed; stop_slot first")
        n = 0
        for record in list(self.state.records(origin=self.state.node, slot=s.slot_id)):
            change = self.state.delete(record.slot, record.kind, record.key)
            if change is not None:
                n += 1
                self._emit(change)
        return n

    def _reindex(self, feed: _SlotFeed) -> None:
        """Rebuild the index of a slot from this origin's records (a slot fed again)."""
        slot_id = feed.slot.slot_id
        for record in self.state.records(origin=self.state.node, slot=slot_id):
            try:
                if record.kind is Kind.CALL:
                    row = decode_call_row(record.value)
                    self._calls[record.key] = _Call(slot_id, _summary(row), 0)
                    feed.calls += 1
                elif record.kind is Kind.REGISTRATION:
                    self._regs[record.key] = _Reg(slot_id, decode_registration(record.value), 0)
                    feed.registrations += 1
                elif record.kind is Kind.IDENTITY:
                    feed.identity = decode_identity(record.value)
            except FeedValueError as e:
                log.warn("Unreadable own record {key} of slot {slot}: {error}",
                         key=record.key, slot=feed.slot.name, error=str(e))

    # -- writing ----------------------------------------------------------------------------

    def _emit(self, change: Change) -> None:
        if self.publish is not None:
            try:
                self.publish(change)
            except Exception:
                log.failure("Publishing a change failed")

    def _put(self, feed: _SlotFeed, kind: Kind, key: str, value: bytes,
             expires_ms: int = 0) -> bool:
        try:
            change = self.state.put(feed.slot.slot_id, kind, key, value, expires_ms)
        except ValueError as e:
            feed.rows_rejected += 1
            log.warn("Cannot replicate {kind} {key} of slot {slot}: {error}", kind=kind.name,
                     key=key[:200], slot=feed.slot.name, error=str(e))
            return False
        feed.puts += 1
        self._emit(change)
        return True

    def _delete(self, slot_id: int, kind: Kind, key: str) -> None:
        change = self.state.delete(slot_id, kind, key)
        if change is None:
            return
        feed = self._fed.get(slot_id)
        if feed is not None:
            feed.deletes += 1
        self._emit(change)

    def _next_gen(self) -> int:
        self._gen += 1
        return self._gen

    def _store_call(self, feed: _SlotFeed, row: CallRow, value: bytes, gen: int) -> None:
        uuid = row.uuid
        slot_id = feed.slot.slot_id
        entry = self._calls.get(uuid)
        if entry is not None and entry.slot != slot_id:
            self._drop_call(uuid)
            entry = None
        current = self.state.get(self.state.node, slot_id, Kind.CALL, uuid)
        if current is not None and current.value == value:
            if entry is None:
                self._calls[uuid] = _Call(slot_id, _summary(row), gen)
                feed.calls += 1
            else:
                entry.gen = gen
            return
        if not self._put(feed, Kind.CALL, uuid, value):
            self._rejected[uuid] = _summary(row)  # not retried until the row changes
            return
        self._rejected.pop(uuid, None)
        if entry is None:
            self._calls[uuid] = _Call(slot_id, _summary(row), gen)
            feed.calls += 1
        else:
            entry.summary = _summary(row)
            entry.gen = gen

    def _drop_call(self, uuid: str) -> None:
        entry = self._calls.pop(uuid, None)
        if entry is None:
            return
        feed = self._fed.get(entry.slot)
        if feed is not None:
            feed.calls -= 1
        self._delete(entry.slot, Kind.CALL, uuid)

    def _store_reg(self, feed: _SlotFeed, row: RegistrationRow, gen: int) -> None:
        key = row.key
        slot_id = feed.slot.slot_id
        entry = self._regs.get(key)
        if entry is not None and entry.slot != slot_id:
            self._drop_reg(key)
            entry = None
        if not self._put(feed, Kind.REGISTRATION, key, encode_registration(row),
                         row.expires * 1000):
            return
        if entry is None:
            self._regs[key] = _Reg(slot_id, row, gen)
            feed.registrations += 1
        else:
            entry.binding = row.binding
            entry.expires = row.expires
            entry.gen = gen

    def _drop_reg(self, key: str) -> None:
        entry = self._regs.pop(key, None)
        if entry is None:
            return
        feed = self._fed.get(entry.slot)
        if feed is not None:
            feed.registrations -= 1
        self._delete(entry.slot, Kind.REGISTRATION, key)

    def _fed_slot_of(self, profile: str | None) -> _SlotFeed | None:
        """The fed slot of a profile; counts profiles of no slot as ignored."""
        if profile is None:
            return None
        slot = self._profile_slot.get(profile)
        if slot is None:
            self.events_ignored += 1
            return None
        return self._fed.get(slot.slot_id)

    # -- channel events (hot path: a few dict operations per event) ----------------------------

    def _on_answer(self, event: Event) -> None:
        if self._fed and self.db is not None:
            uuid = _exact(event.headers, "Unique-ID")
            if uuid:
                self._gone.pop(uuid, None)  # answered (again, e.g. recovered): alive
                self._want(event, uuid, False)

    def _on_update(self, event: Event) -> None:
        if not self._fed or self.db is None:
            return
        h = event.headers
        uuid = _exact(h, "Unique-ID")
        if uuid:
            self._want(event, uuid, True)
        if event.name in ("CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE"):
            for name in ("Bridge-A-Unique-ID", "Bridge-B-Unique-ID", "Other-Leg-Unique-ID"):
                other = _exact(h, name, False)
                if other and other != uuid:
                    self._want(None, other, True)

    def _want(self, event: Event | None, uuid: str, update: bool) -> None:
        if uuid in self._gone:
            return
        if event is not None:
            # only a filter (the row decides), so an exact-case miss costs nothing more
            profile = _exact(event.headers, "variable_recovery_profile_name", False)
            if profile is not None and self._fed_slot_of(profile) is None:
                return
        baseline: bytes | None = None
        if update:
            entry = self._calls.get(uuid)
            if entry is not None:
                record = self.state.get(self.state.node, entry.slot, Kind.CALL, uuid)
                baseline = None if record is None else record.value
        pending = self._pending.get(uuid)
        now = self.clock.seconds()
        if pending is None:
            self._pending[uuid] = _Lookup(now, baseline)
        else:
            pending.attempt = 0
            pending.due = now
            if baseline is not None:
                pending.baseline = baseline
        self._kick()

    def _on_hangup(self, event: Event) -> None:
        if not self._fed:
            return
        uuid = _exact(event.headers, "Unique-ID")
        if not uuid:
            return
        self._pending.pop(uuid, None)
        self._rejected.pop(uuid, None)
        gone = self._gone
        gone.pop(uuid, None)
        gone[uuid] = self.clock.seconds()
        if uuid in self._calls:
            self._drop_call(uuid)

    # -- registration events ----------------------------------------------------------------

    def _on_registration(self, event: Event) -> None:
        if not self._fed:
            return
        reg = parse_event(event)
        if not isinstance(reg, RegistrationEvent):
            return
        feed = self._fed_slot_of(reg.profile)
        if feed is None:
            return
        assert reg.profile is not None
        if not reg.user or not reg.host:
            self.events_ignored += 1
            return
        if reg.kind is RegistrationKind.REGISTER and (reg.expires or 0) > 0:
            if not reg.call_id:
                self.events_ignored += 1
                return
            h = event.headers
            stamp = h.get("Event-Date-Timestamp")
            now = int(stamp) / 1e6 if stamp and stamp.isdigit() else self.clock.seconds()
            row = RegistrationRow(
                call_id=reg.call_id, sip_user=reg.user, sip_host=reg.host,
                presence_hosts=h.get("presence-hosts") or "", contact=reg.contact or "",
                status=h.get("status") or "", rpid=h.get("rpid") or "",
                expires=int(now) + (reg.expires or 0), user_agent=reg.user_agent or "",
                profile_name=reg.profile, network_ip=reg.network_ip or "",
                network_port=h.get("network-port") or "", sip_username=reg.username or "",
                sip_realm=reg.realm or "")
            self._store_reg(feed, row, self._next_gen())
            return
        # unregister, expire, or a register with expires 0 (a de-registration)
        gen = self._next_gen()
        if reg.call_id:
            keys = [registration_key(reg.profile, reg.user, reg.host, reg.call_id)]
        else:
            prefix = _registration_prefix(reg.profile, reg.user, reg.host)
            keys = [k for k in self._regs if k.startswith(prefix)]
        for key in keys:
            self._reg_deleted[key] = gen
            self._drop_reg(key)

    # -- ESL state ----------------------------------------------------------------------------

    def _esl_state(self, old: Any, new: Any) -> None:
        if self._running and self._fed and getattr(new, "value", new) == "ready":
            # events may have been missed while disconnected
            self._sweep_wanted = True
            self._reg_sweep_wanted = True
            self._kick()
            self._refresh_identity()

    def _fs_restarted(self, old: str, new: str) -> None:
        if not self._running:
            return
        log.info("FreeSWITCH restarted ({old} -> {new}); resweeping", old=old, new=new)
        if self.db is not None:
            self.db.reset()
        if self._fed:
            self._sweep_wanted = True
            self._reg_sweep_wanted = True
            self._kick()
            self._refresh_identity()

    # -- identity ---------------------------------------------------------------------------

    def _refresh_identity(self) -> None:
        if self._identity_busy or not self._fed or not self.esl.is_healthy:
            return
        self._identity_busy = True
        d_uuid = self.esl.api("global_getvar core_uuid", timeout=self.api_timeout)
        d_status = self.esl.api("status", timeout=self.api_timeout)
        d = defer.gatherResults([d_uuid, d_status], consumeErrors=True)

        def got(outputs: list[str]) -> None:
            core = parse_var("global_getvar core_uuid", outputs[0])
            if not core:
                raise FSApiError("global_getvar core_uuid", outputs[0], "core_uuid is not set")
            version = parse_status("status", outputs[1]).version or ""
            for feed in list(self._fed.values()):
                identity = Identity(self.me.name, feed.slot.name, core, version,
                                    feed.slot.profiles)
                if identity != feed.identity and self._put(
                        feed, Kind.IDENTITY, IDENTITY_KEY, encode_identity(identity)):
                    feed.identity = identity

        def failed(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, defer.FirstError):
                failure = error.subFailure
            self._error(f"identity: {failure.getErrorMessage()}")

        def done(_: object) -> None:
            self._identity_busy = False

        d.addCallbacks(got, failed)
        d.addErrback(self._failed, "refreshing the identity")
        d.addBoth(done)

    # -- the DB worker: one query at a time ---------------------------------------------------

    def _kick(self) -> None:
        """Start the next due DB job if none is running."""
        if self._busy or not self._running or self.db is None or not self._fed:
            return
        now = self.clock.seconds()
        due: list[str] = []
        soonest: float | None = None
        for uuid, p in self._pending.items():
            if p.due <= now:
                due.append(uuid)
                if len(due) >= LOOKUP_BATCH:
                    break
            elif soonest is None or p.due < soonest:
                soonest = p.due
        if due:
            self._run(lambda: self._lookup(due), "lookup")
            return
        if self._sweep_wanted:
            self._sweep_wanted = False
            self._run(self._sweep_calls, "sweep")
            return
        if self._reg_sweep_wanted:
            self._reg_sweep_wanted = False
            if self.registration_table or self._sweeps_done % 10 == 0:
                self._run(self._sweep_registrations, "registration sweep")
                return
        if soonest is not None:
            self._wake_at(soonest)

    def _wake_at(self, when: float) -> None:
        timer = self._kick_timer
        delay = max(0.0, when - self.clock.seconds())
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return
            timer.cancel()
        self._kick_timer = self.clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._kick_timer = None
        self._kick()

    def _run(self, job: Callable[[], Deferred[None]], what: str) -> None:
        """Run one DB job with a deadline, then free the worker and start the next one."""
        self._busy = True
        self._query_timer = self.clock.callLater(self.query_timeout, self._query_timed_out,
                                                 what)

        def finished(result: object) -> None:
            if self._query_timer is not None and self._query_timer.active():
                self._query_timer.cancel()
            self._query_timer = None
            self._busy = False
            self._interrupted = False
            self._job_done()

        d = defer.maybeDeferred(job)
        d.addErrback(self._db_failed, what)
        d.addErrback(self._failed, what)
        d.addBoth(finished)
        d.addErrback(self._failed, what)

    def _job_done(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)
        self._kick()

    def _query_timed_out(self, what: str) -> None:
        self._query_timer = None
        self._interrupted = True
        self._error(f"{what}: core DB query took longer than {self.query_timeout:g} s; "
                    "interrupted")
        if self.db is not None:
            self.db.interrupt()

    def _db_failed(self, failure: Failure, what: str) -> None:
        failure.trap(sqlite3.Error)
        if self._interrupted:
            return  # the deadline already counted and logged it
        self._error(f"{what}: core DB: {failure.getErrorMessage()}")

    def _error(self, message: str) -> None:
        repeated = message == self.last_error
        self.errors += 1
        self.last_error = message
        for feed in self._fed.values():
            feed.errors += 1
            feed.last_error = message
        if repeated:
            log.debug("Feeds: {error} (again)", error=message)
        else:
            log.warn("Feeds: {error}", error=message)

    def _failed(self, failure: Failure, what: str) -> None:
        self.errors += 1
        self.last_error = f"{what}: {failure.getErrorMessage()}"
        log.failure("Feeds: unexpected error in {what}", failure=failure, what=what)

    # -- lookups ----------------------------------------------------------------------------

    def _lookup(self, uuids: list[str]) -> Deferred[None]:
        assert self.db is not None
        self.lookups += 1
        batch = {u: self._pending[u] for u in uuids}
        d = self.db.recovery_rows(uuids)
        d.addCallbacks(self._looked_up, self._lookup_failed, callbackArgs=(batch,),
                       errbackArgs=(batch,))
        return d

    def _lookup_failed(self, failure: Failure, batch: dict[str, _Lookup]) -> Failure:
        """A failed query counts as an attempt of each lookup (no hot retry loop)."""
        now = self.clock.seconds()
        for uuid, lookup in batch.items():
            if self._pending.get(uuid) is lookup:
                lookup.attempt += 1
                if lookup.attempt >= len(self.retry_delays):
                    del self._pending[uuid]
                else:
                    lookup.due = now + self.retry_delays[lookup.attempt]
        return failure

    def _looked_up(self, rows: list[CallRow], batch: dict[str, _Lookup]) -> None:
        found = self._prefer_current(rows)
        now = self.clock.seconds()
        for uuid, lookup in batch.items():
            if self._pending.get(uuid) is not lookup:
                continue  # hung up, or a newer event re-armed it (that lookup runs next)
            row = found.get(uuid)
            feed = None
            if row is not None:
                slot = self._profile_slot.get(row.profile_name)
                if slot is None:
                    self.events_ignored += 1
                    del self._pending[uuid]
                    continue
                feed = self._fed.get(slot.slot_id)
                if feed is None:
                    del self._pending[uuid]  # a slot this node does not master
                    continue
                value = encode_call_row(row)
                if lookup.baseline is None or value != lookup.baseline:
                    del self._pending[uuid]
                    self._store_call(feed, row, value, self._next_gen())
                    if lookup.baseline is None and not lookup.followed:
                        # FreeSWITCH rewrites the row once the caller's ACK is in (the
                        # dialog's tags, sip_to_tag...), with no event: look again soon,
                        # or a master dying now leaves a row whose re-INVITE the caller
                        # cannot match (its BYE then gets 481)
                        follow = _Lookup(now + ANSWER_FOLLOW_UP, value)
                        follow.followed = True
                        self._pending[uuid] = follow
                    continue
            lookup.attempt += 1
            if lookup.attempt >= len(self.retry_delays):
                del self._pending[uuid]
                if row is None:
                    self.lookup_misses += 1
                continue
            lookup.due = now + self.retry_delays[lookup.attempt]

    def _prefer_current(self, rows: Iterable[CallRow]) -> dict[str, CallRow]:
        """One row per uuid: the current runtime's if there are several."""
        found: dict[str, CallRow] = {}
        mine = self.esl.core_uuid
        for row in rows:
            if row.uuid in found and found[row.uuid].runtime_uuid == mine:
                continue
            found[row.uuid] = row
        return found

    # -- sweeps -----------------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        if self._tick_timer is None or not self._tick_timer.active():
            self._tick_timer = self.clock.callLater(self.sweep_interval, self._tick)

    def _tick(self) -> None:
        self._tick_timer = None
        if not self._running or not self._fed:
            return
        now = self.clock.seconds()
        self._sweep_wanted = True
        if now >= self._next_reg_sweep:
            self._reg_sweep_wanted = True
        cutoff = now - self.tombstone_ttl
        gone = self._gone
        while gone:
            uuid, when = next(iter(gone.items()))
            if when > cutoff:
                break
            del gone[uuid]
        core = self.esl.core_uuid
        if any(f.identity is None or (core and f.identity.core_uuid != core)
               for f in self._fed.values()):
            self._refresh_identity()
        self._schedule_tick()
        self._kick()

    def sweep_now(self) -> None:
        """Reconcile calls and registrations with the table as soon as the DB is free
        (e.g. right after ``sofia profile P recover``)."""
        self._sweep_wanted = True
        self._reg_sweep_wanted = True
        self._kick()

    def _sweep_calls(self) -> Deferred[None]:
        assert self.db is not None
        db = self.db
        start_gen = self._gen
        self._sweeps_done += 1
        deep = self._sweeps_done % self.deep_sweep_every == 0
        d = db.recovery_summaries()

        def summarised(summaries: list[CallSummary]) -> Deferred[list[CallRow]] | None:
            fetch = self._reconcile_calls(summaries, start_gen)
            if deep:
                profiles = [p for f in self._fed.values() for p in f.slot.profiles]
                return db.recovery_all(profiles)
            return db.recovery_rows(fetch) if fetch else None

        def fetched(rows: list[CallRow] | None) -> Deferred[None]:
            found = self._prefer_current(rows) if rows else {}

            def apply(row: CallRow) -> None:
                uuid = row.uuid
                if uuid in self._gone or self._rejected.get(uuid) == _summary(row):
                    return
                entry = self._calls.get(uuid)
                if entry is not None and entry.gen > start_gen:
                    return  # an event wrote it after the sweep began
                slot = self._profile_slot.get(row.profile_name)
                feed = None if slot is None else self._fed.get(slot.slot_id)
                if feed is not None:
                    self._store_call(feed, row, encode_call_row(row),
                                     entry.gen if entry is not None else 0)
            return self._sliced(list(found.values()), apply)

        def swept(_: object) -> None:
            now = self.clock.seconds()
            self.sweeps += 1
            for feed in self._fed.values():
                feed.last_sweep = now

        d.addCallback(summarised)
        d.addCallback(fetched)
        d.addCallback(swept)
        return d

    def _reconcile_calls(self, summaries: list[CallSummary], start_gen: int) -> list[str]:
        """Delete records whose row is gone; return the uuids to fetch in full."""
        seen: dict[str, CallSummary] = {}
        mine = self.esl.core_uuid
        ignored = 0
        ignored_profiles: set[str] = set()
        fetch: list[str] = []
        for s in summaries:
            slot = self._profile_slot.get(s.profile_name)
            if slot is None:
                ignored += 1
                ignored_profiles.add(s.profile_name)
                continue
            if slot.slot_id not in self._fed:
                continue
            if s.uuid in seen and seen[s.uuid].runtime_uuid == mine:
                continue
            seen[s.uuid] = s
        self.rows_ignored = ignored
        self.ignored_profiles = tuple(sorted(ignored_profiles))
        for uuid, entry in list(self._calls.items()):
            if uuid not in seen and entry.gen <= start_gen:
                self._drop_call(uuid)
        for uuid in [u for u in self._rejected if u not in seen]:
            del self._rejected[uuid]
        for uuid, s in seen.items():
            if uuid in self._gone or self._rejected.get(uuid) == s:
                continue
            entry = self._calls.get(uuid)
            if entry is None or (entry.summary != s and entry.gen <= start_gen):
                fetch.append(uuid)
        return fetch

    def _sweep_registrations(self) -> Deferred[None]:
        assert self.db is not None
        start_gen = self._gen
        profiles = [p for f in self._fed.values() for p in f.slot.profiles]
        self._next_reg_sweep = self.clock.seconds() + self.registration_sweep_interval
        d = self.db.registrations(profiles)

        def got(rows: list[RegistrationRow] | None) -> Deferred[None] | None:
            if rows is None:
                if self.registration_table:
                    log.info("No sip_registrations table in {db}: registrations come from "
                             "events only", db=str(self.me.registration_db or self.me.core_db))
                self.registration_table = False
                return None
            self.registration_table = True
            now = self.clock.seconds()
            seen: set[str] = set()

            def apply(row: RegistrationRow) -> None:
                if row.expires and row.expires <= now:
                    return  # expired: sofia deletes it
                key = row.key
                seen.add(key)
                entry = self._regs.get(key)
                if entry is not None and (entry.gen > start_gen or entry.same(row)):
                    return
                if self._reg_deleted.get(key, 0) > start_gen:
                    return  # unregistered after the sweep read the table
                slot = self._profile_slot.get(row.profile_name)
                feed = None if slot is None else self._fed.get(slot.slot_id)
                if feed is not None:
                    self._store_reg(feed, row, entry.gen if entry is not None else 0)

            def drop(key: str) -> None:
                entry = self._regs.get(key)
                if entry is not None and entry.gen <= start_gen:
                    self._drop_reg(key)

            def done(_: object) -> None:
                deleted = self._reg_deleted
                for key in [k for k, g in deleted.items() if g <= start_gen]:
                    del deleted[key]
                self.registration_sweeps += 1
                for feed in self._fed.values():
                    feed.last_registration_sweep = now

            d = self._sliced(rows, apply)
            d.addCallback(lambda _: self._sliced(
                [k for k in self._regs if k not in seen], drop))
            d.addCallback(done)
            return d

        d.addCallback(got)
        return d

    def _sliced(self, items: Sequence[_T], apply: Callable[[_T], None]) -> Deferred[None]:
        """``apply`` each item, ``apply_slice`` items per reactor turn, so that applying a
        sweep of 100k rows never blocks the reactor (heartbeats) for long."""
        d: Deferred[None] = Deferred()
        pos = 0
        n = self.apply_slice

        def step() -> None:
            nonlocal pos
            try:
                if self._running:
                    end = min(pos + n, len(items))
                    for i in range(pos, end):
                        apply(items[i])
                    pos = end
                if pos >= len(items) or not self._running:
                    d.callback(None)
                else:
                    self.clock.callLater(0, step)
            except Exception:
                d.errback()
        step()
        return d

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock.seconds()

        def ago(t: float | None) -> float | None:
            return None if t is None else round((now - t) * 1000, 1)

        slots: dict[str, Any] = {}
        for feed in self._fed.values():
            ident = feed.identity
            slots[feed.slot.name] = {
                "calls": feed.calls,
                "registrations": feed.registrations,
                "identity": None if ident is None else {
                    "core_uuid": ident.core_uuid, "version": ident.version},
                "last_sweep_ms_ago": ago(feed.last_sweep),
                "last_registration_sweep_ms_ago": ago(feed.last_registration_sweep),
                "rows_rejected": feed.rows_rejected,
                "puts": feed.puts,
                "deletes": feed.deletes,
                "errors": feed.errors,
                "last_error": feed.last_error,
                "fed_for_s": round(now - feed.since, 3),
            }
        return {
            "running": self._running,
            "core_db": None if self.me.core_db is None else str(self.me.core_db),
            "registration_db": self.me.registration_db,
            "calls_enabled": self.db is not None,
            "registration_table": self.registration_table,
            "slots": slots,
            "rows_ignored": self.rows_ignored,
            "ignored_profiles": list(self.ignored_profiles),
            "events_ignored": self.events_ignored,
            "lookups": self.lookups,
            "lookup_misses": self.lookup_misses,
            "pending_lookups": len(self._pending),
            "sweeps": self.sweeps,
            "registration_sweeps": self.registration_sweeps,
            "db_busy": self._busy,
            "errors": self.errors,
            "last_error": self.last_error,
        }
