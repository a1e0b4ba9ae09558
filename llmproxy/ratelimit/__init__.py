# -*- test-case-name: llmproxy.test.test_ratelimit -*-
"""
Rate limiting: scopes, sliding windows, token estimates, and the backends
that keep the counters (in memory, or in Redis shared by several proxies).

Nothing here knows HTTP: the forwarder turns a request into a
L{LimitRequest}, asks L{IRateLimiter.reserve}, and maps a L{Denial} to the
429 headers.
"""

from __future__ import annotations

from typing import Protocol

from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime

from llmproxy.config import RateLimitConfig
from llmproxy.ratelimit.estimate import estimate_tokens
from llmproxy.ratelimit.memory import MemoryRateLimiter, sweeper_service
from llmproxy.ratelimit.policy import (
    BackendUnavailable,
    Decision,
    Denial,
    IRateLimiter,
    LimitRequest,
    Reservation,
)
from llmproxy.ratelimit.redis_backend import RateLimitMetrics, RedisRateLimiter

__all__ = [
    "BackendUnavailable",
    "Decision",
    "Denial",
    "IRateLimiter",
    "LimitRequest",
    "MemoryRateLimiter",
    "RedisRateLimiter",
    "Reservation",
    "estimate_tokens",
    "limiter_for",
    "limiter_status",
    "reconfigure_limiter",
    "services_for",
    "sweeper_service",
    "tracked_scopes",
]


class LimiterMetrics(RateLimitMetrics, Protocol):
    """
    What the limiters report (the proxy's L{llmproxy.metrics.Metrics}):
    the Redis backend's errors and outages, the memory backend's overflow.
    """

    def ratelimit_scope_overflow(self) -> None: ...


def limiter_for(
    config: RateLimitConfig, reactor: IReactorTime, metrics: LimiterMetrics | None = None
) -> IRateLimiter | None:
    """
    The limiter C{config} asks for, or C{None} when rate limiting is off.

    Run what L{services_for} returns for it as child services.
    """
    if not config.enabled:
        return None
    if config.backend == "redis":
        return RedisRateLimiter(config, reactor, reactor, metrics)
    overflowed = None if metrics is None else metrics.ratelimit_scope_overflow
    return MemoryRateLimiter(config, reactor, overflowed)


def limiter_status(limiter: object) -> dict[str, object] | None:
    """
    What C{/health} says about the limiter (an L{IRateLimiter} or L{None}):
    its backend and state.
    """
    if isinstance(limiter, RedisRateLimiter):
        return limiter.status()
    if isinstance(limiter, MemoryRateLimiter):
        return {"backend": "memory", "state": "ok", "tracked_scopes": len(limiter)}
    return None


def tracked_scopes(limiter: IRateLimiter | None) -> int:
    """
    How many scope-windows a memory limiter holds counters for (0 for any
    other limiter).
    """
    return len(limiter) if isinstance(limiter, MemoryRateLimiter) else 0


def services_for(
    limiter: IRateLimiter | None, config: RateLimitConfig, clock: IReactorTime
) -> list[IService]:
    """
    The services a limiter needs running: the sweeper of a
    L{MemoryRateLimiter} (every C{sweep_interval_seconds}), the connection
    pool of a L{RedisRateLimiter} (the limiter itself).
    """
    if limiter is None:
        return []
    # (Narrowed from IRateLimiter, not IRateLimiter | None: mypy-zope
    # thinks an implementer cannot be in that union.)
    if isinstance(limiter, MemoryRateLimiter):
        return [sweeper_service(limiter, config.sweep_interval_seconds, clock)]
    if isinstance(limiter, RedisRateLimiter):
        return [limiter]
    return []


def reconfigure_limiter(
    current: IRateLimiter | None,
    old: RateLimitConfig,
    new: RateLimitConfig,
    reactor: IReactorTime,
    metrics: LimiterMetrics | None = None,
) -> IRateLimiter | None:
    """
    The limiter to use after a configuration reload.

    While the backend stays the same (and, for Redis, the URL), the current
    limiter takes the new limits in place and keeps the usage counted so far:
    a reload must not hand every client a fresh window.  Otherwise a new
    limiter is built (or C{None} when rate limiting was turned off); the
    caller then starts its L{services_for} and stops the old one's.
    """
    if not new.enabled:
        return None
    same = (
        old.enabled
        and old.backend == new.backend
        and (new.backend == "memory" or old.redis.url == new.redis.url)
    )
    if same and current is not None and isinstance(current, MemoryRateLimiter | RedisRateLimiter):
        current.reconfigure(new)
        return current
    return limiter_for(new, reactor, metrics)
