"""Tests for fsha.replication.state: ordering, idempotence, snapshots, expiry, digests."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fsha.replication.state import (
    EARLY_SUPERSEDED_NO_LIMITS,
    ApplyResult,
    Record,
    ReplicatedState,
    SnapshotError,
)
from fsha.wire.stream import Change, Kind, Op, Position, SnapshotBegin, SnapshotEnd, SnapshotItem

NOW = 1000.0  # clock seconds at the start of every test
LATER = 2_000_000  # an expiry (ms) after NOW


def clock_at(seconds: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


def receiver(node: int = 0, clock: Clock | None = None, **kw: float) -> ReplicatedState:
    return ReplicatedState(clock or clock_at(), node, 1, **kw)  # type: ignore[arg-type]


def snapshot_of(records: list[Record]) -> list[tuple[object, ...]]:
    return sorted((r.origin, r.slot, r.kind, r.key, r.value, r.expires_ms) for r in records)


# -- generating valid change sequences ------------------------------------------------------

ORIGINS = (1, 2, 3)
op_strategy = st.tuples(
    st.sampled_from(["put", "put", "put", "delete", "restart"]),
    st.integers(0, 2),
    st.sampled_from([Kind.CALL, Kind.REGISTRATION, Kind.LIMIT]),
    st.sampled_from(["a", "b", "c", "d"]),
    st.binary(max_size=4),
    st.sampled_from([0, 0, LATER, LATER + 1]),
)


def generate(origin: int, ops: list[tuple[str, int, Kind, str, bytes, int]]) -> list[Change]:
    """The changes a real origin emits for ``ops`` (restart = a new incarnation)."""
    clock = clock_at()
    incarnation = 1
    source = ReplicatedState(clock, origin, incarnation)
    changes: list[Change] = []
    for op, slot, kind, key, value, expires in ops:
        if op == "restart":
            incarnation += 1
            source = ReplicatedState(clock, origin, incarnation)
        elif op == "put":
            changes.append(source.put(slot, kind, key, value, expires))
        else:
            change = source.delete(slot, kind, key)
            if change is not None:
                changes.append(change)
    return changes


histories = st.fixed_dictionaries({o: st.lists(op_strategy, max_size=25) for o in ORIGINS}).map(
    lambda d: {o: generate(o, ops) for o, ops in d.items()})


def in_order(streams: dict[int, list[Change]], node: int = 0) -> ReplicatedState:
    state = receiver(node)
    for changes in streams.values():
        for change in changes:
            assert state.apply(change) is ApplyResult.APPLIED, change
    return state


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(histories, st.data())
    def test_interleaving_and_duplication(self, streams: dict[int, list[Change]],
                                          data: st.DataObject) -> None:
        reference = in_order(streams)
        state = receiver()
        cursor = dict.fromkeys(streams, 0)
        steps = 0
        while any(cursor[o] < len(streams[o]) for o in streams):
            pending = [o for o in streams if cursor[o] < len(streams[o])]
            origin = data.draw(st.sampled_from(pending))
            if steps < 200 and data.draw(st.booleans()):  # a reconnect re-sends a few
                cursor[origin] = max(0, cursor[origin] - data.draw(st.integers(0, 3)))
            result = state.apply(streams[origin][cursor[origin]])
            self.assertIn(result, (ApplyResult.APPLIED, ApplyResult.DUPLICATE))
            cursor[origin] += 1
            steps += 1
        self.assertEqual(state.digest(), reference.digest())
        self.assertEqual(snapshot_of(list(state.records())),
                         snapshot_of(list(reference.records())))
        self.assertEqual(state.positions(), reference.positions())
        self.assertEqual(state.counts(), reference.counts())

    @settings(max_examples=200, deadline=None)
    @given(histories, st.randoms(use_true_random=False))
    def test_any_order_with_retries(self, streams: dict[int, list[Change]], rnd: object) -> None:
        reference = in_order(streams)
        queue = [c for changes in streams.values() for c in changes]
        queue += queue[: len(queue) // 2]  # duplicates
        rnd.shuffle(queue)  # type: ignore[attr-defined]
        state = receiver()
        progress = True
        while queue and progress:
            progress = False
            retry = []
            for change in queue:
                result = state.apply(change)
                if result is ApplyResult.GAP:
                    retry.append(change)
                else:
                    self.assertIn(result, (ApplyResult.APPLIED, ApplyResult.DUPLICATE))
                    progress = True
            queue = retry
        self.assertEqual(queue, [])
        self.assertEqual(state.digest(), reference.digest())

    @settings(max_examples=200, deadline=None)
    @given(histories, st.data())
    def test_snapshot_plus_tail(self, streams: dict[int, list[Change]],
                                data: st.DataObject) -> None:
        reference = in_order(streams)
        donor = receiver(node=9)
        late = receiver(node=8)
        for origin, changes in streams.items():
            cut = data.draw(st.integers(0, len(changes)))
            for change in changes[:cut]:
                donor.apply(change)
            if cut:
                self.assertIs(late.apply_snapshot(*donor.snapshot(origin)), ApplyResult.APPLIED)
            for change in changes:  # the tail, and the snapshotted part again
                self.assertIn(late.apply(change), (ApplyResult.APPLIED, ApplyResult.DUPLICATE))
        self.assertEqual(late.digest(), reference.digest())
        self.assertEqual(late.counts(), reference.counts())

    @settings(max_examples=200, deadline=None)
    @given(histories, st.integers(1, 8), st.data())
    def test_resume_or_snapshot(self, streams: dict[int, list[Change]], log_limit: int,
                                data: st.DataObject) -> None:
        """A peer that stopped anywhere catches up from a server with a bounded log."""
        server = ReplicatedState(clock_at(), 9, 1, log_limit=log_limit)
        peer = receiver(node=8)
        for changes in streams.values():
            cut = data.draw(st.integers(0, len(changes)))
            for change in changes[:cut]:
                peer.apply(change)
            for change in changes:
                server.apply(change)
        for origin in streams:
            missing = server.catch_up(origin, peer.position(origin))
            if missing is None:
                self.assertIs(peer.apply_snapshot(*server.snapshot(origin)), ApplyResult.APPLIED)
            else:
                self.assertLessEqual(len(missing), log_limit)
                for change in missing:
                    self.assertIs(peer.apply(change), ApplyResult.APPLIED)
            self.assertEqual(server.catch_up(origin, peer.position(origin)), [])
        self.assertEqual(peer.digest(), server.digest())
        self.assertEqual(peer.digest(), in_order(streams).digest())

    @settings(max_examples=100, deadline=None)
    @given(st.lists(op_strategy.filter(lambda op: op[0] != "restart"), max_size=30))
    def test_peer_digest_equals_origin_digest(self, ops: list[tuple]) -> None:  # type: ignore[type-arg]
        clock = clock_at()
        source = ReplicatedState(clock, 1, 5)
        peer = receiver(clock=clock)
        for op, slot, kind, key, value, expires in ops:
            change = (source.put(slot, kind, key, value, expires) if op == "put"
                      else source.delete(slot, kind, key))
            if change is not None:
                self.assertIs(peer.apply(change), ApplyResult.APPLIED)
        self.assertEqual(peer.digest(), source.digest())


class LocalWriteTests(SynchronousTestCase):
    def test_put_get_delete_counts(self) -> None:
        state = receiver(node=4)
        c1 = state.put(0, Kind.CALL, "u1", b"row")
        self.assertEqual((c1.origin, c1.incarnation, c1.sequence, c1.op), (4, 1, 1, Op.PUT))
        state.put(0, Kind.CALL, "u2", b"row")
        state.put(1, Kind.REGISTRATION, "1000@x", b"c", LATER)
        state.put(0, Kind.CALL, "u1", b"row2")  # overwrite: counted once
        self.assertEqual(state.get(4, 0, Kind.CALL, "u1"),
                         Record(4, 0, Kind.CALL, "u1", b"row2", 0))
        self.assertEqual(state.counts(), {0: {Kind.CALL: 2}, 1: {Kind.REGISTRATION: 1}})
        self.assertEqual(len(state), 3)
        self.assertEqual(len(list(state.records(slot=0))), 2)
        self.assertEqual(len(list(state.records(kind=Kind.REGISTRATION))), 1)
        self.assertEqual(list(state.records(origin=77)), [])
        d = state.delete(0, Kind.CALL, "u1")
        assert d is not None
        self.assertEqual((d.sequence, d.op, d.value), (5, Op.DELETE, b""))
        self.assertIsNone(state.delete(0, Kind.CALL, "u1"))
        self.assertEqual(state.position(4), Position(4, 1, 5))
        self.assertEqual(state.counts(), {0: {Kind.CALL: 1}, 1: {Kind.REGISTRATION: 1}})

    def test_invalid_put_changes_nothing(self) -> None:
        state = receiver()
        before = state.digest()
        self.assertRaises(ValueError, state.put, 0, Kind.CALL, "k" * 2000, b"")
        self.assertRaises(ValueError, state.put, 1 << 16, Kind.CALL, "k", b"")
        self.assertEqual(state.position(0), Position(0, 1, 0))
        self.assertEqual(state.digest(), before)

    def test_digest_depends_on_content(self) -> None:
        a, b = receiver(), receiver()
        a.put(0, Kind.CALL, "k", b"v1")
        b.put(0, Kind.CALL, "k", b"v2")
        self.assertNotEqual(a.digest(), b.digest())
        c = receiver()
        c.put(0, Kind.CALL, "k", b"v2")
        self.assertEqual(b.digest(), c.digest())

    def test_constructor_checks(self) -> None:
        self.assertRaises(ValueError, ReplicatedState, Clock(), 0xFFFF, 1)
        self.assertRaises(ValueError, ReplicatedState, Clock(), 0, 0)
        self.assertRaises(ValueError, ReplicatedState, Clock(), 0, 1, log_limit=0)


def change(origin: int, inc: int, seq: int, key: str = "k", op: Op = Op.PUT,
           value: bytes = b"v", expires: int = 0, slot: int = 0) -> Change:
    return Change(origin, inc, seq, slot, Kind.CALL, key, op, value, expires)


class ApplyTests(SynchronousTestCase):
    def test_gap_is_not_applied(self) -> None:
        state = receiver()
        self.assertIs(state.apply(change(1, 1, 2)), ApplyResult.GAP)
        self.assertIsNone(state.position(1))
        self.assertIs(state.apply(change(1, 1, 1)), ApplyResult.APPLIED)
        self.assertIs(state.apply(change(1, 1, 3)), ApplyResult.GAP)
        self.assertIs(state.apply(change(1, 2, 2)), ApplyResult.GAP)
        self.assertEqual(state.position(1), Position(1, 1, 1))

    def test_own_origin_is_conflict(self) -> None:
        state = receiver(node=3)
        state.put(0, Kind.CALL, "k", b"v")
        self.assertIs(state.apply(change(3, 1, 1)), ApplyResult.DUPLICATE)
        self.assertIs(state.apply(change(3, 1, 2)), ApplyResult.CONFLICT)
        self.assertIs(state.apply(change(3, 2, 1)), ApplyResult.CONFLICT)
        self.assertEqual(state.position(3), Position(3, 1, 1))

    def test_new_incarnation_retires_old_records(self) -> None:
        clock = clock_at()
        state = receiver(clock=clock, retain_retired=60)
        state.apply(change(1, 1, 1, "a"))
        state.apply(change(1, 1, 2, "b"))
        self.assertIs(state.apply(change(1, 2, 1, "c")), ApplyResult.APPLIED)
        self.assertEqual([r.key for r in state.records()], ["c"])
        self.assertEqual(sorted(r.key for r in state.retired(1)), ["a", "b"])
        self.assertEqual(state.counts(), {0: {Kind.CALL: 1}})
        self.assertIs(state.apply(change(1, 1, 3, "late")), ApplyResult.DUPLICATE)
        clock.advance(59)
        state.expire()
        self.assertEqual(len(state.retired(1)), 2)
        clock.advance(1)
        state.expire()
        self.assertEqual(state.retired(1), [])
        state.apply(change(1, 3, 1, "d"))
        state.forget_retired(1)
        self.assertEqual(state.retired(1), [])
        self.assertEqual(state.retired(42), [])

    def test_expiry_on_the_clock(self) -> None:
        clock = clock_at()
        state = receiver(clock=clock)
        at = int(NOW * 1000) + 5000
        state.apply(change(1, 1, 1, "reg", expires=at))
        state.apply(change(1, 1, 2, "keep"))
        state.apply(change(1, 1, 3, "moved", expires=at))
        state.apply(change(1, 1, 4, "moved", expires=at + 10_000))  # refreshed
        self.assertEqual(state.next_expiry(), at / 1000)
        clock.advance(4.999)
        self.assertEqual(state.expire(), 0)
        self.assertIsNotNone(state.get(1, 0, Kind.CALL, "reg"))
        clock.advance(0.001)
        self.assertIsNone(state.get(1, 0, Kind.CALL, "reg"))  # hidden before expire() runs
        self.assertEqual(sorted(r.key for r in state.records()), ["keep", "moved"])
        self.assertEqual(state.expire(), 1)
        self.assertEqual(state.counts(), {0: {Kind.CALL: 2}})
        clock.advance(10)
        self.assertEqual(state.expire(), 1)
        self.assertEqual([r.key for r in state.records()], ["keep"])

    def test_expired_on_arrival(self) -> None:
        state = receiver()
        state.apply(change(1, 1, 1, "k"))
        state.apply(change(1, 1, 2, "k", expires=int(NOW * 1000)))
        self.assertEqual(len(state), 0)
        self.assertEqual(state.position(1), Position(1, 1, 2))

    def test_delete(self) -> None:
        state = receiver()
        state.apply(change(1, 1, 1, "k"))
        self.assertIs(state.apply(change(1, 1, 2, "k", Op.DELETE, b"")), ApplyResult.APPLIED)
        self.assertIs(state.apply(change(1, 1, 3, "zz", Op.DELETE, b"")), ApplyResult.APPLIED)
        self.assertEqual(len(state), 0)
        self.assertEqual(state.counts(), {})


class CatchUpTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = ReplicatedState(clock_at(), 0, 1, log_limit=3)
        for seq in range(1, 6):
            self.server.apply(change(1, 4, seq, f"k{seq}"))

    def test_cases(self) -> None:
        s = self.server
        self.assertEqual(s.catch_up(7, None), [])  # unknown origin: nothing to give
        self.assertEqual(s.catch_up(1, Position(1, 5, 1)), [])  # peer is newer
        self.assertEqual(s.catch_up(1, Position(1, 4, 5)), [])  # up to date
        self.assertEqual([c.sequence for c in s.catch_up(1, Position(1, 4, 3)) or []], [4, 5])
        self.assertEqual([c.sequence for c in s.catch_up(1, Position(1, 4, 2)) or []],
                         [3, 4, 5])
        self.assertIsNone(s.catch_up(1, Position(1, 4, 1)))  # the log no longer reaches
        self.assertIsNone(s.catch_up(1, None))
        self.assertIsNone(s.catch_up(1, Position(1, 3, 9)))

    def test_from_start_of_incarnation(self) -> None:
        state = ReplicatedState(clock_at(), 0, 1)
        state.apply(change(1, 4, 1))
        state.apply(change(1, 4, 2))
        self.assertEqual([c.sequence for c in state.catch_up(1, None) or []], [1, 2])
        self.assertEqual([c.sequence for c in state.catch_up(1, Position(1, 3, 7)) or []],
                         [1, 2])

    def test_after_snapshot_the_log_starts_there(self) -> None:
        peer = receiver(node=2)
        peer.apply_snapshot(*self.server.snapshot(1))
        self.assertEqual(peer.catch_up(1, Position(1, 4, 5)), [])
        self.assertIsNone(peer.catch_up(1, Position(1, 4, 4)))
        peer.apply(change(1, 4, 6, "k6"))
        self.assertEqual([c.sequence for c in peer.catch_up(1, Position(1, 4, 5)) or []], [6])


class SnapshotTests(SynchronousTestCase):
    def test_snapshot_round_trip(self) -> None:
        source = ReplicatedState(clock_at(), 1, 3)
        source.put(0, Kind.CALL, "a", b"1")
        source.put(2, Kind.REGISTRATION, "r", b"2", LATER)
        begin, items, end = source.snapshot(1)
        self.assertEqual((begin, end), (SnapshotBegin(1, 3, 2), SnapshotEnd(1, 3, 2, 2)))
        peer = receiver()
        peer.apply(change(1, 3, 1, "stale-by-snapshot"))
        self.assertIs(peer.apply_snapshot(begin, items, end), ApplyResult.APPLIED)
        self.assertEqual(peer.digest(), source.digest())
        self.assertIsNone(peer.get(1, 0, Kind.CALL, "stale-by-snapshot"))
        self.assertIs(peer.apply_snapshot(begin, items, end), ApplyResult.DUPLICATE)
        self.assertIs(source.apply_snapshot(begin, items, end), ApplyResult.CONFLICT)

    def test_snapshot_skips_expired(self) -> None:
        clock = clock_at()
        source = ReplicatedState(clock, 1, 1)
        source.put(0, Kind.REGISTRATION, "r", b"", int(NOW * 1000) + 1000)
        clock.advance(1)
        _, items, end = source.snapshot(1)
        self.assertEqual((items, end.count), ([], 0))

    def test_bad_snapshots(self) -> None:
        peer = receiver()
        item = SnapshotItem(0, Kind.CALL, "k", b"", 0)
        with self.assertRaises(SnapshotError):
            peer.apply_snapshot(SnapshotBegin(1, 1, 1), [item], SnapshotEnd(1, 1, 2, 1))
        with self.assertRaises(SnapshotError):
            peer.apply_snapshot(SnapshotBegin(1, 1, 1), [item], SnapshotEnd(1, 1, 1, 2))
        with self.assertRaises(SnapshotError):
            peer.apply_snapshot(SnapshotBegin(1, 1, 2), [item, item], SnapshotEnd(1, 1, 2, 2))
        self.assertIsNone(peer.position(1))

    def test_newer_snapshot_retires(self) -> None:
        peer = receiver()
        peer.apply(change(1, 1, 1, "old"))
        items = [SnapshotItem(0, Kind.CALL, "new", b"", 0)]
        peer.apply_snapshot(SnapshotBegin(1, 2, 7), items, SnapshotEnd(1, 2, 7, 1))
        self.assertEqual([r.key for r in peer.records()], ["new"])
        self.assertEqual([r.key for r in peer.retired(1)], ["old"])
        self.assertEqual(peer.position(1), Position(1, 2, 7))
        self.assertIs(peer.apply(change(1, 2, 8, "next")), ApplyResult.APPLIED)


class SupersedeTests(SynchronousTestCase):
    """A slot's master's own copy of a registration supersedes other origins' at once."""

    def fill(self, state: ReplicatedState, origin: int, n: int, kind: Kind,
             expires_ms: int = 0) -> None:
        for i in range(1, n + 1):
            self.assertIs(state.apply(Change(origin, 7, i, 1, kind, f"k{i}", Op.PUT,
                                             b"v%d" % origin, expires_ms)),
                          ApplyResult.APPLIED)

    def test_owner_copies_drop_the_dead_masters_and_release_its_log(self) -> None:
        state = receiver(node=0)
        self.fill(state, 1, 10, Kind.REGISTRATION)  # the dead master
        self.assertEqual(len(state.catch_up(1, None) or []), 10)
        for i in range(1, 4):  # the new master already holds three
            state.apply(Change(2, 9, i, 1, Kind.REGISTRATION, f"k{i}", Op.PUT, b"v2", 0))
        self.assertEqual(state.set_owners({1: 2}), 3)
        self.assertEqual(len(list(state.records(origin=1))), 7)
        self.assertIsNone(state.catch_up(1, None))  # its log went: a peer gets a snapshot
        # the owner's next copies drop the rest as they come in
        for i in range(4, 11):
            state.apply(Change(2, 9, i, 1, Kind.REGISTRATION, f"k{i}", Op.PUT, b"v2", 0))
        self.assertEqual(list(state.records(origin=1)), [])
        self.assertEqual(len(list(state.records(origin=2))), 10)
        self.assertEqual(state.superseded, 10)

    def test_calls_other_slots_and_own_records_stay(self) -> None:
        state = receiver(node=0)
        self.fill(state, 1, 2, Kind.CALL)
        state.apply(Change(1, 7, 3, 2, Kind.REGISTRATION, "k1", Op.PUT, b"x", 0))  # slot 2
        state.put(1, Kind.REGISTRATION, "k1", b"mine")
        state.set_owners({1: 2, 2: 2})
        for i, kind in enumerate((Kind.CALL, Kind.CALL, Kind.REGISTRATION), 1):
            state.apply(Change(2, 9, i, 1, kind, f"k{min(i, 2) if i < 3 else 1}", Op.PUT,
                               b"v2", 0))
        self.assertEqual(len(list(state.records(origin=1, kind=Kind.CALL))), 2)
        self.assertEqual(len(list(state.records(origin=1, kind=Kind.REGISTRATION))), 1)
        self.assertIsNotNone(state.get(0, 1, Kind.REGISTRATION, "k1"))

    def test_without_limits_calls_are_superseded_at_once_too(self) -> None:
        # nothing reads a dead master's calls once the slot has a new master but the
        # limits' reconciliation: without [limits], its copy of a call drops the others'
        state = ReplicatedState(clock_at(), 0, 1, early_superseded=EARLY_SUPERSEDED_NO_LIMITS)
        self.fill(state, 1, 3, Kind.CALL)
        state.apply(Change(1, 7, 4, 1, Kind.IDENTITY, "identity", Op.PUT, b"i", 0))
        state.set_owners({1: 2})
        state.apply(Change(2, 9, 1, 1, Kind.CALL, "k1", Op.PUT, b"v2", 0))
        state.apply(Change(2, 9, 2, 1, Kind.CALL, "k2", Op.PUT, b"v2", 0))
        self.assertEqual(sorted((r.kind.name, r.key) for r in state.records(origin=1)),
                         [("CALL", "k3"), ("IDENTITY", "identity")])  # k3: not here yet
        self.assertEqual(state.superseded, 2)

    def test_which_kinds_follow_the_limits_config(self) -> None:
        from fsha.replication.service import ReplicationService
        from tests.fakecluster import make_config

        config = make_config(nodes=3, slots=1)
        service = ReplicationService(config, config.nodes[0], clock_at(),  # type: ignore[arg-type]
                                     incarnation=1)
        self.assertEqual(service.state._early, EARLY_SUPERSEDED_NO_LIMITS)
        self.assertIsNone(config.limits)

    def test_one_object_per_record(self) -> None:
        """The log and the expiry heap refer to the stored record (issue 16: 110,000
        records on every node), and the changes a peer gets are rebuilt from it."""
        state = receiver(node=0)
        change = state.put(1, Kind.REGISTRATION, "k", b"v", LATER)
        record = state.get(0, 1, Kind.REGISTRATION, "k")
        self.assertIs(state._expiry[0], record)
        self.assertIs(state._origins[0].log.slice(0)[0], record)
        gone = state.delete(1, Kind.REGISTRATION, "k")
        self.assertEqual(state.catch_up(0, None), [change, gone])
        self.assertEqual(state._origins[0].records, {})  # an emptied table goes whole

    def test_expiry_heap_stays_bounded(self) -> None:
        clock = clock_at()
        state = receiver(node=0, clock=clock)
        far = int((NOW + 86400) * 1000)
        for round_ in range(20):  # refreshed again and again: one live record each
            for i in range(1000):
                state.put(1, Kind.REGISTRATION, f"k{i}", b"v", far + round_)
        self.assertLessEqual(len(state._expiry), 2 * len(state) + 4096)
        for i in range(1000):
            state.delete(1, Kind.REGISTRATION, f"k{i}")
        state.expire()
        self.assertLessEqual(len(state._expiry), 4096)
