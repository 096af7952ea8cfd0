"""The simulator's slow recover (``fsha sim --recover-ms-per-call``): its cost grows with
the number of calls, and it blocks only the ESL connection that runs it."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from fsha.sim.coredb import CoreDB
from fsha.sim.switch import ProfileConfig, Switch
from tests.test_sim_esl import Harness, frames


class SlowRecoverTests(SynchronousTestCase):
    def rows_of_a_dead_switch(self, h: Harness, calls: int) -> None:
        dead = Switch(h.clock, CoreDB(":memory:"), name="fs0",
                      profiles=[ProfileConfig("internal", "127.0.1.1", 5060)],
                      heartbeat_interval=0)
        dead.start()
        for i in range(calls):
            dead.place_call("internal", caller=str(1000 + i))
        for r in dead.db.recovery_rows():
            h.switch.db.track(r.runtime_uuid, r.profile_name, r.hostname, r.uuid, r.metadata)
        dead.stop()

    def test_cost_per_call_and_other_connections_go_on(self) -> None:
        h = Harness()
        h.switch.recover_ms_per_call = 10.0
        self.rows_of_a_dead_switch(h, 50)
        busy, busy_tr = h.authed()
        other, other_tr = h.authed()
        busy.dataReceived(b"api sofia profile internal recover\n\napi status\n\n")
        self.assertEqual(busy_tr.value(), b"")  # 50 calls x 10 ms: not yet
        other.dataReceived(b"api global_getvar core_uuid\n\n")
        [answer] = frames(other_tr.value())
        self.assertEqual(answer.body.decode().strip(), h.switch.core_uuid)  # not blocked
        h.clock.advance(0.49)
        self.assertEqual(busy_tr.value(), b"")
        self.assertEqual(len(h.switch.channels), 0)
        h.clock.advance(0.01)
        out = frames(busy_tr.value())
        self.assertEqual(out[0].body, b"Recovered 50 session(s)\n")
        self.assertTrue(out[1].body.startswith(b"UP "))  # the queued command ran after it
        self.assertEqual(len(h.switch.channels), 50)

    def test_rows_written_during_a_recover_wait_for_the_next_one(self) -> None:
        h = Harness()
        h.switch.recover_ms_per_call = 10.0
        self.rows_of_a_dead_switch(h, 5)
        busy, busy_tr = h.authed()
        busy.dataReceived(b"api sofia profile internal recover\n\n")
        self.rows_of_a_dead_switch(h, 3)  # taken at the start: these are not in it
        h.clock.advance(0.05)
        self.assertEqual(frames(busy_tr.value())[0].body, b"Recovered 5 session(s)\n")
        busy_tr.clear()
        busy.dataReceived(b"api sofia profile internal recover\n\n")
        h.clock.advance(0.03)
        self.assertEqual(frames(busy_tr.value())[0].body, b"Recovered 3 session(s)\n")
