"""The simulated switch without I/O: API texts, profiles, calls, recovery, registrations."""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fsha.sim.cdr import CDRError, build_cdr, parse_cdr
from fsha.sim.coredb import SIP_REGISTRATIONS_COLUMNS, CoreDB
from fsha.sim.events import SimEvent, format_date_gmt
from fsha.sim.switch import NullSipBinder, ProfileConfig, SimError, Switch, uptime_text

T0 = 1_700_000_000.0


def make_switch(
    name: str = "fs1",
    *,
    db: CoreDB | None = None,
    binder: NullSipBinder | None = None,
    clock: Clock | None = None,
    heartbeat: float = 20.0,
    profile_guard: int = 10,
    stop_delay: float = 0.0,
) -> tuple[Switch, Clock, list[SimEvent]]:
    clock = clock or Clock()
    if clock.seconds() == 0:
        clock.advance(T0)
    sw = Switch(
        clock,
        db or CoreDB(":memory:"),
        name=name,
        profiles=[
            ProfileConfig("internal", "127.0.1.1", 5060),
            ProfileConfig("spare", "127.0.1.2", 5060, autostart=False),
        ],
        sip_binder=binder,
        heartbeat_interval=heartbeat,
        profile_guard=profile_guard,
        stop_delay=stop_delay,
    )
    events: list[SimEvent] = []
    sw.add_listener(events.append)
    sw.start()
    return sw, clock, events


class ApiTests(SynchronousTestCase):
    def test_unknown_and_empty(self) -> None:
        sw, _, _ = make_switch()
        r = sw.api("frobnicate now")
        self.assertFalse(r.found)
        self.assertEqual(r.body, "-ERR frobnicate Command not found!\n")
        self.assertEqual(sw.api("global_getvar nosuchvar").body, "-ERR no reply\n")

    def test_core_uuid_fresh_per_start(self) -> None:
        a, _, _ = make_switch()
        b, _, _ = make_switch()
        self.assertEqual(a.api("global_getvar core_uuid").body, a.core_uuid)
        self.assertNotEqual(a.core_uuid, b.core_uuid)
        self.assertEqual(len(a.core_uuid), 36)

    def test_status(self) -> None:
        sw, clock, _ = make_switch()
        clock.advance(65.5)
        lines = sw.api("status").body.split("\n")
        self.assertEqual(
            lines[0],
            "UP 0 years, 0 days, 0 hours, 1 minute, 5 seconds, 500 milliseconds, 0 microseconds",
        )
        self.assertRegex(lines[1], r"^FreeSWITCH \(Version .+\) is ready$")
        self.assertEqual(lines[2], "0 session(s) since startup")

    def test_uptime_plurals(self) -> None:
        self.assertEqual(
            uptime_text(366 * 86400 + 3600 + 1.001),
            "1 year, 1 day, 1 hour, 0 minutes, 1 second, 1 millisecond, 0 microseconds",
        )

    def test_profile_guard_is_configurable(self) -> None:
        sw, clock, _ = make_switch(profile_guard=1)
        self.assertEqual(sw.api("sofia profile internal stop").body,
                         "Profile internal must be up for at least 1 seconds to stop/restart.\n"
                         "Please wait 1 second\n")
        clock.advance(1)
        self.assertEqual(sw.api("sofia profile internal stop").body,
                         "Reload XML [Success]\nstopping: internal")

    def test_sofia_status_lists_running_profiles_only(self) -> None:
        sw, _, _ = make_switch()
        out = sw.api("sofia status").body
        lines = out.split("\n")
        self.assertEqual(lines[0], f"{'Name':>25}\t   Type\t  {'Data':>40}\tState")
        self.assertEqual(lines[1], "=" * 97)
        url = "sip:mod_sofia@127.0.1.1:5060"
        self.assertEqual(lines[2], f"{'internal':>25}\tprofile\t  {url:>40}\tRUNNING (0)")
        self.assertEqual(lines[3], "=" * 97)
        self.assertEqual(lines[4], "1 profile 0 aliases")
        self.assertNotIn("spare", out)

    def test_profile_start_stop_restart_guard(self) -> None:
        sw, clock, events = make_switch()
        self.assertEqual(
            sw.api("sofia profile spare start").body,
            "Reload XML [Success]\nspare started successfully\n",
        )
        self.assertEqual(events[-1].subclass, "sofia::profile_start")
        self.assertEqual(events[-1].get("profile_name"), "spare")
        # already running: same text
        self.assertEqual(
            sw.api("sofia profile spare start").body,
            "Reload XML [Success]\nspare started successfully\n",
        )
        self.assertEqual(
            sw.api("sofia profile nosuch start").body,
            "Reload XML [Success]\nFailure starting nosuch\n",
        )
        clock.advance(9)
        self.assertEqual(
            sw.api("sofia profile spare stop").body,
            "Profile spare must be up for at least 10 seconds to stop/restart.\n"
            "Please wait 1 second\n",
        )
        clock.advance(1)
        self.assertEqual(sw.api("sofia profile spare stop").body,
                         "Reload XML [Success]\nstopping: spare")
        self.assertEqual(sw.api("sofia profile spare stop").body, "Invalid Profile [spare]")
        self.assertEqual(sw.api("sofia profile nosuch recover").body, "Invalid Profile [nosuch]")
        clock.advance(10)
        self.assertEqual(sw.api("sofia profile internal restart").body,
                         "Reload XML [Success]\nrestarting: internal")
        self.assertTrue(sw.profiles["internal"].running)
        self.assertIn("must be up for at least 10", sw.api("sofia profile internal stop").body)
        self.assertEqual(sw.api("sofia profile internal").body, "Invalid Args!\n")
        self.assertEqual(sw.api("sofia bogus").body, "Unknown Command [bogus]\n")

    def test_bind_failure_marks_profile_failed(self) -> None:
        binder = NullSipBinder(fail=["spare"])
        sw, _, events = make_switch(binder=binder)
        self.assertEqual(
            sw.api("sofia profile spare start").body,
            "Reload XML [Success]\nspare started successfully\n",
        )
        self.assertEqual(events[-1].name, "FAILURE")
        self.assertEqual(events[-1].get("profile_name"), "spare")
        # as in FreeSWITCH, a profile that failed to bind is not listed
        self.assertNotIn("spare", sw.api("sofia status").body)
        self.assertEqual(sw.profiles["spare"].state, "failed")
        binder.fail.clear()
        sw.api("sofia profile spare start")
        self.assertTrue(sw.profiles["spare"].running)

    def test_standby(self) -> None:
        sw, _, _ = make_switch()
        self.assertEqual(sw.api("sofia global standby on").body, "+OK Global standby on")
        self.assertTrue(sw.profiles["internal"].standby)
        self.assertEqual(sw.api("sofia global standby off").body, "+OK Global standby off")
        self.assertFalse(sw.profiles["internal"].standby)

    def test_hash(self) -> None:
        sw, _, _ = make_switch()
        self.assertEqual(sw.api("hash insert/realm/key/a value/with slash").body, "+OK\n")
        self.assertEqual(sw.api("hash select/realm/key").body, "a value/with slash")
        self.assertEqual(sw.api("hash select/realm/other").body, "-ERR no reply\n")
        self.assertEqual(sw.api("hash delete/realm/key").body, "+OK\n")
        self.assertEqual(sw.api("hash delete/realm/key").body, "-ERR Not found\n")
        self.assertTrue(sw.api("hash bogus").body.startswith("-ERR Usage"))

    def test_reloadxml(self) -> None:
        sw, _, events = make_switch()
        self.assertEqual(sw.api("reloadxml").body, "+OK [Success]\n")
        self.assertEqual(events[-1].name, "RELOADXML")

    def test_show_channels(self) -> None:
        sw, _, _ = make_switch()
        self.assertEqual(sw.api("show channels").body, "\n0 total.\n")
        self.assertEqual(sw.api("show channels as json").body, '{"row_count":0}')
        (u,) = sw.place_call("internal", caller="1001", dest="3000")
        text = sw.api("show channels").body
        lines = text.split("\n")
        self.assertTrue(lines[0].startswith("uuid,direction,created,created_epoch,name,state,"))
        self.assertTrue(lines[1].startswith(f"{u},inbound,"))
        self.assertEqual(lines[2:], ["", "1 total.", ""])
        data = json.loads(sw.api("show channels as json").body)
        self.assertEqual(data["row_count"], 1)
        self.assertEqual(data["rows"][0]["uuid"], u)
        self.assertEqual(data["rows"][0]["cid_num"], "1001")
        self.assertEqual(data["rows"][0]["callstate"], "ACTIVE")
        self.assertEqual(sw.api("show channels count").body, "\n1 total.\n")

    def test_uuid_exists_and_kill(self) -> None:
        sw, _, events = make_switch()
        (u,) = sw.place_call("internal")
        self.assertEqual(sw.api(f"uuid_exists {u}").body, "true")
        self.assertEqual(sw.api(f"uuid_kill {u} USER_BUSY").body, "+OK\n")
        self.assertEqual(sw.api(f"uuid_exists {u}").body, "false")
        self.assertEqual(sw.api(f"uuid_kill {u}").body, "-ERR No such channel!\n")
        hup = [e for e in events if e.name == "CHANNEL_HANGUP"][-1]
        self.assertEqual(hup.get("Hangup-Cause"), "USER_BUSY")

    def test_originate(self) -> None:
        sw, _, _ = make_switch()
        out = sw.api("originate {origination_uuid=abc-123,x=y}sofia/internal/4000@10.0.0.9 &park()")
        self.assertEqual(out.body, "+OK abc-123\n")
        ch = sw.channels["abc-123"]
        self.assertEqual((ch.direction, ch.dest, ch.application), ("outbound", "4000", "park"))
        self.assertEqual(ch.variables["x"], "y")
        self.assertEqual(len(sw.db.recovery_rows()), 1)
        self.assertEqual(sw.api("originate sofia/spare/1 &park()").body,
                         "-ERR DESTINATION_OUT_OF_ORDER\n")
        self.assertEqual(sw.api("originate loopback/1 &park()").body, "-ERR CHAN_NOT_IMPLEMENTED\n")
        self.assertTrue(sw.api("originate").body.startswith("-USAGE:"))


class CallEventTests(SynchronousTestCase):
    def test_event_sequence_and_headers(self) -> None:
        sw, _, events = make_switch()
        del events[:]
        a, b = sw.place_call("internal", bridge=True)
        self.assertEqual(
            [e.name for e in events],
            ["CHANNEL_CREATE", "CHANNEL_ANSWER", "CHANNEL_CREATE", "CHANNEL_ANSWER",
             "CHANNEL_BRIDGE"],
        )
        create = events[0]
        self.assertEqual(
            [k for k, _ in create.headers[:13]],
            ["Event-Name", "Core-UUID", "FreeSWITCH-Hostname", "FreeSWITCH-Switchname",
             "FreeSWITCH-IPv4", "FreeSWITCH-IPv6", "Event-Date-Local", "Event-Date-GMT",
             "Event-Date-Timestamp", "Event-Calling-File", "Event-Calling-Function",
             "Event-Calling-Line-Number", "Event-Sequence"],
        )
        self.assertEqual(create.get("Core-UUID"), sw.core_uuid)
        self.assertEqual(create.get("Event-Date-Timestamp"), str(int(T0 * 1_000_000)))
        self.assertEqual(create.get("Event-Date-GMT"), format_date_gmt(T0))
        self.assertEqual(create.get("Event-Date-GMT"), "Tue, 14 Nov 2023 22:13:20 GMT")
        self.assertEqual(create.get("Unique-ID"), a)
        self.assertEqual(create.get("Channel-State"), "CS_INIT")
        self.assertEqual(create.get("Answer-State"), "ringing")
        self.assertEqual(create.get("variable_recovery_profile_name"), "internal")
        seqs = [int(e.get("Event-Sequence") or 0) for e in events]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(len(set(seqs)), len(seqs))
        ans = events[1]
        self.assertEqual((ans.get("Answer-State"), ans.get("Channel-Call-State")),
                         ("answered", "ACTIVE"))
        bridge = events[4]
        self.assertEqual(bridge.get("Bridge-A-Unique-ID"), a)
        self.assertEqual(bridge.get("Bridge-B-Unique-ID"), b)
        self.assertEqual(bridge.get("Other-Leg-Unique-ID"), b)

        del events[:]
        sw.hangup(a, "NORMAL_CLEARING")
        names = [e.name for e in events]
        self.assertEqual(names.count("CHANNEL_HANGUP"), 2)
        self.assertEqual(names.count("CHANNEL_HANGUP_COMPLETE"), 2)
        complete = next(e for e in events if e.name == "CHANNEL_HANGUP_COMPLETE")
        self.assertEqual(complete.getall("Hangup-Cause"), ["NORMAL_CLEARING", "NORMAL_CLEARING"])
        self.assertEqual(complete.get("variable_hangup_cause"), "NORMAL_CLEARING")
        self.assertEqual(sw.channels, {})

    def test_heartbeat_on_clock(self) -> None:
        sw, clock, events = make_switch(heartbeat=20.0)
        clock.advance(19.9)
        self.assertFalse([e for e in events if e.name == "HEARTBEAT"])
        sw.place_call("internal")
        clock.advance(0.1)
        (hb,) = [e for e in events if e.name == "HEARTBEAT"]
        self.assertEqual(hb.get("Event-Info"), "System Ready")
        self.assertEqual(hb.get("Uptime-msec"), "20000")
        self.assertEqual(hb.get("Session-Count"), "1")
        self.assertEqual(hb.get("Max-Sessions"), "1000")
        self.assertIsNotNone(hb.get("Idle-CPU"))
        self.assertEqual(hb.get("Event-Calling-Function"), "send_heartbeat")
        clock.advance(20)
        self.assertEqual(len([e for e in events if e.name == "HEARTBEAT"]), 2)
        sw.stop()
        clock.advance(60)
        self.assertEqual(len([e for e in events if e.name == "HEARTBEAT"]), 2)

    def test_bad_profile(self) -> None:
        sw, _, _ = make_switch()
        self.assertRaises(SimError, sw.place_call, "spare")
        self.assertRaises(SimError, sw.place_call, "nosuch")

    def test_profile_stop_hangs_up_its_calls(self) -> None:
        sw, clock, _ = make_switch()
        sw.place_call("internal", bridge=True)
        clock.advance(10)
        sw.api("sofia profile internal stop")
        self.assertEqual(sw.channels, {})
        self.assertEqual(sw.db.recovery_rows(), [])


class RecoveryTests(SynchronousTestCase):
    def test_rows_on_answer_update_on_bridge_delete_on_hangup(self) -> None:
        sw, _, _ = make_switch()
        ch = sw.new_channel("internal")
        self.assertEqual(sw.db.recovery_rows(), [])
        sw.answer(ch.uuid)
        (row,) = sw.db.recovery_rows()
        self.assertEqual(
            (row.runtime_uuid, row.technology, row.profile_name, row.hostname, row.uuid),
            (sw.core_uuid, "sofia", "internal", "fs1", ch.uuid),
        )
        self.assertNotIn("bridge_to", parse_cdr(row.metadata).variables)
        b = sw.new_channel("internal", direction="outbound")
        sw.answer(b.uuid)
        sw.bridge(ch.uuid, b.uuid)
        meta = {r.uuid: parse_cdr(r.metadata) for r in sw.db.recovery_rows()}
        self.assertEqual(meta[ch.uuid].variables["bridge_to"], b.uuid)
        sw.hangup(ch.uuid)
        self.assertEqual(sw.db.recovery_rows(), [])

    def test_cdr_roundtrip_and_errors(self) -> None:
        sw, _, _ = make_switch()
        (u,) = sw.place_call("internal", caller="1234", dest="5678")
        ch = sw.channels[u]
        info = parse_cdr(build_cdr(ch, sw.core_uuid, sw.switchname))
        self.assertEqual((info.uuid, info.cid_num, info.dest, info.chan_name),
                         (u, "1234", "5678", ch.name))
        self.assertEqual(info.variables["local_media_port"], ch.variables["local_media_port"])
        ch.variables["odd"] = "a\x01b <&> %41 \u00e9+c"
        ch.cid_name = "<Bob & \"Co\">"
        info = parse_cdr(build_cdr(ch, sw.core_uuid, sw.switchname))
        self.assertEqual(info.variables["odd"], "a\x01b <&> %41 \u00e9+c")
        self.assertEqual(info.cid_name, "<Bob & \"Co\">")
        for bad in ("", "<cdr>", "<other/>", "<cdr><variables/></cdr>", "\x00"):
            self.assertRaises(CDRError, parse_cdr, bad)

    def test_recover_other_runtime_rows(self) -> None:
        """Two switches sharing nothing; the dead one's rows are copied, recover takes them."""
        dead, _, _ = make_switch("fs1")
        uuids = []
        for _ in range(3):
            uuids += dead.place_call("internal", bridge=True)
        uuids += dead.place_call("internal")
        rows = dead.db.recovery_rows()
        self.assertEqual(len(rows), 7)

        live, _, events = make_switch("fs2")
        live.api("sofia global standby on")
        for r in rows:
            live.db.track(r.runtime_uuid, r.profile_name, r.hostname, r.uuid, r.metadata)
        # a row of another profile and a row of mine: never selected
        live.db.track("other-runtime", "spare", "fs1", "u-spare", rows[0].metadata)
        live.db.track(live.core_uuid, "internal", "fs2", "u-mine", rows[0].metadata)
        # a corrupt row: deleted too, not recovered
        live.db.track("other-runtime", "internal", "fs1", "u-bad", "<not xml")
        del events[:]
        self.assertEqual(live.api("sofia profile internal recover").body,
                         "Recovered 7 session(s)\n")
        self.assertEqual(sorted(live.channels), sorted(uuids))
        self.assertFalse(live.profiles["internal"].standby)
        left = {r.uuid: r for r in live.db.recovery_rows()}
        self.assertIn("u-spare", left)
        self.assertIn("u-mine", left)
        self.assertNotIn("u-bad", left)
        for u in uuids:
            self.assertEqual(left[u].runtime_uuid, live.core_uuid)
        # bridged pairs are bridged again
        bridged = [c for c in live.channels.values() if c.other_leg]
        self.assertEqual(len(bridged), 6)
        self.assertEqual([e.name for e in events].count("CHANNEL_BRIDGE"), 3)
        self.assertTrue(all(c.recovered for c in live.channels.values()))
        # recovered local media ports are reserved
        ports = {c.variables["local_media_port"] for c in live.channels.values()}
        (nu,) = live.place_call("internal")
        self.assertNotIn(live.channels[nu].variables["local_media_port"], ports)
        self.assertEqual(live.api("sofia profile internal recover").body,
                         "No sessions to recover.\n")
        # hangup of a recovered call deletes its (new) row
        live.hangup(uuids[-1])
        self.assertNotIn(uuids[-1], {r.uuid for r in live.db.recovery_rows()})

    def test_recover_skips_existing_uuid_but_deletes_row(self) -> None:
        sw, _, _ = make_switch()
        (u,) = sw.place_call("internal")
        (row,) = sw.db.recovery_rows()
        sw.db.track("other", "internal", "x", u, row.metadata)
        self.assertEqual(sw.api("sofia profile internal recover").body,
                         "No sessions to recover.\n")
        self.assertEqual([r.runtime_uuid for r in sw.db.recovery_rows()], [sw.core_uuid])

    def test_sofia_recover_and_fsctl_recover(self) -> None:
        dead, _, _ = make_switch("fs1")
        dead.place_call("internal")
        (row,) = dead.db.recovery_rows()
        live, _, events = make_switch("fs2")
        self.assertEqual(live.api("sofia recover").body, "No calls to recover.\n")
        self.assertEqual(events[-1].subclass, "sofia::recovery_recovered")
        live.db.track(row.runtime_uuid, row.profile_name, row.hostname, row.uuid, row.metadata)
        self.assertEqual(live.api("sofia recover").body, "Recovered 1 call(s)\n")
        self.assertEqual(events[-1].get("recovered_calls"), "1")
        self.assertEqual(live.api("fsctl recover").body, "+OK 0 session(s) recovered in total\n")


class RegistrationTests(SynchronousTestCase):
    def test_register_refresh_unregister(self) -> None:
        sw, _, events = make_switch()
        reg = sw.register("internal", "1001", network_ip="127.0.9.9", network_port=5070,
                          expires=60)
        ev = events[-1]
        self.assertEqual((ev.name, ev.subclass), ("CUSTOM", "sofia::register"))
        self.assertEqual(ev.headers[0], ("Event-Subclass", "sofia::register"))
        for h in ("profile-name", "from-user", "from-host", "presence-hosts", "contact",
                  "call-id", "rpid", "status", "expires", "to-user", "to-host", "network-ip",
                  "network-port", "username", "realm", "user-agent"):
            self.assertIsNotNone(ev.get(h), h)
        self.assertIsNone(ev.get("update-reg"))
        (row,) = sw.db.registrations("internal")
        self.assertEqual(set(row), set(SIP_REGISTRATIONS_COLUMNS))
        self.assertEqual(len(SIP_REGISTRATIONS_COLUMNS), 27)
        self.assertEqual((row["sip_user"], row["network_ip"], row["network_port"]),
                         ("1001", "127.0.9.9", "5070"))
        self.assertEqual(row["expires"], int(T0) + 60)
        sw.register("internal", "1001", call_id=reg.call_id, expires=60)
        self.assertEqual(events[-1].get("update-reg"), "true")
        self.assertEqual(len(sw.db.registrations()), 1)
        self.assertTrue(sw.unregister("internal", reg.call_id))
        self.assertEqual(events[-1].subclass, "sofia::unregister")
        self.assertFalse(sw.unregister("internal", reg.call_id))
        self.assertEqual(sw.db.registrations(), [])

    def test_expiry_on_clock_per_hostname(self) -> None:
        sw, clock, events = make_switch()
        sw.register("internal", "1001", expires=30)
        sw.register("internal", "1002", expires=300)
        # a row of another hostname (restored from a dead node) never expires here
        row = dict(sw.db.registrations()[0], hostname="other", call_id="x")
        sw.db.upsert_registration(row)
        clock.advance(29)
        self.assertEqual(len(sw.db.registrations()), 3)
        clock.advance(6)
        expired = [e for e in events if e.subclass == "sofia::expire"]
        self.assertEqual(len(expired), 1)
        self.assertEqual((expired[0].get("user"), expired[0].get("profile-name")),
                         ("1001", "internal"))
        self.assertEqual(sorted(str(r["sip_user"]) + str(r["hostname"])
                                for r in sw.db.registrations()),
                         ["1001other", "1002fs1"])


class CoreDBFileTests(SynchronousTestCase):
    def test_journal_delete_and_concurrent_writer(self) -> None:
        import sqlite3

        path = self.mktemp()
        db = CoreDB(path)
        other = sqlite3.connect(path, timeout=5, isolation_level=None)
        # a real FreeSWITCH's core DB (1.11): rollback journal, not WAL
        self.assertEqual(other.execute("PRAGMA journal_mode").fetchone()[0], "delete")
        self.assertEqual(db._db.execute("PRAGMA synchronous").fetchone()[0], 0)  # OFF
        other.execute(
            "insert into recovery values ('r', 'sofia', 'p', 'h', 'u', '<cdr/>')"
        )
        self.assertEqual(len(db.recovery_rows()), 1)
        idx = {r[0] for r in other.execute(
            "select name from sqlite_master where type='index' and tbl_name='recovery'")}
        self.assertEqual(idx, {"recovery1", "recovery2", "recovery3", "recovery4"})
        tables = {r[0] for r in other.execute("select name from sqlite_master")}
        self.assertNotIn("sip_registrations", tables)  # in the profiles' own files
        other.close()
        db.close()

    def test_registrations_in_the_profiles_own_database(self) -> None:
        import os
        import sqlite3

        folder = self.mktemp()
        os.makedirs(folder)
        db = CoreDB(os.path.join(folder, "core.db"))
        self.addCleanup(db.close)
        sw, _, _ = make_switch(db=db)
        sw.api("sofia profile spare start")
        self.assertTrue(os.path.exists(os.path.join(folder, "sofia_reg_internal.db")))
        self.assertTrue(os.path.exists(os.path.join(folder, "sofia_reg_spare.db")))
        sw.register("internal", "1001")
        sw.register("spare", "2001")
        with sqlite3.connect(os.path.join(folder, "sofia_reg_internal.db")) as conn:
            self.assertEqual(conn.execute("select sip_user from sip_registrations").fetchall(),
                             [("1001",)])
        # a row another process (fsha, restoring) wrote is seen, as sofia would
        with sqlite3.connect(os.path.join(folder, "sofia_reg_spare.db")) as conn:
            row = dict(db.registrations("spare")[0], call_id="restored", sip_user="2002")
            conn.execute("insert into sip_registrations (" + ",".join(row) + ") values ("
                         + ",".join("?" * len(row)) + ")", tuple(row.values()))
        self.assertEqual(sorted(str(r["sip_user"]) for r in db.registrations("spare")),
                         ["2001", "2002"])
        self.assertIn("User:       \t2002@", sw.api("sofia status profile spare reg").body)


class ProfileStopTests(SynchronousTestCase):
    def test_stop_is_asynchronous_and_ends_with_unpublish(self) -> None:
        binder = NullSipBinder()
        sw, clock, events = make_switch(binder=binder, stop_delay=2.0)
        clock.advance(10)
        sw.place_call("internal")
        self.assertEqual(sw.api("sofia profile internal stop").body,
                         "Reload XML [Success]\nstopping: internal")
        self.assertEqual(sw.channels, {})  # calls hung up at once
        self.assertNotIn("internal", sw.api("sofia status").body)  # gone from the list
        self.assertIn("internal", binder.bound)  # ... but the socket is still held
        self.assertEqual(sw.api("sofia profile internal stop").body, "Invalid Profile [internal]")
        # a start now answers success, yet the profile stays absent
        self.assertEqual(sw.api("sofia profile internal start").body,
                         "Reload XML [Success]\ninternal started successfully\n")
        self.assertNotIn("internal", sw.api("sofia status").body)
        clock.advance(2.0)
        unpublish = [e for e in events if e.name == "UNPUBLISH"]
        self.assertEqual([e.get("profile_name") for e in unpublish], ["internal"])
        self.assertNotIn("internal", binder.bound)
        self.assertNotIn("internal", sw.api("sofia status").body)
        clock.advance(3.0)  # sofia's bind retry, 5 s after the start
        self.assertIn("RUNNING (0)", sw.api("sofia status").body)

    def test_start_after_unpublish_is_immediate(self) -> None:
        sw, clock, events = make_switch(stop_delay=1.0)
        clock.advance(10)
        sw.api("sofia profile internal stop")
        clock.advance(1.0)
        self.assertEqual(events[-1].name, "UNPUBLISH")
        sw.api("sofia profile internal start")
        self.assertIn("internal\tprofile", sw.api("sofia status").body)

    def test_show_calls_count_and_registration_listing(self) -> None:
        sw, _, _ = make_switch()
        self.assertEqual(sw.api("show calls count").body, "\n0 total.\n")
        sw.place_call("internal", bridge=True)
        sw.place_call("internal")
        self.assertEqual(sw.api("show calls count").body, "\n2 total.\n")
        self.assertEqual(sw.api("show channels count").body, "\n3 total.\n")
        empty = sw.api("sofia status profile internal reg").body
        self.assertEqual(empty, "\nRegistrations:\n" + "=" * 97 + "\nTotal items returned: 0\n"
                         + "=" * 97 + "\n")
        sw.register("internal", "1001", call_id="c1", expires=60, network_port=5070)
        text = sw.api("sofia status profile internal reg").body
        self.assertIn("Call-ID:    \tc1\nUser:       \t1001@127.0.1.1\n", text)
        self.assertIn("EXPSECS(60)\n", text)
        self.assertIn("Port:       \t5070\n", text)
        self.assertIn("Total items returned: 1\n", text)
        self.assertEqual(sw.api("sofia status profile spare reg").body, "Invalid Profile!\n")
