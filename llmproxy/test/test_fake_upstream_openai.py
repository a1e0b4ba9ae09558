"""
Tests for L{llmproxy.testing.fake_upstream.openai}: the OpenAI routes and
their shapes.
"""

from __future__ import annotations

import base64
import struct

import orjson

from llmproxy.test.test_fake_upstream import (
    CHAT,
    OPENAI_AUTH,
    WEATHER_ARGUMENTS,
    WEATHER_TOOL_SCHEMA,
    FakeTestCase,
    sse_events,
)
from llmproxy.testing.fake_upstream import DEFAULT_CHUNKS, DEFAULT_INPUT_TOKENS, fake_text


class OpenAITests(FakeTestCase):
    def test_chat_json(self) -> None:
        response = self.post(b"/v1/chat/completions", CHAT, OPENAI_AUTH)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"content-type"), b"application/json")
        self.assertTrue(response.header(b"x-request-id"))
        self.assertEqual(response.header(b"content-length"), str(len(response.body)).encode())
        body = response.json()
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(body["model"], "gpt-4o")
        choice = body["choices"][0]
        self.assertEqual(choice["message"]["content"], fake_text(DEFAULT_CHUNKS))
        self.assertEqual(choice["finish_reason"], "stop")
        self.assertEqual(body["usage"]["prompt_tokens"], DEFAULT_INPUT_TOKENS)
        self.assertEqual(body["usage"]["completion_tokens"], DEFAULT_CHUNKS)
        self.assertEqual(body["usage"]["total_tokens"], DEFAULT_INPUT_TOKENS + DEFAULT_CHUNKS)

    def test_chat_usage_knobs(self) -> None:
        response = self.post(
            b"/v1/chat/completions",
            CHAT,
            [
                *OPENAI_AUTH,
                (b"x-fake-input-tokens", b"100"),
                (b"x-fake-output-tokens", b"7"),
                (b"x-fake-reasoning-tokens", b"5"),
                (b"x-fake-cached-tokens", b"40"),
                (b"x-fake-model", b"gpt-4o-2024-08-06"),
            ],
        )
        body = response.json()
        self.assertEqual(body["model"], "gpt-4o-2024-08-06")
        usage = body["usage"]
        self.assertEqual(
            (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]),
            (100, 12, 112),
        )
        self.assertEqual(usage["prompt_tokens_details"]["cached_tokens"], 40)
        self.assertEqual(usage["completion_tokens_details"]["reasoning_tokens"], 5)

    def test_chat_stream_without_include_usage(self) -> None:
        """
        Without C{stream_options.include_usage}: no usage key, role delta
        first, a finish chunk, then C{[DONE]}.
        """
        response = self.post(b"/v1/chat/completions", {**CHAT, "stream": True}, OPENAI_AUTH)
        self.assertEqual(response.header(b"content-type"), b"text/event-stream; charset=utf-8")
        self.assertTrue(response.complete)
        events = [data for _, data in sse_events(response.body)]
        self.assertEqual(events[-1], "[DONE]")
        chunks = events[:-1]
        self.assertEqual(len(response.chunks), len(events), "one event per write")
        self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
        self.assertEqual(
            "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks),
            fake_text(DEFAULT_CHUNKS),
        )
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")
        self.assertTrue(all("usage" not in c for c in chunks))
        self.assertTrue(all(c["object"] == "chat.completion.chunk" for c in chunks))

    def test_chat_stream_with_include_usage(self) -> None:
        """
        With C{include_usage}: every chunk has C{"usage": null} except a last
        one with C{"choices": []} and the usage.
        """
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        response = self.post(b"/v1/chat/completions", body, OPENAI_AUTH)
        events = [data for _, data in sse_events(response.body)]
        self.assertEqual(events[-1], "[DONE]")
        *others, usage_chunk = events[:-1]
        self.assertTrue(all(c["usage"] is None for c in others))
        self.assertEqual(usage_chunk["choices"], [])
        self.assertEqual(usage_chunk["usage"]["completion_tokens"], DEFAULT_CHUNKS)

    def test_chat_tool_call(self) -> None:
        tools = [
            {"type": "function", "function": {"name": "weather", "parameters": WEATHER_TOOL_SCHEMA}}
        ]
        body = self.post(b"/v1/chat/completions", {**CHAT, "tools": tools}, OPENAI_AUTH).json()
        choice = body["choices"][0]
        self.assertEqual(choice["finish_reason"], "tool_calls")
        self.assertIsNone(choice["message"]["content"])
        [call] = choice["message"]["tool_calls"]
        self.assertEqual(call["function"]["name"], "weather")
        self.assertEqual(orjson.loads(call["function"]["arguments"]), WEATHER_ARGUMENTS)

        streamed = self.post(
            b"/v1/chat/completions", {**CHAT, "tools": tools, "stream": True}, OPENAI_AUTH
        )
        chunks = [d for _, d in sse_events(streamed.body)][:-1]
        calls = [c["choices"][0]["delta"].get("tool_calls") for c in chunks]
        self.assertEqual(calls[0][0]["function"]["name"], "weather")
        arguments = "".join(c[0]["function"]["arguments"] for c in calls if c)
        self.assertEqual(orjson.loads(arguments), WEATHER_ARGUMENTS)
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "tool_calls")

    def test_tool_choice_none_answers_text(self) -> None:
        tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
        body = self.post(
            b"/v1/chat/completions", {**CHAT, "tools": tools, "tool_choice": "none"}, OPENAI_AUTH
        ).json()
        self.assertEqual(body["choices"][0]["message"]["content"], fake_text())

    def test_max_tokens_truncates(self) -> None:
        body = self.post(
            b"/v1/chat/completions", {**CHAT, "max_completion_tokens": 2}, OPENAI_AUTH
        ).json()
        self.assertEqual(body["choices"][0]["message"]["content"], fake_text(2))
        self.assertEqual(body["choices"][0]["finish_reason"], "length")

    def test_completions(self) -> None:
        request = {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}
        body = self.post(b"/v1/completions", request, OPENAI_AUTH).json()
        self.assertEqual(body["object"], "text_completion")
        self.assertEqual(body["choices"][0]["text"], fake_text())
        self.assertEqual(body["usage"]["completion_tokens"], DEFAULT_CHUNKS)
        streamed = self.post(
            b"/v1/completions",
            {**request, "stream": True, "stream_options": {"include_usage": True}},
            OPENAI_AUTH,
        )
        events = [d for _, d in sse_events(streamed.body)]
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual("".join(e["choices"][0]["text"] for e in events[:-2]), fake_text())
        self.assertEqual(events[-3]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(events[-2]["usage"]["total_tokens"], DEFAULT_INPUT_TOKENS + DEFAULT_CHUNKS)

    def test_responses_json(self) -> None:
        body = self.post(
            b"/v1/responses",
            {"model": "gpt-4o", "input": "hi"},
            [*OPENAI_AUTH, (b"x-fake-reasoning-tokens", b"2"), (b"x-fake-cached-tokens", b"3")],
        ).json()
        self.assertEqual((body["object"], body["status"]), ("response", "completed"))
        [item] = body["output"]
        self.assertEqual(item["type"], "message")
        self.assertEqual(item["content"][0]["text"], fake_text())
        usage = body["usage"]
        self.assertEqual(usage["input_tokens"], DEFAULT_INPUT_TOKENS)
        self.assertEqual(usage["output_tokens"], DEFAULT_CHUNKS + 2)
        self.assertEqual(usage["output_tokens_details"]["reasoning_tokens"], 2)
        self.assertEqual(usage["input_tokens_details"]["cached_tokens"], 3)

    def test_responses_stream(self) -> None:
        """
        The typed event stream, in order, with increasing sequence numbers
        and the event name repeated in C{type}.
        """
        response = self.post(
            b"/v1/responses", {"model": "gpt-4o", "input": "hi", "stream": True}, OPENAI_AUTH
        )
        events = sse_events(response.body)
        names = [name for name, _ in events]
        self.assertEqual(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                *["response.output_text.delta"] * DEFAULT_CHUNKS,
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ],
        )
        self.assertEqual([data["type"] for _, data in events], names)
        self.assertEqual([data["sequence_number"] for _, data in events], list(range(len(events))))
        self.assertIsNone(events[0][1]["response"]["usage"])
        self.assertEqual(events[-1][1]["response"]["usage"]["output_tokens"], DEFAULT_CHUNKS)
        deltas = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
        self.assertEqual(deltas, fake_text())

    def test_responses_function_call_stream(self) -> None:
        tools = [{"type": "function", "name": "weather", "parameters": WEATHER_TOOL_SCHEMA}]
        response = self.post(
            b"/v1/responses",
            {"model": "gpt-4o", "input": "hi", "stream": True, "tools": tools},
            OPENAI_AUTH,
        )
        events = sse_events(response.body)
        deltas = "".join(
            d["delta"] for n, d in events if n == "response.function_call_arguments.delta"
        )
        self.assertEqual(orjson.loads(deltas), WEATHER_ARGUMENTS)
        final = events[-1][1]["response"]["output"][0]
        self.assertEqual((final["type"], final["name"]), ("function_call", "weather"))

    def test_embeddings(self) -> None:
        request = {"model": "text-embedding-3-small", "input": ["a", "b"], "dimensions": 4}
        floats = self.post(b"/v1/embeddings", request, OPENAI_AUTH).json()
        self.assertEqual([d["index"] for d in floats["data"]], [0, 1])
        self.assertEqual(len(floats["data"][0]["embedding"]), 4)
        encoded = self.post(
            b"/v1/embeddings", {**request, "encoding_format": "base64"}, OPENAI_AUTH
        ).json()
        for plain, packed in zip(floats["data"], encoded["data"], strict=True):
            decoded = list(struct.unpack("<4f", base64.b64decode(packed["embedding"])))
            self.assertEqual(decoded, plain["embedding"])
        self.assertEqual(floats["usage"]["prompt_tokens"], DEFAULT_INPUT_TOKENS)

    def test_models(self) -> None:
        listing = self.exchange(b"GET", b"/v1/models", OPENAI_AUTH).response().json()
        self.assertEqual(listing["object"], "list")
        self.assertIn("gpt-4o", [m["id"] for m in listing["data"]])
        one = self.exchange(b"GET", b"/v1/models/gpt-4o", OPENAI_AUTH).response().json()
        self.assertEqual((one["id"], one["object"]), ("gpt-4o", "model"))
        missing = self.exchange(b"GET", b"/v1/models/nope", OPENAI_AUTH).response()
        self.assertEqual(missing.status, 404)
        self.assertEqual(missing.json()["error"]["code"], "model_not_found")
