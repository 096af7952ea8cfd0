"""A short randomized nemesis run (tests/e2e/nemesis.py): random partitions of every
kind, kill -9 and restarts, pauses and config rollout steps on a 3-node cluster, with a
sampler of ``ip addr`` on every host. The invariant: no floating IP on two running hosts
for longer than one heartbeat interval (plus the sampler's resolution), and once
everything is healed, every slot has a master and its IP on that host alone.

``FSHA_NEMESIS_SECONDS`` sets the length (default 12); ``tox -e nemesis`` runs
``bench/nemesis.py`` for minutes instead.
"""

from __future__ import annotations

import os
import random

from tests.e2e.nemesis import run_nemesis
from tests.e2e.test_scenarios import ScenarioBase

SECONDS_ENV = "FSHA_NEMESIS_SECONDS"
SAMPLE_RESOLUTION = 0.1  # one round of `ip addr` on every host, under load


class ShortNemesis(ScenarioBase):
    nodes = 3
    slots = 2

    def test_never_two_holders_under_random_faults(self) -> None:
        seconds = float(os.environ.get(SECONDS_ENV, "12"))
        seed = random.randrange(1 << 30)
        print(f"nemesis seed {seed} ({SECONDS_ENV}={seconds})")
        figures = run_nemesis(self.cluster, seconds, seed)
        log = figures.pop("log")
        bound = self.cluster.interval_ms / 1000 + SAMPLE_RESOLUTION
        self.assertLessEqual(figures["worst_two_holders_ms"] / 1000, bound,
                             f"two holders: {figures['doubled']}; faults: {log}")
        self.assertGreater(sum(figures["faults"].values()), 0)
        figures.pop("doubled")
        self.passed(figures)
