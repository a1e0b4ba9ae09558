"""
Rate limiting end to end with the memory backend (issue 5): the 429 as the
official SDKs and browsers see it, and token reservations reconciled to the
usage the provider reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import attrs
import openai
import orjson
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from llmproxy import identity
from llmproxy.config import Config, FeaturesConfig, Limits, RateLimitConfig
from llmproxy.ratelimit import LimitRequest, MemoryRateLimiter
from tests.e2e.harness import (
    ANTHROPIC_HEADERS,
    CHAT,
    CHAT_PATH,
    OPENAI_HEADERS,
    OPENAI_KEY,
    ProxyTestCase,
)

MESSAGES = (
    b'{"model":"claude-haiku-4-5","max_tokens":64,"stream":true,'
    b'"messages":[{"role":"user","content":"Say hi"}]}'
)


def with_limits(config: Config, limits: Limits) -> Config:
    return attrs.evolve(
        config,
        features=FeaturesConfig(rate_limiting=RateLimitConfig(enabled=True, limits=limits)),
    )


class LimitTestCase(ProxyTestCase):
    limits = Limits()

    def config(self, upstream_base: str) -> Config:
        return with_limits(super().config(upstream_base), self.limits)

    @property
    def limiter(self) -> MemoryRateLimiter:
        # (object, not IRateLimiter | None: mypy-zope thinks no implementer
        # can be in that union.)
        limiter: object = self.service._state.runtime.limiter
        assert isinstance(limiter, MemoryRateLimiter), limiter
        return limiter


class RequestsPerMinuteTests(LimitTestCase):
    timeout = 30
    limits = Limits(requests_per_minute=3)

    def in_thread(self, call: Callable[[], object]) -> Any:
        return deferToThread(call)

    @inlineCallbacks
    def test_fourth_request_is_limited(self) -> Any:
        """
        With C{requests_per_minute: 3}, three requests pass with
        C{X-RateLimit-Limit} / C{-Remaining}; the fourth is a 429 in the
        provider's error shape with every documented header and CORS; the official
        OpenAI and Anthropic SDKs raise C{RateLimitError} with our message.
        """
        for remaining in (2, 1, 0):
            status, headers, body = yield self.post(CHAT_PATH, OPENAI_HEADERS, CHAT)
            self.assertEqual(status, 200, body)
            self.assertEqual(headers[b"x-ratelimit-limit"], [b"3"])
            self.assertEqual(headers[b"x-ratelimit-remaining"], [b"%d" % remaining])
        self.assertEqual(len(self.fake.received), 3)

        origin = b"https://app.example"
        status, headers, body = yield self.post(
            CHAT_PATH, {**OPENAI_HEADERS, b"origin": origin}, CHAT
        )
        self.assertEqual(status, 429, body)
        self.assertEqual(len(self.fake.received), 3, "a denied request is not forwarded")
        self.assertIn(headers[b"access-control-allow-origin"][0], (origin, b"*"))
        exposed = b",".join(headers.get(b"access-control-expose-headers", [])).lower()
        for name in (b"retry-after", b"x-ratelimit-limit", b"x-ratelimit-remaining"):
            self.assertIn(name, exposed)
        retry_after = int(headers[b"retry-after"][0])
        self.assertTrue(1 <= retry_after <= 61, retry_after)
        self.assertEqual(headers[b"x-ratelimit-limit"], [b"3"])
        self.assertEqual(headers[b"x-ratelimit-remaining"], [b"0"])
        reset = int(headers[b"x-ratelimit-reset"][0])
        self.assertTrue(1 <= reset <= 61, reset)
        self.assertEqual(headers[b"x-ratelimit-scope"], [b"global"])
        self.assertEqual(headers[b"x-ratelimit-metric"], [b"requests"])
        self.assertEqual(headers[b"x-ratelimit-window"], [b"minute"])
        self.assertEqual(headers[b"x-llm-proxy-error-source"], [b"proxy"])
        error = orjson.loads(body)["error"]
        message = error["message"]
        self.assertLessEqual({"message", "type", "code"}, set(error))
        self.assertIn("Rate limit", message)
        # The seconds in "Retry after Ns." can tick down between requests.
        stable = message.rsplit(" Retry after", 1)[0]
        self.assertNotEqual(stable, message)

        openai_client = openai.OpenAI(
            base_url=self.proxy_url + "/openai/v1", api_key="sk-test-1", max_retries=0
        )
        self.addCleanup(openai_client.close)

        def openai_call() -> object:
            return openai_client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hi"}]
            )

        failure = yield self.assertFailure(self.in_thread(openai_call), openai.RateLimitError)
        self.assertEqual(failure.status_code, 429)
        self.assertIn(stable, str(failure))
        self.assertTrue(failure.body["message"].startswith(stable + " Retry after"))

        anthropic_client = anthropic.Anthropic(
            base_url=self.proxy_url + "/anthropic", api_key="sk-ant-test", max_retries=0
        )
        self.addCleanup(anthropic_client.close)

        def anthropic_call() -> object:
            return anthropic_client.messages.create(
                model="claude-haiku-4-5",
                max_tokens=64,
                messages=[{"role": "user", "content": "Say hi"}],
            )

        failure = yield self.assertFailure(self.in_thread(anthropic_call), anthropic.RateLimitError)
        self.assertEqual(failure.status_code, 429)
        self.assertIn(stable, str(failure))
        self.assertEqual(failure.body["type"], "error")
        self.assertTrue(failure.body["error"]["message"].startswith(stable + " Retry after"))
        self.assertEqual(len(self.fake.received), 3)


class TokenReconciliationTests(LimitTestCase):
    timeout = 30
    limits = Limits(tokens_per_minute=100_000)

    def used_tokens(self, model: str, key: bytes) -> int:
        """
        The tokens counted against the scopes of a request for C{model} with
        C{key}, read by probing the limiter with a zero-token request (whose
        request slot is then released).
        """
        probe = LimitRequest(
            provider="openai",
            model=model,
            key_id=identity.key_id(key),
            user=None,
            estimated_tokens=0,
        )
        decision = self.limiter.reserve_now(probe)
        self.assertTrue(decision.allowed)
        assert decision.reservation is not None and decision.remaining is not None
        self.limiter.release(decision.reservation)
        return 100_000 - decision.remaining

    @inlineCallbacks
    def test_reservation_follows_reported_usage(self) -> Any:
        """
        A request first reserves its estimate (visible in
        C{X-RateLimit-Remaining}); once the response is over, the limiter
        holds the real input + output tokens instead. An upstream 5xx gives
        the estimate back (providers do not bill errors).
        """
        # OpenAI counts prompt text: "Say hi" is 6 characters, 2 tokens at 4
        # characters per token.
        estimate = 2
        status, headers, body = yield self.post(
            CHAT_PATH,
            {
                **OPENAI_HEADERS,
                b"x-fake-input-tokens": b"1234",
                b"x-fake-output-tokens": b"56",
            },
            CHAT,
        )
        self.assertEqual(status, 200, body)
        self.assertEqual(headers[b"x-ratelimit-limit"], [b"100000"])
        self.assertEqual(headers[b"x-ratelimit-remaining"], [b"%d" % (100_000 - estimate)])
        key_id = identity.key_id(OPENAI_KEY)
        self.assertEqual(
            {scope for window, scope in self.limiter.scopes() if window == "minute"},
            {"global", "provider:openai", "model:gpt-4o-mini", f"key:{key_id}"},
        )
        self.assertEqual(self.used_tokens("gpt-4o-mini", OPENAI_KEY), 1234 + 56)

        status, headers, body = yield self.post(
            CHAT_PATH, {**OPENAI_HEADERS, b"x-fake-status": b"500"}, CHAT
        )
        self.assertEqual(status, 500, body)
        self.assertEqual(self.used_tokens("gpt-4o-mini", OPENAI_KEY), 1234 + 56)

        status, headers, body = yield self.post(
            b"/anthropic/v1/messages",
            {
                **ANTHROPIC_HEADERS,
                b"x-fake-input-tokens": b"700",
                b"x-fake-cached-tokens": b"300",
                b"x-fake-output-tokens": b"9",
            },
            MESSAGES,
        )
        self.assertEqual(status, 200, body)
        # Global scope: both providers' real usage (Anthropic input counts its
        # cache reads: 700 + 300, plus 9 output).
        probe = LimitRequest(
            provider="anthropic", model=None, key_id=None, user=None, estimated_tokens=0
        )
        decision = self.limiter.reserve_now(probe)
        assert decision.reservation is not None and decision.remaining is not None
        self.limiter.release(decision.reservation)
        self.assertEqual(100_000 - decision.remaining, 1234 + 56 + 1009)
