"""The simulator's control interface: a small HTTP JSON API for tests and the demo.

=======  ==================  ==============================================================
method   path                what
=======  ==================  ==============================================================
GET      /status             name, core UUID, profiles, call count, hung or not
GET      /calls              the live channels
POST     /calls              ``{"profile", "count"=1, "answer"=true, "bridge"=false,
                             "caller"="1000", "dest"="2000"}`` -> ``{"uuids": [...]}``;
                             with ``"limits": ["hash realm res 5", {"backend",
                             "realm", "resource", "max"=-1, "interval"=0}, ...]`` and
                             ``"exceeded_cause"="CALL_REJECTED"`` each call runs the
                             ``limit`` app first -> ``{"uuids", "refused": n,
                             "refused_uuids"}`` (a refused call is hung up)
GET      /limits             the limit table: hash items, what each call holds, the
                             hiredis target (never its password)
POST     /hangup             ``{"uuids": [...]}`` or ``{"all": true}``, ``"cause"``
                             -> ``{"hungup": n}``
POST     /register           ``{"profile", "count"=1, "start"=1000, "expires"=3600,
                             "host", "network_ip", "network_port"}`` -> ``{"call_ids"}``
POST     /unregister         ``{"profile", "call_ids": [...]}`` -> ``{"unregistered": n}``
GET      /registrations      ``?profile=P`` -> ``{"registrations": [...]}``
POST     /api                ``{"command": "sofia status"}`` -> ``{"output": "..."}``
POST     /heartbeat          fire a HEARTBEAT event now
POST     /flood              ``{"count"=1000, "event"="CHANNEL_ANSWER"}``: every ESL
                             connection subscribed to it gets ``count`` copies of one
                             realistic event, paced by TCP backpressure (benchmarks)
POST     /hang, /unhang      stop / resume answering ESL (sockets stay open); ``/hang``
                             with ``{"sip": true}`` also stops answering SIP
POST     /crash              exit at once, like ``kill -9`` (no response is sent)
=======  ==================  ==============================================================

Errors are ``{"error": "..."}`` with status 400 (bad request) or 404 (unknown path).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from fsha.sim.esl_server import ESLServerFactory
from fsha.sim.limits import LimitError, LimitSpec
from fsha.sim.switch import CallOutcome, SimError, Switch

log = Logger()

MAX_BODY = 1 << 20
MAX_COUNT = 100_000


class ControlError(ValueError):
    pass


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _int(body: dict[str, Any], key: str, default: int, lo: int = 0, hi: int = MAX_COUNT) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ControlError(f"{key} must be an integer in [{lo}, {hi}]")
    return value


def _str(body: dict[str, Any], key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str) or not value:
        raise ControlError(f"{key} must be a non-empty string")
    return value


class ControlResource(Resource):
    isLeaf = True

    def __init__(
        self,
        switch: Switch,
        esl: ESLServerFactory | None,
        crash: Callable[[], None] = _kill_self,
        sip_pause: Callable[[bool], None] | None = None,
    ) -> None:
        super().__init__()
        self.switch = switch
        self.esl = esl
        self.crash = crash
        self.sip_pause = sip_pause

    def _reply(self, request: Request, status: int, obj: object) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(obj).encode("utf-8") + b"\n"

    def render_GET(self, request: Request) -> bytes:
        path = "/" + "/".join(p.decode("utf-8", "replace") for p in request.postpath)
        sw = self.switch
        if path == "/status":
            snap = sw.snapshot()
            snap["esl_hung"] = bool(self.esl and self.esl.hung)
            return self._reply(request, 200, snap)
        if path == "/calls":
            return self._reply(request, 200, {"calls": [c.summary() for c in sw.channels.values()]})
        if path == "/limits":
            return self._reply(request, 200, sw.limits.table())
        if path == "/registrations":
            args = request.args or {}
            profile = args.get(b"profile", [None])[0]
            rows = sw.db.registrations(profile.decode("utf-8") if profile else None)
            return self._reply(request, 200, {"registrations": rows})
        return self._reply(request, 404, {"error": f"no such path {path}"})

    def render_POST(self, request: Request) -> bytes:
        path = "/" + "/".join(p.decode("utf-8", "replace") for p in request.postpath)
        assert request.content is not None
        raw = request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            return self._reply(request, 400, {"error": "request body too large"})
        try:
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ControlError("request body must be a JSON object")
            result = self._post(path, body)
        except (ValueError, ControlError, SimError) as e:
            return self._reply(request, 400, {"error": str(e)})
        if result is None:
            return self._reply(request, 404, {"error": f"no such path {path}"})
        if isinstance(result, defer.Deferred):
            finished = [False]
            request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))

            def done(obj: dict[str, Any]) -> None:
                log.info("control {path}: {result}", path=path, result=str(obj)[:200])
                if not finished[0]:
                    request.write(self._reply(request, 200, obj))
                    request.finish()

            def failed(f: Failure) -> None:
                log.failure("control {path} failed", f, path=path)
                if not finished[0]:
                    request.write(self._reply(request, 500, {"error": f.getErrorMessage()}))
                    request.finish()

            result.addCallbacks(done, failed).addErrback(
                lambda f: log.failure("control {path}: reply failed", f, path=path)
            )
            return NOT_DONE_YET
        log.info("control {path}: {result}", path=path, result=str(result)[:200])
        return self._reply(request, 200, result)

    def _post(
        self, path: str, body: dict[str, Any]
    ) -> dict[str, Any] | defer.Deferred[dict[str, Any]] | None:
        sw = self.switch
        if path == "/calls":
            profile = _str(body, "profile")
            count = _int(body, "count", 1, 1)
            answer = bool(body.get("answer", True))
            bridge = bool(body.get("bridge", False))
            caller = _str(body, "caller", "1000")
            dest = _str(body, "dest", "2000")
            sw.running_profile(profile)
            if body.get("limits") is not None:
                raw = body["limits"]
                if not isinstance(raw, list) or not raw:
                    raise ControlError("limits must be a non-empty list")
                try:
                    specs = [LimitSpec.from_obj(x) for x in raw]
                except LimitError as e:
                    raise ControlError(str(e)) from None
                cause = _str(body, "exceeded_cause", "CALL_REJECTED")
                return defer.ensureDeferred(
                    self._limited_calls(profile, count, specs, cause, answer=answer,
                                        bridge=bridge, caller=caller, dest=dest)
                )  # fmt: skip
            uuids: list[str] = []
            with sw.db.batch():
                for _ in range(count):
                    uuids += sw.place_call(
                        profile, caller=caller, dest=dest, answer=answer, bridge=bridge
                    )
            return {"uuids": uuids}
        if path == "/hangup":
            cause = _str(body, "cause", "NORMAL_CLEARING")
            if body.get("all"):
                targets = list(sw.channels)
            else:
                targets = body.get("uuids")
                if not isinstance(targets, list) or not all(isinstance(u, str) for u in targets):
                    raise ControlError("uuids must be a list of strings (or all: true)")
            n = 0
            with sw.db.batch():
                for u in targets:
                    if u in sw.channels:
                        sw.hangup(u, cause)
                        n += 1
            return {"hungup": n}
        if path == "/register":
            profile = _str(body, "profile")
            count = _int(body, "count", 1, 1)
            start = _int(body, "start", 1000, 0, 10**12)
            expires = _int(body, "expires", 3600, 1, 10**9)
            port = _int(body, "network_port", 5060, 1, 65535)
            ip = _str(body, "network_ip", "127.0.0.1")
            host = body.get("host")
            if host is not None and not isinstance(host, str):
                raise ControlError("host must be a string")
            sw.running_profile(profile)
            call_ids = []
            with sw.db.batch():
                for i in range(count):
                    reg = sw.register(
                        profile,
                        str(start + i),
                        host=host,
                        network_ip=ip,
                        network_port=port,
                        expires=expires,
                    )
                    call_ids.append(reg.call_id)
            return {"call_ids": call_ids}
        if path == "/unregister":
            profile = _str(body, "profile")
            ids = body.get("call_ids")
            if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids):
                raise ControlError("call_ids must be a list of strings")
            return {"unregistered": sum(1 for c in ids if sw.unregister(profile, c))}
        if path == "/api":
            command = _str(body, "command")
            if "\n" in command or "\r" in command:
                raise ControlError("command must be one line")
            res = sw.api(command)
            if res.pending is not None:
                return res.pending.addCallback(
                    lambda text: {"output": text or "-ERR no reply\n", "found": True}
                )
            return {"output": res.body, "found": res.found}
        if path == "/flood":
            count = _int(body, "count", 1000, 1, 100_000_000)
            ev = sw.sample_event(_str(body, "event", "CHANNEL_ANSWER"))
            conns = self.esl.connections if self.esl is not None else set()
            return {"connections": sum(1 for c in list(conns) if c.flood(ev, count))}
        if path == "/heartbeat":
            sw.send_heartbeat()
            return {"ok": True}
        if path == "/hang":
            if self.esl is not None:
                self.esl.hang()
            sip = bool(body.get("sip", False))
            if sip and self.sip_pause is not None:
                self.sip_pause(True)
            return {"ok": True, "hung": True, "sip": sip}
        if path == "/unhang":
            if self.esl is not None:
                self.esl.unhang()
            if self.sip_pause is not None:
                self.sip_pause(False)
            return {"ok": True, "hung": False}
        if path == "/crash":
            log.warn("control: crash requested, exiting at once")
            self.crash()
            return {"ok": True}
        return None

    async def _limited_calls(
        self, profile: str, count: int, specs: list[LimitSpec], cause: str, **kw: Any
    ) -> dict[str, Any]:
        uuids: list[str] = []
        refused: list[str] = []
        for _ in range(count):
            try:
                out: CallOutcome = await self.switch.place_call_async(
                    profile, limits=specs, exceeded_cause=cause, **kw
                )
            except SimError as e:
                return {"uuids": uuids, "refused": len(refused), "refused_uuids": refused,
                        "error": str(e)}
            (refused if out.refused else uuids).extend(out.uuids)
        return {"uuids": uuids, "refused": len(refused), "refused_uuids": refused}
