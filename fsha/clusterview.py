"""``fsha status --all``: every node's view side by side, what they disagree on, and the
warnings an operator expects, in words. Pure: it takes the statuses (or why one could not be
read) and returns text; :mod:`fsha.cli.status` fetches them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from fsha.status import problems

JSON = dict[str, Any]


def _short(digest: str | None) -> str:
    return (digest or "?")[:8]


def _epoch(status: JSON) -> str:
    """`` epoch N`` (nothing from a node that does not say), and whether it catches up."""
    config = status.get("config") or {}
    epoch = config.get("epoch")
    if epoch is None:
        return ""
    catch_up = config.get("catch_up") or {}
    if catch_up.get("pending"):
        return f" epoch {epoch} (file: {catch_up['pending']['epoch']}, restart needed)"
    if catch_up.get("state") == "behind":
        return f" epoch {epoch} (catching up)"
    return f" epoch {epoch}"


def _me(status: JSON) -> JSON:
    return next(n for n in status["nodes"] if n["self"])


def _clock(t: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "?"


def _groups(values: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """{node: value} -> [(value, [nodes])], the most common value first."""
    by: dict[str, list[str]] = {}
    for name, value in values.items():
        by.setdefault(value, []).append(name)
    return sorted(by.items(), key=lambda kv: -len(kv[1]))


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " and " + names[-1]


def table(order: list[str], views: Mapping[str, JSON | str]) -> list[str]:
    answered = {n: v for n, v in views.items() if isinstance(v, dict)}
    first = next(iter(answered.values()), None)
    slot_names = [s["name"] for s in first["slots"]] if first else []
    rows: list[list[str]] = [["", *order]]

    def row(label: str, cell: Any) -> None:
        rows.append([label, *[cell(answered[n]) if n in answered else
                              ("NO ANSWER" if label == "role" else "") for n in order]])

    row("role", lambda v: v["role"] + (f" {v['slot']}/{v['epoch']}" if v.get("slot") else ""))
    row("quorum", lambda v: ("ok" if v["quorum"]["ok"] else "LOST")
        + f" {v['quorum']['alive']} of {v['quorum']['required']}")
    row("config", lambda v: _short(v.get("config_digest")) + _epoch(v))
    row("view", lambda v: _short(v.get("view_digest")))
    for other in order:
        def sees(v: JSON, other: str = other) -> str:
            entry = next((n for n in v["nodes"] if n["name"] == other), None)
            if entry is None:
                return "?"
            if entry["self"]:
                return "self"
            if not entry["alive"]:
                return "DOWN"
            down = [net for net, info in entry["networks"].items() if not info["up"]]
            return "up" + (f" (not {','.join(down)})" if down else "")
        row(f"sees {other}", sees)
    for slot in slot_names:
        row(f"{slot} master", lambda v, slot=slot: next(
            (s["owner"] or "NONE") for s in v["slots"] if s["name"] == slot))
    row("ranking", lambda v: ",".join(v.get("ranking") or []) or "none")
    row("uptime", lambda v: f"{v.get('uptime_s', 0):.0f} s")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def disagreements(order: list[str], views: Mapping[str, JSON | str]) -> list[str]:
    answered = {n: v for n, v in views.items() if isinstance(v, dict)}
    found: list[str] = []
    for key, what, why in (
            ("config_digest", "config", "config mismatch: a push or rollout not finished? "
                                        "a node behind catches up by itself within "
                                        "seconds (its status says how); takeovers wait "
                                        "while the files give different views"),
            ("view_digest", "view of the cluster", "transient during a change; persistent "
                                                   "means different inputs")):
        groups = _groups({n: _short(v.get(key)) + (_epoch(v) if key == "config_digest"
                                                   else "") for n, v in answered.items()})
        if len(groups) > 1:
            parts = [f"{_names(names)} {'runs' if len(names) == 1 else 'run'} "
                     f"{value}" for value, names in groups]
            found.append(f"the {what} differs: {'; '.join(parts)} ({why})")
    slot_names = [s["name"] for s in next(iter(answered.values()))["slots"]] if answered \
        else []
    for slot in slot_names:
        groups = _groups({n: next((s["owner"] or "nobody") for s in v["slots"]
                                  if s["name"] == slot) for n, v in answered.items()})
        if len(groups) > 1:
            found.append(f"{slot}: " + "; ".join(
                f"{_names(names)} {'says' if len(names) == 1 else 'say'} {owner} masters it"
                for owner, names in groups))
    for other in order:
        seen: dict[str, str] = {}
        for name, v in answered.items():
            entry = next((e for e in v["nodes"] if e["name"] == other), None)
            if entry is None or entry["self"]:
                continue
            seen[name] = "up" if entry["alive"] else "down"
            for net, info in entry["networks"].items():
                if entry["alive"] and not info["up"]:
                    found.append(f"network {net}: {name} does not hear {other} (the path "
                                 f"between them on {net} is broken)")
        groups = _groups(seen)
        if len(groups) > 1:
            found.append(f"{other} is " + "; ".join(
                f"{state} for {_names(names)}" for state, names in groups)
                + " (a partial network fault)")
    return found


def warnings(order: list[str], views: Mapping[str, JSON | str],
             addresses: Mapping[str, str] | None = None) -> list[str]:
    """``addresses``: IP -> node name (from the config), to name drops' sources."""
    addresses = addresses or {}
    answered = {n: v for n, v in views.items() if isinstance(v, dict)}
    found: list[str] = []
    for name in order:
        view = views.get(name)
        if isinstance(view, dict):
            continue
        # what the others know of it
        ends = []
        for v in answered.values():
            peer = ((v.get("replication") or {}).get("peers") or {}).get(name) or {}
            if peer.get("last_end") and not peer.get("up"):
                ends.append(peer["last_end"])
        alive_for = [n for n, v in answered.items()
                     if any(e["name"] == name and e["alive"] for e in v["nodes"])]
        if alive_for:
            found.append(f"{name} does not answer at its status address ({view}) but "
                         f"{_names(alive_for)} still hear(s) it")
        elif ends and all(e.get("clean") for e in ends):
            found.append(f"{name} stopped cleanly at {_clock(max(e['time'] for e in ends))} "
                         "(its replication links were closed)")
        elif ends:
            last = max(ends, key=lambda e: e.get("time") or 0)
            found.append(f"{name} crashed or was cut off at {_clock(last.get('time'))} (its "
                         f"links were lost: {last.get('reason')})")
        else:
            found.append(f"{name} is down ({view})")
    if answered:
        first = next(iter(answered.values()))
        for slot in first["slots"]:
            if slot["owner"] is None:
                continue
            standbys = [n for n in first.get("ranking") or [] if n != slot["owner"]]
            if not standbys:
                found.append(f"no standby left for {slot['name']}: if {slot['owner']} "
                             "fails, it has no master (no slave is ranked)")
    for name, v in answered.items():
        recent = v.get("recent_drops") or {}
        window = recent.get("window_s", 0)
        for reason, sources in (recent.get("by_reason") or {}).items():
            if reason == "duplicate":
                continue  # the same heartbeat on another network: normal
            for source, count in sorted(sources.items(), key=lambda kv: -kv[1]):
                found.append(f"{name} dropped {count} datagram(s) ({reason}) from "
                             f"{source}" + (f" ({addresses[source]})" if source in addresses
                                            else "") + f" in the last {window:g} s")
        for problem in problems(v):
            line = f"{name}: {problem}"
            if line not in found:
                found.append(line)
    return found


def render_all(order: list[str], views: Mapping[str, JSON | str],
               addresses: Mapping[str, str] | None = None) -> str:
    answered = [n for n in order if isinstance(views.get(n), dict)]
    cluster = next((views[n]["cluster"] for n in answered), "?")  # type: ignore[index]
    lines = [f"cluster {cluster}: {len(order)} node(s) asked, {len(answered)} answered", ""]
    lines += table(order, views)
    found = disagreements(order, views)
    lines += ["", "agreement: all nodes that answered agree" if not found else
              "disagreements:"]
    lines += [f"  ! {d}" for d in found]
    warned = warnings(order, views, addresses)
    lines += ["", "warnings: none" if not warned else "warnings:"]
    lines += [f"  ! {w}" for w in warned]
    return "\n".join(lines)
