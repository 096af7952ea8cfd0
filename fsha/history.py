"""What a node keeps across restarts, in its state directory (``[state] dir``).

- ``history.jsonl``: every event of the node (takeovers, releases, fences as takeover
  steps, maintenance, switchovers, config changes, peers up and down), one JSON object a
  line, rotated by size (``history.jsonl.1`` is the newest rotated file). Each line has
  ``time``, ``node``, ``event`` and the event's fields, and ``takeover`` (``SLOT/EPOCH``)
  where the event belongs to one: the same id on every node, which joins their stories
  (``fsha history --all``).
- ``maintenance``: present while the node is in maintenance, so a restart keeps it drained
  (as Pacemaker's standby does) until ``fsha maintenance NODE off``.
- ``config``: the digest of the config the node last ran, so a change is in the history.

Writes are small and synchronous (a line per event: events are rare, never per heartbeat);
an error is logged once and the node goes on without its history.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.python.logfile import LogFile
from twisted.web import resource
from twisted.web.server import Request

log = Logger()
HISTORY = "history.jsonl"


def takeover_id(event: dict[str, Any]) -> str | None:
    slot, epoch = event.get("slot"), event.get("epoch")
    if slot and isinstance(epoch, int) and epoch > 0:
        return f"{slot}/{epoch}"
    return None


class StateDir:
    """One node's state directory: its history and its flags that outlive a restart."""

    def __init__(self, path: Path, node: str, max_bytes: int = 1_000_000,
                 files: int = 10) -> None:
        self.path = path
        self.node = node
        self.written = 0
        self.failed = 0
        self.last_error: str | None = None
        path.mkdir(parents=True, exist_ok=True)
        self._file = LogFile(HISTORY, str(path), rotateLength=max_bytes,
                             maxRotatedFiles=max(0, files - 1), defaultMode=0o640)

    # -- history ------------------------------------------------------------------------

    def record(self, event: dict[str, Any]) -> None:
        """Append one node event (the node's event dict) to the history."""
        entry = {"time": event.get("time"), "node": self.node, **event}
        tid = takeover_id(event)
        if tid is not None:
            entry.setdefault("takeover", tid)
        try:
            self._file.write(json.dumps(entry, default=str, separators=(",", ":")) + "\n")
            self._file.flush()
            self.written += 1
        except OSError as e:
            self.failed += 1
            if self.last_error is None:
                log.error("history: cannot write {path}: {error}; going on without it",
                          path=str(self.path / HISTORY), error=e)
            self.last_error = str(e)

    def close(self) -> None:
        self._file.close()

    def status(self) -> dict[str, Any]:
        return {"dir": str(self.path), "written": self.written, "failed": self.failed,
                "last_error": self.last_error}

    # -- flags --------------------------------------------------------------------------

    def maintenance(self) -> bool:
        return (self.path / "maintenance").exists()

    def set_maintenance(self, on: bool) -> None:
        flag = self.path / "maintenance"
        try:
            if on:
                _write_atomically(flag, "on\n")
            else:
                flag.unlink(missing_ok=True)
        except OSError as e:
            log.error("cannot {what} the maintenance flag {path}: {error}; a restart "
                      "will not know", what="write" if on else "remove", path=str(flag),
                      error=e)

    def config_changed(self, digest: str) -> str | None:
        """The previous run's config digest if it differs from ``digest`` (saved now);
        None when unchanged or the first run."""
        saved = self.path / "config"
        try:
            before = saved.read_text().strip() if saved.exists() else None
            if before != digest:
                _write_atomically(saved, digest + "\n")
        except OSError as e:
            log.warn("cannot keep the config digest in {path}: {error}", path=str(saved),
                     error=e)
            return None
        return before if before not in (None, digest) else None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def history_files(path: Path) -> list[Path]:
    """The history files of a state directory, oldest first."""
    rotated = []
    for p in path.glob(HISTORY + ".*"):
        suffix = p.name[len(HISTORY) + 1:]
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    current = path / HISTORY
    return [p for _, p in sorted(rotated, reverse=True)] + (
        [current] if current.exists() else [])


def read_history(path: Path, limit: int | None = None, since: float | None = None,
                 takeover: str | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` entries (all if None), oldest first, of a state directory;
    files are read newest first, only as many as the limit needs."""
    found: list[dict[str, Any]] = []
    for file in reversed(history_files(path)):
        found = [e for e in _entries(file)
                 if (since is None or (e.get("time") or 0) >= since)
                 and (takeover is None or e.get("takeover") == takeover)] + found
        if limit and len(found) >= limit:
            break
    return found[-limit:] if limit else found


def _entries(file: Path) -> Iterator[dict[str, Any]]:
    try:
        with open(file, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash mid-write
                if isinstance(entry, dict):
                    yield entry
    except OSError:
        return  # rotated away while reading


class HistoryResource(resource.Resource):
    """``GET /history?limit=N&takeover=SLOT/EPOCH``: the node's history, oldest first."""

    isLeaf = True

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def render_GET(self, request: Request) -> bytes:
        args = request.args or {}

        def arg(name: bytes) -> str | None:
            values = args.get(name)
            return values[0].decode(errors="replace") if values else None

        try:
            limit = int(arg(b"limit") or 200)
            since = float(arg(b"since")) if arg(b"since") else None
        except ValueError:
            request.setResponseCode(400)
            return b'{"error": "limit and since must be numbers"}\n'
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        entries = read_history(self.path, limit=max(1, min(limit, 100_000)), since=since,
                               takeover=arg(b"takeover"))
        return json.dumps(entries, default=str).encode() + b"\n"
