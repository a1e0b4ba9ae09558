# -*- test-case-name: llmproxy.test.test_budgets -*-
"""
What a budget means, independent of where spend is kept.

Scopes and periods
==================

Spend is counted per scope (C{key:<key id>} for a proxy key,
C{user:<user>} for a user with a budget of its own) and per period: the
UTC day and the calendar month (UTC). A L{Hold} is one request's claim on
one scope in one period: how much it may cost at most (its C{amount}) and
the cap it must fit under (its C{limit}; L{None} for a scope that is only
counted).

Amounts are integers of nano-USD (10^-9 USD): both stores add them
exactly, and Redis keeps them as integers.

Check and reserve
=================

Before forwarding, every capped hold is checked and reserved in one atomic
step: a hold fits when C{spent + held + amount <= limit}, where C{held} is
what requests in flight have reserved. If one does not fit, nothing is
reserved. When the request is over, its reservation is replaced by what
it cost (L{ISpendStore.settle}): C{held} gives back the amount, C{spent}
takes the charge. A request that straddles midnight (or the end of a
month) gives back its reservation in the period it was admitted in, and
its cost counts in the period it ended in, where its cost record's
timestamp puts it too.

The worst-case overshoot under concurrency is in docs/keys-and-budgets.md
and held by C{llmproxy.test.test_budgets}.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from attrs import frozen
from zope.interface import Interface

from llmproxy.config import Price

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

NANOS_PER_USD = 1_000_000_000
PER_TOKENS = 1_000_000
"""Prices are USD per this many tokens."""

PERIODS = ("day", "month")


def usd_to_nanos(usd: float) -> int:
    return round(usd * NANOS_PER_USD)


def nanos_to_usd(nanos: int) -> float:
    return nanos / NANOS_PER_USD


def worst_case_nanos(price: Price, input_tokens: int, output_tokens: int) -> int:
    """
    The most a request may cost: its input tokens at the input price, and
    its output tokens at the higher of the output and reasoning prices
    (any of them may be reasoning), rounded up to a whole nano-USD.
    """
    usd = (
        max(input_tokens, 0) * price.input
        + max(output_tokens, 0) * max(price.output, price.reasoning)
    ) / PER_TOKENS
    return math.ceil(usd * NANOS_PER_USD)


def period_id(period: str, now: float) -> str:
    """
    The period C{now} falls in: C{2026-12-03} (day) or C{2026-12} (month),
    UTC. Ids of one kind sort in time order.
    """
    moment = time.gmtime(now)
    if period == "day":
        return f"{moment.tm_year:04d}-{moment.tm_mon:02d}-{moment.tm_mday:02d}"
    return f"{moment.tm_year:04d}-{moment.tm_mon:02d}"


def period_end(period: str, now: float) -> float:
    """
    When the period C{now} falls in ends (POSIX seconds).
    """
    moment = time.gmtime(now)
    if period == "day":
        start = calendar.timegm((moment.tm_year, moment.tm_mon, moment.tm_mday, 0, 0, 0))
        return float(start + 86400)
    year, month = (
        (moment.tm_year + 1, 1) if moment.tm_mon == 12 else (moment.tm_year, moment.tm_mon + 1)
    )
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


@frozen
class Hold:
    """
    One request's claim on one scope in one period.

    @ivar scope: C{key:<key id>} or C{user:<user>}.
    @ivar period: C{day} or C{month}.
    @ivar limit: the cap in nano-USD; L{None} when the scope is counted but
        not capped in this period.
    @ivar amount: what the request may cost at most, in nano-USD.
    @ivar alert_at: the fractions of C{limit} whose crossing is an alert.
    """

    scope: str
    period: str
    limit: int | None
    amount: int
    alert_at: tuple[float, ...] = ()


@frozen
class BudgetReservation:
    """
    What a store needs to settle an admitted request. Callers treat it as
    opaque and give it back to the store that made it.

    @ivar at: the clock when the request was admitted.
    @ivar holds: every scope-period the request is counted in.
    @ivar reserved: whether the capped holds' amounts were reserved (not
        when a shared store was unreachable and failed open).
    """

    at: float
    holds: tuple[Hold, ...]
    reserved: bool = True


@frozen
class Shortfall:
    """
    The first capped hold that did not fit.

    @ivar spent: what the scope spent in the period, in nano-USD.
    @ivar held: what requests in flight hold, in nano-USD.
    @ivar alert: this refusal is the first to reach the whole budget in
        the period (a refusal counts as reaching C{1.0}).
    """

    hold: Hold
    spent: int
    held: int
    alert: bool

    @property
    def remaining(self) -> int:
        limit = self.hold.limit or 0
        return max(0, limit - self.spent - self.held)


@frozen
class SpendDecision:
    """
    A store's answer to L{ISpendStore.reserve}: a reservation, or the
    shortfall that refused the request.
    """

    reservation: BudgetReservation | None
    shortfall: Shortfall | None = None


@frozen
class Spent:
    """
    One scope-period after a settlement.

    @ivar spent: its spend in the current period, in nano-USD.
    @ivar crossed: the fractions of its cap this settlement crossed for the
        first time in the period (each is alerted once).
    """

    hold: Hold
    spent: int
    crossed: tuple[float, ...] = ()


def crossed(hold: Hold, spent: int, already: float) -> tuple[float, ...]:
    """
    The fractions of C{hold}'s cap at or below C{spent}, above the spend
    C{already} alerted on. A cap of 0 crosses nothing by spending (only a
    refusal reaches it).
    """
    limit = hold.limit
    if not limit:
        return ()
    return tuple(f for f in hold.alert_at if already < f * limit <= spent)


def fits(hold: Hold, spent: int, held: int) -> bool:
    return hold.limit is None or spent + held + hold.amount <= hold.limit


class ISpendStore(Interface):
    """
    Where spend is kept: in this process, or in Redis for every instance.
    """

    def reserve(holds: Sequence[Hold], now: float) -> Deferred[SpendDecision]:  # noqa: N805
        """
        Check every capped hold and reserve all of their amounts, or none.

        @raise BackendUnavailable: (as a failure) when a shared store is
            unreachable and C{fail_mode} is C{closed}.
        """

    def settle(
        reservation: BudgetReservation,  # noqa: N805
        charges: Sequence[int],
        now: float,
    ) -> Deferred[tuple[Spent, ...]]:
        """
        Give back the reserved amounts and count C{charges} (nano-USD, one
        per hold, in order) as spent in the current period. Call once per
        reservation. Never fails: a store that cannot be reached logs it
        and answers with no figures.
        """
