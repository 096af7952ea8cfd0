"""The OCF resource agent ``contrib/ocf/fsha``, run for real.

Its meta-data is checked against the OCF rules (the resource-agents DTD, restated here so
the check needs no package), validate-all against good and bad configs, and start /
monitor / stop against a real node of a loopback cluster with real simulators. The agent
runs under ``dash`` when installed (Debian's /bin/sh, which has no bash extensions), and
without resource-agents' ocf-shellfuncs (its own fallback) unless a test says otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from fsha.harness import HarnessError, LoopbackCluster, wait_for

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "contrib" / "ocf" / "fsha"
BIN = Path(sys.executable).parent  # the environment's twistd and fsha scripts
SHELL = shutil.which("dash") or "/bin/sh"
SHELLFUNCS = Path("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs")

OCF_SUCCESS, OCF_ERR_GENERIC, OCF_ERR_UNIMPLEMENTED = 0, 1, 3
OCF_ERR_INSTALLED, OCF_ERR_CONFIGURED, OCF_NOT_RUNNING = 5, 6, 7

# From resource-agents' ra-api-1.dtd (OCF 1.1 meta-data).
ACTION_NAMES = {"start", "stop", "recover", "monitor", "restart", "migrate_to",
                "migrate_from", "promote", "demote", "notify", "status", "reload",
                "meta-data", "usage", "methods", "validate-all"}
CONTENT_TYPES = {"string", "integer", "boolean", "time", "second", "select"}


class AgentRun:
    """Runs the agent with an OCF environment (no ocf-shellfuncs unless ``shellfuncs``)."""

    def __init__(self, instance: str = "fsha-test", shellfuncs: bool = False,
                 **params: str) -> None:
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "OCF_ROOT": "/usr/lib/ocf", "OCF_RA_VERSION_MAJOR": "1",
                    "OCF_RA_VERSION_MINOR": "1", "OCF_RESOURCE_INSTANCE": instance,
                    "OCF_RESKEY_twistd": str(BIN / "twistd"),
                    "OCF_RESKEY_fsha": str(BIN / "fsha"),
                    "OCF_RESKEY_CRM_meta_interval": "10000"}
        if not shellfuncs:
            self.env["OCF_FUNCTIONS_DIR"] = "/nonexistent/ocf-shellfuncs-not-here"
        for key, value in params.items():
            self.env[f"OCF_RESKEY_{key}"] = value

    def __call__(self, action: str, timeout: float = 60.0, **extra: str
                 ) -> subprocess.CompletedProcess[str]:
        env = dict(self.env, **extra)
        return subprocess.run([SHELL, str(AGENT), action], env=env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class MetaDataTests(SynchronousTestCase):
    def check_meta_data(self, run: AgentRun) -> None:
        result = run("meta-data")
        self.assertEqual(result.returncode, OCF_SUCCESS, result.stderr)
        root = ET.fromstring(result.stdout)
        self.assertEqual(root.tag, "resource-agent")
        self.assertEqual(root.get("name"), "fsha")
        # Children in the DTD's order: version, longdesc, shortdesc, parameters, actions.
        self.assertEqual([c.tag for c in root],
                         ["version", "longdesc", "shortdesc", "parameters", "actions"])
        self.assertEqual(root.findtext("version"), "1.1")
        for desc in ("longdesc", "shortdesc"):
            element = root.find(desc)
            assert element is not None
            self.assertEqual(element.get("lang"), "en")
            self.assertTrue((element.text or "").strip())

        params = {}
        for p in root.findall("parameters/parameter"):
            self.assertEqual([c.tag for c in p], ["longdesc", "shortdesc", "content"])
            self.assertIn(p.get("required", "0"), ("0", "1"))
            self.assertIn(p.get("unique", "0"), ("0", "1"))
            content = p.find("content")
            assert content is not None
            self.assertIn(content.get("type"), CONTENT_TYPES)
            params[p.get("name")] = content
        self.assertEqual(set(params), {"config", "node", "twistd", "fsha", "status_timeout",
                                       "state_dir", "logfile"})
        self.assertEqual(params["config"].get("default"), "/etc/fsha/cluster.toml")
        self.assertEqual(params["status_timeout"].get("type"), "integer")

        actions = {}
        for a in root.findall("actions/action"):
            self.assertIn(a.get("name"), ACTION_NAMES)
            self.assertRegex(a.get("timeout") or "", r"^\d+s?$")
            actions[a.get("name")] = a
        self.assertLessEqual({"start", "stop", "monitor", "validate-all", "meta-data"},
                             set(actions))
        self.assertRegex(actions["monitor"].get("interval") or "", r"^\d+s?$")
        # The stop timeout leaves the node time for a clean hand-over plus the SIGKILL margin.
        self.assertGreaterEqual(int(actions["stop"].get("timeout", "0").rstrip("s")), 30)

    def test_meta_data_without_shellfuncs(self) -> None:
        self.check_meta_data(AgentRun())

    def test_meta_data_with_shellfuncs(self) -> None:
        if not SHELLFUNCS.exists():
            raise self.skipTest(f"resource-agents not installed ({SHELLFUNCS} missing); "
                                "the fallback is tested without it")
        self.check_meta_data(AgentRun(shellfuncs=True))

    def test_unknown_action_is_unimplemented(self) -> None:
        for action in ("promote", "notify", "frobnicate"):
            self.assertEqual(AgentRun()(action).returncode, OCF_ERR_UNIMPLEMENTED, action)

    def test_posix_shell_only(self) -> None:
        """No bash extensions: the agent parses under dash, and none of the usual
        bashisms appear outside comments and the meta-data text."""
        if shutil.which("dash"):
            check = subprocess.run(["dash", "-n", str(AGENT)], capture_output=True,
                                   text=True, timeout=30)
            self.assertEqual(check.returncode, 0, check.stderr)
        text = AGENT.read_text()
        self.assertTrue(text.startswith("#!/bin/sh\n"))
        without_heredocs = re.sub(r"<<EOF\n.*?\nEOF\n", "\n", text, flags=re.DOTALL)
        code = "\n".join(line for line in without_heredocs.splitlines()
                         if not line.lstrip().startswith("#"))
        self.assertIn("fsha_start()", code)
        self.assertNotIn("<resource-agent", code)
        for pattern in (r"\[\[", r"\bfunction\s", r"\blocal\s", r"\bsource\s", r"<<<",
                        r"\$'", r"\$\{\w+//", r"\$\{\w+:\d", r"\w+=\(", r"&>", r"\bdeclare\b",
                        r"\$RANDOM", r"\becho -e\b", r"\[ [^]]*==", r"\bpushd\b"):
            self.assertIsNone(re.search(pattern, code), f"bashism {pattern!r} in the agent")
        self.assertTrue(os.access(AGENT, os.X_OK), "the agent must be executable (0755)")


class ValidateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fsha-ocf-"))
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    def write_config(self) -> Path:
        """A valid one-network, two-node config (no TLS: nothing else to provide)."""
        secret = self.dir / "cluster.secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("0123456789abcdef0123456789abcdef")
        config = self.dir / "cluster.toml"
        lines = ["[cluster]", 'name = "t"', 'secret_file = "cluster.secret"', "",
                 "[state]", 'dir = "state/{node}"', "",
                 "[floating_ip]", 'backend = "loopback"', "",
                 "[[network]]", 'name = "A"', "port = 30000", ""]
        for i in (1, 2):
            lines += ["[[node]]", f'name = "fs{i}"', "priority = 100",
                      f'address = {{ A = "127.0.1.{i}" }}', f'stream = "127.0.1.{i}:30001"',
                      f'status = "127.0.1.{i}:30002"',
                      f'esl = {{ host = "127.0.3.{i}", port = 8021, password = "x" }}', ""]
        lines += ["[[slot]]", 'name = "slot1"', 'profiles = ["slot1"]',
                  'ip = [{ address = "127.0.10.1/32", interface = "lo" }]', ""]
        config.write_text("\n".join(lines))
        return config

    def test_good_config(self) -> None:
        config = self.write_config()
        result = AgentRun(config=str(config), node="fs1")("validate-all")
        self.assertEqual(result.returncode, OCF_SUCCESS, result.stderr)

    def test_bad_config_is_err_configured(self) -> None:
        config = self.write_config()
        config.write_text(config.read_text().replace('backend = "loopback"',
                                                     'backend = "teleport"'))
        result = AgentRun(config=str(config), node="fs1")("validate-all")
        self.assertEqual(result.returncode, OCF_ERR_CONFIGURED, result.stderr)
        # Pacemaker shows the exit reason: it names the file and the key.
        reason = [line for line in result.stderr.splitlines()
                  if line.startswith("ocf-exit-reason:")]
        self.assertEqual(len(reason), 1, result.stderr)
        self.assertIn(str(config), reason[0])
        self.assertIn("floating_ip", reason[0])

    def test_not_toml_is_err_configured(self) -> None:
        config = self.dir / "cluster.toml"
        config.write_bytes(b"\xff\x00[[[ not toml\n")
        result = AgentRun(config=str(config))("validate-all")
        self.assertEqual(result.returncode, OCF_ERR_CONFIGURED, result.stderr)

    def test_unknown_node_is_err_configured(self) -> None:
        config = self.write_config()
        result = AgentRun(config=str(config), node="fs9")("validate-all")
        self.assertEqual(result.returncode, OCF_ERR_CONFIGURED, result.stderr)
        self.assertIn("fs9", result.stderr)

    def test_bad_status_timeout_is_err_configured(self) -> None:
        config = self.write_config()
        for value in ("0", "soon", "-3", "1.5"):
            result = AgentRun(config=str(config), status_timeout=value)("validate-all")
            self.assertEqual(result.returncode, OCF_ERR_CONFIGURED, value)

    def test_missing_files_are_err_installed(self) -> None:
        config = self.write_config()
        missing = AgentRun(config=str(self.dir / "nope.toml"))("validate-all")
        self.assertEqual(missing.returncode, OCF_ERR_INSTALLED, missing.stderr)
        no_twistd = AgentRun(config=str(config), twistd=str(self.dir / "no-twistd"))
        self.assertEqual(no_twistd("validate-all").returncode, OCF_ERR_INSTALLED)

    def test_start_refuses_bad_config(self) -> None:
        """start validates first: nothing is launched, no pidfile is left."""
        config = self.dir / "cluster.toml"
        config.write_text("[cluster]\n")
        state = self.dir / "state"
        result = AgentRun(config=str(config), state_dir=str(state))("start")
        self.assertEqual(result.returncode, OCF_ERR_CONFIGURED, result.stderr)
        self.assertFalse((state / "fsha-test.pid").exists())

    def test_stop_and_probe_when_never_started(self) -> None:
        run = AgentRun(config=str(self.dir / "nope.toml"), state_dir=str(self.dir / "s"),
                       twistd="/nonexistent/twistd", fsha="/nonexistent/fsha")
        probe = run("monitor", OCF_RESKEY_CRM_meta_interval="0")
        self.assertEqual(probe.returncode, OCF_NOT_RUNNING, probe.stderr)
        self.assertEqual(run("stop").returncode, OCF_SUCCESS)


class LifecycleTests(SynchronousTestCase):
    """fs1 of a two-node loopback cluster runs under the agent; fs2 runs as usual."""

    def setUp(self) -> None:
        cluster = self.cluster = LoopbackCluster(nodes=2, slots=1)
        self.addCleanup(cluster.close)
        for node in cluster.nodes:
            cluster.start_sim(node)
        for node in cluster.nodes:
            cluster.wait_sim(node, 30)
        cluster.write_config()
        cluster.start_node(cluster.node("fs2"))
        self.state = cluster.dir / "state"
        self.pidfile = self.state / "fsha-fs1.pid"
        self.run_agent = AgentRun("fsha-fs1", config=str(cluster.config_path), node="fs1",
                                  state_dir=str(self.state), status_timeout="20",
                                  logfile=str(cluster.dir / "fs1-agent.log"))
        self.addCleanup(self.kill_leftover)

    def kill_leftover(self) -> None:
        """Whatever a failing test left behind: the daemon runs in its own session."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def agent(self, action: str, expected: int, **extra: str) -> subprocess.CompletedProcess[str]:
        result = self.run_agent(action, **extra)
        if result.returncode != expected:
            log = self.cluster.dir / "fs1-agent.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            self.fail(f"{action}: exit {result.returncode}, expected {expected}\n"
                      f"{result.stderr}\n--- fs1 log\n{tail}")
        return result

    def pid(self) -> int:
        return int(self.pidfile.read_text().strip())

    def gone(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    def fs2_sees_fs1(self) -> bool:
        status = self.cluster.status(self.cluster.node("fs2"))
        return any(n["name"] == "fs1" and n["alive"] for n in status["nodes"])

    def test_start_monitor_stop(self) -> None:
        self.agent("monitor", OCF_NOT_RUNNING, OCF_RESKEY_CRM_meta_interval="0")  # probe
        self.agent("stop", OCF_SUCCESS)
        self.agent("start", OCF_SUCCESS)
        pid = self.pid()
        self.agent("monitor", OCF_SUCCESS)
        self.agent("monitor", OCF_SUCCESS, OCF_RESKEY_CRM_meta_interval="0")
        # A real member of the cluster: its peer hears it.
        try:
            wait_for("fs2 to hear fs1", self.fs2_sees_fs1, timeout=20)
        except HarnessError:
            self.fail(self.cluster.logs("fs2"))
        self.agent("start", OCF_SUCCESS)  # already running: nothing new
        self.assertEqual(self.pid(), pid)

        self.agent("stop", OCF_SUCCESS)
        self.assertTrue(self.gone(pid))
        self.assertFalse(self.pidfile.exists())
        self.agent("monitor", OCF_NOT_RUNNING)
        self.agent("stop", OCF_SUCCESS)  # stopping a stopped resource succeeds
        self.agent("monitor", OCF_NOT_RUNNING)

    def test_kill_9_and_hung_node(self) -> None:
        self.agent("start", OCF_SUCCESS)
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        wait_for("the killed node to be gone", lambda: self.gone(pid), timeout=10)
        self.agent("monitor", OCF_NOT_RUNNING)
        self.assertTrue(self.pidfile.exists(), "kill -9 leaves the pidfile behind")
        self.agent("stop", OCF_SUCCESS)
        self.assertFalse(self.pidfile.exists())
        self.agent("stop", OCF_SUCCESS)

        # Restart over the stale state, then freeze the process: it runs but does not answer.
        self.agent("start", OCF_SUCCESS)
        pid = self.pid()
        os.kill(pid, signal.SIGSTOP)
        # a stopped process cannot answer however long monitor waits: 1 s is plenty
        result = self.agent("monitor", OCF_ERR_GENERIC, OCF_RESKEY_status_timeout="1")
        self.assertIn("ocf-exit-reason:", result.stderr)
        # stop escalates to SIGKILL once its share of the action timeout is spent.
        result = self.agent("stop", OCF_SUCCESS, OCF_RESKEY_CRM_meta_timeout="6000")
        self.assertIn("SIGKILL", result.stderr)
        self.assertTrue(self.gone(pid))
        self.assertFalse(self.pidfile.exists())
        self.agent("monitor", OCF_NOT_RUNNING)

    def test_with_shellfuncs(self) -> None:
        """The same agent with resource-agents' ocf-shellfuncs, where installed."""
        if not SHELLFUNCS.exists():
            raise self.skipTest(f"resource-agents not installed ({SHELLFUNCS} missing); "
                                "the fallback is tested without it")
        self.run_agent.env.pop("OCF_FUNCTIONS_DIR")
        self.agent("monitor", OCF_NOT_RUNNING, OCF_RESKEY_CRM_meta_interval="0")
        self.agent("start", OCF_SUCCESS)
        self.agent("monitor", OCF_SUCCESS)
        self.agent("stop", OCF_SUCCESS)
        self.agent("monitor", OCF_NOT_RUNNING)
