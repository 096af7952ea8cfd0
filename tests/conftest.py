"""pytest glue: test tiers, hypothesis profiles, and a scratch working directory.

Tiers (docs/development.rst): every test gets exactly one marker from ``TIERS`` below, by
where it lives, so a new test file needs no marker of its own. ``unit`` is the default and
promises no sockets and no processes; a test listed as ``unit`` that binds or connects an
internet socket, or starts a process, fails and says which entry to add.

The suite runs from a scratch directory, as `trial` does (`_trial_temp`): trial's
``TestCase.mktemp()`` makes paths relative to the working directory; this keeps them out of
the checkout. Tests never rely on the working directory: they locate the project from
``__file__``.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

TESTS = Path(__file__).resolve().parent

# A test's tier is the value of the longest key that is a prefix of its place: a folder
# ("e2e/"), a module ("test_x.py"), a class ("test_x.py::Cls") or one test, relative to
# tests/. Keep it short: list whole modules, and classes only in modules that mix tiers.
DEFAULT_TIER = "unit"  # no sockets, no processes: logic on fake clocks, codecs, in-memory I/O
TIERS: dict[str, str] = {
    # a real FreeSWITCH (../shared/freeswitch) in network namespaces
    "freeswitch/": "freeswitch",
    # network namespaces (root): real hosts, real networks, real faults
    "e2e/": "netns",
    "e2e/test_probe.py": "unit",
    "e2e/test_linkemu.py::Commands": "unit",
    "e2e/test_linkemu.py::Impairments": "unit",
    "test_floating.py::NetnsTests": "netns",
    "test_floating_netlink.py::NetnsTests": "netns",
    "test_systemd_unit.py::CapabilityTests": "netns",
    # real processes (twistd, the simulator, redis-server, scripts) or sockets on loopback
    "test_big_slot_processes.py": "process",
    "test_cluster_processes.py": "process",
    "test_control.py::LoopbackHTTPTests": "process",
    "test_durable.py::StoreRedisTests": "process",
    "test_durable_cluster.py": "process",
    "test_esl_sim.py": "process",
    "test_floating.py::CommandBackendRealTests": "process",
    "test_fsevents.py::AgainstSimulatorTests": "process",
    "test_guard.py::CoreTests::test_process_running_tells_a_stopped_process": "process",
    "test_guard.py::ReconcileCommandTests": "process",
    "test_guard_process.py": "process",
    "test_limits_cluster.py": "process",
    "test_limits_redis.py": "process",
    "test_ocf_agent.py": "process",
    "test_operations.py::OperationsClusterTests": "process",
    "test_operations.py::StartupProcessTests": "process",
    "test_config_push_process.py": "process",
    "test_slotchange_process.py": "process",
    "test_packaging.py": "process",
    "test_webpage.py::BrowserTests": "process",
    "test_process.py::RealProcessTests": "process",
    "test_redisclient.py": "process",
    "test_replication_feeds.py::SimulatorEndToEndTests": "process",
    "test_replication_service.py": "process",
    "test_sim_limits.py::HiredisLimitTests": "process",
    "test_sim_process.py::ProcessTests": "process",
    "test_sim_sip.py::BinderTests": "process",
    "test_status.py::ResourceAndCLITests": "process",
    "test_systemd_unit.py::UnitTests::test_systemd_analyze_verify": "process",
    "test_takeover.py::FenceProcessTests": "process",
    "test_takeover.py::SimulatorTakeoverTests": "process",
}
TIER_MARKERS = ("unit", "process", "netns", "freeswitch")  # registered in pyproject.toml


def tier_of(place: str) -> str:
    """The tier of a test at ``place`` ("test_x.py::Cls::test_y", relative to tests/)."""
    best, tier = -1, DEFAULT_TIER
    for key, value in TIERS.items():
        if len(key) > best and (place == key or place.startswith(
                key if key.endswith("/") else key + "::")):
            best, tier = len(key), value
    return tier


def _place(item: pytest.Item) -> str:
    try:
        module = item.path.resolve().relative_to(TESTS).as_posix()
    except ValueError:  # a test outside tests/ (pytest given another path)
        module = item.path.as_posix()
    rest = item.nodeid.partition("::")[2]
    return f"{module}::{rest}" if rest else module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(_place(item))
        item.add_marker(getattr(pytest.mark, tier))
        item.stash[_TIER] = tier


# -- the unit tier's promise, checked: no internet sockets, no processes -------------------
# An audit hook sees every bind/connect/sendto and process start in this interpreter
# (twisted's listenTCP, subprocess, os.fork, posix_spawn alike); it only records, and only
# while a unit-tier test runs. Unix sockets and pipes stay allowed (the reactor's waker).
_TIER = pytest.StashKey[str]()
_unit_io: list[str] | None = None  # set to a list while a unit test runs
_SOCKET_EVENTS = frozenset({"socket.bind", "socket.connect", "socket.sendto",
                            "socket.sendmsg"})
_PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn",
                             "os.system", "pty.spawn"})


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _unit_io is None:
        return
    if event in _SOCKET_EVENTS:
        sock = args[0]
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            _unit_io.append(f"{event} {args[1]!r}")
    elif event in _PROCESS_EVENTS:
        _unit_io.append(f"{event} {args[0]!r}" if args else event)


sys.addaudithook(_audit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[Any]:
    global _unit_io
    if item.stash.get(_TIER, DEFAULT_TIER) != "unit":
        return (yield)
    _unit_io = seen = []
    try:
        result = yield
    finally:
        _unit_io = None
    if seen:
        pytest.fail(
            f"a unit-tier test must not open internet sockets or start processes, and this "
            f"one did ({'; '.join(seen[:3])}): give it its tier in tests/conftest.py TIERS, "
            f"e.g. {_place(item).rpartition('::')[0]!r}: 'process'", pytrace=False)
    return result


# -- hypothesis ------------------------------------------------------------------------
# A wall-clock deadline per example is a timing assertion, which a loaded machine fails:
# no profile has one. "ci" (CI=true) is a gate: the same examples every run, so a red build
# is reproducible, with each test's own example count. Local runs explore new inputs each
# time. "dev" (HYPOTHESIS_PROFILE=dev, the default of `tox -e unit`) is for a quick loop:
# every property test, including those with their own @settings(max_examples=...), runs at
# most DEV_EXAMPLES examples.
DEV_EXAMPLES = 10
settings.register_profile("local", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=DEV_EXAMPLES)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "local")
settings.load_profile(PROFILE)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    if PROFILE != "dev":
        return
    for item in session.items:
        # a @settings decorator beats the profile; hypothesis reads this attribute of the
        # wrapped test at each call, so capping it here caps the explicit counts too
        test = getattr(getattr(item, "obj", None), "__func__", getattr(item, "obj", None))
        own = getattr(test, "_hypothesis_internal_use_settings", None)
        if own is not None and own.max_examples > DEV_EXAMPLES:
            test._hypothesis_internal_use_settings = settings(  # type: ignore[union-attr]
                own, max_examples=DEV_EXAMPLES)


def pytest_report_header(config: pytest.Config) -> str:
    return f"hypothesis profile: {PROFILE} (HYPOTHESIS_PROFILE, CI)"


@pytest.fixture(autouse=True, scope="session")
def _scratch_working_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("trial"))
    try:
        yield
    finally:
        os.chdir(previous)
