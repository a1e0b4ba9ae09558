"""
Tests for L{llmproxy.testing.fake_upstream}: routes, shapes and every knob.

Most tests drive the fake's L{Site} in memory (a L{StringTransport} and a
L{Clock}) and read the raw bytes it wrote, so framing, timing, flow control
and connection handling are all visible.  A few use loopback TCP or the
standalone process.
"""

from __future__ import annotations

import base64
import os
import struct
import sys
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, cast

import orjson
import treq
from attrs import frozen
from twisted.internet.address import IPv4Address
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ClientFactory, ProcessProtocol, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

from llmproxy.testing.fake_upstream import (
    DEFAULT_CHUNKS,
    DEFAULT_INPUT_TOKENS,
    FakeUpstream,
    ReceivedRequest,
    fake_text,
    listen,
    text_pieces,
)
from llmproxy.testing.fake_upstream.responder import Responder

OPENAI_AUTH = [(b"Authorization", b"Bearer sk-test")]
ANTHROPIC_AUTH = [(b"x-api-key", b"sk-ant-test"), (b"anthropic-version", b"2023-06-01")]
GEMINI_AUTH = [(b"x-goog-api-key", b"AIza-test")]

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "hi"}],
}
CONTENTS = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
WEATHER_TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city"],
}
WEATHER_ARGUMENTS = {"city": "fake", "days": 1, "unit": "c"}


@frozen
class Response:
    """
    A response parsed from raw bytes.

    @ivar chunks: the body as it was framed (chunked) or the whole body.
    @ivar complete: whether the body ended properly (terminating chunk or
        full C{Content-Length}).
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    chunks: list[bytes]
    complete: bool

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def header(self, name: bytes) -> bytes | None:
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        return orjson.loads(self.body)


def parse_response(data: bytes) -> Response | None:
    """
    Parse one HTTP/1.1 response, or C{None} if the head is not all there.
    """
    head, separator, rest = data.partition(b"\r\n\r\n")
    if not separator:
        return None
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip()))
    response = Response(status, headers, [], False)
    if response.header(b"transfer-encoding") == b"chunked":
        chunks = []
        complete = False
        while True:
            size_line, found, after = rest.partition(b"\r\n")
            if not found:
                break
            size = int(size_line, 16)
            if size == 0:
                complete = after.startswith(b"\r\n")
                break
            if len(after) < size + 2:
                break
            chunks.append(after[:size])
            rest = after[size + 2 :]
        return Response(status, headers, chunks, complete)
    length = int(response.header(b"content-length") or b"0")
    body = rest[:length]
    return Response(status, headers, [body] if body else [], len(rest) >= length)


def sse_events(body: bytes, separator: bytes = b"\n\n") -> list[tuple[str | None, Any]]:
    """
    (event name, parsed data) for each SSE event in C{body}.
    """
    events: list[tuple[str | None, Any]] = []
    for block in body.split(separator):
        if not block.strip():
            continue
        name = None
        data = b""
        for line in block.replace(b"\r\n", b"\n").split(b"\n"):
            if line.startswith(b"event: "):
                name = line[len(b"event: ") :].decode()
            elif line.startswith(b"data: "):
                data = line[len(b"data: ") :]
        events.append((name, data.decode() if data == b"[DONE]" else orjson.loads(data)))
    return events


class SmallBufferTransport(StringTransport):
    """
    A transport that, like a TCP one, pauses its streaming producer when
    more than C{limit} bytes are waiting, and resumes it on L{drain}.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.waiting = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.waiting += len(data)
        if self.producer is not None and self.waiting > self.limit:
            self.producer.pauseProducing()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def drain(self) -> None:
        self.waiting = 0
        if self.producer is not None:
            self.producer.resumeProducing()


def fake_timers(clock: Clock) -> list[DelayedCall]:
    """
    The pending calls on C{clock} scheduled by the fake itself (not the
    HTTP channel's idle timeout).
    """
    return [
        call
        for call in cast(list[DelayedCall], clock.getDelayedCalls())
        if isinstance(getattr(call.func, "__self__", None), Responder)
    ]


class Connection:
    """
    One in-memory client connection to a fake's L{Site}.
    """

    def __init__(self, fake: FakeUpstream, transport: StringTransport | None = None) -> None:
        self.channel: HTTPChannel = fake.site().buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
        self.transport = transport or StringTransport()
        self.channel.makeConnection(self.transport)

    def send(
        self,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes | Any = b"",
    ) -> None:
        if not isinstance(body, bytes):
            body = orjson.dumps(body)
        lines = [method + b" " + target + b" HTTP/1.1", b"Host: upstream.test"]
        lines += [name + b": " + value for name, value in headers]
        if body or method == b"POST":
            lines.append(b"Content-Length: " + str(len(body)).encode())
        self.channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + body)

    @property
    def raw(self) -> bytes:
        value: bytes = self.transport.value()
        return value

    def response(self) -> Response:
        parsed = parse_response(self.raw)
        assert parsed is not None, f"no response head in {self.raw!r}"
        return parsed

    def lose(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


class FakeTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeUpstream(self.clock)

    def exchange(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes | Any = b"",
    ) -> Connection:
        connection = Connection(self.fake)
        connection.send(method, target, headers, body)
        return connection

    def post(
        self, target: bytes, body: Any, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> Response:
        return self.exchange(b"POST", target, headers, body).response()


class RecordingTests(FakeTestCase):
    def test_raw_request_is_recorded(self) -> None:
        """
        The raw target (percent-encoding intact), query, header lines as
        sent (case, order, duplicates) and body are recorded.
        """
        self.exchange(
            b"POST",
            b"/prefix/v1/files/a%2Fb%2e?x=1&y=%20",
            [(b"X-Dup", b"one"), (b"x-other", b"2"), (b"x-dup", b"two")],
            b"payload",
        )
        [received] = self.fake.received
        self.assertEqual(received.method, b"POST")
        self.assertEqual(received.uri, b"/prefix/v1/files/a%2Fb%2e?x=1&y=%20")
        self.assertEqual(received.path, b"/prefix/v1/files/a%2Fb%2e")
        self.assertEqual(received.query, b"x=1&y=%20")
        self.assertEqual(received.body, b"payload")
        self.assertEqual(
            received.headers,
            [
                (b"Host", b"upstream.test"),
                (b"X-Dup", b"one"),
                (b"x-other", b"2"),
                (b"x-dup", b"two"),
                (b"Content-Length", b"7"),
            ],
        )
        self.assertEqual(received.header_values("x-dup"), [b"one", b"two"])
        self.assertEqual(received.header(b"X-OTHER"), b"2")
        self.assertIsNone(received.header("absent"))

    def test_wait_for_request_hands_each_request_out_once(self) -> None:
        """
        Each request goes to exactly one waiter, in arrival order, whether
        the wait started before or after it arrived.
        """
        self.exchange(b"GET", b"/v1/models", OPENAI_AUTH)
        first = self.successResultOf(self.fake.wait_for_request())
        self.assertEqual(first.uri, b"/v1/models")
        waiting = self.fake.wait_for_request()
        self.assertNoResult(waiting)
        self.exchange(b"GET", b"/v1/models/gpt-4o", OPENAI_AUTH)
        self.assertEqual(self.successResultOf(waiting).uri, b"/v1/models/gpt-4o")

    def test_recording_can_be_turned_off(self) -> None:
        self.fake.record_requests = False
        waiting = self.fake.wait_for_request()
        response = self.exchange(b"GET", b"/v1/models", OPENAI_AUTH).response()
        self.assertEqual(response.status, 200)
        self.assertEqual(self.fake.received, [])
        self.assertNoResult(waiting)
        waiting.cancel()
        self.failureResultOf(waiting)

    def test_bare_resource_records_canonical_headers(self) -> None:
        """
        Mounted as a bare resource (here through treq's in-memory client), the
        fake still answers and records headers from Twisted's L{Headers}.
        """
        from treq.testing import StubTreq

        client: Any = StubTreq(self.fake.resource())
        response = self.successResultOf(
            client.post(
                "http://upstream.test/v1/chat/completions",
                data=orjson.dumps(CHAT),
                headers={"authorization": "Bearer sk", "x-fake-chunks": "2"},
            )
        )
        self.assertEqual(response.code, 200)
        body = orjson.loads(self.successResultOf(response.content()))
        self.assertEqual(body["choices"][0]["message"]["content"], fake_text(2))
        [received] = self.fake.received
        self.assertIn((b"Authorization", b"Bearer sk"), received.headers)


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

    def test_auth(self) -> None:
        missing = self.post(b"/v1/chat/completions", CHAT)
        self.assertEqual(missing.status, 401)
        self.assertEqual(missing.json()["error"]["type"], "invalid_request_error")
        wrong = self.post(b"/v1/chat/completions", CHAT, [(b"Authorization", b"Bearer invalid-x")])
        self.assertEqual(wrong.status, 401)
        self.assertEqual(wrong.json()["error"]["code"], "invalid_api_key")
        azure = self.post(b"/v1/chat/completions", CHAT, [(b"api-key", b"azure-key")])
        self.assertEqual(azure.status, 200)
        self.fake.require_auth = False
        self.assertEqual(self.post(b"/v1/chat/completions", CHAT).status, 200)

    def test_bad_bodies(self) -> None:
        broken = self.post(b"/v1/chat/completions", b"{not json", OPENAI_AUTH)
        self.assertEqual(broken.status, 400)
        no_model = self.post(b"/v1/chat/completions", {"messages": []}, OPENAI_AUTH)
        self.assertEqual(no_model.status, 400)
        self.assertIn("model", no_model.json()["error"]["message"])

    def test_prefix_and_unknown_routes(self) -> None:
        """
        Routes match the end of the path; anything else is an OpenAI-shaped
        404 naming the path.
        """
        prefixed = self.post(b"/deep/prefix/v1/chat/completions", CHAT, OPENAI_AUTH)
        self.assertEqual(prefixed.status, 200)
        unknown = self.post(b"/v1/nothing/here", {}, OPENAI_AUTH)
        self.assertEqual(unknown.status, 404)
        self.assertEqual(unknown.json()["error"]["message"], "Invalid URL (POST /v1/nothing/here)")
        wrong_method = self.exchange(b"GET", b"/v1/chat/completions", OPENAI_AUTH).response()
        self.assertEqual(wrong_method.status, 404)


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

    def test_auth_and_version(self) -> None:
        missing = self.post(b"/v1/messages", MESSAGES, [(b"anthropic-version", b"2023-06-01")])
        self.assertEqual(missing.status, 401)
        body = missing.json()
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], "authentication_error")
        self.assertTrue(missing.header(b"request-id"))
        bearer = self.post(
            b"/v1/messages",
            MESSAGES,
            [(b"Authorization", b"Bearer oauth"), (b"anthropic-version", b"2023-06-01")],
        )
        self.assertEqual(bearer.status, 200)
        no_version = self.post(b"/v1/messages", MESSAGES, [(b"x-api-key", b"k")])
        self.assertEqual(no_version.status, 400)
        self.assertIn("anthropic-version", no_version.json()["error"]["message"])
        wrong = self.post(
            b"/v1/messages", MESSAGES, [(b"x-api-key", b"invalid"), ANTHROPIC_AUTH[1]]
        )
        self.assertEqual(wrong.status, 401)

    def test_max_tokens_required(self) -> None:
        request = dict(MESSAGES)
        del request["max_tokens"]
        response = self.post(b"/v1/messages", request, ANTHROPIC_AUTH)
        self.assertEqual(response.status, 400)
        self.assertEqual(response.json()["error"]["type"], "invalid_request_error")

    def test_models_with_version_header(self) -> None:
        listing = self.exchange(b"GET", b"/v1/models", ANTHROPIC_AUTH).response().json()
        self.assertFalse(listing["has_more"])
        self.assertEqual(listing["data"][0]["type"], "model")


class GeminiTests(FakeTestCase):
    def test_generate_content(self) -> None:
        response = self.post(
            b"/v1beta/models/gemini-2.0-flash:generateContent",
            CONTENTS,
            [*GEMINI_AUTH, (b"x-fake-reasoning-tokens", b"6"), (b"x-fake-cached-tokens", b"4")],
        )
        self.assertEqual(response.header(b"content-type"), b"application/json; charset=UTF-8")
        body = response.json()
        candidate = body["candidates"][0]
        self.assertEqual(candidate["content"]["parts"], [{"text": fake_text()}])
        self.assertEqual(candidate["finishReason"], "STOP")
        self.assertEqual(body["modelVersion"], "gemini-2.0-flash")
        usage = body["usageMetadata"]
        self.assertEqual(usage["promptTokenCount"], DEFAULT_INPUT_TOKENS)
        self.assertEqual(usage["candidatesTokenCount"], DEFAULT_CHUNKS)
        self.assertEqual(usage["thoughtsTokenCount"], 6)
        self.assertEqual(usage["cachedContentTokenCount"], 4)
        self.assertEqual(usage["totalTokenCount"], DEFAULT_INPUT_TOKENS + DEFAULT_CHUNKS + 6)

    def test_stream_sse(self) -> None:
        """
        C{alt=sse}: C{data: ...\\r\\n\\r\\n} events, one per write; the last
        carries the finish reason and the full usage.
        """
        response = self.post(
            b"/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            CONTENTS,
            GEMINI_AUTH,
        )
        self.assertEqual(response.header(b"content-type"), b"text/event-stream")
        self.assertTrue(all(chunk.endswith(b"\r\n\r\n") for chunk in response.chunks))
        events = [d for _, d in sse_events(response.body, b"\r\n\r\n")]
        self.assertEqual(len(events), DEFAULT_CHUNKS)
        text = "".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in events)
        self.assertEqual(text, fake_text())
        self.assertNotIn("candidatesTokenCount", events[0]["usageMetadata"])
        self.assertEqual(events[-1]["usageMetadata"]["candidatesTokenCount"], DEFAULT_CHUNKS)
        self.assertEqual(events[-1]["candidates"][0]["finishReason"], "STOP")

    def test_stream_json_array(self) -> None:
        """
        Without C{alt=sse}: a JSON array, written element by element.
        """
        response = self.post(
            b"/v1beta/models/gemini-2.0-flash:streamGenerateContent", CONTENTS, GEMINI_AUTH
        )
        self.assertEqual(response.header(b"content-type"), b"application/json; charset=UTF-8")
        self.assertEqual(len(response.chunks), DEFAULT_CHUNKS + 1)
        self.assertTrue(response.chunks[0].startswith(b"["))
        items = response.json()
        self.assertEqual(len(items), DEFAULT_CHUNKS)
        self.assertEqual(items[-1]["candidates"][0]["finishReason"], "STOP")

    def test_function_call(self) -> None:
        tools = [{"functionDeclarations": [{"name": "weather", "parameters": WEATHER_TOOL_SCHEMA}]}]
        body = self.post(
            b"/v1beta/models/gemini-2.0-flash:generateContent",
            {**CONTENTS, "tools": tools},
            GEMINI_AUTH,
        ).json()
        [part] = body["candidates"][0]["content"]["parts"]
        self.assertEqual(part["functionCall"], {"name": "weather", "args": WEATHER_ARGUMENTS})

    def test_snake_case_fields(self) -> None:
        """
        google-genai sends some fields snake_case (the API takes both).
        """
        declaration = {"name": "weather", "parameters_json_schema": WEATHER_TOOL_SCHEMA}
        body = self.post(
            b"/v1beta/models/gemini-2.0-flash:generateContent",
            {**CONTENTS, "tools": [{"function_declarations": [declaration]}]},
            GEMINI_AUTH,
        ).json()
        [part] = body["candidates"][0]["content"]["parts"]
        self.assertEqual(part["functionCall"]["args"], WEATHER_ARGUMENTS)
        limited = self.post(
            b"/v1beta/models/gemini-2.0-flash:generateContent",
            {**CONTENTS, "generation_config": {"max_output_tokens": 1}},
            GEMINI_AUTH,
        ).json()
        self.assertEqual(limited["candidates"][0]["finishReason"], "MAX_TOKENS")

    def test_auth(self) -> None:
        target = b"/v1beta/models/gemini-2.0-flash:generateContent"
        missing = self.post(target, CONTENTS)
        self.assertEqual(missing.status, 403)
        self.assertEqual(missing.json()["error"]["status"], "PERMISSION_DENIED")
        wrong = self.post(target + b"?key=invalid", CONTENTS)
        self.assertEqual(wrong.status, 400)
        self.assertEqual(wrong.json()["error"]["status"], "INVALID_ARGUMENT")
        self.assertEqual(self.post(target + b"?key=good", CONTENTS).status, 200)

    def test_count_tokens_and_embeddings(self) -> None:
        count = self.post(
            b"/v1beta/models/gemini-2.0-flash:countTokens", CONTENTS, GEMINI_AUTH
        ).json()
        self.assertEqual(count["totalTokens"], DEFAULT_INPUT_TOKENS)
        one = self.post(
            b"/v1beta/models/gemini-embedding-001:embedContent",
            {"content": {"parts": [{"text": "a"}]}, "outputDimensionality": 3},
            GEMINI_AUTH,
        ).json()
        self.assertEqual(len(one["embedding"]["values"]), 3)
        batch = self.post(
            b"/v1beta/models/gemini-embedding-001:batchEmbedContents",
            {"requests": [{"content": {"parts": [{"text": "a"}]}}] * 2},
            GEMINI_AUTH,
        ).json()
        self.assertEqual(len(batch["embeddings"]), 2)

    def test_models(self) -> None:
        listing = self.exchange(b"GET", b"/v1beta/models", GEMINI_AUTH).response().json()
        self.assertIn("models/gemini-2.0-flash", [m["name"] for m in listing["models"]])
        one = self.exchange(b"GET", b"/v1beta/models/gemini-2.0-flash?key=k").response()
        self.assertEqual(one.json()["name"], "models/gemini-2.0-flash")
        missing = self.exchange(b"GET", b"/v1beta/models/nope", GEMINI_AUTH).response()
        self.assertEqual(missing.status, 404)
        self.assertEqual(missing.json()["error"]["status"], "NOT_FOUND")

    def test_percent_encoded_model(self) -> None:
        body = self.post(
            b"/v1beta/models/gemini%2D2.0-flash:generateContent", CONTENTS, GEMINI_AUTH
        ).json()
        self.assertEqual(body["modelVersion"], "gemini-2.0-flash")


class ErrorKnobTests(FakeTestCase):
    def test_status_in_each_provider_shape(self) -> None:
        openai = self.post(
            b"/v1/chat/completions",
            CHAT,
            [(b"x-fake-status", b"429"), (b"x-fake-retry-after", b"3")],
        )
        self.assertEqual(openai.status, 429)
        self.assertEqual(openai.header(b"retry-after"), b"3")
        self.assertEqual(set(openai.json()["error"]), {"message", "type", "param", "code"})
        self.assertEqual(openai.json()["error"]["code"], "rate_limit_exceeded")

        anthropic = self.post(
            b"/v1/messages",
            MESSAGES,
            [(b"x-fake-status", b"529"), (b"x-fake-error-message", b"busy")],
        )
        self.assertEqual(anthropic.status, 529)
        body = anthropic.json()
        self.assertEqual(body["error"], {"type": "overloaded_error", "message": "busy"})
        self.assertEqual(body["request_id"].encode(), anthropic.header(b"request-id"))

        gemini = self.post(
            b"/v1beta/models/m:generateContent", CONTENTS, [(b"x-fake-status", b"503")]
        )
        self.assertEqual(gemini.status, 503)
        self.assertEqual(
            gemini.json()["error"],
            {
                "code": 503,
                "message": "The service is temporarily overloaded.",
                "status": "UNAVAILABLE",
            },
        )

    def test_unknown_and_bad_knobs(self) -> None:
        typo = self.post(b"/v1/chat/completions", CHAT, [*OPENAI_AUTH, (b"x-fake-chunk", b"2")])
        self.assertEqual(typo.status, 400)
        self.assertIn("x-fake-chunk", typo.json()["error"]["message"])
        bad = self.post(b"/v1/messages", MESSAGES, [*ANTHROPIC_AUTH, (b"x-fake-hang", b"always")])
        self.assertEqual(bad.status, 400)
        self.assertIn("x-fake-hang", bad.json()["error"]["message"])

    def test_defaults_and_header_override(self) -> None:
        self.fake.defaults["x-fake-chunks"] = "5"
        self.fake.defaults["x-fake-model"] = "from-defaults"
        body = self.post(b"/v1/chat/completions", CHAT, OPENAI_AUTH).json()
        self.assertEqual(body["choices"][0]["message"]["content"], fake_text(5))
        self.assertEqual(body["model"], "from-defaults")
        body = self.post(
            b"/v1/chat/completions", CHAT, [*OPENAI_AUTH, (b"x-fake-chunks", b"1")]
        ).json()
        self.assertEqual(body["choices"][0]["message"]["content"], fake_text(1))

    def test_usage_omitted(self) -> None:
        off = [(b"x-fake-usage", b"0")]
        chat = self.post(b"/v1/chat/completions", CHAT, OPENAI_AUTH + off).json()
        self.assertNotIn("usage", chat)
        stream = self.post(
            b"/v1/chat/completions",
            {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
            OPENAI_AUTH + off,
        )
        self.assertTrue(
            all(d == "[DONE]" or d["usage"] is None for _, d in sse_events(stream.body))
        )
        gemini = self.post(b"/v1beta/models/m:generateContent", CONTENTS, GEMINI_AUTH + off)
        self.assertNotIn("usageMetadata", gemini.json())
        anthropic = self.post(b"/v1/messages", MESSAGES, ANTHROPIC_AUTH + off)
        self.assertNotIn("usage", anthropic.json())

    def test_cookies_and_extra_headers(self) -> None:
        response = self.post(
            b"/v1/chat/completions",
            CHAT,
            [
                *OPENAI_AUTH,
                (b"x-fake-set-cookie", b"a=1; Path=/"),
                (b"x-fake-set-cookie", b"b=2"),
                (b"x-fake-header", b"X-Extra: one"),
                (b"x-fake-header", b"X-Extra: two"),
                (b"x-fake-header", b"Keep-Alive: timeout=5"),
            ],
        )
        self.assertEqual(response.header_values(b"set-cookie"), [b"a=1; Path=/", b"b=2"])
        self.assertEqual(response.header_values(b"x-extra"), [b"one", b"two"])
        self.assertEqual(response.header(b"keep-alive"), b"timeout=5")

    def test_error_after(self) -> None:
        """
        Each provider's in-stream error event ends the response properly.
        """
        openai = self.post(
            b"/v1/chat/completions",
            {**CHAT, "stream": True},
            [*OPENAI_AUTH, (b"x-fake-error-after", b"2")],
        )
        self.assertTrue(openai.complete)
        events = sse_events(openai.body)
        self.assertEqual(len(events), 3)
        self.assertEqual(events[-1][1]["error"]["type"], "server_error")

        anthropic = self.post(
            b"/v1/messages",
            {**MESSAGES, "stream": True},
            [*ANTHROPIC_AUTH, (b"x-fake-error-after", b"1")],
        )
        name, data = sse_events(anthropic.body)[-1]
        self.assertEqual((name, data["error"]["type"]), ("error", "overloaded_error"))

        gemini = self.post(
            b"/v1beta/models/m:streamGenerateContent?alt=sse",
            CONTENTS,
            [*GEMINI_AUTH, (b"x-fake-error-after", b"1")],
        )
        events = sse_events(gemini.body, b"\r\n\r\n")
        self.assertEqual(events[-1][1]["error"]["status"], "INTERNAL")


class TimingTests(FakeTestCase):
    STREAM = {**CHAT, "stream": True}

    def test_delay_between_chunks(self) -> None:
        """
        The first chunk goes with the headers, the others one delay apart,
        and the end follows the last chunk at once.
        """
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-delay-ms", b"100"), (b"x-fake-chunks", b"2")],
            self.STREAM,
        )
        self.assertEqual(len(connection.response().chunks), 1)
        self.clock.advance(0.099)
        self.assertEqual(len(connection.response().chunks), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(connection.response().chunks), 2)
        self.clock.pump([0.1, 0.1, 0.099])
        self.assertFalse(connection.response().complete)
        self.clock.advance(0.001)
        response = connection.response()
        # role, 2 pieces, finish, [DONE] at 0, 0.1, 0.2, 0.3, 0.4; then the end.
        self.assertEqual(len(response.chunks), 5)
        self.assertTrue(response.complete)
        self.assertEqual(self.fake.active_responses, 0)
        self.assertEqual(fake_timers(self.clock), [])

    def test_headers_delay(self) -> None:
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-headers-delay-ms", b"2000")],
            CHAT,
        )
        self.assertEqual(connection.raw, b"")
        self.clock.advance(1.999)
        self.assertEqual(connection.raw, b"")
        self.clock.advance(0.001)
        self.assertEqual(connection.response().status, 200)

    def test_hang_headers_and_disconnect(self) -> None:
        """
        C{hang: headers} never answers; the client leaving is recorded with
        the clock time and handed to L{FakeUpstream.wait_for_disconnect}.
        """
        connection = self.exchange(
            b"POST", b"/v1/chat/completions", [*OPENAI_AUTH, (b"x-fake-hang", b"headers")], CHAT
        )
        waiting = self.fake.wait_for_disconnect()
        self.clock.advance(3600)
        self.assertEqual(connection.raw, b"")
        self.assertNoResult(waiting)
        self.assertEqual(self.fake.active_responses, 1)
        connection.lose()
        self.assertEqual(self.successResultOf(waiting), 3600.0)
        [event] = self.fake.connection_lost_events
        self.assertFalse(event.headers_sent)
        self.assertEqual(event.request.uri, b"/v1/chat/completions")
        self.assertEqual(self.fake.active_responses, 0)

    def test_hang_body(self) -> None:
        connection = self.exchange(
            b"POST", b"/v1/chat/completions", [*OPENAI_AUTH, (b"x-fake-hang", b"body")], CHAT
        )
        response = connection.response()
        self.assertEqual(response.status, 200)
        self.assertTrue(int(response.header(b"content-length") or b"0") > 0)
        self.assertEqual(response.chunks, [])
        self.assertFalse(response.complete)
        connection.lose()
        self.assertTrue(self.fake.connection_lost_events[0].headers_sent)

    def test_stall_after(self) -> None:
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-stall-after", b"2")],
            self.STREAM,
        )
        self.clock.advance(600)
        response = connection.response()
        self.assertEqual(len(response.chunks), 2)
        self.assertFalse(response.complete)
        self.assertFalse(connection.transport.disconnecting)

    def test_die_after(self) -> None:
        """
        N chunks, then the connection closes without a terminator; that is
        not counted as a client disconnect.
        """
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-die-after", b"3")],
            self.STREAM,
        )
        response = connection.response()
        self.assertEqual(len(response.chunks), 3)
        self.assertFalse(response.complete)
        self.assertTrue(connection.transport.disconnecting)
        connection.lose()
        self.assertEqual(self.fake.connection_lost_events, [])
        self.assertEqual(self.fake.active_responses, 0)

    def test_die_after_everything(self) -> None:
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-die-after", b"100")],
            self.STREAM,
        )
        response = connection.response()
        self.assertEqual(sse_events(response.body)[-1][1], "[DONE]")
        self.assertFalse(response.complete)
        self.assertTrue(connection.transport.disconnecting)

    def test_die_after_zero_on_json(self) -> None:
        connection = self.exchange(
            b"POST", b"/v1/chat/completions", [*OPENAI_AUTH, (b"x-fake-die-after", b"0")], CHAT
        )
        response = connection.response()
        self.assertTrue(int(response.header(b"content-length") or b"0") > 0)
        self.assertEqual(response.chunks, [])
        self.assertTrue(connection.transport.disconnecting)

    def test_die_after_with_delay(self) -> None:
        """
        With a delay, the connection dies when the next chunk would be due.
        """
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-die-after", b"1"), (b"x-fake-delay-ms", b"50")],
            self.STREAM,
        )
        self.assertFalse(connection.transport.disconnecting)
        self.clock.advance(0.05)
        self.assertTrue(connection.transport.disconnecting)

    def test_client_disconnect_mid_stream(self) -> None:
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-delay-ms", b"100"), (b"x-fake-chunks", b"50")],
            self.STREAM,
        )
        self.clock.pump([0.1, 0.1, 0.05])
        connection.lose()
        self.assertEqual(self.successResultOf(self.fake.wait_for_disconnect()), 0.25)
        [event] = self.fake.connection_lost_events
        self.assertEqual(event.chunks_sent, 3)
        self.assertTrue(event.headers_sent)
        self.assertEqual(fake_timers(self.clock), [], "no timer left behind")


class FlowControlTests(FakeTestCase):
    def test_full_buffer_pauses_writes(self) -> None:
        """
        A transport whose buffer fills pauses the response: nothing more is
        written until it resumes, and both are counted.
        """
        transport = SmallBufferTransport(limit=1)
        connection = Connection(self.fake, transport)
        connection.send(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-chunks", b"4")],
            {**CHAT, "stream": True},
        )
        self.assertEqual(self.fake.paused_count, 1)
        self.assertEqual(len(connection.response().chunks), 1)
        self.clock.advance(10)
        self.assertEqual(len(connection.response().chunks), 1)
        # role, 4 pieces, finish, [DONE]: one more per drain.
        for expected in range(2, 8):
            transport.drain()
            self.assertEqual(len(connection.response().chunks), expected)
        self.assertFalse(connection.response().complete)
        transport.drain()
        self.assertEqual(self.fake.resumed_count, 7)
        self.assertTrue(connection.response().complete)
        self.assertEqual(self.fake.active_responses, 0)

    def test_pause_during_delay(self) -> None:
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-delay-ms", b"10")],
            {**CHAT, "stream": True},
        )
        connection.channel.pauseProducing()
        self.clock.advance(1)
        self.assertEqual(len(connection.response().chunks), 1)
        connection.channel.resumeProducing()
        self.assertEqual(len(connection.response().chunks), 2)
        self.clock.pump([0.01] * 10)
        self.assertTrue(connection.response().complete)

    def test_bytes_filler(self) -> None:
        response = self.post(
            b"/v1/chat/completions",
            {**CHAT, "stream": True},
            [*OPENAI_AUTH, (b"x-fake-bytes", b"100000")],
        )
        self.assertTrue(response.complete)
        chunks = [d for _, d in sse_events(response.body)][:-1]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        self.assertGreaterEqual(len(text), 100000)
        self.assertLess(len(text), 100000 + 8192)
        self.assertEqual(self.fake.bytes_sent, len(response.body))
        self.assertEqual(self.fake.last_body_sent, response.body)

    def test_last_body_sent(self) -> None:
        """
        The body of the latest response, as written (gzip included), even
        mid-stream; nothing when recording is off.
        """
        self.assertEqual(self.fake.last_body_sent, b"")
        gzipped = self.post(
            b"/v1/chat/completions",
            CHAT,
            [*OPENAI_AUTH, (b"x-fake-gzip", b"1"), (b"Accept-Encoding", b"gzip")],
        )
        self.assertEqual(self.fake.last_body_sent, gzipped.body)
        streaming = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-delay-ms", b"10")],
            {**CHAT, "stream": True},
        )
        self.assertEqual(self.fake.last_body_sent, streaming.response().body)
        self.assertNotEqual(self.fake.last_body_sent, b"")
        self.fake.record_bodies = False
        self.post(b"/v1/chat/completions", CHAT, OPENAI_AUTH)
        self.assertEqual(self.fake.last_body_sent, b"")

    def test_gzip(self) -> None:
        """
        With C{x-fake-gzip} and an C{Accept-Encoding} that allows it, JSON
        and streams are gzip-encoded (streams chunk by chunk); otherwise not.
        """
        stream = {**CHAT, "stream": True}
        gzip_headers = [*OPENAI_AUTH, (b"x-fake-gzip", b"1"), (b"Accept-Encoding", b"gzip")]
        plain = self.post(b"/v1/chat/completions", stream, OPENAI_AUTH)
        # A fresh fake numbers its first request like this one did.
        self.fake = FakeUpstream(self.clock)
        encoded = self.post(b"/v1/chat/completions", stream, gzip_headers)
        self.assertEqual(encoded.header(b"content-encoding"), b"gzip")
        decoder = zlib.decompressobj(wbits=31)
        first = decoder.decompress(encoded.chunks[0])
        self.assertEqual(first, plain.chunks[0], "each chunk is flushed")
        rest = b"".join(decoder.decompress(c) for c in encoded.chunks[1:]) + decoder.flush()
        self.assertTrue(decoder.eof)
        self.assertEqual(first + rest, plain.body)

        json = self.post(b"/v1/chat/completions", CHAT, gzip_headers)
        self.assertEqual(json.header(b"content-length"), str(len(json.body)).encode())
        self.assertEqual(
            orjson.loads(zlib.decompress(json.body, wbits=31))["object"], "chat.completion"
        )

        refused = self.post(
            b"/v1/chat/completions",
            CHAT,
            [*OPENAI_AUTH, (b"x-fake-gzip", b"1"), (b"Accept-Encoding", b"gzip;q=0, identity")],
        )
        self.assertIsNone(refused.header(b"content-encoding"))
        self.assertEqual(refused.json()["object"], "chat.completion")


class TextTests(SynchronousTestCase):
    def test_pieces(self) -> None:
        self.assertEqual(text_pieces(3), ["Hello", " from", " the"])
        self.assertEqual(fake_text(7), "Hello from the fake upstream.Hello")
        self.assertEqual(fake_text(0), "")


class _SlowReader(Protocol):
    """
    Sends one request and then stops reading, like a stalled client.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.connected_deferred: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        self.connected_deferred.callback(None)


def _real_reactor() -> Any:
    """
    The global reactor, imported late: trial has installed it by the time a
    test runs.
    """
    from twisted.internet import reactor

    return reactor


class LoopbackTests(TestCase):
    """
    The fake over real TCP on the global reactor.
    """

    timeout = 30

    def setUp(self) -> None:
        self.reactor = _real_reactor()

    @inlineCallbacks
    def listen(self, fake: FakeUpstream) -> Any:
        port: IListeningPort = yield listen(fake, self.reactor)
        self.addCleanup(port.stopListening)
        return port.getHost().port  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_slow_client_pauses_the_fake(self) -> Any:
        """
        A client that stops reading makes the transport pause the fake's
        writes: C{paused_count} goes up and far less than the body is sent.
        """
        fake = FakeUpstream(self.reactor)
        port = yield self.listen(fake)
        body = orjson.dumps({**CHAT, "stream": True})
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b"x-fake-bytes: 52428800\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        reader = _SlowReader(request)
        factory = ClientFactory.forProtocol(lambda: reader)
        connector = self.reactor.connectTCP("127.0.0.1", port, factory)
        self.addCleanup(connector.disconnect)
        yield reader.connected_deferred
        while fake.paused_count == 0:
            yield deferLater(self.reactor, 0.01, lambda: None)
        self.assertLess(fake.bytes_sent, 52428800 // 4)
        connector.disconnect()
        lost_at = yield fake.wait_for_disconnect()
        self.assertGreater(lost_at, 0)

    @inlineCallbacks
    def test_treq_round_trip_and_clean_shutdown(self) -> Any:
        """
        A real HTTP client streams from the fake; C{stopListening} also drops
        a connection left open by a hanging response.
        """
        fake = FakeUpstream(self.reactor)
        port = yield self.listen(fake)
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        client = treq.client.HTTPClient(Agent(self.reactor, pool=pool))
        response = yield client.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=orjson.dumps({**CHAT, "stream": True}),
            headers=Headers({b"Authorization": [b"Bearer k"], b"x-fake-delay-ms": [b"5"]}),
        )
        body = yield response.content()
        self.assertEqual(sse_events(body)[-1][1], "[DONE]")
        hanging = client.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=orjson.dumps(CHAT),
            headers=Headers({b"Authorization": [b"Bearer k"], b"x-fake-hang": [b"headers"]}),
        )
        hanging.addErrback(lambda failure: None)
        received: ReceivedRequest = yield fake.wait_for_request()
        received = yield fake.wait_for_request()
        self.assertEqual(received.header(b"x-fake-hang"), b"headers")
        self.assertEqual(fake.active_responses, 1)


class _LineCatcher(ProcessProtocol):
    def __init__(self) -> None:
        self.first_line: Deferred[bytes] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.buffer = b""

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" in self.buffer and not self.first_line.called:
            self.first_line.callback(self.buffer.split(b"\n", 1)[0])

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


def _source_root() -> str:
    """
    The directory holding the C{llmproxy} package, for a child's
    C{PYTHONPATH} (trial runs tests from C{_trial_temp}).
    """
    import llmproxy

    return os.path.dirname(os.path.dirname(os.path.abspath(llmproxy.__file__)))


class StandaloneTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_standalone_prints_port_and_serves(self) -> Any:
        """
        C{python -m llmproxy.testing.fake_upstream --port 0} prints the port
        it bound and serves there, with C{--default} knobs applied.
        """
        reactor = _real_reactor()
        catcher = _LineCatcher()
        process = reactor.spawnProcess(
            catcher,
            sys.executable,
            [
                sys.executable,
                "-m",
                "llmproxy.testing.fake_upstream",
                "--port",
                "0",
                "--default",
                "x-fake-chunks=2",
                "--no-auth",
            ],
            env={**os.environ, "PYTHONPATH": _source_root()},
        )

        def stop() -> Deferred[None]:
            if process.pid is not None:
                process.signalProcess("TERM")
            return catcher.ended

        self.addCleanup(stop)
        line = yield catcher.first_line
        port = int(line)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        client = treq.client.HTTPClient(Agent(reactor, pool=pool))
        response = yield client.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=orjson.dumps(CHAT)
        )
        body = yield response.json()
        self.assertEqual(body["choices"][0]["message"]["content"], fake_text(2))
