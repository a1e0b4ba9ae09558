# -*- test-case-name: llmproxy.test.test_status_series -*-
"""
Fixed-size time series for the status page: request and error counts per
second over the last 15 minutes, and time-to-first-byte histograms per
minute from which p50 and p95 are read.

Both are rings indexed by the clock: recording is a few list or dict
operations whatever the traffic, and memory never grows (a slot is reset
when the ring comes round to it again). Each can export its recent slots
as JSON data and absorb another's, so the workers of a group add up to
one series.
"""

from __future__ import annotations

import math
from typing import Any

SPAN_SECONDS = 900
"""Seconds of per-second counts kept: the charts' 15 minutes."""

GROWTH = 1.05
"""
Ratio between two TTFB histogram buckets: a quantile read from a bucket is
within 2.5% of the true value.
"""

_INV_LOG_GROWTH = 1.0 / math.log(GROWTH)

_UNITS_PER_MS = 10.0
"""Bucket values are in tenths of a millisecond: sub-millisecond TTFBs still differ."""

HISTOGRAM_MINUTES = 15
"""Minutes of TTFB histograms kept."""


class SecondCounts:
    """
    Requests and errors in each of the last L{SPAN_SECONDS} seconds.
    """

    __slots__ = ("_errors", "_requests", "_span", "_stamps")

    def __init__(self, span: int = SPAN_SECONDS) -> None:
        self._span = span
        self._stamps = [-1] * span
        self._requests = [0] * span
        self._errors = [0] * span

    def add(self, now: float, error: bool) -> None:
        """
        Count one request that ended at clock time C{now}.
        """
        second = int(now)
        index = second % self._span
        if self._stamps[index] != second:
            self._stamps[index] = second
            self._requests[index] = 0
            self._errors[index] = 0
        self._requests[index] += 1
        if error:
            self._errors[index] += 1

    def _at(self, second: int) -> tuple[int, int]:
        index = second % self._span
        if self._stamps[index] != second:
            return 0, 0
        return self._requests[index], self._errors[index]

    def window(self, now: float, seconds: int) -> tuple[int, int]:
        """
        Requests and errors in the C{seconds} whole seconds before the
        current one (which is still filling up).
        """
        last = int(now) - 1
        requests = errors = 0
        for second in range(last - min(seconds, self._span - 1) + 1, last + 1):
            got, failed = self._at(second)
            requests += got
            errors += failed
        return requests, errors

    def export(self, now: float, seconds: int) -> list[list[int]]:
        """
        The counts of the last C{seconds} seconds (the current one
        included) that hold any, as C{[second, requests, errors]}.
        """
        last = int(now)
        out = []
        for second in range(last - min(seconds, self._span) + 1, last + 1):
            got, failed = self._at(second)
            if got:
                out.append([second, got, failed])
        return out

    def absorb(self, exported: list[list[int]]) -> None:
        """
        Add counts another series exported (a slot already holding a later
        second keeps it).
        """
        for second, got, failed in exported:
            index = second % self._span
            stamp = self._stamps[index]
            if stamp > second:
                continue
            if stamp != second:
                self._stamps[index] = second
                self._requests[index] = 0
                self._errors[index] = 0
            self._requests[index] += got
            self._errors[index] += failed

    def buckets(self, now: float, step: int, count: int) -> list[tuple[int, int]]:
        """
        Requests and errors per C{step} seconds, C{count} buckets, oldest
        first, the last one ending with the last whole second.
        """
        last = int(now) - 1
        first = last - step * count + 1
        out: list[tuple[int, int]] = []
        for bucket in range(count):
            start = first + bucket * step
            requests = errors = 0
            for second in range(max(start, last - self._span + 1), start + step):
                got, failed = self._at(second)
                requests += got
                errors += failed
            out.append((requests, errors))
        return out


def bucket_of(seconds: float) -> int:
    """
    The histogram bucket of a duration.
    """
    units = seconds * 1000.0 * _UNITS_PER_MS
    if units < 1.0:
        return 0
    return int(math.log(units) * _INV_LOG_GROWTH) + 1


def bucket_value_ms(bucket: int) -> float:
    """
    The duration a bucket stands for, in milliseconds: the geometric middle
    of its bounds.
    """
    if bucket <= 0:
        return 0.05
    value: float = GROWTH ** (bucket - 0.5) / _UNITS_PER_MS
    return value


class MinuteHistograms:
    """
    Log-bucketed histograms of durations, one per minute, for the last
    L{HISTOGRAM_MINUTES} minutes.
    """

    __slots__ = ("_counts", "_minutes", "_stamps")

    def __init__(self, minutes: int = HISTOGRAM_MINUTES) -> None:
        self._minutes = minutes
        self._stamps = [-1] * minutes
        self._counts: list[dict[int, int]] = [{} for _ in range(minutes)]

    def add(self, now: float, seconds: float) -> None:
        minute = int(now // 60)
        index = minute % self._minutes
        counts = self._counts[index]
        if self._stamps[index] != minute:
            self._stamps[index] = minute
            counts.clear()
        bucket = bucket_of(seconds)
        counts[bucket] = counts.get(bucket, 0) + 1

    def export(self, now: float, minutes: int) -> list[list[Any]]:
        """
        The histograms of the last C{minutes} minutes (the current one
        included) that hold any, as C{[minute, [[bucket, count], ...]]}.
        """
        current = int(now // 60)
        out: list[list[Any]] = []
        for minute in range(current - min(minutes, self._minutes) + 1, current + 1):
            index = minute % self._minutes
            if self._stamps[index] == minute and self._counts[index]:
                out.append([minute, [list(item) for item in self._counts[index].items()]])
        return out

    def absorb(self, exported: list[list[Any]]) -> None:
        """
        Add histograms another exported (a slot already holding a later
        minute keeps it).
        """
        for minute, buckets in exported:
            index = minute % self._minutes
            stamp = self._stamps[index]
            if stamp > minute:
                continue
            counts = self._counts[index]
            if stamp != minute:
                self._stamps[index] = minute
                counts.clear()
            for bucket, n in buckets:
                counts[bucket] = counts.get(bucket, 0) + n

    def quantiles(
        self, now: float, minutes: int, wanted: tuple[float, ...]
    ) -> tuple[int, tuple[float | None, ...]]:
        """
        How many durations the last C{minutes} minutes (the current one
        included) hold, and the C{wanted} quantiles of them in milliseconds
        (L{None} each when there is none).
        """
        current = int(now // 60)
        merged: dict[int, int] = {}
        for minute in range(current - min(minutes, self._minutes) + 1, current + 1):
            index = minute % self._minutes
            if self._stamps[index] != minute:
                continue
            for bucket, n in self._counts[index].items():
                merged[bucket] = merged.get(bucket, 0) + n
        total = sum(merged.values())
        if total == 0:
            return 0, tuple(None for _ in wanted)
        ordered = sorted(merged.items())
        results: list[float | None] = []
        for q in wanted:
            rank = max(1, math.ceil(q * total))
            seen = 0
            for bucket, n in ordered:
                seen += n
                if seen >= rank:
                    results.append(round(bucket_value_ms(bucket), 3))
                    break
        return total, tuple(results)
