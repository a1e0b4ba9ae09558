# -*- test-case-name: llmproxy.test.test_ratelimit_redis -*-
"""
Tests for L{llmproxy.ratelimit.redis_backend}: the shared contract against a
private C{redis-server}, plus what only Redis does (sharing between
instances, key layout and TTLs, script caching, URL options, failure modes,
recovery).

Each test starts its own C{redis-server} on a free loopback port
(L{llmproxy.testing.redis_server}); the limiter's clock is a L{Clock} whose
time the scripts receive in C{ARGV}.  Only the recovery test waits on real
time: reconnecting is the pool's own timer.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from attrs import evolve
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import provider

from llmproxy.config import Limits, RateLimitConfig, RateLimitOverrides, RedisConfig
from llmproxy.ratelimit import (
    BackendUnavailable,
    Decision,
    IRateLimiter,
    RedisRateLimiter,
    limiter_for,
    services_for,
)
from llmproxy.ratelimit.redis_backend import local_share, parse_redis_url
from llmproxy.test.test_ratelimit import T0, LimiterContractMixin, config, request
from llmproxy.testing.redis_server import REDIS_SERVER, REDIS_SERVER_MISSING, RedisServer

SKIP = None if REDIS_SERVER else REDIS_SERVER_MISSING


def real_reactor() -> IReactorTime:
    from twisted.internet import reactor

    return reactor


class Recorder:
    """
    The limiter's metrics, as a list of what it reported.
    """

    def __init__(self, calls: list[Any] | None = None) -> None:
        self.calls = calls if calls is not None else []

    def ratelimit_backend_error(self, backend: str) -> None:
        self.calls.append(1)

    def ratelimit_degraded(self, backend: str, degraded: bool) -> None:
        self.calls.append(("degraded", degraded))

    def ratelimit_local_decision(self, backend: str) -> None:
        self.calls.append("local")

    def ratelimit_scope_overflow(self) -> None:
        self.calls.append("overflow")

    def errors(self) -> int:
        return self.calls.count(1)


class RedisHelpers(TestCase):
    """
    Servers, limiters and a direct connection for inspecting Redis.
    """

    skip = SKIP

    def start_server(self, password: str | None = None) -> RedisServer:
        server = RedisServer(password)
        server.start()
        self.addCleanup(server.cleanup)
        return server

    def redis_limiter(
        self,
        config: RateLimitConfig,
        url: str,
        clock: IReactorTime,
        *,
        timeout_ms: int = 5000,
        fail_mode: Literal["open", "closed"] = "open",
        hook: list[Any] | None = None,
        start: bool = True,
    ) -> RedisRateLimiter:
        config = evolve(
            config,
            backend="redis",
            fail_mode=fail_mode,
            redis=RedisConfig(url=url, timeout_ms=timeout_ms),
        )
        limiter = RedisRateLimiter(config, clock, real_reactor(), Recorder(hook))
        if start:
            limiter.startService()
            self.addCleanup(limiter.stopService)
        return limiter

    async def connect(self, server: RedisServer, db: int = 0) -> Any:
        import txredisapi

        connection = await txredisapi.Connection(
            "127.0.0.1", server.port, dbid=db, reconnect=False, password=server.password
        )
        self.addCleanup(connection.disconnect)
        return connection


class RedisLimiterContractTests(LimiterContractMixin, RedisHelpers):
    """
    The contract, for L{RedisRateLimiter}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.server = self.start_server()

    def make_limiter(self, config: RateLimitConfig) -> IRateLimiter:
        self.config = config
        return self.redis_limiter(config, self.server.url(), self.clock)

    def make_limiter_sharing(self, limiter: IRateLimiter) -> IRateLimiter:
        return self.make_limiter(self.config)


class RedisLimiterTests(RedisHelpers):
    """
    What only the Redis limiter does.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)

    async def test_instances_share_limits_exactly(self) -> None:
        """
        Several limiters on one Redis admit exactly the limit between them,
        however their concurrent calls interleave.
        """
        server = self.start_server()
        limits = Limits(requests_per_minute=25, tokens_per_minute=1000)
        limiters = [
            self.redis_limiter(config(limits, optimistic=False), server.url(), self.clock)
            for _ in range(3)
        ]
        calls: list[Deferred[Decision]] = [
            limiters[n % 3].reserve(request(10, key_id="k")) for n in range(90)
        ]
        decisions = await gatherResults(calls)
        self.assertEqual(sum(decision.allowed for decision in decisions), 25)
        calls = [limiters[n % 3].reserve(request(1, user=f"u{n}")) for n in range(10)]
        self.assertFalse(any(decision.allowed for decision in await gatherResults(calls)))

    async def test_key_layout_and_ttls(self) -> None:
        """
        Each scope-window is one hash named after its scope string, with a
        TTL just past the moment its newest slot stops counting.
        """
        server = self.start_server()
        limits = Limits(requests_per_minute=5, tokens_per_day=1000)
        limiter = self.redis_limiter(config(limits), server.url(), self.clock)
        self.clock.advance(30.5)
        await limiter.reserve(request(10, model="gpt-4o", key_id="3f2a9c0d1e5b7a64", user="ann"))
        redis = await self.connect(server)
        keys = sorted(await redis.keys("*"))
        scopes = ["global", "key:3f2a9c0d1e5b7a64", "model:gpt-4o", "provider:openai", "user:ann"]
        self.assertEqual(
            keys,
            sorted(
                f"llmproxy:rl:{window}:{scope}" for window in ("day", "minute") for scope in scopes
            ),
        )
        for key in keys:
            ttl = await redis.execute_command("PTTL", key)
            if ":minute:" in key:
                # Slot 30 stops counting 61 s after it began: 60.5 s from now (+1 s margin).
                self.assertTrue(61_000 <= ttl <= 61_500, (key, ttl))
            else:
                self.assertTrue(25 * 3600_000 - 31_000 <= ttl <= 25 * 3600_000 - 29_000, (key, ttl))

    async def test_scripts_run_by_sha(self) -> None:
        """
        Scripts are sent whole once per connection, then run by SHA; after
        the server forgets them (C{SCRIPT FLUSH}, a restart) they are sent
        again and limits still hold.
        """
        server = self.start_server()
        limiter = self.redis_limiter(
            config(Limits(requests_per_minute=30)), server.url(), self.clock
        )
        for _ in range(20):
            await limiter.reserve(request())
        redis = await self.connect(server)
        stats = await redis.info("commandstats")
        evals = int(re.search(r"calls=(\d+)", stats["cmdstat_eval"]).group(1))  # type: ignore[union-attr]
        shas = int(re.search(r"calls=(\d+)", stats["cmdstat_evalsha"]).group(1))  # type: ignore[union-attr]
        self.assertLessEqual(evals, 4)  # one per pooled connection at most
        self.assertEqual(evals + shas, 20)
        await redis.script_flush()
        decisions = [await limiter.reserve(request()) for _ in range(12)]
        self.assertEqual([decision.allowed for decision in decisions], [True] * 10 + [False] * 2)

    async def test_database_from_url(self) -> None:
        """
        The database number in the URL is selected on every connection.
        """
        server = self.start_server()
        limiter = self.redis_limiter(
            config(Limits(requests_per_minute=1)), server.url(db=3), self.clock
        )
        await limiter.reserve(request())
        self.assertEqual(await (await self.connect(server, db=0)).dbsize(), 0)
        self.assertEqual(await (await self.connect(server, db=3)).dbsize(), 2)

    async def test_password_from_url(self) -> None:
        """
        The password in the URL (percent-decoded) authenticates; without it
        the server refuses and the limiter fails as configured.
        """
        server = self.start_server(password="s3cr/t @x")
        limiter = self.redis_limiter(
            config(Limits(requests_per_minute=1)), server.url(), self.clock
        )
        self.assertIsNotNone((await limiter.reserve(request())).reservation)
        self.assertFalse((await limiter.reserve(request())).allowed)
        wrong = self.redis_limiter(
            config(Limits(requests_per_minute=1)),
            f"redis://127.0.0.1:{server.port}/0",
            self.clock,
            timeout_ms=300,
            fail_mode="closed",
        )
        with self.assertRaises(BackendUnavailable):
            await wrong.reserve(request())

    async def test_fail_open(self) -> None:
        """
        With Redis unreachable and C{fail_mode: open}, the first request
        waits for C{outage_after_failures} timeouts, then an outage begins
        (one warning, the degraded state reported): requests are decided at
        once against local counters, within the limits, and counted.
        """
        server = self.start_server()
        server.stop()
        events: list[LogEvent] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if "rate-limit" in event.get("log_format", ""):
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        hook: list[Any] = []
        limiter = self.redis_limiter(
            config(Limits(requests_per_minute=2)),
            server.url(),
            self.clock,
            timeout_ms=100,
            hook=hook,
        )
        decisions = [await limiter.reserve(request()) for _ in range(3)]
        self.assertEqual([d.allowed for d in decisions], [True, True, False])
        for decision in decisions[:2]:
            assert decision.reservation is not None
            self.assertTrue(decision.reservation.local)
        self.assertEqual(hook.count("local"), 3)
        self.assertIn(("degraded", True), hook)
        self.assertEqual(len(events), 1, [e["log_format"] for e in events])
        self.assertEqual(events[0]["mode"], "open")
        self.assertEqual(limiter.status()["state"], "degraded")

    async def test_slow_answer_waited_for(self) -> None:
        """
        An answer later than C{timeout_ms} (Redis paused, not gone) counts as
        a failure but is still waited for: the request is decided by Redis,
        exactly, and no outage begins.
        """
        server = self.start_server()
        hook: list[Any] = []
        limiter = self.redis_limiter(
            config(Limits(requests_per_minute=1)),
            server.url(),
            self.clock,
            timeout_ms=100,
            hook=hook,
        )
        self.assertTrue((await limiter.reserve(request())).allowed)
        server.pause()
        self.addCleanup(server.resume)
        pending = limiter.reserve(request())
        await deferLater(real_reactor(), 0.25, lambda: None)
        server.resume()
        decision = await pending
        self.assertFalse(decision.allowed)
        self.assertEqual(hook.count(1), 0)
        self.assertEqual(limiter.status()["state"], "ok")

    async def test_fail_closed(self) -> None:
        """
        With C{fail_mode: closed}, an unreachable Redis fails the call with
        L{BackendUnavailable}; the caller counts it, so the hook does not.
        """
        server = self.start_server()
        server.stop()
        hook: list[Any] = []
        limiter = self.redis_limiter(
            config(Limits(requests_per_minute=1)),
            server.url(),
            self.clock,
            timeout_ms=100,
            fail_mode="closed",
            hook=hook,
        )
        with self.assertRaises(BackendUnavailable):
            await limiter.reserve(request())
        self.assertEqual(hook.count(1), 0)

    async def test_corrections_dropped_when_unreachable(self) -> None:
        """
        A reconcile or release that cannot reach Redis is counted and
        dropped: the response has already been sent.
        """
        server = self.start_server()
        hook: list[int] = []
        limiter = self.redis_limiter(
            config(Limits(tokens_per_minute=100)),
            server.url(),
            self.clock,
            timeout_ms=200,
            hook=hook,
        )
        reservation = (await limiter.reserve(request(10))).reservation
        assert reservation is not None
        server.stop()
        # Neither fails: there is nobody left to tell.
        await limiter.reconcile(reservation, 50)
        await limiter.release(reservation)
        self.assertEqual(hook.count(1), 2)

    async def test_not_started(self) -> None:
        """
        Before the service starts there is no backend: requests are decided
        locally.
        """
        server = self.start_server()
        limiter = self.redis_limiter(
            config(Limits(requests_per_minute=1)), server.url(), self.clock, start=False
        )
        reservation = (await limiter.reserve(request())).reservation
        assert reservation is not None
        self.assertTrue(reservation.local)

    async def test_recovers_when_redis_returns(self) -> None:
        """
        Kill Redis: the outage is noticed at once (the connections close)
        and requests are decided locally.  Start it again on the same port:
        within seconds the pool has reconnected, a ping ends the outage and
        limits apply in Redis again.
        """
        from twisted.internet import reactor

        server = self.start_server()
        limits = config(Limits(requests_per_minute=2))
        limiter = self.redis_limiter(limits, server.url(), self.clock, timeout_ms=200)
        self.assertIsNotNone((await limiter.reserve(request())).reservation)
        server.stop()
        await deferLater(reactor, 0.1, lambda: None)
        local = (await limiter.reserve(request())).reservation
        assert local is not None
        self.assertTrue(local.local)
        server.start()
        started = real_reactor().seconds()
        while True:
            decision = await limiter.reserve(request())
            if decision.reservation is not None and not decision.reservation.local:
                break
            self.assertLess(real_reactor().seconds() - started, 30, "Redis never came back")
            await deferLater(reactor, 0.1, lambda: None)
        # The restarted server is empty: this was the first of two.
        self.assertTrue((await limiter.reserve(request())).allowed)
        denial = (await limiter.reserve(request())).denial
        assert denial is not None
        self.assertEqual((denial.scope, denial.metric), ("global", "requests"))


class _Hangup(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class RedisRecoveryTests(RedisHelpers):
    """
    Recovery from the way txredisapi gives up.
    """

    async def test_pool_replaced_after_setup_failure(self) -> None:
        """
        A server that drops connections during C{SELECT} makes txredisapi
        stop reconnecting the whole pool; the limiter replaces the pool and
        recovers once a real Redis answers on that port.
        """
        from twisted.internet import reactor

        clock = Clock()
        clock.advance(T0)
        factory = ServerFactory()
        factory.protocol = _Hangup
        hangup = reactor.listenTCP(0, factory, interface="127.0.0.1")
        address = hangup.getHost()
        assert isinstance(address, IPv4Address)
        server = RedisServer()
        server.port = address.port
        self.addCleanup(server.cleanup)
        limiter = self.redis_limiter(
            config(Limits(requests_per_minute=2)), server.url(db=2), clock, timeout_ms=200
        )
        first = (await limiter.reserve(request())).reservation
        self.assertTrue(first is None or first.local)
        await deferLater(reactor, 0.3, lambda: None)
        await maybeDeferred(hangup.stopListening)
        server.start()
        started = real_reactor().seconds()
        while True:
            reservation = (await limiter.reserve(request())).reservation
            if reservation is not None and not reservation.local:
                break
            self.assertLess(real_reactor().seconds() - started, 30, "Redis never came back")
            await deferLater(reactor, 0.1, lambda: None)
        self.assertTrue((await limiter.reserve(request())).allowed)
        self.assertFalse((await limiter.reserve(request())).allowed)


class RedisURLTests(SynchronousTestCase):
    """
    L{parse_redis_url}, L{limiter_for} and L{services_for} for Redis.
    """

    def test_full(self) -> None:
        target = parse_redis_url("redis://:p%40ss%20w@redis.internal:6380/4")
        self.assertEqual(
            (target.host, target.port, target.db, target.password, target.username, target.tls),
            ("redis.internal", 6380, 4, "p@ss w", None, False),
        )

    def test_defaults(self) -> None:
        target = parse_redis_url("redis://")
        self.assertEqual(
            (target.host, target.port, target.db, target.password), ("127.0.0.1", 6379, 0, None)
        )

    def test_user_and_tls(self) -> None:
        target = parse_redis_url("rediss://app:pw@h/1")
        self.assertEqual((target.username, target.password, target.tls), ("app", "pw", True))

    def test_bad(self) -> None:
        self.assertRaises(ValueError, parse_redis_url, "http://h/0")
        self.assertRaises(ValueError, parse_redis_url, "redis://h/zero")
        self.assertRaises(ValueError, parse_redis_url, "redis://h:99999/0")

    def test_metrics_object(self) -> None:
        """
        C{limiter_for} also takes the proxy's metrics object and reports
        to it.
        """

        counter = Recorder()
        rate = RateLimitConfig(enabled=True, backend="redis", limits=Limits(requests_per_minute=1))
        limiter = limiter_for(rate, Clock(), counter)
        assert limiter is not None
        # Not started: no backend, so the call is decided locally, and counted.
        decision = self.successResultOf(limiter.reserve(request()))
        self.assertTrue(decision.allowed)
        self.assertEqual(counter.calls, ["local"])

    def test_local_share(self) -> None:
        """
        The outage's local counters hold C{outage_limit_fraction} of every
        limit, rounded up, overrides included; 0 (unlimited) stays 0.
        """
        rate = RateLimitConfig(
            enabled=True,
            backend="redis",
            limits=Limits(requests_per_minute=10, tokens_per_day=1001),
            overrides=RateLimitOverrides(per_user={"ann": Limits(requests_per_minute=3)}),
            redis=RedisConfig(outage_limit_fraction=0.5),
        )
        local = local_share(rate)
        self.assertEqual(local.backend, "memory")
        self.assertEqual(local.limits, Limits(requests_per_minute=5, tokens_per_day=501))
        self.assertEqual(local.overrides.per_user["ann"], Limits(requests_per_minute=2))
        self.assertEqual(local_share(evolve(rate, redis=RedisConfig())).limits, rate.limits)

    def test_limiter_for(self) -> None:
        clock = Clock()
        rate = RateLimitConfig(enabled=True, backend="redis")
        limiter = limiter_for(rate, clock)
        self.assertIsInstance(limiter, RedisRateLimiter)
        assert limiter is not None
        self.assertEqual(services_for(limiter, rate, clock), [limiter])
