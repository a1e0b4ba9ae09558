"""
Tests for L{llmproxy.runtime.ProxyState}: accounting after the reactor's
I/O, and the drain waiting for it.
"""

from __future__ import annotations

from functools import partial

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy import buildinfo
from llmproxy.config import Config
from llmproxy.health import HealthBoard
from llmproxy.metrics import Metrics
from llmproxy.runtime import ProxyState, build_runtime
from llmproxy.sinks import NullCostSink


class TurnClock(Clock):
    """
    A clock whose L{turn} runs the calls due as a turn begins, as the
    reactor does before each pass over the sockets (C{Clock.advance}
    would also run the ones those calls add).
    """

    def turn(self) -> None:
        now = self.seconds()
        due = [call for call in self.calls if call.getTime() <= now]
        for call in due:
            self.calls.remove(call)
            call.func(*call.args, **call.kw)


def state(clock: Clock) -> ProxyState:
    return ProxyState(
        clock=clock,
        runtime=build_runtime(Config(), lambda provider: None, None),  # type: ignore[arg-type,return-value]
        metrics=Metrics(),
        health=HealthBoard(clock),
        sink=NullCostSink(),
        build=buildinfo.load(),
        started_at=0.0,
    )


class AccountAfterIOTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = TurnClock()
        self.state = state(self.clock)
        self.done: list[str] = []

    def test_two_turns_later(self) -> None:
        """
        The work runs in the second turn of the timed calls, not at once
        and not in the first: the reactor's I/O pass comes in between.
        """
        self.state.account_after_io(lambda: self.done.append("accounted"))
        self.assertEqual((self.done, self.state.accounting), ([], 1))
        self.clock.turn()
        self.assertEqual(self.done, [])
        self.clock.turn()
        self.assertEqual((self.done, self.state.accounting), (["accounted"], 0))

    def test_one_pass_shares_two_calls(self) -> None:
        """
        The requests that finish in one pass are accounted together, in
        order, with two timed calls between them; one that finishes while
        the first turn runs waits for a pass of its own.
        """
        for name in ("a", "b", "c"):
            self.state.account_after_io(partial(self.done.append, name))
        self.assertEqual(len(self.clock.calls), 1)
        self.clock.turn()
        self.state.account_after_io(lambda: self.done.append("d"))
        self.assertEqual((self.done, len(self.clock.calls)), ([], 2))
        self.clock.turn()
        self.assertEqual((self.done, self.state.accounting), (["a", "b", "c"], 1))
        self.clock.turn()
        self.assertEqual((self.done, self.state.accounting), (["a", "b", "c", "d"], 0))

    def test_drain_waits(self) -> None:
        """
        With no request in flight, a drain still waits for the accounting
        of the finished ones.
        """
        self.state.request_started()
        self.state.request_finished()
        self.state.account_after_io(lambda: self.done.append("accounted"))
        idle = self.state.wait_idle()
        self.assertNoResult(idle)
        self.clock.turn()
        self.clock.turn()
        self.successResultOf(idle)
        self.assertEqual(self.done, ["accounted"])

    def test_failure_logged(self) -> None:
        """
        Accounting that raises is logged, and the drain is not held up.
        """

        def broken() -> None:
            raise ValueError("bug")

        self.state.account_after_io(broken)
        self.clock.turn()
        self.clock.turn()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(self.state.accounting, 0)
        self.successResultOf(self.state.wait_idle())
