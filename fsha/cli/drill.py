"""``fsha drill SLOT [--back]``: a planned failover of one slot, checked end to end.

    fsha drill slot1 --config /etc/fsha/cluster.toml [--sip-port 5060]
    fsha drill slot1 --back --config /etc/fsha/cluster.toml

It reads every node's status (the slot's master, its primary candidate, the calls and
registrations replicated for the slot), checks that the slot's floating addresses answer a
SIP ``OPTIONS``, moves the slot with a switchover (:mod:`fsha.cli.control`) and waits for
it, then checks the new master's takeover report (calls recovered, registrations restored,
against what was replicated before) and that the addresses answer again, now from the new
master. It prints a report and exits 0 when every check passed, 1 when one failed, 2 on a
bad argument or config. ``--back`` moves the slot back to the master it had before the
last move (from the current master's recent events) once that node is its primary
candidate again.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
from typing import Any

from fsha.cli.control import Failed, base_url, get_status, wait_until

JSON = dict[str, Any]


def sip_options(host: str, port: int, timeout: float) -> str:
    """Send one SIP OPTIONS over UDP; the status line of the answer, or raise OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    branch = "z9hG4bK" + os.urandom(6).hex()
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        local, lport = s.getsockname()[:2]
        request = (f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
                   f"Via: SIP/2.0/UDP {local}:{lport};branch={branch};rport\r\n"
                   f"Max-Forwards: 70\r\nFrom: <sip:drill@{local}>;tag={os.urandom(4).hex()}\r\n"
                   f"To: <sip:{host}:{port}>\r\nCall-ID: {os.urandom(8).hex()}@fsha-drill\r\n"
                   f"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        s.send(request.encode())
        deadline = time.monotonic() + timeout
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            data = s.recv(65535)  # socket.timeout (an OSError) when nothing comes
            line = data.split(b"\r\n", 1)[0].decode(errors="replace")
            if line.startswith("SIP/2.0") and branch.encode() in data:
                return line


def _statuses(config: Any, timeout: float) -> dict[str, JSON]:
    found: dict[str, JSON] = {}
    for node in config.nodes:
        try:
            status = get_status(base_url(node.status.host, node.status.port), timeout)
        except (urllib.error.URLError, OSError, ValueError):
            continue
        if status.get("node") == node.name:
            found[node.name] = status
    return found


def _owner(statuses: dict[str, JSON], slot: str) -> tuple[str | None, int]:
    for status in statuses.values():
        entry = next((s for s in status["slots"] if s["name"] == slot), None)
        if entry and entry["owner"]:
            return entry["owner"], int(entry["epoch"])
    return None, 0


def _probe(ips: list[str], port: int, timeout: float) -> tuple[bool, list[str]]:
    lines, ok = [], True
    for cidr in ips:
        host = cidr.split("/")[0]
        try:
            lines.append(f"{host}:{port} answered {sip_options(host, port, timeout)}")
        except OSError as e:
            ok = False
            lines.append(f"{host}:{port} did not answer ({e or 'timed out'})")
    return ok, lines


def main(argv: list[str]) -> int:
    from fsha.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="fsha drill", description=(
        "Run a planned failover of a slot and check it end to end (--back: return it)."))
    parser.add_argument("slot")
    parser.add_argument("--back", action="store_true",
                        help="move the slot back to the master it had before the last move")
    parser.add_argument("--config", default="/etc/fsha/cluster.toml")
    parser.add_argument("--sip-port", type=int, default=5060,
                        help="the slot profiles' SIP port on the floating IPs (default 5060)")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds the move may take (default 60)")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds for each HTTP request and SIP probe (default 5)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        if args.slot not in {s.name for s in config.slots}:
            raise ConfigError([f"fsha drill: no slot named {args.slot!r} (configured: "
                               f"{', '.join(s.name for s in config.slots)})"])
        report = drill(config, args)
    except ConfigError as e:
        print(e.problems[0], file=sys.stderr)
        return 2
    except Failed as e:
        print(f"fsha drill: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(render(report))
    return 0 if report["passed"] else 1


def drill(config: Any, args: argparse.Namespace) -> JSON:
    from fsha.cli.control import _switchover

    slot = args.slot
    statuses = _statuses(config, args.timeout)
    if not statuses:
        raise Failed("no node answers at its status address")
    owner, epoch = _owner(statuses, slot)
    if owner is None:
        raise Failed(f"{slot} has no master now: nothing to drill")
    master_status = statuses.get(owner)
    if master_status is None:
        raise Failed(f"{slot}'s master {owner} does not answer at its status address")
    target: str | None = None
    if args.back:
        claims = [e for e in master_status.get("events", [])
                  if e.get("event") == "claim" and e.get("slot") == slot and e.get("previous")]
        if not claims:
            raise Failed(f"{owner}'s recent events do not say where {slot} came from: "
                         "nothing to go back to")
        target = str(claims[-1]["previous"])
        if target == owner:
            raise Failed(f"{slot} is already on {owner}")

        def ranked(status: JSON) -> str | None:
            ranking = status.get("ranking") or []
            return "ranked" if ranking and ranking[0] == target else None

        # a node that handed a slot over is no candidate for a while (docs/operations.rst)
        wait_until(lambda: get_status(base_url(config.node(owner).status.host,
                                               config.node(owner).status.port), args.timeout),
                   ranked, lambda st: f"{target} is not the primary candidate yet (ranking: "
                   f"{', '.join(st.get('ranking') or []) or 'none'})", args.wait)
    # what the master feeds from its FreeSWITCH now (the replicated records of the slot may
    # still hold a previous master's, until they are retired)
    fed = ((master_status.get("feeds") or {}).get("slots") or {}).get(slot)
    if fed is not None:
        calls_before, regs_before = int(fed["calls"]), int(fed["registrations"])
    else:
        held = (master_status.get("replication") or {}).get("slots", {}).get(slot, {})
        calls_before, regs_before = held.get("call", 0), held.get("registration", 0)
    ips = next(s["ips"] for s in master_status["slots"] if s["name"] == slot)
    answered_before, before_lines = _probe(ips, args.sip_port, args.timeout)
    started = time.monotonic()
    moved = _switchover(argparse.Namespace(config=args.config, slot=slot, to=target,
                                           timeout=args.timeout, wait=args.wait, json=False))
    took = time.monotonic() - started
    successor = moved[1]["answer"]["to"]
    new_base = base_url(config.node(successor).status.host, config.node(successor).status.port)

    def reported(status: JSON) -> JSON | None:
        return next((e for e in reversed(status.get("events", []))
                     if e.get("event") == "takeover-acquire" and e.get("slot") == slot
                     and int(e.get("epoch") or 0) > epoch), None)
    report_event, _ = wait_until(lambda: get_status(new_base, args.timeout), reported,
                                 lambda st: f"{successor} has no takeover report for {slot} "
                                 "yet", args.wait)
    answered_after, after_lines = _probe(ips, args.sip_port, args.timeout)
    recovered = int(report_event.get("calls_recovered") or 0)
    restored = int(report_event.get("registrations_restored") or 0)
    checks = {
        "takeover ok": bool(report_event.get("ok")),
        f"calls recovered {recovered} of {calls_before}": recovered >= calls_before,
        f"registrations restored {restored} of {regs_before}": restored >= regs_before,
        "client address answered after": answered_after,
    }
    return {
        "slot": slot, "from": owner, "to": successor, "back": bool(args.back),
        "epoch_before": epoch, "epoch_after": report_event.get("epoch"),
        "move_s": round(took, 3), "takeover_ms": report_event.get("total_ms"),
        "steps_ms": report_event.get("steps_ms"), "warnings": report_event.get("warnings"),
        "calls_before": calls_before, "calls_recovered": recovered,
        "registrations_before": regs_before, "registrations_restored": restored,
        "answered_before": answered_before, "probes_before": before_lines,
        "probes_after": after_lines, "checks": checks, "passed": all(checks.values()),
    }


def render(r: JSON) -> str:
    lines = [f"drill of {r['slot']}{' (back)' if r['back'] else ''}: {r['from']} -> {r['to']}, "
             f"epoch {r['epoch_before']} -> {r['epoch_after']}, moved in {r['move_s']:.1f} s "
             f"(takeover {r['takeover_ms']} ms)"]
    steps = r.get("steps_ms") or {}
    if steps:
        lines.append("  steps: " + ", ".join(f"{k} {v} ms" for k, v in steps.items()))
    lines.append(f"  before: {r['calls_before']} call(s), {r['registrations_before']} "
                 f"registration(s) on {r['from']}; " + "; ".join(r["probes_before"]))
    lines.append("  after: " + "; ".join(r["probes_after"]))
    for warning in r.get("warnings") or []:
        lines.append(f"  warning: {warning}")
    for name, ok in r["checks"].items():
        lines.append(f"  {'ok  ' if ok else 'FAIL'} {name}")
    lines.append("PASSED" if r["passed"] else "FAILED")
    return "\n".join(lines)
