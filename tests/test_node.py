"""Whole-cluster behaviour of ClusterNode with a fake clock and an in-memory network."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from fsha.detector import FailureDetector, Verdict
from fsha.wire.heartbeat import (
    NO_NODE,
    NO_SLOT,
    Flags,
    Heartbeat,
    MessageType,
    Role,
    cluster_id_for,
)

from .fakecluster import SECRET, FakeCluster, make_config


def converge(cluster: FakeCluster) -> None:
    cluster.start_all()
    cluster.advance(cluster.config.discovery + 10 * cluster.config.heartbeat_interval)


class FormationTests(SynchronousTestCase):
    def test_fresh_cluster_comes_up_with_n_masters_and_x_slaves(self) -> None:
        cluster = FakeCluster(make_config(nodes=3, slots=2))
        converge(cluster)
        self.assertEqual(cluster.masters(), {"slot1": "fs1", "slot2": "fs2"})
        self.assertEqual(cluster.roles_of()["fs3"], "slave")
        digests = {n.roles.digest for n in cluster.live()}
        self.assertEqual(len(digests), 1, "all nodes compute the same view")
        for node in cluster.live():
            self.assertEqual(node.roles.ranking, (2,))
            self.assertEqual(dict(node.drops), {})
        self.assertEqual(cluster.actions["fs1"].held, {"slot1"})
        self.assertEqual(cluster.actions["fs2"].held, {"slot2"})

    def test_nothing_is_claimed_during_discovery(self) -> None:
        cluster = FakeCluster(make_config())
        cluster.start_all()
        cluster.advance(cluster.config.discovery * 0.9)
        self.assertEqual(set(cluster.roles_of().values()), {"starting"})
        self.assertEqual(cluster.masters(), {})

    def test_staggered_start_converges_without_duplicates(self) -> None:
        cluster = FakeCluster(make_config(nodes=4, slots=3))
        for i, name in enumerate(["fs4", "fs2", "fs3", "fs1"]):
            cluster.start(name)
            cluster.advance(0.013 * (i + 1))
        cluster.advance(2.0)
        masters = cluster.masters()
        self.assertEqual(sorted(masters), ["slot1", "slot2", "slot3"])
        self.assertEqual(len(set(masters.values())), 3)
        self.assertEqual(len({n.roles.digest for n in cluster.live()}), 1)

    def test_the_role_machine_owns_the_role_and_ignores_inputs_that_do_not_apply(self) -> None:
        cluster = FakeCluster(make_config(nodes=3, slots=2))
        converge(cluster)
        slave = cluster.nodes["fs3"]
        with self.assertRaises(AttributeError):
            slave.role = Role.MASTER  # type: ignore[misc]  # read-only: the machine's
        slave._machine.lost("nothing held")  # a slave has nothing to lose: no transition
        self.assertEqual((slave.role, slave.slot, slave.epoch), (Role.SLAVE, NO_SLOT, 0))
        master = cluster.nodes["fs1"]
        master.set_maintenance(True)  # drained: the machine releases, no role check needed
        self.assertIn("release", [e["event"] for e in master.events])
        self.assertEqual(master.role, Role.SLAVE)  # the fake release is synchronous
        cluster.advance(1.0)
        self.assertEqual(cluster.masters()["slot1"], "fs3")

    def test_role_listeners_see_every_change_with_its_slot(self) -> None:
        cluster = FakeCluster(make_config(nodes=3, slots=2))
        seen: list[tuple[str, str, str | None]] = []
        node = cluster.start("fs1")
        node.add_role_listener(lambda old, new, slot: seen.append(
            (old.name, new.name, slot.name if slot else None)))
        cluster.start("fs2")
        cluster.start("fs3")
        cluster.advance(cluster.config.discovery + 0.5)
        node.stop()
        self.assertEqual(seen, [("STARTING", "SLAVE", None), ("SLAVE", "CLAIMING", "slot1"),
                                ("CLAIMING", "MASTER", "slot1"),
                                ("MASTER", "RELEASING", "slot1"),
                                ("RELEASING", "SLAVE", "slot1")])

    def test_no_quorum_no_claim(self) -> None:
        cluster = FakeCluster(make_config(nodes=3, slots=2))
        cluster.start("fs1")
        cluster.advance(2.0)
        self.assertEqual(cluster.roles_of(), {"fs1": "slave"})
        self.assertFalse(cluster.nodes["fs1"].sees_quorum())
        cluster.start("fs2")
        cluster.advance(2.0)
        self.assertEqual(len(cluster.masters()), 2)


class FailoverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = FakeCluster(make_config(nodes=3, slots=2))
        converge(self.cluster)

    def test_killed_master_is_taken_over_by_primary_candidate(self) -> None:
        cluster = self.cluster
        old_epoch = cluster.nodes["fs1"].epoch
        cluster.kill("fs1")
        config = cluster.config
        cluster.advance(config.dead_after - config.heartbeat_interval)
        self.assertEqual(cluster.masters(), {"slot2": "fs2"}, "not before dead_after")
        cluster.advance(config.dead_after + 3 * config.heartbeat_interval)
        self.assertEqual(cluster.masters(), {"slot1": "fs3", "slot2": "fs2"})
        fs3 = cluster.nodes["fs3"]
        self.assertEqual(fs3.epoch, old_epoch + 1)
        self.assertIn(("acquire", "slot1", old_epoch + 1), cluster.actions["fs3"].calls)
        events = [e["event"] for e in fs3.events]
        self.assertIn("peer-down", events)
        self.assertLess(events.index("claim"), events.index("master"))
        fs2_events = [e for e in cluster.nodes["fs2"].events if e["event"] == "peer-takeover"]
        self.assertEqual(fs2_events[0]["subject"], "fs1")

    def test_dead_master_is_fenced_a_handing_over_one_is_not(self) -> None:
        cluster = self.cluster
        cluster.kill("fs1")
        cluster.advance(1.0)
        self.assertEqual(cluster.actions["fs3"].fenced, [True])
        cluster.start("fs1")
        cluster.advance(2.0)
        self.successResultOf(cluster.nodes["fs3"].stop())  # SIGTERM: clean hand-over
        cluster.dead.add("fs3")
        cluster.advance(0.5)
        self.assertEqual(cluster.masters()["slot1"], "fs1")
        self.assertEqual(cluster.actions["fs1"].fenced[-1], False)
        claim = [e for e in cluster.nodes["fs1"].events if e["event"] == "claim"][-1]
        self.assertTrue(claim["handed_over"])

    def test_a_candidate_that_dies_claiming_is_fenced_by_the_next(self) -> None:
        # 5 nodes: with the master and the candidate dead, 3 still make a majority.
        cluster = FakeCluster(make_config(nodes=5, slots=2))
        converge(cluster)
        ranking = [cluster.config.nodes[i].name for i in cluster.nodes["fs1"].roles.ranking]
        candidate, successor = ranking[0], ranking[1]
        cluster.actions[candidate].hang_acquire = True  # stuck mid-takeover
        cluster.kill("fs1")
        cluster.advance(1.0)
        self.assertEqual(cluster.roles_of()[candidate], "claiming")
        self.assertEqual(cluster.nodes[successor].claimers, {0: (
            cluster.config.node(candidate).node_id, cluster.nodes[candidate].epoch)})
        cluster.kill(candidate)
        cluster.advance(1.0)
        self.assertEqual(cluster.masters()["slot1"], successor)
        self.assertEqual(cluster.actions[successor].claimers, [[candidate]])
        self.assertEqual(cluster.actions[successor].fenced, [True])
        claim = [e for e in cluster.nodes[successor].events if e["event"] == "claim"][-1]
        self.assertEqual(claim["dead_claimers"], [candidate])
        for node in cluster.live():  # the slot has a master again: nobody else to fence
            self.assertEqual(node.claimers, {}, node.me.name)

    def test_a_claim_that_completes_leaves_nobody_to_fence(self) -> None:
        cluster = self.cluster
        cluster.kill("fs1")
        cluster.advance(1.0)
        self.assertEqual(cluster.actions["fs3"].claimers, [[]])
        for node in cluster.live():
            self.assertEqual(node.claimers, {}, node.me.name)

    def test_restarted_master_rejoins_as_slave_without_preempting(self) -> None:
        cluster = self.cluster
        cluster.kill("fs1")
        cluster.advance(1.0)
        self.assertEqual(cluster.masters(), {"slot1": "fs3", "slot2": "fs2"})
        cluster.start("fs1")
        cluster.advance(2.0)
        self.assertEqual(cluster.masters(), {"slot1": "fs3", "slot2": "fs2"})
        self.assertEqual(cluster.roles_of()["fs1"], "slave")
        fs2 = cluster.nodes["fs2"]
        self.assertTrue(any(e["event"] == "peer-up" and e["peer"] == "fs1"
                            for e in list(fs2.events)[-10:]))
        # it is the primary candidate again (the only slave)
        self.assertEqual(fs2.roles.ranking, (0,))

    def test_restart_detected_as_new_incarnation_without_downtime(self) -> None:
        cluster = self.cluster
        old = cluster.nodes["fs3"].incarnation
        cluster.kill("fs3")
        cluster.start("fs3")  # back before anyone noticed it was gone
        cluster.advance(0.5)
        fs1 = cluster.nodes["fs1"]
        self.assertNotEqual(fs1.detector.peers[2].incarnation, old)
        self.assertEqual(fs1.detector.peers[2].restarts, 1)
        self.assertTrue(any(e["event"] == "peer-restarted" for e in fs1.events))

    def test_one_network_down_is_not_a_failover(self) -> None:
        cluster = self.cluster
        cluster.cut.add(("fs1", "B"))
        cluster.advance(2.0)
        self.assertEqual(cluster.masters(), {"slot1": "fs1", "slot2": "fs2"})
        fs2 = cluster.nodes["fs2"]
        now = cluster.clock.seconds()
        self.assertFalse(fs2.detector.network_up(0, 1, now))
        self.assertTrue(fs2.detector.network_up(0, 0, now))
        status = fs2.status()
        self.assertEqual(status["nodes"][0]["networks"]["B"]["up"], False)
        self.assertGreater(cluster.nodes["fs1"].status()["networks"][1]["send_errors"], 0)

    def test_all_networks_down_then_healed_resolves_by_epoch(self) -> None:
        cluster = self.cluster
        cluster.cut.update({("fs1", "A"), ("fs1", "B")})
        cluster.advance(1.0)
        # the majority took slot1 over; the isolated old master let it go first: its lease
        # ran out (no quorum heard it) before the others could declare it dead
        self.assertEqual(cluster.nodes["fs3"].role, Role.MASTER)
        self.assertEqual(cluster.nodes["fs1"].role, Role.SLAVE)
        self.assertFalse(cluster.nodes["fs1"].sees_quorum())
        release = [e for e in cluster.nodes["fs1"].events if e["event"] == "release"]
        self.assertIn("lease expired", release[0]["reason"])
        claim = [e for e in cluster.nodes["fs3"].events if e["event"] == "claim"]
        self.assertLess(release[0]["time"], claim[0]["time"])
        cluster.cut.clear()
        cluster.advance(0.5)
        self.assertEqual(cluster.masters(), {"slot1": "fs3", "slot2": "fs2"})
        self.assertEqual(cluster.roles_of()["fs1"], "slave")
        self.assertNotIn("slot1", cluster.actions["fs1"].held)

    def test_minority_side_never_takes_over(self) -> None:
        cluster = FakeCluster(make_config(nodes=5, slots=2))
        converge(cluster)
        self.assertEqual(cluster.masters(), {"slot1": "fs1", "slot2": "fs2"})
        # fs2 and fs5 on one side (minority), fs1 fs3 fs4 on the other
        for name in ("fs2", "fs5"):
            cluster.cut.update({(name, "A"), (name, "B")})
        cluster.advance(1.0)
        self.assertEqual(cluster.nodes["fs5"].role, Role.SLAVE, "minority slave does not claim")
        self.assertEqual(cluster.nodes["fs3"].role, Role.MASTER, "majority takes slot2 over")
        self.assertEqual(cluster.config.slots[cluster.nodes["fs3"].slot].name, "slot2")

    def test_minority_never_takes_over_while_its_peers_expire_one_by_one(self) -> None:
        cluster = FakeCluster(make_config(nodes=5, slots=2))
        for name in ("fs1", "fs2", "fs3", "fs4", "fs5"):
            cluster.start(name)
            cluster.advance(0.011)  # heartbeat phases apart: peers expire at different times
        cluster.advance(1.0)
        self.assertEqual(cluster.masters(), {"slot1": "fs1", "slot2": "fs2"})
        self.assertEqual(cluster.nodes["fs3"].roles.ranking, (2, 3, 4))
        for actions in cluster.actions.values():
            actions.calls.clear()
        # the primary candidate ends up in the minority
        cluster.partition({"fs3", "fs5"}, {"fs1", "fs2", "fs4"})
        cluster.advance(2.0)
        self.assertEqual(cluster.actions["fs3"].calls, [])
        self.assertEqual(cluster.actions["fs5"].calls, [])
        self.assertEqual(cluster.masters(), {"slot1": "fs1", "slot2": "fs2"})

    def test_back_from_isolation_a_node_listens_before_claiming(self) -> None:
        cluster = self.cluster
        cluster.partition({"fs2"}, {"fs1", "fs3"})
        cluster.advance(1.0)
        self.assertEqual(cluster.nodes["fs3"].role, Role.MASTER, "the majority took slot2")
        cluster.actions["fs2"].calls.clear()
        # fs2 hears fs3 again before fs1: fs1 still looks dead to it, slot1 orphaned
        cluster.blocked -= {("fs2", "fs3"), ("fs3", "fs2")}
        cluster.advance(cluster.config.discovery / 2)
        self.assertEqual(cluster.nodes["fs2"].role, Role.SLAVE)
        cluster.blocked.clear()
        cluster.advance(1.0)
        self.assertNotIn("acquire", [c[0] for c in cluster.actions["fs2"].calls])
        self.assertEqual(cluster.masters(), {"slot1": "fs1", "slot2": "fs3"})

    def test_two_masters_die_at_once_both_taken_in_parallel(self) -> None:
        cluster = FakeCluster(make_config(nodes=5, slots=3))
        converge(cluster)
        self.assertEqual(cluster.masters(), {"slot1": "fs1", "slot2": "fs2", "slot3": "fs3"})
        cluster.kill("fs1")
        cluster.kill("fs2")
        cluster.advance(cluster.config.dead_after + 4 * cluster.config.heartbeat_interval)
        masters = cluster.masters()
        self.assertEqual(masters, {"slot1": "fs4", "slot2": "fs5", "slot3": "fs3"})

    def test_failed_claim_rolls_back_and_next_candidate_proceeds(self) -> None:
        cluster = FakeCluster(make_config(nodes=4, slots=2))
        converge(cluster)
        self.assertEqual(cluster.nodes["fs3"].roles.ranking, (2, 3))
        self.assertEqual(cluster.actions["fs3"].calls, [], "a clean formation claims nothing twice")
        cluster.actions["fs3"].fail_acquire = True
        cluster.kill("fs1")
        cluster.advance(1.0)
        self.assertEqual(cluster.masters(), {"slot1": "fs4", "slot2": "fs2"})
        fs3 = cluster.nodes["fs3"]
        self.assertEqual(fs3.role, Role.SLAVE)
        self.assertIn(Flags.UNFIT, fs3.flags())
        self.assertEqual([c[0] for c in cluster.actions["fs3"].calls], ["acquire", "release"])
        self.assertTrue(any(e["event"] == "claim-aborted" for e in fs3.events))

    def test_hung_claim_times_out_and_rolls_back(self) -> None:
        cluster = self.cluster
        cluster.actions["fs3"].hang_acquire = True
        cluster.kill("fs1")
        cluster.advance(cluster.nodes["fs3"].claim_timeout + 1.0)
        fs3 = cluster.nodes["fs3"]
        self.assertEqual(fs3.role, Role.SLAVE)
        self.assertIn("release", [c[0] for c in cluster.actions["fs3"].calls])
        self.assertEqual(cluster.masters(), {"slot2": "fs2"})  # nobody else left to claim

    def test_a_claim_that_keeps_progressing_is_not_cut(self) -> None:
        # A big slot recovered batch after batch: the claim timeout counts from the last
        # progress the actions report (SlotEffects.claim_progress), not from the start.
        cluster = self.cluster
        actions = cluster.actions["fs3"]
        actions.hang_acquire = True
        fs3 = cluster.nodes["fs3"]
        last = [0.0]
        actions.claim_progress = lambda slot: last[0]  # type: ignore[attr-defined]
        cluster.kill("fs1")
        for _ in range(int(4 * fs3.claim_timeout / 0.5)):
            last[0] = cluster.clock.seconds()
            cluster.advance(0.5)
        self.assertEqual(fs3.role, Role.CLAIMING)
        self.assertNotIn("release", [c[0] for c in actions.calls])
        cluster.advance(fs3.claim_timeout + 1.0)  # progress stops: given up
        self.assertEqual(fs3.role, Role.SLAVE)
        self.assertIn("release", [c[0] for c in actions.calls])

    def test_stopped_master_hands_over_before_dead_after(self) -> None:
        cluster = self.cluster
        stopped = cluster.nodes["fs1"].stop()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(cluster.actions["fs1"].held, set())
        cluster.dead.add("fs1")
        # well before fs1 could be declared dead, fs3 holds slot1
        cluster.advance(cluster.config.dead_after / 2)
        self.assertEqual(cluster.masters(), {"slot1": "fs3", "slot2": "fs2"})

    def test_master_whose_freeswitch_dies_releases_at_once(self) -> None:
        cluster = self.cluster
        cluster.health["fs1"].ok = False
        cluster.nodes["fs1"].health_changed(False)
        # released and announced synchronously; the spare takes over within an interval or two
        self.assertEqual(cluster.nodes["fs1"].role, Role.SLAVE)
        self.assertEqual(cluster.actions["fs1"].held, set())
        cluster.advance(2 * cluster.config.heartbeat_interval)
        self.assertEqual(cluster.masters(), {"slot1": "fs3", "slot2": "fs2"})
        release = [e for e in cluster.nodes["fs1"].events if e["event"] == "release"]
        self.assertEqual(release[0]["reason"], "local FreeSWITCH is not answering")
        # and it is no candidate while its FreeSWITCH is down
        cluster.advance(1.0)
        self.assertEqual(cluster.nodes["fs2"].roles.ranking, ())
        cluster.health["fs1"].ok = True
        cluster.advance(0.2)
        self.assertEqual(cluster.nodes["fs2"].roles.ranking, (0,))

    def test_candidate_dies_mid_claim_next_candidate_completes(self) -> None:
        cluster = FakeCluster(make_config(nodes=5, slots=2))  # 3 of 5 left: still a quorum
        converge(cluster)
        cluster.actions["fs3"].hang_acquire = True
        cluster.kill("fs1")
        cluster.advance(cluster.config.dead_after + 3 * cluster.config.heartbeat_interval)
        self.assertEqual(cluster.nodes["fs3"].role, Role.CLAIMING)
        cluster.kill("fs3")
        cluster.advance(1.0)
        self.assertEqual(cluster.masters(), {"slot1": "fs4", "slot2": "fs2"})
        self.assertEqual(cluster.nodes["fs4"].epoch, 3, "epoch past the dead claimant's")

    def test_losing_quorum_to_two_deaths_stops_takeovers(self) -> None:
        """Two of four nodes die: the other two are no quorum (3). Nobody takes over, and
        the surviving master gives its slot up too: it cannot tell this from being cut off
        while a quorum elsewhere takes over (its lease)."""
        cluster = FakeCluster(make_config(nodes=4, slots=2))
        converge(cluster)
        cluster.kill("fs1")
        cluster.kill("fs3")
        cluster.advance(1.0)
        self.assertEqual(cluster.masters(), {})
        self.assertFalse(cluster.nodes["fs4"].sees_quorum())
        self.assertEqual(cluster.actions["fs4"].calls, [])
        self.assertEqual(cluster.actions["fs2"].held, set())


class DatagramHygieneTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = FakeCluster(make_config())
        converge(self.cluster)
        self.fs1 = self.cluster.nodes["fs1"]
        self.fs2 = self.cluster.nodes["fs2"]

    def heartbeat(self, **fields: object) -> Heartbeat:
        base = dict(type=MessageType.HEARTBEAT, cluster_id=self.fs2.codec.cluster_id,
                    node_id=1, incarnation=self.fs2.incarnation, sequence=10**9,
                    role=Role.SLAVE, flags=Flags.FS_OK, slot=NO_SLOT, epoch=0,
                    subject=NO_NODE, config_digest=self.fs1.config.digest,
                    view_digest=bytes(8))
        base.update(fields)
        return Heartbeat(**base)  # type: ignore[arg-type]

    def test_drops_are_counted_by_reason(self) -> None:
        node, codec = self.fs1, self.fs1.codec
        fs2_a = ("127.0.1.2", 17400)
        node.datagram_received(0, b"garbage", fs2_a)
        good = codec.encode(self.heartbeat())
        node.datagram_received(0, good[:-1] + bytes([good[-1] ^ 1]), fs2_a)
        node.datagram_received(0, good, ("127.0.1.3", 17400))  # fs3's address
        node.datagram_received(0, codec.encode(self.heartbeat(node_id=7)), ("127.0.1.7", 1))
        node.datagram_received(0, codec.encode(self.heartbeat(node_id=0)), ("127.0.1.1", 1))
        node.datagram_received(0, codec.encode(self.heartbeat(incarnation=5)), fs2_a)
        node.datagram_received(0, codec.encode(self.heartbeat(sequence=1)), fs2_a)
        self.assertEqual(dict(node.drops), {
            "short": 1, "tag": 1, "wrong-source": 1, "unknown-node": 1, "self": 1,
            "old-incarnation": 1, "replay": 1})
        # and nothing changed in the cluster
        self.assertEqual(self.cluster.masters(), {"slot1": "fs1", "slot2": "fs2"})

    def test_other_cluster_secret_is_dropped(self) -> None:
        from fsha.wire.heartbeat import HeartbeatCodec
        other = HeartbeatCodec(b"another-secret-entirely!", self.fs1.codec.cluster_id)
        self.fs1.datagram_received(0, other.encode(self.heartbeat()), ("127.0.1.2", 17400))
        self.assertEqual(dict(self.fs1.drops), {"tag": 1})
        self.assertNotEqual(other.encode(self.heartbeat()), SECRET)


class DetectorTests(SynchronousTestCase):
    def hb(self, seq: int, incarnation: int = 1) -> Heartbeat:
        return Heartbeat(MessageType.HEARTBEAT, 1, 1, incarnation, seq, Role.SLAVE,
                         Flags.FS_OK, NO_SLOT, 0, NO_NODE, bytes(8), bytes(8))

    def test_same_heartbeat_on_two_networks_applied_once_refreshes_both(self) -> None:
        d = FailureDetector([1], networks=2, dead_after=0.2)
        self.assertEqual(d.observe(0, self.hb(1), 10.0), Verdict.APPLIED)
        self.assertEqual(d.observe(1, self.hb(1), 10.01), Verdict.DUPLICATE)
        self.assertEqual(d.peers[1].heard, [10.0, 10.01])
        self.assertEqual(d.observe(1, self.hb(1), 10.02), Verdict.REPLAY)
        self.assertEqual(d.observe(1, self.hb(2), 10.03), Verdict.APPLIED)
        self.assertEqual(d.observe(0, self.hb(2, incarnation=2), 10.04), Verdict.RESTARTED)
        self.assertEqual(d.observe(0, self.hb(9, incarnation=1), 10.05),
                         Verdict.OLD_INCARNATION)

    def test_alive_while_any_network_hears(self) -> None:
        d = FailureDetector([1], networks=2, dead_after=0.2)
        d.observe(0, self.hb(1), 10.0)
        for i, t in enumerate((10.1, 10.2, 10.3)):
            d.observe(1, self.hb(i + 2), t)
        self.assertEqual(d.check(10.35), [])
        self.assertFalse(d.network_up(1, 0, 10.35))
        self.assertTrue(d.network_up(1, 1, 10.35))
        [change] = d.check(10.51)
        self.assertEqual((change.node_id, change.alive), (1, False))
        self.assertEqual(d.alive_ids(), [])


class RoundTripTests(SynchronousTestCase):
    """Heartbeat echoes give each node the round trip to each peer on each network."""

    def test_round_trip_per_network(self) -> None:
        cluster = FakeCluster(make_config(nodes=3, slots=1))
        nets = [n.name for n in cluster.config.networks]
        cluster.latency[nets[0]] = 0.002
        cluster.latency[nets[1]] = 0.010
        cluster.start_all()
        cluster.advance(2.0)
        fs1 = cluster.nodes["fs1"]
        for peer in ("fs2", "fs3"):
            info = next(n for n in fs1.status()["nodes"] if n["name"] == peer)
            self.assertEqual(info["heartbeat_version"], 4)
            # twice the one-way latency; the fake clock moves in 1 ms steps
            self.assertLess(abs(info["networks"][nets[0]]["rtt_ms"] - 4.0), 1.5)
            self.assertLess(abs(info["networks"][nets[1]]["rtt_ms"] - 20.0), 1.5)
        me = next(n for n in fs1.status()["nodes"] if n["self"])
        self.assertEqual(me["networks"], {})
        self.assertGreater(fs1.round_trips.samples, 20)

    def test_latency_change_is_followed_and_a_dead_peer_forgotten(self) -> None:
        cluster = FakeCluster(make_config(nodes=3, slots=1))
        net = cluster.config.networks[0].name
        cluster.start_all()
        cluster.advance(1.0)
        fs1 = cluster.nodes["fs1"]
        fs2_id = cluster.config.node("fs2").node_id
        cluster.latency[net] = 0.020
        cluster.advance(3.0)
        self.assertLess(abs((fs1.round_trips.smoothed[fs2_id][0] or 0) - 0.040), 0.003)
        cluster.kill("fs2")
        cluster.advance(1.0)
        self.assertEqual(fs1.round_trips.smoothed[fs2_id], [None, None])

    def test_version_1_peer_is_heard_and_spoken_to_in_version_1(self) -> None:
        """A node of an older fsha (heartbeat version 1 only) stays in the cluster."""
        import dataclasses

        from fsha.wire.heartbeat import HeartbeatCodec

        cluster = FakeCluster(make_config(nodes=3, slots=1))
        codec = HeartbeatCodec(SECRET, cluster_id_for(cluster.config.name))
        legacy = cluster.config.node("fs3")
        legacy_addresses = set(legacy.addresses.values())
        deliver = cluster._deliver
        received_by_legacy: list[int] = []

        def old_fsha(target: str, index: int, network: str, data: bytes,
                     source: Any) -> None:
            if target == "fs3":
                received_by_legacy.append(data[2])
                if data[2] != 1:
                    return  # a version 1 node drops it (reason "version")
            if source[0] in legacy_addresses:
                hb = codec.decode(data)  # what fs3 would have sent: version 1
                data = codec.encode(dataclasses.replace(
                    hb, version=1, echo_node=NO_NODE, echo_sequence=0, echo_delay_us=0,
                    heard=0))
            deliver(target, index, network, data, source)

        cluster._deliver = old_fsha  # type: ignore[method-assign]
        cluster.start_all()
        cluster.advance(2.0)
        self.assertEqual(set(cluster.roles_of().values()) - {"slave"}, {"master"})
        fs1 = cluster.nodes["fs1"]
        status = {n["name"]: n for n in fs1.status()["nodes"]}
        self.assertTrue(status["fs3"]["alive"])
        self.assertEqual(status["fs3"]["heartbeat_version"], 1)
        self.assertEqual(status["fs2"]["heartbeat_version"], 4)
        self.assertIsNone(status["fs3"]["networks"]["A"]["rtt_ms"])
        self.assertIsNotNone(status["fs2"]["networks"]["A"]["rtt_ms"])
        # fs3 got version 4 only until it was heard, then version 1 only
        self.assertIn(4, received_by_legacy[:10])
        self.assertEqual(set(received_by_legacy[-20:]), {1})
        # and fs1 never echoes fs3 (it could not read the echo)
        fs3_id = legacy.node_id
        self.assertEqual(fs1.round_trips.smoothed[fs3_id], [None, None])


class RoundTripsLogicTests(SynchronousTestCase):
    def detector(self) -> FailureDetector:
        d = FailureDetector([1, 2, 3], networks=2, dead_after=0.2)
        for node in (1, 2, 3):
            d.observe(0, Heartbeat(MessageType.HEARTBEAT, 1, node, 1, 10 * node, Role.SLAVE,
                                   Flags.FS_OK, NO_SLOT, 0, NO_NODE, bytes(8), bytes(8)),
                      100.0)
        return d

    def test_each_copy_echoes_its_destination(self) -> None:
        from fsha.detector import RoundTrips

        rt = RoundTrips(self.detector())
        self.assertEqual([rt.echo_to(n, 0, 100.05) for n in (1, 2, 3)],
                         [(10, 50000), (20, 50000), (30, 50000)])
        self.assertIsNone(rt.echo_to(1, 1, 100.05))  # not heard on network 1
        self.assertIsNone(rt.echo_to(1, 0, 100.3))  # heard too long ago
        rt.sent(12345, 99.0)
        self.assertEqual(rt.sent_at(12345), 99.0)
        self.assertIsNone(rt.sent_at(12346))

    def test_samples_match_sent_sequences_only(self) -> None:
        from fsha.detector import ECHO_HISTORY, RoundTrips

        rt = RoundTrips(self.detector())
        rt.sent(7, 50.0)
        self.assertAlmostEqual(rt.echoed(2, 1, 7, 3000, 50.010) or 0, 0.007)
        self.assertEqual(rt.last[2][0], None)
        self.assertAlmostEqual(rt.last[2][1] or 0, 0.007)
        self.assertIsNone(rt.echoed(2, 1, 8, 0, 50.02))  # never sent
        rt.sent(7 + ECHO_HISTORY, 60.0)
        self.assertIsNone(rt.echoed(2, 1, 7, 0, 60.01))  # forgotten: slot reused
        self.assertEqual(rt.echoed(2, 0, 7 + ECHO_HISTORY, 20000, 60.01), 0.0)  # clamped
        self.assertIsNone(rt.echoed(2, 0, 7 + ECHO_HISTORY, 0, 61.0))  # beyond dead-after
        self.assertIsNone(rt.echoed(9, 0, 7 + ECHO_HISTORY, 0, 60.01))  # not a peer
        # smoothing: 1/8 of each new sample
        rt.sent(100, 70.0)
        rt.echoed(3, 0, 100, 0, 70.008)
        rt.sent(101, 71.0)
        rt.echoed(3, 0, 101, 0, 71.016)
        self.assertAlmostEqual(rt.smoothed[3][0] or 0, 0.008 + (0.016 - 0.008) / 8)
        rt.forget(3)
        self.assertEqual((rt.last[3], rt.smoothed[3]), ([None, None], [None, None]))
