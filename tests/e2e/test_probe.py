"""The e2e client's pieces that need no namespace: its SIP messages and the downtime figure."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from fsha.sim.sip import respond
from tests.e2e.netns import outage
from tests.e2e.probe import options, parse_answer


class ProbeMessages(SynchronousTestCase):
    def test_the_simulator_answers_the_probe_and_names_its_node(self) -> None:
        request = options(("198.18.0.101", 5060), ("198.18.0.250", 40000), "7-3-x", 3)
        answer = respond(request, node="fs2", standby=False, src=("198.18.0.250", 40000),
                         local=("198.18.0.101", 5060))
        assert answer is not None
        self.assertEqual(parse_answer(answer), (200, "fs2", "7-3-x"))
        paused = respond(request, node="fs2", standby=True, src=("198.18.0.250", 40000),
                         local=("198.18.0.101", 5060))
        assert paused is not None
        self.assertEqual(parse_answer(paused)[0], 503)

    def test_not_a_response(self) -> None:
        for junk in (b"", b"\xff\xfe", b"OPTIONS sip:x SIP/2.0\r\n\r\n", b"SIP/2.0 abc"):
            self.assertEqual(parse_answer(junk), (0, None, None))


def answers(*times: float) -> list[dict[str, object]]:
    return [{"received": t, "node": "n"} for t in times]


class Outage(SynchronousTestCase):
    def test_gap_spanning_the_fault(self) -> None:
        gap, first = outage(answers(1.0, 1.01, 1.02, 1.15, 1.16), fault=1.025)  # type: ignore[arg-type]
        self.assertAlmostEqual(gap, 0.13)
        assert first is not None
        self.assertEqual(first["received"], 1.15)

    def test_longest_gap_after_the_fault_wins(self) -> None:
        gap, _ = outage(answers(1.0, 1.1, 1.2, 1.6, 1.61), fault=1.05)  # type: ignore[arg-type]
        self.assertAlmostEqual(gap, 0.4)

    def test_no_answer_since(self) -> None:
        self.assertEqual(outage(answers(1.0), fault=2.0), (0.0, None))  # type: ignore[arg-type]


class Prerequisites(SynchronousTestCase):
    def test_not_root_says_why(self) -> None:
        from tests.e2e import netns

        self.patch(netns.os, "geteuid", lambda: 1000)
        reason = netns.unavailable_reason()
        assert reason is not None
        self.assertIn("needs root", reason)
