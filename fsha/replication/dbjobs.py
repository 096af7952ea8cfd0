"""The feeds' database worker: one query at a time, each with a deadline.

The call feed and the registration feed read FreeSWITCH's databases on one thread
(:mod:`fsha.fsdb.reader`). At most one query is outstanding, so the thread never queues
work behind a slow query: when the worker is free it asks its sources, in priority order,
for their next job (:meth:`JobSource.next_job`: a job, a time at which one will be due, or
nothing). A job that outlives ``query_timeout`` is interrupted
(``sqlite3.Connection.interrupt``), counted as an error, and its connection reopened.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from fsha.fsdb.reader import CoreDBReads
from fsha.replication.feedslots import FedSlots

__all__ = ["DBJobs", "Job", "JobSource"]

#: What a job is called (for errors) and the job itself.
Job = tuple[str, Callable[[], "Deferred[None] | None"]]


class JobSource(Protocol):
    def next_job(self, now: float) -> Job | float | None:
        """The next job due now; else when one will be (seconds); else None."""
        ...


class DBJobs:
    """Runs the sources' jobs on ``db``, one at a time; see the module docstring."""

    def __init__(self, db: CoreDBReads, slots: FedSlots, clock: IReactorTime,
                 query_timeout: float) -> None:
        self.db = db
        self.slots = slots
        self.clock = clock
        self.query_timeout = query_timeout
        self.sources: Sequence[JobSource] = ()
        self.busy = False
        self._interrupted = False
        self._query_timer: IDelayedCall | None = None
        self._kick_timer: IDelayedCall | None = None
        self._idle_waiters: list[Deferred[None]] = []

    def kick(self) -> None:
        """Start the next due job if none is running."""
        if self.busy or not self.slots.running or not self.slots.fed:
            return
        now = self.clock.seconds()
        soonest: float | None = None
        for source in self.sources:
            job = source.next_job(now)
            if isinstance(job, tuple):
                self._run(*job)
                return
            if job is not None and (soonest is None or job < soonest):
                soonest = job
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
        self.kick()

    def cancel_wake(self) -> None:
        timer, self._kick_timer = self._kick_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _run(self, what: str, job: Callable[[], Deferred[None] | None]) -> None:
        """Run one job with a deadline, then free the worker and start the next one."""
        self.busy = True
        self._query_timer = self.clock.callLater(self.query_timeout, self._timed_out, what)

        def finished(result: object) -> None:
            if self._query_timer is not None and self._query_timer.active():
                self._query_timer.cancel()
            self._query_timer = None
            self.busy = False
            self._interrupted = False
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)
            self.kick()

        d = defer.maybeDeferred(job)
        d.addErrback(self._db_failed, what)
        d.addErrback(self.slots.failed, what)
        d.addBoth(finished)
        d.addErrback(self.slots.failed, what)

    def _timed_out(self, what: str) -> None:
        self._query_timer = None
        self._interrupted = True
        self.slots.error(f"{what}: core DB query took longer than {self.query_timeout:g} s; "
                         "interrupted")
        self.db.interrupt()

    def _db_failed(self, failure: Failure, what: str) -> None:
        failure.trap(sqlite3.Error)
        if self._interrupted:
            return  # the deadline already counted and logged it
        self.slots.error(f"{what}: core DB: {failure.getErrorMessage()}")

    def when_idle(self) -> Deferred[None]:
        """Fires when no job is running."""
        if not self.busy:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d
