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

Each call has a deadline (C{redis.timeout_ms}, see L{llmproxy.redislink}).
On a timeout or any other backend error, C{fail_mode: open} admits the
request without a reservation and C{closed} fails the call with
L{BackendUnavailable}; both call the metrics hook and log a warning at most
every L{WARNING_INTERVAL} seconds.  A failed reconcile or release is logged
and dropped.  A reservation whose reply was lost to the deadline may still
have been counted; it expires with its window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
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
from llmproxy.redislink import (
    WARNING_INTERVAL,
    RedisLink,
    RedisTarget,
    parse_redis_url,
)

__all__ = ["WARNING_INTERVAL", "RedisRateLimiter", "RedisTarget", "key_name", "parse_redis_url"]

KEY_PREFIX = "llmproxy:rl:"

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


def key_name(window: str, scope: str) -> str:
    """
    The Redis key holding one scope's counters in one window.
    """
    return KEY_PREFIX + window + ":" + scope


@implementer(IRateLimiter)
class RedisRateLimiter(RedisLink):
    """
    A rate limiter whose counters live in Redis.

    It is a service (a L{RedisLink}): starting it opens the connection
    pool, stopping it closes the pool.  Calls made before it starts, or
    while Redis is away, follow C{fail_mode}.

    @param metrics_hook: called once per backend error (unreachable, timeout,
        script error) that the caller does not see as a failure: a reserve
        that failed open, a reconcile or release that was dropped.  (A
        reserve that fails closed reaches the caller as L{BackendUnavailable}
        instead.)  For C{llmproxy_ratelimit_backend_errors_total}.
    """

    warning_format = (
        "rate-limit backend {operation} failed ({error}); failing {mode}"
        " ({suppressed} more failures since the last warning)"
    )

    def _configured(self, config: RateLimitConfig) -> None:
        self._tracked = TrackedCache(config)

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
            self.backend_error("reserve", failure, count=not closed)
            if closed:
                raise BackendUnavailable(self.describe(failure))
            return Decision(True, None, None, None, None)

        result: Deferred[Decision] = self.call(RESERVE, keys, args).addCallbacks(decided, failed)
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
            self.backend_error(operation, failure)

        result: Deferred[None] = self.call(script, keys, args).addCallbacks(lambda _: None, failed)
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
