"""Operator commands: ``fsha maintenance`` and ``fsha switchover``, and the endpoint they use.

Each node serves ``POST /control/maintenance`` and ``POST /control/switchover`` on its
status address. A request must carry ``Authorization: Bearer TOKEN``, where the token is
derived from the cluster secret file (HMAC-SHA256 of a fixed label), so whoever can read
that file on a node (root, usually) can steer the cluster, and the secret itself never
travels. A wrong or missing token gets 401 and a log line, and changes nothing. Keep the
status address on loopback or a management network.

    fsha maintenance fs2 on  --config /etc/fsha/cluster.toml   # drain fs2
    fsha maintenance fs2 off --config /etc/fsha/cluster.toml   # back as a slave
    fsha switchover pbx-a [--to fs4] --config /etc/fsha/cluster.toml
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from twisted.logger import Logger
from twisted.web import resource
from twisted.web.server import Request

from fsha.node import ClusterNode

MAX_BODY = 64 * 1024
log = Logger()


def control_token(secret: bytes) -> str:
    return hmac.new(secret, b"fsha control token v1", hashlib.sha256).hexdigest()


class ControlResource(resource.Resource):
    isLeaf = True

    def __init__(self, node: ClusterNode, token: str) -> None:
        super().__init__()
        self.node = node
        self._expected = f"Bearer {token}".encode()

    def render_POST(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        given = request.getHeader(b"authorization") or b""
        peer = request.getClientAddress()
        if not hmac.compare_digest(given, self._expected):
            log.warn("control request {path} from {peer} refused: bad or missing token",
                     path=request.path.decode(errors="replace"),
                     peer=getattr(peer, "host", "?"))
            return self._answer(request, 401, {"error": "bad or missing token"})
        try:
            raw = request.content.read(MAX_BODY + 1) if request.content else b""
            if len(raw) > MAX_BODY:
                raise ValueError("request body too large")
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as e:
            return self._answer(request, 400, {"error": f"bad request: {e}"})
        path = request.path
        try:
            if path == b"/control/maintenance":
                on = body.get("on")
                if not isinstance(on, bool):
                    raise ValueError('"on" must be true or false')
                self.node.set_maintenance(on)
                result: dict[str, Any] = {"node": self.node.me.name, "maintenance": on,
                                          "role": self.node.role.name.lower()}
            elif path == b"/control/switchover":
                slot, to = body.get("slot"), body.get("to")
                if not isinstance(slot, str) or not (to is None or isinstance(to, str)):
                    raise ValueError('"slot" must be a slot name, "to" a node name or null')
                successor = self.node.switchover(slot, to)
                result = {"slot": slot, "from": self.node.me.name, "to": successor}
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


# -- the commands -----------------------------------------------------------------------------


def _post(url: str, token: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json",
                                              "authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {"error": e.reason}


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _common(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default="/etc/fsha/cluster.toml",
                        help="the cluster config file (its secret file gives the token)")
    parser.add_argument("--timeout", type=float, default=5.0)
    return parser


def _load(path: str) -> Any:
    from fsha.config import load_config

    config = load_config(path)
    return config, control_token(config.read_secret())


def _run(url: str, token: str, body: dict[str, Any], timeout: float) -> int:
    try:
        code, answer = _post(url, token, body, timeout)
    except (urllib.error.URLError, OSError) as e:
        print(f"fsha: cannot reach {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    if code != 200:
        print(f"fsha: {answer.get('error', answer)}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0


def maintenance_main(argv: list[str]) -> int:
    from fsha.config import ConfigError

    parser = _common("fsha maintenance", "Drain a node (on) or bring it back (off).")
    parser.add_argument("node")
    parser.add_argument("state", choices=("on", "off"))
    args = parser.parse_args(argv)
    try:
        config, token = _load(args.config)
        node = config.node(args.node)
    except ConfigError as e:
        print(e.problems[0], file=sys.stderr)
        return 2
    except KeyError:
        print(f"fsha maintenance: no node named {args.node!r}", file=sys.stderr)
        return 2
    url = _base_url(node.status.host, node.status.port) + "/control/maintenance"
    return _run(url, token, {"on": args.state == "on"}, args.timeout)


def switchover_main(argv: list[str]) -> int:
    from fsha.config import ConfigError
    from fsha.status import fetch

    parser = _common("fsha switchover",
                     "Move a slot from its master to the primary candidate (planned).")
    parser.add_argument("slot")
    parser.add_argument("--to", help="the node expected to take it (must be the primary "
                                     "candidate)")
    args = parser.parse_args(argv)
    try:
        config, token = _load(args.config)
    except ConfigError as e:
        print(e.problems[0], file=sys.stderr)
        return 2
    # Ask the nodes, in config order, who masters the slot; the first that answers decides.
    owner = None
    for node in config.nodes:
        try:
            status = fetch(_base_url(node.status.host, node.status.port) + "/status",
                           args.timeout)
        except (urllib.error.URLError, OSError, ValueError):
            continue
        owner = next((s["owner"] for s in status["slots"] if s["name"] == args.slot), None)
        if not any(s["name"] == args.slot for s in status["slots"]):
            print(f"fsha switchover: no slot named {args.slot!r}", file=sys.stderr)
            return 2
        break
    if owner is None:
        print(f"fsha switchover: no node reports a master for {args.slot}", file=sys.stderr)
        return 1
    master = config.node(owner)
    url = _base_url(master.status.host, master.status.port) + "/control/switchover"
    return _run(url, token, {"slot": args.slot, "to": args.to}, args.timeout)
