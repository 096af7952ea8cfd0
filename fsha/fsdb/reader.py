"""Reading FreeSWITCH's databases, read-only: what the replication feeds replicate.

``recovery`` from the core DB; ``sip_registrations`` from each profile's own database
(``<db dir>/sofia_reg_PROFILE.db``, the node's ``esl.registration_db``) or, without one,
from the core DB. Measured on a 10,000-call (8 KB metadata) / 100,000-registration file:
one indexed lookup ~0.015 ms, a whole-table sweep 30-65 ms (calls, small columns),
~110 ms (calls, full rows), ~0.8 s (registrations); any query may wait up to the busy
timeout behind FreeSWITCH's write lock. So every query runs on the runner's thread, one at
a time (the caller guarantees it), and can be interrupted from the reactor.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from twisted.internet.defer import Deferred

from fsha.fsdb.connection import Connection
from fsha.fsdb.rows import REGISTRATION_COLUMNS, CallSummary, RecoveryRow, RegistrationRow
from fsha.fsdb.runner import Runner

__all__ = ["LOOKUP_BATCH", "CoreDBReader", "CoreDBReads"]

#: UUIDs per lookup query (well under SQLite's 999 host parameters).
LOOKUP_BATCH: Final = 256


class CoreDBReads(Protocol):
    """What the feeds read of FreeSWITCH's databases. Every method returns a Deferred."""

    def recovery_rows(self, uuids: Sequence[str]) -> Deferred[list[RecoveryRow]]: ...

    def recovery_summaries(self) -> Deferred[list[CallSummary]]: ...

    def recovery_all(self, profiles: Sequence[str]) -> Deferred[list[RecoveryRow]]: ...

    def registrations(self, profiles: Sequence[str]) -> Deferred[list[RegistrationRow] | None]:
        """The rows of these profiles, or None if the table does not exist."""
        ...

    def registration_page(self, profile: str, after: int, limit: int
                          ) -> Deferred[tuple[list[RegistrationRow], int] | None]:
        """Up to ``limit`` rows of ``profile`` whose rowid is above ``after``, in rowid
        order, and the last one's rowid; None if the profile's table is not there."""
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


def _call_row(r: tuple[Any, ...]) -> RecoveryRow:
    meta = r[5]
    if meta is None:
        meta = b""
    elif isinstance(meta, str):
        meta = meta.encode("utf-8", "surrogateescape")
    return RecoveryRow(_text(r[0]), _text(r[1]), _text(r[2]), _text(r[3]), _text(r[4]), meta)


def _registration_row(r: tuple[Any, ...]) -> RegistrationRow:
    values: list[Any] = [_text(v) for v in r]
    values[7] = _int(r[7])
    return RegistrationRow(*values)


def _page(rows: list[tuple[Any, ...]], after: int) -> tuple[list[RegistrationRow], int]:
    return [_registration_row(r[1:]) for r in rows], (_int(rows[-1][0]) if rows else after)


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


class CoreDBReader:
    """The core DB (and the profiles' registration databases) opened read-only; queries
    go through ``run``.

    Only one query runs at a time (the caller guarantees it); connections are opened
    lazily by the first query, in the runner's thread, and reopened after an error.
    """

    def __init__(self, path: str | Path, run: Runner, busy_timeout: float = 1.0, *,
                 registration_db: Callable[[str], str | Path | None] | None = None) -> None:
        self.path = str(path)
        self._run = run
        self._busy_timeout = busy_timeout
        self._core = Connection(path, "ro", busy_timeout)
        self._stale = False
        # sofia keeps a profile's registrations in its own file (<db dir>/sofia_reg_P.db);
        # None: in the core DB (a database set up that way, old simulators)
        self._registration_db = registration_db
        self._regs: dict[str, Connection] = {}

    def _connection(self) -> sqlite3.Connection:
        if self._stale:
            self._close_all()
        self._stale = False
        return self._core.get()

    def _close_all(self) -> None:
        self._core.reset()
        for c in self._regs.values():
            c.reset()
        self._regs.clear()

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        conn = self._connection()
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.Error:
            self._stale = True  # reopen on the next query
            raise

    def recovery_rows(self, uuids: Sequence[str]) -> Deferred[list[RecoveryRow]]:
        uuids = list(uuids)

        def q() -> list[RecoveryRow]:
            rows: list[RecoveryRow] = []
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

    def recovery_all(self, profiles: Sequence[str]) -> Deferred[list[RecoveryRow]]:
        profiles = list(profiles)

        def q() -> list[RecoveryRow]:
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
                c = self._regs.get(profile)
                try:
                    if c is None:
                        c = self._regs[profile] = Connection(path, "ro", self._busy_timeout)
                    rows = c.get().execute(sql + "profile_name=?", (profile,)).fetchall()
                except sqlite3.OperationalError as e:
                    # not created yet (a profile never started here) or not sofia's file
                    if "no such table" in str(e) or "unable to open" in str(e):
                        bad = self._regs.pop(profile, None)
                        if bad is not None:
                            bad.reset()
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

    def registration_page(self, profile: str, after: int, limit: int
                          ) -> Deferred[tuple[list[RegistrationRow], int] | None]:
        # a rowid range scan (+profile_name: not sofia's profile index) bounded by limit: a
        # sweep of 100,000 rows never holds more than one page of them
        sql = (f"select rowid, {', '.join(REGISTRATION_COLUMNS)} from sip_registrations "
               "where rowid > ? and +profile_name = ? order by rowid limit ?")
        args = (after, profile, limit)

        def in_core() -> tuple[list[RegistrationRow], int] | None:
            try:
                return _page(self._query(sql, args), after)
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):
                    self._stale = False
                    return None
                raise

        def own_file(path: str | Path) -> tuple[list[RegistrationRow], int] | None:
            self._connection()  # reopens everything after an error or a restart
            c = self._regs.get(profile)
            try:
                if c is None:
                    c = self._regs[profile] = Connection(path, "ro", self._busy_timeout)
                return _page(c.get().execute(sql, args).fetchall(), after)
            except sqlite3.OperationalError as e:
                # not created yet (a profile never started here) or not sofia's file
                if "no such table" in str(e) or "unable to open" in str(e):
                    bad = self._regs.pop(profile, None)
                    if bad is not None:
                        bad.reset()
                    return None
                self._stale = True
                raise
            except sqlite3.Error:
                self._stale = True
                raise

        def q() -> tuple[list[RegistrationRow], int] | None:
            if self._registration_db is None:
                return in_core()
            path = self._registration_db(profile)
            return None if path is None else own_file(path)
        return self._run(q)

    def interrupt(self) -> None:
        """Abort the running query (callable from any thread)."""
        for c in [self._core, *list(self._regs.values())]:
            c.interrupt()
        self._stale = True

    def reset(self) -> None:
        """Reopen the connections before the next query (e.g. after a FreeSWITCH restart)."""
        self._stale = True

    def close(self) -> None:
        self._close_all()
