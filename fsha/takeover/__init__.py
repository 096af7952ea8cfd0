"""What owning a slot means for this node: the timed, rolled-back takeover sequence.

:class:`SlotEffects` (``effects``) implements ``fsha.node.SlotOwner``: the node calls
``acquire`` when it claims a slot and ``release`` when it gives the slot up or rolls back a
failed claim. Every step has its own timeout (``timeouts``) and its duration, outcome and
counts are recorded in a :class:`TakeoverReport` (``report``); the dead master's rows come
from a :class:`SlotRecords` (``records``). docs/takeover.rst specifies every step.
"""

from fsha.takeover.effects import (
    REGISTRATION_PAGE,
    STOP_RETRIES,
    STOP_UNANSWERED_INTERVAL,
    STOP_UNANSWERED_RETRIES,
    SlotEffects,
)
from fsha.takeover.records import RECORDS_CHUNK, NoRecords, ReplicatedRecords, SlotRecords
from fsha.takeover.report import (
    FAILED,
    OK,
    SKIPPED,
    WARNING,
    StepResult,
    TakeoverReport,
    TakeoverStepError,
)
from fsha.takeover.timeouts import PROFILE_GUARD_SECONDS, TakeoverTimeouts, fence_bound

__all__ = [
    "FAILED",
    "OK",
    "PROFILE_GUARD_SECONDS",
    "RECORDS_CHUNK",
    "REGISTRATION_PAGE",
    "SKIPPED",
    "STOP_RETRIES",
    "STOP_UNANSWERED_INTERVAL",
    "STOP_UNANSWERED_RETRIES",
    "WARNING",
    "NoRecords",
    "ReplicatedRecords",
    "SlotEffects",
    "SlotRecords",
    "StepResult",
    "TakeoverReport",
    "TakeoverStepError",
    "TakeoverTimeouts",
    "fence_bound",
]
