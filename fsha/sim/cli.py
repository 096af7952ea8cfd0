"""``fsha sim``: run the FreeSWITCH simulator as a standalone process.

Example::

    fsha sim --name fs1 --esl 127.0.0.1:0 --password ClueCon \\
        --profile slot1=127.0.1.1:5060 --define-profile slot2=127.0.1.2:5060 \\
        --db /tmp/fs1.db --control 127.0.0.1:0 --ready-file /tmp/fs1.json

When everything listens, ``--ready-file`` gets (atomically) a JSON object with the pid,
the core UUID and the actual ports: ``{"pid", "name", "core_uuid", "db",
"esl": {"host", "port"}, "control": {"host", "port"}, "sip": {PROFILE: {"ip", "port",
"state"}}}``. Bad arguments exit 2 with one line on stderr; a socket that cannot be bound
(ESL, control) exits 1.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
from typing import Any, NoReturn

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"{what} must be HOST:PORT, got {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{what}: {host!r} is not an IP address") from None
    return host, int(port)


def _profile(text: str) -> tuple[str, str, int]:
    name, sep, rest = text.partition("=")
    if not sep or not _NAME.match(name):
        raise UsageError(f"profile must be NAME=IP:PORT (NAME of [A-Za-z0-9_.-]), got {text!r}")
    ip, port = _hostport(rest, f"profile {name}")
    return name, ip, port


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fsha sim", description="Run the FreeSWITCH simulator.")
    p.add_argument("--name", required=True, help="node name (X-FSHA-Node, hostname)")
    p.add_argument("--hostname", help="FreeSWITCH-Hostname (default: --name)")
    p.add_argument("--esl", default="127.0.0.1:8021", help="ESL listen HOST:PORT (port 0 ok)")
    p.add_argument("--password", default="ClueCon", help="ESL password")
    p.add_argument("--acl", action="append", default=[], metavar="CIDR",
                   help="allowed ESL source network (repeatable); others are rudely rejected")
    p.add_argument("--profile", action="append", default=[], metavar="NAME=IP:PORT",
                   help="sofia profile started at boot (repeatable)")
    p.add_argument("--define-profile", action="append", default=[], metavar="NAME=IP:PORT",
                   help="sofia profile defined but not started (repeatable)")
    p.add_argument("--standby-profile", action="append", default=[], metavar="NAME",
                   help="profile with profile-standby=true (repeatable)")
    p.add_argument("--db", default=":memory:", help="core DB (SQLite) path")
    p.add_argument("--control", default="127.0.0.1:0", help="control HTTP HOST:PORT")
    p.add_argument("--heartbeat", type=float, default=20.0, help="HEARTBEAT interval, s")
    p.add_argument("--reg-check", type=float, default=5.0,
                   help="registration expiry check interval, s")
    p.add_argument("--max-sessions", type=int, default=1000)
    p.add_argument("--profile-guard", type=int, default=10, metavar="SECONDS",
                   help="a profile must be up this long before stop/restart (FreeSWITCH: 10; "
                        "loopback clusters use less: all their 'hosts' share one kernel, so a "
                        "profile left bound blocks the floating IP:port for the next node)")
    p.add_argument("--profile-stop-delay", type=float, default=0.0, metavar="SECONDS",
                   help="`sofia profile P stop` releases the profile's socket this long "
                        "after answering (FreeSWITCH: 0.4-2 s and more with calls; the "
                        "profile leaves `sofia status` at once, UNPUBLISH when done)")
    p.add_argument("--recover-ms-per-call", type=float, default=0.0, metavar="MS",
                   help="a `sofia profile P recover` of N calls answers after N x MS ms "
                        "(a real FreeSWITCH: 5-10 ms a call), blocking only its own ESL "
                        "connection (default 0: at once)")
    p.add_argument("--max-queue", type=int, default=100_000,
                   help="events queued per ESL connection")
    p.add_argument("--hiredis", metavar="HOST:PORT[:PASSWORD]",
                   help="Redis of the 'hiredis' limit backend (mod_hiredis; any realm); "
                        "without it, hiredis limits are refused")
    p.add_argument("--hiredis-timeout", type=float, default=2.0, metavar="SECONDS",
                   help="timeout of each Redis command (mod_hiredis timeout_ms)")
    p.add_argument("--ready-file", help="write the actual ports here when listening")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warn", "error", "critical"])
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if not _NAME.match(args.name):
        raise UsageError(f"--name must match [A-Za-z0-9_.-]{{1,64}}, got {args.name!r}")
    args.esl_addr = _hostport(args.esl, "--esl")
    args.control_addr = _hostport(args.control, "--control")
    profiles: dict[str, tuple[str, int, bool]] = {}
    for spec, autostart in [(s, True) for s in args.profile] + [
        (s, False) for s in args.define_profile
    ]:
        name, ip, port = _profile(spec)
        if name in profiles:
            raise UsageError(f"profile {name!r} given twice")
        profiles[name] = (ip, port, autostart)
    for name in args.standby_profile:
        if name not in profiles:
            raise UsageError(f"--standby-profile {name!r} is not a defined profile")
    args.profiles = profiles
    for cidr in args.acl:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise UsageError(f"--acl {cidr!r} is not a network") from None
    if not args.heartbeat >= 0 or not args.reg_check >= 0:
        raise UsageError("--heartbeat and --reg-check must be >= 0")
    if not args.profile_stop_delay >= 0:
        raise UsageError("--profile-stop-delay must be >= 0")
    if args.profile_guard < 0:
        raise UsageError("--profile-guard must be >= 0")
    if args.max_sessions < 1 or args.max_queue < 1:
        raise UsageError("--max-sessions and --max-queue must be >= 1")
    if not args.password or "\n" in args.password:
        raise UsageError("--password must be a non-empty single line")
    args.hiredis_target = None
    if args.hiredis is not None:
        from fsha.sim.limits import LimitError, RedisTarget

        try:
            args.hiredis_target = RedisTarget.parse(args.hiredis)
            ipaddress.ip_address(args.hiredis_target.host)
        except LimitError as e:
            raise UsageError(f"--hiredis: {e}") from None
        except ValueError:
            raise UsageError(f"--hiredis: {args.hiredis_target.host!r} is not an IP address"
                             ) from None
    if not 0 < args.hiredis_timeout <= 3600:
        raise UsageError("--hiredis-timeout must be in (0, 3600]")
    return args


def _write_ready(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    try:
        args = parse(argv)
    except UsageError as e:
        print(f"fsha sim: error: {e}", file=sys.stderr)
        return 2
    return run(args)


def run(args: argparse.Namespace) -> int:
    # Imported here: `fsha sim --help` and bad arguments do not pull in the reactor.
    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError
    from twisted.logger import (
        FilteringLogObserver,
        Logger,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )
    from twisted.web.server import Site

    from fsha.sim.control import ControlResource
    from fsha.sim.coredb import CoreDB
    from fsha.sim.esl_server import ESLServerFactory
    from fsha.sim.limits import HiredisBackend
    from fsha.sim.sip import UdpSipBinder
    from fsha.sim.switch import ProfileConfig, Switch

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(args.log_level))
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])],
        redirectStandardIO=False,
    )
    log = Logger(namespace="fsha.sim")

    try:
        db = CoreDB(args.db)
    except Exception as e:
        print(f"fsha sim: error: cannot open core DB {args.db}: {e}", file=sys.stderr)
        return 1
    sip_state = {"paused": False}
    holder: dict[str, Switch] = {}
    binder = UdpSipBinder(
        reactor, node=lambda: holder["switch"].name, paused=lambda: sip_state["paused"]
    )
    switch = Switch(
        reactor,
        db,
        name=args.name,
        hostname=args.hostname,
        profiles=[
            ProfileConfig(name, ip, port, autostart, name in args.standby_profile)
            for name, (ip, port, autostart) in args.profiles.items()
        ],
        heartbeat_interval=args.heartbeat,
        reg_check_interval=args.reg_check,
        max_sessions=args.max_sessions,
        profile_guard=args.profile_guard,
        stop_delay=args.profile_stop_delay,
        recover_ms_per_call=args.recover_ms_per_call,
        sip_binder=binder,
        on_shutdown=lambda: os._exit(0),
        hiredis=(
            HiredisBackend(reactor, args.hiredis_target, timeout=args.hiredis_timeout)
            if args.hiredis_target is not None
            else None
        ),
    )
    holder["switch"] = switch
    esl = ESLServerFactory(switch, args.password, reactor, acl=args.acl, max_queue=args.max_queue)
    control = ControlResource(
        switch, esl, sip_pause=lambda on: sip_state.__setitem__("paused", on)
    )
    try:
        esl_port = reactor.listenTCP(args.esl_addr[1], esl, interface=args.esl_addr[0])
    except CannotListenError as e:
        print(f"fsha sim: error: cannot listen for ESL on {args.esl}: {e}", file=sys.stderr)
        return 1
    try:
        site = Site(control)
        site.noisy = False
        control_port = reactor.listenTCP(
            args.control_addr[1], site, interface=args.control_addr[0]
        )
    except CannotListenError as e:
        print(f"fsha sim: error: cannot listen for control on {args.control}: {e}",
              file=sys.stderr)
        return 1
    switch.start()
    esl_host = esl_port.getHost()
    ctl_host = control_port.getHost()
    ready = {
        "pid": os.getpid(),
        "name": switch.name,
        "core_uuid": switch.core_uuid,
        "db": args.db,
        "esl": {"host": esl_host.host, "port": esl_host.port},
        "control": {"host": ctl_host.host, "port": ctl_host.port},
        "sip": {
            p.name: {"ip": p.ip, "port": p.bound_port, "state": p.state}
            for p in switch.profiles.values()
        },
    }
    if args.ready_file:
        try:
            _write_ready(args.ready_file, ready)
        except OSError as e:
            print(f"fsha sim: error: cannot write {args.ready_file}: {e}", file=sys.stderr)
            return 1
    log.info(
        "simulator {name} ready: core {core_uuid}, ESL {esl}, control {control}, sip {sip}",
        name=switch.name,
        core_uuid=switch.core_uuid,
        esl=f"{esl_host.host}:{esl_host.port}",
        control=f"{ctl_host.host}:{ctl_host.port}",
        sip=ready["sip"],
    )
    reactor.addSystemEventTrigger("before", "shutdown", switch.stop)
    reactor.run()
    db.close()
    return 0
