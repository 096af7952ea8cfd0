"""The role engine: a pure function from what a node has heard to who does what.

Every node runs ``compute_roles`` over the latest heartbeat of each live node (itself
included) and the highest epoch it has seen per slot. Nodes that heard the same heartbeats
reach the same answer whatever the arrival order, because the answer depends only on the
set of members and fixed rules:

* **Owner of a slot**: among live members claiming it (role MASTER or CLAIMING), the
  highest epoch wins; a tie goes to higher priority, then the smaller node name. Any
  other claimant has lost and must release at once.
* **Ranking of slaves**: live members in role SLAVE whose FreeSWITCH is up, that see a
  quorum, and are not in maintenance nor unfit, ordered by
  priority (high first), then incarnation (older first: a restarted node joins at the end
  of its priority class), then name.
* **Assignment**: slots without a live owner, in config order, go to the ranked slaves in
  order: the first orphan to the primary candidate, the second to the secondary, so two
  masters dying at once are taken over in parallel. A slot a live member is still
  releasing (role RELEASING, its FreeSWITCH up) is not an orphan: a planned move releases
  before the next master claims.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fsha.wire.heartbeat import NO_SLOT, Flags, Role

_CLAIMING_ROLES = (Role.MASTER, Role.CLAIMING)
_UNFIT = Flags.MAINTENANCE | Flags.UNFIT
# A slave without quorum would never claim what it is assigned: it is not ranked.
_READY = Flags.FS_OK | Flags.SEES_QUORUM


@dataclass(frozen=True, slots=True)
class Member:
    """What the role engine needs to know about one live node."""

    node_id: int
    name: str
    priority: int
    incarnation: int
    role: Role
    flags: Flags
    slot: int
    epoch: int

    @property
    def eligible(self) -> bool:
        return (self.role is Role.SLAVE and self.flags & _READY == _READY
                and not self.flags & _UNFIT)


@dataclass(frozen=True, slots=True)
class Roles:
    owners: dict[int, int]  # slot id -> node id of its rightful holder
    epochs: dict[int, int]  # slot id -> epoch of that holder's claim
    losers: tuple[tuple[int, int], ...]  # (node id, slot id) claims that must be released
    ranking: tuple[int, ...]  # eligible slaves, primary candidate first
    assignments: dict[int, tuple[int, int]]  # node id -> (orphan slot id, epoch to claim)
    digest: bytes  # 8 bytes summarising owners + ranking, compared between nodes

    def owner_of(self, slot: int) -> int | None:
        return self.owners.get(slot)

    def rank_of(self, node_id: int) -> int | None:
        try:
            return self.ranking.index(node_id)
        except ValueError:
            return None


def _claim_key(m: Member) -> tuple[int, int, str]:
    return (-m.epoch, -m.priority, m.name)


def _rank_key(m: Member) -> tuple[int, int, str]:
    return (-m.priority, m.incarnation, m.name)


def compute_roles(members: Iterable[Member], slot_ids: Iterable[int],
                  known_epochs: Mapping[int, int]) -> Roles:
    """Owners, losers, ranking and assignments; see the module docstring for the rules."""
    members = sorted(members, key=lambda m: m.node_id)
    slot_ids = list(slot_ids)
    claims: dict[int, list[Member]] = {}
    # A slot its master is still releasing is not an orphan yet: its floating IPs may still
    # be up there. The successor claims once it hears the release done (or the node dead).
    # Not if its FreeSWITCH is gone: its calls are lost anyway, and waiting for a release
    # that talks to a hung FreeSWITCH would only delay the takeover.
    releasing: set[int] = set()
    for m in members:
        if m.role in _CLAIMING_ROLES and m.slot != NO_SLOT:
            claims.setdefault(m.slot, []).append(m)
        elif m.role is Role.RELEASING and m.flags & Flags.FS_OK:
            releasing.add(m.slot)
    owners: dict[int, int] = {}
    epochs: dict[int, int] = {}
    losers: list[tuple[int, int]] = []
    for slot, claimants in claims.items():
        claimants.sort(key=_claim_key)
        owners[slot] = claimants[0].node_id
        epochs[slot] = claimants[0].epoch
        losers.extend((m.node_id, slot) for m in claimants[1:])
    ranking = tuple(m.node_id for m in sorted((m for m in members if m.eligible), key=_rank_key))
    orphans = [s for s in slot_ids if s not in owners and s not in releasing]
    assignments = {node: (slot, max(known_epochs.get(slot, 0), epochs.get(slot, 0)) + 1)
                   for node, slot in zip(ranking, orphans, strict=False)}
    return Roles(owners, epochs, tuple(sorted(losers)), ranking, assignments,
                 view_digest(owners, epochs, ranking))


def view_digest(owners: Mapping[int, int], epochs: Mapping[int, int],
                ranking: tuple[int, ...]) -> bytes:
    h = hashlib.sha256()
    for slot in sorted(owners):
        h.update(struct.pack(">HHQ", slot, owners[slot], epochs[slot]))
    h.update(b"|")
    h.update(struct.pack(f">{len(ranking)}H", *ranking))
    return h.digest()[:8]
