"""ProcessRunner against real child processes, and its timers against a fake clock."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

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
        self.assertRaises(TypeError, ProcessRunner, Clock())

    def test_bad_arguments(self) -> None:
        runner = ProcessRunner(reactor)  # refused before anything is spawned
        self.assertRaises(ValueError, runner.run, [], 1.0)
        self.assertRaises(ValueError, runner.run, ["true"], 0)

    def test_resolve_executable(self) -> None:
        self.assertEqual(resolve_executable(SH), SH)
        self.assertTrue(resolve_executable("sh", {"PATH": "/bin:/usr/bin"}).endswith("/sh"))
        self.assertRaises(ValueError, resolve_executable, "sh", {"PATH": "/nonexistent"})
        tmp = tempfile.TemporaryDirectory(prefix="fsha-test-")
        self.addCleanup(tmp.cleanup)
        plain = os.path.join(tmp.name, "plain")
        with open(plain, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(plain, 0o644)
        self.assertRaises(ValueError, resolve_executable, plain)  # not executable


@implementer(IReactorProcess)
class FakeProcessReactor(Clock):
    """A Clock that records spawnProcess and hands back a controllable transport."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcessTransport] = []

    def spawnProcess(self, processProtocol, executable, args=(), env=None, path=None,  # type: ignore[no-untyped-def]
                     uid=None, gid=None, usePTY=False, childFDs=None):
        transport = FakeProcessTransport(processProtocol, executable, list(args), env, usePTY)
        self.spawned.append(transport)
        processProtocol.makeConnection(transport)
        return transport


class FakeProcessTransport:
    def __init__(self, proto: Any, executable: str, args: list[str], env: Any,
                 pty: bool) -> None:
        self.proto = proto
        self.executable = executable
        self.args = args
        self.env = env
        self.pty = pty
        self.pid = 4242
        self.signals: list[str] = []
        self.closed: list[int | str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def closeStdin(self) -> None:
        self.closed.append("stdin")

    def closeChildFD(self, fd: int) -> None:
        self.closed.append(fd)

    def exit(self, code: int = 0, sig: int | None = None) -> Failure:
        reason = Failure(ProcessDone(0) if code == 0 and sig is None
                         else ProcessTerminated(code if sig is None else None, sig))
        self.proto.processExited(reason)
        return reason

    def end(self, code: int = 0, sig: int | None = None) -> None:
        reason = Failure(ProcessDone(0) if code == 0 and sig is None
                         else ProcessTerminated(code if sig is None else None, sig))
        self.proto.processExited(reason)
        self.proto.processEnded(reason)


class FakeClockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.runner = ProcessRunner(self.reactor, kill_grace=1.0, drain=0.5)

    def test_spawn_arguments_and_duration(self) -> None:
        d = self.runner.run(["sh", "-c", "x"], timeout=5.0, env={"PATH": "/bin:/usr/bin"},
                            use_pty=True)
        t = self.reactor.spawned[0]
        self.assertTrue(t.executable.endswith("/sh"))
        self.assertEqual(t.args, ["sh", "-c", "x"])
        self.assertEqual(t.env, {"PATH": "/bin:/usr/bin"})
        self.assertTrue(t.pty)
        self.assertEqual(t.closed, ["stdin"])
        self.assertEqual(self.runner.active, 1)
        self.reactor.advance(0.25)
        t.proto.childDataReceived(1, b"hi")
        t.end(0)
        result = self.successResultOf(d)
        self.assertEqual((result.stdout, result.exit_code, result.duration), (b"hi", 0, 0.25))
        self.assertEqual(self.runner.active, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_term_kill_abandon(self) -> None:
        d = self.runner.run([SH, "-c", "x"], timeout=3.0)
        t = self.reactor.spawned[0]
        self.reactor.advance(2.9)
        self.assertEqual(t.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(t.signals, ["TERM"])
        self.assertNoResult(d)
        self.reactor.advance(1.0)
        self.assertEqual(t.signals, ["TERM", "KILL"])
        self.assertNoResult(d)
        self.reactor.advance(1.0)  # never reaped (e.g. stuck in D state): give up on it
        error = self.failureResultOf(d, ProcessTimeout).value
        self.assertEqual(error.timeout, 3.0)
        self.assertIn(1, t.closed)
        self.assertEqual(self.runner.active, 0)

    def test_term_is_enough(self) -> None:
        d = self.runner.run([SH, "-c", "x"], timeout=3.0)
        t = self.reactor.spawned[0]
        self.reactor.advance(3.0)
        t.end(sig=signal.SIGTERM)
        error = self.failureResultOf(d, ProcessTimeout).value
        assert error.result is not None
        self.assertEqual(error.result.exit_code, -signal.SIGTERM)
        self.assertEqual(t.signals, ["TERM"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_grandchild_holding_pipes_is_cut_off_after_drain(self) -> None:
        d = self.runner.run([SH, "-c", "x"], timeout=10.0)
        t = self.reactor.spawned[0]
        reason = t.exit(3)
        self.reactor.advance(0.4)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertEqual(t.closed, ["stdin", 1, 2])
        t.proto.processEnded(reason)  # what Twisted does once the pipes are closed
        self.assertEqual(self.failureResultOf(d, ProcessFailed).value.exit_code, 3)

    def test_cancel_then_stop(self) -> None:
        d = self.runner.run([SH, "-c", "x"], timeout=10.0)
        t = self.reactor.spawned[0]
        stopped = self.runner.stop()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(t.signals, ["TERM"])
        self.assertNoResult(stopped)
        t.end(sig=signal.SIGTERM)
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_spawn_oserror(self) -> None:
        def broken(*args: Any, **kwargs: Any) -> None:
            raise PermissionError(13, "Permission denied")

        self.reactor.spawnProcess = broken  # type: ignore[method-assign]
        d = self.runner.run([SH], timeout=1.0)
        self.assertIn("Permission denied", str(self.failureResultOf(d, ExecutableNotFound).value))
        self.assertEqual(self.runner.active, 0)

    def test_output_callback_errors_are_contained(self) -> None:
        def bad(fd: int, data: bytes) -> None:
            raise RuntimeError("boom")

        d = self.runner.run([SH], timeout=1.0, on_output=bad)
        t = self.reactor.spawned[0]
        t.proto.childDataReceived(2, b"x")
        t.end(0)
        self.assertEqual(self.successResultOf(d).stderr, b"x")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
