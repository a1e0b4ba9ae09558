# -*- test-case-name: llmproxy.test.test_status -*-
"""
The JSON document of C{/status.json} (and so of C{/status}), composed from
the parts of one process or of every worker of a group
(L{llmproxy.status.board.StatusBoard.part}).

Parts add up: per-second counts and TTFB histograms are added slot by slot
before rates and quantiles are read from them, the day's tables row by
row, the providers' counters summed; a budget shows the largest spend any
part saw in the current period (each worker learns the whole group's
spend at its own settlements, so the largest is the freshest); the errors
are the newest L{MAX_ERRORS} of all; an upstream shows the most severe
state any process has for it (each keeps its own circuit breakers). The rest (the providers
and their upstreams, the features, the limits) is the answering process's
configuration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from llmproxy.budgets import budget_caps
from llmproxy.budgets.policy import usd_to_nanos
from llmproxy.health import merge_upstream, status_of
from llmproxy.status.series import MinuteHistograms, SecondCounts
from llmproxy.status.tables import BudgetTable, ScopeTable, UsageTable

if TYPE_CHECKING:
    from llmproxy.config import AuthConfig, Limits, ProviderConfig, RateLimitConfig
    from llmproxy.runtime import ProxyState

MAX_ERRORS = 50
"""Errors the page lists, newest first."""

TOP_ROWS = 20
"""Rows each table of the page shows."""

TIMELINE_STEP = 5
"""Seconds per point of the 15-minute charts."""

TIMELINE_POINTS = 180
"""Points of the charts: 180 x 5 s = 15 minutes."""

RATE_WINDOW = 60
"""Seconds over which the current requests/s and error rate are read."""

TTFB_MINUTES = 5
"""Minutes over which TTFB p50 and p95 are read."""

REFRESH_SECONDS = 1
"""How often the page asks for new data."""

TABLES = ("by_provider", "by_model", "by_key", "by_user")


def compose(
    state: ProxyState,
    parts: Sequence[dict[str, Any]],
    *,
    asking: int = 0,
    started_at: float | None = None,
    draining: bool = False,
) -> dict[str, Any]:
    """
    The page's data, from C{parts} (this process's own, or every worker's).

    @param asking: requests in flight that are the document's own (the
        C{/status.json} request), left out of C{in_flight}.
    @param started_at: when the process, or the group, started; by
        default this process's start.
    @param draining: the group drains (this process's own drain counts
        whatever this says).
    """
    now = state.clock.seconds()
    runtime = state.runtime
    config = runtime.config
    counts, ttfb = _series(parts)
    requests, errors = counts.window(now, RATE_WINDOW)
    count, (p50, p95) = ttfb.quantiles(now, TTFB_MINUTES, (0.5, 0.95))
    providers = {
        name: _provider(name, upstream.config, parts, now)
        for name, upstream in runtime.upstreams.items()
    }
    timeline = counts.buckets(now, TIMELINE_STEP, TIMELINE_POINTS)
    today = int(now // 86400)
    tables = {name: UsageTable() for name in TABLES}
    for part in parts:
        if part["day"] == today:
            for name, table in tables.items():
                table.absorb(part["tables"][name])
    by_provider = tables["by_provider"]
    limits = config.features.rate_limiting
    errors_seen = sorted(
        (entry for part in parts for entry in part["errors"]),
        key=lambda entry: entry["time"],
        reverse=True,
    )[:MAX_ERRORS]
    return {
        "status": "draining" if draining or state.draining else "healthy",
        "version": state.build.version,
        "now": now,
        "uptime_seconds": round(now - (state.started_at if started_at is None else started_at), 3),
        "refresh_seconds": REFRESH_SECONDS,
        "features": {
            "rate_limiting": limits.enabled,
            "cost_tracking": config.features.cost_tracking.enabled,
            "metrics": config.features.metrics.enabled,
            "tracing": config.features.tracing.enabled,
        },
        "totals": {
            "requests_per_second": round(requests / RATE_WINDOW, 3),
            "error_rate": _ratio(errors, requests),
            "window_seconds": RATE_WINDOW,
            "in_flight": max(0, sum(part["in_flight"] for part in parts) - asking),
            "active_streams": sum(p["active_streams"] for p in providers.values()),
            "ttfb_ms": {"p50": p50, "p95": p95, "samples": count, "minutes": TTFB_MINUTES},
        },
        "timeline": {
            "step_seconds": TIMELINE_STEP,
            "end": int(now),
            "requests_per_second": [round(got / TIMELINE_STEP, 3) for got, _ in timeline],
            "error_rate": [_ratio(failed, got) for got, failed in timeline],
        },
        "providers": providers,
        "today": {
            "date": time.strftime("%Y-%m-%d", time.gmtime(now)),
            "totals": by_provider.totals(),
            **{name: table.top(TOP_ROWS) for name, table in tables.items()},
        },
        "cache": {
            "by_model": tables["by_model"].cache_top(TOP_ROWS),
            "by_key": tables["by_key"].cache_top(TOP_ROWS),
        },
        "rate_limits": {
            "enabled": limits.enabled,
            "scopes": _busiest(parts, now, today, limits),
        },
        "budgets": _budgets(parts, now, config.auth),
        "errors": [dict(entry, time=_iso(entry["time"])) for entry in errors_seen],
    }


def _series(entries: Iterable[dict[str, Any]]) -> tuple[SecondCounts, MinuteHistograms]:
    """
    The per-second counts and the TTFB histograms of several parts (or of
    one provider in several parts), added up.
    """
    counts, ttfb = SecondCounts(), MinuteHistograms()
    for entry in entries:
        counts.absorb(entry["counts"])
        ttfb.absorb(entry["ttfb"])
    return counts, ttfb


def _provider(
    name: str, provider: ProviderConfig, parts: Sequence[dict[str, Any]], now: float
) -> dict[str, Any]:
    """
    One provider's line: its rate, errors and TTFB over every part, its
    counters summed, each of its upstreams merged.
    """
    found = [part["providers"][name] for part in parts if name in part["providers"]]
    counts, ttfb = _series(found)
    got, failed = counts.window(now, RATE_WINDOW)
    seen, (p50, p95) = ttfb.quantiles(now, TTFB_MINUTES, (0.5, 0.95))
    upstreams = {}
    for endpoint in provider.upstreams:
        entries = [e["upstreams"][endpoint.name] for e in found if endpoint.name in e["upstreams"]]
        known = {
            "status": "healthy",
            "base_url": endpoint.base_url,
            "open_models": [],
            "in_flight": 0,
        }
        upstreams[endpoint.name] = merge_upstream(known, entries)
    return {
        "kind": provider.kind,
        "status": status_of((entry["recent"] for entry in found), now),
        "base_url": provider.base_url,
        "requests_per_second": round(got / RATE_WINDOW, 3),
        "error_rate": _ratio(failed, got),
        "requests": sum(entry["requests"] for entry in found),
        "errors": sum(entry["errors"] for entry in found),
        "active_streams": sum(entry["active_streams"] for entry in found),
        "ttfb_ms": {"p50": p50, "p95": p95, "samples": seen},
        "upstreams": upstreams,
    }


def _busiest(
    parts: Sequence[dict[str, Any]], now: float, today: int, limits: RateLimitConfig
) -> list[dict[str, Any]]:
    """
    The scopes nearest their per-minute limits, over every part that
    counted them today.
    """
    exported = [
        part["scopes"] for part in parts if part["scopes"] is not None and part["day"] == today
    ]
    if not exported:
        return []
    scopes = ScopeTable()
    for table in exported:
        scopes.absorb(table, now)
    return scopes.busiest(now, TOP_ROWS, minute_limits(limits))


def _budgets(parts: Sequence[dict[str, Any]], now: float, auth: AuthConfig) -> list[dict[str, Any]]:
    """
    The budgets with the largest share of their cap spent, over every part,
    against the caps of the configuration in force.
    """
    budgets = BudgetTable()
    for part in parts:
        budgets.absorb(part["budgets"], now)
    caps = {key: usd_to_nanos(usd) for key, usd in budget_caps(auth).items()}
    return budgets.busiest(now, TOP_ROWS, caps)


def minute_limits(config: RateLimitConfig) -> Callable[[str], tuple[int, int]]:
    """
    The per-minute request and token limits of a scope, from the
    configuration (0 for none).
    """
    overrides = config.overrides
    tables = {
        "provider": overrides.per_provider,
        "model": overrides.per_model,
        "key": overrides.per_key,
        "user": overrides.per_user,
    }

    def of(scope: str) -> tuple[int, int]:
        kind, _, name = scope.partition(":")
        table = tables.get(kind)
        limits: Limits = config.limits
        if table is not None:
            limits = table.get(name, limits)
        return limits.requests_per_minute, limits.tokens_per_minute

    return of


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + (
        f".{int((seconds % 1) * 1000):03d}Z"
    )
