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
