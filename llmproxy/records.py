# -*- test-case-name: llmproxy.test.test_metering -*-
"""
The cost record: one JSON line per forwarded request, built by the
accounting phase and written by a cost sink (L{llmproxy.sinks}).
"""

from __future__ import annotations

import functools
import time

import attrs
import orjson
from attrs import frozen

from llmproxy.pricing import Cost
from llmproxy.usage import Usage


@frozen
class CostRecord:
    """
    One cost-tracking record: one JSON line per forwarded request.

    The attribute order is the JSON field order.
    """

    timestamp: str
    request_id: str
    provider: str
    model: str | None
    matched_model: str | None
    endpoint: str
    user_id: str | None
    key_id: str | None
    is_streaming: bool
    status: int
    complete: bool
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    total_tokens: int
    input_cost: float | None
    output_cost: float | None
    total_cost: float | None
    duration_ms: float
    ttfb_ms: float | None
    upstream: str | None
    attempts: int

    def to_json(self) -> bytes:
        """
        The record as one JSON object, without a trailing newline, keys in
        field order.
        """
        return orjson.dumps({name: getattr(self, name) for name in _RECORD_FIELDS})


_RECORD_FIELDS = tuple(field.name for field in attrs.fields(CostRecord))


@functools.lru_cache(maxsize=2)
def _utc_second(seconds: int) -> str:
    """
    One whole second as C{YYYY-MM-DDTHH:MM:SS}, remembered: records come
    many to a second, and C{strftime} was most of a timestamp's cost.
    """
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def rfc3339(now: float) -> str:
    """
    C{now} (POSIX seconds) as RFC 3339 in UTC with millisecond precision,
    e.g. C{2025-01-02T03:04:05.678Z}.
    """
    seconds, millis = divmod(int(now * 1000), 1000)
    return f"{_utc_second(seconds)}.{millis:03d}Z"


def make_record(
    *,
    now: float,
    request_id: str,
    provider: str,
    model: str | None,
    endpoint: str,
    user_id: str | None,
    key_id: str | None,
    is_streaming: bool,
    status: int,
    complete: bool,
    usage: Usage,
    cost: Cost,
    duration_ms: float,
    ttfb_ms: float | None,
    upstream: str | None = None,
    attempts: int = 1,
) -> CostRecord:
    """
    Build the record of one forwarded request.

    Durations are rounded to the microsecond (three decimals of a
    millisecond): finer digits are clock noise. Costs are not rounded.
    """
    return CostRecord(
        timestamp=rfc3339(now),
        request_id=request_id,
        provider=provider,
        model=model,
        matched_model=cost.matched_model,
        endpoint=endpoint,
        user_id=user_id,
        key_id=key_id,
        is_streaming=is_streaming,
        status=status,
        complete=complete,
        finish_reason=usage.finish_reason,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        total_tokens=usage.total_tokens,
        input_cost=cost.input_cost,
        output_cost=cost.output_cost,
        total_cost=cost.total_cost,
        duration_ms=round(duration_ms, 3),
        ttfb_ms=None if ttfb_ms is None else round(ttfb_ms, 3),
        upstream=upstream,
        attempts=attempts,
    )
