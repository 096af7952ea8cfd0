"""fsha.limitbook (holdings, totals, the takeover plan) and fsha.limitservice with a fake
FreeSWITCH, a fake clock and synchronous replication between nodes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fsha.config import LimitsConfig, load_config
from fsha.fsdb import RecoveryRow, encode_call_row
from fsha.limitbook import (
    Adoption,
    CallHolding,
    Holdings,
    LimitBook,
    LimitValueError,
    decode_adoption,
    encode_adoption,
    holdings_from_metadata,
    marker_key,
    parse_hash_dump,
    plan_reconcile,
)
from fsha.limitservice import LimitService
from fsha.redisclient import RedisStats
from fsha.replication.state import ApplyResult, ReplicatedState
from fsha.wire.esl import Event, Headers
from fsha.wire.stream import NO_SLOT, Change, Kind

ROOT = Path(__file__).resolve().parent.parent
CONFIG = load_config(ROOT / "conf" / "production.example.toml")  # 4 nodes, 2 slots


def cdr(hash_keys: Iterable[str] = (), hiredis: Iterable[str] = (), *,
        backend: str | None = None, exceeded: bool = False, extra: str = "") -> bytes:
    """A recovery metadata document shaped like FreeSWITCH's XML CDR."""
    hash_keys, hiredis = list(hash_keys), list(hiredis)
    backends = backend if backend is not None else ",".join(
        [b for b, items in (("hash", hash_keys), ("hiredis", hiredis)) if items])
    variables = [f"<uuid>x</uuid><limit_backend>{quote(backends)}</limit_backend>"]
    variables += [f"<limit_usage_{k}>1</limit_usage_{k}>" for k in hash_keys]
    if exceeded:
        variables.append("<hiredis_limit_exceeded>true</hiredis_limit_exceeded>")
    apps = "".join(f'<application app_name="limit" app_data="hiredis {d}"></application>'
                   for d in hiredis)
    return (f'<?xml version="1.0"?>\n<cdr core-uuid="c"><variables>{"".join(variables)}'
            f'{extra}</variables><app_log><application app_name="answer" app_data="">'
            f"</application>{apps}</app_log></cdr>").encode()


class HoldingsTests(SynchronousTestCase):
    def test_hash_keys_from_variables(self) -> None:
        h = holdings_from_metadata(cdr(["realm_gw1", "other_x_y"]))
        self.assertEqual(h.hash, frozenset({"realm_gw1", "other_x_y"}))
        self.assertEqual(h.hiredis, ())

    def test_needs_the_backend_variable(self) -> None:
        # limit_backend is cleared when the limits were released (transfer): nothing held
        self.assertFalse(holdings_from_metadata(cdr(["realm_gw1"], backend="")))
        self.assertFalse(holdings_from_metadata(b"<cdr><variables/></cdr>"))

    def test_hiredis_units_from_the_app_log(self) -> None:
        h = holdings_from_metadata(cdr([], ["default trunk 10", "default trunk 10",
                                            "default rate 5/60", "other gw 3"]))
        self.assertEqual(h.hiredis, (("default", "trunk"), ("default", "trunk"),
                                     ("other", "gw")))
        h = holdings_from_metadata(cdr([], ["default trunk 10", "default gw 1"],
                                       exceeded=True))
        self.assertEqual(h.hiredis, (("default", "trunk"),))  # the last one was refused

    def test_both_backends(self) -> None:
        h = holdings_from_metadata(cdr(["r_k"], ["default trunk 2"]))
        self.assertEqual((h.hash, h.hiredis), (frozenset({"r_k"}), (("default", "trunk"),)))

    def test_no_limits_costs_no_parse(self) -> None:
        self.assertEqual(holdings_from_metadata(b"not even xml"), Holdings())

    def test_bad_documents(self) -> None:
        self.assertRaises(LimitValueError, holdings_from_metadata, b"<cdr><limit_backend>")
        self.assertRaises(LimitValueError, holdings_from_metadata,
                          b"<other><limit_backend/></other>")

    def test_hash_dump(self) -> None:
        out = ("L/realm_gw1/3/0/0/0\nL/realm_rate/0/4/60/1700000000\n"
               "L/a/b_c/2/0/0/0\nD/x/y\ngarbage\nL/bad/x/0/0/0\n")
        self.assertEqual(parse_hash_dump(out), {"realm_gw1": 3, "a/b_c": 2})
        self.assertEqual(parse_hash_dump(""), {})

    def test_adoption_round_trip(self) -> None:
        a = Adoption("u1", "rt", "fs1", Holdings(frozenset({"k"}), (("d", "t"), ("d", "t"))))
        self.assertEqual(decode_adoption("u1", encode_adoption(a)), a)
        self.assertRaises(LimitValueError, decode_adoption, "u", b"[]")
        self.assertRaises(LimitValueError, decode_adoption, "u", b'{"runtime": 1}')


class PlanTests(SynchronousTestCase):
    def test_moved_released_and_markers(self) -> None:
        calls = [CallHolding("a", 0, "rt1", Holdings(frozenset({"k"}), (("d", "t"),))),
                 CallHolding("b", 0, "rt1", Holdings(frozenset(), (("d", "t"), ("d", "t"),
                                                                    ("x", "y")))),
                 CallHolding("c", 0, "rt1", Holdings())]
        plan = plan_reconcile(calls, lambda u: u == "a", hiredis_realms=["d"], prefix="p:")
        self.assertEqual([c.uuid for c in plan.moved], ["a"])
        self.assertEqual([c.uuid for c in plan.released], ["b"])
        self.assertEqual([r.marker for r in plan.releases],
                         [marker_key("p:", "rt1", "b", "d", "t", 1),
                          marker_key("p:", "rt1", "b", "d", "t", 2)])
        self.assertEqual(plan.unmanaged, 1)
        self.assertEqual(plan.counts()["hash_units_moved"], 1)

    def test_superseded_only_for_that_incarnation(self) -> None:
        incarnations = {1: 10, 2: 20}
        book = LimitBook(incarnations.get)
        book.stored(1, NO_SLOT, "u/k", b"3")
        book.stored(2, NO_SLOT, "u/k", b"2")
        self.assertEqual(book.totals(), {"k": 5})
        book.stored(2, NO_SLOT, "s/1", b"10")
        self.assertEqual(book.totals(), {"k": 2})
        incarnations[1] = 11  # node 1 restarted: the old supersede no longer applies
        self.assertEqual(book.superseded(), set())
        book.removed(2, NO_SLOT, "s/1")
        book.removed(1, NO_SLOT, "u/k")
        self.assertEqual(book.totals(), {"k": 2})
        book.stored(1, NO_SLOT, "u/k", b"junk")
        self.assertEqual(book.rejected, 1)


# ---------------------------------------------------------------------------------------
# A fake cluster: nodes with a fake FreeSWITCH each, replicated synchronously


@dataclass
class Call:
    uuid: str
    keys: frozenset[str]
    units: tuple[str, ...]  # hiredis resources (realm "default")
    recovered: bool = False
    slot: int = 0
    answered: bool = True  # a ringing call has no recovery row (it cannot be recovered)


class FakeFS:
    """What LimitService uses of a FreeSWITCH: hash_dump limit, uuid_exists, hash insert,
    the core UUID, CHANNEL_HANGUP_COMPLETE events. Its ``limit`` counts like mod_hash (a
    recovered call is not counted, and its hangup releases nothing)."""

    def __init__(self, runtime: str) -> None:
        self.core_uuid: str | None = runtime
        self.calls: dict[str, Call] = {}
        self.hash: dict[str, str] = {}
        self.listeners: list[tuple[str | None, Callable[[Event], object]]] = []
        self.failing = False

    def usage(self) -> Counter[str]:
        c: Counter[str] = Counter()
        for call in self.calls.values():
            if not call.recovered:
                c.update(call.keys)
        return c

    def api(self, command: str, timeout: float | None = None) -> Deferred[str]:
        if self.failing:
            return defer.fail(RuntimeError("FreeSWITCH is gone"))
        if command == "hash_dump limit":
            return defer.succeed("".join(f"L/{k}/{n}/0/0/0\n" for k, n in self.usage().items())
                                 + "L/realm_refused/0/0/0/0\n")
        if command.startswith("uuid_exists "):
            return defer.succeed("true" if command[12:] in self.calls else "false")
        if command.startswith("hash insert/"):
            _, realm, key, value = command.split(" ", 1)[1].split("/")
            self.hash[f"{realm}/{key}"] = value
            return defer.succeed("+OK\n")
        if command == "global_getvar core_uuid":
            return defer.succeed(self.core_uuid or "")
        return defer.succeed(f"-ERR {command} Command not found!\n")

    def add_event_listener(self, callback: Callable[[Event], object],
                           name: str | None = None) -> None:
        self.listeners.append((name, callback))

    def fire(self, event: Event) -> None:
        for name, listener in list(self.listeners):
            if name in (None, event.name):
                listener(event)

    def subscribe(self, *names: str) -> Deferred[None]:
        return defer.succeed(None)

    def hangup(self, uuid: str) -> Call:
        call = self.calls.pop(uuid)
        self.fire(Event(Headers([("Event-Name", "CHANNEL_HANGUP_COMPLETE"),
                                 ("Unique-ID", uuid)])))
        return call

    def run_limits(self, call: Call, profile: str) -> None:
        """The dialplan's ``limit hiredis default <unit> 100`` apps, one
        CHANNEL_EXECUTE_COMPLETE each (as switch_core_session_exec fires it), plus another
        application's completion (ignored)."""
        for i, unit in enumerate(call.units):
            headers = [("Event-Name", "CHANNEL_EXECUTE_COMPLETE"),
                       ("Core-UUID", self.core_uuid or ""),
                       ("Channel-Name", f"sofia/{profile}/1000@127.0.0.1"),
                       ("Unique-ID", call.uuid), ("variable_limit_backend", "hiredis"),
                       ("variable_hiredis_raw_response", str(i + 1)),
                       ("Application", "limit"),
                       ("Application-Data", f"hiredis default {unit} 100"),
                       ("Application-Response", "_none_")]
            for app in ("limit", "answer"):
                h = [(k, app if k == "Application" else v) for k, v in headers]
                self.fire(Event(Headers(h)))


class FakeRedis:
    """RedisClient's release semantics, in memory."""

    state = "up"

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.markers: set[str] = set()
        self.listeners: list[Callable[[], object]] = []
        self.retakes: list[str] = []
        self.clamped = 0  # releases that found the counter at 0 (a double release)

    def add_up_listener(self, listener: Callable[[], object]) -> None:
        self.listeners.append(listener)

    def retake(self, counter: str, marker: str) -> Deferred[tuple[str, str]]:
        if self.state != "up":
            from fsha.redisclient import RedisUnavailable
            return defer.fail(RedisUnavailable("down"))
        self.retakes.append(counter)
        if marker in self.markers:
            return defer.succeed(("already", str(self.counters[counter])))
        self.markers.add(marker)
        self.counters[counter] += 1
        return defer.succeed(("retaken", str(self.counters[counter])))

    def release(self, counter: str, marker: str) -> Deferred[tuple[str, str]]:
        if self.state != "up":
            from fsha.redisclient import RedisUnavailable
            return defer.fail(RedisUnavailable("down"))
        if marker in self.markers:
            return defer.succeed(("already", str(self.counters[counter])))
        self.markers.add(marker)
        if self.counters[counter] <= 0:
            self.clamped += 1
            return defer.succeed(("clamped", "0"))
        self.counters[counter] -= 1
        return defer.succeed(("released", str(self.counters[counter])))

    def status(self) -> dict[str, Any]:
        return {"state": self.state}


class Cluster:
    def __init__(self, n: int = 3, hiredis: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.redis = FakeRedis()
        self.limits = LimitsConfig(1.0, "fsha_limit", ("default",) if hiredis else (), 5.0,
                                   5.0, 1.0)
        self.nodes = list(CONFIG.nodes[:n])
        self.alive: set[int] = set()
        self.fs: dict[int, FakeFS] = {}
        self.states: dict[int, ReplicatedState] = {}
        self.svcs: dict[int, LimitService] = {}
        self.serial = 0
        self.epoch = 0  # takeovers
        for node in self.nodes:
            self.boot(node.node_id)

    def boot(self, nid: int) -> None:
        self.serial += 1
        node = next(n for n in self.nodes if n.node_id == nid)
        fs = FakeFS(f"runtime-{nid}-{self.serial}")
        state = ReplicatedState(self.clock, nid, self.serial)
        svc = LimitService(fs, state, CONFIG, node, self.clock, self.limits,
                           redis=self.redis,  # type: ignore[arg-type]
                           publish=lambda ch, nid=nid: self.publish(nid, ch))
        # a restarted node catches up with everyone's records
        for other, ostate in self.states.items():
            if other in self.alive and other != nid:
                for origin in ostate.positions():
                    if origin.origin == nid:
                        continue
                    begin, items, end = ostate.snapshot(origin.origin)
                    state.apply_snapshot(begin, items, end)
        self.fs[nid], self.states[nid], self.svcs[nid] = fs, state, svc
        self.alive.add(nid)
        for other in self.alive:  # peers learn the new incarnation
            if other != nid:
                self.states[other].observe_incarnation(nid, self.serial)
        svc.start()

    def publish(self, origin: int, change: Change) -> None:
        if origin not in self.alive:
            return  # killed: nothing it writes gets out
        for nid in self.alive:
            if nid != origin:
                result = self.states[nid].apply(change)
                assert result is ApplyResult.APPLIED, result

    def ring(self, nid: int, slot: int, call: Call) -> None:
        """A call that ran its limits and is not answered yet (no recovery row)."""
        call.slot, call.answered = slot, False
        self.fs[nid].calls[call.uuid] = call
        self.redis.counters.update(call.units)
        self.fs[nid].run_limits(call, CONFIG.slots[slot].profiles[0])

    def write_call(self, nid: int, slot: int, call: Call) -> None:
        call.slot = slot
        fs = self.fs[nid]
        fs.calls[call.uuid] = call
        if not call.recovered:  # the limit apps ran at setup, before the answer
            fs.run_limits(call, CONFIG.slots[slot].profiles[0])
        row = RecoveryRow(fs.core_uuid or "", "sofia", CONFIG.slots[slot].profiles[0], "h",
                          call.uuid, cdr(sorted(call.keys), [f"default {u} 100"
                                                             for u in call.units]))
        self.publish(nid, self.states[nid].put(slot, Kind.CALL, call.uuid,
                                               encode_call_row(row)))
        if not call.recovered:
            self.redis.counters.update(call.units)

    def hangup(self, nid: int, uuid: str) -> None:
        call = self.fs[nid].hangup(uuid)
        if not call.recovered:  # FreeSWITCH releases what it took itself
            self.redis.counters.subtract(call.units)
        change = self.states[nid].delete(call.slot, Kind.CALL, uuid)
        if change is not None:
            self.publish(nid, change)

    def handover(self, old: int, new: int, slot: int) -> None:
        """``old`` hands ``slot`` over: its FreeSWITCH stops the profile (every call of
        the slot hangs up there: it releases what it took itself, fsha what it adopted;
        the replicated rows stay), the answered calls are recovered on ``new``."""
        calls = [c for c in self.fs[old].calls.values() if c.slot == slot]
        for c in calls:
            self.fs[old].hangup(c.uuid)
            if not c.recovered:
                self.redis.counters.subtract(c.units)
        for c in calls:
            if c.answered:
                self.write_call(new, slot, Call(c.uuid, c.keys, c.units, recovered=True))
        self.epoch += 1
        report = _Report("acquire", CONFIG.slots[slot].name,
                         next(n.name for n in self.nodes if n.node_id == old), handover=True,
                         epoch=self.epoch)
        self.svcs[new].takeover_done(report)
        for c in calls:  # the old node's feed forgets the rows (gone from its table)
            change = self.states[old].delete(slot, Kind.CALL, c.uuid)
            if change is not None:
                self.publish(old, change)

    def slot_of(self, nid: int, uuid: str) -> int:
        for r in self.states[nid].records(origin=nid, kind=Kind.CALL):
            if r.key == uuid:
                return r.slot
        return 0

    def kill(self, nid: int) -> dict[str, Call]:
        self.alive.discard(nid)
        self.svcs[nid].stop()
        return self.fs[nid].calls

    def takeover(self, dead: int, new: int, slot: int, recover: Iterable[str]) -> None:
        """``new`` takes ``slot`` over from ``dead``; the calls in ``recover`` are
        recovered on it (without their limits, as FreeSWITCH does)."""
        calls = self.fs[dead].calls
        for uuid in recover:
            c = calls[uuid]
            if c.slot == slot and c.answered:
                self.write_call(new, slot, Call(c.uuid, c.keys, c.units, recovered=True))
        self.epoch += 1
        report = _Report("acquire", CONFIG.slots[slot].name,
                         next(n.name for n in self.nodes if n.node_id == dead),
                         epoch=self.epoch)
        self.svcs[new].takeover_done(report)

    def poll(self) -> None:
        for nid in sorted(self.alive):
            self.svcs[nid].poll_once()

    def live_calls(self) -> list[Call]:
        return [c for nid in self.alive for c in self.fs[nid].calls.values()]

    def expected(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for call in self.live_calls():
            c.update(call.keys)
        return {k: n for k, n in c.items() if n}

    def expected_redis(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for call in self.live_calls():
            c.update(call.units)
        return {k: n for k, n in c.items() if n}


@dataclass
class _Report:
    action: str
    slot: str
    previous: str | None
    ok: bool = True
    handover: bool = False
    epoch: int = 0


KEYS = ["realm_a", "realm_b", "x_c"]


class ClusterTests(SynchronousTestCase):
    def test_failover_moves_recovered_and_releases_the_rest(self) -> None:
        cl = Cluster()
        n1, n2, n3 = (n.node_id for n in cl.nodes)
        for i in range(10):
            cl.write_call(n1, 0, Call(f"c{i}", frozenset(KEYS[:1 + i % 3]),
                                      ("trunk",) * (i % 2)))
        cl.write_call(n2, 1, Call("d0", frozenset({"realm_a"}), ("trunk", "gw")))
        cl.poll()
        for nid in cl.alive:
            self.assertEqual(cl.svcs[nid].book.totals(), {"realm_a": 11, "realm_b": 6,
                                                          "x_c": 3})
        self.assertEqual(cl.fs[n3].hash["fsha_limit/realm_a"], "11")
        self.assertEqual(dict(cl.redis.counters), {"trunk": 6, "gw": 1})
        cl.kill(n1)
        cl.takeover(n1, n3, 0, [f"c{i}" for i in range(0, 10, 2)])  # half recovered
        del cl.fs[n1].calls  # the dead FreeSWITCH's calls are gone
        cl.fs[n1].calls = {}
        cl.poll()
        want = cl.expected()
        for nid in cl.alive:
            self.assertEqual(cl.svcs[nid].book.totals(), want, nid)
            self.assertEqual(cl.fs[nid].hash["fsha_limit/realm_a"], str(want["realm_a"]))
        self.assertEqual({k: v for k, v in cl.redis.counters.items() if v},
                         cl.expected_redis())
        report = cl.svcs[n3].reports[-1]
        self.assertEqual((report["moved"], report["released"]), (5, 5))
        # the adopted calls hang up on n3: released there, by fsha
        for i in range(0, 10, 2):
            cl.hangup(n3, f"c{i}")
        cl.poll()
        self.assertEqual(cl.svcs[n2].book.totals(), {"realm_a": 1})
        self.assertEqual(cl.fs[n2].hash.get("fsha_limit/realm_b"), "0")
        self.assertEqual({k: v for k, v in cl.redis.counters.items() if v},
                         {"trunk": 1, "gw": 1})
        self.assertEqual(cl.svcs[n3].status()["adopted"], 0)

    def test_redis_down_waits_then_releases_once(self) -> None:
        cl = Cluster()
        n1, _n2, n3 = (n.node_id for n in cl.nodes)
        cl.write_call(n1, 0, Call("c1", frozenset(), ("trunk", "trunk")))
        cl.kill(n1)
        cl.fs[n1].calls = {}
        cl.redis.state = "down"
        cl.takeover(n1, n3, 0, [])
        self.assertEqual(cl.svcs[n3].status()["pending_releases"], 2)
        self.assertEqual(cl.redis.counters["trunk"], 2)
        cl.redis.state = "up"
        cl.clock.advance(1.0)  # the retry timer
        self.assertEqual(cl.redis.counters["trunk"], 0)
        self.assertEqual(cl.svcs[n3].status()["pending_releases"], 0)
        # a second reconciliation of the same dead master releases nothing more
        cl.svcs[n3].takeover_done(_Report("acquire", CONFIG.slots[0].name, cl.nodes[0].name))
        self.assertEqual(cl.redis.counters["trunk"], 0)
        self.assertEqual(cl.svcs[n3].released, {"released": 2, "already": 2})

    def test_successor_of_the_adopter(self) -> None:
        """fs1 dies, fs3 adopts its calls, then fs3 dies and fs2 takes them (or not)."""
        cl = Cluster()
        n1, n2, n3 = (n.node_id for n in cl.nodes)
        for i in range(4):
            cl.write_call(n1, 0, Call(f"c{i}", frozenset({"realm_a"}), ("trunk",)))
        cl.kill(n1)
        cl.takeover(n1, n3, 0, ["c0", "c1", "c2"])
        cl.fs[n1].calls = {}
        self.assertEqual(cl.redis.counters["trunk"], 3)
        cl.kill(n3)
        cl.redis.state = "down"
        cl.takeover(n3, n2, 0, ["c0"])
        cl.fs[n3].calls = {}
        cl.poll()
        self.assertEqual(cl.svcs[n2].book.totals(), {"realm_a": 1})
        cl.redis.state = "up"
        cl.clock.advance(1.0)
        self.assertEqual(cl.redis.counters["trunk"], 1)
        cl.hangup(n2, "c0")
        cl.clock.advance(1.0)
        cl.poll()
        self.assertEqual(cl.svcs[n2].book.totals(), {})
        self.assertEqual(cl.redis.counters["trunk"], 0)

    def test_a_stopping_node_leaves_the_totals(self) -> None:
        cl = Cluster()
        n1, n2, _n3 = (n.node_id for n in cl.nodes)
        cl.write_call(n1, 0, Call("c0", frozenset({"realm_a"}), ()))
        cl.write_call(n2, 1, Call("d0", frozenset({"realm_a"}), ()))
        cl.poll()
        self.assertEqual(cl.svcs[n2].book.totals(), {"realm_a": 2})
        cl.svcs[n1].stop()  # SIGTERM: its slot was handed over, its calls with it
        self.assertEqual(cl.svcs[n2].book.totals(), {"realm_a": 1})

    def test_sweep_releases_adopted_calls_whose_event_was_missed(self) -> None:
        cl = Cluster()
        n1, _n2, n3 = (n.node_id for n in cl.nodes)
        cl.write_call(n1, 0, Call("c0", frozenset({"realm_a"}), ("trunk",)))
        cl.kill(n1)
        cl.takeover(n1, n3, 0, ["c0"])
        del cl.fs[n3].calls["c0"]  # gone without an event (FreeSWITCH restarted)
        cl.clock.advance(cl.limits.sweep_interval)
        self.assertEqual(cl.svcs[n3].status()["adopted"], 0)
        self.assertEqual(cl.redis.counters["trunk"], 0)

    def test_failed_lookups_are_retried_and_do_not_block(self) -> None:
        cl = Cluster()
        n1, _n2, n3 = (n.node_id for n in cl.nodes)
        cl.write_call(n1, 0, Call("c0", frozenset({"realm_a"}), ()))
        cl.kill(n1)
        cl.fs[n1].calls = {}
        cl.fs[n3].failing = True
        cl.takeover(n1, n3, 0, [])
        self.assertEqual(cl.svcs[n3].status()["reconciles_waiting"], 1)
        cl.fs[n3].failing = False
        cl.clock.advance(cl.limits.retry_interval)
        self.assertEqual(cl.svcs[n3].status()["reconciles_waiting"], 0)
        cl.poll()
        self.assertEqual(cl.svcs[n3].book.totals(), {})

    def test_ringing_calls_of_a_dead_master_are_released_once(self) -> None:
        cl = Cluster()
        n1, n2, n3 = (n.node_id for n in cl.nodes)
        cl.write_call(n1, 0, Call("c0", frozenset({"realm_a"}), ("trunk",)))
        cl.write_call(n1, 0, Call("c1", frozenset(), ("trunk", "trunk")))
        cl.ring(n1, 0, Call("r0", frozenset({"realm_a"}), ("trunk", "gw")))
        cl.ring(n1, 0, Call("r1", frozenset(), ("trunk",)))
        cl.ring(n1, 0, Call("r2", frozenset(), ("gw",)))
        cl.fs[n1].hangup("r2")  # hung up while ringing: FreeSWITCH released it
        cl.redis.counters.subtract(["gw"])
        for nid in (n2, n3):  # every node knows what the calls hold, ringing or not
            self.assertEqual(set(cl.svcs[nid].book.held[n1]), {"c0", "c1", "r0", "r1"})
        self.assertEqual(dict(cl.redis.counters), {"trunk": 5, "gw": 1})
        cl.kill(n1)
        cl.takeover(n1, n3, 0, ["c0"])
        cl.fs[n1].calls = {}
        self.assertEqual({k: v for k, v in cl.redis.counters.items() if v}, {"trunk": 1})
        report = cl.svcs[n3].reports[-1]
        self.assertEqual((report["moved"], report["released"], report["hiredis_releases"]),
                         (1, 3, 5))
        # the same reconciliation again (a retry) releases nothing more
        cl.svcs[n3].takeover_done(_Report("acquire", CONFIG.slots[0].name, cl.nodes[0].name,
                                          epoch=cl.epoch))
        self.assertEqual(cl.svcs[n3].released, {"released": 5, "already": 5})
        # a node that also saw n3's adoption of c0 releases the same markers
        cl.svcs[n2].takeover_done(_Report("acquire", CONFIG.slots[1].name, cl.nodes[0].name))
        self.assertEqual(cl.svcs[n2].released, {})
        cl.hangup(n3, "c0")
        self.assertEqual({k: v for k, v in cl.redis.counters.items() if v}, {})
        self.assertEqual(cl.redis.clamped, 0)

    def test_held_record_follows_the_call(self) -> None:
        cl = Cluster()
        n1, n2, _n3 = (n.node_id for n in cl.nodes)
        cl.ring(n1, 0, Call("r0", frozenset(), ("trunk",)))
        cl.ring(n1, 1, Call("r1", frozenset(), ("trunk",)))
        held = cl.svcs[n2].book.held[n1]
        self.assertEqual((held["r0"].slot, held["r1"].slot), (0, 1))
        self.assertEqual(held["r0"].runtime, cl.fs[n1].core_uuid)
        cl.fs[n1].hangup("r0")
        self.assertNotIn("r0", cl.svcs[n2].book.held[n1])
        del cl.fs[n1].calls["r1"]  # gone without an event: the sweep forgets it
        cl.clock.advance(cl.limits.sweep_interval)
        self.assertNotIn(n1, cl.svcs[n2].book.held)

    def test_held_unit_from_the_event(self) -> None:
        from fsha.limitbook import held_unit
        self.assertEqual(held_unit("hiredis default trunk 10", "hash,hiredis", None, "3"),
                         ("default", "trunk"))
        self.assertEqual(held_unit("hiredis default trunk", "hiredis", None, None),
                         ("default", "trunk"))
        self.assertIsNone(held_unit("hiredis default trunk 10/60", "hiredis", None, "3"))
        self.assertIsNone(held_unit("hash realm res 10", "hash,hiredis", None, None))
        self.assertIsNone(held_unit("hiredis default trunk 10", "hash", None, "3"))
        self.assertIsNone(held_unit("hiredis default trunk 2", "hiredis", "true", "3"))
        # refused earlier (the flag stays): this one's own reply is within its max
        self.assertEqual(held_unit("hiredis default gw 5", "hiredis", "true", "1"),
                         ("default", "gw"))

    def test_handover_takes_the_units_again_once(self) -> None:
        cl = Cluster()
        n1, n2, n3 = (n.node_id for n in cl.nodes)
        cl.write_call(n1, 0, Call("c0", frozenset({"realm_a"}), ("trunk",)))
        cl.write_call(n1, 0, Call("c1", frozenset(), ("trunk", "trunk")))
        cl.write_call(n1, 0, Call("c2", frozenset(), ()))
        cl.ring(n1, 0, Call("r0", frozenset(), ("trunk",)))  # hung up by the profile stop
        cl.handover(n1, n3, 0)
        self.assertEqual(dict(cl.redis.counters), {"trunk": 3})
        report = cl.svcs[n3].reports[-1]
        self.assertEqual((report["moved"], report["hiredis_retakes"]), (2, 3))
        self.assertEqual(cl.svcs[n3].book.hiredis_held(), {("default", "trunk"): 3})
        cl.poll()
        self.assertEqual(cl.svcs[n2].book.totals(), {"realm_a": 1})
        # the reconciliation again (a retry): nothing taken twice
        cl.svcs[n3].takeover_done(_Report("acquire", CONFIG.slots[0].name,
                                          cl.nodes[0].name, handover=True, epoch=cl.epoch))
        self.assertEqual(dict(cl.redis.counters), {"trunk": 3})
        # then a hand-over to n2: n3's adopted calls hang up there (released by fsha)
        # and n2 takes them again
        cl.handover(n3, n2, 0)
        self.assertEqual(dict(cl.redis.counters), {"trunk": 3})
        cl.handover(n2, n3, 0)  # and back: n3 takes them under markers of this takeover
        self.assertEqual(dict(cl.redis.counters), {"trunk": 3})
        for uuid in ("c0", "c1"):
            cl.hangup(n3, uuid)
        self.assertEqual(dict(cl.redis.counters), {"trunk": 0})
        self.assertEqual(cl.redis.clamped, 0)

    def test_handover_with_redis_down_retakes_before_releasing(self) -> None:
        cl = Cluster()
        n1, _n2, n3 = (n.node_id for n in cl.nodes)
        cl.write_call(n1, 0, Call("c0", frozenset(), ("trunk",)))
        cl.redis.state = "down"
        cl.handover(n1, n3, 0)
        self.assertEqual(cl.svcs[n3].status()["pending_retakes"], 1)
        cl.hangup(n3, "c0")  # ends before Redis is back
        self.assertEqual(cl.svcs[n3].status()["pending_releases"], 1)
        cl.redis.state = "up"
        cl.clock.advance(1.0)
        self.assertEqual(cl.redis.counters["trunk"], 0)
        self.assertEqual((cl.svcs[n3].retaken, cl.svcs[n3].released),
                         ({"retaken": 1}, {"released": 1}))
        self.assertEqual(cl.redis.clamped, 0)

    def test_master_whose_freeswitch_died_gave_nothing_back(self) -> None:
        """A master gives its slot up because its FreeSWITCH stopped answering (a hand-over
        for the cluster, but that FreeSWITCH stopped no profile): its calls' units are
        still in Redis. The ringing ones are released, the recovered ones adopted with
        their units (not taken again) and released when they end."""
        cl = Cluster()
        n1, _n2, n3 = (n.node_id for n in cl.nodes)
        cl.write_call(n1, 0, Call("c0", frozenset(), ("trunk",)))
        cl.ring(n1, 0, Call("r0", frozenset(), ("trunk",)))
        cl.svcs[n3].peer_fs_ok = lambda nid: nid != n1
        calls, cl.fs[n1].calls = cl.fs[n1].calls, {}
        cl.fs[n1].failing = True
        cl.write_call(n3, 0, Call("c0", calls["c0"].keys, calls["c0"].units, recovered=True))
        cl.epoch += 1
        cl.svcs[n3].takeover_done(_Report("acquire", CONFIG.slots[0].name, cl.nodes[0].name,
                                          handover=True, epoch=cl.epoch))
        self.assertEqual(cl.redis.counters["trunk"], 1)
        report = cl.svcs[n3].reports[-1]
        self.assertEqual((report["handover"], report["moved"], report["hiredis_releases"],
                          report["hiredis_retakes"]), (False, 1, 1, 0))
        self.assertEqual(cl.svcs[n3].book.superseded(), set())  # n1 lives on
        cl.hangup(n3, "c0")
        self.assertEqual(cl.redis.counters["trunk"], 0)
        self.assertEqual(cl.redis.clamped, 0)

    @settings(max_examples=100, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.sampled_from(["call", "ring", "hangup", "failover", "poll",
                                               "restart", "handover"]),
                              st.integers(0, 2), st.integers(0, 7),
                              st.sets(st.sampled_from(KEYS), max_size=3),
                              st.lists(st.sampled_from(["t1", "t2"]), max_size=2),
                              st.integers(0, 255)), min_size=5, max_size=40))
    def test_totals_are_exact_after_any_history(self, ops: list[Any]) -> None:
        cl = Cluster()
        ids = [n.node_id for n in cl.nodes]
        serial = 0
        for op, who, _n, keys, units, mask in ops:
            nid = ids[who]
            if op == "call" and nid in cl.alive:
                serial += 1
                slot = 0 if who != 1 else 1
                cl.write_call(nid, slot, Call(f"u{serial}", frozenset(keys), tuple(units)))
            elif op == "ring" and nid in cl.alive:
                serial += 1
                cl.ring(nid, 0 if who != 1 else 1, Call(f"u{serial}", frozenset(), tuple(units)))
            elif op == "handover" and nid in cl.alive and len(cl.alive) >= 2:
                new = next(i for i in ids if i in cl.alive and i != nid)
                cl.handover(nid, new, 0)
                cl.handover(nid, new, 1)
            elif op == "hangup" and nid in cl.alive and cl.fs[nid].calls:
                cl.hangup(nid, sorted(cl.fs[nid].calls)[mask % len(cl.fs[nid].calls)])
            elif op == "failover" and nid in cl.alive and len(cl.alive) >= 2:
                new = next(i for i in ids if i in cl.alive and i != nid)
                calls = sorted(cl.fs[nid].calls)
                recovered = [u for i, u in enumerate(calls) if mask >> (i % 8) & 1]
                cl.kill(nid)
                cl.takeover(nid, new, 0, recovered)
                cl.takeover(nid, new, 1, recovered)
                cl.fs[nid].calls = {}
            elif op == "restart" and nid not in cl.alive:
                cl.boot(nid)
            elif op == "poll":
                cl.poll()
        cl.clock.advance(1.0)
        cl.poll()
        want = cl.expected()
        for nid in cl.alive:
            self.assertEqual(cl.svcs[nid].book.totals(), want)
            self.assertEqual({k: int(v) for k, v in cl.fs[nid].hash.items() if int(v)},
                             {f"fsha_limit/{k}": n for k, n in want.items()})
        self.assertEqual({k: v for k, v in cl.redis.counters.items() if v},
                         cl.expected_redis())
        self.assertEqual(cl.redis.clamped, 0)  # nothing released twice


class HangupMemoryTests(SynchronousTestCase):
    def test_hung_up_calls_are_forgotten_after_their_ttl(self) -> None:
        """A master's every hangup is remembered for GONE_TTL only, without a takeover."""
        from fsha.limitservice import GONE_TTL

        cl = Cluster()
        nid = cl.nodes[0].node_id
        svc = cl.svcs[nid]
        for i in range(3000):
            cl.write_call(nid, 0, Call(f"g{i}", frozenset(KEYS[:1]), ()))
            cl.hangup(nid, f"g{i}")
            cl.clock.advance(0.1)  # 10 hangups a second for 300 s
        self.assertLessEqual(len(svc._gone), GONE_TTL * 10 + 1)
        self.assertLessEqual(len(svc._gone_order), GONE_TTL * 10 + 1)
        self.assertIn("g2999", svc._gone)
        self.assertNotIn("g0", svc._gone)


class StatusAndMetricsTests(SynchronousTestCase):
    def test_status_lines_problems_and_metrics(self) -> None:
        from fsha.metrics import StatsSources
        from fsha.status import problems, render
        from tests.fakecluster import FakeCluster, make_config
        from tests.test_metrics import one, scrape

        cl = Cluster()
        n1, _n2, n3 = (n.node_id for n in cl.nodes)
        cl.write_call(n1, 0, Call("c0", frozenset({"realm_a"}), ("trunk",)))
        cl.write_call(n1, 0, Call("c1", frozenset({"realm_a"}), ("trunk",)))
        cl.kill(n1)
        cl.redis.state = "down"
        cl.takeover(n1, n3, 0, ["c0"])
        cl.fs[n1].calls = {}
        cl.poll()
        lim = cl.svcs[n3].status()
        self.assertEqual(lim["totals"], {"realm_a": 1})
        self.assertEqual(lim["superseded"], [cl.nodes[0].name])
        self.assertEqual(lim["hiredis_held"], {"default/trunk": 1})
        self.assertEqual(lim["pending_releases"], 1)
        fake = FakeCluster(make_config(nodes=3, slots=2))
        fake.start_all()
        fake.advance(fake.config.discovery + 0.5)
        status = fake.nodes["fs3"].status()
        status["limits"] = lim
        status["redis"] = {"address": "10.0.0.5:6379", "tls": True, "state": "down",
                           "since": 1_700_000_000.0, "last_error": "cannot connect: refused",
                           "commands": 3, "failures": 2, "timeouts": 1, "connects": 1}
        text = render(status)
        self.assertIn("limits: realm_a 1; adopted calls 1 here / 1 cluster; pending "
                      "releases 1", text)
        self.assertRegex(text, r"redis: 10\.0\.0\.5:6379 down since \d\d:\d\d:\d\d")
        found = problems(status)
        self.assertTrue(any(p.startswith("redis: down since") and "cannot connect" in p
                            for p in found), found)
        self.assertIn("limits: 1 hiredis unit(s) waiting to be released in Redis", found)
        redis = RedisStats(**status["redis"], db=0, disconnects=1)
        _, samples = scrape(StatsSources(node=fake.nodes["fs3"].stats,
                                         limits=cl.svcs[n3].stats, redis=lambda: redis))
        self.assertEqual(one(samples, "fsha_limit_usage", key="realm_a"), 1.0)
        self.assertEqual(one(samples, "fsha_limit_adopted_calls"), 1.0)
        self.assertEqual(one(samples, "fsha_limit_pending_releases"), 1.0)
        self.assertEqual(one(samples, "fsha_redis_up"), 0.0)
        self.assertEqual(one(samples, "fsha_limit_node_usage", node=cl.nodes[2].name,
                             key="realm_a"), 1.0)


class LifeTests(SynchronousTestCase):
    """LimitLife owns the service's life; start and stop are total (no-ops where they do
    not apply), and nothing is armed once stopped."""

    def test_start_stop_restart(self) -> None:
        cl = Cluster(n=2)
        n1, n2 = (n.node_id for n in cl.nodes)
        svc = cl.svcs[n1]
        self.assertEqual(svc.life, "running")
        svc.start()  # again: nothing more armed, nothing subscribed twice
        self.assertEqual(svc.life, "running")
        cl.write_call(n1, 0, Call("c0", frozenset({"realm_a"}), ()))
        cl.poll()
        self.assertEqual(cl.svcs[n2].book.totals(), {"realm_a": 1})
        svc.stop()
        self.assertEqual(svc.life, "stopped")
        self.assertEqual(cl.svcs[n2].book.totals(), {})  # its usage left the totals
        self.assertEqual((svc._poll_timer, svc._sweep_timer, svc._retry_timer),
                         (None, None, None))
        armed = len(cl.clock.getDelayedCalls())
        cl.clock.advance(cl.limits.poll_interval)
        self.assertLessEqual(len(cl.clock.getDelayedCalls()), armed)  # n2's only
        svc.stop()  # again: a no-op
        self.assertEqual(svc.life, "stopped")
        svc.start()
        self.assertEqual(svc.life, "running")
        cl.poll()
        self.assertEqual(cl.svcs[n2].book.totals(), {"realm_a": 1})

    def test_stop_before_start_is_a_no_op(self) -> None:
        cl = Cluster(n=1)
        (n1,) = (n.node_id for n in cl.nodes)
        idle = LimitService(cl.fs[n1], cl.states[n1], CONFIG, cl.nodes[0], cl.clock,
                            cl.limits)
        idle.stop()
        self.assertEqual(idle.life, "idle")
