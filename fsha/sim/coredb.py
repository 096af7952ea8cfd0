"""The simulator's SQLite databases: the core DB's ``recovery`` table and, as in mod_sofia,
each profile's own ``sip_registrations`` database.

Same schema, indexes and statements as FreeSWITCH (``switch_core_sqldb.c``, ``mod_sofia``).
Like a real FreeSWITCH (verified on 1.11), the core DB is ``<db dir>/core.db`` (or any
path) in rollback-journal mode (``journal_mode=delete``) with ``synchronous=OFF``, and a
profile's registrations live in ``<db dir>/sofia_reg_<profile>.db`` (its ``dbname``),
created when the profile first starts or registers. Short transactions let another process
(fsha, writing a dead master's rows before ``sofia profile P recover``) write while the
simulator runs; every statement waits at most ``busy_timeout`` seconds for a lock.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fsha.fsdb.rows import SIP_REGISTRATIONS_COLUMNS

RECOVERY_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS recovery (\n"
    "   runtime_uuid    VARCHAR(255),\n"
    "   technology      VARCHAR(255),\n"
    "   profile_name    VARCHAR(255),\n"
    "   hostname        VARCHAR(255),\n"
    "   uuid            VARCHAR(255),\n"
    "   metadata        text\n"
    ")"
)
RECOVERY_INDEXES = (
    "CREATE INDEX IF NOT EXISTS recovery1 ON recovery(technology)",
    "CREATE INDEX IF NOT EXISTS recovery2 ON recovery(profile_name)",
    "CREATE INDEX IF NOT EXISTS recovery3 ON recovery(uuid)",
    "CREATE INDEX IF NOT EXISTS recovery4 ON recovery(runtime_uuid)",
)

SIP_REGISTRATIONS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sip_registrations (\n"
    "   call_id          VARCHAR(255),\n"
    "   sip_user         VARCHAR(255),\n"
    "   sip_host         VARCHAR(255),\n"
    "   presence_hosts   VARCHAR(255),\n"
    "   contact          VARCHAR(1024),\n"
    "   status           VARCHAR(255),\n"
    "   ping_status      VARCHAR(255),\n"
    "   ping_count       INTEGER,\n"
    "   ping_time        BIGINT,\n"
    "   force_ping       INTEGER,\n"
    "   rpid             VARCHAR(255),\n"
    "   expires          BIGINT,\n"
    "   ping_expires     INTEGER not null default 0,\n"
    "   user_agent       VARCHAR(255),\n"
    "   server_user      VARCHAR(255),\n"
    "   server_host      VARCHAR(255),\n"
    "   profile_name     VARCHAR(255),\n"
    "   hostname         VARCHAR(255),\n"
    "   network_ip       VARCHAR(255),\n"
    "   network_port     VARCHAR(6),\n"
    "   sip_username     VARCHAR(255),\n"
    "   sip_realm        VARCHAR(255),\n"
    "   mwi_user         VARCHAR(255),\n"
    "   mwi_host         VARCHAR(255),\n"
    "   orig_server_host VARCHAR(255),\n"
    "   orig_hostname    VARCHAR(255),\n"
    "   sub_host         VARCHAR(255)\n"
    ")"
)
SIP_REGISTRATIONS_INDEXES = (
    "CREATE INDEX IF NOT EXISTS sr_call_id ON sip_registrations (call_id)",
    "CREATE INDEX IF NOT EXISTS sr_sip_user ON sip_registrations (sip_user)",
    "CREATE INDEX IF NOT EXISTS sr_sip_host ON sip_registrations (sip_host)",
    "CREATE INDEX IF NOT EXISTS sr_profile_name ON sip_registrations (profile_name)",
    "CREATE INDEX IF NOT EXISTS sr_hostname ON sip_registrations (hostname)",
    "CREATE INDEX IF NOT EXISTS sr_expires ON sip_registrations (expires)",
    "CREATE INDEX IF NOT EXISTS sr_network_ip ON sip_registrations (network_ip)",
)


@dataclass(frozen=True, slots=True)
class RecoveryRow:
    runtime_uuid: str
    technology: str
    profile_name: str
    hostname: str
    uuid: str
    metadata: str


class CoreDB:
    """The core DB. ``path`` may be ``":memory:"`` for tests without files (then each
    profile's registration database is in memory too)."""

    def __init__(self, path: str, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._db = self._connect(path)
        self._batch_depth = 0
        for stmt in (RECOVERY_SCHEMA, *RECOVERY_INDEXES):
            self._db.execute(stmt)
        self._regs: dict[str, sqlite3.Connection] = {}
        self._reg_batch: set[str] = set()  # profiles whose DB is inside the open batch

    def _connect(self, path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=self.busy_timeout, isolation_level=None,
                             check_same_thread=False)
        if path != ":memory:":
            db.execute("PRAGMA journal_mode=DELETE")  # FreeSWITCH's own settings
            db.execute("PRAGMA synchronous=OFF")
        return db

    def registration_path(self, profile: str) -> str:
        """``<db dir>/sofia_reg_<profile>.db`` (``:memory:`` for an in-memory core DB)."""
        if self.path == ":memory:":
            return ":memory:"
        return os.path.join(os.path.dirname(os.path.abspath(self.path)),
                            f"sofia_reg_{profile}.db")

    def open_profile(self, profile: str) -> sqlite3.Connection:
        """The profile's registration database, created on first use (profile start)."""
        db = self._regs.get(profile)
        if db is None:
            db = self._regs[profile] = self._connect(self.registration_path(profile))
            for stmt in (SIP_REGISTRATIONS_SCHEMA, *SIP_REGISTRATIONS_INDEXES):
                db.execute(stmt)
        return db

    def close(self) -> None:
        self._db.close()
        for db in self._regs.values():
            db.close()
        self._regs.clear()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group many writes in one short transaction per database (placing N calls or
        registering N users at once)."""
        if self._batch_depth == 0:
            self._db.execute("BEGIN IMMEDIATE")
        self._batch_depth += 1
        try:
            yield
        except BaseException:
            self._batch_depth -= 1
            if self._batch_depth == 0:
                self._db.execute("ROLLBACK")
                self._end_registration_batch("ROLLBACK")
            raise
        self._batch_depth -= 1
        if self._batch_depth == 0:
            self._db.execute("COMMIT")
            self._end_registration_batch("COMMIT")

    def _end_registration_batch(self, how: str) -> None:
        for profile in self._reg_batch:
            self._regs[profile].execute(how)
        self._reg_batch.clear()

    @contextmanager
    def _registration_transaction(self, profile: str) -> Iterator[sqlite3.Connection]:
        """One write to a profile's registrations: its own transaction, or the open batch's."""
        db = self.open_profile(profile)
        if self._batch_depth > 0:
            if profile not in self._reg_batch:
                db.execute("BEGIN IMMEDIATE")
                self._reg_batch.add(profile)
            yield db
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- recovery ------------------------------------------------------------------------

    def track(
        self,
        runtime_uuid: str,
        profile_name: str,
        hostname: str,
        uuid: str,
        metadata: str,
        technology: str = "sofia",
    ) -> None:
        """``switch_core_recovery_track``: one row per answered channel."""
        self._db.execute(
            "insert into recovery (runtime_uuid, technology, profile_name, hostname, uuid, "
            "metadata) values (?, ?, ?, ?, ?, ?)",
            (runtime_uuid, technology, profile_name, hostname, uuid, metadata),
        )

    def update_metadata(self, uuid: str, metadata: str, runtime_uuid: str) -> None:
        # FreeSWITCH's own statement; runtime_uuid is not a filter (and as a filter it
        # would make SQLite pick the runtime_uuid index: a scan of all of my rows).
        self._db.execute("update recovery set metadata=? where uuid=?", (metadata, uuid))

    def untrack(self, uuid: str, runtime_uuid: str) -> None:
        """``switch_core_recovery_untrack``: hangup deletes the channel's row."""
        self._db.execute("delete from recovery where uuid=?", (uuid,))

    def take_for_recovery(
        self, my_runtime_uuid: str, profile_name: str, technology: str = "sofia"
    ) -> list[RecoveryRow]:
        """The real selection, then delete every matched row, in one transaction."""
        where = "technology=? and runtime_uuid != ? and profile_name=?"
        args = (technology, my_runtime_uuid, profile_name)
        with self.batch():
            cur = self._db.execute(
                "select runtime_uuid, technology, profile_name, hostname, uuid, metadata "
                "from recovery where " + where,
                args,
            )
            rows = [RecoveryRow(*(str(v) if v is not None else "" for v in r)) for r in cur]
            self._db.execute("delete from recovery where " + where, args)
        return rows

    def recovery_rows(self) -> list[RecoveryRow]:
        cur = self._db.execute(
            "select runtime_uuid, technology, profile_name, hostname, uuid, metadata "
            "from recovery"
        )
        return [RecoveryRow(*(str(v) if v is not None else "" for v in r)) for r in cur]

    # -- registrations -------------------------------------------------------------------

    def upsert_registration(self, row: dict[str, object]) -> bool:
        """Replace the registration with the same call_id/user/host/profile (a refresh);
        True if it replaced one. Indexed (``sr_call_id``): O(1) in the table's size."""
        key = (row["call_id"], row["sip_user"], row["sip_host"], row["profile_name"])
        # only call_id may pick an index (see fsha.fsdb: SQLite would pick profile_name)
        where = "call_id=? and +sip_user=? and +sip_host=? and +profile_name=?"
        cols = SIP_REGISTRATIONS_COLUMNS
        with self._registration_transaction(str(row["profile_name"])) as db:
            before = db.total_changes
            db.execute("delete from sip_registrations where " + where, key)
            replaced = db.total_changes != before
            db.execute(
                "insert into sip_registrations (" + ",".join(cols) + ") values ("
                + ",".join("?" * len(cols)) + ")",
                tuple(row.get(c) for c in cols),
            )
        return replaced

    def take_registrations(self, call_id: str, profile_name: str) -> list[dict[str, object]]:
        """Delete the registrations of this Call-ID on the profile; returns them."""
        if profile_name not in self._regs:
            return []
        cols = SIP_REGISTRATIONS_COLUMNS
        where = "call_id=? and +profile_name=?"
        with self._registration_transaction(profile_name) as db:
            rows = [dict(zip(cols, r, strict=True)) for r in db.execute(
                "select " + ",".join(cols) + " from sip_registrations where " + where,
                (call_id, profile_name))]
            if rows:
                db.execute("delete from sip_registrations where " + where,
                           (call_id, profile_name))
        return rows

    def delete_registration(self, call_id: str, profile_name: str) -> None:
        self.take_registrations(call_id, profile_name)

    def registrations(self, profile_name: str | None = None) -> list[dict[str, object]]:
        cols = SIP_REGISTRATIONS_COLUMNS
        sql = "select " + ",".join(cols) + " from sip_registrations"
        if profile_name is not None:
            db = self._regs.get(profile_name)
            if db is None and self.path != ":memory:" and os.path.exists(
                    self.registration_path(profile_name)):
                db = self.open_profile(profile_name)  # written by someone else (fsha)
            if db is None:
                return []
            return [dict(zip(cols, r, strict=True))
                    for r in db.execute(sql + " where profile_name=?", (profile_name,))]
        return [dict(zip(cols, r, strict=True))
                for db in self._regs.values() for r in db.execute(sql)]

    def take_expired(self, now: int, hostname: str) -> list[dict[str, object]]:
        """sofia_reg_check_expire: rows of this hostname with ``expires <= now``, deleted."""
        cols = SIP_REGISTRATIONS_COLUMNS
        where = "expires > 0 and expires <= ? and hostname=?"
        rows: list[dict[str, object]] = []
        for profile in list(self._regs):
            with self._registration_transaction(profile) as db:
                found = [dict(zip(cols, r, strict=True)) for r in db.execute(
                    "select " + ",".join(cols) + " from sip_registrations where " + where,
                    (now, hostname))]
                if found:
                    db.execute("delete from sip_registrations where " + where, (now, hostname))
            rows.extend(found)
        return rows
