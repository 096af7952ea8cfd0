"""Status: the JSON each node serves, and ``fsha status``, which renders it for people.

The node serves ``GET /status`` (JSON) on its configured status address; ``fsha status``
(:mod:`fsha.cli.status`) fetches it and prints what :func:`render` makes of it: a table
an operator reads at a glance, with problems spelled out in words.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from twisted.web import resource
from twisted.web.server import Request

JSON = dict[str, Any]


class StatusResource(resource.Resource):
    isLeaf = True

    def __init__(self, status: Callable[[], JSON]) -> None:
        super().__init__()
        self._status = status

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self._status(), indent=1).encode() + b"\n"


def status_site_root(status: Callable[[], JSON],
                     control: resource.Resource | None = None,
                     history: Callable[[], list[JSON] | None] = lambda: None
                     ) -> resource.Resource:
    """``/status`` JSON; ``/`` the page for a browser (JSON for anything else), ``/view``
    its live part (:mod:`fsha.webpage`); ``/control`` the signed operator requests."""
    from fsha.webpage import PageResource, ViewResource

    root = resource.Resource()
    json_status = StatusResource(status)
    root.putChild(b"status", json_status)
    root.putChild(b"", PageResource(status, json_status, history))
    root.putChild(b"view", ViewResource(status, history))
    if control is not None:
        root.putChild(b"control", control)
    return root


# -- rendering ------------------------------------------------------------------------------


def _slot_change_problems(status: JSON) -> list[str]:
    """What this node holds of a slot beyond its config (an online change that failed, a
    removed profile kept for its calls: fsha.slotchange), and failed changes."""
    config = status.get("config") or {}
    me = status.get("node", "this node")
    found = []
    wanted = {s["name"]: s for s in status["slots"]}
    for name, held in sorted((config.get("held") or {}).items()):
        slot = wanted.get(name, {"ips": [], "profiles": []})
        ips = [a for a in held["ips"] if a not in {i.split("/")[0] for i in slot["ips"]}]
        profiles = [p for p in held["profiles"] if p not in slot["profiles"]]
        if ips or profiles:
            found.append(f"slot {name}: {me} still holds what the config no longer lists ("
                         + ", ".join([f"address {a}" for a in ips]
                                     + [f"profile {p}" for p in profiles])
                         + "); its release takes them down")
    last: dict[str, JSON] = {}
    for change in config.get("slot_changes") or []:
        last[change["slot"]] = change
    for name, change in sorted(last.items()):
        if change["state"] == "failed":
            found.append(f"slot {name}: the online config change failed on {me}: "
                         f"{change.get('error')}")
    return found


def problems(status: JSON) -> list[str]:
    """What an operator should look at, in words."""
    found: list[str] = []
    quorum = status["quorum"]
    if not quorum["ok"]:
        found.append(f"no quorum: {quorum['alive']} of {quorum['required']} required nodes "
                     "seen; this node will not take over any slot")
    for node in status["nodes"]:
        if node["self"]:
            continue
        if not node["alive"]:
            found.append(f"{node['name']} is down"
                         + (f" (last heard {_age(node)})" if _age(node) else " (never heard)"))
            continue
        for net, info in node["networks"].items():
            if not info["up"]:
                heard = info["last_heard_ms"]
                when = f"for {heard / 1000:.1f} s" if heard is not None else "since start"
                found.append(f"network {net}: {node['name']} unreachable {when}")
        if node.get("config") == "other":
            found.append(f"config mismatch: {node['name']} runs a different config file "
                         "(a push or rollout not finished? fsha status --all names each "
                         "node's epoch; a node behind catches up by itself within seconds "
                         "and says so in its status; takeovers wait while the files give "
                         "different views)")
        if node.get("live") is False:
            found.append(f"{node['name']} is heard but has not shown it is live now (no "
                         "echo of this node's heartbeats yet: counts for no quorum)")
        if not node["view_agrees"]:
            found.append(f"{node['name']} computes a different view of the cluster "
                         "(transient during a change; persistent means different inputs)")
        if "fs_ok" not in node["flags"]:
            found.append(f"{node['name']}: its FreeSWITCH is not answering")
        if "maintenance" in node["flags"]:
            found.append(f"{node['name']} is in maintenance (holds no slot, no candidate)")
    for slot in status["slots"]:
        if slot["owner"] is None:
            found.append(f"slot {slot['name']} has no master")
    found += _slot_change_problems(status)
    catch_up = (status.get("config") or {}).get("catch_up") or {}
    found.extend(f"config: {line}" for line in catch_up.get("problems") or [])
    me = next(n for n in status["nodes"] if n["self"])
    if "maintenance" in me["flags"]:
        found.append(f"{me['name']} (this node) is in maintenance (holds no slot, no "
                     "candidate)")
    if "fs_ok" not in me["flags"]:
        why = (status.get("freeswitch") or {}).get("last_error")
        found.append(f"{me['name']} (this node): its FreeSWITCH is not answering"
                     + (f" ({why})" if why else ""))
    for net in status.get("networks", []):
        if net["send_errors"]:
            found.append(f"network {net['name']}: {net['send_errors']} send errors "
                         f"(last: {net['last_error']})")
    replication = status.get("replication")
    alive = {n["name"] for n in status["nodes"] if n["alive"] and not n["self"]}
    if replication:
        for name, peer in sorted(replication["peers"].items()):
            if not peer["up"] and name in alive:
                why = f": {peer['last_error']}" if peer.get("last_error") else ""
                found.append(f"replication link to {name} is down{why}")
    redis = status.get("redis")
    if redis and redis.get("state") != "up":
        why = f" ({redis['last_error']})" if redis.get("last_error") else ""
        found.append(f"redis: down since {_clock(redis.get('since'))}{why}; hiredis "
                     "releases wait, takeovers go on")
    durable = status.get("durable")
    if durable:
        if durable.get("state") == "dirty" and (durable.get("last_error") or
                                                (redis and redis.get("state") != "up")):
            found.append(f"durable state: not written since {_clock(durable.get('dirty_since'))}"
                         f" ({durable.get('last_error') or 'redis down'}); full resync when "
                         "Redis answers, a whole-cluster restart would load older state")
        load = durable.get("load") or {}
        if load.get("state") == "failed":
            found.append(f"durable state: nothing loaded at start ({load.get('error')})")
    guard = status.get("guard")
    if guard and guard.get("enabled"):
        if guard.get("state") == "failed":
            found.append("guard: given up after repeated deaths: this node takes no slot "
                         "(restart fsha)")
        elif guard.get("state") in ("restarting", "starting") and guard.get("restarts"):
            found.append(f"guard: {guard['state']} (restarted {guard['restarts']} time(s))")
    elif guard is not None:
        found.append("guard: disabled ([guard] enabled = false): if fsha dies while master, "
                     "this host keeps serving its slot")
    limits = status.get("limits")
    if limits:
        if limits.get("pending_releases"):
            found.append(f"limits: {limits['pending_releases']} hiredis unit(s) waiting to "
                         "be released in Redis")
        if limits.get("reconciles_waiting"):
            found.append(f"limits: {limits['reconciles_waiting']} takeover reconciliation(s) "
                         f"not done yet ({limits.get('last_error')})")
    hold = (status.get("quorum") or {}).get("claim_hold")
    if hold:
        found.append(f"{me['name']} (this node) waits to take a slot over: {hold}")
    return found


def durable_line(d: dict[str, Any]) -> str:
    """``fsha status``'s line for the durable store (``[redis] durable_state``)."""
    state = d.get("state")
    if state == "in-sync":
        written = d.get("written") or [0, 0]
        text = f"in sync (sequence {written[1]})"
    elif state == "behind":
        text = f"behind by {d.get('lag_changes')} change(s)"
    elif state == "dirty":
        why = f" ({d['last_error']})" if d.get("last_error") else ""
        text = f"dirty since {_clock(d.get('dirty_since'))}{why}: full resync due"
    else:
        text = str(state)
    load = d.get("load") or {}
    if load.get("state") == "applied":
        slots = ", ".join(f"slot {s} from node {v['master']}"
                          for s, v in sorted((load.get("slots") or {}).items()))
        loaded = (f"loaded {load.get('records', 0)} record(s) of "
                  f"{len(load.get('origins') or {})} origin(s)" + (f", {slots}" if slots else ""))
    elif load.get("state") == "failed":
        loaded = f"nothing loaded ({load.get('error')})"
    else:
        loaded = f"load {load.get('state')}"
    return f"durable state: {text}; {loaded}"


def _clock(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "?"
    return time.strftime("%H:%M:%S", time.localtime(t))


def _age(node: JSON) -> str:
    heard = [i["last_heard_ms"] for i in node["networks"].values()
             if i["last_heard_ms"] is not None]
    return f"{min(heard) / 1000:.1f} s ago" if heard else ""


def config_label(status: JSON) -> str:
    """``a1b2c3d4e5f60718 epoch 6`` (+ ``, epoch 7 staged``): the config a node runs."""
    config = status.get("config") or {}
    label = f"{status.get('config_digest', '?')} epoch {config.get('epoch', '?')}"
    staged = config.get("staged")
    if staged:
        label += f", epoch {staged['epoch']} staged"
    catch_up = config.get("catch_up") or {}
    pending = catch_up.get("pending")
    if pending:
        label += f", epoch {pending['epoch']} in the file (RESTART NEEDED)"
    elif catch_up.get("state") in ("behind", "hand-edited"):
        label += ", CATCHING UP" if catch_up["state"] == "behind" else ", file edited by hand"
    return label


def render(status: JSON) -> str:
    lines: list[str] = []
    q = status["quorum"]
    lines.append(f"cluster {status['cluster']}   seen from {status['node']} "
                 f"({status['role']}{' of ' + status['slot'] if status['slot'] else ''})   "
                 f"quorum {'ok' if q['ok'] else 'LOST'} ({q['alive']} seen, "
                 f"{q['required']} needed)   "
                 f"config {config_label(status)}")
    nets = [n["name"] for n in status.get("networks", [])] or \
        sorted({k for node in status["nodes"] for k in node["networks"]})
    header = ["NODE", "ROLE", "RANK", "SLOT", "EPOCH", *[f"NET {n}" for n in nets], "FLAGS"]
    rows = [header]
    for node in status["nodes"]:
        role = node["role"] if node["alive"] else "DOWN"
        rank = "-" if node["rank"] is None else str(node["rank"] + 1)
        cells = [node["name"] + ("*" if node["self"] else ""), role, rank,
                 node["slot"] or "-", "-" if not node["slot"] else str(node["epoch"])]
        for net in nets:
            if node["self"]:
                cells.append("self")
            else:
                info = node["networks"].get(net, {})
                heard = info.get("last_heard_ms")
                rtt = info.get("rtt_ms")
                state = "up" if info.get("up") else "DOWN"
                cell = f"{state} {heard:.0f}ms" if heard is not None else state
                if rtt is not None and info.get("up"):
                    cell += f" rtt {rtt:.2f}ms"
                cells.append(cell)
        cells.append(",".join(node["flags"]) or "-")
        rows.append(cells)
    lines.append("")
    lines.extend(_table(rows))
    lines.append("")
    slot_rows = [["SLOT", "MASTER", "EPOCH", "FLOATING IPS", "PROFILES"]]
    for slot in status["slots"]:
        slot_rows.append([slot["name"], slot["owner"] or "NONE", str(slot["epoch"]),
                          " ".join(slot["ips"]), " ".join(slot["profiles"])])
    lines.extend(_table(slot_rows))
    replication = status.get("replication")
    if replication:
        lines.append("")
        lines.append(f"replication: {replication['records']} records, digest "
                     f"{replication['digest'][:16]}")
        rep_rows = [["PEER", "LINK", "NETWORK", "LAG", "IN", "OUT"]]
        for name, peer in sorted(replication["peers"].items()):
            lag = ("-" if peer.get("lag_changes") is None else
                   f"{peer['lag_changes']} ch / {peer.get('lag_ms') or 0:.1f} ms")
            rep_rows.append([name, "up" if peer["up"] else "DOWN", peer.get("network") or "-",
                             lag, _bytes(peer["bytes_in"]), _bytes(peer["bytes_out"])])
        lines.extend(_table(rep_rows))
        counts = ", ".join(f"{slot}: " + " ".join(f"{n} {kind}" for kind, n in kinds.items())
                           for slot, kinds in replication["slots"].items())
        if counts:
            lines.append(f"records by slot: {counts}")
    limits = status.get("limits")
    if limits:
        lines.append("")
        totals = limits.get("totals") or {}
        shown = ", ".join(f"{k} {n}" for k, n in list(totals.items())[:12])
        more = f" (+{len(totals) - 12} more)" if len(totals) > 12 else ""
        lines.append(f"limits: {shown or 'no usage'}{more}; adopted calls "
                     f"{limits.get('adopted', 0)} here / {limits.get('adopted_cluster', 0)} "
                     f"cluster; pending releases {limits.get('pending_releases', 0)}")
    redis = status.get("redis")
    if redis:
        state = ("up" if redis.get("state") == "up"
                 else f"down since {_clock(redis.get('since'))}")
        lines.append(f"redis: {redis.get('address')} {state}"
                     + (" (tls)" if redis.get("tls") else ""))
    durable = status.get("durable")
    if durable:
        lines.append(durable_line(durable))
    guard = status.get("guard")
    if guard and guard.get("enabled"):
        holding = guard.get("holding")
        drop = guard.get("last_drop")
        lines.append(f"guard: {guard.get('state')} (pid {guard.get('pid')}, lease "
                     f"{guard.get('lease_ms', 0):g} ms), "
                     + (f"holding {holding['slot']}/{holding['epoch']}" if holding
                        else "holding nothing")
                     + (f"; last drop {drop['slot']}/{drop['epoch']} at "
                        f"{_clock(drop.get('time'))}: {drop.get('reason')}" if drop else ""))
    found = problems(status)
    lines.append("")
    lines.append("problems: none" if not found else "problems:")
    lines.extend(f"  ! {p}" for p in found)
    if status["drops"]:
        lines.append("dropped datagrams: " + ", ".join(
            f"{k}={v}" for k, v in sorted(status["drops"].items())))
    events = status.get("events", [])[-8:]
    if events:
        lines.append("recent events:")
        for e in events:
            lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(e['time']))}"
                         f".{int(e['time'] * 1000) % 1000:03d} {event_text(e)}")
    return "\n".join(lines)


def event_value(value: Any) -> str:
    """An event field for people: lists joined, mappings as ``key value``, no Python
    reprs."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(event_value(v) for v in value) or "none"
    if isinstance(value, dict):
        return "; ".join(f"{k} {event_value(v)}" for k, v in value.items()) or "none"
    return str(value)


def event_text(event: JSON) -> str:
    """``takeover-done slot=slot1 epoch=3 ...`` with every value readable."""
    parts = [str(event.get("event"))]
    for key, value in event.items():
        if key in ("time", "event") or value is None or value == [] or value == {}:
            continue
        text = event_value(value)
        parts.append(f"{key}={text}" if " " not in text else f"{key}=[{text}]")
    return " ".join(parts)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]
