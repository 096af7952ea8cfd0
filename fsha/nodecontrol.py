"""The control endpoint each node serves beside its status: maintenance and switchover.

``POST /control/maintenance`` (``{"on": true|false}``) and ``POST /control/switchover``
(``{"slot": NAME, "to": NODE|null}``) on the node's status address. Every request is
signed for one node (:mod:`fsha.wire.control`): a node refuses one meant for another node
(421), an old bearer token, a replay, a stale or forged signature (401), and changes
nothing. The commands that send them are in :mod:`fsha.cli.control`.

The status site reads a request's headers before its body: :class:`StatusSite` makes
requests that check a control request's signature, and any request's announced length,
as soon as the headers are in, answer at once and close the connection when they refuse
(an unauthenticated body is never read), and bound every body, chunked ones included.
"""

from __future__ import annotations

import hmac
import io
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http, resource
from twisted.web.server import Request, Site

from fsha.node import ClusterNode
from fsha.wire.control import Accepted, ControlAuth, Refusal, body_digest
from fsha.wire.heartbeat import Role

MAX_BODY = 16 * 1024  # control bodies are a few dozen bytes; status and metrics have none
log = Logger()


def _is_control(path: bytes) -> bool:
    """Would the site route ``path`` to the control API? (It unquotes segments: so do we;
    a false positive only asks a status request for a signature.)"""
    segments = [s for s in unquote_to_bytes(path).split(b"/") if s]
    return bool(segments) and segments[0] == b"control"


@dataclass(frozen=True, slots=True)
class ControlStats:
    """Control requests judged: the ``control`` status section (:meth:`as_status`) and
    ``fsha_control_requests_total`` (``fsha.metrics``) are both made from this."""

    accepted: int
    refused: dict[str, int]  # by HTTP status code
    nonces: int  # remembered against replays

    def as_status(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "refused": dict(self.refused),
                "nonces": self.nonces}


class ControlResource(resource.Resource):
    isLeaf = True

    def __init__(self, node: ClusterNode, auth: ControlAuth, clock: IReactorTime) -> None:
        super().__init__()
        self.node = node
        self.auth = auth
        self.clock = clock
        self.accepted = 0  # authentic requests for this node
        self.refused: Counter[int] = Counter()  # refusals by HTTP status, before any change

    def stats(self) -> ControlStats:
        return ControlStats(accepted=self.accepted,
                            refused={str(k): v for k, v in sorted(self.refused.items())},
                            nonces=self.auth.remembered)

    def status(self) -> dict[str, Any]:
        return self.stats().as_status()

    def authenticate(self, header: bytes | None, method: bytes, path: bytes
                     ) -> Accepted | Refusal:
        verdict = self.auth.check(header.decode("latin-1") if header else None,
                                  method.decode("latin-1"), path.decode("latin-1"),
                                  self.clock.seconds())
        if isinstance(verdict, Refusal):
            self.refused[verdict.code] += 1
            log.warn("control request {method} {path} refused ({code}): {why}",
                     method=method.decode("latin-1"), path=path.decode("latin-1"),
                     code=verdict.code, why=verdict.message)
        else:
            self.accepted += 1
        return verdict

    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return self._answer(request, 405, {"error": "control commands are POST only"})
        return self.render_POST(request)

    def render_POST(self, request: Request) -> bytes:
        path = request.path.split(b"?", 1)[0]
        verdict = getattr(request, "fsha_control", None)
        if verdict is None:  # not through StatusSite's early check (a unit test)
            verdict = self.authenticate(request.getHeader(b"authorization"), request.method,
                                        path)
        if isinstance(verdict, Refusal):
            return self._answer(request, verdict.code, {"error": verdict.message})
        raw = request.content.read(MAX_BODY + 1) if request.content else b""
        if len(raw) > MAX_BODY:
            return self._answer(request, 413, {"error": "request body too large"})
        if not hmac.compare_digest(body_digest(raw), verdict.body):
            return self._answer(request, 400, {"error": "the body does not match its "
                                                        "signature"})
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as e:
            return self._answer(request, 400, {"error": f"bad request: {e}"})
        node = self.node
        try:
            if path == b"/control/maintenance":
                on = body.get("on")
                if not isinstance(on, bool):
                    raise ValueError('"on" must be true or false')
                held = node.config.slots[node.slot].name \
                    if node.role in (Role.MASTER, Role.CLAIMING) else None
                # Nobody ranked to take over: say so (the drain goes on: it was asked for).
                orphaned = on and held is not None and not node.roles.ranking
                node.set_maintenance(on)
                result: dict[str, Any] = {"node": node.me.name, "maintenance": on,
                                          "role": node.role.name.lower(), "held": held}
                if orphaned:
                    result["warning"] = (f"no slave is ready to take {held} over (none "
                                         f"ranked): {held} has no master until one is")
            elif path == b"/control/switchover":
                slot, to = body.get("slot"), body.get("to")
                if not isinstance(slot, str) or not (to is None or isinstance(to, str)):
                    raise ValueError('"slot" must be a slot name, "to" a node name or null')
                successor = node.switchover(slot, to)
                result = {"slot": slot, "from": node.me.name, "to": successor}
            else:
                return self._answer(request, 404, {"error": "no such control command"})
        except ValueError as e:
            return self._answer(request, 409, {"error": str(e)})
        log.info("control: {path} {body} done", path=path.decode(errors="replace"),
                 body=json.dumps(body))
        return self._answer(request, 200, result)

    @staticmethod
    def _answer(request: Request, code: int, body: dict[str, Any]) -> bytes:
        request.setResponseCode(code)
        return json.dumps(body).encode() + b"\n"


class _Discard:
    """Where a refused request's body goes (nowhere)."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> int:
        return 0

    def read(self, *args: Any) -> bytes:
        return b""

    def close(self) -> None:
        pass


class StatusRequest(Request):
    """A request judged on its headers: control signature, then the announced length."""

    fsha_control: Accepted | None = None
    _refused = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        # The request line is parsed, the headers are in, not a byte of body yet. The
        # channel keeps the request line in these (private) attributes until the body is
        # in; without them the check happens at render time, after the bounded body
        # (tests/test_control.py's loopback tests fail then).
        method = getattr(self.channel, "_command", b"")
        path = getattr(self.channel, "_path", b"").split(b"?", 1)[0]
        control = getattr(getattr(self.channel, "site", None), "control", None)
        if _is_control(path) and control is not None:
            if method != b"POST":
                return self._refuse(405, "control commands are POST only", b"Allow: POST\r\n")
            verdict = control.authenticate(self.requestHeaders.getRawHeaders(
                b"authorization", [None])[0], method, path)
            if isinstance(verdict, Refusal):
                return self._refuse(verdict.code, verdict.message)
            self.fsha_control = verdict
        if length is not None and length > MAX_BODY:
            return self._refuse(413, f"request body of {length} bytes: at most {MAX_BODY}")
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > MAX_BODY:  # chunked: no length announced
            self._refuse(413, f"request body over {MAX_BODY} bytes")
            return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self, code: int, message: str, extra: bytes = b"") -> None:
        """Answer now, before the body, and close (the client may still be sending it)."""
        self._refused = True
        self.content = _Discard()
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after this
        body = json.dumps({"error": message}).encode() + b"\n"
        reason = http.RESPONSES.get(code, b"Error")
        self.channel.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n%s\r\n%s" % (code, reason, len(body), extra, body))
        self.channel.loseConnection()


class StatusSite(Site):
    """The status address's site: status, metrics and (``control``) the control API."""

    requestFactory = StatusRequest

    def __init__(self, root: resource.Resource, control: ControlResource | None) -> None:
        super().__init__(root)
        self.control = control
