"""What owning a slot means for this node: the effects the role machine asks for.

``SlotEffects`` implements ``fsha.node.SlotActions``. Acquiring a slot brings up its
floating IPs (through the configured backend); releasing takes them down. A failed
acquisition is rolled back by the node (it calls ``release``, which is idempotent).
The FreeSWITCH steps of a takeover (recovery rows, ``sofia profile P recover``,
registrations) join this sequence with the takeover work (issue 5).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from fsha.config import NodeConfig, SlotConfig
from fsha.floating import FloatingIPBackend


class SlotEffects:
    log = Logger()

    def __init__(self, floating: FloatingIPBackend) -> None:
        self.floating = floating

    def acquire(self, slot: SlotConfig, epoch: int, previous: NodeConfig | None
                ) -> defer.Deferred[None]:
        return self.floating.up(slot.name, slot.ips)

    def release(self, slot: SlotConfig) -> defer.Deferred[None]:
        return self.floating.down(slot.name, slot.ips)
