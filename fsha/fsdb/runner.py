"""Where the database operations run: one dedicated thread, or inline in tests.

SQLite calls block (a whole-table sweep takes up to a second, any statement may wait for
FreeSWITCH's write lock), so every operation is a plain function handed to a runner. One
thread per user (the feeds' reader, the takeover's writer) serialises that user's
operations: a rollback's delete always runs after the write it undoes, and a reader never
queues a query behind a slow one of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = ["Runner", "ThreadRunner", "inline_runner"]

T = TypeVar("T")
#: Runs one operation and fires with its result.
Runner = Callable[[Callable[[], Any]], "Deferred[Any]"]


def inline_runner(f: Callable[[], T]) -> Deferred[T]:
    """Run an operation in the calling thread (tests, tiny databases)."""
    return defer.maybeDeferred(f)


class ThreadRunner:
    """Runs operations on one dedicated thread (started on first use, stopped by
    :meth:`stop` or at reactor shutdown)."""

    def __init__(self, reactor: IReactorFromThreads, name: str = "fsha-coredb-writer") -> None:
        self.reactor = reactor
        self.name = name
        self.pool: ThreadPool | None = None
        self._trigger: object | None = None

    def __call__(self, f: Callable[[], T]) -> Deferred[T]:
        if self.pool is None:
            self.pool = ThreadPool(minthreads=1, maxthreads=1, name=self.name)
            self.pool.start()
            add_trigger = getattr(self.reactor, "addSystemEventTrigger", None)
            if add_trigger is not None and self._trigger is None:
                self._trigger = add_trigger("during", "shutdown", self._shutdown)
        return deferToThreadPool(self.reactor, self.pool, f)  # type: ignore[arg-type]

    def _shutdown(self) -> None:
        self._trigger = None
        self.stop()

    def stop(self) -> None:
        """Stop the thread once the queued operations are done (a later call starts a new
        one)."""
        pool, self.pool = self.pool, None
        trigger, self._trigger = self._trigger, None
        if trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(trigger)  # type: ignore[attr-defined]
            except (AttributeError, ValueError, KeyError):
                pass
        if pool is not None and pool.started:
            pool.stop()
