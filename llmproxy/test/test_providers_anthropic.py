"""
Tests for L{llmproxy.providers.anthropic}.
"""

from __future__ import annotations

import orjson
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.providers import Meter, RequestFacts
from llmproxy.providers.anthropic import AnthropicFormat
from llmproxy.usage import Usage

# ---------------------------------------------------------------------------
# Golden payloads.  Shaped after the Anthropic API reference
# (docs.anthropic.com: "Messages", "Streaming Messages", "Prompt caching",
# "Errors"), anthropic-version 2023-06-01 as served in 2025 (claude-sonnet-4
# era: cache_creation breakdown and service_tier in usage, message_delta
# usage that also repeats the input and cache fields).  Token counts are made
# up but consistent.

MESSAGE_JSON = b"""{
  "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
  "type": "message",
  "role": "assistant",
  "model": "claude-sonnet-4-20250514",
  "content": [{"type": "text", "text": "Hi! My name is Claude."}],
  "stop_reason": "end_turn",
  "stop_sequence": null,
  "usage": {
    "input_tokens": 21,
    "cache_creation_input_tokens": 188086,
    "cache_read_input_tokens": 0,
    "cache_creation": {"ephemeral_5m_input_tokens": 188086, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 393,
    "service_tier": "standard"
  }
}"""
MESSAGE_USAGE = Usage(
    model="claude-sonnet-4-20250514",
    input_tokens=21 + 188086,
    output_tokens=393,
    cache_write_tokens=188086,
    finish_reason="end_turn",
    upstream_request_id="req_011CSHoEeqs5C35K2UUqR7Fy",
    reported=True,
)

TOOL_USE_JSON = b"""{
  "id": "msg_01Aq9w938a90dw8q",
  "type": "message",
  "role": "assistant",
  "model": "claude-3-7-sonnet-20250219",
  "content": [
    {"type": "thinking", "thinking": "The user wants the weather.", "signature": "EqQBCgIYAhIM"},
    {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
     "input": {"location": "San Francisco, CA", "usage": {"input_tokens": 999}}}
  ],
  "stop_reason": "tool_use",
  "stop_sequence": null,
  "usage": {"input_tokens": 384, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 2048, "output_tokens": 96}
}"""


def stream(*events: tuple[bytes, bytes]) -> bytes:
    return b"".join(b"event: " + name + b"\ndata: " + data + b"\n\n" for name, data in events)


MESSAGE_START = (
    b"message_start",
    b'{"type":"message_start","message":{"id":"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",'
    b'"type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-20250514",'
    b'"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,'
    b'"cache_creation_input_tokens":0,"cache_read_input_tokens":1800,'
    b'"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},'
    b'"output_tokens":2,"service_tier":"standard"}}}',
)
CONTENT = [
    (
        b"content_block_start",
        b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
    ),
    (b"ping", b'{"type": "ping"}'),
    (
        b"content_block_delta",
        b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}',
    ),
    (
        b"content_block_delta",
        b'{"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"! \\"usage\\": message_delta"}}',
    ),
    (b"content_block_stop", b'{"type":"content_block_stop","index":0}'),
]
MESSAGE_DELTA = (
    b"message_delta",
    b'{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"input_tokens":472,"cache_creation_input_tokens":0,'
    b'"cache_read_input_tokens":1800,"output_tokens":89}}',
)
MESSAGE_STOP = (b"message_stop", b'{"type":"message_stop"}')
MESSAGES_STREAM = stream(MESSAGE_START, *CONTENT, MESSAGE_DELTA, MESSAGE_STOP)
STREAM_USAGE = Usage(
    model="claude-sonnet-4-20250514",
    input_tokens=472 + 1800,
    output_tokens=89,
    cache_read_tokens=1800,
    finish_reason="end_turn",
    upstream_request_id="req_011CSHoEeqs5C35K2UUqR7Fy",
    reported=True,
)

# Older API versions: message_delta carries only output_tokens.
OLD_DELTA = (
    b"message_delta",
    b'{"type":"message_delta","delta":{"stop_reason":"max_tokens","stop_sequence":null},'
    b'"usage":{"output_tokens":15}}',
)

ERROR_JSON = (
    b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},'
    b'"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}'
)

OPENAI_COMPAT_JSON = (
    b'{"id":"msg_01","object":"chat.completion","created":1749000000,'
    b'"model":"claude-3-5-haiku-20241022","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,'
    b'"completion_tokens":3,"total_tokens":15}}'
)

# ---------------------------------------------------------------------------

FORMAT = AnthropicFormat()
HEADERS = {"request-id": "req_011CSHoEeqs5C35K2UUqR7Fy"}


def request(path: bytes, body: object, method: bytes = b"POST") -> RequestFacts:
    return FORMAT.inspect(method, path, b"", orjson.dumps(body)).facts


def run(meter: Meter, body: bytes, size: int) -> bytes:
    out = b"".join(meter.feed(body[i : i + size]) for i in range(0, len(body), size))
    return out + meter.finish()


MESSAGES = request(
    b"/v1/messages",
    {"model": "claude-sonnet-4-20250514", "max_tokens": 1024, "messages": [], "stream": True},
)


class InspectTests(SynchronousTestCase):
    """
    L{AnthropicFormat.inspect}.
    """

    def test_messages(self) -> None:
        body = {
            "model": "claude-sonnet-4-20250514",
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": "Hello"}],
            "metadata": {"user_id": "13803d75-b4b5-4c3e-b2a2-6f21399b021b"},
            "stream": True,
        }
        self.assertEqual(
            request(b"/v1/messages", body),
            RequestFacts(
                method="POST",
                endpoint="messages",
                model="claude-sonnet-4-20250514",
                streaming=True,
                user="13803d75-b4b5-4c3e-b2a2-6f21399b021b",
                prompt_chars=5,
                max_output_tokens=1024,
            ),
        )

    def test_endpoints(self) -> None:
        cases = [
            (b"POST", b"/v1/messages", "messages"),
            (b"POST", b"/v1/messages/count_tokens", "count_tokens"),
            (b"POST", b"/v1/messages/batches", "other"),
            (b"GET", b"/v1/models", "models"),
            (b"GET", b"/v1/models/claude-sonnet-4-20250514", "models"),
            (b"POST", b"/v1/complete", "other"),
            (b"POST", b"/v1/chat/completions", "chat.completions"),
        ]
        for method, path, endpoint in cases:
            self.assertEqual(FORMAT.inspect(method, path, b"", b"").facts.endpoint, endpoint)

    def test_garbage(self) -> None:
        for body in (b"", b"\x00\x01", b'{"metadata": "x", "model": []}', b"null", b"{"):
            info = FORMAT.inspect(b"POST", b"/v1/messages", b"", body).facts
            self.assertEqual((info.model, info.user, info.streaming), (None, None, False))

    def test_noRewrite(self) -> None:
        raw = orjson.dumps({"model": "m", "stream": True})
        inspection = FORMAT.inspect(b"POST", b"/v1/messages", b"", raw)
        self.assertEqual((inspection.body, inspection.strip_usage_chunk), (raw, False))


class JSONMeterTests(SynchronousTestCase):
    """
    Non-streaming Messages bodies.
    """

    plain = request(b"/v1/messages", {"model": "claude-sonnet-4-20250514", "messages": []})

    def test_cacheWrite(self) -> None:
        for size in (1, 50, len(MESSAGE_JSON)):
            meter = FORMAT.new_meter(self.plain, b"application/json", HEADERS, False)
            self.assertEqual(run(meter, MESSAGE_JSON, size), MESSAGE_JSON)
            self.assertEqual(meter.usage(), MESSAGE_USAGE)

    def test_cacheReadToolUse(self) -> None:
        """
        Cache reads count as input; a C{usage} key inside a tool's input is
        not the message's usage.
        """
        meter = FORMAT.new_meter(self.plain, b"application/json", HEADERS, False)
        run(meter, TOOL_USE_JSON, 64)
        self.assertEqual(
            meter.usage(),
            Usage(
                model="claude-3-7-sonnet-20250219",
                input_tokens=384 + 2048,
                output_tokens=96,
                cache_read_tokens=2048,
                finish_reason="tool_use",
                upstream_request_id="req_011CSHoEeqs5C35K2UUqR7Fy",
                reported=True,
            ),
        )

    def test_error(self) -> None:
        meter = FORMAT.new_meter(self.plain, b"application/json", HEADERS, False)
        run(meter, ERROR_JSON, 10)
        self.assertEqual(
            meter.usage(),
            Usage(model="claude-sonnet-4-20250514", upstream_request_id=HEADERS["request-id"]),
        )

    def test_countTokens(self) -> None:
        """
        Counting tokens is not using them.
        """
        info = request(b"/v1/messages/count_tokens", {"model": "claude-sonnet-4-20250514"})
        meter = FORMAT.new_meter(info, b"application/json", HEADERS, False)
        run(meter, b'{"input_tokens": 2095}', 5)
        self.assertFalse(meter.usage().reported)

    def test_bodyIdFallback(self) -> None:
        meter = FORMAT.new_meter(self.plain, b"application/json", {}, False)
        run(meter, MESSAGE_JSON, 1000)
        self.assertEqual(meter.usage().upstream_request_id, "msg_013Zva2CMHLNnXjNJJKqJ2EF")

    def test_openAICompatible(self) -> None:
        """
        Anthropic's C{/v1/chat/completions} answers in OpenAI's shape.
        """
        info = request(b"/v1/chat/completions", {"model": "claude-3-5-haiku-latest"})
        meter = FORMAT.new_meter(info, b"application/json", HEADERS, False)
        run(meter, OPENAI_COMPAT_JSON, 1000)
        self.assertEqual(
            meter.usage(),
            Usage(
                model="claude-3-5-haiku-20241022",
                input_tokens=12,
                output_tokens=3,
                finish_reason="stop",
                upstream_request_id=HEADERS["request-id"],
                reported=True,
            ),
        )


class StreamTests(SynchronousTestCase):
    """
    Messages streams.
    """

    def meter(self) -> Meter:
        return FORMAT.new_meter(MESSAGES, b"text/event-stream; charset=utf-8", HEADERS, False)

    def test_stream(self) -> None:
        for size in (1, 13, len(MESSAGES_STREAM)):
            meter = self.meter()
            for i in range(0, len(MESSAGES_STREAM), size):
                chunk = MESSAGES_STREAM[i : i + size]
                self.assertIs(meter.feed(chunk), chunk)
            self.assertEqual(meter.finish(), b"")
            self.assertEqual(meter.usage(), STREAM_USAGE)

    def test_oldDelta(self) -> None:
        """
        A C{message_delta} with only C{output_tokens} keeps the input from
        C{message_start}.
        """
        meter = self.meter()
        run(meter, stream(MESSAGE_START, *CONTENT, OLD_DELTA, MESSAGE_STOP), 100)
        self.assertEqual(
            meter.usage(),
            Usage(
                model="claude-sonnet-4-20250514",
                input_tokens=2272,
                output_tokens=15,
                cache_read_tokens=1800,
                finish_reason="max_tokens",
                upstream_request_id=HEADERS["request-id"],
                reported=True,
            ),
        )

    def test_cumulativeReplaces(self) -> None:
        """
        Later C{message_delta} usage replaces earlier values, field by field,
        never adds.
        """
        first = (
            b"message_delta",
            b'{"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens":40}}',
        )
        second = (
            b"message_delta",
            b'{"type":"message_delta","delta":{"stop_reason":"pause_turn"},'
            b'"usage":{"input_tokens":900,"output_tokens":60}}',
        )
        meter = self.meter()
        run(meter, stream(MESSAGE_START, first, second, MESSAGE_STOP), 1000)
        usage = meter.usage()
        self.assertEqual(
            (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.finish_reason),
            (900 + 1800, 60, 1800, "pause_turn"),
        )

    def test_partial(self) -> None:
        """
        Cut after some content: the input is known, output is what
        C{message_start} said.
        """
        meter = self.meter()
        meter.feed(stream(MESSAGE_START, *CONTENT[:3]))
        self.assertEqual(
            meter.usage(),
            Usage(
                model="claude-sonnet-4-20250514",
                input_tokens=2272,
                output_tokens=2,
                cache_read_tokens=1800,
                upstream_request_id=HEADERS["request-id"],
                reported=True,
            ),
        )

    def test_nothing(self) -> None:
        meter = self.meter()
        self.assertEqual(
            meter.usage(),
            Usage(model="claude-sonnet-4-20250514", upstream_request_id=HEADERS["request-id"]),
        )

    def test_errorEvent(self) -> None:
        """
        An C{error} event mid-stream is passed on and changes nothing.
        """
        body = stream(MESSAGE_START, (b"error", ERROR_JSON))
        meter = self.meter()
        self.assertEqual(run(meter, body, 7), body)
        self.assertEqual(meter.usage().input_tokens, 2272)

    def test_withoutEventLines(self) -> None:
        """
        Events are also recognised by the C{type} in their data.
        """
        body = b"".join(b"data: " + data + b"\n\n" for _, data in (MESSAGE_START, MESSAGE_DELTA))
        meter = self.meter()
        run(meter, body, 1000)
        self.assertEqual(meter.usage(), STREAM_USAGE)


class ErrorShapeTests(SynchronousTestCase):
    """
    Errors the proxy makes, in Anthropic's shape.
    """

    def test_errorBody(self) -> None:
        cases = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
            500: "api_error",
            502: "api_error",
            503: "overloaded_error",
            504: "timeout_error",
            529: "overloaded_error",
            418: "invalid_request_error",
            599: "api_error",
        }
        for status, kind in cases.items():
            self.assertEqual(
                orjson.loads(FORMAT.error_body(status, "no")),
                {"type": "error", "error": {"type": kind, "message": "no"}},
            )

    def test_sseErrorEvent(self) -> None:
        event = FORMAT.sse_error_event(502, "upstream went away")
        self.assertTrue(event.startswith(b"event: error\ndata: "))
        self.assertTrue(event.endswith(b"\n\n"))
        self.assertEqual(
            orjson.loads(event[len(b"event: error\ndata: ") :]),
            {"type": "error", "error": {"type": "api_error", "message": "upstream went away"}},
        )


class PromptTextTests(SynchronousTestCase):
    """
    L{AnthropicFormat.prompt_text_chars}.
    """

    def test_messages(self) -> None:
        info = request(
            b"/v1/messages",
            {
                "model": "m",
                "system": [{"type": "text", "text": "Be kind.", "cache_control": {"type": "x"}}],
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/png",
                                    "data": "A",
                                },
                            },
                            {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                        ],
                    },
                ],
                "tools": [{"name": "w", "input_schema": {"type": "object"}}],
            },
        )
        self.assertEqual(info.prompt_chars, 8 + 2 + 5 + (4 + 1 + 12))

    def test_notJSON(self) -> None:
        info = FORMAT.inspect(b"POST", b"/v1/messages", b"", b"\x89PNG").facts
        self.assertIsNone(info.prompt_chars)
