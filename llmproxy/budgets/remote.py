# -*- test-case-name: llmproxy.test.test_budgets_remote -*-
"""
The memory spend store shared by the workers of one master: spend lives
once, in the master's L{MemorySpendStore} (rebuilt there from the cost
records at start); each worker's store (L{RemoteSpendStore}) asks it over
the worker's channel (L{llmproxy.group.channel}, kind C{BUDGETS}).

The master handles one request at a time, so check-and-reserve over a
request's budgets is as atomic across workers as it is inside one
process: 50 concurrent requests against a budget of 10 worst cases, spread
over any number of workers, admit exactly 10.

Requests, as compact JSON arrays. A hold is C{[scope, period, limit,
amount, alert_at]}; a reservation travels whole (its time and its holds),
so the master keeps nothing per request, only what each worker's requests
hold in all, to give it back if the worker dies (L{SpendServer}):

  - C{["r", now, holds]}, answered C{[1]} when every hold was reserved,
    C{[0, index, spent, held, alert]} when the hold at C{index} did not
    fit, or C{[2]} while the master is still reading the cost records
    (the worker asks again shortly: no request is admitted against a
    budget that does not know its spend yet, however long the file);
  - C{["s", at, reserved, holds, charges, now]} (settle), answered with
    C{[[spent, crossed], ...]} per hold. Frames are handled in order, so
    the worker's next reservation already counts the settlement; nothing
    waits for the answer, which brings back the group's spend (for the
    spend metric) and the alert fractions the settlement crossed, each
    crossed once for the whole group.

When the master cannot answer a reservation in time (it is gone, or
wedged), C{fail_mode} decides as it does for Redis: C{open} admits without
a reservation, C{closed} refuses with L{BackendUnavailable} (503). A
settlement whose answer does not come is logged, and its figures (not its
spend, if it reached the master) are lost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from llmproxy.budgets.memory import MemorySpendStore
from llmproxy.budgets.policy import (
    BudgetReservation,
    Hold,
    ISpendStore,
    Shortfall,
    SpendDecision,
    Spent,
    period_id,
)
from llmproxy.config import RateLimitConfig
from llmproxy.group.channel import BUDGETS, Caller, RemoteError
from llmproxy.group.client import CALL_TIMEOUT, MasterClient
from llmproxy.redislink import BackendUnavailable

log = Logger(namespace="llmproxy.budgets")

SETTLE_TIMEOUT = 60.0
"""
Seconds a worker waits for a settlement's figures. Longer than a
reservation's deadline: the master answers settlements that arrive while
it reads the cost records once it has read them (about a million records
in 3 s), and nothing waits for the answer meanwhile.
"""

REBUILD_POLL = 0.1
"""Seconds a worker waits before asking again while the master rebuilds spend."""

ADMITTED, REFUSED, REBUILDING = 1, 0, 2


def encode_holds(holds: Sequence[Hold]) -> list[list[Any]]:
    return [
        [hold.scope, hold.period, hold.limit, hold.amount, list(hold.alert_at)] for hold in holds
    ]


def decode_holds(flat: Sequence[Sequence[Any]]) -> tuple[Hold, ...]:
    return tuple(
        Hold(scope, period, limit, amount, tuple(alert_at))
        for scope, period, limit, amount, alert_at in flat
    )


Outstanding = dict[tuple[str, str, str], list[Any]]
"""(scope, period, period id) -> [amount held, a reservation's time in that period]."""


class SpendServer:
    """
    The master's end: answers C{BUDGETS} requests from the store C{store()}
    returns at the time (a reload may add or drop it; C{None} when the
    configuration counts no spend in memory), and gives back what a
    worker's requests in flight held when its connection is lost.

    The master keeps, per worker, the sum of what its admitted requests
    hold in each scope and period, so a worker that dies (its requests cut
    with it) leaves nothing held, as a single process that dies does:
    their amounts are given back and nothing is charged.
    """

    def __init__(self, store: Callable[[], MemorySpendStore | None], clock: IReactorTime) -> None:
        self._store = store
        self._clock = clock
        self._served: MemorySpendStore | None = None
        self._outstanding: dict[object, Outstanding] = {}

    def _current(self) -> MemorySpendStore:
        current = self._store()
        if current is None:
            raise RemoteError("no memory spend store in the master")
        if current is not self._served:
            # A new store (a reload turned budgets off and on): what the
            # old one held is not held in it.
            self._served = current
            self._outstanding.clear()
        return current

    def handle(self, channel: object, body: list[Any]) -> Any:
        current = self._current()
        op = body[0]
        if op == "r":
            if current.waiting:
                return [REBUILDING]
            _, now, flat = body
            holds = decode_holds(flat)
            decision = current.reserve_now(holds, now)
            shortfall = decision.shortfall
            if shortfall is None:
                self._hold(channel, holds, now, 1)
                return [ADMITTED]
            index = holds.index(shortfall.hold)
            return [REFUSED, index, shortfall.spent, shortfall.held, shortfall.alert]
        if op == "s":
            _, at, reserved, flat, charges, now = body
            reservation = BudgetReservation(at=at, holds=decode_holds(flat), reserved=reserved)
            if reserved:
                self._hold(channel, reservation.holds, at, -1)
            settled = current.settle(reservation, charges, now)
            return settled.addCallback(
                lambda figures: [[figure.spent, list(figure.crossed)] for figure in figures]
            )
        raise RemoteError(f"unknown budget request {op!r}")

    def _hold(self, channel: object, holds: Sequence[Hold], at: float, sign: int) -> None:
        """
        Count what C{channel}'s admitted request holds (C{sign} 1), or what
        its settlement gives back (-1).
        """
        outstanding = self._outstanding.setdefault(channel, {})
        for hold in holds:
            if hold.limit is None or not hold.amount:
                continue
            key = (hold.scope, hold.period, period_id(hold.period, at))
            entry = outstanding.setdefault(key, [0, at])
            entry[0] += sign * hold.amount
            if entry[0] <= 0:
                del outstanding[key]
        if not outstanding:
            del self._outstanding[channel]

    def lost(self, channel: object) -> None:
        """
        A worker's connection closed: give back what its requests held.
        """
        outstanding = self._outstanding.pop(channel, None)
        current = self._store()
        if not outstanding or current is None or current is not self._served:
            return
        now = self._clock.seconds()
        for (scope, period, _), (amount, at) in outstanding.items():
            # A settlement that charges nothing gives the amount back in the
            # period it was held in (a cap of 0 crosses no alert).
            hold = Hold(scope, period, 0, amount)
            current.settle_now(BudgetReservation(at=at, holds=(hold,)), [0], now)
        log.info(
            "a worker left with requests in flight: gave back what they held "
            "in {count} budget periods",
            count=len(outstanding),
        )


@implementer(ISpendStore)
class RemoteSpendStore(MasterClient):
    """
    A worker's spend store: every decision is the master's (the budgets
    come with each request's holds; L{reconfigure} takes the new
    C{fail_mode}).
    """

    def reserve(self, holds: Sequence[Hold], now: float) -> Deferred[SpendDecision]:
        holds = tuple(holds)
        reservation = BudgetReservation(at=now, holds=holds)
        if not any(hold.limit is not None for hold in holds):
            # Nothing to check: counted at settlement only.
            return succeed(SpendDecision(reservation))
        body = ["r", now, encode_holds(holds)]

        def answered(reply: list[Any]) -> SpendDecision | Deferred[SpendDecision]:
            if reply[0] == ADMITTED:
                return SpendDecision(reservation)
            if reply[0] == REBUILDING:
                return deferLater(self._clock, REBUILD_POLL, lambda: None).addCallback(
                    lambda _: self.reserve(holds, now)
                )
            _, index, spent, held, alert = reply
            return SpendDecision(None, Shortfall(holds[index], spent, held, alert))

        def unanswered(failure: Failure) -> SpendDecision | Failure:
            self.unanswered("a budget reservation", failure)
            if self.failing_closed:
                return Failure(BackendUnavailable("the master did not answer"))
            return SpendDecision(BudgetReservation(at=now, holds=holds, reserved=False))

        asked = self._master.call(BUDGETS, body, CALL_TIMEOUT)
        return asked.addCallbacks(answered, unanswered)

    def settle(
        self, reservation: BudgetReservation, charges: Sequence[int], now: float
    ) -> Deferred[tuple[Spent, ...]]:
        holds = reservation.holds
        if not holds:
            return succeed(())
        body = [
            "s",
            reservation.at,
            reservation.reserved,
            encode_holds(holds),
            list(charges),
            now,
        ]

        def answered(reply: list[Any]) -> tuple[Spent, ...]:
            return tuple(
                Spent(hold, spent, tuple(crossed))
                for hold, (spent, crossed) in zip(holds, reply, strict=True)
            )

        def unanswered(failure: Failure) -> tuple[Spent, ...]:
            self.unanswered("a budget settlement", failure)
            return ()

        asked = self._master.call(BUDGETS, body, SETTLE_TIMEOUT)
        return asked.addCallbacks(answered, unanswered)


def remote_spend_factory(
    master: Caller, clock: IReactorTime, on_error: Callable[[], object] | None = None
) -> Callable[[RateLimitConfig], RemoteSpendStore]:
    """
    What a worker builds when its configuration counts spend in memory.
    """

    def build(config: RateLimitConfig) -> RemoteSpendStore:
        return RemoteSpendStore(config, master, clock, on_error)

    return build
