"""``fsha maintenance`` and ``fsha switchover``: signed requests to one named node.

    fsha maintenance fs2 on  [--wait [SECONDS]]   # drain fs2 (its slot moves first)
    fsha maintenance fs2 off [--wait [SECONDS]]   # back as a ranked slave
    fsha switchover pbx-a [--to fs4] [--wait [SECONDS]]

Each request is signed for the node it is meant for (:mod:`fsha.wire.control`), with the
cluster secret named by ``--config``; a node that is not that one refuses it, so a status
address shared by several nodes (``127.0.0.1:7420`` on every host) can never drain the
wrong node. ``switchover`` first asks the nodes' status who masters the slot, and sends the
request to that master.

Exit status: 0 done (with ``--wait``: done and seen done), 1 refused, unreachable or timed
out (the reason on stderr), 2 bad arguments or config. Output is for people; ``--json``
prints one JSON object for scripts instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from fsha.wire.control import sign

JSON = dict[str, Any]
DEFAULT_WAIT = 30.0  # seconds, for a bare --wait
POLL = 0.1  # seconds between two looks at the status while waiting


class Failed(Exception):
    """The command failed; the message is the one line the operator reads."""


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def post(url: str, path: str, secret: bytes, cluster: str, node: str, body: JSON,
         timeout: float) -> tuple[int, JSON]:
    """POST a control request signed for ``node``; (HTTP status, JSON answer)."""
    data = json.dumps(body).encode()
    auth = sign(secret, cluster, node, "POST", path, data, time.time())
    request = urllib.request.Request(url + path, data=data, method="POST", headers={
        "content-type": "application/json", "authorization": auth})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            answer = json.loads(e.read())
        except ValueError:
            answer = {"error": e.reason}
        return e.code, answer if isinstance(answer, dict) else {"error": str(answer)}


def get_status(url: str, timeout: float) -> JSON:
    with urllib.request.urlopen(url + "/status", timeout=timeout) as response:
        status = json.loads(response.read())
    if not isinstance(status, dict):
        raise ValueError("the status is not a JSON object")
    return status


def _me(status: JSON) -> JSON:
    return next(n for n in status["nodes"] if n["self"])


def _master_of(status: JSON, slot: str) -> JSON | None:
    """The node entry that masters ``slot`` in this view (role master, not claiming)."""
    return next((n for n in status["nodes"] if n["alive"] and n["role"] == "master"
                 and n["slot"] == slot), None)


def _slot_line(status: JSON, slot: str) -> str:
    master = _master_of(status, slot)
    if master is not None:
        return f"{slot} is mastered by {master['name']} (epoch {master['epoch']})"
    busy = [f"{n['name']} is {n['role']}" for n in status["nodes"]
            if n["alive"] and n["slot"] == slot]
    return f"{slot} has no master" + (f" ({', '.join(busy)})" if busy else "")


def _failures(status: JSON, since: float) -> str:
    """Release failures this node logged since ``since`` (its own clock), in words."""
    found = [f"release of {e.get('slot')} failed: {e.get('error')}"
             for e in status.get("events", [])
             if e.get("event") == "release-failed" and e.get("time", 0) >= since]
    return "; " + "; ".join(found) if found else ""


def maintenance_done(status: JSON, name: str, on: bool, held: str | None) -> str | None:
    """What ``fsha maintenance NAME on|off --wait`` waits for, seen in NAME's own status:
    on: in maintenance, a slave holding nothing, and the slot it held mastered elsewhere;
    off: out of maintenance and ranked. A sentence when done, else None."""
    me = _me(status)
    if on:
        if "maintenance" not in me["flags"] or me["role"] != "slave" or me["slot"]:
            return None
        if held and (_master_of(status, held) or {}).get("name") in (None, name):
            return None
        return f"{name} is in maintenance and holds no slot" + (
            f"; {_slot_line(status, held)}" if held else "")
    if "maintenance" in me["flags"] or me["role"] != "slave" or me["rank"] is None:
        return None
    return f"{name} is back as a slave, ranked {me['rank'] + 1}"


def maintenance_seen(status: JSON, name: str, held: str | None) -> str:
    me = _me(status)
    flags = ",".join(me["flags"]) or "no flags"
    line = f"{name} is {me['role']}" + (f" of {me['slot']}" if me["slot"] else "") + \
        f" ({flags}; rank {'-' if me['rank'] is None else me['rank'] + 1})"
    return line + (f"; {_slot_line(status, held)}" if held else "")


def switchover_done(status: JSON, slot: str, successor: str) -> str | None:
    """What ``fsha switchover SLOT --wait`` waits for, seen in the old master's status:
    the successor masters the slot and the old master holds it no more."""
    master = _master_of(status, slot)
    if master is None or master["name"] != successor or _me(status)["slot"] == slot:
        return None
    return _slot_line(status, slot) + f"; {status['node']} holds it no more"


def wait_until(look: Callable[[], JSON], done: Callable[[JSON], str | None],
               describe: Callable[[JSON], str], seconds: float) -> tuple[str, float]:
    """Poll ``look()`` until ``done(status)`` gives a sentence; (sentence, seconds taken).

    Raises Failed with what was seen last when ``seconds`` pass first."""
    start = time.monotonic()
    seen = "no status read yet"
    while True:
        try:
            status = look()
        except Failed:
            raise
        except (urllib.error.URLError, OSError, ValueError, KeyError, StopIteration) as e:
            seen = f"status unreadable: {getattr(e, 'reason', e)}"
        else:
            result = done(status)
            if result is not None:
                return result, time.monotonic() - start
            seen = describe(status)
        if time.monotonic() - start >= seconds:
            raise Failed(f"timed out after {seconds:g} s; last seen: {seen}")
        time.sleep(POLL)


def _common(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default="/etc/fsha/cluster.toml",
                        help="the cluster config file (its secret file signs the request)")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds for each HTTP request (default 5)")
    parser.add_argument("--wait", type=float, nargs="?", const=DEFAULT_WAIT, metavar="SECONDS",
                        help="wait until done, at most SECONDS (default "
                             f"{DEFAULT_WAIT:g}); exit 1 if not done by then")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _load(path: str) -> tuple[Any, bytes]:
    from fsha.config import load_config

    config = load_config(path)
    return config, config.read_secret()


def _finish(prog: str, args: argparse.Namespace, body: Callable[[], tuple[str, JSON]]) -> int:
    from fsha.config import ConfigError

    try:
        text, result = body()
    except ConfigError as e:
        print(e.problems[0], file=sys.stderr)
        return 2
    except Failed as e:
        if args.json:
            print(json.dumps({"ok": False, "error": str(e)}))
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"ok": True, **result}) if args.json else text)
    return 0


def _send(url: str, path: str, secret: bytes, cluster: str, node: str, body: JSON,
          timeout: float) -> JSON:
    try:
        code, answer = post(url, path, secret, cluster, node, body, timeout)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise Failed(f"cannot reach {node} at {url}: {getattr(e, 'reason', e)}") from None
    if code == 421:  # another node answered at this address
        raise Failed(f"refused at {url} (421): {answer.get('error', answer)}")
    if code != 200:
        raise Failed(f"{node} refused ({code}): {answer.get('error', answer)}")
    return answer


# -- fsha maintenance -------------------------------------------------------------------------


def maintenance_main(argv: list[str]) -> int:
    parser = _common("fsha maintenance", "Drain a node (on) or bring it back (off).")
    parser.add_argument("node")
    parser.add_argument("state", choices=("on", "off"))
    args = parser.parse_args(argv)
    return _finish("fsha maintenance", args, lambda: _maintenance(args))


def _maintenance(args: argparse.Namespace) -> tuple[str, JSON]:
    from fsha.config import ConfigError

    config, secret = _load(args.config)
    try:
        target = config.node(args.node)
    except KeyError:
        known = ", ".join(n.name for n in config.nodes)
        raise ConfigError([f"fsha maintenance: no node named {args.node!r} (configured: "
                           f"{known})"]) from None
    name, on = target.name, args.state == "on"
    url = base_url(target.status.host, target.status.port)
    sent = time.time()
    answer = _send(url, "/control/maintenance", secret, config.name, name, {"on": on},
                   args.timeout)
    held = answer.get("held")
    if on:
        text = f"{name}: maintenance on; " + (f"it was master of {held}, handing it over"
                                               if held else "it held no slot")
        if answer.get("warning"):
            text += f"\nwarning: {answer['warning']}"
    else:
        text = f"{name}: maintenance off; back as a slave (it never preempts a master)"
    result: JSON = {"answer": answer}
    if args.wait is None:
        return text, result

    def look() -> JSON:
        status = get_status(url, args.timeout)
        if status.get("node") != name:
            raise Failed(f"the status at {url} is {status.get('node')}'s, not {name}'s")
        return status

    outcome, took = wait_until(look, lambda st: maintenance_done(st, name, on, held),
                               lambda st: maintenance_seen(st, name, held) + _failures(
                                   st, sent - 1), args.wait)
    result["wait"] = {"done": outcome, "seconds": round(took, 3)}
    return f"{text}\n{outcome} (after {took:.1f} s)", result


# -- fsha switchover --------------------------------------------------------------------------


def switchover_main(argv: list[str]) -> int:
    parser = _common("fsha switchover",
                     "Move a slot from its master to the primary candidate (planned).")
    parser.add_argument("slot")
    parser.add_argument("--to", help="the node expected to take it (must be the primary "
                                     "candidate)")
    args = parser.parse_args(argv)
    return _finish("fsha switchover", args, lambda: _switchover(args))


def _switchover(args: argparse.Namespace) -> tuple[str, JSON]:
    from fsha.config import ConfigError

    config, secret = _load(args.config)
    slot = args.slot
    if slot not in {s.name for s in config.slots}:
        known = ", ".join(s.name for s in config.slots)
        raise ConfigError([f"fsha switchover: no slot named {slot!r} (configured: {known})"])
    # Who masters it, as the first node that knows sees it; and who answers where.
    answering: dict[str, str] = {}  # status URL -> name of the node that answered there
    owner: str | None = None
    asked: list[str] = []

    def probe(url: str, name: str) -> JSON | None:
        try:
            status = get_status(url, args.timeout)
        except (urllib.error.URLError, OSError, ValueError) as e:
            asked.append(f"{name}'s address: {getattr(e, 'reason', e)}")
            return None
        answering[url] = str(status.get("node"))
        return status

    for node in config.nodes:
        url = base_url(node.status.host, node.status.port)
        if url in answering:
            continue  # a shared (loopback) address: the same node answers again
        status = probe(url, node.name)
        if status is None:
            continue
        entry = next((s for s in status["slots"] if s["name"] == slot), None)
        owner = entry["owner"] if entry else None
        asked.append(f"{status.get('node')} says {owner or 'nobody'}")
        if owner is not None:
            break
    if owner is None:
        raise Failed(f"no node reports a master for {slot} ({'; '.join(asked) or 'none'})")
    master = config.node(owner)
    url = base_url(master.status.host, master.status.port)
    if url not in answering:
        probe(url, owner)
    if answering.get(url, owner) != owner:
        raise Failed(f"{slot}'s master is {owner}, but {owner}'s status address "
                     f"{master.status} answers as {answering[url]} from here: run this on "
                     f"{owner}'s host, or give {owner} a status address reachable from here")
    sent = time.time()
    answer = _send(url, "/control/switchover", secret, config.name, owner,
                   {"slot": slot, "to": args.to}, args.timeout)
    successor = answer["to"]
    text = f"{slot}: {owner} is handing it over to {successor}"
    result: JSON = {"answer": answer}
    if args.wait is None:
        return text, result

    def look() -> JSON:
        return get_status(url, args.timeout)

    outcome, took = wait_until(look, lambda st: switchover_done(st, slot, successor),
                               lambda st: _slot_line(st, slot) + _failures(st, sent - 1),
                               args.wait)
    result["wait"] = {"done": outcome, "seconds": round(took, 3)}
    return f"{text}\n{outcome} (after {took:.1f} s)", result
