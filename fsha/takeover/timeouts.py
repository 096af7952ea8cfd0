"""The takeover's timeouts, and the budgets the node derives from them."""

from __future__ import annotations

from dataclasses import dataclass

from fsha.config import ClusterConfig, NodeConfig, SlotConfig
from fsha.process import DRAIN, KILL_GRACE

PROFILE_GUARD_SECONDS = 10.0  # FreeSWITCH: "must be up for at least 10 seconds"


def fence_bound(timeout: float, kill_grace: float = KILL_GRACE, drain: float = DRAIN) -> float:
    """The longest the fence step can take: the command's ``timeout``, then the runner's
    SIGTERM-to-SIGKILL grace and its wait for the killed process (see :mod:`fsha.process`)."""
    return timeout + 2 * kill_grace + drain


@dataclass(frozen=True, slots=True)
class TakeoverTimeouts:
    floating: float = 5.0  # floating IPs up / down
    esl: float = 2.0  # one ordinary ESL command (start, stop, status, getvar, hash)
    records: float = 2.0  # reading the replicated rows
    db: float = 5.0  # one core-DB write (10,000 rows take ~0.1 s; FreeSWITCH may hold locks)
    confirm: float = 3.0  # a started profile listed RUNNING in `sofia status`
    recover: float = 10.0  # one batch's `sofia profile P recover` (fsha.recovery)
    registrations: float = 5.0  # the whole registrations step
    poll: float = 0.05  # between two `sofia status` polls
    # a profile this node stopped is released asynchronously by sofia (its socket freed,
    # then UNPUBLISH): a start before that answers success yet cannot bind for 17 s+.
    # How long a start waits for the UNPUBLISH of a stop this node issued.
    stop_settle: float = 15.0
    self_check: float = 2.0  # `api status` answered, "is ready"
    fence: float = 0.0  # the fence step, fence_bound(command timeout); 0: derived, or none

    @classmethod
    def from_config(cls, config: ClusterConfig, me: NodeConfig, **overrides: float
                    ) -> TakeoverTimeouts:
        values: dict[str, float] = {"floating": config.floating_ip.timeout,
                                    "esl": me.esl.timeout, "self_check": me.esl.timeout,
                                    "recover": config.takeover.recover_timeout}
        if config.fencing is not None:
            values["fence"] = fence_bound(config.fencing.timeout)
        values.update(overrides)
        return cls(**values)

    def acquire_budget(self, slot: SlotConfig, hot_standby: bool = False) -> float:
        """A bound on how long an acquire of ``slot`` goes without progress with these
        timeouts (the node's claim timeout, counted from the last progress: see
        :meth:`SlotEffects.claim_progress`). The recovery of the calls is one batch
        (``db`` + ``recover``) per progress, whatever the slot's size. ``hot_standby``:
        the ``egress`` step too (one ``nft`` run, bounded like a floating-IP command)."""
        n = len(slot.profiles)
        return (self.floating * hot_standby + self.self_check + self.fence + self.floating
                + self.records + self.esl
                + self.db + self.esl * (n + 1) + self.confirm + self.stop_settle
                + self.db + self.recover + self.esl + self.registrations)

    def release_budget(self, slot: SlotConfig) -> float:
        return self.floating + self.esl * (len(slot.profiles) + 2) + self.db + self.esl

    def stop_budget(self) -> float:
        """The longest :meth:`SlotEffects.stop` waits for deferred profile stops."""
        return PROFILE_GUARD_SECONDS + 1.0 + 3 * self.esl
