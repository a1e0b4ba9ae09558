# -*- test-case-name: llmproxy.test.test_budgets -*-
"""
Spend of the current day and month, read back from the cost records.

The memory spend store keeps nothing on disk of its own: every forwarded
request's cost is already in a cost record (C{timestamp}, C{key_id},
C{user_id}, C{total_cost}), so at start the store sums the records of the
current UTC day and month for the scopes it counts. Blocking: run it in a
thread, at start, never on the request path.

The sum is what the records say. A request whose cost is unknown (an
unpriced model, a response cut before its usage arrived) has a null
C{total_cost} and counts 0 here, though a running store counted its
reservation; a record still buffered when the process died is lost with
it (a clean stop flushes every record).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import orjson
from twisted.logger import Logger

from llmproxy.budgets.policy import period_id, usd_to_nanos

log = Logger()

_PREFIX = b'{"timestamp":"'


def spend_from_records(
    path: str, key_ids: Collection[str], users: Collection[str], now: float
) -> dict[tuple[str, str], tuple[str, int]]:
    """
    Sum C{total_cost} of the records in C{path} for the current day and
    month (UTC, at C{now}), per C{key:<id>} scope of C{key_ids} and per
    C{user:<user>} scope of C{users}.

    Lines that are not records (a torn last line, garbage) are skipped and
    counted in one warning. A missing file is no spend.

    @return: C{(scope, period) -> (period id, nano-USD)}.
    """
    day, month = period_id("day", now), period_id("month", now)
    day_prefix = _PREFIX + day.encode("ascii")
    month_prefix = _PREFIX + month.encode("ascii")
    totals: dict[tuple[str, str], tuple[str, int]] = {}
    skipped = 0

    def add(scope: str, nanos: int, today: bool) -> None:
        periods: Sequence[tuple[str, str]] = (("month", month), ("day", day))
        for period, pid in periods if today else periods[:1]:
            _, sum_so_far = totals.get((scope, period), (pid, 0))
            totals[(scope, period)] = (pid, sum_so_far + nanos)

    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return totals
    with stream:
        for line in stream:
            # Records start with their timestamp: most lines of a long file
            # are left behind without parsing.
            if not line.startswith(month_prefix):
                if not line.startswith(_PREFIX):
                    skipped += bool(line.strip())
                continue
            try:
                record = orjson.loads(line)
                cost = record["total_cost"]
                key_id, user = record["key_id"], record["user_id"]
            except (ValueError, KeyError, TypeError):
                skipped += 1
                continue
            if not isinstance(cost, int | float) or isinstance(cost, bool) or cost <= 0:
                continue
            nanos = usd_to_nanos(cost)
            today = line.startswith(day_prefix)
            if isinstance(key_id, str) and key_id in key_ids:
                add(f"key:{key_id}", nanos, today)
            if isinstance(user, str) and user in users:
                add(f"user:{user}", nanos, today)
    if skipped:
        log.warn(
            "{skipped} lines of {path} are not cost records; budget spend skips them",
            skipped=skipped,
            path=path,
        )
    return totals
