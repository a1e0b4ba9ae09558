# -*- test-case-name: llmproxy.test.test_outcomes -*-
"""
What one upstream attempt's outcome means for the next: may the request be
tried again, does it count against the upstream's circuit, and must the
upstream be left alone for a while (its own rate limit said so).

Pure functions of the status, the failure and the response headers; no
HTTP server, no clock of its own.
"""

from __future__ import annotations

import email.utils
import enum
import re
from collections.abc import Mapping
from datetime import UTC, datetime

from attrs import frozen

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})
"""Statuses worth another try: the request may well succeed elsewhere or later."""

CONNECTION_FAILURES = frozenset({"connect", "tls", "connect_timeout"})
"""Failure kinds that say the upstream itself is unreachable, whatever the model."""


class Breaker(enum.Enum):
    """
    What an attempt tells the upstream's circuit breaker.
    """

    SUCCESS = "success"
    FAILURE = "failure"
    UNREACHABLE = "unreachable"
    """A connection failure: counts for every model of the upstream."""
    NEUTRAL = "neutral"
    """Says nothing about the upstream: a 4xx, a client that left, a failure
    after content reached the client."""


@frozen
class Verdict:
    """
    What an attempt's outcome means.

    @ivar retryable: another attempt may take its place.
    @ivar reason: a short label for metrics (C{connect}, C{status_503},
        C{stream_error}, ...).
    @ivar breaker: what it tells the circuit breaker.
    @ivar pause_seconds: the upstream asked to be left alone this long (its
        C{Retry-After}, or its own rate-limit headers at zero); L{None}.
    """

    retryable: bool
    reason: str
    breaker: Breaker
    pause_seconds: float | None = None


def judge_failure(kind: str) -> Verdict:
    """
    An attempt that got no response: C{kind} as L{llmproxy.attempt} names it.
    """
    if kind in CONNECTION_FAILURES:
        return Verdict(True, kind, Breaker.UNREACHABLE)
    # A total timeout leaves no time for another try.
    return Verdict(kind != "total_timeout", kind, Breaker.FAILURE)


def judge_response(status: int, headers: Mapping[str, str], now: float) -> Verdict:
    """
    An attempt that got a response with C{status} before anything reached
    the client.

    @param headers: response headers, lower-case name to first value.
    """
    pause = pause_seconds(headers, now, honour_retry_after=status in (429, 503))
    if status == 429:
        return Verdict(True, "status_429", Breaker.NEUTRAL, pause)
    if status == 503 and retry_after(headers, now) is not None:
        return Verdict(True, "status_503", Breaker.NEUTRAL, pause)
    if status in RETRY_STATUSES:
        breaker = Breaker.NEUTRAL if status < 500 else Breaker.FAILURE
        return Verdict(True, f"status_{status}", breaker, pause)
    if status >= 500:
        return Verdict(False, f"status_{status}", Breaker.FAILURE, pause)
    if status >= 400:
        return Verdict(False, f"status_{status}", Breaker.NEUTRAL, pause)
    return Verdict(False, "ok", Breaker.SUCCESS, pause)


STREAM_FAILED = Verdict(True, "stream_error", Breaker.FAILURE)
"""A stream that failed (an error event, a cut, silence) before its first
content event: nothing reached the client, so it can be tried again."""

FAILED_AFTER_CONTENT = Verdict(False, "after_content", Breaker.NEUTRAL)
"""A stream that failed after content reached the client: never retried, and
not held against the upstream (the client may have been the cause)."""

CLIENT_GONE = Verdict(False, "client_gone", Breaker.NEUTRAL)


def retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """
    C{Retry-After} in seconds (delta-seconds or an HTTP date), or L{None}.
    """
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(when.timestamp() - now, 0.0)


_RATE_REMAINING = (
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
    ("anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-reset"),
    ("anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset"),
    ("anthropic-ratelimit-input-tokens-remaining", "anthropic-ratelimit-input-tokens-reset"),
    ("anthropic-ratelimit-output-tokens-remaining", "anthropic-ratelimit-output-tokens-reset"),
)
"""The providers' own rate-limit headers: what is left, and when it resets."""

_DURATION = re.compile(
    r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?"
)


def pause_seconds(
    headers: Mapping[str, str], now: float, honour_retry_after: bool = True
) -> float | None:
    """
    How long the upstream asked to be left alone: its C{Retry-After} (which
    only a 429 or 503 means that way), or the longest reset among its own
    rate-limit headers that are at zero.
    """
    waits = []
    after = retry_after(headers, now) if honour_retry_after else None
    if after is not None:
        waits.append(after)
    for remaining, reset in _RATE_REMAINING:
        if headers.get(remaining, "").strip() == "0":
            wait = reset_seconds(headers.get(reset), now)
            if wait is not None:
                waits.append(wait)
    return max(waits) if waits else None


def reset_seconds(value: str | None, now: float) -> float | None:
    """
    A rate-limit reset: OpenAI's durations (C{1s}, C{6m0s}, C{120ms}) or
    Anthropic's RFC 3339 times, as seconds from C{now}.
    """
    if not value:
        return None
    value = value.strip()
    if "T" in value:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(when.timestamp() - now, 0.0)
    match = _DURATION.fullmatch(value)
    if match is None or not any(match.groups()):
        return None
    hours, minutes, seconds, millis = (float(part) if part else 0.0 for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000
