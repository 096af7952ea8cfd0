"""What a takeover reports: per step, its outcome, duration and counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OK = "ok"
WARNING = "warning"  # done, with something to look at (counts differ, a part failed)
FAILED = "failed"
SKIPPED = "skipped"


class TakeoverStepError(Exception):
    """A fatal step of the acquire sequence failed (the node rolls back)."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason



@dataclass(slots=True)
class StepResult:
    name: str
    outcome: str  # OK, WARNING, FAILED, SKIPPED
    ms: float
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # what failed, or the warning

    @property
    def ok(self) -> bool:
        return self.outcome != FAILED

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "outcome": self.outcome, "ms": round(self.ms, 3),
                "counts": dict(self.counts), "error": self.error}


@dataclass(slots=True)
class TakeoverReport:
    """One acquire or release of a slot: per step, name, duration, outcome and counts."""

    action: str  # "acquire" | "release"
    slot: str
    epoch: int
    previous: str | None  # the dead master (acquire)
    started: float  # clock time
    steps: list[StepResult] = field(default_factory=list)
    ok: bool = True
    error: str | None = None
    total_ms: float = 0.0
    finished: bool = False
    handover: bool = False  # acquire: the previous master handed the slot over itself

    def step(self, name: str) -> StepResult | None:
        for s in self.steps:
            if s.name == name:
                return s
        return None

    @property
    def warnings(self) -> list[str]:
        return [f"{s.name}: {s.error}" for s in self.steps if s.outcome == WARNING]

    def count(self, step: str, name: str, default: int = 0) -> int:
        s = self.step(step)
        return s.counts.get(name, default) if s is not None else default

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "slot": self.slot, "epoch": self.epoch,
                "previous": self.previous, "ok": self.ok, "error": self.error,
                "total_ms": round(self.total_ms, 3),
                "steps": [s.as_dict() for s in self.steps]}

    def as_event(self) -> dict[str, Any]:
        """A compact form for the node's event list and the demo's timeline."""
        event: dict[str, Any] = {
            "action": self.action, "slot": self.slot, "epoch": self.epoch, "ok": self.ok,
            "total_ms": round(self.total_ms, 1),
            "steps_ms": {s.name: round(s.ms, 1) for s in self.steps}}
        if self.action == "acquire":
            # the first batches are written by recovery_rows, the others by recover
            event.update(calls_written=self.count("recovery_rows", "written")
                         + self.count("recover", "written"),
                         calls_recovered=self.count("recover", "recovered"),
                         registrations_restored=self.count("registrations", "written"))
            first = self.step("recover")
            if first is not None and "first_call_ms" in first.counts:
                # from the acquire's start to the first recovered batch (issue 16's goal)
                event["first_call_ms"] = first.counts["first_call_ms"]
        elif self.action == "rollback":
            rollback = self.step("rollback")
            if rollback is not None and "calls_left" in rollback.counts:
                # calls recovered by the cancelled attempt, left to the next one
                event["calls_left"] = rollback.counts["calls_left"]
        if self.error is not None:
            event["error"] = self.error
        warnings = self.warnings
        if warnings:
            event["warnings"] = warnings
        return event

    def summary(self) -> str:
        parts = []
        for s in self.steps:
            counts = ",".join(f"{k}={v}" for k, v in s.counts.items())
            parts.append(f"{s.name} {s.outcome} {s.ms:.1f}ms" + (f" [{counts}]" if counts
                                                                  else ""))
        return "; ".join(parts)
