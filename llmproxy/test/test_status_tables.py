"""
Tests for L{llmproxy.status.tables}: the bounded per-name tables.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.status.tables import COST, INPUT, OTHER, REQUESTS, ScopeTable, UsageTable


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
