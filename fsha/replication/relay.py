"""Signed control requests relayed over the replication links (``fsha config push``).

An operator's host can usually reach only its own node's status address (``127.0.0.1`` on
every host). The push therefore asks that node to relay each request to the others over
the links the nodes already keep to each other (mutual TLS): a CONTROL_REQUEST frame
carries the request, signed by the operator *for the receiving node*, which checks it as
its control endpoint checks an HTTP request and sends a CONTROL_ANSWER
(``docs/protocol/stream.rst``). The relaying node cannot forge or alter a request: it does
not hold a signature for another node's body, only the operator's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fsha.wire.stream import ControlAnswer, ControlRequest

#: Seconds a relayed request waits for its answer.
RELAY_TIMEOUT: Final = 10.0

log = Logger()


class RelayError(Exception):
    """A relayed request that got no answer; the message says why, in one line."""


class ControlRelay:
    """``links(name)`` gives the up link (with ``send``) to a peer, or None; ``handler``
    answers a request relayed to this node (set once the control endpoint exists)."""

    def __init__(self, links: Callable[[str], Any], clock: IReactorTime,
                 timeout: float = RELAY_TIMEOUT) -> None:
        self.links = links
        self.clock = clock
        self.timeout = timeout
        self.handler: Callable[[ControlRequest], ControlAnswer] | None = None
        self._next = 1
        self._pending: dict[int, tuple[str, defer.Deferred[tuple[int, bytes]]]] = {}
        self.relayed = 0  # requests sent to a peer
        self.served = 0  # requests relayed to this node and answered

    def request(self, peer: str, auth: str, path: str, body: bytes
                ) -> defer.Deferred[tuple[int, bytes]]:
        """Send a request to ``peer``; fires with (HTTP status, JSON body), or fails with
        RelayError (no link, no answer in time, the link went down)."""
        link = self.links(peer)
        if link is None:
            return defer.fail(RelayError(f"no replication link up to {peer}"))
        request_id, self._next = self._next, self._next % 0xFFFF_FFFF + 1
        d: defer.Deferred[tuple[int, bytes]] = defer.Deferred(
            lambda _: self._pending.pop(request_id, None))
        self._pending[request_id] = (peer, d)
        link.send(ControlRequest(request_id, auth, path, body))
        self.relayed += 1

        def late(f: Any) -> Any:
            if f.check(defer.TimeoutError, defer.CancelledError):
                raise RelayError(f"{peer} did not answer within {self.timeout:.0f} s")
            return f

        d.addTimeout(self.timeout, self.clock)
        return d.addErrback(late)

    def frame(self, peer: str, link: Any, frame: ControlRequest | ControlAnswer) -> None:
        """A control frame from ``peer`` (the name its certificate proves)."""
        if isinstance(frame, ControlRequest):
            if self.handler is None:
                answer = ControlAnswer(frame.id, 404, b'{"error": "no control endpoint"}\n')
            else:
                try:
                    answer = self.handler(frame)
                except Exception:
                    log.failure("relayed control request {path} from {peer} failed",
                                path=frame.path, peer=peer)
                    answer = ControlAnswer(frame.id, 500, b'{"error": "internal error"}\n')
            self.served += 1
            link.send(answer)
            return
        pending = self._pending.get(frame.id)
        if pending is None or pending[0] != peer:  # late (timed out) or not from that peer
            return
        del self._pending[frame.id]
        pending[1].callback((frame.status, frame.body))

    def link_closed(self, peer: str) -> None:
        """The link to ``peer`` ended: its requests in flight fail now."""
        for request_id, (name, d) in list(self._pending.items()):
            if name == peer:
                del self._pending[request_id]
                d.errback(RelayError(f"the replication link to {peer} went down"))

    def status(self) -> dict[str, Any]:
        return {"relayed": self.relayed, "served": self.served, "pending": len(self._pending)}
