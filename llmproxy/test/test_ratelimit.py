# -*- test-case-name: llmproxy.test.test_ratelimit -*-
"""
Tests for L{llmproxy.ratelimit}: the window policy, token estimates, and the
in-memory limiter.

L{LimiterContractMixin} holds the semantic tests every backend must pass;
L{MemoryLimiterContractTests} runs it here and
L{llmproxy.test.test_ratelimit_redis} runs it against Redis.  Time is always
a L{Clock}: the tests move it across slot and window boundaries and check the
exact C{Retry-After} and reset figures.
"""

from __future__ import annotations

import gc
import tracemalloc
from typing import TYPE_CHECKING

from attrs import evolve
from twisted.application.internet import TimerService
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmproxy.config import Estimation, Limits, RateLimitConfig, RateLimitOverrides
from llmproxy.ratelimit import (
    Decision,
    Denial,
    IRateLimiter,
    LimitRequest,
    MemoryRateLimiter,
    RedisRateLimiter,
    Reservation,
    estimate_tokens,
    limiter_for,
    reconfigure_limiter,
    services_for,
    sweeper_service,
)
from llmproxy.ratelimit.policy import DAY, MINUTE, TrackedCache, tightest, tracked

T0 = 1_699_920_000.0
"""A UTC midnight, so minute, hour and day boundaries fall on round offsets."""


NO_LIMITS = Limits()
NO_OVERRIDES = RateLimitOverrides()


def config(
    limits: Limits = NO_LIMITS,
    *,
    optimistic: bool = True,
    overrides: RateLimitOverrides = NO_OVERRIDES,
) -> RateLimitConfig:
    return RateLimitConfig(
        enabled=True,
        limits=limits,
        overrides=overrides,
        estimation=Estimation(optimistic_first_request=optimistic),
    )


def request(
    tokens: int = 0,
    *,
    provider: str = "openai",
    model: str | None = None,
    key_id: str | None = None,
    user: str | None = None,
) -> LimitRequest:
    return LimitRequest(
        provider=provider, model=model, key_id=key_id, user=user, estimated_tokens=tokens
    )


if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object


class LimiterContractMixin(_Base):
    """
    What every L{IRateLimiter} must do.  Subclasses provide L{make_limiter}
    and mix this into a L{TestCase}; C{self.clock} is the limiter's clock,
    set to L{T0} in C{setUp}.
    """

    clock: Clock

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)

    def make_limiter(self, config: RateLimitConfig) -> IRateLimiter:
        raise NotImplementedError()

    def at(self, offset: float) -> None:
        """
        Move the clock to C{T0 + offset}.
        """
        self.clock.advance(T0 + offset - self.clock.seconds())

    async def allowed(self, limiter: IRateLimiter, req: LimitRequest) -> Decision:
        decision = await limiter.reserve(req)
        self.assertTrue(decision.allowed, decision.denial)
        self.assertIsNone(decision.denial)
        self.assertIsNotNone(decision.reservation)
        return decision

    async def denied(self, limiter: IRateLimiter, req: LimitRequest) -> Denial:
        decision = await limiter.reserve(req)
        self.assertFalse(decision.allowed)
        self.assertIsNone(decision.reservation)
        assert decision.denial is not None
        return decision.denial

    async def reservation(self, limiter: IRateLimiter, req: LimitRequest) -> Reservation:
        reservation = (await self.allowed(limiter, req)).reservation
        assert reservation is not None
        return reservation

    async def count_allowed(self, limiter: IRateLimiter, req: LimitRequest, tries: int) -> int:
        allowed = 0
        for _ in range(tries):
            allowed += (await limiter.reserve(req)).allowed
        return allowed

    async def test_unlimited(self) -> None:
        """
        With every limit 0 nothing is counted: every request is allowed and
        there are no figures for the C{X-RateLimit-*} headers.
        """
        limiter = self.make_limiter(config())
        for _ in range(5):
            decision = await self.allowed(limiter, request(10**9, model="m", user="u"))
            self.assertIsNone(decision.limit)
            self.assertIsNone(decision.remaining)
            assert decision.reservation is not None
            self.assertEqual(decision.reservation.entries, ())

    async def test_requests_per_minute_exact_retry_after(self) -> None:
        """
        The request limit admits C{limit} requests; the next one is denied
        with the whole seconds until the oldest slot stops counting, 61 s
        after it began (a window of 60 whole 1-second slots plus the current
        one).  It is still denied just before, and admitted at that moment.
        """
        limiter = self.make_limiter(config(Limits(requests_per_minute=3)))
        self.at(0.25)
        remaining = [(await self.allowed(limiter, request())).remaining for _ in range(3)]
        self.assertEqual(remaining, [2, 1, 0])
        self.at(10.5)
        denial = await self.denied(limiter, request())
        self.assertEqual(
            denial,
            Denial(
                scope="global",
                metric="requests",
                window="minute",
                limit=3,
                remaining=0,
                retry_after=51,
                reset=51,
                exceeds_limit=False,
            ),
        )
        self.at(60.999)
        denial = await self.denied(limiter, request())
        self.assertEqual((denial.retry_after, denial.reset), (1, 1))
        self.at(61.0)
        await self.allowed(limiter, request())

    async def test_no_double_burst_at_minute_boundary(self) -> None:
        """
        A fixed window would admit a second full burst right after the
        minute boundary; the sliding window admits nothing until the first
        burst has stopped counting.
        """
        limiter = self.make_limiter(config(Limits(requests_per_minute=10)))
        self.at(59.9)
        self.assertEqual(await self.count_allowed(limiter, request(), 20), 10)
        self.at(60.0)
        denial = await self.denied(limiter, request())
        self.assertEqual(denial.retry_after, 60)
        self.at(119.99)
        await self.denied(limiter, request())
        self.at(120.0)
        self.assertEqual(await self.count_allowed(limiter, request(), 20), 10)

    async def test_no_window_holds_more_than_the_limit(self) -> None:
        """
        The documented worst case: under a client that always sends, no
        interval of 60 seconds, wherever it starts, holds more admitted
        requests or tokens than the limits; and the sustained rate is at
        least 60/61 of them.
        """
        limits = Limits(requests_per_minute=7, tokens_per_minute=100)
        limiter = self.make_limiter(config(limits, optimistic=False))
        costs = [10, 25, 40, 5]
        admitted: list[tuple[float, int]] = []
        offset = 0.0
        step = 0
        while offset < 400:
            self.at(offset)
            cost = costs[step % len(costs)]
            if (await limiter.reserve(request(cost))).allowed:
                admitted.append((offset, cost))
            offset += 0.3
            step += 1
        for start, _ in admitted:
            inside = [cost for when, cost in admitted if start <= when < start + 60]
            self.assertLessEqual(len(inside), 7)
            self.assertLessEqual(sum(inside), 100)
        # Reservations count for at most 61 s, so each 61 s admits a full
        # window's worth of tokens (up to one request's cost of slack).
        self.assertGreaterEqual(sum(cost for _, cost in admitted), (100 - 40) * (400 // 61))

    async def test_day_window(self) -> None:
        """
        The day window has 24 one-hour slots plus the current one: requests
        made in the first hour keep counting until 25 hours after it began.
        """
        limiter = self.make_limiter(config(Limits(requests_per_day=2)))
        self.at(100)
        await self.allowed(limiter, request())
        self.at(1800)
        await self.allowed(limiter, request())
        self.at(86400)
        denial = await self.denied(limiter, request())
        self.assertEqual((denial.window, denial.metric), ("day", "requests"))
        self.assertEqual((denial.retry_after, denial.reset), (3600, 3600))
        self.at(90000)
        await self.allowed(limiter, request())

    async def test_tokens_per_minute(self) -> None:
        """
        Tokens are reserved from the estimate; a request whose estimate
        does not fit is denied with what was left and the time until enough
        has expired.
        """
        limiter = self.make_limiter(config(Limits(tokens_per_minute=100), optimistic=False))
        self.at(1.5)
        decision = await self.allowed(limiter, request(30))
        self.assertEqual((decision.limit, decision.remaining), (100, 70))
        self.at(20.2)
        await self.allowed(limiter, request(40))
        self.at(30)
        denial = await self.denied(limiter, request(50))
        self.assertEqual(
            denial,
            Denial(
                scope="global",
                metric="tokens",
                window="minute",
                limit=100,
                remaining=30,
                # Freeing the 30 tokens reserved at 1.5 s is enough: 62 - 30.
                retry_after=32,
                reset=32,
                exceeds_limit=False,
            ),
        )
        self.at(62)
        await self.allowed(limiter, request(50))

    async def test_optimistic_first_request(self) -> None:
        """
        With the optimistic rule, an empty window admits even a request
        larger than the token limit; afterwards a normal request waits, and a
        request over the limit is refused without a retry time, its reset
        being when the window is empty again.
        """
        limiter = self.make_limiter(config(Limits(tokens_per_minute=100)))
        self.at(5)
        decision = await self.allowed(limiter, request(500))
        self.assertEqual((decision.limit, decision.remaining), (100, 0))
        self.at(10)
        denial = await self.denied(limiter, request(10))
        self.assertEqual((denial.exceeds_limit, denial.retry_after, denial.reset), (False, 56, 56))
        self.assertEqual(denial.remaining, 0)
        denial = await self.denied(limiter, request(101))
        self.assertEqual((denial.exceeds_limit, denial.retry_after, denial.reset), (True, None, 56))
        self.at(66)
        await self.allowed(limiter, request(101))

    async def test_optimistic_off_refuses_oversized_request(self) -> None:
        """
        Without the optimistic rule a request over the token limit is
        refused even in an empty window, with no retry time and a reset of 0.
        """
        limiter = self.make_limiter(config(Limits(tokens_per_day=100), optimistic=False))
        denial = await self.denied(limiter, request(101))
        self.assertEqual(
            denial,
            Denial(
                scope="global",
                metric="tokens",
                window="day",
                limit=100,
                remaining=100,
                retry_after=None,
                reset=0,
                exceeds_limit=True,
            ),
        )
        await self.allowed(limiter, request(100))

    async def test_oversized_request_named_before_other_limits(self) -> None:
        """
        When waiting cannot help (a token limit the estimate alone exceeds),
        that limit is named even if an earlier scope is also exhausted, and
        there is no retry time.
        """
        overrides = RateLimitOverrides(per_user={"u": Limits(tokens_per_minute=50)})
        limiter = self.make_limiter(
            config(Limits(requests_per_minute=1), optimistic=False, overrides=overrides)
        )
        await self.allowed(limiter, request(10, user="u"))
        denial = await self.denied(limiter, request(60, user="u"))
        self.assertEqual((denial.scope, denial.metric), ("user:u", "tokens"))
        self.assertEqual((denial.exceeds_limit, denial.retry_after), (True, None))
        self.assertEqual(denial.remaining, 40)

    async def test_scope_order(self) -> None:
        """
        Scopes are checked global, provider, model, key, user, and the first
        exhausted one is named; overrides replace C{limits} for their scope
        only.
        """
        one = Limits(requests_per_minute=1)
        cases = [
            ("provider:openai", RateLimitOverrides(per_provider={"openai": one})),
            ("model:gpt-4o", RateLimitOverrides(per_model={"gpt-4o": one})),
            ("key:0123abcd", RateLimitOverrides(per_key={"0123abcd": one})),
            ("user:alice", RateLimitOverrides(per_user={"alice": one})),
            (
                "model:gpt-4o",
                RateLimitOverrides(per_model={"gpt-4o": one}, per_user={"alice": one}),
            ),
        ]
        for index, (scope, overrides) in enumerate(cases):
            self.at(1000 * index)
            limiter = self.make_limiter(config(Limits(requests_per_minute=5), overrides=overrides))
            req = request(model="gpt-4o", key_id="0123abcd", user="alice")
            await self.allowed(limiter, req)
            denial = await self.denied(limiter, req)
            self.assertEqual((denial.scope, denial.limit), (scope, 1))
            # Other providers, models, keys and users are not held back.
            other = request(provider="anthropic", model="claude", key_id="ffff", user="bob")
            await self.allowed(limiter, other)
        self.at(9000)
        limiter = self.make_limiter(config(Limits(requests_per_minute=1)))
        await self.allowed(limiter, request(model="gpt-4o", key_id="0123abcd", user="alice"))
        denial = await self.denied(limiter, request(model="x", key_id="y", user="z"))
        self.assertEqual(denial.scope, "global")

    async def test_all_or_nothing(self) -> None:
        """
        A denied request is counted nowhere: a user held back by its own
        limit does not use up the global limit.
        """
        overrides = RateLimitOverrides(per_user={"u": Limits(requests_per_minute=1)})
        limiter = self.make_limiter(config(Limits(requests_per_minute=5), overrides=overrides))
        await self.allowed(limiter, request(user="u"))
        for _ in range(10):
            self.assertEqual((await self.denied(limiter, request(user="u"))).scope, "user:u")
        self.assertEqual(await self.count_allowed(limiter, request(), 10), 4)

    async def test_retry_after_is_the_latest_exhausted_limit(self) -> None:
        """
        C{retry_after} covers every exhausted limit (the request needs them
        all), while C{reset} is the named limit's own.
        """
        overrides = RateLimitOverrides(per_user={"u": Limits(requests_per_day=1)})
        limiter = self.make_limiter(config(Limits(requests_per_minute=1), overrides=overrides))
        await self.allowed(limiter, request(user="u"))
        self.at(30)
        denial = await self.denied(limiter, request(user="u"))
        self.assertEqual((denial.scope, denial.window), ("global", "minute"))
        self.assertEqual(denial.reset, 31)
        self.assertEqual(denial.retry_after, 25 * 3600 - 30)

    async def test_tightest_limit_on_allowed(self) -> None:
        """
        An allowed decision carries the limit with the smallest fraction
        left after the request.
        """
        limiter = self.make_limiter(config(Limits(requests_per_minute=10, tokens_per_day=1000)))
        decision = await self.allowed(limiter, request(100))
        self.assertEqual((decision.limit, decision.remaining), (10, 9))
        decision = await self.allowed(limiter, request(600))
        self.assertEqual((decision.limit, decision.remaining), (1000, 300))

    async def test_reconcile(self) -> None:
        """
        Reconciling corrects the reserved tokens to the real count, up or
        down; a request is still one request.
        """
        limiter = self.make_limiter(
            config(Limits(requests_per_minute=3, tokens_per_minute=100), optimistic=False)
        )
        first = await self.reservation(limiter, request(30))
        await limiter.reconcile(first, 80)
        self.assertEqual((await self.denied(limiter, request(21))).remaining, 20)
        second = await self.reservation(limiter, request(20))
        await limiter.reconcile(second, 5)
        decision = await self.allowed(limiter, request(15))
        self.assertEqual((decision.limit, decision.remaining), (3, 0))
        denial = await self.denied(limiter, request(0))
        self.assertEqual((denial.metric, denial.limit), ("requests", 3))
        self.assertEqual((await self.denied(limiter, request(1))).metric, "requests")

    async def test_reconcile_never_below_zero(self) -> None:
        """
        A correction never takes a counter below 0, even when misused (a
        release after a reconcile to 0).
        """
        limiter = self.make_limiter(config(Limits(tokens_per_minute=100), optimistic=False))
        reservation = await self.reservation(limiter, request(50))
        await limiter.reconcile(reservation, 0)
        await limiter.release(reservation)
        await limiter.release(reservation)
        decision = await self.allowed(limiter, request(100))
        self.assertEqual((decision.limit, decision.remaining), (100, 0))
        await self.denied(limiter, request(1))

    async def test_release(self) -> None:
        """
        Releasing gives back the request and its tokens.
        """
        limiter = self.make_limiter(
            config(Limits(requests_per_minute=1, tokens_per_minute=100), optimistic=False)
        )
        reservation = await self.reservation(limiter, request(100))
        await self.denied(limiter, request(0))
        await limiter.release(reservation)
        decision = await self.allowed(limiter, request(100))
        self.assertEqual(decision.remaining, 0)

    async def test_positive_correction_goes_to_the_reservations_slot(self) -> None:
        """
        While the reservation still counts, a correction changes its own
        slot, so it expires with it.
        """
        limiter = self.make_limiter(config(Limits(tokens_per_minute=100), optimistic=False))
        self.at(0.5)
        reservation = await self.reservation(limiter, request(10))
        self.at(30)
        await limiter.reconcile(reservation, 100)
        await self.denied(limiter, request(1))
        self.at(61)
        await self.allowed(limiter, request(100))

    async def test_corrections_after_the_window_moved_on(self) -> None:
        """
        Once the reservation has stopped counting, extra tokens go into the
        current slot (they were really used) while a negative correction or a
        release has nothing left to give back.
        """
        limiter = self.make_limiter(
            config(Limits(requests_per_minute=1, tokens_per_minute=100), optimistic=False)
        )
        first = await self.reservation(limiter, request(50))
        self.at(61)
        second = await self.reservation(limiter, request(50))
        await limiter.release(first)
        await self.denied(limiter, request(0))
        await limiter.reconcile(first, 0)
        self.at(122)
        await limiter.reconcile(second, 80)
        self.assertEqual((await self.denied(limiter, request(71))).remaining, 70)
        await self.allowed(limiter, request(70))

    async def test_clock_stepping_back(self) -> None:
        """
        If the clock steps back, new usage goes into the newest slot already
        used, so nothing counted is forgotten or counted twice.
        """
        limiter = self.make_limiter(config(Limits(requests_per_minute=2)))
        self.at(120)
        await self.allowed(limiter, request())
        self.clock = Clock()
        self.clock.advance(T0 + 30)
        limiter2 = self.make_limiter_sharing(limiter)
        await self.allowed(limiter2, request())
        denial = await self.denied(limiter2, request())
        # The two requests count in the slot of 120 s, until 181 s.
        self.assertEqual(denial.retry_after, 151)

    def make_limiter_sharing(self, limiter: IRateLimiter) -> IRateLimiter:
        """
        A limiter on C{self.clock} that shares the counters of C{limiter}.
        """
        raise NotImplementedError()


class MemoryLimiterContractTests(LimiterContractMixin, TestCase):
    """
    The contract, for L{MemoryRateLimiter}.
    """

    def make_limiter(self, config: RateLimitConfig) -> IRateLimiter:
        return MemoryRateLimiter(config, self.clock)

    def make_limiter_sharing(self, limiter: IRateLimiter) -> IRateLimiter:
        assert isinstance(limiter, MemoryRateLimiter)
        limiter._clock = self.clock
        return limiter


class MemoryLimiterTests(SynchronousTestCase):
    """
    What only the in-memory limiter does: sweeping idle scopes.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)

    def reserve(self, limiter: MemoryRateLimiter, req: LimitRequest) -> Decision:
        return self.successResultOf(limiter.reserve(req))

    def test_sweeper_removes_idle_scopes(self) -> None:
        """
        The sweeper service sweeps at start and then every interval; a scope
        is removed once nothing in it counts any more.
        """
        limiter = MemoryRateLimiter(config(Limits(requests_per_minute=100)), self.clock)
        service = sweeper_service(limiter, 30, self.clock)
        service.startService()
        self.addCleanup(service.stopService)
        self.reserve(limiter, request(key_id="a"))
        self.clock.advance(45)
        self.reserve(limiter, request(key_id="b"))
        self.assertEqual(
            sorted(limiter.scopes()),
            [
                ("minute", "global"),
                ("minute", "key:a"),
                ("minute", "key:b"),
                ("minute", "provider:openai"),
            ],
        )
        self.clock.advance(15)  # sweep at 60 s: key:a still counts until 61 s
        self.assertIn(("minute", "key:a"), set(limiter.scopes()))
        self.clock.advance(30)  # sweep at 90 s
        self.assertNotIn(("minute", "key:a"), set(limiter.scopes()))
        self.assertIn(("minute", "key:b"), set(limiter.scopes()))
        self.clock.pump([30] * 2)  # sweep at 150 s
        self.assertEqual(len(limiter), 0)

    def test_sweeper_survives_a_failing_sweep(self) -> None:
        """
        An exception in a sweep is logged and the next sweep still runs.
        """
        limiter = MemoryRateLimiter(config(Limits(requests_per_minute=1)), self.clock)
        calls: list[float] = []

        def broken() -> int:
            calls.append(self.clock.seconds())
            raise RuntimeError("boom")

        limiter.sweep = broken  # type: ignore[method-assign]
        service = sweeper_service(limiter, 10, self.clock)
        service.startService()
        self.addCleanup(service.stopService)
        self.clock.pump([10] * 3)
        self.assertEqual(len(calls), 4)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 4)

    def test_day_scopes_live_a_day(self) -> None:
        """
        A scope with a day limit is kept until its day window has passed.
        """
        limiter = MemoryRateLimiter(config(Limits(requests_per_day=100)), self.clock)
        self.reserve(limiter, request(key_id="k"))
        self.clock.advance(24 * 3600)
        self.assertEqual(limiter.sweep(), 0)
        self.clock.advance(3600)
        self.assertEqual(limiter.sweep(), 3)
        self.assertEqual(len(limiter), 0)

    def test_denied_new_scope_not_stored(self) -> None:
        """
        A request refused in a scope never seen before leaves no counter.
        """
        limiter = MemoryRateLimiter(
            config(Limits(tokens_per_minute=10), optimistic=False), self.clock
        )
        self.assertFalse(self.reserve(limiter, request(11, key_id="k")).allowed)
        self.assertEqual(len(limiter), 0)

    def test_scopes_capped(self) -> None:
        """
        Once C{max_tracked_scopes} counters are held, new users, keys and
        models share one overflow counter per kind, with their own limits:
        memory stays bounded and nobody escapes a limit; known scopes keep
        their own counters; a sweep makes room again.
        """
        overflowed: list[None] = []
        limiter = MemoryRateLimiter(
            evolve(config(Limits(requests_per_minute=100)), max_tracked_scopes=6),
            self.clock,
            lambda: overflowed.append(None),
        )
        for user in "abcdef":
            self.assertTrue(self.reserve(limiter, request(user=user)).allowed)
        # global, provider:openai, user:a to user:d; then e and f overflow.
        self.assertEqual(len(overflowed), 2)
        self.assertNotIn(("minute", "user:f"), set(limiter.scopes()))
        self.assertEqual(len(limiter), 7)
        shared = limiter._counters["minute"]["user:(overflow)"]
        self.assertEqual(shared.requests, 2)
        # user:a has its own counter still.
        self.assertTrue(self.reserve(limiter, request(user="a")).allowed)
        self.assertEqual((limiter._counters["minute"]["user:a"].requests, shared.requests), (2, 2))
        self.clock.advance(120)
        limiter.sweep()
        self.assertEqual(len(limiter), 0)
        self.assertTrue(self.reserve(limiter, request(user="g")).allowed)
        self.assertIn(("minute", "user:g"), set(limiter.scopes()))

    def test_overflow_limited(self) -> None:
        """
        The overflow counter is limited like the scopes it stands for: once
        the newcomers have used a scope's allowance together, the next one
        is refused, and the denial names the shared scope.
        """
        per_user = Limits(requests_per_minute=2)
        limiter = MemoryRateLimiter(
            evolve(
                config(
                    Limits(requests_per_minute=100),
                    overrides=RateLimitOverrides(per_user={f"u{n}": per_user for n in range(5)}),
                ),
                max_tracked_scopes=3,
            ),
            self.clock,
        )
        self.assertTrue(self.reserve(limiter, request(user="u0")).allowed)
        self.assertTrue(self.reserve(limiter, request(user="u1")).allowed)
        self.assertTrue(self.reserve(limiter, request(user="u2")).allowed)
        denied = self.reserve(limiter, request(user="u3"))
        self.assertFalse(denied.allowed)
        assert denied.denial is not None
        self.assertEqual(denied.denial.scope, "user:(overflow)")

    def test_reconfigure_keeps_usage(self) -> None:
        """
        New limits apply to the usage already counted.
        """
        limiter = MemoryRateLimiter(config(Limits(requests_per_minute=5)), self.clock)
        for _ in range(3):
            self.reserve(limiter, request())
        limiter.reconfigure(config(Limits(requests_per_minute=3)))
        self.assertFalse(self.reserve(limiter, request()).allowed)

    def test_memory_returns_to_baseline_after_sweep(self) -> None:
        """
        100,000 distinct keys, then one sweep interval of idleness: the
        memory held by the limiter returns to (near) what it was before.
        """
        limiter = MemoryRateLimiter(
            evolve(config(Limits(requests_per_minute=1000000)), max_tracked_scopes=200_000),
            self.clock,
        )
        service = sweeper_service(limiter, 30, self.clock)
        service.startService()
        self.addCleanup(service.stopService)
        reserve = limiter.reserve_now
        reserve(request(10, key_id="warm-up"))
        gc.collect()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        baseline = tracemalloc.get_traced_memory()[0]
        for n in range(100_000):
            self.assertTrue(reserve(request(10, key_id=f"{n:016x}")).allowed)
        loaded = tracemalloc.get_traced_memory()[0]
        self.assertEqual(len(limiter), 100_003)
        self.clock.advance(61)  # the last keys stop counting
        self.clock.advance(30)  # one sweep interval
        gc.collect()
        swept = tracemalloc.get_traced_memory()[0]
        self.assertEqual(len(limiter), 0)
        # Each key costs hundreds of bytes while it counts ...
        self.assertGreater(loaded - baseline, 100_000 * 200)
        # ... and nothing measurable once swept.
        self.assertLess(swept - baseline, 64 * 1024)


class PolicyTests(SynchronousTestCase):
    """
    The pure parts: windows, the tightest limit.
    """

    def test_windows(self) -> None:
        self.assertEqual(
            (MINUTE.slot(T0 + 59.99), MINUTE.expires(MINUTE.slot(T0))), (T0 + 59, T0 + 61)
        )
        self.assertEqual(DAY.slot(T0 + 3599) * 3600, T0)
        self.assertEqual(DAY.expires(DAY.slot(T0 + 3599)), T0 + 25 * 3600)

    def test_tightest(self) -> None:
        self.assertEqual(tightest([]), (None, None))
        self.assertEqual(tightest([(0, 5)]), (None, None))
        self.assertEqual(tightest([(10, 5), (100, 40), (0, 99)]), (10, 5))
        self.assertEqual(tightest([(10, 5), (100, 50)]), (10, 5))
        self.assertEqual(tightest([(10, 12), (100, 50)]), (10, 0))


class EstimateTests(SynchronousTestCase):
    """
    L{estimate_tokens}.
    """

    estimation = Estimation(
        chars_per_token=4, provider_chars_per_token={"anthropic": 3.5}, bytes_per_token=5
    )

    def estimate(self, text_chars: int | None, body_bytes: int, provider: str = "openai") -> int:
        return estimate_tokens(
            text_chars=text_chars,
            body_bytes=body_bytes,
            provider=provider,
            estimation=self.estimation,
        )

    def test_text(self) -> None:
        """
        Prompt characters divided by the characters per token, rounded up.
        """
        self.assertEqual(self.estimate(400, 9999), 100)
        self.assertEqual(self.estimate(401, 9999), 101)
        self.assertEqual(self.estimate(0, 9999), 0)

    def test_provider_ratio(self) -> None:
        """
        A provider's own ratio replaces C{chars_per_token}.
        """
        self.assertEqual(self.estimate(350, 9999, "anthropic"), 100)
        self.assertEqual(self.estimate(351, 9999, "anthropic"), 101)

    def test_bytes(self) -> None:
        """
        Without text (not JSON, or not sampled) the body size is used.
        """
        self.assertEqual(self.estimate(None, 1000), 200)
        self.assertEqual(self.estimate(None, 1001), 201)
        self.assertEqual(self.estimate(None, 0), 0)

    def test_bad_ratio(self) -> None:
        """
        A ratio of 0 cannot divide by zero: the default of 4 is used.
        """
        estimation = Estimation(chars_per_token=0, bytes_per_token=0)
        self.assertEqual(
            estimate_tokens(text_chars=8, body_bytes=12, provider="x", estimation=estimation), 2
        )
        self.assertEqual(
            estimate_tokens(text_chars=None, body_bytes=12, provider="x", estimation=estimation), 3
        )


class LimiterForTests(SynchronousTestCase):
    """
    L{limiter_for}.
    """

    def test_disabled(self) -> None:
        self.assertIsNone(limiter_for(RateLimitConfig(), Clock()))

    def test_memory(self) -> None:
        limiter = limiter_for(evolve(config(), backend="memory"), Clock())
        self.assertIsInstance(limiter, MemoryRateLimiter)

    def test_services_for(self) -> None:
        """
        A memory limiter needs its sweeper, every C{sweep_interval_seconds}
        on the given clock; no limiter needs nothing.
        """
        clock = Clock()
        rate = evolve(config(), sweep_interval_seconds=12.5)
        limiter = limiter_for(rate, clock)
        [sweeper] = services_for(limiter, rate, clock)
        assert isinstance(sweeper, TimerService)
        self.assertEqual((sweeper.step, sweeper.clock), (12.5, clock))
        self.assertEqual(services_for(None, rate, clock), [])

    def test_reconfigure_in_place(self) -> None:
        """
        A reload with the same backend keeps the limiter and the usage it
        has counted; the new limits apply to it.
        """
        clock = Clock()
        old = config(Limits(requests_per_minute=5))
        limiter = limiter_for(old, clock)
        assert limiter is not None
        assert isinstance(limiter, MemoryRateLimiter)
        for _ in range(3):
            limiter.reserve_now(request())
        new = config(Limits(requests_per_minute=3))
        self.assertIs(reconfigure_limiter(limiter, old, new, clock), limiter)
        self.assertFalse(limiter.reserve_now(request()).allowed)

    def test_reconfigure_replaces(self) -> None:
        """
        Turning limits off gives no limiter; turning them on, or switching
        backend, a new one.
        """
        clock = Clock()
        on = config(Limits(requests_per_minute=5))
        off = RateLimitConfig()
        limiter = limiter_for(on, clock)
        self.assertIsNone(reconfigure_limiter(limiter, on, off, clock))
        self.assertIsInstance(reconfigure_limiter(None, off, on, clock), MemoryRateLimiter)
        redis = evolve(on, backend="redis")
        self.assertIsInstance(reconfigure_limiter(limiter, on, redis, clock), RedisRateLimiter)


class TrackedCacheTests(SynchronousTestCase):
    """
    The remembered scope lists answer exactly as L{tracked} and stay bounded.
    """

    def test_same_answer_as_tracked(self) -> None:
        settings = config(
            Limits(requests_per_minute=5, tokens_per_day=100),
            overrides=RateLimitOverrides(per_model={"m": Limits(tokens_per_minute=7)}),
        )
        cache = TrackedCache(settings)
        for asked in (
            request(model="m", key_id="k", user="u"),
            request(model="other"),
            request(provider="anthropic", model="m"),
        ):
            self.assertEqual(cache(asked), tracked(settings, asked))
            self.assertIs(cache(asked), cache(asked))

    def test_bounded(self) -> None:
        cache = TrackedCache(config(Limits(requests_per_minute=5)))
        for n in range(TrackedCache.MAX_ENTRIES + 10):
            cache(request(user=f"user-{n}"))
        self.assertLessEqual(len(cache._found), TrackedCache.MAX_ENTRIES)

    def test_reconfigure_uses_new_limits(self) -> None:
        clock = Clock()
        clock.advance(T0)
        limiter = MemoryRateLimiter(config(Limits(requests_per_minute=1)), clock)
        self.assertTrue(limiter.reserve_now(request()).allowed)
        self.assertFalse(limiter.reserve_now(request()).allowed)
        limiter.reconfigure(config(Limits(requests_per_minute=10)))
        self.assertTrue(limiter.reserve_now(request()).allowed)
