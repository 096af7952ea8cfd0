"""``fsha config push FILE``: change every node's config online, activated at one epoch.

    fsha config push NEW.toml --config /etc/fsha/cluster.toml [--dry-run] [--via NODE]

1. The file is checked as ``fsha check-config`` does (exit 2 with the problems).
2. Every node is asked for the config it runs (``/control/config/show``, signed for it):
   directly when its status address answers as that node from here, else relayed by the
   ``--via`` node (default: the node whose status address answers here, the local one)
   over its replication link (:mod:`fsha.replication.relay`). The difference is computed
   against the newest config the cluster runs (the highest epoch), not this host's file.
3. The plan is printed: every changed setting, online or *restart needed* (and why), and
   what moves (ranking, candidates, slots: :func:`fsha.configplan.moves`). ``--dry-run``
   stops here (exit 0 if the push would go ahead, 1 if not).
4. A restart-needed change, or a node alive in the cluster but unreachable from here,
   stops the push before anything is sent (exit 1): every live node must take it.
5. Stage: every node gets the file with the new epoch (the highest + 1) and checks it for
   itself; one refusal aborts the push everywhere (the staged copies are dropped) and
   prints each node's reason (exit 1).
6. Activate: every node that staged it writes the file (atomically) and applies it. A node
   that does not (unreachable at that instant) keeps its old config and drops its staged
   copy after 60 s; ``fsha status --all`` shows the mismatch; running the same push again
   brings only the nodes behind up to the epoch (exit 1 until all are there).

A node down during the push is skipped (the others must see it down); it comes back with
its old file and epoch, and the same push, run again, brings it up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsha.cli.control import base_url, get_status, post
from fsha.config import (
    ClusterConfig,
    ConfigError,
    load_config,
    node_warnings,
    secret_file_warnings,
    timing_warnings,
)
from fsha.configplan import (
    STAGE_TTL,
    Change,
    diff,
    file_body,
    moves,
    parse_text,
    seal_state,
    slot_moves,
)
from fsha.wire.control import sign

JSON = dict[str, Any]
RELAY_PATH = "/control/config/relay"
RELAY_WAIT = 11.0  # the relaying node waits 10 s for its peer (fsha.replication.relay)


@dataclass
class Target:
    name: str
    url: str | None  # its status address answers as it from here; None: relayed
    status: JSON | None = None
    epoch: int | None = None
    digest: str | None = None
    text: str | None = None
    path: str | None = None
    error: str | None = None  # why it could not be asked
    changes_after: Any = None  # its activation's "slot_changes_after" (fsha.slotchange)
    steps: dict[str, str] = field(default_factory=dict)


class Push:
    def __init__(self, config: ClusterConfig, secret: bytes, timeout: float) -> None:
        self.config = config
        self.secret = secret
        self.timeout = timeout
        self.via: Target | None = None

    def call(self, target: Target, path: str, body: JSON) -> tuple[int, JSON]:
        """A signed control request to ``target``, direct or relayed through ``via``."""
        if target.url is not None:
            return post(target.url, path, self.secret, self.config.name, target.name, body,
                        self.timeout)
        if self.via is None or self.via.url is None:
            return 0, {"error": "its status address does not answer here and no node "
                                "answers to relay (--via)"}
        inner = json.dumps(body)
        auth = sign(self.secret, self.config.name, target.name, "POST", path, inner.encode(),
                    time.time())
        code, answer = post(self.via.url, RELAY_PATH, self.secret, self.config.name,
                            self.via.name, {"to": target.name, "path": path, "auth": auth,
                                            "body": inner}, self.timeout + RELAY_WAIT)
        if code != 200:
            return code, {"error": f"relayed by {self.via.name}: "
                                   f"{answer.get('error', answer)}"}
        inner_answer = answer.get("answer")
        return int(answer.get("status", 0)), inner_answer if isinstance(inner_answer, dict) \
            else {"error": str(inner_answer)}

    def safe_call(self, target: Target, path: str, body: JSON) -> tuple[int, JSON]:
        try:
            return self.call(target, path, body)
        except (urllib.error.URLError, OSError, ValueError) as e:
            return 0, {"error": str(getattr(e, "reason", e))}


def _targets(push: Push, via: str | None, relay_all: bool = False) -> list[Target]:
    targets = []
    for node in push.config.nodes:
        url = base_url(node.status.host, node.status.port)
        target = Target(node.name, None)
        try:
            status = get_status(url, push.timeout)
            if status.get("node") == node.name:
                target.url, target.status = url, status
        except (urllib.error.URLError, OSError, ValueError):
            pass
        targets.append(target)
    if via is not None:
        push.via = next((t for t in targets if t.name == via), None)
        if push.via is None or push.via.url is None:
            raise ConfigError([f"--via {via}: its status address does not answer as it"])
    else:
        push.via = next((t for t in targets if t.url is not None), None)
    if relay_all:
        if push.via is None:
            raise ConfigError(["--relay: no node's status address answers here"])
        for target in targets:
            if target is not push.via:
                target.url = None
    for target in targets:
        code, answer = push.safe_call(target, "/control/config/show", {})
        if code == 200:
            target.epoch, target.digest = int(answer["epoch"]), str(answer["digest"])
            target.text, target.path = str(answer["text"]), str(answer["path"])
        else:
            target.error = str(answer.get("error", f"HTTP {code}"))
    return targets


def _alive_for(targets: list[Target], name: str) -> list[str]:
    """The nodes whose status (read from here) shows ``name`` alive."""
    return [t.name for t in targets if t.status is not None and any(
        n["name"] == name and n["alive"] and not n["self"] for n in t.status["nodes"])]


def _plan_lines(changes: list[Change], moved: list[str]) -> list[str]:
    lines = ["changes:"] if changes else ["changes: none (the same settings)"]
    for c in changes:
        lines.append(f"  {c}" + ("   (online)" if c.online else f"   RESTART NEEDED: {c.why}"))
    if moved:
        lines.append("what moves:")
        lines.extend(f"  {line}" for line in moved)
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fsha config", description="Change the cluster's config online.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("push", help="validate FILE, show the difference, distribute it to "
                                    "every node and activate it at one epoch")
    p.add_argument("file", help="the new cluster config (TOML)")
    p.add_argument("--config", default="/etc/fsha/cluster.toml",
                   help="the config this host runs (nodes' addresses, the secret)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the difference and what will move; change nothing")
    p.add_argument("--via", metavar="NODE", help="the node that relays to the nodes whose "
                                                 "status address does not answer here")
    p.add_argument("--relay", action="store_true",
                   help="ask every node but the --via one through its replication links, "
                        "even those whose status address answers here")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = parser.parse_args(argv)
    try:
        new_file = load_config(args.file)
        new_file.read_secret()
        current = load_config(args.config)
        secret = current.read_secret()
        text = Path(args.file).read_text(encoding="utf-8")
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 2
    warnings = secret_file_warnings(new_file) + node_warnings(new_file) + \
        timing_warnings(new_file)
    push = Push(current, secret, args.timeout)
    try:
        targets = _targets(push, args.via, args.relay)
    except ConfigError as e:
        print(e.problems[0], file=sys.stderr)
        return 2
    out = Report(args.json)
    for line in warnings:
        out.line(f"warning: {line}")
    return run(push, targets, text, args.file, args.dry_run, out)


class Report:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.data: JSON = {"lines": []}

    def line(self, text: str) -> None:
        self.data["lines"].append(text)
        if not self.as_json:
            print(text, flush=True)

    def end(self, code: int, result: str) -> int:
        self.data["result"] = result
        self.data["exit"] = code
        if self.as_json:
            print(json.dumps(self.data, indent=1))
        else:
            print(result, file=sys.stderr if code else sys.stdout)
        return code


def run(push: Push, targets: list[Target], text: str, file: str, dry_run: bool,
        out: Report) -> int:
    reached = [t for t in targets if t.epoch is not None]
    if not reached:
        return out.end(1, "no node could be asked for its config: "
                          + "; ".join(f"{t.name}: {t.error}" for t in targets))
    top = max(t.epoch for t in reached if t.epoch is not None)
    at_top = [t for t in reached if t.epoch == top]
    base = max(at_top, key=lambda t: sum(1 for u in at_top if u.digest == t.digest))
    assert base.text is not None and base.path is not None
    try:
        running = parse_text(base.text, Path(base.path))
        new = parse_text(text, Path(base.path))
    except ConfigError as e:
        return out.end(2, "; ".join(e.problems))
    digest = new.digest.hex()
    # the same file (the digest leaves [notify] out) already at the top everywhere there,
    # sealed: only the nodes behind get it, at that epoch; else a new epoch for all
    same = file_body(text)
    unsealed = [t.name for t in at_top
                if top > 0 and seal_state(t.text or "", push.secret) != "sealed"]
    catch_up = not unsealed and all(file_body(t.text or "") == same for t in at_top)
    if catch_up:
        epoch, chosen = top, [t for t in reached
                              if (t.epoch, file_body(t.text or "")) != (top, same)]
    else:
        epoch, chosen = top + 1, reached
    out.data.update(epoch=epoch, digest=digest, base={"node": base.name, "epoch": top,
                                                     "digest": base.digest})
    out.line(f"{file}: digest {digest}; the cluster runs epoch {top} (digest {base.digest}, "
             f"as {base.name} has it)")
    if unsealed:
        out.line(f"{', '.join(unsealed)}: the file at epoch {top} has no valid seal (edited "
                 f"after its push, or the secret changed): this push seals it at epoch "
                 f"{epoch}")
    changes = diff(running, new)
    view = push.via.status if push.via else None
    moved = moves(running, new, view) + slot_moves(running, new, view)
    for line in _plan_lines(changes, moved):
        out.line(line)
    out.data["changes"] = [{"key": c.key, "old": c.old, "new": c.new, "online": c.online,
                            "why": c.why} for c in changes]
    out.data["moves"] = moved
    blockers = []
    out.line("nodes:")
    for t in targets:
        if t.epoch is None:
            seen = _alive_for(targets, t.name)
            if seen:
                blockers.append(f"{t.name} is alive for {', '.join(seen)} but cannot be asked "
                                f"from here ({t.error})")
                out.line(f"  {t.name}: CANNOT BE REACHED ({t.error}); alive for "
                         f"{', '.join(seen)}")
            else:
                out.line(f"  {t.name}: down ({t.error}): skipped; push again once it is back")
            continue
        how = "direct" if t.url else f"via {push.via.name if push.via else '?'}"
        action = f"-> epoch {epoch}" if t in chosen else "already there"
        out.line(f"  {t.name}: runs epoch {t.epoch} digest {t.digest} ({how}) {action}")
    restart = [c for c in changes if not c.online]
    if restart:
        blockers.append(f"{len(restart)} change(s) need a restart: no node takes this file "
                        "online (a rolling restart with it: docs/operations.rst)")
    if not chosen:
        return out.end(0, f"nothing to push: every node reached runs this config "
                          f"(epoch {top}, digest {digest})")
    if blockers:
        return out.end(1, ("would be refused: " if dry_run else "refused, nothing changed: ")
                       + "; ".join(blockers))
    if dry_run:
        return out.end(0, f"dry run: would activate epoch {epoch} on "
                          f"{', '.join(t.name for t in chosen)}")
    # the masters of changed slots after the others: a master whose change fails lets
    # its slot go, and a successor that already runs the new config claims the new
    # addresses (fsha.slotchange)
    changed = {s.name for s in new.slots if s not in running.slots}
    movers = {str(s.get("owner")) for s in (view or {}).get("slots", [])
              if s.get("name") in changed and s.get("owner")}
    return _stage_and_activate(push, chosen, text, epoch, digest, out, movers)


def _report_changes(push: Push, t: Target, out: Report) -> None:
    """What the master of a changed slot did (fsha.slotchange), once it is done: read from
    its status while its changes run (bounded)."""
    after = t.changes_after
    if not isinstance(after, int):
        return
    if t.url is None:
        out.line(f"  {t.name}: changing its slot's addresses and profiles (relayed: see "
                 "fsha status --all)")
        return
    cfg = push.config
    deadline = time.monotonic() + 2 * cfg.floating_ip.timeout + 4 * push.timeout
    mine: list[JSON] = []
    while time.monotonic() < deadline:
        try:
            status = get_status(t.url, push.timeout)
        except (urllib.error.URLError, OSError, ValueError):
            status = {}
        mine = [c for c in (status.get("config") or {}).get("slot_changes") or []
                if c.get("seq", 0) > after]
        if status and all(c.get("state") != "running" for c in mine):
            break
        time.sleep(0.1)
    if not mine:
        out.line(f"  {t.name}: nothing to change (it holds what the new config says)")
    for c in mine:
        what = [f"{a} added" for a in c.get("added", [])] + \
            [f"{a} removed" for a in c.get("removed", [])] + \
            [f"profile {p} started" for p in c.get("started", [])] + \
            [f"profile {p} stopped" for p in c.get("stopped", [])
             if not any(k.startswith(f"{p}:") for k in c.get("kept", []))] + \
            [f"profile {k} kept" for k in c.get("kept", [])]
        state = str(c.get("state"))
        error = f": {c['error']}" if c.get("error") else ""
        out.line(f"  {c.get('slot')} on {t.name}: {', '.join(what)} ({state}{error})")


def _stage_and_activate(push: Push, chosen: list[Target], text: str, epoch: int, digest: str,
                        out: Report, movers: Collection[str] = ()) -> int:
    staged: list[Target] = []
    refusals: list[str] = []
    for t in chosen:
        code, answer = push.safe_call(t, "/control/config/stage", {"epoch": epoch, "text": text})
        if code == 200 and answer.get("digest") == digest:
            staged.append(t)
            t.steps["stage"] = "staged"
        else:
            reasons = answer.get("reasons") or [answer.get("error", f"HTTP {code}")]
            t.steps["stage"] = "; ".join(map(str, reasons))
            refusals.append(f"{t.name}: " + "; ".join(map(str, reasons)))
    if refusals:
        for t in staged:
            push.safe_call(t, "/control/config/abort", {"epoch": epoch, "digest": digest})
        for line in refusals:
            out.line(f"  refused by {line}")
        return out.end(1, f"push aborted: {len(refusals)} node(s) refused epoch {epoch}; "
                          "every node keeps its config")
    out.line(f"staged epoch {epoch} on {', '.join(t.name for t in staged)}")
    failed = []
    # the relaying node last: activating closes its links to nodes of another config,
    # which may be the only way to the nodes relayed
    staged.sort(key=lambda t: (t is push.via, t.name in movers, t.url is not None))
    for t in staged:
        code, answer = push.safe_call(t, "/control/config/activate",
                                      {"epoch": epoch, "digest": digest})
        if code == 200:
            t.steps["activate"] = "active"
            t.changes_after = answer.get("slot_changes_after")
        else:
            t.steps["activate"] = str(answer.get("error", f"HTTP {code}"))
            failed.append(f"{t.name}: {t.steps['activate']}")
    out.data["nodes"] = {t.name: t.steps for t in chosen}
    done = [t.name for t in chosen if t.steps.get("activate") == "active"]  # config order
    if done:
        out.line(f"activated epoch {epoch} (digest {digest}) on {', '.join(done)}")
    for t in staged:
        if t.name in movers and t.steps.get("activate") == "active":
            _report_changes(push, t, out)
    if failed:
        return out.end(1, f"not activated on {'; '.join(failed)}: those keep their config "
                          f"(the staged copy is dropped after {STAGE_TTL:.0f} s); run the "
                          "same push again to bring them up")
    return out.end(0, f"config epoch {epoch} active on {', '.join(done)}")
