"""The adaptive failure detector (fsha.detector) over generated arrival traces: loss,
jitter, reordering and pauses of the sender's reactor.

What it promises, checked here on the detector alone (pure, explicit ``now``):

* never judged dead before the floor after the last arrival, always by the ceiling;
* a live peer whose silences repeat what its link has already shown (a periodic pattern
  of jitter, loss and sender pauses, each silence shorter than the ceiling) is never
  judged dead: the first silences fall in the warm-up, judged at the ceiling;
* a clean link is judged at the floor;
* every promise it states (the echo bound of heartbeat version 4) is kept: the moment it
  would judge the peer dead never moves before a promised one.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fsha.detector import HOLD, WARMUP, FailureDetector
from fsha.wire.heartbeat import NO_NODE, NO_SLOT, Flags, Heartbeat, MessageType, Role

PEER = 1
INTERVAL = 0.005
FLOOR = 0.025
CEILING = 0.100


def heartbeat(sequence: int, incarnation: int = 1) -> Heartbeat:
    return Heartbeat(MessageType.HEARTBEAT, 0, PEER, incarnation, sequence, Role.SLAVE,
                     Flags.FS_OK, NO_SLOT, 0, NO_NODE, b"\0" * 8, b"\0" * 8)


def detector(networks: int = 1, floor: float | None = FLOOR) -> FailureDetector:
    return FailureDetector([PEER], networks, CEILING, floor=floor, interval=INTERVAL)


@dataclass(frozen=True)
class Step:
    """One heartbeat of the sender: sent ``pause`` after the one before (its interval, or
    longer when its reactor stalled), arriving ``delay`` after it is sent, unless lost."""

    pause: float
    delay: float
    lost: bool


def arrivals(steps: list[Step], start: float = 0.0) -> list[tuple[float, int]]:
    """(arrival time, sequence) in arrival order: a datagram overtaken by a later one
    arrives after it (the detector drops it as a replay)."""
    sent, out = start, []
    for sequence, step in enumerate(steps, 1):
        sent += step.pause
        if not step.lost:
            out.append((sent + step.delay, sequence))
    return sorted(out)


def steps(max_jitter: float = 0.040, max_pause: float = 0.040) -> st.SearchStrategy[Step]:
    return st.builds(
        Step,
        pause=st.one_of(st.just(INTERVAL),
                        st.floats(INTERVAL, INTERVAL + max_pause, allow_nan=False)),
        delay=st.floats(0.0001, 0.0001 + max_jitter, allow_nan=False),
        lost=st.booleans() | st.just(False))


def feed(d: FailureDetector, trace: list[tuple[float, int]], network: int = 0,
         incarnation: int = 1) -> list[float]:
    """Feed ``trace`` to ``d``; the moments at which the peer was judged dead (checked
    right before each arrival: the deadline moves only at arrivals)."""
    deaths = []
    for at, sequence in trace:
        if d.check(at):
            deaths.append(at)
        d.observe(network, heartbeat(sequence, incarnation), at)
    return deaths


def silences(trace: list[tuple[float, int]]) -> list[float]:
    """The silences between applied arrivals (a replayed sequence refreshes nothing)."""
    out, last, newest = [], None, 0
    for at, sequence in trace:
        if sequence <= newest:
            continue
        newest = sequence
        if last is not None:
            out.append(at - last)
        last = at
    return out


class Bounds(SynchronousTestCase):
    def test_a_fixed_dead_after_is_the_old_rule(self) -> None:
        d = detector(floor=None)
        feed(d, [(i * INTERVAL, i) for i in range(1, 200)])
        last = 199 * INTERVAL
        self.assertEqual(d.bound(PEER, 0), CEILING)
        self.assertFalse(d.check(last + CEILING))
        self.assertTrue(d.check(last + CEILING + 1e-9))

    def test_a_clean_link_is_judged_at_the_floor(self) -> None:
        d = detector()
        feed(d, [(i * INTERVAL, i) for i in range(1, 200)])
        last = 199 * INTERVAL
        self.assertEqual(d.bound(PEER, 0), FLOOR)
        self.assertAlmostEqual(d.promise(PEER, 0), FLOOR)
        self.assertFalse(d.check(last + FLOOR))
        self.assertEqual([t.alive for t in d.check(last + FLOOR + 1e-9)], [False])

    def test_a_new_link_is_judged_at_the_ceiling(self) -> None:
        d = detector()
        feed(d, [(i * INTERVAL, i) for i in range(1, WARMUP)])
        self.assertEqual(d.bound(PEER, 0), CEILING)

    def test_a_stall_seen_is_remembered_then_forgotten(self) -> None:
        d = detector()
        trace = [(i * INTERVAL, i) for i in range(1, 100)]
        stall = [(trace[-1][0] + 0.060, 100)]  # the sender stalled 60 ms
        # the first such stall on a link judged at the floor cannot be told from a death
        self.assertEqual(feed(d, trace + stall), [stall[0][0]])
        t = stall[0][0]
        trace = [(t + i * INTERVAL, 100 + i) for i in range(1, 100)]
        trace.append((trace[-1][0] + 0.060, 200))  # the same stall again
        t = trace[-1][0]
        trace += [(t + i * INTERVAL, 200 + i) for i in range(1, 100)]
        self.assertEqual(feed(d, trace), [])  # learnt: no verdict
        self.assertAlmostEqual(d.bound(PEER, 0), 0.060 + INTERVAL)
        # after two hold windows of clean arrivals, back at the floor
        t, n = trace[-1]
        clean = [(t + i * INTERVAL, n + i) for i in range(1, round(2.2 * HOLD / INTERVAL))]
        self.assertEqual(feed(d, clean), [])
        self.assertEqual(d.bound(PEER, 0), FLOOR)

    def test_a_restart_is_no_silence_of_the_link(self) -> None:
        d = detector()
        feed(d, [(i * INTERVAL, i) for i in range(1, 100)])
        t = 99 * INTERVAL + 0.080  # restarted 80 ms later, still alive for the detector
        d.observe(0, heartbeat(7, incarnation=2), t)
        self.assertEqual(d.bound(PEER, 0), FLOOR)

    def test_an_outage_is_not_the_link_s_behaviour(self) -> None:
        d = detector()
        feed(d, [(i * INTERVAL, i) for i in range(1, 100)])
        self.assertTrue(d.check(1.0))  # silent for longer than the ceiling
        feed(d, [(1.0 + i * INTERVAL, 100 + i) for i in range(1, 20)])
        self.assertEqual(d.bound(PEER, 0), FLOOR)

    def test_every_network_must_be_past_its_deadline(self) -> None:
        d = detector(networks=2)
        for i in range(1, 100):
            d.observe(0, heartbeat(i), i * INTERVAL)
            d.observe(1, heartbeat(i), i * INTERVAL + 0.0001)
        # network 1 alone carries on: alive, though network 0 is down
        for i in range(100, 120):
            d.observe(1, heartbeat(i), i * INTERVAL)
            self.assertEqual(d.check(i * INTERVAL), [])
        self.assertFalse(d.network_up(PEER, 0, 119 * INTERVAL))
        self.assertTrue(d.network_up(PEER, 1, 119 * INTERVAL))


class Traces(SynchronousTestCase):
    @settings(max_examples=150)
    @given(st.lists(steps(), min_size=1, max_size=WARMUP // 2), st.integers(3, 30),
           st.floats(0.0, 10.0))
    def test_a_live_peer_repeating_its_link_is_never_judged_dead(
            self, pattern: list[Step], repeats: int, start: float) -> None:
        """Jitter up to 40 ms, loss, reordering and sender pauses up to 40 ms, repeated:
        the silences repeat with the pattern, the first round falls in the warm-up (at
        most 8 arrivals a round, 16 in the warm-up), every later silence was seen before.
        Judged up to ``cutoff``: the last rounds, whose datagrams are not all overtaken
        as in the rounds before (nothing follows them), are not the pattern any more."""
        period = sum(step.pause for step in pattern)
        extra = 1 + int(0.05 / period)  # rounds sent after the cutoff: beyond any delay
        trace = arrivals(pattern * (repeats + extra), start)
        cutoff = start + repeats * period
        gaps = silences(trace)
        if not gaps or max(gaps) >= CEILING:
            return  # an outage, not a link's behaviour (judged at the ceiling: below)
        d = detector()
        self.assertEqual([t for t in feed(d, trace) if t <= cutoff], [])

    @settings(max_examples=150)
    @given(st.lists(steps(max_jitter=0.08, max_pause=0.08), min_size=1, max_size=300),
           st.floats(0.0, 10.0))
    def test_a_verdict_needs_a_silence_never_shown(self, pattern: list[Step],
                                                    start: float) -> None:
        """Any trace: a live peer is judged dead only for a silence longer than the floor
        and, once the link is past its warm-up, longer than every silence it showed
        before by more than an interval (before: longer than the ceiling)."""
        d = detector()
        shown: list[float] = []
        last = None
        for at, sequence in arrivals(pattern, start):
            if d.check(at):
                assert last is not None
                silence = at - last
                self.assertGreater(silence, FLOOR)
                if len(shown) >= WARMUP:
                    self.assertGreater(silence, max(shown) + INTERVAL - 1e-9)
                else:
                    self.assertGreater(silence, CEILING)
            if d.observe(0, heartbeat(sequence), at).applied:
                if last is not None and at - last <= CEILING:
                    shown.append(at - last)
                last = at

    @settings(max_examples=150)
    @given(st.lists(steps(max_jitter=0.2, max_pause=0.2), min_size=1, max_size=200),
           st.floats(0.0, 10.0))
    def test_any_trace_judged_between_the_floor_and_the_ceiling(
            self, pattern: list[Step], start: float) -> None:
        """Whatever came before, the peer, silent from its last arrival on, is judged dead
        no earlier than the floor and no later than the ceiling after it; and no earlier
        than any promise it was given."""
        trace = arrivals(pattern, start)
        if not trace:
            return
        d = detector(networks=2)
        promised = []
        for at, sequence in trace:
            d.check(at)
            d.observe(sequence % 2, heartbeat(sequence), at)
            d.observe(0, heartbeat(sequence), at)  # network 0 hears every one
            for n in (0, 1):
                heard = d.peers[PEER].heard[n]
                if heard == at:
                    promised.append(heard + d.promise(PEER, n))
        last = d.peers[PEER].last_heard()
        dies = d.peers[PEER].dies_at()
        self.assertGreaterEqual(dies, last + FLOOR - 1e-9)
        self.assertLessEqual(dies, last + CEILING + 1e-9)
        self.assertGreaterEqual(dies, max(promised) - 1e-9)
        if d.peers[PEER].alive:
            self.assertEqual(d.check(dies), [])
            self.assertEqual([t.alive for t in d.check(dies + 1e-6)], [False])

    @settings(max_examples=100)
    @given(st.lists(st.tuples(steps(max_jitter=0.06, max_pause=0.06), st.booleans()),
                    min_size=WARMUP + 2, max_size=300))
    def test_promises_never_move_earlier(self, pattern: list[tuple[Step, bool]]) -> None:
        """The deadline of a network never moves earlier, whatever arrives."""
        d = detector()
        before = float("-inf")
        for at, sequence in arrivals([s for s, _ in pattern]):
            d.observe(0, heartbeat(sequence), at)
            now = d.peers[PEER].deadline[0]
            self.assertGreaterEqual(now, before)
            before = now
