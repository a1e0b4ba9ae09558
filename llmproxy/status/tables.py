# -*- test-case-name: llmproxy.test.test_status_tables -*-
"""
Bounded tables for the status page: tokens and cost per provider, model,
key or user since the start of the UTC day, rate-limit use per scope, and
the spend of capped budgets.

Names come from clients (models, users, key ids), so each table holds at
most L{MAX_ROWS} of them: once full, every new name is counted in one
C{(other)} row, which keeps the totals exact and the memory fixed. The
budget table keeps its busiest rows instead (L{BudgetTable}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from llmproxy.budgets.policy import PERIODS, nanos_to_usd, period_id

MAX_ROWS = 1000
"""Distinct names a table keeps before folding new ones into C{(other)}."""

OTHER = "(other)"
NONE = "(none)"

# Indexes into a usage row.
REQUESTS, ERRORS, INPUT, OUTPUT, CACHE_READ, CACHE_WRITE, COST, UNPRICED = range(8)


class UsageTable:
    """
    Requests, errors, tokens and cost per name.
    """

    __slots__ = ("_cap", "rows")

    def __init__(self, cap: int = MAX_ROWS) -> None:
        self._cap = cap
        self.rows: dict[str, list[Any]] = {}

    def row(self, name: str | None) -> list[Any]:
        """
        The row to add to for C{name} (L{NONE} for none, L{OTHER} once full).
        """
        key = NONE if name is None else name
        found = self.rows.get(key)
        if found is None:
            if len(self.rows) >= self._cap:
                key = OTHER
                found = self.rows.get(key)
            if found is None:
                found = self.rows[key] = [0, 0, 0, 0, 0, 0, 0.0, 0]
        return found

    def clear(self) -> None:
        self.rows.clear()

    def absorb(self, rows: dict[str, list[Any]]) -> None:
        """
        Add another table's rows (its C{rows}, as JSON data).
        """
        for name, values in rows.items():
            row = self.row(name)
            for index, value in enumerate(values):
                row[index] += value

    def top(self, n: int) -> list[dict[str, Any]]:
        """
        The C{n} rows with the highest cost (then the most tokens), as JSON
        objects.
        """
        ranked = sorted(
            self.rows.items(),
            key=lambda item: (-item[1][COST], -(item[1][INPUT] + item[1][OUTPUT])),
        )
        return [usage_json(name, row) for name, row in ranked[:n]]

    def cache_top(self, n: int) -> list[dict[str, Any]]:
        """
        The C{n} rows that read the most input tokens, with the share of
        them served from the provider's prompt cache.
        """
        ranked = sorted(
            (item for item in self.rows.items() if item[1][INPUT] > 0),
            key=lambda item: -item[1][INPUT],
        )
        return [
            {
                "name": name,
                "input_tokens": row[INPUT],
                "cache_read_tokens": row[CACHE_READ],
                "cache_write_tokens": row[CACHE_WRITE],
                "hit_ratio": round(row[CACHE_READ] / row[INPUT], 4),
            }
            for name, row in ranked[:n]
        ]

    def totals(self) -> dict[str, Any]:
        return usage_json("total", _sum(self.rows.values()))


def _sum(rows: Iterable[list[Any]]) -> list[Any]:
    total: list[Any] = [0, 0, 0, 0, 0, 0, 0.0, 0]
    for row in rows:
        for index, value in enumerate(row):
            total[index] += value
    return total


def usage_json(name: str, row: list[Any]) -> dict[str, Any]:
    return {
        "name": name,
        "requests": row[REQUESTS],
        "errors": row[ERRORS],
        "input_tokens": row[INPUT],
        "output_tokens": row[OUTPUT],
        "cache_read_tokens": row[CACHE_READ],
        "cache_write_tokens": row[CACHE_WRITE],
        "cost_usd": round(row[COST], 10),
        "unpriced_requests": row[UNPRICED],
    }


class ScopeTable:
    """
    Per rate-limit scope (C{global}, C{provider:<name>}, C{model:<model>},
    C{key:<id>}, C{user:<user>}): requests and tokens this process counted
    in the current clock minute, and the requests the limiter refused today.
    """

    __slots__ = ("_cap", "_minute", "rows")

    def __init__(self, cap: int = MAX_ROWS) -> None:
        self._cap = cap
        self._minute = -1
        # scope -> [requests this minute, tokens this minute, denied today]
        self.rows: dict[str, list[int]] = {}

    def _row(self, scope: str) -> list[int]:
        found = self.rows.get(scope)
        if found is None:
            if len(self.rows) >= self._cap:
                scope = OTHER
                found = self.rows.get(scope)
            if found is None:
                found = self.rows[scope] = [0, 0, 0]
        return found

    def _turn(self, now: float) -> None:
        minute = int(now // 60)
        if minute != self._minute:
            self._minute = minute
            for row in self.rows.values():
                row[0] = row[1] = 0

    def used(self, now: float, scopes: Iterable[str], tokens: int) -> None:
        self._turn(now)
        for scope in scopes:
            row = self._row(scope)
            row[0] += 1
            row[1] += tokens

    def denied(self, now: float, scope: str) -> None:
        self._turn(now)
        self._row(scope)[2] += 1

    def export(self, now: float) -> dict[str, Any]:
        """
        The table as JSON data: its minute and its rows.
        """
        self._turn(now)
        return {"minute": self._minute, "rows": self.rows}

    def absorb(self, exported: dict[str, Any], now: float) -> None:
        """
        Add another table's export: its refusals today, and its use this
        minute if its minute is the current one.
        """
        self._turn(now)
        this_minute = exported["minute"] == self._minute
        for scope, (requests, tokens, denied) in exported["rows"].items():
            row = self._row(scope)
            if this_minute:
                row[0] += requests
                row[1] += tokens
            row[2] += denied

    def new_day(self) -> None:
        """
        Forget every scope: today's refusals start again from zero.
        """
        self.rows.clear()

    def busiest(
        self, now: float, n: int, limits_of: Callable[[str], tuple[int, int]]
    ) -> list[dict[str, Any]]:
        """
        The C{n} scopes nearest to (or over) a per-minute limit, then those
        refused most often today.

        @param limits_of: a scope's per-minute C{(requests, tokens)} limits,
            C{0} for none.
        """
        self._turn(now)
        ranked = []
        for scope, (requests, tokens, denied) in self.rows.items():
            request_limit, token_limit = limits_of(scope)
            use = max(
                requests / request_limit if request_limit else 0.0,
                tokens / token_limit if token_limit else 0.0,
            )
            ranked.append((use, denied, requests, scope, request_limit, token_limit, tokens))
        ranked.sort(key=lambda item: (-item[0], -item[1], -item[2]))
        return [
            {
                "scope": scope,
                "requests_this_minute": requests,
                "tokens_this_minute": tokens,
                "requests_per_minute_limit": request_limit,
                "tokens_per_minute_limit": token_limit,
                "use": round(use, 4),
                "denied_today": denied,
            }
            for use, denied, requests, scope, request_limit, token_limit, tokens in ranked[:n]
        ]


class BudgetTable:
    """
    The spend of each capped budget (a scope and a period, C{day} or
    C{month}) in the current UTC day and month, as settlements report it.

    A figure is the scope's whole spend in the period, not an increment
    (with a shared store, the spend of every instance or worker): the
    largest figure of a period is the freshest, so rows keep the largest,
    and tables of several processes merge by taking it too.

    Scopes come from the configuration, but a configuration may have many
    keys: once the table holds C{cap} rows, a new one first drops the less
    used half. A dropped scope loses nothing: its next settlement brings it
    back with its whole spend.
    """

    __slots__ = ("_cap", "_periods", "rows")

    def __init__(self, cap: int = MAX_ROWS) -> None:
        self._cap = cap
        # period -> its current id (2026-12-03, 2026-12): the newest seen
        self._periods = dict.fromkeys(PERIODS, "")
        # (scope, period) -> [spent, limit], nano-USD
        self.rows: dict[tuple[str, str], list[int]] = {}

    def _turn(self, now: float) -> dict[str, str]:
        """
        Move to the periods C{now} falls in when they are newer (forgetting
        the rows of the ended ones); C{now}'s periods.
        """
        periods = {period: period_id(period, now) for period in PERIODS}
        ended = [period for period, ident in periods.items() if ident > self._periods[period]]
        if ended:
            self._periods.update({period: periods[period] for period in ended})
            self.rows = {key: row for key, row in self.rows.items() if key[1] not in ended}
        return periods

    def _note(self, scope: str, period: str, spent: int, limit: int) -> None:
        key = (scope, period)
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= self._cap:
                self._prune()
            self.rows[key] = [spent, limit]
        elif spent >= row[0]:
            row[0], row[1] = spent, limit

    def _prune(self) -> None:
        ranked = sorted(self.rows.items(), key=_busier)
        self.rows = dict(ranked[: self._cap // 2])

    def spent(self, now: float, scope: str, period: str, spent: int, limit: int) -> None:
        """
        A settlement at C{now} left C{scope} at C{spent} of C{limit}
        (nano-USD) in C{period}. A figure of a period already over (an
        answer that arrived after midnight) is ignored.
        """
        periods = self._turn(now)
        if periods[period] == self._periods[period]:
            self._note(scope, period, spent, limit)

    def export(self, now: float) -> dict[str, Any]:
        """
        The table as JSON data: its periods and its rows.
        """
        self._turn(now)
        return {
            "periods": dict(self._periods),
            "rows": [[scope, period, *row] for (scope, period), row in self.rows.items()],
        }

    def absorb(self, exported: dict[str, Any], now: float) -> None:
        """
        Merge another table's export: for each budget of a current period,
        the largest spend.
        """
        self._turn(now)
        current = [p for p in PERIODS if exported["periods"].get(p) == self._periods[p]]
        for scope, period, spent, limit in exported["rows"]:
            if period in current:
                self._note(scope, period, spent, limit)

    def busiest(
        self, now: float, n: int, caps: Mapping[tuple[str, str], int] | None = None
    ) -> list[dict[str, Any]]:
        """
        The C{n} budgets with the largest share of their cap spent (a cap
        of 0 is all spent), then the largest spend.

        @param caps: the caps in force (nano-USD), when they may differ from
            what the last settlements knew (a reload): a budget not among
            them is no longer capped and is left out; by default, the caps
            the settlements reported.
        """
        self._turn(now)
        rows = self.rows.items()
        if caps is not None:
            rows = {key: [spent, caps[key]] for key, (spent, _) in rows if key in caps}.items()
        return [
            {
                "scope": scope,
                "period": period,
                "spent_usd": nanos_to_usd(spent),
                "limit_usd": nanos_to_usd(limit),
                "use": round(_share(spent, limit), 4),
            }
            for (scope, period), (spent, limit) in sorted(rows, key=_busier)[:n]
        ]


def _share(spent: int, limit: int) -> float:
    return spent / limit if limit else 1.0


def _busier(item: tuple[tuple[str, str], list[int]]) -> tuple[float, int, str, str]:
    (scope, period), (spent, limit) = item
    return (-_share(spent, limit), -spent, scope, period)
