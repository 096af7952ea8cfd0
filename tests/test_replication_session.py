"""Tests for fsha.replication.session: two sessions back to back, no sockets, a fake clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fsha.replication.session import LiveBatch, PeerSession, SessionConfig, WriteTimes
from fsha.replication.state import ReplicatedState
from fsha.wire import stream
from fsha.wire.stream import (
    Ack,
    Change,
    Hello,
    Keepalive,
    Kind,
    Op,
    Position,
    SnapshotBegin,
    SnapshotEnd,
    SnapshotItem,
    StreamDecoder,
)

DIGEST = b"\x01" * 8
NOW = 1000.0


def hello(state: ReplicatedState) -> Hello:
    return Hello(state.node, state.incarnation, DIGEST, state.positions())


class End:
    """One side of a link: its state, session, what it wrote and whether it closed."""

    def __init__(self, link: Link, state: ReplicatedState, peer: int, config: SessionConfig,
                 write_times: WriteTimes | None) -> None:
        self.link = link
        self.state = state
        self.out: list[bytes] = []
        self.closed: list[str] = []
        self.lags: list[tuple[int, float]] = []
        self.decoder = StreamDecoder()  # decodes what the *other* side wrote to this one
        self.session = PeerSession(state, peer, link.clock, self.out.append, self.closed.append,
                                   config=config, write_times=write_times,
                                   on_lag=lambda p, s: self.lags.append((p, s)))

    def written(self) -> int:
        return sum(len(b) for b in self.out)


class Link:
    """Sessions of ``a`` and ``b`` joined by in-memory pipes that deliver on request."""

    def __init__(self, clock: Clock, a: ReplicatedState, b: ReplicatedState, *,
                 config_a: SessionConfig | None = None, config_b: SessionConfig | None = None,
                 times_a: WriteTimes | None = None, times_b: WriteTimes | None = None) -> None:
        self.clock = clock
        self.a = End(self, a, b.node, config_a or SessionConfig(), times_a)
        self.b = End(self, b, a.node, config_b or SessionConfig(), times_b)
        self.hello_a, self.hello_b = hello(a), hello(b)  # both sent at the handshake

    def start(self) -> Link:
        self.a.session.start(self.hello_b)
        self.b.session.start(self.hello_a)
        return self

    def _move(self, src: End, dst: End) -> bool:
        if not src.out or dst.closed or src.closed:
            src.out.clear()
            return False
        data = b"".join(src.out)
        src.out.clear()
        for frame in dst.decoder.feed(data):
            dst.session.frame_received(frame)
        return True

    def pump(self, a_to_b: bool = True, b_to_a: bool = True, rounds: int = 10_000) -> None:
        """Deliver until nothing moves (and the zero-delay ACK calls have run)."""
        for _ in range(rounds):
            moved = (a_to_b and self._move(self.a, self.b)) | \
                    (b_to_a and self._move(self.b, self.a))
            self.clock.advance(0)
            if not moved and not (a_to_b and self.a.out) and not (b_to_a and self.b.out):
                return
        raise AssertionError("the link never went quiet")

    def frames(self, end: End) -> list[stream.Frame]:
        """Decode (and consume) what ``end`` wrote, without delivering it."""
        data = b"".join(end.out)
        end.out.clear()
        return StreamDecoder().feed(data)


def clock_at(seconds: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


def offer(session: PeerSession, changes: list[Change]) -> None:
    session.offer(LiveBatch(changes))


def fill(state: ReplicatedState, n: int, start: int = 0, slot: int = 0,
         size: int = 10) -> list[Change]:
    return [state.put(slot, Kind.CALL, f"call-{i}", b"x" * size) for i in range(start, start + n)]


class CatchUpTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = clock_at()
        self.a = ReplicatedState(self.clock, 0, 10)
        self.b = ReplicatedState(self.clock, 1, 20)

    def test_resume_from_position(self) -> None:
        changes = fill(self.a, 30)
        for change in changes[:12]:
            self.b.apply(change)
        link = Link(self.clock, self.a, self.b).start()
        link.pump()
        self.assertEqual(self.a.digest(), self.b.digest())
        self.assertEqual(link.a.session.changes_sent, 18)  # only what b lacked
        self.assertEqual(link.a.session.snapshots_sent, 0)
        self.assertEqual(link.b.session.applied, 18)
        self.assertEqual(link.b.session.duplicates, 0)
        self.assertEqual(link.a.session.in_flight_changes, 0)
        self.assertEqual(link.a.session.lag(), (0, 0.0))
        self.assertEqual(link.a.closed + link.b.closed, [])

    def test_snapshot_when_the_log_no_longer_reaches_back(self) -> None:
        a = ReplicatedState(self.clock, 0, 10, log_limit=10)
        changes = fill(a, 25)
        a.delete(0, Kind.CALL, "call-3")
        for change in changes[:5]:
            self.b.apply(change)
        link = Link(self.clock, a, self.b).start()
        link.pump()
        self.assertEqual(a.digest(), self.b.digest())
        self.assertEqual(link.a.session.snapshots_sent, 1)
        self.assertEqual(link.b.session.snapshots_applied, 1)
        self.assertIsNone(self.b.get(0, 0, Kind.CALL, "call-3"))
        self.assertEqual(self.b.position(0), Position(0, 10, 26))

    def test_new_peer_gets_everything_both_ways(self) -> None:
        fill(self.a, 5)
        fill(self.b, 7, slot=1)
        link = Link(self.clock, self.a, self.b).start()
        link.pump()
        self.assertEqual(self.a.digest(), self.b.digest())
        self.assertEqual(len(self.a), 12)
        self.assertEqual(self.a.counts(), {0: {Kind.CALL: 5}, 1: {Kind.CALL: 7}})

    def test_third_origin_served_up_to_the_hello_position(self) -> None:
        c = ReplicatedState(self.clock, 2, 30)
        early = fill(c, 8)
        for change in early:
            self.a.apply(change)
        link = Link(self.clock, self.a, self.b).start()
        link.pump()
        self.assertEqual(self.b.position(2), Position(2, 30, 8))
        # later changes of c reach a, but only c streams them live
        for change in fill(c, 3, start=100):
            self.a.apply(change)
        link.pump()
        self.assertEqual(self.b.position(2), Position(2, 30, 8))
        self.assertEqual(link.a.session.changes_sent, 8)

    def test_duplicates_from_two_sources_are_ignored(self) -> None:
        c = ReplicatedState(self.clock, 2, 30)
        changes = fill(c, 6)
        for change in changes:
            self.a.apply(change)
        for change in changes[:2]:
            self.b.apply(change)
        link = Link(self.clock, self.a, self.b).start()
        # c's own link delivers 3..6 first, then a's catch-up arrives
        for change in changes[2:]:
            self.b.apply(change)
        before = self.b.digest()
        link.pump()
        self.assertEqual(self.b.digest(), before)
        self.assertEqual(link.b.session.duplicates, 4)
        self.assertEqual(link.b.session.applied, 0)
        self.assertEqual(link.a.session.in_flight_changes, 0)  # acked all the same
        # the very same frames again: still nothing changes
        for change in changes:
            link.b.session.frame_received(change)
        self.assertEqual(self.b.digest(), before)
        self.assertEqual(link.b.session.duplicates, 10)
        self.assertEqual(link.b.closed, [])

    def test_restarted_peer_retires_its_old_records(self) -> None:
        fill(self.b, 4)
        link = Link(self.clock, self.a, self.b).start()
        link.pump()
        self.assertEqual(sum(1 for _ in self.a.records(origin=1)), 4)
        # b restarts (a new incarnation) and has written nothing yet
        b2 = ReplicatedState(self.clock, 1, 21)
        link2 = Link(self.clock, self.a, b2).start()
        link2.pump()
        self.assertEqual(sum(1 for _ in self.a.records(origin=1)), 0)
        self.assertEqual(len(self.a.retired(1)), 4)
        self.assertEqual(self.a.digest(), b2.digest())

    def test_newer_incarnation_with_empty_log_is_sent_as_empty_snapshot(self) -> None:
        c_old = ReplicatedState(self.clock, 2, 30)
        for change in fill(c_old, 3):
            self.a.apply(change)
            self.b.apply(change)
        # a learns that c restarted (e.g. from c's HELLO); b has not heard of it yet
        self.assertTrue(self.a.observe_incarnation(2, 31))
        link = Link(self.clock, self.a, self.b).start()
        link.pump()
        self.assertEqual(self.b.position(2), Position(2, 31, 0))
        self.assertEqual(sum(1 for _ in self.b.records(origin=2)), 0)
        self.assertEqual(self.a.digest(), self.b.digest())


class LiveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = clock_at()
        self.a = ReplicatedState(self.clock, 0, 10)
        self.b = ReplicatedState(self.clock, 1, 20)
        self.times = WriteTimes(1000)

    def put(self, n: int, start: int = 0) -> list[Change]:
        changes = []
        for i in range(start, start + n):
            change = self.a.put(0, Kind.REGISTRATION, f"u{i}@x", b"contact")
            self.times.add(change.sequence, self.clock.seconds())
            changes.append(change)
        return changes

    def test_live_changes_and_lag(self) -> None:
        link = Link(self.clock, self.a, self.b, times_a=self.times).start()
        link.pump()
        changes = self.put(5)
        writes = link.a.session.writes
        offer(link.a.session, changes)
        self.assertEqual(link.a.session.writes, writes + 1)  # one write for the whole batch
        self.assertEqual(link.a.session.lag()[0], 5)
        self.clock.advance(0.004)
        self.assertAlmostEqual(link.a.session.lag()[1], 4.0, places=3)
        link.pump()
        self.assertEqual(self.a.digest(), self.b.digest())
        self.assertEqual(link.a.session.lag(), (0, 0.0))
        self.assertEqual(len(link.a.lags), 1)
        self.assertAlmostEqual(link.a.lags[0][1], 0.004, places=6)
        self.assertEqual(link.a.lags[0][0], 1)
        # deletes travel too
        change = self.a.delete(0, Kind.REGISTRATION, "u1@x")
        assert change is not None
        self.times.add(change.sequence, self.clock.seconds())
        offer(link.a.session, [change])
        link.pump()
        self.assertEqual(self.a.digest(), self.b.digest())
        self.assertIsNone(self.b.get(0, 0, Kind.REGISTRATION, "u1@x"))
        self.assertEqual(link.a.session.status()["lag_changes"], 0)

    def test_offer_out_of_order_is_pulled_from_the_log(self) -> None:
        link = Link(self.clock, self.a, self.b).start()
        link.pump()
        first = self.put(3)
        second = self.put(3, start=3)
        offer(link.a.session, second)  # the first batch was never offered: pull it
        offer(link.a.session, first)  # already sent by then: nothing happens
        link.pump()
        self.assertEqual(link.a.session.changes_sent, 6)
        self.assertEqual(link.b.session.duplicates, 0)
        self.assertEqual(self.a.digest(), self.b.digest())

    def test_paused_transport_stops_pulling(self) -> None:
        link = Link(self.clock, self.a, self.b).start()
        link.pump()
        session = link.a.session
        session.pauseProducing()
        offer(session, self.put(50))
        self.assertEqual(link.a.out, [])
        self.assertEqual(session.status()["paused"], True)
        session.resumeProducing()
        link.pump()
        self.assertEqual(self.a.digest(), self.b.digest())
        self.assertEqual(session.changes_sent, 50)

    def test_pause_during_a_pull_stops_it(self) -> None:
        config = SessionConfig(batch_changes=10)
        link = Link(self.clock, self.a, self.b, config_a=config)
        session = link.a.session

        def write(data: bytes) -> None:
            link.a.out.append(data)
            session.pauseProducing()  # the transport's buffer is full after every write

        session._write_fn = write
        self.put(100)
        link.start()
        self.assertEqual(len(link.a.out), 1)
        self.assertEqual(session.changes_sent, 10)
        for _ in range(9):
            session.resumeProducing()
        self.assertEqual(session.changes_sent, 100)
        link.pump()
        self.assertEqual(self.a.digest(), self.b.digest())

    def test_in_flight_window_is_bounded(self) -> None:
        config = SessionConfig(max_in_flight_changes=100, batch_changes=30)
        link = Link(self.clock, self.a, self.b, config_a=config).start()
        link.pump()
        session = link.a.session
        for i in range(20):
            offer(session, self.put(25, start=i * 25))
        self.assertLessEqual(session.in_flight_changes, 100)
        self.assertEqual(session.in_flight_changes, 100)
        self.assertEqual(session.lag()[0], 500)  # none acknowledged yet
        # b acknowledges: the rest flows
        link.pump()
        self.assertEqual(session.changes_sent, 500)
        self.assertEqual(session.in_flight_changes, 0)
        self.assertEqual(self.a.digest(), self.b.digest())

    def test_in_flight_bytes_bound(self) -> None:
        config = SessionConfig(max_in_flight_bytes=10_000)
        link = Link(self.clock, self.a, self.b, config_a=config).start()
        link.pump()
        session = link.a.session
        for i in range(50):
            offer(session, [self.a.put(0, Kind.CALL, f"c{i}", b"v" * 1000)])
        self.assertLess(session.in_flight_bytes, 10_000 + 1100)
        self.assertLess(link.a.written(), 12_000)
        link.pump()
        self.assertEqual(self.a.digest(), self.b.digest())

    def test_peer_too_far_behind_is_resynced_by_snapshot(self) -> None:
        a = ReplicatedState(self.clock, 0, 10, log_limit=100)
        config = SessionConfig(max_in_flight_changes=50)
        link = Link(self.clock, a, self.b, config_a=config).start()
        link.pump()
        session = link.a.session
        keys = 30
        for i in range(1000):  # b does not acknowledge meanwhile
            change = a.put(0, Kind.LIMIT, f"k{i % keys}", str(i).encode())
            offer(session, [change])
        self.assertEqual(session.in_flight_changes, 50)
        self.assertLessEqual(link.a.written(), 50 * 60)
        link.pump()
        self.assertEqual(session.snapshots_sent, 1)
        self.assertEqual(a.digest(), self.b.digest())
        self.assertEqual(sum(1 for _ in self.b.records(origin=0)), keys)
        # and afterwards it is live again
        offer(session, [a.put(0, Kind.LIMIT, "k0", b"new")])
        self.assertEqual(session.writes, link.a.session.writes)
        link.pump()
        self.assertEqual(a.digest(), self.b.digest())
        self.assertEqual(session.snapshots_sent, 1)

    def test_big_snapshot_goes_in_bounded_writes(self) -> None:
        a = ReplicatedState(self.clock, 0, 10, log_limit=10)
        for i in range(200):
            a.put(0, Kind.CALL, f"call-{i}", b"r" * 2000)
        config = SessionConfig(batch_bytes=20_000)
        link = Link(self.clock, a, self.b, config_a=config)
        sizes: list[int] = []
        link.a.session._write_fn = lambda d: (sizes.append(len(d)), link.a.out.append(d))
        link.start()
        link.pump()
        self.assertEqual(a.digest(), self.b.digest())
        self.assertGreater(len(sizes), 10)
        self.assertLess(max(sizes), 20_000 + 2100)


class ReceiveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = clock_at()
        self.a = ReplicatedState(self.clock, 0, 10)
        self.b = ReplicatedState(self.clock, 1, 20)
        self.link = Link(self.clock, self.a, self.b).start()
        self.link.pump()
        self.rx = self.link.b

    def test_gap_closes_the_link(self) -> None:
        changes = fill(self.a, 5)
        self.rx.session.frame_received(changes[0])
        self.rx.session.frame_received(changes[3])
        self.assertEqual(self.rx.closed, ["gap"])
        self.assertTrue(self.rx.session.closed)
        self.assertEqual(self.b.position(0), Position(0, 10, 1))
        # a new link resumes from b's position and fills the gap
        link = Link(self.clock, self.a, self.b).start()
        link.pump()
        self.assertEqual(self.a.digest(), self.b.digest())
        self.assertEqual(link.a.session.changes_sent, 4)

    def test_change_of_own_origin_is_a_conflict(self) -> None:
        forged = Change(1, 20, 1, 0, Kind.CALL, "x", Op.PUT, b"", 0)
        self.rx.session.frame_received(forged)
        self.assertEqual(self.rx.closed, ["conflict"])
        self.assertEqual(len(self.b), 0)

    def test_snapshot_frames_out_of_place(self) -> None:
        self.rx.session.frame_received(SnapshotItem(0, Kind.CALL, "k", b"", 0))
        self.assertEqual(self.rx.closed, ["protocol"])

    def test_change_inside_a_snapshot(self) -> None:
        self.rx.session.frame_received(SnapshotBegin(0, 10, 3))
        self.rx.session.frame_received(fill(self.a, 1)[0])
        self.assertEqual(self.rx.closed, ["protocol"])

    def test_snapshot_count_mismatch(self) -> None:
        s = self.rx.session
        s.frame_received(SnapshotBegin(0, 10, 3))
        s.frame_received(SnapshotItem(0, Kind.CALL, "k", b"v", 0))
        s.frame_received(SnapshotEnd(0, 10, 3, 2))
        self.assertEqual(self.rx.closed, ["snapshot"])
        self.assertEqual(len(self.b), 0)

    def test_snapshot_size_is_bounded(self) -> None:
        link = Link(self.clock, self.a, ReplicatedState(self.clock, 1, 21),
                    config_b=SessionConfig(max_snapshot_bytes=10_000)).start()
        s = link.b.session
        s.frame_received(SnapshotBegin(0, 10, 3))
        for i in range(9):
            s.frame_received(SnapshotItem(0, Kind.CALL, f"k{i}", b"v" * 1000, 0))
        self.assertEqual(link.b.closed, [])
        s.frame_received(SnapshotItem(0, Kind.CALL, "k9", b"v" * 1000, 0))
        self.assertEqual(link.b.closed, ["snapshot"])

    def test_snapshot_of_own_origin_is_a_conflict(self) -> None:
        self.rx.session.frame_received(SnapshotBegin(1, 20, 3))
        self.assertEqual(self.rx.closed, ["conflict"])

    def test_unexpected_frame(self) -> None:
        self.rx.session.frame_received(hello(self.a))
        self.assertEqual(self.rx.closed, ["protocol"])

    def test_frames_after_close_are_ignored(self) -> None:
        self.rx.session.frame_received(hello(self.a))
        self.rx.session.frame_received(fill(self.a, 1)[0])
        self.assertEqual(len(self.b), 0)
        self.assertEqual(self.rx.closed, ["protocol"])

    def test_peer_claiming_this_nodes_future_is_refused(self) -> None:
        fill(self.a, 2)
        link = Link(self.clock, self.a, ReplicatedState(self.clock, 1, 21))
        link.a.session.start(Hello(1, 21, DIGEST, (Position(0, 10, 99),)))
        self.assertEqual(link.a.closed, ["conflict"])

    def test_acks_are_coalesced_per_turn(self) -> None:
        changes = fill(self.a, 20)
        for change in changes:
            self.rx.session.frame_received(change)
        self.assertEqual(self.rx.out, [])
        self.clock.advance(0)
        frames = self.link.frames(self.rx)
        self.assertEqual(frames, [Ack(self.b.positions())])


class TimerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = clock_at()
        self.a = ReplicatedState(self.clock, 0, 10)
        self.b = ReplicatedState(self.clock, 1, 20)
        config = SessionConfig(keepalive_interval=1.0, silence_timeout=3.5, ack_timeout=5.0)
        self.link = Link(self.clock, self.a, self.b, config_a=config, config_b=config).start()
        self.link.pump()

    def test_keepalives_keep_an_idle_link_up_and_measure_rtt(self) -> None:
        for _ in range(40):
            self.clock.advance(0.5)
            self.link.pump()
        self.assertEqual(self.link.a.closed + self.link.b.closed, [])
        rtt = self.link.a.session.rtt_ms
        self.assertIsNotNone(rtt)
        self.assertEqual(rtt, 0.0)  # the fake clock does not move while frames travel

    def test_crossing_keepalives_do_not_ping_pong(self) -> None:
        self.clock.advance(1.0)  # both tick at the same moment
        before = self.link.a.session.writes + self.link.b.session.writes
        self.link.pump()
        self.assertLessEqual(self.link.a.session.writes + self.link.b.session.writes,
                             before + 6)

    def test_keepalive_only_when_idle(self) -> None:
        for _ in range(8):  # a sends changes every 0.25 s: no keepalive from a
            self.clock.advance(0.25)
            offer(self.link.a.session, fill(self.a, 1, start=int(self.clock.seconds() * 10)))
            frames = self.link.frames(self.link.a)
            self.assertFalse(any(isinstance(f, Keepalive) for f in frames))
            for f in frames:
                self.link.b.session.frame_received(f)
            self.clock.advance(0)
            self.link.frames(self.link.b)  # b's acks: lost, does not matter here

    def test_silence_closes(self) -> None:
        # b's frames stop arriving at a
        self.clock.advance(3.0)
        self.link.pump(b_to_a=False)
        self.assertEqual(self.link.a.closed, [])
        self.clock.advance(0.5)
        self.assertEqual(self.link.a.closed, ["silence"])
        self.assertTrue(self.link.a.session.closed)

    def test_missing_acks_close(self) -> None:
        offer(self.link.a.session, fill(self.a, 3))
        for _ in range(9):  # b keeps sending keepalives, never an ACK
            self.clock.advance(0.5)
            self.link.pump(a_to_b=False)
        self.assertEqual(self.link.a.closed, [])
        self.clock.advance(0.5)
        self.link.pump(a_to_b=False)
        self.assertEqual(self.link.a.closed, ["ack-timeout"])

    def test_stop_cancels_timers(self) -> None:
        self.link.a.session.stop()
        self.link.b.session.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class WriteTimesTests(SynchronousTestCase):
    def test_bounded(self) -> None:
        times = WriteTimes(10)
        for seq in range(1, 100):
            times.add(seq, float(seq))
        self.assertEqual(times.at(99), 99.0)
        self.assertEqual(times.at(90), 90.0)
        self.assertIsNone(times.at(5))
        self.assertIsNone(times.at(100))
        self.assertLess(len(times._times), 20)
        times.add(500, 1.0)  # a jump starts over
        self.assertEqual(times.at(500), 1.0)
        self.assertIsNone(times.at(99))

    def test_config_validation(self) -> None:
        self.assertRaises(ValueError, SessionConfig, keepalive_interval=0)
        self.assertRaises(ValueError, SessionConfig, silence_timeout=0.5)
        self.assertRaises(ValueError, SessionConfig, max_in_flight_changes=0)
        self.assertRaises(ValueError, WriteTimes, 0)


# -- property: whatever the breaks, pauses and losses, the nodes converge --------------------

actions = st.lists(st.tuples(
    st.sampled_from(["put", "put", "put", "delete", "pause", "resume", "break", "deliver",
                     "restart"]),
    st.integers(0, 2),  # which node
    st.integers(0, 5),  # key
), max_size=60)


class ConvergenceTests(SynchronousTestCase):
    @settings(max_examples=100, deadline=None)
    @given(actions, st.integers(5, 40), st.integers(1, 20))
    def test_three_nodes_converge(self, steps: list[tuple[str, int, int]], log_limit: int,
                                  window: int) -> None:
        clock = clock_at()
        incarnations = [100, 200, 300]
        states = [ReplicatedState(clock, n, incarnations[n], log_limit=log_limit)
                  for n in range(3)]
        config = SessionConfig(max_in_flight_changes=window, batch_changes=3)
        links: dict[tuple[int, int], Link] = {}

        def connect(i: int, j: int) -> None:
            links[(i, j)] = Link(clock, states[i], states[j], config_a=config,
                                 config_b=config).start()

        def broken(link: Link) -> bool:
            return bool(link.a.closed or link.b.closed or link.a.session.closed
                        or link.b.session.closed)

        for i, j in ((0, 1), (0, 2), (1, 2)):
            connect(i, j)
        for action, n, key in steps:
            if action in ("put", "delete"):
                s = states[n]
                change = (s.put(0, Kind.CALL, f"k{key}", b"v%d" % key) if action == "put"
                          else s.delete(0, Kind.CALL, f"k{key}"))
                if change is not None:
                    for (i, j), link in links.items():
                        if i == n:
                            offer(link.a.session, [change])
                        elif j == n:
                            offer(link.b.session, [change])
            elif action in ("pause", "resume"):
                link = list(links.values())[n]
                side = link.a.session if key % 2 else link.b.session
                side.pauseProducing() if action == "pause" else side.resumeProducing()
            elif action == "break":
                pair = list(links)[n]
                links[pair].a.session.stop()
                links[pair].b.session.stop()
                connect(*pair)
            elif action == "restart":
                incarnations[n] += 1
                states[n] = ReplicatedState(clock, n, incarnations[n], log_limit=log_limit)
                for pair in list(links):
                    if n in pair:
                        links[pair].a.session.stop()
                        links[pair].b.session.stop()
                        connect(*pair)
            else:
                list(links.values())[n].pump()
        # heal: resume everything, reconnect what broke, deliver until quiet
        for _ in range(5):
            for pair, link in list(links.items()):
                if broken(link):
                    link.a.session.stop()
                    link.b.session.stop()
                    connect(*pair)
                else:
                    link.a.session.resumeProducing()
                    link.b.session.resumeProducing()
            for link in list(links.values()):
                link.pump()
        for link in links.values():
            self.assertFalse(broken(link))
        self.assertEqual(states[0].digest(), states[1].digest())
        self.assertEqual(states[1].digest(), states[2].digest())
