"""The egress fence of hot standby profiles: no packet leaves from a slot address this host
does not hold.

With ``[takeover] profiles = "hot_standby"`` every node runs every slot's sofia profile,
bound to the slot's floating IPs whether the host holds them or not
(``net.ipv4.ip_nonlocal_bind=1``). Releasing a slot takes its addresses down and hangs up
its calls with ``hupall``, and mod_sofia sends a BYE for every answered call it hangs up
(``sofia_on_hangup`` calls ``nua_bye`` unless the profile is being destroyed): the caller
must never see it, since the successor recovers that call. The Linux kernel already refuses
to route a packet whose source is not a local address unless the socket is transparent
(``IP_TRANSPARENT``, raw sockets): the fence makes that a checked property of the host
rather than of every socket option FreeSWITCH or a module may set. It is one nftables
table, installed at start-up and checked by the takeover's ``egress`` step::

    table inet fsha_egress {
      chain output {
        type filter hook output priority 0; policy accept;
        ip saddr { SLOT ADDRESSES } fib saddr type != local counter drop
        ip6 saddr { ... } fib saddr type != local counter drop
      }
    }

``fib saddr type != local``: the source is not an address of this host *right now*, so the
rule follows the floating IPs without being touched at each move. It lives in the kernel: it
outlives a ``kill -9`` of fsha. A firewall reload that runs ``nft flush ruleset`` removes it
(as it would any other table); the next takeover's ``egress`` step then fails and the node
does not take the slot until fsha reinstalls it (a restart of fsha does).

:class:`NftEgressFence` runs ``nft`` through the :class:`~fsha.process.ProcessRunner`;
:class:`MemoryEgressFence` is its stand-in for tests (no host changes).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed

from fsha.process import ProcessError, ProcessResult, ProcessRunner

__all__ = [
    "TABLE",
    "EgressFence",
    "FenceStatus",
    "MemoryEgressFence",
    "NftEgressFence",
    "fence_status",
    "ruleset",
]

TABLE = "fsha_egress"


@dataclass(frozen=True, slots=True)
class FenceStatus:
    """What the host's fence covers: ``ok`` when every slot address is fenced."""

    ok: bool
    fenced: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    dropped: int = 0  # packets the fence dropped since it was installed
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "fenced": list(self.fenced), "missing": list(self.missing),
                "dropped": self.dropped, "problem": self.problem}


class EgressFence(Protocol):
    """The fence of this host's slot addresses."""

    def install(self) -> Deferred[FenceStatus]:
        """Put the fence in place (replacing an older one atomically); its status."""

    def check(self) -> Deferred[FenceStatus]:
        """Read the fence from the host; its status (never fails: ``problem`` says)."""


def _sorted(addresses: Sequence[str], version: int) -> list[str]:
    return sorted({str(ipaddress.ip_address(a)) for a in addresses
                   if ipaddress.ip_address(a).version == version},
                  key=ipaddress.ip_address)


def ruleset(addresses: Sequence[str], table: str = TABLE) -> str:
    """The nft script that replaces ``table`` with the fence of ``addresses`` in one
    transaction (create, delete, create: the idiom for an atomic replace)."""
    rules = []
    for family, version in (("ip", 4), ("ip6", 6)):
        found = _sorted(addresses, version)
        if found:
            rules.append(f"{family} saddr {{ {', '.join(found)} }} "
                         "fib saddr type != local counter drop;")
    return (f"table inet {table}; delete table inet {table}; "
            f"table inet {table} {{ chain output {{ type filter hook output priority 0; "
            f"policy accept; {' '.join(rules)} }}; }}")


def fence_status(listing: str, addresses: Sequence[str]) -> FenceStatus:
    """The status of the fence from ``nft -j list table inet fsha_egress``: which of
    ``addresses`` a drop rule of an output-hook chain covers."""
    try:
        items = json.loads(listing)["nftables"]
    except (ValueError, KeyError, TypeError) as e:
        return FenceStatus(False, missing=tuple(addresses), problem=f"unreadable listing: {e}")
    hooked = {c["chain"]["name"] for c in items if "chain" in c
              and c["chain"].get("hook") == "output"}
    fenced: set[str] = set()
    dropped = 0
    for item in items:
        rule = item.get("rule")
        if not isinstance(rule, dict) or rule.get("chain") not in hooked:
            continue
        covered: list[str] = []
        fib = drop = False
        packets = 0
        for expr in rule.get("expr", []):
            match = expr.get("match") if isinstance(expr, dict) else None
            if isinstance(match, dict):
                left, right = match.get("left"), match.get("right")
                if isinstance(left, dict) and left.get("payload", {}).get("field") == "saddr" \
                        and match.get("op") in ("==", "in"):
                    values = right.get("set", []) if isinstance(right, dict) else [right]
                    covered += [v for v in values if isinstance(v, str)]
                elif isinstance(left, dict) and "fib" in left and match.get("op") == "!=" \
                        and right == "local" and "saddr" in left["fib"].get("flags", []):
                    fib = True
            elif isinstance(expr, dict) and "drop" in expr:
                drop = True
            elif isinstance(expr, dict) and "counter" in expr:
                packets = int(expr["counter"].get("packets", 0))
        if fib and drop and covered:
            fenced.update(str(ipaddress.ip_address(a)) for a in covered)
            dropped += packets
    want = [str(ipaddress.ip_address(a)) for a in addresses]
    missing = tuple(a for a in want if a not in fenced)
    return FenceStatus(not missing, tuple(a for a in want if a in fenced), missing, dropped,
                       None if not missing else "no drop rule for " + ", ".join(missing))


class NftEgressFence:
    """The fence as an nftables table (``nft``, every run bounded by ``timeout``)."""

    def __init__(self, runner: ProcessRunner, addresses: Sequence[str], timeout: float,
                 nft: str = "nft", table: str = TABLE) -> None:
        self.runner = runner
        self.addresses = tuple(addresses)
        self.timeout = timeout
        self.nft = nft
        self.table = table

    def install(self) -> Deferred[FenceStatus]:
        d = self.runner.run([self.nft, ruleset(self.addresses, self.table)], self.timeout)
        return d.addCallbacks(lambda _: self.check(), self._failed)

    def check(self) -> Deferred[FenceStatus]:
        d = self.runner.run([self.nft, "-j", "list", "table", "inet", self.table],
                            self.timeout)

        def read(result: ProcessResult) -> FenceStatus:
            return fence_status(result.stdout.decode("utf-8", "replace"), self.addresses)

        return d.addCallbacks(read, self._failed)

    def _failed(self, failure: Any) -> FenceStatus:
        failure.trap(ProcessError)
        return FenceStatus(False, missing=self.addresses,
                           problem=f"nft: {failure.getErrorMessage()}")


@dataclass(slots=True)
class MemoryEgressFence:
    """A fence held in memory (tests): ``installed`` says whether it is in place."""

    addresses: tuple[str, ...]
    installed: bool = False
    dropped: int = 0
    installs: int = 0
    broken: str | None = None  # install fails with this reason
    checks: list[FenceStatus] = field(default_factory=list)

    def install(self) -> Deferred[FenceStatus]:
        self.installs += 1
        if self.broken is None:
            self.installed = True
        return self.check()

    def check(self) -> Deferred[FenceStatus]:
        if self.installed:
            status = FenceStatus(True, self.addresses, (), self.dropped)
        else:
            status = FenceStatus(False, (), self.addresses,
                                 problem=self.broken or "the table is not there")
        self.checks.append(status)
        return succeed(status)
