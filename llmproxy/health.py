# -*- test-case-name: llmproxy.test.test_health -*-
"""
Per-provider health, judged only from real traffic: a health check must cost
nothing and must never call an upstream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from attrs import define, field
from twisted.internet.interfaces import IReactorTime

DEGRADED_AFTER = 5
"""Consecutive failed upstream attempts that make a provider degraded..."""

DEGRADED_WINDOW_SECONDS = 60.0
"""...when all of them happened within this many seconds."""

UPSTREAM_SEVERITY = {"healthy": 0, "half_open": 1, "open": 2, "rate_limited": 3}
"""An upstream's states, from the least to the most severe."""


@define
class ProviderHealth:
    """
    Counters and the outcome of the last few upstream attempts of one provider.
    """

    requests: int = 0
    errors: int = 0
    active_streams: int = 0
    recent: deque[tuple[float, bool]] = field(factory=lambda: deque(maxlen=DEGRADED_AFTER))

    def status(self, now: float) -> str:
        if len(self.recent) < DEGRADED_AFTER:
            return "healthy"
        if any(ok for _, ok in self.recent):
            return "healthy"
        oldest = self.recent[0][0]
        return "degraded" if now - oldest <= DEGRADED_WINDOW_SECONDS else "healthy"


class HealthBoard:
    """
    Health of every provider by name; providers appear on first use or when
    the gateway lists them.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._providers: dict[str, ProviderHealth] = {}

    def provider(self, name: str) -> ProviderHealth:
        health = self._providers.get(name)
        if health is None:
            health = self._providers[name] = ProviderHealth()
        return health

    def attempt(self, name: str, ok: bool) -> None:
        """
        Record the outcome of one upstream attempt: C{ok} is C{False} for a
        connection error, a timeout, a broken stream or a 5xx.
        """
        health = self.provider(name)
        health.requests += 1
        if not ok:
            health.errors += 1
        health.recent.append((self._clock.seconds(), ok))

    def status(self, name: str) -> str:
        return self.provider(name).status(self._clock.seconds())


def status_of(attempts: Iterable[Iterable[tuple[float, bool]]], now: float) -> str:
    """
    A provider's status from the recent attempts of several processes (a
    group of workers): their last L{DEGRADED_AFTER}, in time order, judged
    as one process's.
    """
    merged = ProviderHealth()
    merged.recent.extend(sorted((at, ok) for recent in attempts for at, ok in recent))
    return merged.status(now)


def merge_upstream(mine: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """
    One upstream as a group of processes sees it, from each one's entry
    (C{status}, C{open_models}, C{in_flight}): each process keeps its own
    circuits, so the state is the most severe any reports, the open models
    those open in any, and the requests in flight the sum. C{mine} gives
    the rest of the entry.
    """
    return {
        **mine,
        "status": max(
            (entry["status"] for entry in entries),
            key=lambda status: UPSTREAM_SEVERITY.get(status, 0),
            default=mine["status"],
        ),
        "open_models": sorted({model for entry in entries for model in entry["open_models"]}),
        "in_flight": sum(entry["in_flight"] for entry in entries),
    }
