"""
The official SDKs (C{openai}, C{anthropic}, C{google-genai}) with their base
URL pointed at the proxy, the proxy forwarding to the fake upstream.

C{tests.compat.test_fake_vs_sdks} proves each shape here parses when the SDK
talks to the fake directly, so a failure in this module is the proxy's: a
header it dropped, a chunk it mangled, an error body the SDK cannot read.

The proxy and the fake run in the reactor on loopback (L{ProxyTestCase});
each SDK call runs in a worker thread (the SDKs are synchronous) with
C{max_retries=0}, so 429 and 5xx answers come back at once.  Per-request
knobs for the fake (C{x-fake-*}) travel as C{extra_headers}, which the proxy
forwards like any other header.  Errors the proxy makes itself (413, 429,
502, 504) are provoked by starting a second proxy with a changed
configuration in the test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import anthropic
import openai
import orjson
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from treq.content import content
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.web.http_headers import Headers

from llmproxy.config import (
    Config,
    FeaturesConfig,
    Limits,
    RateLimitConfig,
    ServerConfig,
    Timeouts,
)
from llmproxy.testing.fake_upstream import DEFAULT_CHUNKS, DEFAULT_INPUT_TOKENS, fake_text
from tests.e2e.harness import ProxyTestCase, provider_configs, reactor

T = TypeVar("T")

WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER_ARGUMENTS = {"city": "fake", "days": 1}
UPSTREAM_ERRORS = ((400, "bad input"), (401, "who are you"), (429, "slow down"), (500, "it broke"))
SMALL_BODY_LIMIT = 64
SDK_TIMEOUT = 20.0
"""Seconds an SDK call may take: a hang fails the call instead of holding a thread."""
HANG = {"x-fake-hang": "headers"}


def knobs(status: int, message: str) -> dict[str, str]:
    """
    Headers that make the fake answer C{status} with C{message}.
    """
    return {"x-fake-status": str(status), "x-fake-error-message": message}


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

    timeout = 60

    def in_thread(self, function: Callable[[], T]) -> Deferred[T]:
        result: Deferred[T] = deferToThread(function)
        return result

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

    def assert_forwarded_once(self) -> None:
        """
        The proxy refused the second request itself: only the first reached
        the fake.
        """
        self.assertEqual(len(self.fake.received), 1)


class OpenAITests(_ThroughProxy):
    MESSAGES: Any = [{"role": "user", "content": "hi"}]

    def client(self, api_key: str = "sk-test") -> openai.OpenAI:
        return openai.OpenAI(
            api_key=api_key,
            base_url=f"{self.proxy_url}/openai/v1",
            max_retries=0,
            timeout=SDK_TIMEOUT,
        )

    def test_chat_json(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                raw = c.chat.completions.with_raw_response.create(
                    model="gpt-4o",
                    messages=self.MESSAGES,
                    extra_headers={"x-fake-cached-tokens": "4"},
                )
                completion = raw.parse()
            self.assertEqual(completion.choices[0].message.content, fake_text())
            self.assertEqual(completion.choices[0].finish_reason, "stop")
            usage = completion.usage
            assert usage is not None
            self.assertEqual(usage.prompt_tokens, DEFAULT_INPUT_TOKENS)
            assert usage.prompt_tokens_details is not None
            self.assertEqual(usage.prompt_tokens_details.cached_tokens, 4)
            self.assertTrue(completion._request_id)
            self.assertTrue(raw.headers["x-llm-proxy-request-id"])

        def check(ignored: None) -> None:
            [received] = self.fake.received
            self.assertEqual(received.path, b"/v1/chat/completions")
            self.assertEqual(received.header("authorization"), b"Bearer sk-test")

        return self.in_thread(call).addCallback(check)

    def test_chat_stream_without_include_usage(self) -> Deferred[None]:
        """
        The proxy asks the upstream for usage and removes the usage-only
        chunk it added, so the SDK sees exactly the stream it asked for:
        every chunk has a choice, none carries usage, the text is whole, and
        no (empty) C{Content-Encoding} reaches the client.
        """

        def call() -> None:
            with self.client() as c:
                raw = c.chat.completions.with_raw_response.create(
                    model="gpt-4o",
                    messages=self.MESSAGES,
                    stream=True,
                    extra_headers={"x-fake-chunks": "5"},
                )
                chunks = list(raw.parse())
            self.assertNotIn("content-encoding", raw.headers)
            self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
            self.assertTrue(all(chunk.choices for chunk in chunks), chunks[-1])
            self.assertTrue(all(chunk.usage is None for chunk in chunks))
            text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
            self.assertEqual(text, fake_text(5))
            self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")

        def check(ignored: None) -> None:
            [received] = self.fake.received
            self.assertEqual(received.json()["stream_options"], {"include_usage": True})

        return self.in_thread(call).addCallback(check)

    def test_chat_stream_with_include_usage(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                chunks = list(
                    c.chat.completions.create(
                        model="gpt-4o",
                        messages=self.MESSAGES,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                )
            last = chunks[-1]
            self.assertEqual(last.choices, [])
            assert last.usage is not None
            self.assertEqual(last.usage.prompt_tokens, DEFAULT_INPUT_TOKENS)
            self.assertEqual(last.usage.completion_tokens, DEFAULT_CHUNKS)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            self.assertEqual(text, fake_text())

        return self.in_thread(call)

    def test_chat_tool_call_stream_helper(self) -> Deferred[None]:
        tool: Any = {
            "type": "function",
            "function": {"name": "weather", "parameters": WEATHER_SCHEMA, "strict": True},
        }

        def call() -> None:
            with (
                self.client() as c,
                c.chat.completions.stream(
                    model="gpt-4o", messages=self.MESSAGES, tools=[tool]
                ) as stream,
            ):
                final = stream.get_final_completion()
            [tool_call] = final.choices[0].message.tool_calls or []
            self.assertEqual(tool_call.function.parsed_arguments, WEATHER_ARGUMENTS)
            self.assertEqual(final.choices[0].finish_reason, "tool_calls")

        return self.in_thread(call)

    def test_responses_json(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                response = c.responses.create(model="gpt-4o", input="hi")
            self.assertEqual(response.output_text, fake_text())
            self.assertEqual(response.status, "completed")
            assert response.usage is not None
            self.assertEqual(response.usage.input_tokens, DEFAULT_INPUT_TOKENS)

        return self.in_thread(call)

    def test_responses_stream(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                events = list(c.responses.create(model="gpt-4o", input="hi", stream=True))
                with c.responses.stream(model="gpt-4o", input="hi") as stream:
                    deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
                    final = stream.get_final_response()
            self.assertEqual(events[0].type, "response.created")
            self.assertEqual(events[-1].type, "response.completed")
            self.assertEqual([e.sequence_number for e in events], list(range(len(events))))
            self.assertEqual("".join(deltas), fake_text())
            self.assertEqual(final.output_text, fake_text())
            assert final.usage is not None
            self.assertEqual(final.usage.total_tokens, DEFAULT_INPUT_TOKENS + DEFAULT_CHUNKS)

        return self.in_thread(call)

    def test_embeddings(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                default = c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
                floats = c.embeddings.create(
                    model="text-embedding-3-small", input=["a", "b"], encoding_format="float"
                )
            self.assertEqual(len(default.data), 2)
            self.assertEqual(
                [d.embedding for d in default.data], [d.embedding for d in floats.data]
            )
            self.assertEqual(default.usage.prompt_tokens, DEFAULT_INPUT_TOKENS)

        return self.in_thread(call)

    def test_models(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                names = [model.id for model in c.models.list()]
                one = c.models.retrieve("gpt-4o")
            self.assertIn("gpt-4o", names)
            self.assertEqual(one.id, "gpt-4o")

        return self.in_thread(call)

    def test_upstream_errors(self) -> Deferred[None]:
        classes: dict[int, type[openai.APIStatusError]] = {
            400: openai.BadRequestError,
            401: openai.AuthenticationError,
            429: openai.RateLimitError,
            500: openai.InternalServerError,
        }

        def call() -> None:
            with self.client() as c:
                for status, message in UPSTREAM_ERRORS:
                    with self.assertRaises(classes[status]) as caught:
                        c.chat.completions.create(
                            model="gpt-4o",
                            messages=self.MESSAGES,
                            extra_headers=knobs(status, message),
                        )
                    self.assertEqual(caught.exception.status_code, status)
                    self.assertIn(message, caught.exception.message)
                    self.assertTrue(caught.exception.request_id)
                    self.assertNotIn("x-llm-proxy-error-source", caught.exception.response.headers)
            with self.client("invalid-key") as c, self.assertRaises(openai.AuthenticationError):
                c.models.list()

        return self.in_thread(call)

    def test_proxy_413(self) -> Deferred[None]:
        self.restart_with_small_body_limit()

        def call() -> None:
            with self.client() as c, self.assertRaises(openai.APIStatusError) as caught:
                c.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "x" * 200}]
                )
            self.assertEqual(caught.exception.status_code, 413)
            self.assertIn(f"limit of {SMALL_BODY_LIMIT} bytes", caught.exception.message)
            self.assertEqual(caught.exception.response.headers["x-llm-proxy-error-source"], "proxy")
            self.assertEqual(self.fake.received, [])

        return self.in_thread(call)

    def test_proxy_429(self) -> Deferred[None]:
        self.restart_rate_limited()

        def call() -> None:
            with self.client() as c:
                c.models.list()
                with self.assertRaises(openai.RateLimitError) as caught:
                    c.chat.completions.create(model="gpt-4o", messages=self.MESSAGES)
            self.assertIn("Rate limit exceeded", caught.exception.message)
            self.assert_rate_limit_headers(caught.exception.response.headers)
            self.assert_forwarded_once()

        return self.in_thread(call)

    @inlineCallbacks
    def test_proxy_502(self) -> Any:
        yield self.restart_unreachable()

        def call() -> None:
            with self.client() as c, self.assertRaises(openai.InternalServerError) as caught:
                c.chat.completions.create(model="gpt-4o", messages=self.MESSAGES)
            self.assertEqual(caught.exception.status_code, 502)
            self.assertIn("openai", caught.exception.message)
            self.assertEqual(
                caught.exception.response.headers["x-llm-proxy-error-source"], "upstream"
            )

        yield self.in_thread(call)

    def test_proxy_504(self) -> Deferred[None]:
        self.restart_with_short_first_byte_timeout()

        def call() -> None:
            with self.client() as c, self.assertRaises(openai.InternalServerError) as caught:
                c.chat.completions.create(
                    model="gpt-4o", messages=self.MESSAGES, extra_headers=HANG
                )
            self.assertEqual(caught.exception.status_code, 504)
            self.assertIn("no response headers in time", caught.exception.message)
            self.assertEqual(
                caught.exception.response.headers["x-llm-proxy-error-source"], "upstream"
            )

        return self.in_thread(call)


class AnthropicTests(_ThroughProxy):
    MESSAGES: Any = [{"role": "user", "content": "hi"}]
    MODEL = "claude-sonnet-4-5"

    def client(self, api_key: str = "sk-ant-test") -> anthropic.Anthropic:
        return anthropic.Anthropic(
            api_key=api_key,
            base_url=f"{self.proxy_url}/anthropic",
            max_retries=0,
            timeout=SDK_TIMEOUT,
        )

    def test_messages_create(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                message = c.messages.create(
                    model=self.MODEL,
                    max_tokens=100,
                    messages=self.MESSAGES,
                    extra_headers={"x-fake-cached-tokens": "30"},
                )
            [block] = message.content
            assert block.type == "text"
            self.assertEqual(block.text, fake_text())
            self.assertEqual(message.stop_reason, "end_turn")
            self.assertEqual(message.usage.input_tokens, DEFAULT_INPUT_TOKENS)
            self.assertEqual(message.usage.cache_read_input_tokens, 30)
            self.assertTrue(message._request_id)

        def check(ignored: None) -> None:
            [received] = self.fake.received
            self.assertEqual(received.path, b"/v1/messages")
            self.assertTrue(received.header("anthropic-version"))

        return self.in_thread(call).addCallback(check)

    def test_messages_stream_final_usage(self) -> Deferred[None]:
        """
        The stream helper accumulates the text and takes the final usage
        from C{message_delta}, through the proxy as directly.
        """

        def call() -> None:
            headers = {"x-fake-chunks": "5", "x-fake-cache-write-tokens": "20"}
            with (
                self.client() as c,
                c.messages.stream(
                    model=self.MODEL,
                    max_tokens=100,
                    messages=self.MESSAGES,
                    extra_headers=headers,
                ) as stream,
            ):
                text = "".join(stream.text_stream)
                final = stream.get_final_message()
            self.assertEqual(text, fake_text(5))
            self.assertEqual(final.stop_reason, "end_turn")
            self.assertEqual(final.usage.input_tokens, DEFAULT_INPUT_TOKENS)
            self.assertEqual(final.usage.output_tokens, 5)
            self.assertEqual(final.usage.cache_creation_input_tokens, 20)

        return self.in_thread(call)

    def test_tool_use(self) -> Deferred[None]:
        tools: Any = [{"name": "weather", "input_schema": WEATHER_SCHEMA}]

        def call() -> None:
            with self.client() as c:
                plain = c.messages.create(
                    model=self.MODEL, max_tokens=100, messages=self.MESSAGES, tools=tools
                )
                with c.messages.stream(
                    model=self.MODEL, max_tokens=100, messages=self.MESSAGES, tools=tools
                ) as stream:
                    final = stream.get_final_message()
            for message in (plain, final):
                self.assertEqual(message.stop_reason, "tool_use")
                [block] = message.content
                assert block.type == "tool_use"
                self.assertEqual(block.name, "weather")
                self.assertEqual(block.input, WEATHER_ARGUMENTS)

        return self.in_thread(call)

    def test_beta_header(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                message = c.beta.messages.create(
                    model=self.MODEL,
                    max_tokens=100,
                    messages=self.MESSAGES,
                    betas=["fake-feature-2025-01-01"],
                )
            self.assertEqual(message.content[0].type, "text")

        def check(ignored: None) -> None:
            received = self.fake.received[-1]
            self.assertEqual(received.header("anthropic-beta"), b"fake-feature-2025-01-01")
            self.assertEqual(received.header("authorization"), b"Bearer sk-ant-test")

        return self.in_thread(call).addCallback(check)

    def test_models(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                names = [model.id for model in c.models.list()]
            self.assertIn(self.MODEL, names)

        return self.in_thread(call)

    def test_upstream_errors(self) -> Deferred[None]:
        classes: dict[int, type[anthropic.APIStatusError]] = {
            400: anthropic.BadRequestError,
            401: anthropic.AuthenticationError,
            429: anthropic.RateLimitError,
            500: anthropic.InternalServerError,
        }

        def call() -> None:
            with self.client() as c:
                for status, message in UPSTREAM_ERRORS:
                    with self.assertRaises(classes[status]) as caught:
                        c.messages.create(
                            model=self.MODEL,
                            max_tokens=10,
                            messages=self.MESSAGES,
                            extra_headers=knobs(status, message),
                        )
                    self.assertEqual(caught.exception.status_code, status)
                    self.assertIn(message, caught.exception.message)
                    self.assertTrue(caught.exception.request_id)
            with self.client("invalid") as c, self.assertRaises(anthropic.AuthenticationError):
                c.messages.create(model=self.MODEL, max_tokens=10, messages=self.MESSAGES)

        return self.in_thread(call)

    def test_proxy_413(self) -> Deferred[None]:
        self.restart_with_small_body_limit()

        def call() -> None:
            with self.client() as c, self.assertRaises(anthropic.ContentTooLargeError) as caught:
                c.messages.create(model=self.MODEL, max_tokens=10, messages=self.MESSAGES)
            self.assertIn(f"limit of {SMALL_BODY_LIMIT} bytes", caught.exception.message)
            body: Any = caught.exception.body
            self.assertEqual(body["type"], "error")
            self.assertEqual(caught.exception.response.headers["x-llm-proxy-error-source"], "proxy")

        return self.in_thread(call)

    def test_proxy_429(self) -> Deferred[None]:
        self.restart_rate_limited()

        def call() -> None:
            with self.client() as c:
                c.messages.create(model=self.MODEL, max_tokens=10, messages=self.MESSAGES)
                with self.assertRaises(anthropic.RateLimitError) as caught:
                    c.messages.create(model=self.MODEL, max_tokens=10, messages=self.MESSAGES)
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
                c.messages.create(model=self.MODEL, max_tokens=10, messages=self.MESSAGES)
            self.assertEqual(caught.exception.status_code, 502)
            self.assertIn("anthropic", caught.exception.message)
            self.assertEqual(
                caught.exception.response.headers["x-llm-proxy-error-source"], "upstream"
            )

        yield self.in_thread(call)

    def test_proxy_504(self) -> Deferred[None]:
        self.restart_with_short_first_byte_timeout()

        def call() -> None:
            with self.client() as c, self.assertRaises(anthropic.GatewayTimeoutError) as caught:
                c.messages.create(
                    model=self.MODEL, max_tokens=10, messages=self.MESSAGES, extra_headers=HANG
                )
            self.assertIn("no response headers in time", caught.exception.message)

        return self.in_thread(call)


class GeminiTests(_ThroughProxy):
    MODEL = "gemini-2.5-flash"

    def client(self, api_key: str = "AIza-test", **headers: str) -> genai.Client:
        return genai.Client(
            api_key=api_key,
            http_options=genai_types.HttpOptions(
                base_url=f"{self.proxy_url}/gemini",
                api_version="v1beta",
                headers=headers or None,
                retry_options=None,
                timeout=int(SDK_TIMEOUT * 1000),
            ),
        )

    def test_generate_content(self) -> Deferred[None]:
        def call() -> None:
            with self.client(**{"x-fake-reasoning-tokens": "6"}) as c:
                response = c.models.generate_content(model=self.MODEL, contents="hi")
            self.assertEqual(response.text, fake_text())
            usage = response.usage_metadata
            assert usage is not None
            self.assertEqual(usage.prompt_token_count, DEFAULT_INPUT_TOKENS)
            self.assertEqual(usage.thoughts_token_count, 6)
            candidates = response.candidates or []
            self.assertEqual(candidates[0].finish_reason, genai_types.FinishReason.STOP)

        def check(ignored: None) -> None:
            [received] = self.fake.received
            self.assertEqual(received.path, b"/v1beta/models/gemini-2.5-flash:generateContent")
            self.assertEqual(received.header("x-goog-api-key"), b"AIza-test")

        return self.in_thread(call).addCallback(check)

    def test_generate_content_stream(self) -> Deferred[None]:
        def call() -> None:
            with self.client(**{"x-fake-chunks": "4"}) as c:
                chunks = list(c.models.generate_content_stream(model=self.MODEL, contents="hi"))
            self.assertEqual(len(chunks), 4)
            self.assertEqual("".join(chunk.text or "" for chunk in chunks), fake_text(4))
            usage = chunks[-1].usage_metadata
            assert usage is not None
            self.assertEqual(usage.total_token_count, DEFAULT_INPUT_TOKENS + 4)

        def check(ignored: None) -> None:
            [received] = self.fake.received
            self.assertEqual(received.query, b"alt=sse")
            self.assertEqual(received.header("x-goog-api-key"), b"AIza-test")

        return self.in_thread(call).addCallback(check)

    def test_function_call(self) -> Deferred[None]:
        declaration = genai_types.FunctionDeclaration(
            name="weather", parameters_json_schema=WEATHER_SCHEMA
        )
        config = genai_types.GenerateContentConfig(
            tools=[genai_types.Tool(function_declarations=[declaration])]
        )

        def call() -> None:
            with self.client() as c:
                response = c.models.generate_content(model=self.MODEL, contents="hi", config=config)
            [function_call] = response.function_calls or []
            self.assertEqual(function_call.name, "weather")
            self.assertEqual(function_call.args, WEATHER_ARGUMENTS)

        return self.in_thread(call)

    @inlineCallbacks
    def test_key_in_query(self) -> Any:
        """
        C{?key=} (the other way Gemini takes a key; the SDK only sends the
        header) reaches the upstream as sent, for JSON and for SSE.
        """
        base = f"{self.proxy_url}/gemini/v1beta/models/{self.MODEL}"
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

    def test_upstream_errors(self) -> Deferred[None]:
        def call() -> None:
            for status, message in UPSTREAM_ERRORS:
                expected = genai_errors.ServerError if status >= 500 else genai_errors.ClientError
                with self.client(**knobs(status, message)) as c:
                    with self.assertRaises(expected) as caught:
                        c.models.generate_content(model=self.MODEL, contents="hi")
                    self.assertEqual(caught.exception.code, status)
                    self.assertEqual(caught.exception.message, message)
                    with self.assertRaises(expected) as caught:
                        list(c.models.generate_content_stream(model=self.MODEL, contents="hi"))
                    self.assertEqual(caught.exception.code, status)
            with (
                self.client(api_key="invalid-key") as c,
                self.assertRaises(genai_errors.ClientError) as caught,
            ):
                c.models.generate_content(model=self.MODEL, contents="hi")
            self.assertEqual(caught.exception.status, "INVALID_ARGUMENT")

        return self.in_thread(call)

    def test_proxy_413(self) -> Deferred[None]:
        self.restart_with_small_body_limit()

        def call() -> None:
            with self.client() as c, self.assertRaises(genai_errors.ClientError) as caught:
                c.models.generate_content(model=self.MODEL, contents="x" * 200)
            self.assertEqual(caught.exception.code, 413)
            self.assertIn(f"limit of {SMALL_BODY_LIMIT} bytes", caught.exception.message or "")

        return self.in_thread(call)

    def test_proxy_429(self) -> Deferred[None]:
        self.restart_rate_limited()

        def call() -> None:
            with self.client() as c:
                c.models.generate_content(model=self.MODEL, contents="hi")
                with self.assertRaises(genai_errors.ClientError) as caught:
                    c.models.generate_content(model=self.MODEL, contents="hi")
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
                c.models.generate_content(model=self.MODEL, contents="hi")
            self.assertEqual(caught.exception.code, 502)
            self.assertIn("gemini", caught.exception.message or "")

        yield self.in_thread(call)

    def test_proxy_504(self) -> Deferred[None]:
        self.restart_with_short_first_byte_timeout()

        def call() -> None:
            with self.client(**HANG) as c, self.assertRaises(genai_errors.ServerError) as caught:
                c.models.generate_content(model=self.MODEL, contents="hi")
            self.assertEqual(caught.exception.code, 504)
            self.assertIn("no response headers in time", caught.exception.message or "")

        return self.in_thread(call)
