# -*- test-case-name: llmproxy.test.test_ratelimit_redis -*-
"""
The Redis limiter's Lua scripts, and turning their replies into decisions.

Each script takes a batch: every reservation (or correction) the proxy made
in one turn of its event loop goes to Redis in one call, and the script
handles them in order, atomically, so a batch decides exactly as the same
calls one by one would. The window arithmetic is that of
L{llmproxy.ratelimit.policy}; the key layout is described in
L{llmproxy.ratelimit.redis_backend}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attrs import frozen

from llmproxy.ratelimit.policy import (
    WINDOWS,
    Decision,
    Reservation,
    Tracked,
    WindowUsage,
    deny,
    tightest,
)

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
-- One reservation: keys KEYS[k0 .. k0 + n - 1], parameters from ARGV[a]:
-- now, cost, optimistic, n, then per key: slot size, slots, request limit,
-- token limit.  Returns the reply and the next ARGV index.
local function reserve(k0, a)
  local now, cost, optimistic = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2] == '1'
  local n = tonumber(ARGV[a + 3])
  local b0 = a + 4
  local ks, rs, ts, los = {}, {}, {}, {}
  local admit = true
  for i = 1, n do
    local b = b0 + (i - 1) * 4
    local size, count = tonumber(ARGV[b]), tonumber(ARGV[b + 1])
    local lreq, ltok = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    local k, r, t, lo = refresh(KEYS[k0 + i - 1], math.floor(now / size), count)
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
      local key = KEYS[k0 + i - 1]
      local slots = {}
      if los[i] then
        for j = los[i], ks[i] do
          local v = redis.call('HMGET', key, 'r' .. j, 't' .. j)
          if v[1] then
            slots[#slots + 1] = j
            slots[#slots + 1] = tonumber(v[1])
            slots[#slots + 1] = tonumber(v[2])
          end
        end
      end
      out[i + 1] = {rs[i], ts[i], slots}
    end
    return out, b0 + n * 4
  end
  local out = {1}
  for i = 1, n do
    local b = b0 + (i - 1) * 4
    local size, count = tonumber(ARGV[b]), tonumber(ARGV[b + 1])
    local key, k = KEYS[k0 + i - 1], ks[i]
    redis.call('HINCRBY', key, 'r' .. k, 1)
    redis.call('HINCRBY', key, 't' .. k, cost)
    redis.call('HSET', key, 'r', rs[i] + 1, 't', ts[i] + cost, 'lo', los[i] or k, 'hi', k)
    expire(key, k, count, size, now)
    out[#out + 1] = rs[i] + 1
    out[#out + 1] = ts[i] + cost
  end
  return out, b0 + n * 4
end

-- ARGV[1]: how many reservations; then each one's parameters in turn.
local replies = {}
local a, k0 = 2, 1
for q = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a + 3])
  replies[q], a = reserve(k0, a)
  k0 = k0 + n
end
return replies
"""
)

CORRECT = (
    _COMMON
    + """
local function reconcile(key, now, delta, at, size, count)
  local k, r, t, lo = refresh(key, math.floor(now / size), count)
  local kr = math.floor(at / size)
  local have = nil
  if lo and kr >= lo and kr <= k then
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
end

local function release(key, now, tokens, at, size, count)
  local k, r, t, lo = refresh(key, math.floor(now / size), count)
  local kr = math.floor(at / size)
  if lo and kr >= lo and kr <= k then
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
end

-- ARGV[1]: how many corrections; then each: 'r' (reconcile, value = token
-- delta) or 'x' (release, value = reserved tokens), now, value, reservation
-- time, number of keys, then per key: slot size, slots.
local a, k0 = 2, 1
for q = 1, tonumber(ARGV[1]) do
  local op, now, value, at = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]),
    tonumber(ARGV[a + 3])
  local n = tonumber(ARGV[a + 4])
  for i = 1, n do
    local b = a + 5 + (i - 1) * 2
    local size, count = tonumber(ARGV[b]), tonumber(ARGV[b + 1])
    if op == 'r' then
      reconcile(KEYS[k0 + i - 1], now, value, at, size, count)
    else
      release(KEYS[k0 + i - 1], now, value, at, size, count)
    end
  end
  a = a + 5 + n * 2
  k0 = k0 + n
end
return 1
"""
)


def key_name(window: str, scope: str) -> str:
    """
    The Redis key holding one scope's counters in one window.
    """
    return KEY_PREFIX + window + ":" + scope


@frozen
class Ask:
    """
    One reservation asked of Redis, as its script takes it.
    """

    items: tuple[Tracked, ...]
    now: float
    cost: int
    optimistic: bool

    @property
    def entries(self) -> tuple[tuple[str, str], ...]:
        return tuple((item.window.name, item.scope) for item in self.items)

    def keys(self) -> list[str]:
        return [key_name(item.window.name, item.scope) for item in self.items]

    def args(self) -> list[str]:
        args = [repr(self.now), str(self.cost), "1" if self.optimistic else "0"]
        args.append(str(len(self.items)))
        for item in self.items:
            window = item.window
            args += [
                str(window.slot_seconds),
                str(window.slots),
                str(item.requests),
                str(item.tokens),
            ]
        return args

    def decision(self, reply: list[Any]) -> Decision:
        """
        Turn this reservation's reply into a L{Decision}.

        Allowed: C{[1, requests, tokens, ...]}, the totals after the request
        for each key.  Denied: C{[0, [requests, tokens, [slot, requests,
        tokens, ...]], ...]}, a snapshot of each key from which L{deny}
        explains the denial exactly as the in-memory limiter would.
        """
        items = self.items
        if reply[0] == 1:
            figures: list[tuple[int, int]] = []
            for index, item in enumerate(items):
                figures.append((item.requests, int(reply[1 + 2 * index])))
                figures.append((item.tokens, int(reply[2 + 2 * index])))
            limit, remaining = tightest(figures)
            reservation = Reservation(at=self.now, tokens=self.cost, entries=self.entries)
            return Decision(True, reservation, None, limit, remaining)
        usages = []
        for item, (requests, tokens, flat) in zip(items, reply[1:], strict=True):
            slots = tuple(
                (int(flat[i]), int(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)
            )
            usages.append(WindowUsage(item, int(requests), int(tokens), slots))
        denial = deny(usages, self.cost, self.now, optimistic=self.optimistic)
        return Decision(False, None, denial, None, None)


def reserve_call(asks: Sequence[Ask]) -> tuple[list[str], list[str]]:
    """
    The keys and arguments of one L{RESERVE} call for C{asks}.
    """
    keys: list[str] = []
    args = [str(len(asks))]
    for ask in asks:
        keys += ask.keys()
        args += ask.args()
    return keys, args


@frozen
class Correction:
    """
    One reconcile (C{op} C{r}, C{value} the token delta) or release (C{x},
    C{value} the reserved tokens) of a reservation.
    """

    op: str
    now: float
    value: int
    reservation: Reservation


def correct_call(corrections: Sequence[Correction]) -> tuple[list[str], list[str]]:
    """
    The keys and arguments of one L{CORRECT} call.
    """
    keys: list[str] = []
    args = [str(len(corrections))]
    for correction in corrections:
        entries = correction.reservation.entries
        args += [
            correction.op,
            repr(correction.now),
            str(correction.value),
            repr(correction.reservation.at),
            str(len(entries)),
        ]
        for name, scope in entries:
            window = WINDOWS[name]
            args += [str(window.slot_seconds), str(window.slots)]
            keys.append(key_name(name, scope))
    return keys, args
