# -*- test-case-name: llmproxy.test.test_ratelimit_redis,llmproxy.test.test_budgets_redis -*-
"""
A connection to Redis: where it is (C{redis://} URLs) and a txredisapi
pool that keeps itself connected. The rate limiter's Redis backend and the
other shared stores (L{llmproxy.redislink}) each hold one.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import unquote, urlsplit

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

REBUILD_INTERVAL = 2.0
"""Seconds between two replacements of a connection pool that gave up."""


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


class RedisPool:
    """
    A txredisapi connection pool (it connects, and reconnects with backoff
    from 1 s growing to 10 s, in the background; calls are pipelined on its
    connections), replaced by a new one if it gives up (see L{live}).

    @ivar connected_once: a connection has been up since the pool opened.
    """

    def __init__(self, target: RedisTarget, reactor: IReactorTime, poolsize: int = 4) -> None:
        self.target = target
        self._reactor = reactor
        self._poolsize = poolsize
        self._pool: Any = None
        self._built_at = -math.inf
        self.connected_once = False

    def open(self) -> None:
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

    @property
    def running(self) -> bool:
        return self._pool is not None

    def _setup_failed(self, failure: Failure) -> None:
        if self._pool is not None:
            log.warn("Redis connection failed: {error}", error=failure.getErrorMessage())

    def live(self) -> Any:
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
        self.open()
        return self._pool

    def connections(self) -> int:
        """
        How many of the pool's connections are up right now.
        """
        size = getattr(getattr(self._pool, "_factory", None), "size", 0)
        count = size if isinstance(size, int) else 0
        if count:
            self.connected_once = True
        return count

    def lost(self) -> bool:
        """
        Whether every connection is down, having been up: Redis went away
        (a killed server closes its sockets at once).
        """
        return self.connections() == 0 and self.connected_once

    def eval(self, script: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        answer: Deferred[Any] = self.live().eval(script, keys, args)
        return answer

    def ping(self) -> Deferred[Any]:
        answer: Deferred[Any] = self.live().ping()
        return answer

    def close(self) -> Deferred[None]:
        pool, self._pool = self._pool, None
        if pool is None:
            return succeed(None)
        closed: Deferred[None] = pool.disconnect()
        return closed
