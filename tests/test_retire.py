"""A previous master's replicated records are retired once another node serves its slot."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fsha.replication.state import ReplicatedState
from fsha.retire import SupersededRecords
from fsha.wire.stream import Kind

NOW = 1_800_000_000.0


def origin_state(clock: Clock, node: int) -> ReplicatedState:
    return ReplicatedState(clock, node, 1)


class Fixture:
    """Node 2 (here) holds records of node 0 (the dead master of slot 0), of node 1 (the
    new master of slot 0), and its own (it mastered slot 1 once)."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.here = ReplicatedState(self.clock, 2, 1)
        dead, new = origin_state(self.clock, 0), origin_state(self.clock, 1)
        for change in (dead.put(0, Kind.CALL, "u1", b"c1"),
                       dead.put(0, Kind.CALL, "u2", b"c2"),
                       dead.put(0, Kind.REGISTRATION, "slot1/1000@h/c", b"r"),
                       dead.put(0, Kind.IDENTITY, "identity", b"i"),
                       dead.put(0, Kind.LIMIT, "gw", b"3"),
                       dead.put(1, Kind.CALL, "u9", b"other slot"),
                       new.put(0, Kind.CALL, "u1", b"c1 recovered")):
            self.here.apply(change)
        self.here.put(1, Kind.CALL, "mine", b"x")
        self.masters: dict[int, int] = {0: 1}
        self.forgotten: list[int] = []
        self.retire = SupersededRecords(self.here, lambda: dict(self.masters), self.clock,
                                        forget_own=self.forget, interval=5, grace=60)

    def forget(self, slot: int) -> int:
        self.forgotten.append(slot)
        return 0

    def keys(self, origin: int) -> list[tuple[int, str, str]]:
        return sorted((r.slot, r.kind.name, r.key) for r in self.here.records(origin=origin))


class SupersededRecordsTests(SynchronousTestCase):
    def test_retired_after_the_grace_only(self) -> None:
        f = Fixture()
        self.assertEqual(f.retire.check(), 0)  # first seen now
        f.clock.advance(59)
        self.assertEqual(f.retire.check(), 0)
        f.clock.advance(1)
        self.assertEqual(f.retire.check(), 4)
        # the dead master's calls, registrations and identity of slot 0 are gone; its
        # limit usage and its records of another slot stay; the new master's stay
        self.assertEqual(f.keys(0), [(0, "LIMIT", "gw"), (1, "CALL", "u9")])
        self.assertEqual(f.keys(1), [(0, "CALL", "u1")])
        self.assertEqual(f.retire.status()["retired"], 4)

    def test_a_master_change_restarts_the_grace(self) -> None:
        f = Fixture()
        f.retire.check()
        f.clock.advance(30)
        f.masters = {0: 0}  # the slot went back to node 0 meanwhile
        f.retire.check()
        f.clock.advance(40)
        self.assertEqual(f.retire.check(), 0)
        f.clock.advance(20)
        self.assertEqual(f.retire.check(), 1)  # node 1's copy of u1 goes now
        self.assertEqual(f.keys(1), [])
        self.assertEqual(len(f.keys(0)), 6)

    def test_no_master_nothing_retired(self) -> None:
        f = Fixture()
        f.masters = {}
        for _ in range(30):
            f.clock.advance(5)
            f.retire.check()
        self.assertEqual(len(f.keys(0)), 6)

    def test_own_records_are_deleted_through_the_feeds(self) -> None:
        f = Fixture()
        f.masters = {1: 0}
        f.retire.check()
        f.clock.advance(60)
        f.retire.check()
        self.assertEqual(f.forgotten, [1])

    def test_periodic_loop(self) -> None:
        f = Fixture()
        f.retire.start()
        self.addCleanup(f.retire.stop)
        for _ in range(14):
            f.clock.advance(5)
        self.assertEqual(f.retire.dropped, 4)

    def test_retired_incarnation_records_go_too(self) -> None:
        f = Fixture()
        restarted = ReplicatedState(f.clock, 0, 2)  # node 0 came back: a new incarnation
        f.here.apply(restarted.put(3, Kind.CALL, "new", b"n"))
        self.assertEqual(len([r for r in f.here.retired(0) if r.slot == 0]), 5)
        f.retire.check()
        f.clock.advance(60)
        f.retire.check()
        self.assertEqual(sorted(r.kind.name for r in f.here.retired(0) if r.slot == 0),
                         ["LIMIT"])

    def test_own_origin_is_never_dropped_locally(self) -> None:
        f = Fixture()
        with self.assertRaises(ValueError):
            f.here.drop_superseded(2, 1, [Kind.CALL])


class TrimTests(SynchronousTestCase):
    def test_trimmed_during_a_wave_of_drops_and_twice_after_it(self) -> None:
        f = Fixture()
        trims: list[float] = []
        f.retire.freed = lambda: trims.append(f.clock.seconds() - NOW)
        state = f.here
        f.retire.check()
        dead, new = origin_state(f.clock, 0), origin_state(f.clock, 1)
        for _ in range(6):  # the sequences the fixture's 6 changes of node 0 took
            dead.put(1, Kind.CALL, "pad", b"x")
        new.put(0, Kind.CALL, "u1", b"c1 recovered")
        seq = 0

        def supersede(n: int) -> None:
            # the new master's registrations arrive, each superseding the dead master's
            nonlocal seq
            for _ in range(n):
                seq += 1
                state.apply(dead.put(0, Kind.REGISTRATION, f"k{seq}", b"r"))
                state.apply(new.put(0, Kind.REGISTRATION, f"k{seq}", b"r"))

        for _ in range(3):  # a wave: 1,500 records dropped per pass
            supersede(1500)
            f.clock.advance(5)
            f.retire.check()
        self.assertEqual(len(trims), 3)
        for _ in range(4):  # quiet: two more trims, then none
            f.clock.advance(5)
            f.retire.check()
        self.assertEqual(trims, [5.0, 10.0, 15.0, 20.0, 25.0])
        self.assertEqual(state.superseded, 4500)
        supersede(10)  # a trickle is no wave
        f.clock.advance(5)
        f.retire.check()
        self.assertEqual(len(trims), 5)
