# -*- test-case-name: llmproxy.test.test_budgets -*-
"""
The budgets of one configuration, as the admission phase uses them: which
budgets a request counts against and what it may cost at most
(L{BudgetBook.plan}), the reservation (L{BudgetBook.reserve}), and the
settlement with what it really cost (L{BudgetBook.settle}), which also
updates the spend metrics, raises the alerts and tells a L{SpendWatch}
(the status page) what each capped budget has spent.

Nothing here knows HTTP: the admission phase turns a L{Shortfall} or an
L{Unpriced} into the answer a client gets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from llmproxy.budgets.alerts import Alert, AlertSender
from llmproxy.budgets.policy import (
    BudgetReservation,
    Hold,
    ISpendStore,
    Shortfall,
    SpendDecision,
    Spent,
    nanos_to_usd,
    usd_to_nanos,
    worst_case_nanos,
)
from llmproxy.config import AuthConfig, Budget, ProxyKey
from llmproxy.metrics import Metrics
from llmproxy.pricing import PriceBook
from llmproxy.providers import RequestFacts
from llmproxy.providers.format import GENERATION_METHODS

log = Logger(namespace="llmproxy.budgets")

FREE_ENDPOINTS = frozenset({"models", "count_tokens"})
"""Endpoints that are never billed: they reserve nothing."""

INPUT_ONLY_ENDPOINTS = frozenset({"embeddings", "embedContent"})
"""Endpoints billed for input only: they reserve no output."""

COUNTED_ONLY = Budget()
"""How a proxy key without a budget is counted (for its spend metric)."""


@frozen
class Plan:
    """
    The budgets one request counts against.

    @ivar holds: one per scope and period, capped or only counted.
    @ivar key_id: the proxy key of the request, if any.
    @ivar user: the user of the request, if any.
    """

    holds: tuple[Hold, ...]
    key_id: str | None
    user: str | None


@frozen
class Unpriced:
    """
    The request names a model without a price, and C{scope}'s budget
    refuses what it cannot count.
    """

    scope: str
    model: str


class SpendWatch(Protocol):
    """
    Who learns, after each settlement, what every capped budget it touched
    has spent: the status page, which shows the budgets nearest their caps.
    """

    def __call__(self, scope: str, period: str, spent: int, limit: int, now: float) -> None:
        """
        @param scope: C{key:<id>} or C{user:<user>}.
        @param period: C{day} or C{month}.
        @param spent: the scope's spend in the period C{now} falls in, in
            nano-USD (with a shared store, every instance's or worker's).
        @param limit: the cap, in nano-USD.
        @param now: the clock of the settlement, which picks the period.
        """


def _capped(budget: Budget) -> bool:
    return budget.daily_usd is not None or budget.monthly_usd is not None


def budget_caps(auth: AuthConfig) -> dict[tuple[str, str], float]:
    """
    Every cap of a configuration: C{(scope, period) -> USD}, for the
    proxy keys' budgets and the users'.
    """
    budgets = [(f"key:{key.id}", key.budget) for key in auth.keys if key.budget is not None]
    budgets += [(f"user:{user}", budget) for user, budget in auth.budgets.per_user.items()]
    return {
        (scope, period): usd
        for scope, budget in budgets
        for period, usd in (("day", budget.daily_usd), ("month", budget.monthly_usd))
        if usd is not None
    }


class BudgetBook:
    """
    The budgets of one configuration over the process's spend store.
    """

    def __init__(
        self,
        auth: AuthConfig,
        prices: PriceBook,
        store: ISpendStore,
        alerts: AlertSender | None,
        metrics: Metrics,
        watch: SpendWatch | None = None,
    ) -> None:
        """
        @param watch: told each capped budget's spend after a settlement.
        """
        self._per_user: Mapping[str, Budget] = auth.budgets.per_user
        self._webhook = auth.alerts.webhook_url
        self._prices = prices
        self._store = store
        self._alerts = alerts
        self._metrics = metrics
        self._watch = watch

    def plan(
        self,
        provider: str,
        request: RequestFacts,
        key: ProxyKey | None,
        user: str | None,
        input_tokens: int,
    ) -> Plan | Unpriced:
        """
        The holds of a request: its key's budget (every proxy key is
        counted, capped or not) and its user's, each for the day and the
        month, with the request's worst-case cost.

        @param input_tokens: the estimated input tokens.
        """
        scopes: list[tuple[str, Budget]] = []
        if key is not None:
            scopes.append((f"key:{key.id}", key.budget or COUNTED_ONLY))
        if user is not None and user in self._per_user:
            scopes.append((f"user:{user}", self._per_user[user]))
        key_id = key.id if key is not None else None
        if not scopes:
            return Plan((), key_id, user)
        model = request.model
        price = None
        if (
            model is not None
            and request.method in GENERATION_METHODS
            and request.endpoint not in FREE_ENDPOINTS
        ):
            price = self._prices.price(provider, model, input_tokens)
            if price is None:
                for scope, budget in scopes:
                    if _capped(budget) and budget.unpriced == "deny":
                        return Unpriced(scope, model)
        holds = []
        for scope, budget in scopes:
            amount = 0
            if price is not None:
                output = request.max_output_tokens or budget.reserve_output_tokens
                if request.endpoint in INPUT_ONLY_ENDPOINTS:
                    output = 0
                amount = worst_case_nanos(price, input_tokens, output)
            for period, cap in (("day", budget.daily_usd), ("month", budget.monthly_usd)):
                limit = None if cap is None else usd_to_nanos(cap)
                holds.append(Hold(scope, period, limit, amount, budget.alert_at))
        return Plan(tuple(holds), key_id, user)

    def reserve(self, plan: Plan, now: float) -> Deferred[SpendDecision]:
        """
        Reserve the plan's worst case in every capped hold, or refuse.
        """
        return self._store.reserve(plan.holds, now)

    def refused(self, plan: Plan, shortfall: Shortfall) -> None:
        """
        Count a refusal for lack of budget, and alert if it is the first to
        reach the whole budget this period.
        """
        self._metrics.budget_denied(plan.key_id)
        hold = shortfall.hold
        if shortfall.alert and hold.limit is not None:
            self._alert(plan, hold, shortfall.spent, 1.0)

    def settle(
        self, plan: Plan, reservation: BudgetReservation, cost_usd: float | None, now: float
    ) -> None:
        """
        Replace the reservation with what the request cost.

        @param cost_usd: the real cost; L{None} when it is unknown (the
            response was cut before its usage, or its model has no price),
            which keeps each hold's worst case.
        """
        charges = [
            hold.amount if cost_usd is None else usd_to_nanos(cost_usd)
            for hold in reservation.holds
        ]
        settled = self._store.settle(reservation, charges, now)
        settled.addCallback(self._settled, plan, now).addErrback(
            lambda failure: log.failure("budget settlement failed", failure)
        )

    def _settled(self, figures: tuple[Spent, ...], plan: Plan, now: float) -> None:
        watch = self._watch
        for figure in figures:
            hold = figure.hold
            if plan.key_id is not None and hold.scope.startswith("key:"):
                self._metrics.budget_spent(plan.key_id, hold.period, nanos_to_usd(figure.spent))
            if watch is not None and hold.limit is not None:
                watch(hold.scope, hold.period, figure.spent, hold.limit, now)
            for fraction in figure.crossed:
                self._alert(plan, hold, figure.spent, fraction)

    def _alert(self, plan: Plan, hold: Hold, spent: int, fraction: float) -> None:
        if self._alerts is None or hold.limit is None:
            return
        is_key = hold.scope.startswith("key:")
        alert = Alert(
            key_id=plan.key_id if is_key else None,
            user=plan.user if is_key else hold.scope.removeprefix("user:"),
            period=hold.period,
            spent_usd=nanos_to_usd(spent),
            limit_usd=nanos_to_usd(hold.limit),
            fraction=fraction,
            scope=hold.scope,
        )
        self._alerts.alert(alert, self._webhook)
