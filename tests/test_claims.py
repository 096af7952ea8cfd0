"""The claim policy (fsha.claims), without a node: each rule holds a claim back alone."""

from __future__ import annotations

from dataclasses import replace

from twisted.trial.unittest import SynchronousTestCase

from fsha.claims import ClaimFacts, claim_hold, cold_start_wait
from fsha.quorum import PeerView

DIGEST = b"view-1"
NOW = 100.0
LEASE = 0.25


def facts(**kw: object) -> ClaimFacts:
    """Node 0 claims a slot last mastered by node 2 (dead here) in a 3-node cluster (quorum
    2): node 1 is live, voting, no longer hears node 2, agrees on the view and echoed us
    just now."""
    base = ClaimFacts(
        me=0, previous=2, previous_alive=False, voting=True,
        views=[PeerView(1, live=True, hears=0b011, voting=True, support_at=NOW - 0.01),
               PeerView(2, live=False)],
        peer_digests=[DIGEST], my_digest=DIGEST, quorum=2, lease=LEASE, now=NOW)
    return replace(base, **kw)  # type: ignore[arg-type]


class ClaimHoldTests(SynchronousTestCase):
    def test_all_agreed_the_claim_goes_ahead(self) -> None:
        self.assertEqual(claim_hold(facts()), "")

    def test_a_master_still_heard_elsewhere_holds_the_claim(self) -> None:
        heard = [PeerView(1, live=True, hears=0b111, voting=True, support_at=NOW - 0.01)]
        reason = claim_hold(facts(views=heard), {2: "fs3"})
        self.assertEqual(reason, "fs3 is still heard by part of the cluster: no quorum of "
                                 "nodes has lost it")

    def test_a_claimant_not_yet_voting_needs_more_deaf_peers(self) -> None:
        # Node 1 alone does not hear the master: with us not voting, 1 < quorum 2.
        self.assertIn("still heard", claim_hold(facts(voting=False)))

    def test_a_master_alive_here_or_our_own_slot_is_not_asked_about(self) -> None:
        heard = [PeerView(1, live=True, hears=0b111, voting=True, support_at=NOW - 0.01)]
        self.assertEqual(claim_hold(facts(views=heard, previous_alive=True)), "")
        self.assertEqual(claim_hold(facts(views=heard, previous=0)), "")
        self.assertEqual(claim_hold(facts(views=heard, previous=None)), "")

    def test_no_view_agreement_holds_the_claim(self) -> None:
        self.assertEqual(claim_hold(facts(peer_digests=[b"other"])),
                         "no quorum of nodes sees the same cluster view yet")

    def test_no_lease_holds_the_claim(self) -> None:
        stale = [PeerView(1, live=True, hears=0b011, voting=True, support_at=NOW - 2 * LEASE)]
        self.assertEqual(claim_hold(facts(views=stale)),
                         "no quorum has echoed this node's heartbeats lately (its lease)")

    def test_a_node_alone_a_quorum_needs_nobody(self) -> None:
        self.assertEqual(claim_hold(facts(views=[], peer_digests=[], quorum=1)), "")


class ColdStartTests(SynchronousTestCase):
    def test_a_never_owned_slot_waits_for_discovery_and_the_gate(self) -> None:
        self.assertTrue(cold_start_wait(None, 1, anyone_starting=True, gate_open=True))
        self.assertTrue(cold_start_wait(None, 1, anyone_starting=False, gate_open=False))
        self.assertFalse(cold_start_wait(None, 1, anyone_starting=False, gate_open=True))

    def test_a_dead_masters_slot_is_taken_at_once(self) -> None:
        self.assertFalse(cold_start_wait(2, 1, anyone_starting=True, gate_open=False))
        self.assertFalse(cold_start_wait(None, 3, anyone_starting=True, gate_open=False))
