# -*- test-case-name: llmproxy.test.test_ratelimit_redis,llmproxy.test.test_budgets_redis -*-
"""
A connection to the Redis that several proxy instances share: the rate
limiter's counters and the budgets' spend both live there, each behind its
own L{RedisLink}.

A link is a service: starting it opens a txredisapi connection pool,
stopping it closes the pool. Every call is one Lua script with a deadline
(C{redis.timeout_ms}); txredisapi queues commands while it reconnects, so
without one a request would wait for Redis to come back. What a failure
means (admit, refuse) is the caller's C{fail_mode}; the link counts it
through a metrics hook and logs a warning at most every
L{WARNING_INTERVAL} seconds. The connections are a L{RedisPool}, which
reconnects by itself and is replaced if it gives up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.config import RateLimitConfig
from llmproxy.redispool import RedisPool, RedisTarget, parse_redis_url

__all__ = [
    "WARNING_INTERVAL",
    "BackendUnavailable",
    "RedisLink",
    "RedisTarget",
    "parse_redis_url",
]

log = Logger()

WARNING_INTERVAL = 10.0
"""Seconds between two warnings about an unreachable backend."""


class BackendUnavailable(Exception):  # noqa: N818 - the name the forwarder uses
    """
    The shared backend could not be reached in time and C{fail_mode} is
    C{closed}: the caller answers 503.
    """


class RedisLink(Service):
    """
    A pool of connections to the Redis of C{features.rate_limiting.redis},
    with a deadline on every call.

    @cvar warning_format: the warning logged when a call fails (fields
        C{operation}, C{error}, C{mode}, C{suppressed}).
    @param clock: the time a subclass computes its windows from.
    @param reactor: runs the per-call deadlines.
    @param metrics_hook: called once per backend error that the caller does
        not see as a failure (see L{backend_error}).
    @param poolsize: connections in the pool; calls are pipelined on them.
    """

    warning_format: ClassVar[str] = (
        "Redis backend {operation} failed ({error}); failing {mode}"
        " ({suppressed} more failures since the last warning)"
    )

    def __init__(
        self,
        config: RateLimitConfig,
        clock: IReactorTime,
        reactor: IReactorTime,
        metrics_hook: Callable[[], object] | None = None,
        *,
        poolsize: int = 4,
    ) -> None:
        self._config = config
        self._clock = clock
        self._reactor = reactor
        self._metrics_hook = metrics_hook
        self.target = parse_redis_url(config.redis.url)
        self._pool = RedisPool(self.target, reactor, poolsize)
        self._last_warning = -math.inf
        self._suppressed = 0
        self._configured(config)

    def _configured(self, config: RateLimitConfig) -> None:
        """
        C{config} is in force (at start, and after each reload): a subclass
        derives what it needs from it.
        """

    def reconfigure(self, config: RateLimitConfig) -> None:
        """
        Use a new configuration (limits, timeout, fail mode) from now on.
        The Redis URL is read at start only; a new one needs a restart.
        """
        if config.redis.url != self._config.redis.url:
            log.warn("Redis URL changed; restart llmproxy to use the new one")
        self._config = config
        self._configured(config)

    def startService(self) -> None:
        Service.startService(self)
        self._pool.open()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return self._pool.close()

    def call(self, script: str, keys: Sequence[str], args: Sequence[str]) -> Deferred[Any]:
        """
        Run one Lua script, failing after C{redis.timeout_ms}.
        """
        if not self._pool.running:
            return fail(BackendUnavailable("the Redis connection is not running"))
        result: Deferred[Any] = self._pool.eval(script, list(keys), list(args))
        result.addTimeout(self._config.redis.timeout_ms / 1000, self._reactor)
        return result

    def describe(self, failure: Failure) -> str:
        if failure.check(TimeoutError):
            return f"no answer within {self._config.redis.timeout_ms} ms"
        return failure.getErrorMessage() or repr(failure.value)

    def backend_error(self, operation: str, failure: Failure, *, count: bool = True) -> None:
        """
        Count a failed call through the metrics hook (unless the caller
        reports it itself: C{count=False}) and warn about it, at most once
        per L{WARNING_INTERVAL}.
        """
        if count and self._metrics_hook is not None:
            try:
                self._metrics_hook()
            except Exception:
                log.failure("Redis metrics hook failed")
        now = self._reactor.seconds()
        if now - self._last_warning < WARNING_INTERVAL:
            self._suppressed += 1
            return
        log.warn(
            self.warning_format,
            operation=operation,
            error=self.describe(failure),
            mode=self._config.fail_mode,
            suppressed=self._suppressed,
        )
        self._last_warning = now
        self._suppressed = 0
