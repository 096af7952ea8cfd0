"""The one condition wait (fsha.harness): ``wait_for`` blocking, ``poll_until`` on a clock."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fsha.harness import ConditionTimeout, HarnessError, poll_until, wait_for


class PollUntilTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.calls = 0

    def counter(self, true_at: int, value: object = "done") -> object:
        self.calls += 1
        return value if self.calls >= true_at else None

    def test_fires_with_the_first_true_value(self) -> None:
        d = poll_until(lambda: self.counter(3), "three polls", timeout=1, interval=0.1,
                       clock=self.clock)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_true_at_once_needs_no_time(self) -> None:
        d = poll_until(lambda: 7, "seven", clock=self.clock)
        self.assertEqual(self.successResultOf(d), 7)

    def test_times_out_as_a_failed_expectation_naming_the_wait(self) -> None:
        d = poll_until(lambda: self.counter(1000), "godot", timeout=1, interval=0.25,
                       clock=self.clock)
        self.clock.pump([0.25] * 4)
        self.assertNoResult(d)
        self.clock.advance(0.25)
        error = self.failureResultOf(d, ConditionTimeout).value
        self.assertIsInstance(error, AssertionError)  # a test failure, not an error
        self.assertIsInstance(error, HarnessError)  # what the demo and benches catch
        self.assertEqual(str(error), "timed out after 1.0s waiting for godot")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_not_yet_errors_are_retried_and_the_last_one_quoted(self) -> None:
        def flaky() -> bool:
            self.calls += 1
            raise ConnectionRefusedError(f"attempt {self.calls}")

        d = poll_until(flaky, "a server", timeout=0.5, interval=0.1, clock=self.clock)
        self.clock.pump([0.1] * 6)
        error = self.failureResultOf(d, ConditionTimeout).value
        self.assertIn("attempt 7", str(error))

    def test_other_errors_fail_at_once(self) -> None:
        d = poll_until(lambda: 1 / 0, "a bug", clock=self.clock)
        self.failureResultOf(d, ZeroDivisionError)

    def test_cancel_stops_polling(self) -> None:
        d = poll_until(lambda: self.counter(1000), "godot", clock=self.clock)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class WaitForTests(SynchronousTestCase):
    def test_returns_the_first_true_value(self) -> None:
        values = iter([0, None, KeyError("not yet"), "ready"])

        def check() -> object:
            value = next(values)
            if isinstance(value, Exception):
                raise value
            return value

        self.assertEqual(wait_for("ready", check, timeout=5, interval=0), "ready")

    def test_times_out_quoting_the_last_error(self) -> None:
        def refused() -> bool:
            raise ConnectionRefusedError("nobody home")

        with self.assertRaises(ConditionTimeout) as caught:
            wait_for("a server", refused, timeout=0.02, interval=0.005)
        self.assertIn("waiting for a server (last error: ConnectionRefusedError('nobody home'))",
                      str(caught.exception))
