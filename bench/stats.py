"""
Small statistics and the result model of a run: rows of per-repetition
samples, rendered as Markdown with medians, spreads and ratios to DIRECT.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from attrs import define, field


def percentile(values: Sequence[float], q: float) -> float:
    """
    Nearest-rank percentile C{q} (0-100) of C{values}; NaN when empty.
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    """
    The median, NaN when empty.
    """
    return statistics.median(values) if values else math.nan


def _number(value: float, digits: int) -> str:
    if math.isnan(value):
        return "n/a"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def spread(values: Sequence[float], digits: int) -> str:
    """
    C{median (min..max)} over repetitions, or just the value for one.
    """
    if not values:
        return "n/a"
    middle = _number(median(values), digits)
    low, high = min(values), max(values)
    if len(values) == 1 or _number(low, digits) == _number(high, digits):
        return middle
    return f"{middle} ({_number(low, digits)}..{_number(high, digits)})"


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """
    median(numerator) / median(denominator); NaN if either is missing or 0.
    """
    top, bottom = median(numerator), median(denominator)
    if math.isnan(top) or math.isnan(bottom) or bottom == 0:
        return math.nan
    return top / bottom


@define
class Row:
    """
    One measured quantity, DIRECT against PROXY, one sample per repetition.

    @ivar difference: show PROXY - DIRECT (for latencies: the overhead).
    @ivar naive: the same through the naive reference proxy, where measured.
    """

    part: str
    metric: str
    unit: str
    direct: list[float] = field(factory=list)
    proxy: list[float] = field(factory=list)
    digits: int = 1
    difference: bool = False
    naive: list[float] = field(factory=list)

    def overhead(self) -> float:
        """
        median(PROXY) - median(DIRECT), NaN if either is missing.
        """
        return median(self.proxy) - median(self.direct)


@define
class FeatureRow:
    """
    Part (e): one proxy configuration's throughput at concurrency 16.

    @ivar paired: requests/s with the feature over requests/s of the
        baseline run next to it, one per pair.
    @ivar paired_cpu: baseline CPU per request over the feature's, per pair.
    """

    variant: str
    samples: list[float] = field(factory=list)
    cpu_us: list[float] = field(factory=list)
    paired: list[float] = field(factory=list)
    paired_cpu: list[float] = field(factory=list)


@define
class Budget:
    """
    One budget item from the benchmark issue, with what this run measured.
    """

    item: str
    target: str
    measured: float
    unit: str
    met: bool | None  # None: not measured
    digits: int = 2


def rows_table(rows: Sequence[Row]) -> list[str]:
    """
    The DIRECT/PROXY table as Markdown lines.
    """
    lines = [
        "| part | metric | DIRECT | PROXY | PROXY/DIRECT | PROXY-DIRECT |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        share = ratio(row.proxy, row.direct)
        difference = ""
        if row.difference:
            overhead = row.overhead()
            difference = "n/a" if math.isnan(overhead) else f"{overhead:+,.{row.digits}f}"
        lines.append(
            f"| {row.part} | {row.metric} ({row.unit}) | {spread(row.direct, row.digits)} | "
            f"{spread(row.proxy, row.digits)} | "
            f"{'n/a' if math.isnan(share) else f'{share:.2f}x'} | {difference} |"
        )
    return lines


def naive_table(rows: Sequence[Row]) -> list[str]:
    """
    The rows measured through the naive reference proxy too, as Markdown
    lines: DIRECT, naive, llmproxy, and llmproxy against naive (a ratio
    for throughput and CPU, the difference of the overheads for latency).
    Empty when no row has naive samples.
    """
    measured = [row for row in rows if row.naive]
    if not measured:
        return []
    lines = [
        "| part | metric | DIRECT | naive treq proxy | llmproxy | llmproxy vs naive |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in measured:
        if row.difference:
            gap = median(row.proxy) - median(row.naive)
            versus = "n/a" if math.isnan(gap) else f"{gap:+,.{row.digits}f} {row.unit}"
        else:
            share = ratio(row.proxy, row.naive)
            versus = "n/a" if math.isnan(share) else f"{share:.2f}x"
        lines.append(
            f"| {row.part} | {row.metric} ({row.unit}) | {spread(row.direct, row.digits)} | "
            f"{spread(row.naive, row.digits)} | {spread(row.proxy, row.digits)} | {versus} |"
        )
    return lines


def features_table(direct: Sequence[float], rows: Sequence[FeatureRow]) -> list[str]:
    """
    Part (e) as Markdown lines: requests/s per configuration, against the
    proxy baseline (the median of the ratios to the baseline run paired with
    each run) and against DIRECT, and CPU per request.
    """
    lines = [
        "| configuration (concurrency 16) | requests/s | vs proxy baseline (paired) "
        "| vs DIRECT | proxy CPU per request (µs) | CPU, baseline/with (paired) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| DIRECT | {spread(direct, 0)} | | 1.00x | | |",
    ]
    for index, row in enumerate(rows):
        versus = "1.00x" if index == 0 else _times(median(row.paired))
        cpu = "1.00x" if index == 0 else _times(median(row.paired_cpu))
        lines.append(
            f"| {row.variant} | {spread(row.samples, 0)} | {versus} | "
            f"{_times(ratio(row.samples, direct))} | {spread(row.cpu_us, 0)} | {cpu} |"
        )
    return lines


def _times(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def budget_table(items: Sequence[Budget]) -> list[str]:
    """
    The budget check as Markdown lines.
    """
    lines = ["| budget item | target | measured | met |", "|---|---|---:|---|"]
    for item in items:
        verdict = "not measured" if item.met is None else ("yes" if item.met else "**no**")
        measured = _number(item.measured, item.digits)
        lines.append(f"| {item.item} | {item.target} | {measured} {item.unit} | {verdict} |")
    return lines
