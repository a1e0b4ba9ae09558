"""
Tests for L{llmproxy.testing.fake_upstream.anthropic}: the Anthropic routes
and their shapes.
"""

from __future__ import annotations

import orjson

from llmproxy.test.test_fake_upstream import (
    ANTHROPIC_AUTH,
    MESSAGES,
    WEATHER_ARGUMENTS,
    WEATHER_TOOL_SCHEMA,
    FakeTestCase,
    sse_events,
)
from llmproxy.testing.fake_upstream import DEFAULT_CHUNKS, DEFAULT_INPUT_TOKENS, fake_text


class AnthropicTests(FakeTestCase):
    def test_messages_json(self) -> None:
        response = self.post(b"/v1/messages", MESSAGES, ANTHROPIC_AUTH)
        self.assertEqual(response.status, 200)
        self.assertTrue(response.header(b"request-id"))
        body = response.json()
        self.assertEqual((body["type"], body["role"]), ("message", "assistant"))
        self.assertEqual(body["content"], [{"type": "text", "text": fake_text()}])
        self.assertEqual(body["stop_reason"], "end_turn")
        self.assertEqual(body["usage"]["input_tokens"], DEFAULT_INPUT_TOKENS)
        self.assertEqual(body["usage"]["output_tokens"], DEFAULT_CHUNKS)

    def test_messages_stream(self) -> None:
        """
        The event sequence, C{output_tokens: 1} in C{message_start} and the
        cumulative totals in C{message_delta}.
        """
        response = self.post(
            b"/v1/messages",
            {**MESSAGES, "stream": True},
            [
                *ANTHROPIC_AUTH,
                (b"x-fake-cached-tokens", b"30"),
                (b"x-fake-cache-write-tokens", b"20"),
                (b"x-fake-reasoning-tokens", b"4"),
            ],
        )
        events = sse_events(response.body)
        self.assertEqual(
            [name for name, _ in events],
            [
                "message_start",
                "content_block_start",
                "ping",
                *["content_block_delta"] * DEFAULT_CHUNKS,
                "content_block_stop",
                "message_delta",
                "message_stop",
            ],
        )
        self.assertEqual([name for name, _ in events], [data["type"] for _, data in events])
        start = events[0][1]["message"]["usage"]
        self.assertEqual(
            (
                start["input_tokens"],
                start["cache_read_input_tokens"],
                start["cache_creation_input_tokens"],
                start["output_tokens"],
            ),
            (DEFAULT_INPUT_TOKENS, 30, 20, 1),
        )
        delta = events[-2][1]
        self.assertEqual(delta["delta"]["stop_reason"], "end_turn")
        self.assertEqual(delta["usage"]["output_tokens"], DEFAULT_CHUNKS + 4)
        self.assertEqual(delta["usage"]["output_tokens_details"], {"thinking_tokens": 4})
        text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
        self.assertEqual(text, fake_text())

    def test_tool_use(self) -> None:
        tools = [{"name": "weather", "input_schema": WEATHER_TOOL_SCHEMA}]
        body = self.post(b"/v1/messages", {**MESSAGES, "tools": tools}, ANTHROPIC_AUTH).json()
        self.assertEqual(body["stop_reason"], "tool_use")
        [block] = body["content"]
        self.assertEqual((block["type"], block["name"]), ("tool_use", "weather"))
        self.assertEqual(block["input"], WEATHER_ARGUMENTS)
        streamed = self.post(
            b"/v1/messages", {**MESSAGES, "tools": tools, "stream": True}, ANTHROPIC_AUTH
        )
        events = sse_events(streamed.body)
        partial = "".join(
            d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"
        )
        self.assertEqual(orjson.loads(partial), WEATHER_ARGUMENTS)
        self.assertEqual(events[1][1]["content_block"]["type"], "tool_use")

    def test_count_tokens(self) -> None:
        body = self.post(
            b"/v1/messages/count_tokens",
            {"model": "claude-sonnet-4-5", "messages": []},
            [*ANTHROPIC_AUTH, (b"x-fake-input-tokens", b"42")],
        ).json()
        self.assertEqual(body, {"input_tokens": 42})

    def test_max_tokens_required(self) -> None:
        request = dict(MESSAGES)
        del request["max_tokens"]
        response = self.post(b"/v1/messages", request, ANTHROPIC_AUTH)
        self.assertEqual(response.status, 400)
        self.assertEqual(response.json()["error"]["type"], "invalid_request_error")
