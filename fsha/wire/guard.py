"""The pipe between fsha and its guard (:mod:`fsha.guard`): one ASCII line per message.

fsha writes to the guard's stdin, the guard to its stdout (``docs/protocol/guard.rst``)::

    fsha -> guard   HELLO <json>                     the guard's settings (first line)
                    HOLD <slot> <lease> <deadline>   keep slot (index) under lease number
                                                     <lease> (one per claim) until the
                                                     deadline, CLOCK_MONOTONIC nanoseconds
                    FREE <slot>                      fsha released the slot itself
                    RECONCILE <id>                   make FreeSWITCH and the addresses match
                                                     a node that holds nothing (start-up)
    guard -> fsha   READY <pid>
                    DROPPED <slot> <lease> <json>    the guard released the slot (lease out)
                    RECONCILED <id> <json>           what the reconciliation removed

End of file on the guard's stdin is fsha gone: every slot held is dropped at once.
Decoders raise only :class:`GuardProtocolError`; a line is at most :data:`MAX_LINE` bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_LINE",
    "Dropped",
    "Free",
    "GuardProtocolError",
    "Hello",
    "Hold",
    "LineBuffer",
    "Ready",
    "Reconcile",
    "Reconciled",
    "decode",
    "encode",
]

MAX_LINE = 1 << 20  # a HELLO carries every slot's addresses and profiles


class GuardProtocolError(Exception):
    """A line that is not a guard message."""


@dataclass(frozen=True, slots=True)
class Hello:
    settings: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Hold:
    slot: int
    lease: int
    deadline_ns: int


@dataclass(frozen=True, slots=True)
class Free:
    slot: int


@dataclass(frozen=True, slots=True)
class Reconcile:
    request: int


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int


@dataclass(frozen=True, slots=True)
class Dropped:
    slot: int
    lease: int
    report: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reconciled:
    request: int
    report: dict[str, Any]


Message = Hello | Hold | Free | Reconcile | Ready | Dropped | Reconciled


def _json(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=True)


def encode(message: Message) -> bytes:
    """One line, newline included."""
    if isinstance(message, Hello):
        text = "HELLO " + _json(message.settings)
    elif isinstance(message, Hold):
        text = f"HOLD {message.slot:d} {message.lease:d} {message.deadline_ns:d}"
    elif isinstance(message, Free):
        text = f"FREE {message.slot:d}"
    elif isinstance(message, Reconcile):
        text = f"RECONCILE {message.request:d}"
    elif isinstance(message, Ready):
        text = f"READY {message.pid:d}"
    elif isinstance(message, Dropped):
        text = f"DROPPED {message.slot:d} {message.lease:d} {_json(message.report)}"
    elif isinstance(message, Reconciled):
        text = f"RECONCILED {message.request:d} {_json(message.report)}"
    else:
        raise TypeError(f"not a guard message: {message!r}")
    return text.encode("ascii") + b"\n"


def _int(text: str, what: str) -> int:
    if not text.isdigit() or len(text) > 20:
        raise GuardProtocolError(f"{what}: not a non-negative integer: {text[:40]!r}")
    return int(text)


def _object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise GuardProtocolError(f"{what}: bad JSON: {e}") from None
    if not isinstance(value, dict):
        raise GuardProtocolError(f"{what}: JSON object expected")
    return value


def decode(line: bytes) -> Message:
    """One line (without or with its newline)."""
    try:
        text = line.rstrip(b"\r\n").decode("ascii")
    except UnicodeDecodeError:
        raise GuardProtocolError("not ASCII") from None
    verb, _, rest = text.partition(" ")
    if verb == "HELLO":
        return Hello(_object(rest, "HELLO"))
    if verb in ("DROPPED", "RECONCILED"):
        parts = rest.split(" ", 2 if verb == "DROPPED" else 1)
        if len(parts) != (3 if verb == "DROPPED" else 2):
            raise GuardProtocolError(f"{verb}: wrong number of fields")
        if verb == "DROPPED":
            return Dropped(_int(parts[0], "slot"), _int(parts[1], "lease"),
                           _object(parts[2], verb))
        return Reconciled(_int(parts[0], "request"), _object(parts[1], verb))
    fields = rest.split(" ") if rest else []
    expected = {"HOLD": 3, "FREE": 1, "RECONCILE": 1, "READY": 1}.get(verb)
    if expected is None:
        raise GuardProtocolError(f"unknown message {verb[:20]!r}")
    if len(fields) != expected:
        raise GuardProtocolError(f"{verb}: {expected} field(s) expected, got {len(fields)}")
    if verb == "HOLD":
        return Hold(_int(fields[0], "slot"), _int(fields[1], "lease"),
                    _int(fields[2], "deadline"))
    if verb == "FREE":
        return Free(_int(fields[0], "slot"))
    if verb == "RECONCILE":
        return Reconcile(_int(fields[0], "request"))
    return Ready(_int(fields[0], "pid"))


class LineBuffer:
    """Splits a byte stream into lines; a line longer than :data:`MAX_LINE` is an error."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > self.max_line or any(len(line) > self.max_line for line in lines):
            self._buffer = b""
            raise GuardProtocolError(f"line longer than {self.max_line} bytes")
        return lines
