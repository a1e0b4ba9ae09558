# -*- test-case-name: llmproxy.test.test_budgets_redis -*-
"""
Spend kept in Redis, shared exactly by every proxy instance that uses the
same Redis (the rate limiter's, C{features.rate_limiting.redis}).

Each operation is one Lua script, so check-and-reserve over a request's
scopes is atomic across instances, and so is the alert bookkeeping: a
fraction of a budget is alerted by exactly one instance.

Key layout
==========

One hash per scope and period, C{llmproxy:budget:<period id>:<scope>},
e.g. C{llmproxy:budget:2026-12-03:key:team-a} or
C{llmproxy:budget:2026-12:user:alice}. The key id is the configured id of
a proxy key, never a credential. Fields, in nano-USD: C{s} (spent), C{h}
(held by requests in flight), C{a} (the spend up to which alerts were
given). Each write moves the key's expiry to a day after its period ends.

Failures are those of the rate limiter (L{llmproxy.redislink}): with
C{fail_mode: open} a request is admitted without a reservation, with
C{closed} it is refused (503); a failed settlement is logged and its spend
is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from llmproxy.budgets.policy import (
    BudgetReservation,
    Hold,
    ISpendStore,
    Shortfall,
    SpendDecision,
    Spent,
    period_end,
    period_id,
)
from llmproxy.config import RateLimitConfig
from llmproxy.redislink import BackendUnavailable, RedisLink

KEY_PREFIX = "llmproxy:budget:"
KEEP_AFTER_PERIOD = 86400.0
"""Seconds a period's key outlives its period (for late settlements)."""

RESERVE = """
-- ARGV per key: limit, amount, expire-at (ms), alert on refusal ('1'/'0')
local n = #KEYS
for i = 1, n do
  local b = (i - 1) * 4
  local limit, amount = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local v = redis.call('HMGET', KEYS[i], 's', 'h', 'a')
  local s, h, a = tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0
  if s + h + amount > limit then
    local alert = 0
    if ARGV[b + 4] == '1' and a < limit then
      redis.call('HSET', KEYS[i], 'a', limit)
      redis.call('PEXPIREAT', KEYS[i], ARGV[b + 3])
      alert = 1
    end
    return {0, i, s, h, alert}
  end
end
for i = 1, n do
  local b = (i - 1) * 4
  redis.call('HINCRBY', KEYS[i], 'h', ARGV[b + 2])
  redis.call('PEXPIREAT', KEYS[i], ARGV[b + 3])
end
return {1}
"""

SETTLE = """
-- KEYS: per hold, the key of the period it was admitted in, then the
-- current one. ARGV per hold: amount to give back, charge, expire-at (ms)
-- of the current key, limit (0: none), alert fractions ('0.8,1').
local out = {}
for i = 1, #KEYS / 2 do
  local b = (i - 1) * 5
  local release, charge = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local before, now = KEYS[2 * i - 1], KEYS[2 * i]
  if release > 0 then
    local h = tonumber(redis.call('HGET', before, 'h'))
    if h then
      redis.call('HSET', before, 'h', math.max(0, h - release))
    end
  end
  local s = redis.call('HINCRBY', now, 's', charge)
  redis.call('PEXPIREAT', now, ARGV[b + 3])
  local limit = tonumber(ARGV[b + 4])
  local crossed = {}
  if limit > 0 then
    local a = tonumber(redis.call('HGET', now, 'a')) or 0
    for f in string.gmatch(ARGV[b + 5], '[^,]+') do
      local level = tonumber(f) * limit
      if a < level and level <= s then
        crossed[#crossed + 1] = f
      end
    end
    if #crossed > 0 then
      redis.call('HSET', now, 'a', s)
    end
  end
  out[i] = {s, crossed}
end
return out
"""


def key_name(scope: str, period: str, now: float) -> str:
    """
    The Redis key of C{scope}'s spend in the C{period} that C{now} is in.
    """
    return KEY_PREFIX + period_id(period, now) + ":" + scope


def _expire_ms(period: str, now: float) -> str:
    return str(int((period_end(period, now) + KEEP_AFTER_PERIOD) * 1000))


@implementer(ISpendStore)
class RedisSpendStore(RedisLink):
    """
    Spend in Redis. A service: starting it opens its connection pool.
    """

    warning_format = (
        "budget backend {operation} failed ({error}); failing {mode}"
        " ({suppressed} more failures since the last warning)"
    )

    def __init__(
        self,
        config: RateLimitConfig,
        reactor: IReactorTime,
        metrics_hook: Callable[[], object] | None = None,
    ) -> None:
        super().__init__(config, reactor, reactor, metrics_hook)

    def reserve(self, holds: Sequence[Hold], now: float) -> Deferred[SpendDecision]:
        reservation = BudgetReservation(at=now, holds=tuple(holds))
        capped = [hold for hold in holds if hold.limit is not None]
        if not capped:
            return succeed(SpendDecision(reservation))
        keys = [key_name(hold.scope, hold.period, now) for hold in capped]
        args: list[str] = []
        for hold in capped:
            refusal_alert = "1" if 1.0 in hold.alert_at else "0"
            args += [str(hold.limit), str(hold.amount), _expire_ms(hold.period, now), refusal_alert]

        def decided(reply: list[Any]) -> SpendDecision:
            if int(reply[0]) == 1:
                return SpendDecision(reservation)
            index, spent, held, alert = (int(value) for value in reply[1:5])
            return SpendDecision(None, Shortfall(capped[index - 1], spent, held, alert == 1))

        def failed(failure: Failure) -> SpendDecision:
            closed = self._config.fail_mode == "closed"
            self.backend_error("reserve", failure, count=not closed)
            if closed:
                raise BackendUnavailable(self.describe(failure))
            return SpendDecision(BudgetReservation(at=now, holds=tuple(holds), reserved=False))

        result: Deferred[SpendDecision] = self.call(RESERVE, keys, args).addCallbacks(
            decided, failed
        )
        return result

    def settle(
        self, reservation: BudgetReservation, charges: Sequence[int], now: float
    ) -> Deferred[tuple[Spent, ...]]:
        holds = reservation.holds
        if not holds:
            return succeed(())
        keys: list[str] = []
        args: list[str] = []
        for hold, charge in zip(holds, charges, strict=True):
            keys += [
                key_name(hold.scope, hold.period, reservation.at),
                key_name(hold.scope, hold.period, now),
            ]
            release = hold.amount if reservation.reserved and hold.limit is not None else 0
            args += [
                str(release),
                str(max(0, charge)),
                _expire_ms(hold.period, now),
                str(hold.limit or 0),
                ",".join(repr(fraction) for fraction in hold.alert_at),
            ]

        def settled(reply: list[Any]) -> tuple[Spent, ...]:
            return tuple(
                Spent(hold, int(spent), tuple(float(fraction) for fraction in crossed))
                for hold, (spent, crossed) in zip(holds, reply, strict=True)
            )

        def failed(failure: Failure) -> tuple[Spent, ...]:
            self.backend_error("settle", failure)
            return ()

        result: Deferred[tuple[Spent, ...]] = self.call(SETTLE, keys, args).addCallbacks(
            settled, failed
        )
        return result
