"""Property: random faults on a FakeCluster (real ClusterNodes, one fake clock) never give
one slot two running holders beyond the bound, and every slot gets a master once a
quorum is back together.

Faults: symmetric partitions, one-way blocks, nontransitive partitions (one pair cut,
the others hearing both), every network of a node cut, kill -9, pause (SIGSTOP) and
restart. Killed and paused nodes are not counted as holders: what a dead or frozen fsha
leaves on its host is the out-of-process guard's concern (docs/design.rst).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from .fakecluster import FakeCluster, make_config

NAMES = ("fs1", "fs2", "fs3", "fs4", "fs5")
STEP = 0.005  # sampling step of the fake clock (a tenth of the demo's interval)
# A short derandomized run by default (a few seconds); FSHA_PROPERTY_EXAMPLES=500 for a
# long random one (tox -e nemesis).
EXAMPLES = int(os.environ.get("FSHA_PROPERTY_EXAMPLES", "12"))
RANDOM = "FSHA_PROPERTY_EXAMPLES" in os.environ


@dataclass(frozen=True)
class Fault:
    kind: str
    a: str
    b: str
    side: frozenset[str]
    after: int  # heartbeat intervals before the next fault


def faults(nodes: int) -> st.SearchStrategy[Fault]:
    names = st.sampled_from(NAMES[:nodes])
    return st.builds(
        Fault,
        kind=st.sampled_from(("partition", "one-way", "nontransitive", "isolate", "kill",
                              "pause", "restart", "heal")),
        a=names, b=names,
        side=st.frozensets(names, min_size=1, max_size=nodes - 1),
        after=st.integers(1, 40))


class Checker:
    def __init__(self, cluster: FakeCluster, bound: float) -> None:
        self.cluster = cluster
        self.bound = bound
        self.overlap_since: dict[str, float] = {}
        self.worst = 0.0

    def advance(self, seconds: float) -> None:
        c = self.cluster
        end = c.clock.seconds() + seconds
        while c.clock.seconds() < end - 1e-9:
            c.clock.advance(STEP)
            now = c.clock.seconds()
            holders = c.holders()
            for slot in [s.name for s in c.config.slots]:
                if len(holders.get(slot, ())) > 1:
                    since = self.overlap_since.setdefault(slot, now)
                    self.worst = max(self.worst, now - since + STEP)
                    assert now - since + STEP <= self.bound, (
                        f"{slot} held by {sorted(holders[slot])} for "
                        f"{(now - since + STEP) * 1000:.0f} ms")
                else:
                    self.overlap_since.pop(slot, None)


def apply(c: FakeCluster, f: Fault) -> None:
    if f.kind == "partition":
        c.partition(set(f.side), set(c.nodes) - set(f.side))
    elif f.kind == "one-way" and f.a != f.b:
        c.block(f.a, f.b)
    elif f.kind == "nontransitive" and f.a != f.b:
        c.partition({f.a}, {f.b})
    elif f.kind == "isolate":
        c.cut.update((f.a, net.name) for net in c.config.networks)
    elif f.kind == "kill" and f.a not in c.dead:
        c.paused.pop(f.a, None)
        c.kill(f.a)
    elif f.kind == "pause" and f.a not in c.dead and f.a not in c.paused:
        c.pause(f.a)
    elif f.kind == "restart":
        if f.a in c.paused:
            c.resume(f.a)
        elif f.a in c.dead:
            c.start(f.a)
    elif f.kind == "heal":
        c.blocked.clear()
        c.cut.clear()


def heal_all(c: FakeCluster) -> None:
    c.blocked.clear()
    c.cut.clear()
    for name in list(c.paused):
        c.resume(name)
    for name in list(c.dead):
        c.start(name)


class NeverTwoMastersProperty(SynchronousTestCase):
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(((3, 1), (3, 2), (5, 2))).flatmap(
        lambda shape: st.tuples(st.just(shape), st.lists(faults(shape[0]), max_size=6))))
    def test_random_faults(self, case: tuple[tuple[int, int], list[Fault]]) -> None:
        (nodes, slots), schedule = case
        c = FakeCluster(make_config(nodes=nodes, slots=slots))
        cfg = c.config
        c.start_all()
        # bound: one heartbeat interval of overlap (the design's promise)
        check = Checker(c, bound=cfg.heartbeat_interval)
        check.advance(cfg.discovery + 10 * cfg.heartbeat_interval)
        self.assertEqual(len(c.masters()), slots)
        for fault in schedule:
            apply(c, fault)
            check.advance(fault.after * cfg.heartbeat_interval)
        heal_all(c)
        # every slot has a master again within N intervals of the cluster being whole
        # (listening again, the failed-claim penalty, a takeover)
        check.advance(60 * cfg.heartbeat_interval)
        masters = c.masters()
        self.assertEqual(sorted(masters), [s.name for s in cfg.slots], (masters, c.roles_of()))
        holders = c.holders()
        self.assertTrue(all(len(h) == 1 for h in holders.values()), holders)
