"""
Tests for L{llmproxy.outcomes}: what an attempt's outcome means.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.outcomes import (
    Breaker,
    judge_failure,
    judge_response,
    pause_seconds,
    reset_seconds,
    retry_after,
)

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class JudgeTests(SynchronousTestCase):
    def test_statuses(self) -> None:
        cases = {
            200: (False, Breaker.SUCCESS),
            400: (False, Breaker.NEUTRAL),
            401: (False, Breaker.NEUTRAL),
            404: (False, Breaker.NEUTRAL),
            408: (True, Breaker.NEUTRAL),
            429: (True, Breaker.NEUTRAL),
            500: (True, Breaker.FAILURE),
            501: (False, Breaker.FAILURE),
            502: (True, Breaker.FAILURE),
            503: (True, Breaker.FAILURE),
            504: (True, Breaker.FAILURE),
            529: (True, Breaker.FAILURE),
        }
        for status, (retryable, breaker) in cases.items():
            verdict = judge_response(status, {}, NOW)
            self.assertEqual((verdict.retryable, verdict.breaker), (retryable, breaker), status)

    def test_pauses(self) -> None:
        """
        A 429, or a 503 with Retry-After, pauses the upstream without
        counting as a failure; Retry-After on other answers means nothing.
        """
        verdict = judge_response(503, {"retry-after": "7"}, NOW)
        self.assertEqual((verdict.breaker, verdict.pause_seconds), (Breaker.NEUTRAL, 7.0))
        self.assertEqual(judge_response(429, {"retry-after": "3"}, NOW).pause_seconds, 3.0)
        self.assertIsNone(judge_response(200, {"retry-after": "3"}, NOW).pause_seconds)
        limited = {
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:12Z",
        }
        self.assertEqual(judge_response(200, limited, NOW).pause_seconds, 12.0)

    def test_failures(self) -> None:
        for kind in ("connect", "tls", "connect_timeout"):
            self.assertEqual(judge_failure(kind).breaker, Breaker.UNREACHABLE)
            self.assertTrue(judge_failure(kind).retryable)
        self.assertEqual(judge_failure("first_byte_timeout").breaker, Breaker.FAILURE)
        self.assertFalse(judge_failure("total_timeout").retryable)


class HeaderTests(SynchronousTestCase):
    def test_retry_after(self) -> None:
        self.assertEqual(retry_after({"retry-after": "120"}, NOW), 120.0)
        self.assertEqual(retry_after({"retry-after": "Thu, 01 Jan 2026 00:00:30 GMT"}, NOW), 30.0)
        self.assertEqual(retry_after({"retry-after": "Wed, 31 Dec 2025 00:00:00 GMT"}, NOW), 0.0)
        for garbage in ("", "soon", "-1", "1.5e9x"):
            self.assertIsNone(retry_after({"retry-after": garbage}, NOW), garbage)
        self.assertIsNone(retry_after({}, NOW))

    def test_resets(self) -> None:
        self.assertEqual(reset_seconds("6m0s", NOW), 360.0)
        self.assertEqual(reset_seconds("1h2m3.5s", NOW), 3723.5)
        self.assertEqual(reset_seconds("120ms", NOW), 0.12)
        self.assertEqual(reset_seconds("2026-01-01T00:00:10Z", NOW), 10.0)
        for garbage in (None, "", "x", "m", "2026-13-45T00:00:00Z"):
            self.assertIsNone(reset_seconds(garbage, NOW), garbage)

    def test_pause_takes_the_longest_reset_at_zero(self) -> None:
        headers = {
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "2s",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "30s",
        }
        self.assertEqual(pause_seconds(headers, NOW), 30.0)
        headers["x-ratelimit-remaining-tokens"] = "5"
        self.assertEqual(pause_seconds(headers, NOW), 2.0)
        self.assertIsNone(pause_seconds({"x-ratelimit-remaining-requests": "3"}, NOW))
