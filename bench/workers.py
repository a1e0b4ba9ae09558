"""
Part (w) of C{make bench}: llmproxy with one worker and with two, in the same
run, with rate limiting (memory) and cost tracking on, so that the master's
part (every reservation is a round trip to it) is in the figures.

Three variants, each measured with wrk at concurrency 16 and 64, interleaved
and repeated:

  - C{1 worker}: the single process (no master), pinned like every proxy of
    the run, to the proxy core;
  - C{2 workers, 1 core}: master, two workers and the spare, all pinned to
    the proxy core: the same CPU as the single process, so its figures show
    what the group itself costs;
  - C{2 workers, 2 cores}: the same group pinned to both cores, the load
    side's included (a 2-core machine has no third one): what a second core
    brings when it is shared with nginx and wrk.

Reported: requests/s; CPU time per request of the whole group (the master,
every worker and the spare, from C{/proc}); the master's part of it; and
the share of the requests each worker received (from C{/health}).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from attrs import define, field

from bench.procs import cpu_seconds, http_request
from bench.stats import median, spread

if TYPE_CHECKING:
    from bench.run import Harness, Proxy

OVERLAYS = ("ratelimit-memory.yml", "cost.yml")
CONNECTIONS = (16, 64)


@define
class Variant:
    """
    One way of running the proxy, and what was measured through it.

    @ivar shares: per run at concurrency 16, the share of that run's
        requests each worker received.
    """

    name: str
    label: str
    workers: int
    both_cores: bool
    rps: dict[int, list[float]] = field(factory=lambda: {c: [] for c in CONNECTIONS})
    cpu_us: list[float] = field(factory=list)
    master_cpu_us: list[float] = field(factory=list)
    shares: list[list[float]] = field(factory=list)


VARIANTS = (
    ("w1", "1 worker", 1, False),
    ("w2-1core", "2 workers, 1 core", 2, False),
    ("w2-2cores", "2 workers, 2 cores", 2, True),
)


def group_pids(pid: int) -> list[int]:
    """
    C{pid} and its children (a master's workers and spare).
    """
    found = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def group_cpu(pid: int) -> tuple[float, float]:
    """
    CPU seconds used so far by the group of C{pid}, and by C{pid} alone.

    A worker that exited during the run would take its time with it; none
    is expected to.
    """
    pids = group_pids(pid)
    return sum(cpu_seconds(p) for p in pids), cpu_seconds(pid)


def worker_requests(port: int) -> list[int]:
    """
    The requests each worker has received, from C{/health} (empty for a
    single process).
    """
    status, body = http_request(port, "GET", "/health")
    if status != 200:
        return []
    return [worker["requests"] or 0 for worker in orjson.loads(body).get("workers", [])]


def part_w(h: Harness) -> list[Variant]:
    """
    Start the three variants, measure them (see the module docstring), stop
    them.
    """
    s = h.settings
    pin = h.pin
    both = f"{pin.load},{pin.proxy}" if pin.load is not None and pin.proxy is not None else None
    variants = [Variant(*spec) for spec in VARIANTS]
    running: list[tuple[Variant, Proxy]] = []
    for variant in variants:
        h.start_proxies(
            [(variant.name, OVERLAYS)],
            extra_args=["--workers", str(variant.workers)],
            cpus=both if variant.both_cores else None,
        )
        proxy = h.proxy(variant.name)
        if proxy is not None:
            running.append((variant, proxy))
    noise = len(h.interference)
    for _, proxy in running:
        h.wrk(proxy, 16, s.warmup_seconds)
    for rep in range(s.reps):
        for connections in CONNECTIONS:
            order = running if rep % 2 == 0 else list(reversed(running))
            for variant, proxy in order:
                _measure(h, variant, proxy, connections)
    # h.wrk counts the noise on the proxy core against the master alone.
    del h.interference[noise:]
    for variant in variants:
        h.stop_proxy(variant.name)
    return variants


def _measure(h: Harness, variant: Variant, proxy: Proxy, connections: int) -> None:
    before = worker_requests(proxy.port)
    cpu_before, master_before = group_cpu(proxy.process.pid)
    summary: dict[str, Any] | None = h.wrk(proxy, connections, h.settings.wrk_seconds)
    if summary is None:
        return
    cpu_after, master_after = group_cpu(proxy.process.pid)
    after = worker_requests(proxy.port)
    requests = summary["requests"]
    variant.rps[connections].append(summary["rps"])
    if connections != 16:
        return
    variant.cpu_us.append((cpu_after - cpu_before) / requests * 1e6)
    variant.master_cpu_us.append((master_after - master_before) / requests * 1e6)
    served = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(served)
    if len(served) == variant.workers and total > 0:
        variant.shares.append([count / total for count in served])


def _cell(values: Sequence[float], digits: int) -> str:
    return spread(values, digits) if values else "n/a"


def workers_table(variants: Sequence[Variant]) -> list[str]:
    """
    The part's table, one column per variant.
    """
    base = variants[0] if variants else None
    header = "| | " + " | ".join(v.label for v in variants) + " |"
    lines = [header, "|---|" + "---|" * len(variants)]
    for connections in CONNECTIONS:
        cells = []
        for variant in variants:
            cell = _cell(variant.rps[connections], 0)
            if base is not None and variant is not base and base.rps[connections]:
                gain = median(variant.rps[connections]) / median(base.rps[connections])
                if not math.isnan(gain):
                    cell += f" ({gain:.2f}x)"
            cells.append(cell)
        lines.append(f"| requests/s, concurrency {connections} | " + " | ".join(cells) + " |")
    lines.append(
        "| CPU time per request, whole group, concurrency 16 (µs) | "
        + " | ".join(_cell(v.cpu_us, 0) for v in variants)
        + " |"
    )
    lines.append(
        "| of which the master (µs) | "
        + " | ".join(_cell(v.master_cpu_us, 0) if v.workers > 1 else "-" for v in variants)
        + " |"
    )
    lines.append(
        "| requests each worker received, concurrency 16 | "
        + " | ".join(_shares(v) for v in variants)
        + " |"
    )
    return lines


def _shares(variant: Variant) -> str:
    if variant.workers == 1:
        return "100%"
    if not variant.shares:
        return "n/a"
    columns = zip(*variant.shares, strict=True)
    return " / ".join(f"{100 * median(list(column)):.0f}%" for column in columns)


def workers_section(h: Harness, variants: Sequence[Variant]) -> list[str]:
    """
    Part (w) as the report prints it.
    """
    pin = h.pin
    if pin.proxy is None:
        pinning = (
            "nothing is pinned on this machine, so the '1 core' and '2 cores' groups ran alike"
        )
    else:
        pinning = (
            f"'1 worker' and '2 workers, 1 core' ran on CPU {pin.proxy} (taskset), "
            f"'2 workers, 2 cores' on CPUs {pin.load},{pin.proxy}, sharing CPU {pin.load} "
            "with nginx, wrk and the upstream"
        )
    return [
        "Part (w), workers: rate limiting (memory) and cost tracking on; "
        f"{pinning}. Medians over repetitions; the ratio is to '1 worker'.",
        "",
        *workers_table(variants),
        "",
    ]
