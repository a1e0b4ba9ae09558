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
L{WARNING_INTERVAL} seconds. The pool reconnects by itself with backoff
(1 s growing to 10 s) and is replaced if it gives up (see
L{RedisLink._live_pool}); scripts are loaded again on each new connection
(C{EVAL} once, then C{EVALSHA}, falling back to C{EVAL} on C{NOSCRIPT}).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.config import RateLimitConfig

log = Logger()

WARNING_INTERVAL = 10.0
"""Seconds between two warnings about an unreachable backend."""
REBUILD_INTERVAL = 2.0
"""Seconds between two replacements of a connection pool that gave up."""


class BackendUnavailable(Exception):  # noqa: N818 - the name the forwarder uses
    """
    The shared backend could not be reached in time and C{fail_mode} is
    C{closed}: the caller answers 503.
    """


@frozen
class RedisTarget:
    """
    Where the Redis server is, from C{redis://[[user]:password@]host[:port][/db]}
    (C{rediss://} for TLS, verified against the system's trust roots).
    """

    host: str
    port: int
    db: int
    password: str | None
    username: str | None
    tls: bool


def parse_redis_url(url: str) -> RedisTarget:
    """
    @raise ValueError: for another scheme, a bad port or a bad database number.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis:// or rediss:// URL: {parts.scheme!r}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database must be a number, got {path!r}")
    return RedisTarget(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        db=int(path) if path else 0,
        password=unquote(parts.password) if parts.password is not None else None,
        username=unquote(parts.username) if parts.username else None,
        tls=parts.scheme == "rediss",
    )


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
        self._poolsize = poolsize
        self.target = parse_redis_url(config.redis.url)
        self._pool: Any = None
        self._built_at = -math.inf
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
        self._connect()

    def _connect(self) -> Any:
        """
        Open a new connection pool (it connects in the background).
        """
        # txredisapi imports the global reactor, so it is imported here,
        # when the process already runs one, never at module import.
        import txredisapi

        target = self.target
        tls: object = False
        if target.tls:
            from twisted.internet.ssl import optionsForClientTLS

            tls = optionsForClientTLS(target.host)
        pool = txredisapi.lazyConnectionPool(
            target.host,
            target.port,
            # SELECT on each new connection; 0 is where a connection starts.
            dbid=target.db or None,
            poolsize=self._poolsize,
            reconnect=True,
            password=target.password,
            username=target.username,
            ssl_context_factory=tls,
            connectTimeout=5,
        )
        # The pool reports failing to set up a connection (bad password or
        # database, or the pool closed while connecting) on this Deferred;
        # the calls that needed the connection have already failed.
        connected: Deferred[Any] | None = getattr(pool, "_connected", None)
        if connected is not None:
            connected.addErrback(self._setup_failed)
        self._pool = pool
        self._built_at = self._reactor.seconds()
        return pool

    def _setup_failed(self, failure: Failure) -> None:
        if self.running:
            log.warn("Redis connection failed: {error}", error=failure.getErrorMessage())

    def _live_pool(self) -> Any:
        """
        The pool, replaced by a new one if it has given up.

        txredisapi stops reconnecting the whole pool for good when any
        connection fails its C{AUTH} or C{SELECT}, which also happens when
        Redis goes away during that exchange; then only a new pool recovers.
        A pool is replaced at most every L{REBUILD_INTERVAL} seconds, so a
        wrong password does not turn into a connection storm.
        """
        pool = self._pool
        factory = getattr(pool, "_factory", None)
        if not getattr(factory, "stopped", False):
            return pool
        if self._reactor.seconds() - self._built_at < REBUILD_INTERVAL:
            return pool
        log.warn("Redis pool stopped reconnecting; opening a new one")
        pool.disconnect().addErrback(lambda _: None)
        return self._connect()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        pool, self._pool = self._pool, None
        if pool is None:
            return succeed(None)
        closed: Deferred[None] = pool.disconnect()
        return closed

    def call(self, script: str, keys: Sequence[str], args: Sequence[str]) -> Deferred[Any]:
        """
        Run one Lua script, failing after C{redis.timeout_ms}.
        """
        if self._pool is None:
            return fail(BackendUnavailable("the Redis connection is not running"))
        result: Deferred[Any] = self._live_pool().eval(script, list(keys), list(args))
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
