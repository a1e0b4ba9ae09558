"""
Tests for L{llmproxy.status.series}: the per-second rings and the TTFB
histograms behind the status page.
"""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.status.series import (
    GROWTH,
    MinuteHistograms,
    SecondCounts,
    bucket_of,
    bucket_value_ms,
)


class SecondCountsTests(SynchronousTestCase):
    def test_window(self) -> None:
        """
        The window covers the whole seconds before the current one.
        """
        counts = SecondCounts()
        counts.add(100.2, False)
        counts.add(100.9, True)
        counts.add(101.5, False)
        self.assertEqual(counts.window(101.7, 60), (2, 1))
        self.assertEqual(counts.window(102.0, 60), (3, 1))
        self.assertEqual(counts.window(102.0, 1), (1, 0))
        self.assertEqual(counts.window(200.0, 60), (0, 0))

    def test_ring_wraps(self) -> None:
        """
        A slot reused a full span later forgets its old counts, and the
        memory never grows.
        """
        counts = SecondCounts(span=10)
        counts.add(5, True)
        counts.add(15, False)
        self.assertEqual(counts.window(16, 10), (1, 0))
        for second in range(10_000):
            counts.add(second, second % 2 == 0)
        self.assertEqual(counts.window(10_000, 5), (5, 2))

    def test_buckets(self) -> None:
        counts = SecondCounts()
        for second in (90, 91, 95, 99, 99):
            counts.add(second, second == 99)
        self.assertEqual(counts.buckets(100.5, 5, 3), [(0, 0), (2, 0), (3, 2)])
        self.assertEqual(len(counts.buckets(100.5, 5, 180)), 180)
        self.assertEqual(sum(r for r, _ in counts.buckets(2000, 5, 180)), 0)


class HistogramTests(SynchronousTestCase):
    def test_bucket_bounds(self) -> None:
        """
        A bucket's value is within the promised error of every duration in it.
        """
        for seconds in (0.0002, 0.001, 0.0123, 0.5, 3.7, 59.0, 600.0):
            value = bucket_value_ms(bucket_of(seconds))
            self.assertLessEqual(abs(value - seconds * 1000) / (seconds * 1000), GROWTH - 1)
        self.assertEqual(bucket_of(0.0), 0)
        self.assertEqual(bucket_value_ms(0), 0.05)

    def test_quantiles(self) -> None:
        """
        p50 and p95 of many durations are within 2.5% of the exact ones.
        """
        rng = random.Random(7)
        samples = [rng.lognormvariate(-3, 1.2) for _ in range(5000)]
        histograms = MinuteHistograms()
        for index, seconds in enumerate(samples):
            histograms.add(600 + index * 0.05, seconds)
        count, (p50, p95) = histograms.quantiles(600 + 5000 * 0.05, 15, (0.5, 0.95))
        self.assertEqual(count, 5000)
        ordered = sorted(samples)
        for got, exact in ((p50, ordered[2499]), (p95, ordered[4749])):
            assert got is not None
            self.assertLess(abs(got - exact * 1000) / (exact * 1000), 0.026)

    def test_window_and_wrap(self) -> None:
        histograms = MinuteHistograms(minutes=15)
        histograms.add(0, 1.0)
        histograms.add(600, 0.01)
        self.assertEqual(histograms.quantiles(600, 5, (0.5,))[0], 1)
        self.assertEqual(histograms.quantiles(600, 15, (0.5,))[0], 2)
        histograms.add(900, 0.01)  # minute 15 reuses minute 0's slot
        self.assertEqual(histograms.quantiles(900, 15, (0.5,))[0], 2)
        self.assertEqual(histograms.quantiles(99999, 5, (0.5, 0.95)), (0, (None, None)))


class MergeTests(SynchronousTestCase):
    """
    Series exported by several processes and absorbed into one read as if
    one process had counted everything.
    """

    def test_second_counts(self) -> None:
        one, two, both = SecondCounts(), SecondCounts(), SecondCounts()
        for second, error in ((90, False), (95, True), (99, False), (100, False)):
            one.add(second, error)
            both.add(second, error)
        for second in (95, 96, 99):
            two.add(second, False)
            both.add(second, False)
        merged = SecondCounts()
        merged.absorb(one.export(100.5, 900))
        merged.absorb(two.export(100.5, 900))
        self.assertEqual(merged.buckets(100.5, 5, 4), both.buckets(100.5, 5, 4))
        self.assertEqual(merged.window(101.0, 60), (7, 1))
        # Only the seconds asked for, and only those with counts.
        self.assertEqual(one.export(100.5, 5), [[99, 1, 0], [100, 1, 0]])

    def test_second_counts_keep_the_later_second(self) -> None:
        """
        A slot already holding a later second is not overwritten by an
        older one a full span back.
        """
        merged = SecondCounts(span=10)
        merged.absorb([[15, 2, 0]])
        merged.absorb([[5, 7, 7]])
        self.assertEqual(merged.window(16, 10), (2, 0))

    def test_histograms(self) -> None:
        """
        The quantiles of merged histograms are those of all the samples:
        here neither process alone has the group's p95.
        """
        fast, slow, both = MinuteHistograms(), MinuteHistograms(), MinuteHistograms()
        for index in range(90):
            fast.add(600 + index, 0.1)
            both.add(600 + index, 0.1)
        for index in range(10):
            slow.add(650 + index, 2.0)
            both.add(650 + index, 2.0)
        merged = MinuteHistograms()
        for histograms in (fast, slow):
            merged.absorb(histograms.export(700, 5))
        wanted = (0.5, 0.95)
        self.assertEqual(merged.quantiles(700, 5, wanted), both.quantiles(700, 5, wanted))
        self.assertEqual(merged.quantiles(700, 5, wanted)[0], 100)
        self.assertEqual(fast.export(2000, 5), [])
        older = MinuteHistograms(minutes=15)
        older.absorb([[30, [[10, 1]]]])
        older.absorb([[15, [[10, 5]]]])
        self.assertEqual(older.quantiles(30 * 60, 15, (0.5,))[0], 1)
