"""Tests for fsha.replication.feeds and its parts: what a master replicates from its FreeSWITCH.

Unit tests drive :class:`Feeds` with a fake ESL event source, a fake clock and a real
SQLite core DB file in FreeSWITCH's schema (written by the test, read by the feeds through
the real read-only :class:`CoreDBReader`, with queries run inline). One end-to-end test
runs a real simulator process, a real :class:`ESLClient` and the feeds' real worker thread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sqlite3
import subprocess
import sys
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fsha.config import ClusterConfig, NodeConfig
from fsha.eslclient import ConnectionState, ESLClient
from fsha.fsdb import (
    MAX_METADATA_BYTES,
    CallRow,
    CallSummary,
    CoreDBReader,
    RecordValueError,
    RegistrationRow,
    decode_call_row,
    decode_registration,
    encode_call_row,
    encode_registration,
    encode_registration_v1,
    inline_runner,
    registration_key,
)
from fsha.harness import poll_until
from fsha.replication.callfeed import ACK_WAIT, RETRY_DELAYS
from fsha.replication.feeds import Feeds
from fsha.replication.identity import (
    IDENTITY_KEY,
    Identity,
    decode_identity,
    encode_identity,
)
from fsha.replication.state import ReplicatedState
from fsha.sim.coredb import CoreDB
from fsha.wire.esl import Event, Headers
from fsha.wire.stream import Change, Kind, Op

from .fakecluster import make_config

NOW = 1_700_000_000.0
NOW_S = int(NOW)
CORE = "11111111-2222-3333-4444-555555555555"
STATUS = ("UP 0 years, 0 days, 0 hours, 1 minute, 2 seconds, 0 milliseconds, 0 microseconds\n"
          "FreeSWITCH (Version 1.10.12-release git abc 64bit) is ready\n"
          "3 session(s) since startup\n0 session(s) - peak 1, last 5min 1\n"
          "0 session(s) per Sec out of max 30, peak 1, last 5min 1\n1000 session(s) max\n"
          "min idle cpu 0.00/99.00\nCurrent Stack Size/Max 240K/8192K\n")
# A metadata blob that is not valid UTF-8 and has blank lines: kept byte-exact.
META = b"<cdr>\n\n<variables><x>\xff\xfe caf\xc3\xa9</x></variables></cdr>"


def cluster(db_path: str | None) -> tuple[ClusterConfig, NodeConfig]:
    base = make_config(nodes=3, slots=2)
    slots = (dataclasses.replace(base.slots[0], profiles=("internal", "internal-b")),
             dataclasses.replace(base.slots[1], profiles=("external",)))
    config = dataclasses.replace(base, slots=slots)
    me = dataclasses.replace(
        config.nodes[0], core_db=db_path, registration_db=None if db_path is None else
        os.path.join(os.path.dirname(db_path), "sofia_reg_{profile}.db"))
    return config, me


class FakeESL:
    """The part of ESLClient the feeds use: listeners, subscriptions, canned api outputs."""

    def __init__(self) -> None:
        self.core_uuid: str | None = CORE
        self.is_healthy = True
        self.listeners: dict[str, list[Callable[[Event], object]]] = {}
        self.subscribed: list[str] = []
        self.outputs = {"global_getvar core_uuid": CORE, "status": STATUS}
        self.api_calls: list[str] = []
        self.state_listeners: list[Callable[[Any, Any], object]] = []
        self.restart_listeners: list[Callable[[str, str], object]] = []

    def add_event_listener(self, cb: Callable[[Event], object], name: str | None = None) -> None:
        assert name is not None
        self.listeners.setdefault(name, []).append(cb)

    def remove_event_listener(self, cb: Callable[[Event], object],
                              name: str | None = None) -> None:
        assert name is not None
        self.listeners[name].remove(cb)

    def subscribe(self, *names: str) -> Deferred[None]:
        self.subscribed.extend(names)
        return defer.succeed(None)

    def api(self, command: str, timeout: float | None = None) -> Deferred[str]:
        assert timeout is not None
        self.api_calls.append(command)
        out = self.outputs.get(command)
        if out is None:
            return defer.fail(RuntimeError(f"no canned output for {command}"))
        return defer.succeed(out)

    def add_state_listener(self, cb: Callable[[Any, Any], object]) -> None:
        self.state_listeners.append(cb)

    def add_restart_listener(self, cb: Callable[[str, str], object]) -> None:
        self.restart_listeners.append(cb)

    def fire(self, name: str, *headers: tuple[str, str]) -> None:
        """Deliver an event as ESLClient would (CUSTOM events by subclass)."""
        pairs: list[tuple[str, str]] = []
        key = name
        if "::" in name:
            pairs += [("Event-Subclass", name), ("Event-Name", "CUSTOM")]
        else:
            pairs.append(("Event-Name", name))
        pairs += [("Core-UUID", CORE), *headers]
        event = Event(Headers(pairs))
        for cb in list(self.listeners.get(key, ())):
            cb(event)

    def channel(self, name: str, uuid: str, profile: str | None = "internal",
                *extra: tuple[str, str]) -> None:
        headers = [("Unique-ID", uuid)]
        if profile is not None:
            headers.append(("variable_recovery_profile_name", profile))
        self.fire(name, *headers, *extra)

    def register(self, profile: str, user: str, call_id: str, expires: int = 3600,
                 host: str = "example.org", port: str = "5062", refresh: bool = False,
                 stamp: float | None = None) -> None:
        headers = [
            ("profile-name", profile), ("from-user", user), ("from-host", host),
            ("presence-hosts", host), ("contact", f"<sip:{user}@192.0.2.7:{port}>"),
            ("call-id", call_id), ("rpid", "unknown"), ("status", "Registered(UDP)"),
            ("expires", str(expires)), ("to-user", user), ("to-host", host),
            ("network-ip", "192.0.2.7"), ("network-port", port), ("username", user),
            ("realm", host), ("user-agent", "phone/1.0"),
        ]
        if stamp is not None:
            headers.append(("Event-Date-Timestamp", str(int(stamp * 1_000_000))))
        if refresh:
            headers.append(("update-reg", "true"))
        self.fire("sofia::register", *headers)


class CountingDB(CoreDBReader):
    """The real read-only DB with its queries counted."""

    def __init__(self, path: str) -> None:
        # registrations in each profile's own file, as sofia keeps them
        super().__init__(path, self._count, registration_db=lambda p: os.path.join(
            os.path.dirname(path), f"sofia_reg_{p}.db"))
        self.queries = 0

    def _count(self, f: Callable[[], Any]) -> Deferred[Any]:
        self.queries += 1
        return inline_runner(f)


class Harness:
    def __init__(self, case: SynchronousTestCase, *, db: Any = None, with_db: bool = True,
                 db_at: str | None = None, **kw: Any) -> None:
        self.dir = case.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "core.db")
        self.writer = CoreDB(self.path)  # FreeSWITCH's side: the real schema
        case.addCleanup(self.writer.close)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.config, self.me = cluster(self.path if with_db else None)
        self.esl = FakeESL()
        self.state = ReplicatedState(self.clock, 0, 1)
        self.changes: list[Change] = []
        if db_at is not None:
            db = CoreDBReader(os.path.join(self.dir, db_at), inline_runner)
        elif db is None and with_db:
            db = CountingDB(self.path)
        self.db = db
        self.feeds = Feeds(self.esl, self.state, self.config, self.me, self.clock, db=db,
                           publish=self.changes.append, **kw)
        self.feeds.start()
        case.addCleanup(self.feeds.stop)

    def track(self, uuid: str, profile: str = "internal", meta: bytes = META,
              runtime: str = CORE) -> None:
        # bytes bound to a TEXT column are stored as a blob: byte-exact, as FreeSWITCH's C
        # strings are (they are not validated as UTF-8)
        self.writer._db.execute(
            "insert into recovery (runtime_uuid, technology, profile_name, hostname, uuid, "
            "metadata) values (?, 'sofia', ?, 'fs1.example', ?, ?)",
            (runtime, profile, uuid, meta))

    def update(self, uuid: str, meta: bytes) -> None:
        self.writer._db.execute("update recovery set metadata=? where uuid=?", (meta, uuid))

    def untrack(self, uuid: str) -> None:
        self.writer._db.execute("delete from recovery where uuid=?", (uuid,))

    def call(self, uuid: str, slot: int = 0) -> CallRow | None:
        record = self.state.get(0, slot, Kind.CALL, uuid)
        return None if record is None else decode_call_row(record.value)

    def calls(self) -> set[str]:
        return {r.key for r in self.state.records(kind=Kind.CALL)}

    def regs(self) -> dict[str, RegistrationRow]:
        return {r.key: decode_registration(r.value)
                for r in self.state.records(kind=Kind.REGISTRATION)}

    def settle(self, seconds: float, step: float = 0.005) -> None:
        for _ in range(int(seconds / step) + 1):
            self.clock.advance(step)


def reg_row(profile: str, user: str, call_id: str, expires: int) -> dict[str, object]:
    return {
        "call_id": call_id, "sip_user": user, "sip_host": "example.org",
        "presence_hosts": "example.org", "contact": f"<sip:{user}@192.0.2.7:5062>",
        "status": "Registered(UDP)", "ping_status": "Reachable", "ping_count": 0,
        "ping_time": 0, "force_ping": 0, "rpid": "unknown", "expires": expires,
        "ping_expires": 0, "user_agent": "phone/1.0", "server_user": user,
        "server_host": "127.0.0.1", "profile_name": profile, "hostname": "fs1.example",
        "network_ip": "192.0.2.7", "network_port": "5062", "sip_username": user,
        "sip_realm": "example.org", "mwi_user": user, "mwi_host": "example.org",
        "orig_server_host": "127.0.0.1", "orig_hostname": "fs1.example",
        "sub_host": "example.org",
    }


# -- value encodings -----------------------------------------------------------------------

text = st.text(max_size=40)


class EncodingTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(text, text, text, text, text, st.binary(max_size=300))
    def test_call_round_trip(self, a: str, b: str, c: str, d: str, e: str, meta: bytes) -> None:
        row = CallRow(a, b, c, d, e, meta)
        self.assertEqual(decode_call_row(encode_call_row(row)), row)

    def test_call_layout(self) -> None:
        value = encode_call_row(CallRow("r", "sofia", "p", "h", "u", b"\x00M"))
        # version 2: the metadata compressed with zlib (level 1)
        self.assertEqual(value, b"\x02\x00\x01r\x00\x05sofia\x00\x01p\x00\x01h\x00\x01u"
                                b"x\x01c\xf0\x05\x00\x00O\x00N")
        # version 1 (raw metadata) is still read
        self.assertEqual(
            decode_call_row(b"\x01\x00\x01r\x00\x05sofia\x00\x01p\x00\x01h\x00\x01u\x00M"),
            CallRow("r", "sofia", "p", "h", "u", b"\x00M"))

    def test_call_metadata_is_compressed_and_bounded(self) -> None:
        cdr = b"<cdr><variables>" + b"<v>sofia/internal/1000@example.com</v>" * 200 + b"</cdr>"
        value = encode_call_row(CallRow("r", "sofia", "p", "h", "u", cdr))
        self.assertLess(len(value), len(cdr) // 4)
        self.assertEqual(decode_call_row(value).metadata, cdr)
        head = value[:value.index(b"x\x01")]
        with self.assertRaises(RecordValueError):
            decode_call_row(head + b"not zlib")
        with self.assertRaises(RecordValueError):
            decode_call_row(value[:-3])  # truncated
        bomb = head + zlib.compress(b"\x00" * (MAX_METADATA_BYTES + 1))
        with self.assertRaises(RecordValueError):
            decode_call_row(bomb)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=64))
    def test_decoders_raise_only_their_error(self, data: bytes) -> None:
        for decode in (decode_call_row, decode_registration, decode_identity):
            try:
                decode(data)
            except RecordValueError:
                pass

    def test_registration_and_identity_round_trip(self) -> None:
        row = RegistrationRow("c@h", "1000", "example.org", "example.org", "<sip:1000@x>",
                              "Registered(UDP)", "unknown", NOW_S, "ua \u00e9", "internal",
                              "192.0.2.7", "5062", "1000", "example.org")
        self.assertEqual(decode_registration(encode_registration(row)), row)
        self.assertEqual(decode_registration(encode_registration_v1(row)), row)
        self.assertEqual(json.loads(encode_registration_v1(row))["expires"], NOW_S)
        ident = Identity("fs1", "slot1", CORE, "1.10", ("a", "b"))
        self.assertEqual(decode_identity(encode_identity(ident)), ident)
        with self.assertRaises(RecordValueError):
            decode_registration(b'{"call_id": 5}')

    def test_registration_key(self) -> None:
        self.assertEqual(registration_key("p", "u", "h", "c"), "p/u@h/c")
        long = registration_key("p", "u", "h", "x" * 2000)
        self.assertTrue(long.startswith("p/u@h/#"))
        self.assertEqual(len(long), len("p/u@h/#") + 32)


# -- calls -----------------------------------------------------------------------------------

class CallFeedTests(SynchronousTestCase):
    def test_answer_replicates_row_byte_exact(self) -> None:
        h = Harness(self)
        h.feeds.start_slot(0)
        h.track("call-1")
        h.esl.channel("CHANNEL_ANSWER", "call-1")
        self.assertEqual(h.call("call-1"),
                         CallRow(CORE, "sofia", "internal", "fs1.example", "call-1", META))
        put = [c for c in h.changes if c.kind is Kind.CALL]
        self.assertEqual([(c.op, c.slot, c.key) for c in put], [(Op.PUT, 0, "call-1")])
        status = h.feeds.status()["slots"]["slot1"]
        self.assertEqual(status["calls"], 1)

    def test_rewrite_after_the_ack_is_followed_without_an_event(self) -> None:
        # FreeSWITCH rewrites an answered call's row when the ACK is in (the dialog's
        # tags); no event says so, and a master dying then must not leave the old row
        h = Harness(self, sweep_interval=60.0)
        h.feeds.start_slot(0)
        h.track("call-1", meta=b"<cdr>answered</cdr>")
        h.esl.channel("CHANNEL_ANSWER", "call-1")
        self.assertEqual(h.call("call-1").metadata, b"<cdr>answered</cdr>")
        h.clock.advance(0.06)
        h.update("call-1", b"<cdr>answered, with sip_to_tag</cdr>")
        h.settle(0.3)
        self.assertEqual(h.call("call-1").metadata, b"<cdr>answered, with sip_to_tag</cdr>")
        # bounded: no rewrite, a few more reads, then nothing until the sweep
        before = h.db.queries
        h.settle(2)
        self.assertEqual(h.db.queries, before)
        self.assertEqual(h.feeds.status()["pending_lookups"], 0)

    def test_row_waiting_for_the_ack_is_followed_until_it_comes(self) -> None:
        # on a loaded host the ACK (and the row's rewrite) comes long after the retry
        # schedule; a row with the INVITE's From tag but no To tag is followed until it does
        h = Harness(self, sweep_interval=60.0)
        h.feeds.start_slot(0)
        early = b"<cdr><variables><sip_from_tag>f1</sip_from_tag></variables></cdr>"
        acked = (b"<cdr><variables><sip_from_tag>f1</sip_from_tag>"
                 b"<sip_to_tag>t1</sip_to_tag></variables></cdr>")
        h.track("call-1", meta=early)
        h.esl.channel("CHANNEL_ANSWER", "call-1")
        h.settle(5)
        self.assertEqual(h.feeds.status()["pending_lookups"], 1)
        h.update("call-1", acked)
        h.settle(1)
        self.assertEqual(h.call("call-1").metadata, acked)
        self.assertEqual(h.feeds.status()["pending_lookups"], 0)
        before = h.db.queries
        h.settle(2)
        self.assertEqual(h.db.queries, before)

    def test_wait_for_the_ack_is_bounded(self) -> None:
        h = Harness(self, sweep_interval=600.0)
        h.feeds.start_slot(0)
        early = b"<cdr><variables><sip_from_tag>f1</sip_from_tag></variables></cdr>"
        h.track("call-1", meta=early)
        h.esl.channel("CHANNEL_ANSWER", "call-1")
        h.settle(ACK_WAIT - 2)
        self.assertEqual(h.feeds.status()["pending_lookups"], 1)
        h.settle(4)
        self.assertEqual(h.feeds.status()["pending_lookups"], 0)
        self.assertEqual(h.call("call-1").metadata, early)

    def test_row_written_after_the_event_is_retried(self) -> None:
        h = Harness(self, sweep_interval=60.0)
        h.feeds.start_slot(0)
        h.esl.channel("CHANNEL_ANSWER", "late")
        self.assertEqual(h.calls(), set())
        h.clock.advance(0.02)  # FreeSWITCH's SQL thread writes the row a little later
        h.track("late")
        h.settle(0.3)
        self.assertIn("late", h.calls())
        self.assertEqual(h.feeds.status()["lookup_misses"], 0)

    def test_retries_are_bounded(self) -> None:
        h = Harness(self, sweep_interval=60.0)
        h.feeds.start_slot(0)
        before = h.db.queries
        h.esl.channel("CHANNEL_ANSWER", "never")
        h.settle(sum(RETRY_DELAYS) + 1)
        self.assertEqual(h.db.queries - before, len(RETRY_DELAYS))
        status = h.feeds.status()
        self.assertEqual((status["lookup_misses"], status["pending_lookups"]), (1, 0))
        h.settle(5)
        self.assertEqual(h.db.queries - before, len(RETRY_DELAYS))

    def test_bridge_waits_for_the_updated_metadata(self) -> None:
        h = Harness(self, sweep_interval=60.0)
        h.feeds.start_slot(0)
        for u in ("a", "b"):
            h.track(u)
            h.esl.channel("CHANNEL_ANSWER", u)
        h.esl.channel("CHANNEL_BRIDGE", "a", "internal", ("Bridge-A-Unique-ID", "a"),
                      ("Bridge-B-Unique-ID", "b"))
        h.clock.advance(0.012)
        h.update("a", b"<cdr>bridged a</cdr>")
        h.update("b", b"<cdr>bridged b</cdr>")
        h.settle(1)
        self.assertEqual(h.call("a").metadata, b"<cdr>bridged a</cdr>")  # type: ignore[union-attr]
        self.assertEqual(h.call("b").metadata, b"<cdr>bridged b</cdr>")  # type: ignore[union-attr]

    def test_hangup_deletes_and_a_late_row_does_not_resurrect(self) -> None:
        h = Harness(self, sweep_interval=1.0, tombstone_ttl=10.0)
        h.feeds.start_slot(0)
        h.track("x")
        h.esl.channel("CHANNEL_ANSWER", "x")
        self.assertIn("x", h.calls())
        h.esl.channel("CHANNEL_HANGUP_COMPLETE", "x")
        self.assertNotIn("x", h.calls())
        self.assertEqual(h.changes[-1].op, Op.DELETE)
        # FreeSWITCH has not deleted the row yet: neither events nor sweeps bring it back
        h.esl.channel("CHANNEL_BRIDGE", "x")
        h.settle(3)
        self.assertNotIn("x", h.calls())
        # answered again (a recovered call keeps its UUID): replicated again
        h.esl.channel("CHANNEL_ANSWER", "x")
        self.assertIn("x", h.calls())

    def test_hangup_while_the_row_is_awaited(self) -> None:
        h = Harness(self, sweep_interval=60.0)
        h.feeds.start_slot(0)
        h.esl.channel("CHANNEL_ANSWER", "y")
        h.esl.channel("CHANNEL_HANGUP", "y")
        h.track("y")
        h.settle(1)
        self.assertEqual(h.calls(), set())
        self.assertEqual(h.feeds.status()["pending_lookups"], 0)

    def test_sweep_reconciles_without_events(self) -> None:
        h = Harness(self, sweep_interval=2.0, deep_sweep_every=5)
        h.track("pre")  # there before the slot is fed: initial load (sweep 1)
        h.feeds.start_slot(0)
        self.assertEqual(h.calls(), {"pre"})
        h.track("quiet")  # no event at all
        h.untrack("pre")  # hung up while the events were lost
        h.clock.advance(2.0)  # sweep 2
        self.assertEqual(h.calls(), {"quiet"})
        changes = len(h.changes)
        h.clock.advance(2.0)  # sweep 3: nothing changed, nothing written
        self.assertEqual(len(h.changes), changes)
        h.update("quiet", b"<cdr>changed, event lost</cdr>")
        h.clock.advance(2.0)  # sweep 4: the metadata size changed
        self.assertEqual(h.call("quiet").metadata,  # type: ignore[union-attr]
                         b"<cdr>changed, event lost</cdr>")
        h.update("quiet", b"<cdr>CHANGED, event lost</cdr>")  # same size
        h.clock.advance(2.0)  # sweep 5: deep, compares whole values
        self.assertEqual(h.call("quiet").metadata,  # type: ignore[union-attr]
                         b"<cdr>CHANGED, event lost</cdr>")
        self.assertEqual(h.feeds.status()["slots"]["slot1"]["last_sweep_ms_ago"], 0.0)

    def test_rows_of_no_slot_are_ignored_and_counted(self) -> None:
        h = Harness(self)
        h.feeds.start_slot(0)
        h.track("stray", profile="lab")
        h.track("other", profile="external")  # slot 2: not mastered here
        h.esl.channel("CHANNEL_ANSWER", "stray", "lab")
        h.esl.channel("CHANNEL_ANSWER", "other", "external")
        h.clock.advance(3.0)
        self.assertEqual(h.calls(), set())
        status = h.feeds.status()
        self.assertEqual(status["rows_ignored"], 1)
        self.assertEqual(status["ignored_profiles"], ["lab"])
        self.assertEqual(status["events_ignored"], 1)
        # an event without a profile header: the row decides
        h.esl.channel("CHANNEL_ANSWER", "stray", None)
        self.assertEqual(h.calls(), set())

    def test_second_profile_and_second_slot(self) -> None:
        h = Harness(self)
        h.feeds.start_slot(0)
        h.feeds.start_slot("slot2")
        h.track("b1", profile="internal-b")
        h.track("e1", profile="external")
        h.esl.channel("CHANNEL_ANSWER", "b1", None)
        h.esl.channel("CHANNEL_ANSWER", "e1", "external")
        self.assertIsNotNone(h.call("b1", slot=0))
        self.assertIsNotNone(h.call("e1", slot=1))
        self.assertEqual(sorted(h.feeds.fed_slots), ["slot1", "slot2"])

    def test_rows_of_a_previous_runtime_stay_until_gone(self) -> None:
        h = Harness(self)
        h.track("old", runtime="99999999-0000-0000-0000-000000000000")
        h.feeds.start_slot(0)
        self.assertEqual(h.call("old").runtime_uuid,  # type: ignore[union-attr]
                         "99999999-0000-0000-0000-000000000000")
        h.untrack("old")  # recovered or cleaned up
        h.clock.advance(3.0)
        self.assertEqual(h.calls(), set())

    def test_oversized_row_is_rejected_once_and_counted(self) -> None:
        h = Harness(self, sweep_interval=1.0)
        h.feeds.start_slot(0)
        h.track("huge", meta=random.Random(3).randbytes(2 << 20))  # zlib cannot shrink it
        h.esl.channel("CHANNEL_ANSWER", "huge")
        h.clock.advance(1.0)
        h.clock.advance(1.0)
        self.assertEqual(h.calls(), set())
        self.assertEqual(h.feeds.status()["slots"]["slot1"]["rows_rejected"], 1)

    def test_stop_slot_keeps_records_and_forget_deletes(self) -> None:
        h = Harness(self)
        h.feeds.start_slot(0)
        h.track("k")
        h.esl.channel("CHANNEL_ANSWER", "k")
        h.feeds.stop_slot(0)
        self.assertEqual(h.feeds.status()["slots"], {})
        h.esl.channel("CHANNEL_HANGUP", "k")  # not fed any more: untouched
        h.track("k2")
        h.esl.channel("CHANNEL_ANSWER", "k2")
        h.clock.advance(10)
        self.assertEqual(h.calls(), {"k"})
        # fed again: the index is rebuilt from the state, nothing is written twice
        h.untrack("k2")
        changes = len(h.changes)
        h.feeds.start_slot(0)
        self.assertEqual(h.changes[changes:], [])
        h.feeds.stop_slot(0)
        self.assertEqual(h.feeds.forget_slot(0), 2)  # the call and the identity
        self.assertEqual(len(h.state), 0)

    def test_forget_refuses_a_fed_slot(self) -> None:
        h = Harness(self)
        h.feeds.start_slot(0)
        self.assertRaises(RuntimeError, h.feeds.forget_slot, 0)

    def test_nothing_is_read_while_no_slot_is_fed(self) -> None:
        h = Harness(self)
        h.track("z")
        h.esl.channel("CHANNEL_ANSWER", "z")
        h.clock.advance(10)
        self.assertEqual((h.db.queries, len(h.state)), (0, 0))

    def test_stop_unsubscribes_everything(self) -> None:
        h = Harness(self)
        self.assertIn("CHANNEL_ANSWER", h.esl.subscribed)
        self.assertIn("sofia::register", h.esl.subscribed)
        h.feeds.start_slot(0)
        self.successResultOf(h.feeds.stop())
        self.assertEqual(sum(len(v) for v in h.esl.listeners.values()), 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])


# -- the core DB: errors and deadlines -------------------------------------------------------

class ManualDB:
    """A CoreDB whose queries the test answers by hand (to interleave events)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Deferred[Any]]] = []
        self.interrupted = 0

    def _q(self, what: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((what, d))
        return d

    def recovery_rows(self, uuids: Sequence[str]) -> Deferred[list[CallRow]]:
        return self._q("rows")

    def recovery_summaries(self) -> Deferred[list[CallSummary]]:
        return self._q("summaries")

    def recovery_all(self, profiles: Sequence[str]) -> Deferred[list[CallRow]]:
        return self._q("all")

    def registrations(self, profiles: Sequence[str]) -> Deferred[list[RegistrationRow] | None]:
        return self._q("registrations")

    def registration_page(self, profile: str, after: int, limit: int
                          ) -> Deferred[tuple[list[RegistrationRow], int] | None]:
        # the test answers for the first profile with its rows (a last page); the slot's
        # other profile has no table
        if profile != "internal":
            return defer.succeed(None)
        return self._q("registrations").addCallback(
            lambda rows: None if rows is None else (rows, after + len(rows)))

    def interrupt(self) -> None:
        self.interrupted += 1
        for _, d in list(self.calls):
            if not d.called:
                d.errback(sqlite3.OperationalError("interrupted"))

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass

    def answer(self, what: str, result: Any) -> None:
        name, d = self.calls.pop(0)
        assert name == what, (name, what)
        d.callback(result)


class CoreDBTests(SynchronousTestCase):
    def test_missing_db_file_is_an_error_not_a_crash(self) -> None:
        h = Harness(self, db_at="absent.db")
        h.feeds.start_slot(0)
        status = h.feeds.status()
        self.assertGreater(status["errors"], 0)
        self.assertIn("unable to open", status["slots"]["slot1"]["last_error"])
        os.symlink(os.path.abspath(h.path), os.path.join(h.dir, "absent.db"))  # there now
        h.track("c")
        h.clock.advance(3.0)
        self.assertEqual(h.calls(), {"c"})

    def test_read_only(self) -> None:
        h = Harness(self)
        db = CoreDBReader(h.path, inline_runner)
        self.addCleanup(db.close)
        self.successResultOf(db.recovery_summaries())
        conn = db._core.conn
        assert conn is not None
        self.assertRaises(sqlite3.OperationalError, conn.execute,
                          "delete from recovery")

    def test_missing_registration_table_only_disables_the_sweep(self) -> None:
        h = Harness(self)
        h.writer.open_profile("internal").execute("drop table sip_registrations")
        h.feeds.start_slot(0)
        self.assertFalse(h.feeds.status()["registration_table"])
        self.assertEqual(h.feeds.status()["errors"], 0)
        h.esl.register("internal", "1000", "c1")
        self.assertEqual(len(h.regs()), 1)

    def test_query_deadline_interrupts(self) -> None:
        db = ManualDB()
        h = Harness(self, db=db, query_timeout=2.0)
        h.feeds.start_slot(0)
        self.assertEqual([c[0] for c in db.calls], ["summaries"])
        h.esl.channel("CHANNEL_ANSWER", "w")  # waits: one query at a time
        self.assertEqual(len(db.calls), 1)
        h.clock.advance(2.0)
        self.assertEqual(db.interrupted, 1)
        self.assertIn("longer than 2 s", h.feeds.status()["slots"]["slot1"]["last_error"])
        # the worker is free again: the waiting lookup runs
        self.assertEqual([c[0] for c in db.calls if not c[1].called], ["rows"])
        # a failing lookup is retried on the bounded schedule, not in a loop
        for _ in range(2 * len(RETRY_DELAYS)):
            for what, d in list(db.calls):
                if not d.called:
                    d.errback(sqlite3.OperationalError("disk I/O error")) if what == "rows" \
                        else d.callback([])
            h.clock.advance(0.5)
        self.assertEqual(len([c for c in db.calls if c[0] == "rows"]), len(RETRY_DELAYS))
        self.assertEqual(h.feeds.status()["pending_lookups"], 0)

    def test_sweep_does_not_undo_an_event_that_arrived_meanwhile(self) -> None:
        db = ManualDB()
        h = Harness(self, db=db)
        h.feeds.start_slot(0)
        db.answer("summaries", [])
        db.answer("registrations", [])  # initial load: empty
        h.clock.advance(3.0)
        db.answer("summaries", [])
        # the registration sweep read the table, then a REGISTER arrived, then it applies
        h.clock.advance(27.0)
        while db.calls and db.calls[0][0] != "registrations":
            db.answer(db.calls[0][0], [])
        self.assertEqual(db.calls[0][0], "registrations")
        h.esl.register("internal", "1000", "c1")
        db.answer("registrations", [])
        self.assertEqual(len(h.regs()), 1)
        # a hangup during a sweep: the sweep's stale row does not bring the call back
        h.clock.advance(3.0)
        h.esl.channel("CHANNEL_HANGUP", "gone")
        db.answer("summaries", [CallSummary(CORE, "sofia", "internal", "h", "gone", 9)])
        self.assertEqual(db.calls, [])
        self.assertEqual(h.calls(), set())

    def test_unregister_during_a_registration_sweep(self) -> None:
        db = ManualDB()
        h = Harness(self, db=db)
        h.feeds.start_slot(0)
        db.answer("summaries", [])
        h.esl.register("internal", "1000", "c1")
        row = decode_registration(encode_registration(next(iter(h.regs().values()))))
        # the sweep read the row, then the phone unregistered, then the sweep applies
        h.esl.fire("sofia::unregister", ("profile-name", "internal"), ("from-user", "1000"),
                   ("from-host", "example.org"), ("call-id", "c1"))
        db.answer("registrations", [row])
        self.assertEqual(h.regs(), {})

    def test_large_sweeps_are_applied_in_slices(self) -> None:
        h = Harness(self, apply_slice=2)
        for i in range(5):
            h.writer.upsert_registration(reg_row("internal", str(1000 + i), f"c{i}",
                                                 NOW_S + 600))
            h.track(f"call-{i}")
        h.feeds.start_slot(0)
        self.assertEqual(len(h.calls()), 2)  # one slice now, the rest on later turns
        h.clock.advance(0)
        self.assertEqual((len(h.calls()), len(h.regs())), (5, 5))
        for i in range(3):
            h.writer.delete_registration(f"c{i}", "internal")
        h.clock.advance(30)
        self.assertEqual(len(h.regs()), 2)

    def test_registration_sweep_reads_pages(self) -> None:
        h = Harness(self)
        h.feeds.registrations.page_size = 3
        for i in range(8):
            h.writer.upsert_registration(reg_row("internal", str(1000 + i), f"c{i}",
                                                 NOW_S + 600))
        h.feeds.start_slot(0)
        self.assertEqual(len(h.regs()), 8)
        self.assertEqual(h.feeds.status()["registration_sweeps"], 1)
        # 3 + 3 + 2 rows of "internal", then "internal-b" (no rows)
        queries = h.db.queries
        for i in (1, 6):
            h.writer.delete_registration(f"c{i}", "internal")
        h.clock.advance(30)
        self.assertEqual(len(h.regs()), 6)
        self.assertGreaterEqual(h.db.queries - queries, 4)

    def test_an_abandoned_sweep_leaves_no_stale_marks(self) -> None:
        # the index marks what a sweep saw in its entries (no set of 100,000 keys): a
        # sweep that fails half-way must not make the next one keep rows that are gone
        h = Harness(self)
        h.feeds.registrations.page_size = 2
        for i in range(6):
            h.writer.upsert_registration(reg_row("internal", str(1000 + i), f"c{i}",
                                                 NOW_S + 600))
        h.feeds.start_slot(0)
        self.assertEqual(len(h.regs()), 6)
        page = h.db.registration_page
        calls = [0]

        def failing(*args: Any) -> Any:
            calls[0] += 1
            if calls[0] == 2:  # the second page of the next sweep
                return defer.fail(sqlite3.OperationalError("disk I/O error"))
            return page(*args)

        h.db.registration_page = failing  # type: ignore[method-assign]
        for i in (0, 5):
            h.writer.delete_registration(f"c{i}", "internal")
        h.clock.advance(30)  # abandoned after one page (c0's row was not in it)
        self.assertEqual(len(h.regs()), 6)
        h.clock.advance(30)  # a whole sweep
        self.assertEqual(sorted(r.call_id for r in h.regs().values()),
                         ["c1", "c2", "c3", "c4"])


# -- registrations ---------------------------------------------------------------------------

class RegistrationFeedTests(SynchronousTestCase):
    def test_register_unregister_expire(self) -> None:
        h = Harness(self)
        h.feeds.start_slot(0)
        h.esl.register("internal", "1000", "c1", expires=600)
        h.esl.register("internal", "1001", "c2", expires=60, stamp=NOW - 10)
        regs = h.regs()
        key = "internal/1000@example.org/c1"
        self.assertEqual(set(regs), {key, "internal/1001@example.org/c2"})
        self.assertEqual(regs[key].expires, NOW_S + 600)
        self.assertEqual(regs[key].contact, "<sip:1000@192.0.2.7:5062>")
        self.assertEqual(regs["internal/1001@example.org/c2"].expires, NOW_S + 50)
        record = h.state.get(0, 0, Kind.REGISTRATION, key)
        assert record is not None
        self.assertEqual(record.expires_ms, (NOW_S + 600) * 1000)
        h.esl.fire("sofia::unregister", ("profile-name", "internal"), ("from-user", "1000"),
                   ("from-host", "example.org"), ("call-id", "c1"), ("expires", "0"))
        h.esl.fire("sofia::expire", ("profile-name", "internal"), ("user", "1001"),
                   ("host", "example.org"), ("call-id", "c2"))
        self.assertEqual(h.regs(), {})
        self.assertEqual(h.feeds.status()["slots"]["slot1"]["registrations"], 0)

    def test_expiry_is_replicated(self) -> None:
        h = Harness(self)
        h.feeds.start_slot(0)
        h.esl.register("internal", "1000", "c1", expires=60)
        h.clock.advance(61)
        self.assertEqual(h.regs(), {})  # the state drops it when it expires

    def test_refresh_and_other_profiles(self) -> None:
        h = Harness(self)
        h.feeds.start_slot(0)
        h.esl.register("internal", "1000", "c1", expires=60)
        h.clock.advance(30)
        h.esl.register("internal", "1000", "c1", expires=60, refresh=True, port="5070")
        (row,) = h.regs().values()
        self.assertEqual((row.expires, row.network_port), (NOW_S + 90, "5070"))
        h.esl.register("external", "2000", "c3")  # slot 2: not fed
        h.esl.register("lab", "3000", "c4")  # no slot
        self.assertEqual(len(h.regs()), 1)
        self.assertEqual(h.feeds.status()["events_ignored"], 1)

    def test_initial_load_and_sweep(self) -> None:
        h = Harness(self, registration_sweep_interval=10.0)
        h.writer.upsert_registration(reg_row("internal", "1000", "c1", NOW_S + 600))
        h.writer.upsert_registration(reg_row("internal", "1001", "c2", NOW_S - 1))  # expired
        h.writer.upsert_registration(reg_row("external", "2000", "c3", NOW_S + 600))
        h.feeds.start_slot(0)
        self.assertEqual(set(h.regs()), {"internal/1000@example.org/c1"})
        # an event with the same binding: the sweep does not rewrite it
        h.esl.register("internal", "1000", "c1", expires=600)
        changes = len(h.changes)
        h.clock.advance(10)
        self.assertEqual(len(h.changes), changes)
        h.writer.delete_registration("c1", "internal")  # unregistered, event lost
        h.writer.upsert_registration(reg_row("internal", "1002", "c5", NOW_S + 600))
        h.clock.advance(10)
        self.assertEqual(set(h.regs()), {"internal/1002@example.org/c5"})
        self.assertEqual(h.regs()["internal/1002@example.org/c5"].sip_realm, "example.org")


# -- identity --------------------------------------------------------------------------------

class IdentityTests(SynchronousTestCase):
    def identity(self, h: Harness, slot: int = 0) -> Identity | None:
        record = h.state.get(0, slot, Kind.IDENTITY, IDENTITY_KEY)
        return None if record is None else decode_identity(record.value)

    def test_identity_per_slot_and_restart(self) -> None:
        h = Harness(self)
        h.feeds.start_slot(0)
        h.feeds.start_slot(1)
        self.assertEqual(self.identity(h), Identity(
            "fs1", "slot1", CORE, "1.10.12-release git abc 64bit", ("internal", "internal-b")))
        self.assertEqual(self.identity(h, 1).profiles, ("external",))  # type: ignore[union-attr]
        new = "aaaaaaaa-2222-3333-4444-555555555555"
        h.esl.outputs["global_getvar core_uuid"] = new
        h.esl.core_uuid = new
        for cb in h.esl.restart_listeners:
            cb(CORE, new)
        self.assertEqual(self.identity(h).core_uuid, new)  # type: ignore[union-attr]
        self.assertEqual(h.feeds.status()["slots"]["slot1"]["identity"]["core_uuid"], new)

    def test_identity_waits_for_a_healthy_esl(self) -> None:
        h = Harness(self, with_db=False)
        h.esl.is_healthy = False
        h.feeds.start_slot(0)
        self.assertIsNone(self.identity(h))
        self.assertEqual(h.esl.api_calls, [])
        h.esl.is_healthy = True
        for cb in h.esl.state_listeners:
            cb(ConnectionState.AUTHENTICATING, ConnectionState.READY)
        self.assertIsNotNone(self.identity(h))

    def test_identity_error_is_counted_and_retried(self) -> None:
        h = Harness(self, with_db=False)
        del h.esl.outputs["status"]
        h.feeds.start_slot(0)
        self.assertIsNone(self.identity(h))
        self.assertIn("identity", h.feeds.status()["slots"]["slot1"]["last_error"])
        h.esl.outputs["status"] = STATUS
        h.clock.advance(3.0)  # the sweep tick retries
        self.assertIsNotNone(self.identity(h))
        self.assertFalse(h.feeds.status()["calls_enabled"])


# -- end to end: a real simulator process ----------------------------------------------------

DEADLINE = 20.0


class SimulatorEndToEndTests(TestCase):
    timeout = 60

    def start_sim(self) -> tuple[dict[str, Any], str]:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        ready_path = os.path.join(d, "ready.json")
        db = os.path.join(d, "core.db")
        log = open(os.path.join(d, "sim.log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fsha", "sim", "--name", "fs1", "--esl", "127.0.0.1:0",
             "--control", "127.0.0.1:0", "--db", db, "--ready-file", ready_path,
             "--profile", "internal=127.0.11.1:0", "--profile", "lab=127.0.11.2:0",
             "--reg-check", "0.2"],
            stdout=log, stderr=subprocess.STDOUT)

        def kill() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=DEADLINE)
        self.addCleanup(kill)
        self.proc = proc
        return ready_path, db  # type: ignore[return-value]

    def control(self, port: int, path: str, body: dict[str, Any] | None = None
                ) -> Deferred[Any]:
        def call() -> Any:
            data = json.dumps(body).encode() if body is not None else None
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                         method="POST" if data else "GET")
            with urllib.request.urlopen(req, timeout=DEADLINE) as resp:
                return json.loads(resp.read())
        return threads.deferToThread(call)

    async def scenario(self) -> None:
        ready_path, db_path = self.start_sim()

        def read_ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"simulator exited with {self.proc.returncode}")
            try:
                with open(ready_path, encoding="utf-8") as f:
                    return json.load(f)
            except (OSError, ValueError):
                return None
        ready = await poll_until(read_ready, "the simulator's ready file", clock=reactor)
        ctl = ready["control"]["port"]

        esl = ESLClient(TCP4ClientEndpoint(reactor, "127.0.0.1", ready["esl"]["port"],
                                           timeout=5), "ClueCon", reactor)
        esl.startService()
        self.addCleanup(esl.stopService)
        await esl.when_ready().addTimeout(DEADLINE, reactor)

        config, me = cluster(db_path)
        state = ReplicatedState(reactor, 0, 1)  # type: ignore[arg-type]
        published: list[Change] = []
        feeds = Feeds(esl, state, config, me, reactor,  # type: ignore[arg-type]
                      publish=published.append, sweep_interval=0.5)
        feeds.start()
        self.addCleanup(feeds.stop)
        feeds.start_slot(config.slots[0])

        def calls() -> set[str]:
            return {r.key for r in state.records(kind=Kind.CALL)}

        identity = await poll_until(lambda: state.get(0, 0, Kind.IDENTITY, IDENTITY_KEY),
                                  "the identity record", clock=reactor)
        self.assertEqual(decode_identity(identity.value).core_uuid, ready["core_uuid"])

        placed = await self.control(ctl, "/calls", {"profile": "internal", "count": 3,
                                                    "bridge": True})
        uuids = set(placed["uuids"])
        self.assertEqual(len(uuids), 6)
        await poll_until(lambda: calls() == uuids, "the calls in the replicated state",
                         clock=reactor)
        # each record is the row as FreeSWITCH stored it, after the bridge update
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
            conn.text_factory = bytes
            rows = {u.decode(): (r.decode(), m) for r, u, m in conn.execute(
                "select runtime_uuid, uuid, metadata from recovery")}

        def exact() -> bool:
            for u in uuids:
                row = decode_call_row(state.get(0, 0, Kind.CALL, u).value)  # type: ignore
                if (row.runtime_uuid, row.metadata) != rows[u]:
                    return False
            return True
        await poll_until(exact, "the bridged metadata", clock=reactor)
        self.assertTrue(all(c.slot == 0 for c in published if c.kind is Kind.CALL))

        stray = await self.control(ctl, "/calls", {"profile": "lab"})
        await poll_until(lambda: feeds.status()["rows_ignored"] == 1, "the lab call counted",
                         clock=reactor)
        self.assertEqual(calls(), uuids)

        regs = await self.control(ctl, "/register", {"profile": "internal", "count": 2,
                                                     "expires": 300})
        keys = await poll_until(
            lambda: {r.key for r in state.records(kind=Kind.REGISTRATION)}, "registrations",
            clock=reactor)
        self.assertEqual(len(keys), 2)
        self.assertTrue(all(k.startswith("internal/100") for k in keys))
        await self.control(ctl, "/unregister", {"profile": "internal",
                                                "call_ids": regs["call_ids"][:1]})
        await poll_until(lambda: len(list(state.records(kind=Kind.REGISTRATION))) == 1,
                       "the unregistration", clock=reactor)

        await self.control(ctl, "/hangup", {"uuids": placed["uuids"][:2]})  # one bridged pair
        await poll_until(lambda: len(calls()) == 4, "the hangup", clock=reactor)
        await self.control(ctl, "/hangup", {"all": True})
        await poll_until(lambda: calls() == set(), "every call gone", clock=reactor)
        self.assertEqual(stray["uuids"][0] not in calls(), True)
        status = feeds.status()
        self.assertEqual(status["slots"]["slot1"]["calls"], 0)
        self.assertEqual(status["errors"], 0, status["last_error"])
        await feeds.stop()

    def test_simulator_calls_and_registrations(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.scenario())
