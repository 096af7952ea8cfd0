"""A slot's addresses and profiles changed online: the plan (fsha.configplan: online or
restart-needed, what moves) and the node side (fsha.slotchange) on a fake clock with fake
effects that put addresses up on a shared fake "wire", so that two hosts holding one
address is seen the moment it happens; and real nodes (FakeCluster) activating a change
while the master dies or a takeover runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fsha.config import ClusterConfig, FloatingIP, NodeConfig, SlotConfig, config_digest
from fsha.configplan import diff, slot_actions, slot_moves
from fsha.slotchange import SlotChanges
from tests.fakecluster import FakeCluster, make_config


def with_slot(config: ClusterConfig, name: str, **changes: Any) -> ClusterConfig:
    new = dataclasses.replace(config, slots=tuple(
        dataclasses.replace(s, **changes) if s.name == name else s for s in config.slots))
    object.__setattr__(new, "digest", config_digest(new))
    return new


def ip(address: str) -> FloatingIP:
    return FloatingIP(address, 32, "lo")


def with_slot3(config: ClusterConfig, address: str) -> ClusterConfig:
    """``config`` with a slot appended (``slot3`` on ``address``)."""
    new = dataclasses.replace(config, slots=(*config.slots, SlotConfig(
        "slot3", len(config.slots), (ip(address),), ("slot3",))))
    object.__setattr__(new, "digest", config_digest(new))
    return new


class Wire:
    """Who holds which address, over every fake host; two holders is a failure at once."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.case = case
        self.holders: dict[str, set[str]] = {}
        self.log: list[tuple[str, str, str]] = []  # (host, up/down, address)

    def up(self, host: str, address: str) -> None:
        others = self.holders.setdefault(address, set()) - {host}
        self.case.assertEqual(others, set(), f"{address} on {host} and {others}")
        self.holders[address].add(host)
        self.log.append((host, "up", address))

    def down(self, host: str, address: str) -> None:
        self.holders.get(address, set()).discard(host)
        self.log.append((host, "down", address))

    def held_by(self, host: str) -> set[str]:
        return {a for a, hosts in self.holders.items() if host in hosts}


class FakeFloating:
    def __init__(self, wire: Wire, host: str) -> None:
        self.wire, self.host = wire, host
        self.fail_up: set[str] = set()
        self.hang_up = False
        self.hanging: list[defer.Deferred[None]] = []

    def up(self, slot: str, ips: Sequence[FloatingIP]) -> defer.Deferred[None]:
        for i in ips:
            if i.address in self.fail_up:
                return defer.fail(RuntimeError(f"{i.address}: no such device"))
        if self.hang_up:
            d: defer.Deferred[None] = defer.Deferred()
            d.addCallback(lambda _: [self.wire.up(self.host, i.address) for i in ips])
            d.addCallback(lambda _: None)
            self.hanging.append(d)
            return d
        for i in ips:
            self.wire.up(self.host, i.address)
        return defer.succeed(None)

    def down(self, slot: str, ips: Sequence[FloatingIP]) -> defer.Deferred[None]:
        for i in ips:
            self.wire.down(self.host, i.address)
        return defer.succeed(None)


class FakeEffects:
    """The takeover's effects, reduced to the addresses (through the same backend)."""

    def __init__(self, floating: FakeFloating) -> None:
        self.floating = floating
        self.hang = False
        self.pending: list[defer.Deferred[None]] = []
        self.released: list[SlotConfig] = []

    def acquire(self, slot: SlotConfig, epoch: int, previous: NodeConfig | None, *,
                fence: bool = True, claimers: Sequence[NodeConfig] = ()
                ) -> defer.Deferred[None]:
        if self.hang:
            d: defer.Deferred[None] = defer.Deferred()
            d.addCallback(lambda _: self.floating.up(slot.name, slot.ips))
            self.pending.append(d)
            return d
        return self.floating.up(slot.name, slot.ips)

    def release(self, slot: SlotConfig) -> defer.Deferred[None]:
        self.released.append(slot)
        return self.floating.down(slot.name, slot.ips)


class FakeProfiles:
    def __init__(self) -> None:
        self.running: set[str] = set()
        self.call_counts: dict[str, int] = {}
        self.done: list[str] = []

    def start(self, profile: str) -> defer.Deferred[Any]:
        self.running.add(profile)
        self.done.append(f"start {profile}")
        return defer.succeed("ok")

    def stop(self, profile: str) -> defer.Deferred[Any]:
        self.running.discard(profile)
        self.done.append(f"stop {profile}")
        return defer.succeed("ok")

    def calls(self, profile: str) -> defer.Deferred[int]:
        return defer.succeed(self.call_counts.get(profile, 0))


class PlanTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.old = make_config(nodes=3, slots=2)

    def test_an_address_change_is_online_and_says_what_moves(self) -> None:
        new = with_slot(self.old, "slot2", ips=(ip("127.0.10.9"),))
        (change,) = diff(self.old, new)
        self.assertEqual((change.key, change.online), ("slot.slot2.ip", True))
        status = {"slots": [{"name": "slot1", "owner": "fs1"},
                            {"name": "slot2", "owner": "fs2"}]}
        lines = slot_moves(self.old, new, status)
        self.assertEqual(lines[0], "slot2: 127.0.10.9/32 added on fs2, 127.0.10.2/32 removed")
        self.assertIn("no slot changes master", lines[-1])
        orphan = slot_moves(self.old, new, {"slots": [{"name": "slot2", "owner": None}]})
        self.assertIn("no master now", orphan[0])

    def test_an_address_of_another_slot_needs_two_pushes(self) -> None:
        new = with_slot(self.old, "slot2", ips=(ip("127.0.10.1"),))
        new = with_slot(new, "slot1", ips=(ip("127.0.10.7"),))
        changes = {c.key: c for c in diff(self.old, new)}
        self.assertTrue(changes["slot.slot1.ip"].online)
        self.assertFalse(changes["slot.slot2.ip"].online)
        self.assertIn("127.0.10.1 is slot slot1's in the running config",
                      changes["slot.slot2.ip"].why)

    def test_hot_standby_addresses_and_new_slots_need_a_restart(self) -> None:
        hot = dataclasses.replace(self.old, takeover=dataclasses.replace(
            self.old.takeover, profiles="hot_standby"))
        new = with_slot(hot, "slot2", ips=(ip("127.0.10.9"),), profiles=("slot2", "x"))
        changes = {c.key: c for c in diff(hot, new)}
        self.assertFalse(changes["slot.slot2.ip"].online)
        self.assertIn("egress fence", changes["slot.slot2.ip"].why)
        self.assertTrue(changes["slot.slot2.profiles"].online)
        more = with_slot3(hot, "127.0.10.3")
        changes = {c.key: c for c in diff(hot, more)}
        self.assertFalse(changes["slot (list)"].online)
        self.assertIn("hot standby", changes["slot.slot3.ip"].why)

    def test_slots_appended_online_removed_or_reordered_not(self) -> None:
        more = with_slot3(self.old, "127.0.10.3")
        changes = diff(self.old, more)
        self.assertEqual([(c.key, c.online) for c in changes],
                         [("slot (list)", True), ("slot.slot3.ip", True),
                          ("slot.slot3.profiles", True)])
        status = {"nodes": [{"name": n.name, "alive": True, "role": r, "slot": s,
                             "epoch": 1, "incarnation": 1, "flags": ["fs_ok", "sees_quorum"]}
                            for n, (r, s) in zip(self.old.nodes, [("master", "slot1"),
                                                                  ("master", "slot2"),
                                                                  ("slave", None)], strict=True)],
                  "slots": [{"name": "slot1", "owner": "fs1", "epoch": 1},
                            {"name": "slot2", "owner": "fs2", "epoch": 1}]}
        (line, _) = slot_moves(self.old, more, status)
        self.assertEqual(line, "slot3: added (127.0.10.3/32; profiles slot3): claimed by fs3 "
                               "once every node runs the new file")
        fewer = dataclasses.replace(self.old, slots=self.old.slots[:1])
        changes = {c.key: c for c in diff(self.old, fewer)}
        self.assertFalse(any(c.online for c in changes.values()))
        self.assertIn("its master would have to let it go first",
                      changes["slot.slot2.ip"].why)
        swapped = dataclasses.replace(self.old, slots=self.old.slots[::-1])
        self.assertFalse(any(c.online for c in diff(self.old, swapped)))
        taken = with_slot3(self.old, "127.0.10.1")
        changes = {c.key: c for c in diff(self.old, taken)}
        self.assertFalse(changes["slot.slot3.ip"].online)
        self.assertIn("127.0.10.1 is slot slot1's", changes["slot.slot3.ip"].why)

    def test_a_profile_of_another_slot_is_refused(self) -> None:
        new = with_slot(self.old, "slot2", profiles=("slot2", "slot1"))
        (change,) = diff(self.old, new)
        self.assertFalse(change.online)
        self.assertIn("profile slot1 is slot slot1's", change.why)

    def test_actions(self) -> None:
        before = self.old.slots[1]
        after = dataclasses.replace(before, ips=(ip("127.0.10.9"), before.ips[0]),
                                    profiles=("new",))
        master = slot_actions(before, after, True, False)
        self.assertEqual((master.add, master.remove, master.start, master.stop),
                         ((ip("127.0.10.9"),), (), ("new",), ("slot2",)))
        self.assertFalse(slot_actions(before, after, False, False))  # a slave: nothing
        standby = slot_actions(before, after, False, True)  # hot standby: the profiles
        self.assertEqual((standby.add, standby.start), ((), ("new",)))


class SlotChangesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.wire = Wire(self)
        self.old = make_config(nodes=3, slots=2)
        self.new = with_slot(self.old, "slot1", ips=(ip("127.0.10.7"),))
        self.floating = FakeFloating(self.wire, "fs1")
        self.effects = FakeEffects(self.floating)
        self.profiles = FakeProfiles()
        self.guard: list[dict[int, Any]] = []
        self.lost: list[tuple[int, int, str]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.changes = SlotChanges(self.effects, self.floating, self.clock, self.old,
                                   timeout=2.0, profiles=self.profiles,
                                   on_held=lambda: self.guard.append(self.changes.guarded()),
                                   record_event=lambda kind, **f: self.events.append((kind, f)))

    def lose(self, slot: int, epoch: int, reason: str) -> bool:
        self.lost.append((slot, epoch, reason))
        return True

    def acquire(self, config: ClusterConfig) -> defer.Deferred[None]:
        return self.changes.acquire(config.slots[0], 3, None)

    def test_the_master_moves_its_addresses_new_first_and_the_guard_knows_before(self) -> None:
        self.successResultOf(self.acquire(self.old))
        self.wire.log.clear()
        self.guard.clear()
        self.changes.config_changed(self.new, (0, 3), self.lose)
        self.assertEqual(self.wire.log, [("fs1", "up", "127.0.10.7"),
                                         ("fs1", "down", "127.0.10.1")])
        # the guard was told both before the new one went up, then only the new one
        self.assertEqual([[i.address for i in g[0][0]] for g in self.guard],
                         [["127.0.10.7", "127.0.10.1"], ["127.0.10.7"]])
        self.assertEqual(self.wire.held_by("fs1"), {"127.0.10.7"})
        (change,) = self.changes.status()
        self.assertEqual((change["state"], change["added"], change["removed"]),
                         ("done", ["127.0.10.7"], ["127.0.10.1"]))
        self.assertEqual(self.lost, [])
        self.assertEqual(self.events, [("slot-change", {
            "slot": "slot1", "state": "done", "error": None, "added": ["127.0.10.7"],
            "removed": ["127.0.10.1"], "started": [], "stopped": [], "kept": []})])
        # a later release takes down what is held now
        self.successResultOf(self.changes.release(self.new.slots[0]))
        self.assertEqual(self.wire.held_by("fs1"), set())

    def test_a_slave_only_takes_the_config_and_claims_the_new_addresses(self) -> None:
        self.changes.config_changed(self.new, None, self.lose)
        self.assertEqual(self.wire.log, [])
        self.assertEqual(self.guard[-1][0][0], (ip("127.0.10.7"),))
        self.successResultOf(self.acquire(self.new))
        self.assertEqual(self.wire.held_by("fs1"), {"127.0.10.7"})

    def test_new_addresses_that_fail_are_rolled_back_and_the_slot_let_go(self) -> None:
        self.successResultOf(self.acquire(self.old))
        self.floating.fail_up.add("127.0.10.7")
        self.changes.config_changed(self.new, (0, 3), self.lose)
        self.assertEqual(self.wire.held_by("fs1"), {"127.0.10.1"})
        ((slot, epoch, reason),) = self.lost
        self.assertEqual((slot, epoch), (0, 3))
        self.assertIn("no such device", reason)
        self.assertEqual(self.changes.status()[0]["state"], "failed")
        # the node releases: everything goes, whatever config is in force
        self.successResultOf(self.changes.release(self.new.slots[0]))
        self.assertEqual(self.wire.held_by("fs1"), set())
        self.assertEqual({i.address for i in self.effects.released[-1].ips},
                         {"127.0.10.7", "127.0.10.1"})

    def test_a_release_during_a_change_waits_and_nothing_goes_up_after_it(self) -> None:
        self.successResultOf(self.acquire(self.old))
        self.floating.hang_up = True
        self.changes.config_changed(self.new, (0, 3), self.lose)
        released = self.changes.release(self.new.slots[0])
        self.successResultOf(released)
        # the hanging up was cancelled: the late answer changes nothing
        self.assertEqual(self.wire.held_by("fs1"), set())
        self.assertEqual(self.lost, [])  # cancelled by the release: not a failure
        self.assertEqual(self.changes.status()[0]["state"], "cancelled")
        self.assertEqual(self.changes.held, {})

    def test_a_claim_racing_the_activation_ends_with_the_new_addresses(self) -> None:
        self.effects.hang = True
        claim = self.acquire(self.old)  # claiming with the old config
        self.changes.config_changed(self.new, None, self.lose)  # the node is CLAIMING
        self.effects.pending[0].callback(None)
        self.successResultOf(claim)
        self.assertEqual(self.wire.held_by("fs1"), {"127.0.10.7"})
        self.assertEqual(self.wire.log[-2:], [("fs1", "up", "127.0.10.7"),
                                              ("fs1", "down", "127.0.10.1")])

    def test_a_claim_whose_change_fails_fails_and_its_rollback_covers_both(self) -> None:
        self.effects.hang = True
        claim = self.acquire(self.old)
        self.changes.config_changed(self.new, None, self.lose)
        self.floating.fail_up.add("127.0.10.7")
        self.effects.pending[0].callback(None)
        self.failureResultOf(claim, RuntimeError)
        self.successResultOf(self.changes.release(self.old.slots[0]))  # the node's rollback
        self.assertEqual(self.wire.held_by("fs1"), set())

    def test_profiles_added_started_removed_stopped_unless_they_carry_calls(self) -> None:
        new = with_slot(self.old, "slot1", profiles=("a", "b"))
        self.successResultOf(self.acquire(self.old))
        self.changes.config_changed(new, (0, 3), self.lose)
        self.assertEqual(self.profiles.done, ["start a", "start b", "stop slot1"])
        again = with_slot(new, "slot1", profiles=("b",))
        self.profiles.call_counts["a"] = 2
        self.changes.config_changed(again, (0, 3), self.lose)
        last = self.changes.status()[-1]
        self.assertEqual(last["kept"], ["a: 2 call(s)"])
        self.assertNotIn("stop a", self.profiles.done)
        # still held: a release (or the guard) stops it with the slot
        self.assertIn("a", self.changes.guarded()[0][1])


def wired_cluster(test: SynchronousTestCase, config: ClusterConfig
                  ) -> tuple[FakeCluster, Wire, dict[str, SlotChanges]]:
    """A started FakeCluster whose nodes act through SlotChanges over fake backends on
    one wire (which fails ``test`` the instant two hosts hold one address)."""
    cluster = FakeCluster(config)
    wire = Wire(test)
    changes = {}
    for n in config.nodes:
        floating = FakeFloating(wire, n.name)
        changes[n.name] = SlotChanges(FakeEffects(floating), floating, cluster.clock,
                                      config, timeout=2.0)
        cluster.actions[n.name] = changes[n.name]  # type: ignore[assignment]
    cluster.start_all()
    cluster.advance(3)
    return cluster, wire, changes


class ClusterTests(SynchronousTestCase):
    """Real nodes on a fake clock; each node's SlotChanges over a fake backend on one
    wire. A killed node's guard is emulated: it drops what ``guarded`` lists."""

    def make(self) -> tuple[FakeCluster, Wire, dict[str, SlotChanges]]:
        cluster, wire, changes = wired_cluster(self, make_config(nodes=3, slots=1))
        self.assertEqual(cluster.masters(), {"slot1": "fs1"})
        return cluster, wire, changes

    def activate(self, cluster: FakeCluster, changes: dict[str, SlotChanges], name: str,
                 new: ClusterConfig) -> None:
        node = cluster.nodes[name]
        node.replace_config(new)
        holding = (node.slot, node.epoch) if node.role.name == "MASTER" else None
        changes[name].config_changed(new, holding, node.resources_lost)

    def guard_drop(self, wire: Wire, changes: dict[str, SlotChanges], name: str) -> None:
        for slot_id, (ips, _) in changes[name].guarded().items():
            if slot_id in changes[name].held:
                for i in ips:
                    wire.down(name, i.address)

    def test_slaves_first_then_the_master_no_move_and_one_holder(self) -> None:
        cluster, wire, changes = self.make()
        new = with_slot(cluster.config, "slot1", ips=(ip("127.0.10.8"),))
        for name in ("fs2", "fs3", "fs1"):
            self.activate(cluster, changes, name, new)
            cluster.advance(0.3)
        self.assertEqual(cluster.masters(), {"slot1": "fs1"})
        self.assertEqual(wire.held_by("fs1"), {"127.0.10.8"})
        # the master dies: its guard drops what it held, the successor claims the new one
        cluster.kill("fs1")
        self.guard_drop(wire, changes, "fs1")
        cluster.advance(3)
        successor = cluster.masters()["slot1"]
        self.assertEqual(wire.held_by(successor), {"127.0.10.8"})
        self.assertEqual(wire.holders["127.0.10.1"], set())

    def test_the_master_dies_before_the_others_activate(self) -> None:
        cluster, wire, changes = self.make()
        new = with_slot(cluster.config, "slot1", ips=(ip("127.0.10.8"),))
        self.activate(cluster, changes, "fs1", new)  # the master first, then it dies
        cluster.kill("fs1")
        self.guard_drop(wire, changes, "fs1")
        cluster.advance(3)
        successor = cluster.masters()["slot1"]
        self.assertEqual(wire.held_by(successor), {"127.0.10.1"})  # its config: the old
        # its activation comes later: it moves its own addresses then
        for name in ("fs2", "fs3"):
            self.activate(cluster, changes, name, new)
        cluster.advance(0.5)
        self.assertEqual(cluster.masters(), {"slot1": successor})
        self.assertEqual(wire.held_by(successor), {"127.0.10.8"})
        self.assertEqual(wire.holders["127.0.10.1"], set())


class StageTests(SynchronousTestCase):
    """A node refuses at stage a profile removed while it carries calls (the replicated
    calls): the push is aborted everywhere, nothing half-applied."""

    def test_removing_a_profile_with_calls_is_refused_at_stage(self) -> None:
        from fsha.configstage import ConfigStager, Refused
        from tests.test_configpush import SECRET, Workspace

        ws = Workspace(self)
        counts = {(1, "slot2"): 3}
        stager = ConfigStager(ws.config(), "fs1", SECRET, Clock(), lambda c: None,
                              lambda kind, **fields: None,
                              calls=lambda slot, profile: counts.get((slot, profile), 0))
        text = ws.text.replace('profiles = ["slot2"]', 'profiles = ["slot2b"]')
        self.assertNotEqual(text, ws.text)
        with self.assertRaises(Refused) as e:
            stager.stage(1, text)
        self.assertEqual(e.exception.reasons, [
            "slot.slot2.profiles: profile slot2 carries 3 call(s): it is stopped only "
            "without calls; push again once they are over (or keep it in the list)"])
        counts.clear()
        answer = stager.stage(1, text)
        self.assertEqual(answer["changes"], ["slot.slot2.profiles: [slot2] -> [slot2b]"])


class GuardTests(SynchronousTestCase):
    """The guard learns the union of old and new addresses by a second HELLO, keeps the
    lease it holds, and drops with the new settings when fsha is gone."""

    def test_a_second_hello_replaces_the_settings_and_keeps_the_lease(self) -> None:
        import io
        import os
        import time

        from fsha.guard import GuardProcess
        from fsha.localdrop import GuardSettings, SlotSettings
        from fsha.wire.guard import Dropped, Hello, Hold, decode, encode
        from tests.test_guard import FakeEffects as GuardEffects
        from tests.test_guard import settings

        first = settings()
        slot2 = first.slot(1)
        wider = dataclasses.replace(first, slots=(first.slots[0], SlotSettings(
            1, "slot2", (*slot2.ips, FloatingIP("198.18.0.109", 24, "ethC")),
            slot2.profiles)))
        read, write = os.pipe()
        os.write(write, b"".join(encode(m) for m in [
            Hello(first.as_json()), Hold(1, 5, time.monotonic_ns() + 10**9),
            Hello(wider.as_json())]))
        os.close(write)  # end of file right after: fsha is gone
        out = io.BytesIO()
        made: list[GuardEffects] = []

        def effects_for(s: GuardSettings) -> Any:
            made.append(GuardEffects(s))
            return made[-1]
        try:
            self.assertEqual(GuardProcess(read, out, effects_for).run(), 0)  # type: ignore[arg-type]
        finally:
            os.close(read)
        said = [decode(line) for line in out.getvalue().splitlines()]
        self.assertEqual(len(made), 2)
        self.assertEqual(made[0].drops, [])
        self.assertEqual(made[1].drops, ["slot2"])  # dropped with the new settings
        self.assertEqual([a.address for a in made[1].settings.slot(1).ips],
                         ["198.18.0.102", "198.18.0.109"])
        self.assertEqual([(m.slot, m.lease) for m in said if isinstance(m, Dropped)],
                         [(1, 5)])

    def test_the_link_sends_new_settings_at_once(self) -> None:
        from fsha.guardlink import GuardLink
        from fsha.localdrop import GuardSettings
        from fsha.wire.guard import Hello
        from tests.test_guard import FakeProcess

        cluster = FakeCluster(make_config(nodes=3, slots=2))
        config = cluster.config
        processes: list[FakeProcess] = []
        link = GuardLink(GuardSettings.from_config(config, config.nodes[0], 0.08),
                         cluster.nodes.get("fs1") or cluster.start("fs1"), cluster.clock,
                         spawn=lambda proto, argv: processes.append(FakeProcess(1))
                         or processes[-1])
        link.startService()
        new = with_slot(config, "slot1", ips=(ip("127.0.10.7"),))
        link.update_settings(GuardSettings.from_config(new, new.nodes[0], 0.08))
        hellos = [m for m in processes[-1].written if isinstance(m, Hello)]
        self.assertEqual(len(hellos), 2)
        self.assertEqual(hellos[-1].settings["slots"][0]["ips"], [["127.0.10.7", 32, "lo"]])
        link.stopService()


class HotStandbyTests(SynchronousTestCase):
    def test_every_node_starts_and_stops_the_profiles_none_moves_addresses(self) -> None:
        old = make_config(nodes=3, slots=2)
        old = dataclasses.replace(old, takeover=dataclasses.replace(
            old.takeover, profiles="hot_standby"))
        wire = Wire(self)
        floating = FakeFloating(wire, "fs3")
        profiles = FakeProfiles()
        changes = SlotChanges(FakeEffects(floating), floating, Clock(), old, timeout=2.0,
                              profiles=profiles)
        new = with_slot(old, "slot2", profiles=("slot2b",))
        changes.config_changed(new, None, lambda *a: None)  # a slave
        self.assertEqual(profiles.done, ["start slot2b", "stop slot2"])
        self.assertEqual(wire.log, [])
        self.assertEqual(changes.standby[1], ["slot2b"])


class StatusTests(SynchronousTestCase):
    def test_held_beyond_the_config_and_a_failed_change_are_problems(self) -> None:
        from fsha.status import _slot_change_problems

        status = {"node": "fs1", "slots": [{"name": "slot1", "ips": ["127.0.10.7/32 dev lo"],
                                            "profiles": ["b"]}],
                  "config": {"held": {"slot1": {"ips": ["127.0.10.7", "127.0.10.1"],
                                                "profiles": ["b", "a"]}},
                             "slot_changes": [{"slot": "slot1", "state": "failed",
                                               "error": "old addresses not taken down: x"}]}}
        self.assertEqual(_slot_change_problems(status), [
            "slot slot1: fs1 still holds what the config no longer lists (address "
            "127.0.10.1, profile a); its release takes them down",
            "slot slot1: the online config change failed on fs1: old addresses not taken "
            "down: x"])
        status["config"] = {"held": {"slot1": {"ips": ["127.0.10.7"], "profiles": ["b"]}},
                            "slot_changes": [{"slot": "slot1", "state": "done"}]}
        self.assertEqual(_slot_change_problems(status), [])


class AppendedSlotTests(SynchronousTestCase):
    def test_an_appended_slot_is_claimed_by_the_spare_once_activated(self) -> None:
        config = make_config(nodes=3, slots=1)
        cluster, wire, changes = wired_cluster(self, config)
        guards: dict[str, list[int]] = {}
        new = dataclasses.replace(config, slots=(*config.slots, SlotConfig(
            "slot2", 1, (ip("127.0.10.2"),), ("slot2",))))
        object.__setattr__(new, "digest", config_digest(new))
        for name in ("fs2", "fs3", "fs1"):  # slaves first, the push's order
            node = cluster.nodes[name]
            holding = (node.slot, node.epoch) if node.role.name == "MASTER" else None
            changes[name].config_changed(new, holding, node.resources_lost)
            guards[name] = sorted(changes[name].guarded())  # known before any claim
            node.replace_config(new)
            cluster.advance(0.3)
            for other in cluster.nodes.values():  # old and new configs side by side
                other.status()
        cluster.advance(2)
        masters = {n.me.name: n.config.slots[n.slot].name for n in cluster.nodes.values()
                   if n.role.name == "MASTER"}
        self.assertEqual(masters, {"fs1": "slot1", "fs2": "slot2"})
        self.assertEqual(wire.held_by("fs2"), {"127.0.10.2"})
        self.assertEqual(wire.held_by("fs1"), {"127.0.10.1"})
        self.assertEqual(guards, {"fs1": [0, 1], "fs2": [0, 1], "fs3": [0, 1]})
        # the old config's nodes saw a slot they do not know claimed: nothing broke, and
        # every node now has one view
        self.assertEqual(len({n.roles.digest for n in cluster.nodes.values()}), 1)
