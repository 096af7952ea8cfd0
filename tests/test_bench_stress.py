"""The stress of ``bench/failover_netns.py --vs-keepalived`` (bench/vs_keepalived.py):
what it impairs and what it counts as a false takeover.

Both cluster networks impaired on every cable in both directions put two impaired hops on
every path: about 10 % loss and 40 +- 40 ms one way, round trips up to 160 ms. A master's
lease at 20/100 ms is 90 ms from the send time of a heartbeat a quorum echoed, so it runs
out: the master lets the slot go and claims it again (``lease-expired`` then its own
``claim``), with no ``peer-down`` anywhere and never a second holder. One impaired hop per
path (scenario 6's 5 % and 20 +- 20 ms) leaves the masters alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bench.vs_keepalived import fsha_counts
from tests.fakecluster import FakeCluster, impairable_cluster, make_config


def impaired_cluster(hops: int, seed: int = 1) -> FakeCluster:
    """3 nodes, 2 slots at 20/100 ms, converged on clean links; from then on every datagram
    crosses ``hops`` impaired cables, each 5 % loss and 20 +- 20 ms (tests/e2e/linkemu.py's
    model), on both networks."""
    c = impairable_cluster(make_config(3, 2, heartbeat_interval_ms=20, dead_after_ms=100),
                           seed)
    c.hops = hops
    return c


def soak(c: FakeCluster, seconds: float) -> list[dict[str, Any]]:
    """Run ``seconds`` of fake time, checking every 10 ms that no slot has two holders;
    the events of the soak, each with its node."""
    start = c.clock.seconds()
    for _ in range(round(seconds / 0.01)):
        c.advance(0.01)
        for slot, holders in c.holders().items():
            assert len(holders) <= 1, f"{slot} held by {sorted(holders)}"
        c.masters()  # asserts one master per slot
    return [{**e, "node": name} for name, node in c.nodes.items() for e in node.events
            if e["time"] >= start]


def kinds(events: list[dict[str, Any]]) -> dict[str, int]:
    """The bench's kinds, from the fake nodes' events."""
    claims = [e for e in events if e["event"] == "claim"]
    return {"takeovers": sum(1 for e in claims if e["previous"] not in (None, e["node"])),
            "reclaims": sum(1 for e in claims if e["previous"] == e["node"]),
            "lease_expired": sum(1 for e in events if e["event"] == "lease-expired"),
            "peer_down": sum(1 for e in events if e["event"] == "peer-down")}


N = "2026-12-07T14:20:05+0000 [fsha.node.ClusterNode#{}] "
LOG = {
    "fs1": "\n".join([
        N.format("info") + "claiming slot slot1 with epoch 1 (previous master: none)",
        N.format("debug") + "not claiming slot slot1 yet: no quorum of nodes sees the same "
                            "cluster view yet",
        N.format("warn") + "releasing slot slot1: lease expired: no quorum heard this node "
                           "within 90 ms",
        N.format("info") + "claiming slot slot1 with epoch 2 (previous master: fs1)"]),
    "fs2": "\n".join([
        N.format("warn") + "peer fs1 is down: no heartbeat on any network for 100 ms",
        N.format("info") + "claiming slot slot1 with epoch 3 (previous master: fs1)"]),
}


class Counting(SynchronousTestCase):
    def test_a_reclaim_is_not_a_takeover(self) -> None:
        self.assertEqual(fsha_counts(LOG), {"takeovers": 1, "reclaims": 1,
                                            "lease_expired": 1, "peer_down": 1})

    def test_the_log_matches_the_node(self) -> None:
        """The lines counted are the ones fsha.node writes (a renamed message would count
        nothing and the stress would look clean)."""
        source = (Path(__file__).resolve().parent.parent / "fsha" / "node.py").read_text()
        for fragment in ("claiming slot {slot} with epoch {epoch} (previous master: {previous})",
                         "lease expired: no quorum heard this node within",
                         "is down: no heartbeat on any network"):
            self.assertIn(fragment, source)


class Impairment(SynchronousTestCase):
    def test_one_impaired_hop_per_path_moves_nothing(self) -> None:
        c = impaired_cluster(hops=1)
        counts = kinds(soak(c, 5.0))
        self.assertEqual(counts, {"takeovers": 0, "reclaims": 0, "lease_expired": 0,
                                  "peer_down": 0})
        self.assertEqual(c.masters(), {"slot1": "fs1", "slot2": "fs2"})

    def test_two_impaired_hops_expire_the_lease_but_nobody_takes_over(self) -> None:
        c = impaired_cluster(hops=2)
        counts = kinds(soak(c, 3.0))
        self.assertGreater(counts["lease_expired"], 0, counts)
        self.assertGreater(counts["reclaims"], 0, counts)
        self.assertEqual((counts["takeovers"], counts["peer_down"]), (0, 0), counts)
