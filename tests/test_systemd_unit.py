"""The systemd unit ``contrib/systemd/fsha.service``.

Read with a small parser of the unit-file syntax (sections, repeated keys, backslash
continuations, comments) and checked for what running fsha needs; ``systemd-analyze
verify`` also checks it where systemd is installed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "systemd" / "fsha.service"
BIN = Path(sys.executable).parent


class UnitSyntaxError(Exception):
    pass


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) in file order; a key may repeat (systemd's syntax)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        if not pending and raw.lstrip().startswith(("#", ";")):
            continue
        line = pending + raw.strip() if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise UnitSyntaxError(f"line {number}: bad section header {line!r}")
            current = sections.setdefault(line[1:-1], [])
            continue
        if current is None:
            raise UnitSyntaxError(f"line {number}: assignment outside a section")
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise UnitSyntaxError(f"line {number}: not KEY=VALUE: {line!r}")
        current.append((key.strip(), value.strip()))
    if pending:
        raise UnitSyntaxError("file ends in a line continuation")
    return sections


class ParserTests(SynchronousTestCase):
    def test_syntax(self) -> None:
        unit = parse_unit("# c\n[A]\nX=1\n; c\nX=2 \\\n  more\n\n[B]\nY = a=b\n")
        self.assertEqual(unit, {"A": [("X", "1"), ("X", "2 more")], "B": [("Y", "a=b")]})
        for bad in ("X=1\n", "[A]\nnoequals\n", "[A\n", "[A]\nX=1 \\\n"):
            self.assertRaises(UnitSyntaxError, parse_unit, bad)


class UnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.unit = parse_unit(UNIT.read_text())

    def values(self, section: str, key: str) -> list[str]:
        return [v for k, v in self.unit.get(section, []) if k == key]

    def one(self, section: str, key: str) -> str:
        values = self.values(section, key)
        self.assertEqual(len(values), 1, f"[{section}] {key}: {values}")
        return values[0]

    def words(self, section: str, key: str) -> set[str]:
        return {w for v in self.values(section, key) for w in v.split()}

    def test_sections(self) -> None:
        self.assertEqual(list(self.unit), ["Unit", "Service", "Install"])
        self.assertIn("multi-user.target", self.words("Install", "WantedBy"))

    def test_ordering(self) -> None:
        self.assertLessEqual({"network-online.target", "freeswitch.service"},
                             self.words("Unit", "After"))
        self.assertIn("network-online.target", self.words("Unit", "Wants"))
        # FreeSWITCH is not required: fsha runs (unhealthy) without it.
        self.assertNotIn("freeswitch.service", self.words("Unit", "Requires"))
        self.assertNotIn("freeswitch.service", self.words("Unit", "BindsTo"))

    def test_runs_twistd_in_the_foreground(self) -> None:
        self.assertEqual(self.one("Service", "Type"), "simple")
        argv = shlex.split(self.one("Service", "ExecStart"))
        self.assertTrue(argv[0].startswith("/") and argv[0].endswith("/twistd"), argv)
        self.assertEqual(argv[1:], ["-n", "--pidfile=", "fsha", "--config",
                                    "/etc/fsha/cluster.toml"])
        # The config is checked before the start, with the same file.
        pre = shlex.split(self.one("Service", "ExecStartPre"))
        self.assertEqual(pre[1:], ["check-config", "/etc/fsha/cluster.toml"])
        self.assertEqual(Path(pre[0]).parent, Path(argv[0]).parent)

    def test_restart_and_stop(self) -> None:
        self.assertEqual(self.one("Service", "Restart"), "on-failure")
        self.assertRegex(self.one("Service", "RestartSec"), r"^[1-9]\d*s?$")
        self.assertIn("2", self.words("Service", "RestartPreventExitStatus"))  # bad config
        self.assertEqual(self.one("Service", "KillSignal"), "SIGTERM")
        # Not mixed: when a killed daemon exits, mixed SIGKILLs the rest of the unit at once,
        # its guard included, before the guard could drop the slot (fsha.guard). An ip or
        # arping started during the hand-over is not signalled: SIGTERM goes to the
        # processes of the moment.
        self.assertEqual(self.one("Service", "KillMode"), "control-group")
        # and after any stop, a crash included, nothing of a slot is left on the host
        post = shlex.split(self.one("Service", "ExecStopPost").removeprefix("-"))
        self.assertEqual(post[1:], ["reconcile", "--config", "/etc/fsha/cluster.toml"])
        self.assertEqual(Path(post[0]).name, "fsha")
        stop = self.one("Service", "TimeoutStopSec")
        self.assertRegex(stop, r"^\d+s?$")
        self.assertGreaterEqual(int(stop.rstrip("s")), 30)

    def test_capabilities(self) -> None:
        needed = {"CAP_NET_ADMIN", "CAP_NET_RAW"}
        self.assertEqual(self.words("Service", "AmbientCapabilities"), needed)
        self.assertEqual(self.words("Service", "CapabilityBoundingSet"), needed)
        self.assertNotEqual(self.one("Service", "User"), "root")

    def test_hardening_keeps_ip_and_arping_working(self) -> None:
        self.assertEqual(self.one("Service", "NoNewPrivileges"), "yes")
        self.assertEqual(self.one("Service", "ProtectSystem"), "strict")
        self.assertEqual(self.one("Service", "PrivateTmp"), "yes")
        self.assertTrue(self.values("Service", "ReadWritePaths")
                        or self.values("Service", "StateDirectory"))
        # ip speaks netlink, arping sends on a packet socket, heartbeats are UDP, the
        # status endpoint and replication are TCP.
        self.assertLessEqual({"AF_NETLINK", "AF_PACKET", "AF_INET", "AF_INET6", "AF_UNIX"},
                             self.words("Service", "RestrictAddressFamilies"))
        # The host's network, where the floating IPs live.
        self.assertNotIn("yes", self.values("Service", "PrivateNetwork"))
        self.assertEqual(self.values("Service", "IPAddressDeny"), [])
        self.assertEqual(self.values("Service", "NetworkNamespacePath"), [])

    def test_systemd_analyze_verify(self) -> None:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise self.skipTest("systemd-analyze not installed; the unit's content is "
                                "checked by the other tests")
        with tempfile.TemporaryDirectory(prefix="fsha-unit-") as tmp:
            # verify wants the commands to exist: point them at this environment's scripts.
            copy = Path(tmp) / "fsha.service"
            copy.write_text(UNIT.read_text().replace("/opt/fsha/bin", str(BIN)))
            result = subprocess.run([analyze, "verify", str(copy)], capture_output=True,
                                    text=True, timeout=60)
            ours = [line for line in (result.stdout + result.stderr).splitlines()
                    if "fsha.service" in line]
            self.assertEqual(result.returncode, 0, result.stderr)
            # Unknown keys and unparsable values are only warnings to systemd: fail on them.
            self.assertEqual(ours, [])


class CapabilityTests(SynchronousTestCase):
    """The unit's capability model, applied with setpriv in a throwaway network namespace:
    a non-root user with exactly the unit's ambient and bounding capabilities and no new
    privileges can add and delete an address with ``ip`` and send gratuitous ARP."""

    def test_ip_and_arping_work_with_the_units_capabilities(self) -> None:
        tools = {t: shutil.which(t) for t in ("ip", "arping", "setpriv")}
        if os.geteuid() != 0 or None in tools.values():
            missing = [t for t, path in tools.items() if path is None]
            raise self.skipTest("needs root and ip, arping, setpriv (iproute2, "
                                f"iputils-arping, util-linux); missing: {missing or 'root'}")
        unit = parse_unit(UNIT.read_text())["Service"]
        ambient = next(v for k, v in unit if k == "AmbientCapabilities").split()
        bounding = next(v for k, v in unit if k == "CapabilityBoundingSet").split()
        caps = ",".join("+" + c.removeprefix("CAP_").lower() for c in ambient)
        bset = ",".join("+" + c.removeprefix("CAP_").lower() for c in bounding)
        netns = f"fsha-cap-{os.getpid()}"
        run = subprocess.run
        made = run(["ip", "netns", "add", netns], capture_output=True, text=True, timeout=30)
        if made.returncode != 0:
            raise self.skipTest(f"cannot create a network namespace: {made.stderr.strip()}")
        self.addCleanup(run, ["ip", "netns", "del", netns], capture_output=True, timeout=30)
        for argv in (["link", "add", "fsha0", "type", "veth", "peer", "name", "fsha1"],
                     ["link", "set", "fsha0", "up"], ["link", "set", "fsha1", "up"]):
            step = run(["ip", "-n", netns, *argv], capture_output=True, text=True, timeout=30)
            self.assertEqual(step.returncode, 0, step.stderr)
        script = ("ip addr add 198.18.0.5/32 dev fsha0 && "
                  "arping -U -c 1 -I fsha0 198.18.0.5 && "
                  "ip addr del 198.18.0.5/32 dev fsha0")

        def as_unit(capabilities: str, bounding_set: str) -> subprocess.CompletedProcess[str]:
            return run(["ip", "netns", "exec", netns, "setpriv", "--reuid=65534",
                        "--regid=65534", "--clear-groups", f"--inh-caps=-all{capabilities}",
                        f"--ambient-caps=-all{capabilities}",
                        f"--bounding-set=-all{bounding_set}", "--no-new-privs",
                        "sh", "-c", script], capture_output=True, text=True, timeout=30)
        ok = as_unit("," + caps, "," + bset)
        self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
        # And the check can fail: without the capabilities, ip is refused.
        refused = as_unit("", "")
        self.assertNotEqual(refused.returncode, 0)
        # fsha's own netlink path (no ip, no arping) with the same capabilities, and not
        # without them. As root stripped of every other capability: the interpreter may
        # live where only its owner can read it.
        script = ("from fsha import kernelnet as k; n = k.LinuxNet(5.0); "
                  "n.change('add', '198.18.0.5', 32, 'fsha0'); "
                  "assert n.garp('198.18.0.5', 'fsha0'); "
                  "n.change('del', '198.18.0.5', 32, 'fsha0'); print('done')")
        src = str(Path(__file__).resolve().parent.parent)

        def python_as_unit(capabilities: str, bounding_set: str
                           ) -> subprocess.CompletedProcess[str]:
            return run(["ip", "netns", "exec", netns, "setpriv",
                        f"--inh-caps=-all{capabilities}",
                        f"--ambient-caps=-all{capabilities}",
                        f"--bounding-set=-all{bounding_set}", "--no-new-privs",
                        "env", f"PYTHONPATH={src}", sys.executable, "-c", script],
                       capture_output=True, text=True, timeout=30)
        ok = python_as_unit("," + caps, "," + bset)
        self.assertEqual((ok.returncode, ok.stdout.strip()), (0, "done"), ok.stderr)
        refused = python_as_unit("", "")
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn("Operation not permitted", refused.stderr)
