"""Operating a cluster (issue 13): start-up checks that end in one line, logs, history,
notify hooks, maintenance kept across a restart; the process tests run real ``twistd``
nodes (fsha.harness)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fsha import startup
from fsha.config import parse_config
from fsha.harness import FSHA, TWISTD, LoopbackCluster, wait_for
from fsha.history import StateDir, read_history
from fsha.logs import logfile_argument, render_json
from fsha.notify import Notifier
from fsha.status import event_text

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "conf" / "demo.toml"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StartupCheckTests(SynchronousTestCase):
    def config(self, backend: str = "loopback") -> Any:
        import tomllib

        raw = tomllib.loads(DEMO.read_text())
        raw["floating_ip"] = {"backend": backend}
        return parse_config(raw, DEMO)

    def test_ip_backend_needs_its_tools_and_capabilities(self) -> None:
        config = self.config("ip")
        everything = (1 << 64) - 1
        startup.check_backend(config, which=lambda t: f"/usr/bin/{t}",
                              capabilities=lambda: everything)
        with self.assertRaises(startup.StartupError) as caught:
            startup.check_backend(config, which=lambda t: None if t == "arping" else "/x",
                                  capabilities=lambda: everything)
        self.assertIn("arping (iputils-arping): not found", str(caught.exception))
        no_raw = everything & ~(1 << startup.CAP_NET_RAW)
        with self.assertRaises(startup.StartupError) as caught:
            startup.check_backend(config, which=lambda t: "/x", capabilities=lambda: no_raw)
        message = str(caught.exception)
        self.assertIn("needs CAP_NET_RAW", message)
        self.assertNotIn("CAP_NET_ADMIN and", message)
        self.assertNotIn("\n", message)
        # the loopback backend needs neither
        startup.check_backend(self.config(), which=lambda t: None, capabilities=lambda: 0)

    def test_capabilities_read_from_proc_status(self) -> None:
        path = Path(self.mktemp())
        path.write_text("Name:\tx\nCapEff:\t0000000000003000\n")
        self.assertEqual(startup.effective_capabilities(path), 0x3000)
        self.assertIsNone(startup.effective_capabilities(Path("/nonexistent")))


class DropWindowTests(SynchronousTestCase):
    def test_counts_by_reason_and_source_over_the_window_only(self) -> None:
        from fsha.dropwindow import DropWindow

        window = DropWindow(bucket=10, window=60)
        for t in range(0, 100):
            window.add("tag", "10.0.0.9" if t % 2 else "10.0.0.8", float(t))
        recent = window.recent(100.0)
        self.assertEqual(recent["window_s"], 60)
        counts = recent["by_reason"]["tag"]
        self.assertLessEqual(sum(counts.values()), 70)  # the last 60-70 s, not all 100
        self.assertGreaterEqual(sum(counts.values()), 60)
        self.assertEqual(window.recent(1000.0)["by_reason"], {})


class LogTests(SynchronousTestCase):
    def test_logfile_argument(self) -> None:
        self.assertEqual(logfile_argument(["twistd", "-n", "--logfile=/x.log", "fsha"]),
                         "/x.log")
        self.assertEqual(logfile_argument(["twistd", "--logfile", "/y", "fsha"]), "/y")
        self.assertEqual(logfile_argument(["twistd", "-l", "/z", "-n", "fsha"]), "/z")
        self.assertEqual(logfile_argument(["twistd", "-l/w", "fsha"]), "/w")
        self.assertIsNone(logfile_argument(["twistd", "-n", "fsha", "--logfile", "/no"]))
        self.assertIsNone(logfile_argument(["twistd", "--logfile=-", "fsha"]))

    def test_json_lines_carry_the_rendered_text(self) -> None:
        line = render_json({"log_format": "peer {peer} is down", "peer": "fs2",
                            "log_level": None, "log_namespace": "fsha.node", "log_time": 1.0})
        event = json.loads(line)
        self.assertEqual(event["text"], "peer fs2 is down")
        self.assertEqual(event["peer"], "fs2")

    def test_events_render_without_python_reprs(self) -> None:
        text = event_text({"time": 1.0, "event": "takeover-acquire", "slot": "slot1",
                           "epoch": 3, "ok": True, "steps_ms": {"fence": 1.5, "ips": 2.0},
                           "warnings": [], "dead_claimers": ["fs1", "fs2"]})
        self.assertEqual(text, "takeover-acquire slot=slot1 epoch=3 ok=yes "
                               "steps_ms=[fence 1.5; ips 2] dead_claimers=[fs1, fs2]")
        self.assertNotIn("{", text)


class HistoryTests(SynchronousTestCase):
    def test_rotated_history_reads_back_in_order_with_takeover_ids(self) -> None:
        folder = Path(self.mktemp())
        state = StateDir(folder, "fs1", max_bytes=10_000, files=3)
        for i in range(400):
            state.record({"time": float(i), "event": "master", "slot": "slot1", "epoch": i})
        state.close()
        self.assertTrue((folder / "history.jsonl.1").exists())
        self.assertFalse((folder / "history.jsonl.3").exists())  # 3 files in all
        entries = read_history(folder)
        times = [e["time"] for e in entries]
        self.assertEqual(times, sorted(times))
        self.assertEqual(times[-1], 399.0)
        self.assertLess(len(entries), 400)  # the oldest rotated away
        last = read_history(folder, limit=2)
        self.assertEqual([e["takeover"] for e in last], ["slot1/398", "slot1/399"])
        self.assertEqual(read_history(folder, takeover="slot1/399")[0]["node"], "fs1")

    def test_maintenance_flag_and_config_changes(self) -> None:
        state = StateDir(Path(self.mktemp()), "fs1")
        self.assertFalse(state.maintenance())
        state.set_maintenance(True)
        self.assertTrue(StateDir(state.path, "fs1").maintenance())
        state.set_maintenance(False)
        self.assertFalse(state.maintenance())
        self.assertIsNone(state.config_changed("aa"))  # first run
        self.assertIsNone(state.config_changed("aa"))
        self.assertEqual(state.config_changed("bb"), "aa")


class FakeRunner:
    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.runs: list[tuple[list[str], float, dict[str, str]]] = []
        self.pending: list[Deferred[Any]] = []
        self._deferred = Deferred

    def run(self, argv: list[str], timeout: float, env: dict[str, str]) -> Any:
        self.runs.append((list(argv), timeout, dict(env)))
        d = self._deferred()
        self.pending.append(d)
        return d


class NotifierTests(SynchronousTestCase):
    def notifier(self, **kw: Any) -> tuple[Notifier, FakeRunner, Clock]:
        from fsha.config import NotifyConfig

        clock, runner = Clock(), FakeRunner()
        config = NotifyConfig(("/bin/notify", "-v"), 2.0, **kw)
        return Notifier(config, "demo", "fs3", clock, runner), runner, clock  # type: ignore[arg-type]

    def test_runs_later_with_the_event_as_arguments_and_environment(self) -> None:
        notifier, runner, clock = self.notifier()
        notifier.event({"time": 5.0, "event": "takeover-acquire", "slot": "slot1",
                        "epoch": 7, "ok": True})
        notifier.event({"time": 5.0, "event": "peer-up", "peer": "fs1"})  # not chosen
        self.assertEqual(runner.runs, [])  # never inside the node's transition
        clock.advance(0)
        [(argv, timeout, env)] = runner.runs
        self.assertEqual(argv, ["/bin/notify", "-v", "takeover-acquire", "fs3", "slot1", "7"])
        self.assertEqual(timeout, 2.0)
        self.assertEqual((env["FSHA_EVENT"], env["FSHA_TAKEOVER"], env["FSHA_CLUSTER"]),
                         ("takeover-acquire", "slot1/7", "demo"))
        self.assertTrue(json.loads(env["FSHA_EVENT_JSON"])["ok"])

    def test_bounded_concurrency_and_failures_counted(self) -> None:
        notifier, runner, clock = self.notifier(max_running=2)
        for i in range(5):
            notifier.event({"time": float(i), "event": "role", "role": "slave"})
        clock.advance(0)
        self.assertEqual(len(runner.runs), 2)
        runner.pending[0].errback(RuntimeError("exit code 3"))
        self.assertEqual(len(runner.runs), 3)
        self.assertEqual(notifier.status()["failed"], 1)
        self.assertIn("exit code 3", notifier.status()["last_error"])


# -- real processes -------------------------------------------------------------------------


def demo_config(folder: Path, **replace: int) -> Path:
    """conf/demo.toml with free ports, in ``folder``."""
    text = DEMO.read_text()
    for old in ("17400", "17401", "17410", "17420"):
        kind = socket.SOCK_DGRAM if old in ("17400", "17401") else socket.SOCK_STREAM
        text = text.replace(old, str(replace.get(old) or free_port(kind)))
    text = text.replace('secret_file = "demo.secret"', f'secret_file = "{ROOT}/conf/demo.secret"')
    text = text.replace("[floating_ip]", '[state]\ndir = "state/{node}"\n\n[floating_ip]')
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cluster.toml"
    path.write_text(text)
    return path


class StartupProcessTests(SynchronousTestCase):
    def test_port_in_use_is_one_line_and_exit_2(self) -> None:
        port = free_port()
        with socket.socket() as taken:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            taken.bind(("127.0.1.1", port))
            taken.listen()
            path = demo_config(Path(self.mktemp()).absolute(), **{"17420": port})
            run = subprocess.run([*TWISTD, "-n", "--pidfile=", "fsha", "--config", str(path),
                                  "--node", "fs1"], capture_output=True, text=True, timeout=60)
        self.assertEqual(run.returncode, 2, run.stdout + run.stderr)
        self.assertEqual(run.stderr.strip().splitlines(), [
            f"fsha: node fs1: status address 127.0.1.1:{port} is in use (another fsha, "
            "or another program, listens there)"])

    def test_json_logger_writes_to_logfile_with_text(self) -> None:
        folder = Path(self.mktemp()).absolute()
        path = demo_config(folder)
        logfile = folder / "fs1.log"
        proc = subprocess.Popen([*TWISTD, "-n", "--pidfile=", "--logger=fsha.logs.json",
                                 f"--logfile={logfile}", "fsha", "--config", str(path),
                                 "--node", "fs1"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def started() -> dict[str, Any] | None:
                for line in logfile.read_text().splitlines():
                    event = json.loads(line)
                    if "starting (incarnation" in event.get("text", ""):
                        return event
                return None
            event = wait_for("a JSON line with the start in the logfile", started, 60)
            self.assertEqual(event["node"], "fs1")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        # the node's own lines went to the file, none to standard output (the guard, a
        # process of its own, logs there)
        self.assertNotIn(b"fsha.node", out)


NOTIFY_SCRIPT = """\
import json, os, sys
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "notify-" + sys.argv[2] + ".log"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "takeover": os.environ["FSHA_TAKEOVER"]}) + "\\n")
"""


class OperationsClusterTests(SynchronousTestCase):
    """One 3-node cluster: maintenance kept across a restart, a kill -9, then the history
    of every node, the notify hook's runs, and the logs."""

    def test_history_notify_maintenance_and_logs(self) -> None:
        cluster = LoopbackCluster(3, 2, workdir=Path(self.mktemp()).absolute(),
                                  json_logs=True, interval_ms=50, dead_after_ms=250)
        self.addCleanup(cluster.close)
        script = cluster.dir / "notify.py"  # it writes its logs beside itself
        script.write_text(NOTIFY_SCRIPT)
        cluster.extra_config = textwrap.dedent(f"""\
            [notify]
            command = [{json.dumps(sys.executable)}, {json.dumps(str(script))}]
            timeout_ms = 20000
            """)
        cluster.start()
        cluster.wait_converged(60)

        def fsha(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*FSHA, *args, "--config", str(cluster.config_path)],
                                  capture_output=True, text=True, timeout=120)

        owners = {s["name"]: s["owner"] for s in cluster.wait_converged(60)["slots"]}
        [spare] = [n.name for n in cluster.nodes if n.name not in owners.values()]
        # maintenance is kept across a restart, and told in plain text
        on = fsha("maintenance", spare, "on", "--wait", "30")
        self.assertEqual(on.returncode, 0, on.stderr)
        self.assertIn(f"{spare}: maintenance on; it held no slot", on.stdout)
        self.assertNotIn("{", on.stdout)
        cluster.stop(spare, timeout=60)
        stopped = wait_for("status --all to tell the spare stopped", lambda: (
            r := fsha("status", "--all")).returncode == 1
            and f"{spare} stopped cleanly" in r.stdout and r, 30)
        self.assertIn("NO ANSWER", stopped.stdout)
        cluster.restart(spare)
        wait_for("the spare back, still in maintenance", lambda: "maintenance" in next(
            n for n in cluster.status(cluster.node(spare))["nodes"] if n["self"])["flags"]
            and cluster.status(cluster.node(spare))["role"] == "slave", 60)
        off = fsha("maintenance", spare, "off", "--wait", "30")
        self.assertEqual(off.returncode, 0, off.stderr)

        # a drill of slot2 with calls and registrations, and back
        home = wait_for("slot2 mastered", lambda: cluster.owner("slot2"), 30)
        cluster.sim_control(home, "/calls", {"profile": "slot2", "count": 20, "answer": True})
        cluster.sim_control(home, "/register", {"profile": "slot2", "count": 5})
        wait_for("the calls and registrations on every node", lambda: all(
            st["replication"]["slots"].get("slot2", {}).get("call", 0) == 20
            and st["replication"]["slots"]["slot2"].get("registration", 0) == 5
            for st in cluster.statuses().values()), 30)
        sip = str(cluster.sip_port)
        drill = fsha("drill", "slot2", "--sip-port", sip, "--wait", "60")
        self.assertEqual(drill.returncode, 0, drill.stdout + drill.stderr)
        self.assertIn(f"drill of slot2: {home} -> {spare}", drill.stdout)
        self.assertIn("ok   calls recovered 20 of 20", drill.stdout)
        self.assertIn("ok   registrations restored 5 of 5", drill.stdout)
        self.assertRegex(drill.stdout, r"after: 127\.0\.10\.2:\d+ answered SIP/2\.0 200")
        self.assertTrue(drill.stdout.rstrip().endswith("PASSED"))
        back = fsha("drill", "slot2", "--back", "--sip-port", sip, "--wait", "60", "--json")
        self.assertEqual(back.returncode, 0, back.stdout + back.stderr)
        report = json.loads(back.stdout)
        self.assertEqual((report["from"], report["to"], report["calls_recovered"]),
                         (spare, home, 20))
        # and it can fail: nothing answers SIP on another port (once fs3, which just
        # handed slot2 back, is its primary candidate again)
        wait_for("the spare ranked again", lambda: (cluster.status(cluster.node(home))
                                              .get("ranking") or [None])[0] == spare, 60)
        wrong = fsha("drill", "slot2", "--sip-port", str(free_port(socket.SOCK_DGRAM)),
                     "--timeout", "1", "--wait", "60")
        self.assertEqual(wrong.returncode, 1, wrong.stdout + wrong.stderr)
        self.assertIn("FAIL client address answered after", wrong.stdout)

        # a takeover: kill -9 the master of slot1
        master = cluster.owner("slot1") or wait_for("slot1 mastered",
                                                    lambda: cluster.owner("slot1"), 30)
        cluster.kill(master, sim_too=True)
        new = wait_for("slot1 taken over", lambda: (o := cluster.owner("slot1")) != master
                       and o, 60)
        epoch = next(s["epoch"] for s in cluster.status(cluster.node(new))["slots"]
                     if s["name"] == "slot1")
        crashed = wait_for("status --all to tell the master crashed", lambda: (
            r := fsha("status", "--all")).returncode == 1
            and f"{master} crashed or was cut off" in r.stdout and r, 30)
        self.assertNotIn("{", crashed.stdout)
        tid = f"slot1/{epoch}"
        # the history of every live node joins on the takeover id
        story = fsha("history", "--all", "--takeover", tid, "--json")
        entries = [json.loads(line) for line in story.stdout.splitlines()]
        kinds = {(e["node"], e["event"]) for e in entries}
        self.assertIn((new, "takeover-acquire"), kinds, story.stdout + story.stderr)
        self.assertIn((new, "master"), kinds)
        others = {e["node"] for e in entries if e["node"] != new}
        self.assertTrue(others, story.stdout)  # a peer tells the same takeover
        text = fsha("history", "--node", new, "-n", "20")
        self.assertIn(f"[{tid}]", text.stdout)
        self.assertIn("maintenance on=yes", fsha("history", "--node", spare).stdout)

        # the hook ran for the takeover, with the event as arguments and environment
        notify_log = cluster.dir / f"notify-{new}.log"
        runs = wait_for("the notify hook's run for the takeover", lambda: [
            r for r in map(json.loads, notify_log.read_text().splitlines())
            if r["argv"][:1] + r["argv"][2:] == ["takeover-acquire", "slot1", str(epoch)]],
            60)
        self.assertEqual(runs[0]["argv"], ["takeover-acquire", new, "slot1", str(epoch)])
        self.assertEqual(runs[0]["takeover"], tid)

        # logs: the takeover is told once by each peer, and a dead peer's replication
        # dial failures are rate-limited
        survivor = next(n.name for n in cluster.running() if n.name != new)
        dialler = next((n.name for n in cluster.running()
                        if cluster.status(n)["replication"]["peers"][master]["dials"]),
                       None)

        def failures() -> int:
            if dialler is None:
                return 1
            peer = cluster.status(cluster.node(dialler))["replication"]["peers"][master]
            return sum(peer["dial_failures"].values()) >= 8
        wait_for("repeated dial failures to the dead master", failures, 60)
        for name in {survivor, dialler} - {None}:
            lines = [json.loads(line) for line in
                     cluster.node(str(name)).log_path.read_text().splitlines()
                     if line.startswith("{")]
            texts = [e.get("text", "") for e in lines]
            announced = [t for t in texts if f"announces takeover of slot slot1 (epoch "
                         f"{epoch})" in t]
            if name == survivor:
                self.assertEqual(len(announced), 1, announced)
            if name == dialler:
                reached = [t for t in texts if f"cannot reach {master}" in t]
                self.assertLessEqual(len(reached), 3, reached)
        self.assertTrue(os.path.isdir(cluster.dir / "state" / new))
