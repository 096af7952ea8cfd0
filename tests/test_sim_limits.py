"""The simulator's ``limit`` app: the hash backend (in process) and the hiredis backend
against a real redis-server (tests/redisserver.py)."""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from fsha.sim.cdr import parse_cdr
from fsha.sim.control import ControlResource
from fsha.sim.coredb import CoreDB
from fsha.sim.events import SimEvent
from fsha.sim.limits import HiredisBackend, LimitError, LimitSpec, RedisTarget
from fsha.sim.switch import ProfileConfig, SimError, Switch
from tests.redisserver import start_redis

T0 = 1_700_000_000.0


def make_switch(
    name: str = "fs1", clock: Any = None, hiredis: HiredisBackend | None = None
) -> tuple[Switch, list[SimEvent]]:
    if clock is None:
        clock = Clock()
        clock.advance(T0)
    sw = Switch(clock, CoreDB(":memory:"), name=name,
                profiles=[ProfileConfig("internal", "127.0.1.1", 5060)],
                heartbeat_interval=0, reg_check_interval=0, hiredis=hiredis)
    events: list[SimEvent] = []
    sw.add_listener(events.append)
    sw.start()
    return sw, events


def spec(text: str) -> LimitSpec:
    return LimitSpec.parse(text)


def named(events: list[SimEvent], name: str) -> list[SimEvent]:
    return [e for e in events if e.name == name]


class LimitSpecTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(spec("hash r x"), LimitSpec("hash", "r", "x", -1, 0))
        self.assertEqual(spec("hash r x -"), LimitSpec("hash", "r", "x", -1, 0))
        self.assertEqual(spec("hiredis p x 5/60"), LimitSpec("hiredis", "p", "x", 5, 60))
        self.assertEqual(spec("hash r x 0"), LimitSpec("hash", "r", "x", 0, 0))
        for bad in ("", "hash r", "db r x 5", "hash r x five", "hash r x 5/", "hash r x 1 2"):
            self.assertRaises(LimitError, LimitSpec.parse, bad)

    def test_from_obj(self) -> None:
        self.assertEqual(LimitSpec.from_obj({"backend": "hash", "realm": "r", "resource": "x",
                                             "max": 3}), LimitSpec("hash", "r", "x", 3))
        self.assertEqual(LimitSpec.from_obj("hash r x 3"), LimitSpec("hash", "r", "x", 3))
        for bad in ({"backend": "hash", "realm": "r"}, {"backend": "hash", "realm": "r",
                    "resource": "x", "oops": 1}, {"backend": "hash", "realm": "r",
                    "resource": "x", "max": True}, {"backend": "hash", "realm": "a b",
                    "resource": "x"}, 5):
            self.assertRaises(LimitError, LimitSpec.from_obj, bad)

    def test_redis_target(self) -> None:
        t = RedisTarget.parse("127.0.0.1:6390:se:cret")
        self.assertEqual((t.host, t.port, t.password), ("127.0.0.1", 6390, "se:cret"))
        self.assertNotIn("se:cret", json.dumps(t.public()))
        for bad in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:x", ":80"):
            self.assertRaises(LimitError, RedisTarget.parse, bad)


class HashLimitTests(SynchronousTestCase):
    def test_incr_variables_event_and_refusal(self) -> None:
        sw, events = make_switch()
        lim = [spec("hash gw out 2")]
        (a,) = sw.place_call("internal", limits=lim)
        v = sw.channels[a].variables
        self.assertEqual(
            {k: v[k] for k in ("limit_backend", "limit_usage", "limit_usage_gw_out",
                               "limit_rate", "limit_rate_gw_out")},
            {"limit_backend": "hash", "limit_usage": "1", "limit_usage_gw_out": "1",
             "limit_rate": "0", "limit_rate_gw_out": "0"},
        )
        # the recovery row (what fsha replicates) carries them
        (row,) = sw.db.recovery_rows()
        self.assertEqual(parse_cdr(row.metadata).variables["limit_usage_gw_out"], "1")
        (ev,) = [e for e in named(events, "CUSTOM") if e.get("Event-Subclass") == "limit::usage"]
        for k, want in (("backend", "hash"), ("realm", "gw"), ("key", "out"), ("usage", "1"),
                        ("rate", "0"), ("max", "2"), ("ratemax", "2")):
            self.assertEqual(ev.get(k), want)
        a2, b2 = sw.place_call("internal", limits=lim, bridge=True)
        self.assertEqual(sw.channels[a2].variables["limit_usage"], "2")
        self.assertNotIn("limit_usage", sw.channels[b2].variables)  # only the A leg ran it
        del events[:]
        self.assertEqual(sw.place_call("internal", limits=lim), [])  # over max: refused
        self.assertEqual(len(sw.channels), 3)
        (hup,) = named(events, "CHANNEL_HANGUP")
        self.assertEqual(hup.get("Hangup-Cause"), "CALL_REJECTED")
        self.assertIsNone(hup.get("variable_limit_usage"))  # refused: no variables set
        self.assertEqual(named(events, "CUSTOM"), [])
        self.assertEqual(sw.api("hash_dump limit").body, "L/gw_out/2/0/0/0\n")
        self.assertEqual(sw.api("limit_usage hash gw out").body, "2")
        self.assertEqual(sw.api("limit_usage hash gw out rate").body, "2/0")
        self.assertEqual(sw.limits.refused, 1)

    def test_release_at_hangup(self) -> None:
        sw, events = make_switch()
        lim = [spec("hash gw out 5"), spec("hash gw all")]
        calls = [sw.place_call("internal", limits=lim)[0] for _ in range(3)]
        self.assertEqual(sw.api("hash_dump limit").body, "L/gw_out/3/0/0/0\nL/gw_all/3/0/0/0\n")
        del events[:]
        sw.hangup(calls[0])
        self.assertEqual(sw.api("limit_usage hash gw out").body, "2")
        # switch_limit.c unsets limit_backend after releasing: HANGUP has it, COMPLETE not
        self.assertEqual(named(events, "CHANNEL_HANGUP")[0].get("variable_limit_backend"), "hash")
        self.assertIsNone(named(events, "CHANNEL_HANGUP_COMPLETE")[0].get("variable_limit_backend"))
        for u in calls[1:]:
            sw.hangup(u)
        self.assertEqual(sw.api("hash_dump limit").output, "")  # items deleted at 0/0
        self.assertEqual(sw.api("limit_usage hash gw out").body, "0")
        self.assertEqual(sw.limits.table()["calls"], {})

    def test_same_key_twice_counts_once(self) -> None:
        sw, _ = make_switch()
        (a,) = sw.place_call("internal", limits=[spec("hash gw out 1"), spec("hash gw out 1")])
        self.assertEqual(sw.api("limit_usage hash gw out").body, "1")
        sw.hangup(a)
        self.assertEqual(sw.api("hash_dump limit").output, "")

    def test_refused_first_incr_leaves_empty_item(self) -> None:
        sw, _ = make_switch()
        self.assertEqual(sw.place_call("internal", limits=[spec("hash gw none 0")]), [])
        self.assertEqual(sw.api("hash_dump limit").body, "L/gw_none/0/0/0/0\n")

    def test_rate_limit(self) -> None:
        clock = Clock()
        clock.advance(T0)
        sw, _ = make_switch(clock=clock)
        lim = [spec("hash gw cps 2/10")]
        self.assertEqual(len(sw.place_call("internal", limits=lim)), 1)
        self.assertEqual(len(sw.place_call("internal", limits=lim)), 1)
        self.assertEqual(sw.place_call("internal", limits=lim), [])
        t0 = int(T0)
        self.assertEqual(sw.api("hash_dump limit").body, f"L/gw_cps/2/3/10/{t0}\n")
        clock.advance(10)
        (u,) = sw.place_call("internal", limits=lim)
        self.assertEqual(sw.channels[u].variables["limit_rate_gw_cps"], "1")
        self.assertEqual(sw.api("hash_dump limit").body, f"L/gw_cps/3/1/10/{t0 + 10}\n")

    def test_recovered_call_releases_nothing(self) -> None:
        dead, _ = make_switch("fs1")
        for _ in range(2):
            dead.place_call("internal", limits=[spec("hash gw out 10")], bridge=True)
        live, _ = make_switch("fs2")
        for r in dead.db.recovery_rows():
            live.db.track(r.runtime_uuid, r.profile_name, r.hostname, r.uuid, r.metadata)
        self.assertEqual(live.api("sofia profile internal recover").body,
                         "Recovered 4 session(s)\n")
        a_legs = [c for c in live.channels.values() if c.direction == "inbound"]
        self.assertEqual(len(a_legs), 2)
        for c in a_legs:  # the variables came with the call...
            self.assertEqual(c.variables["limit_backend"], "hash")
        self.assertEqual(live.api("hash_dump limit").output, "")  # ...not the counters
        for c in a_legs:
            live.hangup(c.uuid)
        self.assertEqual(live.channels, {})
        self.assertEqual(live.api("hash_dump limit").output, "")
        self.assertEqual(dead.api("limit_usage hash gw out").body, "2")

    def test_api_texts(self) -> None:
        sw, _ = make_switch()
        self.assertEqual(sw.api("limit_usage").body, "USAGE: limit_usage <backend> <realm> <id>\n")
        self.assertEqual(sw.api("limit_usage hash gw").body,
                         "USAGE: limit_usage <backend> <realm> <id>\n")
        self.assertEqual(sw.api("limit_usage nosuch gw out").body, "0")
        self.assertEqual(sw.api("limit_usage hiredis p out").body, "-1")  # no hiredis
        self.assertEqual(sw.api("hash_dump").body, "Usage: all|limit|db [<realm>]\n")
        self.assertEqual(sw.api("hash_dump bogus").body, "Usage: all|limit|db [<realm>]\n")
        self.assertEqual(sw.api("hash_dump limit").body, "-ERR no reply\n")  # empty body
        sw.api("hash insert/fsha_limit/gw_out/7")
        sw.api("hash insert/other/k/v")
        sw.place_call("internal", limits=[spec("hash gw out")])
        self.assertEqual(sw.api("hash_dump all").body,
                         "L/gw_out/1/0/0/0\nD/fsha_limit_gw_out/7\nD/other_k/v\n")
        self.assertEqual(sw.api("hash_dump db fsha_limit").body, "D/fsha_limit_gw_out/7\n")

    def test_hiredis_without_redis_is_refused(self) -> None:
        sw, _ = make_switch()
        self.assertRaises(SimError, sw.place_call, "internal", limits=[spec("hiredis p x 1")])
        out = self.successResultOf(sw.place_call_async("internal", limits=[spec("hiredis p x 1")]))
        self.assertTrue(out.refused)
        self.assertEqual(sw.channels, {})

    def test_originate_execute_on_answer(self) -> None:
        sw, events = make_switch()
        cmd = ("originate {execute_on_answer='limit hash gw out 1 !USER_BUSY',"
               "origination_caller_id_number=1000}sofia/internal/2000@127.0.0.1 &park()")
        r1 = sw.api(cmd).body
        self.assertTrue(r1.startswith("+OK "), r1)
        u1 = r1.split()[1]
        self.assertEqual(sw.channels[u1].variables["limit_usage_gw_out"], "1")
        (row,) = sw.db.recovery_rows()
        self.assertEqual(parse_cdr(row.metadata).variables["limit_backend"], "hash")
        del events[:]
        u2 = sw.api(cmd).body.split()[1]
        self.assertNotIn(u2, sw.channels)
        self.assertEqual(named(events, "CHANNEL_HANGUP")[0].get("Hangup-Cause"), "USER_BUSY")
        self.assertEqual(sw.api("limit_usage hash gw out").body, "1")


class ControlLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.switch, _ = make_switch()
        self.resource = ControlResource(self.switch, None, crash=lambda: None)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        req = DummyRequest([p.encode() for p in path.strip("/").split("/")])
        req.method = method.encode()
        req.content = io.BytesIO(json.dumps(body).encode() if body is not None else b"")
        out = self.resource.render(req)
        if not isinstance(out, bytes):  # NOT_DONE_YET: answered by request.write
            self.assertTrue(req.finished)
            out = b"".join(req.written)
        return req.responseCode or 200, json.loads(out)

    def test_calls_with_limits_and_table(self) -> None:
        code, res = self.call("POST", "/calls", {
            "profile": "internal", "count": 3,
            "limits": ["hash gw out 2", {"backend": "hash", "realm": "gw", "resource": "all"}],
        })  # fmt: skip
        self.assertEqual(code, 200)
        self.assertEqual((len(res["uuids"]), res["refused"], len(res["refused_uuids"])), (2, 1, 1))
        code, table = self.call("GET", "/limits")
        self.assertEqual(code, 200)
        self.assertEqual(
            table["hash"],
            [{"key": "gw_out", "usage": 2, "rate": 0, "interval": 0, "last_check": 0},
             {"key": "gw_all", "usage": 2, "rate": 0, "interval": 0, "last_check": 0}],
        )
        self.assertEqual(sorted(table["calls"]), sorted(res["uuids"]))
        self.assertEqual((table["refused"], table["hiredis"]), (1, None))
        code, out = self.call("POST", "/api", {"command": "hash_dump limit"})
        self.assertEqual(out["output"], "L/gw_out/2/0/0/0\nL/gw_all/2/0/0/0\n")

    def test_bad_limits(self) -> None:
        for bad in ([], "hash gw out", ["hash gw"], [{"backend": "x", "realm": "r",
                                                      "resource": "s"}]):
            code, res = self.call("POST", "/calls", {"profile": "internal", "limits": bad})
            self.assertEqual(code, 400, bad)
            self.assertIn("error", res)
        self.assertEqual(self.switch.channels, {})


class HiredisLimitTests(TestCase):
    """Against a real redis-server; the switch runs on the real reactor."""

    timeout = 60

    def setUp(self) -> None:
        self.redis = start_redis(self, password="s3cret")
        self.backend = HiredisBackend(
            reactor, RedisTarget("127.0.0.1", self.redis.port, "s3cret"), timeout=1.0
        )
        self.addCleanup(self.backend.close)
        self.sw, self.events = make_switch(clock=reactor, hiredis=self.backend)
        self.addCleanup(self.sw.stop)

    async def test_incr_over_max_release_and_usage(self) -> None:
        sw, r = self.sw, self.redis
        lim = [spec("hiredis default trunk 2")]
        ok1 = await sw.place_call_async("internal", limits=lim)
        ok2 = await sw.place_call_async("internal", limits=lim, bridge=True)
        self.assertFalse(ok1.refused or ok2.refused)
        v = sw.channels[ok1.uuids[0]].variables
        self.assertEqual((v["limit_backend"], v["hiredis_raw_response"]), ("hiredis", "1"))
        self.assertEqual(sw.channels[ok2.uuids[0]].variables["hiredis_raw_response"], "2")
        self.assertEqual(r.call("GET", "trunk"), "2")  # key = resource, realm is the profile
        self.assertEqual(r.call("TTL", "trunk"), -1)  # concurrency keys have no TTL
        del self.events[:]
        no = await sw.place_call_async("internal", limits=lim, exceeded_cause="USER_BUSY")
        self.assertTrue(no.refused)
        (hup,) = named(self.events, "CHANNEL_HANGUP")
        self.assertEqual(hup.get("Hangup-Cause"), "USER_BUSY")
        self.assertEqual(hup.get("variable_hiredis_limit_exceeded"), "true")
        self.assertEqual(hup.get("variable_hiredis_raw_response"), "3")
        await sw.limits.settle()
        self.assertEqual(r.call("GET", "trunk"), "2")  # the over-max INCR was undone
        self.assertEqual(await sw.api("limit_usage hiredis default trunk").pending, "2")
        sw.hangup(ok2.uuids[0])  # the bridged pair: one release (the A leg's)
        await sw.limits.settle()
        self.assertEqual(r.call("GET", "trunk"), "1")
        sw.hangup(ok1.uuids[0])
        await sw.limits.settle()
        self.assertEqual(r.call("GET", "trunk"), "0")
        self.assertEqual(sw.limits.table()["hiredis"],
                         {"host": "127.0.0.1", "port": r.port, "auth": True, "errors": 0})

    async def test_rate_limit_key_and_expiry(self) -> None:
        sw, r = self.sw, self.redis
        out = await sw.place_call_async("internal", limits=[spec("hiredis default cps 5/60")])
        self.assertFalse(out.refused)
        await sw.limits.settle()
        keys = r.call("KEYS", "cps_*")
        self.assertEqual(len(keys), 1)
        bucket = int(keys[0].rpartition("_")[2])
        self.assertLessEqual(abs(bucket - int(reactor.seconds()) // 60), 1)
        self.assertGreater(r.call("TTL", keys[0]), 0)
        sw.hangup(out.uuids[0])
        await sw.limits.settle()
        self.assertEqual(r.call("GET", keys[0]), "1")  # rate keys are not released

    async def test_recovered_call_releases_nothing(self) -> None:
        dead, r = self.sw, self.redis
        for _ in range(3):
            await dead.place_call_async("internal", limits=[spec("hiredis default trunk")])
        self.assertEqual(r.call("GET", "trunk"), "3")
        live, _ = make_switch("fs2", clock=reactor, hiredis=self.backend)
        self.addCleanup(live.stop)
        for row in dead.db.recovery_rows():
            live.db.track(row.runtime_uuid, row.profile_name, row.hostname, row.uuid,
                          row.metadata)
        self.assertEqual(live.api("sofia profile internal recover").body,
                         "Recovered 3 session(s)\n")
        for uuid in list(live.channels):
            self.assertEqual(live.channels[uuid].variables["hiredis_raw_response"][:0], "")
            live.hangup(uuid)
        await live.limits.settle()
        self.assertEqual(r.call("GET", "trunk"), "3")  # nothing released: it leaks

    async def test_redis_down_refuses(self) -> None:
        sw, r = self.sw, self.redis
        r.kill()
        out = await sw.place_call_async("internal", limits=[spec("hiredis default trunk 5")])
        self.assertTrue(out.refused)
        self.assertEqual(sw.channels, {})
        self.assertGreater(self.backend.errors, 0)
        self.assertEqual(await sw.api("limit_usage hiredis default trunk").pending, "-1")
        r.start()  # back (empty): the connection recovers
        ok = None
        for _ in range(50):  # bounded: reconnect backoff
            ok = await sw.place_call_async("internal", limits=[spec("hiredis default trunk 5")])
            if not ok.refused:
                break
        assert ok is not None
        self.assertFalse(ok.refused)
        self.assertEqual(r.call("GET", "trunk"), "1")
