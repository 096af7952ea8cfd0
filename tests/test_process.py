"""ProcessRunner against real child processes (and a MemoryReactorClock for validation)."""

from __future__ import annotations

import os
import signal
import sys

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fsha.process import (
    ExecutableNotFound,
    ProcessFailed,
    ProcessResult,
    ProcessRunner,
    ProcessTimeout,
    resolve_executable,
)

SH = "/bin/sh"
# generous deadline for anything the tests wait on: a hang fails the test instead of the suite
DEADLINE = 20.0


def _deadline(d: Deferred[object], seconds: float = DEADLINE) -> Deferred[object]:
    return d.addTimeout(seconds, reactor)


class RealProcessTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.runner = ProcessRunner(reactor, kill_grace=0.5, drain=0.2)
        self.addCleanup(self.runner.stop)

    @inlineCallbacks
    def test_success_captures_stdout_and_stderr(self):  # type: ignore[no-untyped-def]
        result = yield _deadline(self.runner.run(
            [SH, "-c", "printf out; printf err >&2"], timeout=DEADLINE))
        self.assertIsInstance(result, ProcessResult)
        self.assertEqual(result.argv, (SH, "-c", "printf out; printf err >&2"))
        self.assertEqual(result.exit_code, 0)
        self.assertEqual(result.stdout, b"out")
        self.assertEqual(result.stderr, b"err")
        self.assertFalse(result.truncated)
        self.assertGreaterEqual(result.duration, 0.0)
        self.assertIsInstance(result.pid, int)

    @inlineCallbacks
    def test_nonzero_exit_fails(self):  # type: ignore[no-untyped-def]
        argv = [SH, "-c", "echo broken >&2; exit 3"]
        with self.assertRaises(ProcessFailed) as cm:
            yield _deadline(self.runner.run(argv, timeout=DEADLINE))
        e = cm.exception
        self.assertEqual(e.argv, tuple(argv))
        self.assertEqual(e.exit_code, 3)
        self.assertEqual(e.stderr, b"broken\n")
        self.assertIn("exit code 3", str(e))
        self.assertIn("broken", str(e))

    @inlineCallbacks
    def test_ok_codes_accept_a_nonzero_exit(self):  # type: ignore[no-untyped-def]
        result = yield _deadline(self.runner.run([SH, "-c", "exit 3"], timeout=DEADLINE,
                                                 ok_codes=(0, 3)))
        self.assertEqual(result.exit_code, 3)

    @inlineCallbacks
    def test_killed_by_signal_reports_negative_code(self):  # type: ignore[no-untyped-def]
        with self.assertRaises(ProcessFailed) as cm:
            yield _deadline(self.runner.run([SH, "-c", "kill -9 $$"], timeout=DEADLINE))
        self.assertEqual(cm.exception.exit_code, -signal.SIGKILL)
        self.assertIn("signal 9", str(cm.exception))

    @inlineCallbacks
    def test_output_is_bounded(self):  # type: ignore[no-untyped-def]
        runner = ProcessRunner(reactor, output_limit=1000)
        self.addCleanup(runner.stop)
        # 300,000 bytes on stdout, 5 on stderr
        result = yield _deadline(runner.run(
            [sys.executable, "-c",
             "import sys; sys.stdout.write('x' * 300000); sys.stderr.write('hello')"],
            timeout=DEADLINE))
        self.assertEqual(result.stdout, b"x" * 1000)
        self.assertEqual(result.stdout_dropped, 299_000)
        self.assertEqual(result.stderr, b"hello")
        self.assertEqual(result.stderr_dropped, 0)
        self.assertTrue(result.truncated)

    @inlineCallbacks
    def test_timeout_kills_sleep(self):  # type: ignore[no-untyped-def]
        d = self.runner.run(["sleep", "30"], timeout=0.3)
        with self.assertRaises(ProcessTimeout) as cm:
            yield _deadline(d)
        e = cm.exception
        self.assertEqual(e.argv, ("sleep", "30"))
        self.assertEqual(e.timeout, 0.3)
        assert e.result is not None
        self.assertEqual(e.result.exit_code, -signal.SIGTERM)
        # the process is really gone
        self.assertRaises(ProcessLookupError, os.kill, e.result.pid, 0)

    @inlineCallbacks
    def test_timeout_escalates_to_sigkill(self):  # type: ignore[no-untyped-def]
        script = "trap '' TERM; echo ready; while :; do sleep 0.05; done"
        with self.assertRaises(ProcessTimeout) as cm:
            yield _deadline(self.runner.run([SH, "-c", script], timeout=0.3))
        assert cm.exception.result is not None
        self.assertEqual(cm.exception.result.exit_code, -signal.SIGKILL)
        self.assertEqual(cm.exception.result.stdout, b"ready\n")

    @inlineCallbacks
    def test_grandchild_holding_pipes_does_not_hang(self):  # type: ignore[no-untyped-def]
        # the shell exits at once; its background child keeps stdout open for 30 s
        d = self.runner.run([SH, "-c", "sleep 30 & echo $!"], timeout=DEADLINE)
        result = yield _deadline(d)
        pid = int(result.stdout.split()[0])
        self.addCleanup(_kill_quietly, pid)
        self.assertEqual(result.exit_code, 0)

    @inlineCallbacks
    def test_cancel_kills_the_process(self):  # type: ignore[no-untyped-def]
        pids: list[bytes] = []
        ended: Deferred[None] = Deferred()
        d = self.runner.run([SH, "-c", "echo $$; exec sleep 30"], timeout=DEADLINE,
                            on_output=lambda fd, data: (pids.append(data),
                                                        reactor.callLater(0, d.cancel)))
        with self.assertRaises(CancelledError):
            yield _deadline(d)
        pid = int(b"".join(pids).split()[0])
        # wait (bounded) for the kill to land: poll the pid through the reactor, not sleep
        deadline = reactor.seconds() + DEADLINE

        def check() -> None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                ended.callback(None)
                return
            if reactor.seconds() > deadline:
                ended.errback(AssertionError(f"pid {pid} still alive"))
            else:
                reactor.callLater(0.02, check)

        check()
        yield ended

    @inlineCallbacks
    def test_missing_executable(self):  # type: ignore[no-untyped-def]
        with self.assertRaises(ExecutableNotFound) as cm:
            yield _deadline(self.runner.run(["fsha-no-such-program-xyz", "a"], timeout=1))
        self.assertIn("fsha-no-such-program-xyz", str(cm.exception))
        self.assertIn("not found in PATH", str(cm.exception))
        with self.assertRaises(ExecutableNotFound) as cm:
            yield _deadline(self.runner.run(["/nonexistent/dir/prog"], timeout=1))
        self.assertIn("no such file", str(cm.exception))

    @inlineCallbacks
    def test_env_is_passed(self):  # type: ignore[no-untyped-def]
        result = yield _deadline(self.runner.run(
            [SH, "-c", 'printf "%s" "$FSHA_X"'], timeout=DEADLINE,
            env={"FSHA_X": "42", "PATH": os.defpath}))
        self.assertEqual(result.stdout, b"42")

    @inlineCallbacks
    def test_pty_output_arrives_line_by_line(self):  # type: ignore[no-untyped-def]
        # with a pty, a C program line-buffers: the first line arrives before the exit
        first: Deferred[bytes] = Deferred()

        def seen(fd: int, data: bytes) -> None:
            if not first.called:
                first.callback(data)

        d = self.runner.run([SH, "-c", "echo first; exec sleep 30"], timeout=DEADLINE,
                            on_output=seen, use_pty=True)
        data = yield _deadline(first)
        self.assertIn(b"first", data)
        self.assertFalse(d.called)
        d.cancel()
        with self.assertRaises(CancelledError):
            yield d


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class ValidationTests(SynchronousTestCase):
    def test_needs_a_process_reactor(self) -> None:
        from twisted.internet.task import Clock
        self.assertRaises(TypeError, ProcessRunner, Clock())

    def test_bad_arguments(self) -> None:
        runner = ProcessRunner(reactor)  # refused before anything is spawned
        self.assertRaises(ValueError, runner.run, [], 1.0)
        self.assertRaises(ValueError, runner.run, ["true"], 0)

    def test_resolve_executable(self) -> None:
        self.assertEqual(resolve_executable(SH), SH)
        self.assertTrue(resolve_executable("sh", {"PATH": "/bin:/usr/bin"}).endswith("/sh"))
        self.assertRaises(ValueError, resolve_executable, "sh", {"PATH": "/nonexistent"})
        plain = self.mktemp()
        with open(plain, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(plain, 0o644)
        self.assertRaises(ValueError, resolve_executable, plain)  # not executable
