"""The guard's log lines go to fsha's log file (twistd ``--logfile``), not to a stderr a
daemon has closed: the arguments fsha gives the guard, and the guard's observer."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from fsha.guard import AppendingLogObserver, log_observer
from fsha.tap import guard_log_args


class GuardLogArgsTests(SynchronousTestCase):
    def test_logfile_and_format_follow_twistd(self) -> None:
        self.assertEqual(guard_log_args(["twistd", "-n", "fsha", "--config", "c"]), [])
        self.assertEqual(guard_log_args(["twistd", "--logfile", "/var/log/fsha.log", "fsha"]),
                         ["--logfile", "/var/log/fsha.log", "--log-format", "text"])
        self.assertEqual(guard_log_args(["twistd", "--logger=fsha.logs.json", "-l",
                                         "/l/f.log", "fsha"]),
                         ["--logfile", "/l/f.log", "--log-format", "json"])
        # relative to where fsha started (the guard may not share its directory later)
        args = guard_log_args(["twistd", "--logfile=rel.log", "fsha"])
        self.assertTrue(Path(args[1]).is_absolute())
        # fsha's own --logfile-like option after the subcommand is not twistd's
        self.assertEqual(guard_log_args(["twistd", "fsha", "--logfile", "x"]), [])


class AppendingObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fsha-guardlog-"))
        self.path = self.dir / "fsha.log"

    def log_through(self, observer: object) -> Logger:
        publisher = LogPublisher(observer)  # type: ignore[arg-type]
        return Logger(namespace="fsha.guard", observer=publisher)

    def test_text_lines_appended_and_rotation_followed(self) -> None:
        self.path.write_text("fsha's own line\n")
        log = self.log_through(log_observer(["--logfile", str(self.path)]))
        log.info("guard of {node} ready", node="fs1")
        lines = self.path.read_text().splitlines()
        self.assertEqual(lines[0], "fsha's own line")
        self.assertIn("[fsha.guard#info] guard of fs1 ready", lines[1])
        # twistd rotates by renaming: the next line goes to the new file
        self.path.rename(self.dir / "fsha.log.1")
        log.warn("dropped slot {slot}", slot="slot1")
        self.assertIn("dropped slot slot1", self.path.read_text())
        self.assertNotIn("dropped", (self.dir / "fsha.log.1").read_text())

    def test_json_lines_as_fsha_writes_them(self) -> None:
        log = self.log_through(AppendingLogObserver(str(self.path), json=True))
        log.info("guard of {node} ready", node="fs1")
        event = json.loads(self.path.read_text())
        self.assertEqual((event["text"], event["node"]), ("guard of fs1 ready", "fs1"))

    def test_without_a_logfile_stderr(self) -> None:
        self.assertNotIsInstance(log_observer([]), AppendingLogObserver)
