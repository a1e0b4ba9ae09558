# -*- test-case-name: llmproxy.test.test_budgets -*-
"""
Spend kept in this process: one tally per scope and period, rebuilt at
start from the cost records (L{llmproxy.budgets.rebuild}) so a restart
does not hand every key a fresh budget.

Everything runs in the reactor thread. Until the rebuild is done, calls
wait for it (the Deferreds they return fire once it is), so no request is
admitted against a budget that does not yet know its spend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from llmproxy.budgets.policy import (
    BudgetReservation,
    Hold,
    ISpendStore,
    Shortfall,
    SpendDecision,
    Spent,
    crossed,
    fits,
    period_id,
)

log = Logger()

_T = TypeVar("_T")

Tallies = Mapping[tuple[str, str], tuple[str, int]]
"""(scope, period) -> (period id, spent nano-USD): what a rebuild found."""


class _Tally:
    """
    One scope in one period.

    @ivar alerted: the spend up to which alerts have been given (or were
        given before a restart: a rebuilt tally starts there).
    """

    __slots__ = ("alerted", "held", "period_id", "spent")

    def __init__(self, period_id: str, spent: int = 0) -> None:
        self.period_id = period_id
        self.spent = spent
        self.held = 0
        self.alerted = spent


@implementer(ISpendStore)
class MemorySpendStore:
    """
    Spend in dicts; bounded by the scopes that have been counted (the
    configured keys and budgeted users), two periods each.

    @ivar waiting: a rebuild is pending (see L{rebuilding}); calls are
        answered once it is over.
    """

    def __init__(self) -> None:
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self.waiting = False
        self._queued: list[tuple[Deferred[Any], Callable[[], Any]]] = []

    def rebuilding(self, done: Deferred[Tallies]) -> None:
        """
        Hold every call until C{done} fires with the spend the cost records
        hold, then count it. A failed rebuild is logged and the store starts
        from what it has.
        """
        self.waiting = True

        def failed(failure: Failure) -> None:
            log.failure("rebuilding budget spend from the cost records failed", failure)

        def over(result: object) -> None:
            self.waiting = False
            queued, self._queued = self._queued, []
            for answer, call in queued:
                answer.callback(call())

        done.addCallbacks(self.load, failed).addBoth(over)

    def _answer(self, call: Callable[[], _T]) -> Deferred[_T]:
        if not self.waiting:
            return succeed(call())
        answer: Deferred[_T] = Deferred()
        self._queued.append((answer, call))
        return answer

    def load(self, tallies: Tallies) -> None:
        """
        Add spend found in the cost records. Alerts for what it already
        crossed are not given again.
        """
        for (scope, period), (pid, spent) in tallies.items():
            tally = self._tally(scope, period, pid)
            tally.spent += spent
            tally.alerted = max(tally.alerted, tally.spent)

    def _tally(self, scope: str, period: str, pid: str) -> _Tally:
        """
        The tally of C{scope} in C{period} for period C{pid}, started
        afresh when its period has ended. (A tally already in a later
        period stays in it: the clock stepped back.)
        """
        key = (scope, period)
        tally = self._tallies.get(key)
        if tally is None or tally.period_id < pid:
            tally = self._tallies[key] = _Tally(pid)
        return tally

    def reserve(self, holds: Sequence[Hold], now: float) -> Deferred[SpendDecision]:
        return self._answer(lambda: self.reserve_now(holds, now))

    def reserve_now(self, holds: Sequence[Hold], now: float) -> SpendDecision:
        """
        L{reserve}, without the Deferred (once ready).
        """
        capped = [hold for hold in holds if hold.limit is not None]
        tallies = [
            self._tally(hold.scope, hold.period, period_id(hold.period, now)) for hold in capped
        ]
        for hold, tally in zip(capped, tallies, strict=True):
            if not fits(hold, tally.spent, tally.held):
                limit = hold.limit or 0
                alert = 1.0 in hold.alert_at and tally.alerted < limit
                if alert:
                    tally.alerted = limit
                return SpendDecision(None, Shortfall(hold, tally.spent, tally.held, alert))
        for hold, tally in zip(capped, tallies, strict=True):
            tally.held += hold.amount
        return SpendDecision(BudgetReservation(at=now, holds=tuple(holds)))

    def settle(
        self, reservation: BudgetReservation, charges: Sequence[int], now: float
    ) -> Deferred[tuple[Spent, ...]]:
        return self._answer(lambda: self.settle_now(reservation, charges, now))

    def settle_now(
        self, reservation: BudgetReservation, charges: Sequence[int], now: float
    ) -> tuple[Spent, ...]:
        """
        L{settle}, without the Deferred (once ready).
        """
        figures = []
        for hold, charge in zip(reservation.holds, charges, strict=True):
            if reservation.reserved and hold.limit is not None:
                then = self._tallies.get((hold.scope, hold.period))
                if then is not None and then.period_id == period_id(hold.period, reservation.at):
                    then.held = max(0, then.held - hold.amount)
            tally = self._tally(hold.scope, hold.period, period_id(hold.period, now))
            tally.spent += max(0, charge)
            found = crossed(hold, tally.spent, tally.alerted)
            if found:
                tally.alerted = tally.spent
            figures.append(Spent(hold, tally.spent, found))
        return tuple(figures)

    def spent(self, scope: str, period: str, now: float) -> int:
        """
        What C{scope} spent in the current C{period}, in nano-USD.
        """
        tally = self._tallies.get((scope, period))
        if tally is None or tally.period_id != period_id(period, now):
            return 0
        return tally.spent
