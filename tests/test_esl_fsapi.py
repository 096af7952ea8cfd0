"""Typed events and parsed API outputs (fsha.fsapi), outputs as in the facts sheet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from fsha.fsapi import (
    ChannelEvent,
    ChannelEventKind,
    EventRouter,
    FSApi,
    FSApiError,
    HeartbeatEvent,
    ProfileNotFound,
    ProfileTooYoung,
    RegistrationEvent,
    RegistrationKind,
    parse_event,
    parse_status,
)
from fsha.wire.esl import Event, Headers, decode_event_plain, encode_event_plain

STATUS = (
    "UP 0 years, 2 days, 3 hours, 4 minutes, 5 seconds, 6 milliseconds, 7 microseconds\n"
    "FreeSWITCH (Version 1.10.12-release git a88d069 2024-08-02 21:02:27Z 64bit) is ready\n"
    "12 session(s) since startup\n"
    "3 session(s) - peak 9, last 5min 4 \n"
    "0 session(s) per Sec out of max 30, peak 2, last 5min 1 \n"
    "1000 session(s) max\n"
    "min idle cpu 0.00/97.53\n"
    "Current Stack Size/Max 240K/8192K\n"
)


def ev(pairs: list[tuple[str, str]], body: bytes = b"") -> Event:
    return decode_event_plain(encode_event_plain(pairs, body))


class FakeRunner:
    def __init__(self, outputs: dict[str, str]) -> None:
        self.outputs = outputs
        self.calls: list[str] = []

    def api(self, command: str, timeout: float | None = None) -> Deferred[str]:
        self.calls.append(command)
        return succeed(self.outputs[command])

    def bgapi(
        self, command: str, timeout: float | None = None, job_uuid: str | None = None
    ) -> Deferred[str]:
        raise AssertionError("not used")


ApiCall = Callable[[FSApi], "Deferred[Any]"]


class ParseTests(SynchronousTestCase):
    def test_status(self) -> None:
        s = parse_status("status", STATUS)
        self.assertTrue(s.up)
        self.assertTrue(s.ready)
        self.assertEqual(s.version, "1.10.12-release git a88d069 2024-08-02 21:02:27Z 64bit")
        self.assertAlmostEqual(s.uptime_seconds or 0, 2 * 86400 + 3 * 3600 + 4 * 60 + 5.006007)
        self.assertEqual((s.sessions, s.sessions_since_startup, s.max_sessions), (3, 12, 1000))

    def test_status_not_ready_and_garbage(self) -> None:
        s = parse_status("status", STATUS.replace("is ready", "is not ready"))
        self.assertFalse(s.ready)
        with self.assertRaises(FSApiError):
            parse_status("status", "-ERR no reply\n")
        with self.assertRaises(FSApiError):
            parse_status("status", "hello\n")


class ApiTests(SynchronousTestCase):
    def call(self, outputs: dict[str, str], fn: ApiCall) -> Deferred[object]:
        runner = FakeRunner(outputs)
        d = fn(FSApi(runner))
        self.assertEqual(runner.calls, list(outputs))
        return d

    def ok(self, outputs: dict[str, str], fn: ApiCall) -> Any:
        return self.successResultOf(self.call(outputs, fn))

    def err(self, outputs: dict[str, str], fn: ApiCall, kind: type[Exception]) -> Any:
        return self.failureResultOf(self.call(outputs, fn), kind).value

    def test_core_uuid_and_getvar(self) -> None:
        u = "0f6d1e2a-9b3c-4d5e-8f70-1a2b3c4d5e6f"
        self.assertEqual(self.ok({"global_getvar core_uuid": u}, lambda a: a.core_uuid()), u)
        self.err({"global_getvar core_uuid": "-ERR no reply\n"}, lambda a: a.core_uuid(),
                 FSApiError)
        self.assertIsNone(self.ok({"global_getvar nope": "-ERR no reply\n"},
                                  lambda a: a.global_getvar("nope")))
        with self.assertRaises(ValueError):
            FSApi(FakeRunner({})).global_getvar("a b")

    def test_profile_start_stop_restart(self) -> None:
        self.assertIn("started", self.ok(
            {"sofia profile slot1 start": "Reload XML [Success]\nslot1 started successfully\n"},
            lambda a: a.sofia_profile("slot1", "start")))
        self.ok({"sofia profile slot1 stop": "stopping: slot1"},
                lambda a: a.sofia_profile("slot1", "stop"))
        self.ok({"sofia profile slot1 restart": "restarting: slot1"},
                lambda a: a.sofia_profile("slot1", "restart"))
        e = self.err({"sofia profile nope start": "Invalid Profile [nope]"},
                     lambda a: a.sofia_profile("nope", "start"), ProfileNotFound)
        self.assertEqual(e.output, "Invalid Profile [nope]")
        self.err({"sofia profile slot1 restart":
                  "Profile slot1 must be up for at least 10 seconds to stop/restart.\n"
                  "Please wait 7 seconds\n"},
                 lambda a: a.sofia_profile("slot1", "restart"), ProfileTooYoung)
        self.err({"sofia profile slot1 start": "Failure starting slot1\n"},
                 lambda a: a.sofia_profile("slot1", "start"), FSApiError)

    def test_recover(self) -> None:
        self.assertEqual(self.ok({"sofia profile slot1 recover": "Recovered 12 session(s)\n"},
                                 lambda a: a.sofia_profile_recover("slot1")), 12)
        self.assertEqual(self.ok({"sofia profile slot1 recover": "No sessions to recover.\n"},
                                 lambda a: a.sofia_profile_recover("slot1")), 0)
        self.err({"sofia profile x recover": "Invalid Profile [x]"},
                 lambda a: a.sofia_profile_recover("x"), ProfileNotFound)
        self.assertEqual(self.ok({"sofia recover": "Recovered 3 call(s)\n"},
                                 lambda a: a.sofia_recover()), 3)
        self.assertEqual(self.ok({"sofia recover": "No calls to recover.\n"},
                                 lambda a: a.sofia_recover()), 0)
        self.assertEqual(self.ok({"fsctl recover": "+OK 5 session(s) recovered in total\n"},
                                 lambda a: a.fsctl_recover()), 5)
        self.err({"fsctl recover": "-ERR no reply\n"}, lambda a: a.fsctl_recover(), FSApiError)

    def test_standby(self) -> None:
        self.ok({"sofia global standby on": "+OK\n"}, lambda a: a.sofia_global_standby(True))
        self.err({"sofia global standby off": "-ERR nope\n"},
                 lambda a: a.sofia_global_standby(False), FSApiError)

    def test_hash(self) -> None:
        self.ok({"hash insert/limit/k1/5": "+OK\n"}, lambda a: a.hash_insert("limit", "k1", "5"))
        self.assertEqual(self.ok({"hash select/limit/k1": "5"},
                                 lambda a: a.hash_select("limit", "k1")), "5")
        self.assertIsNone(self.ok({"hash select/limit/k2": "-ERR no reply\n"},
                                  lambda a: a.hash_select("limit", "k2")))
        self.assertTrue(self.ok({"hash delete/limit/k1": "+OK\n"},
                                lambda a: a.hash_delete("limit", "k1")))
        self.assertFalse(self.ok({"hash delete/limit/k1": "-ERR Not found\n"},
                                 lambda a: a.hash_delete("limit", "k1")))
        with self.assertRaises(ValueError):
            FSApi(FakeRunner({})).hash_insert("a/b", "k", "v")

    def test_reloadxml_uuid_exists(self) -> None:
        self.ok({"reloadxml": "+OK [Success]\n"}, lambda a: a.reloadxml())
        self.assertTrue(self.ok({"uuid_exists U1": "true"}, lambda a: a.uuid_exists("U1")))
        self.assertFalse(self.ok({"uuid_exists U1": "false"}, lambda a: a.uuid_exists("U1")))
        self.err({"uuid_exists U1": "-ERR x"}, lambda a: a.uuid_exists("U1"), FSApiError)


class EventTests(SynchronousTestCase):
    def test_channel_events(self) -> None:
        e = parse_event(ev([
            ("Event-Name", "CHANNEL_BRIDGE"), ("Core-UUID", "C"), ("Unique-ID", "A"),
            ("Call-Direction", "inbound"), ("Channel-Name", "sofia/slot1/1000@198.18.0.11"),
            ("Caller-Caller-ID-Number", "1000"), ("Caller-Destination-Number", "2000"),
            ("Other-Leg-Unique-ID", "B"), ("variable_sofia_profile_name", "slot1"),
            ("Event-Date-Timestamp", "1714557600123456"),
        ]))
        assert isinstance(e, ChannelEvent)
        self.assertEqual((e.kind, e.uuid, e.other_leg_uuid, e.profile, e.timestamp_us),
                         (ChannelEventKind.BRIDGE, "A", "B", "slot1", 1714557600123456))
        h = parse_event(ev([("Event-Name", "CHANNEL_HANGUP_COMPLETE"), ("Unique-ID", "A"),
                            ("Hangup-Cause", "NORMAL_CLEARING"),
                            ("Hangup-Cause", "NORMAL_CLEARING")]))
        assert isinstance(h, ChannelEvent)
        self.assertEqual((h.kind, h.hangup_cause), (ChannelEventKind.HANGUP_COMPLETE,
                                                    "NORMAL_CLEARING"))
        self.assertIsNone(parse_event(ev([("Event-Name", "CHANNEL_CREATE")])))
        self.assertIsNone(parse_event(ev([("Event-Name", "RE_SCHEDULE")])))

    def test_registration_events(self) -> None:
        r = parse_event(ev([
            ("Event-Subclass", "sofia::register"), ("Event-Name", "CUSTOM"),
            ("profile-name", "slot1"), ("from-user", "1000"), ("from-host", "example.net"),
            ("contact", '"A" <sip:1000@198.18.0.50:5060>'), ("call-id", "abc@h"),
            ("expires", "3600"), ("network-ip", "198.18.0.50"), ("network-port", "5060"),
            ("user-agent", "Yealink"), ("update-reg", "true"),
        ]))
        assert isinstance(r, RegistrationEvent)
        self.assertEqual((r.kind, r.profile, r.user, r.host, r.expires, r.network_port,
                          r.refresh),
                         (RegistrationKind.REGISTER, "slot1", "1000", "example.net", 3600,
                          5060, True))
        x = parse_event(ev([("Event-Subclass", "sofia::expire"), ("Event-Name", "CUSTOM"),
                            ("profile-name", "slot1"), ("user", "1000"), ("host", "h")]))
        assert isinstance(x, RegistrationEvent)
        self.assertEqual((x.kind, x.user, x.host, x.refresh),
                         (RegistrationKind.EXPIRE, "1000", "h", False))
        self.assertIsNone(parse_event(ev([("Event-Subclass", "other::x"),
                                          ("Event-Name", "CUSTOM")])))

    def test_heartbeat(self) -> None:
        hb = parse_event(ev([("Event-Name", "HEARTBEAT"), ("Core-UUID", "C"),
                             ("Uptime-msec", "20000"), ("Session-Count", "2"),
                             ("Max-Sessions", "1000"), ("Idle-CPU", "97.5")]))
        assert isinstance(hb, HeartbeatEvent)
        self.assertEqual((hb.core_uuid, hb.uptime_msec, hb.session_count, hb.max_sessions,
                          hb.idle_cpu), ("C", 20000, 2, 1000, 97.5))

    def test_router(self) -> None:
        listeners: dict[str | None, list[Callable[[Event], object]]] = {}
        subscribed: list[str] = []

        class Source:
            def add_event_listener(self, cb: Callable[[Event], object],
                                   name: str | None = None) -> None:
                listeners.setdefault(name, []).append(cb)

            def subscribe(self, *names: str) -> Deferred[None]:
                subscribed.extend(names)
                return succeed(None)

        chans: list[ChannelEvent] = []
        regs: list[RegistrationEvent] = []
        EventRouter(Source(), on_channel=chans.append, on_registration=regs.append)
        self.assertIn("CHANNEL_ANSWER", subscribed)
        self.assertIn("sofia::unregister", subscribed)
        self.assertNotIn("HEARTBEAT", subscribed)
        for cb in listeners["CHANNEL_ANSWER"]:
            cb(Event(Headers([("Event-Name", "CHANNEL_ANSWER"), ("Unique-ID", "A")])))
        for cb in listeners["sofia::unregister"]:
            cb(Event(Headers([("Event-Subclass", "sofia::unregister"), ("Event-Name", "CUSTOM"),
                              ("from-user", "1000")])))
        self.assertEqual([c.kind for c in chans], [ChannelEventKind.ANSWER])
        self.assertEqual([r.user for r in regs], ["1000"])
