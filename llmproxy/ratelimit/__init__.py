# -*- test-case-name: llmproxy.test.test_ratelimit -*-
"""
Rate limiting: scopes, sliding windows, token estimates, and the backends
that keep the counters (in memory, or in Redis shared by several proxies).

Nothing here knows HTTP: the forwarder turns a request into a
L{LimitRequest}, asks L{IRateLimiter.reserve}, and maps a L{Denial} to the
429 headers.
"""

from __future__ import annotations

from collections.abc import Callable

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
from llmproxy.ratelimit.redis_backend import RedisRateLimiter

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
    "limiter_service",
    "sweeper_service",
]


def limiter_for(
    config: RateLimitConfig,
    reactor: IReactorTime,
    metrics_hook: Callable[[], object] | None = None,
) -> IRateLimiter | None:
    """
    The limiter C{config} asks for, or C{None} when rate limiting is off.

    Run L{limiter_service} of it as a child service.

    @param metrics_hook: for a Redis limiter, called on each backend error
        the caller does not see (see L{RedisRateLimiter}).
    """
    if not config.enabled:
        return None
    if config.backend == "redis":
        return RedisRateLimiter(config, reactor, reactor, metrics_hook)
    return MemoryRateLimiter(config, reactor)


def limiter_service(
    limiter: IRateLimiter, config: RateLimitConfig, clock: IReactorTime
) -> IService | None:
    """
    The service a limiter needs running: the sweeper of a
    L{MemoryRateLimiter} (every C{sweep_interval_seconds}), the connection
    pool of a L{RedisRateLimiter} (the limiter itself).
    """
    if isinstance(limiter, MemoryRateLimiter):
        return sweeper_service(limiter, config.sweep_interval_seconds, clock)
    if isinstance(limiter, RedisRateLimiter):
        return limiter
    return None
