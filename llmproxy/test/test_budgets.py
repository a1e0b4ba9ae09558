"""
Tests for L{llmproxy.budgets}: periods and worst cases
(L{llmproxy.budgets.policy}), the memory spend store, and the rebuild of
spend from cost records.
"""

from __future__ import annotations

import calendar
import os
from collections.abc import Callable
from typing import cast

import attrs
from attrs import evolve
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import SynchronousTestCase

from llmproxy import budgets
from llmproxy.budgets import (
    BudgetReservation,
    Hold,
    MemorySpendStore,
    RedisSpendStore,
    SpendDecision,
    Spent,
    reconfigure_spend_store,
    spend_store_for,
)
from llmproxy.budgets.memory import Tallies
from llmproxy.budgets.policy import (
    NANOS_PER_USD,
    crossed,
    period_end,
    period_id,
    usd_to_nanos,
    worst_case_nanos,
)
from llmproxy.budgets.rebuild import spend_from_records
from llmproxy.config import Config, Price, parse_config
from llmproxy.records import rfc3339
from llmproxy.test.test_sinks import record

NOON = float(calendar.timegm((2026, 12, 31, 12, 0, 0)))
"""The last day of a month and of a year, at noon UTC."""

USD = NANOS_PER_USD


def hold(
    scope: str = "key:a",
    period: str = "day",
    limit: float | None = 1.0,
    amount: float = 0.25,
    alert_at: tuple[float, ...] = (0.5, 1.0),
) -> Hold:
    return Hold(
        scope,
        period,
        None if limit is None else usd_to_nanos(limit),
        usd_to_nanos(amount),
        alert_at,
    )


class PolicyTests(SynchronousTestCase):
    def test_periods(self) -> None:
        self.assertEqual(period_id("day", NOON), "2026-12-31")
        self.assertEqual(period_id("month", NOON), "2026-12")
        new_year = calendar.timegm((2027, 1, 1, 0, 0, 0))
        self.assertEqual(period_end("day", NOON), new_year)
        self.assertEqual(period_end("month", NOON), new_year)
        self.assertEqual(period_id("day", new_year - 0.001), "2026-12-31")
        self.assertEqual(period_id("day", new_year), "2027-01-01")
        february = calendar.timegm((2028, 2, 10, 5, 0, 0))
        self.assertEqual(period_end("month", february), calendar.timegm((2028, 3, 1, 0, 0, 0)))

    def test_worst_case(self) -> None:
        """
        Input at the input price; output at the higher of the output and
        reasoning prices; rounded up.
        """
        price = Price(input=2.0, output=8.0, cache_read=0.5, cache_write=2.5, reasoning=10.0)
        self.assertEqual(worst_case_nanos(price, 1000, 100), (1000 * 2.0 + 100 * 10.0) * 1000)
        cheap = Price(input=0.15, output=0.6, cache_read=0.15, cache_write=0.15, reasoning=0.6)
        self.assertEqual(worst_case_nanos(cheap, 1, 0), 150)
        self.assertEqual(worst_case_nanos(cheap, 1, 1), 750)
        self.assertEqual(worst_case_nanos(Price(0.001, 0, 0, 0, 0), 1, 0), 1)

    def test_crossed(self) -> None:
        capped = hold(limit=1.0, alert_at=(0.5, 0.8, 1.0))
        self.assertEqual(crossed(capped, usd_to_nanos(0.85), 0), (0.5, 0.8))
        self.assertEqual(crossed(capped, usd_to_nanos(0.85), usd_to_nanos(0.6)), (0.8,))
        self.assertEqual(crossed(capped, USD, usd_to_nanos(0.85)), (1.0,))
        self.assertEqual(crossed(hold(limit=0.0), 10, 0), ())
        self.assertEqual(crossed(hold(limit=None), 10, 0), ())


class MemoryStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MemorySpendStore()

    def reserve(self, *holds: Hold, now: float = NOON) -> SpendDecision:
        return self.successResultOf(self.store.reserve(holds, now))

    def settle(
        self, reservation: BudgetReservation | None, usd: float, now: float = NOON
    ) -> tuple[Spent, ...]:
        assert reservation is not None
        charges = [usd_to_nanos(usd)] * len(reservation.holds)
        return self.successResultOf(self.store.settle(reservation, charges, now))

    def test_reserve_until_full(self) -> None:
        """
        Reservations count against the cap until they are settled; what
        does not fit is refused with the first full hold.
        """
        decisions = [self.reserve(hold()) for _ in range(5)]
        self.assertEqual([d.shortfall is None for d in decisions], [True] * 4 + [False])
        shortfall = decisions[-1].shortfall
        assert shortfall is not None
        self.assertEqual((shortfall.spent, shortfall.held, shortfall.remaining), (0, USD, 0))
        self.assertEqual(shortfall.hold.scope, "key:a")
        # Settling at the real cost (less than reserved) makes room.
        self.settle(decisions[0].reservation, 0.1)
        self.assertIsNotNone(self.reserve(hold(amount=0.15)).reservation)
        self.assertIsNotNone(self.reserve(hold(amount=1e-9)).shortfall)
        self.assertEqual(self.store.spent("key:a", "day", NOON), usd_to_nanos(0.1))

    def test_all_or_nothing(self) -> None:
        """
        A request that does not fit one hold reserves in none.
        """
        roomy, tight = hold("key:a", limit=10.0), hold("user:bob", limit=0.2)
        decision = self.reserve(roomy, tight)
        shortfall = decision.shortfall
        assert shortfall is not None
        self.assertEqual(shortfall.hold, tight)
        self.assertEqual(self.reserve(hold("key:a", limit=0.25)).shortfall, None)

    def test_uncapped_holds_are_counted(self) -> None:
        counted = hold("key:free", limit=None)
        for _ in range(3):
            self.settle(self.reserve(counted).reservation, 2.0)
        self.assertEqual(self.store.spent("key:free", "day", NOON), 6 * USD)

    def test_zero_budget(self) -> None:
        self.assertIsNotNone(self.reserve(hold(limit=0.0, amount=0.0)).reservation)
        self.assertIsNotNone(self.reserve(hold(limit=0.0, amount=1e-9)).shortfall)

    def test_rollover(self) -> None:
        """
        A new day starts from nothing; the month goes on (and a new month
        starts from nothing). A request that straddles midnight gives back
        its reservation in the day it was admitted and is charged in the
        day it ended.
        """
        mid = NOON - 16 * 86400
        day, month = hold(period="day", limit=1.0), hold(period="month", limit=10.0)
        self.settle(self.reserve(day, month, now=mid).reservation, 0.5, now=mid)
        straddling = self.reserve(day, month, now=mid + 43199).reservation
        self.settle(straddling, 0.25, now=mid + 43201)
        tomorrow = mid + 86400
        self.assertEqual(self.store.spent("key:a", "day", tomorrow), usd_to_nanos(0.25))
        self.assertEqual(self.store.spent("key:a", "month", tomorrow), usd_to_nanos(0.75))
        # Nothing is still held yesterday or today: three more fit today.
        self.assertEqual(
            [self.reserve(day, month, now=tomorrow).shortfall is None for _ in range(4)],
            [True, True, True, False],
        )
        next_month = NOON + 86400
        self.assertEqual(self.store.spent("key:a", "month", next_month), 0)

    def test_alerts_once(self) -> None:
        """
        Each fraction is crossed once per period; a refusal reaches 1.0.
        """
        capped = hold(limit=1.0, amount=0.3, alert_at=(0.5, 1.0))
        first = self.settle(self.reserve(capped).reservation, 0.3)
        self.assertEqual(first[0].crossed, ())
        second = self.settle(self.reserve(capped).reservation, 0.3)
        self.assertEqual(second[0].crossed, (0.5,))
        third = self.settle(self.reserve(capped).reservation, 0.3)
        self.assertEqual(third[0].crossed, ())
        refused = self.reserve(capped).shortfall
        assert refused is not None
        self.assertTrue(refused.alert)
        again = self.reserve(capped).shortfall
        assert again is not None
        self.assertFalse(again.alert)
        # Settling past the cap later does not alert 1.0 a second time.
        over = self.settle(BudgetReservation(NOON, (capped,), reserved=False), 0.3)
        self.assertEqual(over[0].crossed, ())
        tomorrow = self.settle(
            self.reserve(capped, now=NOON + 86400).reservation, 0.6, NOON + 86400
        )
        self.assertEqual(tomorrow[0].crossed, (0.5,))

    def test_refusal_without_alert_at_one(self) -> None:
        capped = hold(limit=0.1, amount=0.3, alert_at=(0.5,))
        shortfall = self.reserve(capped).shortfall
        assert shortfall is not None
        self.assertFalse(shortfall.alert)

    def test_load(self) -> None:
        """
        Spend found in the cost records counts, and what it crossed is not
        alerted again.
        """
        self.store.load({("key:a", "day"): ("2026-12-31", usd_to_nanos(0.6))})
        capped = hold(limit=1.0, amount=0.2, alert_at=(0.5, 0.8, 1.0))
        spent = self.settle(self.reserve(capped).reservation, 0.2)
        self.assertEqual(spent[0].spent, usd_to_nanos(0.8))
        self.assertEqual(spent[0].crossed, (0.8,))
        self.assertEqual(self.reserve(hold(limit=1.0, amount=0.21)).shortfall is not None, True)
        # An old period's spend in the records counts for nothing today.
        self.store.load({("key:b", "day"): ("2026-12-30", USD)})
        self.assertEqual(self.store.spent("key:b", "day", NOON), 0)

    def test_waits_for_rebuild(self) -> None:
        """
        Calls made while the rebuild reads the records are answered after
        it, in order, with its spend counted.
        """
        done: Deferred[Tallies] = Deferred()
        self.store.rebuilding(done)
        capped = hold(limit=1.0, amount=0.5)
        first = self.store.reserve([capped], NOON)
        second = self.store.reserve([capped], NOON)
        self.assertNoResult(first)
        done.callback({("key:a", "day"): ("2026-12-31", usd_to_nanos(0.4))})
        self.assertIsNone(self.successResultOf(first).shortfall)
        self.assertIsNotNone(self.successResultOf(second).shortfall)
        self.assertIsNotNone(self.successResultOf(self.store.reserve([capped], NOON)).shortfall)

    def test_failed_rebuild(self) -> None:
        done: Deferred[Tallies] = Deferred()
        self.store.rebuilding(done)
        waiting = self.store.reserve([hold()], NOON)
        done.errback(OSError("unreadable"))
        self.assertIsNone(self.successResultOf(waiting).shortfall)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


def record_line(when: float, key_id: str | None, user: str | None, cost: float | None) -> bytes:
    """
    A cost record's line, as the file sink writes it.
    """
    line = evolve(record(0), timestamp=rfc3339(when), key_id=key_id, user_id=user, total_cost=cost)
    return line.to_json() + b"\n"


class RebuildTests(SynchronousTestCase):
    def test_sums_today_and_this_month(self) -> None:
        path = self.mktemp()
        yesterday, last_month = NOON - 86400, NOON - 31 * 86400
        with open(path, "wb") as stream:
            stream.write(record_line(last_month, "a", "bob", 100.0))
            stream.write(record_line(yesterday, "a", "bob", 2.0))
            stream.write(record_line(NOON, "a", None, 0.5))
            stream.write(record_line(NOON, "a", "bob", 0.25))
            stream.write(record_line(NOON, "3f2a9c0d1e5b7a64", "carol", 9.0))
            stream.write(record_line(NOON, "a", "bob", None))
            stream.write(b"not a record\n")
            stream.write(b'{"timestamp":"2026-12-31T01:00:00.000Z","total_cost":')  # torn
        totals = spend_from_records(path, {"a"}, {"bob"}, NOON + 60)
        self.assertEqual(
            totals,
            {
                ("key:a", "month"): ("2026-12", usd_to_nanos(2.75)),
                ("key:a", "day"): ("2026-12-31", usd_to_nanos(0.75)),
                ("user:bob", "month"): ("2026-12", usd_to_nanos(2.25)),
                ("user:bob", "day"): ("2026-12-31", usd_to_nanos(0.25)),
            },
        )

    def test_missing_file(self) -> None:
        self.assertEqual(spend_from_records(self.mktemp(), {"a"}, set(), NOON), {})

    def test_unreadable(self) -> None:
        path = self.mktemp()
        os.mkdir(path)
        self.assertRaises(OSError, spend_from_records, path, {"a"}, set(), NOON)


class StoreForTests(SynchronousTestCase):
    """
    L{spend_store_for} and L{reconfigure_spend_store}: which store a
    configuration gets, and what a reload keeps.
    """

    def config(self, **auth: object) -> Config:
        return parse_config({"auth": auth}, "test")

    def test_which_store(self) -> None:
        clock = Clock()
        self.assertIsNone(spend_store_for(self.config(), clock, at_once))
        keyed = self.config(mode="keys", keys=[{"id": "a", "hash": "sha256:" + "ab" * 32}])
        self.assertIsInstance(spend_store_for(keyed, clock, at_once), MemorySpendStore)
        users = self.config(budgets={"per_user": {"bob": {"daily_usd": 1}}})
        redis = attrs.evolve(
            users,
            features=attrs.evolve(
                users.features,
                rate_limiting=attrs.evolve(users.features.rate_limiting, backend="redis"),
            ),
        )
        self.assertIsInstance(spend_store_for(redis, clock, at_once), RedisSpendStore)

    def test_warns_without_records(self) -> None:
        events: list[dict[str, object]] = []
        self.patch(budgets, "log", Logger(observer=cast(ILogObserver, events.append)))
        users = self.config(budgets={"per_user": {"bob": {"daily_usd": 1}}})
        spend_store_for(users, Clock(), at_once)
        [event] = events
        self.assertIn("no cost-record file", str(event["log_format"]))

    def test_reload_keeps_the_store(self) -> None:
        clock = Clock()
        users = self.config(budgets={"per_user": {"bob": {"daily_usd": 1}}})
        store = spend_store_for(users, clock, at_once)
        more = self.config(budgets={"per_user": {"bob": {"daily_usd": 2}, "eve": {}}})
        self.assertIs(reconfigure_spend_store(store, users, more, clock, at_once), store)
        self.assertIsNone(reconfigure_spend_store(store, users, self.config(), clock, at_once))


def at_once(work: Callable[[], Tallies]) -> Deferred[Tallies]:
    return succeed(work())
