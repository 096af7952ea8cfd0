"""Giving a slot up on this host without fsha's reactor: the guard's (and ExecStopPost's) hands.

Everything here is synchronous and bounded, for a process that must act while fsha is
paused, hung or dead (:mod:`fsha.guard`, ``fsha reconcile``):

* the floating IPs go first, with the commands of :mod:`fsha.floating` (``ip addr del``,
  the operator's ``command ... down|cleanup``, nothing for ``loopback``), each run with the
  backend's timeout; with the address gone, nothing the stopping profile sends (BYEs) can
  leave from it;
* then the local FreeSWITCH stops serving the slot over a short blocking Event Socket
  session (the codec of :mod:`fsha.wire.esl`, every read and write with the node's ESL
  timeout): ``sofia profile P stop``, which hangs up the profile's calls. FreeSWITCH refuses
  to stop a profile started less than 10 s ago: then the profile's calls are hung up one by
  one (``show channels as json``, ``uuid_kill UUID MANAGER_REQUEST``) and the report says
  when the stop may be retried (``retry_in``). With hot standby profiles (``[takeover]
  profiles = "hot_standby"``) the profiles keep running: the slot's calls are hung up
  (``hupall MANAGER_REQUEST sofia_profile_name P``), whose BYEs the egress fence
  (:mod:`fsha.egress`) and the kernel keep from leaving once the address is gone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fsha.config import ClusterConfig, FloatingIP, NodeConfig
from fsha.floating import command_argv, ip_argv, not_held, parse_ip_addr
from fsha.fsapi import (
    FSApiError,
    ProfileNotFound,
    ProfileTooYoung,
    parse_profile_command,
    parse_sofia_status,
)
from fsha.wire.esl import (
    CT_API_RESPONSE,
    CT_AUTH_REQUEST,
    CT_COMMAND_REPLY,
    CT_DISCONNECT_NOTICE,
    CT_RUDE_REJECTION,
    ESLProtocolError,
    FrameDecoder,
    encode_command,
)

__all__ = [
    "BlockingESL",
    "CommandResult",
    "ESLUnavailable",
    "GuardSettings",
    "LocalEffects",
    "SlotSettings",
    "SwitchNotRunning",
]

COMMAND_NOT_HELD = 3  # the command backend's "cleanup: was not held here"
_PLEASE_WAIT = re.compile(r"Please wait (\d+) second")
PROFILE_GUARD_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class SlotSettings:
    slot_id: int
    name: str
    ips: tuple[FloatingIP, ...]
    profiles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GuardSettings:
    """What the guard needs to know, sent by fsha in ``HELLO`` (no file is re-read)."""

    node: str
    lease: float  # seconds: the longest a HOLD may reach into the future
    backend: str  # floating IP backend: ip, command, loopback
    command: tuple[str, ...]
    floating_timeout: float
    esl_host: str
    esl_port: int
    esl_password: str
    esl_timeout: float
    slots: tuple[SlotSettings, ...]
    grace: float = 0.0  # seconds more, once, for a fsha that runs but is late
    hot_standby: bool = False  # [takeover] profiles: hang up a slot's calls, never stop it

    @classmethod
    def from_config(cls, config: ClusterConfig, me: NodeConfig, lease: float
                    ) -> GuardSettings:
        return cls(me.name, lease, config.floating_ip.backend, config.floating_ip.command,
                   config.floating_ip.timeout, me.esl.host, me.esl.port, me.esl.password,
                   me.esl.timeout,
                   tuple(SlotSettings(s.slot_id, s.name, s.ips, s.profiles)
                         for s in config.slots), config.dead_after,
                   config.takeover.hot_standby)

    def as_json(self) -> dict[str, Any]:
        return {"node": self.node, "lease": self.lease, "grace": self.grace,
                "hot_standby": self.hot_standby,
                "backend": self.backend,
                "command": list(self.command), "floating_timeout": self.floating_timeout,
                "esl": {"host": self.esl_host, "port": self.esl_port,
                        "password": self.esl_password, "timeout": self.esl_timeout},
                "slots": [{"id": s.slot_id, "name": s.name, "profiles": list(s.profiles),
                           "ips": [[ip.address, ip.prefix, ip.interface] for ip in s.ips]}
                          for s in self.slots]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GuardSettings:
        """Raises ValueError (with the reason) on anything malformed."""
        try:
            esl = data["esl"]
            slots = tuple(
                SlotSettings(int(s["id"]), str(s["name"]),
                             tuple(FloatingIP(str(a), int(p), str(i)) for a, p, i in s["ips"]),
                             tuple(str(p) for p in s["profiles"]))
                for s in data["slots"])
            settings = cls(str(data["node"]), float(data["lease"]), str(data["backend"]),
                           tuple(str(a) for a in data["command"]),
                           float(data["floating_timeout"]), str(esl["host"]), int(esl["port"]),
                           str(esl["password"]), float(esl["timeout"]), slots,
                           float(data.get("grace", 0.0)), bool(data.get("hot_standby", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad guard settings: {type(e).__name__}: {e}") from None
        if settings.backend not in ("ip", "command", "loopback"):
            raise ValueError(f"bad guard settings: unknown backend {settings.backend!r}")
        if settings.backend == "command" and not settings.command:
            raise ValueError("bad guard settings: backend command without a command")
        return settings

    def slot(self, slot_id: int) -> SlotSettings:
        for s in self.slots:
            if s.slot_id == slot_id:
                return s
        raise KeyError(slot_id)


@dataclass(frozen=True, slots=True)
class CommandResult:
    code: int  # negative: killed by a signal; 127: cannot run; -1000: timed out
    stdout: bytes
    stderr: bytes


TIMED_OUT = -1000
CANNOT_RUN = 127


def run_command(argv: Sequence[str], timeout: float) -> CommandResult:
    """Run ``argv`` (no shell) with the C locale; killed at ``timeout``."""
    env = {**os.environ, "LC_ALL": "C"}
    try:
        done = subprocess.run(list(argv), capture_output=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as e:
        return CommandResult(TIMED_OUT, e.stdout or b"", e.stderr or b"")
    except OSError as e:
        return CommandResult(CANNOT_RUN, b"", str(e).encode())
    return CommandResult(done.returncode, done.stdout, done.stderr)


Runner = Callable[[Sequence[str], float], CommandResult]


# -- the Event Socket, blocking ---------------------------------------------------------


class ESLUnavailable(Exception):
    """FreeSWITCH could not be reached or refused us (connect, auth, timeout, framing)."""


class SwitchNotRunning(ESLUnavailable):
    """Nothing listens on the Event Socket: FreeSWITCH is down, so it serves nothing."""


class BlockingESL:
    """One short inbound Event Socket session: auth, then ``api`` commands in turn."""

    def __init__(self, host: str, port: int, password: str, timeout: float,
                 connect: Callable[..., socket.socket] = socket.create_connection) -> None:
        self.timeout = timeout
        self._decoder = FrameDecoder()
        self._frames: list[Any] = []
        try:
            self._sock = connect((host, port), timeout=timeout)
        except ConnectionRefusedError as e:
            raise SwitchNotRunning(f"FreeSWITCH not running ({host}:{port}: {e})") from None
        except OSError as e:
            raise ESLUnavailable(f"cannot connect to {host}:{port}: {e}") from None
        try:
            greeting = self._next_frame()
            if greeting.content_type != CT_AUTH_REQUEST:
                raise ESLUnavailable(f"no auth/request greeting ({greeting.content_type!r})")
            reply = self._command("auth " + password, CT_COMMAND_REPLY)
            if not reply.reply_text.startswith("+OK"):
                raise ESLUnavailable(f"authentication refused: {reply.reply_text[:100]}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> BlockingESL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_frame(self) -> Any:
        deadline = time.monotonic() + self.timeout
        while not self._frames:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ESLUnavailable(f"no answer within {self.timeout:g} s")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except OSError as e:  # socket.timeout included
                raise ESLUnavailable(f"reading: {e or 'timed out'}") from None
            if not data:
                raise ESLUnavailable("FreeSWITCH closed the connection")
            try:
                self._frames.extend(self._decoder.feed(data))
            except ESLProtocolError as e:
                raise ESLUnavailable(f"bad framing: {e}") from None
        return self._frames.pop(0)

    def _command(self, line: str, want: str) -> Any:
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(encode_command(line))
        except OSError as e:
            raise ESLUnavailable(f"writing: {e}") from None
        while True:
            frame = self._next_frame()
            if frame.content_type == want:
                return frame
            if frame.content_type in (CT_DISCONNECT_NOTICE, CT_RUDE_REJECTION):
                raise ESLUnavailable(f"FreeSWITCH hung up ({frame.content_type})")
            # events are never subscribed here; anything else is skipped

    def api(self, command: str) -> str:
        frame = self._command("api " + command, CT_API_RESPONSE)
        return frame.body.decode("utf-8", "replace")


# -- the effects ------------------------------------------------------------------------


def _ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 1)


class LocalEffects:
    """Drops slots on this host; every method returns a JSON-able report, never raises for
    a failure of the outside world (it is in the report)."""

    def __init__(self, settings: GuardSettings, run: Runner = run_command,
                 esl: Callable[[GuardSettings], BlockingESL] | None = None) -> None:
        self.settings = settings
        self.run = run
        self._esl = esl or (lambda s: BlockingESL(s.esl_host, s.esl_port, s.esl_password,
                                                   s.esl_timeout))

    # -- floating IPs ---------------------------------------------------------------------

    def release_ips(self, slot: SlotSettings) -> dict[str, Any]:
        """Every address of ``slot`` down (not held is fine)."""
        s = self.settings
        start = time.monotonic()
        removed: list[str] = []
        failed: dict[str, str] = {}
        if s.backend == "loopback":
            return {"ms": _ms(start), "removed": [], "failed": {}, "backend": "loopback"}
        for ip in slot.ips:
            if s.backend == "ip":
                r = self.run(ip_argv("ip", "del", ip), s.floating_timeout)
                if r.code == 0:
                    removed.append(str(ip))
                elif not not_held(r.stderr):
                    failed[str(ip)] = _why(r)
            else:
                r = self.run(command_argv(s.command, "down", slot.name, ip),
                             s.floating_timeout)
                if r.code == 0:
                    removed.append(str(ip))
                else:
                    failed[str(ip)] = _why(r)
        return {"ms": _ms(start), "removed": removed, "failed": failed, "backend": s.backend}

    def cleanup_ips(self) -> dict[str, Any]:
        """Every slot's addresses that are configured here removed (start-up, stop)."""
        s = self.settings
        start = time.monotonic()
        removed: list[str] = []
        failed: dict[str, str] = {}
        ips = [(slot, ip) for slot in s.slots for ip in slot.ips]
        if s.backend == "loopback" or not ips:
            return {"ms": _ms(start), "removed": [], "failed": {}, "backend": s.backend}
        if s.backend == "ip":
            listed = self.run(["ip", "-o", "addr", "show"], s.floating_timeout)
            if listed.code != 0:
                return {"ms": _ms(start), "removed": [], "backend": s.backend,
                        "failed": {"*": "cannot list addresses: " + _why(listed)}}
            wanted = {ipaddress.ip_address(ip.address) for _, ip in ips}
            found = [h.floating() for h in
                     parse_ip_addr(listed.stdout.decode("utf-8", "replace"))
                     if ipaddress.ip_address(h.address) in wanted]
            for ip in found:
                r = self.run(ip_argv("ip", "del", ip), s.floating_timeout)
                if r.code == 0 or not_held(r.stderr):
                    removed.append(str(ip))
                else:
                    failed[str(ip)] = _why(r)
        else:
            for _slot, ip in ips:
                r = self.run(command_argv(s.command, "cleanup", "-", ip), s.floating_timeout)
                if r.code == 0:
                    removed.append(str(ip))
                elif r.code != COMMAND_NOT_HELD:
                    failed[str(ip)] = _why(r)
        return {"ms": _ms(start), "removed": removed, "failed": failed, "backend": s.backend}

    # -- FreeSWITCH -----------------------------------------------------------------------

    def stop_profiles(self, profiles: Sequence[str]) -> dict[str, Any]:
        """``sofia profile P stop`` for each one ``sofia status`` lists running (all of
        them if it cannot be read); a profile too young for it gets its calls hung up
        instead, and ``retry_in`` says when to try the stop again. ``calls``: the calls the
        stopped profiles had (hung up by the stop)."""
        start = time.monotonic()
        report: dict[str, Any] = {"stopped": [], "not_running": [], "too_young": [],
                                  "calls": 0, "calls_killed": 0, "failed": {},
                                  "retry_in": None}
        try:
            with self._esl(self.settings) as esl:
                sessions: dict[str, int] = {}
                try:
                    entries = parse_sofia_status("sofia status", esl.api("sofia status"))
                    sessions = {e.name: e.sessions or 0 for e in entries if e.running}
                    report["not_running"] = [p for p in profiles if p not in sessions]
                    profiles = [p for p in profiles if p in sessions]
                except FSApiError:
                    pass  # unreadable: stop them all (a profile not running says so)
                waits = []
                for profile in profiles:
                    command = f"sofia profile {profile} stop"
                    try:
                        parse_profile_command(command, esl.api(command), profile, "stop")
                        report["stopped"].append(profile)
                        report["calls"] += sessions.get(profile, 0)
                    except ProfileNotFound:
                        report["not_running"].append(profile)
                    except ProfileTooYoung as e:
                        report["too_young"].append(profile)
                        m = _PLEASE_WAIT.search(e.output)
                        waits.append(float(m.group(1)) if m else PROFILE_GUARD_SECONDS)
                        report["calls_killed"] += self._kill_calls(esl, profile)
                    except FSApiError as e:
                        report["failed"][profile] = str(e)
                if waits:
                    report["retry_in"] = max(waits) + 0.5
        except SwitchNotRunning as e:
            report["freeswitch"] = str(e)  # serves nothing: nothing to do
        except ESLUnavailable as e:
            report["esl"] = str(e)
        report["ms"] = _ms(start)
        return report

    def hangup_calls(self, profiles: Sequence[str]) -> dict[str, Any]:
        """Hot standby: ``hupall MANAGER_REQUEST sofia_profile_name P`` for each profile
        (the profiles keep running, ready for the next takeover). The report has the keys
        of :meth:`stop_profiles` (nothing ``stopped``), ``calls`` the calls the profiles
        had, and ``hung_up`` the profiles whose calls were hung up."""
        start = time.monotonic()
        report: dict[str, Any] = {"stopped": [], "not_running": [], "too_young": [],
                                  "hung_up": [], "calls": 0, "calls_killed": 0,
                                  "failed": {}, "retry_in": None}
        try:
            with self._esl(self.settings) as esl:
                sessions: dict[str, int] = {}
                try:
                    entries = parse_sofia_status("sofia status", esl.api("sofia status"))
                    sessions = {e.name: e.sessions or 0 for e in entries if e.running}
                except FSApiError:
                    pass  # unreadable: hang up every profile's calls anyway
                for profile in profiles:
                    if sessions and profile not in sessions:
                        report["not_running"].append(profile)
                        continue
                    output = esl.api(f"hupall MANAGER_REQUEST sofia_profile_name {profile}")
                    if output.startswith("-ERR"):
                        report["failed"][profile] = output.strip()[:200]
                        continue
                    report["hung_up"].append(profile)
                    report["calls"] += sessions.get(profile, 0)
        except SwitchNotRunning as e:
            report["freeswitch"] = str(e)
        except ESLUnavailable as e:
            report["esl"] = str(e)
        report["ms"] = _ms(start)
        return report

    def release_profiles(self, profiles: Sequence[str]) -> dict[str, Any]:
        """What a host that gives a slot up does to its profiles: hang up their calls (hot
        standby) or stop them (classic)."""
        if self.settings.hot_standby:
            return self.hangup_calls(profiles)
        return self.stop_profiles(profiles)

    def _kill_calls(self, esl: BlockingESL, profile: str) -> int:
        """Hang up every channel of ``profile`` (its name is ``sofia/PROFILE/...``)."""
        text = esl.api("show channels as json")
        try:
            rows = json.loads(text).get("rows", []) if text.strip().startswith("{") else []
        except ValueError:
            rows = []
        prefix = f"sofia/{profile}/"
        killed = 0
        for row in rows:
            uuid = row.get("uuid", "") if isinstance(row, dict) else ""
            name = row.get("name", "") if isinstance(row, dict) else ""
            if uuid and name.startswith(prefix) and uuid.replace("-", "").isalnum():
                if esl.api(f"uuid_kill {uuid} MANAGER_REQUEST").startswith("+OK"):
                    killed += 1
        return killed

    # -- the whole job --------------------------------------------------------------------

    def drop_slot(self, slot: SlotSettings) -> dict[str, Any]:
        """The slot's addresses down first, then its profiles stopped (hot standby: their
        calls hung up)."""
        start = time.monotonic()
        ips = self.release_ips(slot)
        profiles = self.release_profiles(slot.profiles)
        return {"slot": slot.name, "ips": ips, "profiles": profiles, "ms": _ms(start)}

    def reconcile(self) -> dict[str, Any]:
        """Make this host match a node that holds no slot: no slot address configured, no
        slot profile running (hot standby: running, with no call)."""
        start = time.monotonic()
        ips = self.cleanup_ips()
        profiles = self.release_profiles([p for s in self.settings.slots for p in s.profiles])
        return {"ips": ips, "profiles": profiles, "ms": _ms(start)}


def _why(result: CommandResult) -> str:
    if result.code == TIMED_OUT:
        return "timed out"
    text = result.stderr.decode("utf-8", "replace").strip().splitlines()
    return f"exit {result.code}" + (f": {text[0][:200]}" if text else "")


def report_problems(report: dict[str, Any]) -> list[str]:
    """The failures in a drop or reconcile report, in words (empty: all went well)."""
    problems = [f"{ip}: {why}" for ip, why in report.get("ips", {}).get("failed", {}).items()]
    profiles = report.get("profiles", {})
    if profiles.get("esl"):
        problems.append(f"FreeSWITCH: {profiles['esl']}")
    problems += [f"profile {p}: {why}" for p, why in profiles.get("failed", {}).items()]
    return problems


def reconcile_main(argv: list[str]) -> int:
    """``fsha reconcile``: what a starting node does before it joins, for a stopped one
    (systemd's ``ExecStopPost``): remove every slot address held here, stop every slot
    profile running in the local FreeSWITCH (hanging up their calls). Never run it while
    this node's fsha runs: it would drop a slot the node masters."""
    import argparse
    import sys

    from fsha.config import ConfigError, choose_node, load_config
    from fsha.guard import default_lease

    parser = argparse.ArgumentParser(
        prog="fsha reconcile", description=reconcile_main.__doc__.split("\n\n")[0]
        if reconcile_main.__doc__ else None)
    parser.add_argument("--config", "-c", default="/etc/fsha/cluster.toml",
                        help="the cluster config file (TOML)")
    parser.add_argument("--node", "-n", help="this node's name (default: the node whose "
                                             "addresses are local)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        me = choose_node(config, args.node)
    except ConfigError as e:
        print(f"fsha reconcile: {e.problems[0]}", file=sys.stderr)
        return 2
    settings = GuardSettings.from_config(config, me, default_lease(config.heartbeat_interval,
                                                                   config.dead_after))
    report = LocalEffects(settings).reconcile()
    problems = report_problems(report)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        profiles = report["profiles"]
        print(f"fsha reconcile ({me.name}): addresses removed: "
              f"{', '.join(report['ips']['removed']) or 'none'}; profiles stopped: "
              f"{', '.join(profiles['stopped'] + profiles['too_young']) or 'none'} "
              f"({profiles['calls'] + profiles['calls_killed']} call(s) hung up)")
    for line in problems:
        print(f"fsha reconcile: {line}", file=sys.stderr)
    return 1 if problems else 0
