# -*- test-case-name: llmproxy.test.test_status -*-
"""
The status page's aggregates: what every request did, folded as it ends
into fixed-size series and bounded tables, and read back as one JSON
document by C{/status.json} (and so by C{/status}).

The request path feeds it with two calls: L{StatusBoard.observe} from the
accounting phase for every forwarded request, and L{StatusBoard.refused}
for the requests the proxy answers itself (400, 429, 503, ...); the
budgets tell it their spend after each settlement
(L{StatusBoard.budget_spent}). Each is a handful of list and dict
updates; the sorting, merging and formatting all happen when someone
looks: L{StatusBoard.part} exports what this process holds, and
L{llmproxy.status.document} composes the page's data from it (or from
every worker's, in a group).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime

from llmproxy.status.document import (
    MAX_ERRORS,
    RATE_WINDOW,
    TIMELINE_POINTS,
    TIMELINE_STEP,
    TTFB_MINUTES,
    compose,
)
from llmproxy.status.series import MinuteHistograms, SecondCounts
from llmproxy.status.tables import (
    CACHE_READ,
    CACHE_WRITE,
    COST,
    ERRORS,
    INPUT,
    OUTPUT,
    REQUESTS,
    UNPRICED,
    BudgetTable,
    ScopeTable,
    UsageTable,
)

if TYPE_CHECKING:
    from llmproxy.accounting import CallSummary
    from llmproxy.admission import Refused
    from llmproxy.config import Config
    from llmproxy.inspection import CallFacts
    from llmproxy.pricing import Cost
    from llmproxy.runtime import ProxyState
    from llmproxy.upstream import Upstream

CLIENT_CLOSED = 499

_FAILURES = {
    "connect": "The upstream could not be reached.",
    "tls": "The TLS handshake with the upstream failed.",
    "connect_timeout": "Connecting to the upstream timed out.",
    "first_byte_timeout": "No response headers within timeouts.first_byte_seconds.",
    "total_timeout": "The request ran out of timeouts.total_seconds.",
}
"""What the errors list says for each way an upstream gives no response."""

_REFUSAL_KINDS = {
    400: "bad_request",
    401: "unauthorized",
    402: "budget_exceeded",
    403: "forbidden",
    429: "rate_limited",
    503: "unavailable",
}


class _ProviderSeries:
    __slots__ = ("counts", "ttfb")

    def __init__(self) -> None:
        self.counts = SecondCounts()
        self.ttfb = MinuteHistograms()


class StatusBoard:
    """
    Everything C{/status} shows that the health board and metrics do not
    already hold.

    @ivar enabled: C{server.status.enabled}; while off, nothing is recorded.
    @ivar track_scopes: rate limiting is on, so per-scope use is counted.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.enabled = True
        self.track_scopes = False
        self._day = -1
        self._counts = SecondCounts()
        self._ttfb = MinuteHistograms()
        self._providers: dict[str, _ProviderSeries] = {}
        self._by_provider = UsageTable()
        self._by_model = UsageTable()
        self._by_key = UsageTable()
        self._by_user = UsageTable()
        self._scopes = ScopeTable()
        self._budgets = BudgetTable()
        self._errors: deque[dict[str, Any]] = deque(maxlen=MAX_ERRORS)

    def configure(self, config: Config) -> None:
        """
        Take the settings of a (re)loaded configuration.
        """
        self.enabled = config.server.status.enabled
        self.track_scopes = self.enabled and config.features.rate_limiting.enabled

    def _series(self, provider: str) -> _ProviderSeries:
        found = self._providers.get(provider)
        if found is None:
            found = self._providers[provider] = _ProviderSeries()
        return found

    def _turn_day(self, now: float) -> None:
        day = int(now // 86400)
        if day != self._day:
            self._day = day
            for table in (self._by_provider, self._by_model, self._by_key, self._by_user):
                table.clear()
            self._scopes.new_day()

    # -- recording ---------------------------------------------------------------

    def observe(self, summary: CallSummary, cost: Cost) -> None:
        """
        One forwarded request is over: count it.
        """
        if not self.enabled:
            return
        now = summary.ended
        if int(now // 86400) != self._day:
            self._turn_day(now)
        facts, usage = summary.facts, summary.usage
        status = summary.status
        error = (status is not None and status >= 400 and status != CLIENT_CLOSED) or (
            summary.failure is not None
        )
        series = self._providers.get(facts.provider) or self._series(facts.provider)
        self._counts.add(now, error)
        series.counts.add(now, error)
        if summary.first_byte is not None:
            ttfb = summary.first_byte - summary.started
            self._ttfb.add(now, ttfb)
            series.ttfb.add(now, ttfb)
        model = usage.model or facts.request.model
        total_cost = cost.total_cost
        for row in (
            self._by_provider.row(facts.provider),
            self._by_model.row(model),
            self._by_key.row(facts.key_id),
            self._by_user.row(facts.user),
        ):
            row[REQUESTS] += 1
            if error:
                row[ERRORS] += 1
            if usage.reported:
                row[INPUT] += usage.input_tokens
                row[OUTPUT] += usage.output_tokens
                row[CACHE_READ] += usage.cache_read_tokens
                row[CACHE_WRITE] += usage.cache_write_tokens
                if total_cost is None:
                    row[UNPRICED] += 1
            if total_cost is not None:
                row[COST] += total_cost
        if self.track_scopes:
            self._scopes.used(now, _scopes(facts), usage.total_tokens)
        if error:
            failure = summary.failure
            kind = failure or f"status_{status}"
            message = (
                _FAILURES.get(failure, "The upstream failed.")
                if failure is not None
                else f"The upstream answered {status}."
            )
            self._error(now, facts, facts.provider, model, status, "upstream", kind, message)

    def refused(self, provider: str, facts: CallFacts | None, refusal: Refused) -> None:
        """
        The proxy answered a request itself (bad request, over a limit,
        limiter unreachable, ...): count it, and list it among the errors.
        """
        if not self.enabled:
            return
        now = self._clock.seconds()
        self._turn_day(now)
        self._counts.add(now, True)
        self._series(provider).counts.add(now, True)
        model = facts.request.model if facts is not None else None
        for row in (
            self._by_provider.row(provider),
            self._by_model.row(model),
            self._by_key.row(facts.key_id if facts is not None else None),
            self._by_user.row(facts.user if facts is not None else None),
        ):
            row[REQUESTS] += 1
            row[ERRORS] += 1
        if self.track_scopes:
            for name, value in refusal.headers:
                if name.lower() == b"x-ratelimit-scope":
                    self._scopes.denied(now, value.decode("utf-8", "replace"))
        kind = _REFUSAL_KINDS.get(refusal.status, f"status_{refusal.status}")
        self._error(now, facts, provider, model, refusal.status, "proxy", kind, refusal.message)

    def budget_spent(self, scope: str, period: str, spent: int, limit: int, now: float) -> None:
        """
        A settlement left a capped budget at C{spent} of C{limit} (nano-USD)
        in C{period} (a L{llmproxy.budgets.SpendWatch}).
        """
        if self.enabled:
            self._budgets.spent(now, scope, period, spent, limit)

    def _error(
        self,
        now: float,
        facts: CallFacts | None,
        provider: str,
        model: str | None,
        status: int | None,
        source: str,
        kind: str,
        message: str | None,
    ) -> None:
        # Only what the proxy itself knows and made: never a header, a
        # credential or a body.
        self._errors.appendleft(
            {
                "time": now,
                "request_id": facts.request_id if facts is not None else None,
                "provider": provider,
                "endpoint": facts.endpoint if facts is not None else None,
                "model": model,
                "status": status,
                "source": source,
                "kind": kind,
                "message": message,
                "key_id": facts.key_id if facts is not None else None,
                "user": facts.user if facts is not None else None,
            }
        )

    # -- reading -------------------------------------------------------------------

    def part(self, state: ProxyState) -> dict[str, Any]:
        """
        What this process holds for the page, as JSON data that adds up
        with other processes' (L{llmproxy.status.document.compose} reads
        one or several): the recent slots of the series, the day's tables,
        the budgets' spend, the errors, and the live counters of each
        provider and upstream.
        """
        now = state.clock.seconds()
        self._turn_day(now)
        health = state.health
        providers = {}
        for name, upstream in state.runtime.upstreams.items():
            counters = health.provider(name)
            series = self._providers.get(name) or _ProviderSeries()
            providers[name] = {
                "counts": series.counts.export(now, RATE_WINDOW + 1),
                "ttfb": series.ttfb.export(now, TTFB_MINUTES),
                "requests": counters.requests,
                "errors": counters.errors,
                "active_streams": counters.active_streams,
                "recent": list(counters.recent),
                "upstreams": _upstreams(state, name, upstream),
            }
        return {
            "day": self._day,
            "in_flight": state.inflight,
            "counts": self._counts.export(now, TIMELINE_STEP * TIMELINE_POINTS + 1),
            "ttfb": self._ttfb.export(now, TTFB_MINUTES),
            "providers": providers,
            "tables": {
                "by_provider": self._by_provider.rows,
                "by_model": self._by_model.rows,
                "by_key": self._by_key.rows,
                "by_user": self._by_user.rows,
            },
            "scopes": self._scopes.export(now) if self.track_scopes else None,
            "budgets": self._budgets.export(now),
            "errors": list(self._errors),
        }

    def snapshot(self, state: ProxyState, asking: int = 0) -> dict[str, Any]:
        """
        The whole page's data for this process alone, as C{/status.json}
        serves it outside a group of workers.

        @param asking: requests in flight that are the snapshot's own
            (the C{/status.json} request), left out of C{in_flight}.
        """
        return compose(state, [self.part(state)], asking=asking)


def _scopes(facts: CallFacts) -> list[str]:
    """
    The rate-limit scopes a request counts in (as the limiter names them).
    """
    scopes = ["global", "provider:" + facts.provider]
    if facts.request.model:
        scopes.append("model:" + facts.request.model)
    if facts.key_id:
        scopes.append("key:" + facts.key_id)
    if facts.user:
        scopes.append("user:" + facts.user)
    return scopes


def _upstreams(state: ProxyState, name: str, upstream: Upstream) -> dict[str, Any]:
    """
    Each upstream of a provider with its circuit state, as C{/health} has it.
    """
    entries: dict[str, Any] = {}
    for endpoint in upstream.config.upstreams:
        status, open_models = state.circuits.describe(name, endpoint.name)
        entries[endpoint.name] = {
            "status": status,
            "open_models": open_models,
            "in_flight": state.circuits.in_flight(name, endpoint.name),
        }
    return entries
