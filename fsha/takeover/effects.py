"""The effects of owning a slot: :class:`SlotEffects`, the acquire and release sequences
(docs/takeover.rst specifies every step).

Why about 1,300 lines: the acquire steps, their rollback (release) and the deferred
profile stops share one object's state (the slot's pending stops, the standby flag, the
reports, the progress deadline); split by step, each part would reach into the others.
The report, the records and the timeouts live beside it in this package."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha.config import FencingConfig, NodeConfig, SlotConfig
from fsha.egress import EgressFence, FenceStatus
from fsha.eslclient import ESLError
from fsha.floating import FloatingIPBackend, FloatingIPError
from fsha.fsapi import ApiRunner, FSApi, FSApiError, ProfileNotFound, ProfileTooYoung, parse_status
from fsha.fsdb import (
    FOREIGN_RUNTIME_PREFIX,
    CoreDBError,
    CoreDBWriter,
    RecoveryRow,
    RegistrationRow,
)
from fsha.health import SELF_CHECK_MAX_AGE
from fsha.process import ProcessError, ProcessFailed, ProcessRunner, ProcessTimeout
from fsha.recovery import DEFAULT_RECOVER_BATCH, Batch, plan_batches
from fsha.takeover.records import EncodedRegistrations, NoRecords, SlotRecords
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

log = Logger(namespace="fsha.takeover")

STOP_RETRIES = 3
#: A stop FreeSWITCH did not answer (dead, hung, reconnecting) is tried again every
#: ``STOP_UNANSWERED_INTERVAL`` seconds, at most ``STOP_UNANSWERED_RETRIES`` times: a
#: FreeSWITCH back from a pause (SIGSTOP, a stall) still holds the profile and copies of
#: calls the successor now serves.
STOP_UNANSWERED_INTERVAL = 2.0
STOP_UNANSWERED_RETRIES = 30
#: registrations written per transaction (a few ms each; FreeSWITCH's own writers wait
#: behind it at most that long)
REGISTRATION_PAGE = 2000
_PLEASE_WAIT = re.compile(r"Please wait (\d+) second")




class _Step:
    """What a step function fills in as it goes (kept even if it then fails)."""

    __slots__ = ("_clock", "_on_progress", "aborted", "counts", "note", "outcome",
                 "progressed")

    def __init__(self, clock: IReactorTime,
                 on_progress: Callable[[float], object] | None = None) -> None:
        self.counts: dict[str, int] = {}
        self.note: str | None = None
        self.outcome = OK
        self.aborted: str | None = None  # "timed out after ..." / "cancelled"
        self.progressed: float | None = None  # clock time of the last progress()
        self._clock = clock
        self._on_progress = on_progress

    def progress(self) -> None:
        """Something got done (a batch recovered, rows written): the step's timeout counts
        from now (see :meth:`SlotEffects._step`)."""
        self.progressed = now = self._clock.seconds()
        if self._on_progress is not None:
            self._on_progress(now)

    def warn(self, note: str) -> None:
        self.outcome = WARNING
        self.note = note if self.note is None else f"{self.note}; {note}"

    def check(self) -> None:
        """Raise if the step was timed out or cancelled (for loops that go on)."""
        if self.aborted is not None:
            raise CancelledError(self.aborted)


class RecentStatus(Protocol):
    """The health probe's last ``status`` answer (``fsha.health.SwitchHealth``)."""

    def recent_status(self, max_age: float) -> tuple[float, str] | None: ...


#: The registrations a restore holds: a list, or replicated values decoded a page at a time.
MutableRows = list[RegistrationRow] | EncodedRegistrations


@dataclass(slots=True)
class _Restore:
    """A registration restore in progress: every page of rows first, then the hash
    entries in windows. Each page's hash entries are kept as text (``user@host<TAB>profile``
    lines) when the page is written, so that the rows themselves can go at once."""

    slot: SlotConfig
    #: a list, or the replicated values decoded a page at a time (EncodedRegistrations)
    regs: MutableRows
    hostname: str
    server_host: str
    hashing: bool  # the ``user@host -> profile`` hash entries are inserted too
    reg_pos: int = 0  # regs[:reg_pos] are written
    #: the hash entries of the pages written, not inserted yet: one text per page
    hash_todo: deque[str] = field(default_factory=deque)
    hash_page: list[str] = field(default_factory=list)  # the page being inserted: its lines
    written: int = 0
    hashed: int = 0
    hash_failed: int = 0
    invalid: int = 0  # registrations without a usable user@host key
    cancelled: bool = False
    total: int = 0  # registrations to restore in all (``regs`` loses the pages written)

    def __post_init__(self) -> None:
        self.total = len(self.regs)

    def drop_written(self) -> None:
        """Let the rows written so far go (their hash entries are kept apart): once the
        acquire is complete nothing is rolled back."""
        del self.regs[:self.reg_pos]
        self.reg_pos = 0

    def hashes_left(self) -> int:
        return len(self.hash_page) + sum(t.count("\n") + 1 for t in self.hash_todo) + (
            len(self.regs) - self.reg_pos if self.hashing else 0)

    @property
    def done(self) -> bool:
        return self.reg_pos >= len(self.regs) and not self.hash_page and not self.hash_todo


@dataclass(slots=True)
class _Acquisition:
    """What an acquire did so far, for its rollback."""

    slot: SlotConfig
    epoch: int = 0
    rows: list[RecoveryRow] = field(default_factory=list)
    registrations: Sequence[RegistrationRow] = field(default_factory=list)
    hostname: str = ""
    hash_keys: list[str] = field(default_factory=list)
    restore: _Restore | None = None  # registrations left for after the acquire
    complete: bool = False
    cancelled: bool = False
    current: _Step | None = None  # the step running now
    started: float = 0.0  # clock time the acquire began
    progressed: float = 0.0  # clock time of the last progress (a step ended, a batch done)
    plan: list[Batch] = field(default_factory=list)  # the recovery batches (fsha.recovery)
    batches_written: int = 0  # plan[:batches_written] are in the core DB
    committed: bool = False  # calls are live here: later failures are warnings, no rollback
    recovered: int = 0  # calls recovered so far (a rollback after commit ends them silently)


def _reason(failure: Failure, timeout: float | None = None) -> str:
    if failure.check(defer.TimeoutError) and timeout is not None:
        return f"timed out after {timeout:g} s"
    if failure.check(CancelledError):
        return "cancelled"
    return failure.getErrorMessage() or failure.type.__name__  # type: ignore[union-attr]


@dataclass(frozen=True, slots=True)
class EffectsStats:
    """The slot effects' figures: the ``takeover`` status section (:meth:`as_status`) and
    the ``fsha_takeover_*`` gauges (``fsha.metrics``) are both made from this."""

    last_report: dict[str, Any] | None
    pending_profile_stops: list[int]  # slots whose profile stop is being retried
    profiles_stopping: list[str]  # stops issued, their UNPUBLISH not seen yet
    global_standby: bool

    def as_status(self) -> dict[str, Any]:
        return {"last_report": self.last_report,
                "pending_profile_stops": list(self.pending_profile_stops),
                "profiles_stopping": list(self.profiles_stopping),
                "global_standby": self.global_standby}


class SlotEffects:
    """The effects of owning a slot (``fsha.node.SlotOwner``); see the module docstring.

    ``floating``: the floating-IP backend. ``clock``: the reactor's clock (required: library
    code never reaches the global reactor). ``esl``: the node's ESL client (None: only the
    floating IPs are handled, and the report says the FreeSWITCH steps were skipped).
    ``db``: the writer of the local core DB (None: calls and registrations are not
    restored, a warning). ``records``: where the dead master's rows come from (default:
    none). ``hash_realm``: the realm of the registration hash entries (None: none).
    ``fencing``: the ``[fencing]`` config (None: no fence step), its command run through
    ``runner`` (default: a :class:`~fsha.process.ProcessRunner` on ``clock``, which must
    then be a reactor). ``me``: this node, never fenced.
    ``hot_standby``: the slot's profiles run on every node (``[takeover] profiles``): an
    acquire checks ``egress`` (the fence, required then) and starts no profile, a release
    hangs up the calls and leaves the profiles running. ``health``: where the self-check
    reads the health probe's last ``status`` answer (``fsha.health.SwitchHealth``; None,
    or no answer recent enough: it asks FreeSWITCH itself).
    """

    def __init__(self, floating: FloatingIPBackend, clock: IReactorTime, *,
                 esl: ApiRunner | None = None, db: CoreDBWriter | None = None,
                 records: SlotRecords | None = None,
                 timeouts: TakeoverTimeouts | None = None,
                 hash_realm: str | None = "fsha_reg", hash_window: int = 64,
                 history: int = 20, fencing: FencingConfig | None = None,
                 runner: ProcessRunner | None = None, me: NodeConfig | None = None,
                 recover_batch: int = DEFAULT_RECOVER_BATCH, hot_standby: bool = False,
                 egress: EgressFence | None = None,
                 health: RecentStatus | None = None) -> None:
        if hot_standby and egress is None:
            raise ValueError("hot standby profiles need an egress fence")
        self.hot_standby = hot_standby
        self.egress = egress
        self.health = health
        if fencing is not None and runner is None:
            runner = ProcessRunner(clock)  # type: ignore[arg-type]  # then clock is a reactor
        self.fencing = fencing
        self.runner = runner
        self.me = me
        self.floating = floating
        self.clock = clock
        self.esl = esl
        self.api = FSApi(esl) if esl is not None else None
        self.db = db
        self.records: SlotRecords = records if records is not None else NoRecords()
        self.timeouts = timeouts or TakeoverTimeouts()
        self.hash_realm = hash_realm
        self.hash_window = max(1, hash_window)
        self.recover_batch = max(1, recover_batch)
        self.reports: deque[TakeoverReport] = deque(maxlen=history)
        self.last_report: TakeoverReport | None = None
        self._listeners: list[Callable[[TakeoverReport], object]] = []
        self._step_listeners: list[Callable[[TakeoverReport, StepResult], object]] = []
        self._acquisitions: dict[int, _Acquisition] = {}
        self._stop_retries: dict[int, IDelayedCall] = {}
        self._retries_running = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._standby_on = False
        # profile -> fires at its UNPUBLISH (the stop this node issued is complete)
        self._stopping: dict[str, Deferred[None]] = {}
        self._stop_times: dict[str, float] = {}  # profile -> when its stop was accepted
        self._stop_events = False
        self._restores: dict[int, _Restore] = {}  # slot -> registrations still restoring
        add_listener = getattr(esl, "add_event_listener", None)
        subscribe = getattr(esl, "subscribe", None)
        if add_listener is not None and subscribe is not None:
            add_listener(self._profile_unpublished, "UNPUBLISH")
            self._stop_events = True
            defer.maybeDeferred(subscribe, "UNPUBLISH").addErrback(
                lambda f: log.warn("subscribing to UNPUBLISH failed: {error}",
                                   error=f.getErrorMessage()))

    # -- reporting --------------------------------------------------------------------------

    def add_report_listener(self, listener: Callable[[TakeoverReport], object]) -> None:
        """Called with every finished report (acquire and release)."""
        self._listeners.append(listener)

    def add_step_listener(self, listener: Callable[[TakeoverReport, StepResult], object]
                          ) -> None:
        """Called as each step ends (also skipped ones), while the sequence goes on: the
        live account of a takeover (``fsha::takeover-step`` events)."""
        self._step_listeners.append(listener)

    def _record(self, report: TakeoverReport, result: StepResult) -> None:
        report.steps.append(result)
        for listener in list(self._step_listeners):
            try:
                listener(report, result)
            except Exception:
                log.failure("takeover step listener failed")

    def claim_progress(self, slot: SlotConfig) -> float | None:
        """Clock time of the last progress of the acquisition of ``slot`` (a step ended, a
        recovery batch done), None if none runs. The node's claim timeout counts from it:
        a takeover that keeps recovering batches is not cut short (see fsha.node)."""
        acq = self._acquisitions.get(slot.slot_id)
        if acq is None or acq.complete:
            return None
        return acq.progressed

    def stats(self) -> EffectsStats:
        return EffectsStats(
            last_report=self.last_report.as_dict() if self.last_report else None,
            pending_profile_stops=sorted(self._stop_retries),
            profiles_stopping=sorted(self._stopping), global_standby=self._standby_on)

    def status(self) -> dict[str, Any]:
        return self.stats().as_status()

    def _profile_unpublished(self, event: Any) -> None:
        """UNPUBLISH (sofia's profile thread ended): a stop issued here is complete."""
        profile = event.get("profile_name")
        if profile is None:
            return
        d = self._stopping.pop(profile, None)
        self._stop_times.pop(profile, None)
        if d is not None and not d.called:
            log.info("profile {profile} stopped (UNPUBLISH)", profile=profile)
            d.callback(None)

    def stop_issued(self, profile: str) -> None:
        """``sofia profile P stop`` was accepted (by a release here, or by the guard's
        start-up reconciliation): a later start waits for its UNPUBLISH."""
        if not self._stop_events:
            return
        old = self._stopping.get(profile)
        if old is None or old.called:
            self._stopping[profile] = Deferred()
        self._stop_times[profile] = self.clock.seconds()

    def _stops_pending(self, slot: SlotConfig) -> dict[str, float]:
        """The slot's profiles still stopping -> seconds left to wait for their UNPUBLISH
        (a stop older than ``stop_settle`` is forgotten: its UNPUBLISH was missed)."""
        now, settle = self.clock.seconds(), self.timeouts.stop_settle
        left: dict[str, float] = {}
        for p in slot.profiles:
            if p not in self._stopping:
                continue
            remaining = settle - (now - self._stop_times.get(p, now))
            if remaining > 0:
                left[p] = remaining
            else:
                del self._stopping[p]
                self._stop_times.pop(p, None)
        return left

    def _publish(self, report: TakeoverReport) -> None:
        report.finished = True
        self.last_report = report
        self.reports.append(report)
        if report.ok:
            log.info("{action} of slot {slot} (epoch {epoch}) done in {ms:.1f} ms: {steps}",
                     action=report.action, slot=report.slot, epoch=report.epoch,
                     ms=report.total_ms, steps=report.summary())
        else:
            log.error("{action} of slot {slot} (epoch {epoch}) failed after {ms:.1f} ms: "
                      "{error}; {steps}", action=report.action, slot=report.slot,
                      epoch=report.epoch, ms=report.total_ms, error=report.error,
                      steps=report.summary())
        for listener in list(self._listeners):
            try:
                listener(report)
            except Exception:
                log.failure("takeover report listener failed")

    def _step(self, report: TakeoverReport, name: str,
              fn: Callable[[_Step], Any], timeout: float, fatal: bool = True,
              acq: _Acquisition | None = None) -> Deferred[Any]:
        """Run one step with its own timeout and record it. A failure of a fatal step
        raises :class:`TakeoverStepError`; of another one, it is recorded and the result
        is None. A step that ends after its timeout or after the acquisition was cancelled
        counts as failed whatever it returned (some Deferreds turn a cancellation into a
        result), and a cancelled acquisition goes no further.

        The timeout follows progress: a step that reports progress (``step.progress()``,
        e.g. after each recovery batch) is given ``timeout`` again from then on, so a long
        step that keeps moving is never cut by a fixed bound, and one that stalls for
        ``timeout`` is."""
        start = self.clock.seconds()

        def progressed(now: float) -> None:
            if acq is not None:
                acq.progressed = now

        step = _Step(self.clock, progressed)
        if acq is not None:
            if acq.cancelled:
                raise TakeoverStepError(name, "cancelled")
            acq.current = step
        d = defer.maybeDeferred(fn, step)

        def expire() -> None:
            now = self.clock.seconds()
            last = step.progressed
            if last is not None and now - last < timeout:
                timer[0] = self.clock.callLater(last + timeout - now, expire)
                return
            step.aborted = (f"timed out after {timeout:g} s" if last is None else
                            f"no progress for {timeout:g} s")
            d.cancel()

        timer = [self.clock.callLater(timeout, expire)]

        def ended(result: object) -> object:
            if timer[0].active():
                timer[0].cancel()
            if acq is not None:
                acq.current = None
                acq.progressed = self.clock.seconds()
            if step.aborted is not None and not isinstance(result, Failure):
                return Failure(CancelledError(step.aborted))
            return result

        def done(value: Any) -> Any:
            ms = (self.clock.seconds() - start) * 1000
            self._record(report, StepResult(name, step.outcome, ms, step.counts, step.note))
            if step.outcome == WARNING:
                log.warn("slot {slot} {action} step {step}: {note} ({ms:.1f} ms)",
                         slot=report.slot, action=report.action, step=name, note=step.note,
                         ms=ms)
            return value

        def failed(failure: Failure) -> Any:
            ms = (self.clock.seconds() - start) * 1000
            reason = step.aborted or _reason(failure)
            error = reason if step.note is None else f"{reason} ({step.note})"
            self._record(report, StepResult(name, FAILED, ms, step.counts, error))
            if step.aborted is None and not failure.check(
                    FSApiError, TakeoverStepError, CancelledError) and not _expected(failure):
                log.failure("slot {slot} {action} step {step} failed", failure,
                            slot=report.slot, action=report.action, step=name)
            else:
                log.warn("slot {slot} {action} step {step} failed after {ms:.1f} ms: "
                         "{reason}", slot=report.slot, action=report.action, step=name,
                         ms=ms, reason=reason)
            if fatal or (acq is not None and acq.cancelled):
                raise TakeoverStepError(name, reason)
            return None

        return d.addBoth(ended).addCallbacks(done, failed)

    # -- acquire ----------------------------------------------------------------------------

    def acquire(self, slot: SlotConfig, epoch: int, previous: NodeConfig | None, *,
                fence: bool = True, claimers: Sequence[NodeConfig] = ()) -> Deferred[None]:
        """Take ``slot`` over from ``previous`` (None: a fresh claim). ``fence=False``: the
        previous master handed the slot over itself (switchover, SIGTERM): not fenced.
        ``claimers``: nodes that died claiming the slot (they may hold its floating IPs
        and profiles): fenced too, in the same step."""
        self._cancel_stop_retry(slot)
        report = TakeoverReport("acquire", slot.name, epoch,
                                previous.name if previous is not None else None,
                                self.clock.seconds(), handover=previous is not None and not fence)
        acq = _Acquisition(slot, epoch, started=report.started, progressed=report.started)
        self._acquisitions[slot.slot_id] = acq
        log.info("acquiring slot {slot} (epoch {epoch}, previous master {previous})",
                 slot=slot.name, epoch=epoch, previous=report.previous or "none")
        inner = self._acquire(slot, previous, report, acq, fence, tuple(claimers))

        def cancel(_: Deferred[None]) -> None:
            # The node gave up (claim timeout, or it lost the slot): stop at once. It
            # calls release() next, which rolls back what was done.
            acq.cancelled = True
            if acq.current is not None:
                acq.current.aborted = "cancelled"
            inner.cancel()

        outer: Deferred[None] = Deferred(cancel)

        def finish(result: object) -> None:
            report.total_ms = (self.clock.seconds() - report.started) * 1000
            if not isinstance(result, Failure) and acq.cancelled:
                result = Failure(CancelledError("cancelled"))  # too late: the node gave up
            if isinstance(result, Failure):
                report.ok = False
                report.error = _reason(result)
            else:
                acq.complete = True
                # After a completed acquisition nothing is rolled back: let the copies of
                # the dead master's rows go (10,000 calls + 100,000 registrations are
                # tens of MB, held until the next release otherwise).
                acq.rows, acq.plan, acq.registrations, acq.hash_keys = [], [], [], []
                if acq.restore is not None:
                    self._continue_restore(slot, acq.restore)
            self._publish(report)
            if not outer.called:
                outer.callback(result)

        inner.addBoth(finish).addErrback(
            lambda f: log.failure("acquire bookkeeping failed", f))
        return outer

    @inlineCallbacks
    def _acquire(self, slot: SlotConfig, previous: NodeConfig | None,
                 report: TakeoverReport, acq: _Acquisition, fence: bool,
                 claimers: tuple[NodeConfig, ...] = ()) -> Generator[Any, Any, None]:
        t = self.timeouts
        if self.esl is None:
            self._record(report, StepResult("self_check", SKIPPED, 0.0, {},
                                            "no FreeSWITCH connection configured"))
        else:
            yield self._step(report, "self_check", self._self_check, t.self_check, acq=acq)
        # the egress fence is read beside the first steps, off the critical path; its
        # answer is awaited before the first recover (a Deferred that never fails)
        egress = self._read_egress() if self.egress is not None else None
        skip = self._fence_skipped(previous, fence)
        targets = [] if skip is not None else [previous]
        if self.fencing is not None:
            targets += [c for c in claimers if c not in targets
                        and (self.me is None or c.node_id != self.me.node_id)]
        if not targets:
            self._record(report, StepResult("fence", SKIPPED, 0.0, {}, skip))
        else:
            assert self.fencing is not None
            yield self._step(report, "fence", lambda s: self._fence_all(targets, s),
                             self._fence_timeout(), fatal=self.fencing.required, acq=acq)


        def ips_up(step: _Step) -> Deferred[None]:
            step.counts["ips"] = len(slot.ips)
            return self.floating.up(slot.name, slot.ips)

        yield self._step(report, "floating_ips", ips_up, t.floating, acq=acq)
        if self.api is None:
            self._record(report, StepResult("freeswitch", SKIPPED, 0.0, {},
                                            "no FreeSWITCH connection configured"))
            return
        # The client's first answer needs the addresses and the slot's profiles running on
        # them, nothing more: the profiles come next, the calls' rows after them (the
        # calls are recovered with the recover step, whatever runs before it). A failure
        # from here on is rolled back like any other: addresses down first, so nothing
        # leaves from them; the replicated records stay for the next candidate.
        n = len(slot.profiles)
        settle = max(self._stops_pending(slot).values(), default=0.0)
        standby = t.esl if self._standby_on else 0.0  # global standby off first
        yield self._step(report, "profiles", lambda s: self._start_profiles(slot, s),
                         t.esl * n + t.confirm + settle + standby, acq=acq)
        calls, regs = yield self._step(
            report, "records", lambda s: self._load(slot, previous, s), t.records, acq=acq)
        yield self._step(
            report, "recovery_rows", lambda s: self._write_rows(slot, calls, acq, s),
            t.esl + t.db, acq=acq)
        calls = []  # the plan holds the rows now (each batch's let go once recovered)
        if egress is not None:
            yield self._step(report, "egress", lambda s: self._check_egress(slot, s, egress),
                             t.floating, acq=acq)
        # Each batch has its own bounds (t.db to write it, t.recover to recover it); the
        # step's own timeout only backs them up, counted from the last batch done.
        yield self._step(report, "recover", lambda s: self._recover(slot, acq, s),
                         t.db + t.recover + t.esl, acq=acq)
        yield self._step(report, "registrations",
                         lambda s: self._restore_registrations(slot, regs, acq, s),
                         t.registrations, fatal=False, acq=acq)

    def _read_egress(self) -> Deferred[FenceStatus]:
        """The fence read back from the host (a firewall reload may have flushed it since
        start-up); a failure becomes a status, so an answer nobody waits for any more (an
        acquire that failed first) is no unhandled error."""
        assert self.egress is not None
        d = defer.maybeDeferred(self.egress.check)
        answer: Deferred[FenceStatus] = Deferred()

        def arrived(result: object) -> None:
            if isinstance(result, Failure):
                result = FenceStatus(False, problem=f"reading it failed: {_reason(result)}")
            if not answer.called:
                answer.callback(result)

        d.addBoth(arrived)
        return answer

    def _check_egress(self, slot: SlotConfig, step: _Step, pending: Deferred[FenceStatus]
                      ) -> Deferred[None]:
        """The fence covers the slot's addresses."""
        d = pending

        def check(status: Any) -> None:
            step.counts.update(fenced=len(status.fenced), dropped=status.dropped)
            missing = [ip.address for ip in slot.ips if ip.address not in status.fenced]
            if missing:
                raise TakeoverStepError(
                    "egress", f"no egress fence for {', '.join(missing)}: "
                    f"{status.problem or 'not covered'} (fsha installs it at start-up)")

        return d.addCallback(check)

    def _self_check(self, step: _Step) -> Deferred[None]:
        """FreeSWITCH says ``is ready``: in the health probe's last answer if it is at most
        :data:`~fsha.health.SELF_CHECK_MAX_AGE` old (no round trip on the way to the
        first answer; count ``answer_age_ms``), else in an ``api status`` of its own."""
        assert self.esl is not None
        recent = self.health.recent_status(SELF_CHECK_MAX_AGE) \
            if self.health is not None else None
        if recent is not None:
            step.counts["answer_age_ms"] = round(recent[0] * 1000)
            d: Deferred[str] = defer.succeed(recent[1])
        else:
            d = self.esl.api("status", timeout=self.timeouts.self_check)

        def check(output: str) -> None:
            status = parse_status("status", output)
            if status.sessions is not None:
                step.counts["sessions"] = status.sessions
            if not status.ready:
                lines = [line.strip() for line in output.splitlines() if "ready" in line]
                said = lines[0] if lines else output.strip().split("\n", 1)[0]
                raise FSApiError("status", output, f"FreeSWITCH is not ready: {said[:120]!r}")

        return d.addCallback(check)

    def _fence_skipped(self, previous: NodeConfig | None, fence: bool) -> str | None:
        """Why the fence step is skipped, or None to run it."""
        if self.fencing is None:
            return "no fencing command configured"
        if previous is None:
            return "no previous master (fresh claim)"
        if not fence:
            return f"{previous.name} handed the slot over itself"
        if self.me is not None and previous.node_id == self.me.node_id:
            return f"the previous master {previous.name} is this node"
        return None

    def _fence_timeout(self) -> float:
        if self.timeouts.fence > 0:
            return self.timeouts.fence
        assert self.fencing is not None and self.runner is not None
        return fence_bound(self.fencing.timeout, self.runner.kill_grace, self.runner.drain)

    def _fence_all(self, nodes: list[NodeConfig | None], step: _Step) -> Deferred[None]:
        """Fence every one of ``nodes`` at once; fails with the first failure."""
        fences = [self._fence(n, step) for n in nodes if n is not None]
        if len(fences) == 1:
            return fences[0]
        d = defer.DeferredList(fences, fireOnOneErrback=True, consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
        return d.addCallback(lambda _: None)

    def _fence(self, previous: NodeConfig, step: _Step) -> Deferred[None]:
        fencing, runner = self.fencing, self.runner
        assert fencing is not None and runner is not None
        argv = (*fencing.command, "fence", previous.name)
        log.info("fencing {node}: {argv}", node=previous.name, argv=" ".join(argv))
        d = defer.maybeDeferred(runner.run, argv, fencing.timeout)

        def done(result: Any) -> None:
            step.counts["exit_code"] = result.exit_code

        def failed(failure: Failure) -> Failure | None:
            result = getattr(failure.value, "result", None)
            if isinstance(failure.value, (ProcessFailed, ProcessTimeout)) and result is not None:
                step.counts["exit_code"] = result.exit_code  # -N: killed by signal N
            if fencing.required or not failure.check(ProcessError):
                return failure
            step.warn(f"{previous.name} not fenced ({failure.getErrorMessage()}); "
                      "takeover goes on ([fencing] required = false)")
            return None

        return d.addCallbacks(done, failed)

    def _load(self, slot: SlotConfig, previous: NodeConfig | None, step: _Step
              ) -> Deferred[tuple[list[RecoveryRow], MutableRows]]:
        d = defer.maybeDeferred(self.records.rows_for, slot, previous, step.progress)

        def select(rows: tuple[Sequence[RecoveryRow], Sequence[RegistrationRow]]
                   ) -> tuple[list[RecoveryRow], MutableRows]:
            all_calls, all_regs = rows
            profiles = set(slot.profiles)
            calls: dict[str, RecoveryRow] = {}
            for row in all_calls:
                if row.profile_name in profiles and row.technology == "sofia":
                    calls[row.uuid] = row
            now = self.clock.seconds()
            regs: MutableRows
            if isinstance(all_regs, EncodedRegistrations):
                regs = all_regs.select(profiles, now)  # not decoded: a page at a time later
            else:
                regs = [r for r in all_regs if r.profile_name in profiles
                        and (r.expires == 0 or r.expires > now)]
            step.counts.update(calls=len(calls), registrations=len(regs),
                               calls_skipped=len(all_calls) - len(calls),
                               registrations_skipped=len(all_regs) - len(regs))
            return list(calls.values()), regs

        return d.addCallback(select)

    @inlineCallbacks
    def _write_rows(self, slot: SlotConfig, calls: list[RecoveryRow], acq: _Acquisition,
                    step: _Step) -> Generator[Any, Any, None]:
        """The batches planned (:func:`fsha.recovery.plan_batches`) and the first batch of
        each profile written; the others are written by the ``recover`` step, one before
        each recover."""
        step.counts["rows"] = len(calls)
        if self.db is None:
            if calls:
                step.warn(f"no core_db configured: {len(calls)} call(s) cannot be recovered")
            return
        assert self.api is not None
        own = yield self.api.core_uuid()
        rows = [r if r.runtime_uuid != own else
                RecoveryRow(FOREIGN_RUNTIME_PREFIX + r.runtime_uuid, r.technology,
                            r.profile_name, r.hostname, r.uuid, r.metadata) for r in calls]
        # Rows of any other runtime are ghosts (this FreeSWITCH killed with calls earlier,
        # the slot failing back to it now): recover would re-INVITE calls long gone.
        wait = self.timeouts.db
        purge = self._db_call(self.db.purge_recovery(
            slot.profiles, {own, *(r.runtime_uuid for r in rows)}))
        purge.addTimeout(wait, self.clock)

        def timed_out(failure: Failure) -> None:
            failure.trap(defer.TimeoutError)
            raise CoreDBError(f"purging rows of earlier runtimes timed out after {wait:g} s")

        purged = yield purge.addErrback(timed_out)
        if purged:
            step.counts["purged"] = purged
            log.warn("slot {slot}: {n} recovery row(s) of earlier runtimes purged (ghosts)",
                     slot=slot.name, n=purged)
        if not calls:
            return
        mine = sum(1 for r in calls if r.runtime_uuid == own)
        if mine:
            step.warn(f"{mine} row(s) carried this FreeSWITCH's own core UUID; "
                      "written as foreign")
            step.counts["own_runtime"] = mine
        acq.plan = plan_batches(rows, slot.profiles, self.recover_batch)
        first = [b for b in acq.plan if b.round == 0]
        step.counts["batches"] = len(acq.plan)
        written = 0
        for batch in first:
            yield self._write_batch(batch, acq)
            written += len(batch.rows)
            step.counts["written"] = written
            step.progress()

    def _write_batch(self, batch: Batch, acq: _Acquisition) -> Deferred[Any]:
        """Write the next batch of the plan (``batch``) into the core DB, within
        ``timeouts.db``; recorded first, so an abandoned write is still rolled back."""
        assert self.db is not None
        # the keys only (the rollback deletes by uuid and runtime_uuid): not a second
        # reference to 10,000 calls' metadata
        acq.rows.extend(RecoveryRow(r.runtime_uuid, r.technology, r.profile_name,
                                    r.hostname, r.uuid, b"") for r in batch.rows)
        d = self._db_call(self.db.write_recovery(batch.rows, None))
        wait = self.timeouts.db
        d.addTimeout(wait, self.clock)

        def done(_: object) -> None:
            acq.batches_written += 1

        def timed_out(failure: Failure) -> None:
            failure.trap(defer.TimeoutError)
            raise CoreDBError(f"writing {len(batch.rows)} recovery rows timed out after "
                              f"{wait:g} s")

        return d.addCallbacks(done, timed_out)

    def _db_call(self, d: Deferred[Any]) -> Deferred[Any]:
        """``d`` (running on the DB thread) with a canceller that interrupts the query."""
        db = self.db

        def cancel(_: Deferred[Any]) -> None:
            if db is not None:
                db.interrupt()

        outer: Deferred[Any] = Deferred(cancel)

        def relay(result: object) -> None:
            if not outer.called:
                outer.callback(result)
            elif isinstance(result, Failure):
                log.debug("abandoned core DB operation ended: {error}",
                          error=result.getErrorMessage())

        d.addBoth(relay)
        return outer

    @inlineCallbacks
    def _start_profiles(self, slot: SlotConfig, step: _Step) -> Generator[Any, Any, None]:
        api = self.api
        assert api is not None
        if self.hot_standby:
            # running since boot, bound non-locally: the address just came up, the
            # profile answers at once (a start would stall about 1 s on a real switch)
            entries = yield api.sofia_status()
            running = {e.name: e for e in entries if e.running}
            if all(p in running for p in slot.profiles):
                step.counts["already_running"] = len(slot.profiles)
                return
            late = ("hot standby profile(s) not running, started now: "
                    + ", ".join(p for p in slot.profiles if p not in running))
        else:
            late = None
        if self._standby_on and not self._stop_retries and not self._retries_running:
            # this node paused its FreeSWITCH for a stop it no longer needs (the slot is
            # back before the 10 s were over): resume it, or it answers 503 for ever
            yield api.sofia_global_standby(False)
            self._standby_on = False
            step.counts["standby_off"] = 1
        pending = self._stops_pending(slot)
        waits = [self._stopping[p] for p in pending]
        warned: str | None = None
        if waits:
            # sofia frees a stopped profile's socket asynchronously; a start before its
            # UNPUBLISH answers success but the profile cannot bind for 17 s or more
            step.note = "waiting for the stop of " + ", ".join(pending)
            gate: Deferred[bool] = Deferred()

            def opened(value: bool) -> None:
                if not gate.called:
                    gate.callback(value)

            DeferredList(waits, consumeErrors=True).addCallback(lambda _: opened(True))
            timer = self.clock.callLater(max(pending.values()), opened, False)
            try:
                unpublished = yield gate
            finally:
                if timer.active():
                    timer.cancel()
            if not unpublished:
                warned = (f"no UNPUBLISH within {self.timeouts.stop_settle:g} s of the "
                          "stop; starting anyway")
            for p in slot.profiles:
                d = self._stopping.get(p)
                if d is not None and not d.called:
                    del self._stopping[p]
                self._stop_times.pop(p, None)
            step.counts["stops_waited"] = len(waits)
            step.note = None
        for profile in slot.profiles:
            yield api.sofia_profile(profile, "start")
        step.counts["profiles"] = len(slot.profiles)
        polls = 0
        while True:
            entries = yield api.sofia_status()
            polls += 1
            step.counts["status_polls"] = polls
            running = {e.name: e for e in entries if e.running}
            missing = [p for p in slot.profiles if p not in running]
            if not missing:
                break
            step.note = "not RUNNING in sofia status: " + ", ".join(missing)
            step.check()
            yield deferLater(self.clock, self.timeouts.poll, lambda: None)
        step.note = None
        if warned is not None:
            step.warn(warned)
        if late is not None:
            step.warn(late)
        addresses = {ip.address for ip in slot.ips}
        for profile in slot.profiles:
            if _url_host(running[profile].data) not in addresses:
                step.warn(f"profile {profile} runs on {running[profile].data}, not on "
                          "one of the slot's addresses")

    @inlineCallbacks
    def _recover(self, slot: SlotConfig, acq: _Acquisition, step: _Step
                 ) -> Generator[Any, Any, None]:
        """``sofia profile P recover`` after each batch is written (:mod:`fsha.recovery`).

        Each batch is bounded by itself (``timeouts.db`` to write it, ``timeouts.recover``
        for its recover), never by the slot's size. Until a batch has brought calls back a
        failure fails the step (the node rolls back; nothing is live here yet). From then
        on the calls are live on this FreeSWITCH: a failing or stalled batch ends the step
        with a *warning* naming what was not recovered, and the takeover completes, as a
        rollback would hang up every call already recovered."""
        api = self.api
        assert api is not None
        plan = acq.plan
        expected: dict[str, int] = dict.fromkeys(slot.profiles, 0)
        got: dict[str, int] = dict.fromkeys(slot.profiles, 0)
        for batch in plan:
            expected[batch.profile] += len(batch.rows)
        total = 0
        step.counts.update(expected=sum(expected.values()), recovered=0,
                           batches=len(plan), batches_done=0)
        if not plan:
            for profile in slot.profiles:  # also clears a standby left by a release
                yield api.sofia_profile_recover(profile, timeout=self.timeouts.recover)
            return
        stopped: str | None = None
        for i, batch in enumerate(plan):
            step.check()
            try:
                if i >= acq.batches_written:
                    yield self._write_batch(batch, acq)
                    step.counts["written"] = step.counts.get("written", 0) + len(batch.rows)
                    step.progress()
                n = yield api.sofia_profile_recover(batch.profile,
                                                    timeout=self.timeouts.recover)
            except CancelledError:
                raise
            except Exception as e:
                if not acq.committed:
                    raise
                reason = str(e) or type(e).__name__
                stopped = (f"batch {i + 1} of {len(plan)} ({batch.profile}, "
                           f"{len(batch.rows)} rows) failed: {reason}")
                break
            step.progress()
            # recovered: FreeSWITCH has the rows; their metadata (3-8 KB a call) can go
            plan[i] = Batch(batch.profile, (), batch.round)
            got[batch.profile] += n
            total += n
            acq.recovered = total
            step.counts.update(recovered=total, batches_done=i + 1)
            if n and not acq.committed:
                acq.committed = True
                step.counts["first_call_ms"] = round(
                    (self.clock.seconds() - acq.started) * 1000)
        problems = []
        if stopped is not None:
            left = sum(len(b.rows) for b in plan[i:])
            step.counts["not_recovered"] = left
            problems.append(f"{stopped}; {left} call(s) of this and the later batches not "
                            "recovered (calls already up are kept)")
        else:
            mismatches = [f"{p}: {got[p]} recovered, {expected[p]} written"
                          for p in slot.profiles if got[p] != expected[p]]
            if mismatches:
                problems.append("recovered count differs from rows written ("
                                + "; ".join(mismatches) + ")")
        if problems:
            step.warn("; ".join(problems))

    @inlineCallbacks
    def _restore_registrations(self, slot: SlotConfig, regs: MutableRows,
                               acq: _Acquisition, step: _Step) -> Generator[Any, Any, None]:
        """Registrations in pages of :data:`REGISTRATION_PAGE` rows (one short transaction
        each), then the hash entries in windows; what does not fit in this step's time
        (a large slot: the calls come first) is handed over to :meth:`_continue_restore`,
        which goes on once the slot is served, each page bounded on its own."""
        step.counts["registrations"] = len(regs)
        if not regs:
            return
        if self.db is None:
            step.warn(f"no core_db configured: {len(regs)} registration(s) not restored")
            return
        api = self.api
        assert api is not None
        hostname = yield api.global_getvar("switchname")
        if not hostname:
            hostname = yield api.global_getvar("hostname")
        if not hostname:
            raise FSApiError("global_getvar hostname", "", "FreeSWITCH has no hostname")
        hostname = hostname.strip()
        acq.registrations, acq.hostname = regs, hostname
        restore = _Restore(slot, regs, hostname, slot.ips[0].address if slot.ips else "",
                           self.hash_realm is not None)
        step.counts["written"] = 0
        # leave a margin of the step's bound for the last page in flight
        soft = self.clock.seconds() + self.timeouts.registrations * 0.6
        yield self._restore_pages(restore, acq, step, until=soft)
        if restore.invalid or restore.hash_failed:
            step.counts["hash_failed"] = restore.hash_failed + restore.invalid
            step.warn(f"{restore.hash_failed + restore.invalid} hash entr"
                      f"{'y' if restore.hash_failed + restore.invalid == 1 else 'ies'} "
                      f"not inserted ({restore.invalid} with unusable user@host)")
        if not restore.done:
            acq.restore = restore
            left = len(restore.regs) - restore.reg_pos
            hashes = restore.hashes_left()
            step.counts["continued"] = left + hashes
            step.warn(f"{left} registration(s) and {hashes} hash entries continue once the "
                      "slot is served")

    @staticmethod
    def _hash_entries(regs: Sequence[RegistrationRow]) -> tuple[list[tuple[str, str]], int]:
        """The ``user@host -> profile`` hash entries of these registrations (one per key:
        the last wins), and how many registrations have no usable key."""
        entries: dict[str, str] = {}
        invalid = 0
        for r in regs:
            key = f"{r.sip_user}@{r.sip_host}"
            if _hash_token(key) and "\n" not in r.profile_name and "\r" not in r.profile_name:
                entries[key] = r.profile_name
            else:
                invalid += 1
        return list(entries.items()), invalid

    @inlineCallbacks
    def _restore_pages(self, restore: _Restore, acq: _Acquisition | None,
                       step: _Step | None, until: float | None = None
                       ) -> Generator[Any, Any, None]:
        """Write ``restore``'s next pages until done (or past ``until``): every page of
        rows (one transaction each) first, then the hash entries in windows. Each page and
        each window is bounded by ``timeouts.registrations`` on its own (a stall fails,
        progress goes on).

        A page's hash entries are taken out as text when it is written, so a background
        restore lets the page's rows (the previous master's replicated values) go at once:
        kept until the hash entries were in, 70,000 of them sat beside the new master's
        own copies for half a minute, and the allocator kept that peak (issue 16)."""
        assert self.db is not None and self.api is not None
        api, bound = self.api, self.timeouts.registrations
        realm = self.hash_realm
        while not restore.done:
            if step is not None:
                step.check()
            if restore.cancelled or (until is not None and self.clock.seconds() > until):
                return
            if restore.reg_pos < len(restore.regs):
                page = restore.regs[restore.reg_pos:restore.reg_pos + REGISTRATION_PAGE]
                d = self._db_call(self.db.write_registrations(page, restore.hostname,
                                                               restore.server_host))
                n = yield d.addTimeout(bound, self.clock)
                restore.reg_pos += len(page)
                restore.written += n
                if restore.hashing:
                    entries, invalid = self._hash_entries(page)
                    restore.invalid += invalid
                    if entries:
                        restore.hash_todo.append("\n".join(f"{k}\t{v}" for k, v in entries))
                if step is not None:
                    step.counts["written"] = restore.written
            elif realm is not None:
                if not restore.hash_page:
                    restore.hash_page = restore.hash_todo.popleft().split("\n")
                # a window of entries; a key registered in two pages is inserted twice,
                # the later profile last
                lines = restore.hash_page[:self.hash_window]
                del restore.hash_page[:self.hash_window]
                chunk = [line.split("\t", 1) for line in lines]
                if acq is not None:
                    acq.hash_keys.extend(k for k, _ in chunk)
                d = DeferredList([api.hash_insert(realm, k, v) for k, v in chunk],
                                 consumeErrors=True)
                results = yield d.addTimeout(bound, self.clock)
                ok = sum(1 for success, _ in results if success)
                restore.hashed += ok
                restore.hash_failed += len(chunk) - ok
                if step is not None:
                    step.counts["hash_entries"] = restore.hashed
            if acq is None:
                restore.drop_written()

    def _continue_restore(self, slot: SlotConfig, restore: _Restore) -> None:
        """The rest of a large restore, after the acquire (the slot is served). Stopped by
        a release of the slot; each page bounded; the outcome is logged."""
        old = self._restores.pop(slot.slot_id, None)
        if old is not None:
            old.cancelled = True
        self._restores[slot.slot_id] = restore
        restore.drop_written()
        log.info("slot {slot}: restoring {n} more registration(s) in the background",
                 slot=slot.name, n=len(restore.regs) - restore.reg_pos)
        d = self._restore_pages(restore, None, None)

        def done(result: object) -> None:
            if self._restores.get(slot.slot_id) is restore:
                del self._restores[slot.slot_id]
            if isinstance(result, Failure):
                log.warn("slot {slot}: registration restore stopped after {n} of {total}: "
                         "{error}", slot=slot.name, n=restore.written,
                         total=restore.total,
                         error=_reason(result, self.timeouts.registrations))
            elif not restore.cancelled:
                log.info("slot {slot}: {n} registration(s) and {h} hash entries restored "
                         "in all", slot=slot.name, n=restore.written, h=restore.hashed)

        d.addBoth(done).addErrback(lambda f: log.failure("registration restore", f))

    # -- release ----------------------------------------------------------------------------

    def release(self, slot: SlotConfig) -> Deferred[None]:
        restore = self._restores.pop(slot.slot_id, None)
        if restore is not None:
            restore.cancelled = True  # the slot goes: its registrations are not ours
        acq = self._acquisitions.pop(slot.slot_id, None)
        action = "rollback" if acq is not None and not acq.complete else "release"
        report = TakeoverReport(action, slot.name, acq.epoch if acq is not None else 0, None,
                                self.clock.seconds())
        if acq is not None and not acq.complete and acq.committed:
            # The lease (or a better claim) won over calls already back here: they end
            # silently (addresses down first) and the previous master's replicated
            # records, which this release never touches, bring them back at the next
            # attempt (docs/design.rst, "A takeover cancelled after calls were recovered").
            log.warn("slot {slot}: rolling back a takeover that had recovered {n} call(s); "
                     "they end here with the addresses already down, and the next attempt "
                     "recovers them from the previous master's records", slot=slot.name,
                     n=acq.recovered)
        d = self._release(slot, acq, report)

        def finish(result: object) -> None:
            if isinstance(result, Failure):  # a bug: every step handles its own failures
                log.failure("release of slot {slot} failed", result, slot=slot.name)
                report.ok = False
                report.error = _reason(result)
            failed = [f"{s.name}: {s.error}" for s in report.steps if s.outcome == FAILED]
            if failed:
                report.ok = False
                report.error = report.error or "; ".join(failed)
            report.total_ms = (self.clock.seconds() - report.started) * 1000
            self._publish(report)

        d.addBoth(finish)
        return d

    @inlineCallbacks
    def _release(self, slot: SlotConfig, acq: _Acquisition | None, report: TakeoverReport
                 ) -> Generator[Any, Any, None]:
        t = self.timeouts

        def ips_down(step: _Step) -> Deferred[None]:
            step.counts["ips"] = len(slot.ips)
            return self.floating.down(slot.name, slot.ips)

        yield self._step(report, "floating_ips", ips_down, t.floating, fatal=False)
        if acq is not None and not acq.complete and acq.committed and \
                report.steps[-1].outcome == FAILED:
            # the lease wins all the same (the profile must stop serving), but say it
            log.error("slot {slot}: the addresses may still be up while {n} recovered "
                      "call(s) end: their BYEs may leave", slot=slot.name, n=acq.recovered)
        if self.api is not None and self.hot_standby:
            yield self._step(report, "profiles", lambda s: self._hangup_calls(slot, s),
                             t.esl * (len(slot.profiles) + 1), fatal=False)
        elif self.api is not None:
            yield self._step(report, "profiles", lambda s: self._stop_profiles(slot, s),
                             t.esl * (len(slot.profiles) + 1), fatal=False)
        if acq is not None and not acq.complete:
            yield self._step(report, "rollback", lambda s: self._rollback(acq, s),
                             t.db + t.esl, fatal=False)

    @inlineCallbacks
    def _hangup_calls(self, slot: SlotConfig, step: _Step) -> Generator[Any, Any, None]:
        """Hot standby: the slot's calls hung up, its profiles left running. The addresses
        are already down: the BYEs sofia sends for these calls cannot leave this host (the
        kernel refuses a source that is not local, and the egress fence drops it)."""
        api = self.api
        assert api is not None
        calls = hung = 0
        try:
            entries = yield api.sofia_status()
            calls = sum(e.sessions or 0 for e in entries
                        if e.running and e.name in slot.profiles)
        except FSApiError as e:
            step.warn(f"sofia status unreadable ({e}); hanging up anyway")
        for profile in slot.profiles:
            try:
                yield api.hupall("MANAGER_REQUEST", "sofia_profile_name", profile)
                hung += 1
            except FSApiError as e:
                step.warn(f"hupall of {profile}'s calls failed: {e}")
        step.counts.update(profiles=hung, calls=calls)

    @inlineCallbacks
    def _stop_profiles(self, slot: SlotConfig, step: _Step) -> Generator[Any, Any, None]:
        api = self.api
        assert api is not None
        stopped = not_running = 0
        young: list[tuple[str, float]] = []
        unanswered: list[str] = []
        reason = ""
        for profile in slot.profiles:
            try:
                yield api.sofia_profile(profile, "stop")
                self.stop_issued(profile)
                stopped += 1
            except ProfileNotFound:
                not_running += 1
            except ProfileTooYoung as e:
                m = _PLEASE_WAIT.search(e.output)
                young.append((profile, float(m.group(1)) if m else PROFILE_GUARD_SECONDS))
            except ESLError as e:
                unanswered.append(profile)
                reason = str(e) or type(e).__name__
        step.counts.update(stopped=stopped, not_running=not_running, too_young=len(young))
        if unanswered:
            # FreeSWITCH dead or hung: a hung one that comes back still serves the profile
            # (and copies of the calls the successor now has): stop it once it answers
            step.counts["unanswered"] = len(unanswered)
            if not young:
                self._schedule_stop_retry(slot, unanswered, STOP_UNANSWERED_INTERVAL, 1)
            step.warn(f"stop of {', '.join(unanswered)} not answered ({reason}); retried "
                      f"every {STOP_UNANSWERED_INTERVAL:g} s, at most "
                      f"{STOP_UNANSWERED_RETRIES} times")
        if young:
            # The successor recovers these calls: end the copies here now (the addresses
            # are already down, so their BYEs do not reach the callers), whatever becomes
            # of the stop itself (a SIGTERM may end this process before the retry).
            hung = 0
            for profile, _ in young:
                try:
                    yield api.hupall("MANAGER_REQUEST", "sofia_profile_name", profile)
                    hung += 1
                except FSApiError as e:
                    step.warn(f"hupall of {profile}'s calls failed: {e}")
            step.counts["calls_hung_up"] = hung
            yield api.sofia_global_standby(True)
            self._standby_on = True
            wait = max(w for _, w in young) + 0.5
            self._schedule_stop_retry(slot, [p for p, _ in young] + unanswered, wait, 1)
            step.warn(f"profile(s) {', '.join(p for p, _ in young)} started less than "
                      f"{PROFILE_GUARD_SECONDS:g} s ago: calls hung up, global standby on, "
                      f"stop retried in {wait:g} s")

    def stop(self) -> Deferred[None]:
        """The process is stopping: let the pending delayed profile stops run (a profile
        younger than 10 s left running would keep the slot's address:port and the global
        standby on with nothing to undo them), at most :meth:`TakeoverTimeouts.stop_budget`;
        then make sure global standby is off. Never fails."""
        if not self._stop_retries and not self._retries_running:
            return self._standby_off_at_exit()
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        d.addTimeout(self.timeouts.stop_budget(), self.clock)

        def gave_up(f: Failure) -> None:
            f.trap(defer.TimeoutError)
            log.warn("deferred profile stops not done in {s:g} s at exit",
                     s=self.timeouts.stop_budget())

        def cancel_rest(_: object) -> Deferred[None]:
            for slot_id, call in list(self._stop_retries.items()):
                if call.active():
                    call.cancel()
                del self._stop_retries[slot_id]
            return self._standby_off_at_exit()

        return d.addErrback(gave_up).addBoth(cancel_rest)

    def _standby_off_at_exit(self) -> Deferred[None]:
        if not self._standby_on or self.api is None:
            return defer.succeed(None)
        self._standby_on = False
        d = self.api.sofia_global_standby(False)
        d.addTimeout(self.timeouts.esl, self.clock)
        d.addErrback(lambda f: log.warn("sofia global standby off failed at exit: {error}",
                                        error=_reason(f, self.timeouts.esl)))
        return d.addCallback(lambda _: None)

    def _retries_idle(self) -> None:
        if self._stop_retries or self._retries_running:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    def _schedule_stop_retry(self, slot: SlotConfig, profiles: list[str], wait: float,
                             attempt: int) -> None:
        self._cancel_stop_retry(slot)
        self._stop_retries[slot.slot_id] = self.clock.callLater(
            wait, self._retry_stop, slot, profiles, attempt)

    def _cancel_stop_retry(self, slot: SlotConfig) -> None:
        call = self._stop_retries.pop(slot.slot_id, None)
        if call is not None and call.active():
            call.cancel()
            log.info("slot {slot}: pending profile stop cancelled", slot=slot.name)
        self._retries_idle()

    def _retry_stop(self, slot: SlotConfig, profiles: list[str], attempt: int) -> None:
        self._stop_retries.pop(slot.slot_id, None)
        self._retries_running += 1
        api = self.api
        assert api is not None
        young: list[str] = []
        waits: list[float] = []
        unanswered: list[str] = []

        @inlineCallbacks
        def run() -> Generator[Any, Any, None]:
            for profile in profiles:
                try:
                    yield api.sofia_profile(profile, "stop")
                    self.stop_issued(profile)
                    log.info("slot {slot}: profile {profile} stopped (delayed stop)",
                             slot=slot.name, profile=profile)
                except ProfileNotFound:
                    pass
                except ProfileTooYoung as e:
                    m = _PLEASE_WAIT.search(e.output)
                    young.append(profile)
                    waits.append(float(m.group(1)) if m else PROFILE_GUARD_SECONDS)
                except ESLError:
                    unanswered.append(profile)  # still dead or hung: once more later

        d = run()
        d.addTimeout(self.timeouts.esl * (len(profiles) + 1), self.clock)

        def done(result: object) -> Deferred[Any] | None:
            if isinstance(result, Failure):
                log.warn("slot {slot}: delayed stop of {profiles} failed: {error}",
                         slot=slot.name, profiles=",".join(profiles),
                         error=_reason(result, self.timeouts.esl))
            else:
                again = young + unanswered
                limit = STOP_UNANSWERED_RETRIES if unanswered else STOP_RETRIES
                if again and attempt < limit:
                    wait = max(waits) + 0.5 if young else STOP_UNANSWERED_INTERVAL
                    self._schedule_stop_retry(slot, again, wait, attempt + 1)
                    return None
                if unanswered:
                    log.error("slot {slot}: FreeSWITCH did not answer the stop of "
                              "{profiles} in {n} attempts; given up", slot=slot.name,
                              profiles=",".join(unanswered), n=attempt + 1)
                if young:
                    log.error("slot {slot}: profile(s) {profiles} still refuse to stop "
                              "after {n} attempts; left in standby", slot=slot.name,
                              profiles=",".join(young), n=attempt + 1)
            if self._standby_on and not self._stop_retries:
                self._standby_on = False
                off = api.sofia_global_standby(False)
                off.addTimeout(self.timeouts.esl, self.clock)
                return off.addErrback(
                    lambda f: log.warn("sofia global standby off failed: {error}",
                                       error=_reason(f, self.timeouts.esl)))
            return None

        def finished(_: object) -> None:
            self._retries_running -= 1
            self._retries_idle()

        d.addBoth(done)
        d.addErrback(lambda f: log.failure("delayed profile stop failed", f))
        d.addBoth(finished)

    @inlineCallbacks
    def _rollback(self, acq: _Acquisition, step: _Step) -> Generator[Any, Any, None]:
        """Undo this node's own writes (rows not recovered, registrations, hash entries).
        The replicated records the rows came from are not this release's to touch: the
        next candidate (or this node's next attempt) reads the same ones."""
        problems = []
        if acq.committed:
            step.counts["calls_left"] = acq.recovered
            problems.append(f"{acq.recovered} call(s) recovered here ended with the "
                            "addresses already down (no BYE leaves); the next attempt "
                            "recovers them from the previous master's records")
        if acq.rows and self.db is not None:
            try:
                n = yield self._db_call(self.db.delete_recovery(acq.rows))
                step.counts["rows_deleted"] = n
            except Exception as e:
                problems.append(f"recovery rows: {e}")
        if acq.registrations and self.db is not None:
            try:
                n = yield self._db_call(
                    self.db.delete_registrations(acq.registrations, acq.hostname))
                step.counts["registrations_deleted"] = n
            except Exception as e:
                problems.append(f"registrations: {e}")
        if acq.hash_keys and self.api is not None and self.hash_realm is not None:
            api = self.api
            deleted = 0
            for i in range(0, len(acq.hash_keys), self.hash_window):
                results = yield DeferredList(
                    [api.hash_delete(self.hash_realm, k)
                     for k in acq.hash_keys[i:i + self.hash_window]], consumeErrors=True)
                deleted += sum(1 for ok, found in results if ok and found)
                failed = sum(1 for ok, _ in results if not ok)
                if failed:
                    problems.append(f"{failed} hash delete(s) failed")
            step.counts["hash_deleted"] = deleted
        if problems:
            step.warn("; ".join(problems))


def _url_host(url: str) -> str:
    """The host of ``sip:mod_sofia@HOST:PORT`` (HOST may be ``[v6]``)."""
    host = url.rpartition("@")[2].split(";", 1)[0]
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _hash_token(value: str) -> bool:
    return bool(value) and "/" not in value and not any(ch.isspace() for ch in value)


def _expected(failure: Failure) -> bool:
    """Errors of the outside world (ESL, DB, floating IPs): logged as warnings, no trace."""
    return bool(failure.check(ESLError, CoreDBError, FloatingIPError, ProcessError))

