"""
Tests for L{llmproxy.status.tables}: the bounded per-name tables.
"""

from __future__ import annotations

import calendar
from typing import Any

import orjson
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.status.tables import (
    COST,
    INPUT,
    OTHER,
    REQUESTS,
    BudgetTable,
    ScopeTable,
    UsageTable,
)

USD = 1_000_000_000
"""Nano-USD in a dollar."""

JAN_31 = float(calendar.timegm((2026, 1, 31, 12, 0, 0)))
"""Noon on the last day of a month (UTC)."""


def rows(table: BudgetTable, now: float, n: int = 20) -> list[tuple[str, str, float, float]]:
    return [
        (row["scope"], row["period"], row["spent_usd"], row["limit_usd"])
        for row in table.busiest(now, n)
    ]


def through_json(exported: dict[str, Any]) -> Any:
    """
    An export as another worker's part arrives: through JSON.
    """
    return orjson.loads(orjson.dumps(exported))


class UsageTableTests(SynchronousTestCase):
    def test_cap(self) -> None:
        """
        Past the cap every new name is counted in one C{(other)} row: the
        table stays bounded and its totals exact.
        """
        table = UsageTable(cap=3)
        for index in range(1000):
            row = table.row(f"user-{index}")
            row[REQUESTS] += 1
            row[INPUT] += 10
        self.assertEqual(len(table.rows), 4)
        self.assertEqual(table.rows[OTHER][REQUESTS], 997)
        self.assertEqual(table.totals()["requests"], 1000)
        self.assertEqual(table.totals()["input_tokens"], 10_000)
        table.row("user-1")[REQUESTS] += 1
        self.assertEqual(table.rows["user-1"][REQUESTS], 2)

    def test_top(self) -> None:
        table = UsageTable()
        for name, cost, tokens in (("a", 0.5, 10), ("b", 2.0, 1), ("c", 0.0, 99), ("d", 0.0, 5)):
            row = table.row(name)
            row[COST] += cost
            row[INPUT] += tokens
        self.assertEqual([row["name"] for row in table.top(3)], ["b", "a", "c"])
        self.assertEqual(table.row(None), table.rows["(none)"])

    def test_cache_ratio(self) -> None:
        table = UsageTable()
        table.row("m")[INPUT] += 200
        table.row("m")[2 + 2] += 50  # cache read
        table.row("empty")
        [row] = table.cache_top(5)
        self.assertEqual((row["name"], row["hit_ratio"]), ("m", 0.25))


class ScopeTableTests(SynchronousTestCase):
    def test_minute_and_day(self) -> None:
        """
        Use restarts with each clock minute; refusals last the day.
        """
        table = ScopeTable()
        table.used(60.0, ["global", "user:bob"], 100)
        table.used(61.0, ["global"], 50)
        table.denied(62.0, "user:bob")

        def limits(scope: str) -> tuple[int, int]:
            return (2, 0) if scope == "user:bob" else (10, 1000)

        busiest = table.busiest(63.0, 5, limits)
        self.assertEqual([row["scope"] for row in busiest], ["user:bob", "global"])
        self.assertEqual(busiest[0]["use"], 0.5)
        self.assertEqual((busiest[1]["requests_this_minute"], busiest[1]["use"]), (2, 0.2))
        later = table.busiest(130.0, 5, limits)
        self.assertEqual(later[0]["requests_this_minute"], 0)
        self.assertEqual(later[0]["denied_today"], 1)
        table.new_day()
        self.assertEqual(table.busiest(130.0, 5, limits), [])

    def test_cap(self) -> None:
        table = ScopeTable(cap=2)
        for index in range(50):
            table.used(0.0, [f"key:{index}"], 1)
        self.assertEqual(len(table.rows), 3)
        self.assertEqual(table.rows[OTHER][0], 48)


class BudgetTableTests(SynchronousTestCase):
    def test_share_order(self) -> None:
        """
        The budgets with the largest share of their cap spent come first
        (a cap of 0 counts as all spent), then the largest spend; amounts
        are exact.
        """
        table = BudgetTable()
        table.spent(JAN_31, "key:a", "day", 1 * USD, 10 * USD)
        table.spent(JAN_31, "key:a", "month", 1 * USD, 100 * USD)
        table.spent(JAN_31, "user:bob", "day", 4 * USD, 5 * USD)
        table.spent(JAN_31, "key:b", "day", 123_456_789, USD)
        table.spent(JAN_31, "key:free", "day", 0, 0)
        table.spent(JAN_31, "key:c", "day", 2 * USD, 20 * USD)
        self.assertEqual(
            rows(table, JAN_31),
            [
                ("key:free", "day", 0.0, 0.0),
                ("user:bob", "day", 4.0, 5.0),
                ("key:b", "day", 0.123456789, 1.0),
                ("key:c", "day", 2.0, 20.0),
                ("key:a", "day", 1.0, 10.0),
                ("key:a", "month", 1.0, 100.0),
            ],
        )
        self.assertEqual([row["use"] for row in table.busiest(JAN_31, 3)], [1.0, 0.8, 0.1235])

    def test_largest_spend(self) -> None:
        """
        A figure is the whole spend of the period: one smaller than the
        last (an earlier settlement answered late) changes nothing; a
        larger one brings its limit (a reload may have changed it).
        """
        table = BudgetTable()
        table.spent(JAN_31, "key:a", "day", 5 * USD, 10 * USD)
        table.spent(JAN_31 + 1, "key:a", "day", 3 * USD, 10 * USD)
        self.assertEqual(rows(table, JAN_31 + 1), [("key:a", "day", 5.0, 10.0)])
        table.spent(JAN_31 + 2, "key:a", "day", 6 * USD, 8 * USD)
        self.assertEqual(rows(table, JAN_31 + 2), [("key:a", "day", 6.0, 8.0)])

    def test_cap(self) -> None:
        """
        Past its cap the table drops its less used half: it stays bounded,
        keeps the busiest, and a dropped budget comes back whole with its
        next settlement.
        """
        table = BudgetTable(cap=10)
        for index in range(100):
            table.spent(JAN_31, f"key:{index:03d}", "day", index * USD, 100 * USD)
            self.assertLessEqual(len(table.rows), 10)
        self.assertEqual(
            [row["scope"] for row in table.busiest(JAN_31, 3)], ["key:099", "key:098", "key:097"]
        )
        table.spent(JAN_31, "key:000", "day", 99 * USD, 100 * USD)
        self.assertEqual(rows(table, JAN_31, 1), [("key:000", "day", 99.0, 100.0)])
        self.assertEqual(len(table.busiest(JAN_31, 3)), 3)

    def test_new_day_and_month(self) -> None:
        """
        At midnight UTC the day's rows go and the month's stay; at the
        month's end both go. A figure of a period already over is ignored.
        """
        table = BudgetTable()
        table.spent(JAN_31, "key:a", "day", 2 * USD, 10 * USD)
        table.spent(JAN_31, "key:a", "month", 7 * USD, 100 * USD)
        feb_1 = JAN_31 + 12 * 3600
        self.assertEqual(
            rows(table, feb_1 - 0.001),
            [("key:a", "day", 2.0, 10.0), ("key:a", "month", 7.0, 100.0)],
        )
        self.assertEqual(rows(table, feb_1), [])
        table.spent(JAN_31, "key:a", "day", 3 * USD, 10 * USD)
        self.assertEqual(rows(table, feb_1), [])
        table.spent(feb_1 + 60, "key:a", "day", 1 * USD, 10 * USD)
        table.spent(feb_1 + 60, "key:a", "month", 1 * USD, 100 * USD)
        feb_2 = feb_1 + 86400
        self.assertEqual(rows(table, feb_2), [("key:a", "month", 1.0, 100.0)])


class MergeTests(SynchronousTestCase):
    def test_usage_rows_add_up(self) -> None:
        one, two = UsageTable(), UsageTable()
        one.row("a")[REQUESTS] += 2
        one.row(None)[COST] += 0.5
        two.row("a")[REQUESTS] += 3
        two.row("b")[INPUT] += 7
        merged = UsageTable(cap=2)
        merged.absorb(one.rows)
        merged.absorb(two.rows)
        self.assertEqual(merged.rows["a"][REQUESTS], 5)
        self.assertEqual(merged.rows["(none)"][COST], 0.5)
        # Past the cap, as when counting: into (other).
        self.assertEqual(merged.rows[OTHER][INPUT], 7)
        self.assertEqual(merged.totals()["requests"], 5)

    def test_scopes(self) -> None:
        """
        Use this minute adds up when the export is of the current minute;
        refusals today always do.
        """
        one, two = ScopeTable(), ScopeTable()
        one.used(60.0, ["global"], 10)
        one.denied(61.0, "global")
        two.used(65.0, ["global"], 5)
        stale = ScopeTable()
        stale.used(0.0, ["global"], 99)
        stale.denied(1.0, "global")
        merged = ScopeTable()
        for table in (one, two):
            merged.absorb(table.export(70.0), 70.0)
        merged.absorb(stale.export(1.0), 70.0)
        [row] = merged.busiest(70.0, 5, lambda scope: (10, 100))
        self.assertEqual(
            (row["requests_this_minute"], row["tokens_this_minute"], row["denied_today"]),
            (2, 15, 2),
        )

    def test_budgets(self) -> None:
        """
        For the same budget, the largest spend of any part; a part exported
        before midnight brings its month's rows and not its day's.
        """
        one, two = BudgetTable(), BudgetTable()
        one.spent(JAN_31, "key:a", "day", 3 * USD, 10 * USD)
        one.spent(JAN_31, "user:bob", "day", 1 * USD, 2 * USD)
        two.spent(JAN_31 + 5, "key:a", "day", 4 * USD, 10 * USD)
        two.spent(JAN_31 + 5, "key:a", "month", 9 * USD, 100 * USD)
        merged = BudgetTable()
        for table in (two, one):
            merged.absorb(through_json(table.export(JAN_31 + 6)), JAN_31 + 6)
        self.assertEqual(
            rows(merged, JAN_31 + 6),
            [
                ("user:bob", "day", 1.0, 2.0),
                ("key:a", "day", 4.0, 10.0),
                ("key:a", "month", 9.0, 100.0),
            ],
        )
        yesterday = BudgetTable()
        yesterday.spent(JAN_31 - 86400, "key:a", "day", 8 * USD, 10 * USD)
        yesterday.spent(JAN_31 - 86400, "key:a", "month", 12 * USD, 100 * USD)
        merged.absorb(through_json(yesterday.export(JAN_31 - 86400)), JAN_31 + 6)
        self.assertEqual(
            rows(merged, JAN_31 + 6)[1:],
            [("key:a", "day", 4.0, 10.0), ("key:a", "month", 12.0, 100.0)],
        )
