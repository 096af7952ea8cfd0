"""The role engine: deterministic, order-independent, and the rules as documented."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fsha.roles import Member, compute_roles
from fsha.wire.heartbeat import NO_SLOT, Flags, Role

OK = Flags.FS_OK | Flags.SEES_QUORUM


def member(node_id: int, role: Role = Role.SLAVE, slot: int = NO_SLOT, epoch: int = 0,
           priority: int = 100, incarnation: int = 1, flags: Flags = OK) -> Member:
    return Member(node_id, f"fs{node_id + 1}", priority, incarnation, role, flags, slot, epoch)


class RulesTests(SynchronousTestCase):
    def test_fresh_cluster_assigns_orphans_in_rank_order(self) -> None:
        members = [member(0, priority=50), member(1), member(2)]
        roles = compute_roles(members, [0, 1], {})
        self.assertEqual(roles.ranking, (1, 2, 0))
        self.assertEqual(roles.assignments, {1: (0, 1), 2: (1, 1)})
        self.assertEqual(roles.owners, {})

    def test_owner_and_next_epoch(self) -> None:
        members = [member(0, Role.MASTER, slot=0, epoch=4), member(1), member(2)]
        roles = compute_roles(members, [0, 1], {0: 4, 1: 7})
        self.assertEqual(roles.owners, {0: 0})
        self.assertEqual(roles.assignments, {1: (1, 8)})  # slot 1 known at epoch 7
        self.assertEqual(roles.rank_of(1), 0)
        self.assertIsNone(roles.rank_of(0))  # masters are not ranked

    def test_claiming_node_owns_the_slot_and_leaves_the_ranking(self) -> None:
        # From the takeover announcement on, the secondary is primary.
        members = [member(0, Role.CLAIMING, slot=1, epoch=3), member(1), member(2)]
        roles = compute_roles(members, [0, 1], {1: 2})
        self.assertEqual(roles.owners, {1: 0})
        self.assertEqual(roles.ranking, (1, 2))
        self.assertEqual(roles.assignments, {1: (0, 1)})

    def test_conflict_higher_epoch_wins_then_priority_then_name(self) -> None:
        roles = compute_roles([member(0, Role.MASTER, 0, 5), member(1, Role.MASTER, 0, 6)],
                              [0], {})
        self.assertEqual((roles.owners, roles.losers), ({0: 1}, ((0, 0),)))
        roles = compute_roles([member(0, Role.MASTER, 0, 6, priority=10),
                               member(1, Role.CLAIMING, 0, 6, priority=20)], [0], {})
        self.assertEqual((roles.owners, roles.losers), ({0: 1}, ((0, 0),)))
        roles = compute_roles([member(3, Role.MASTER, 0, 6), member(2, Role.MASTER, 0, 6)],
                              [0], {})
        self.assertEqual(roles.owners, {0: 2})  # "fs3" < "fs4"

    def test_ineligible_slaves_are_not_ranked(self) -> None:
        members = [member(0, flags=Flags.SEES_QUORUM),  # FreeSWITCH down
                   member(1, flags=OK | Flags.MAINTENANCE),
                   member(2, flags=OK | Flags.UNFIT),
                   member(3, role=Role.STARTING),
                   member(4, role=Role.RELEASING, slot=0, epoch=2),
                   member(5)]
        roles = compute_roles(members, [0], {0: 2})
        self.assertEqual(roles.ranking, (5,))
        # slot 0 is still being released by node 4: not an orphan until that is done
        self.assertEqual(roles.assignments, {})
        roles = compute_roles([m for m in members if m.node_id != 4], [0, 1], {0: 2})
        self.assertEqual(roles.assignments, {5: (0, 3)})

    def test_slot_being_released_is_not_assigned(self) -> None:
        members = [member(0, role=Role.RELEASING, slot=0, epoch=2), member(1), member(2)]
        roles = compute_roles(members, [0, 1], {0: 2})
        self.assertEqual(roles.assignments, {1: (1, 1)}, "only the real orphan")
        fs_gone = [member(0, role=Role.RELEASING, slot=0, epoch=2, flags=Flags.SEES_QUORUM),
                   member(1), member(2)]
        self.assertEqual(compute_roles(fs_gone, [0, 1], {0: 2}).assignments,
                         {1: (0, 3), 2: (1, 1)}, "no waiting on a dead FreeSWITCH's release")
        released = [member(0), member(1), member(2)]
        self.assertEqual(compute_roles(released, [0, 1], {0: 2}).assignments,
                         {0: (0, 3), 1: (1, 1)})

    def test_restarted_node_ranks_last_in_its_priority_class(self) -> None:
        members = [member(0, incarnation=900), member(1, incarnation=100),
                   member(2, incarnation=500, priority=10)]
        self.assertEqual(compute_roles(members, [], {}).ranking, (1, 0, 2))

    def test_digest_reflects_owners_and_ranking_only(self) -> None:
        a = compute_roles([member(0, Role.MASTER, 0, 1), member(1)], [0], {})
        b = compute_roles([member(0, Role.MASTER, 0, 1, flags=Flags.FS_OK), member(1)], [0], {})
        c = compute_roles([member(0, Role.MASTER, 0, 2), member(1)], [0], {})
        self.assertEqual(a.digest, b.digest)
        self.assertNotEqual(a.digest, c.digest)


roles_st = st.sampled_from([Role.STARTING, Role.SLAVE, Role.CLAIMING, Role.MASTER,
                            Role.RELEASING])
flags_st = st.builds(Flags, st.integers(0, 15))


@st.composite
def views(draw: st.DrawFn) -> tuple[list[Member], list[int], dict[int, int]]:
    n = draw(st.integers(1, 12))
    slots = draw(st.integers(0, min(n, 6)))
    members = []
    for node_id in draw(st.lists(st.integers(0, 40), min_size=n, max_size=n, unique=True)):
        role = draw(roles_st)
        slot = draw(st.integers(0, slots - 1)) if slots and role != Role.SLAVE else NO_SLOT
        members.append(Member(node_id, f"n{node_id:02d}", draw(st.integers(0, 3)),
                              draw(st.integers(0, 5)), role, draw(flags_st), slot,
                              draw(st.integers(0, 4))))
    epochs = draw(st.dictionaries(st.integers(0, max(slots - 1, 0)), st.integers(0, 6)))
    return members, list(range(slots)), epochs


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(views(), st.randoms())
    def test_same_heartbeats_any_order_same_roles(self, view: tuple, rnd: random.Random) -> None:
        members, slots, epochs = view
        shuffled = list(members)
        rnd.shuffle(shuffled)
        self.assertEqual(compute_roles(members, slots, epochs),
                         compute_roles(shuffled, slots, dict(reversed(epochs.items()))))

    @settings(max_examples=300, deadline=None)
    @given(views())
    def test_invariants(self, view: tuple) -> None:
        members, slots, epochs = view
        roles = compute_roles(members, slots, epochs)
        by_id = {m.node_id: m for m in members}
        # every owner claims its slot; no node owns two slots; losers are claimants
        for slot, owner in roles.owners.items():
            self.assertEqual(by_id[owner].slot, slot)
            self.assertIn(by_id[owner].role, (Role.MASTER, Role.CLAIMING))
        self.assertEqual(len(set(roles.owners.values())), len(roles.owners))
        # assignments only to ranked slaves, only orphan slots, each at most once
        assigned_slots = [s for s, _ in roles.assignments.values()]
        self.assertEqual(len(set(assigned_slots)), len(assigned_slots))
        for node, (slot, epoch) in roles.assignments.items():
            self.assertIn(node, roles.ranking)
            self.assertNotIn(slot, roles.owners)
            self.assertGreater(epoch, epochs.get(slot, 0))
        for node in roles.ranking:
            self.assertTrue(by_id[node].eligible)

    @settings(max_examples=200, deadline=None)
    @given(views(), st.integers(0, 11), st.sampled_from([Role.CLAIMING, Role.MASTER]))
    def test_ranking_ignores_what_masters_do(self, view: tuple, pick: int, role: Role) -> None:
        """The ranking changes only with membership, config, maintenance or health."""
        members, slots, epochs = view
        before = compute_roles(members, slots, epochs).ranking
        others = [m for m in members if m.role is not Role.SLAVE]
        if not others:
            return
        target = others[pick % len(others)]
        changed = [Member(m.node_id, m.name, m.priority, m.incarnation, role, m.flags,
                          m.slot, m.epoch + 1) if m is target else m for m in members]
        self.assertEqual(compute_roles(changed, slots, epochs).ranking, before)
