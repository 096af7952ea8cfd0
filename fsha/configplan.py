"""An online config change, as pure logic: what differs, what can change without a restart,
what will move, and the config epoch rules (``fsha config push``, :mod:`fsha.cli.config`;
the node side is :mod:`fsha.configstage`).

* **The diff.** Both configs are flattened to ``key -> value`` text (``node.fs2.priority``,
  ``slot.pbx-a.ip``, ``notify.command``...) and compared key by key; secrets are shown as
  a hash prefix, never in clear.
* **Online or restart.** A change is applied online only if every running node can apply
  it at once and mean the same thing: a node's priority (the slaves' ranking), the
  ``[notify]`` settings, a slot's floating IPs and profiles, and slots appended
  (:func:`slot_refusal` and :func:`slot_list_refusal` say when not; :func:`slot_actions`
  what the slot's master does at activation: :mod:`fsha.slotchange`). Anything else (a
  node's own addresses, ports, ESL, TLS files, timings, quorum, the node list, slots
  removed or reordered, sections read at start) is *restart-needed*:
  the push is refused, naming each key and why, and every node keeps its config (a
  rolling restart with the file is the way: docs/operations.rst).
* **What will move.** The pure role engine (:func:`fsha.roles.compute_roles`) is run on
  the members a node's status shows, with the old and the new priorities: the ranking and
  which orphaned slot would go to whom, before and after; and which addresses and profiles
  each slot's master adds and removes (:func:`slot_moves`).
* **Epochs.** A pushed config carries an epoch, written as the file's first line
  (``# fsha-config-epoch: N``) so a restarted node keeps it; a file without the line is
  epoch 0. A node stages an epoch only above the one it runs, and at most one staged
  epoch at a time; a staged config is activated by the activate request for the same
  epoch and digest, or dropped (abort, or :data:`STAGE_TTL` seconds without activation).
* **Seals.** The epoch line of a pushed file carries a seal, ``seal=`` and an HMAC under
  a key derived from the cluster secret of the epoch and the rest of the file, so a file
  proves by itself that a push made it (:func:`seal_state`): a node that was behind takes
  a newer epoch from a peer only with its seal right (:mod:`fsha.configcatchup`), and a
  file edited by hand after its push (seal wrong) is neither offered nor replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsha.config import (
    ClusterConfig,
    ConfigError,
    FloatingIP,
    NodeConfig,
    SlotConfig,
    parse_config,
)
from fsha.roles import Member, compute_roles
from fsha.wire.heartbeat import NO_SLOT, Flags, Role

#: Seconds a staged config waits for its activation before it is dropped.
STAGE_TTL = 60.0
EPOCH_LINE = "# fsha-config-epoch: "
_EPOCH_RE = re.compile(r"\A# fsha-config-epoch: (\d{1,18})[^\n]*\n?")
#: Keys (regular expressions over the flattened keys) a running node applies online.
ONLINE_KEYS = (re.compile(r"node\.[^.]+\.priority\Z"), re.compile(r"notify\.[a-z_]+\Z"))
#: A slot's keys applied online, unless :func:`slot_refusal` says why not.
SLOT_KEY = re.compile(r"slot\.(?P<slot>[^.]+)\.(?P<what>ip|profiles)\Z")
_SECRET_KEYS = (re.compile(r".*\.esl\.password\Z"),)


# -- epochs in the file ---------------------------------------------------------------------


def file_epoch(text: str) -> int:
    """The epoch a config file's first line names (0 without one)."""
    match = _EPOCH_RE.match(text)
    return int(match.group(1)) if match else 0


def with_epoch(text: str, epoch: int, note: str = "") -> str:
    """``text`` with its epoch line set to ``epoch`` (added, or replacing the old one)."""
    body = _EPOCH_RE.sub("", text, count=1)
    return f"{EPOCH_LINE}{epoch}{('  ' + note) if note else ''}\n{body}"


_SEAL_RE = re.compile(r"\A# fsha-config-epoch: \d{1,18}\s+seal=([0-9a-f]{32})\s*\n")


def _seal(secret: bytes, epoch: int, body: str) -> str:
    key = hmac.new(secret, b"fsha config seal v1", hashlib.sha256).digest()
    return hmac.new(key, f"{epoch}\n".encode() + body.encode("utf-8"),
                    hashlib.sha256).hexdigest()[:32]


def sealed(text: str, epoch: int, secret: bytes) -> str:
    """``text`` with its epoch line set to ``epoch`` and sealed with the cluster secret."""
    body = _EPOCH_RE.sub("", text, count=1)
    return f"{EPOCH_LINE}{epoch}  seal={_seal(secret, epoch, body)}\n{body}"


def seal_state(text: str, secret: bytes) -> str:
    """``none``: no epoch line (epoch 0, never pushed); ``sealed``: the line's seal matches
    the epoch and the rest of the file; ``hand-edited``: an epoch line without a seal, or
    whose seal does not match (the file was changed after its push)."""
    if not _EPOCH_RE.match(text):
        return "none"
    match = _SEAL_RE.match(text)
    if match is None:
        return "hand-edited"
    body = _EPOCH_RE.sub("", text, count=1)
    good = _seal(secret, file_epoch(text), body)
    return "sealed" if hmac.compare_digest(good, match.group(1)) else "hand-edited"


def file_body(text: str) -> str:
    """A config file's text without its epoch line: equal for the same settings pushed."""
    return _EPOCH_RE.sub("", text, count=1)


def file_id(text: str) -> str:
    """The first 16 hex digits of the SHA-256 of a file's text: which file, exactly (the
    config digest leaves out settings such as [notify])."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def parse_text(text: str, path: Path) -> ClusterConfig:
    """A config from its text, relative paths resolved as if it were at ``path``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    return parse_config(raw, path)


# -- the diff -------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "(none)"
    return str(value)


def _section(out: dict[str, str], prefix: str, value: Any, skip: tuple[str, ...] = ()) -> None:
    if value is None:
        out[prefix] = "(none)"
        return
    for f in dataclasses.fields(value):
        if f.name in skip:
            continue
        item = getattr(value, f.name)
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            _section(out, f"{prefix}.{f.name}", item)
        elif isinstance(item, dict):
            for k in sorted(item):
                out[f"{prefix}.{f.name}.{k}"] = _text(item[k])
        else:
            out[f"{prefix}.{f.name}"] = _text(item)


def flatten(config: ClusterConfig) -> dict[str, str]:
    """Every setting of ``config`` as ``key -> text``; equal configs give equal dicts."""
    out: dict[str, str] = {
        "cluster.name": config.name, "cluster.secret_file": str(config.secret_file),
        "cluster.heartbeat_interval": _text(config.heartbeat_interval),
        "cluster.dead_after": _text(config.dead_after),
        "cluster.discovery": _text(config.discovery), "cluster.quorum": config.quorum_spec,
        "network (list)": _text([n.name for n in config.networks]),
        "node (list)": _text([n.name for n in config.nodes]),
        "slot (list)": _text([s.name for s in config.slots]),
    }
    for net in config.networks:
        out[f"network.{net.name}.port"] = str(net.port)
    for node in config.nodes:
        _section(out, f"node.{node.name}", node, skip=("name", "node_id"))
    for slot in config.slots:
        out[f"slot.{slot.name}.ip"] = _text([str(ip) for ip in slot.ips])
        out[f"slot.{slot.name}.profiles"] = _text(list(slot.profiles))
    for name in ("floating_ip", "tls", "fencing", "limits", "redis", "guard", "takeover",
                 "state", "notify"):
        _section(out, name, getattr(config, name), skip=("explicit",))
    for key in out:
        if any(r.match(key) for r in _SECRET_KEYS):
            out[key] = "sha256:" + hashlib.sha256(out[key].encode()).hexdigest()[:8]
    return out


@dataclass(frozen=True, slots=True)
class Change:
    key: str
    old: str | None  # None: not in the old config
    new: str | None  # None: not in the new config
    online: bool
    why: str  # for a restart-needed change: why, and who must restart

    def __str__(self) -> str:
        old = "(absent)" if self.old is None else self.old
        new = "(absent)" if self.new is None else self.new
        return f"{self.key}: {old} -> {new}"


def _restart_reason(key: str, old: ClusterConfig) -> str:
    parts = key.split(".")
    if parts[0] == "node" and len(parts) > 2 and parts[1] in {n.name for n in old.nodes}:
        return f"{parts[1]}'s own {'.'.join(parts[2:])}: restart {parts[1]} with the file"
    if key.endswith("(list)"):
        return "the cluster's shape: a rolling restart (docs/operations.rst, Config rollouts)"
    if parts[0] == "notify":
        return "[notify] added or removed: the notifier is made at start-up; restart each node"
    if parts[0] == "cluster":
        return "every node reads it at start-up: a rolling restart (whole-cluster for the " \
               "secret or name)"
    if parts[0] == "network":
        return "heartbeat sockets are bound at start-up: a rolling restart"
    return f"[{parts[0]}] is read at start-up: restart each node"


def diff(old: ClusterConfig, new: ClusterConfig) -> list[Change]:
    """Every setting that differs, each marked online or restart-needed (with why)."""
    a, b = flatten(old), flatten(new)
    notify_both = old.notify is not None and new.notify is not None
    changes = []
    for key in sorted(set(a) | set(b), key=_order):
        if a.get(key) == b.get(key):
            continue
        if key == "slot (list)":
            why = slot_list_refusal(old, new)
            changes.append(Change(key, a.get(key), b.get(key), why is None, why or ""))
            continue
        slot_key = SLOT_KEY.match(key)
        if slot_key is not None:
            why = slot_refusal(slot_key["slot"], slot_key["what"], old, new)
            changes.append(Change(key, a.get(key), b.get(key), why is None, why or ""))
            continue
        online = any(r.match(key) for r in ONLINE_KEYS) and (
            notify_both if key.startswith("notify") else key in a and key in b)
        changes.append(Change(key, a.get(key), b.get(key), online,
                              "" if online else _restart_reason(key, old)))
    return changes


def _slot(config: ClusterConfig, name: str) -> SlotConfig | None:
    return next((s for s in config.slots if s.name == name), None)


def slot_list_refusal(old: ClusterConfig, new: ClusterConfig) -> str | None:
    """Why a change of the slot list is not applied online (None: it is, or there is
    none): only slots appended at the end are (the role engine gives each to a slave)."""
    before, after = [s.name for s in old.slots], [s.name for s in new.slots]
    if before == after:
        return None
    if after[:len(before)] != before:
        return ("slots removed or reordered: a removed slot's master would have to let it "
                "go first, and slot numbers would shift: a rolling restart "
                "(docs/operations.rst, Config rollouts)")
    if old.takeover.hot_standby or new.takeover.hot_standby:
        return ("slots added with hot standby profiles: every node starts every slot's "
                "profiles and fences its addresses at start-up: a rolling restart")
    return None


def slot_refusal(name: str, what: str, old: ClusterConfig, new: ClusterConfig) -> str | None:
    """Why a change of slot ``name``'s ``ip`` or ``profiles`` is not applied online (None:
    it is, by the slot's master at activation: :func:`slot_actions`; an added slot is
    claimed by the role engine's rules)."""
    before, after = _slot(old, name), _slot(new, name)
    if after is None:
        return ("a slot removed: its master would have to let it go first: a rolling "
                "restart (docs/operations.rst, Config rollouts)")
    why = slot_list_refusal(old, new)
    if why is not None:
        return why
    if before is None:  # appended: its addresses and profiles must be nobody's yet
        before = SlotConfig(name, after.slot_id, (), ())
    if what == "ip":
        if old.takeover.hot_standby or new.takeover.hot_standby:
            return ("hot standby profiles: every node's profiles are bound to the slot's "
                    "addresses and the egress fence lists them, both set up at start-up: "
                    "a rolling restart")
        old_ips = {ip.address for ip in before.ips}
        for ip in after.ips:
            owner = next((s.name for s in old.slots if s.name != name
                          and any(o.address == ip.address for o in s.ips)), None)
            if owner is not None and ip.address not in old_ips:
                return (f"{ip.address} is slot {owner}'s in the running config: remove it "
                        f"there first (one push), then add it here (another), so that no "
                        f"two hosts hold it")
        return None
    for profile in after.profiles:
        owner = next((s.name for s in old.slots if s.name != name
                      and profile in s.profiles), None)
        if owner is not None and profile not in before.profiles:
            return (f"profile {profile} is slot {owner}'s in the running config: remove it "
                    f"there first (one push), then add it here (another)")
    return None


def profile_refusals(old: ClusterConfig, new: ClusterConfig,
                     calls: Callable[[int, str], int]) -> list[str]:
    """Why a change is refused for the calls it would drop: a profile removed from a
    slot while ``calls(slot_id, profile)`` (the replicated calls) counts some."""
    out = []
    for after in new.slots:
        before = _slot(old, after.name)
        if before is None:
            continue
        for profile in before.profiles:
            n = calls(before.slot_id, profile) if profile not in after.profiles else 0
            if n:
                out.append(f"slot.{after.name}.profiles: profile {profile} carries {n} "
                           f"call(s): it is stopped only without calls; push again once "
                           f"they are over (or keep it in the list)")
    return out


@dataclass(frozen=True, slots=True)
class SlotActions:
    """What one node does about one slot at an online change (:func:`slot_actions`)."""

    slot: str
    add: tuple[FloatingIP, ...] = ()  # addresses put up (with gratuitous ARP), first
    remove: tuple[FloatingIP, ...] = ()  # then these taken down
    start: tuple[str, ...] = ()  # profiles started
    stop: tuple[str, ...] = ()  # profiles stopped (none of their calls may be up)

    def __bool__(self) -> bool:
        return bool(self.add or self.remove or self.start or self.stop)

    def words(self, node: str) -> str:
        """``pbx-a: 198.18.0.9/32 added on fs1, 198.18.0.5/32 removed``"""
        parts = [f"{_addr(ip)} added on {node}" for ip in self.add]
        parts += [f"{_addr(ip)} removed" + ("" if parts else f" on {node}")
                  for ip in self.remove]
        parts += [f"profile {p} started on {node}" for p in self.start]
        parts += [f"profile {p} stopped on {node} (if it carries no call)" for p in self.stop]
        return f"{self.slot}: " + ", ".join(parts)


def _addr(ip: FloatingIP) -> str:
    return f"{ip.address}/{ip.prefix}"


def slot_actions(before: SlotConfig, after: SlotConfig, holds: bool, hot_standby: bool
                 ) -> SlotActions:
    """What a node does when ``before`` becomes ``after`` (the same slot): the addresses
    only if it holds the slot (masters it: a slave just runs with the new config, and
    claims the new addresses if it ever takes the slot); the profiles if it holds it, or
    on every node with hot standby profiles (every node runs them)."""
    actions = SlotActions(after.name)
    if holds:
        actions = dataclasses.replace(
            actions, add=tuple(ip for ip in after.ips if ip not in before.ips),
            remove=tuple(ip for ip in before.ips if ip not in after.ips))
    if holds or hot_standby:
        actions = dataclasses.replace(
            actions, start=tuple(p for p in after.profiles if p not in before.profiles),
            stop=tuple(p for p in before.profiles if p not in after.profiles))
    return actions


def slot_moves(old: ClusterConfig, new: ClusterConfig, status: Mapping[str, Any] | None
               ) -> list[str]:
    """What the slots' masters add and remove, in words, with the masters a node's status
    shows (none: "its master")."""
    owners = {s.get("name"): s.get("owner") for s in (status or {}).get("slots", [])}
    lines = []
    claims: dict[int, str] = {}
    if status is not None and len(new.slots) > len(old.slots):
        known = {s.slot_id: int(next((x.get("epoch") or 0 for x in status.get("slots", [])
                                      if x.get("name") == s.name), 0)) for s in old.slots}
        roles = compute_roles(members_from_status(status, new), range(len(new.slots)), known)
        names = {n.node_id: n.name for n in new.nodes}
        claims = {slot_id: names[node] for node, (slot_id, _) in roles.assignments.items()}
    for after in new.slots:
        before = _slot(old, after.name)
        if before is None:
            who = claims.get(after.slot_id)
            lines.append(f"{after.name}: added ({', '.join(_addr(i) for i in after.ips)}; "
                         f"profiles {', '.join(after.profiles)}): claimed by "
                         + (who if who else "the first ranked slave (none is free now: "
                                            "it waits for one)" if status is not None
                            else "the first ranked slave")
                         + " once every node runs the new file")
            continue
        if (before.ips, before.profiles) == (after.ips, after.profiles):
            continue
        owner = owners.get(after.name)
        actions = slot_actions(before, after, True, new.takeover.hot_standby)
        where = "every node" if new.takeover.hot_standby and not (
            actions.add or actions.remove) else (owner or "its master")
        line = actions.words(where)
        if status is not None and owner is None:
            line += " (no master now: the next claim takes the new config)"
        lines.append(line)
    if lines:
        lines.append("no slot changes master: each master changes its own addresses (new "
                     "ones up first, then the old ones down) and keeps its calls")
    return lines


def _order(key: str) -> tuple[int, str]:
    first = ("cluster", "network", "node", "slot").index(key.split(".")[0].split(" ")[0]) \
        if key.split(".")[0].split(" ")[0] in ("cluster", "network", "node", "slot") else 4
    return first, key


# -- what will move -------------------------------------------------------------------------


def members_from_status(status: Mapping[str, Any], config: ClusterConfig) -> list[Member]:
    """The live members a node's status shows, with priorities from ``config``."""
    slot_ids = {s.name: s.slot_id for s in config.slots}
    by_name: dict[str, NodeConfig] = {n.name: n for n in config.nodes}
    members = []
    for entry in status.get("nodes", []):
        node = by_name.get(entry.get("name"))
        if node is None or not entry.get("alive") or entry.get("role") in (None, "unknown"):
            continue
        flags = Flags(0)
        for name in entry.get("flags") or []:
            flags |= Flags[name.upper()] if name.upper() in Flags.__members__ else Flags(0)
        members.append(Member(node.node_id, node.name, node.priority,
                              int(entry.get("incarnation") or 0), Role[entry["role"].upper()],
                              flags, slot_ids.get(entry.get("slot") or "", NO_SLOT),
                              int(entry.get("epoch") or 0)))
    return members


def moves(old: ClusterConfig, new: ClusterConfig, status: Mapping[str, Any] | None
          ) -> list[str]:
    """What the new priorities change, in words, computed with the role engine on the
    members ``status`` (one node's status) shows; no status: only the priorities."""
    lines = [f"priority of {n.name}: {old.node(n.name).priority} -> {n.priority}"
             for n in new.nodes
             if n.name in {o.name for o in old.nodes} and old.node(n.name).priority
             != n.priority]
    if status is None or not lines:
        return lines
    names = {n.node_id: n.name for n in old.nodes}
    slots = range(len(old.slots))
    known = {s.slot_id: int(next((x.get("epoch") or 0 for x in status.get("slots", [])
                                  if x.get("name") == s.name), 0)) for s in old.slots}
    before = compute_roles(members_from_status(status, old), slots, known)
    after = compute_roles(members_from_status(status, new), slots, known)

    def ranking(r: Any) -> str:
        return ", ".join(names[n] for n in r.ranking) or "none"

    if before.ranking != after.ranking:
        lines.append(f"ranking of the slaves: {ranking(before)} -> {ranking(after)}")
        first_b = before.ranking[0] if before.ranking else None
        first_a = after.ranking[0] if after.ranking else None
        if first_a != first_b:
            lines.append(f"primary candidate (takes the next slot whose master fails): "
                         f"{names[first_b] if first_b is not None else 'none'} -> "
                         f"{names[first_a] if first_a is not None else 'none'}")
    else:
        lines.append(f"ranking of the slaves unchanged: {ranking(after)}")
    def who(node_id: int | None) -> str:
        return names[node_id] if node_id is not None else "none"

    for slot in old.slots:
        b, a = before.owners.get(slot.slot_id), after.owners.get(slot.slot_id)
        if a != b:
            lines.append(f"slot {slot.name}: master {who(b)} -> {who(a)}")
    if before.assignments != after.assignments:
        was = {s: n for n, (s, _) in before.assignments.items()}
        for node_id, (slot_id, _epoch) in sorted(after.assignments.items()):
            lines.append(f"orphaned slot {old.slots[slot_id].name} goes to {who(node_id)} "
                         f"(was {who(was.get(slot_id))})")
    if all(before.owners.get(s.slot_id) == after.owners.get(s.slot_id) for s in old.slots):
        lines.append("no slot changes master and no floating IP moves (a slot moves only "
                     "when its master fails, or by fsha switchover)")
    return lines


# -- epochs on a node -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Staged:
    epoch: int
    digest: bytes
    text: str  # with its epoch line
    config: ClusterConfig
    at: float  # when it was staged (the node's clock)


def stage_refusal(running_epoch: int, running_digest: bytes, staged: Staged | None,
                  epoch: int, digest: bytes, now: float, ttl: float = STAGE_TTL) -> str | None:
    """Why a node refuses to stage ``epoch``/``digest`` (None: it stages it)."""
    if epoch <= running_epoch:
        return (f"epoch {epoch} is not above the epoch this node runs ({running_epoch}, "
                f"digest {running_digest.hex()}): push against the cluster's newest config")
    if staged is not None and now - staged.at < ttl and (staged.epoch, staged.digest) \
            != (epoch, digest) and staged.epoch >= epoch:
        return (f"epoch {staged.epoch} (digest {staged.digest.hex()}) is staged already by "
                f"another push, {now - staged.at:.0f} s ago: two pushes raced; retry once it "
                f"is activated or dropped ({ttl:.0f} s)")
    return None


def activate_refusal(running_epoch: int, staged: Staged | None, epoch: int, digest: bytes,
                     now: float, ttl: float = STAGE_TTL) -> str | None:
    """Why a node refuses to activate ``epoch``/``digest`` (None: it activates it)."""
    if staged is None or now - staged.at >= ttl:
        return f"nothing staged for epoch {epoch} (never staged, or dropped after {ttl:.0f} s)"
    if (staged.epoch, staged.digest) != (epoch, digest):
        return (f"epoch {staged.epoch} digest {staged.digest.hex()} is staged, not epoch "
                f"{epoch} digest {digest.hex()}")
    if epoch <= running_epoch:
        return f"epoch {epoch} is not above the epoch this node runs ({running_epoch})"
    return None
