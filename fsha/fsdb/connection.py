"""One SQLite connection to one of FreeSWITCH's database files, used on a runner's thread.

Opened lazily, never creating the file (``mode=ro`` for the reader, ``mode=rw`` for the
writer), with a busy timeout for FreeSWITCH's locks. :meth:`Connection.interrupt` may be
called from any thread (a deadline in the reactor); after any error the owner calls
:meth:`Connection.reset` so a connection in an unknown state is never reused.
"""

from __future__ import annotations

import sqlite3
import threading
import urllib.parse
from pathlib import Path
from typing import Literal

__all__ = ["Connection"]


class Connection:
    """A lazily opened connection to ``path``.

    ``mode="ro"``: ``PRAGMA query_only`` and text as bytes (metadata stays byte-exact even
    if it is not valid UTF-8). ``mode="rw"``: this connection's own ``synchronous=NORMAL``
    and ``wal_autocheckpoint=0`` (FreeSWITCH's settings are untouched): no fsync per
    commit in WAL mode (rows about to be recovered need no power-loss durability) and no
    checkpoint inside our commit (FreeSWITCH's next commit checkpoints the WAL); together
    they halve a 10,000-row write. Opening raises ``sqlite3.Error``.
    """

    def __init__(self, path: str | Path, mode: Literal["ro", "rw"], busy_timeout: float
                 ) -> None:
        self.path = Path(path)
        self.mode = mode
        self.busy_timeout = busy_timeout
        self.conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # guards ``conn`` for interrupt() from other threads

    def get(self) -> sqlite3.Connection:
        if self.conn is not None:
            return self.conn
        uri = "file:" + urllib.parse.quote(str(self.path)) + "?mode=" + self.mode
        conn = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout,
                               isolation_level=None, check_same_thread=False)
        try:
            if self.mode == "ro":
                conn.text_factory = bytes
                conn.execute("PRAGMA query_only=1")
            else:
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA wal_autocheckpoint=0")
        except sqlite3.Error:
            conn.close()
            raise
        with self._lock:
            self.conn = conn
        return conn

    def reset(self) -> None:
        """Close; the next :meth:`get` reopens."""
        with self._lock:
            conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def interrupt(self) -> None:
        """Abort the running statement (any thread)."""
        with self._lock:
            if self.conn is not None:
                self.conn.interrupt()
