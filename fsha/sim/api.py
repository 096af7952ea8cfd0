"""The simulated switch's API commands: ``api CMD ARGS`` rendered as FreeSWITCH's texts.

``SwitchApi(switch)`` parses each command and renders the output of ``mod_commands.c``,
``mod_sofia.c`` and ``mod_hash.c`` exactly (``shared/brief/freeswitch.md`` section 3) from
the state of a :class:`fsha.sim.switch.Switch`, which owns that state and does the work
(profiles, channels, recovery). Split from the switch so each file has one job.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha.sim.calls import SHOW_CHANNELS_COLUMNS, SimError
from fsha.sim.events import CALLING, format_date_local

if TYPE_CHECKING:
    from fsha.sim.switch import Switch

log = Logger()

VERSION = "1.10.12-release+fsha-sim~64bit"
VERSION_HUMAN = "1.10.12-release+fsha-sim 64bit"
SOFIA_LINE = "=" * 97


@dataclass(slots=True)
class ApiResult:
    found: bool
    output: str
    # an API that waits for something (``limit_usage hiredis ...``: a Redis GET): the
    # output comes from this Deferred; ``output`` is empty meanwhile
    pending: defer.Deferred[str] | None = None

    @property
    def body(self) -> str:
        """What ``api`` puts in the ``api/response`` body (mod_event_socket ``api_exec``)."""
        return self.output if self.output else "-ERR no reply\n"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def uptime_text(seconds: float) -> str:
    """``0 years, 0 days, 0 hours, 1 minute, 5 seconds, 12 milliseconds, 0 microseconds``."""
    total_us = int(seconds * 1_000_000)
    us = total_us % 1000
    ms = (total_us // 1000) % 1000
    s = int(seconds)
    years, rem = divmod(s, 365 * 86400)
    days, rem = divmod(rem, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    return ", ".join(
        (
            _plural(years, "year"),
            _plural(days, "day"),
            _plural(hours, "hour"),
            _plural(minutes, "minute"),
            _plural(secs, "second"),
            _plural(ms, "millisecond"),
            _plural(us, "microsecond"),
        )
    )


def _recovered_text(n: int) -> str:
    return f"Recovered {n} session(s)\n" if n else "No sessions to recover.\n"


class SwitchApi:
    """The ``api`` commands of one :class:`~fsha.sim.switch.Switch`."""

    def __init__(self, switch: Switch) -> None:
        self.switch = switch
        self._commands: dict[str, Callable[[str], str | defer.Deferred[str] | None]] = {
            "status": self._api_status,
            "global_getvar": self._api_global_getvar,
            "show": self._api_show,
            "sofia": self._api_sofia,
            "fsctl": self._api_fsctl,
            "reloadxml": self._api_reloadxml,
            "hash": self._api_hash,
            "hash_dump": lambda a: switch.limits.api_hash_dump(a, switch.hashes.get("", {})),
            "limit_usage": switch.limits.api_limit_usage,
            "uuid_exists": self._api_uuid_exists,
            "uuid_kill": self._api_uuid_kill,
            "hupall": self._api_hupall,
            "originate": self._api_originate,
            "version": self._api_version,
            "hostname": lambda _a: switch.hostname,
        }

    def api(self, line: str) -> ApiResult:
        """Run ``CMD ARGS``. ``found`` False: no such API (``-ERR CMD Command not found!``)."""
        line = line.strip(" ")
        cmd, _, args = line.partition(" ")
        handler = self._commands.get(cmd.lower())
        if handler is None:
            return ApiResult(False, f"-ERR {cmd} Command not found!\n")
        out = handler(args.strip(" "))
        if isinstance(out, defer.Deferred):
            box: list[Any] = []

            def peek(result: Any) -> Any:
                box.append(result)
                return result

            out.addBoth(peek)
            if not box:
                return ApiResult(True, "", pending=out)
            if isinstance(box[0], Failure):
                log.failure("api {cmd} failed", box[0], cmd=cmd)
                out.addErrback(lambda _f: None)
            out = box[0] if isinstance(box[0], str) else ""
        return ApiResult(True, out or "")

    def _api_version(self, args: str) -> str:
        return f"FreeSWITCH Version {VERSION} (fsha simulator)\n"

    def _api_status(self, args: str) -> str:
        up = self.switch.clock.seconds() - self.switch.started_at
        n = len(self.switch.channels)
        sw = self.switch
        return (
            f"UP {uptime_text(up)}\n"
            f"FreeSWITCH (Version {VERSION_HUMAN}) is {'ready' if sw.ready else 'not ready'}\n"
            f"{sw.sessions_since_startup} session(s) since startup\n"
            f"{n} session(s) - peak {sw.sessions_peak}, last 5min {sw.sessions_peak} \n"
            f"0 session(s) per Sec out of max 30, peak 0, last 5min 0 \n"
            f"{self.switch.max_sessions} session(s) max\n"
            "min idle cpu 0.00/99.00\n"
            "Current Stack Size/Max 240K/8192K\n"
        )

    def global_vars(self) -> dict[str, str]:
        return {
            "hostname": self.switch.hostname,
            "switchname": self.switch.switchname,
            "local_ip_v4": self.switch.ipv4,
            "core_uuid": self.switch.core_uuid,
            "domain": self.switch.ipv4,
            "domain_name": self.switch.ipv4,
        }

    def _api_global_getvar(self, args: str) -> str:
        gv = self.global_vars()
        if not args:
            return "".join(f"{k}={v}\n" for k, v in gv.items())
        return gv.get(args, "")

    def _show_rows(self) -> list[dict[str, str]]:
        rows = []
        for ch in self.switch.channels.values():
            row = dict.fromkeys(SHOW_CHANNELS_COLUMNS, "")
            row.update(
                uuid=ch.uuid,
                direction=ch.direction,
                created=format_date_local(ch.created),
                created_epoch=str(int(ch.created)),
                name=ch.name,
                state=ch.state,
                cid_name=ch.cid_name,
                cid_num=ch.cid_num,
                ip_addr=ch.network_addr,
                dest=ch.dest,
                application=ch.application,
                application_data=ch.application_data,
                dialplan=ch.dialplan,
                context=ch.context,
                read_codec="PCMU",
                read_rate="8000",
                read_bit_rate="64000",
                write_codec="PCMU",
                write_rate="8000",
                write_bit_rate="64000",
                hostname=self.switch.hostname,
                callstate=ch.callstate,
                call_uuid=ch.call_uuid or ch.uuid,
                initial_cid_name=ch.cid_name,
                initial_cid_num=ch.cid_num,
                initial_ip_addr=ch.network_addr,
                initial_dest=ch.dest,
                initial_dialplan=ch.dialplan,
                initial_context=ch.context,
            )
            rows.append(row)
        return rows

    def _api_show(self, args: str) -> str:
        words = args.split()
        if [w.lower() for w in words[:2]] == ["calls", "count"]:
            calls = {ch.call_uuid or ch.uuid for ch in self.switch.channels.values()}
            return f"\n{len(calls)} total.\n"
        if not words or words[0].lower() != "channels":
            return (
                "-USAGE: codec|endpoint|application|api|dialplan|file|timer|calls [count]|"
                "channels [count|like <match string>]|calls|detailed_calls|bridged_calls|"
                "detailed_bridged_calls|aliases|complete|chat|management|modules|nat_map|"
                "say|interfaces|interface_types|tasks|limits|status\n"
            )
        rest = [w.lower() for w in words[1:]]
        if rest[:1] == ["count"]:
            return f"\n{len(self.switch.channels)} total.\n"
        rows = self._show_rows()
        if rest[-2:] == ["as", "json"]:
            if not rows:
                return json.dumps({"row_count": 0}, separators=(",", ":"))
            return json.dumps({"row_count": len(rows), "rows": rows}, separators=(",", ":"))
        if not rows:
            return "\n0 total.\n"
        lines = [",".join(SHOW_CHANNELS_COLUMNS)]
        lines += [",".join(r[c] for c in SHOW_CHANNELS_COLUMNS) for r in rows]
        return "\n".join(lines) + f"\n\n{len(rows)} total.\n"

    def _api_sofia(self, args: str) -> str | defer.Deferred[str]:
        argv = args.split()
        if not argv:
            return "USAGE:\nsofia profile <name> [start | stop | restart | recover]\n"
        sub = argv[0].lower()
        if sub == "status":
            if len(argv) >= 4 and argv[1].lower() == "profile" and argv[3].lower() == "reg":
                return self._sofia_status_reg(argv[2])
            return self._sofia_status()
        if sub == "profile":
            return self._sofia_profile(argv[1:])
        if sub == "global":
            if len(argv) > 2 and argv[1].lower() == "standby":
                on = argv[2].lower() in ("on", "true", "yes", "1", "enabled", "active", "allow")
                for p in self.switch.profiles.values():
                    if p.running:
                        p.standby = on
                return f"+OK Global standby {'on' if on else 'off'}"
            return (
                "-ERR Usage: siptrace <on|off>|capture <on|off>|watchdog <on|off>|"
                "debug <sla|presence|none"
            )
        if sub == "recover":
            if len(argv) > 1 and argv[1].lower() == "flush":
                for p in self.switch.profiles.values():
                    if p.running:
                        self.switch.db.take_for_recovery(self.switch.core_uuid, p.name)
                return "Flushing recovery database.\n"
            total = sum(self.switch.recover_profile(p.name)
                        for p in list(self.switch.profiles.values()) if p.running)
            self.switch.fire(
                self.switch.events.custom(
                    "sofia::recovery_recovered",
                    CALLING["sofia::recovery_recovered"],
                    [("recovered_calls", str(total))],
                )
            )
            return f"Recovered {total} call(s)\n" if total else "No calls to recover.\n"
        return f"Unknown Command [{argv[0]}]\n"

    def _sofia_status(self) -> str:
        out = [f"{'Name':>25}\t{'   Type'}\t  {'Data':>40}\tState", SOFIA_LINE]
        count = 0
        for p in self.switch.profiles.values():
            # a profile that failed to bind, or is stopping, is not listed (FreeSWITCH)
            if p.state == "running":
                out.append(
                    f"{p.name:>25}\tprofile\t  {p.url:>40}\t"
                    f"RUNNING ({self.switch.profile_calls(p.name)})"
                )
                count += 1
        out.append(SOFIA_LINE)
        out.append(f"{count} profile{'' if count == 1 else 's'} 0 aliases")
        return "\n".join(out) + "\n"

    def _sofia_status_reg(self, name: str) -> str:
        """``sofia status profile P reg``: the profile's registrations, mod_sofia's text."""
        profile = self.switch.profiles.get(name)
        if profile is None or not profile.running:
            return "Invalid Profile!\n"
        now = int(self.switch.clock.seconds())
        out = ["", "Registrations:", SOFIA_LINE]
        rows = self.switch.db.registrations(name)
        for r in rows:
            expires = int(r["expires"] or 0)  # type: ignore[call-overload]
            out += [
                f"Call-ID:    \t{r['call_id']}",
                f"User:       \t{r['sip_user']}@{r['sip_host']}",
                f"Contact:    \t{r['contact']}",
                f"Agent:      \t{r['user_agent']}",
                f"Status:     \t{r['status']}({r['rpid']}) EXP({format_date_local(expires)})"
                f" EXPSECS({expires - now})",
                f"Ping-Status:\t{r['ping_status']}",
                f"Ping-Time:\t{float(r['ping_time'] or 0):.2f}",  # type: ignore[arg-type]
                f"Host:       \t{r['hostname']}",
                f"IP:         \t{r['network_ip']}",
                f"Port:       \t{r['network_port']}",
                f"Auth-User:  \t{r['sip_username']}",
                f"Auth-Realm: \t{r['sip_realm']}",
                f"MWI-Account:\t{r['mwi_user']}@{r['mwi_host']}",
                "",
            ]
        out += [f"Total items returned: {len(rows)}", SOFIA_LINE]
        return "\n".join(out) + "\n"

    def _sofia_profile(self, argv: list[str]) -> str | defer.Deferred[str]:
        if len(argv) < 2:
            return "Invalid Args!\n"
        name, action = argv[0], argv[1].lower()
        if action == "start":
            ok = self.switch.start_profile(name)
            return (
                "Reload XML [Success]\n"
                + (f"{name} started successfully\n" if ok else f"Failure starting {name}\n")
            )
        profile = self.switch.profiles.get(name)
        if profile is None or not profile.running:
            return f"Invalid Profile [{name}]"
        if action == "recover":
            if len(argv) > 2 and argv[2].lower() == "flush":
                self.switch.db.take_for_recovery(self.switch.core_uuid, name)
                return "Flushing recovery database.\n"
            if self.switch.recover_ms_per_call > 0:
                return self.switch.recover_profile_slowly(name).addCallback(_recovered_text)
            return _recovered_text(self.switch.recover_profile(name))
        if action in ("stop", "restart"):
            diff = int(self.switch.clock.seconds() - profile.started_at)
            if diff < self.switch.profile_guard:
                remain = self.switch.profile_guard - diff
                return (
                    f"Profile {name} must be up for at least {self.switch.profile_guard} seconds "
                    f"to stop/restart.\nPlease wait {remain} second{'' if remain == 1 else 's'}\n"
                )
            self.switch.stop_profile(name)
            if action == "stop":
                return f"Reload XML [Success]\nstopping: {name}"
            self.switch.start_profile(name)
            return f"Reload XML [Success]\nrestarting: {name}"
        return "-ERR Unknown command!\n"

    def _api_fsctl(self, args: str) -> str | None:
        argv = args.split()
        if argv[:1] == ["recover"]:
            total = 0
            for p in list(self.switch.profiles.values()):
                if p.running:
                    total += self.switch.recover_profile(p.name)
            return f"+OK {total} session(s) recovered in total\n"
        if argv[:2] == ["shutdown", "now"] and self.switch.on_shutdown is not None:
            self.switch.on_shutdown()
            return None
        return "-ERR INVALID COMMAND\n"

    def _api_reloadxml(self, args: str) -> str:
        self.switch.fire(self.switch.events.make("RELOADXML", CALLING["RELOADXML"]))
        return "+OK [Success]\n"

    def _api_hash(self, args: str) -> str:
        parts = args.split("/", 3)
        usage = "-ERR Usage: hash [insert|delete|select]/<realm>/<key>/<val>\n"
        if len(parts) < 3 or not parts[1] or not parts[2]:
            return usage
        op, realm, key = parts[0].lower(), parts[1], parts[2]
        full = f"{realm}_{key}"
        store = self.switch.hashes.setdefault("", {})
        if op == "insert":
            if len(parts) < 4:
                return usage
            store[full] = parts[3]
            return "+OK\n"
        if op == "select":
            return store.get(full, "")
        if op == "delete":
            if full in store:
                del store[full]
                return "+OK\n"
            return "-ERR Not found\n"
        return usage

    def _api_uuid_exists(self, args: str) -> str:
        return "true" if args.split(" ")[0] in self.switch.channels else "false"

    def _api_hupall(self, args: str) -> str:
        """``hupall [CAUSE [VAR VALUE]]`` (mod_commands): hang up the matching channels."""
        argv = args.split()
        cause = argv[0] if argv else "SWITCH_CAUSE_MANAGER_REQUEST"
        cause = cause.removeprefix("SWITCH_CAUSE_") or "MANAGER_REQUEST"
        var, value = (argv[1], argv[2]) if len(argv) > 2 else (None, None)
        for ch in list(self.switch.channels.values()):
            if var is None or ch.variables.get(var) == value:
                self.switch.hangup(ch.uuid, cause)
        if var is None:
            return f"+OK hangup all channels with cause {cause}\n"
        return f"+OK hangup all channels matching [{var}]=[{value}] with cause: {cause}\n"

    def _api_uuid_kill(self, args: str) -> str:
        argv = args.split()
        if not argv:
            return "-USAGE: <uuid> [cause]\n"
        if argv[0] not in self.switch.channels:
            return "-ERR No such channel!\n"
        cause = argv[1] if len(argv) > 1 else "NORMAL_CLEARING"
        self.switch.hangup(argv[0], cause)
        return "+OK\n"

    def _api_originate(self, args: str) -> str:
        argv = args.split()
        usage = (
            "-USAGE: <call url> <exten>|&<application_name>(<app_args>) [<dialplan>] "
            "[<context>] [<cid_name>] [<cid_num>] [<timeout_sec>]\n"
        )
        if args.startswith("{") and "}" in args:
            # {vars} may hold spaces in 'quoted' values (execute_on_answer='limit ...')
            end = args.find("}")
            argv = args[end + 1 :].split()
            if argv:
                argv[0] = args[: end + 1] + argv[0]
        if len(argv) < 2:
            return usage
        url, target = argv[0], argv[1]
        variables: dict[str, str] = {}
        if url.startswith("{"):
            end = url.find("}")
            if end < 0:
                return usage
            for item in url[1:end].split(","):
                k, sep, v = item.partition("=")
                if sep and k:
                    if len(v) > 1 and v[0] == v[-1] == "'":
                        v = v[1:-1]
                    variables[k] = v
            url = url[end + 1 :]
        parts = url.split("/", 2)
        if len(parts) != 3 or parts[0] != "sofia":
            return "-ERR CHAN_NOT_IMPLEMENTED\n"
        _, profile_name, dest = parts
        profile = self.switch.profiles.get(profile_name)
        if profile is None or not profile.running:
            return "-ERR DESTINATION_OUT_OF_ORDER\n"
        if profile.standby:
            return "-ERR NORMAL_TEMPORARY_FAILURE\n"
        user, _, host = dest.partition("@")
        cid_name = argv[4] if len(argv) > 4 else variables.get("origination_caller_id_name", "")
        cid_num = argv[5] if len(argv) > 5 else variables.get("origination_caller_id_number", "")
        try:
            ch = self.switch.new_channel(
                profile_name,
                direction="outbound",
                caller=cid_num or "0000000000",
                caller_name=cid_name or "FreeSWITCH",
                dest=user,
                remote_ip=host or "127.0.0.1",
                uuid=variables.get("origination_uuid"),
                variables=variables,
            )
        except SimError:
            return "-ERR DESTINATION_OUT_OF_ORDER\n"
        specs, cause = self.switch._limits_of(variables)
        self.switch.answer(ch.uuid)
        if specs:
            self.switch._run_answered_limits(ch, specs, cause)
        if target.startswith("&"):
            app, _, rest = target[1:].partition("(")
            ch.application, ch.application_data = app, rest.rstrip(")")
            ch.app_log.append((app, ch.application_data, self.switch.clock.seconds()))
        else:
            ch.application, ch.application_data = "transfer", target
        return f"+OK {ch.uuid}\n"
