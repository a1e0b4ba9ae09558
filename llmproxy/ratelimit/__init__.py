# -*- test-case-name: llmproxy.test.test_ratelimit -*-
"""
Rate limiting: scopes, sliding windows, token estimates, and the backends
that keep the counters (in memory, or in Redis shared by several proxies).

Nothing here knows HTTP: the forwarder turns a request into a
L{LimitRequest}, asks L{IRateLimiter.reserve}, and maps a L{Denial} to the
429 headers.
"""

from __future__ import annotations

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

__all__ = [
    "BackendUnavailable",
    "Decision",
    "Denial",
    "IRateLimiter",
    "LimitRequest",
    "MemoryRateLimiter",
    "Reservation",
    "estimate_tokens",
    "limiter_for",
    "sweeper_service",
]


def limiter_for(config: RateLimitConfig, reactor: IReactorTime) -> IRateLimiter | None:
    """
    The limiter C{config} asks for, or C{None} when rate limiting is off.

    The caller runs the matching service: L{sweeper_service} for a
    L{MemoryRateLimiter}.
    """
    if not config.enabled:
        return None
    return MemoryRateLimiter(config, reactor)
