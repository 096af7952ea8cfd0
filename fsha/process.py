"""Run external commands through the reactor: never blocking, never a shell, always bounded.

``ProcessRunner(reactor).run(argv, timeout)`` spawns ``argv`` with ``reactor.spawnProcess``
and returns a Deferred that fires with a :class:`ProcessResult` or fails with one of:

- :class:`ExecutableNotFound`: ``argv[0]`` is not an executable file (checked before
  spawning, so no traceback is printed by a forked child);
- :class:`ProcessFailed`: the exit code is not in ``ok_codes`` (a process killed by a
  signal it did not get from us has ``exit_code == -signal``, as in :mod:`subprocess`);
- :class:`ProcessTimeout`: still running after ``timeout`` seconds. The runner then sends
  SIGTERM, SIGKILL ``kill_grace`` seconds later, and fails once the process is gone (at
  the latest ``timeout + 2 * kill_grace`` after the start, even if the kernel will not
  reap it).

Output is captured up to ``output_limit`` bytes per stream (the head is kept, the excess is
dropped and counted in ``ProcessResult.stdout_dropped`` / ``stderr_dropped``). A child that
exits while a grandchild still holds its pipes is waited for ``drain`` seconds, then the
pipes are closed. Cancelling the Deferred kills the process the same way as a timeout.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha.reactors import ProcessReactor

OUTPUT_LIMIT = 64 * 1024
KILL_GRACE = 1.0
DRAIN = 0.5

OutputCallback = Callable[[int, bytes], None]

log = Logger(namespace="fsha.process")


@dataclass(frozen=True, slots=True)
class ProcessResult:
    argv: tuple[str, ...]
    exit_code: int  # -N when killed by signal N
    stdout: bytes
    stderr: bytes
    duration: float  # seconds, spawn to exit
    stdout_dropped: int = 0  # bytes beyond the output limit, not kept
    stderr_dropped: int = 0
    pid: int | None = None

    @property
    def truncated(self) -> bool:
        return bool(self.stdout_dropped or self.stderr_dropped)


class ProcessError(Exception):
    """Base of everything the runner fails with."""

    def __init__(self, argv: Sequence[str], message: str) -> None:
        super().__init__(message)
        self.argv = tuple(argv)


class ExecutableNotFound(ProcessError):
    def __init__(self, argv: Sequence[str], reason: str) -> None:
        super().__init__(argv, f"cannot run {_show(argv)}: {reason}")
        self.reason = reason


class ProcessFailed(ProcessError):
    def __init__(self, argv: Sequence[str], exit_code: int, stderr: bytes,
                 result: ProcessResult | None = None) -> None:
        how = f"killed by signal {-exit_code}" if exit_code < 0 else f"exit code {exit_code}"
        detail = _first_line(stderr)
        super().__init__(argv, f"{_show(argv)} failed ({how})" + (f": {detail}" if detail else ""))
        self.exit_code = exit_code
        self.stderr = stderr
        self.result = result


class ProcessTimeout(ProcessError):
    def __init__(self, argv: Sequence[str], timeout: float,
                 result: ProcessResult | None = None) -> None:
        super().__init__(argv, f"{_show(argv)} still running after {timeout:g} s: killed")
        self.timeout = timeout
        self.result = result  # what it printed before it was killed (exit_code may be -9)


def _show(argv: Sequence[str]) -> str:
    text = " ".join(argv)
    return text if len(text) <= 200 else text[:197] + "..."


def _first_line(data: bytes) -> str:
    for line in data.decode("utf-8", "replace").splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def resolve_executable(name: str, env: Mapping[str, str] | None = None) -> str:
    """The path of ``name`` as exec would find it; raises ValueError with the reason."""
    if "/" in name:
        if not os.path.isfile(name):
            raise ValueError("no such file")
        if not os.access(name, os.X_OK):
            raise ValueError("not executable")
        return name
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    found = shutil.which(name, path=path)
    if found is None:
        raise ValueError(f"not found in PATH ({path})")
    return found


class _Capture:
    __slots__ = ("chunks", "dropped", "kept", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.limit - self.kept
        if room >= len(data):
            self.chunks.append(data)
            self.kept += len(data)
        else:
            if room > 0:
                self.chunks.append(data[:room])
                self.kept += room
            self.dropped += len(data) - max(room, 0)

    def value(self) -> bytes:
        return b"".join(self.chunks)


class _Run(ProcessProtocol):
    """One running child: captures output, enforces the deadline, fires the Deferred."""

    def __init__(self, runner: ProcessRunner, argv: tuple[str, ...], timeout: float,
                 ok_codes: Collection[int], on_output: OutputCallback | None) -> None:
        self.runner = runner
        self.clock = runner.clock
        self.argv = argv
        self.timeout = timeout
        self.ok_codes = ok_codes
        self.on_output = on_output
        self.out = _Capture(runner.output_limit)
        self.err = _Capture(runner.output_limit)
        self.started = self.clock.seconds()
        self.exited_at: float | None = None
        self.exit_code: int | None = None
        self.timed_out = False
        self.cancelled = False
        self.pid: int | None = None
        self.deferred: Deferred[ProcessResult] = Deferred(self._cancel)
        self.gone: Deferred[None] = Deferred()  # fires when the child is reaped (or abandoned)
        self._timers: dict[str, IDelayedCall] = {}

    # -- timers -----------------------------------------------------------------------

    def _later(self, name: str, delay: float, f: Callable[[], None]) -> None:
        self._stop_timer(name)
        self._timers[name] = self.clock.callLater(delay, f)

    def _stop_timer(self, name: str) -> None:
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _stop_timers(self) -> None:
        for name in list(self._timers):
            self._stop_timer(name)

    # -- ProcessProtocol --------------------------------------------------------------

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        (self.err if childFD == 2 else self.out).add(data)
        if self.on_output is not None:
            try:
                self.on_output(childFD, data)
            except Exception:
                log.failure("output callback of {argv} raised", argv=_show(self.argv))

    def processExited(self, reason: Failure) -> None:
        self.exited_at = self.clock.seconds()
        self.exit_code = _exit_code(reason)
        self._stop_timer("term")
        self._stop_timer("kill")
        # a grandchild may still hold the pipes: give it `drain`, then close them
        self._later("drain", self.runner.drain, self._close_pipes)

    def processEnded(self, reason: Failure) -> None:
        self._stop_timers()
        if self.exit_code is None:
            self.exit_code = _exit_code(reason)
        if self.exited_at is None:
            self.exited_at = self.clock.seconds()
        self._finish()

    # -- deadline and cancellation ----------------------------------------------------

    def start_deadline(self) -> None:
        self._later("term", self.timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self.timed_out = True
        log.warn("{argv} (pid {pid}) still running after {timeout} s: sending SIGTERM",
                 argv=_show(self.argv), pid=self.pid, timeout=self.timeout)
        self._terminate()

    def _cancel(self, d: Deferred[ProcessResult]) -> None:
        self.stop()

    def stop(self) -> None:
        """Kill the child (SIGTERM, then SIGKILL): cancellation and runner shutdown."""
        if self.cancelled or self.timed_out:
            return
        self.cancelled = True
        if self.exited_at is None:
            log.debug("{argv} (pid {pid}) cancelled: sending SIGTERM",
                      argv=_show(self.argv), pid=self.pid)
            self._terminate()

    def _terminate(self) -> None:
        self._stop_timer("term")
        self._signal("TERM")
        self._later("kill", self.runner.kill_grace, self._kill)

    def _kill(self) -> None:
        log.warn("{argv} (pid {pid}) ignored SIGTERM for {grace} s: sending SIGKILL",
                 argv=_show(self.argv), pid=self.pid, grace=self.runner.kill_grace)
        self._signal("KILL")
        self._later("abandon", self.runner.kill_grace, self._abandon)

    def _abandon(self) -> None:
        log.error("{argv} (pid {pid}) not reaped {grace} s after SIGKILL: giving up on it",
                  argv=_show(self.argv), pid=self.pid, grace=self.runner.kill_grace)
        self._close_pipes()
        self._finish()

    def _signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            pass
        except OSError as e:
            log.warn("cannot send SIG{sig} to {argv} (pid {pid}): {err}",
                     sig=name, argv=_show(self.argv), pid=self.pid, err=e)

    def _close_pipes(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for fd in (1, 2):
            try:
                transport.closeChildFD(fd)  # type: ignore[attr-defined]
            except Exception:
                pass

    # -- result -----------------------------------------------------------------------

    def _finish(self) -> None:
        self._stop_timers()
        self.runner._running.discard(self)
        if not self.gone.called:
            self.gone.callback(None)
        if self.deferred.called:
            return
        end = self.exited_at if self.exited_at is not None else self.clock.seconds()
        result = ProcessResult(
            argv=self.argv,
            exit_code=self.exit_code if self.exit_code is not None else -9,
            stdout=self.out.value(), stderr=self.err.value(),
            duration=end - self.started,
            stdout_dropped=self.out.dropped, stderr_dropped=self.err.dropped, pid=self.pid)
        if result.truncated:
            log.warn("{argv}: output beyond {limit} bytes dropped "
                     "(stdout {out} bytes, stderr {err} bytes)", argv=_show(self.argv),
                     limit=self.runner.output_limit, out=self.out.dropped, err=self.err.dropped)
        if self.timed_out:
            self.deferred.errback(ProcessTimeout(self.argv, self.timeout, result))
        elif result.exit_code not in self.ok_codes:
            self.deferred.errback(
                ProcessFailed(self.argv, result.exit_code, result.stderr, result))
        else:
            self.deferred.callback(result)


def _exit_code(reason: Failure) -> int:
    value = reason.value
    if isinstance(value, error.ProcessTerminated):
        if value.signal is not None:
            return -int(value.signal)
        return int(value.exitCode) if value.exitCode is not None else -1
    return 0  # ProcessDone


class ProcessRunner:
    """Runs argv vectors through ``reactor.spawnProcess``; see the module docstring."""

    def __init__(self, reactor: ProcessReactor, *, output_limit: int = OUTPUT_LIMIT,
                 kill_grace: float = KILL_GRACE, drain: float = DRAIN) -> None:
        if not IReactorProcess.providedBy(reactor) or not IReactorTime.providedBy(reactor):
            raise TypeError("ProcessRunner needs a reactor providing IReactorProcess and "
                            "IReactorTime")
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.output_limit = output_limit
        self.kill_grace = kill_grace
        self.drain = drain
        self._running: set[_Run] = set()

    @property
    def active(self) -> int:
        """How many children are running (or being killed) now."""
        return len(self._running)

    def stop(self) -> Deferred[None]:
        """Kill every running child; fires once all of them are gone.

        Their Deferreds fail with CancelledError. Bounded by ``2 * kill_grace`` (+ drain).
        """
        runs = list(self._running)
        for run in runs:
            run.deferred.cancel()
        d: Deferred[Any] = gatherResults([run.gone for run in runs])
        return d.addCallback(lambda _: None)

    def run(self, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None,
            *, ok_codes: Collection[int] = (0,), on_output: OutputCallback | None = None,
            use_pty: bool = False) -> Deferred[ProcessResult]:
        """Run ``argv`` (no shell); ``env=None`` inherits this process's environment.

        ``on_output(fd, data)`` sees every chunk as it arrives (fd 1 or 2; with
        ``use_pty`` everything arrives on fd 1, line-buffered by the child's C library).
        """
        argv = tuple(argv)
        if not argv:
            raise ValueError("empty argv")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, not {timeout!r}")
        try:
            executable = resolve_executable(argv[0], env)
        except ValueError as e:
            return _failed(ExecutableNotFound(argv, str(e)))
        run = _Run(self, argv, timeout, ok_codes, on_output)
        try:
            self.reactor.spawnProcess(run, executable, args=list(argv),
                                      env=dict(env) if env is not None else None,
                                      usePTY=use_pty)
        except OSError as e:
            return _failed(ExecutableNotFound(argv, e.strerror or str(e)))
        self._running.add(run)
        run.start_deadline()
        run.deferred.addBoth(self._log_outcome, run)
        return run.deferred

    def _log_outcome(self, outcome: ProcessResult | Failure, run: _Run) -> ProcessResult | Failure:
        if isinstance(outcome, ProcessResult):
            log.debug("{argv} exited {code} in {duration:.1f} ms", argv=_show(run.argv),
                      code=outcome.exit_code, duration=outcome.duration * 1000)
        elif not outcome.check(CancelledError):
            log.debug("{argv}: {error}", argv=_show(run.argv), error=outcome.value)
        return outcome


def _failed(e: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(e)
    return d
