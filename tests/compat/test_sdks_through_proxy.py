"""
The official SDKs (C{openai}, C{anthropic}, C{google-genai}) with their base
URL pointed at the proxy, the proxy forwarding to the fake upstream.

Every scenario of L{tests.compat.scenarios} runs here as it does in
L{tests.compat.test_fake_vs_sdks}, which proves each shape parses when the
SDK talks to the fake directly, so a failure of a scenario in this module
is the proxy's: a header it dropped, a chunk it mangled, an error body the
SDK cannot read.  The tests written here are about what the proxy does
itself: its own headers, the usage it asks for, and the errors it makes
(413, 429, 502, 504), provoked by starting a second proxy with a changed
configuration in the test.

The proxy and the fake run in the reactor on loopback (L{ProxyTestCase}).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anthropic
import openai
import orjson
from google.genai import errors as genai_errors
from treq.content import content
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web.http_headers import Headers

from llmproxy.config import (
    Config,
    FeaturesConfig,
    Limits,
    RateLimitConfig,
    ServerConfig,
    Timeouts,
)
from llmproxy.testing.fake_upstream import fake_text
from tests.compat.scenarios import (
    ANTHROPIC_MODEL,
    GEMINI_MODEL,
    MESSAGES,
    OPENAI_MODEL,
    AnthropicScenarios,
    GeminiScenarios,
    OpenAIScenarios,
)
from tests.e2e.harness import ProxyTestCase, provider_configs, reactor

SMALL_BODY_LIMIT = 64
HANG = {"x-fake-hang": "headers"}


def response_text(answer: Any) -> str:
    """
    The text of a raw C{generateContent} answer (or stream chunk).
    """
    parts = answer["candidates"][0]["content"]["parts"]
    return "".join(part.get("text", "") for part in parts)


class _ThroughProxy(ProxyTestCase):
    """
    The proxy and fake of L{ProxyTestCase}, and ways to start a second proxy
    that refuses or fails on purpose.
    """

    def provider_url(self, provider: str) -> str:
        return f"{self.proxy_url}/{provider}"

    def restart_with(self, config: Config) -> None:
        """
        Start another proxy with C{config}; C{self.proxy_url} points at it.
        """
        self.start_proxy(config)

    def restart_with_small_body_limit(self) -> None:
        self.restart_with(self.with_config(server=ServerConfig(max_body_bytes=SMALL_BODY_LIMIT)))

    def restart_rate_limited(self) -> None:
        """
        One request per minute in the global scope: the second request is
        refused by the proxy.
        """
        limiting = RateLimitConfig(enabled=True, limits=Limits(requests_per_minute=1))
        self.restart_with(self.with_config(features=FeaturesConfig(rate_limiting=limiting)))

    def restart_with_short_first_byte_timeout(self) -> None:
        timeouts = Timeouts(connect_seconds=2, first_byte_seconds=0.3, idle_seconds=5)
        self.restart_with(self.with_config(providers=provider_configs(self.upstream_url, timeouts)))

    @inlineCallbacks
    def restart_unreachable(self) -> Any:
        """
        Every provider's C{base_url} names a loopback port nothing listens on.
        """
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Protocol)
        )
        closed = port.getHost().port
        yield port.stopListening()
        self.restart_with(
            self.with_config(providers=provider_configs(f"http://127.0.0.1:{closed}"))
        )

    def assert_rate_limit_headers(self, headers: Mapping[str, str]) -> None:
        """
        A proxy-made 429 names the exhausted limit and is readable from a
        browser (CORS).
        """
        self.assertEqual(headers["x-llm-proxy-error-source"], "proxy")
        self.assertEqual(headers["x-ratelimit-limit"], "1")
        self.assertEqual(headers["x-ratelimit-remaining"], "0")
        self.assertEqual(headers["x-ratelimit-scope"], "global")
        self.assertEqual(headers["x-ratelimit-window"], "minute")
        self.assertTrue(headers["x-ratelimit-reset"].isdigit())
        self.assertTrue(headers["retry-after"].isdigit())
        self.assertEqual(headers["access-control-allow-origin"], "*")
        self.assertIn("X-RateLimit-Remaining", headers["access-control-expose-headers"])

    def assert_proxy_error(
        self,
        error: openai.APIStatusError | anthropic.APIStatusError,
        status: int,
        message: str,
        source: str,
    ) -> None:
        """
        An error the proxy answered with itself: C{status}, a message that
        contains C{message}, and C{X-LLM-Proxy-Error-Source: source}
        (C{proxy} for a refusal, C{upstream} when the upstream failed).
        """
        self.assertEqual(error.status_code, status)
        self.assertIn(message, error.message)
        self.assertEqual(error.response.headers["x-llm-proxy-error-source"], source)

    def assert_forwarded_once(self) -> None:
        """
        The proxy refused the second request itself: only the first reached
        the fake.
        """
        self.assertEqual(len(self.fake.received), 1)


class OpenAITests(OpenAIScenarios, _ThroughProxy):
    def test_request_id_header(self) -> Deferred[None]:
        """
        The proxy names each request it forwards in C{X-LLM-Proxy-Request-Id}.
        """

        def call() -> None:
            with self.client() as c:
                raw = c.chat.completions.with_raw_response.create(
                    model=OPENAI_MODEL, messages=MESSAGES
                )
            self.assertTrue(raw.headers["x-llm-proxy-request-id"])

        return self.in_thread(call)

    def test_stream_without_usage_asks_upstream(self) -> Deferred[None]:
        """
        For a stream asked for without usage, the proxy asks the upstream
        for usage (and removes the usage-only chunk again, so the SDK sees
        the stream of L{OpenAIScenarios.test_chat_stream_without_usage}),
        and no (empty) C{Content-Encoding} reaches the client.
        """

        def call() -> None:
            with self.client() as c:
                raw = c.chat.completions.with_raw_response.create(
                    model=OPENAI_MODEL, messages=MESSAGES, stream=True
                )
                chunks = list(raw.parse())
            self.assertNotIn("content-encoding", raw.headers)
            # The usage-only chunk the proxy asked for is not passed on.
            self.assertTrue(all(chunk.choices for chunk in chunks), chunks[-1])

        def check(ignored: None) -> None:
            [received] = self.fake.received
            self.assertEqual(received.json()["stream_options"], {"include_usage": True})

        return self.in_thread(call).addCallback(check)

    def test_proxy_413(self) -> Deferred[None]:
        self.restart_with_small_body_limit()

        def call() -> None:
            with self.client() as c, self.assertRaises(openai.APIStatusError) as caught:
                c.chat.completions.create(
                    model=OPENAI_MODEL, messages=[{"role": "user", "content": "x" * 200}]
                )
            self.assert_proxy_error(
                caught.exception, 413, f"limit of {SMALL_BODY_LIMIT} bytes", "proxy"
            )
            self.assertEqual(self.fake.received, [])

        return self.in_thread(call)

    def test_proxy_429(self) -> Deferred[None]:
        self.restart_rate_limited()

        def call() -> None:
            with self.client() as c:
                c.models.list()
                with self.assertRaises(openai.RateLimitError) as caught:
                    c.chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES)
            self.assertIn("Rate limit exceeded", caught.exception.message)
            self.assert_rate_limit_headers(caught.exception.response.headers)
            self.assert_forwarded_once()

        return self.in_thread(call)

    @inlineCallbacks
    def test_proxy_502(self) -> Any:
        yield self.restart_unreachable()

        def call() -> None:
            with self.client() as c, self.assertRaises(openai.InternalServerError) as caught:
                c.chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES)
            self.assert_proxy_error(caught.exception, 502, "openai", "upstream")

        yield self.in_thread(call)

    def test_proxy_504(self) -> Deferred[None]:
        self.restart_with_short_first_byte_timeout()

        def call() -> None:
            with self.client(**HANG) as c, self.assertRaises(openai.InternalServerError) as caught:
                c.chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES)
            self.assert_proxy_error(
                caught.exception, 504, "no response headers in time", "upstream"
            )

        return self.in_thread(call)


class AnthropicTests(AnthropicScenarios, _ThroughProxy):
    def test_proxy_413(self) -> Deferred[None]:
        self.restart_with_small_body_limit()

        def call() -> None:
            with self.client() as c, self.assertRaises(anthropic.ContentTooLargeError) as caught:
                c.messages.create(model=ANTHROPIC_MODEL, max_tokens=10, messages=MESSAGES)
            self.assert_proxy_error(
                caught.exception, 413, f"limit of {SMALL_BODY_LIMIT} bytes", "proxy"
            )
            body: Any = caught.exception.body
            self.assertEqual(body["type"], "error")

        return self.in_thread(call)

    def test_proxy_429(self) -> Deferred[None]:
        self.restart_rate_limited()

        def call() -> None:
            with self.client() as c:
                c.messages.create(model=ANTHROPIC_MODEL, max_tokens=10, messages=MESSAGES)
                with self.assertRaises(anthropic.RateLimitError) as caught:
                    c.messages.create(model=ANTHROPIC_MODEL, max_tokens=10, messages=MESSAGES)
            self.assertIn("Rate limit exceeded", caught.exception.message)
            body: Any = caught.exception.body
            self.assertEqual(body["error"]["type"], "rate_limit_error")
            self.assert_rate_limit_headers(caught.exception.response.headers)
            self.assert_forwarded_once()

        return self.in_thread(call)

    @inlineCallbacks
    def test_proxy_502(self) -> Any:
        yield self.restart_unreachable()

        def call() -> None:
            with self.client() as c, self.assertRaises(anthropic.InternalServerError) as caught:
                c.messages.create(model=ANTHROPIC_MODEL, max_tokens=10, messages=MESSAGES)
            self.assert_proxy_error(caught.exception, 502, "anthropic", "upstream")

        yield self.in_thread(call)

    def test_proxy_504(self) -> Deferred[None]:
        self.restart_with_short_first_byte_timeout()

        def call() -> None:
            with (
                self.client(**HANG) as c,
                self.assertRaises(anthropic.GatewayTimeoutError) as caught,
            ):
                c.messages.create(model=ANTHROPIC_MODEL, max_tokens=10, messages=MESSAGES)
            self.assert_proxy_error(
                caught.exception, 504, "no response headers in time", "upstream"
            )

        return self.in_thread(call)


class GeminiTests(GeminiScenarios, _ThroughProxy):
    @inlineCallbacks
    def test_key_in_query(self) -> Any:
        """
        C{?key=} (the other way Gemini takes a key; the SDK only sends the
        header) reaches the upstream as sent, for JSON and for SSE.
        """
        base = f"{self.proxy_url}/gemini/v1beta/models/{GEMINI_MODEL}"
        body = orjson.dumps({"contents": [{"parts": [{"text": "hi"}]}]})
        headers = Headers({b"content-type": [b"application/json"]})
        response = yield self.http.post(
            f"{base}:generateContent?key=AIza-query", data=body, headers=headers
        )
        self.assertEqual(response.code, 200)
        answer = orjson.loads((yield content(response)))
        self.assertEqual(response_text(answer), fake_text())
        response = yield self.http.post(
            f"{base}:streamGenerateContent?alt=sse&key=AIza-query", data=body, headers=headers
        )
        self.assertEqual(response.code, 200)
        stream = yield content(response)
        texts = [
            response_text(orjson.loads(line[len(b"data: ") :]))
            for line in stream.splitlines()
            if line.startswith(b"data: ")
        ]
        self.assertEqual("".join(texts), fake_text())
        plain, streamed = self.fake.received
        self.assertEqual(plain.query, b"key=AIza-query")
        self.assertEqual(streamed.query, b"alt=sse&key=AIza-query")
        self.assertIsNone(plain.header("x-goog-api-key"))

    def test_proxy_413(self) -> Deferred[None]:
        self.restart_with_small_body_limit()

        def call() -> None:
            with self.client() as c, self.assertRaises(genai_errors.ClientError) as caught:
                c.models.generate_content(model=GEMINI_MODEL, contents="x" * 200)
            self.assertEqual(caught.exception.code, 413)
            self.assertIn(f"limit of {SMALL_BODY_LIMIT} bytes", caught.exception.message or "")

        return self.in_thread(call)

    def test_proxy_429(self) -> Deferred[None]:
        self.restart_rate_limited()

        def call() -> None:
            with self.client() as c:
                c.models.generate_content(model=GEMINI_MODEL, contents="hi")
                with self.assertRaises(genai_errors.ClientError) as caught:
                    c.models.generate_content(model=GEMINI_MODEL, contents="hi")
            self.assertEqual(caught.exception.code, 429)
            self.assertEqual(caught.exception.status, "RESOURCE_EXHAUSTED")
            self.assertIn("Rate limit exceeded", caught.exception.message or "")
            response: Any = caught.exception.response
            self.assert_rate_limit_headers(response.headers)
            self.assert_forwarded_once()

        return self.in_thread(call)

    @inlineCallbacks
    def test_proxy_502(self) -> Any:
        yield self.restart_unreachable()

        def call() -> None:
            with self.client() as c, self.assertRaises(genai_errors.ServerError) as caught:
                c.models.generate_content(model=GEMINI_MODEL, contents="hi")
            self.assertEqual(caught.exception.code, 502)
            self.assertIn("gemini", caught.exception.message or "")

        yield self.in_thread(call)

    def test_proxy_504(self) -> Deferred[None]:
        self.restart_with_short_first_byte_timeout()

        def call() -> None:
            with self.client(**HANG) as c, self.assertRaises(genai_errors.ServerError) as caught:
                c.models.generate_content(model=GEMINI_MODEL, contents="hi")
            self.assertEqual(caught.exception.code, 504)
            self.assertIn("no response headers in time", caught.exception.message or "")

        return self.in_thread(call)
