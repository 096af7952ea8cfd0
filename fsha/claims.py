"""The claim policy: may this slave claim the slot the role engine assigned it, now?

Pure, with an explicit ``now``, beside ``fsha.roles`` (who is assigned what) and
``fsha.quorum`` (who is live, whose lease holds). ``fsha.node`` gathers the facts into a
:class:`ClaimFacts` and feeds the role machine only when :func:`claim_hold` returns "" and
:func:`cold_start_wait` is False. Rules added here (split brain, new guards) are tested
here, without a node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fsha.quorum import PeerView, deaf_to, lease_holds, view_agreement


@dataclass(frozen=True, slots=True)
class ClaimFacts:
    """What the claimant knows when it considers its assigned slot."""

    me: int
    # the node that last mastered the slot (None: never mastered, as far as we know)
    previous: int | None
    # is ``previous`` alive in our failure detector?
    previous_alive: bool
    # is this node past its own dead-after time since start (its "I do not hear" counts)?
    voting: bool
    # this node's quorum views of its peers (fsha.quorum)
    views: Sequence[PeerView]
    # the view digests of the live, voting peers, and ours
    peer_digests: Sequence[bytes]
    my_digest: bytes
    quorum: int
    lease: float
    now: float


def claim_hold(facts: ClaimFacts, name: dict[int, str] | None = None) -> str:
    """Why the claim must wait ("" when it may go ahead), in words for the status page.

    1. A previous master that is not ours and not heard here is dead only when a quorum of
       live voting nodes no longer hears it either (a partial fault is no death).
    2. A quorum of nodes must compute the same view (owners, epochs, ranking).
    3. This node must hold a lease (a quorum echoed its heartbeats lately), or the claim
       would be given up at once.
    """
    previous = facts.previous
    if previous is not None and previous != facts.me and not facts.previous_alive:
        if deaf_to(previous, False, facts.voting, facts.views) < facts.quorum:
            who = (name or {}).get(previous, f"node {previous}")
            return f"{who} is still heard by part of the cluster: no quorum of nodes has lost it"
    if view_agreement(facts.my_digest, facts.peer_digests) < facts.quorum:
        return "no quorum of nodes sees the same cluster view yet"
    if not lease_holds(facts.now, facts.views, facts.quorum, facts.lease):
        return "no quorum has echoed this node's heartbeats lately (its lease)"
    return ""


def cold_start_wait(previous: int | None, epoch: int, anyone_starting: bool,
                    gate_open: bool) -> bool:
    """Must the claim of a never-owned slot (cluster cold start) wait?

    A slot nobody mastered (no previous master, epoch 1) waits until every live node has
    finished discovery, so all rank the same slaves and claims do not collide, and until
    the cold-start gate opens (the durable store may still name the slot's master before
    the restart). A dead master's slot is taken over at once.
    """
    return previous is None and epoch == 1 and (anyone_starting or not gate_open)
