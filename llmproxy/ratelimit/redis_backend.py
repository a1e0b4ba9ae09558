# -*- test-case-name: llmproxy.test.test_ratelimit_redis -*-
"""
The Redis rate limiter: the same windows as the in-memory one, with the
counters in Redis so any number of proxy instances share them exactly.

Every operation is one Lua script, so check-and-reserve over all scopes is
atomic however many instances run.  The scripts take C{now} from the
caller's clock (C{ARGV}), so tests control time and the instances' clocks
define the slots (NTP-level skew only moves slot boundaries by the skew; a
counter never goes back to an older slot than the newest it has used).

Key layout
==========

One hash per scope and window, named C{llmproxy:rl:<window>:<scope>}, e.g.
C{llmproxy:rl:minute:key:3f2a9c0d1e5b7a64}.  Scope strings are those of
L{llmproxy.ratelimit.policy}: the key id in C{key:<key id>} is the short hash
the caller computed from the credential, never the credential itself, so no
key name contains a secret.  Fields: C{r} and C{t} (the window's request and
token totals), C{lo} and C{hi} (the oldest and newest slot that may hold
usage), and C{r<slot>} / C{t<slot>} per slot.  Each write sets a
C{PEXPIRE} to just after the newest slot stops counting, so idle scopes
vanish on their own and nothing needs sweeping.  Redis Cluster is not
supported (one script touches several keys).

Failures
========

Each call has a deadline (C{redis.timeout_ms}); txredisapi queues commands
while it reconnects, so without one a request would wait for Redis to come
back.  On a timeout or any other backend error, C{fail_mode: open} admits
the request without a reservation and C{closed} fails the call with
L{BackendUnavailable}; both call the metrics hook and log a warning at most
every L{WARNING_INTERVAL} seconds.  A failed reconcile or release is logged
and dropped.  A reservation whose reply was lost to the deadline may still
have been counted; it expires with its window.  The connection pool
reconnects by itself with backoff (1 s growing to 10 s) and is replaced if
it gives up (see L{RedisRateLimiter._live_pool}); the scripts are loaded
again on each new connection (C{EVAL} once, then C{EVALSHA}, falling back to
C{EVAL} on C{NOSCRIPT}).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from llmproxy.config import RateLimitConfig
from llmproxy.ratelimit.policy import (
    WINDOWS,
    BackendUnavailable,
    Decision,
    IRateLimiter,
    LimitRequest,
    Reservation,
    Tracked,
    TrackedCache,
    WindowUsage,
    deny,
    tightest,
)

log = Logger()

KEY_PREFIX = "llmproxy:rl:"
WARNING_INTERVAL = 10.0
"""Seconds between two warnings about an unreachable backend."""
REBUILD_INTERVAL = 2.0
"""Seconds between two replacements of a connection pool that gave up."""

_COMMON = """
local function refresh(key, k, count)
  local h = redis.call('HMGET', key, 'r', 't', 'lo', 'hi')
  local hi = tonumber(h[4])
  if not hi then
    return k, 0, 0, nil
  end
  if hi > k then
    k = hi
  end
  local first = k - count
  if hi < first then
    redis.call('DEL', key)
    return k, 0, 0, nil
  end
  local r, t, lo = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
  if lo < first then
    for j = lo, first - 1 do
      local v = redis.call('HMGET', key, 'r' .. j, 't' .. j)
      if v[1] then
        r = r - tonumber(v[1])
        t = t - tonumber(v[2])
        redis.call('HDEL', key, 'r' .. j, 't' .. j)
      end
    end
    lo = first
    redis.call('HSET', key, 'r', r, 't', t, 'lo', lo)
  end
  return k, r, t, lo
end

local function expire(key, k, count, size, now)
  redis.call('PEXPIRE', key, math.ceil(((k + count + 1) * size - now) * 1000) + 1000)
end
"""

RESERVE = (
    _COMMON
    + """
-- ARGV: now, cost, optimistic, then per key: slot size, slots, request limit, token limit
local now, cost, optimistic = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
local n = #KEYS
local ks, rs, ts, los = {}, {}, {}, {}
local admit = true
for i = 1, n do
  local b = 3 + (i - 1) * 4
  local size, count = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local lreq, ltok = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local k, r, t, lo = refresh(KEYS[i], math.floor(now / size), count)
  ks[i], rs[i], ts[i], los[i] = k, r, t, lo
  if lreq > 0 and r + 1 > lreq then
    admit = false
  end
  if ltok > 0 and not (optimistic and t == 0) and t + cost > ltok then
    admit = false
  end
end
if not admit then
  local out = {0}
  for i = 1, n do
    local slots = {}
    if los[i] then
      for j = los[i], ks[i] do
        local v = redis.call('HMGET', KEYS[i], 'r' .. j, 't' .. j)
        if v[1] then
          slots[#slots + 1] = j
          slots[#slots + 1] = tonumber(v[1])
          slots[#slots + 1] = tonumber(v[2])
        end
      end
    end
    out[i + 1] = {rs[i], ts[i], slots}
  end
  return out
end
local out = {1}
for i = 1, n do
  local b = 3 + (i - 1) * 4
  local size, count = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local key, k = KEYS[i], ks[i]
  redis.call('HINCRBY', key, 'r' .. k, 1)
  redis.call('HINCRBY', key, 't' .. k, cost)
  redis.call('HSET', key, 'r', rs[i] + 1, 't', ts[i] + cost, 'lo', los[i] or k, 'hi', k)
  expire(key, k, count, size, now)
  out[#out + 1] = rs[i] + 1
  out[#out + 1] = ts[i] + cost
end
return out
"""
)

_CORRECTION = (
    _COMMON
    + """
-- ARGV: now, a token count, the reservation's time, then per key: slot size,
-- slots.  Refreshes each key, then calls
-- correct(key, k, r, t, lo, kr, tokens, size, count, now), where kr is the
-- reservation's slot while it still counts and nil once it does not.
local function correct_each_key(correct)
  local now, tokens, at = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
  for i = 1, #KEYS do
    local b = 3 + (i - 1) * 2
    local size, count = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
    local key = KEYS[i]
    local k, r, t, lo = refresh(key, math.floor(now / size), count)
    local kr = math.floor(at / size)
    if not (lo and kr >= lo and kr <= k) then
      kr = nil
    end
    correct(key, k, r, t, lo, kr, tokens, size, count, now)
  end
  return 1
end
"""
)

RECONCILE = (
    _CORRECTION
    + """
-- The token count is the delta: actual tokens minus reserved ones.
return correct_each_key(function(key, k, r, t, lo, kr, delta, size, count, now)
  local have = nil
  if kr then
    have = tonumber(redis.call('HGET', key, 't' .. kr))
  end
  if delta > 0 then
    if have then
      redis.call('HINCRBY', key, 't' .. kr, delta)
      redis.call('HSET', key, 't', t + delta)
    else
      redis.call('HINCRBY', key, 'r' .. k, 0)
      redis.call('HINCRBY', key, 't' .. k, delta)
      redis.call('HSET', key, 'r', r, 't', t + delta, 'lo', lo or k, 'hi', k)
      expire(key, k, count, size, now)
    end
  elseif delta < 0 and have then
    local given = math.min(-delta, have)
    if given > 0 then
      redis.call('HINCRBY', key, 't' .. kr, -given)
      redis.call('HSET', key, 't', t - given)
    end
  end
end)
"""
)

RELEASE = (
    _CORRECTION
    + """
-- The token count is the reserved tokens.
return correct_each_key(function(key, k, r, t, lo, kr, tokens)
  if kr then
    local v = redis.call('HMGET', key, 'r' .. kr, 't' .. kr)
    if v[1] then
      local dr = math.min(1, tonumber(v[1]))
      local dt = math.min(tokens, tonumber(v[2]))
      if dr > 0 then
        redis.call('HINCRBY', key, 'r' .. kr, -dr)
      end
      if dt > 0 then
        redis.call('HINCRBY', key, 't' .. kr, -dt)
      end
      redis.call('HSET', key, 'r', r - dr, 't', t - dt)
    end
  end
end)
"""
)


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


def key_name(window: str, scope: str) -> str:
    """
    The Redis key holding one scope's counters in one window.
    """
    return KEY_PREFIX + window + ":" + scope


@implementer(IRateLimiter)
class RedisRateLimiter(Service):
    """
    A rate limiter whose counters live in Redis.

    It is a service: starting it opens the connection pool, stopping it
    closes the pool.  Calls made before it starts, or while Redis is away,
    follow C{fail_mode}.

    @param clock: the time the windows are computed from.
    @param reactor: runs the per-call deadlines.
    @param metrics_hook: called once per backend error (unreachable, timeout,
        script error) that the caller does not see as a failure: a reserve
        that failed open, a reconcile or release that was dropped.  (A
        reserve that fails closed reaches the caller as L{BackendUnavailable}
        instead.)  For C{llmproxy_ratelimit_backend_errors_total}.
    @param poolsize: connections in the pool; calls are pipelined on them.
    """

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
        self._tracked = TrackedCache(config)
        self._clock = clock
        self._reactor = reactor
        self._metrics_hook = metrics_hook
        self._poolsize = poolsize
        self.target = parse_redis_url(config.redis.url)
        self._pool: Any = None
        self._built_at = -math.inf
        self._last_warning = -math.inf
        self._suppressed = 0

    def reconfigure(self, config: RateLimitConfig) -> None:
        """
        Use new limits, timeout and fail mode from now on.  The Redis URL
        is read at start only; a new one needs a restart.
        """
        if config.redis.url != self._config.redis.url:
            log.warn("rate-limit Redis URL changed; restart llmproxy to use the new one")
        self._config = config
        self._tracked = TrackedCache(config)

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
            log.warn("rate-limit Redis connection failed: {error}", error=failure.getErrorMessage())

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
        log.warn("rate-limit Redis pool stopped reconnecting; opening a new one")
        pool.disconnect().addErrback(lambda _: None)
        return self._connect()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        pool, self._pool = self._pool, None
        if pool is None:
            return succeed(None)
        closed: Deferred[None] = pool.disconnect()
        return closed

    def _call(self, script: str, keys: Sequence[str], args: Sequence[str]) -> Deferred[Any]:
        if self._pool is None:
            return fail(BackendUnavailable("the Redis rate limiter is not running"))
        result: Deferred[Any] = self._live_pool().eval(script, list(keys), list(args))
        result.addTimeout(self._config.redis.timeout_ms / 1000, self._reactor)
        return result

    def _describe(self, failure: Failure) -> str:
        if failure.check(TimeoutError):
            return f"no answer within {self._config.redis.timeout_ms} ms"
        return failure.getErrorMessage() or repr(failure.value)

    def _backend_error(self, operation: str, failure: Failure, *, count: bool = True) -> None:
        if count and self._metrics_hook is not None:
            try:
                self._metrics_hook()
            except Exception:
                log.failure("rate-limit metrics hook failed")
        now = self._reactor.seconds()
        if now - self._last_warning < WARNING_INTERVAL:
            self._suppressed += 1
            return
        log.warn(
            "rate-limit backend {operation} failed ({error}); failing {mode}"
            " ({suppressed} more failures since the last warning)",
            operation=operation,
            error=self._describe(failure),
            mode=self._config.fail_mode,
            suppressed=self._suppressed,
        )
        self._last_warning = now
        self._suppressed = 0

    def reserve(self, request: LimitRequest) -> Deferred[Decision]:
        config = self._config
        now = self._clock.seconds()
        cost = max(0, request.estimated_tokens)
        optimistic = config.estimation.optimistic_first_request
        items = self._tracked(request)
        entries = tuple((item.window.name, item.scope) for item in items)
        if not items:
            reservation = Reservation(at=now, tokens=cost, entries=())
            return succeed(Decision(True, reservation, None, None, None))
        args = [repr(now), str(cost), "1" if optimistic else "0"]
        for item in items:
            window = item.window
            args += [
                str(window.slot_seconds),
                str(window.slots),
                str(item.requests),
                str(item.tokens),
            ]
        keys = [key_name(name, scope) for name, scope in entries]

        def decided(reply: list[Any]) -> Decision:
            return _decision(reply, items, entries, now, cost, optimistic)

        def failed(failure: Failure) -> Decision:
            closed = self._config.fail_mode == "closed"
            # Closed: the caller sees BackendUnavailable and counts it itself.
            self._backend_error("reserve", failure, count=not closed)
            if closed:
                raise BackendUnavailable(self._describe(failure))
            return Decision(True, None, None, None, None)

        result: Deferred[Decision] = self._call(RESERVE, keys, args).addCallbacks(decided, failed)
        return result

    def _correct(
        self, operation: str, script: str, reservation: Reservation, value: int
    ) -> Deferred[None]:
        args = [repr(self._clock.seconds()), str(value), repr(reservation.at)]
        for name, _ in reservation.entries:
            window = WINDOWS[name]
            args += [str(window.slot_seconds), str(window.slots)]
        keys = [key_name(name, scope) for name, scope in reservation.entries]

        def failed(failure: Failure) -> None:
            self._backend_error(operation, failure)

        result: Deferred[None] = self._call(script, keys, args).addCallbacks(lambda _: None, failed)
        return result

    def reconcile(self, reservation: Reservation, actual_tokens: int) -> Deferred[None]:
        delta = max(0, actual_tokens) - reservation.tokens
        if not delta or not reservation.entries:
            return succeed(None)
        return self._correct("reconcile", RECONCILE, reservation, delta)

    def release(self, reservation: Reservation) -> Deferred[None]:
        if not reservation.entries:
            return succeed(None)
        return self._correct("release", RELEASE, reservation, reservation.tokens)


def _decision(
    reply: list[Any],
    items: Sequence[Tracked],
    entries: tuple[tuple[str, str], ...],
    now: float,
    cost: int,
    optimistic: bool,
) -> Decision:
    """
    Turn the reserve script's reply into a L{Decision}.

    Allowed: C{[1, requests, tokens, ...]}, the totals after the request
    for each key.  Denied: C{[0, [requests, tokens, [slot, requests, tokens,
    ...]], ...]}, a snapshot of each key from which L{deny} explains the
    denial exactly as the in-memory limiter would.
    """
    if reply[0] == 1:
        figures: list[tuple[int, int]] = []
        for index, item in enumerate(items):
            figures.append((item.requests, int(reply[1 + 2 * index])))
            figures.append((item.tokens, int(reply[2 + 2 * index])))
        limit, remaining = tightest(figures)
        reservation = Reservation(at=now, tokens=cost, entries=entries)
        return Decision(True, reservation, None, limit, remaining)
    usages = []
    for item, (requests, tokens, flat) in zip(items, reply[1:], strict=True):
        slots = tuple(
            (int(flat[i]), int(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)
        )
        usages.append(WindowUsage(item, int(requests), int(tokens), slots))
    return Decision(False, None, deny(usages, cost, now, optimistic=optimistic), None, None)
