"""The simulator against a real FreeSWITCH: the same ESL commands, the answers fsha relies on.

Both run as processes on loopback, each with the slot profile of the project's own
configuration (``conf/freeswitch/freeswitch.xml`` for the real one); every command goes
over a real Event Socket. Answers are compared exactly where fsha reads the text, and
through fsha's own parsers where only parts of it matter (uptimes, UUIDs, versions).
"""

from __future__ import annotations

import random
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from fsha.fsapi import (
    ProfileNotFound,
    ProfileTooYoung,
    parse_profile_command,
    parse_sofia_status,
    parse_status,
)
from tests.freeswitch.realfs import RealFreeSWITCH, api, free_sip_port, skip_reason, wait_for
from tests.test_sim_process import Sim

pytestmark = pytest.mark.freeswitch

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class DifferentialTests(SynchronousTestCase):
    def setUp(self) -> None:
        reason = skip_reason()
        if reason:
            raise SkipTest(reason)
        rng = random.Random()
        self.work = Path(self.mktemp())
        self.work.mkdir(parents=True)
        real_ip = f"127.{rng.randint(100, 250)}.{rng.randint(1, 250)}.1"
        sim_ip = f"127.{rng.randint(100, 250)}.{rng.randint(1, 250)}.2"
        self.real = RealFreeSWITCH(self.work, "real", slot_ip=real_ip,
                                   sip_port=free_sip_port(real_ip), rtp=(40000, 40100))
        self.addCleanup(self.real.kill)
        self.real.start()
        wait_for(self.real.profile_running, "the real slot profile RUNNING")
        self.sim = Sim(self, "sim", "--profile", f"slot1={sim_ip}:{free_sip_port(sim_ip)}",
                       "--profile-stop-delay", "0.5")

    def both(self, command: str) -> tuple[str, str]:
        return api(self.sim.ready["esl"]["port"], command), self.real.api(command)

    def same(self, command: str) -> str:
        sim, real = self.both(command)
        self.assertEqual(sim, real, f"answers to {command!r} differ")
        return real

    def test_answers_fsha_relies_on(self) -> None:
        # status: ready, sessions
        for text in self.both("status"):
            status = parse_status("status", text)
            self.assertTrue(status.ready, text)
            self.assertEqual(status.sessions, 0)
        for text in self.both("global_getvar core_uuid"):
            self.assertRegex(text.strip(), UUID)
        self.same("global_getvar no_such_variable_here")  # "-ERR no reply"
        # sofia status: the running slot profile on its address
        for text, ip in zip(self.both("sofia status"),
                            (self.sim.ready["sip"]["slot1"]["ip"], self.real.slot_ip),
                            strict=True):
            (entry,) = [e for e in parse_sofia_status("sofia status", text)
                        if e.type == "profile"]
            self.assertEqual((entry.name, entry.running), ("slot1", True))
            self.assertIn(f"@{ip}:", entry.data)
        # the 10 s stop guard, and an unknown profile
        for text in self.both("sofia profile slot1 stop"):
            with self.assertRaises(ProfileTooYoung):
                parse_profile_command("sofia profile slot1 stop", text, "slot1", "stop")
            self.assertRegex(text, r"Please wait \d+ seconds?")
        for text in self.both("sofia profile nosuch stop"):
            with self.assertRaises(ProfileNotFound):
                parse_profile_command("sofia profile nosuch stop", text, "nosuch", "stop")
        self.same("sofia profile slot1 recover")
        self.same("show calls count")
        self.same("show channels count")
        self.same("sofia status profile slot1 reg")
        self.same("sofia status profile nosuch reg")
        self.same("sofia global standby on")
        self.same("sofia global standby off")
        self.same("hupall MANAGER_REQUEST sofia_profile_name slot1")
        self.same(f"uuid_exists {uuid.uuid4()}")
        self.same("hash insert/fsha_reg/1000@example.com/slot1")
        self.same("hash select/fsha_reg/1000@example.com")
        self.same("hash delete/fsha_reg/1000@example.com")
        self.same("hash delete/fsha_reg/1000@example.com")
        self.same("hash select/fsha_reg/1000@example.com")

    def test_profile_stop_is_asynchronous(self) -> None:
        from tests.test_sim_process import ESL

        watchers = []
        for port in (self.sim.ready["esl"]["port"], self.real.esl_port):
            esl = ESL(port)
            self.addCleanup(esl.close)
            esl.expect("auth/request")
            self.assertEqual(esl.command("auth ClueCon"), "+OK accepted")
            self.assertEqual(esl.command("event plain UNPUBLISH"),
                             "+OK event listener enabled plain")
            watchers.append(esl)

        def stopped(port: int) -> bool:  # refused for the first 10 s (the guard)
            return "stopping: slot1" in api(port, "sofia profile slot1 stop")

        for port in (self.sim.ready["esl"]["port"], self.real.esl_port):
            wait_for(lambda port=port: stopped(port), "the stop accepted", 20)
        # gone from the list at once; its socket is released later: UNPUBLISH
        for text in self.both("sofia status"):
            self.assertNotIn("slot1", text)
        for esl in watchers:
            event = esl.event("UNPUBLISH")
            self.assertEqual(event.get("profile_name"), "slot1")
        for text in self.both("sofia profile slot1 start"):
            self.assertEqual(text, "Reload XML [Success]\nslot1 started successfully\n")
        for port in (self.sim.ready["esl"]["port"], self.real.esl_port):
            wait_for(lambda port=port: "RUNNING" in api(port, "sofia status"),
                     "the profile running again", 20)

    def test_databases(self) -> None:
        sim_dir = Path(self.sim.db).parent
        for core, regs in ((Path(self.sim.db), sim_dir / "sofia_reg_slot1.db"),
                           (self.real.core_db, self.real.registration_db())):
            with sqlite3.connect(core) as conn:
                self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "delete")
                tables = {r[0] for r in conn.execute(
                    "select name from sqlite_master where type='table'")}
            self.assertIn("recovery", tables)
            self.assertNotIn("sip_registrations", tables, core)
            with sqlite3.connect(regs) as conn:
                columns = [r[1] for r in conn.execute("PRAGMA table_info(sip_registrations)")]
            self.assertEqual(len(columns), 27, regs)

    def test_registration_listing(self) -> None:
        from tests.freeswitch.sipp import register

        register(self.real.slot_ip, self.real.sip_port, ["1001", "1002"], self.work)
        self.sim.control("/register", {"profile": "slot1", "count": 2, "start": 1001})

        def entries(text: str) -> list[dict[str, Any]]:
            found = []
            for block in text.split("\n\n"):
                fields = {m.group(1): m.group(2) for m in re.finditer(
                    r"^([A-Za-z-]+): *\t(.*)$", block, re.M)}
                if "Call-ID" in fields:
                    found.append(fields)
            return found

        sim, real = self.both("sofia status profile slot1 reg")
        self.assertEqual(len(entries(real)), 2, real)
        self.assertEqual([list(e) for e in entries(sim)], [list(e) for e in entries(real)])
        for text in (sim, real):
            self.assertIn("Total items returned: 2\n", text)
            self.assertEqual(sorted(e["User"].strip().split("@")[0] for e in entries(text)),
                             ["1001", "1002"])
