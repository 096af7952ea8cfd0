"""Writing a dead master's rows into this node's FreeSWITCH databases (SQLite).

A takeover puts the dead master's call-recovery rows into the local core DB's ``recovery``
table (``sofia profile P recover`` then reads them) and its registrations into the
``sip_registrations`` table. :class:`CoreDBWriter` does those writes, and their undoing for a
rollback, in one short transaction each:

``recovery``
    Every row keeps the dead master's ``runtime_uuid``: FreeSWITCH recovers only rows whose
    ``runtime_uuid`` differs from its own core UUID. A row that carries *this* FreeSWITCH's
    core UUID (it was once ours and came back through replication) would never be
    recovered, so its ``runtime_uuid`` is replaced by :data:`FOREIGN_RUNTIME_PREFIX` + the
    original. A row already present with the same ``uuid`` and the same ``runtime_uuid``
    (an earlier, failed attempt) is replaced, so a retry writes each call once. The
    ``metadata`` (the XML CDR) is written byte-exact, as TEXT. Before the first batch,
    :meth:`CoreDBWriter.purge_recovery` deletes the slot's rows of every other runtime
    (ghosts of this FreeSWITCH's earlier runs) so ``recover`` brings back only the calls
    being taken over.

``sip_registrations``
    The 14 columns a registration record carries (:class:`~fsha.fsdb.rows.RegistrationRow`) plus the
    restoring node's own values for the others: ``hostname`` / ``orig_hostname`` (sofia
    expires rows per hostname, so they must be ours, or nothing would ever expire them),
    ``server_host`` / ``orig_server_host`` (the slot's address), ``server_user`` /
    ``mwi_user`` (``sip_user``), ``mwi_host`` / ``sub_host`` (``sip_host``),
    ``ping_status`` ``Reachable`` and zero ping counters. A row with the same ``call_id``,
    ``sip_user``, ``sip_host`` and ``profile_name`` is replaced (a refresh).

Nothing here creates tables: FreeSWITCH creates them at start-up, and a missing table means
the path is not FreeSWITCH's database (:class:`CoreDBError` says so). The file is opened
``mode=rw`` (never created). Real FreeSWITCH keeps ``sip_registrations`` in the profile's
own database (``<db dir>/sofia_reg_PROFILE.db``, the profile's ``dbname``) unless the profile
sets ``odbc-dsn``; the writer takes a path per profile for that reason (the node's
``esl.registration_db``), and so does the simulator.

Threads: every operation is a plain function handed to ``run`` (a
:class:`~fsha.fsdb.runner.ThreadRunner` in production, ``inline_runner`` in tests). One thread
serialises the operations, so a rollback's delete always runs after the write it undoes,
even if that write was abandoned on a timeout. A caller that gives up on an operation
calls :meth:`CoreDBWriter.interrupt` (thread-safe): the running statement is aborted
(``sqlite3.Connection.interrupt``) and its transaction rolled back. Each statement waits at
most ``busy_timeout`` seconds for FreeSWITCH's locks; a transaction still locked out then is
rolled back and run again (:data:`LOCKED_ATTEMPTS` in all: a real FreeSWITCH recovering a
big batch holds its core DB for a while). The writer's connection uses
``synchronous=NORMAL`` and ``wal_autocheckpoint=0`` (its own settings; see
:class:`~fsha.fsdb.connection.Connection`).
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from twisted.internet.defer import Deferred, succeed

from fsha.fsdb.connection import Connection
from fsha.fsdb.rows import SIP_REGISTRATIONS_COLUMNS, RecoveryRow, RegistrationRow
from fsha.fsdb.runner import Runner

__all__ = [
    "FOREIGN_RUNTIME_PREFIX",
    "CoreDBError",
    "CoreDBWriter",
]

#: Prefix of the runtime_uuid given to a row that carried this FreeSWITCH's own core UUID.
FOREIGN_RUNTIME_PREFIX = "fsha-foreign-"


class CoreDBError(Exception):
    """The database cannot be written (missing file or table, locked, interrupted...)."""


_INSERT_RECOVERY = (
    "insert into recovery (runtime_uuid, technology, profile_name, hostname, uuid, metadata) "
    "values (?, ?, ?, ?, ?, CAST(? AS TEXT))"
)
_DELETE_RECOVERY = "delete from recovery where uuid=? and runtime_uuid=?"
_INSERT_REGISTRATION = (
    "insert into sip_registrations (" + ", ".join(SIP_REGISTRATIONS_COLUMNS) + ") values ("
    + ", ".join("?" * len(SIP_REGISTRATIONS_COLUMNS)) + ")"
)
# Only call_id may pick the index: sofia indexes nearly every column, and SQLite (no
# ANALYZE) would otherwise pick sr_profile_name, a scan of the whole profile per row (a
# restore of 100,000 registrations would take hours). The unary + keeps the others out.
_DELETE_REGISTRATION = (
    "delete from sip_registrations where call_id=? and +sip_user=? and +sip_host=? "
    "and +profile_name=?"
)


def _metadata(value: bytes | str) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value


#: Attempts of one transaction that finds the database locked (see ``_transaction``).
LOCKED_ATTEMPTS = 3
_LOCKED = re.compile(r"database (table )?is locked|database is busy")


class _Locked(Exception):
    """The database stayed locked for the connection's busy timeout."""


class CoreDBWriter:
    """Writes (and removes) recovery rows and registrations; see the module docstring.

    ``core_db``: the core DB file (``recovery``). ``registration_db``: the file holding a
    profile's ``sip_registrations`` (default: the core DB). Every method returns a Deferred
    that fails with :class:`CoreDBError` only.
    """

    def __init__(self, core_db: str | Path, run: Runner, *,
                 registration_db: Callable[[str], str | Path | None] | None = None,
                 busy_timeout: float = 1.0) -> None:
        self.core_db = Path(core_db)
        self._run = run
        self._registration_db = registration_db
        self.busy_timeout = busy_timeout
        self._connections: dict[Path, Connection] = {}
        self._lock = threading.Lock()
        self.locked_retries = 0  # transactions run again after "database is locked"

    def registration_path(self, profile: str) -> Path:
        path = None if self._registration_db is None else self._registration_db(profile)
        return self.core_db if path is None else Path(path)

    # -- plumbing (runner thread) --------------------------------------------------------------

    def _connection(self, path: Path) -> Connection:
        with self._lock:
            c = self._connections.get(path)
            if c is None:
                c = self._connections[path] = Connection(path, "rw", self.busy_timeout)
            return c

    def _transaction(self, path: Path, table: str,
                     work: Callable[[sqlite3.Connection], int]) -> int:
        """``work`` in one transaction; one that found the database locked beyond
        ``busy_timeout`` (FreeSWITCH writing: it logs ``SQLite is BUSY`` recovering a big
        batch) is rolled back and run again, :data:`LOCKED_ATTEMPTS` times in all. Every
        operation here is idempotent (rows replaced or deleted by key)."""
        last: _Locked | None = None
        for attempt in range(1, LOCKED_ATTEMPTS + 1):
            try:
                return self._attempt(path, table, work)
            except _Locked as e:
                self.locked_retries += attempt < LOCKED_ATTEMPTS
                last = e
        raise CoreDBError(f"{path}: {last} ({LOCKED_ATTEMPTS} attempts)")

    def _attempt(self, path: Path, table: str,
                 work: Callable[[sqlite3.Connection], int]) -> int:
        c = self._connection(path)
        try:
            conn = c.get()
        except sqlite3.Error as e:
            c.reset()
            if _LOCKED.search(str(e)):
                raise _Locked(str(e)) from None
            raise CoreDBError(f"cannot open {path}: {e}") from None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                n = work(conn)
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # an interrupted statement may have rolled it back already
                raise
            conn.execute("COMMIT")
            return n
        except sqlite3.Error as e:
            c.reset()  # never reuse a connection in an unknown state
            if isinstance(e, sqlite3.OperationalError) and _LOCKED.search(str(e)):
                raise _Locked(str(e)) from None
            if "no such table" in str(e):
                raise CoreDBError(f"{path} has no {table} table: is it FreeSWITCH's "
                                  "database?") from None
            raise CoreDBError(f"{path}: {e}") from None

    # -- operations ------------------------------------------------------------------------

    def write_recovery(self, rows: Sequence[RecoveryRow], own_runtime: str | None
                       ) -> Deferred[list[RecoveryRow]]:
        """Insert ``rows`` (replacing earlier copies); fires with the rows as written
        (``runtime_uuid`` changed where it was ``own_runtime``)."""
        written = [r if own_runtime is None or r.runtime_uuid != own_runtime else
                   RecoveryRow(FOREIGN_RUNTIME_PREFIX + r.runtime_uuid, r.technology,
                               r.profile_name, r.hostname, r.uuid, r.metadata)
                   for r in rows]

        def work(conn: sqlite3.Connection) -> int:
            # Replace earlier copies (a retry): look them up by runtime (indexed), so a
            # first write costs one query per dead runtime, not one delete per row.
            present: set[tuple[str, str]] = set()
            for runtime in {r.runtime_uuid for r in written}:
                present.update((u, runtime) for (u,) in conn.execute(
                    "select uuid from recovery where runtime_uuid=?", (runtime,)))
            conn.executemany(_DELETE_RECOVERY, (
                (r.uuid, r.runtime_uuid) for r in written if (r.uuid, r.runtime_uuid) in present))
            conn.executemany(_INSERT_RECOVERY, (
                (r.runtime_uuid, r.technology, r.profile_name, r.hostname, r.uuid,
                 _metadata(r.metadata)) for r in written))
            return len(written)

        d = self._run(lambda: self._transaction(self.core_db, "recovery", work))
        return d.addCallback(lambda _: written)

    def delete_recovery(self, rows: Iterable[RecoveryRow]) -> Deferred[int]:
        """Delete these rows (by ``uuid`` and ``runtime_uuid``: never a row of another
        runtime); fires with how many were still there."""
        keys = [(r.uuid, r.runtime_uuid) for r in rows]

        def work(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(_DELETE_RECOVERY, keys)
            return conn.total_changes - before

        return self._run(lambda: self._transaction(self.core_db, "recovery", work))

    def purge_recovery(self, profiles: Sequence[str], keep_runtimes: Iterable[str]
                       ) -> Deferred[int]:
        """Delete the rows of ``profiles`` whose ``runtime_uuid`` is none of
        ``keep_runtimes``; fires with how many. Before a takeover's first batch: rows an
        earlier runtime left here (this FreeSWITCH killed with calls, a failback to it
        later) are calls long gone or live elsewhere, and ``sofia profile P recover``
        would bring them back as ghosts."""
        names, keep = list(profiles), sorted(set(keep_runtimes))
        if not names:
            return succeed(0)
        sql = (f"delete from recovery where profile_name in ({','.join('?' * len(names))})"
               + (f" and runtime_uuid not in ({','.join('?' * len(keep))})" if keep else ""))

        def work(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.execute(sql, (*names, *keep))
            return conn.total_changes - before

        return self._run(lambda: self._transaction(self.core_db, "recovery", work))

    def count_recovery(self, rows: Iterable[RecoveryRow]) -> Deferred[int]:
        """How many of these rows are in the table (tests, diagnostics)."""
        keys = [(r.uuid, r.runtime_uuid) for r in rows]

        def work(conn: sqlite3.Connection) -> int:
            return sum(conn.execute("select count(*) from recovery where uuid=? and "
                                    "runtime_uuid=?", k).fetchone()[0] for k in keys)

        return self._run(lambda: self._transaction(self.core_db, "recovery", work))

    def write_registrations(self, rows: Sequence[RegistrationRow], hostname: str,
                            server_host: str) -> Deferred[int]:
        """Insert ``rows`` (replacing the same bindings; the last of duplicates wins);
        fires with how many."""
        unique = {(r.call_id, r.sip_user, r.sip_host, r.profile_name): r for r in rows}
        rows = list(unique.values())

        def for_path(path: Path, group: list[RegistrationRow]) -> Callable[[], int]:
            def work(conn: sqlite3.Connection) -> int:
                conn.executemany(_DELETE_REGISTRATION, (
                    (r.call_id, r.sip_user, r.sip_host, r.profile_name) for r in group))
                conn.executemany(_INSERT_REGISTRATION, (
                    _registration_values(r, hostname, server_host) for r in group))
                return len(group)
            return lambda: self._transaction(path, "sip_registrations", work)

        return self._per_path(rows, for_path)

    def delete_registrations(self, rows: Sequence[RegistrationRow], hostname: str
                             ) -> Deferred[int]:
        """Delete these bindings where they carry ``hostname`` (what a restore wrote);
        fires with how many were there."""
        def for_path(path: Path, group: list[RegistrationRow]) -> Callable[[], int]:
            def work(conn: sqlite3.Connection) -> int:
                before = conn.total_changes
                conn.executemany(_DELETE_REGISTRATION + " and +hostname=?", (
                    (r.call_id, r.sip_user, r.sip_host, r.profile_name, hostname)
                    for r in group))
                return conn.total_changes - before
            return lambda: self._transaction(path, "sip_registrations", work)

        return self._per_path(rows, for_path)

    def _per_path(self, rows: Sequence[RegistrationRow],
                  for_path: Callable[[Path, list[RegistrationRow]], Callable[[], int]]
                  ) -> Deferred[int]:
        groups: dict[Path, list[RegistrationRow]] = {}
        for r in rows:
            groups.setdefault(self.registration_path(r.profile_name), []).append(r)
        jobs = [for_path(path, group) for path, group in groups.items()]

        def all_jobs() -> int:
            return sum(job() for job in jobs)

        return self._run(all_jobs)

    def interrupt(self) -> None:
        """Abort whatever statement is running (callable from any thread)."""
        with self._lock:
            connections = list(self._connections.values())
        for c in connections:
            c.interrupt()

    def close(self) -> Deferred[None]:
        """Close the connections (on the runner's thread, after pending operations)."""
        def close_all() -> None:
            with self._lock:
                connections = list(self._connections.values())
                self._connections.clear()
            for c in connections:
                c.reset()
        return self._run(close_all)


def _registration_values(r: RegistrationRow, hostname: str, server_host: str
                         ) -> tuple[object, ...]:
    values = {
        "call_id": r.call_id, "sip_user": r.sip_user, "sip_host": r.sip_host,
        "presence_hosts": r.presence_hosts, "contact": r.contact, "status": r.status,
        "ping_status": "Reachable", "ping_count": 0, "ping_time": 0, "force_ping": 0,
        "rpid": r.rpid, "expires": r.expires, "ping_expires": 0, "user_agent": r.user_agent,
        "server_user": r.sip_user, "server_host": server_host,
        "profile_name": r.profile_name, "hostname": hostname, "network_ip": r.network_ip,
        "network_port": r.network_port, "sip_username": r.sip_username,
        "sip_realm": r.sip_realm, "mwi_user": r.sip_user, "mwi_host": r.sip_host,
        "orig_server_host": server_host, "orig_hostname": hostname, "sub_host": r.sip_host,
    }
    return tuple(values[c] for c in SIP_REGISTRATIONS_COLUMNS)
