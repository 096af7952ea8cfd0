"""fsha.tap.OrderedServices: children stop one after the other, last added first."""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from fsha.tap import OrderedServices


class _Child(service.Service):
    def __init__(self, name: str, log: list[str]) -> None:
        self.setName(name)
        self.log = log
        self.stopping: defer.Deferred[None] | None = None

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.log.append(f"stop {self.name}")
        self.stopping = defer.Deferred()
        return self.stopping


class OrderedServicesTests(SynchronousTestCase):
    def test_each_child_stops_after_the_previous_one_finished(self) -> None:
        log: list[str] = []
        top = OrderedServices()
        children = [_Child(n, log) for n in ("esl", "replication", "node")]
        for c in children:
            c.setServiceParent(top)
        top.startService()
        done = top.stopService()
        self.assertEqual(log, ["stop node"])  # the hand-over still has ESL and replication
        children[2].stopping.callback(None)  # type: ignore[union-attr]
        self.assertEqual(log, ["stop node", "stop replication"])
        children[1].stopping.errback(RuntimeError("boom"))  # type: ignore[union-attr]
        self.assertEqual(log, ["stop node", "stop replication", "stop esl"])
        self.assertNoResult(done)
        children[0].stopping.callback(None)  # type: ignore[union-attr]
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
