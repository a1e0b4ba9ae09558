"""
Tests for L{llmproxy.budgets.redis_store}: the spend store in a private
C{redis-server}, shared by several stores (as by several proxy instances),
its key layout, and its failure modes.
"""

from __future__ import annotations

from typing import Any, Literal

from twisted.internet.defer import gatherResults

from llmproxy.budgets import BudgetReservation, Hold, RedisSpendStore, SpendDecision, Spent
from llmproxy.budgets.policy import NANOS_PER_USD, usd_to_nanos
from llmproxy.config import RateLimitConfig, RedisConfig
from llmproxy.ratelimit import BackendUnavailable
from llmproxy.test.test_budgets import NOON, hold
from llmproxy.test.test_ratelimit_redis import RedisHelpers, real_reactor
from llmproxy.testing.redis_server import RedisServer

USD = NANOS_PER_USD


class RedisStoreTests(RedisHelpers):
    def setUp(self) -> None:
        self.server = self.start_server()

    def store(
        self,
        server: RedisServer | None = None,
        *,
        fail_mode: Literal["open", "closed"] = "open",
        timeout_ms: int = 5000,
        errors: list[int] | None = None,
    ) -> RedisSpendStore:
        url = (server or self.server).url()
        config = RateLimitConfig(
            backend="redis", fail_mode=fail_mode, redis=RedisConfig(url=url, timeout_ms=timeout_ms)
        )
        counted = errors if errors is not None else []
        store = RedisSpendStore(config, real_reactor(), lambda: counted.append(1))
        store.startService()
        self.addCleanup(store.stopService)
        return store

    async def reserve(
        self, store: RedisSpendStore, *holds: Hold, now: float = NOON
    ) -> SpendDecision:
        decision: SpendDecision = await store.reserve(holds, now)
        return decision

    async def settle(
        self,
        store: RedisSpendStore,
        reservation: BudgetReservation | None,
        usd: float,
        now: float = NOON,
    ) -> tuple[Spent, ...]:
        assert reservation is not None
        spent: tuple[Spent, ...] = await store.settle(
            reservation, [usd_to_nanos(usd)] * len(reservation.holds), now
        )
        return spent

    async def test_reserve_settle(self) -> None:
        """
        The memory store's semantics: reservations fill the cap, a
        settlement replaces one with the real cost, the first full hold
        explains a refusal, and nothing is reserved unless all fit.
        """
        store = self.store()
        decisions = [await self.reserve(store, hold()) for _ in range(5)]
        self.assertEqual([d.shortfall is None for d in decisions], [True] * 4 + [False])
        shortfall = decisions[-1].shortfall
        assert shortfall is not None
        self.assertEqual((shortfall.spent, shortfall.held, shortfall.remaining), (0, USD, 0))
        [spent] = await self.settle(store, decisions[0].reservation, 0.1)
        self.assertEqual(spent.spent, usd_to_nanos(0.1))
        self.assertIsNotNone((await self.reserve(store, hold(amount=0.15))).reservation)
        tight = hold("user:bob", limit=0.2)
        refused = await self.reserve(store, hold("key:b", limit=10.0), tight)
        assert refused.shortfall is not None
        self.assertEqual(refused.shortfall.hold, tight)
        self.assertIsNotNone((await self.reserve(store, hold("key:b", limit=0.25))).reservation)

    async def test_rollover_and_uncapped(self) -> None:
        store = self.store()
        counted = hold("key:free", limit=None)
        reservation = (await self.reserve(store, counted)).reservation
        [figure] = await self.settle(store, reservation, 2.0)
        self.assertEqual(figure.spent, 2 * USD)
        mid = NOON - 16 * 86400
        day = hold(period="day", limit=1.0)
        straddling = (await self.reserve(store, day, now=mid + 43199)).reservation
        await self.settle(store, straddling, 0.25, now=mid + 43201)
        tomorrow = mid + 86400
        fits = [(await self.reserve(store, day, now=tomorrow)).shortfall is None for _ in range(4)]
        self.assertEqual(fits, [True, True, True, False])

    async def test_shared_exactly(self) -> None:
        """
        Two stores (two proxies) reserving at once against one budget admit
        exactly what fits, and see each other's spend.
        """
        first, second = self.store(), self.store()
        capped = hold(limit=1.0, amount=0.1)
        decisions = await gatherResults(
            [store.reserve([capped], NOON) for store in (first, second) for _ in range(20)]
        )
        admitted = [d.reservation for d in decisions if d.reservation is not None]
        self.assertEqual(len(admitted), 10)
        for index, reservation in enumerate(admitted):
            await self.settle((first, second)[index % 2], reservation, 0.05)
        decisions = await gatherResults([second.reserve([capped], NOON) for _ in range(10)])
        self.assertEqual(sum(d.reservation is not None for d in decisions), 5)

    async def test_alerts_once_across_stores(self) -> None:
        first, second = self.store(), self.store()
        capped = hold(limit=1.0, amount=0.3, alert_at=(0.5, 1.0))
        crossed: list[tuple[str, object]] = []
        for store in (first, second, first, second):
            decision = await self.reserve(store, capped)
            if decision.reservation is None:
                assert decision.shortfall is not None
                crossed.append(("refused", decision.shortfall.alert))
                continue
            [figure] = await self.settle(store, decision.reservation, 0.3)
            crossed.append(("settled", figure.crossed))
        self.assertEqual(
            crossed,
            [("settled", ()), ("settled", (0.5,)), ("settled", ()), ("refused", True)],
        )
        again = (await self.reserve(second, capped)).shortfall
        assert again is not None
        self.assertFalse(again.alert)

    async def test_key_layout(self) -> None:
        """
        One hash per scope and period, named by the key's configured id,
        expiring a day after its period.
        """
        store = self.store()
        reservation = (await self.reserve(store, hold("key:team-a", period="month"))).reservation
        await self.settle(store, reservation, 0.5)
        connection = await self.connect(self.server)
        keys = await connection.keys("*")
        self.assertEqual(keys, ["llmproxy:budget:2026-12:key:team-a"])
        fields = await connection.hgetall(keys[0])
        self.assertEqual((int(fields["s"]), int(fields["h"])), (usd_to_nanos(0.5), 0))
        ttl = await connection.ttl(keys[0])
        self.assertGreater(ttl, 0)

    async def test_fail_open(self) -> None:
        server = self.start_server()
        server.stop()
        errors: list[int] = []
        store = self.store(server, timeout_ms=100, errors=errors)
        decision = await self.reserve(store, hold())
        reservation = decision.reservation
        assert reservation is not None
        self.assertFalse(reservation.reserved)
        self.assertEqual(await self.settle(store, reservation, 0.1), ())
        self.assertEqual(len(errors), 2)

    async def test_fail_closed(self) -> None:
        server = self.start_server()
        server.stop()
        errors: list[int] = []
        store = self.store(server, fail_mode="closed", timeout_ms=100, errors=errors)
        failure: Any = None
        try:
            await self.reserve(store, hold())
        except BackendUnavailable as error:
            failure = error
        self.assertIsInstance(failure, BackendUnavailable)
        # The caller counts a closed failure itself.
        self.assertEqual(errors, [])

    async def test_nothing_capped_needs_no_redis(self) -> None:
        server = self.start_server()
        server.stop()
        store = self.store(server, fail_mode="closed", timeout_ms=100)
        decision = await self.reserve(store, hold(limit=None))
        assert decision.reservation is not None
        self.assertTrue(decision.reservation.reserved)
