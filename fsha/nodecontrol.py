"""The control endpoint each node serves beside its status: maintenance, switchover and
an online config change.

``POST /control/maintenance`` (``{"on": true|false}``), ``POST /control/switchover``
(``{"slot": NAME, "to": NODE|null}``) and ``POST /control/config/{show,stage,activate,
abort,relay}`` (``fsha config push``: :mod:`fsha.configstage`,
:mod:`fsha.replication.relay`) and ``POST /control/config/offer`` (a node catching up
with the cluster's config: :mod:`fsha.configfetch`) on the node's status address. Every
request is signed for one node (:mod:`fsha.wire.control`): a node refuses one meant for
another node (421), an old bearer token, a replay, a stale or forged signature (401),
and changes nothing. The commands that send them are in :mod:`fsha.cli.control` and
:mod:`fsha.cli.config`.

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
from twisted.web.server import NOT_DONE_YET, Request, Site

from fsha.configstage import ConfigStager, Refused
from fsha.node import ClusterNode
from fsha.replication.relay import ControlRelay
from fsha.wire.control import Accepted, ControlAuth, Refusal, body_digest
from fsha.wire.heartbeat import Role
from fsha.wire.stream import ControlAnswer, ControlRequest

MAX_BODY = 16 * 1024  # control bodies are a few dozen bytes; status and metrics have none
MAX_CONFIG_BODY = 1024 * 1024  # a pushed config file (JSON-quoted)
CONFIG_PATH = b"/control/config/"
RELAY_PATH = b"/control/config/relay"
OFFER_PATH = b"/control/config/offer"
log = Logger()


def _is_control(path: bytes) -> bool:
    """Would the site route ``path`` to the control API? (It unquotes segments: so do we;
    a false positive only asks a status request for a signature.)"""
    segments = [s for s in unquote_to_bytes(path).split(b"/") if s]
    return bool(segments) and segments[0] == b"control"


def max_body(path: bytes) -> int:
    """The largest body a request to ``path`` may have."""
    return MAX_CONFIG_BODY if path.startswith(CONFIG_PATH) else MAX_BODY


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

    def __init__(self, node: ClusterNode, auth: ControlAuth, clock: IReactorTime,
                 config: ConfigStager | None = None, relay: ControlRelay | None = None
                 ) -> None:
        super().__init__()
        self.node = node
        self.config = config
        self.relay = relay
        if relay is not None:
            relay.handler = self.relayed
        self.auth = auth
        self.clock = clock
        self.catchup: Any = None  # fsha.configfetch.ConfigCatchUp: /control/config/offer
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
        limit = max_body(path)
        raw = request.content.read(limit + 1) if request.content else b""
        if len(raw) > limit:
            return self._answer(request, 413, {"error": "request body too large"})
        if path == RELAY_PATH:
            return self._relay(request, raw, verdict)
        code, result = self.execute(path, raw, verdict)
        return self._answer(request, code, result)

    def execute(self, path: bytes, raw: bytes, verdict: Accepted) -> tuple[int, dict[str, Any]]:
        """An authentic request's effect: (HTTP status, JSON answer)."""
        if not hmac.compare_digest(body_digest(raw), verdict.body):
            return 400, {"error": "the body does not match its signature"}
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as e:
            return 400, {"error": f"bad request: {e}"}
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
            elif path.startswith(CONFIG_PATH) and self.config is not None:
                result = self._config(path[len(CONFIG_PATH):], body)
            else:
                return 404, {"error": "no such control command"}
        except ValueError as e:
            return 409, {"error": str(e)}
        except Refused as e:
            log.warn("control: {path} refused: {why}", path=path.decode(errors="replace"),
                     why="; ".join(e.reasons))
            return 409, {"error": "; ".join(e.reasons), "reasons": e.reasons,
                         "node": node.me.name}
        if path == OFFER_PATH:
            return 200, result  # asked by every peer every few seconds: not logged
        # a config request's text is not logged (it holds ESL passwords)
        shown = {k: v for k, v in result.items() if k != "text"} \
            if path.startswith(CONFIG_PATH) else body
        log.info("control: {path} {body} done", path=path.decode(errors="replace"),
                 body=json.dumps(shown))
        return 200, result

    def relayed(self, frame: ControlRequest) -> ControlAnswer:
        """A request another node relays to this one over its replication link: checked
        exactly as an HTTP request to this endpoint (signed for this node, fresh, new)."""
        path = frame.path.encode("ascii")
        verdict = self.authenticate(frame.auth.encode("latin-1"), b"POST", path)
        if isinstance(verdict, Refusal):
            code, result = verdict.code, {"error": verdict.message}
        elif not path.startswith(CONFIG_PATH) or path == RELAY_PATH:
            code, result = 404, {"error": "only /control/config/* requests are relayed"}
        elif len(frame.body) > max_body(path):
            code, result = 413, {"error": "request body too large"}
        else:
            code, result = self.execute(path, frame.body, verdict)
        return ControlAnswer(frame.id, code, json.dumps(result).encode() + b"\n")

    def _relay(self, request: Request, raw: bytes, verdict: Accepted) -> Any:
        """``POST /control/config/relay`` (``{"to", "path", "auth", "body"}``): send a
        request signed for another node over the replication link to it, and answer with
        its answer (``{"status", "answer"}``): fsha.replication.relay."""
        if not hmac.compare_digest(body_digest(raw), verdict.body):
            return self._answer(request, 400, {"error": "the body does not match its "
                                                        "signature"})
        try:
            body = json.loads(raw or b"{}")
            fields = [body.get(k) if isinstance(body, dict) else None
                      for k in ("to", "path", "auth", "body")]
            if not all(isinstance(f, str) and f.isascii() for f in fields):
                raise ValueError('"to", "path", "auth" and "body" must be ASCII strings')
        except ValueError as e:
            return self._answer(request, 400, {"error": f"bad request: {e}"})
        if self.relay is None:
            return self._answer(request, 404, {"error": "no replication links here (no "
                                                        "[tls]): cannot relay"})
        to, path, auth, inner = fields
        finished = []
        request.notifyFinish().addBoth(finished.append)

        def answered(result: tuple[int, bytes]) -> None:
            status, answer = result
            try:
                decoded = json.loads(answer)
            except ValueError:
                decoded = {"error": answer.decode(errors="replace")}
            if not finished:
                request.write(self._answer(request, 200, {"status": status,
                                                          "answer": decoded}))
                request.finish()

        def failed(f: Any) -> None:
            if not finished:
                request.write(self._answer(request, 504, {"error": f.getErrorMessage()}))
                request.finish()

        d = self.relay.request(to, auth, path, inner.encode("ascii"))
        d.addCallbacks(answered, failed)
        d.addErrback(lambda f: log.failure("relaying {path} to {to} failed", f, path=path,
                                           to=to))
        return NOT_DONE_YET

    def _config(self, command: bytes, body: dict[str, Any]) -> dict[str, Any]:
        assert self.config is not None
        if command == b"show":
            return self.config.show()
        if command == b"offer" and self.catchup is not None:
            return self.catchup.offer(body)  # type: ignore[no-any-return]
        epoch = body.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 < epoch < 1 << 62:
            raise ValueError('"epoch" must be a positive integer')
        if command == b"stage":
            text = body.get("text")
            if not isinstance(text, str):
                raise ValueError('"text" must be the config file\'s text')
            return self.config.stage(epoch, text)
        digest = body.get("digest")
        try:
            raw_digest = bytes.fromhex(digest) if isinstance(digest, str) else b""
        except ValueError:
            raw_digest = b""
        if len(raw_digest) != 8:
            raise ValueError('"digest" must be the config digest (16 hex digits)')
        if command == b"activate":
            return self.config.activate(epoch, raw_digest)
        if command == b"abort":
            return self.config.abort(epoch, raw_digest)
        raise ValueError(f"no such config command {command.decode(errors='replace')!r}")

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
    _limit = MAX_BODY

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
        self._limit = max_body(path)
        if length is not None and length > self._limit:
            return self._refuse(413, f"request body of {length} bytes: at most {self._limit}")
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit:  # chunked: no length announced
            self._refuse(413, f"request body over {self._limit} bytes")
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
