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
from typing import Protocol

from attrs import evolve
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime

from llmproxy.config import Config, Limits, RateLimitConfig, RateLimitOverrides
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
from llmproxy.ratelimit.remote import RemoteRateLimiter

__all__ = [
    "BackendUnavailable",
    "Decision",
    "Denial",
    "IRateLimiter",
    "LimitRequest",
    "MemoryBackend",
    "MemoryRateLimiter",
    "RedisRateLimiter",
    "RemoteRateLimiter",
    "Reservation",
    "estimate_tokens",
    "limiter_for",
    "limiter_status",
    "rate_limits_for",
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


def rate_limits_for(config: Config) -> RateLimitConfig:
    """
    The rate limits in force: C{features.rate_limiting}, with each proxy
    key's own C{limits} as the override of its C{key:<id>} scope. A key's
    limits are enforced even when rate limiting is off; then they are the
    only limits (every other scope is unlimited).
    """
    rates = config.features.rate_limiting
    own = {}
    if config.auth.mode != "passthrough":
        own = {key.id: key.limits for key in config.auth.keys if key.limits is not None}
    if not own:
        return rates
    if rates.enabled:
        per_key = {**rates.overrides.per_key, **own}
        return evolve(rates, overrides=evolve(rates.overrides, per_key=per_key))
    return evolve(rates, enabled=True, limits=Limits(), overrides=RateLimitOverrides(per_key=own))


MemoryBackend = Callable[[RateLimitConfig], IRateLimiter]
"""
Builds the limiter of the C{memory} backend: by default a
L{MemoryRateLimiter} in this process; in a worker of a group, the master's
counters seen through L{llmproxy.ratelimit.remote}.
"""


def limiter_for(
    config: RateLimitConfig,
    reactor: IReactorTime,
    metrics: LimiterMetrics | None = None,
    memory: MemoryBackend | None = None,
) -> IRateLimiter | None:
    """
    The limiter C{config} asks for, or C{None} when rate limiting is off.

    Run what L{services_for} returns for it as child services.

    @param metrics: told about backend errors, outages and overflow.
    @param memory: builds the C{memory} backend's limiter (see
        L{MemoryBackend}).
    """
    if not config.enabled:
        return None
    if config.backend == "redis":
        return RedisRateLimiter(config, reactor, reactor, metrics)
    if memory is not None:
        return memory(config)
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
    if isinstance(limiter, RemoteRateLimiter):
        return {"backend": "memory", "state": "ok", "held_by": "master"}
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
    memory: MemoryBackend | None = None,
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
    if (
        same
        and current is not None
        and isinstance(current, MemoryRateLimiter | RedisRateLimiter | RemoteRateLimiter)
    ):
        current.reconfigure(new)
        return current
    return limiter_for(new, reactor, metrics, memory)
