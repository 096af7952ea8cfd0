"""Cluster-wide call-limit usage: what calls hold, what each node uses, the takeover plan.

FreeSWITCH's ``limit`` app counts in the backend and releases in-process at hangup, so a
dead master's counters leak and each node's ``hash`` backend sees only its own calls. This
module is the logic (no I/O; the node's :class:`fsha.limitservice.LimitService` does the ESL and
Redis side):

What a call holds (:func:`holdings_from_metadata`)
    From the call's replicated recovery metadata (the XML CDR FreeSWITCH stores):
    ``hash``: every variable ``limit_usage_<realm>_<resource>`` (set by mod_hash on a
    successful incr; the key is the suffix) while ``limit_backend`` lists ``hash``, one unit
    per key. ``hiredis``: no variable names the Redis key, so the ``<app_log>`` entries
    ``limit`` with data ``hiredis <realm> <resource> [<max>[/<interval>]]`` are read while
    ``limit_backend`` lists ``hiredis``; rate entries (an interval) hold nothing (their keys
    expire); one unit per entry (mod_hiredis INCRs once per run of the app); with
    ``hiredis_limit_exceeded=true`` the last hiredis entry was refused (FreeSWITCH already
    took its unit back) and holds nothing.

What a node uses (``Kind.LIMIT`` records of the node's own origin, slot ``NO_SLOT``)
    ``u/<realm>_<resource>`` -> the ``total_usage`` its FreeSWITCH's ``hash_dump limit``
    reports (polled, written when it changes, deleted when the key leaves the dump).
    ``a/<uuid>`` (slot: the call's slot) -> an *adopted* call: a call this node recovered
    from a dead master. Its FreeSWITCH does not count it (recovery does not re-run the
    ``limit`` app) and will not release it, so the record carries its holdings (JSON
    ``{"runtime", "from", "hash": [...], "hiredis": [[realm, key], ...]}``) until it hangs up.
    ``s/<node id>`` -> ``<incarnation>``: that node's usage and adoptions (of that
    incarnation) are superseded: it died and this node reconciled its slot.
    ``p/<marker>`` -> a pending hiredis release (JSON ``{"realm", "key"}``), deleted once
    done; a successor of this node finishes what it left.
    ``h/<uuid>`` (slot: the call's slot) -> the hiredis units a call of this node's own
    FreeSWITCH holds, from its ``CHANNEL_EXECUTE_COMPLETE`` events of the ``limit`` app
    (same JSON as ``a/``; the runtime is the event's ``Core-UUID``): written when a
    ``limit hiredis`` unit is taken, also before the call is answered (a ringing call has no
    recovery row), deleted at the call's ``CHANNEL_HANGUP_COMPLETE`` (FreeSWITCH released
    the units itself) or when a sweep finds it gone. Not counted in the totals (the node's
    FreeSWITCH counts its own calls).
    ``t/<marker>`` -> a pending hiredis *retake* (``INCR``, JSON ``{"realm", "key"}``): after
    a hand-over the previous FreeSWITCH gave the recovered calls' units back when it
    stopped the profile; the adopter takes them again, once per ``<prefix>retaken/<runtime>/
    <call>/<realm>/<key>/<n>`` marker.

Cluster totals (:class:`LimitBook`)
    For every hash key, the sum over origins not superseded of their ``u/`` usage plus their
    adopted calls' units. Every node holds the same records, so every node computes the same
    totals. A dead master keeps counting until its successor reconciles (conservative: no
    window where calls are admitted over the limit).

Takeover (:func:`plan_reconcile`)
    The dead master's calls (its ``Kind.CALL`` records, and the calls it had adopted) that
    are alive on the new master after ``sofia recover`` move to it (``a/`` records); the
    others are released: their hash units leave the totals with the superseded usage, their
    hiredis units are DECR'd in Redis exactly once, whoever tries, by a script that sets a
    marker ``<prefix>released/<runtime uuid>/<call uuid>/<realm>/<key>/<n>`` (NX, with a TTL)
    and decrements only if it was not there. ``runtime uuid`` is the FreeSWITCH runtime that
    held the call (the row's ``runtime_uuid``; for an adopted call, the adopter's run and
    the takeover's epoch, ``<core uuid>.<epoch>``, the adoption's ``runtime`` field), so the
    adopter releasing at hangup and a later successor releasing it use the same marker.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from fsha.fsdb.cdr import CDRError, read_cdr
from fsha.wire.stream import Kind

__all__ = [
    "ADOPT_PREFIX",
    "HELD_PREFIX",
    "PENDING_PREFIX",
    "RETAKE_PREFIX",
    "SUPERSEDE_PREFIX",
    "USAGE_PREFIX",
    "Adoption",
    "Holdings",
    "LimitBook",
    "LimitValueError",
    "ReconcilePlan",
    "Release",
    "decode_adoption",
    "decode_pending",
    "encode_adoption",
    "encode_pending",
    "held_unit",
    "holdings_from_metadata",
    "marker_key",
    "parse_hash_dump",
    "plan_reconcile",
]

USAGE_PREFIX: Final = "u/"
ADOPT_PREFIX: Final = "a/"
SUPERSEDE_PREFIX: Final = "s/"
PENDING_PREFIX: Final = "p/"
HELD_PREFIX: Final = "h/"
RETAKE_PREFIX: Final = "t/"
_VAR_PREFIX: Final = "limit_usage_"


class LimitValueError(ValueError):
    """A replicated limit record or a metadata document that cannot be used."""


@dataclass(frozen=True, slots=True)
class Holdings:
    """What one call holds: hash keys (``realm_resource``, one unit each) and hiredis
    units (``(realm, redis key)``, repeated when the call took the same key twice)."""

    hash: frozenset[str] = frozenset()
    hiredis: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.hash or self.hiredis)


NOTHING: Final = Holdings()


def _backends(value: str | None) -> set[str]:
    return {b.strip() for b in (value or "").split(",") if b.strip()}


def holdings_from_metadata(metadata: bytes | str) -> Holdings:
    """The limits a call holds, from its recovery metadata (see the module doc). Raises
    :class:`LimitValueError` if the document is not an XML CDR."""
    if isinstance(metadata, bytes):
        if b"limit" not in metadata:
            return NOTHING  # the common case costs no parse
        text = metadata.decode("utf-8", "surrogateescape")
    else:
        text = metadata
        if "limit" not in text:
            return NOTHING
    try:
        root, variables = read_cdr(text.encode("utf-8", "surrogateescape"))
    except CDRError as e:
        raise LimitValueError(str(e)) from None
    backends = _backends(variables.get("limit_backend"))
    hash_keys: set[str] = set()
    if "hash" in backends:
        for name in variables:
            if name.startswith(_VAR_PREFIX) and len(name) > len(_VAR_PREFIX):
                hash_keys.add(name[len(_VAR_PREFIX):])
    units: list[tuple[str, str]] = []
    if "hiredis" in backends:
        log = root.find("app_log")
        for app in (log if log is not None else ()):
            if app.get("app_name") != "limit":
                continue
            words = (app.get("app_data") or "").split()
            if len(words) < 3 or words[0] != "hiredis":
                continue
            interval = 0
            if len(words) >= 4 and "/" in words[3]:
                tail = words[3].split("/", 1)[1]
                interval = int(tail) if tail.isdigit() else 0
            units.append((words[1], words[2]) if interval == 0 else ("", ""))
        if variables.get("hiredis_limit_exceeded", "").lower() == "true" and units:
            units.pop()  # the last one was refused (and taken back by FreeSWITCH)
    return Holdings(frozenset(hash_keys), tuple(u for u in units if u[0]))


def held_unit(app_data: str, limit_backend: str | None, exceeded: str | None,
              raw_response: str | None) -> tuple[str, str] | None:
    """The hiredis unit (realm, key) one completed ``limit`` application took, from its
    ``CHANNEL_EXECUTE_COMPLETE`` event (``Application-Data`` and the channel variables
    ``limit_backend``, ``hiredis_limit_exceeded``, ``hiredis_raw_response``), or None: not
    hiredis, a rate limit (its key expires), not counted (``limit_backend`` does not list
    ``hiredis``), or refused (over max: mod_hiredis already took it back). The exceeded
    flag stays set once a call was refused, so a later ``limit`` counts as refused only
    when its own INCR reply is over its max."""
    words = app_data.split()
    if len(words) < 3 or words[0] != "hiredis" or "hiredis" not in _backends(limit_backend):
        return None
    maximum = -1
    if len(words) >= 4:
        head, _, tail = words[3].partition("/")
        if tail.isdigit() and int(tail) > 0:
            return None
        maximum = int(head) if head.isdigit() else -1
    if (exceeded or "").lower() == "true" and maximum > 0:  # (no max: never refused)
        raw = (raw_response or "").strip()
        if not raw.lstrip("-").isdigit() or int(raw) > maximum:
            return None
    return words[1], words[2]


def parse_hash_dump(output: str) -> dict[str, int]:
    """``hash_dump limit``: ``L/<realm>_<resource>/<total>/<rate>/<interval>/<last_check>``
    lines -> {key: total}. Keys with a total of 0 (rate-only, or left by a refused incr) are
    left out; other lines are ignored."""
    usage: dict[str, int] = {}
    for line in output.splitlines():
        if not line.startswith("L/"):
            continue
        parts = line[2:].rsplit("/", 4)
        if len(parts) != 5 or not parts[0]:
            continue
        try:
            total = int(parts[1])
        except ValueError:
            continue
        if total > 0:
            usage[parts[0]] = usage.get(parts[0], 0) + total
    return usage


# ---------------------------------------------------------------------------------------
# Record values


@dataclass(frozen=True, slots=True)
class Adoption:
    uuid: str
    runtime: str  # the FreeSWITCH runtime holding the call (the adopter's)
    origin: str  # the node it was adopted from
    holdings: Holdings
    slot: int = -1  # the record's slot (not in the value)


def encode_adoption(a: Adoption) -> bytes:
    obj = {"runtime": a.runtime, "from": a.origin, "hash": sorted(a.holdings.hash),
           "hiredis": [list(u) for u in a.holdings.hiredis]}
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_adoption(uuid: str, value: bytes) -> Adoption:
    try:
        obj = json.loads(value)
    except ValueError as e:
        raise LimitValueError(f"adoption record is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise LimitValueError("adoption record is not a JSON object")
    runtime, origin = obj.get("runtime"), obj.get("from")
    keys, units = obj.get("hash"), obj.get("hiredis")
    if not isinstance(runtime, str) or not isinstance(origin, str) or \
            not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or \
            not isinstance(units, list) or not all(
                isinstance(u, list) and len(u) == 2 and all(isinstance(x, str) for x in u)
                for u in units):
        raise LimitValueError("adoption record has missing or mistyped fields")
    return Adoption(uuid, runtime, origin,
                    Holdings(frozenset(keys), tuple((u[0], u[1]) for u in units)))


def encode_pending(realm: str, key: str) -> bytes:
    return json.dumps({"key": key, "realm": realm}, sort_keys=True,
                      separators=(",", ":")).encode("utf-8")


def decode_pending(value: bytes) -> tuple[str, str]:
    try:
        obj = json.loads(value)
    except ValueError as e:
        raise LimitValueError(f"pending release is not JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("realm"), str) or \
            not isinstance(obj.get("key"), str):
        raise LimitValueError("pending release has missing or mistyped fields")
    return obj["realm"], obj["key"]


def marker_key(prefix: str, runtime: str, uuid: str, realm: str, key: str, n: int, *,
               what: str = "released") -> str:
    return f"{prefix}{what}/{runtime}/{uuid}/{realm}/{key}/{n}"


def release_markers(prefix: str, runtime: str, uuid: str, holdings: Holdings, *,
                    what: str = "released") -> list[Release]:
    """One :class:`Release` per hiredis unit of a call (the n-th unit of a key gets ``n``);
    ``what="retaken"`` gives the markers of the re-takes after a hand-over."""
    seen: Counter[tuple[str, str]] = Counter()
    out = []
    for realm, key in holdings.hiredis:
        seen[(realm, key)] += 1
        out.append(Release(realm, key, marker_key(prefix, runtime, uuid, realm, key,
                                                  seen[(realm, key)], what=what)))
    return out


def merge_holdings(a: Holdings, b: Holdings) -> Holdings:
    """What a call holds known two ways (its recovery row and its ``h/`` record): the hash
    keys of both, and per hiredis key the larger count (both number the units of a key in
    the order they were taken, so the markers of the common units are the same)."""
    ca, cb = Counter(a.hiredis), Counter(b.hiredis)
    units: list[tuple[str, str]] = list(a.hiredis)
    for unit, n in cb.items():
        units.extend([unit] * max(0, n - ca[unit]))
    return Holdings(a.hash | b.hash, tuple(units))


# ---------------------------------------------------------------------------------------
# Cluster totals


class LimitBook:
    """The ``Kind.LIMIT`` records of every origin, indexed, and the totals they make.

    Feed it every LIMIT record stored or removed (:meth:`stored`, :meth:`removed`: the
    replicated state's listener) and tell it each origin's current incarnation through
    ``incarnation_of`` (the replicated state's positions). No I/O, no clock.
    """

    def __init__(self, incarnation_of: Callable[[int], int | None]) -> None:
        self._incarnation_of = incarnation_of
        self.usage: dict[int, dict[str, int]] = {}  # origin -> key -> total
        self.adopted: dict[int, dict[str, Adoption]] = {}  # origin -> uuid -> adoption
        self.supersedes: dict[int, dict[int, int]] = {}  # writer -> node id -> incarnation
        self.pending: dict[int, dict[str, tuple[str, str]]] = {}  # origin -> marker -> rk
        self.held: dict[int, dict[str, Adoption]] = {}  # origin -> uuid -> units held
        self.retakes: dict[int, dict[str, tuple[str, str]]] = {}  # origin -> marker -> rk
        self.rejected = 0
        self.version = 0  # bumped on every change (cheap "did anything change")

    # -- index ------------------------------------------------------------------------------

    def stored(self, origin: int, slot: int, key: str, value: bytes) -> None:
        self.version += 1
        try:
            if key.startswith(USAGE_PREFIX):
                self.usage.setdefault(origin, {})[key[2:]] = int(value)
            elif key.startswith(ADOPT_PREFIX):
                self.adopted.setdefault(origin, {})[key[2:]] = replace(
                    decode_adoption(key[2:], value), slot=slot)
            elif key.startswith(SUPERSEDE_PREFIX):
                self.supersedes.setdefault(origin, {})[int(key[2:])] = int(value)
            elif key.startswith(PENDING_PREFIX):
                self.pending.setdefault(origin, {})[key[2:]] = decode_pending(value)
            elif key.startswith(HELD_PREFIX):
                self.held.setdefault(origin, {})[key[2:]] = replace(
                    decode_adoption(key[2:], value), slot=slot)
            elif key.startswith(RETAKE_PREFIX):
                self.retakes.setdefault(origin, {})[key[2:]] = decode_pending(value)
        except (ValueError, LimitValueError):
            self.rejected += 1

    def removed(self, origin: int, slot: int, key: str) -> None:
        self.version += 1
        table: dict[int, dict[Any, Any]] | None = {
            USAGE_PREFIX: self.usage, ADOPT_PREFIX: self.adopted,
            SUPERSEDE_PREFIX: self.supersedes, PENDING_PREFIX: self.pending,
            HELD_PREFIX: self.held, RETAKE_PREFIX: self.retakes}.get(key[:2])
        if table is None or origin not in table:
            return
        name: Any = key[2:]
        if table is self.supersedes:
            try:
                name = int(name)
            except ValueError:
                return
        table[origin].pop(name, None)
        if not table[origin]:
            del table[origin]

    def listener(self, op: str, origin: int, slot: int, kind: Kind, key: str,
                 value: bytes) -> None:
        """The signature :meth:`fsha.replication.state.ReplicatedState.add_listener` calls."""
        if kind is not Kind.LIMIT:
            return
        if op == "put":
            self.stored(origin, slot, key, value)
        else:
            self.removed(origin, slot, key)

    # -- reading ----------------------------------------------------------------------------

    def superseded(self) -> set[int]:
        """Origins whose current incarnation some live writer has superseded."""
        out: set[int] = set()
        for writer, entries in self.supersedes.items():
            if writer in out:
                continue
            for node, incarnation in entries.items():
                if self._incarnation_of(node) == incarnation:
                    out.add(node)
        return out

    def counted_origins(self) -> list[int]:
        gone = self.superseded()
        return sorted(o for o in set(self.usage) | set(self.adopted) if o not in gone)

    def totals(self) -> dict[str, int]:
        """Cluster total per hash key (``realm_resource``)."""
        totals: Counter[str] = Counter()
        for origin in self.counted_origins():
            for key, n in self.usage.get(origin, {}).items():
                totals[key] += n
            for a in self.adopted.get(origin, {}).values():
                for key in a.holdings.hash:
                    totals[key] += 1
        return dict(totals)

    def per_origin(self) -> dict[int, dict[str, int]]:
        """Each counted origin's share per key (its own usage plus its adopted calls)."""
        out: dict[int, dict[str, int]] = {}
        for origin in self.counted_origins():
            share: Counter[str] = Counter(self.usage.get(origin, {}))
            for a in self.adopted.get(origin, {}).values():
                share.update(a.holdings.hash)
            out[origin] = dict(share)
        return out

    def hiredis_held(self) -> dict[tuple[str, str], int]:
        """Hiredis units held by adopted calls of counted origins (FreeSWITCH holds the
        others and releases them itself)."""
        out: Counter[tuple[str, str]] = Counter()
        for origin in self.counted_origins():
            for a in self.adopted.get(origin, {}).values():
                out.update(a.holdings.hiredis)
        return dict(out)


# ---------------------------------------------------------------------------------------
# The takeover plan


@dataclass(frozen=True, slots=True)
class Release:
    """One hiredis unit to give back: ``DECR key`` in ``realm``'s Redis, guarded by
    ``marker`` so it happens once."""

    realm: str
    key: str
    marker: str


@dataclass(frozen=True, slots=True)
class CallHolding:
    uuid: str
    slot: int
    runtime: str
    holdings: Holdings


@dataclass(slots=True)
class ReconcilePlan:
    moved: list[CallHolding] = field(default_factory=list)  # alive here: adopt
    released: list[CallHolding] = field(default_factory=list)  # gone: release
    releases: list[Release] = field(default_factory=list)  # hiredis DECRs to do
    unmanaged: int = 0  # hiredis units in realms this cluster's Redis does not hold
    rejected: int = 0  # call records whose metadata could not be read

    def counts(self) -> dict[str, int]:
        return {"moved": len(self.moved), "released": len(self.released),
                "hash_units_moved": sum(len(c.holdings.hash) for c in self.moved),
                "hash_units_released": sum(len(c.holdings.hash) for c in self.released),
                "hiredis_releases": len(self.releases), "unmanaged": self.unmanaged,
                "rejected": self.rejected}


def plan_reconcile(calls: Iterable[CallHolding], alive: Callable[[str], bool], *,
                   hiredis_realms: Iterable[str], prefix: str) -> ReconcilePlan:
    """Split the dead master's calls (with their holdings; one per UUID) into moved
    (``alive(uuid)``) and released, and list the hiredis releases of the released ones in
    realms whose counters live in this cluster's Redis (``hiredis_realms``)."""
    realms = set(hiredis_realms)
    plan = ReconcilePlan()
    for call in calls:
        if not call.holdings:
            continue
        if alive(call.uuid):
            plan.moved.append(call)
            continue
        plan.released.append(call)
        for r in release_markers(prefix, call.runtime, call.uuid, call.holdings):
            if r.realm in realms:
                plan.releases.append(r)
            else:
                plan.unmanaged += 1
    return plan


def dead_master_calls(call_rows: Iterable[tuple[int, str, str, bytes]],
                      adoptions: Mapping[str, Adoption],
                      held: Mapping[str, Adoption] | None = None
                      ) -> tuple[list[CallHolding], int]:
    """The calls a dead master held, with their holdings: its call records
    ``(slot, uuid, runtime_uuid, metadata)``, its ``h/`` records (``held``: calls that took
    hiredis units, answered or not; a call known both ways under the same runtime gets
    :func:`merge_holdings`) and the calls it had adopted (an adoption takes precedence).
    One entry per UUID, so no unit is listed twice. Returns them and how many records could
    not be read."""
    out: dict[str, CallHolding] = {}
    rejected = 0
    for slot, uuid, runtime, metadata in call_rows:
        try:
            holdings = holdings_from_metadata(metadata)
        except LimitValueError:
            rejected += 1
            continue
        out[uuid] = CallHolding(uuid, slot, runtime, holdings)
    for uuid, h in (held or {}).items():
        row = out.get(uuid)
        if row is None:
            out[uuid] = CallHolding(uuid, h.slot, h.runtime, h.holdings)
        elif row.runtime == h.runtime:
            out[uuid] = replace(row, holdings=merge_holdings(row.holdings, h.holdings))
    for uuid, a in adoptions.items():
        # the adoption wins: its runtime is the one the adopter releases under
        previous = out.get(uuid)
        slot = previous.slot if previous is not None else a.slot
        out[uuid] = CallHolding(uuid, slot, a.runtime, a.holdings)
    return list(out.values()), rejected
