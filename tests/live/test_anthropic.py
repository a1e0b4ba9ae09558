"""
The C{anthropic} SDK against api.anthropic.com through a real proxy process
(C{make test-anthropic}); skipped without C{ANTHROPIC_API_KEY}.
"""

from __future__ import annotations

import os
from typing import Any

import anthropic
from twisted.internet.defer import Deferred

from tests.live.support import LiveTestCase, live_model

MODEL = live_model("anthropic", "claude-haiku-4-5")
BETA = os.environ.get("LLMPROXY_LIVE_ANTHROPIC_BETA", "").strip() or (
    "interleaved-thinking-2025-05-14"
)
MESSAGES: Any = [{"role": "user", "content": "Say hello in one word."}]
WEATHER_TOOL: Any = {
    "name": "weather",
    "description": "The weather forecast for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


class AnthropicLiveTests(LiveTestCase):
    key_variable = "ANTHROPIC_API_KEY"

    def client(self, api_key: str | None = None) -> anthropic.Anthropic:
        return anthropic.Anthropic(**self.sdk_options("/anthropic", api_key))

    def test_messages_create(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                message = c.messages.create(model=MODEL, max_tokens=20, messages=MESSAGES)
            self.assertEqual(message.content[0].type, "text")
            self.assertIn(message.stop_reason, ("end_turn", "max_tokens"))
            self.assertGreater(message.usage.input_tokens, 0)
            self.assertGreater(message.usage.output_tokens, 0)
            self.assertTrue(message._request_id)

        return self.in_thread(call)

    def test_messages_stream_final_usage(self) -> Deferred[None]:
        def call() -> None:
            with (
                self.client() as c,
                c.messages.stream(model=MODEL, max_tokens=20, messages=MESSAGES) as stream,
            ):
                text = "".join(stream.text_stream)
                final = stream.get_final_message()
            self.assertTrue(text)
            self.assertGreater(final.usage.input_tokens, 0)
            self.assertGreater(final.usage.output_tokens, 0)

        return self.in_thread(call)

    def test_tool_use(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                message = c.messages.create(
                    model=MODEL,
                    max_tokens=200,
                    messages=[{"role": "user", "content": "Weather in Paris?"}],
                    tools=[WEATHER_TOOL],
                    tool_choice={"type": "tool", "name": "weather"},
                )
            self.assertEqual(message.stop_reason, "tool_use")
            [block] = [b for b in message.content if b.type == "tool_use"]
            assert block.type == "tool_use"
            self.assertEqual(block.name, "weather")
            self.assertIsInstance(block.input, dict)

        return self.in_thread(call)

    def test_beta_header(self) -> Deferred[None]:
        """
        A beta call (the C{anthropic-beta} header) is accepted through the
        proxy.
        """

        def call() -> None:
            with self.client() as c:
                message = c.beta.messages.create(
                    model=MODEL, max_tokens=20, messages=MESSAGES, betas=[BETA]
                )
            self.assertEqual(message.content[0].type, "text")

        return self.in_thread(call)

    def test_models(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                names = [model.id for model in c.models.list()]
            self.assertTrue(names)

        return self.in_thread(call)

    def test_errors(self) -> Deferred[None]:
        """
        The API's own errors as the SDK's own classes; C{x-fake-status}
        matters only to the fake upstream, the real API rejects
        C{max_tokens=0} itself.
        """

        def call() -> None:
            with (
                self.client(api_key="invalid-key-for-llmproxy-tests") as c,
                self.assertRaises(anthropic.AuthenticationError) as denied,
            ):
                c.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
            self.assertEqual(denied.exception.status_code, 401)
            with self.client() as c, self.assertRaises(anthropic.BadRequestError) as bad:
                c.messages.create(
                    model=MODEL,
                    max_tokens=0,
                    messages=MESSAGES,
                    extra_headers={"x-fake-status": "400"},
                )
            self.assertTrue(bad.exception.message)

        return self.in_thread(call)
