"""``[notify]``: run an operator's command on role changes, takeovers and faults, as
keepalived's notify scripts and Pacemaker's alert agents do.

The command runs without a shell as ``COMMAND... EVENT NODE SLOT EPOCH`` (empty strings
where an event has no slot or epoch), with the event in its environment too:
``FSHA_EVENT``, ``FSHA_NODE``, ``FSHA_CLUSTER``, ``FSHA_SLOT``, ``FSHA_EPOCH``,
``FSHA_TAKEOVER`` (``SLOT/EPOCH``), ``FSHA_TIME`` and ``FSHA_EVENT_JSON`` (every field).

A run never delays the node: it starts on a later reactor turn (never inside a takeover's
transition), at most ``max_running`` at once with a bounded queue behind them (the oldest
waiting event is dropped, and counted, when it is full), each killed after ``timeout``.
A failure is logged and counted in the status (``notify``).
"""

from __future__ import annotations

import json
import os
from collections import deque
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha.config import NotifyConfig
from fsha.history import takeover_id
from fsha.process import ProcessResult, ProcessRunner

log = Logger()
QUEUE = 100  # events waiting for a free run at most


class Notifier:
    def __init__(self, config: NotifyConfig, cluster: str, node: str, clock: IReactorTime,
                 runner: ProcessRunner) -> None:
        self.config = config
        self.cluster = cluster
        self.node = node
        self.clock = clock
        self.runner = runner
        self.running = 0
        self.queue: deque[dict[str, Any]] = deque()
        self.sent = self.failed = self.dropped = 0
        self.last_error: str | None = None

    def wants(self, kind: str) -> bool:
        return "*" in self.config.events or kind in self.config.events

    def event(self, event: dict[str, Any]) -> None:
        """A node event listener (``ClusterNode.add_event_listener``): quick, never runs
        anything itself."""
        if not self.wants(str(event.get("event"))):
            return
        if len(self.queue) >= QUEUE:
            self.queue.popleft()
            self.dropped += 1
            log.warn("notify: {count} event(s) dropped: the command does not keep up",
                     count=self.dropped)
        self.queue.append(dict(event))
        self.clock.callLater(0, self._next)

    def argv_env(self, event: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        kind = str(event.get("event"))
        slot = event.get("slot") or ""
        epoch = event.get("epoch")
        epoch_text = str(epoch) if isinstance(epoch, int) and epoch > 0 else ""
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(FSHA_EVENT=kind, FSHA_NODE=self.node, FSHA_CLUSTER=self.cluster,
                   FSHA_SLOT=str(slot), FSHA_EPOCH=epoch_text,
                   FSHA_TAKEOVER=takeover_id(event) or "",
                   FSHA_TIME=str(event.get("time", "")),
                   FSHA_EVENT_JSON=json.dumps(event, default=str, separators=(",", ":")))
        return [*self.config.command, kind, self.node, str(slot), epoch_text], env

    def _next(self) -> None:
        while self.queue and self.running < self.config.max_running:
            event = self.queue.popleft()
            argv, env = self.argv_env(event)
            self.running += 1
            try:
                d = self.runner.run(argv, self.config.timeout, env)
            except Exception as e:  # a bad argv must not stop the queue
                self.running -= 1
                self._failed(event, str(e))
                continue
            d.addCallbacks(self._done, self._error, callbackArgs=(event,),
                           errbackArgs=(event,))
            d.addErrback(lambda f: log.failure("notify: bookkeeping failed", f))

    def _done(self, result: ProcessResult, event: dict[str, Any]) -> None:
        self.running -= 1
        self.sent += 1
        log.debug("notify: {event} done in {ms:.0f} ms", event=event.get("event"),
                  ms=result.duration * 1000)
        self._next()

    def _error(self, f: Failure, event: dict[str, Any]) -> None:
        self.running -= 1
        self._failed(event, f.getErrorMessage() or f.type.__name__)
        self._next()

    def _failed(self, event: dict[str, Any], error: str) -> None:
        self.failed += 1
        self.last_error = f"{event.get('event')}: {error}"
        log.warn("notify: {command} for {event} failed: {error}",
                 command=self.config.command[0], event=event.get("event"), error=error)

    def status(self) -> dict[str, Any]:
        return {"command": list(self.config.command), "sent": self.sent,
                "failed": self.failed, "dropped": self.dropped, "running": self.running,
                "queued": len(self.queue), "last_error": self.last_error}
