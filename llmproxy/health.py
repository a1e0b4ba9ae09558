# -*- test-case-name: llmproxy.test.test_health -*-
"""
Per-provider health, judged only from real traffic: a health check must cost
nothing and must never call an upstream.
"""

from __future__ import annotations

from collections import deque

from attrs import define, field
from twisted.internet.interfaces import IReactorTime

DEGRADED_AFTER = 5
"""Consecutive failed upstream attempts that make a provider degraded..."""

DEGRADED_WINDOW_SECONDS = 60.0
"""...when all of them happened within this many seconds."""


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
