"""
The official SDKs, their own retries off, through a proxy whose first
upstream fails: every SDK scenario still sees plain answers, because the
proxy retries on the second upstream. And a stream that fails before its
first content event reaches each SDK as one clean stream.
"""

from __future__ import annotations

from typing import Any

import anthropic
import openai
from google.genai import types as genai_types
from twisted.internet.defer import Deferred, inlineCallbacks

from llmproxy.config import (
    CircuitBreakerConfig,
    Config,
    ProviderConfig,
    ServerConfig,
    Timeouts,
    UpstreamConfig,
)
from llmproxy.testing.fake_upstream import FakeUpstream, fake_text
from tests.compat.scenarios import (
    ANTHROPIC_MODEL,
    GEMINI_MODEL,
    MESSAGES,
    OPENAI_MODEL,
    AnthropicScenarios,
    GeminiScenarios,
    OpenAIScenarios,
)
from tests.e2e.harness import ProxyTestCase, reactor, serve_fake


class _TwoUpstreams(ProxyTestCase):
    """
    Each provider has upstream C{broken} (tried first) and C{good} (the
    fake the scenarios inspect, C{self.fake}).

    @ivar broken: the first upstream's fake; its C{defaults} say how it fails.
    """

    broken_defaults: dict[str, str] = {"x-fake-status": "503"}

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.broken = FakeUpstream(reactor)
        self.broken.defaults.update(self.broken_defaults)
        self.broken_url = yield serve_fake(self, self.broken)
        yield super().setUp()

    def config(self, upstream_base: str) -> Config:
        timeouts = Timeouts(connect_seconds=2, first_byte_seconds=5, idle_seconds=5)
        providers = {
            name: ProviderConfig(
                name=name,
                kind=name,
                base_url=self.broken_url,
                upstreams=(
                    UpstreamConfig(name="broken", base_url=self.broken_url),
                    UpstreamConfig(name="good", base_url=upstream_base, priority=1),
                ),
                timeouts=timeouts,
                # Every request meets the broken upstream first: never skip it.
                circuit_breaker=CircuitBreakerConfig(failures=1_000_000),
            )
            for name in ("openai", "anthropic", "gemini")
        }
        return Config(server=ServerConfig(max_body_bytes=16 * 1024 * 1024), providers=providers)

    def provider_url(self, provider: str) -> str:
        return f"{self.proxy_url}/{provider}"


class OpenAIThroughRetriesTests(OpenAIScenarios, _TwoUpstreams):
    pass


class AnthropicThroughRetriesTests(AnthropicScenarios, _TwoUpstreams):
    def test_error_mid_stream(self) -> Deferred[None]:
        """
        An error after content reached the client is the SDK's to see, as
        without retries. (The scenario's own error, after three events,
        comes before Anthropic's first content event: the proxy retries
        that one, and here every upstream fails.)
        """

        def call() -> None:
            with self.client(**{"x-fake-error-after": "6", "x-fake-chunks": "8"}) as c:
                stream = c.messages.create(
                    model=ANTHROPIC_MODEL, max_tokens=10, messages=MESSAGES, stream=True
                )
                with self.assertRaises(anthropic.APIStatusError) as caught:
                    list(stream)
            self.assertIn("Overloaded", caught.exception.message)
            self.assertEqual(len(self.fake.received), 1)

        return self.in_thread(call)


class GeminiThroughRetriesTests(GeminiScenarios, _TwoUpstreams):
    pass


class StreamGateTests(_TwoUpstreams):
    """
    The first upstream sends its provider's error event before any content:
    each SDK gets the second upstream's complete stream, and nothing of the
    first.
    """

    broken_defaults = {"x-fake-error-after": "0"}

    def check(self, text: str) -> None:
        self.assertEqual(text, fake_text())
        self.assertEqual(len(self.broken.received), 1)
        self.assertEqual(len(self.fake.received), 1)

    def test_openai_chat(self) -> Deferred[None]:
        def call() -> None:
            client = openai.OpenAI(
                api_key="sk-test", base_url=self.provider_url("openai") + "/v1", max_retries=0
            )
            stream = client.chat.completions.create(
                model=OPENAI_MODEL, messages=MESSAGES, stream=True
            )
            text = "".join(
                chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
            )
            self.check(text)

        return self.in_thread(call)

    def test_openai_responses(self) -> Deferred[None]:
        def call() -> None:
            client = openai.OpenAI(
                api_key="sk-test", base_url=self.provider_url("openai") + "/v1", max_retries=0
            )
            events = list(client.responses.create(model=OPENAI_MODEL, input="hi", stream=True))
            text = "".join(
                event.delta for event in events if event.type == "response.output_text.delta"
            )
            self.assertEqual(events[-1].type, "response.completed")
            self.check(text)

        return self.in_thread(call)

    def test_anthropic_messages(self) -> Deferred[None]:
        def call() -> None:
            client = anthropic.Anthropic(
                api_key="sk-ant-test", base_url=self.provider_url("anthropic"), max_retries=0
            )
            with client.messages.stream(
                model=ANTHROPIC_MODEL, max_tokens=100, messages=MESSAGES
            ) as stream:
                text = "".join(stream.text_stream)
                self.assertEqual(stream.get_final_message().stop_reason, "end_turn")
            self.check(text)

        return self.in_thread(call)

    def test_gemini_stream(self) -> Deferred[None]:
        def call() -> None:
            from google import genai

            client = genai.Client(
                api_key="AIza-test",
                http_options=genai_types.HttpOptions(
                    base_url=self.provider_url("gemini"), api_version="v1beta"
                ),
            )
            text = "".join(
                chunk.text or ""
                for chunk in client.models.generate_content_stream(
                    model=GEMINI_MODEL, contents="hi"
                )
            )
            self.check(text)

        return self.in_thread(call)

    def in_thread(self, function: Any) -> Deferred[None]:
        from twisted.internet.threads import deferToThread

        result: Deferred[None] = deferToThread(function)
        return result
