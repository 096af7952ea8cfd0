"""The durable store (fsha.durable): coalesced writes, bounded memory while Redis is down or
slow, full resync, and loading at start only what is not newer here.

Logic tests use a fake clock and a scripted Redis client; the others a real redis-server."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest

from fsha.config import SlotConfig
from fsha.durable import (
    DurableStore,
    decode_field,
    decode_value,
    encode_field,
    encode_value,
    key_prefix,
)
from fsha.fsdb import (
    RecoveryRow,
    RegistrationRow,
    encode_call_row,
    encode_registration,
    registration_key,
)
from fsha.harness import poll_until
from fsha.redisclient import RedisClient, RedisSettings, RedisUnavailable
from fsha.replication.state import ReplicatedState
from fsha.takeover import ReplicatedRecords
from fsha.wire.heartbeat import Role
from fsha.wire.stream import Kind
from tests.redisserver import RedisServer, start_redis
from tests.test_limits import CONFIG
from tests.test_redisclient import settings

PREFIX = key_prefix("fsha:", "test")


class FakeNode:
    """What the store uses of ClusterNode: role, epochs, holders, role listeners."""

    def __init__(self) -> None:
        self.role = Role.STARTING
        self.epoch = 0
        self.known_epochs: dict[int, int] = {}
        self.last_holder: dict[int, int] = {}
        self._listeners: list[Any] = []

    def add_role_listener(self, callback: Any) -> None:
        self._listeners.append(callback)

    def set_role(self, role: Role, slot: SlotConfig | None = None, epoch: int = 0) -> None:
        old, self.role, self.epoch = self.role, role, epoch
        for callback in self._listeners:
            callback(old, role, slot)


class ScriptedRedis:
    """A RedisClient stand-in: records commands, answers with ``answer(args)``."""

    def __init__(self) -> None:
        self.settings = RedisSettings("127.0.0.1", 1, timeout=0.5, connect_timeout=1.0)
        self.state = "down"
        self.last_error: str | None = "not connected yet"
        self.commands: list[tuple[Any, ...]] = []
        self.answer: Callable[[tuple[Any, ...]], Any] = self.default
        self._up: list[Callable[[], object]] = []

    @staticmethod
    def default(args: tuple[Any, ...]) -> Any:
        if args[0] == "HGETALL":
            return []  # nothing stored
        if args[0] == "EVAL" and "'resync'" in args[1]:
            return "ok"
        return "OK"

    def add_up_listener(self, listener: Callable[[], object]) -> None:
        self._up.append(listener)

    def up(self) -> None:
        self.state, self.last_error = "up", None
        for listener in self._up:
            listener()

    def execute(self, *args: Any, timeout: float | None = None) -> Deferred[Any]:
        if self.state != "up":
            return defer.fail(RedisUnavailable("down"))
        self.commands.append(args)
        result = self.answer(args)
        return result if isinstance(result, Deferred) else defer.succeed(result)

    def writes(self) -> list[tuple[Any, ...]]:
        return [c for c in self.commands if c[0] == "EVAL" and "'resync'" in c[1]]


def call_value(uuid: str) -> bytes:
    return encode_call_row(RecoveryRow("runtime-0", "sofia", CONFIG.slots[0].profiles[0],
                                       "host0", uuid,
                                       f"<cdr uuid='{uuid}'/>".encode()))


class StoreLogicTests(unittest.TestCase):
    """Fake clock, scripted Redis."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.state = ReplicatedState(self.clock, 0, 7)
        self.node = FakeNode()
        self.redis = ScriptedRedis()
        self.alive: set[int] = set()
        self.store = DurableStore(self.redis, self.state, self.node, [0, 1, 2],
                                  self.alive.__contains__, self.clock, prefix=PREFIX,
                                  flush_interval=0.2, max_pending=100, load_wait=3.0)
        self.store.startService()
        self.addCleanup(self.store.stopService)

    def synced(self) -> None:
        self.redis.up()
        self.node.set_role(Role.SLAVE)
        self.clock.advance(0)
        self.assertEqual(self.store.status()["state"], "in-sync")

    def test_the_cold_start_claim_waits_for_the_load_at_most_load_wait(self) -> None:
        self.assertFalse(self.store.ready())
        self.node.set_role(Role.SLAVE)
        self.clock.advance(2.9)
        self.assertFalse(self.store.ready())
        self.assertFalse(self.store.loaded.is_set)  # the node's cold-start gate
        self.clock.advance(0.2)
        self.assertTrue(self.store.ready())
        self.assertTrue(self.store.loaded.is_set)
        load = self.store.status()["load"]
        self.assertEqual(load["state"], "failed")
        self.assertIn("no load within 3 s", load["error"])

    def test_a_load_read_after_discovery_is_applied_at_once(self) -> None:
        self.redis.answer = lambda args: ["0", "5:1:0:fs2"] if args == ("HGETALL",
                                                                       PREFIX + "slots") \
            else ScriptedRedis.default(args)
        self.node.set_role(Role.SLAVE)  # discovery over before Redis answered
        self.assertEqual(self.store.load_state, "waiting")
        self.redis.up()
        self.assertEqual(self.store.load_state, "applied")
        self.assertTrue(self.store.ready())
        self.assertTrue(self.store.loaded.is_set)
        self.assertEqual((self.node.known_epochs, self.node.last_holder), ({0: 5}, {0: 1}))

    def test_a_load_that_ends_after_load_wait_is_not_applied(self) -> None:
        hung: Deferred[Any] = Deferred()
        self.redis.answer = lambda args: hung if args == ("HGETALL", PREFIX + "slots") \
            else ScriptedRedis.default(args)
        self.redis.up()
        self.assertEqual(self.store.load_state, "loading")
        self.node.set_role(Role.SLAVE)  # discovery over: nothing read yet to apply
        self.assertEqual(self.store.load_state, "loading")
        self.clock.advance(3.1)
        self.assertEqual(self.store.load_state, "failed")
        hung.callback(["0", "5:1:0:fs2"])  # too late: the slot table is not seeded
        self.assertEqual(self.store.load_state, "failed")
        self.assertEqual(self.node.known_epochs, {})
        self.redis.up()  # Redis again: no second load
        self.assertEqual(self.store.load_state, "failed")

    def test_redis_down_nothing_queues_and_the_origin_is_dirty(self) -> None:
        self.node.set_role(Role.SLAVE)
        self.clock.advance(3.1)  # load given up: writing (would be) on
        for i in range(10_000):
            self.state.put(0, Kind.CALL, f"c{i}", call_value(f"c{i}"))
        st_ = self.store.status()
        self.assertEqual((st_["state"], st_["pending"]), ("dirty", 0))
        self.assertEqual(self.redis.commands, [])
        # Redis back: one full resync, chunked, with the position of the moment
        self.redis.up()
        self.clock.advance(0)
        hsets = [c for c in self.redis.commands if c[0] == "HSET"]
        self.assertEqual(sum((len(c) - 2) // 2 for c in hsets), 10_000)
        self.assertGreater(len(hsets), 1)
        finish = self.redis.commands[-1]
        self.assertIn("RENAME", finish[1])
        self.assertEqual(finish[6:8], ("7", "10000"))
        self.assertEqual(self.store.status()["state"], "in-sync")

    def test_changes_are_coalesced_into_one_write_per_interval(self) -> None:
        self.synced()
        self.state.put(0, Kind.CALL, "gone", call_value("gone"))
        self.clock.advance(0.2)
        before = len(self.redis.writes())
        for i in range(100):
            self.state.put(0, Kind.CALL, "busy", call_value(f"v{i}"))
        self.state.delete(0, Kind.CALL, "gone")
        self.assertEqual(len(self.redis.writes()), before)
        self.clock.advance(0.2)
        [write] = self.redis.writes()[before:]
        # KEYS, incarnation, sequence, then 1 delete and 1 put (the latest value)
        args = write[3:]
        self.assertEqual(args[2:4], ("7", "102"))
        self.assertEqual(args[6], "1")
        self.assertEqual(args[7], encode_field(0, Kind.CALL, "gone"))
        self.assertEqual(args[8:], (encode_field(0, Kind.CALL, "busy"),
                                    encode_value(0, call_value("v99"))))
        self.assertEqual(self.store.status()["lag_changes"], 0)

    def test_a_slow_redis_bounds_the_dirty_set(self) -> None:
        self.synced()
        hung: Deferred[Any] = Deferred()
        self.redis.answer = lambda args: hung if args[0] == "EVAL" else "OK"
        self.state.put(0, Kind.CALL, "first", call_value("first"))
        self.clock.advance(0.2)  # in flight, never answered
        for i in range(150):
            self.state.put(0, Kind.CALL, f"c{i}", call_value(f"c{i}"))
        st_ = self.store.status()
        self.assertEqual((st_["state"], st_["pending"], st_["overflows"]), ("dirty", 0, 1))
        self.assertLessEqual(len(self.store._dirty), 100)
        # the write times out: still a full resync due, done once Redis answers again
        self.redis.answer = ScriptedRedis.default
        hung.errback(RuntimeError("Redis 127.0.0.1:1: no answer within 0.5 s"))
        self.assertEqual(self.store.status()["write_errors"], 1)
        self.clock.advance(0.2)
        self.assertEqual(self.store.status()["state"], "in-sync")
        self.assertEqual(self.store.status()["resyncs"], 2)

    def test_an_incarnation_mismatch_in_redis_forces_a_resync(self) -> None:
        self.synced()
        self.redis.answer = lambda args: "resync" if args[0] == "EVAL" and \
            "'resync'" in args[1] else ScriptedRedis.default(args)
        self.state.put(0, Kind.CALL, "x", call_value("x"))
        self.clock.advance(0.2)
        self.assertEqual(self.store.status()["state"], "dirty")
        self.redis.answer = ScriptedRedis.default
        self.clock.advance(0.2)
        self.assertEqual(self.store.status()["state"], "in-sync")

    def test_loading_is_paged_and_skips_an_origin_that_changes(self) -> None:
        metas = {f"{PREFIX}origin:1:meta": [["incarnation", "3", "sequence", "5"],
                                            ["incarnation", "3", "sequence", "6"]],
                 f"{PREFIX}origin:2:meta": [["incarnation", "4", "sequence", "2"]] * 2}
        pages = {"0": ["17", [encode_field(0, Kind.CALL, "a"), b"0:A"]],
                 "17": ["0", [encode_field(0, Kind.CALL, "b"), b"0:B", "bad", "0:x"]]}

        def answer(args: tuple[Any, ...]) -> Any:
            if args[0] == "HGETALL" and args[1] in metas:
                return metas[args[1]].pop(0)
            if args[0] == "HSCAN":
                return pages[args[2]] if "origin:2" in args[1] else ["0", []]
            return ScriptedRedis.default(args)
        self.redis.answer = answer
        self.redis.up()
        self.assertEqual(self.store.load_state, "loaded")
        self.node.set_role(Role.SLAVE)
        load = self.store.status()["load"]
        self.assertEqual(load["skipped"], {"1": "changed while loading"})
        self.assertEqual((load["records"], load["rejected"]), (2, 1))
        self.assertEqual(sorted(r.value for r in self.state.records(origin=2)), [b"A", b"B"])
        self.assertIsNone(self.state.position(1))

    def test_an_origin_of_another_node_list_is_not_loaded(self) -> None:
        self.store.names = {0: "fs1", 1: "fs2", 2: "fs3"}
        metas = {f"{PREFIX}origin:1:meta": ["incarnation", "3", "sequence", "5", "node",
                                            "fs9"],
                 f"{PREFIX}slots": ["0", "4:1:0:fs9", "1", "2:2:0:fs3"]}
        self.redis.answer = lambda args: metas.get(args[1], []) if args[0] == "HGETALL" \
            else ["0", []] if args[0] == "HSCAN" else ScriptedRedis.default(args)
        self.redis.up()
        self.node.set_role(Role.SLAVE)
        load = self.store.status()["load"]
        self.assertEqual(load["skipped"], {"1": "written by fs9, not fs2"})
        self.assertEqual(load["slots"], {"1": {"epoch": 2, "master": 2}})

    def test_a_master_writes_its_slot(self) -> None:
        self.synced()
        self.node.set_role(Role.MASTER, CONFIG.slots[0], epoch=4)
        self.clock.advance(0)
        [hset] = [c for c in self.redis.commands if c[0] == "HSET" and c[1].endswith("slots")]
        self.assertEqual(hset[2], "0")
        self.assertTrue(hset[3].startswith("4:0:"))


@given(st.integers(0, 65535), st.sampled_from(list(Kind)), st.text(min_size=0, max_size=40),
       st.integers(0, 2**62), st.binary(max_size=64))
def test_field_and_value_round_trip(slot: int, kind: Kind, key: str, expires: int,
                                    value: bytes) -> None:
    assert decode_field(encode_field(slot, kind, key)) == (slot, kind, key)
    assert decode_value(encode_value(expires, value)) == (expires, value)


# ------------------------------------------------------------------------------------------
# against a real redis-server

class AheadClock:
    """The reactor, whose ``seconds()`` a test moves ahead: records expire when the test
    says so, not when a loaded machine gets round to the next step."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def seconds(self) -> float:
        return reactor.seconds() + self.ahead  # type: ignore[attr-defined]

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return reactor.callLater(delay, f, *args, **kw)  # type: ignore[attr-defined]

    def getDelayedCalls(self) -> Any:
        return reactor.getDelayedCalls()  # type: ignore[attr-defined]


class Side:
    """One node's state, store and Redis client (real reactor; the state and the store
    read the time from ``clock``)."""

    def __init__(self, server: RedisServer, node: int, incarnation: int,
                 alive: set[int] | None = None, max_pending: int = 5000,
                 clock: Any = reactor) -> None:
        self.state = ReplicatedState(clock, node, incarnation)
        self.node = FakeNode()
        self.redis = RedisClient(settings(server, timeout=0.5), reactor)
        self.alive = alive if alive is not None else set()
        self.store = DurableStore(self.redis, self.state, self.node, [0, 1, 2],
                                  self.alive.__contains__, clock, prefix=PREFIX,
                                  flush_interval=0.05, max_pending=max_pending,
                                  load_wait=5.0, names={0: "fs1", 1: "fs2", 2: "fs3"})

    def start(self) -> None:
        self.redis.start()
        self.store.startService()

    @inlineCallbacks
    def stop(self) -> Generator[Any, Any, None]:
        yield self.store.stopService()
        yield self.redis.stop()


def stored(server: RedisServer, origin: int) -> tuple[dict[str, str], dict[str, str]]:
    def pairs(flat: list[str] | None) -> dict[str, str]:
        flat = flat or []
        return dict(zip(flat[0::2], flat[1::2], strict=True))
    return (pairs(server.call("HGETALL", f"{PREFIX}origin:{origin}:meta")),
            pairs(server.call("HGETALL", f"{PREFIX}origin:{origin}:records")))


def registration(user: str, expires_s: int) -> tuple[str, bytes]:
    profile = CONFIG.slots[0].profiles[0]
    reg = RegistrationRow(
        f"cid-{user}", user, "example.com", "", f"<sip:{user}@198.18.0.9:5060>",
        "Registered(UDP)", "unknown", expires_s, "test", profile, "198.18.0.9", "5060", user,
        "example.com")
    return registration_key(profile, user, "example.com", reg.call_id), \
        encode_registration(reg)


class StoreRedisTests(unittest.TestCase):
    timeout = 60

    SHORT_TTL = 60.0  # the registration that expires: when the test moves the clock

    def setUp(self) -> None:
        self.server = start_redis(self)
        self.clock = AheadClock()

    def side(self, node: int, incarnation: int, **kw: Any) -> Side:
        s = Side(self.server, node, incarnation, clock=self.clock, **kw)
        s.start()
        self.addCleanup(s.stop)
        return s

    @inlineCallbacks
    def writer(self, calls: int = 50) -> Generator[Any, Any, Side]:
        """Node 0, master of slot 0 (epoch 3), with ``calls`` calls, 2 registrations (one
        expiring after SHORT_TTL, the other in an hour) and its identity, written to
        Redis."""
        a = self.side(0, 11)
        a.node.set_role(Role.SLAVE)
        a.node.set_role(Role.MASTER, CONFIG.slots[0], epoch=3)
        for i in range(calls):
            a.state.put(0, Kind.CALL, f"call-{i}", call_value(f"call-{i}"))
        now = self.clock.seconds()
        for user, ttl in (("1000", 3600), ("1001", self.SHORT_TTL)):
            key, value = registration(user, int(now + ttl))
            a.state.put(0, Kind.REGISTRATION, key, value, int((now + ttl) * 1000))
        a.state.put(0, Kind.IDENTITY, "identity", b'{"core_uuid":"runtime-0"}')
        yield poll_until(lambda: a.store.status()["state"] == "in-sync"
                       and a.store.status()["written"][1] == calls + 3, "node 0 written",
                       clock=reactor)
        return a

    @inlineCallbacks
    def test_records_written_coalesced_and_exact(self) -> Generator[Any, Any, None]:
        a = yield self.writer()
        for i in range(200):  # 200 changes of 10 keys
            a.state.put(0, Kind.CALL, f"call-{i % 10}", call_value(f"v{i}"))
        for i in range(40, 50):
            a.state.delete(0, Kind.CALL, f"call-{i}")
        pos = a.state.position(0)
        assert pos is not None
        yield poll_until(lambda: a.store.status()["written"] == [11, pos.sequence], "written",
                         clock=reactor)
        meta, records = stored(self.server, 0)
        self.assertEqual((meta["incarnation"], meta["sequence"], meta["node"]),
                         ("11", str(pos.sequence), "fs1"))
        want = {encode_field(r.slot, r.kind, r.key):
                encode_value(r.expires_ms, r.value).decode("utf-8", "surrogateescape")
                for r in a.state.records(origin=0)}
        self.assertEqual(records, want)
        self.assertEqual(len(records), 43)
        self.assertLess(a.store.status()["flushes"], 20, "changes were not coalesced")
        entry = self.server.call("HGET", f"{PREFIX}slots", "0").split(":")
        self.assertEqual((entry[:2], entry[3]), (["3", "0"], "fs1"))

    @inlineCallbacks
    def test_redis_down_bounded_then_full_resync(self) -> Generator[Any, Any, None]:
        a = yield self.writer(calls=10)
        self.server.kill()
        yield poll_until(lambda: a.redis.state == "down", "Redis down", clock=reactor)
        for i in range(3000):
            a.state.put(0, Kind.CALL, f"call-{i}", call_value(f"late-{i}"))
        status = a.store.status()
        self.assertEqual((status["state"], status["pending"]), ("dirty", 0))
        self.server.start()  # empty: it kept nothing
        yield poll_until(lambda: a.store.status()["state"] == "in-sync", "resynced",
                       timeout=20, clock=reactor)
        meta, records = stored(self.server, 0)
        pos = a.state.position(0)
        assert pos is not None
        self.assertEqual(meta["sequence"], str(pos.sequence))
        self.assertEqual(len(records), len(list(a.state.records(origin=0))))
        late = encode_value(0, call_value("late-2999"))
        self.assertEqual(records[encode_field(0, Kind.CALL, "call-2999")],
                         late.decode("utf-8", "surrogateescape"))
        self.assertGreaterEqual(a.store.status()["resyncs"], 2)

    @inlineCallbacks
    def test_a_restarted_cluster_loads_what_is_not_newer(self) -> Generator[Any, Any, None]:
        a = yield self.writer()
        yield a.stop()
        # node 2 (alive again) left an origin too: it must not be loaded
        self.server.call("HSET", f"{PREFIX}origin:2:meta", "incarnation", "5", "sequence",
                         "1", "written_ms", "0", "node", "fs3")
        self.server.call("HSET", f"{PREFIX}origin:2:records",
                         encode_field(1, Kind.CALL, "old"), "0:x")
        # the short registration expires (Redis still holds it: nothing changed since)
        self.clock.ahead += self.SHORT_TTL + 1
        yield poll_until(lambda: not any("/1001@" in r.key for r in a.state.records(
            origin=0, kind=Kind.REGISTRATION)), "a registration to expire", clock=reactor)
        self.assertEqual(len(stored(self.server, 0)[1]), 53)
        b = self.side(1, 20, alive={2})
        yield poll_until(lambda: b.store.load_state == "loaded", "loaded", clock=reactor)
        self.assertFalse(b.store.ready(), "waits until discovery is over")
        self.assertEqual(len(b.state), 0)
        b.node.set_role(Role.SLAVE)
        self.assertTrue(b.store.ready())
        load = b.store.status()["load"]
        self.assertEqual(load["skipped"], {"2": "alive"})
        self.assertEqual(load["origins"]["0"]["records"], 52)  # 50 calls, 1 reg, identity
        self.assertEqual(load["slots"], {"0": {"epoch": 3, "master": 0}})
        self.assertEqual((b.node.known_epochs, b.node.last_holder), ({0: 3}, {0: 0}))
        self.assertEqual(b.state.position(0), a.state.position(0))
        # a takeover reads the loaded rows exactly as replicated ones
        calls, regs = ReplicatedRecords(b.state).rows_for(CONFIG.slots[0], CONFIG.nodes[0])
        self.assertEqual(sorted(c.uuid for c in calls), sorted(f"call-{i}" for i in range(50)))
        self.assertEqual([r.sip_user for r in regs], ["1000"])
        # b writes its own origin; origin 0 stays as it was
        yield poll_until(lambda: b.store.status()["state"] == "in-sync", "b written", clock=reactor)
        self.assertEqual(stored(self.server, 0)[0]["incarnation"], "11")
        self.assertEqual(stored(self.server, 1)[0]["incarnation"], "20")

    @inlineCallbacks
    def test_newer_replicated_data_is_never_overridden(self) -> Generator[Any, Any, None]:
        a = yield self.writer(calls=5)
        yield a.stop()
        # c already got origin 0 by replication, further than Redis has it
        c = self.side(2, 30)
        for change in a.state.catch_up(0, None) or []:
            c.state.apply(change)
        c.state.apply(a.state.put(0, Kind.CALL, "newer", call_value("newer")))
        before = c.state.digest()
        yield poll_until(lambda: c.store.load_state == "loaded", "loaded", clock=reactor)
        c.node.known_epochs[0] = 4  # heard from the cluster: newer than the stored epoch 3
        c.node.last_holder[0] = 1
        c.node.set_role(Role.SLAVE)
        self.assertEqual(c.store.status()["load"]["skipped"], {"0": "newer here"})
        self.assertEqual(c.state.digest(), before)
        self.assertEqual((c.node.known_epochs, c.node.last_holder), ({0: 4}, {0: 1}))

    @inlineCallbacks
    def test_redis_down_at_start_blocks_nothing(self) -> Generator[Any, Any, None]:
        self.server.kill()
        d = Side(self.server, 1, 40)
        d.store.load_wait = 0.3
        d.start()
        self.addCleanup(d.stop)
        d.node.set_role(Role.SLAVE)
        yield poll_until(d.store.ready, "the load given up", clock=reactor)
        self.assertEqual(d.store.status()["load"]["state"], "failed")
        d.state.put(0, Kind.CALL, "x", call_value("x"))
        self.assertEqual(d.store.status()["state"], "dirty")
        self.server.start()
        yield poll_until(lambda: d.store.status()["state"] == "in-sync", "written when back",
                       timeout=20, clock=reactor)
        self.assertEqual(stored(self.server, 1)[0]["sequence"], "1")


class StatusLineTests(unittest.SynchronousTestCase):
    def test_the_fsha_status_line(self) -> None:
        from fsha.status import durable_line

        load = {"state": "applied", "records": 52, "origins": {"0": {}},
                "slots": {"0": {"epoch": 3, "master": 0}}}
        self.assertEqual(durable_line({"state": "in-sync", "written": [7, 12], "load": load}),
                         "durable state: in sync (sequence 12); loaded 52 record(s) of 1 "
                         "origin(s), slot 0 from node 0")
        line = durable_line({"state": "dirty", "dirty_since": None, "last_error": "down",
                             "load": {"state": "failed", "error": "no load within 3 s"}})
        self.assertEqual(line, "durable state: dirty since ? (down): full resync due; "
                               "nothing loaded (no load within 3 s)")
        self.assertIn("behind by 4 change(s)", durable_line(
            {"state": "behind", "lag_changes": 4, "load": {"state": "loading"}}))
