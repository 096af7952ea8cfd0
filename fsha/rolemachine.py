"""The node's role as a small Automat machine: starting -> slave <-> claiming -> master ->
releasing -> slave (docs/design.rst). The machine owns the role, the slot and the epoch;
what happens on each transition is the node's (:class:`RoleOwner`, ``fsha.node.ClusterNode``).
"""

from __future__ import annotations

from typing import Protocol

from automat import MethodicalMachine

from fsha.config import NodeConfig, SlotConfig
from fsha.wire.heartbeat import NO_SLOT, MessageType, Role

__all__ = ["RoleMachine", "RoleOwner"]


class RoleOwner(Protocol):
    """What the machine's outputs do (``fsha.node.ClusterNode``'s "outputs of the role
    machine")."""

    def _role_changed(self, old: Role, old_slot: int) -> None: ...

    def _begin_claim(self, slot: SlotConfig, epoch: int, previous: NodeConfig | None,
                     handed_over: bool = False, claimers: tuple[NodeConfig, ...] = ()
                     ) -> None: ...

    def _become_master(self) -> None: ...

    def _claim_aborted(self, slot_id: int, reason: str) -> None: ...

    def _stop_claim(self, reason: str) -> SlotConfig: ...

    def _release(self, slot: SlotConfig, reason: str) -> None: ...

    def _announce(self, kind: MessageType, subject: int | None = None, burst: bool = True
                  ) -> None: ...


class RoleMachine:
    """This node's role: starting -> slave <-> claiming -> master -> releasing -> slave.

    The machine owns the role and the slot and epoch it concerns (``role``, ``slot``,
    ``epoch``: read them here, or through the node's read-only properties); only its
    outputs change them. Inputs are total: one that does not apply in the current state
    (``lost`` while a slave, say) is ignored here, so callers need not check the role
    before feeding it.
    """

    _machine = MethodicalMachine()

    def __init__(self, node: RoleOwner) -> None:
        self._node = node
        self.role = Role.STARTING
        self.slot = NO_SLOT
        self.epoch = 0

    def _hold(self, role: Role, slot: int, epoch: int) -> None:
        old, old_slot = self.role, self.slot
        self.role, self.slot, self.epoch = role, slot, epoch
        if old is not role:
            self._node._role_changed(old, old_slot)

    @_machine.state(initial=True)
    def starting(self) -> None:
        "Listening for the cluster before taking any part in it."

    @_machine.state()
    def slave(self) -> None:
        "Ranked and ready to take over."

    @_machine.state()
    def claiming(self) -> None:
        "Taking a slot over: announced, acquiring its resources."

    @_machine.state()
    def master(self) -> None:
        "Serving a slot."

    @_machine.state()
    def releasing(self) -> None:
        "Giving a slot up."

    @_machine.input()
    def discovered(self) -> None:
        "The discovery window is over."

    @_machine.input()
    def assigned(self, slot: SlotConfig, epoch: int, previous: NodeConfig | None,
                 handed_over: bool, claimers: tuple[NodeConfig, ...] = ()) -> None:
        "The role engine gives this node an orphan slot (its previous master may have let it go)."

    @_machine.input()
    def acquired(self) -> None:
        "The slot's resources are ours."

    @_machine.input()
    def acquire_failed(self, reason: str) -> None:
        "Acquiring failed (and was rolled back)."

    @_machine.input()
    def lost(self, reason: str) -> None:
        "Another node holds the slot by a better claim, or we must let it go."

    @_machine.input()
    def released(self) -> None:
        "The slot's resources are released."

    @_machine.output()
    def _enter_slave(self) -> None:
        self._hold(Role.SLAVE, NO_SLOT, 0)

    @_machine.output()
    def _begin_claim(self, slot: SlotConfig, epoch: int, previous: NodeConfig | None,
                     handed_over: bool, claimers: tuple[NodeConfig, ...] = ()) -> None:
        self._hold(Role.CLAIMING, slot.slot_id, epoch)
        self._node._begin_claim(slot, epoch, previous, handed_over, claimers)

    @_machine.output()
    def _become_master(self) -> None:
        self._hold(Role.MASTER, self.slot, self.epoch)
        self._node._become_master()

    @_machine.output()
    def _claim_aborted(self, reason: str) -> None:
        slot = self.slot
        self._node._claim_aborted(slot, reason)
        self._hold(Role.SLAVE, NO_SLOT, 0)
        self._node._announce(MessageType.HEARTBEAT)

    @_machine.output()
    def _begin_release(self, reason: str) -> None:
        slot = self._node._stop_claim(reason)  # the claim is cancelled before the release
        self._hold(Role.RELEASING, self.slot, self.epoch)
        self._node._release(slot, reason)

    starting.upon(discovered, enter=slave, outputs=[_enter_slave])
    slave.upon(assigned, enter=claiming, outputs=[_begin_claim])
    claiming.upon(acquired, enter=master, outputs=[_become_master])
    claiming.upon(acquire_failed, enter=slave, outputs=[_claim_aborted])
    claiming.upon(lost, enter=releasing, outputs=[_begin_release])
    master.upon(lost, enter=releasing, outputs=[_begin_release])
    releasing.upon(released, enter=slave, outputs=[_enter_slave])
    # Nothing held, or already letting go: nothing to lose.
    starting.upon(lost, enter=starting, outputs=[])
    slave.upon(lost, enter=slave, outputs=[])
    releasing.upon(lost, enter=releasing, outputs=[])
