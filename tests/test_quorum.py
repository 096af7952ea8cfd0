"""Never two masters: the quorum rules (fsha.quorum) alone, and on a FakeCluster for each
fault of issue 11 (partial partitions, an isolated or paused master, config rollouts,
replayed heartbeats)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from fsha.quorum import (
    FOREVER,
    NEVER,
    PeerView,
    deaf_to,
    lease_expires_at,
    lease_for,
    lease_holds,
    live_count,
    master_dead,
    view_agreement,
)
from fsha.wire.heartbeat import Role

from .fakecluster import FakeCluster, make_config


class RuleTests(SynchronousTestCase):
    def test_one_pair_of_ears_decides_nothing(self) -> None:
        # node 0 is the master; this node (2) does not hear it, node 1 does
        peers = [PeerView(1, live=True, hears=0b001)]
        self.assertEqual(deaf_to(0, False, True, peers), 1)
        self.assertFalse(master_dead(0, False, True, peers, quorum=2))
        peers = [PeerView(1, live=True, hears=0b100)]  # 1 hears only 2
        self.assertTrue(master_dead(0, False, True, peers, quorum=2))

    def test_who_votes(self) -> None:
        deaf = 0b100
        self.assertEqual(deaf_to(0, False, True, [PeerView(1, live=False, hears=deaf)]), 1)
        self.assertEqual(deaf_to(0, False, True, [PeerView(1, live=True, hears=deaf,
                                                           voting=False)]), 1)
        self.assertEqual(deaf_to(0, False, False, [PeerView(1, live=True, hears=deaf)]), 1)
        # the master's own heartbeat says nothing of itself
        self.assertEqual(deaf_to(0, False, True, [PeerView(0, live=True, hears=0)]), 1)
        # a peer without a bitmap (version 1 or 2) is taken to hear as this node does
        self.assertEqual(deaf_to(0, False, True, [PeerView(1, live=True)]), 2)
        self.assertEqual(deaf_to(0, True, True, [PeerView(1, live=True)]), 0)

    def test_lease(self) -> None:
        lease = lease_for(0.02, 0.1)
        self.assertAlmostEqual(lease, 0.09)
        peers = [PeerView(1, live=True, support_at=10.0), PeerView(2, live=True,
                                                                   support_at=10.05)]
        self.assertAlmostEqual(lease_expires_at(peers, 2, lease), 10.14)
        self.assertAlmostEqual(lease_expires_at(peers, 3, lease), 10.09)
        self.assertEqual(lease_expires_at(peers, 4, lease), NEVER)
        self.assertEqual(lease_expires_at(peers, 1, lease), FOREVER)
        self.assertTrue(lease_holds(10.13, peers, 2, lease))
        self.assertFalse(lease_holds(10.14, peers, 2, lease))

    def test_counts(self) -> None:
        peers = [PeerView(1, live=True), PeerView(2, live=False), PeerView(3, live=True)]
        self.assertEqual(live_count(peers), 3)
        self.assertEqual(view_agreement(b"a", [b"a", b"b", b"a"]), 3)


def converged(nodes: int = 3, slots: int = 1, **cluster: object) -> FakeCluster:
    c = FakeCluster(make_config(nodes=nodes, slots=slots, **cluster))
    c.start_all()
    c.advance(c.config.discovery + 10 * c.config.heartbeat_interval)
    return c


class Watch:
    """Samples the holders of every slot at each step of the fake clock."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.double = 0.0  # seconds with two running holders of one slot
        self.unmastered = 0.0  # seconds with a slot without any master

    def advance(self, seconds: float, step: float = 0.001) -> None:
        c = self.cluster
        end = c.clock.seconds() + seconds
        while c.clock.seconds() < end - 1e-9:
            c.clock.advance(step)
            if any(len(h) > 1 for h in c.holders().values()):
                self.double += step
            if len(c.masters()) < len(c.config.slots):
                self.unmastered += step


class FaultTests(SynchronousTestCase):
    def test_nontransitive_partition_keeps_the_master(self) -> None:
        """fs1 (master) and fs2 (primary candidate) cannot hear each other; fs3 hears
        both: a quorum still hears fs1, so nobody claims."""
        c = converged()
        self.assertEqual(c.masters(), {"slot1": "fs1"})
        c.partition({"fs1"}, {"fs2"})
        w = Watch(c)
        w.advance(3.0)
        self.assertEqual(c.masters(), {"slot1": "fs1"})
        self.assertEqual(w.double, 0.0)
        self.assertEqual([a for a in c.actions["fs2"].calls if a[0] == "acquire"], [])
        self.assertEqual([a for a in c.actions["fs3"].calls if a[0] == "acquire"], [])
        self.assertIn("still heard", c.nodes["fs2"].claim_hold)
        # healed: all as before, nobody moved
        c.unblock("fs1", "fs2")
        w.advance(1.0)
        self.assertEqual(c.masters(), {"slot1": "fs1"})

    def test_one_way_loss_at_a_slave_moves_nothing(self) -> None:
        """fs2 stops receiving fs1 (fs1 still hears fs2): one node's receive fault."""
        c = converged()
        c.block("fs1", "fs2")
        w = Watch(c)
        w.advance(3.0)
        self.assertEqual(c.masters(), {"slot1": "fs1"})
        self.assertEqual(w.double, 0.0)
        self.assertEqual([a for a in c.actions["fs2"].calls if a[0] == "acquire"], [])

    def test_one_way_loss_at_the_master_hands_the_slot_over(self) -> None:
        """fs1 (master) stops receiving everyone: its lease runs out, it lets go, and
        the others (who still hear it let go) take over: never two holders."""
        c = converged()
        c.block("fs2", "fs1")
        c.block("fs3", "fs1")
        w = Watch(c)
        w.advance(2.0)
        self.assertEqual(w.double, 0.0)
        self.assertEqual(c.masters(), {"slot1": "fs2"})
        self.assertIn("lease expired", next(
            e for e in c.nodes["fs1"].events if e["event"] == "release")["reason"])

    def test_isolated_master_lets_go_before_anyone_claims(self) -> None:
        c = converged()
        cut = c.clock.seconds()
        c.cut.update({("fs1", "A"), ("fs1", "B")})
        w = Watch(c)
        w.advance(2.0)
        self.assertEqual(w.double, 0.0)
        self.assertEqual(c.masters(), {"slot1": "fs2"})
        release = next(e for e in c.nodes["fs1"].events if e["event"] == "release")
        claim = next(e for e in c.nodes["fs2"].events if e["event"] == "claim")
        self.assertLess(release["time"], claim["time"])
        # within the lease of the last support (at most an interval before the cut)
        self.assertLessEqual(release["time"] - cut, c.nodes["fs1"].lease + 0.002)

    def test_paused_master_lets_go_when_it_resumes(self) -> None:
        """SIGSTOP for 2 s: the others take over after dead-after; the paused master's
        first act when it runs again is to let go (its lease ran out meanwhile): it does
        not hear the queued datagrams first."""
        c = converged()
        c.pause("fs1")
        c.advance(2.0)
        self.assertEqual(c.masters(), {"slot1": "fs2"})
        c.resume("fs1")
        c.clock.advance(0)  # one turn of the reactor: it read what had arrived, then let go
        self.assertEqual(c.holders(), {"slot1": {"fs2"}})
        c.advance(1.0)
        self.assertEqual(c.masters(), {"slot1": "fs2"})
        self.assertEqual(c.roles_of()["fs1"], "slave")

    def test_killed_master_is_taken_over_within_one_interval_more(self) -> None:
        c = converged(nodes=3, slots=1)
        c.kill("fs1")
        killed = c.clock.seconds()
        c.advance(1.0)
        claim = next(e for e in c.nodes["fs2"].events if e["event"] == "claim")
        took = claim["time"] - killed
        cfg = c.config
        # dead-after, plus the tick that notices it, plus the peer's heartbeat carrying it
        self.assertLessEqual(took, cfg.dead_after + 2 * cfg.heartbeat_interval + 0.005)

    def test_replayed_heartbeats_do_not_make_a_quorum(self) -> None:
        """A capture of fs1's heartbeats replayed to a freshly restarted fs3, alone in a
        partition: fs1 is heard (authentic, newer sequences for fs3) but never echoes
        this incarnation of fs3, so fs3 counts no quorum and claims nothing."""
        c = converged(nodes=3, slots=1)
        captured: list[tuple[int, bytes, tuple[str, int]]] = []
        deliver = c._deliver

        def tap(target: str, index: int, network: str, data: bytes,
                source: tuple[str, int]) -> None:
            if target == "fs3" and source[0] in c.config.node("fs1").addresses.values():
                captured.append((index, data, source))
            deliver(target, index, network, data, source)

        c._deliver = tap  # type: ignore[method-assign]
        c.advance(0.5)
        c._deliver = deliver  # type: ignore[method-assign]
        c.kill("fs3")
        c.partition({"fs3"}, {"fs1", "fs2"})
        fs3 = c.start("fs3")
        for index, data, source in captured:
            fs3.datagram_received(index, data, source)
        c.advance(fs3.config.discovery / 2)
        self.assertTrue(fs3.detector.peers[0].alive)  # heard...
        self.assertFalse(fs3.sees_quorum())  # ...but not live now
        for index, data, source in captured[len(captured) // 2:]:
            fs3.datagram_received(index, data, source)
        c.advance(2.0)
        self.assertEqual([a for a in c.actions["fs3"].calls if a[0] == "acquire"], [])
        self.assertEqual(c.masters(), {"slot1": "fs1"})

    def test_config_rollout_keeps_every_slot_mastered(self) -> None:
        """Restart the nodes one by one with another file (the documented procedure,
        SIGTERM hand-over for a master): every slot keeps a master, nobody is dead."""
        c = converged(nodes=3, slots=2)
        new = make_config(nodes=3, slots=2, discovery_ms=350)
        self.assertNotEqual(new.digest, c.config.digest)
        w = Watch(c)
        for name in ("fs3", "fs2", "fs1"):
            c.nodes[name].stop()
            c.kill(name)
            w.advance(0.05)
            c.start(name, new)
            w.advance(2.0)
            for node in c.live():
                self.assertTrue(all(p.alive for p in node.detector.peers.values()),
                                f"{node.me.name} after restarting {name}")
        self.assertEqual(w.double, 0.0)
        self.assertEqual(len(c.masters()), 2)
        # a master's hand-over leaves its slot to the successor within a few intervals
        self.assertLess(w.unmastered, 0.2)
        self.assertTrue(all(n.config.digest == new.digest for n in c.live()))

    def test_mixed_config_files_are_alive_and_shown(self) -> None:
        c = converged(nodes=3, slots=1)
        c.nodes["fs3"].stop()
        c.kill("fs3")
        c.start("fs3", make_config(nodes=3, slots=1, discovery_ms=350))
        c.advance(1.0)
        fs1 = c.nodes["fs1"]
        status = {n["name"]: n for n in fs1.status()["nodes"]}
        self.assertTrue(status["fs3"]["alive"])
        self.assertTrue(status["fs3"]["live"])
        self.assertEqual(status["fs3"]["config"], "other")
        self.assertEqual(status["fs2"]["config"], "same")
        self.assertEqual(fs1.status()["quorum"]["alive"], 3)
        self.assertEqual(c.nodes["fs3"].role, Role.SLAVE)


class LeaseSupportTests(SynchronousTestCase):
    def test_a_masters_heartbeats_are_answered_at_once(self) -> None:
        """Peers echo a master's heartbeat on arrival, not at their next tick: its lease
        support is never older than its own sending period plus a round trip."""
        c = converged()
        fs1 = c.nodes["fs1"]
        self.assertEqual(fs1.role, Role.MASTER)
        interval = c.config.heartbeat_interval
        worst = 0.0
        for _ in range(1000):
            c.clock.advance(0.001)
            now = c.clock.seconds()
            age = now - (fs1.lease_expires_at() - fs1.lease)
            worst = max(worst, age)
        # sending period + 2 x 1 ms latency + the 1 ms step (without the answers: up to
        # two periods)
        self.assertLessEqual(worst, interval + 0.0035)
        # only holders are answered: the slaves answer fs1, fs1 (no other holder) nobody
        self.assertEqual(fs1._answered, {})
        self.assertEqual(set(c.nodes["fs3"]._answered), {fs1.me.node_id})
